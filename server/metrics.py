"""Prometheus metrics of the service (prefix ``restune_``, base units, bounded label sets).

Each :class:`Metrics` owns its registry so several apps can live in one process (tests).
Per-tuner labels are capped: the first ``max_task_labels`` tuner names get their own series
(in every per-tuner metric alike), the rest are counted under ``other``; per-version series are
capped the same way by ``max_version_labels``. So ``/metrics`` stays small with any number of
registered tuners.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

# A ``_created`` series per counter and histogram (106 of ~650 series per scrape) says when the
# process started counting, which ``process_start_time_seconds`` already says once.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

OTHER = "other"
"""Label value of everything past a label cap."""

Location = Literal["device", "host", "store"]
"""Where a tuner version lives: on the accelerator, in host memory, or only in the store."""

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
TASK_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
"""Coarser than ``LATENCY_BUCKETS``: this histogram has a series per labelled task, and with
100 labelled tasks each bucket costs about 6 KiB of every scrape (/metrics stays under
128 KiB: tests/server/test_metrics_bounds.py). The request latency keeps the fine buckets."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TASK_BUCKETS = (1, 2, 4, 8, 16, 19, 32, 64, 128, 256, 1024)


class Metrics:
    """Every metric the service exports."""

    def __init__(self, max_task_labels: int = 100, max_version_labels: int = 400) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_* (CPU seconds, resident memory, open fds, start time) and python_info, as
        # every Prometheus client exports them: the dashboards' memory and restart panels.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(
            "restune_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.probe_requests = Counter(
            "restune_probe_requests",
            "Health probes, metric scrapes and static files by route template and status: "
            "kept out of restune_requests so they never dilute its rate or error ratio.",
            ["route", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "restune_request_duration_seconds",
            "HTTP request latency by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "restune_queue_wait_seconds",
            "Time an image waited in the batcher queue.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "restune_queue_depth_images",
            "Images waiting in the batcher queue.",
            registry=r,
        )
        self.batch_size = Histogram(
            "restune_batch_size_images",
            "Images per engine batch.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.backbone_forward = Histogram(
            "restune_backbone_forward_seconds",
            "Backbone forward time per batch (misses only).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tasks_per_forward = Histogram(
            "restune_tasks_per_forward",
            "Distinct tasks served by one backbone forward.",
            buckets=TASK_BUCKETS,
            registry=r,
        )
        self.fanout = Histogram(
            "restune_fanout_seconds",
            "Bypass fan-out time per batch (all tasks).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter(
            "restune_feature_cache_hits",
            "Images whose features came from the cache.",
            registry=r,
        )
        self.cache_misses = Counter(
            "restune_feature_cache_misses",
            "Images that needed a backbone forward.",
            registry=r,
        )
        self.cache_bytes = Gauge(
            "restune_feature_cache_bytes",
            "Bytes held by the feature cache.",
            registry=r,
        )
        self.tuners_registered = Gauge(
            "restune_tuners_registered",
            "Tuners in the store's index.",
            registry=r,
        )
        self.tuners_loaded = Gauge(
            "restune_tuners_loaded",
            "Tuner versions loaded in memory.",
            registry=r,
        )
        self.tuner_store_up = Gauge(
            "restune_tuner_store_up",
            "1 while the tuner store answers this replica, 0 during an outage (it keeps "
            "serving what it has loaded, from the index as last read).",
            registry=r,
        )
        self.tuners_evicted = Counter(
            "restune_tuners_evicted",
            "Tuner versions evicted from memory.",
            registry=r,
        )
        self.registrations = Counter(
            "restune_registrations",
            "Tuner registrations by result.",
            ["result"],
            registry=r,
        )
        self.tuner_load = Histogram(
            "restune_tuner_load_seconds",
            "Time to build a tuner module from its artifact.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "restune_rejected_requests",
            "Requests refused, by reason (error code).",
            ["reason"],
            registry=r,
        )
        self.predictions = Counter(
            "restune_predictions",
            "Per-image task answers, by task (capped, rest 'other').",
            ["task"],
            registry=r,
        )
        self.answers = Counter(
            "restune_answers",
            "Per-image task answers by tuner version (capped: rest task or version 'other').",
            ["task", "version"],
            registry=r,
        )
        self.task_failures = Counter(
            "restune_task_failures",
            "Per-image task answers that are errors from running the task, by task (capped, "
            "rest 'other') and reason (the engine's fixed set of failure codes).",
            ["task", "reason"],
            registry=r,
        )
        self.task_successes = Counter(
            "restune_task_successes",
            "Per-image task answers that succeeded, by task (capped, rest 'other'): the "
            "denominator beside restune_task_failures_total.",
            ["task"],
            registry=r,
        )
        self.task_duration = Histogram(
            "restune_task_duration_seconds",
            "Time from a request's arrival at the service to its answers: one sample per "
            "answer (image and task), errors included, by task (capped, rest 'other').",
            ["task"],
            buckets=TASK_LATENCY_BUCKETS,
            registry=r,
        )
        self.unload_drain_timeouts = Counter(
            "restune_unload_drain_timeouts",
            "Tuner versions unloaded while requests still held them (the drain bound passed).",
            registry=r,
        )
        self.backbone_info = Gauge(
            "restune_backbone_info",
            "The backbone being served (value 1).",
            ["arch", "runtime", "device", "dtype", "providers"],
            registry=r,
        )
        self.cuda_graph_captures = Counter(
            "restune_cuda_graph_captures",
            "CUDA graph plans built (one per batch bucket and task set), by result.",
            ["result"],
            registry=r,
        )
        self.cuda_graph_fallbacks = Counter(
            "restune_cuda_graph_fallbacks",
            "Batches a CUDA engine ran eagerly instead of from a graph, by reason.",
            ["reason"],
            registry=r,
        )
        self.cuda_graphs = Gauge(
            "restune_cuda_graphs",
            "CUDA graph plans held.",
            registry=r,
        )
        self.rate_limit_fallbacks = Counter(
            "restune_rate_limit_fallbacks",
            "Tenant rate checks counted in this process because the shared Redis failed.",
            registry=r,
        )
        self._max_task_labels = max_task_labels
        self._task_labels: set[str] = set()
        self._max_version_labels = max_version_labels
        self._version_labels: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._tuner_state: Callable[[], TunerState] = TunerState
        r.register(TunerStateCollector(self))
        self.stats = InferenceStats(max_version_labels)

    def task_label(self, task: str) -> str:
        """The label value for a task: its name while under the cap, else ``other``.

        A name that gets a label keeps it (series of a counter never go away), so the first
        ``max_task_labels`` names seen are the ones with series of their own.
        """
        if task in self._task_labels:
            return task
        with self._lock:
            if len(self._task_labels) < self._max_task_labels:
                self._task_labels.add(task)
                return task
        return OTHER

    def known_label(self, task: str) -> str:
        """Like :meth:`task_label` but never hands out a new label (for idle tuners)."""
        return task if task in self._task_labels else OTHER

    def version_label(self, task: str, version: int) -> tuple[str, str]:
        """(task, version) label values: both capped, ``other`` past the caps."""
        name = self.task_label(task)
        if name == OTHER:
            return OTHER, OTHER
        key = (task, version)
        if key not in self._version_labels:
            with self._lock:
                if len(self._version_labels) >= self._max_version_labels:
                    return name, OTHER
                self._version_labels.add(key)
        return name, str(version)

    def count_answers(self, counts: Mapping[tuple[str, int], int]) -> None:
        """Add per-version answer counts ``{(task, version): n}``."""
        for (task, version), n in counts.items():
            task_value, version_value = self.version_label(task, version)
            self.answers.labels(task=task_value, version=version_value).inc(n)

    def record_task(self, task: str, version: int | None, tally: TaskTally) -> None:
        """One request's answers of ``task`` by ``version`` (None: no version ran them): the
        per-task Prometheus series and the protocol's per-version statistics."""
        label = self.task_label(task)
        if tally.ok:
            self.task_successes.labels(task=label).inc(tally.ok)
        # One sample per answer, so the histogram's count is the task's answers (the
        # denominator of its failure ratio); every answer of a request took its total time.
        duration = self.task_duration.labels(task=label)
        for _ in range(tally.ok + tally.failed):
            duration.observe(tally.total_s)
        if version is not None:
            self.stats.record(task, version, tally)

    def watch_tuners(self, state: Callable[[], TunerState]) -> None:
        """Export where each tuner version lives and the canary weights from ``state()``,
        read at every scrape (replaces an earlier source)."""
        self._tuner_state = state

    def tuner_state(self) -> TunerState:
        """The state the tuner gauges show now (empty until :meth:`watch_tuners`)."""
        return self._tuner_state()

    def render(self, shows_task: Callable[[str], bool] | None = None) -> bytes:
        """The exposition in the classic Prometheus text format (see :meth:`exposition`)."""
        return self.exposition(shows_task)[0]

    def exposition(
        self, shows_task: Callable[[str], bool] | None = None, accept: str = ""
    ) -> tuple[bytes, str]:
        """The exposition (body, content type) in the format ``accept`` asks for: OpenMetrics
        when the scraper offers it (Prometheus does), else the classic text format.

        With ``shows_task``, only the series whose ``task`` label it accepts (series without a
        ``task`` label always show): tenants must not learn each other's tuner names from a
        scrape, so a scrape that is not the operator's renders through this filter
        (``server.api.deps.metrics_filter``).
        """
        encode, content_type = choose_encoder(accept)
        source: Collector = self.registry
        if shows_task is not None:
            source = _TaskFilter(self.registry, shows_task)
        return encode(source), content_type


