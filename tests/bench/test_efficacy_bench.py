"""bench/efficacy.py end to end on the tiny test backbone (no accuracy is asserted: its
weights are random), and the paper-form Res-Prefix against the backbone's own attention."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench.efficacy import METHODS, PROFILES, FrozenQueryPrefix, run
from bench.efficacy_report import TITLE, selection_margins
from bench.report import render
from restuning.backbone import load_backbone
from restuning.vit import Block


@pytest.mark.slow
def test_smoke_profile_reports_every_task_and_method(tmp_path: Path) -> None:
    report = run(smoke=True)
    profile = PROFILES["smoke"]
    names = [t["task"] for t in report["tasks"]]
    assert names == [*profile.structured, *profile.demo]
    for task in report["tasks"]:
        expected = {m.name for m in METHODS if m.kind != "inner"}
        if task["task"] in (profile.inner_tasks or ()):
            expected.add("inner-adapter")
        assert set(task["methods"]) == expected
        for scores in task["methods"].values():
            assert 0.0 <= scores["test_accuracy"]["mean"] <= 1.0
            assert scores["train_seconds"] >= 0.0
        best = task["methods"][task["best_bypass"]]["test_accuracy"]["mean"]
        probe = task["methods"][task["best_probe"]]["test_accuracy"]["mean"]
        assert math.isclose(task["bypass_minus_probe"], best - probe)
    summary = report["summary"]
    assert summary["tasks"] == len(names)
    assert 0 <= summary["bypass_wins"] <= summary["tasks"]
    costs = report["serving"]["x_plain"]
    assert set(costs) == {m.name for m in METHODS}
    assert all(math.isfinite(x) and x > 0 for x in costs.values())

    (tmp_path / "efficacy.json").write_text(json.dumps(report))
    rendered = render(tmp_path).read_text()
    assert TITLE in rendered
    assert f"on **{summary['bypass_wins']} of {summary['tasks']} tasks**" in rendered
    for name in names:
        assert f"| {name} (" in rendered
    margins = selection_margins(report)
    assert len(margins["val_picked"]) == len(names)
    assert len(margins["default_vs_probe_cls"]) == len(names)
    assert f"on **{margins['val_picked_wins']} of {len(names)}** tasks" in rendered


def test_frozen_query_prefix_is_the_blocks_attention_over_the_prefix_tokens() -> None:
    """With the prefix set to the block's own keys and values of a sequence, the tuner's
    branch equals the block's attention output for that sequence."""
    backbone = load_backbone("vit_test_tiny", "random:1")
    block = backbone.model.blocks[0]
    assert isinstance(block, Block)
    tuner = FrozenQueryPrefix(block, prefix_len=5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 5, backbone.dim, generator=torch.Generator().manual_seed(1))  # (1, N, D)
    dim = backbone.dim
    with torch.no_grad():
        kv = torch.nn.functional.linear(
            block.norm1(x), block.attn.qkv.weight[dim:], block.attn.qkv.bias[dim:]
        )[0]  # (N, 2D)
        tuner.k.copy_(kv[:, :dim])
        tuner.v.copy_(kv[:, dim:])
        expected = block.attn(block.norm1(x))  # (1, N, D)
        torch.testing.assert_close(tuner(x) - x, expected, rtol=1e-5, atol=1e-5)
    assert {n for n, p in tuner.named_parameters()} == {"k", "v"}
