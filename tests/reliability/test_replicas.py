"""Two replicas behind the shipped nginx config, one Redis, closed-loop clients: restarts and
store outages never reach a client.

The topology of docker-compose.yml with local processes: two ``restune serve`` replicas
(:class:`LiveServer`) on one real redis-server, and nginx running ``deploy/nginx/nginx.conf``
adapted only where Docker is assumed (its DNS name and resolver become the replicas'
addresses; pid, temp paths and the port become the test's). Eight clients post predictions
back to back through nginx while, one after another:

1. a replica is SIGKILLed (then started again, as a supervisor would);
2. both replicas are restarted one at a time, the procedure of docs/DEPLOY.md;
3. Redis is down for 5 s, and right after it returns a new version is registered elsewhere:
   each replica's catch-up time is measured (Redis back -> that replica serves it);
4. a replica restarts while Redis is down (it cannot read the index, so it answers 503
   ``store_unavailable`` and nginx asks the other one);
5. Redis goes down just after a replica restarted (it has nothing loaded yet).

A table of requests, failures, nginx retries and catch-up times is printed (``-s``); the test
asserts 0 failed requests and that no prediction was computed to completion by two replicas.
``RESTUNE_TEST_BASELINE_TREE=/path/to/an/older/checkout`` runs the replicas and the nginx
config of that tree instead (the test's own code stays), to measure the same table before a
change; it is expected to fail there.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from restuning.backbone import TorchBackbone
from tests.deploy.local_nginx import Nginx
from tests.fixtures.live_server import REPO_ROOT, SERVE_COMMAND, LiveServer
from tests.fixtures.models import tiny_images
from tests.fixtures.redis_server import RedisProcess, free_port
from tests.fixtures.tuners import make_artifact, make_config
from tuners_store import open_store

pytestmark = [pytest.mark.slow, pytest.mark.redis]

CLIENTS = 8
TASKS = "rp-a,rp-b"
PROBE = "rp-probe"
"""A tuner both replicas have loaded, given a new version right after Redis returns."""
OUTAGE_S = 5.0
HANG_S = 60.0
BASELINE = os.environ.get("RESTUNE_TEST_BASELINE_TREE")
TREE = Path(BASELINE) if BASELINE else REPO_ROOT


# --- replicas ------------------------------------------------------------------------------------


@dataclass
class Replica:
    """One replica slot: a fixed port, restarted as new processes (each with its own log)."""

    name: str
    port: int
    base: Path
    env: dict[str, str]
    server: LiveServer | None = None
    incarnations: list[LiveServer] = field(default_factory=list)

    def start(self, *, wait_ready: bool = True) -> float:
        """Start a new process on the slot's port; seconds until ready (or listening)."""
        env = dict(self.env)
        command = SERVE_COMMAND
        if BASELINE:
            # -P: the baseline's packages, not the ones in the working directory.
            env["PYTHONPATH"] = BASELINE
            command = (sys.executable, "-P", "-m", "server", "serve")
        workdir = self.base / f"{self.name}-{len(self.incarnations)}"
        self.server = LiveServer(workdir, env, command=command, args=("--port", str(self.port)))
        self.incarnations.append(self.server)
        started = time.monotonic()
        self.server.start(timeout=HANG_S, wait_ready=wait_ready)
        return time.monotonic() - started

    def stop(self, sig: int = signal.SIGTERM) -> None:
        assert self.server is not None
        if sig == signal.SIGKILL:
            self.server.kill()
        else:
            self.server.stop(sig, timeout=HANG_S)

    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def logged_after(self, wall: float, text: str) -> float:
        """Seconds from ``wall`` (epoch) to the first line of this process's log holding
        ``text`` after it: when the replica did it, not when a client noticed."""
        assert self.server is not None
        for line in self.server.stderr_text().splitlines():
            if line.startswith("{") and text in line:
                ts = datetime.fromisoformat(json.loads(line)["ts"]).timestamp()
                if ts >= wall:
                    return ts - wall
        return float("nan")  # not logged (a baseline tree)

    def predictions_logged(self) -> list[tuple[str, int]]:
        """(request id, status) of every predict any incarnation logged."""
        out = []
        for server in self.incarnations:
            for line in server.stderr_text().splitlines():
                if not line.startswith("{"):
                    continue
                record = json.loads(line)
                if record.get("route") == "/v1/predict" and "request_id" in record:
                    out.append((str(record["request_id"]), int(record["status"])))
        return out


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def wait_for(condition: Callable[[], Any], what: str, timeout: float = HANG_S) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - start


# --- load ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    started: float
    status: int
    """0: no HTTP answer (transport error or hang)."""
    code: str | None
    request_id: str | None


