"""Validation metrics per task kind, computed on raw task outputs.

- classification: ``accuracy``.
- multilabel: ``map`` (mean over labels of average precision; labels without a positive are
  skipped) and ``f1`` (micro, at probability 0.5).
- regression: ``r2`` (coefficient of determination, averaged over outputs) and ``mae``.
- embedding: ``recall@1``: the nearest other validation embedding (cosine) has the same class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tuners_store.config import TaskKind

PRIMARY_METRIC: dict[TaskKind, str] = {
    "classification": "accuracy",
    "multilabel": "map",
    "regression": "r2",
    "embedding": "recall@1",
}
"""The metric that picks the best epoch and is recorded as the artifact's ``val_metric``;
higher is better for each."""


def evaluate(task: TaskKind, outputs: Tensor, targets: Tensor) -> dict[str, float]:
    """Every metric of ``task`` for ``outputs`` (n, C) against ``targets``.

    Targets as in :class:`restuning.train.data.LabeledImages`: class indices (n,) for
    classification and embedding, (n, C) for multilabel (0/1) and regression.
    """
    out = outputs.detach().float()
    if task == "classification":
        return {"accuracy": accuracy(out, targets)}
    if task == "multilabel":
        return {"map": mean_average_precision(out, targets), "f1": micro_f1(out, targets)}
    if task == "regression":
        return {"r2": r2_score(out, targets), "mae": float((out - targets).abs().mean())}
    return {"recall@1": recall_at_1(out, targets)}


def accuracy(logits: Tensor, classes: Tensor) -> float:
    """Share of rows whose highest logit is the target class."""
    return float((logits.argmax(dim=-1) == classes).float().mean())


def average_precision(scores: Tensor, positive: Tensor) -> float:
    """Mean of the precision at the rank of each positive, scores sorted descending."""
    order = torch.argsort(scores, descending=True, stable=True)
    hits = positive[order].float()  # (n,)
    n_pos = float(hits.sum())
    if n_pos == 0:
        return float("nan")
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float32)
    return float((precision * hits).sum() / n_pos)


def mean_average_precision(logits: Tensor, targets: Tensor) -> float:
    """Mean AP over labels that have at least one positive."""
    aps = [average_precision(logits[:, c], targets[:, c] > 0.5) for c in range(logits.shape[1])]
    valid = [ap for ap in aps if ap == ap]  # NaN for labels without positives
    return sum(valid) / len(valid) if valid else 0.0


def micro_f1(logits: Tensor, targets: Tensor) -> float:
    """F1 over every (row, label) decision at probability 0.5 (logit 0)."""
    predicted = logits > 0
    actual = targets > 0.5
    tp = float((predicted & actual).sum())
    denominator = float(predicted.sum() + actual.sum())
    return 2.0 * tp / denominator if denominator else 1.0


def r2_score(values: Tensor, targets: Tensor) -> float:
    """1 - SS_res / SS_tot per output, averaged; an output with no variance scores 0."""
    ss_res = ((targets - values) ** 2).sum(dim=0)
    ss_tot = ((targets - targets.mean(dim=0)) ** 2).sum(dim=0)
    per_output = torch.where(ss_tot > 0, 1.0 - ss_res / ss_tot.clamp_min(1e-12), 0.0)
    return float(per_output.mean())


def recall_at_1(embeddings: Tensor, classes: Tensor) -> float:
    """Share of rows whose nearest other row (cosine) has the same class; 0 below two rows."""
    if embeddings.shape[0] < 2:
        return 0.0
    unit = F.normalize(embeddings, dim=-1)
    similarity = unit @ unit.T  # (n, n)
    similarity.fill_diagonal_(-float("inf"))
    nearest = similarity.argmax(dim=-1)
    return float((classes[nearest] == classes).float().mean())


def chance_score(task: TaskKind, train_targets: Tensor, val_targets: Tensor) -> float | None:
    """The primary metric on the validation split of the best answer that ignores the image:
    the training set's majority class (classification), its label frequencies (multilabel) or
    its mean (regression). A tuner at or below it learned nothing usable; ``None`` for
    embeddings, whose constant answer has no meaningful score.
    """
    n = int(val_targets.shape[0])
    if n == 0:
        return None
    if task == "classification":
        counts = torch.bincount(train_targets.long())
        constant = torch.zeros(n, max(int(counts.numel()), int(val_targets.max()) + 1))
        constant[:, int(counts.argmax())] = 1.0  # (n, C): always the majority class
        return accuracy(constant, val_targets)
    if task == "multilabel":
        prevalence = train_targets.float().mean(dim=0)  # (C,)
        return mean_average_precision(prevalence.expand(n, -1), val_targets)
    if task == "regression":
        mean = train_targets.float().mean(dim=0)  # (C,)
        return r2_score(mean.expand(n, -1), val_targets)
    return None
