"""The store latency benchmark runs end to end (quick mode) and reports what it promises."""

from __future__ import annotations

import pytest

from bench import store_latency


@pytest.mark.redis
def test_quick_run_reports_both_stores(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    results = store_latency.run(quick=True)
    assert 4_500_000 < results["artifact_bytes"] < 5_500_000
    assert results["validate_ms"] > 0
    for store in ("file", "redis"):
        assert results[store]["put_ms"] > 0
        assert results[store]["get_ms"] > 0
        assert results[store]["repeats"] == 5
