"""Throughput of the engine alone (no HTTP, no batcher): one backbone forward per batch,
fanned out to K tasks per image.

ViT-S/16 at 224 px (random weights: timing only), batch 8, K = 1, 4, 16 CLS-pooled
res_adapter tasks (r = 32, all 12 layers, 100 classes) loaded from real artifact bytes. Every
image asks for all K tasks. Reported per K:

- ``images_per_s`` and ``answers_per_s`` (= images/s x K) of ``Engine.run_batch``, which
  includes the feature capture, the stacked fan-out and turning logits into top-5 JSON answers;
- ``backbone_ms`` / ``fanout_ms`` per batch as the engine measured them;
- ``separate_models_images_per_s``: what K separately fine-tuned backbones would give (K
  forwards of the same backbone per image, derived from the measured forward time) and the
  speed-up over it;
- ``cached``: the same batch again with every image in the feature cache (no forward).

Run: ``python -m bench.engine_throughput [--quick] [--threads N]`` ->
``bench/results/engine_throughput.json``.

Clock: on CPU the rates come from this process's CPU time with ONE intra-op thread (the
default), as in ``bench/fanout_cost.py``: on a shared machine other processes stretch wall time
arbitrarily, while single-threaded CPU time is the work itself, so "images/s" reads as images
per core-second. Wall times are reported beside them. On CUDA the clock is wall time (synced).
Every time is the best of several repeats.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from restuning.artifact_io import load_task
from restuning.backbone import load_backbone
from restuning.features import FeatureSpec
from server.engine.engine import BatchItem, Engine
from server.engine.feature_cache import FeatureCache
from server.engine.loaded_tuner import LoadedTuner, module_nbytes
from server.engine.runtime import Backbone, TorchRuntime
from tuners_store.artifact import pack_artifact, random_arrays
from tuners_store.config import BackboneRef, BypassConfig, TunerConfig

ARCH = "vit_small_patch16_224"
BATCH = 8
TASKS = (1, 4, 16)
BOTTLENECK = 32
CLASSES = 100
TOP_K = 5
RESULTS = Path(__file__).resolve().parent / "results" / "engine_throughput.json"


@dataclass(frozen=True)
class Timing:
    """Best wall time and best process CPU time (all threads) of one call, in ms."""

    wall_ms: float
    cpu_ms: float


def _best(
    fn: Callable[[], object], device: torch.device, *, repeats: int, min_seconds: float
) -> Timing:
    """Minimum wall and CPU time of ``fn`` after one warm-up call.

    CPU time is reported beside wall time because on a shared machine other processes
    stretch wall time arbitrarily while the CPU work this process does stays put.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    walls: list[float] = []
    cpus: list[float] = []
    started = time.perf_counter()
    while len(walls) < repeats or time.perf_counter() - started < min_seconds:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        walls.append((time.perf_counter() - t0) * 1000.0)
        cpus.append((time.process_time() - c0) * 1000.0)
    return Timing(min(walls), min(cpus))


def _tuner(backbone: Backbone, index: int, device: torch.device) -> LoadedTuner:
    """A random task built from artifact bytes, the way the registry builds one."""
    config = TunerConfig(
        name=f"task{index:02d}",
        task="classification",
        labels=tuple(f"class{i}" for i in range(CLASSES)),
        backbone=BackboneRef(
            arch=backbone.arch,
            fingerprint=backbone.fingerprint,
            dim=backbone.dim,
            depth=backbone.depth,
        ),
        bypass=BypassConfig(layers=(1, backbone.depth), bottleneck=BOTTLENECK),
        pooling="cls",
    )
    data = pack_artifact(config, random_arrays(config, seed=index))
    module = load_task(data, backbone.final_norm, expect_fingerprint=backbone.fingerprint)
    return LoadedTuner(
        name=config.name,
        version=1,
        sha256=hashlib.sha256(data).hexdigest(),
        config=module.config,
        module=module.to(device).eval(),
        nbytes=module_nbytes(module),
    )


def _images(backbone: Backbone, n: int, seed: int) -> list[tuple[torch.Tensor, str]]:
    """``n`` distinct normalised random images (3, H, W) with digests."""
    gen = torch.Generator().manual_seed(seed)
    size = tuple(backbone.data_config.input_size)
    out = []
    for i in range(n):
        pixels = torch.randn(size, generator=gen)  # (3, H, W)
        out.append((pixels, f"bench-{seed}-{i}"))
    return out


