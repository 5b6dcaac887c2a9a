"""The synchronous compute core: one backbone forward per batch, fanned out to many tasks.

Runs on the batcher's single worker thread. For a batch it

1. takes the union :class:`FeatureSpec` of the tasks its images asked for,
2. serves images from the feature cache where it can,
3. runs the backbone once on the misses (identical pixels once), capturing only that union,
4. runs each task on the rows that asked for it, tasks of one ``stack_key`` stacked,
5. turns raw outputs into answers per task.

An image's answer does not depend on what else is in its batch (up to float rounding):
every op on the way is per row.

Failures cost only their own answers. A task the backbone cannot serve
(its config names layers or a width the backbone lacks), a task that raises, returns the wrong
shape or non-finite numbers, answers a per-task error object with a stable code; an image whose
features come out non-finite answers an error for that image only. A stacked group with a
failing member is rerun without it, so the others' answers are bit for bit those of a batch
without the culprit, and the culprit is quarantined: it runs alone from then on, and healthy
tasks never pay for its failed attempt again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from restuning.fanout import StackedGroup
from restuning.features import Features, FeatureSpec
from restuning.heads import postprocess
from server.engine.feature_cache import FeatureCache
from server.engine.loaded_tuner import LoadedTuner, TunerKey
from server.engine.runtime import Backbone
from server.metrics import Metrics

log = logging.getLogger(__name__)

Answer = dict[str, Any]
"""One image's JSON answer for one task (``version``, ``sha256``, ``kind`` + the result), or
``{"error": {"code", "detail"}}``."""

DEFAULT_GROUP_CACHE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class BatchItem:
    """One image of a request, with the tuner versions resolved for it at submit time."""

    pixels: torch.Tensor  # (3, H, W) float32, normalised
    digest: str
    """Digest of the backbone input (``input_digest``): the feature cache key."""
    tuners: tuple[LoadedTuner, ...]
    """Distinct task names; each answer is keyed by ``tuner.name``."""
    top_k: int


@dataclass(frozen=True)
class ItemOutput:
    """The answers for one image."""

    answers: dict[str, Answer]
    cache_hit: bool


@dataclass(frozen=True)
class BatchOutput:
    """Answers for every item of a batch, in order, and what the batch cost."""

    items: list[ItemOutput]
    backbone_ms: float
    fanout_ms: float
    forwards: int = 0
    """Backbone forwards run (0 when every image hit the cache)."""


def task_error(code: str, detail: str) -> Answer:
    """The per-task failure object of the API."""
    return {"error": {"code": code, "detail": detail}}


FailureReason = Literal[
    "task_failed",
    "non_finite_output",
    "bad_output_shape",
    "backbone_mismatch",
    "non_finite_features",
]
"""Codes of the answers a task or an image fails with in the engine (the metric's reasons):

- ``task_failed``: the task raised (running or postprocessing);
- ``non_finite_output``: the task's output row holds NaN/Inf (finite features in);
- ``bad_output_shape``: the task returned something other than (rows, num_outputs);
- ``backbone_mismatch``: the task's config needs layers or a width the backbone lacks;
- ``non_finite_features``: the image's backbone features hold NaN/Inf (its pixels are absurd).
"""
FAILURE_REASONS: tuple[str, ...] = get_args(FailureReason)

QUARANTINE_SIZE = 1024
"""Failing tuner versions remembered (LRU): they run alone, outside stacked groups, until
unloaded. A task whose output overflowed once on some image is among them: running alone
adds about 5 ms to a batch beside 19 stacked tasks (ViT-S, batch 8, one CPU thread:
bench/isolation_cost.py), where retrying the stack every batch adds 99 ms."""

DETAIL_CHARS = 300
"""Longest exception text quoted in a failure's ``detail``."""


@dataclass
class _Task:
    tuner: LoadedTuner
    rows: list[int] = field(default_factory=list)


RETIRED_KEYS_KEPT = 4096
"""Unloaded tuner versions the group cache remembers, so a batch still running on one does
not put a group holding it back into the cache."""


class _GroupCache:
    """LRU of built stacked groups, bounded by the bytes their stacked copies hold.

    Keys are the members' (name, version, sha256), so a group never outlives new weights.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._groups: OrderedDict[frozenset[TunerKey], tuple[StackedGroup, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._retired: OrderedDict[TunerKey, None] = OrderedDict()
        self.builds = 0

    def drop(self, key: TunerKey) -> int:
        """Forget every group holding tuner ``key`` (it was unloaded); returns how many.

        Loop groups hold the modules themselves and weigh 0 bytes, so without this they
        would keep unloaded tuners alive for good.
        """
        with self._lock:
            self._retired[key] = None
            while len(self._retired) > RETIRED_KEYS_KEPT:
                self._retired.popitem(last=False)
            doomed = [k for k in self._groups if key in k]
            for k in doomed:
                self._bytes -= self._groups.pop(k)[1]
            return len(doomed)

    def get(self, tuners: Sequence[LoadedTuner]) -> StackedGroup:
        key = frozenset(t.key for t in tuners)
        with self._lock:
            found = self._groups.get(key)
            if found is not None:
                self._groups.move_to_end(key)
                return found[0]
        group = StackedGroup([t.module for t in tuners])
        # A stacked group copies its tasks' weights (heads padded); a loop group shares them.
        size = group.nbytes
        with self._lock:
            self.builds += 1
            retired = any(k in self._retired for k in key)
            if size <= self.capacity_bytes and key not in self._groups and not retired:
                self._groups[key] = (group, size)
                self._bytes += size
                while self._bytes > self.capacity_bytes:
                    _, (_, old) = self._groups.popitem(last=False)
                    self._bytes -= old
        return group

    def __len__(self) -> int:
        return len(self._groups)


class Engine:
    """Backbone + feature cache + fan-out. Call :meth:`run_batch` from one thread at a time."""

    def __init__(
        self,
        backbone: Backbone,
        cache: FeatureCache,
        metrics: Metrics | None = None,
        *,
        tuner_device: torch.device | str = "cpu",
        group_cache_bytes: int = DEFAULT_GROUP_CACHE_BYTES,
    ) -> None:
        self.backbone = backbone
        self.cache = cache
        self.metrics = metrics
        self.tuner_device = torch.device(tuner_device)
        self.groups = _GroupCache(group_cache_bytes)
        self._quarantine: OrderedDict[TunerKey, None] = OrderedDict()
        self._logged: OrderedDict[tuple[TunerKey, str], None] = OrderedDict()
        self._lock = threading.Lock()  # forget_tuner runs on another thread

    def forget_tuner(self, tuner: LoadedTuner) -> None:
        """``tuner`` was unloaded: drop what the engine built from it (its stacked groups)
        and knows of it (its quarantine)."""
        self.groups.drop(tuner.key)
        with self._lock:
            self._quarantine.pop(tuner.key, None)

    def quarantined(self, key: TunerKey) -> bool:
        """Whether tuner version ``key`` failed here and so runs alone, outside any stack."""
        with self._lock:
            return key in self._quarantine

    def close(self) -> None:
        """Free what the engine holds beyond its caches; called once, after the last batch.
        The eager engine holds nothing to free (the GPU engine frees its graph plans)."""

    def on_tuner_swapped(self, name: str, tuner: LoadedTuner | None) -> None:
        """Task ``name`` now serves ``tuner`` (``None``: not loaded here); the registry calls
        this on every swap. The eager engine builds nothing ahead of a batch (the GPU engine
        queues the new version's graph plans)."""

    def run_batch(self, items: Sequence[BatchItem]) -> BatchOutput:
        """Answers for every item; a failing task or image gets its own error, others answer."""
        if not items:
            return BatchOutput([], 0.0, 0.0)
        answers: list[dict[str, Answer]] = [{} for _ in items]
        tasks = self._tasks(items)
        servable = [t for t in tasks.values() if self._servable(t, answers)]
        if not servable:
            return BatchOutput([ItemOutput(a, False) for a in answers], 0.0, 0.0)
        spec = FeatureSpec.union(t.tuner.module.feature_spec for t in servable)

        started = time.perf_counter()
        features, hits, forwards, finite = self._features(items, spec)
        backbone_s = time.perf_counter() - started

        started = time.perf_counter()
        bad_images = frozenset(i for i, ok in enumerate(finite) if not ok)
        self._fan_out(features, servable, items, answers, bad_images)
        for row in sorted(bad_images):
            self._image_failed(row, items[row], answers[row])
        fanout_s = time.perf_counter() - started

        self._observe_batch(len(items), tasks, servable, backbone_s, fanout_s, forwards)
        return BatchOutput(
            [ItemOutput(a, hit) for a, hit in zip(answers, hits, strict=True)],
            backbone_ms=backbone_s * 1000.0,
            fanout_ms=fanout_s * 1000.0,
            forwards=forwards,
        )

    def _observe_batch(
        self,
        size: int,
        tasks: dict[TunerKey, _Task],
        servable: Sequence[_Task],
        backbone_s: float,
        fanout_s: float,
        forwards: int,
    ) -> None:
        """Record one batch in the metrics (shared with the GPU engine's plan path)."""
        if self.metrics is None:
            return
        m = self.metrics
        m.batch_size.observe(size)
        m.fanout.observe(fanout_s)
        if forwards:
            m.backbone_forward.observe(backbone_s)
            m.tasks_per_forward.observe(len({t.tuner.name for t in servable}))
        for task in tasks.values():
            m.predictions.labels(task=m.task_label(task.tuner.name)).inc(len(task.rows))

    @staticmethod
    def _tasks(items: Sequence[BatchItem]) -> dict[TunerKey, _Task]:
        """Distinct tuner versions of the batch and the rows asking for each."""
        tasks: dict[TunerKey, _Task] = {}
        for row, item in enumerate(items):
            for tuner in item.tuners:
                tasks.setdefault(tuner.key, _Task(tuner)).rows.append(row)
        return tasks

    def _servable(self, task: _Task, answers: list[dict[str, Answer]]) -> bool:
        """Whether the backbone has what ``task`` reads; if not, its rows answer the error.

        A config that lies about the backbone (more blocks, another width) would otherwise
        put layers the backbone lacks into the batch's capture and fail every image of it.
        """
        tuner = task.tuner
        detail = self._backbone_misfit(tuner)
        if detail is None:
            return True
        self._failed(task, "backbone_mismatch", detail, len(task.rows))
        error = task_error("backbone_mismatch", detail)
        for row in task.rows:
            answers[row][tuner.name] = error
        return False

    def _backbone_misfit(self, tuner: LoadedTuner) -> str | None:
        """Why the backbone lacks what ``tuner`` reads, or ``None`` when it has it all."""
        b = self.backbone
        ref = tuner.config.backbone
        layers = tuner.module.feature_spec.layers
        if ref.dim == b.dim and ref.depth == b.depth and layers[-1] <= b.depth:
            return None
        return (
            f"task {tuner.name!r} v{tuner.version} was built for a backbone of depth "
            f"{ref.depth}, width {ref.dim} (layers up to {layers[-1]}); this one has depth "
            f"{b.depth}, width {b.dim}"
        )

    def _cache_finite(
        self, digests: Sequence[str], spec: FeatureSpec, data: torch.Tensor
    ) -> list[bool]:
        """Whether each image's features (L', M, N', D) are finite; only finite rows are cached
        (under ``digests[j]``), so a cache hit is always finite."""
        ok = _finite_rows(data)
        fingerprint = self.backbone.fingerprint
        for j, digest in enumerate(digests):
            if ok[j]:
                self.cache.put(digest, fingerprint, spec, data[:, j])
        return ok

    def _features(
        self,
        items: Sequence[BatchItem],
        spec: FeatureSpec,
        cached: list[torch.Tensor | None] | None = None,
    ) -> tuple[Features, list[bool], int, list[bool]]:
        """Features (L', B, N', D) of every item for ``spec``: cache hits + one forward.

        Also whether each item's features are finite. Non-finite rows are not cached, and the
        cache holds nothing else, so a hit is finite. ``cached``: the cache lookups of
        ``items`` the caller already made (each lookup counts a hit or a miss).
        """
        fingerprint = self.backbone.fingerprint
        rows: list[torch.Tensor | None] = (
            list(cached)
            if cached is not None
            else [self.cache.get(item.digest, fingerprint, spec) for item in items]
        )
        hits = [r is not None for r in rows]
        finite = [True] * len(items)
        # Identical pixels in one batch are computed once.
        miss_digests = list(
            dict.fromkeys(i.digest for i, r in zip(items, rows, strict=True) if r is None)
        )
        forwards = 0
        if miss_digests:
            first_item = {item.digest: item for item in reversed(items)}
            pixels = torch.stack([first_item[d].pixels for d in miss_digests])  # (M, 3, H, W)
            computed = self.backbone.forward_features(pixels, spec)  # (L', M, N', D)
            forwards = 1
            ok = self._cache_finite(miss_digests, spec, computed.data)
            position = {d: j for j, d in enumerate(miss_digests)}
            finite = [
                r is not None or bool(ok[position[i.digest]])
                for i, r in zip(items, rows, strict=True)
            ]
            if not any(hits) and len(miss_digests) == len(items):
                return self._on_tuner_device(computed), hits, forwards, finite
            for i, item in enumerate(items):
                if rows[i] is None:
                    rows[i] = computed.data[:, position[item.digest]]
        data = torch.stack([r for r in rows if r is not None], dim=1)  # (L', B, N', D)
        return self._on_tuner_device(Features(spec, data)), hits, forwards, finite

    def _on_tuner_device(self, features: Features) -> Features:
        """Tuners compute in float32 on their device, whatever the backbone's dtype."""
        data = features.data.to(device=self.tuner_device, dtype=torch.float32)
        return features if data is features.data else Features(features.spec, data)

    def _fan_out(
        self,
        features: Features,
        tasks: list[_Task],
        items: Sequence[BatchItem],
        answers: list[dict[str, Answer]],
        bad_images: frozenset[int] = frozenset(),
    ) -> None:
        """Run every task on its rows, one stacked group per shape, and fill ``answers``.

        Quarantined tasks run alone. Every task also runs on the rows of images whose features
        are not finite (their answers are replaced afterwards): dropping those rows would move
        the others within the stacked matmuls and change their rounding.
        """
        for group in _groups(tasks, self.quarantined, mixed_heads=True):
            outputs = self._run_group(group, features, bad_images)
            for task, out in zip(group, outputs, strict=True):
                self._answer(task, out, items, answers, bad_images)

    def _run_group(
        self, group: list[_Task], features: Features, bad_images: frozenset[int]
    ) -> list[torch.Tensor | BaseException]:
        """Outputs (n_k, C) of each task of a stackable group, or the exception it raised.

        When a member fails (raises, or returns a wrong shape or non-finite rows for finite
        features), each member runs alone to find the culprits, which are quarantined, and
        the rest run again as a group: their answers are then exactly those of a batch without
        the culprits, whatever the culprits' numbers did to a shared stack.
        """
        rows = [torch.tensor(t.rows, dtype=torch.long) for t in group]
        outputs: list[torch.Tensor | BaseException]
        try:
            stacked = self.groups.get([t.tuner for t in group])
            outputs = list(stacked(features, rows))
        except Exception as exc:
            if len(group) == 1:
                outputs = [exc]
            else:
                log.debug("stacked group of %d tasks failed; running each alone", len(group))
                outputs = [
                    self._run_alone(t, features, r) for t, r in zip(group, rows, strict=True)
                ]
        culprits = [
            i
            for i, (t, out) in enumerate(zip(group, outputs, strict=True))
            if _fault(t, out, bad_images) is not None
        ]
        if not culprits:
            # Healthy; or every task succeeds alone but not stacked: answer from solo runs.
            return outputs
        # A lone culprit too: it must not join a stack when others of its shape come along.
        with self._lock:
            for i in culprits:
                self._quarantine[group[i].tuner.key] = None
            while len(self._quarantine) > QUARANTINE_SIZE:
                self._quarantine.popitem(last=False)
        healthy = [i for i in range(len(group)) if i not in culprits]
        if healthy:
            rerun = self._run_group([group[i] for i in healthy], features, bad_images)
            for i, out in zip(healthy, rerun, strict=True):
                outputs[i] = out
        return outputs

    @staticmethod
    def _run_alone(
        task: _Task, features: Features, rows: torch.Tensor
    ) -> torch.Tensor | BaseException:
        try:
            with torch.no_grad():
                out: torch.Tensor = task.tuner.module(features.rows(rows))  # (n, C)
                return out
        except Exception as exc:  # a broken task must not take the batch down
            return exc

    def _answer(
        self,
        task: _Task,
        out: torch.Tensor | BaseException,
        items: Sequence[BatchItem],
        answers: list[dict[str, Answer]],
        bad_images: frozenset[int] = frozenset(),
    ) -> None:
        """Postprocess one task's outputs (n, C) per row; a failure is a per-task error.

        A row that is not finite answers ``non_finite_output`` for that image only; rows of
        ``bad_images`` are skipped (they answer the image's own error).
        """
        tuner = task.tuner
        live = [row for row in task.rows if row not in bad_images]
        if isinstance(out, BaseException):
            detail = _exception_detail(tuner, out)
            self._failed(task, "task_failed", detail, len(live), out)
            for row in live:
                answers[row][tuner.name] = task_error("task_failed", detail)
            return
        if _fault(task, out, frozenset()) == "bad_output_shape":
            detail = (
                f"task {tuner.name!r} v{tuner.version} returned {_shape_of(out)}; "
                f"expected ({len(task.rows)}, {tuner.config.num_outputs})"
            )
            self._failed(task, "bad_output_shape", detail, len(live))
            for row in live:
                answers[row][tuner.name] = task_error("bad_output_shape", detail)
            return
        assert isinstance(out, torch.Tensor)
        finite = torch.isfinite(out).all(dim=1).tolist()  # (n,)
        good = [j for j, row in enumerate(task.rows) if finite[j] and row not in bad_images]
        nan_rows = [
            row for j, row in enumerate(task.rows) if not finite[j] and row not in bad_images
        ]
        if nan_rows:
            detail = f"task {tuner.name!r} v{tuner.version} produced NaN or Inf for this image"
            self._failed(task, "non_finite_output", detail, len(nan_rows))
            for row in nan_rows:
                answers[row][tuner.name] = task_error("non_finite_output", detail)
        if not good:
            return
        try:
            picked = out if len(good) == len(task.rows) else out[good]  # (n_good, C)
            results = _postprocess(tuner, picked, [items[task.rows[j]].top_k for j in good])
        except Exception as exc:
            detail = _exception_detail(tuner, exc)
            self._failed(task, "task_failed", detail, len(good), exc)
            results = [task_error("task_failed", detail) for _ in good]
        for j, result in zip(good, results, strict=True):
            answers[task.rows[j]][tuner.name] = result

    def _image_failed(self, row: int, item: BatchItem, answers: dict[str, Answer]) -> None:
        """Image ``row``'s features are not finite: each of its tasks answers that."""
        detail = (
            f"image {row} of the batch gave non-finite backbone features (NaN or Inf): "
            "its pixel values are out of any normalised range"
        )
        m = self.metrics
        for tuner in item.tuners:
            if "error" in answers.get(tuner.name, {}):
                continue  # the task failed before running (backbone_mismatch)
            answers[tuner.name] = task_error("non_finite_features", detail)
            if m is not None:
                m.task_failures.labels(
                    task=m.task_label(tuner.name), reason="non_finite_features"
                ).inc()
        # The sender's input, not a server fault: counted, and logged only for debugging.
        log.debug("non-finite backbone features for one image (digest %s)", item.digest[:16])

    def _failed(
        self,
        task: _Task,
        reason: FailureReason,
        detail: str,
        answers: int,
        exc: BaseException | None = None,
    ) -> None:
        """Count ``answers`` failed answers of ``task``; log the first of each (version, reason).

        A tuner that keeps failing would otherwise log a traceback every batch.
        """
        if answers <= 0:
            return
        tuner = task.tuner
        if self.metrics is not None:
            m = self.metrics
            m.task_failures.labels(task=m.task_label(tuner.name), reason=reason).inc(answers)
        key = (tuner.key, reason)
        with self._lock:
            first = key not in self._logged
            self._logged[key] = None
            while len(self._logged) > QUARANTINE_SIZE:
                self._logged.popitem(last=False)
        level = logging.WARNING if first else logging.DEBUG
        log.log(
            level,
            "task %s v%d failed (%s): %s",
            tuner.name,
            tuner.version,
            reason,
            detail,
            exc_info=(type(exc), exc, exc.__traceback__) if exc is not None and first else None,
        )


def _finite_rows(data: torch.Tensor) -> list[bool]:
    """Whether each image's features (L', M, N', D) are all finite: (M,) flags.

    Max and min propagate NaN and keep the sign of an Inf, and reduce without the
    full-size mask ``isfinite`` builds: 3.5 vs 23 ms on ViT-S all-token features at batch 8
    (one CPU thread), against a 1 s forward.
    """
    dims = (0, 2, 3)
    return (torch.isfinite(data.amax(dim=dims)) & torch.isfinite(data.amin(dim=dims))).tolist()


def _fault(
    task: _Task, out: torch.Tensor | BaseException, bad_images: frozenset[int]
) -> FailureReason | None:
    """Why ``out`` cannot be ``task``'s answer for its rows, ignoring ``bad_images`` rows."""
    if isinstance(out, BaseException):
        return "task_failed"
    expected = (len(task.rows), task.tuner.config.num_outputs)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        return "bad_output_shape"
    if not out.is_floating_point():
        return "bad_output_shape"
    finite = torch.isfinite(out).all(dim=1).tolist()  # (n,)
    if any(not ok and row not in bad_images for ok, row in zip(finite, task.rows, strict=True)):
        return "non_finite_output"
    return None


def _shape_of(out: object) -> str:
    shape = getattr(out, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else f"a {type(out).__name__}"


def _exception_detail(tuner: LoadedTuner, exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if len(text) > DETAIL_CHARS:
        text = text[: DETAIL_CHARS - 3] + "..."
    return f"task {tuner.name!r} v{tuner.version} failed: {text}"


def _postprocess(tuner: LoadedTuner, out: torch.Tensor, top_ks: list[int]) -> list[Answer]:
    """Answers for outputs (n, C) whose rows asked for ``top_ks`` (usually all equal)."""
    head: Answer = {"version": tuner.version, "sha256": tuner.sha256, "kind": tuner.config.task}
    by_k: dict[int, list[int]] = {}
    for j, top_k in enumerate(top_ks):
        by_k.setdefault(top_k, []).append(j)
    results: list[Answer] = [{} for _ in top_ks]
    for top_k, positions in by_k.items():
        rows = out if len(positions) == len(top_ks) else out[positions]  # (n_k, C)
        for j, body in zip(positions, postprocess(tuner.config, rows, top_k), strict=True):
            results[j] = {**head, **body}
    return results


def _groups(
    tasks: list[_Task],
    quarantined: Callable[[TunerKey], bool] = lambda _: False,
    *,
    mixed_heads: bool = False,
) -> list[list[_Task]]:
    """Tasks split into stackable groups: one ``shape_key`` and distinct names in each, or with
    ``mixed_heads`` one ``stack_key`` (the bypass shape): heads of any kind and class count
    share a stack, whose eager outputs are cut to each task's width. Without it, every task
    of a group has one output width, as a caller reading (K, B, C) blocks needs.

    Two versions of one name (a pinned version beside the current one) land in different
    groups, since a group answers by name; so do two tenants' tuners of one plain name
    (``acme/pets``, ``bolt/pets``), whose artifacts carry the same name. Members are sorted so
    the group cache key and the stacking order agree. A quarantined task is a group of its own.
    """
    by_shape: dict[tuple[object, ...], list[_Task]] = {}
    groups: list[list[_Task]] = []
    for task in sorted(tasks, key=lambda t: t.tuner.key):
        if quarantined(task.tuner.key):
            groups.append([task])
        else:
            config = task.tuner.config
            key = config.stack_key if mixed_heads else config.shape_key
            by_shape.setdefault(key, []).append(task)
    for members in by_shape.values():
        layers: list[list[_Task]] = []
        for task in members:
            for layer in layers:
                if all(t.tuner.config.name != task.tuner.config.name for t in layer):
                    layer.append(task)
                    break
            else:
                layers.append([task])
        groups.extend(layers)
    return groups
