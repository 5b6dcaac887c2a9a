"""bench/fanout_cost.py runs end to end and reports every cell (tiny preset; no timings
are asserted)."""

from __future__ import annotations

import math

from bench.fanout_cost import run


def test_fanout_cost_reports_every_cell() -> None:
    report = run(quick=True, arch="vit_test_tiny")
    assert report["arch"] == "vit_test_tiny"
    assert set(report["backbone"]) == {"1", "8"}
    cells = {(r["batch"], r["K"]) for r in report["fanout_cls"]}
    assert cells == {(1, 1), (1, 4), (8, 1), (8, 4)}
    assert [r["K"] for r in report["fanout_all_tokens"]] == [1, 4]
    numbers = [
        report["one_task"]["all_tokens_x"],
        report["one_task"]["cls_only_x"],
        *(r["stacked_x"] for r in report["fanout_cls"]),
        *(r["loop_x"] for r in report["fanout_cls"]),
        *(r["stacked_x"] for r in report["fanout_all_tokens"]),
    ]
    assert all(math.isfinite(x) and x > 0 for x in numbers)