def run(
    quick: bool = False, arch: str = ARCH, device: str = "cpu", threads: int = 1
) -> dict[str, Any]:
    """Measure and return the report (also what ``__main__`` writes)."""
    repeats, min_seconds = (2, 0.5) if quick else (5, 3.0)
    where = torch.device(device)
    if threads > 0:
        torch.set_num_threads(threads)
    clock = "wall" if where.type == "cuda" else "cpu"
    torch.manual_seed(0)
    runtime = TorchRuntime(load_backbone(arch, "random:0", device=where))
    tuners = [_tuner(runtime, i, where) for i in range(max(TASKS))]
    images = _images(runtime, BATCH, seed=1)
    pixels = torch.stack([p for p, _ in images])  # (B, 3, H, W)

    def timed(fn: Callable[[], object]) -> Timing:
        return _best(fn, where, repeats=repeats, min_seconds=min_seconds)

    def ms(t: Timing) -> float:
        return t.cpu_ms if clock == "cpu" else t.wall_ms

    # What one separately fine-tuned model pays per batch: a full forward (all tokens through
    # every block). The engine's own capture is cheaper still for CLS tasks.
    full = FeatureSpec((runtime.depth,), "all")
    forward = timed(lambda: runtime.forward_features(pixels, full))
    rows = []
    for k in TASKS:
        items = [BatchItem(p, d, tuple(tuners[:k]), TOP_K) for p, d in images]
        engine = Engine(runtime, FeatureCache(0), tuner_device=where)
        split: dict[str, float] = {}

        def batch(
            engine: Engine = engine, items: list[BatchItem] = items, split: dict[str, float] = split
        ) -> None:
            out = engine.run_batch(items)
            # The engine's own wall-clock split of the fastest run.
            if not split or out.backbone_ms + out.fanout_ms < sum(split.values()):
                split.update(backbone_ms=out.backbone_ms, fanout_ms=out.fanout_ms)

        timing = timed(batch)
        cached = Engine(runtime, FeatureCache(64 * 1024 * 1024), tuner_device=where)

        def cached_batch(engine: Engine = cached, items: list[BatchItem] = items) -> None:
            engine.run_batch(items)

        cached_timing = timed(cached_batch)  # the warm-up call fills the cache
        per_s = BATCH / max(ms(timing) / 1000.0, 1e-9)
        separate = BATCH / (k * ms(forward) / 1000.0)
        cached_per_s = BATCH / max(ms(cached_timing) / 1000.0, 1e-9)
        rows.append(
            {
                "tasks_per_image": k,
                "batch_ms": round(ms(timing), 2),
                "batch_wall_ms": round(timing.wall_ms, 2),
                "images_per_s": round(per_s, 2),
                "answers_per_s": round(per_s * k, 2),
                "engine_split_wall_ms": {key: round(v, 2) for key, v in split.items()},
                "separate_models_images_per_s": round(separate, 2),
                "speedup_vs_separate_models": round(per_s / separate, 2),
                "cached": {
                    "batch_ms": round(ms(cached_timing), 3),
                    "images_per_s": round(cached_per_s, 1),
                    "answers_per_s": round(cached_per_s * k, 1),
                },
            }
        )
    return {
        "bench": "engine_throughput",
        "arch": arch,
        "weights": "random:0",
        "batch": BATCH,
        "clock": clock,
        "unit": f"ms of {clock} time per batch (best of repeats); rates per {clock} second",
        "tuner": {
            "kind": "res_adapter",
            "layers": [1, runtime.depth],
            "bottleneck": BOTTLENECK,
            "pooling": "cls",
            "classes": CLASSES,
            "top_k": TOP_K,
        },
        "full_forward_ms": round(ms(forward), 2),
        "full_forward_wall_ms": round(forward.wall_ms, 2),
        "rows": rows,
        "quick": quick,
        "machine": {
            "device": runtime.device,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            # Other processes only add wall time; a high load makes wall numbers pessimistic.
            "load_avg_1m_after": round(os.getloadavg()[0], 2),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default=ARCH)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (0: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = run(quick=args.quick, arch=args.arch, device=args.device, threads=args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"full forward of {report['batch']} images: "
        f"{report['full_forward_ms']} ms ({report['clock']} time)"
    )
    for row in report["rows"]:
        print(
            f"K={row['tasks_per_image']:>2}: {row['images_per_s']:>7.2f} images/s, "
            f"{row['answers_per_s']:>8.2f} answers/s; {row['speedup_vs_separate_models']}x "
            f"K separate models; cached: {row['cached']['images_per_s']} images/s"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
