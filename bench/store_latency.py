"""Latency of the tuner stores for a ~5 MB artifact (issue 3).

The artifact is a ViT-B-sized bypass: res_adapter on all 12 layers, D = 768, r = 32, 100
classes, float32 (about 5.1 MB). Measured, as medians in milliseconds:

- ``validate_ms``: :func:`validate_artifact` (header, shapes, NaN/Inf scan, sha256): what an
  upload pays before it is stored;
- per store (filesystem with fsync, Redis): ``put_ms`` of distinct bytes (a new version each
  time) and ``get_ms`` of the current version (the filesystem store re-hashes what it reads).

Redis is ``REDIS_URL`` when set, else a throwaway ``redis-server`` from PATH (skipped if there
is none). Run: ``python -m bench.store_latency [--quick]`` -> ``bench/results/store_latency.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis

from bench.processes import redis_server
from tuners_store import TunerStore, open_store
from tuners_store.artifact import pack_artifact, random_arrays, validate_artifact
from tuners_store.config import TunerConfig

RESULTS = Path(__file__).resolve().parent / "results" / "store_latency.json"
FINGERPRINT = "bench-fingerprint"


def bench_config() -> TunerConfig:
    """A ViT-B/16-shaped classification tuner, r = 32 on all 12 blocks, 100 classes."""
    return TunerConfig.model_validate(
        {
            "name": "bench",
            "task": "classification",
            "labels": [f"class{i}" for i in range(100)],
            "backbone": {
                "arch": "vit_base_patch16_224",
                "fingerprint": FINGERPRINT,
                "dim": 768,
                "depth": 12,
            },
            "bypass": {"layers": [1, 12], "bottleneck": 32},
            "created_at": "2026-01-01T00:00:00+00:00",
        }
    )


def variants(base: bytes, count: int) -> list[bytes]:
    """``count`` distinct artifacts: the base with its last weight byte changed."""
    out = []
    for i in range(count):
        blob = bytearray(base)
        blob[-1] = i % 256
        blob[-2] = i // 256
        out.append(bytes(blob))
    return out


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


async def _time_async(fn: Callable[[], Awaitable[object]], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t0)
    return times


async def _measure_store(store: TunerStore, blobs: list[bytes], repeats: int) -> dict[str, Any]:
    async with store:
        await store.put("warmup", blobs[-1])
        it = iter(blobs)
        put = await _time_async(lambda: store.put("bench", next(it)), repeats)
        got = await store.get("bench")
        if got.data != blobs[repeats - 1]:
            raise AssertionError("store returned other bytes than the last put")
        get = await _time_async(lambda: store.get("bench"), repeats)
    return {"put_ms": _median_ms(put), "get_ms": _median_ms(get), "repeats": repeats}


def run(quick: bool = False) -> dict[str, Any]:
    """Measure and return the results (also what ``__main__`` writes as JSON)."""
    repeats = 5 if quick else 30
    config = bench_config()
    base = pack_artifact(config, random_arrays(config, seed=0))
    blobs = variants(base, repeats + 1)

    validate = []
    for blob in blobs[:repeats]:
        t0 = time.perf_counter()
        validate_artifact(blob, expect_fingerprint=FINGERPRINT)
        validate.append(time.perf_counter() - t0)

    results: dict[str, Any] = {
        "artifact_bytes": len(base),
        "config": "vit_base_patch16_224 res_adapter layers 1-12 r=32, 100 classes, float32",
        "validate_ms": _median_ms(validate),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "quick": quick,
    }
    with tempfile.TemporaryDirectory(prefix="restune-bench-fs-") as root:
        store = open_store(f"file://{root}")
        results["file"] = asyncio.run(_measure_store(store, blobs, repeats))
        results["file"]["fsync"] = True
    with redis_server() as url:
        if url is None:
            results["redis"] = {"skipped": "no REDIS_URL and no redis-server on PATH"}
        else:
            prefix = f"bench{uuid.uuid4().hex[:8]}"
            store = open_store(f"{url}?prefix={prefix}")
            results["redis"] = asyncio.run(_measure_store(store, blobs, repeats))
            client = redis.Redis.from_url(url)
            keys = list(client.scan_iter(f"{prefix}:*"))
            if keys:
                client.delete(*keys)
            client.close()
    return results


def main() -> None:
    """CLI: run, print the results and write ``bench/results/store_latency.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="5 repeats instead of 30")
    args = parser.parse_args()
    results = run(quick=args.quick)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
