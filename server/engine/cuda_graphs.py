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

:class:`GraphRunner` keeps plans in an LRU bounded in count. A key it has no plan for runs that
batch eagerly and is queued; the engine thread builds queued plans between batches
(:meth:`GraphRunner.build_pending`), so warm-up and capture never run beside a replay, and they
run on one capture stream the plan factory creates once (a high-priority stream: torch's
low-priority pool, which torchvision's nvJPEG decoder draws from, never hands it out). A
registration or deletion rebuilds the plans that used the changed task and swaps each in with
one dict assignment, so a batch that already holds a plan finishes on it; a plan whose tuner
version was unloaded while it was built is dropped, not installed.

Before capturing, a plan runs its body once under
:class:`~server.engine.capture_legality.CaptureRecorder`: a body that would break a capture
(mixed dtypes, host data, host syncs, another device) is refused before any capture starts, and
the recorder keeps alive every tensor the graph reads but the plan did not make. A capture that
fails is cleaned up (capture ended, graph reset, a fresh memory pool for the next one) and its
key runs eagerly from then on, counted in ``restune_cuda_graph_captures_total{result}`` and
``restune_cuda_graph_fallbacks_total{reason}``: never a failed request. When the cleanup itself
fails, graphs are switched off for the process (``reason="graphs_disabled"``) and the eager
engine serves. On the CPU no graph is captured: the same :class:`DensePlan` runs eagerly, which
is what the CPU tests drive, and what they run under the recorder for every plan shape.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from restuning.fanout import BypassImpl, StackedGroup
from restuning.features import Features, FeatureSpec
from restuning.kernels.grouped_adapter import GroupedSetting, choose_bypass_impl
from server.engine.buckets import fill_padded, pad_rows
from server.engine.capture_legality import CaptureIllegalError, CaptureRecorder
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
    """Stackable groups of ``tuners`` exactly as the eager engine forms them: by bypass shape,
    heads of any kind and width in one group."""
    tasks = [_Task(t) for t in tuners]
    return tuple(tuple(t.tuner for t in group) for group in _groups(tasks, mixed_heads=True))


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

    def close(self) -> None:
        """Free what the plan holds on the device (its graphs); it must not run again."""
        ...


BuildFn = Callable[[GraphKey, TunerGroups], Plan]
"""Builds the plan of a key (captures it on CUDA); may raise: the key then runs eagerly."""


class DensePlan:
    """The body of a plan, run eagerly: what a CUDA graph captures, and the CPU's stand-in.

    Everything the body reads besides the backbone is the plan's own: the stacked tuners, the
    heads and the final norm, copied in the compute dtype when the plan is built.
    """

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
                    samples.append(Features(key.spec, self.features(self.zero_pixels())))
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

    def zero_pixels(self) -> Tensor:
        """A bucket of zero images (bucket, 3, H, W) float32 on the plan's device."""
        return torch.zeros((self._key.bucket, *self.input_shape), device=self.device)

    def features(self, pixels: Tensor) -> Tensor:
        """(bucket, 3, H, W) on the device -> (L', bucket, N', D)."""
        return self.forward(pixels, self._key.spec).data

    def fan_out(self, data: Tensor) -> Tensor:
        """Features (L', bucket, N', D) -> every group's outputs, flat float32 (one buffer)."""
        feats = Features(self._key.spec, data)
        outs = [g.forward_all(feats, impl) for g, impl in zip(self.groups, self.impls, strict=True)]
        return torch.cat([o.float().reshape(-1) for o in outs])

    def body(self, pixels: Tensor) -> Tensor:
        """Both parts at once: pixels (bucket, 3, H, W) -> the flat output (what is captured)."""
        return self.fan_out(self.features(pixels))

    def check_capturable(self, pixels: Tensor | None = None) -> CaptureRecorder:
        """Run the body once under a :class:`CaptureRecorder`; raise
        :class:`CaptureIllegalError` if a capture would refuse any of its ops. The returned
        recorder holds the tensors the body read but did not make."""
        recorder = CaptureRecorder(self.device)
        recorder.run(lambda: self.body(self.zero_pixels() if pixels is None else pixels))
        return recorder

    def output_shapes(self) -> list[tuple[int, int, int]]:
        """(K, bucket, C) of each group's block of the flat output; C is the group's widest
        head (narrower heads are zero-padded to it: cut each task's own columns)."""
        return [(len(g.modules), self._key.bucket, g.width) for g in self.groups]

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

    def close(self) -> None:
        """Nothing to free: an eager body holds only tensors."""


def split_outputs(flat: Tensor, shapes: Sequence[tuple[int, int, int]], rows: int) -> list[Tensor]:
    """The flat output buffer cut into (K, bucket, C) blocks, each narrowed to ``rows`` rows."""
    out = []
    offset = 0
    for k, bucket, c in shapes:
        size = k * bucket * c
        out.append(flat[offset : offset + size].view(k, bucket, c)[:, :rows])
        offset += size
    return out


class CaptureCleanupError(RuntimeError):
    """A failed capture could not be undone; graphs must not be captured in this process."""


class CudaGraphPlan:
    """A :class:`DensePlan` captured as two CUDA graphs with static buffers (see module doc).

    Built on the engine thread between batches, on ``stream`` (the factory's capture stream,
    created once). Raises :class:`CaptureIllegalError` before capturing a body a capture would
    refuse, and :class:`CaptureCleanupError` when a failed capture could not be undone.
    """

    def __init__(
        self, body: DensePlan, stream: torch.cuda.Stream, pool: _POOL_HANDLE | None = None
    ) -> None:
        self.body = body
        device = body.device
        self.static_pixels = body.zero_pixels()  # (bucket, 3, H, W)
        # Warm-up on the capture stream, as torch's graph docs require: first calls allocate
        # workspaces, pick cuBLAS algorithms and compile Triton kernels, none of which may
        # happen during capture. The last run is checked op by op before anything is captured.
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS - 1):
                body.body(self.static_pixels)
            checked = body.check_capturable(self.static_pixels)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.backbone_graph = torch.cuda.CUDAGraph()
        self.fanout_graph = torch.cuda.CUDAGraph()
        recorder = CaptureRecorder(device)
        try:
            with recorder.recording():
                with torch.cuda.graph(
                    self.backbone_graph, pool=pool, stream=stream, capture_error_mode="thread_local"
                ):
                    self.static_features = body.features(self.static_pixels)  # (L', B, N', D)
                with torch.cuda.graph(
                    self.fanout_graph, pool=pool, stream=stream, capture_error_mode="thread_local"
                ):
                    self.static_out = body.fan_out(self.static_features)  # (sum K*B*C,) f32
        except BaseException:
            _abort_capture([self.backbone_graph, self.fanout_graph], stream, pool)
            raise
        # A graph reads its inputs by address at every replay: keep every tensor the body
        # read and did not make (weights, cached position embeddings) alive with the plan.
        self.keepalive = [*checked.external, *recorder.external]
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

    def close(self) -> None:
        """Free both graphs (the engine is shutting down or the plan was evicted)."""
        self.backbone_graph.reset()
        self.fanout_graph.reset()


