"""Training on cached features: folder, CSV multilabel and regression, cache reuse, augmentation,
determinism. Tiny random backbone (vit_test_tiny, random:0), real PNG digits."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from restuning.artifact_io import load_task, save_task
from restuning.backbone import TorchBackbone
from restuning.features import FeatureSpec
from restuning.train import TaskOptions, TrainOptions, load_data, train_task
from restuning.train.augment import AugmentOptions, crop_box
from restuning.train.feature_cache import FeatureCache
from restuning.train.loop import lr_factor
from restuning.train.progress import TrainingCancelledError
from tests.fixtures.training_data import (
    CountingBackbone,
    one_torch_thread,  # noqa: F401  (fixture used by pytestmark)
    state_equal,
    write_digit_csv,
    write_digit_folder,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = TrainOptions(epochs=30, lr=3e-3, batch_size=16)
SMALL = TaskOptions(bottleneck=8)


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Zeros and ones, 24 PNGs each, one folder per class."""
    return write_digit_folder(tmp_path_factory.mktemp("digits"), (0, 1), per_class=24)


def test_folder_training_beats_chance_and_records_summary(
    digit_folder: Path, tiny_backbone: TorchBackbone, tmp_path: Path
) -> None:
    data = load_data(digit_folder)
    assert data.labels == ("one", "zero")
    trained = train_task(
        data,
        "zero-one",
        tiny_backbone,
        task=SMALL,
        options=FAST,
        cache_dir=tmp_path,
        progress=False,
    )
    s = trained.summary
    assert s.val_metric == "accuracy"
    assert s.val_score is not None
    assert s.val_score >= 0.8
    assert (s.train_size, s.val_size) == (38, 10)  # 20% of each class held out
    assert s.epochs == FAST.epochs
    assert s.seed == 0
    assert s.data == f"folder:{digit_folder}"
    assert s.extra["params"] > 0

    # The artifact carries the summary and loads back into the same outputs.
    config = trained.module.config
    assert config.training == s
    assert config.backbone.fingerprint == tiny_backbone.fingerprint
    loaded = load_task(save_task(trained.module), tiny_backbone.final_norm)
    assert loaded.config.training.val_score == s.val_score
    assert state_equal(loaded.state_dict(), trained.module.state_dict())


def test_same_seed_same_weights_other_seed_other_weights(
    digit_folder: Path, tiny_backbone: TorchBackbone
) -> None:
    data = load_data(digit_folder)
    options = TrainOptions(epochs=3, batch_size=8)

    def weights(seed: int) -> dict[str, torch.Tensor]:
        opts = TrainOptions(epochs=options.epochs, batch_size=options.batch_size, seed=seed)
        return train_task(data, "d", tiny_backbone, task=SMALL, options=opts, progress=False)[
            0
        ].state_dict()

    first = weights(0)
    assert state_equal(first, weights(0))
    assert not state_equal(first, weights(1))


def test_feature_cache_is_reused_across_runs(
    digit_folder: Path, tiny_backbone: TorchBackbone, tmp_path: Path
) -> None:
    data = load_data(digit_folder)
    first_backbone = CountingBackbone(tiny_backbone)
    first = train_task(
        data,
        "d",
        first_backbone,
        task=SMALL,
        options=TrainOptions(epochs=2),
        cache_dir=tmp_path,
        progress=False,
    )
    assert first_backbone.images == len(data)  # every image once
    assert first.summary.extra["backbone_forwards"] == first_backbone.calls

    again = CountingBackbone(tiny_backbone)
    second = train_task(
        data,
        "d",
        again,
        task=SMALL,
        options=TrainOptions(epochs=2),
        cache_dir=tmp_path,
        progress=False,
    )
    assert again.calls == 0
    assert second.summary.extra["backbone_forwards"] == 0
    assert state_equal(first.module.state_dict(), second.module.state_dict())


def test_cached_features_equal_fresh_ones_and_keys_separate(
    digit_folder: Path, tiny_backbone: TorchBackbone, tmp_path: Path
) -> None:
    data = load_data(digit_folder)
    spec = FeatureSpec((0, 1, 2), "cls")
    counting = CountingBackbone(tiny_backbone)
    fresh = FeatureCache(tmp_path, counting, spec, batch_size=7).features(data.images)
    assert counting.calls == math.ceil(len(data) / 7)
    reread = FeatureCache(tmp_path, counting, spec).features(list(reversed(data.images)))
    assert counting.calls == math.ceil(len(data) / 7)  # nothing recomputed
    torch.testing.assert_close(reread, fresh.flip(1), rtol=0, atol=0)
    # Another spec is another namespace: computed again.
    FeatureCache(tmp_path, counting, FeatureSpec((1, 2), "all")).features(data.images[:3])
    assert counting.calls == math.ceil(len(data) / 7) + 1


def test_cache_dir_holds_safetensors_chunks_a_manifest_and_meta_only(
    digit_folder: Path, tiny_backbone: TorchBackbone, tmp_path: Path
) -> None:
    data = load_data(digit_folder)
    FeatureCache(tmp_path, tiny_backbone, FeatureSpec((0, 1), "cls")).features(data.images)
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert "meta.json" in files
    assert "manifest.jsonl" in files
    chunks = [f for f in files if f not in ("meta.json", "manifest.jsonl")]
    assert chunks
    assert all(f.startswith("chunk-") and f.endswith(".safetensors") for f in chunks)


