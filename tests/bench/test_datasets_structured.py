"""The generated benchmark tasks: the same seed gives the same pixels and labels, another seed
other ones; classes are balanced; train and test are disjoint streams."""

from __future__ import annotations

import numpy as np
import pytest

from bench.datasets_structured import STRUCTURED, TASKS, generate, task_split


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_images_and_labels(task: str) -> None:
    first, again = generate(task, "train", 24, seed=3), generate(task, "train", 24, seed=3)
    assert [r.sha256 for r in first.images] == [r.sha256 for r in again.images]
    assert first.targets.tolist() == again.targets.tolist()
    for a, b in zip(first.images, again.images, strict=True):
        assert a.pixels is not None
        assert b.pixels is not None
        assert np.array_equal(a.pixels, b.pixels)

    other = generate(task, "train", 24, seed=4)
    assert {r.sha256 for r in other.images}.isdisjoint(r.sha256 for r in first.images)


def test_location_tasks_label_the_same_images() -> None:
    x, y = generate("loc-x", "test", 16, seed=0), generate("loc-y", "test", 16, seed=0)
    assert [r.sha256 for r in x.images] == [r.sha256 for r in y.images]
    assert x.targets.tolist() != y.targets.tolist()


@pytest.mark.parametrize("task", TASKS)
def test_train_and_test_differ_and_every_class_appears(task: str) -> None:
    split = task_split(task, 300, 60, seed=0)
    assert split.family == ("structured" if task in STRUCTURED else "natural")
    assert len(split.train) == 300
    assert len(split.test) == 60
    assert {r.sha256 for r in split.train.images}.isdisjoint(r.sha256 for r in split.test.images)
    counts = np.bincount(split.train.targets.numpy(), minlength=len(split.train.labels))
    assert len(counts) == len(split.train.labels)
    # Classes are drawn uniformly: none is missing or dominant in 300 draws.
    assert counts.min() > 0
    assert counts.max() < 3 * 300 / len(counts)


def test_count_images_hold_that_many_separate_shapes() -> None:
    from scipy import ndimage  # type: ignore[import-untyped]

    data = generate("count", "train", 12, seed=1)
    for ref, label in zip(data.images, data.targets.tolist(), strict=True):
        assert ref.pixels is not None
        pixels = ref.pixels.astype(np.float64)
        background = np.median(pixels.reshape(-1, 3), axis=0)
        shapes = np.linalg.norm(pixels - background, axis=-1) > 60  # noise std is 10
        _, found = ndimage.label(ndimage.binary_opening(shapes))
        assert found == label + 1


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        generate("nope", "train", 4, seed=0)
    with pytest.raises(ValueError, match="n must lie"):
        generate("count", "train", 0, seed=0)
