"""bench/batch_fill.py runs end to end and reports every field (short runs; no timings are
asserted)."""

from __future__ import annotations

import asyncio
import math

from bench.batch_fill import closed_loop, no_load


def test_batch_fill_reports_a_closed_loop_and_no_load() -> None:
    loop = asyncio.run(closed_loop(4, 4, 5.0, 0.5, 0.3, decode_ms=0.5))
    assert 1.0 <= loop["mean_batch"] <= 4.0
    assert loop["requests_per_s"] > 0
    assert loop["serial_decode_ms"] == 0.5
    idle = asyncio.run(no_load(5.0, 3))
    assert math.isfinite(idle["median_added_ms"])
