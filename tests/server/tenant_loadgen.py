"""A load generator in a process of its own (so its threads never share a GIL with another
generator's clock): ``python -m tests.server.tenant_loadgen URL TOKEN TASK --start T
--seconds S --clients N --rate R [--period W]``. Prints one JSON line: ``sent`` (send time
and latency of every 200, seconds) and ``statuses`` (a count per status).

N clients share an offered rate of R requests/s (each sends every N/R s, or at once when it
fell behind); R = 0 sends back to back. Retry-After is ignored, as a flood would. All
generators start at ``T`` on the shared monotonic clock (``time.monotonic()`` of any
process), so their requests can be lined up; with ``--period W`` the generator sends only
in every second window of W seconds (off, on, off, on, ...).
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
from collections import Counter

import httpx
import numpy as np
from PIL import Image


def png(seed: int) -> bytes:
    """A small PNG of random pixels."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def window(t: float, start: float, period: float) -> int:
    """Index of the ``period``-long window holding time ``t``."""
    return int((t - start) // period)


def main() -> None:
    """Run one generator and print what it saw."""
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("token")
    parser.add_argument("task")
    parser.add_argument("--start", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--period", type=float, default=0.0)
    args = parser.parse_args()

    statuses: Counter[int] = Counter()
    sent: list[tuple[float, float]] = []
    lock = threading.Lock()
    headers = {"Authorization": f"Bearer {args.token}"}
    images = [png(seed) for seed in range(8)]
    end = args.start + args.seconds
    interval = args.clients / args.rate if args.rate else 0.0

    def on(t: float) -> bool:
        return not args.period or window(t, args.start, args.period) % 2 == 1

    def client(worker: int) -> None:
        with httpx.Client(base_url=args.url, timeout=30.0, headers=headers) as c:
            c.get("/healthz")  # connect before the clock starts
            i = worker
            next_at = args.start + worker * interval / args.clients
            while True:
                now = time.monotonic()
                if now >= end:
                    return
                if interval and next_at > now:
                    time.sleep(next_at - now)
                    continue
                next_at = max(next_at + interval, now) if interval else now
                if not on(now):
                    time.sleep(0.01)
                    continue
                started = time.monotonic()
                resp = c.post(
                    "/v1/predict",
                    files=[("image", ("i.png", images[i % len(images)], "image/png"))],
                    data={"tasks": args.task, "top_k": "1"},
                )
                took = time.monotonic() - started
                i += 1
                with lock:
                    statuses[resp.status_code] += 1
                    if resp.status_code == 200:
                        sent.append((started, took))

    threads = [threading.Thread(target=client, args=(w,)) for w in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"sent": sent, "statuses": dict(statuses)}))


if __name__ == "__main__":
    main()
