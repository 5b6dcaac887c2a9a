"""What every Res-Tuner shares: its tensors come from the contract, its output is ``t + s * delta``.

A tuner layer only computes. Its tensor names and shapes are read from
``tuners_store.config.tuner_tensor_specs`` so that the module and the artifact cannot
disagree; the scale (fixed, learned scalar or learned per-channel) is handled here once.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from restuning.tuners.ops import residual
from tuners_store.config import BypassConfig, TunerKind, tuner_tensor_specs

Params = Mapping[str, Tensor]
"""A tuner's tensors by short name (``w1``, ``k``, ...): one task's, or K tasks' stacked."""

PREFIX_INIT_STD = 0.02
"""Std of the learned prefix / prompt tokens at init: small, like token embeddings."""


class ResTuner(nn.Module):
    """``t + s * delta(t)``, applied to every token on its own."""

    kind: ClassVar[TunerKind]
    """The config's ``bypass.tuner`` value this class implements."""
    output_params: ClassVar[tuple[str, ...]]
    """Tensors of the last projection: zeroed by ``zero_init_last`` so the delta starts at 0."""

    def __init__(self, dim: int, bypass: BypassConfig) -> None:
        super().__init__()
        for full_name, spec in tuner_tensor_specs(self.kind, "t", dim, bypass).items():
            name = full_name.removeprefix("t.")
            self.register_parameter(name, nn.Parameter(torch.empty(spec.shape)))
        self.fixed_scale = bypass.scale
        """The scale when it is not learned (also the init value of a learned one)."""

    def tensors(self) -> dict[str, Tensor]:
        """This tuner's parameters by short name."""
        return dict(self.named_parameters(recurse=False))

    def forward(self, t: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        return self.compute(t, self.tensors(), self.fixed_scale)

    @classmethod
    def compute(cls, t: Tensor, p: Params, fixed_scale: float) -> Tensor:
        """The tuner's output for one task's or K stacked tasks' tensors ``p`` (see ops)."""
        return residual(t, cls.delta(t, p), p.get("scale", fixed_scale))

    @staticmethod
    @abstractmethod
    def delta(t: Tensor, p: Params) -> Tensor:
        """The branch added to the identity path, before scaling; same shape as the output."""

    @abstractmethod
    def init_weights(self, p: Params, generator: torch.Generator) -> None:
        """Reference init of the tuner's own tensors (not the scale), in place."""

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator, *, zero_output: bool = False) -> None:
        """Reference init; ``zero_output`` zeroes the last projection (``zero_init_last``)."""
        p = self.tensors()
        self.init_weights(p, generator)
        if "scale" in p:
            p["scale"].fill_(self.fixed_scale)
        if zero_output:
            for name in self.output_params:
                p[name].zero_()
