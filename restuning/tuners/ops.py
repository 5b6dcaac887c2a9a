"""Tensor ops of the Res-Tuners, written once for one task and for a stack of K tasks.

A weight with a leading task axis (K, ...) means "K tasks at once". The token input of a
stacked op is either shared by all tasks, (M, I), as the backbone features are for the lateral
tuners, or one slice per task, (K, M, I), as the vertical stream is. The per-task modules and
the stacked fan-out call these same functions, so both paths compute the same equations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def project(t: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``t W^T + b`` for one task or for K stacked tasks.

    - ``weight`` (O, I): one task; ``t`` (..., I) -> (..., O).
    - ``weight`` (K, O, I), ``bias`` (K, O): K tasks; ``t`` (M, I) shared by all of them, or
      (K, M, I) one slice per task -> (K, M, O).
    """
    if weight.dim() == 2:
        return F.linear(t, weight, bias)
    k, o, i = weight.shape
    if t.dim() == 2:
        # One GEMM against the K weights side by side: the shared input is read once.
        flat_bias = bias.reshape(k * o) if bias is not None else None
        y = F.linear(t, weight.reshape(k * o, i), flat_bias)  # (M, K*O)
        return y.view(t.shape[0], k, o).transpose(0, 1)  # (K, M, O)
    if bias is None:
        return torch.bmm(t, weight.transpose(1, 2))  # (K, M, O)
    return torch.baddbmm(bias.unsqueeze(1), t, weight.transpose(1, 2))  # (K, M, O)


def residual(t: Tensor, delta: Tensor, scale: Tensor | float) -> Tensor:
    """``t + s * delta``: the identity path of every Res-Tuner.

    ``scale`` is a float, a learned (1,) or (D,) tensor of one task, or a stacked (K, 1) or
    (K, D) tensor, which is lifted to (K, 1, X) to broadcast over the (K, M, D) delta.
    """
    if isinstance(scale, Tensor) and scale.dim() == 2:
        scale = scale.unsqueeze(1)  # (K, 1, 1|D)
    return torch.addcmul(t, delta, scale) if isinstance(scale, Tensor) else t + scale * delta


def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(r)) v`` over P learned tokens.

    ``q`` (..., M, r); ``k``, ``v`` (P, r) for one task or (K, P, r) stacked -> (..., M, r).
    Each query row attends only to the learned tokens, so the op stays per token.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (..., M, P)
    return torch.matmul(scores.softmax(dim=-1), v)  # (..., M, r)
