"""Feature cache: a repeat image asking for new tasks skips the backbone.

With the server's own :class:`~server.engine.service.InferenceService` (ViT-S/16, random
weights, feature cache on), each of ``images`` JPEG photos is sent twice, one image per
request: first with tasks A (a miss: decode, one backbone forward capturing CLS rows of
every layer, fan-out), then with tasks B that were never asked for that image (a hit: decode,
cached features, fan-out). A and B are 4 CLS-pooled res_adapter tasks each (r = 8, all
blocks, 100 classes). Latency is ``predict`` end to end inside the service (no HTTP);
``timing.cache_hits`` of every response is checked, so a hit is a hit.

Run: ``python -m bench.feature_cache [--quick]`` -> ``bench/results/feature_cache.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import timing
from bench.server_throughput import sample_jpegs
from bench.timing import summary_ms
from restuning.backbone import load_backbone
from server.engine.runtime import Backbone, TorchRuntime
from server.engine.service import InferenceService, TaskRef
from server.metrics import Metrics
from server.settings import Settings
from tuners_store.artifact import pack_artifact, random_arrays
from tuners_store.config import BackboneRef, BypassConfig, TunerConfig

RESULTS = Path(__file__).resolve().parent / "results" / "feature_cache.json"
TASKS_PER_REQUEST = 4
MiB = 1024 * 1024


def _artifact(name: str, backbone: Backbone, seed: int) -> bytes:
    config = TunerConfig(
        name=name,
        task="classification",
        labels=tuple(f"class{i}" for i in range(100)),
        backbone=BackboneRef(
            arch=backbone.arch,
            fingerprint=backbone.fingerprint,
            dim=backbone.dim,
            depth=backbone.depth,
        ),
        bypass=BypassConfig(layers=(1, backbone.depth), bottleneck=8),
        pooling="cls",
    )
    return pack_artifact(config, random_arrays(config, seed=seed))


async def _measure(backbone: Backbone, store_url: str, images: int) -> dict[str, Any]:
    settings = Settings(
        backbone=backbone.arch,
        backbone_weights="random:0",
        store=store_url,
        feature_cache_bytes=256 * MiB,
        max_batch_images=8,
        max_wait_ms=0.0,
        request_timeout_s=120.0,
    )
    service = InferenceService(settings, Metrics(), backbone=backbone)
    await service.start()
    try:
        names = [f"task{i}" for i in range(2 * TASKS_PER_REQUEST)]
        for i, name in enumerate(names):
            await service.registry.register(name, _artifact(name, backbone, seed=i))
        first = [TaskRef(n) for n in names[:TASKS_PER_REQUEST]]
        second = [TaskRef(n) for n in names[TASKS_PER_REQUEST:]]
        photos = sample_jpegs(images + 1, seed=7)
        await service.predict([photos[-1]], first, 1)  # warm-up: first-call costs
        miss_ms: list[float] = []
        hit_ms: list[float] = []
        backbone_ms: list[float] = []
        wrong = 0
        for photo in photos[:images]:
            for tasks, into in ((first, miss_ms), (second, hit_ms)):
                started = time.perf_counter()
                body = await service.predict([photo], tasks, 1)
                into.append((time.perf_counter() - started) * 1000.0)
                expect_hit = into is hit_ms
                wrong += int((body["timing"]["cache_hits"] == 1) != expect_hit)
                if not expect_hit:
                    backbone_ms.append(body["timing"]["backbone_ms"])
    finally:
        await service.stop()
    miss, hit = summary_ms(miss_ms), summary_ms(hit_ms)
    return {
        "miss": miss,
        "hit": hit,
        "miss_backbone": summary_ms(backbone_ms),
        "hit_speedup_p50": round(float(miss["p50_ms"]) / float(hit["p50_ms"]), 2),
        "unexpected_hit_or_miss": wrong,
    }


def run(quick: bool = False, *, smoke: bool = False) -> dict[str, Any]:
    """Measure hit vs miss latency; returns the JSON-able report."""
    torch.set_num_threads(timing.threads())
    arch = "vit_test_tiny" if smoke else "vit_small_patch16_224"
    images = 3 if smoke else 20 if quick else 100
    backbone = TorchRuntime(load_backbone(arch, "random:0"))
    with tempfile.TemporaryDirectory(prefix="restune-bench-cache-") as tmp:
        result = asyncio.run(_measure(backbone, f"file://{tmp}/tuners", images))
    return {
        "bench": "feature_cache",
        "profile": "smoke" if smoke else "quick" if quick else "full",
        "arch": arch,
        "images": images,
        "image": "JPEG 256x256 crops of scikit-learn's sample photos, one per request",
        "tasks_per_request": TASKS_PER_REQUEST,
        "tuner": {"kind": "res_adapter", "bottleneck": 8, "layers": "all", "pooling": "cls"},
        **result,
    }


def main() -> None:
    """CLI: run, print the JSON and write ``bench/results/feature_cache.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 images instead of 100")
    parser.add_argument("--smoke", action="store_true", help="tiny backbone, 3 images")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = run(args.quick, smoke=args.smoke)
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