TASK_LABEL = "task"
"""The one label whose values are tuner names (every per-tuner series uses it)."""


class _TaskFilter(Collector):
    """A registry's families with the samples of unshown tasks left out."""

    def __init__(self, registry: CollectorRegistry, shows_task: Callable[[str], bool]) -> None:
        self._registry = registry
        self._shows = shows_task

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [
                s
                for s in family.samples
                if TASK_LABEL not in s.labels or self._shows(s.labels[TASK_LABEL])
            ]
            yield kept


@dataclass(frozen=True)
class TunerState:
    """What the registry holds, as the tuner gauges show it (read at every scrape)."""

    placements: Sequence[tuple[str, int, Location]] = ()
    """(name, version, location) of every loaded version and of every current version that
    is not loaded (``store``)."""
    traffic: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    """Canary weights of the names split between versions."""


class TunerStateCollector(Collector):
    """``restune_tuner_location`` and ``restune_tuner_traffic_weight``, built at scrape time.

    Built from the registry's state instead of kept as gauges, so a deleted tuner's series
    disappear with it and an idle tuner still shows where it lives. Labelled tuners have a
    series per version (value 1); the rest are summed per location under ``task="other"``.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Names only: the registry checks them for clashes without calling collect().
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        location, traffic = self._families()
        state = self._metrics.tuner_state()
        others: Tally[str] = Tally()
        for name, version, where in state.placements:
            # A loaded version is in use: it may claim a label; an idle one only shows if its
            # name already has one.
            label = (
                self._metrics.known_label(name)
                if where == "store"
                else self._metrics.task_label(name)
            )
            if label == OTHER:
                others[where] += 1
            else:
                location.add_metric([label, str(version), where], 1)
        for place, n in sorted(others.items()):
            location.add_metric([OTHER, "", place], n)
        for name, weights in sorted(state.traffic.items()):
            label = self._metrics.known_label(name)
            if label == OTHER:
                continue
            for version, weight in sorted(weights.items()):
                traffic.add_metric([label, str(version)], weight)
        yield location
        yield traffic

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "restune_tuner_location",
                "Tuner versions by where they live: device, host (loaded) or store (current, "
                "not loaded); 1 per labelled version, a count under task='other'.",
                labels=["task", "version", "location"],
            ),
            GaugeMetricFamily(
                "restune_tuner_traffic_weight",
                "Canary weight of each version of a labelled tuner split between versions.",
                labels=["task", "version"],
            ),
        )


@dataclass
class TaskTally:
    """How one request's answers of one task version went."""

    total_s: float
    """From the request's arrival at the service to its answers (the same for each)."""
    ok: int = 0
    failed: int = 0
    queue_s: float = 0.0
    """Summed over the successful answers: time in the batcher queue."""
    compute_s: float = 0.0
    """Summed over the successful answers: the engine's time on each one's batch (backbone
    and fan-out)."""


