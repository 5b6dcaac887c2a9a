"""Faults lose nothing: Redis dies under traffic, the server dies mid-registration, a replica
restarts while another registers. Real processes only (redis-server, ``restune serve``).

What each test measures is printed (``-s``) and tabulated in docs/RELIABILITY.md; the time
bounds asserted here only catch hangs.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from restuning.backbone import TorchBackbone
from tests.fixtures.live_server import LiveServer, StartServer
from tests.fixtures.models import tiny_images
from tests.fixtures.redis_server import RedisProcess
from tests.fixtures.tuners import make_config
from tests.reliability import bad_artifacts as art
from tuners_store import open_store
from tuners_store.artifact import pack_artifact, random_arrays

pytestmark = [pytest.mark.slow]

HANG_S = 30.0
"""Longest wait for anything (a refusal, a resync, a restart): a guard against hangs only."""
MiB = 1024 * 1024


def wait_for(condition: Callable[[], Any], what: str, timeout: float = HANG_S) -> float:
    """Poll until ``condition()`` is truthy; seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def predict_form(image: bytes, tasks: str) -> dict[str, Any]:
    return {"files": [("image", ("x.png", image, "image/png"))], "data": {"tasks": tasks}}


@dataclass
class Traffic:
    """A thread posting predict requests back to back; every answer is recorded."""

    server: LiveServer
    tasks: str
    image: bytes = field(default_factory=lambda: tiny_images(1, seed=13)[0])
    ok_at: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    answers: set[tuple[str, int, str]] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with self.server.client() as c:
            while not self._stop.is_set():
                try:
                    resp = c.post("/v1/predict", **predict_form(self.image, self.tasks))
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if resp.status_code != 200:
                    self.failures.append(f"{resp.status_code} {resp.text[:300]}")
                    continue
                self.ok_at.append(time.monotonic())
                for name, answer in resp.json()["results"][0]["tasks"].items():
                    self.answers.add((name, answer.get("version", -1), answer.get("sha256", "")))

    def ok_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.ok_at if start <= t <= end)

    @contextmanager
    def running(self) -> Iterator[Traffic]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(HANG_S)
            assert not thread.is_alive(), "a predict request hung"


def artifact(name: str, backbone: TorchBackbone, seed: int) -> bytes:
    return art.valid(name, backbone, seed=seed)


def put(server: LiveServer, name: str, data: bytes) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    resp = server.register(name, data)
    return resp, time.monotonic() - start


def serves(server: LiveServer, name: str, sha256: str | None = None, image: bytes = b"") -> bool:
    """Whether ``name`` answers a predict (with that sha256 when given)."""
    image = image or tiny_images(1, seed=2)[0]
    with server.client() as c:
        resp = c.post("/v1/predict", **predict_form(image, name))
    if resp.status_code != 200:
        return False
    answer = resp.json()["results"][0]["tasks"][name]
    return sha256 is None or answer.get("sha256") == sha256


# --- Redis dies while requests flow --------------------------------------------------------------


