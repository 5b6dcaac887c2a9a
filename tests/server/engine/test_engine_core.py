"""The compute core: batch-independence, union capture, cache, fan-out groups, task failures."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from restuning.backbone import TorchBackbone
from server.engine.engine import BatchItem, Engine
from server.engine.feature_cache import FeatureCache
from server.engine.loaded_tuner import LoadedTuner
from server.metrics import Metrics
from tests.server.engine.conftest import ArtifactFactory
from tests.server.engine.engine_kit import (
    RecordingRuntime,
    answers_close,
    loaded_tuner,
    pixels_of,
)

TOKENS = 1 + (32 // 8) ** 2  # vit_test_tiny: CLS + 4x4 patches


@pytest.fixture
def tuners(tiny_backbone: TorchBackbone, artifact: ArtifactFactory) -> dict[str, LoadedTuner]:
    """Tasks of every kind, tuner and pooling; cls_a and cls_b share a shape (stacked)."""
    specs: dict[str, dict[str, Any]] = {
        "cls_a": {"seed": 1, "layers": (1, 2)},
        "cls_b": {"seed": 2, "layers": (1, 2)},
        "cls_c": {"seed": 3, "layers": (1, 2)},
        "mean_r": {"seed": 4, "task": "regression", "pooling": "mean", "layers": (2, 2)},
        "emb": {"seed": 5, "task": "embedding", "tuner": "res_prefix", "layers": (1, 1)},
        "ml": {"seed": 6, "task": "multilabel", "tuner": "res_prompt", "pooling": "mean"},
    }
    return {name: loaded_tuner(tiny_backbone, artifact(name, **kw)) for name, kw in specs.items()}


def items_for(
    backbone: TorchBackbone, plan: list[tuple[int, list[LoadedTuner], int]]
) -> list[BatchItem]:
    out = []
    for image, tuners, top_k in plan:
        pixels, digest = pixels_of(image, backbone)
        out.append(BatchItem(pixels, digest, tuple(tuners), top_k))
    return out


def test_batched_equals_alone_with_mixed_task_sets(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    t = tuners
    plan = [
        (0, [t["cls_a"], t["cls_b"]], 3),
        (1, [t["cls_a"], t["mean_r"]], 1),
        (2, [t["emb"]], 2),
        (3, [t["cls_a"], t["cls_b"], t["cls_c"], t["mean_r"], t["emb"], t["ml"]], 2),
        (4, [t["ml"]], 4),
        (5, [t["cls_b"]], 3),
        (0, [t["cls_c"], t["emb"]], 1),  # same image again, other tasks
    ]
    items = items_for(tiny_backbone, plan)
    batched = Engine(runtime, FeatureCache(0)).run_batch(items)
    assert len(runtime.calls) == 1  # one forward for the whole batch
    for item, out in zip(items, batched.items, strict=True):
        alone = Engine(runtime, FeatureCache(0)).run_batch([item]).items[0]
        assert out.answers.keys() == {tuner.name for tuner in item.tuners}
        for name, answer in out.answers.items():
            assert "error" not in answer, answer
            assert answers_close(answer, alone.answers[name], 1e-5), (name, answer, alone)


def test_answers_carry_version_digest_and_kind(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    items = items_for(tiny_backbone, [(0, list(tuners.values()), 2)])
    answers = Engine(runtime, FeatureCache(0)).run_batch(items).items[0].answers
    for name, tuner in tuners.items():
        assert answers[name]["version"] == tuner.version
        assert answers[name]["sha256"] == tuner.sha256
        assert answers[name]["kind"] == tuner.config.task
    assert len(answers["cls_a"]["labels"]) == 2
    assert set(answers["mean_r"]["values"]) == {"age", "size"}
    norm = sum(v * v for v in answers["emb"]["embedding"]) ** 0.5
    assert norm == pytest.approx(1.0, abs=1e-5)


def test_capture_is_the_union_and_cls_only_when_every_task_pools_cls(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    engine = Engine(runtime, FeatureCache(0))
    engine.run_batch(items_for(tiny_backbone, [(0, [tuners["cls_a"]], 1), (1, [tuners["emb"]], 1)]))
    spec, shape = runtime.calls[-1]
    assert spec.layers == (0, 1, 2)  # cls_a reads x0..x2, emb reads x0..x1
    assert spec.tokens == "cls"
    assert shape == (3, 2, 1, tiny_backbone.dim)  # (L', B, N'=1, D)

    engine.run_batch(
        items_for(tiny_backbone, [(0, [tuners["emb"]], 1), (1, [tuners["mean_r"]], 1)])
    )
    spec, shape = runtime.calls[-1]
    assert spec.layers == (0, 1, 2)
    assert spec.tokens == "all"
    assert shape == (3, 2, TOKENS, tiny_backbone.dim)


def test_cache_hit_skips_the_backbone(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    engine = Engine(runtime, FeatureCache(1 << 20))
    task = [tuners["cls_a"], tuners["emb"]]
    first = engine.run_batch(items_for(tiny_backbone, [(0, task, 2), (1, task, 2)]))
    assert len(runtime.calls) == 1
    assert [o.cache_hit for o in first.items] == [False, False]

    again = engine.run_batch(items_for(tiny_backbone, [(1, task, 2), (0, task, 2)]))
    assert len(runtime.calls) == 1  # no forward at all
    assert again.forwards == 0
    assert [o.cache_hit for o in again.items] == [True, True]
    assert answers_close(again.items[1].answers, first.items[0].answers, 1e-6)

    mixed = engine.run_batch(items_for(tiny_backbone, [(0, task, 2), (2, task, 2)]))
    assert [o.cache_hit for o in mixed.items] == [True, False]
    assert runtime.calls[-1][1][1] == 1  # the forward ran on the one miss only

    # CLS-only entries cannot serve a mean-pooled task: that needs a new forward.
    engine.run_batch(items_for(tiny_backbone, [(0, [tuners["mean_r"]], 1)]))
    assert len(runtime.calls) == 3
    assert runtime.calls[-1][0].tokens == "all"


def test_identical_pixels_in_one_batch_run_once(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    engine = Engine(runtime, FeatureCache(0))
    out = engine.run_batch(
        items_for(tiny_backbone, [(3, [tuners["cls_a"]], 1), (3, [tuners["cls_b"]], 1)])
    )
    assert runtime.calls[-1][1][1] == 1
    alone = engine.run_batch(items_for(tiny_backbone, [(3, [tuners["cls_b"]], 1)]))
    assert answers_close(out.items[1].answers, alone.items[0].answers, 1e-5)


def test_a_failing_task_answers_with_an_error_and_the_others_still_answer(
    tiny_backbone: TorchBackbone,
    runtime: RecordingRuntime,
    tuners: dict[str, LoadedTuner],
    artifact: ArtifactFactory,
) -> None:
    # A fault that real weights cannot produce: the module raises while running.
    broken = loaded_tuner(tiny_backbone, artifact("broken", seed=9, layers=(2, 2), bottleneck=3))

    def explode(*_: object) -> torch.Tensor:
        raise RuntimeError("kernel exploded")

    broken.module.forward = explode  # type: ignore[method-assign]
    engine = Engine(runtime, FeatureCache(0))
    task_set = [tuners["cls_a"], broken, tuners["mean_r"]]
    out = engine.run_batch(items_for(tiny_backbone, [(0, task_set, 1), (1, [broken], 1)]))
    first = out.items[0].answers
    assert first["broken"]["error"]["code"] == "task_failed"
    assert "kernel exploded" in first["broken"]["error"]["detail"]
    assert out.items[1].answers["broken"]["error"]["code"] == "task_failed"
    good = engine.run_batch(items_for(tiny_backbone, [(0, [tuners["cls_a"], tuners["mean_r"]], 1)]))
    for name in ("cls_a", "mean_r"):
        assert answers_close(first[name], good.items[0].answers[name], 1e-5)


def test_two_versions_of_one_task_in_one_batch(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    v1 = loaded_tuner(tiny_backbone, artifact("pets", seed=1), version=1)
    v2 = loaded_tuner(tiny_backbone, artifact("pets", seed=2), version=2)
    other = loaded_tuner(tiny_backbone, artifact("toys", seed=3))
    engine = Engine(runtime, FeatureCache(0))
    out = engine.run_batch(items_for(tiny_backbone, [(0, [v1, other], 3), (1, [v2, other], 3)]))
    assert out.items[0].answers["pets"]["version"] == 1
    assert out.items[1].answers["pets"]["version"] == 2
    for image, tuner, got in ((0, v1, out.items[0]), (1, v2, out.items[1])):
        alone = engine.run_batch(items_for(tiny_backbone, [(image, [tuner], 3)])).items[0]
        assert answers_close(got.answers["pets"], alone.answers["pets"], 1e-5)


def test_stacked_groups_are_reused_by_steady_traffic(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    engine = Engine(runtime, FeatureCache(0))
    task_set = [tuners["cls_a"], tuners["cls_b"], tuners["cls_c"], tuners["emb"]]
    for image in range(4):
        engine.run_batch(items_for(tiny_backbone, [(image, task_set, 1)]))
    assert engine.groups.builds == 2  # one stacked group of 3, one single-task group
    assert len(engine.groups) == 2


def test_group_cache_is_bounded_in_bytes(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    pair = tuners["cls_a"].nbytes + tuners["cls_b"].nbytes
    engine = Engine(runtime, FeatureCache(0), group_cache_bytes=pair)
    a, b, c = tuners["cls_a"], tuners["cls_b"], tuners["cls_c"]
    for task_set in ([a, b], [a, c], [b, c]):
        engine.run_batch(items_for(tiny_backbone, [(0, task_set, 1)]))
    assert len(engine.groups) == 1  # each pair alone fills the budget


def test_batch_metrics(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, tuners: dict[str, LoadedTuner]
) -> None:
    metrics = Metrics()
    engine = Engine(runtime, FeatureCache(0), metrics)
    task_set = [tuners["cls_a"], tuners["cls_b"], tuners["emb"]]
    engine.run_batch(items_for(tiny_backbone, [(0, task_set, 1), (1, [tuners["emb"]], 1)]))
    sample = metrics.registry.get_sample_value
    assert sample("restune_batch_size_images_sum") == 2
    assert sample("restune_backbone_forward_seconds_count") == 1
    assert sample("restune_tasks_per_forward_sum") == 3
    assert sample("restune_fanout_seconds_count") == 1
    assert sample("restune_predictions_total", {"task": "emb"}) == 2
    assert sample("restune_predictions_total", {"task": "cls_a"}) == 1
