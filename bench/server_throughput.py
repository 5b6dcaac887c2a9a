"""Throughput and latency of the whole server over HTTP, next to the engine alone.

A real ``restune serve`` process (ViT-S/16 at 224 px, random weights: timing only; feature
cache off so every image pays its forward) and a separate load-generator process (async httpx)
in which ``CONCURRENCY`` workers each send multipart requests of ``IMAGES_PER_REQUEST`` JPEG
photos back to back (a closed loop, after one warm-up request each). Every image asks for
K = 1, 4, 16 CLS-pooled res_adapter tasks (r = 32, all 12 layers, 100 classes: the tuners of
``bench/engine_throughput.py``). Reported per K:

- ``images_per_s``, ``requests_per_s``, ``answers_per_s`` (= images/s x K) at the client;
- request latency ``p50_ms`` / ``p95_ms`` / ``p99_ms`` (upload, decode, queue, batch, JSON);
- from the server's /metrics over exactly the measured window: mean batch size, backbone
  forward and fan-out ms per batch, queue wait, tasks per forward, and ``engine_busy``, the
  fraction of the window the engine computed (1 - engine_busy bounds what HTTP, decoding and
  batching cost; unlike a comparison with a separate run it holds on a busy machine);
- ``engine_images_per_s``: ``bench.engine_throughput`` (the engine alone, no HTTP, same batch
  size) measured in the same run after the server stopped, and ``http_efficiency``, the
  fraction of the engine's rate that survives HTTP, decoding and batching.

The server's batch limit is the engine bench's batch size so both sides run the same batches.
On a small CPU box the load generator competes with the server for cores; that cost is in
the numbers. Run: ``python -m bench.server_throughput [--quick]`` ->
``bench/results/server_throughput.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.processes import ServeProcess

ARCH = "vit_small_patch16_224"
TASKS = (1, 4, 16)
IMAGES_PER_REQUEST = 4
CONCURRENCY = 4
"""Requests in flight: CONCURRENCY x IMAGES_PER_REQUEST images = two engine batches of 8."""
BOTTLENECK = 32
CLASSES = 100
TOP_K = 5
DEFAULT_BATCH = 8
RESULTS = Path(__file__).resolve().parent / "results" / "server_throughput.json"
MiB = 1024 * 1024
ADMIN_TOKEN = "bench-admin-token-0123456789"


# --- the load generator (runs in its own process) ---------------------------------------------


def sample_jpegs(n: int, side: int = 256, seed: int = 0) -> list[bytes]:
    """``n`` JPEG crops of the photos bundled with scikit-learn (no download), ``side`` px."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # (427, 640, 3) uint8 each
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        crop = int(rng.integers(min(h, w) // 2, min(h, w)))
        top, left = int(rng.integers(0, h - crop)), int(rng.integers(0, w - crop))
        img = Image.fromarray(photo[top : top + crop, left : left + crop]).resize((side, side))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


async def generate_load(
    url: str, tasks: str, *, rounds: int, concurrency: int, per_request: int
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` workers each send one warm-up request, then, together,
    ``rounds`` measured requests one after another. Throughput is the measured images over
    the time from the common start to the last answer (robust at a few images per second)."""
    pool = sample_jpegs(32)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    warmed = asyncio.Barrier(concurrency + 1)
    go = asyncio.Event()

    async def send(client: httpx.AsyncClient, n: int) -> tuple[float, httpx.Response]:
        files = [
            ("image", (f"{j}.jpg", pool[(n + j) % len(pool)], "image/jpeg"))
            for j in range(per_request)
        ]
        sent = loop.time()
        resp = await client.post(
            "/v1/predict", files=files, data={"tasks": tasks, "top_k": str(TOP_K)}
        )
        return (loop.time() - sent) * 1000.0, resp

    async def worker(index: int, client: httpx.AsyncClient) -> None:
        n = index * per_request
        await send(client, n)
        await warmed.wait()
        await go.wait()
        for r in range(rounds):
            ms, resp = await send(client, n + (r + 1) * concurrency * per_request)
            if resp.status_code == 200:
                latencies.append(ms)
            else:
                code = f"{resp.status_code} {resp.json().get('code', '')}"
                errors[code] = errors.get(code, 0) + 1

    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=url, timeout=300.0, limits=limits) as client:
        workers = [asyncio.create_task(worker(i, client)) for i in range(concurrency)]
        await warmed.wait()
        # The server's own view of exactly the measured window.
        before = metric_totals((await client.get("/metrics")).text)
        start = loop.time()
        go.set()
        await asyncio.gather(*workers)
        elapsed = loop.time() - start
        after = metric_totals((await client.get("/metrics")).text)
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    images = len(latencies) * per_request
    return {
        "requests": len(latencies),
        "images": images,
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(latencies) / elapsed, 3),
        "images_per_s": round(images / elapsed, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "errors": errors,
        "server": server_means(before, after, elapsed),
    }


def metric_totals(text: str) -> dict[str, float]:
    """Sums and counts of the histograms the report uses, from Prometheus text."""
    wanted = (
        "restune_batch_size_images",
        "restune_backbone_forward_seconds",
        "restune_fanout_seconds",
        "restune_queue_wait_seconds",
        "restune_tasks_per_forward",
    )
    out: dict[str, float] = {}
    for name in wanted:
        for part in ("sum", "count"):
            found = re.search(rf"^{name}_{part} (\S+)$", text, re.MULTILINE)
            out[f"{name}_{part}"] = float(found.group(1)) if found else 0.0
    return out


def server_means(
    before: dict[str, float], after: dict[str, float], seconds: float
) -> dict[str, float]:
    """Per-batch means over a window, and ``engine_busy``: the fraction of the window the
    engine spent in backbone forwards and fan-out (what is left went to HTTP, decoding,
    batching, or nothing)."""

    def delta(key: str) -> float:
        return after[key] - before[key]

    def mean(name: str, scale: float = 1.0) -> float:
        count = delta(f"{name}_count")
        return round(delta(f"{name}_sum") / count * scale, 2) if count else float("nan")

    busy = delta("restune_backbone_forward_seconds_sum") + delta("restune_fanout_seconds_sum")
    return {
        "batches": int(delta("restune_batch_size_images_count")),
        "mean_batch_images": mean("restune_batch_size_images"),
        "backbone_ms_per_batch": mean("restune_backbone_forward_seconds", 1000.0),
        "fanout_ms_per_batch": mean("restune_fanout_seconds", 1000.0),
        "queue_wait_ms": mean("restune_queue_wait_seconds", 1000.0),
        "tasks_per_forward": mean("restune_tasks_per_forward"),
        "engine_busy": round(busy / seconds, 3) if seconds > 0 else float("nan"),
    }


# --- the server side ----------------------------------------------------------------------------


def _tuner_artifact(arch: str, name: str, fingerprint: str, seed: int) -> bytes:
    from restuning.presets import get_preset
    from tuners_store.artifact import pack_artifact, random_arrays
    from tuners_store.config import BackboneRef, BypassConfig, TunerConfig

    vit = get_preset(arch).vit
    config = TunerConfig(
        name=name,
        task="classification",
        labels=tuple(f"class{i}" for i in range(CLASSES)),
        backbone=BackboneRef(
            arch=arch, fingerprint=fingerprint, dim=vit.embed_dim, depth=vit.depth
        ),
        bypass=BypassConfig(layers=(1, vit.depth), bottleneck=BOTTLENECK),
        pooling="cls",
    )
    return pack_artifact(config, random_arrays(config, seed=seed))


def _engine_batch() -> tuple[int, Any]:
    """The engine bench's batch size and module, when ``bench/engine_throughput.py`` exists."""
    try:
        from bench import engine_throughput
    except ImportError:
        return DEFAULT_BATCH, None
    return int(engine_throughput.BATCH), engine_throughput


def run(quick: bool = False, arch: str = ARCH) -> dict[str, Any]:
    """Start the server, load it at K = 1, 4, 16 tasks per image, then run the engine bench."""
    rounds = 2 if quick else 8
    batch, engine_bench = _engine_batch()
    env = {
        "RESTUNE_BACKBONE": arch,
        "RESTUNE_BACKBONE_WEIGHTS": "random:0",
        "RESTUNE_MAX_BATCH_IMAGES": str(batch),
        "RESTUNE_MAX_WAIT_MS": "5",
        "RESTUNE_MAX_QUEUE_IMAGES": "1024",
        "RESTUNE_FEATURE_CACHE_BYTES": "0",
        "RESTUNE_MAX_IMAGE_BYTES": str(4 * MiB),
        "RESTUNE_MAX_REQUEST_BYTES": str(64 * MiB),
        "RESTUNE_MAX_TASKS_PER_REQUEST": "64",
        "RESTUNE_MAX_ARTIFACT_BYTES": str(64 * MiB),
        "RESTUNE_REQUEST_TIMEOUT_S": "120",
        "RESTUNE_THREADS": "0",
        "RESTUNE_LOG_LEVEL": "warning",
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="restune-bench-") as tmp:
        env["RESTUNE_STORE"] = f"file://{tmp}/store"
        env["RESTUNE_ADMIN_TOKEN"] = ADMIN_TOKEN
        with (
            ServeProcess(Path(tmp) / "server", env) as server,
            httpx.Client(base_url=server.url, timeout=120.0) as client,
        ):
            fingerprint = client.get("/readyz").json()["backbone"]["fingerprint"]
            names = [f"task{i:02d}" for i in range(max(TASKS))]
            headers = {**server.admin_headers, "Content-Type": "application/octet-stream"}
            for i, name in enumerate(names):
                artifact = _tuner_artifact(arch, name, fingerprint, seed=i)
                client.put(
                    f"/v1/tuners/{name}", content=artifact, headers=headers
                ).raise_for_status()
            for k in TASKS:
                load = _run_load_generator(server.url, ",".join(names[:k]), rounds=rounds)
                rows.append(
                    {
                        "tasks_per_image": k,
                        **load,
                        "answers_per_s": round(load["images_per_s"] * k, 1),
                    }
                )
    engine: dict[str, Any] | None = None
    if engine_bench is not None:
        engine = engine_bench.run(quick=quick, arch=arch)
        by_k = {r["tasks_per_image"]: r for r in engine["rows"]}
        for row in rows:
            alone = by_k.get(row["tasks_per_image"])
            if alone:
                row["engine_images_per_s"] = alone["images_per_s"]
                row["http_efficiency"] = round(row["images_per_s"] / alone["images_per_s"], 2)
    import torch

    return {
        "bench": "server_throughput",
        "arch": arch,
        "weights": "random:0",
        "batch": batch,
        "images_per_request": IMAGES_PER_REQUEST,
        "concurrency": CONCURRENCY,
        "image": "JPEG 256x256 crops of scikit-learn's sample photos",
        "feature_cache": "off",
        "tuner": {
            "kind": "res_adapter",
            "layers": "all",
            "bottleneck": BOTTLENECK,
            "pooling": "cls",
            "classes": CLASSES,
            "top_k": TOP_K,
        },
        "measured_requests_per_worker": rounds,
        "rows": rows,
        "engine_alone": engine,
        "quick": quick,
        "machine": {
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
    }


def _run_load_generator(url: str, tasks: str, *, rounds: int) -> dict[str, Any]:
    """One load-generator process; its JSON result."""
    cmd = [sys.executable, "-m", "bench.server_throughput", "--loadgen", url]
    cmd += ["--tasks", tasks, "--rounds", str(rounds)]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True, timeout=3600)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (smoke)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--loadgen", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        result = asyncio.run(
            generate_load(
                args.loadgen,
                args.tasks,
                rounds=args.rounds,
                concurrency=CONCURRENCY,
                per_request=IMAGES_PER_REQUEST,
            )
        )
        print(json.dumps(result))
        return
    started = time.monotonic()
    report = run(quick=args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for row in report["rows"]:
        s = row["server"]
        engine = (
            f"; engine alone {row['engine_images_per_s']} images/s "
            f"(HTTP keeps {row['http_efficiency']:.0%})"
            if "engine_images_per_s" in row
            else ""
        )
        print(
            f"K={row['tasks_per_image']:>2}: {row['images_per_s']:>6.1f} images/s, "
            f"{row['answers_per_s']:>7.1f} answers/s, p50/p95/p99 {row['p50_ms']}/"
            f"{row['p95_ms']}/{row['p99_ms']} ms, batch {s['mean_batch_images']}, "
            f"backbone {s['backbone_ms_per_batch']} ms + fan-out {s['fanout_ms_per_batch']} ms, "
            f"engine busy {s['engine_busy']:.0%}{engine}; errors {row['errors'] or 0}"
        )
    print(f"wrote {args.out} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