@dataclass
class Duration:
    """A count and the nanoseconds they took together (the protocol's ``{count, ns}``)."""

    count: int = 0
    ns: int = 0

    def add(self, count: int, seconds: float) -> None:
        self.count += count
        self.ns += max(0, round(seconds * 1e9))

    def as_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class VersionStats:
    """Cumulative statistics of one tuner version since the process started."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)
    last_inference_ms: int = 0
    """Unix time of the last answer, in milliseconds (0: none yet)."""


class InferenceStats:
    """Per-version answer statistics for the protocol's statistics extension.

    Bounded like the metric labels: the first ``max_versions`` (task, version) pairs answered
    are kept; later ones are not recorded (their statistics read as zeros), so memory stays
    small with any number of tuners. Updated from the event loop and read from it; the lock
    keeps a copy consistent should a worker thread ever record.
    """

    def __init__(self, max_versions: int) -> None:
        self._max = max_versions
        self._stats: dict[tuple[str, int], VersionStats] = {}
        self._lock = threading.Lock()

    def record(self, task: str, version: int, tally: TaskTally) -> None:
        key = (task, version)
        with self._lock:
            stats = self._stats.get(key)
            if stats is None:
                if len(self._stats) >= self._max:
                    return
                stats = self._stats[key] = VersionStats()
            stats.success.add(tally.ok, tally.ok * tally.total_s)
            stats.fail.add(tally.failed, tally.failed * tally.total_s)
            stats.queue.add(tally.ok, tally.queue_s)
            stats.compute.add(tally.ok, tally.compute_s)
            stats.last_inference_ms = int(time.time() * 1000)

    def get(self, task: str, version: int) -> VersionStats:
        """A copy of the statistics of one version (zeros when it has none)."""
        with self._lock:
            stats = self._stats.get((task, version))
            if stats is None:
                return VersionStats()
            return VersionStats(
                Duration(stats.success.count, stats.success.ns),
                Duration(stats.fail.count, stats.fail.ns),
                Duration(stats.queue.count, stats.queue.ns),
                Duration(stats.compute.count, stats.compute.ns),
                stats.last_inference_ms,
            )

    def versions(self, task: str) -> list[int]:
        """The versions of ``task`` that have statistics."""
        with self._lock:
            return sorted(v for t, v in self._stats if t == task)
