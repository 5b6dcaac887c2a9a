"""The synchronous compute core: one backbone forward per batch, fanned out to many tasks.

Runs on the batcher's single worker thread. For a batch it

1. takes the union :class:`FeatureSpec` of the tasks its images asked for,
2. serves images from the feature cache where it can,
3. runs the backbone once on the misses (identical pixels once), capturing only that union,
4. runs each task on the rows that asked for it, tasks of one ``shape_key`` stacked,
5. turns raw outputs into answers per task.

An image's answer does not depend on what else is in its batch (up to float rounding):
every op on the way is per row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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
        # A stacked group copies its tasks' weights; a loop group shares the modules.
        size = sum(t.nbytes for t in tuners) if group.strategy == "stacked" else 0
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

    def forget_tuner(self, tuner: LoadedTuner) -> None:
        """``tuner`` was unloaded: drop what the engine built from it (its stacked groups)."""
        self.groups.drop(tuner.key)

    def run_batch(self, items: Sequence[BatchItem]) -> BatchOutput:
        """Answers for every item; a task that fails gets a per-task error, others answer."""
        if not items:
            return BatchOutput([], 0.0, 0.0)
        tasks = self._tasks(items)
        answers: list[dict[str, Answer]] = [{} for _ in items]
        if not tasks:
            return BatchOutput([ItemOutput(a, False) for a in answers], 0.0, 0.0)
        spec = FeatureSpec.union(t.tuner.module.feature_spec for t in tasks.values())

        started = time.perf_counter()
        features, hits, forwards = self._features(items, spec)
        backbone_s = time.perf_counter() - started

        started = time.perf_counter()
        self._fan_out(features, list(tasks.values()), items, answers)
        fanout_s = time.perf_counter() - started

        if self.metrics is not None:
            m = self.metrics
            m.batch_size.observe(len(items))
            m.fanout.observe(fanout_s)
            if forwards:
                m.backbone_forward.observe(backbone_s)
                m.tasks_per_forward.observe(len({t.tuner.name for t in tasks.values()}))
            for task in tasks.values():
                m.predictions.labels(task=m.task_label(task.tuner.name)).inc(len(task.rows))
        return BatchOutput(
            [ItemOutput(a, hit) for a, hit in zip(answers, hits, strict=True)],
            backbone_ms=backbone_s * 1000.0,
            fanout_ms=fanout_s * 1000.0,
            forwards=forwards,
        )

    @staticmethod
    def _tasks(items: Sequence[BatchItem]) -> dict[TunerKey, _Task]:
        """Distinct tuner versions of the batch and the rows asking for each."""
        tasks: dict[TunerKey, _Task] = {}
        for row, item in enumerate(items):
            for tuner in item.tuners:
                tasks.setdefault(tuner.key, _Task(tuner)).rows.append(row)
        return tasks

    def _features(
        self, items: Sequence[BatchItem], spec: FeatureSpec
    ) -> tuple[Features, list[bool], int]:
        """Features (L', B, N', D) of every item for ``spec``: cache hits + one forward."""
        fingerprint = self.backbone.fingerprint
        rows: list[torch.Tensor | None] = [
            self.cache.get(item.digest, fingerprint, spec) for item in items
        ]
        hits = [r is not None for r in rows]
        # Identical pixels in one batch are computed once.
        miss_digests = list(
            dict.fromkeys(i.digest for i, r in zip(items, rows, strict=True) if r is None)
        )
        forwards = 0
        computed: Features | None = None
        if miss_digests:
            first_item = {item.digest: item for item in reversed(items)}
            pixels = torch.stack([first_item[d].pixels for d in miss_digests])  # (M, 3, H, W)
            computed = self.backbone.forward_features(pixels, spec)  # (L', M, N', D)
            forwards = 1
            position = {d: j for j, d in enumerate(miss_digests)}
            for d, j in position.items():
                self.cache.put(d, fingerprint, spec, computed.data[:, j])
            if not any(hits) and len(miss_digests) == len(items):
                return self._on_tuner_device(computed), hits, forwards
            for i, item in enumerate(items):
                if rows[i] is None:
                    rows[i] = computed.data[:, position[item.digest]]
        data = torch.stack([r for r in rows if r is not None], dim=1)  # (L', B, N', D)
        return self._on_tuner_device(Features(spec, data)), hits, forwards

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
    ) -> None:
        """Run every task on its rows, one stacked group per shape, and fill ``answers``."""
        for group in _groups(tasks):
            rows = [torch.tensor(t.rows, dtype=torch.long) for t in group]
            try:
                stacked = self.groups.get([t.tuner for t in group])
                outputs: list[torch.Tensor | BaseException] = list(stacked(features, rows))
            except Exception:
                # Find which task fails: run each alone so the others still answer.
                log.exception("stacked group of %d tasks failed; retrying one by one", len(group))
                outputs = [
                    self._run_alone(t, features, r) for t, r in zip(group, rows, strict=True)
                ]
            for task, out in zip(group, outputs, strict=True):
                self._answer(task, out, items, answers)

    @staticmethod
    def _run_alone(
        task: _Task, features: Features, rows: torch.Tensor
    ) -> torch.Tensor | BaseException:
        try:
            with torch.no_grad():
                out: torch.Tensor = task.tuner.module(features.rows(rows))  # (n, C)
                return out
        except Exception as exc:  # a broken task must not take the batch down
            log.exception("task %s v%d failed", task.tuner.name, task.tuner.version)
            return exc

    @staticmethod
    def _answer(
        task: _Task,
        out: torch.Tensor | BaseException,
        items: Sequence[BatchItem],
        answers: list[dict[str, Answer]],
    ) -> None:
        """Postprocess one task's outputs (n, C) per row; any failure is a per-task error."""
        tuner = task.tuner
        try:
            if isinstance(out, BaseException):
                raise out
            results = _postprocess(tuner, out, [items[row].top_k for row in task.rows])
        except Exception as exc:
            if out is not exc:
                log.exception("postprocessing task %s v%d failed", tuner.name, tuner.version)
            detail = f"task {tuner.name!r} v{tuner.version} failed: {exc}"
            results = [task_error("task_failed", detail) for _ in task.rows]
        for row, result in zip(task.rows, results, strict=True):
            answers[row][tuner.name] = result


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


def _groups(tasks: list[_Task]) -> list[list[_Task]]:
    """Tasks split into stackable groups: one ``shape_key`` and distinct names in each.

    Two versions of one name (a pinned version beside the current one) land in different
    groups, since a group answers by name; so do two tenants' tuners of one plain name
    (``acme/pets``, ``bolt/pets``), whose artifacts carry the same name. Members are sorted so
    the group cache key and the stacking order agree.
    """
    by_shape: dict[tuple[object, ...], list[_Task]] = {}
    for task in sorted(tasks, key=lambda t: t.tuner.key):
        by_shape.setdefault(task.tuner.config.shape_key, []).append(task)
    groups: list[list[_Task]] = []
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