def test_csv_multilabel(tiny_backbone: TorchBackbone, tmp_path: Path) -> None:
    manifest = write_digit_csv(tmp_path, "multilabel")
    data = load_data(manifest, "multilabel")
    assert data.labels == ("even", "prime")
    # 0 -> even; 1 -> none; 2 -> even + prime; 3 -> prime (12 of each, in that order).
    expected = torch.tensor([[1, 0]] * 12 + [[0, 0]] * 12 + [[1, 1]] * 12 + [[0, 1]] * 12)
    torch.testing.assert_close(data.targets, expected.float())
    trained = train_task(data, "props", tiny_backbone, task=SMALL, options=FAST, progress=False)
    s = trained.summary
    assert trained.module.config.task == "multilabel"
    assert s.val_metric == "map"
    assert s.val_score is not None
    assert 0.0 <= s.val_score <= 1.0
    assert 0.0 <= s.extra["f1"] <= 1.0


def test_csv_regression_learns_the_scale(tiny_backbone: TorchBackbone, tmp_path: Path) -> None:
    manifest = write_digit_csv(tmp_path, "regression", per_class=16)
    data = load_data(manifest, "regression")
    assert data.labels == ("ink", "value")
    trained = train_task(
        data,
        "ink",
        tiny_backbone,
        task=SMALL,
        options=TrainOptions(epochs=60, lr=3e-3),
        progress=False,
    )
    s = trained.summary
    assert s.val_metric == "r2"
    assert s.val_score is not None
    assert s.val_score > 0.3
    # Outputs are in the targets' units (the standardisation was folded into the head).
    assert s.extra["mae"] < float(data.targets[:, 1].std())
    assert trained.module.config.labels == ("ink", "value")


def test_augmented_training_recomputes_train_features_each_epoch(
    digit_folder: Path, tiny_backbone: TorchBackbone, tmp_path: Path
) -> None:
    data = load_data(digit_folder)
    counting = CountingBackbone(tiny_backbone)
    epochs = 3
    trained = train_task(
        data,
        "aug",
        counting,
        task=SMALL,
        options=TrainOptions(epochs=epochs, batch_size=64),
        cache_dir=tmp_path,
        augment=AugmentOptions(),
        progress=False,
    )
    s = trained.summary
    # Validation images once through the cache, training images once per epoch.
    assert counting.images == s.val_size + epochs * s.train_size
    assert s.extra["augmented"] == 1.0
    assert s.val_score is not None


def test_crop_boxes_stay_inside_and_respect_the_area_range() -> None:
    options = AugmentOptions(scale=(0.3, 0.6))
    rng = np.random.default_rng(0)
    for width, height in [(64, 48), (32, 32), (200, 20)]:
        for _ in range(50):
            left, top, right, bottom = crop_box(width, height, options, rng)
            assert 0 <= left < right <= width
            assert 0 <= top < bottom <= height
    # Where a draw fits, the area lies in the range (up to rounding).
    areas = [
        (r - lft) * (b - t) / (64 * 64)
        for lft, t, r, b in (crop_box(64, 64, options, rng) for _ in range(50))
    ]
    assert min(areas) > 0.25
    assert max(areas) < 0.65


def test_layers_pooling_and_tuner_kind_reach_the_artifact(
    digit_folder: Path, tiny_backbone: TorchBackbone
) -> None:
    data = load_data(digit_folder)
    options = TaskOptions(tuner="res_prefix", layers=(2, 2), bottleneck=4, pooling="mean")
    trained = train_task(
        data, "p", tiny_backbone, task=options, options=TrainOptions(epochs=1), progress=False
    )
    b = trained.module.config.bypass
    assert (b.tuner, b.layers, b.bottleneck) == ("res_prefix", (2, 2), 4)
    assert trained.module.config.pooling == "mean"
    assert trained.module.feature_spec == FeatureSpec((1, 2), "all")


def test_embedding_task_reports_recall_at_1(
    digit_folder: Path, tiny_backbone: TorchBackbone
) -> None:
    data = load_data(digit_folder, "embedding")
    trained = train_task(
        data,
        "emb",
        tiny_backbone,
        task=TaskOptions(bottleneck=8, embedding_dim=16),
        options=FAST,
        progress=False,
    )
    assert trained.module.config.embedding_dim == 16
    assert trained.summary.val_metric == "recall@1"
    assert trained.summary.val_score is not None
    assert trained.summary.val_score >= 0.7


def test_early_stopping_stops_before_the_last_epoch(
    digit_folder: Path, tiny_backbone: TorchBackbone
) -> None:
    data = load_data(digit_folder)
    trained = train_task(
        data,
        "es",
        tiny_backbone,
        task=SMALL,
        options=TrainOptions(epochs=200, lr=3e-3, batch_size=16, patience=2),
        progress=False,
    )
    s = trained.summary
    assert s.epochs < 200
    assert s.epochs - s.extra["best_epoch"] == 2


def test_cancellation_stops_training(digit_folder: Path, tiny_backbone: TorchBackbone) -> None:
    data = load_data(digit_folder)
    with pytest.raises(TrainingCancelledError):
        train_task(
            data,
            "c",
            tiny_backbone,
            options=TrainOptions(epochs=5),
            progress=False,
            should_stop=lambda: True,
        )


def test_progress_callback_gets_messages(digit_folder: Path, tiny_backbone: TorchBackbone) -> None:
    messages: list[str] = []
    train_task(
        load_data(digit_folder),
        "m",
        tiny_backbone,
        task=SMALL,
        options=TrainOptions(epochs=4),
        progress=messages.append,
    )
    assert any(m.startswith("features: 48/48") for m in messages)
    assert any("train m: 4/4 epoch" in m for m in messages)
    assert messages[-1].startswith("m: val accuracy")


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    total, warmup = 100, 10
    factors = [lr_factor(step, total, warmup) for step in range(total)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert lr_factor(total, total, warmup) == pytest.approx(0.0)
