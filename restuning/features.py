"""What a backbone forward captures for the bypasses: which layers, which tokens."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

TokenSelection = Literal["cls", "all"]


@dataclass(frozen=True)
class FeatureSpec:
    """Layers to capture and which tokens of them.

    ``layers`` index the residual stream: 0 is the input of block 1 (patch embed + CLS +
    position embed [+ norm_pre]), l >= 1 the output of block l (before the final norm).
    ``tokens == "cls"`` keeps only the CLS row of each layer.
    """

    layers: tuple[int, ...]
    tokens: TokenSelection = "cls"

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("FeatureSpec needs at least one layer")
        if tuple(sorted(set(self.layers))) != self.layers:
            raise ValueError("FeatureSpec.layers must be sorted and unique")
        if self.layers[0] < 0:
            raise ValueError("layer indices start at 0")

    @staticmethod
    def union(specs: Iterable[FeatureSpec]) -> FeatureSpec:
        """The smallest spec that serves all of ``specs`` (all tokens if any needs them)."""
        specs = list(specs)
        if not specs:
            raise ValueError("union of no specs")
        layers = sorted({layer for s in specs for layer in s.layers})
        tokens: TokenSelection = "all" if any(s.tokens == "all" for s in specs) else "cls"
        return FeatureSpec(tuple(layers), tokens)

    def covers(self, other: FeatureSpec) -> bool:
        """Whether features captured with ``self`` can serve ``other``."""
        return set(other.layers) <= set(self.layers) and (
            self.tokens == "all" or other.tokens == "cls"
        )


@dataclass(frozen=True)
class Features:
    """Detached intermediate features of one batch.

    ``data`` is (L', B, N', D): L' = len(spec.layers) in spec order, N' = 1 for CLS-only
    capture, else all tokens (CLS first).
    """

    spec: FeatureSpec
    data: torch.Tensor  # (L', B, N', D)

    @property
    def batch_size(self) -> int:
        return int(self.data.shape[1])

    def layer(self, index: int) -> torch.Tensor:
        """x_index as (B, N', D)."""
        return self.data[self.spec.layers.index(index)]

    def select(self, spec: FeatureSpec) -> Features:
        """A view holding only ``spec``'s layers and tokens (``self.spec`` must cover it)."""
        if not self.spec.covers(spec):
            raise ValueError(f"features {self.spec} do not cover {spec}")
        if spec == self.spec:
            return self
        pos = [self.spec.layers.index(layer) for layer in spec.layers]
        data = _take_layers(self.data, pos)  # (L', B, N, D)
        if spec.tokens == "cls" and self.spec.tokens == "all":
            data = data[:, :, :1]
        return Features(spec, data)

    def rows(self, index: torch.Tensor | slice) -> Features:
        """Features of a subset of the batch's images."""
        return Features(self.spec, self.data[:, index])


def _take_layers(data: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """``data[positions]`` without turning a Python list into an index tensor.

    Indexing with a list builds the index on the host and copies it to the device: a CUDA
    graph capture refuses that copy. Evenly spaced positions are a strided view; any others
    are stacked from per-layer views, which are device ops only.
    """
    if len(positions) == 1:
        return data[positions[0] : positions[0] + 1]
    step = positions[1] - positions[0]
    if step > 0 and all(b - a == step for a, b in itertools.pairwise(positions)):
        return data[positions[0] : positions[-1] + 1 : step]
    return torch.stack([data[p] for p in positions])
