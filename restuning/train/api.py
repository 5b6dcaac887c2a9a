"""Train one task's bypass + head on a frozen backbone: what ``restune train`` and the demo call.

Steps: config from the data and the tuner options -> reference init (seeded) -> deterministic
train/validation split -> features into the on-disk cache (each image through the backbone
once, ever; a killed run resumes) -> :func:`loop.fit` reading them back a batch at a time (or,
with augmentation, computing the training images' features per batch every epoch) -> a module
whose config carries the training summary, ready for ``artifact_io.save_task``.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restuning.heads import loss_fn
from restuning.preprocess import PreprocessMode
from restuning.train.augment import AugmentedRows, AugmentOptions
from restuning.train.data import DataError, LabeledImages, split_indices
from restuning.train.feature_cache import (
    DEFAULT_BATCH_SIZE,
    FeatureBackbone,
    FeatureCache,
    StoreDtype,
)
from restuning.train.loop import FeatureRows, FitResult, Objective, TrainOptions, fit
from restuning.train.metrics import PRIMARY_METRIC, chance_score, evaluate
from restuning.train.progress import Progress, Reporter
from restuning.tuners import TaskModule, build_task, init_task
from tuners_store.config import (
    BackboneRef,
    BypassConfig,
    Combine,
    Pooling,
    ScaleMode,
    TrainingSummary,
    TunerConfig,
    TunerKind,
    parameter_count,
)

DEFAULT_VAL_FRACTION = 0.2


@dataclass(frozen=True)
class TaskOptions:
    """What the trained tuner looks like (recorded in its config)."""

    tuner: TunerKind = "res_adapter"
    """Kind of every lateral and vertical Res-Tuner."""
    layers: tuple[int, int] | None = None
    """First and last block of the bypass, 1-based inclusive; None: every block."""
    bottleneck: int = 32
    """Hidden width r of each Res-Tuner."""
    pooling: Pooling = "cls"
    """``cls`` (features of CLS rows only) or ``mean`` (all tokens)."""
    combine: Combine = "sum"
    lam: float = 0.5
    scale_mode: ScaleMode = "fixed"
    scale: float = 1.0
    prefix_len: int = 8
    """Learned tokens of res_prefix / res_prompt."""
    embedding_dim: int = 64
    """Output width of an embedding task."""
    zero_init_last: bool = False
    """Start the last bypass layer's output projections at zero."""
    description: str = ""


class TrainedTask(NamedTuple):
    """A trained module (its config holds the summary) and the summary itself."""

    module: TaskModule
    summary: TrainingSummary


def build_config(
    name: str, data: LabeledImages, backbone: FeatureBackbone, options: TaskOptions
) -> TunerConfig:
    """The tuner config for ``data`` on ``backbone`` (training summary still empty)."""
    embedding = data.task == "embedding"
    return TunerConfig(
        name=name,
        task=data.task,
        labels=() if embedding else data.labels,
        embedding_dim=options.embedding_dim if embedding else None,
        backbone=BackboneRef(
            arch=backbone.arch,
            fingerprint=backbone.fingerprint,
            dim=backbone.dim,
            depth=backbone.depth,
        ),
        bypass=BypassConfig(
            tuner=options.tuner,
            layers=options.layers or (1, backbone.depth),
            bottleneck=options.bottleneck,
            combine=options.combine,
            lam=options.lam,
            scale_mode=options.scale_mode,
            scale=options.scale,
            prefix_len=options.prefix_len,
        ),
        pooling=options.pooling,
        description=options.description,
    )


def frozen_norm_copy(norm: nn.LayerNorm) -> nn.LayerNorm:
    """A float32 CPU copy of the backbone's final norm: training runs there, whatever the
    serving device and dtype."""
    return copy.deepcopy(norm).to(device="cpu", dtype=torch.float32).requires_grad_(False)


