"""``python -m bench --smoke`` runs the suite's machinery end to end on the tiny backbone and
writes every artifact the quick profile writes: per-section JSON, REPORT.md and the plots.
No timing is asserted: only that the numbers exist and are sane in kind."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.suite import SECTIONS, select

SMOKE = [s.name for s in select("smoke", None)]


def _finite_positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_smoke_suite_writes_json_report_and_plots(tmp_path: Path) -> None:
    for extra in ("transformers", "peft", "matplotlib"):  # the `bench` extra
        pytest.importorskip(extra)
    assert main(["--smoke", "--out", str(tmp_path)]) == 0

    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["profile"] == "smoke"
    assert suite["ran"] == SMOKE
    assert suite["machine"]["cpu_count"] >= 1
    for name in SMOKE:
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["suite"]["status"] == "ok", result.get("error")

    fanout = json.loads((tmp_path / "peft_peer.json").read_text())
    (entry,) = fanout["archs"]
    assert [r["K"] for r in entry["rows"]] == [1, 2]
    for row in entry["rows"]:
        for method in ("peft_switch", "ours_loop", "ours_stacked", "ours_cls"):
            assert _finite_positive(row[method]["x_plain"]), (method, row)
        assert _finite_positive(row["ratio_vs_peft_switch"])
        assert row["ideal_speedup"] <= row["K"] + 1e-9

    registry = json.loads((tmp_path / "registry_scale.json").read_text())
    assert registry["file"]["registered"] == registry["tuners"] == 20
    assert registry["file"]["loaded"] == 20
    assert registry["file"]["register_to_servable"]["n"] == 20

    cache = json.loads((tmp_path / "feature_cache.json").read_text())
    assert cache["unexpected_hit_or_miss"] == 0

    report = (tmp_path / "REPORT.md").read_text()
    assert "## 1. Fan-out" in report
    assert "## 4. Registry at scale" in report
    assert "Machine:" in report
    plot = tmp_path / "fanout_vit_test_tiny.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({plot.name})" in report


def test_profiles_cover_the_issue_sections() -> None:
    quick = {s.name for s in select("quick", None)}
    assert {"peft_peer", "server_throughput", "runtimes", "registry_scale", "feature_cache"} <= (
        quick
    )
    assert quick <= {s.name for s in select("full", None)}
    assert [s.name for s in select("quick", ["feature_cache", "peft_peer"])] == [
        "peft_peer",
        "feature_cache",
    ]
    with pytest.raises(ValueError, match="unknown sections"):
        select("quick", ["nope"])
    assert len({s.name for s in SECTIONS}) == len(SECTIONS)


def test_a_failing_or_absent_section_is_reported_not_fatal(tmp_path: Path) -> None:
    from bench.report import render
    from bench.suite import Section, run_section

    absent = run_section(Section("not_a_bench_module", "absent", frozenset()), "smoke")
    assert absent["suite"]["status"] == "skipped"
    (tmp_path / "runtimes.json").write_text(json.dumps(absent))
    broken = run_section(Section("report", "has no run()", frozenset()), "smoke")
    assert broken["suite"]["status"] == "error"
    assert "run" in broken["error"]
    (tmp_path / "peft_peer.json").write_text(json.dumps(broken))
    text = render(tmp_path).read_text()
    assert "_failed: AttributeError" in text
    assert "_not measured: bench.not_a_bench_module is not in this tree_" in text