@pytest.mark.redis
def test_redis_outage_keeps_predict_working_and_registration_refused(
    live_server_factory: StartServer, redis_process: RedisProcess, tiny_backbone: TorchBackbone
) -> None:
    server = live_server_factory(RESTUNE_STORE=redis_process.url)
    for name, seed in (("ft-a", 1), ("ft-b", 2)):
        assert put(server, name, artifact(name, tiny_backbone, seed))[0].status_code == 201
    # Persist what was acknowledged (an operator runs Redis with AOF; SAVE is its stand-in).
    client = redis.Redis.from_url(redis_process.url)
    client.save()
    client.close()

    traffic = Traffic(server, "ft-a,ft-b")
    with traffic.running():
        wait_for(lambda: len(traffic.ok_at) >= 10, "traffic to start")
        killed_at = time.monotonic()
        redis_process.kill()

        refused, refused_s = put(server, "ft-c", artifact("ft-c", tiny_backbone, 3))
        assert (refused.status_code, refused.json()["code"]) == (503, "store_unavailable")
        assert int(refused.headers["retry-after"]) >= 1
        replaced, _ = put(server, "ft-a", artifact("ft-a", tiny_backbone, 9))
        assert replaced.status_code == 503
        with server.client() as c:
            deleted = c.delete("/v1/tuners/ft-b", headers=server.admin_headers)
            assert (deleted.status_code, deleted.json()["code"]) == (503, "store_unavailable")
            # Still ready (it serves what it has loaded); the outage shows in its store field.
            ready = c.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["store"]["index"] == "stale"
            listed = c.get("/v1/tuners")
            assert listed.status_code == 200
            assert {t["name"] for t in listed.json()["tuners"]} == {"ft-a", "ft-b"}
        before = len(traffic.ok_at)
        wait_for(lambda: len(traffic.ok_at) >= before + 20, "predicts while Redis is down")
        restarted_at = time.monotonic()
        during = traffic.ok_between(killed_at, restarted_at)

        redis_process.start()  # same port and dir: loads the saved snapshot
        with server.client() as c:
            ready_s = wait_for(
                lambda: c.get("/readyz").json()["store"]["index"] == "current", "store back"
            )
        # Another path writes to the store (a second replica would do the same).
        late = artifact("ft-d", tiny_backbone, 4)

        async def put_elsewhere() -> None:
            store = open_store(redis_process.url)
            try:
                await store.put("ft-d", late)
            finally:
                await store.close()

        asyncio.run(put_elsewhere())
        servable_s = wait_for(lambda: serves(server, "ft-d"), "ft-d registered elsewhere")
        after, _ = put(server, "ft-c", artifact("ft-c", tiny_backbone, 3))
        assert after.status_code == 201, after.text
    assert traffic.failures == []
    # Nothing acknowledged was lost, nothing refused was half-applied.
    with server.client() as c:
        tuners = {t["name"]: t["version"] for t in c.get("/v1/tuners").json()["tuners"]}
    assert tuners == {"ft-a": 1, "ft-b": 1, "ft-c": 1, "ft-d": 1}
    assert {(n, v) for n, v, _ in traffic.answers} == {("ft-a", 1), ("ft-b", 1)}
    print(
        f"redis outage: {len(traffic.ok_at)} predicts, 0 failed, {during} while Redis was down; "
        f"PUT refused in {refused_s * 1000:.0f} ms (503 store_unavailable, Retry-After "
        f"{refused.headers['retry-after']}); store back {ready_s:.2f} s after restart; a tuner put "
        f"by another client servable {servable_s:.2f} s later"
    )


# --- the server is SIGKILLed in the middle of a registration ----------------------------------


def big_artifact(name: str, backbone: TorchBackbone, seed: int) -> bytes:
    """~6 MB: bottleneck 4096 on every block and a 16384-d embedding head."""
    config = make_config(name, backbone, task="embedding", embedding_dim=16384, bottleneck=4096)
    return pack_artifact(config, random_arrays(config, seed=seed))


def slow_body(data: bytes, chunk: int = 256 * 1024, pause_s: float = 0.01) -> Iterator[bytes]:
    """The artifact streamed like a slow client sends it (about 25 MB/s)."""
    for start in range(0, len(data), chunk):
        yield data[start : start + chunk]
        time.sleep(pause_s)


def upload_in_background(server: LiveServer, name: str, body: bytes | Iterator[bytes]) -> None:
    def send() -> None:
        try:
            with server.client() as c:
                c.put(
                    f"/v1/tuners/{name}",
                    content=body,
                    headers={**server.admin_headers, "Content-Type": "application/octet-stream"},
                )
        except httpx.HTTPError:
            pass  # the server died under it: expected

    threading.Thread(target=send, daemon=True).start()


def check_not_torn(server: LiveServer, name: str, allowed: set[str], store: Path) -> str:
    """The current version is one of ``allowed`` and every listed version loads."""
    with server.client() as c:
        detail = c.get(f"/v1/tuners/{name}").json()
        assert detail["sha256"] in allowed, detail
        image = tiny_images(1, seed=6)[0]
        for version in detail["versions"]:
            pinned = f"{name}@{version['version']}"
            resp = c.post("/v1/predict", **predict_form(image, pinned))
            assert resp.status_code == 200, resp.text
            answer = resp.json()["results"][0]["tasks"][name]
            assert answer["sha256"] == version["sha256"], answer
            blob = store / name / f"{version['version']}.safetensors"
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == version["sha256"]
    sha: str = detail["sha256"]
    return sha


