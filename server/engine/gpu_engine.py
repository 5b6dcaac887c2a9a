"""The engine on a CUDA device: bf16, CUDA graph plans per (batch bucket, task groups).

Same contract as :class:`server.engine.engine.Engine` (it is one): one backbone forward per
batch, answers per task and row, an image's answer independent of its batch. What changes on
a GPU (GPU.md: there the eager path is launch-bound and leaves most of the card idle):

- the batch's pixels are stacked straight into a reusable pinned host buffer and copied to
  the device without blocking;
- the batch runs as a :mod:`server.engine.cuda_graphs` plan for (bucket, task groups): the
  feature capture, every group's dense stacked fan-out and the heads replayed from two
  captured graphs, padded up to the bucket;
- one device-to-host copy brings back every task's outputs; answers are built on the host.

Anything a plan cannot run (no plan yet: it is queued and captured on the engine thread before
the next batch; a capture or replay that failed; the feature cache's partial hits are fine)
runs through the eager engine, counted in ``restune_cuda_graph_fallbacks_total``, never a
failed request. Every row of a batch is on one device before anything is stacked: images
decoded on the GPU and images decoded on the host may share a batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from restuning.features import FeatureSpec
from restuning.kernels.grouped_adapter import GroupedSetting
from server.engine.buckets import DEFAULT_BUCKETS, bucket_for, split_rows, validate_buckets
from server.engine.cuda_graphs import (
    BuildFn,
    ForwardFn,
    GraphRunner,
    Plan,
    PlanFactory,
    PlanOutput,
    graph_key,
    group_tuners,
)
from server.engine.engine import (
    DEFAULT_GROUP_CACHE_BYTES,
    Answer,
    BatchItem,
    BatchOutput,
    Engine,
    ItemOutput,
    _Task,
)
from server.engine.feature_cache import FeatureCache
from server.engine.loaded_tuner import LoadedTuner, TunerKey
from server.engine.runtime import Backbone, TorchRuntime
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger(__name__)


class GpuEngine(Engine):
    """:class:`Engine` whose batches replay CUDA graph plans (see module doc).

    ``forward`` computes features on the device without host staging (it is captured):
    ``TorchBackbone.forward_features``. ``build`` replaces the plan factory (the CPU tests
    inject the eager :class:`~server.engine.cuda_graphs.DensePlan`). ``background=True``
    (the server): a batch whose plan is missing runs eagerly and the plan is built before the
    next batch, on this same thread; ``False`` builds it at once, for the batch that asked.
    """

    def __init__(
        self,
        backbone: Backbone,
        cache: FeatureCache,
        metrics: Metrics | None = None,
        *,
        forward: ForwardFn,
        tuner_device: torch.device | str,
        dtype: torch.dtype = torch.bfloat16,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        graph_cache_size: int = 64,
        grouped_kernel: GroupedSetting = "auto",
        group_cache_bytes: int = DEFAULT_GROUP_CACHE_BYTES,
        build: BuildFn | None = None,
        background: bool = True,
    ) -> None:
        super().__init__(
            backbone,
            cache,
            metrics,
            tuner_device=tuner_device,
            group_cache_bytes=group_cache_bytes,
        )
        self.buckets = validate_buckets(buckets)
        self.dtype = dtype
        _, height, width = backbone.data_config.input_size
        factory = build or PlanFactory(
            forward,
            (3, height, width),
            self.tuner_device,
            dtype,
            grouped_kernel,
            capture=self.tuner_device.type == "cuda",
        )
        self.graphs = GraphRunner(
            factory, capacity=graph_cache_size, metrics=metrics, deferred=background
        )
        self._pinned: Tensor | None = None  # flat, reused for every batch's pixels

    def close(self) -> None:
        """Free every plan and build no more (after the last batch: the batcher drained)."""
        self.graphs.close()

    def forget_tuner(self, tuner: LoadedTuner) -> None:
        """``tuner`` was unloaded (and drained): its groups and every plan holding it go."""
        super().forget_tuner(tuner)
        self.graphs.forget(tuner.key)

    def run_batch(self, items: Sequence[BatchItem]) -> BatchOutput:
        """Answers for every item, from a graph plan when there is one, else eagerly."""
        if not items:
            return super().run_batch(items)
        items = self._one_device(items)
        if not self.graphs.enabled:
            self.graphs.note_eager()
            return super().run_batch(items)
        # Between batches: plans queued by earlier batches are captured here, on the engine
        # thread, so no capture ever runs beside a replay.
        self.graphs.build_pending()
        if len(items) > self.buckets[-1]:
            parts = [
                self.run_batch(items[start:stop])
                for start, stop, _ in split_rows(len(items), self.buckets)
            ]
            return BatchOutput(
                [item for part in parts for item in part.items],
                backbone_ms=sum(p.backbone_ms for p in parts),
                fanout_ms=sum(p.fanout_ms for p in parts),
                forwards=sum(p.forwards for p in parts),
            )
        tasks = self._tasks(items)
        if not tasks:
            return super().run_batch(items)
        bucket = bucket_for(len(items), self.buckets)
        assert bucket is not None  # larger batches were split above
        groups = group_tuners(t.tuner for t in tasks.values())
        key = graph_key(bucket, groups)
        plan = self.graphs.get(key, groups)
        if plan is None:
            return super().run_batch(items)
        try:
            return self._run_plan(plan, items, tasks)
        except _InputError:
            # The batch's inputs could not be staged: the plan is healthy, the batch runs
            # eagerly (where the same fault becomes per-task errors).
            log.exception("staging the batch for its plan failed; running it eagerly")
            return super().run_batch(items)
        except Exception:
            # A plan that fails to replay is dropped for good; the batch still answers.
            log.exception("replaying the CUDA graph plan failed; running the batch eagerly")
            self.graphs.discard(key, "replay_failed")
            return super().run_batch(items)

    def _run_plan(
        self, plan: Plan, items: Sequence[BatchItem], tasks: dict[TunerKey, _Task]
    ) -> BatchOutput:
        spec = plan.key.spec
        started = time.perf_counter()
        out, hits, forwards = self._replay(plan, items, spec)
        compute_s = time.perf_counter() - started

        answers: list[dict[str, Answer]] = [{} for _ in items]
        started = time.perf_counter()
        for group, outputs in zip(plan.tuners, out.outputs, strict=True):
            for k, tuner in enumerate(group):
                task = tasks[tuner.key]
                rows = outputs[k, task.rows]  # (n, C) float32, host
                self._answer(task, rows, items, answers)
        answer_s = time.perf_counter() - started

        # The plan's own times of its two parts (CUDA events on a GPU), plus building the
        # answers; an eager forward for cache misses is what the rest of the compute took.
        fanout_ms = out.fanout_ms + answer_s * 1e3
        backbone_ms = out.backbone_ms or max(0.0, compute_s * 1e3 - out.fanout_ms)
        if self.metrics is not None:
            m = self.metrics
            m.batch_size.observe(len(items))
            m.fanout.observe(fanout_ms / 1e3)
            if forwards:
                m.backbone_forward.observe(backbone_ms / 1e3)
                m.tasks_per_forward.observe(len({t.tuner.name for t in tasks.values()}))
            for task in tasks.values():
                m.predictions.labels(task=m.task_label(task.tuner.name)).inc(len(task.rows))
        return BatchOutput(
            [ItemOutput(a, hit) for a, hit in zip(answers, hits, strict=True)],
            backbone_ms=backbone_ms,
            fanout_ms=fanout_ms,
            forwards=forwards,
        )

    def _one_device(self, items: Sequence[BatchItem]) -> Sequence[BatchItem]:
        """``items`` with every image on one device: when some were decoded on the GPU, the
        host ones are copied there (a stack of both would fail); else as they are."""
        devices = {item.pixels.device for item in items}
        if len(devices) < 2:
            return items
        device = next((d for d in devices if d.type != "cpu"), self.tuner_device)
        return [
            item
            if item.pixels.device == device
            else replace(item, pixels=item.pixels.to(device, non_blocking=True))
            for item in items
        ]

    def _replay(
        self, plan: Plan, items: Sequence[BatchItem], spec: FeatureSpec
    ) -> tuple[PlanOutput, list[bool], int]:
        """Run the plan on the batch: the whole plan on pixels when no image hit the feature
        cache, else the fan-out on cached features plus one eager forward for the misses."""
        fingerprint = self.backbone.fingerprint
        cached = [self.cache.get(item.digest, fingerprint, spec) for item in items]
        hits = [c is not None for c in cached]
        if not any(hits):
            try:
                staged = self._stage([item.pixels for item in items])
            except Exception as exc:
                raise _InputError(str(exc)) from exc
            out = plan.run_pixels(staged)
            if self.cache.enabled and out.features is not None:
                for j, item in enumerate(items):
                    self.cache.put(item.digest, fingerprint, spec, out.features[:, j])
            return out, hits, 1
        forwards = 0
        missing = [i for i, c in enumerate(cached) if c is None]
        if missing:
            pixels = torch.stack([items[i].pixels for i in missing])  # (M, 3, H, W)
            computed = self.backbone.forward_features(pixels, spec).data  # (L', M, N', D)
            forwards = 1
            for j, i in enumerate(missing):
                cached[i] = computed[:, j]
                self.cache.put(items[i].digest, fingerprint, spec, computed[:, j])
        device = self.tuner_device
        rows = [c.to(device) for c in cached if c is not None]
        return plan.run_features(torch.stack(rows, dim=1)), hits, forwards  # (L', B, N', D)

    def _stage(self, pixels: Sequence[Tensor]) -> Tensor:
        """The batch (B, 3, H, W) stacked into pinned host memory (on the device: as is).

        One buffer serves every batch: a plan's run waits for its device-to-host copy, which
        the stream orders after this batch's host-to-device copy, so the buffer is free again.
        """
        if self.tuner_device.type != "cuda" or pixels[0].device.type != "cpu":
            return torch.stack(list(pixels))
        shape = (len(pixels), *pixels[0].shape)
        needed = len(pixels) * pixels[0].numel()
        if self._pinned is None or self._pinned.numel() < needed:
            self._pinned = torch.empty(needed, dtype=torch.float32, pin_memory=True)
        staged = self._pinned[:needed].view(shape)
        torch.stack(list(pixels), out=staged)
        return staged


class _InputError(RuntimeError):
    """Staging a batch's inputs failed: a fault of the batch, not of its plan."""


def build_engine(
    settings: Settings, backbone: Backbone, cache: FeatureCache, metrics: Metrics | None
) -> Engine:
    """The engine the settings ask for: :class:`GpuEngine` for the torch runtime on CUDA
    (bf16 unless ``dtype`` says otherwise, the backbone's dtype), :class:`Engine` elsewhere:
    the CPU path is unchanged."""
    if settings.device.startswith("cuda") and isinstance(backbone, TorchRuntime):
        torch_backbone = backbone.torch_backbone
        return GpuEngine(
            backbone,
            cache,
            metrics,
            forward=torch_backbone.forward_features,
            tuner_device=settings.device,
            dtype=torch_backbone.dtype,
            buckets=settings.cuda_graph_buckets,
            graph_cache_size=settings.cuda_graph_cache_size,
            grouped_kernel=settings.grouped_kernel,
            group_cache_bytes=settings.tuner_memory_bytes,
        )
    return Engine(
        backbone,
        cache,
        metrics,
        tuner_device=settings.device,
        group_cache_bytes=settings.tuner_memory_bytes,
    )
