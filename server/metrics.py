"""Prometheus metrics of the service (prefix ``restune_``, base units, bounded label sets).

Each :class:`Metrics` owns its registry so several apps can live in one process (tests).
Per-task labels are capped: the first ``max_task_labels`` task names get their own series,
the rest are counted under ``other``.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TASK_BUCKETS = (1, 2, 4, 8, 16, 19, 32, 64, 128, 256, 1024)


class Metrics:
    """Every metric the service exports."""

    def __init__(self, max_task_labels: int = 100) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "restune_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
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
        self._max_task_labels = max_task_labels
        self._task_labels: set[str] = set()
        self._lock = threading.Lock()

    def task_label(self, task: str) -> str:
        """The label value for a task: its name while under the cap, else ``other``."""
        if task in self._task_labels:
            return task
        with self._lock:
            if len(self._task_labels) < self._max_task_labels:
                self._task_labels.add(task)
                return task
        return "other"

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
