"""``restune train --search``: train a short list of bypass shapes, keep the best on validation.

The candidates are the shapes the accuracy benchmark (``python -m bench --only efficacy``,
docs/TRAINING.md) found worth their serving cost. Each is trained by :func:`train_task` on the
same split and seed; candidates reading the same tokens share one feature cache, so an image
goes through the backbone once per token selection. The winner is the highest validation score;
a tie goes to the candidate listed first (the cheaper one to serve).

Serving cost is measured here for each candidate, on this backbone: one batch through capture +
the stacked fan-out of K copies of the trained task, as a multiple of one plain forward of the
same batch (what ``bench/fanout_cost`` measures for the server).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from restuning.fanout import StackedGroup
from restuning.features import FeatureSpec, TokenSelection
from restuning.preprocess import PreprocessMode
from restuning.train.api import DEFAULT_VAL_FRACTION, TaskOptions, TrainedTask, train_task
from restuning.train.augment import AugmentOptions
from restuning.train.data import LabeledImages
from restuning.train.feature_cache import FeatureBackbone, FeatureCache
from restuning.train.loop import TrainOptions
from restuning.train.progress import Progress
from restuning.tuners import TaskModule, build_task
from tuners_store.config import Pooling, TunerKind

COST_TASKS = 19
"""Tasks served together when a candidate's cost is measured (VTAB's 19)."""
COST_BATCH = 8
COST_REPEATS = 3
MAX_COST_TASKS = 256


@dataclass(frozen=True)
class Candidate:
    """One bypass shape tried by the search."""

    name: str
    tuner: TunerKind = "res_adapter"
    pooling: Pooling = "cls"
    top_layers: int | None = None
    """Bypass over the last this many blocks (None: every block)."""

    def options(self, base: TaskOptions, depth: int) -> TaskOptions:
        """``base`` with this candidate's tuner, pooling and layer range."""
        layers = (max(1, depth - self.top_layers + 1), depth) if self.top_layers else None
        return replace(base, tuner=self.tuner, pooling=self.pooling, layers=layers)


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("adapter-cls-top6", top_layers=6),
    Candidate("adapter-cls"),
    Candidate("adapter-mean", pooling="mean"),
)
"""The shapes that were best on at least one benchmark task, cheapest to serve first (the
default, CLS rows of the last 6 blocks: 0.93x one forward at K = 19 on DINOv2 ViT-S/14 at
112 px; every block 0.94x; all tokens mean-pooled 2.17x). Res-Prefix and Res-Prompt were best
on none of the 7 tasks, so they are not tried; ``--tuner`` still trains them."""


@dataclass(frozen=True)
class SearchRow:
    """One candidate's outcome."""

    candidate: Candidate
    trained: TrainedTask
    val_score: float | None
    cost_x: float | None
    """Serving cost at ``COST_TASKS`` tasks as a multiple of one plain forward (None: not
    measured)."""
    seconds: float


def search(
    data: LabeledImages,
    name: str,
    backbone: FeatureBackbone,
    *,
    task: TaskOptions,
    options: TrainOptions,
    candidates: tuple[Candidate, ...] = CANDIDATES,
    cache_dir: Path | None = None,
    augment: AugmentOptions | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    preprocess: PreprocessMode = "exact",
    progress: Progress = True,
    measure_cost: bool = True,
    report: Callable[[SearchRow], None] | None = None,
) -> tuple[SearchRow, list[SearchRow]]:
    """Train every candidate; returns (the best row, all rows in candidate order)."""
    if not candidates:
        raise ValueError("the search needs at least one candidate")
    if val_fraction <= 0 and data.val_mask is None:
        raise ValueError("the search picks on the validation split: --val-fraction must be > 0")
    caches: dict[str, FeatureCache] = {}
    all_layers = tuple(range(backbone.depth + 1))
    rows: list[SearchRow] = []
    for candidate in candidates:
        candidate_task = candidate.options(task, backbone.depth)
        tokens: TokenSelection = "cls" if candidate.pooling == "cls" else "all"
        cache = caches.get(tokens)
        if cache is None:
            spec = FeatureSpec(all_layers, tokens)
            cache = FeatureCache(cache_dir, backbone, spec, preprocess=preprocess)
            caches[tokens] = cache
        started = time.perf_counter()
        trained = train_task(
            data,
            name,
            backbone,
            task=candidate_task,
            options=options,
            cache=cache,
            augment=augment,
            val_fraction=val_fraction,
            progress=progress,
        )
        cost = serving_cost(backbone, trained.module) if measure_cost else None
        row = SearchRow(
            candidate, trained, trained.summary.val_score, cost, time.perf_counter() - started
        )
        rows.append(row)
        if report is not None:
            report(row)
    best = rows[0]
    for row in rows[1:]:
        if (row.val_score or 0.0) > (best.val_score or 0.0):
            best = row
    return best, rows


@torch.inference_mode()
def serving_cost(
    backbone: FeatureBackbone,
    module: TaskModule,
    tasks: int = COST_TASKS,
    batch: int = COST_BATCH,
    repeats: int = COST_REPEATS,
) -> float:
    """Capture + stacked fan-out of ``tasks`` copies of ``module`` for one random batch, as a
    multiple of one plain backbone forward of that batch (best of ``repeats`` each)."""
    if not 1 <= tasks <= MAX_COST_TASKS or not 1 <= batch <= 64 or repeats < 1:
        raise ValueError("tasks, batch or repeats out of range")
    _, height, width = backbone.data_config.input_size
    device = backbone.final_norm.weight.device
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    images = images.to(device)
    last = FeatureSpec((backbone.depth,), "all")
    state = module.state_dict()
    copies = [
        build_task(
            module.config.model_copy(update={"name": f"cost{i}"}), state, backbone.final_norm
        )
        for i in range(tasks)
    ]
    group = StackedGroup(copies, "stacked")
    spec = copies[0].feature_spec
    rows = [torch.arange(batch, device=device)] * tasks

    def plain() -> object:
        # A plain forward: every block over every token, only the last output kept.
        return backbone.forward_features(images, last)

    def served() -> object:
        return group(backbone.forward_features(images, spec), rows)

    return _best_seconds(served, repeats) / _best_seconds(plain, repeats)


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


__all__ = ["CANDIDATES", "Candidate", "SearchRow", "search", "serving_cost"]
