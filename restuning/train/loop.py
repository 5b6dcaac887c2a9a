"""The optimisation loop: a task module (bypass + head) trained on backbone features.

AdamW, a linear warm-up then a cosine decay per step, mini-batches shuffled by a seeded
generator (same seed, same data -> same weights). After each epoch the validation metric is
computed; the best epoch's weights are kept, and with ``patience`` training stops once the
metric has not improved for that many epochs.

Features come from a :class:`FeatureRows` source one batch at a time (the on-disk cache, or
augmented features computed for the batch), so the loop's memory is bounded by a batch: an
all-token ViT-S/14 feature row is 5 MB in float32, and a dataset of them does not fit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from restuning.features import Features, FeatureSpec
from restuning.train.progress import Reporter
from restuning.tuners import TaskModule

SMALL_STEP_ELEMENTS = 1 << 20
"""Steps whose feature batch per layer (B x N' x D) is below this run on one intra-op thread.

Such steps (every CLS-pooled task: 64 x 1 x 384) are microseconds of work per op; waking a
second OpenMP thread for each op cost more than it saved, and on a loaded 2-core machine
made a training run 12x slower (the training test module: 215 s -> 18 s).
"""
FORWARD_FEATURE_BYTES = 64 * 1024 * 1024
"""Float32 feature bytes per forward (and backward): a training step whose batch holds more
runs as micro-batches whose gradients add up to the batch's, and validation forwards are cut
to fit. An all-token ViT-S/14 row is 5.1 MB: 13 rows per forward instead of 64 (training) or
512 (validation); a step of 64 such rows held 1.9 GB at its peak. CLS rows (20 KB) are never
split."""


class FeatureRows(Protocol):
    """Features of a fixed list of images, read a batch at a time."""

    @property
    def row_shape(self) -> tuple[int, int, int]:
        """(L', N', D) of one image."""
        ...

    def __len__(self) -> int: ...

    def read(self, index: Tensor, epoch: int = 0) -> Tensor:
        """(L', b, N', D) float32 features of the images at ``index`` (b,) for ``epoch``."""
        ...


class TensorRows:
    """:class:`FeatureRows` over features already in memory (L', n, N', D)."""

    def __init__(self, data: Tensor) -> None:
        self.data = data  # (L', n, N', D)
        self.row_shape: tuple[int, int, int] = (data.shape[0], data.shape[2], data.shape[3])

    def __len__(self) -> int:
        return int(self.data.shape[1])

    def read(self, index: Tensor, epoch: int = 0) -> Tensor:  # (L', b, N', D)
        del epoch
        return self.data[:, index]


@dataclass(frozen=True)
class TrainOptions:
    """How to optimise (not what the tuner looks like: see ``api.TaskOptions``)."""

    epochs: int = 30
    """Passes over the training images."""
    batch_size: int = 64
    """Images per optimisation step."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 1e-4
    """AdamW's decoupled weight decay."""
    warmup_fraction: float = 0.05
    """Share of all steps spent warming the learning rate up linearly from 0."""
    seed: int = 0
    """Seeds the tuner init, the shuffling, the split and the augmentation."""
    patience: int | None = None
    """Stop after this many epochs without a better validation metric (None: never)."""
    eval_batch_size: int = 512
    """Rows per forward when computing validation outputs."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs and batch sizes must be at least 1")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError("lr must be positive and weight_decay non-negative")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError("warmup_fraction must lie in [0, 1)")
        if self.patience is not None and self.patience < 1:
            raise ValueError("patience must be at least 1")


@dataclass(frozen=True)
class Objective:
    """What is minimised and what is reported."""

    loss: Callable[[Tensor, Tensor], Tensor]
    """``(outputs (B, C), targets) -> scalar``."""
    metrics: Callable[[Tensor, Tensor], dict[str, float]]
    """``(outputs (n, C), targets) -> {name: value}`` on the validation set."""
    primary: str
    """The metric (higher is better) that picks the best epoch."""


@dataclass(frozen=True)
class FitResult:
    """What happened during :func:`fit`."""

    epochs_run: int
    best_epoch: int
    """1-based epoch whose weights were kept (the last one without validation data)."""
    train_loss: float
    """Mean training loss of the last epoch run."""
    val: dict[str, float] = field(default_factory=dict)
    """Validation metrics of the kept weights (empty without validation data)."""
    stopped_early: bool = False
    seconds: float = 0.0


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def rows_per_forward(row_shape: tuple[int, int, int], batch_size: int) -> int:
    """Rows per forward: ``batch_size``, fewer when their float32 features would pass
    :data:`FORWARD_FEATURE_BYTES`."""
    row_bytes = 4 * row_shape[0] * row_shape[1] * row_shape[2]
    return max(1, min(batch_size, FORWARD_FEATURE_BYTES // max(1, row_bytes)))


@torch.no_grad()
def predict(
    module: TaskModule, spec: FeatureSpec, rows: FeatureRows | Tensor, batch_size: int
) -> Tensor:
    """Raw outputs (n, C) of ``module`` for every image of ``rows`` (or of features already in
    memory, (L', n, N', D)), a bounded batch at a time."""
    if isinstance(rows, Tensor):
        rows = TensorRows(rows)
    was_training = module.training
    module.eval()
    step = rows_per_forward(rows.row_shape, batch_size)
    outputs = []
    for start in range(0, len(rows), step):
        index = torch.arange(start, min(start + step, len(rows)))
        data = rows.read(index)  # (L', b, N', D)
        with step_threads(len(index) * data.shape[2] * data.shape[3]):
            outputs.append(module(Features(spec, data)))
    module.train(was_training)
    return torch.cat(outputs)


@contextmanager
def step_threads(elements_per_layer: int) -> Iterator[None]:
    """One intra-op thread for small steps, restored afterwards.

    The setting is per calling thread (OpenMP and MKL keep it thread-locally), so a training
    thread inside a server does not change the threads its request path uses.
    """
    if elements_per_layer >= SMALL_STEP_ELEMENTS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _epoch(
    module: TaskModule,
    rows: FeatureRows,
    epoch: int,
    targets: Tensor,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    order: Tensor,  # (n,) shuffled row indices
    batch_size: int,
    reporter: Reporter,
) -> float:
    """One pass over ``rows`` in mini-batches read one at a time; returns the mean loss.

    A mini-batch larger than one forward's byte budget runs as micro-batches: each one's
    loss is weighted by its share of the mini-batch, so the summed gradients are those of the
    mini-batch's mean loss (every objective here is a mean over rows).
    """
    spec = module.feature_spec
    micro = rows_per_forward(rows.row_shape, batch_size)
    loss_sum = 0.0
    for start in range(0, len(order), batch_size):
        reporter.check()
        idx = order[start : start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        for part in (idx[i : i + micro] for i in range(0, len(idx), micro)):
            # Read (or augment and compute) outside step_threads: a backbone forward wants
            # every thread even when the bypass step on its output is small.
            data = rows.read(part, epoch)  # (L', b, N', D)
            with step_threads(len(part) * data.shape[2] * data.shape[3]):
                outputs = module(Features(spec, data))  # (b, C)
                loss = objective.loss(outputs, targets[part])
                weighted = loss if len(part) == len(idx) else loss * (len(part) / len(idx))
                torch.autograd.backward(weighted)
            loss_sum += float(loss.detach()) * len(part)
            del data, outputs, loss, weighted
        with step_threads(len(idx) * rows.row_shape[1] * rows.row_shape[2]):
            optimizer.step()
        schedule.step()
    return loss_sum / len(order)


def fit(
    module: TaskModule,
    train_rows: FeatureRows,
    train_targets: Tensor,
    val_rows: FeatureRows | None,
    val_targets: Tensor | None,
    objective: Objective,
    options: TrainOptions,
    reporter: Reporter | None = None,
) -> FitResult:
    """Train ``module``'s parameters in place; returns with the best epoch's weights loaded."""
    reporter = reporter or Reporter(False)
    started = time.perf_counter()
    spec = module.feature_spec
    n = int(train_targets.shape[0])
    if n == 0:
        raise ValueError("no training images")
    if len(train_rows) != n:
        raise ValueError(f"{len(train_rows)} feature rows for {n} training targets")
    steps_per_epoch = math.ceil(n / options.batch_size)
    total = steps_per_epoch * options.epochs
    warmup = int(total * options.warmup_fraction)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup)
    )
    shuffle = torch.Generator().manual_seed(options.seed)
    best_score = -math.inf
    best_state: dict[str, Tensor] | None = None
    best_epoch = 0
    best_val: dict[str, float] = {}
    epoch_loss = math.nan
    stopped_early = False
    epoch = 0
    module.train()
    with reporter.bar(options.epochs, f"train {module.config.name}", unit="epoch") as bar:
        for epoch in range(1, options.epochs + 1):
            epoch_loss = _epoch(
                module,
                train_rows,
                epoch - 1,
                train_targets,
                objective,
                optimizer,
                schedule,
                torch.randperm(n, generator=shuffle),
                options.batch_size,
                reporter,
            )
            val = (
                objective.metrics(
                    predict(module, spec, val_rows, options.eval_batch_size), val_targets
                )
                if val_rows is not None and val_targets is not None and len(val_targets) > 0
                else None
            )
            if val is None:
                best_epoch = epoch
                bar.set_postfix(loss=f"{epoch_loss:.4f}")
                bar.update()
                continue
            score = val[objective.primary]
            if score > best_score:
                best_score, best_epoch, best_val = score, epoch, val
                best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            bar.set_postfix(loss=f"{epoch_loss:.4f}", **{objective.primary: f"{score:.4f}"})
            bar.update()
            if options.patience is not None and epoch - best_epoch >= options.patience:
                stopped_early = epoch < options.epochs
                break
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return FitResult(
        epochs_run=epoch,
        best_epoch=best_epoch,
        train_loss=epoch_loss,
        val=best_val,
        stopped_early=stopped_early,
        seconds=time.perf_counter() - started,
    )
