"""bench/gpu.py runs end to end on the CPU (tiny preset, no graphs, no server): the script the
next GPU session runs is exercised here, and its result document has every section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import gpu


def test_gpu_bench_cpu_smoke_writes_every_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gpu-cpu-smoke.json"
    gpu.main(["--cpu-smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["arch"] == gpu.SMOKE.arch
    assert result["device"] == "cpu"
    assert set(result["backbone"]) == {str(b) for b in gpu.SMOKE.backbone_batches}
    cells = {(r["tasks"], r["batch"]) for r in result["engine"]}
    assert cells == {(k, b) for k in gpu.SMOKE.engine_tasks for b in gpu.SMOKE.engine_batches}
    assert all(r["x_plain_forward"] > 0 for r in result["engine"])
    assert all(r["impls"] == ["bmm"] for r in result["engine"])  # no kernel off CUDA
    assert result["engine_alone"]["images_per_s"] > 0
    assert "server" not in result
    assert result["errors"] == {}
    assert result["decode"]["pil_images_per_s"] > 0
    assert "gpu_images_per_s" not in result["decode"]
    # The same float32 path on both sides: the parity figures are exact here.
    assert result["parity"]["max_abs_probability_diff_vs_cpu_fp32"] <= 1e-5
    assert result["parity"]["top1_agreement_vs_cpu_fp32"] == 1.0
    assert result["parity"]["max_abs_probability_diff_alone_vs_batch"] <= 1e-5
    printed = capsys.readouterr().out
    assert "x plain graphed forward" in printed
    assert str(out) in printed


def test_a_failing_section_loses_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The document is on disk after every section; a section that raises is recorded and the
    ones after it still run."""
    out = tmp_path / "gpu.json"
    on_disk: dict[str, list[str]] = {}

    def broken_engine(*args: object) -> None:
        on_disk["engine"] = sorted(json.loads(out.read_text()))
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    real_parity = gpu.parity_section

    def parity(*args: Any) -> dict[str, Any]:
        on_disk["parity"] = sorted(json.loads(out.read_text()))
        return real_parity(*args)

    monkeypatch.setattr(gpu, "engine_section", broken_engine)
    monkeypatch.setattr(gpu, "parity_section", parity)
    gpu.main(["--cpu-smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    assert "backbone" in on_disk["engine"]  # written before the engine section ran
    assert {"engine_alone", "decode"} <= set(on_disk["parity"])
    assert "engine" not in result
    assert "stream is capturing" in result["errors"]["engine"]
    assert set(result["errors"]) == {"engine"}
    assert {"backbone", "engine_alone", "decode", "parity"} <= set(result)
    assert "FAILED engine" in capsys.readouterr().out


def test_gpu_bench_refuses_to_run_without_cuda_unless_smoke() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the full run would start")
    with pytest.raises(SystemExit):
        gpu.main([])


def test_device_slug_names_the_card() -> None:
    assert gpu.device_slug(torch.device("cpu")) == "cpu-smoke"
