"""bench/server_throughput.py runs end to end on the tiny preset: a real server, a separate
load-generator process, every row reported without errors (no timings are asserted)."""

from __future__ import annotations

import math

import pytest

from bench.server_throughput import CONCURRENCY, IMAGES_PER_REQUEST, TASKS, run


@pytest.mark.slow
def test_server_throughput_reports_every_row() -> None:
    report = run(quick=True, arch="vit_test_tiny")
    assert report["arch"] == "vit_test_tiny"
    assert [row["tasks_per_image"] for row in report["rows"]] == list(TASKS)
    for row in report["rows"]:
        assert row["errors"] == {}
        assert row["requests"] == CONCURRENCY * report["measured_requests_per_worker"]
        assert row["images"] == row["requests"] * IMAGES_PER_REQUEST
        numbers = [row["images_per_s"], row["p50_ms"], row["p99_ms"], row["answers_per_s"]]
        assert all(math.isfinite(x) and x > 0 for x in numbers)
        assert row["p50_ms"] <= row["p99_ms"]
        assert row["server"]["tasks_per_forward"] >= row["tasks_per_image"]
        assert row["server"]["batches"] >= 1
        assert 0 < row["server"]["engine_busy"] <= 1.5
        assert row["engine_images_per_s"] > 0
