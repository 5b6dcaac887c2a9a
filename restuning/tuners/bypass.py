"""The Res-Tuning-Bypass: lateral and vertical Res-Tuners beside the frozen backbone.

    h_{first-1} = x_{first-1}
    h_l = lateral_l(x_l) + vertical_l(h_{l-1})                  combine = sum
    h_l = lam * lateral_l(x_l) + (1 - lam) * vertical_l(h_{l-1})  combine = lerp
    z   = FinalNorm(h_last)     the backbone's own final LayerNorm, frozen
    out = z[CLS] (pooling cls) or mean of z over patch tokens 1..N-1 (pooling mean)

Every op is per token, so CLS-pooled tasks run the same code on CLS rows only (N' = 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restuning.features import Features
from restuning.tuners.base import ResTuner
from restuning.tuners.registry import tuner_class
from tuners_store.config import SIDES, Combine, Pooling, TunerConfig

TunerFn = Callable[[int, Tensor], Tensor]
"""``(layer l, tokens) -> tokens``: one side's Res-Tuner at bypass layer l."""


def run_bypass(
    x: Callable[[int], Tensor],
    layers: range,
    lateral: TunerFn,
    vertical: TunerFn,
    combine: Combine,
    lam: float,
) -> Tensor:
    """The bypass recurrence over ``layers``; returns h_last.

    ``x(l)`` gives the backbone feature x_l. Shapes follow the tuners: (..., D) for one task,
    (K, M, D) for a stack (the first h may be the shared (M, D)).
    """
    h = x(layers.start - 1)
    for layer in layers:
        lat = lateral(layer, x(layer))
        vert = vertical(layer, h)
        h = lat + vert if combine == "sum" else torch.lerp(vert, lat, lam)
    return h


def pool_tokens(z: Tensor, pooling: Pooling) -> Tensor:
    """(..., N', D) -> (..., D): the CLS row, or the mean of the patch tokens 1..N'-1."""
    if pooling == "cls":
        return z[..., 0, :]
    if z.shape[-2] < 2:
        raise ValueError("mean pooling needs all tokens; the features hold the CLS row only")
    return z[..., 1:, :].mean(dim=-2)


class Bypass(nn.Module):
    """Lateral and vertical Res-Tuners of one task, then the frozen final norm and pooling.

    The final norm's tensors are non-persistent buffers: they follow ``.to()`` but are not in
    ``state_dict()`` (an artifact never carries the backbone's norm) and get no gradient.
    """

    norm_weight: Tensor | None
    norm_bias: Tensor | None

    def __init__(self, config: TunerConfig, final_norm: nn.LayerNorm) -> None:
        super().__init__()
        dim = config.backbone.dim
        if tuple(final_norm.normalized_shape) != (dim,):
            raise ValueError(
                f"final norm has shape {tuple(final_norm.normalized_shape)}, "
                f"the tuner's backbone dim is {dim}"
            )
        b = config.bypass
        cls = tuner_class(b.tuner)
        self.layers = b.block_range
        self.combine: Combine = b.combine
        self.lam = b.lam
        self.pooling: Pooling = config.pooling
        self.lateral = nn.ModuleDict({str(layer): cls(dim, b) for layer in self.layers})
        self.vertical = nn.ModuleDict({str(layer): cls(dim, b) for layer in self.layers})
        weight = final_norm.weight.detach() if final_norm.weight is not None else None
        bias = final_norm.bias.detach() if final_norm.bias is not None else None
        self.register_buffer("norm_weight", weight, persistent=False)
        self.register_buffer("norm_bias", bias, persistent=False)
        self.norm_eps = final_norm.eps

    def tuner(self, side: str, layer: int) -> ResTuner:
        """The Res-Tuner on ``side`` (lateral | vertical) at bypass layer ``layer``."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}")
        module = (self.lateral if side == "lateral" else self.vertical)[str(layer)]
        assert isinstance(module, ResTuner)
        return module

    def final_norm(self, h: Tensor) -> Tensor:
        """The backbone's frozen final LayerNorm over the last axis."""
        return F.layer_norm(h, h.shape[-1:], self.norm_weight, self.norm_bias, self.norm_eps)

    def forward(self, features: Features) -> Tensor:
        """Features (L', B, N', D) holding x_{first-1}..x_last -> pooled (B, D)."""
        h = run_bypass(
            features.layer,
            self.layers,
            lambda layer, t: self.lateral[str(layer)](t),
            lambda layer, t: self.vertical[str(layer)](t),
            self.combine,
            self.lam,
        )  # (B, N', D)
        return pool_tokens(self.final_norm(h), self.pooling)  # (B, D)
