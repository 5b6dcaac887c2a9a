"""CUDA graphs of the whole engine step, one per (batch bucket, set of task groups).

On a GPU, small batches and the fan-out are launch-bound: replaying a captured graph instead of
launching each kernel took ViT-B/16 at batch 1 from 2.8 ms to 0.68 ms (GPU.md). A *plan* holds,
for one :class:`GraphKey`, the feature capture of the batch's union spec at the bucket's batch
size, every group's dense stacked fan-out (:meth:`StackedGroup.forward_all`: every task on every
row) and the heads, with static input and output buffers:

- graph 1: static pixels (bucket, 3, H, W) -> static features (L', bucket, N', D);
- graph 2: those features -> every group's outputs, concatenated into one static float32
  buffer, so one device-to-host copy brings back all answers of the batch.

Two graphs instead of one let feature-cache hits skip the backbone: their features are copied
into graph 2's input and only graph 2 replays. All graphs share one memory pool; that is safe
because the engine replays one graph at a time on one stream and reads a replay's outputs
before the next replay (an older graph's intermediates may reuse a newer one's freed blocks).

:class:`GraphRunner` keeps plans in an LRU bounded in count. A key it has no plan for is built
off the request path (a builder thread) while that batch runs eagerly; a registration or
deletion rebuilds the plans that used the changed task and swaps each in with one dict
assignment, so a batch that already holds a plan finishes on it. A capture that fails is
remembered and its key runs eagerly (``restune_cuda_graph_fallbacks_total``): never a failed
request. On the CPU no graph is captured: the same :class:`DensePlan` runs eagerly, which is
what the CPU tests drive through an injected build function.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from restuning.fanout import BypassImpl, StackedGroup
from restuning.features import Features, FeatureSpec
from restuning.kernels.grouped_adapter import GroupedSetting, choose_bypass_impl
from server.engine.buckets import fill_padded, pad_rows
from server.engine.engine import _groups, _Task
from server.engine.loaded_tuner import LoadedTuner, TunerKey
from server.metrics import Metrics

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

log = logging.getLogger(__name__)

ForwardFn = Callable[[Tensor, FeatureSpec], Features]
"""``(images (B, 3, H, W) on the device, spec) -> features (L', B, N', D)``; no host staging,
no sync: it runs inside a capture."""

WARMUP_RUNS = 3
"""Eager runs on the capture stream before capturing (cuBLAS workspaces, Triton compiles,
lazy inits must not happen during capture)."""

TunerGroups = tuple[tuple[LoadedTuner, ...], ...]
"""Tuners of a batch, split into stackable groups (one shape, distinct names each)."""


@dataclass(frozen=True)
class GraphKey:
    """What a plan is captured for: the bucket, the features it captures, the exact tuners.

    ``groups`` holds every tuner's (name, version, sha256), so a new version of a task (or
    the same version with other bytes) is a new key, and a change to a task the key does not
    hold leaves it alone.
    """

    bucket: int
    spec: FeatureSpec
    groups: tuple[tuple[TunerKey, ...], ...]

    def uses(self, name: str) -> bool:
        """Whether a tuner named ``name`` (any version) is part of this key."""
        return any(key[0] == name for group in self.groups for key in group)


def group_tuners(tuners: Iterable[LoadedTuner]) -> TunerGroups:
    """Stackable groups of ``tuners`` exactly as the eager engine forms them."""
    return tuple(tuple(t.tuner for t in group) for group in _groups([_Task(t) for t in tuners]))


def graph_key(bucket: int, groups: TunerGroups) -> GraphKey:
    """The key of a batch padded to ``bucket`` asking for ``groups``; the spec is their union."""
    spec = FeatureSpec.union(t.module.feature_spec for group in groups for t in group)
    return GraphKey(bucket, spec, tuple(tuple(t.key for t in group) for group in groups))


@dataclass(frozen=True)
class PlanOutput:
    """What one run of a plan gives back for its first ``n`` rows."""

    outputs: list[Tensor]
    """Per group, (K, n, C) float32 on the host, in the plan's task order. Views of a buffer
    the plan reuses: valid until its next run."""
    features: Tensor | None
    """The captured features (L', n, N', D) on the device, when the backbone ran (valid until
    the next run); ``None`` when the features were given."""
    backbone_ms: float
    fanout_ms: float


class Plan(Protocol):
    """One engine step for one :class:`GraphKey`, captured or eager."""

    @property
    def key(self) -> GraphKey: ...

    @property
    def tuners(self) -> TunerGroups: ...

    def run_pixels(self, pixels: Tensor) -> PlanOutput:
        """Normalised images (n, 3, H, W), n <= bucket (host or device) -> outputs."""
        ...

    def run_features(self, data: Tensor) -> PlanOutput:
        """Features (L', n, N', D) of ``key.spec`` on the device -> outputs."""
        ...


BuildFn = Callable[[GraphKey, TunerGroups], Plan]
"""Builds the plan of a key (captures it on CUDA); may raise: the key then runs eagerly."""


class DensePlan:
    """The body of a plan, run eagerly: what a CUDA graph captures, and the CPU's stand-in."""

    def __init__(
        self,
        key: GraphKey,
        tuners: TunerGroups,
        forward: ForwardFn,
        *,
        input_shape: tuple[int, int, int],
        device: torch.device,
        dtype: torch.dtype,
        grouped: GroupedSetting = "auto",
    ) -> None:
        self._key = key
        self._tuners = tuners
        self.forward = forward
        self.device = device
        self.input_shape = input_shape
        # The stacked copies in the compute dtype (bf16 on a GPU; the registry keeps float32).
        self.groups = [
            StackedGroup([t.module for t in group], "stacked", dtype=dtype) for group in tuners
        ]
        samples: list[Features] = []

        def runner(group: StackedGroup) -> Callable[[BypassImpl], object]:
            # Features of the bucket's shape to time the candidates on (only when timed).
            def run(impl: BypassImpl) -> object:
                if not samples:
                    pixels = torch.zeros((key.bucket, *input_shape), device=device)
                    samples.append(Features(key.spec, self.features(pixels)))
                return group.forward_all(samples[0], impl)

            return run

        self.impls: list[BypassImpl] = [
            choose_bypass_impl(
                group.modules[0].config,
                len(group.modules),
                key.bucket,
                grouped,
                runner(group),
                device,
                dtype,
            )
            for group in self.groups
        ]

    @property
    def key(self) -> GraphKey:
        return self._key

    @property
    def tuners(self) -> TunerGroups:
        return self._tuners

    def features(self, pixels: Tensor) -> Tensor:
        """(bucket, 3, H, W) on the device -> (L', bucket, N', D)."""
        return self.forward(pixels, self._key.spec).data

    def fan_out(self, data: Tensor) -> Tensor:
        """Features (L', bucket, N', D) -> every group's outputs, flat float32 (one buffer)."""
        feats = Features(self._key.spec, data)
        outs = [g.forward_all(feats, impl) for g, impl in zip(self.groups, self.impls, strict=True)]
        return torch.cat([o.float().reshape(-1) for o in outs])

    def output_shapes(self) -> list[tuple[int, int, int]]:
        """(K, bucket, C) of each group's block of the flat output."""
        return [
            (len(g.modules), self._key.bucket, g.modules[0].config.num_outputs) for g in self.groups
        ]

    def run_pixels(self, pixels: Tensor) -> PlanOutput:
        n = int(pixels.shape[0])
        started = time.perf_counter()
        data = self.features(pad_rows(pixels.to(self.device), self._key.bucket))
        middle = time.perf_counter()
        flat = self.fan_out(data).cpu()
        done = time.perf_counter()
        outputs = split_outputs(flat, self.output_shapes(), n)
        return PlanOutput(outputs, data[:, :n], (middle - started) * 1e3, (done - middle) * 1e3)

    def run_features(self, data: Tensor) -> PlanOutput:
        n = int(data.shape[1])
        started = time.perf_counter()
        padded = pad_rows(data.transpose(0, 1), self._key.bucket).transpose(0, 1)
        flat = self.fan_out(padded).cpu()
        done = time.perf_counter()
        outputs = split_outputs(flat, self.output_shapes(), n)
        return PlanOutput(outputs, None, 0.0, (done - started) * 1e3)