def _abort_capture(
    graphs: Sequence[torch.cuda.CUDAGraph], stream: torch.cuda.Stream, pool: _POOL_HANDLE | None
) -> None:
    """Undo a capture that raised: end it if the stream still captures, reset the graphs and
    stop routing the stream's allocations to the graph pool. Raises
    :class:`CaptureCleanupError` when the stream is left capturing."""
    with torch.cuda.stream(stream):
        if torch.cuda.is_current_stream_capturing():
            for graph in graphs:
                try:
                    graph.capture_end()
                except Exception:  # the capture is invalid; ending it is all that matters
                    log.debug("ending an invalid capture raised", exc_info=True)
        still = torch.cuda.is_current_stream_capturing()
    end_pool = getattr(torch._C, "_cuda_endAllocateToPool", None)
    if pool is not None and end_pool is not None:
        try:
            end_pool(stream.device.index, pool)
        except Exception:  # not routed any more: capture_end got that far
            log.debug("the graph pool was already released", exc_info=True)
    for graph in graphs:
        try:
            graph.reset()
        except Exception:
            log.debug("resetting a failed graph raised", exc_info=True)
    if still:
        raise CaptureCleanupError("the capture stream is still capturing after a failed capture")


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
    stream: torch.cuda.Stream | None = field(default=None)
    """The capture stream, created on the first capture and kept for every later one: a
    high-priority stream, never one of the default-priority pool streams torchvision's nvJPEG
    decoder draws (see module doc)."""

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
        if self.stream is None:
            # A high-priority stream: torch keeps those in their own pool, apart from the
            # default-priority streams libraries draw (torchvision's nvJPEG decoder).
            self.stream = torch.cuda.Stream(self.device, priority=-1)  # type: ignore[no-untyped-call]
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            return CudaGraphPlan(body, self.stream, self.pool)
        except CaptureIllegalError:
            raise  # refused before any capture: the pool is untouched
        except BaseException:
            self.pool = None  # the next capture starts a fresh pool
            raise