class Load:
    """``CLIENTS`` closed-loop clients posting predictions through nginx, in a thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        images = tiny_images(CLIENTS, seed=23)
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=self.url, timeout=30.0, limits=limits) as client:

            async def worker(i: int) -> None:
                files = [("image", ("x.png", images[i], "image/png"))]
                while not self._stop.is_set():
                    started = time.monotonic()
                    try:
                        resp = await client.post("/v1/predict", files=files, data={"tasks": TASKS})
                    except httpx.HTTPError as exc:
                        self.outcomes.append(Outcome(started, 0, type(exc).__name__, None))
                        continue
                    code = None
                    if resp.status_code != 200:
                        try:
                            code = str(resp.json().get("code"))
                        except ValueError:  # nginx's own HTML page
                            code = " ".join(re.findall(r"<title>([^<]*)</title>", resp.text))
                    rid = resp.headers.get("x-request-id")
                    self.outcomes.append(Outcome(started, resp.status_code, code, rid))

            await asyncio.gather(*(worker(i) for i in range(CLIENTS)))

    @contextmanager
    def running(self) -> Iterator[Load]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(HANG_S)
            assert not self._thread.is_alive(), "a client hung"

    def between(self, start: float, end: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if start <= o.started < end]


@dataclass
class Row:
    scenario: str
    requests: int
    failed: int
    failures: str
    retried: int
    twice: int
    note: str = ""


# --- the test ------------------------------------------------------------------------------------


def artifact(name: str, backbone: TorchBackbone, seed: int = 0) -> bytes:
    return make_artifact(make_config(name, backbone), backbone.final_norm, seed=seed)


def answer_of(replica: Replica, tasks: str) -> str:
    """A predict straight to ``replica``: ``"<status> <code>"`` or, for a 200, the
    per-task error codes (``"200 ok"`` when every task answered)."""
    with httpx.Client(base_url=replica.url(), timeout=30) as c:
        resp = c.post(
            "/v1/predict",
            files=[("image", ("x.png", tiny_images(1)[0], "image/png"))],
            data={"tasks": tasks},
        )
    if resp.status_code != 200:
        return f"{resp.status_code} {resp.json().get('code')}"
    answers = resp.json()["results"][0]["tasks"].values()
    errors = sorted({a["error"]["code"] for a in answers if "error" in a})
    return f"200 {','.join(errors) or 'ok'}"


def serves_probe(replica: Replica, version: int) -> bool:
    """Whether ``replica`` serves version ``version`` of the probe tuner (its detail says so
    once that version is loaded and swapped in)."""
    try:
        with httpx.Client(base_url=replica.url(), timeout=5) as c:
            detail = c.get(f"/v1/tuners/{PROBE}")
    except httpx.TransportError:
        return False
    return detail.status_code == 200 and detail.json()["version"] == version


def warm(replica: Replica) -> None:
    """Load every tuner on ``replica`` (a predict straight to it)."""
    assert answer_of(replica, f"{TASKS},{PROBE}") == "200 ok"


def test_restarts_and_store_outages_never_reach_clients(
    tmp_path: Path, redis_process: RedisProcess, tiny_backbone: TorchBackbone
) -> None:
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    store_url = redis_process.url
    admin = redis.Redis.from_url(store_url)
    env = {"RESTUNE_STORE": store_url, "RESTUNE_GRACEFUL_SHUTDOWN_S": "10"}
    replicas = [Replica(n, free_port(), tmp_path, env) for n in ("a", "b")]
    nginx: list[Nginx] = []
    try:
        starting = [threading.Thread(target=r.start) for r in replicas]
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join(HANG_S * 2)
        assert all(r.server is not None and ready(r.url()) for r in replicas)
        a, b = replicas
        for name in (*TASKS.split(","), PROBE):
            assert a.server is not None
            assert a.server.register(name, artifact(name, tiny_backbone)).status_code == 201
        probe_version = 1

        direct: list[str] = []
        """What b itself answered (not through nginx) while it could not reach Redis."""

        wait_for(lambda: serves_probe(b, 1), "b to follow a's registrations")
        for replica in replicas:
            warm(replica)
        admin.save()  # what was acknowledged survives a Redis restart (AOF in production)

        nginx.append(
            Nginx(
                TREE / "deploy" / "nginx" / "nginx.conf",
                tmp_path / "nginx",
                [r.port for r in replicas],
            )
        )
        nginx[0].start()
        load = Load(nginx[0].url)
        marks: list[tuple[str, float, float, str]] = []

        @contextmanager
        def scenario(name: str) -> Iterator[list[str]]:
            notes: list[str] = []
            start = time.monotonic()
            time.sleep(0.5)  # steady traffic first
            yield notes
            time.sleep(0.5)  # and after
            marks.append((name, start, time.monotonic(), "; ".join(notes)))

        with load.running():
            wait_for(lambda: len(load.outcomes) >= 20, "traffic to flow")

            with scenario("SIGKILL of replica b (restarted)") as notes:
                b.stop(signal.SIGKILL)
                time.sleep(2.0)
                notes.append(f"b back and ready in {b.start():.1f} s")

            with scenario("rolling restart (docs/DEPLOY.md)") as notes:
                for replica in replicas:
                    replica.stop(signal.SIGTERM)
                    notes.append(f"{replica.name} ready in {replica.start():.1f} s")

            with scenario(f"Redis down {OUTAGE_S:.0f} s") as notes:
                for replica in replicas:
                    warm(replica)  # both serve the probe's current version from memory
                admin.save()
                redis_process.kill()
                time.sleep(OUTAGE_S)
                redis_process.start()
                back, back_wall = time.monotonic(), time.time()

                async def put_probe() -> int:
                    async with open_store(store_url) as other:
                        data = artifact(PROBE, tiny_backbone, seed=probe_version + 1)
                        return (await other.put(PROBE, data)).info.version

                probe_version = asyncio.run(put_probe())
                admin.save()
                put_s = time.monotonic() - back
                caught: dict[str, float] = {}
                while len(caught) < len(replicas):
                    assert time.monotonic() - back < HANG_S, "a replica never caught up"
                    for r in replicas:
                        if r.name not in caught and serves_probe(r, probe_version):
                            caught[r.name] = time.monotonic() - back
                    time.sleep(0.01)

                def after(what: str) -> str:
                    return ", ".join(
                        f"{r.name} {r.logged_after(back_wall, what):.2f}" for r in replicas
                    )

                notes.append(
                    f"after Redis returned: index re-read {after('tuner index read')} s, "
                    f"new version swapped in {after(f'now serving tuner {PROBE}')} s, seen by a "
                    "client "
                    + ", ".join(f"{n} {t:.2f}" for n, t in sorted(caught.items()))
                    + f" s (the put: {put_s:.2f} s)"
                )

            with scenario("replica b restarted while Redis is down") as notes:
                admin.save()
                redis_process.kill()
                b.stop(signal.SIGTERM)
                b.start(wait_ready=False)
                time.sleep(2.0)
                assert not ready(b.url()), "b cannot have read the index"
                direct.append(answer_of(b, TASKS))
                notes.append(f"b itself answered {direct[-1]}")
                redis_process.start()
                ready_s = wait_for(lambda: ready(b.url()), "b ready")
                notes.append(f"b ready {ready_s:.2f} s after Redis returned")

            with scenario("Redis down just after replica b restarted") as notes:
                b.stop(signal.SIGTERM)
                b.start()
                admin.save()
                redis_process.kill()
                direct.append(answer_of(b, PROBE))  # known to b, never loaded there
                notes.append(f"b itself answered {direct[-1]}")
                time.sleep(OUTAGE_S)
                redis_process.start()
                wait_for(lambda: serves_probe(b, probe_version), "b to serve again")
    finally:
        for proxy in nginx:
            proxy.stop()
        for replica in replicas:
            if replica.server is not None:
                replica.server.stop(timeout=15)
        admin.close()

    rows = tabulate(marks, load, nginx[0], replicas)
    print_table(rows)
    for row in rows:
        assert (row.failed, row.twice) == (0, 0), row
    # Not 404 unknown_task, not a 200 with a per-task load error: retryable, for the request.
    assert direct == ["503 store_unavailable"] * 2


def tabulate(
    marks: list[tuple[str, float, float, str]], load: Load, nginx: Nginx, replicas: list[Replica]
) -> list[Row]:
    logged = Counter(
        rid for r in replicas for rid, status in r.predictions_logged() if status == 200
    )
    retried_ids = {
        rec["request_id"]
        for rec in nginx.records()
        if rec.get("uri") == "/v1/predict" and "," in str(rec.get("upstream", ""))
    }
    rows = []
    for name, start, end, note in marks:
        outcomes = load.between(start, end)
        failed = [o for o in outcomes if o.status != 200]
        kinds = Counter(f"{o.status} {o.code}" for o in failed)
        ids = {o.request_id for o in outcomes if o.request_id}
        rows.append(
            Row(
                scenario=name,
                requests=len(outcomes),
                failed=len(failed),
                failures=", ".join(f"{k} x{n}" for k, n in kinds.most_common()) or "-",
                retried=len(ids & retried_ids),
                twice=sum(1 for rid in ids if logged[rid] > 1),
                note=note,
            )
        )
    return rows


def print_table(rows: list[Row]) -> None:
    header = f"{'scenario':42} {'requests':>8} {'failed':>6} {'retried':>7} {'twice':>5}  notes"
    print("\n" + ("baseline " + str(BASELINE) if BASELINE else "this tree"))
    print(header)
    for r in rows:
        print(
            f"{r.scenario:42} {r.requests:8d} {r.failed:6d} {r.retried:7d} {r.twice:5d}  {r.note}"
        )
        if r.failed:
            print(f"{'':42} failures: {r.failures}")
