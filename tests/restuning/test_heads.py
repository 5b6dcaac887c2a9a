"""Raw task outputs -> API answers, and the training loss of each task kind."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from restuning.heads import loss_fn, postprocess
from tests.fixtures.tuners import FakeBackboneRef, make_config

BACKBONE = FakeBackboneRef(dim=8, depth=2)


def test_classification_answers_softmax_top_k_descending() -> None:
    config = make_config("c", BACKBONE, labels=["a", "b", "c", "d"])
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
    answers = postprocess(config, logits, top_k=3)
    assert [x["label"] for x in answers[0]["labels"]] == ["b", "c", "a"]
    probs = logits.softmax(-1)
    assert answers[0]["labels"][0]["score"] == pytest.approx(float(probs[0, 1]))
    assert answers[1]["labels"][0] == {"label": "a", "score": pytest.approx(float(probs[1, 0]))}
    scores = [x["score"] for x in answers[1]["labels"]]
    assert scores == sorted(scores, reverse=True)
    # top_k beyond the number of classes gives every class, and they sum to 1.
    full = postprocess(config, logits, top_k=10)[0]["labels"]
    assert len(full) == 4
    assert math.fsum(x["score"] for x in full) == pytest.approx(1.0)


def test_multilabel_answers_independent_sigmoids() -> None:
    config = make_config("m", BACKBONE, task="multilabel", labels=["x", "y", "z"])
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    (answer,) = postprocess(config, logits, top_k=2)
    assert answer == {
        "labels": [
            {"label": "x", "score": pytest.approx(1 / (1 + math.exp(-2.0)))},
            {"label": "z", "score": pytest.approx(1 / (1 + math.exp(-0.5)))},
        ]
    }


def test_regression_answers_every_value_by_name() -> None:
    config = make_config("r", BACKBONE, task="regression", labels=["age", "size"])
    answers = postprocess(config, torch.tensor([[31.5, -2.0], [0.0, 1.0]]), top_k=1)
    assert answers == [
        {"values": {"age": 31.5, "size": -2.0}},
        {"values": {"age": 0.0, "size": 1.0}},
    ]


def test_embedding_answers_are_unit_vectors() -> None:
    config = make_config("e", BACKBONE, task="embedding", embedding_dim=3)
    (answer,) = postprocess(config, torch.tensor([[3.0, 0.0, 4.0]], dtype=torch.bfloat16), top_k=5)
    assert answer["embedding"] == pytest.approx([0.6, 0.0, 0.8])


def test_postprocess_checks_its_inputs() -> None:
    config = make_config("c", BACKBONE)
    with pytest.raises(ValueError, match="top_k"):
        postprocess(config, torch.zeros(1, 3), top_k=0)
    with pytest.raises(ValueError, match="expected"):
        postprocess(config, torch.zeros(1, 4), top_k=1)


def test_losses_per_task_kind() -> None:
    outputs = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -0.5]])
    cls = make_config("c", BACKBONE)
    targets = torch.tensor([0, 1])
    assert loss_fn(cls)(outputs, targets) == pytest.approx(
        float(-(outputs.log_softmax(-1)[[0, 1], [0, 1]]).mean())
    )
    ml = make_config("m", BACKBONE, task="multilabel", labels=["a", "b", "c"])
    hot = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    expected = -(hot * F.logsigmoid(outputs) + (1 - hot) * F.logsigmoid(-outputs)).mean()
    assert loss_fn(ml)(outputs, hot) == pytest.approx(float(expected))
    reg = make_config("r", BACKBONE, task="regression", labels=["a", "b", "c"])
    assert loss_fn(reg)(outputs, torch.zeros(2, 3)) == pytest.approx(float((outputs**2).mean()))
    emb = make_config("e", BACKBONE, task="embedding", embedding_dim=3)
    assert loss_fn(emb)(outputs, 5.0 * outputs) == pytest.approx(0.0, abs=1e-6)
    assert loss_fn(emb)(outputs, -outputs) == pytest.approx(2.0)
