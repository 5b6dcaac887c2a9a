"""Training data (folders, CSV manifests, demo sets, splits) and validation metrics; no backbone."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from restuning.train.data import DataError, ImageRef, load_csv, load_data, split_indices
from restuning.train.demo_data import DEMO_SETS, TEXTURE_VAL_TOP, load_demo
from restuning.train.metrics import (
    accuracy,
    average_precision,
    evaluate,
    mean_average_precision,
    micro_f1,
    r2_score,
    recall_at_1,
)
from tests.fixtures.training_data import digit_image, write_digit_csv, write_digit_folder


def test_image_refs_hash_content_not_names(tmp_path: Path) -> None:
    img, _ = digit_image(0)
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "b.png")
    digit_image(1)[0].save(tmp_path / "c.png")
    a, b, c = (ImageRef.from_file(tmp_path / n) for n in ("a.png", "b.png", "c.png"))
    assert a.sha256 == b.sha256 != c.sha256
    pixels = np.asarray(img)
    assert ImageRef.from_array(pixels).sha256 == ImageRef.from_array(pixels.copy()).sha256
    assert ImageRef.from_array(pixels).sha256 != ImageRef.from_array(pixels.T.copy()).sha256
    assert a.open().mode == "RGB"
    assert a.open().size == img.size


def test_folder_needs_two_classes(tmp_path: Path) -> None:
    write_digit_folder(tmp_path, (5,), per_class=3)
    with pytest.raises(DataError, match="at least two class folders"):
        load_data(tmp_path)
    with pytest.raises(DataError, match="use a CSV"):
        load_data(write_digit_folder(tmp_path / "two", (1, 2), per_class=2), "regression")


def test_csv_errors_name_the_line(tmp_path: Path) -> None:
    manifest = write_digit_csv(tmp_path, "regression", digits=(1,), per_class=2)
    lines = manifest.read_text().splitlines()
    (tmp_path / "missing.csv").write_text(lines[0] + "\n" + lines[1] + "\nimg/none.png,1,2\n")
    with pytest.raises(DataError, match=r"missing.csv:3: image 'img/none.png' not found"):
        load_csv(tmp_path / "missing.csv", "regression")
    (tmp_path / "nan.csv").write_text(lines[0] + "\n" + lines[1].rsplit(",", 1)[0] + ",x\n")
    with pytest.raises(DataError, match=r"nan.csv:2: values must be numbers"):
        load_csv(tmp_path / "nan.csv", "regression")
    (tmp_path / "noheader.csv").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DataError, match="needs a header"):
        load_csv(tmp_path / "noheader.csv", "regression")


def test_csv_classification_with_header_and_comments(tmp_path: Path) -> None:
    for i in range(4):
        digit_image(i)[0].save(tmp_path / f"{i}.png")
    (tmp_path / "c.csv").write_text(
        "path,label\n# a comment\n0.png,cat\n1.png,dog\n\n2.png,cat\n3.png,bird\n"
    )
    data = load_csv(tmp_path / "c.csv")
    assert data.labels == ("bird", "cat", "dog")
    assert data.targets.tolist() == [1, 2, 1, 0]


def test_split_is_deterministic_stratified_and_disjoint(tmp_path: Path) -> None:
    data = load_data(write_digit_folder(tmp_path, (0, 1, 2), per_class=10))
    train, val = split_indices(data, 0.3, seed=5)
    again_train, again_val = split_indices(data, 0.3, seed=5)
    assert np.array_equal(train, again_train)
    assert np.array_equal(val, again_val)
    assert not set(train) & set(val)
    assert len(train) + len(val) == len(data)
    assert np.bincount(data.targets[val].numpy()).tolist() == [3, 3, 3]
    other_train, _ = split_indices(data, 0.3, seed=6)
    assert not np.array_equal(train, other_train)
    # A class with one image keeps it for training.
    tiny = data.subset([0, 10, 11, 20, 21])
    tiny_train, tiny_val = split_indices(tiny, 0.5, seed=0)
    assert 0 in tiny_train
    assert len(tiny_val) == 2
    assert split_indices(data, 0.0, seed=0)[1].size == 0


@pytest.mark.parametrize("name", sorted(DEMO_SETS))
def test_demo_sets_build_offline(name: str) -> None:
    data = load_demo(name, per_class=3)
    assert len(data.images) == len(data.targets) > 0
    assert len({ref.sha256 for ref in data.images}) == len(data.images)
    img = data.images[0].open()
    assert img.mode == "RGB"
    assert min(img.size) >= 8


def test_digit_sets_share_images_and_labels_agree() -> None:
    digits, parity, props = (load_demo(n, per_class=5) for n in ("digits", "parity", "digit-props"))
    assert [r.sha256 for r in digits.images] == [r.sha256 for r in parity.images]
    assert [r.sha256 for r in digits.images] == [r.sha256 for r in props.images]
    assert (parity.targets == digits.targets % 2).all()
    even = props.labels.index("even")
    assert (props.targets[:, even] == (digits.targets % 2 == 0).float()).all()
    assert props.task == "multilabel"
    assert len(load_demo("digits").images) == 1797


def test_texture_validation_crops_come_from_their_own_region() -> None:
    data = load_demo("textures", per_class=8)
    assert data.val_mask is not None
    train, val = split_indices(data, 0.5, seed=0)
    assert len(val) == 3 * 2  # a quarter of each class
    # Validation crops were cut below TEXTURE_VAL_TOP; they are at most 512 - 320 rows tall.
    assert all(data.images[i].open().height <= 512 - TEXTURE_VAL_TOP for i in val)
    assert len(train) == 3 * 6


def test_unknown_demo_set() -> None:
    with pytest.raises(DataError, match="unknown demo set 'nope'"):
        load_data("demo:nope")
    with pytest.raises(DataError, match="is a classification set, not regression"):
        load_data("demo:digits", "regression")
    assert load_data("demo:faces", "embedding").task == "embedding"


def test_classification_and_multilabel_metrics() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 2.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75
    # Positives at ranks 1 and 3: AP = (1/1 + 2/3) / 2.
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    assert average_precision(scores, torch.tensor([True, False, True, False])) == pytest.approx(
        (1 + 2 / 3) / 2
    )
    assert math.isnan(average_precision(scores, torch.zeros(4, dtype=torch.bool)))
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    # The second label has no positive: skipped in the mean.
    assert mean_average_precision(logits, targets) == pytest.approx(1.0)
    assert micro_f1(torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 1.0]])) == pytest.approx(2 / 3)
    assert set(evaluate("multilabel", logits, targets)) == {"map", "f1"}


def test_regression_and_embedding_metrics() -> None:
    targets = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    assert r2_score(targets, targets) == pytest.approx(1.0)
    assert r2_score(torch.full_like(targets, 2.5), targets) == pytest.approx(0.0)
    assert evaluate("regression", targets + 1, targets)["mae"] == pytest.approx(1.0)
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert recall_at_1(emb, torch.tensor([0, 0, 1, 1])) == 1.0
    assert recall_at_1(emb, torch.tensor([0, 1, 0, 1])) == 0.0