def split_outputs(flat: Tensor, shapes: Sequence[tuple[int, int, int]], rows: int) -> list[Tensor]:
    """The flat output buffer cut into (K, bucket, C) blocks, each narrowed to ``rows`` rows."""
    out = []
    offset = 0
    for k, bucket, c in shapes:
        size = k * bucket * c
        out.append(flat[offset : offset + size].view(k, bucket, c)[:, :rows])
        offset += size
    return out


class CudaGraphPlan:
    """A :class:`DensePlan` captured as two CUDA graphs with static buffers (see module doc)."""

    def __init__(self, body: DensePlan, pool: _POOL_HANDLE | None = None) -> None:
        self.body = body
        device = body.device
        bucket = body.key.bucket
        self.static_pixels = torch.zeros((bucket, *body.input_shape), device=device)
        # Warm-up on a side stream, as torch's graph docs require: first calls allocate
        # workspaces, pick cuBLAS algorithms and compile Triton kernels, none of which may
        # happen during capture.
        side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                body.fan_out(body.features(self.static_pixels))
        torch.cuda.current_stream(device).wait_stream(side)
        # thread_local: the builder thread captures while the engine thread keeps serving.
        self.backbone_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.backbone_graph, pool=pool, capture_error_mode="thread_local"):
            self.static_features = body.features(self.static_pixels)  # (L', bucket, N', D)
        self.fanout_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fanout_graph, pool=pool, capture_error_mode="thread_local"):
            self.static_out = body.fan_out(self.static_features)  # (sum K*bucket*C,) float32
        self.host_out = torch.empty(self.static_out.shape, dtype=torch.float32, pin_memory=True)
        self.shapes = body.output_shapes()
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]  # type: ignore[no-untyped-call]

    @property
    def key(self) -> GraphKey:
        return self.body.key

    @property
    def tuners(self) -> TunerGroups:
        return self.body.tuners

    def run_pixels(self, pixels: Tensor) -> PlanOutput:
        n = int(pixels.shape[0])
        start, middle, end = self._events
        stream = torch.cuda.current_stream(self.body.device)
        fill_padded(self.static_pixels, pixels)  # non-blocking from pinned memory
        start.record(stream)
        self.backbone_graph.replay()
        middle.record(stream)
        self.fanout_graph.replay()
        outputs = self._collect(n, end, stream)
        return PlanOutput(
            outputs,
            self.static_features[:, :n],
            float(start.elapsed_time(middle)),  # type: ignore[no-untyped-call]
            float(middle.elapsed_time(end)),  # type: ignore[no-untyped-call]
        )

    def run_features(self, data: Tensor) -> PlanOutput:
        n = int(data.shape[1])
        start, _, end = self._events
        stream = torch.cuda.current_stream(self.body.device)
        fill_padded(self.static_features, data.to(self.static_features.dtype), dim=1)
        start.record(stream)
        self.fanout_graph.replay()
        outputs = self._collect(n, end, stream)
        return PlanOutput(outputs, None, 0.0, float(start.elapsed_time(end)))  # type: ignore[no-untyped-call]

    def _collect(self, rows: int, end: torch.cuda.Event, stream: torch.cuda.Stream) -> list[Tensor]:
        """The one device-to-host copy of the batch's outputs, then a wait for it."""
        self.host_out.copy_(self.static_out, non_blocking=True)
        end.record(stream)
        end.synchronize()  # type: ignore[no-untyped-call]
        return split_outputs(self.host_out, self.shapes, rows)


