"""bench/isolation_cost.py runs end to end on the tiny preset and reports every case (no
timings are asserted)."""

from __future__ import annotations

import math

from bench.isolation_cost import run


def test_isolation_cost_reports_every_case() -> None:
    report = run("vit_test_tiny", tasks=3, rounds=1)
    cases = {"healthy", "quarantined", "no_breaker"}
    assert set(report["fanout_ms"]) == cases
    assert set(report["vs_healthy"]) == cases
    numbers = [*report["fanout_ms"].values(), report["backbone_forward_ms"]]
    assert all(math.isfinite(x) and x > 0 for x in numbers)
