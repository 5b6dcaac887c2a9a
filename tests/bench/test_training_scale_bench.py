"""bench/training_scale.py: the generated set is deterministic, a child's peak RSS is its own,
and the smoke profile measures both poolings at both sizes (slow: real `restune train` runs)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from bench.training_scale import QUADRANTS, generate_images, growth, run, run_child


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_generated_images_are_the_same_for_a_seed(tmp_path: Path) -> None:
    first = generate_images(tmp_path / "a", 8)
    assert sorted(p.name for p in first.iterdir()) == sorted(QUADRANTS)
    assert len(list(first.rglob("*.png"))) == 8
    assert _digest(first) == _digest(generate_images(tmp_path / "b", 8))
    assert _digest(first) != _digest(generate_images(tmp_path / "c", 8, seed=1))


def test_child_peak_rss_is_that_childs_own(tmp_path: Path) -> None:
    # Big enough to stand out, and the parent's RSS (pytest with torch loaded) is not counted.
    ballast = bytearray(200 * 1024 * 1024)
    ballast[:: 1 << 12] = b"x" * len(ballast[:: 1 << 12])
    env = dict(os.environ)
    big = run_child(
        ["-c", "import time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); "
         "time.sleep(0.3)"],
        env, tmp_path, tmp_path / "big.log",
    )  # fmt: skip
    small = run_child(["-c", "import time; time.sleep(0.3)"], env, tmp_path, tmp_path / "s.log")
    assert big["peak_rss_mb"] > 300 > small["peak_rss_mb"]
    assert small["ru_maxrss_mb"] >= 200  # what wait4 alone would have said
    assert big["wall_s"] >= 0.3
    del ballast
    with pytest.raises(RuntimeError, match="exit 3"):
        run_child(["-c", "import sys; sys.exit(3)"], env, tmp_path, tmp_path / "fail.log")


def test_growth_is_large_size_over_small() -> None:
    runs = [
        {"pooling": p, "images": n, "phase": ph, "peak_rss_mb": rss}
        for p, n, ph, rss in [
            ("cls", 10, "cold", 400.0), ("cls", 40, "cold", 400.0),
            ("cls", 10, "warm", 300.0), ("cls", 40, "warm", 330.0),
            ("mean", 10, "cold", 500.0), ("mean", 40, "cold", 1000.0),
            ("mean", 10, "warm", 500.0), ("mean", 40, "warm", 500.0),
        ]
    ]  # fmt: skip
    assert growth(runs, (10, 40)) == {
        "cls": {"cold": 1.0, "warm": 1.1},
        "mean": {"cold": 2.0, "warm": 1.0},
    }


@pytest.mark.slow
def test_smoke_profile_measures_both_poolings_at_both_sizes(tmp_path: Path) -> None:
    assert sys.platform.startswith("linux")  # ru_maxrss in KiB, os.wait4
    result = run(smoke=True, work=tmp_path)
    runs = result["runs"]
    assert {(r["pooling"], r["images"], r["phase"]) for r in runs} == {
        (p, n, ph) for p in ("cls", "mean") for n in result["sizes"] for ph in ("cold", "warm")
    }
    for r in runs:
        assert r["peak_rss_mb"] > 0
        assert r["cache_bytes_per_image"] > 0
    per_image = {r["pooling"]: r["cache_bytes_per_image"] for r in runs}
    assert per_image["mean"] > 10 * per_image["cls"]  # 17 tokens per layer vs 1
    for phases in result["rss_growth"].values():
        assert all(ratio < 1.25 for ratio in phases.values())
