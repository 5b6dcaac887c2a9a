"""The GPU engine's logic on the CPU: buckets and padding, plan keys and their invalidation, the
LRU bound, the eager fallback, and answers equal to the eager engine's.

On the CPU no CUDA graph is captured: the plan factory builds the same
:class:`~server.engine.cuda_graphs.DensePlan` a graph would capture and runs it eagerly, so
everything around the capture (keys, padding, swaps, fallbacks, answers) runs for real here.
The tests marked for CUDA capture real graphs and skip without a GPU.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import io
import threading
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from PIL import Image
from pydantic import ValidationError

from restuning import fanout
from restuning.backbone import TorchBackbone, load_backbone
from restuning.preprocess import preprocess
from server.engine import buckets as bk
from server.engine.cuda_graphs import (
    DensePlan,
    GraphKey,
    GraphRunner,
    Plan,
    PlanFactory,
    PlanOutput,
    TunerGroups,
    graph_key,
    group_tuners,
)
from server.engine.decode import decode_image, input_digest
from server.engine.decode_gpu import (
    GpuImageDecoder,
    gpu_decode_available,
    jpeg_digest,
    preprocess_on_device,
)
from server.engine.engine import BatchItem, Engine
from server.engine.feature_cache import FeatureCache
from server.engine.gpu_engine import GpuEngine
from server.engine.loaded_tuner import LoadedTuner
from server.errors import ApiError
from server.metrics import Metrics
from server.settings import Settings
from tests.fixtures.models import tiny_image
from tests.server.engine.conftest import ArtifactFactory
from tests.server.engine.engine_kit import (
    RecordingRuntime,
    answers_close,
    loaded_tuner,
    open_registry,
    pixels_of,
)
from tests.server.engine.test_isolation import EXPECTED_CODE as ISOLATION_CODES
from tests.server.engine.test_isolation import SETTINGS as ISOLATION_SETTINGS
from tests.server.engine.test_isolation import (
    Request,
    as_loaded,
    batch_items,
    liar_task,
    poisoned_batches,
    poisoned_tuner_set,
)

# --- buckets and padding ------------------------------------------------------------------------


def test_bucket_is_the_smallest_that_holds_the_batch() -> None:
    buckets = bk.DEFAULT_BUCKETS
    assert [bk.bucket_for(n, buckets) for n in (1, 2, 3, 5, 8, 9, 64, 65, 128)] == [
        1,
        2,
        4,
        8,
        8,
        16,
        64,
        128,
        128,
    ]
    assert bk.bucket_for(129, buckets) is None
    assert bk.bucket_for(3, (2, 6)) == 6
    with pytest.raises(ValueError, match="at least one row"):
        bk.bucket_for(0, buckets)


def test_large_batches_split_into_full_largest_buckets_and_a_fitted_rest() -> None:
    assert bk.split_rows(5, (1, 2, 4)) == [(0, 4, 4), (4, 5, 1)]
    assert bk.split_rows(8, (1, 2, 4)) == [(0, 4, 4), (4, 8, 4)]
    assert bk.split_rows(3, (1, 2, 4)) == [(0, 3, 4)]
    assert bk.split_rows(300, bk.DEFAULT_BUCKETS) == [
        (0, 128, 128),
        (128, 256, 128),
        (256, 300, 64),
    ]


def test_validate_buckets_sorts_dedups_and_refuses_nonsense() -> None:
    assert bk.validate_buckets([8, 1, 4, 4]) == (1, 4, 8)
    bad_lists: list[list[int]] = [[], [0, 1], [-2], [bk.MAX_BUCKET + 1]]
    for bad in bad_lists:
        with pytest.raises(ValueError, match="bucket"):
            bk.validate_buckets(bad)


def test_pad_rows_appends_zero_rows_and_keeps_the_real_ones() -> None:
    batch = torch.arange(6.0).reshape(3, 2) + 1
    padded = bk.pad_rows(batch, 4)
    assert padded.shape == (4, 2)
    assert torch.equal(padded[:3], batch)
    assert torch.equal(padded[3], torch.zeros(2))
    assert bk.pad_rows(batch, 3) is batch
    with pytest.raises(ValueError, match="do not fit"):
        bk.pad_rows(batch, 2)


def test_fill_padded_overwrites_stale_rows_with_zeros() -> None:
    static = torch.full((2, 5, 3), 7.0)  # (L', bucket, D): rows on dim 1
    bk.fill_padded(static, torch.ones(2, 2, 3), dim=1)
    assert torch.equal(static[:, :2], torch.ones(2, 2, 3))
    assert torch.equal(static[:, 2:], torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="do not fit"):
        bk.fill_padded(static, torch.ones(2, 6, 3), dim=1)


# --- settings -------------------------------------------------------------------------------------


def test_settings_of_the_gpu_path() -> None:
    s = Settings()
    assert s.cuda_graph_buckets == list(bk.DEFAULT_BUCKETS)
    assert s.cuda_graph_cache_size > 0
    assert s.grouped_kernel == "auto"
    assert Settings(cuda_graph_buckets=[16, 1, 4, 4]).cuda_graph_buckets == [1, 4, 16]
    assert Settings(cuda_graph_cache_size=0).cuda_graph_cache_size == 0
    bad_settings: list[dict[str, Any]] = [
        {"cuda_graph_buckets": []},
        {"cuda_graph_buckets": [0, 2]},
        {"cuda_graph_cache_size": -1},
        {"grouped_kernel": "maybe"},
    ]
    for bad in bad_settings:
        with pytest.raises(ValidationError):
            Settings(**bad)


def test_buckets_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESTUNE_CUDA_GRAPH_BUCKETS", "[8, 2]")
    monkeypatch.setenv("RESTUNE_GROUPED_KERNEL", "off")
    s = Settings()
    assert s.cuda_graph_buckets == [2, 8]
    assert s.grouped_kernel == "off"


# --- fixtures: real tuners on the tiny backbone -----------------------------------------------


@pytest.fixture
def tuners(tiny_backbone: TorchBackbone, artifact: ArtifactFactory) -> dict[str, LoadedTuner]:
    """CLS tasks of one shape (one stacked group), plus other shapes and all-token tasks."""
    specs: dict[str, dict[str, Any]] = {
        "cls_a": {"seed": 1, "layers": (1, 2)},
        "cls_b": {"seed": 2, "layers": (1, 2)},
        "cls_c": {"seed": 3, "layers": (1, 2), "combine": "lerp", "lam": 0.3},
        "mean_r": {"seed": 4, "task": "regression", "pooling": "mean", "layers": (2, 2)},
        "emb": {"seed": 5, "task": "embedding", "tuner": "res_prefix", "layers": (1, 1)},
        "ml": {"seed": 6, "task": "multilabel", "tuner": "res_prompt", "pooling": "mean"},
    }
    return {name: loaded_tuner(tiny_backbone, artifact(name, **kw)) for name, kw in specs.items()}


def _items(backbone: TorchBackbone, plan: list[tuple[int, list[LoadedTuner]]]) -> list[BatchItem]:
    out = []
    for image, tuners in plan:
        pixels, digest = pixels_of(image, backbone)
        out.append(BatchItem(pixels, digest, tuple(tuners), 3))
    return out


def _gpu_engine(
    runtime: RecordingRuntime,
    backbone: TorchBackbone,
    *,
    cache_bytes: int = 0,
    metrics: Metrics | None = None,
    **kwargs: Any,
) -> GpuEngine:
    """The GPU engine on the CPU in float32: plans are eager DensePlans built inline."""
    options: dict[str, Any] = {"background": False, "dtype": torch.float32}
    options.update(kwargs)
    return GpuEngine(
        runtime,
        FeatureCache(cache_bytes),
        metrics,
        forward=backbone.forward_features,
        tuner_device="cpu",
        **options,
    )


def _assert_same_answers(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for name in g:
            assert "error" not in g[name], g[name]
            assert answers_close(g[name], w[name], 1e-5), (name, g[name], w[name])


# --- answers --------------------------------------------------------------------------------------


def test_plan_answers_equal_the_eager_engine_and_images_alone(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    """Batches padded to their bucket answer like the eager engine, and like each image alone
    (bucket 1, no padding): padded rows never reach an answer."""
    t = tuners
    plan = [
        (0, [t["cls_a"], t["cls_b"]]),
        (1, [t["cls_a"], t["mean_r"]]),
        (2, [t["emb"], t["cls_c"]]),
        (3, list(t.values())),
        (4, [t["ml"]]),
    ]  # 5 images: bucket 8, 3 padded rows
    items = _items(tiny_backbone, plan)
    metrics = Metrics()
    gpu = _gpu_engine(runtime, tiny_backbone, metrics=metrics)
    out = gpu.run_batch(items)
    assert len(gpu.graphs) == 1
    (key,) = gpu.graphs.keys()
    assert key.bucket == 8
    want = Engine(runtime, FeatureCache(0)).run_batch(items)
    _assert_same_answers([o.answers for o in out.items], [o.answers for o in want.items])
    for item, got in zip(items, out.items, strict=True):
        alone = gpu.run_batch([item]).items[0]
        _assert_same_answers([got.answers], [alone.answers])
    assert metrics.registry.get_sample_value("restune_cuda_graph_fallbacks_total") is None
    assert metrics.registry.get_sample_value("restune_cuda_graphs") == len(gpu.graphs)


@pytest.mark.parametrize("padding", [8.0, 1.0], ids=["padded", "segmented"])
def test_a_plan_stacks_mixed_heads_and_cuts_each_tasks_columns(
    tiny_backbone: TorchBackbone,
    runtime: RecordingRuntime,
    artifact: ArtifactFactory,
    padding: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tasks of one bypass shape with heads of other kinds and widths share one group of the
    plan (padded or one matmul per head), and each answers as in the eager engine."""
    monkeypatch.setattr(fanout, "MAX_HEAD_PADDING", padding)
    same = {"layers": (1, 2)}
    mixed = [
        loaded_tuner(tiny_backbone, artifact("wide", seed=1, labels=list("abcdefg"), **same)),
        loaded_tuner(tiny_backbone, artifact("pair", seed=2, labels=["x", "y"], **same)),
        loaded_tuner(tiny_backbone, artifact("reg", seed=3, task="regression", **same)),
        loaded_tuner(tiny_backbone, artifact("vec", seed=4, task="embedding", **same)),
    ]
    (group,) = group_tuners(mixed)
    assert len(group) == 4
    items = _items(tiny_backbone, [(0, mixed), (1, mixed[:2]), (2, mixed[2:])])
    gpu = _gpu_engine(runtime, tiny_backbone)
    out = gpu.run_batch(items)
    assert len(gpu.graphs) == 1
    want = Engine(runtime, FeatureCache(0)).run_batch(items)
    _assert_same_answers([o.answers for o in out.items], [o.answers for o in want.items])


