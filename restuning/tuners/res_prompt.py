"""Res-Prompt: Res-Prefix whose keys and values come from P learned prompt tokens (P, D).

``K = prompt Wk^T``, ``V = prompt Wv^T``; then
``t + s * (Wo softmax((Wq t) K^T / sqrt(r)) V + bo)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from restuning.tuners.base import PREFIX_INIT_STD, Params, ResTuner
from restuning.tuners.ops import attend, project
from restuning.tuners.registry import register_tuner


@register_tuner
class ResPrompt(ResTuner):
    """wq, wk, wv (r, D), prompt (P, D), wo (D, r), bo (D)."""

    kind = "res_prompt"
    output_params = ("wo", "bo")

    @staticmethod
    def delta(t: Tensor, p: Params) -> Tensor:
        k = project(p["prompt"], p["wk"], None)  # (P, r) or (K, P, r)
        v = project(p["prompt"], p["wv"], None)  # (P, r) or (K, P, r)
        q = project(t, p["wq"], None)  # (..., r)
        return project(attend(q, k, v), p["wo"], p["bo"])  # (..., D)

    def init_weights(self, p: Params, generator: torch.Generator) -> None:
        nn.init.xavier_uniform_(p["wq"], generator=generator)
        nn.init.normal_(p["prompt"], std=PREFIX_INIT_STD, generator=generator)
        nn.init.xavier_uniform_(p["wk"], generator=generator)
        nn.init.xavier_uniform_(p["wv"], generator=generator)
        nn.init.xavier_uniform_(p["wo"], generator=generator)
        nn.init.zeros_(p["bo"])
