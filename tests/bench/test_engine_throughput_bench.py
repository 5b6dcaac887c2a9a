"""bench/engine_throughput.py runs end to end and reports every row (tiny preset; no timings
are asserted)."""

from __future__ import annotations

import math

import pytest

from bench.engine_throughput import TASKS, run


def test_engine_throughput_reports_every_row() -> None:
    report = run(quick=True, arch="vit_test_tiny")
    assert report["arch"] == "vit_test_tiny"
    assert [row["tasks_per_image"] for row in report["rows"]] == list(TASKS)
    for row in report["rows"]:
        numbers = [
            row["images_per_s"],
            row["answers_per_s"],
            row["speedup_vs_separate_models"],
            row["cached"]["images_per_s"],
        ]
        assert all(math.isfinite(x) and x > 0 for x in numbers)
        expected = row["images_per_s"] * row["tasks_per_image"]
        assert row["answers_per_s"] == pytest.approx(expected, rel=0.01, abs=row["tasks_per_image"])
