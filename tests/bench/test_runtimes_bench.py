"""The runtimes benchmark runs end to end (quick mode) and reports what it promises."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import runtimes
from restuning.presets import get_preset
from server.engine.runtime_onnx import CachedExports


def test_flops_of_vit_b16_at_224() -> None:
    config = get_preset("vit_base_patch16_224").vit
    full = runtimes.flops_per_image(config, 224, 224, cls_capture=False)
    assert full / 1e9 == pytest.approx(35.1, rel=0.01)  # the well-known ~17.6 GMACs
    cls = runtimes.flops_per_image(config, 224, 224, cls_capture=True)
    # The last block runs one query instead of 197: saves most of 1/12 of the blocks.
    assert 0.90 * full < cls < 0.95 * full


def test_peak_fraction() -> None:
    # 8 images of 35.1 GFLOP in 1 s on a 280.8 GFLOP/s machine: exactly the peak.
    assert runtimes.peak_fraction(8, 35.1, 1000.0, 280.8) == pytest.approx(1.0)
    assert runtimes.peak_fraction(1, 35.1, 500.0, 280.8) == pytest.approx(0.25)


def test_quick_run(tiny_onnx: CachedExports, tiny_onnx_int8: CachedExports, tmp_path: Path) -> None:
    cache = tmp_path / "onnx"
    cache.mkdir()
    for path in [*tiny_onnx.paths.values(), *tiny_onnx_int8.paths.values()]:
        shutil.copy2(path, cache / path.name)  # the tiny exports: no export in this test
    result = runtimes.run(quick=True, cache_dir=cache)
    peak = result["matmul_peak_gflops"]
    for when in ("before", "after"):
        assert set(peak[when]) == {"1_threads", "2_threads"}
        assert min(peak[when].values()) > 0
    rows = result["throughput"]
    assert {(r["batch"], r["runtime"]) for r in rows} == {
        (b, name) for b in runtimes.BATCHES for name in runtimes.RUNTIMES
    }
    for row in rows:
        assert row["img_per_s"] > 0
        assert row["matmul_peak_gflops"] > 0
        # A median of per-round ratios: near the ratio of the medians, not equal to it.
        expected = row["img_per_s"] * row["gflop_per_image"] / row["matmul_peak_gflops"]
        assert expected / 10 <= row["fraction_of_matmul_peak"] <= expected * 10
    (parity,) = result["parity"]
    assert parity["onnx_fp32"]["rel"] <= 1e-4
    assert parity["onnx_int8"]["mean_cosine"] >= 0.99
    assert result["int8_accuracy"]["mode"] == "photo_features"
    assert 0 <= result["int8_accuracy"]["top1_agreement"] <= 1
    assert isinstance(result["int8_default"], bool)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        p.name for p in [*tiny_onnx.paths.values(), *tiny_onnx_int8.paths.values()]
    ), "the quick run exported again"
