"""The demo tuners' pipeline on the tiny random backbone with few images (the real-backbone run
is ``python -m restuning.demo``, for the README's numbers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from restuning.artifact_io import load_task
from restuning.backbone import TorchBackbone
from restuning.demo import demo_tasks, train_demo_artifacts
from restuning.train.progress import TrainingCancelledError
from tests.fixtures.training_data import (
    CountingBackbone,
    one_torch_thread,  # noqa: F401  (fixture used by pytestmark)
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_tasks_are_distinct_and_cover_several_kinds() -> None:
    tasks = demo_tasks()
    assert len(tasks) >= 3
    assert len({t.name for t in tasks}) == len(tasks)
    assert {"digit", "parity", "face"} <= {t.name for t in tasks}


@pytest.mark.slow
def test_demo_artifacts_train_load_and_reuse_features(
    tiny_backbone: TorchBackbone, tmp_path: Path
) -> None:
    counting = CountingBackbone(tiny_backbone)
    messages: list[str] = []
    artifacts = train_demo_artifacts(counting, tmp_path, messages.append, per_class=4, epochs=2)
    assert [name for name, _ in artifacts] == [t.name for t in demo_tasks()]
    # digit, parity and digit-props share their images: 40 digits + 8 faces + 12 textures.
    assert counting.images == 40 + 8 + 12
    for name, data in artifacts:
        module = load_task(data, tiny_backbone.final_norm, expect_fingerprint=counting.fingerprint)
        training = module.config.training
        assert module.config.name == name
        assert training.epochs == 2
        assert training.val_score is not None
        assert training.data.startswith("demo:")
        assert module.config.description
    assert any(m.startswith("digit: val accuracy") for m in messages)

    # A second start reads every feature from the cache.
    again = CountingBackbone(tiny_backbone)
    rerun = train_demo_artifacts(again, tmp_path, False, per_class=4, epochs=2)
    assert again.calls == 0
    assert [n for n, _ in rerun] == [n for n, _ in artifacts]


def test_demo_training_can_be_cancelled(tiny_backbone: TorchBackbone) -> None:
    with pytest.raises(TrainingCancelledError):
        train_demo_artifacts(tiny_backbone, None, False, per_class=2, should_stop=lambda: True)