@dataclass
class PlanFactory:
    """Builds plans: a :class:`DensePlan`, captured into a :class:`CudaGraphPlan` on CUDA."""

    forward: ForwardFn
    input_shape: tuple[int, int, int]
    device: torch.device
    dtype: torch.dtype
    grouped: GroupedSetting = "auto"
    capture: bool = True
    """False: return the eager :class:`DensePlan` (the CPU, tests, graphs switched off)."""
    pool: _POOL_HANDLE | None = field(default=None)

    def __call__(self, key: GraphKey, tuners: TunerGroups) -> Plan:
        body = DensePlan(
            key,
            tuners,
            self.forward,
            input_shape=self.input_shape,
            device=self.device,
            dtype=self.dtype,
            grouped=self.grouped,
        )
        if not self.capture or self.device.type != "cuda":
            return body
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        return CudaGraphPlan(body, self.pool)


class GraphRunner:
    """Bounded LRU of plans by :class:`GraphKey`, built off the request path, swapped atomically.

    ``executor``: where plans are built (one thread: captures never overlap); ``None`` builds
    inline on the caller's thread (tests, warm-up).
    """

    def __init__(
        self,
        build: BuildFn,
        *,
        capacity: int,
        metrics: Metrics | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.build = build
        self.capacity = capacity
        self.metrics = metrics
        self.executor = executor
        self._plans: OrderedDict[GraphKey, Plan] = OrderedDict()
        self._pending: set[GraphKey] = set()
        self._failed: OrderedDict[GraphKey, str] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether plans are kept at all (capacity 0 switches graphs off)."""
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._plans)

    def keys(self) -> list[GraphKey]:
        """Keys with a plan, least recently used first."""
        with self._lock:
            return list(self._plans)

    def get(self, key: GraphKey, tuners: TunerGroups) -> Plan | None:
        """The plan of ``key``, or ``None`` (run eagerly) while it is being built or failed."""
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
            if key in self._failed:
                self._fallback("capture_failed")
                return None
            if key in self._pending:
                self._fallback("building")
                return None
            self._pending.add(key)
        if self.executor is None:
            plan = self._build(key, tuners)
            if plan is None:
                self._fallback("capture_failed")
            return plan
        self.executor.submit(self._build, key, tuners)
        self._fallback("building")
        return None

    def forget(self, tuner: TunerKey) -> None:
        """Drop every plan holding version ``tuner`` (it was unloaded: no batch needs it)."""
        with self._lock:
            for key in [k for k in self._plans if any(tuner in group for group in k.groups)]:
                del self._plans[key]
        self._report()

    def discard(self, key: GraphKey, reason: str) -> None:
        """Forget ``key``'s plan after it failed to replay; the key runs eagerly from now on."""
        with self._lock:
            self._plans.pop(key, None)
            self._remember_failure(key, reason)
        self._fallback(reason)
        self._report()

    def on_tuner_changed(self, name: str, tuner: LoadedTuner | None) -> None:
        """Task ``name`` now serves ``tuner`` (``None``: deleted, or not loaded here).

        Every plan using ``name`` is rebuilt with ``tuner`` in its place (or without the task)
        and swapped in when ready; the old plan serves until then. Keys that failed to capture
        with the old version may be tried again with the new one.
        """
        with self._lock:
            affected = [(k, p.tuners) for k, p in self._plans.items() if k.uses(name)]
            for key in [k for k in self._failed if k.uses(name)]:
                del self._failed[key]
        for old_key, groups in affected:
            kept = [t for group in groups for t in group if t.name != name]
            if tuner is None:
                # Without a loaded replacement the old plan is only right for pinned versions:
                # let it go; a request for the task builds what it needs.
                self._drop(old_key)
                continue
            new_groups = group_tuners([*kept, tuner])
            new_key = graph_key(old_key.bucket, new_groups)
            with self._lock:
                if new_key in self._plans or new_key in self._pending:
                    continue
                self._pending.add(new_key)
            if self.executor is None:
                self._build(new_key, new_groups, replaces=old_key)
            else:
                self.executor.submit(self._build, new_key, new_groups, old_key)

    def _build(
        self, key: GraphKey, tuners: TunerGroups, replaces: GraphKey | None = None
    ) -> Plan | None:
        """Build ``key``'s plan and install it (replacing ``replaces``); failures are kept."""
        try:
            started = time.perf_counter()
            plan = self.build(key, tuners)
        except Exception as exc:
            log.exception("capturing the plan of %s failed; it runs eagerly", _describe(key))
            with self._lock:
                self._pending.discard(key)
                self._remember_failure(key, f"{type(exc).__name__}: {exc}")
            self._count_capture("failed")
            return None
        log.info("captured %s in %.0f ms", _describe(key), (time.perf_counter() - started) * 1e3)
        with self._lock:
            self._pending.discard(key)
            self._plans[key] = plan  # one assignment: the swap
            self._plans.move_to_end(key)
            if replaces is not None and replaces != key:
                self._plans.pop(replaces, None)
            while len(self._plans) > self.capacity:
                self._plans.popitem(last=False)
        self._count_capture("ok")
        self._report()
        return plan

    def _drop(self, key: GraphKey) -> None:
        with self._lock:
            self._plans.pop(key, None)
        self._report()

    def _remember_failure(self, key: GraphKey, reason: str) -> None:
        self._failed[key] = reason
        while len(self._failed) > max(1, self.capacity):
            self._failed.popitem(last=False)

    def _fallback(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.cuda_graph_fallbacks.labels(reason=reason).inc()

    def _count_capture(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.cuda_graph_captures.labels(result=result).inc()

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.cuda_graphs.set(len(self._plans))


def _describe(key: GraphKey) -> str:
    tasks = sum(len(group) for group in key.groups)
    return f"bucket {key.bucket}, {tasks} tasks in {len(key.groups)} groups, layers {key.spec}"
