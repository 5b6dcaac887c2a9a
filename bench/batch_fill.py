"""How full the micro-batcher's batches get under a closed loop, and what it adds at no load.

An in-process measurement of :class:`server.engine.batcher.MicroBatcher` alone: the engine is
a stand-in that sleeps ``base + per_image`` ms per batch (a batch's cost on this machine with
feature-cache hits is a few ms plus about one per image), so the numbers show the batcher's
policy, not the machine's load.

- closed loop: ``clients`` coroutines each send one image, wait for its answer, pause a
  turnaround drawn uniformly from 0 to twice ``turnaround_ms`` (the HTTP round trip and the
  decode of the next request) and send again; in the ``serial`` rows each turnaround also
  holds one shared lock for ``decode_ms`` (a server decoding one image at a time), which
  spreads the clients' returns over ``clients x decode_ms``;
  reports the mean batch size and the requests per second;
- no load: one request at a time, far apart; reports the median latency above the engine's
  own time (what the batcher adds).

Run: ``python -m bench.batch_fill [--quick]``; writes ``bench/results/batch_fill.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from server.engine.batcher import MicroBatcher
from server.engine.engine import BatchItem, BatchOutput, ItemOutput

RESULTS = Path(__file__).resolve().parent / "results" / "batch_fill.json"
BASE_MS = 4.0
PER_IMAGE_MS = 1.0


def _engine(sizes: list[int]) -> Any:
    def run_batch(items: list[BatchItem]) -> BatchOutput:
        sizes.append(len(items))
        time.sleep((BASE_MS + PER_IMAGE_MS * len(items)) / 1000.0)
        return BatchOutput([ItemOutput({}, True) for _ in items], 0.0, 0.0)

    return run_batch


def _item() -> BatchItem:
    return BatchItem(torch.zeros(3, 1, 1), "d", (), 1)


async def closed_loop(
    clients: int,
    max_batch: int,
    wait_ms: float,
    turnaround_ms: float,
    seconds: float,
    decode_ms: float = 0.0,
) -> dict[str, Any]:
    sizes: list[int] = []
    batcher = MicroBatcher(
        _engine(sizes), max_batch_images=max_batch, max_wait_ms=wait_ms, max_queue_images=64
    )
    batcher.start()
    loop = asyncio.get_running_loop()
    stop = loop.time() + seconds
    done = 0
    rng = random.Random(0)
    decoder = asyncio.Lock()

    async def client() -> None:
        nonlocal done
        while loop.time() < stop:
            await batcher.submit([_item()])
            done += 1
            await asyncio.sleep(rng.uniform(0.0, 2.0 * turnaround_ms) / 1000.0)
            if decode_ms:
                async with decoder:
                    await asyncio.sleep(decode_ms / 1000.0)

    await asyncio.gather(*(client() for _ in range(clients)))
    await batcher.drain()
    warm = sizes[len(sizes) // 5 :]  # past the start-up batches
    return {
        "clients": clients,
        "max_batch": max_batch,
        "max_wait_ms": wait_ms,
        "turnaround_ms": turnaround_ms,
        "serial_decode_ms": decode_ms,
        "mean_batch": round(statistics.fmean(warm), 2),
        "requests_per_s": round(done / seconds, 1),
    }


async def no_load(wait_ms: float, requests: int) -> dict[str, Any]:
    sizes: list[int] = []
    batcher = MicroBatcher(
        _engine(sizes), max_batch_images=8, max_wait_ms=wait_ms, max_queue_images=64
    )
    batcher.start()
    added = []
    for _ in range(requests):
        await asyncio.sleep(0.02)
        started = time.perf_counter()
        await batcher.submit([_item()])
        added.append((time.perf_counter() - started) * 1000.0 - BASE_MS - PER_IMAGE_MS)
    await batcher.drain()
    return {"max_wait_ms": wait_ms, "median_added_ms": round(statistics.median(added), 2)}


async def main_async(quick: bool) -> dict[str, Any]:
    seconds = 1.0 if quick else 4.0
    loops = []
    for turnaround in (0.5, 3.0):
        for wait in (5.0, 20.0):
            loops.append(await closed_loop(8, 8, wait, turnaround, seconds))
    for wait in (5.0, 20.0):
        loops.append(await closed_loop(8, 8, wait, 0.5, seconds, decode_ms=1.5))
    idle = [await no_load(wait, 20 if quick else 60) for wait in (5.0, 20.0)]
    return {
        "engine": f"sleep {BASE_MS} ms + {PER_IMAGE_MS} ms per image",
        "closed_loop": loops,
        "no_load": idle,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = asyncio.run(main_async(args.quick))
    for r in report["closed_loop"]:
        print(
            f"closed loop 8 clients, max batch 8, wait {r['max_wait_ms']} ms, turnaround "
            f"{r['turnaround_ms']} ms, serial decode {r['serial_decode_ms']} ms: "
            f"mean batch {r['mean_batch']}, {r['requests_per_s']} req/s"
        )
    for r in report["no_load"]:
        print(f"no load, wait {r['max_wait_ms']} ms: adds {r['median_added_ms']} ms (median)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