def train_task(
    data: LabeledImages,
    name: str,
    backbone: FeatureBackbone,
    *,
    task: TaskOptions | None = None,
    options: TrainOptions | None = None,
    cache_dir: Path | None = None,
    cache: FeatureCache | None = None,
    augment: AugmentOptions | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    batch_size_features: int = DEFAULT_BATCH_SIZE,
    cache_dtype: StoreDtype = "float16",
    cache_max_bytes: int | None = None,
    preprocess: PreprocessMode = "exact",
    notes: Mapping[str, float] | None = None,
    progress: Progress = True,
    should_stop: Callable[[], bool] | None = None,
) -> TrainedTask:
    """Train a tuner called ``name`` for ``data`` on ``backbone``.

    ``cache_dir`` keeps features on disk between runs (None: a temporary directory for this
    call); ``cache`` reuses a :class:`FeatureCache` whose spec covers the task's (several tasks
    on the same images). ``cache_dtype`` is how features are stored; ``cache_max_bytes``
    bounds the cache directory; ``preprocess`` is the mode the server will prepare uploads in
    (``RESTUNE_PREPROCESS``), so the tuner learns from the pixels it will be served.
    ``notes`` go into the summary's ``extra`` (e.g. ``skipped_images``). ``augment``
    recomputes training features per epoch. Raises :class:`DataError` for
    unusable data, ``CacheSpaceError`` when the features would not fit and
    ``TrainingCancelledError`` when ``should_stop`` turns true.
    """
    task = task or TaskOptions()
    options = options or TrainOptions()
    reporter = Reporter(progress, should_stop)
    if len(data) < 2:
        raise DataError(f"{data.source}: need at least two images, got {len(data)}")
    config = build_config(name, data, backbone, task)
    norm = frozen_norm_copy(backbone.final_norm)
    module = init_task(config, norm, options.seed, zero_init_last=task.zero_init_last)
    spec = module.feature_spec
    train_idx, val_idx = split_indices(data, val_fraction, options.seed)
    if len(train_idx) == 0:
        raise DataError(f"{data.source}: no training images left after the split")

    feature_started = time.perf_counter()
    with contextlib.ExitStack() as owned:
        if cache is None:
            cache = FeatureCache(
                cache_dir,
                backbone,
                spec,
                batch_size=batch_size_features,
                store_dtype=cache_dtype,
                max_bytes=cache_max_bytes,
                preprocess=preprocess,
            )
            owned.callback(cache.close)  # a temporary directory when cache_dir is None
        cache.reporter = reporter
        forwards_before = cache.forwards
        # Augmented runs still need the cached features of the validation images only.
        wanted = val_idx if augment is not None else np.arange(len(data))
        if len(wanted):
            cache.ensure([data.images[i] for i in wanted])
        val_rows = cache.rows([data.images[i] for i in val_idx], spec) if len(val_idx) else None
        feature_seconds = time.perf_counter() - feature_started
        augmented: AugmentedRows | None = None
        train_rows: FeatureRows
        if augment is not None:
            augmented = AugmentedRows(
                backbone,
                [data.images[i] for i in train_idx],
                spec,
                seed=options.seed,
                options=augment,
                batch_size=batch_size_features,
                row_shape=val_rows.row_shape if val_rows is not None else None,
            )
            train_rows = augmented
        else:
            train_rows = cache.rows([data.images[i] for i in train_idx], spec)

        train_targets = data.targets[torch.from_numpy(train_idx)]
        val_targets = data.targets[torch.from_numpy(val_idx)] if len(val_idx) else None
        objective, finish = _objective(config, data, train_targets, options.seed)
        result = fit(
            module,
            train_rows,
            train_targets,
            val_rows,
            val_targets,
            objective,
            options,
            reporter,
        )
        finish(module)

        extra = {k: v for k, v in result.val.items() if k != objective.primary}
        extra.update(
            params=float(parameter_count(config)),
            train_loss=result.train_loss,
            best_epoch=float(result.best_epoch),
            train_seconds=round(result.seconds, 3),
            feature_seconds=round(feature_seconds, 3),
            backbone_forwards=float(cache.forwards - forwards_before),
        )
        if augmented is not None:
            extra["backbone_forwards"] += augmented.forwards
            extra["augmented"] = 1.0
        chance = (
            chance_score(config.task, train_targets, val_targets)
            if val_targets is not None
            else None
        )
        if chance is not None:
            extra["chance"] = round(chance, 6)
        extra.update(notes or {})
        summary = TrainingSummary(
            data=data.source,
            epochs=result.epochs_run,
            train_size=len(train_idx),
            val_size=len(val_idx),
            val_metric=objective.primary if result.val else "",
            val_score=result.val.get(objective.primary),
            seed=options.seed,
            extra=extra,
        )
        reporter.message(_describe(name, summary))
        trained = build_task(
            config.model_copy(update={"training": summary}), module.state_dict(), norm
        )
        return TrainedTask(trained.eval(), summary)


def _objective(
    config: TunerConfig, data: LabeledImages, train_targets: Tensor, seed: int
) -> tuple[Objective, Callable[[TaskModule], None]]:
    """The loss and metrics of ``config.task``, and what to do to the module after training.

    Regression trains on standardised targets (the head starts near zero, so raw targets of
    large scale would train slowly); the scale is folded into the head afterwards. Embedding
    tasks pull each image towards a fixed random direction of its class.
    """
    base_loss = loss_fn(config)
    kind = config.task

    def metrics(outputs: Tensor, targets: Tensor) -> dict[str, float]:
        return evaluate(kind, outputs, targets)

    def nothing(_module: TaskModule) -> None:
        return None

    if kind == "regression":
        mean = train_targets.mean(dim=0)  # (C,)
        std = train_targets.std(dim=0, unbiased=False).clamp_min(1e-6)  # (C,)

        def scaled_loss(outputs: Tensor, targets: Tensor) -> Tensor:
            return base_loss(outputs, (targets - mean) / std)

        def scaled_metrics(outputs: Tensor, targets: Tensor) -> dict[str, float]:
            return evaluate(kind, outputs * std + mean, targets)

        @torch.no_grad()
        def fold_scale(module: TaskModule) -> None:
            module.head.weight.mul_(std[:, None])
            module.head.bias.mul_(std).add_(mean)

        return Objective(scaled_loss, scaled_metrics, PRIMARY_METRIC[kind]), fold_scale
    if kind == "embedding":
        generator = torch.Generator().manual_seed(seed)
        proxies = F.normalize(
            torch.randn(len(data.labels), config.num_outputs, generator=generator), dim=-1
        )  # (classes, E)

        def proxy_loss(outputs: Tensor, classes: Tensor) -> Tensor:
            return base_loss(outputs, proxies[classes])

        return Objective(proxy_loss, metrics, PRIMARY_METRIC[kind]), nothing
    return Objective(base_loss, metrics, PRIMARY_METRIC[kind]), nothing


def _describe(name: str, summary: TrainingSummary) -> str:
    score = (
        f"val {summary.val_metric} {summary.val_score:.4f}"
        if summary.val_score is not None
        else "no validation set"
    )
    return (
        f"{name}: {score} after {summary.epochs} epochs "
        f"({summary.train_size} train / {summary.val_size} val images)"
    )


__all__ = ["FitResult", "TaskOptions", "TrainedTask", "build_config", "train_task"]
