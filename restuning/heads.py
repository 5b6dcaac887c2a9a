"""From a task's raw outputs to API answers, and the training loss of each task kind.

Raw outputs (B, C) are what :class:`restuning.tuners.TaskModule` returns: logits for
classification and multilabel, values for regression, the unnormalised embedding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tuners_store.config import TaskKind, TunerConfig

Answer = dict[str, Any]
"""One image's JSON-able answer for one task (the ``tasks.<name>`` body minus version/sha)."""

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``(outputs (B, C), targets) -> scalar loss``."""


def postprocess(config: TunerConfig, outputs: Tensor, top_k: int) -> list[Answer]:
    """One answer per row of ``outputs`` (B, C).

    - classification: softmax; ``{"labels": [{"label", "score"}, ...]}``, the ``top_k``
      highest scores, descending.
    - multilabel: independent sigmoids; same shape, the ``top_k`` highest.
    - regression: ``{"values": {label: value}}`` for every output.
    - embedding: ``{"embedding": [...]}``, L2-normalised.
    """
    if top_k < 1:
        raise ValueError("top_k must be at least 1")
    if outputs.dim() != 2 or outputs.shape[1] != config.num_outputs:
        raise ValueError(
            f"outputs of shape {tuple(outputs.shape)}; expected (B, {config.num_outputs})"
        )
    scores = outputs.detach().to(device="cpu", dtype=torch.float32)  # (B, C)
    if config.task == "regression":
        return [dict(values=dict(zip(config.labels, row, strict=True))) for row in scores.tolist()]
    if config.task == "embedding":
        return [dict(embedding=row) for row in F.normalize(scores, dim=-1).tolist()]
    probs = scores.softmax(dim=-1) if config.task == "classification" else scores.sigmoid()
    top = probs.topk(min(top_k, config.num_outputs), dim=-1, sorted=True)
    return [
        {
            "labels": [
                {"label": config.labels[i], "score": s} for s, i in zip(vals, idx, strict=True)
            ]
        }
        for vals, idx in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]


def _cosine_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return (1.0 - F.cosine_similarity(outputs, targets, dim=-1)).mean()


_LOSSES: dict[TaskKind, LossFn] = {
    "classification": F.cross_entropy,
    "multilabel": F.binary_cross_entropy_with_logits,
    "regression": F.mse_loss,
    "embedding": _cosine_loss,
}


def loss_fn(config: TunerConfig) -> LossFn:
    """The training loss of ``config.task``; targets per kind:

    - classification: cross-entropy; targets (B,) class indices (long).
    - multilabel: binary cross-entropy on logits; targets (B, C) in {0, 1} (float).
    - regression: mean squared error; targets (B, C) (float).
    - embedding: mean of ``1 - cos(output, target)``; targets (B, E) target embeddings
      (only directions matter, since answers are L2-normalised).
    """
    return _LOSSES[config.task]
