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

Run: ``python -m bench.engine_throughput [--quick]`` -> ``bench/results/engine_throughput.json``.
Times are the best of several repeats (other processes only ever add time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
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


def _best_ms(
    fn: Callable[[], object], device: torch.device, *, repeats: int, min_seconds: float
) -> float:
    """Minimum wall time of ``fn`` in ms, after one warm-up call."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    return min(times)


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


def run(quick: bool = False, arch: str = ARCH, device: str = "cpu") -> dict[str, Any]:
    """Measure and return the report (also what ``__main__`` writes)."""
    repeats, min_seconds = (2, 0.5) if quick else (5, 3.0)
    where = torch.device(device)
    torch.manual_seed(0)
    runtime = TorchRuntime(load_backbone(arch, "random:0", device=where))
    tuners = [_tuner(runtime, i, where) for i in range(max(TASKS))]
    images = _images(runtime, BATCH, seed=1)
    pixels = torch.stack([p for p, _ in images])  # (B, 3, H, W)

    def timed(fn: Callable[[], object]) -> float:
        return _best_ms(fn, where, repeats=repeats, min_seconds=min_seconds)

    # What one separately fine-tuned model pays per batch: a full forward (all tokens through
    # every block). The engine's own capture is cheaper still for CLS tasks.
    full = FeatureSpec((runtime.depth,), "all")
    forward_ms = timed(lambda: runtime.forward_features(pixels, full))
    rows = []
    for k in TASKS:
        items = [BatchItem(p, d, tuple(tuners[:k]), TOP_K) for p, d in images]
        engine = Engine(runtime, FeatureCache(0), tuner_device=where)
        last: dict[str, float] = {}

        def batch(
            engine: Engine = engine, items: list[BatchItem] = items, last: dict[str, float] = last
        ) -> None:
            out = engine.run_batch(items)
            # Keep the split of the fastest run, the one the batch time reports.
            if (
                not last
                or out.backbone_ms + out.fanout_ms < last["backbone_ms"] + last["fanout_ms"]
            ):
                last.update(backbone_ms=out.backbone_ms, fanout_ms=out.fanout_ms)

        batch_ms = timed(batch)
        cached = Engine(runtime, FeatureCache(64 * 1024 * 1024), tuner_device=where)

        def cached_batch(engine: Engine = cached, items: list[BatchItem] = items) -> None:
            engine.run_batch(items)

        cached_ms = timed(cached_batch)  # the warm-up call fills the cache
        images_per_s = BATCH / (batch_ms / 1000.0)
        separate = BATCH / (k * forward_ms / 1000.0)
        rows.append(
            {
                "tasks_per_image": k,
                "batch_ms": round(batch_ms, 2),
                "images_per_s": round(images_per_s, 1),
                "answers_per_s": round(images_per_s * k, 1),
                "backbone_ms": round(last["backbone_ms"], 2),
                "fanout_ms": round(last["fanout_ms"], 2),
                "separate_models_images_per_s": round(separate, 1),
                "speedup_vs_separate_models": round(images_per_s / separate, 2),
                "cached": {
                    "batch_ms": round(cached_ms, 2),
                    "images_per_s": round(BATCH / (cached_ms / 1000.0), 1),
                    "answers_per_s": round(BATCH * k / (cached_ms / 1000.0), 1),
                },
            }
        )
    return {
        "bench": "engine_throughput",
        "arch": arch,
        "weights": "random:0",
        "batch": BATCH,
        "tuner": {
            "kind": "res_adapter",
            "layers": [1, runtime.depth],
            "bottleneck": BOTTLENECK,
            "pooling": "cls",
            "classes": CLASSES,
            "top_k": TOP_K,
        },
        "full_forward_ms": round(forward_ms, 2),
        "rows": rows,
        "quick": quick,
        "machine": {
            "device": runtime.device,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default=ARCH)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = run(quick=args.quick, arch=args.arch, device=args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for row in report["rows"]:
        print(
            f"K={row['tasks_per_image']:>2}: {row['images_per_s']:>7.1f} images/s, "
            f"{row['answers_per_s']:>8.1f} answers/s (backbone {row['backbone_ms']} ms, "
            f"fan-out {row['fanout_ms']} ms per batch of {report['batch']}; "
            f"{row['speedup_vs_separate_models']}x separate models; "
            f"cached {row['cached']['images_per_s']} images/s)"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
