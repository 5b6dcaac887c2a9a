"""Res-Adapter: ``t + s * (W2 GELU(W1 t + b1) + b2)`` with exact (erf) GELU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restuning.tuners.base import Params, ResTuner
from restuning.tuners.ops import project
from restuning.tuners.registry import register_tuner

BIAS_INIT_STD = 1e-6
"""b1 ~ N(0, 1e-6) as in the reference implementation."""


@register_tuner
class ResAdapter(ResTuner):
    """Bottleneck MLP beside the identity: w1 (r, D), b1 (r), w2 (D, r), b2 (D)."""

    kind = "res_adapter"
    output_params = ("w2", "b2")

    @staticmethod
    def delta(t: Tensor, p: Params) -> Tensor:
        hidden = F.gelu(project(t, p["w1"], p["b1"]))  # (..., r)
        return project(hidden, p["w2"], p["b2"])  # (..., D)

    def init_weights(self, p: Params, generator: torch.Generator) -> None:
        nn.init.xavier_uniform_(p["w1"], generator=generator)
        nn.init.normal_(p["b1"], std=BIAS_INIT_STD, generator=generator)
        nn.init.xavier_uniform_(p["w2"], generator=generator)
        nn.init.zeros_(p["b2"])