def test_sigkill_mid_registration_leaves_old_or_new_never_torn(
    live_server_factory: StartServer, tiny_backbone: TorchBackbone, tmp_path: Path
) -> None:
    store = tmp_path / "shared-store"
    env = {"RESTUNE_STORE": f"file://{store}", "RESTUNE_MAX_ARTIFACT_BYTES": str(64 * MiB)}
    name = "crash"
    server = live_server_factory(**env)
    first = big_artifact(name, tiny_backbone, seed=0)
    resp, full_s = put(server, name, first)
    assert resp.status_code == 201
    current = hashlib.sha256(first).hexdigest()
    outcomes = []
    # Kill points: mid-upload (slow client), then fractions of a full-speed registration.
    plans: list[tuple[str, float]] = [("slow-upload", 0.1)]
    plans += [("full-speed", f * full_s) for f in (0.5, 1.0, 2.0)]
    for attempt, (how, delay) in enumerate(plans, start=1):
        new = big_artifact(name, tiny_backbone, seed=attempt)
        new_sha = hashlib.sha256(new).hexdigest()
        body = slow_body(new) if how == "slow-upload" else new
        upload_in_background(server, name, body)
        time.sleep(delay)
        server.kill()
        server = live_server_factory(**env)
        now = check_not_torn(server, name, {current, new_sha}, store)
        outcomes.append("new" if now == new_sha else "old")
        current = now
    # And the store still takes registrations after all that.
    final = big_artifact(name, tiny_backbone, seed=99)
    assert put(server, name, final)[0].status_code == 201
    assert check_not_torn(server, name, {hashlib.sha256(final).hexdigest()}, store)
    assert len(outcomes) == len(plans)
    print(
        f"sigkill mid-registration: {len(plans)} kills (full registration {full_s * 1000:.0f} "
        f"ms, artifact {len(first) / MiB:.1f} MiB): outcomes {outcomes}, 0 torn, "
        "0 listed-but-unloadable"
    )


# --- a replica restarts while another registers ------------------------------------------------


@pytest.mark.redis
def test_replica_restarting_while_another_registers_serves_the_newest(
    live_server_factory: StartServer, clean_redis: str, tiny_backbone: TorchBackbone
) -> None:
    a = live_server_factory(RESTUNE_STORE=clean_redis)
    b = live_server_factory(RESTUNE_STORE=clean_redis)
    for name in ("rep-x", "rep-gone"):
        assert put(a, name, artifact(name, tiny_backbone, 1))[0].status_code == 201
    wait_for(lambda: serves(b, "rep-x") and serves(b, "rep-gone"), "B to serve the first set")

    b.kill()  # a crash, not a drain
    done = threading.Event()
    registered: list[tuple[str, str]] = []  # (name, sha256) acknowledged by A, in order

    failures: list[str] = []

    def register_on_a() -> None:
        seed = 10
        while not done.is_set() or len(registered) < 6:
            resp, _ = put(a, "rep-x", artifact("rep-x", tiny_backbone, seed))
            if resp.status_code != 201:
                failures.append(f"PUT rep-x: {resp.status_code} {resp.text[:300]}")
                return
            registered.append(("rep-x", resp.json()["sha256"]))
            seed += 1
            time.sleep(0.05)
        with a.client() as c:
            deleted = c.delete("/v1/tuners/rep-gone", headers=a.admin_headers)
        resp, _ = put(a, "rep-new", artifact("rep-new", tiny_backbone, 5))
        if deleted.status_code != 200 or resp.status_code != 201:
            failures.append(f"DELETE {deleted.status_code}, PUT rep-new {resp.status_code}")
            return
        registered.append(("rep-new", resp.json()["sha256"]))

    writer = threading.Thread(target=register_on_a, daemon=True)
    writer.start()
    restart_started = time.monotonic()
    b = live_server_factory(RESTUNE_STORE=clean_redis)  # starts while A keeps registering
    restart_s = time.monotonic() - restart_started
    done.set()
    writer.join(HANG_S)
    assert not writer.is_alive()
    assert failures == []

    newest = {name: sha for name, sha in registered}
    converge_s = wait_for(
        lambda: all(serves(b, n, s) for n, s in newest.items()) and not serves(b, "rep-gone"),
        "B to serve the newest versions",
    )
    with a.client() as ca, b.client() as cb:
        assert ca.get("/v1/tuners").json() == cb.get("/v1/tuners").json()
    print(
        f"replica restart: B back in {restart_s:.1f} s while A registered "
        f"{len(registered)} versions; B served the newest {converge_s:.2f} s after A finished"
    )
