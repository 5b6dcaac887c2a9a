"""Training at dataset scale: peak RSS, time and feature-cache bytes of ``restune train``.

Each run is a real ``restune train`` child process (``python -m clients.cli train``) on a
generated image set; its peak RSS is the child's own ``VmHWM`` (``/proc``, polled), so the
parent's memory never mixes in (see :func:`run_child`). Per pooling (``cls``: CLS rows of every
layer; ``mean``: every token of every layer) and per dataset size, two runs share one cache
directory:

- ``cold``: empty cache: every image through the backbone, features written in chunks, then
  training reading them back a batch at a time;
- ``warm``: the same command again: every feature read from the cache, training only.

What to read: peak RSS stays flat as the image count grows (the features stream from disk),
and the cache bytes per image (float16, image-major chunks) for each pooling.

The generated set: ``SIZE`` x ``SIZE`` RGB PNGs, a coloured disc on a noisy background; the
class is the disc's quadrant (a spatial task, where all-token pooling is the point).

Run: ``python -m bench.training_scale [--quick | --smoke] [--code-root DIR]`` ->
``bench/results/training_scale.json``; ``--code-root`` runs another checkout's ``restune
train`` (the same measurement of an older version).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench import timing
from bench.processes import REPO_ROOT

RESULTS = Path(__file__).resolve().parent / "results" / "training_scale.json"
IMAGE_SIZE = 96
"""Pixels of a generated image (the backbone's preprocessing resizes it)."""
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
SEED = 0
POLL_S = 0.05
"""How often a child's VmHWM is read."""
POOLINGS = ("cls", "mean")
PHASES = ("cold", "warm")


@dataclass(frozen=True)
class Profile:
    """What one profile measures."""

    sizes: tuple[int, int]
    """Two dataset sizes: RSS should not grow from the first to the second."""
    backbone: tuple[str, str] | None
    """(arch, weights) passed to ``restune train``; None: the embedded default."""
    epochs: int
    label: str
    train_args: tuple[str, ...] = ()
    """More ``restune train`` options (``--layers 1-2``: a bypass over the first blocks, whose
    extraction stops after block 2)."""


PROFILES = {
    "smoke": Profile((16, 48), ("vit_test_tiny", "random:0"), 1, "vit_test_tiny (random)"),
    "quick": Profile(
        (64, 320), ("vit_tiny_patch16_224", "random:0"), 2, "vit_tiny_patch16_224 (random)"
    ),
    "full": Profile((400, 4000), None, 2, "embedded DINOv2 ViT-S/14"),
}


def generate_images(root: Path, count: int, seed: int = SEED) -> Path:
    """``count`` PNGs in ``root/<quadrant>/<i>.png``; the same files for the same seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    half = IMAGE_SIZE // 2
    for i in range(count):
        quadrant = i % len(QUADRANTS)
        pixels = rng.integers(0, 90, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.int64)
        radius = int(rng.integers(IMAGE_SIZE // 10, IMAGE_SIZE // 5))
        cx = int(rng.integers(radius, half - radius)) + (half if quadrant % 2 else 0)
        cy = int(rng.integers(radius, half - radius)) + (half if quadrant >= 2 else 0)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        pixels[disc] = rng.integers(120, 256, size=3)
        folder = root / QUADRANTS[quadrant]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:05d}.png")
    return root


def _high_water_kib(pid: int) -> int:
    """VmHWM of a running process (0 once it has exited or when unreadable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_child(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> dict[str, float]:
    """Run ``python ARGS``; its wall time, CPU time and peak RSS.

    Peak RSS is the child's own ``VmHWM``, polled every :data:`POLL_S` while it runs: the
    kernel's ``ru_maxrss`` for a child (``os.wait4``) is at least the parent's own peak,
    because exec records the high-water mark of the memory map it replaces (the parent's,
    shared until then). ``ru_maxrss`` is kept beside it, and used when the child ended before
    the first poll. Raises RuntimeError with the tail of its output when the child fails.
    """
    started = time.perf_counter()
    peak_kib = 0
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_kib = max(peak_kib, _high_water_kib(proc.pid))
            time.sleep(POLL_S)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(args[:4])} ...\n{tail}")
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round((peak_kib or usage.ru_maxrss) / 1024, 1),  # both KiB on Linux
        "ru_maxrss_mb": round(usage.ru_maxrss / 1024, 1),
    }


def cache_bytes(cache_dir: Path) -> int:
    """Bytes of the feature chunks below ``cache_dir``."""
    return sum(p.stat().st_size for p in cache_dir.rglob("*.safetensors") if p.is_file())


def measure(
    profile: Profile,
    work: Path,
    code_root: Path = REPO_ROOT,
    threads: int = 2,
    poolings: tuple[str, ...] = POOLINGS,
    phases: tuple[str, ...] = PHASES,
) -> list[dict[str, Any]]:
    """Cold and warm runs per pooling and size, each pooling and size in a fresh cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTUNE_")}
    env.update(
        RESTUNE_HOME=os.environ.get("RESTUNE_HOME", str(Path.home() / ".cache" / "restune")),
        PYTHONPATH=str(code_root),
        OMP_NUM_THREADS=str(threads),
    )
    backbone = []
    if profile.backbone is not None:
        backbone = ["--backbone", profile.backbone[0], "--weights", profile.backbone[1]]
    runs: list[dict[str, Any]] = []
    for size in profile.sizes:
        data = generate_images(work / f"images-{size}", size)
        for pooling in poolings:
            cache = work / f"cache-{pooling}-{size}"
            command = [
                "-m", "clients.cli", "train", "--data", str(data), "--name", "scale",
                "--out", str(work / f"{pooling}-{size}.safetensors"), "--pooling", pooling,
                "--epochs", str(profile.epochs), "--cache-dir", str(cache),
                "--threads", str(threads), "--quiet",
                *backbone, *profile.train_args,
            ]  # fmt: skip
            for phase in phases:
                log = work / f"{pooling}-{size}-{phase}.log"
                result = run_child(command, env, code_root, log)
                stored = cache_bytes(cache)
                runs.append(
                    {
                        "pooling": pooling,
                        "images": size,
                        "phase": phase,
                        **result,
                        "cache_bytes": stored,
                        "cache_bytes_per_image": round(stored / size),
                    }
                )
                print(
                    f"[training_scale] {pooling:4s} {size:5d} images {phase}: "
                    f"peak RSS {result['peak_rss_mb']:8.1f} MB, {result['wall_s']:7.1f} s wall, "
                    f"cache {stored / size / 1e3:8.1f} KB/image",
                    flush=True,
                )
            shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
    return runs


def growth(runs: list[dict[str, Any]], sizes: tuple[int, int]) -> dict[str, dict[str, float]]:
    """Peak RSS at the larger size over the smaller, per pooling and phase (1.0: flat)."""
    rss = {(r["pooling"], r["images"], r["phase"]): r["peak_rss_mb"] for r in runs}
    out: dict[str, dict[str, float]] = {}
    for (pooling, images, phase), big in rss.items():
        small = rss.get((pooling, sizes[0], phase))
        if images == sizes[1] and small:
            out.setdefault(pooling, {})[phase] = round(big / small, 3)
    return out


def run(
    quick: bool = True,
    smoke: bool = False,
    code_root: Path = REPO_ROOT,
    work: Path | None = None,
    profile: Profile | None = None,
    poolings: tuple[str, ...] = POOLINGS,
    phases: tuple[str, ...] = PHASES,
) -> dict[str, Any]:
    """The measurement for one profile (``smoke``: the tiny test backbone; ``profile``: one
    of the caller's own)."""
    name = "smoke" if smoke else "quick" if quick else "full"
    if profile is None:
        profile = PROFILES[name]
    else:
        name = "custom"
    with tempfile.TemporaryDirectory(prefix="restune-bench-scale-", dir=work) as tmp:
        runs = measure(profile, Path(tmp), code_root, timing.threads(), poolings, phases)
    return {
        "bench": "training_scale",
        "profile": name,
        "backbone": profile.label,
        "sizes": list(profile.sizes),
        "epochs": profile.epochs,
        "train_args": list(profile.train_args),
        "threads": timing.threads(),
        "code_root": str(code_root),
        "method": (
            "each run a `restune train` child process; peak RSS = VmHWM of that child "
            f"(/proc, polled every {POLL_S} s); cold = empty cache (extraction + training), "
            "warm = the same command again (training from the cache); cache bytes = the chunk "
            "files after the run"
        ),
        "runs": runs,
        "rss_growth": growth(runs, profile.sizes),
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A readable table of :func:`run`'s result."""
    lines = [f"{result['backbone']}, {result['epochs']} epochs, sizes {result['sizes']}"]
    if result.get("train_args"):
        lines[0] += f", restune train {' '.join(result['train_args'])}"
    for r in result["runs"]:
        lines.append(
            f"  {r['pooling']:4s} {r['images']:5d} {r['phase']:4s}  peak RSS "
            f"{r['peak_rss_mb']:8.1f} MB  wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  "
            f"cache {r['cache_bytes_per_image'] / 1e3:8.1f} KB/image"
        )
    for pooling, phases in result["rss_growth"].items():
        ratios = ", ".join(f"{phase} x{ratio}" for phase, ratio in phases.items())
        lines.append(f"  peak RSS growth {pooling}: {ratios}")
    return lines


def main() -> None:
    """CLI: run, print a table, write ``bench/results/training_scale.json`` (or ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true")
    size.add_argument("--smoke", action="store_true")
    parser.add_argument("--code-root", type=Path, default=REPO_ROOT, help="checkout to measure")
    parser.add_argument("--work", type=Path, default=None, help="where images and caches go")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    custom = parser.add_argument_group("a custom profile (all of --sizes and --epochs)")
    custom.add_argument("--sizes", help="SMALL,LARGE image counts")
    custom.add_argument("--epochs", type=int)
    custom.add_argument(
        "--backbone", default="embedded", help="ARCH:WEIGHTS, or embedded (the default)"
    )
    custom.add_argument("--train-args", default="", help="more restune train options")
    parser.add_argument("--poolings", default=",".join(POOLINGS))
    parser.add_argument("--phases", default=",".join(PHASES))
    args = parser.parse_args()
    timing.configure(threads=args.threads)
    profile = None
    if args.sizes or args.epochs:
        if not (args.sizes and args.epochs):
            parser.error("a custom profile needs --sizes and --epochs")
        small, large = (int(n) for n in args.sizes.split(","))
        arch, _, weights = args.backbone.partition(":")
        pair = None if args.backbone == "embedded" else (arch, weights)
        extra = tuple(args.train_args.split())
        label = f"{args.backbone} {args.train_args}".strip()
        profile = Profile((small, large), pair, args.epochs, label, extra)
    result = run(
        args.quick, args.smoke, args.code_root.resolve(), args.work, profile,
        tuple(args.poolings.split(",")), tuple(args.phases.split(",")),
    )  # fmt: skip
    print("\n".join(summary_lines(result)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
