"""bench/fanout_cost.py runs end to end and reports every cell (tiny preset; no timings
are asserted)."""

from __future__ import annotations

import math

from bench.fanout_cost import VTAB_1K_CLASSES, run, run_heads


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
    _check_heads(report["fanout_heads"])


def test_fanout_heads_part_alone_reports_every_cell() -> None:
    report = run_heads(quick=True, arch="vit_test_tiny")
    _check_heads(report["fanout_heads"])


def _check_heads(rows: list[dict[str, object]]) -> None:
    assert [r["batch"] for r in rows] == [1, 8]
    for r in rows:
        assert r["K"] == len(VTAB_1K_CLASSES) == 19
        assert r["per_shape_groups"] == len(set(VTAB_1K_CLASSES.values())) == 15
        assert r["vtab_chosen_layout"] == "segmented"
        for key in ("alike_ms", "vtab_per_shape_groups_ms", "vtab_padded_ms", "vtab_segmented_ms"):
            x = r[key]
            assert isinstance(x, float)
            assert math.isfinite(x)
            assert x > 0
