"""bench/ingest.py runs end to end in its smoke profile and reports what it promises (no
timing or memory figure is asserted: only that each exists and the outcomes are right)."""

from __future__ import annotations

import math

import pytest

from bench.ingest import run
from bench.suite import select


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value >= 0


def test_ingest_is_in_every_profile() -> None:
    for profile in ("smoke", "quick", "full"):
        assert "ingest" in {s.name for s in select(profile, None)}  # type: ignore[arg-type]


@pytest.mark.slow
def test_smoke_run_reports_cpu_strips_and_feature_effect() -> None:
    report = run(smoke=True)
    assert set(report["cpu"]) == {"0.3MP", "2MP"}
    for row in report["cpu"].values():
        assert set(row["cpu_ms_per_image"]) == {"whole_image", "exact", "fast"}
        assert all(_finite(ms) and ms > 0 for ms in row["cpu_ms_per_image"].values())
    assert all(_finite(ms) for ms in report["breakdown"]["cpu_ms"].values())
    outcomes = [(s["size"], s["pipeline"], s["outcome"]) for s in report["strips"]]
    assert outcomes[0] == ("100000x1", "fast", "image_aspect_ratio")
    assert outcomes[1:3] == [("100000x1", "exact", "ok"), ("100000x1", "fast", "ok")]
    assert outcomes[3][2] == "image_aspect_ratio"
    assert all(s["bytes"] < 1000 and _finite(s["peak_rss_growth_mib"]) for s in report["strips"])
    for row in report["features"]["by_size"].values():
        assert -1.0 <= row["cls_cosine_min"] <= row["cls_cosine_mean"] <= 1.0 + 1e-6
    demo = report["demo_inputs"]
    assert demo["identical_inputs"] == demo["images"] > 0