@dataclass
class _Queued:
    tuners: TunerGroups
    replaces: GraphKey | None


class GraphRunner:
    """Bounded LRU of plans by :class:`GraphKey`, built between batches, swapped atomically.

    ``deferred``: a key without a plan is queued and built by :meth:`build_pending`, which the
    engine thread calls between batches (the batch that asked runs eagerly); False builds it
    at once on the caller's thread (tests, warm-up).
    """

    def __init__(
        self,
        build: BuildFn,
        *,
        capacity: int,
        metrics: Metrics | None = None,
        deferred: bool = False,
    ) -> None:
        self.build = build
        self.capacity = capacity
        self.metrics = metrics
        self.deferred = deferred
        self._plans: OrderedDict[GraphKey, Plan] = OrderedDict()
        self._queued: OrderedDict[GraphKey, _Queued] = OrderedDict()
        self._building: set[GraphKey] = set()
        self._cancelled: set[GraphKey] = set()
        self._failed: OrderedDict[GraphKey, str] = OrderedDict()
        self._disabled: str | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether plans are used at all (capacity 0, a failed cleanup or close switch off)."""
        return self.capacity > 0 and self._disabled is None and not self._closed

    @property
    def disabled_reason(self) -> str | None:
        """Why graphs were switched off for the process, or ``None``."""
        return self._disabled

    def __len__(self) -> int:
        return len(self._plans)

    def note_eager(self) -> None:
        """Count a batch run eagerly because graphs are off: switched off by a failed cleanup
        (``graphs_disabled``) or the engine closing (``closed``); not when settings say so."""
        if self._disabled is not None:
            self._fallback("graphs_disabled")
        elif self._closed:
            self._fallback("closed")

    def keys(self) -> list[GraphKey]:
        """Keys with a plan, least recently used first."""
        with self._lock:
            return list(self._plans)

    def queued(self) -> list[GraphKey]:
        """Keys waiting for :meth:`build_pending`, oldest first."""
        with self._lock:
            return list(self._queued)

    def failure(self, key: GraphKey) -> str | None:
        """Why ``key`` runs eagerly for good, or ``None``."""
        with self._lock:
            return self._failed.get(key)

    def get(self, key: GraphKey, tuners: TunerGroups) -> Plan | None:
        """The plan of ``key``, or ``None`` (run eagerly) while it is queued, built or failed."""
        with self._lock:
            if not self.enabled:
                reason = "graphs_disabled" if self._disabled is not None else "closed"
                plan = None
            else:
                plan = self._plans.get(key)
                reason = ""
                if plan is not None:
                    self._plans.move_to_end(key)
                elif key in self._failed:
                    reason = _fallback_reason(self._failed[key])
                elif key in self._queued or key in self._building:
                    reason = "building"
                else:
                    self._enqueue(key, _Queued(tuners, None))
                    reason = "building"
        if plan is not None:
            return plan
        if reason != "building" or self.deferred or not self._dequeue(key):
            self._fallback(reason)
            return None
        plan = self._build(key, tuners)
        if plan is None:
            self._fallback(_fallback_reason(self.failure(key) or "capture_failed"))
        return plan

    def build_pending(self, limit: int = 1) -> int:
        """Build up to ``limit`` queued plans on this thread (the engine's, between batches);
        returns how many were tried."""
        tried = 0
        while tried < limit:
            with self._lock:
                if not self._queued or not self.enabled:
                    return tried
                key, queued = self._queued.popitem(last=False)
                self._building.add(key)
            tried += 1
            self._build(key, queued.tuners, queued.replaces)
        return tried

    def _enqueue(self, key: GraphKey, queued: _Queued) -> None:
        """Queue a build (under the lock); past ``capacity`` queued keys the oldest is let go:
        a later batch asking for it queues it again."""
        self._queued[key] = queued
        while len(self._queued) > max(1, self.capacity):
            self._queued.popitem(last=False)

    def _dequeue(self, key: GraphKey) -> bool:
        """Claim a queued ``key`` for building now; False when it is gone (cancelled)."""
        with self._lock:
            if self._queued.pop(key, None) is None:
                return False
            self._building.add(key)
            return True

    def forget(self, tuner: TunerKey) -> None:
        """Drop every plan holding version ``tuner`` (it was unloaded: no batch needs it), and
        every queued or running build of one: such a plan is dropped, never installed."""
        with self._lock:
            for key in [k for k in self._plans if _holds(k, tuner)]:
                del self._plans[key]
            for key in [k for k in self._queued if _holds(k, tuner)]:
                del self._queued[key]
            self._cancelled.update(k for k in self._building if _holds(k, tuner))
        self._report()

    def discard(self, key: GraphKey, reason: str) -> None:
        """Forget ``key``'s plan after it failed to replay; the key runs eagerly from now on."""
        with self._lock:
            self._plans.pop(key, None)
            self._remember_failure(key, reason)
        self._fallback(reason)
        self._report()

    def close(self) -> None:
        """No more builds; free every plan (the engine is shutting down)."""
        with self._lock:
            self._closed = True
            plans = list(self._plans.values())
            self._plans.clear()
            self._queued.clear()
            self._cancelled.update(self._building)
        _close_all(plans)
        self._report()

    def on_tuner_changed(self, name: str, tuner: LoadedTuner | None) -> None:
        """Task ``name`` now serves ``tuner`` (``None``: deleted, or not loaded here); the
        registry's swap listener calls it (through ``GpuEngine.on_tuner_swapped``).

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
                if new_key in self._plans or new_key in self._queued or new_key in self._building:
                    continue
                self._enqueue(new_key, _Queued(new_groups, old_key))
            if not self.deferred and self._dequeue(new_key):
                self._build(new_key, new_groups, old_key)

    def _build(
        self,
        key: GraphKey,
        tuners: TunerGroups,
        replaces: GraphKey | None = None,
    ) -> Plan | None:
        """Build ``key``'s plan (claimed: in ``_building``) and install it, replacing
        ``replaces``; failures are kept, a cancelled build is dropped.

        Plans that leave the LRU are only let go, never freed here: a batch may still hold
        one (it finishes on it); their graphs go with the last reference, or in :meth:`close`.
        """
        started = time.perf_counter()
        try:
            plan = self.build(key, tuners)
        except CaptureCleanupError as exc:
            log.exception("a failed capture could not be undone: CUDA graphs are off from now on")
            self._fail(key, f"{type(exc).__name__}: {exc}", "failed")
            self._disable("graphs_disabled")
            return None
        except CaptureIllegalError as exc:
            log.error("the plan of %s is not capturable; it runs eagerly: %s", _describe(key), exc)
            self._fail(key, f"not_capturable: {exc}", "not_capturable")
            return None
        except Exception as exc:
            log.exception("capturing the plan of %s failed; it runs eagerly", _describe(key))
            self._fail(key, f"capture_failed: {type(exc).__name__}: {exc}", "failed")
            return None
        with self._lock:
            self._building.discard(key)
            if key in self._cancelled or self._closed:
                self._cancelled.discard(key)
                installed = False
            else:
                installed = True
                self._plans[key] = plan  # one assignment: the swap
                self._plans.move_to_end(key)
                if replaces is not None and replaces != key:
                    self._plans.pop(replaces, None)
                while len(self._plans) > self.capacity:
                    self._plans.popitem(last=False)
        if not installed:
            log.info("dropped the plan of %s: a version it holds was unloaded", _describe(key))
            _close_all([plan])
            self._count_capture("dropped")
            return None
        log.info("captured %s in %.0f ms", _describe(key), (time.perf_counter() - started) * 1e3)
        self._count_capture("ok")
        self._report()
        return plan

    def _fail(self, key: GraphKey, reason: str, result: str) -> None:
        with self._lock:
            self._building.discard(key)
            self._cancelled.discard(key)
            self._remember_failure(key, reason)
        self._count_capture(result)

    def _disable(self, reason: str) -> None:
        with self._lock:
            self._disabled = reason
            self._plans.clear()
            self._queued.clear()
        self._report()

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


def _fallback_reason(failure: str) -> str:
    """The fallback label of a remembered failure: its first word before ':'."""
    head = failure.split(":", 1)[0]
    return head if head in ("not_capturable", "replay_failed") else "capture_failed"


def _holds(key: GraphKey, tuner: TunerKey) -> bool:
    return any(tuner in group for group in key.groups)


def _close_all(plans: Iterable[Plan]) -> None:
    """Free the plans' graphs (no batch holds them: closing, or never installed)."""
    for plan in plans:
        try:
            plan.close()
        except Exception:  # freeing must not take the caller down
            log.exception("closing a plan failed")


def _describe(key: GraphKey) -> str:
    tasks = sum(len(group) for group in key.groups)
    return f"bucket {key.bucket}, {tasks} tasks in {len(key.groups)} groups, layers {key.spec}"