def test_padding_rows_hold_zeros_not_other_images(
    tiny_backbone: TorchBackbone, tuners: dict[str, LoadedTuner]
) -> None:
    """Whatever the padded rows hold, the real rows' outputs are bit-identical."""
    groups = group_tuners([tuners["cls_a"], tuners["cls_b"], tuners["mean_r"]])
    key = graph_key(4, groups)
    plan = DensePlan(
        key,
        groups,
        tiny_backbone.forward_features,
        input_shape=(3, 32, 32),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    pixels = torch.stack([pixels_of(i, tiny_backbone)[0] for i in range(2)])
    out = plan.run_pixels(pixels)
    assert [o.shape[1] for o in out.outputs] == [2, 2]  # only the real rows come back
    other = torch.stack([pixels_of(i, tiny_backbone)[0] for i in range(4)])
    full = plan.run_pixels(other)
    for small, big in zip(out.outputs, full.outputs, strict=True):
        assert torch.equal(small, big[:, :2])


def test_batches_beyond_the_largest_bucket_run_in_chunks(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    items = _items(tiny_backbone, [(i, [tuners["cls_a"], tuners["cls_b"]]) for i in range(5)])
    gpu = _gpu_engine(runtime, tiny_backbone, buckets=(1, 2))
    out = gpu.run_batch(items)
    assert out.forwards == 3  # 2 + 2 + 1
    assert sorted(k.bucket for k in gpu.graphs.keys())  # noqa: SIM118 == [1, 2]
    want = Engine(runtime, FeatureCache(0)).run_batch(items)
    _assert_same_answers([o.answers for o in out.items], [o.answers for o in want.items])


def test_feature_cache_hits_skip_the_backbone_and_answer_the_same(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    t = tuners
    first = _items(tiny_backbone, [(0, [t["cls_a"], t["mean_r"]]), (1, [t["cls_b"]])])
    gpu = _gpu_engine(runtime, tiny_backbone, cache_bytes=1 << 20)
    cold = gpu.run_batch(first)
    assert cold.forwards == 1
    warm = gpu.run_batch(first)  # every image hits: only the fan-out runs
    assert warm.forwards == 0
    assert all(o.cache_hit for o in warm.items)
    _assert_same_answers([o.answers for o in warm.items], [o.answers for o in cold.items])
    mixed = _items(
        tiny_backbone,
        [(0, [t["cls_a"], t["mean_r"]]), (2, [t["cls_b"]]), (1, [t["cls_a"]])],
    )
    out = gpu.run_batch(mixed)  # image 2 misses: one forward for it alone
    assert out.forwards == 1
    assert [o.cache_hit for o in out.items] == [True, False, True]
    want = Engine(runtime, FeatureCache(0)).run_batch(mixed)
    _assert_same_answers([o.answers for o in out.items], [o.answers for o in want.items])


def test_graphs_switched_off_run_the_eager_engine(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    items = _items(tiny_backbone, [(0, [tuners["cls_a"]])])
    gpu = _gpu_engine(runtime, tiny_backbone, graph_cache_size=0)
    out = gpu.run_batch(items)
    assert not gpu.graphs.enabled
    assert len(gpu.graphs) == 0
    want = Engine(runtime, FeatureCache(0)).run_batch(items)
    _assert_same_answers([o.answers for o in out.items], [o.answers for o in want.items])


# --- keys ---------------------------------------------------------------------------------------


def _version(tuner: LoadedTuner, version: int, sha: str | None = None) -> LoadedTuner:
    """The same module as another version (or the same version with other bytes)."""
    digest = sha or hashlib.sha256(f"{tuner.name}:{version}".encode()).hexdigest()
    return replace(tuner, version=version, sha256=digest)


def test_graph_key_follows_versions_and_digests_of_its_own_tuners(
    tuners: dict[str, LoadedTuner],
) -> None:
    a, b, c = tuners["cls_a"], tuners["cls_b"], tuners["mean_r"]
    key = graph_key(8, group_tuners([a, b]))
    assert graph_key(8, group_tuners([b, a])) == key  # order of the request does not matter
    assert graph_key(8, group_tuners([_version(a, 2), b])) != key
    assert graph_key(8, group_tuners([_version(a, 1, "0" * 64), b])) != key  # same version, new sha
    assert graph_key(4, group_tuners([a, b])) != key
    assert graph_key(8, group_tuners([a, b, c])) != key
    assert key.uses("cls_a")
    assert not key.uses("mean_r")
    # An all-token task widens the captured features.
    assert graph_key(8, group_tuners([a, c])).spec.tokens == "all"
    assert key.spec.tokens == "cls"


def test_two_versions_of_one_name_land_in_different_groups(
    tuners: dict[str, LoadedTuner],
) -> None:
    a = tuners["cls_a"]
    groups = group_tuners([a, _version(a, 2), tuners["cls_b"]])
    assert len(groups) == 2
    assert all(len({t.name for t in g}) == len(g) for g in groups)


# --- the runner: LRU, invalidation, swaps, fallbacks ------------------------------------------


class StubPlan:
    """A plan that only records that it ran (the runner's logic does not look inside)."""

    def __init__(self, key: GraphKey, tuners: TunerGroups, fail: bool = False) -> None:
        self._key = key
        self._tuners = tuners
        self.fail = fail
        self.runs = 0
        self.closed = False

    @property
    def key(self) -> GraphKey:
        return self._key

    @property
    def tuners(self) -> TunerGroups:
        return self._tuners

    def run_pixels(self, pixels: torch.Tensor) -> PlanOutput:
        self.runs += 1
        if self.fail:
            raise RuntimeError("replay failed")
        return PlanOutput([], None, 0.0, 0.0)

    def run_features(self, data: torch.Tensor) -> PlanOutput:
        return self.run_pixels(data)

    def close(self) -> None:
        self.closed = True


class Builds:
    """A build function recording what it built; raises for keys in ``broken``."""

    def __init__(self) -> None:
        self.built: list[GraphKey] = []
        self.broken: set[GraphKey] = set()
        self.fail_replay = False

    def __call__(self, key: GraphKey, tuners: TunerGroups) -> Plan:
        if key in self.broken:
            raise RuntimeError("capture failed: operation not permitted when stream is capturing")
        self.built.append(key)
        return StubPlan(key, tuners, fail=self.fail_replay)


def _key_of(bucket: int, *tuners: LoadedTuner) -> tuple[GraphKey, TunerGroups]:
    groups = group_tuners(tuners)
    return graph_key(bucket, groups), groups


def test_runner_is_a_bounded_lru(tuners: dict[str, LoadedTuner]) -> None:
    builds = Builds()
    runner = GraphRunner(builds, capacity=2)
    k1, g1 = _key_of(1, tuners["cls_a"])
    k2, g2 = _key_of(2, tuners["cls_a"])
    k3, g3 = _key_of(4, tuners["cls_a"])
    p1 = runner.get(k1, g1)
    runner.get(k2, g2)
    assert runner.get(k1, g1) is p1  # a hit: no rebuild, and k1 is now the most recent
    runner.get(k3, g3)
    assert runner.keys() == [k1, k3]  # k2 was the least recently used
    assert builds.built == [k1, k2, k3]
    assert len(runner) == 2


def test_capture_failure_falls_back_to_eager_and_is_counted(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    items = _items(tiny_backbone, [(0, [tuners["cls_a"]]), (1, [tuners["cls_b"]])])
    builds = Builds()
    key, _ = _key_of(2, tuners["cls_a"], tuners["cls_b"])
    builds.broken.add(key)
    metrics = Metrics()
    gpu = _gpu_engine(runtime, tiny_backbone, metrics=metrics, build=builds)
    want = Engine(runtime, FeatureCache(0)).run_batch(items)
    for _ in range(3):
        out = gpu.run_batch(items)
        _assert_same_answers([o.answers for o in out.items], [o.answers for o in want.items])
    sample = metrics.registry.get_sample_value
    assert sample("restune_cuda_graph_captures_total", {"result": "failed"}) == 1  # tried once
    assert sample("restune_cuda_graph_fallbacks_total", {"reason": "capture_failed"}) == 3
    assert len(gpu.graphs) == 0


def test_replay_failure_drops_the_plan_and_the_batch_still_answers(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    items = _items(tiny_backbone, [(0, [tuners["cls_a"]])])
    builds = Builds()
    builds.fail_replay = True
    metrics = Metrics()
    gpu = _gpu_engine(runtime, tiny_backbone, metrics=metrics, build=builds)
    out = gpu.run_batch(items)
    want = Engine(runtime, FeatureCache(0)).run_batch(items)
    _assert_same_answers([o.answers for o in out.items], [o.answers for o in want.items])
    assert len(gpu.graphs) == 0
    gpu.run_batch(items)  # the key is remembered: no second capture, eager again
    sample = metrics.registry.get_sample_value
    assert sample("restune_cuda_graph_fallbacks_total", {"reason": "replay_failed"}) == 2
    assert sample("restune_cuda_graph_fallbacks_total", {"reason": "capture_failed"}) is None
    assert len(builds.built) == 1


def test_registration_rebuilds_affected_plans_and_swaps_them_in(
    tuners: dict[str, LoadedTuner],
) -> None:
    a, b, c = tuners["cls_a"], tuners["cls_b"], tuners["mean_r"]
    builds = Builds()
    runner = GraphRunner(builds, capacity=8)
    k_ab, g_ab = _key_of(4, a, b)
    k_c, g_c = _key_of(4, c)
    old = runner.get(k_ab, g_ab)
    runner.get(k_c, g_c)
    a2 = _version(a, 2)
    runner.on_tuner_changed("cls_a", a2)
    k_a2b, _ = _key_of(4, a2, b)
    assert set(runner.keys()) == {k_c, k_a2b}  # the old plan is swapped out, c untouched
    assert builds.built[-1] == k_a2b
    # A batch that already held the old plan finishes on it.
    assert old is not None
    old.run_pixels(torch.zeros(1))
    # A change to a task no plan uses touches nothing.
    before = runner.keys()
    runner.on_tuner_changed("not-here", _version(c, 5))
    assert runner.keys() == before
    assert len(builds.built) == 3


def test_deletion_drops_the_plans_of_the_task(tuners: dict[str, LoadedTuner]) -> None:
    a, b = tuners["cls_a"], tuners["cls_b"]
    runner = GraphRunner(Builds(), capacity=8)
    k_ab, g_ab = _key_of(4, a, b)
    k_b, g_b = _key_of(2, b)
    runner.get(k_ab, g_ab)
    runner.get(k_b, g_b)
    runner.on_tuner_changed("cls_a", None)
    assert runner.keys() == [k_b]
    runner.forget(b.key)  # the registry unloaded b's version
    assert runner.keys() == []


def test_a_failed_key_is_retried_after_its_task_changed(tuners: dict[str, LoadedTuner]) -> None:
    a = tuners["cls_a"]
    builds = Builds()
    key, groups = _key_of(1, a)
    builds.broken.add(key)
    runner = GraphRunner(builds, capacity=4)
    assert runner.get(key, groups) is None
    builds.broken.clear()
    assert runner.get(key, groups) is None  # remembered as failed
    runner.on_tuner_changed("cls_a", None)
    assert runner.get(key, groups) is not None


def test_plans_are_built_between_batches_on_the_engine_thread(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    """The first batch of a key runs eagerly and queues its plan; the next batch builds it on
    the engine's own thread before it runs (no capture beside a replay), then replays it."""
    items = _items(tiny_backbone, [(0, [tuners["cls_a"], tuners["cls_b"]])])
    metrics = Metrics()
    threads: list[str] = []
    factory = PlanFactory(
        tiny_backbone.forward_features, (3, 32, 32), torch.device("cpu"), torch.float32
    )

    def build(key: GraphKey, groups: TunerGroups) -> Plan:
        threads.append(threading.current_thread().name)
        return factory(key, groups)

    gpu = _gpu_engine(runtime, tiny_backbone, metrics=metrics, background=True, build=build)
    first = gpu.run_batch(items)
    assert len(gpu.graphs) == 0
    assert len(gpu.graphs.queued()) == 1
    second = gpu.run_batch(items)
    assert len(gpu.graphs) == 1
    assert threads == [threading.current_thread().name]
    _assert_same_answers([second.items[0].answers], [first.items[0].answers])
    sample = metrics.registry.get_sample_value
    assert sample("restune_cuda_graph_fallbacks_total", {"reason": "building"}) == 1
    assert sample("restune_cuda_graph_captures_total", {"result": "ok"}) == 1
    gpu.close()
    assert not gpu.graphs.enabled
    assert len(gpu.graphs) == 0


def test_plan_factory_on_the_cpu_builds_eager_plans(
    tiny_backbone: TorchBackbone, tuners: dict[str, LoadedTuner]
) -> None:
    factory = PlanFactory(
        tiny_backbone.forward_features, (3, 32, 32), torch.device("cpu"), torch.float32
    )
    key, groups = _key_of(2, tuners["cls_a"])
    assert isinstance(factory(key, groups), DensePlan)


# --- on a GPU -----------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16_RELATIVE_BOUND = 0.05
"""Largest |GPU bf16 - CPU fp32| of raw outputs, relative to the largest |fp32 output|."""


@cuda
def test_cuda_graph_answers_match_cpu_fp32_and_do_not_depend_on_the_batch(
    tiny_backbone: TorchBackbone, artifact: ArtifactFactory
) -> None:
    gpu_backbone = load_backbone("vit_test_tiny", "random:0", device="cuda", dtype=torch.bfloat16)
    tuners_cpu = [loaded_tuner(tiny_backbone, artifact(f"t{i}", seed=i)) for i in range(4)]
    # Copies on the GPU with the same keys: nn.Module.to moves in place, and the CPU
    # reference must keep answering on the CPU.
    tuners_gpu = [replace(t, module=copy.deepcopy(t.module).to("cuda")) for t in tuners_cpu]
    runtime_gpu = RecordingRuntime(gpu_backbone)
    gpu = GpuEngine(
        runtime_gpu,
        FeatureCache(0),
        forward=gpu_backbone.forward_features,
        tuner_device="cuda",
        background=False,
    )
    cpu = Engine(RecordingRuntime(tiny_backbone), FeatureCache(0))
    items_cpu = _items(tiny_backbone, [(i, tuners_cpu) for i in range(5)])
    items_gpu = [replace(it, tuners=tuple(tuners_gpu)) for it in items_cpu]
    got = gpu.run_batch(items_gpu)
    assert len(gpu.graphs) == 1
    got = gpu.run_batch(items_gpu)  # replayed
    want = cpu.run_batch(items_cpu)
    for g, w in zip(got.items, want.items, strict=True):
        for name in w.answers:
            gl = [x["score"] for x in g.answers[name]["labels"]]
            wl = [x["score"] for x in w.answers[name]["labels"]]
            assert max(abs(p - q) for p, q in zip(gl, wl, strict=True)) <= BF16_RELATIVE_BOUND
    alone = gpu.run_batch(items_gpu[:1])  # bucket 1 instead of 8
    for name, answer in alone.items[0].answers.items():
        a = [x["score"] for x in answer["labels"]]
        b = [x["score"] for x in got.items[0].answers[name]["labels"]]
        assert max(abs(p - q) for p, q in zip(a, b, strict=True)) <= 1e-2
    gpu.close()


@cuda
def test_a_failed_capture_is_undone_and_the_next_capture_works() -> None:
    """A capture that raises (a host sync inside it) is ended and reset on the dedicated
    stream, and a capture after it on the same stream and pool replays correctly."""
    from server.engine.cuda_graphs import _abort_capture

    x = torch.randn(64, 64, device="cuda")
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    pool = torch.cuda.graph_pool_handle()
    broken = torch.cuda.CUDAGraph()
    with (
        pytest.raises(RuntimeError),
        torch.cuda.graph(broken, pool=pool, stream=stream, capture_error_mode="thread_local"),
    ):
        (x @ x).sum().item()
    _abort_capture([broken], stream, pool)
    graph = torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        (x @ x).sum()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        y = x @ x
    graph.replay()
    torch.testing.assert_close(y, x @ x)


# --- decoding on the GPU ------------------------------------------------------------------------


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(64, 48), (20, 90), (32, 32), (10, 12)])
def test_preprocess_on_device_follows_the_host_preprocessing(
    tiny_backbone: TorchBackbone, size: tuple[int, int]
) -> None:
    """Same resize rule, crop and normalisation as restuning.preprocess; the resize filter is
    torch's antialiased one, so pixels agree to a few grey levels, not bit for bit."""
    img = tiny_image(3, size=size)
    dc = tiny_backbone.data_config
    want = preprocess(img, dc)
    u8 = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)  # (3, h, w)
    got = preprocess_on_device(u8, dc)
    assert got.shape == want.shape
    grey_level = 1.0 / (255.0 * min(dc.std))
    assert (got - want).abs().mean().item() <= 2 * grey_level
    assert (got - want).abs().max().item() <= 48 * grey_level


def test_gpu_decoder_checks_limits_before_decoding(tiny_backbone: TorchBackbone) -> None:
    dc = tiny_backbone.data_config
    decoder = GpuImageDecoder(dc, "cpu", max_bytes=50_000, max_pixels=70 * 70)
    png = _encoded(tiny_image(0, size=(40, 40)), "PNG")
    big = _encoded(tiny_image(1, size=(80, 80)), "JPEG")  # 6400 pixels > 4900
    with pytest.raises(ApiError) as caught:
        decoder.prepare([png, big])
    assert caught.value.code == "image_too_large"
    assert caught.value.extra.get("image") == 1
    with pytest.raises(ApiError) as caught:
        decoder.prepare([png, b"\xff\xd8\xff garbage"])
    assert caught.value.code == "bad_image"
    # Formats nvJPEG does not take go through PIL, as the host path prepares them.
    ((pixels, digest),) = decoder.prepare([png])
    img = decode_image(png, 0, max_bytes=50_000, max_pixels=4900)
    assert torch.equal(pixels, preprocess(img, dc))
    assert digest == input_digest(pixels)


def test_gpu_decode_needs_cuda() -> None:
    assert not gpu_decode_available("cpu")


@cuda
def test_gpu_decoder_decodes_jpegs_on_the_device(tiny_backbone: TorchBackbone) -> None:
    pytest.importorskip("torchvision")
    dc = tiny_backbone.data_config
    decoder = GpuImageDecoder(dc, "cuda", max_bytes=1 << 20, max_pixels=1 << 20)
    images = [_encoded(tiny_image(i), "JPEG") for i in range(4)] + [_encoded(tiny_image(9), "PNG")]
    out = decoder.prepare(images)
    for data, (pixels, _) in zip(images, out, strict=True):
        assert pixels.device.type == "cuda"
        host = preprocess(decode_image(data, 0, max_bytes=1 << 20, max_pixels=1 << 20), dc)
        # nvJPEG's IDCT and upsampling differ from libjpeg's by a few levels.
        assert (pixels.cpu() - host).abs().mean().item() <= 0.05
    assert out[0][1] == jpeg_digest(images[0])


def test_unloading_a_tuner_drops_its_plans(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    gpu = _gpu_engine(runtime, tiny_backbone)
    gpu.run_batch(_items(tiny_backbone, [(0, [tuners["cls_a"], tuners["cls_b"]])]))
    gpu.run_batch(_items(tiny_backbone, [(1, [tuners["mean_r"]])]))
    assert len(gpu.graphs) == 2
    gpu.forget_tuner(tuners["cls_a"])  # what the registry's unload listener calls
    assert [k.uses("mean_r") for k in gpu.graphs.keys()] == [True]  # noqa: SIM118


# --- unloads, refusals, shutdown, one device per batch -----------------------------------------


def test_a_plan_built_after_its_version_was_unloaded_is_dropped(
    tuners: dict[str, LoadedTuner],
) -> None:
    """Queued: the unload removes it from the queue. Being built: it is dropped when done."""
    a, b = tuners["cls_a"], tuners["cls_b"]
    metrics = Metrics()
    runner: GraphRunner

    class UnloadsWhileBuilding(Builds):
        def __call__(self, key: GraphKey, tuners: TunerGroups) -> Plan:
            runner.forget(a.key)  # the registry unloads a's version mid-build
            return super().__call__(key, tuners)

    runner = GraphRunner(UnloadsWhileBuilding(), capacity=4, metrics=metrics, deferred=True)
    k_ab, g_ab = _key_of(2, a, b)
    assert runner.get(k_ab, g_ab) is None
    assert runner.build_pending() == 1
    assert runner.keys() == []
    assert runner.get(k_ab, g_ab) is None  # not failed: queued again, as any new key
    sample = metrics.registry.get_sample_value
    assert sample("restune_cuda_graph_captures_total", {"result": "dropped"}) == 1
    assert sample("restune_cuda_graph_captures_total", {"result": "ok"}) is None

    plain = GraphRunner(Builds(), capacity=4, deferred=True)
    k_b, g_b = _key_of(1, b)
    plain.get(k_ab, g_ab)
    plain.get(k_b, g_b)
    plain.forget(a.key)
    assert plain.queued() == [k_b]
    plain.build_pending(limit=4)
    assert plain.keys() == [k_b]


def test_the_build_queue_is_bounded(tuners: dict[str, LoadedTuner]) -> None:
    runner = GraphRunner(Builds(), capacity=2, deferred=True)
    keys = [_key_of(bucket, tuners["cls_a"]) for bucket in (1, 2, 4, 8)]
    for key, groups in keys:
        assert runner.get(key, groups) is None
    assert runner.queued() == [keys[2][0], keys[3][0]]  # the oldest were let go


def test_a_body_that_is_not_capturable_runs_eagerly_with_its_reason_counted(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    from server.engine.capture_legality import CaptureIllegalError, Violation

    def refuse(key: GraphKey, groups: TunerGroups) -> Plan:
        raise CaptureIllegalError([Violation("aten.nonzero.default", "a host sync")])

    items = _items(tiny_backbone, [(0, [tuners["cls_a"]])])
    metrics = Metrics()
    gpu = _gpu_engine(runtime, tiny_backbone, metrics=metrics, build=refuse)
    want = Engine(runtime, FeatureCache(0)).run_batch(items)
    for _ in range(2):
        out = gpu.run_batch(items)
        _assert_same_answers([o.answers for o in out.items], [o.answers for o in want.items])
    sample = metrics.registry.get_sample_value
    assert sample("restune_cuda_graph_captures_total", {"result": "not_capturable"}) == 1
    assert sample("restune_cuda_graph_fallbacks_total", {"reason": "not_capturable"}) == 2
    (key,) = {graph_key(1, group_tuners([tuners["cls_a"]]))}
    failure = gpu.graphs.failure(key)
    assert failure is not None
    assert "nonzero" in failure
    assert gpu.graphs.enabled  # other keys still capture


def test_a_capture_that_cannot_be_undone_switches_graphs_off(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    from server.engine.cuda_graphs import CaptureCleanupError

    factory = PlanFactory(
        tiny_backbone.forward_features, (3, 32, 32), torch.device("cpu"), torch.float32
    )
    built: list[GraphKey] = []
    first = tuners["cls_a"]

    def build(key: GraphKey, groups: TunerGroups) -> Plan:
        if key.uses(first.name):
            raise CaptureCleanupError("the capture stream is still capturing")
        built.append(key)
        return factory(key, groups)

    metrics = Metrics()
    gpu = _gpu_engine(runtime, tiny_backbone, metrics=metrics, build=build)
    gpu.run_batch(_items(tiny_backbone, [(0, [tuners["cls_b"]])]))
    assert len(gpu.graphs) == 1
    items = _items(tiny_backbone, [(0, [first])])
    out = gpu.run_batch(items)
    want = Engine(runtime, FeatureCache(0)).run_batch(items)
    _assert_same_answers([o.answers for o in out.items], [o.answers for o in want.items])
    assert not gpu.graphs.enabled
    assert gpu.graphs.disabled_reason == "graphs_disabled"
    assert len(gpu.graphs) == 0
    gpu.run_batch(_items(tiny_backbone, [(1, [tuners["cls_b"]])]))  # eager from now on
    assert len(built) == 1
    sample = metrics.registry.get_sample_value
    assert sample("restune_cuda_graph_fallbacks_total", {"reason": "capture_failed"}) == 1
    assert sample("restune_cuda_graph_fallbacks_total", {"reason": "graphs_disabled"}) == 1


def test_closing_the_engine_frees_its_plans_and_builds_no_more(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    factory = PlanFactory(
        tiny_backbone.forward_features, (3, 32, 32), torch.device("cpu"), torch.float32
    )
    closed: list[GraphKey] = []

    def build(key: GraphKey, groups: TunerGroups) -> Plan:
        plan = factory(key, groups)
        setattr(plan, "close", lambda: closed.append(key))  # noqa: B010
        return plan

    gpu = _gpu_engine(runtime, tiny_backbone, build=build)
    items = _items(tiny_backbone, [(0, [tuners["cls_a"]])])
    gpu.run_batch(items)
    (key,) = gpu.graphs.keys()
    gpu.close()
    assert closed == [key]
    assert len(gpu.graphs) == 0
    out = gpu.run_batch(items)  # a straggler still answers, eagerly
    assert "error" not in out.items[0].answers["cls_a"]
    assert gpu.graphs.queued() == []


def test_rows_of_one_batch_end_on_one_device(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    """Images decoded on the device beside host images: the host ones are moved before any
    stack (``meta`` stands in for the GPU here)."""
    gpu = _gpu_engine(runtime, tiny_backbone)
    items = _items(tiny_backbone, [(0, [tuners["cls_a"]]), (1, [tuners["cls_a"]])])
    mixed = [replace(items[0], pixels=items[0].pixels.to("meta")), items[1]]
    moved = gpu._one_device(mixed)
    assert [i.pixels.device.type for i in moved] == ["meta", "meta"]
    assert torch.stack([i.pixels for i in moved]).device.type == "meta"
    assert gpu._one_device(items) is items  # one device already: untouched


def test_a_batch_that_fails_to_stage_keeps_its_healthy_plan(
    tiny_backbone: TorchBackbone,
    runtime: RecordingRuntime,
    tuners: dict[str, LoadedTuner],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only a failed replay discards a plan; a fault of the batch's inputs does not."""
    metrics = Metrics()
    gpu = _gpu_engine(runtime, tiny_backbone, metrics=metrics)
    items = _items(tiny_backbone, [(0, [tuners["cls_a"]])])
    want = gpu.run_batch(items)
    assert len(gpu.graphs) == 1

    def broken_stage(pixels: Any) -> torch.Tensor:
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr(gpu, "_stage", broken_stage)
    out = gpu.run_batch(items)
    _assert_same_answers([o.answers for o in out.items], [o.answers for o in want.items])
    assert len(gpu.graphs) == 1
    assert (
        metrics.registry.get_sample_value(
            "restune_cuda_graph_fallbacks_total", {"reason": "replay_failed"}
        )
        is None
    )


# --- failure isolation on the plan path, plans queued on a swap -------------------------------


def _raises(tuner: LoadedTuner) -> LoadedTuner:
    """``tuner`` with a forward that raises and a head no stack accepts (its plan cannot be
    built): the faults an artifact cannot carry, made in memory as the isolation tests do."""
    broken = copy.deepcopy(tuner)
    broken.module.forward = _explode  # type: ignore[method-assign]
    broken.module.head.weight = torch.nn.Parameter(torch.zeros(1))
    return broken


def _explode(*_: object, **__: object) -> torch.Tensor:
    raise RuntimeError("kernel exploded")


def test_a_poisoned_tuner_leaves_the_healthy_tasks_on_their_plan(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    """A task that breaks its plan's capture is quarantined by its first (eager) batch; from
    then on the plan holds the healthy tasks only, bit for bit the plan of the batch without
    the poison, and the poisons answer their own errors beside it: one that reads what the plan
    captured on the plan's features, one that reads more (all tokens) on one eager forward."""
    healthy = {
        name: loaded_tuner(tiny_backbone, artifact(name, seed=seed, layers=(1, 2)))
        for seed, name in enumerate(("cls_a", "cls_b", "cls_c"))
    }
    raises = _raises(loaded_tuner(tiny_backbone, artifact("raises", seed=10, layers=(1, 2))))
    wide = loaded_tuner(tiny_backbone, artifact("wide_head", seed=9, pooling="mean"))
    wide.module.head = torch.nn.Linear(tiny_backbone.dim, wide.config.num_outputs + 2)
    liar = as_loaded(liar_task(tiny_backbone))
    a, b, c = healthy.values()
    plan = [
        (0, [a, raises, b, liar]),
        (1, [c, wide]),
        (2, [a, c, raises, wide]),
    ]
    poisons = {raises.key, wide.key, liar.key}
    control = [(i, [t for t in ts if t.key not in poisons]) for i, ts in plan]
    clean = _gpu_engine(runtime, tiny_backbone)
    want = clean.run_batch(_items(tiny_backbone, control))
    (clean_key,) = clean.graphs.keys()

    metrics = Metrics()
    gpu = _gpu_engine(runtime, tiny_backbone, metrics=metrics)
    items = _items(tiny_backbone, plan)
    first = gpu.run_batch(items)  # the plan with the poisons fails to build: eager
    assert gpu.quarantined(raises.key)
    assert gpu.quarantined(wide.key)
    codes = {"raises": "task_failed", "wide_head": "bad_output_shape", "liar": "backbone_mismatch"}
    for _ in range(2):
        out = gpu.run_batch(items)
        assert gpu.graphs.keys() == [clean_key]
        assert out.forwards == 2  # the plan's forward, and one of all tokens for wide_head
        for got, was, wanted, (_, tasks) in zip(
            out.items, first.items, want.items, plan, strict=True
        ):
            for tuner in tasks:
                answer = got.answers[tuner.name]
                if tuner.key in poisons:
                    assert answer["error"]["code"] == codes[tuner.name], answer
                    assert was.answers[tuner.name]["error"]["code"] == codes[tuner.name]
                else:
                    assert answer == wanted.answers[tuner.name]
    sample = metrics.registry.get_sample_value
    assert sample("restune_cuda_graph_fallbacks_total", {"reason": "capture_failed"}) == 1
    assert sample("restune_cuda_graph_captures_total", {"result": "ok"}) == 1
    for name, code in codes.items():
        asked = sum(name in {t.name for t in ts} for _, ts in plan)
        counted = sample("restune_task_failures_total", {"task": name, "reason": code})
        assert counted == 3 * asked, name


def test_a_bad_image_on_the_plan_path_costs_only_itself_and_is_never_cached(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    """Features that overflow answer ``non_finite_features`` for their image, on the pixel
    replay and on the cached-features replay alike, and never enter the feature cache."""
    t = tuners
    asks = [t["cls_a"], t["cls_b"], t["mean_r"]]
    good = _items(tiny_backbone, [(0, asks), (1, asks), (2, asks)])
    control = _items(tiny_backbone, [(0, asks), (7, asks), (2, asks)])
    bad = replace(good[1], pixels=good[1].pixels * 1e30, digest="absurd-" + good[1].digest)
    poisoned = [good[0], bad, good[2]]
    want = _gpu_engine(runtime, tiny_backbone).run_batch(control)
    metrics = Metrics()
    gpu = _gpu_engine(runtime, tiny_backbone, cache_bytes=1 << 20, metrics=metrics)
    # Cold: every image runs through the whole plan. Warm: two hit the cache, the bad one
    # misses again (it was not cached) and the plan replays on the gathered features.
    for expect_hits in ([False, False, False], [True, False, True]):
        out = gpu.run_batch(poisoned)
        assert len(gpu.graphs) == 1
        assert [o.cache_hit for o in out.items] == expect_hits
        for tuner in asks:
            assert out.items[1].answers[tuner.name]["error"]["code"] == "non_finite_features"
        for slot in (0, 2):
            assert out.items[slot].answers == want.items[slot].answers
        (key,) = gpu.graphs.keys()
        assert gpu.cache.get(bad.digest, runtime.fingerprint, key.spec) is None
    failures = [
        metrics.registry.get_sample_value(
            "restune_task_failures_total", {"task": tuner.name, "reason": "non_finite_features"}
        )
        for tuner in asks
    ]
    assert failures == [2, 2, 2]
    assert metrics.registry.get_sample_value("restune_cuda_graph_fallbacks_total") is None


def test_a_swap_queues_the_new_versions_plans_so_its_first_batch_replays(
    tiny_backbone: TorchBackbone,
    runtime: RecordingRuntime,
    settings: Settings,
    artifact: ArtifactFactory,
) -> None:
    """The registry tells the engine of each swap; the plans the old version had are queued
    for the new one and built before the next batch, which replays instead of running eagerly.
    """
    metrics = Metrics()
    factory = PlanFactory(
        tiny_backbone.forward_features, (3, 32, 32), torch.device("cpu"), torch.float32
    )
    gpu = _gpu_engine(runtime, tiny_backbone, metrics=metrics, background=True, build=factory)
    sample = metrics.registry.get_sample_value

    def batch(*tasks: LoadedTuner) -> None:
        out = gpu.run_batch(_items(tiny_backbone, [(0, list(tasks)), (1, list(tasks))]))
        assert all("error" not in a for o in out.items for a in o.answers.values())

    async def main() -> None:
        async with open_registry(settings, runtime) as reg:
            reg.add_swap_listener(gpu.on_tuner_swapped)
            await reg.register("a", artifact("a", seed=1, layers=(1, 2)))
            await reg.register("b", artifact("b", seed=2, layers=(1, 2)))
            a1, b1 = await reg.resolve("a"), await reg.resolve("b")
            batch(a1, b1)  # runs eagerly, queues the plan
            batch(a1, b1)  # builds it first, then replays
            assert sample("restune_cuda_graph_fallbacks_total", {"reason": "building"}) == 1
            await reg.register("a", artifact("a", seed=3, layers=(1, 2)))
            a2 = await reg.resolve("a")
            assert a2.version == 2
            (queued,) = gpu.graphs.queued()
            assert queued == graph_key(2, group_tuners([a2, b1]))
            batch(a2, b1)
            assert gpu.graphs.keys() == [queued]  # the old version's plan was swapped out
            assert sample("restune_cuda_graph_fallbacks_total", {"reason": "building"}) == 1
            assert sample("restune_cuda_graph_captures_total", {"result": "ok"}) == 2

    asyncio.run(main())


def test_a_failing_swap_listener_does_not_stop_the_swap(
    runtime: RecordingRuntime, settings: Settings, artifact: ArtifactFactory
) -> None:
    seen: list[tuple[str, int | None]] = []

    def broken(name: str, tuner: LoadedTuner | None) -> None:
        raise RuntimeError("listener exploded")

    async def main() -> None:
        async with open_registry(settings, runtime) as reg:
            reg.add_swap_listener(broken)
            reg.add_swap_listener(lambda n, t: seen.append((n, None if t is None else t.version)))
            await reg.register("a", artifact("a", seed=1))
            await reg.register("a", artifact("a", seed=2))
            assert (await reg.resolve("a")).version == 2

    asyncio.run(main())
    assert seen == [("a", 2)]


def test_a_failed_forward_of_cache_misses_keeps_the_healthy_plan(
    tiny_backbone: TorchBackbone,
    runtime: RecordingRuntime,
    tuners: dict[str, LoadedTuner],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The eager forward beside a replay (cache misses next to hits) is the backbone's, not
    the plan's: when it fails the batch fails as it would without a plan, and the plan stays."""
    metrics = Metrics()
    gpu = _gpu_engine(runtime, tiny_backbone, cache_bytes=1 << 20, metrics=metrics)
    asks = [tuners["cls_a"], tuners["cls_b"]]
    gpu.run_batch(_items(tiny_backbone, [(0, asks), (1, asks)]))
    mixed = _items(tiny_backbone, [(0, asks), (2, asks)])  # image 2 misses

    def broken(images: torch.Tensor, spec: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with monkeypatch.context() as patch:
        patch.setattr(runtime, "forward_features", broken)
        with pytest.raises(RuntimeError, match="illegal memory access"):
            gpu.run_batch(mixed)
    out = gpu.run_batch(mixed)
    assert out.forwards == 1
    assert len(gpu.graphs) == 1
    sample = metrics.registry.get_sample_value
    assert sample("restune_cuda_graph_fallbacks_total", {"reason": "replay_failed"}) is None
    assert sample("restune_cuda_graph_captures_total", {"result": "ok"}) == 1


@pytest.fixture(scope="module")
def poisoned_set(tiny_backbone: TorchBackbone) -> dict[str, LoadedTuner]:
    return poisoned_tuner_set(tiny_backbone)


@ISOLATION_SETTINGS
@given(case=poisoned_batches())
def test_healthy_plan_answers_are_bit_for_bit_those_of_the_plan_without_the_poison(
    case: tuple[list[Request], frozenset[str], int | None],
    tiny_backbone: TorchBackbone,
    runtime: RecordingRuntime,
    poisoned_set: dict[str, LoadedTuner],
) -> None:
    """The isolation property of the eager engine, on the plan path: poisoned tuners and an
    absurd image co-batched with healthy requests. The batch that meets a culprit first answers
    the healthy tasks within float rounding (eagerly when the culprit broke the capture); from
    the next batch on (cold and from the feature cache), bit for bit the plan's answers of the
    batch without the poison."""
    requests, poisons, bad_slot = case
    items = batch_items(tiny_backbone, poisoned_set, requests, bad_slot=bad_slot)
    control = batch_items(
        tiny_backbone, poisoned_set, requests, drop=poisons, healthy_slot=bad_slot
    )
    clean = _gpu_engine(runtime, tiny_backbone).run_batch(control).items
    gpu = _gpu_engine(runtime, tiny_backbone, cache_bytes=1 << 20)
    for attempt in range(3):
        out = gpu.run_batch(items).items
        for slot, (request, got, want) in enumerate(zip(requests, out, clean, strict=True)):
            assert set(got.answers) == set(request.tasks)
            for name in request.tasks:
                answer = got.answers[name]
                if name == "liar":
                    assert answer["error"]["code"] == "backbone_mismatch", answer
                elif slot == bad_slot:
                    assert answer["error"]["code"] == "non_finite_features", answer
                elif name in poisons:
                    assert answer["error"]["code"] == ISOLATION_CODES[name], answer
                elif attempt == 0:
                    assert answers_close(answer, want.answers[name], 1e-5), (name, poisons)
                else:
                    assert answer == want.answers[name], (name, poisons, attempt)
