"""Overload: three times the sustainable rate, open loop. Accepted requests keep a bounded
latency, the rest are refused fast with 503 ``overloaded`` + Retry-After, memory stays flat,
nothing hangs.

The server runs a backbone whose forward is the bottleneck on a CPU (``vit_tiny_patch16_224``,
random weights, feature cache off, small queue), so overload means a full batch queue and not
a saturated HTTP front. The load generator is a separate process
(``tests/reliability/load_generator.py``): first a closed loop measures the sustainable rate,
then an open loop offers three times that for ``RESTUNE_OVERLOAD_S`` seconds (15 by default to
fit CI; the issue's 30 with ``RESTUNE_OVERLOAD_S=30``). Latencies are printed and tabulated in
docs/RELIABILITY.md; assertions compare rejected with accepted latencies rather than trusting
absolute timings, and the only absolute bounds are generous hang guards.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from restuning.backbone import load_backbone
from tests.fixtures.live_server import REPO_ROOT, LiveServer, StartServer
from tests.reliability import bad_artifacts as art

pytestmark = [pytest.mark.slow]

ARCH = "vit_tiny_patch16_224"
TASK = "overload-task"
MAX_BATCH = 8
MAX_QUEUE = 16
OVERLOAD_FACTOR = 3.0
SECONDS = float(os.environ.get("RESTUNE_OVERLOAD_S", "15"))
CLOSED_SECONDS = 4.0
CLOSED_CONCURRENCY = MAX_QUEUE
"""At most MAX_QUEUE images in the server: measures capacity without any refusal."""
HANG_S = 60.0
"""No answer within this many seconds counts as a hang (the request deadline is 30 s)."""
RSS_GROWTH_LIMIT = 256 * 1024 * 1024
"""Generous: a leak or an unbounded queue of ~1000 requests would show as much more."""


def run_load(server: LiveServer, *args: str) -> dict[str, Any]:
    """Run the load generator process to completion; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "load.json"
        cmd = [sys.executable, "-m", "tests.reliability.load_generator"]
        cmd += ["--url", server.url, "--tasks", TASK, "--out", str(out), *args]
        subprocess.run(cmd, cwd=REPO_ROOT, check=True, timeout=SECONDS + 4 * HANG_S)
        result: dict[str, Any] = json.loads(out.read_text())
    return result


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


def rejected_by_server(server: LiveServer) -> float:
    with server.client() as c:
        text = c.get("/metrics").text
    found = re.search(r'^restune_rejected_requests_total\{reason="overloaded"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def test_three_times_the_sustainable_rate(live_server_factory: StartServer) -> None:
    server = live_server_factory(
        RESTUNE_BACKBONE=ARCH,
        RESTUNE_FEATURE_CACHE_BYTES="0",
        RESTUNE_MAX_BATCH_IMAGES=str(MAX_BATCH),
        RESTUNE_MAX_QUEUE_IMAGES=str(MAX_QUEUE),
        # Generous: a 504 would mean a request waited far beyond what the queue explains.
        RESTUNE_REQUEST_TIMEOUT_S="30",
    )
    backbone = load_backbone(ARCH, "random:0")
    assert server.register(TASK, art.valid(TASK, backbone)).status_code == 201

    closed = run_load(
        server, "--mode", "closed", "--seconds", str(CLOSED_SECONDS),
        "--concurrency", str(CLOSED_CONCURRENCY),
    )  # fmt: skip
    assert closed["statuses"] == [200], closed
    sustainable = closed["rate"]
    offered = OVERLOAD_FACTOR * sustainable
    before = memory_kib(server.pid)
    rejected_before = rejected_by_server(server)

    load = run_load(
        server, "--mode", "open", "--rate", f"{offered:.3f}", "--seconds", str(SECONDS),
        "--timeout", str(HANG_S),
    )  # fmt: skip
    after = memory_kib(server.pid)
    records = load["records"]
    accepted = [r for r in records if r["status"] == 200]
    rejected = [r for r in records if r["status"] == 503]
    others = [r for r in records if r["status"] not in (200, 503)]
    accepted_ms = [r["latency_ms"] for r in accepted]
    rejected_ms = [r["latency_ms"] for r in rejected]

    # Every request got an answer: a 200 or a fast, well-formed refusal; nothing hung.
    assert others == [], others[:5]
    assert {(r["code"], r["retry_after"] is not None) for r in rejected} == {("overloaded", True)}
    assert all(int(r["retry_after"]) >= 1 for r in rejected)
    assert accepted, "nothing was served"
    assert rejected, "nothing was refused: the offered load did not overload the server"
    assert rejected_by_server(server) - rejected_before == len(rejected)
    # Refusals are cheap: they come back faster than the work that is accepted.
    assert pct(rejected_ms, 99) < pct(accepted_ms, 99)
    # Accepted latency is bounded by the queue: at most (queue + batch) images ahead of a
    # request, each costing 1/sustainable seconds; x4 and +1 s of slack for a busy machine.
    queue_bound_ms = 4 * (MAX_QUEUE + MAX_BATCH) / sustainable * 1000 + 1000
    assert max(accepted_ms) < queue_bound_ms
    # The server kept serving while refusing the excess (generous: the load generator and
    # the refusals share the machine's cores with the engine).
    served_rate = len(accepted) / load["elapsed"]
    assert served_rate > 0.25 * sustainable
    growth = (after["VmRSS"] - before["VmRSS"]) * 1024
    assert growth < RSS_GROWTH_LIMIT
    assert server.running

    lags = [r["lag_ms"] for r in records]
    print(
        f"overload ({ARCH}, batch {MAX_BATCH}, queue {MAX_QUEUE} images): sustainable "
        f"{sustainable:.1f} req/s (closed loop, {CLOSED_CONCURRENCY} in flight); offered "
        f"{offered:.1f} req/s for {SECONDS:.0f} s = {len(records)} requests (generator lag p99 "
        f"{pct(lags, 99):.0f} ms); accepted {len(accepted)} ({served_rate:.1f} req/s), "
        f"latency p50/p99/max {pct(accepted_ms, 50):.0f}/{pct(accepted_ms, 99):.0f}/"
        f"{max(accepted_ms):.0f} ms (bound {queue_bound_ms:.0f}); rejected {len(rejected)} "
        f"503 overloaded, latency p50/p99/max {pct(rejected_ms, 50):.0f}/"
        f"{pct(rejected_ms, 99):.0f}/{max(rejected_ms):.0f} ms; other 0, hung 0; server RSS "
        f"{before['VmRSS'] / 1024:.0f} -> {after['VmRSS'] / 1024:.0f} MiB (peak "
        f"{after['VmHWM'] / 1024:.0f} MiB)"
    )
