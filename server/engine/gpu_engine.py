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
failed request.

Failures are isolated as in the eager engine: the plan's key holds only the tasks the backbone
can serve that never failed here, so a culprit that would break the capture costs one eager
batch (which quarantines it), not every later batch holding it; quarantined tasks run alone
beside the plan, tasks whose config lies about the backbone answer ``backbone_mismatch``, and
an image with non-finite features answers ``non_finite_features`` and is never cached.

Every row of a batch is on one device before anything is stacked: images decoded on the GPU
and images decoded on the host may share a batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from restuning.features import Features, FeatureSpec
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

    def on_tuner_swapped(self, name: str, tuner: LoadedTuner | None) -> None:
        """The registry swapped in ``tuner`` for ``name``: the plans that used the old version
        are queued for the new one and built between batches, so its first batches replay."""
        self.graphs.on_tuner_changed(name, tuner)

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
        # The plan holds the tasks the backbone can serve that never failed here; the others
        # (a config that lies about the backbone, a quarantined culprit) would fail its
        # capture or poison its key, and every healthy task of the batch would lose the graph.
        graphed = [
            t
            for t in tasks.values()
            if self._backbone_misfit(t.tuner) is None and not self.quarantined(t.tuner.key)
        ]
        if not graphed:
            return super().run_batch(items)
        bucket = bucket_for(len(items), self.buckets)
        assert bucket is not None  # larger batches were split above
        groups = group_tuners(t.tuner for t in graphed)
        key = graph_key(bucket, groups)
        plan = self.graphs.get(key, groups)
        if plan is None:
            return super().run_batch(items)
        started = time.perf_counter()
        try:
            replayed = self._replay(plan, items)
        except _InputError:
            # The batch's inputs could not be staged, or the eager forward of its cache misses
            # failed: the plan is healthy, the batch runs eagerly (where the same fault becomes
            # per-task errors or the batch's own failure, as without a plan).
            log.exception("preparing the batch for its plan failed; running it eagerly")
            return super().run_batch(items)
        except Exception:
            # A plan that fails to replay is dropped for good; the batch still answers.
            log.exception("replaying the CUDA graph plan failed; running the batch eagerly")
            self.graphs.discard(key, "replay_failed")
            return super().run_batch(items)
        compute_s = time.perf_counter() - started
        return self._answer_plan(replayed, items, tasks, graphed, compute_s)

    def _answer_plan(
        self,
        replayed: _Replayed,
        items: Sequence[BatchItem],
        tasks: dict[TunerKey, _Task],
        graphed: list[_Task],
        compute_s: float,
    ) -> BatchOutput:
        """Answers of a replayed batch, with the CPU engine's isolation: tasks the backbone
        cannot serve answer ``backbone_mismatch``, quarantined tasks run alone through the
        eager fan-out, images with non-finite features answer ``non_finite_features``.

        A plan task whose rows come out non-finite answers that per row and stays in the plan:
        every task has its own matmuls there, so its numbers cannot reach the others' answers
        (quarantining it would only add an eager run beside every later replay)."""
        out = replayed.out
        answers: list[dict[str, Answer]] = [{} for _ in items]
        started = time.perf_counter()
        servable = [t for t in tasks.values() if self._servable(t, answers)]
        bad_images = frozenset(i for i, ok in enumerate(replayed.finite) if not ok)
        for group, outputs in zip(replayed.plan.tuners, out.outputs, strict=True):
            for k, tuner in enumerate(group):
                task = tasks[tuner.key]
                # (n, C_k) float32, host: the group's block is as wide as its widest head.
                rows = outputs[k, task.rows, : head_width(tuner)]
                self._answer(task, rows, items, answers, bad_images)
        in_plan = {t.tuner.key for t in graphed}
        riders = [t for t in servable if t.tuner.key not in in_plan]
        forwards = replayed.forwards
        if riders:
            features, extra = self._rider_features(replayed, items, riders)
            forwards += extra
            self._fan_out(features, riders, items, answers, bad_images)
        for row in sorted(bad_images):
            self._image_failed(row, items[row], answers[row])
        answer_s = time.perf_counter() - started

        # The plan's own times of its two parts (CUDA events on a GPU), plus building the
        # answers (and running quarantined tasks, their own forward included); an eager
        # forward for cache misses is what the rest of the compute took.
        fanout_ms = out.fanout_ms + answer_s * 1e3
        backbone_ms = out.backbone_ms or max(0.0, compute_s * 1e3 - out.fanout_ms)
        self._observe_batch(
            len(items), tasks, servable, backbone_ms / 1e3, fanout_ms / 1e3, forwards
        )
        return BatchOutput(
            [ItemOutput(a, hit) for a, hit in zip(answers, replayed.hits, strict=True)],
            backbone_ms=backbone_ms,
            fanout_ms=fanout_ms,
            forwards=forwards,
        )

    def _rider_features(
        self, replayed: _Replayed, items: Sequence[BatchItem], riders: list[_Task]
    ) -> tuple[Features, int]:
        """Features for the tasks that run beside the plan, and the forwards that cost: the
        plan's own when they cover what the riders read, else one eager forward (or cache
        hits) for the riders' spec."""
        spec = FeatureSpec.union(t.tuner.module.feature_spec for t in riders)
        if replayed.features is not None and replayed.features.spec.covers(spec):
            return self._on_tuner_device(replayed.features), 0
        features, _, forwards, _ = self._features(items, spec)
        return features, forwards

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

    def _replay(self, plan: Plan, items: Sequence[BatchItem]) -> _Replayed:
        """Run the plan on the batch: the whole plan on pixels when no image hit the feature
        cache, else the fan-out on the features the CPU engine gathers (hits plus one eager
        forward for the misses). Only finite features are cached, as on the eager path.

        Raises :class:`_InputError` when staging or the eager forward failed (not the plan).
        """
        spec = plan.key.spec
        fingerprint = self.backbone.fingerprint
        cached = [self.cache.get(item.digest, fingerprint, spec) for item in items]
        hits = [c is not None for c in cached]
        if not any(hits):
            try:
                staged = self._stage([item.pixels for item in items])
            except Exception as exc:
                raise _InputError(str(exc)) from exc
            out = plan.run_pixels(staged)
            if out.features is None:  # a plan that does not hand its features back
                return _Replayed(plan, out, None, hits, [True] * len(items), 1)
            digests = [item.digest for item in items]
            finite = self._cache_finite(digests, spec, out.features)  # (L', B, N', D)
            return _Replayed(plan, out, Features(spec, out.features), hits, finite, 1)
        try:
            features, hits, forwards, finite = self._features(items, spec, cached)
        except Exception as exc:
            raise _InputError(str(exc)) from exc
        out = plan.run_features(features.data)  # (L', B, N', D)
        return _Replayed(plan, out, features, hits, finite, forwards)

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
    """Staging a batch's inputs, or the eager forward of its cache misses, failed: a fault of
    the batch, not of its plan."""


@dataclass(frozen=True)
class _Replayed:
    """One batch through its plan: what the answers are built from."""

    plan: Plan
    out: PlanOutput
    features: Features | None
    """The plan's features of the batch (L', B, N', D) of ``plan.key.spec``, valid until the
    plan's next run; ``None`` when the plan does not hand them back."""
    hits: list[bool]
    finite: list[bool]
    """Whether each image's features are finite (an absurd image's are not)."""
    forwards: int


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


def head_width(tuner: LoadedTuner) -> int:
    """The columns of a plan's output block that belong to ``tuner``: its head's own width
    (a head that disagrees with its config then answers ``bad_output_shape``, as it does
    eagerly)."""
    return int(tuner.module.head.bias.shape[0])
