"""Load generator for the overload test, run in its own process (async httpx).

Two modes, each writing one JSON document to ``--out``:

* ``closed``: ``--concurrency`` workers send predict requests back to back for ``--seconds``;
  the completed rate is what the server sustains.
* ``open``: requests are started on a fixed schedule, ``--rate`` per second for ``--seconds``,
  whatever happens to earlier ones (an open loop: a slow server does not slow the arrivals).
  Every request is recorded: when it was due, when it was sent, its latency, status, error
  code and Retry-After; one that got no answer within ``--timeout`` is recorded as a hang.

Run: ``python -m tests.reliability.load_generator --url http://127.0.0.1:8000 --tasks a
--mode open --rate 60 --seconds 20 --out load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from tests.fixtures.models import tiny_images

IMAGE_POOL = 16


async def one_request(
    client: httpx.AsyncClient, image: bytes, tasks: str, limit_s: float
) -> dict[str, Any]:
    """Send one predict; its outcome (``status`` 0 = no answer: hang or transport error)."""
    loop = asyncio.get_running_loop()
    sent = loop.time()
    record: dict[str, Any] = {"status": 0, "code": None, "retry_after": None}
    try:
        resp = await asyncio.wait_for(
            client.post(
                "/v1/predict",
                files=[("image", ("x.png", image, "image/png"))],
                data={"tasks": tasks},
            ),
            limit_s,
        )
        record["status"] = resp.status_code
        if resp.status_code != 200:
            record["code"] = resp.json().get("code")
            record["retry_after"] = resp.headers.get("retry-after")
    except TimeoutError:
        record["code"] = "hang"
    except httpx.HTTPError as exc:
        record["code"] = f"transport: {type(exc).__name__}"
    record["latency_ms"] = (loop.time() - sent) * 1000.0
    return record


async def closed_loop(url: str, tasks: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """Back-to-back requests from ``concurrency`` workers; completed 200s per second."""
    images = tiny_images(IMAGE_POOL, seed=17)
    loop = asyncio.get_running_loop()
    limits = httpx.Limits(max_connections=concurrency)
    records: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        # One request per worker first: connections open, tuners loaded.
        await asyncio.gather(
            *(one_request(client, images[i], tasks, 60.0) for i in range(concurrency))
        )
        start = loop.time()
        end = start + seconds

        async def worker(index: int) -> None:
            n = index
            while loop.time() < end:
                records.append(await one_request(client, images[n % IMAGE_POOL], tasks, 60.0))
                n += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = loop.time() - start
    ok = [r for r in records if r["status"] == 200]
    return {
        "mode": "closed",
        "concurrency": concurrency,
        "seconds": elapsed,
        "requests": len(records),
        "ok": len(ok),
        "rate": len(ok) / elapsed,
        "statuses": sorted({r["status"] for r in records}),
    }


async def open_loop(
    url: str, tasks: str, rate: float, seconds: float, limit_s: float
) -> dict[str, Any]:
    """``rate`` requests per second for ``seconds``, on schedule; every outcome recorded."""
    images = tiny_images(IMAGE_POOL, seed=17)
    loop = asyncio.get_running_loop()
    total = int(rate * seconds)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        start = loop.time() + 0.2

        async def scheduled(i: int) -> dict[str, Any]:
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
            lag_ms = (loop.time() - due) * 1000.0
            record = await one_request(client, images[i % IMAGE_POOL], tasks, limit_s)
            record.update(index=i, due_s=due - start, lag_ms=lag_ms)
            return record

        records = await asyncio.gather(*(scheduled(i) for i in range(total)))
        elapsed = loop.time() - start
    return {
        "mode": "open",
        "rate": rate,
        "seconds": seconds,
        "elapsed": elapsed,
        "timeout": limit_s,
        "records": list(records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--mode", choices=("closed", "open"), required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.mode == "closed":
        result = asyncio.run(closed_loop(args.url, args.tasks, args.concurrency, args.seconds))
    else:
        result = asyncio.run(open_loop(args.url, args.tasks, args.rate, args.seconds, args.timeout))
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
