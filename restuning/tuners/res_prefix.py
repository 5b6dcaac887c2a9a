"""Res-Prefix: ``t + s * (Wo softmax((Wq t) K^T / sqrt(r)) V + bo)`` with learned K, V (P, r)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from restuning.tuners.base import PREFIX_INIT_STD, Params, ResTuner
from restuning.tuners.ops import attend, project
from restuning.tuners.registry import register_tuner


@register_tuner
class ResPrefix(ResTuner):
    """Each token queries P learned key/value tokens: wq (r, D), k, v (P, r), wo (D, r), bo (D)."""

    kind = "res_prefix"
    output_params = ("wo", "bo")

    @staticmethod
    def delta(t: Tensor, p: Params) -> Tensor:
        q = project(t, p["wq"], None)  # (..., r)
        return project(attend(q, p["k"], p["v"]), p["wo"], p["bo"])  # (..., D)

    def init_weights(self, p: Params, generator: torch.Generator) -> None:
        nn.init.xavier_uniform_(p["wq"], generator=generator)
        nn.init.normal_(p["k"], std=PREFIX_INIT_STD, generator=generator)
        nn.init.normal_(p["v"], std=PREFIX_INIT_STD, generator=generator)
        nn.init.xavier_uniform_(p["wo"], generator=generator)
        nn.init.zeros_(p["bo"])
