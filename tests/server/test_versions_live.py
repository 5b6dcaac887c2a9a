"""Versions over the wire: canary splits (within statistical bounds, the same image always on
the same version, rollback), answers and traffic per version in GET and /metrics, one
version for eight identical uploads, partial answers when a tuner cannot be loaded, OIP per
version, and hot registration under load while the split keeps changing."""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from restuning.backbone import TorchBackbone
from tests.fixtures.live_server import LiveServer, StartServer
from tests.fixtures.models import tiny_images
from tests.fixtures.tuners import make_artifact, make_config

SPLIT_IMAGES = 400
CANARY_SHARE = 0.10
SIGMAS = 5.0
"""Accepted distance from the expected canary count, in binomial standard deviations."""
PER_REQUEST = 8  # the live server's max_images_per_request
GUARD_S = 30.0
"""Upper bound of waits for background work; a hang guard, not a latency check."""


def artifact(name: str, backbone: TorchBackbone, seed: int) -> bytes:
    return make_artifact(make_config(name, backbone), backbone.final_norm, seed=seed)


def noise_pngs(n: int, seed: int) -> list[bytes]:
    """``n`` distinct PNG files of random pixels (distinct pixel digests)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def form(images: list[bytes], tasks: str, top_k: int = 1) -> dict[str, Any]:
    return {
        "files": [("image", (f"i{i}.png", b, "image/png")) for i, b in enumerate(images)],
        "data": {"tasks": tasks, "top_k": str(top_k)},
    }


def versions_for(client: httpx.Client, images: list[bytes], task: str) -> list[int]:
    """The version that answered ``task`` for each image, in order."""
    out: list[int] = []
    for start in range(0, len(images), PER_REQUEST):
        resp = client.post("/v1/predict", **form(images[start : start + PER_REQUEST], task))
        assert resp.status_code == 200, resp.text
        for result in resp.json()["results"]:
            answer = result["tasks"][task]
            assert len(answer["sha256"]) == 64
            out.append(answer["version"])
    return out


def metric(text: str, name: str, labels: str = "") -> float | None:
    """A sample of the exposition text (labels as rendered: sorted by name)."""
    series = f"{name}{{{labels}}}" if labels else name
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> Iterator[httpx.Client]:
    with live_server.client() as c:
        yield c


def test_canary_split_rollback_and_what_it_reports(
    client: httpx.Client, live_server: LiveServer, tiny_backbone: TorchBackbone
) -> None:
    name = "canary"
    for seed in (1, 2):
        assert live_server.register(name, artifact(name, tiny_backbone, seed)).status_code == 201
    admin = live_server.admin_headers
    put = client.put(
        f"/v1/tuners/{name}/traffic", json={"traffic": {"1": 90, "2": 10}}, headers=admin
    )
    assert put.status_code == 200, put.text
    assert put.json() == {"name": name, "current": 2, "traffic": {"1": 90, "2": 10}}
    assert client.get(f"/v1/tuners/{name}/traffic").json() == put.json()

    images = noise_pngs(SPLIT_IMAGES, seed=1)
    first = versions_for(client, images, name)
    canary = first.count(2)
    expected = SPLIT_IMAGES * CANARY_SHARE
    sigma = (SPLIT_IMAGES * CANARY_SHARE * (1 - CANARY_SHARE)) ** 0.5
    print(f"\ncanary split 90/10 over {SPLIT_IMAGES} images: v2 answered {canary}")
    assert abs(canary - expected) <= SIGMAS * sigma, canary
    assert set(first) == {1, 2}
    assert versions_for(client, images, name) == first  # a retry gets the same version

    detail = client.get(f"/v1/tuners/{name}").json()
    assert detail["traffic"] == {"1": 90, "2": 10}
    answers = {v["version"]: v["answers"] for v in detail["versions"]}
    assert answers == {1: 2 * first.count(1), 2: 2 * canary}
    text = client.get("/metrics").text
    assert metric(text, "restune_answers_total", f'task="{name}",version="2"') == 2 * canary
    assert metric(text, "restune_tuner_traffic_weight", f'task="{name}",version="1"') == 90
    assert metric(text, "restune_tuner_location", f'location="host",task="{name}",version="2"')

    # 100 to the older version: the rollback. It becomes current; every image gets it.
    back = client.put(f"/v1/tuners/{name}/traffic", json={"traffic": {"1": 100}}, headers=admin)
    assert back.json() == {"name": name, "current": 1, "traffic": {"1": 100}}
    assert set(versions_for(client, images[:16], name)) == {1}
    assert client.get(f"/v1/tuners/{name}").json()["version"] == 1
    # A new upload is current again, and clears any split.
    assert live_server.register(name, artifact(name, tiny_backbone, 3)).status_code == 201
    assert set(versions_for(client, images[:16], name)) == {3}


@pytest.mark.redis
def test_a_rollout_across_two_replicas_on_redis(
    live_server_factory: StartServer, clean_redis: str, tiny_backbone: TorchBackbone
) -> None:
    """Replica a stages, splits, keeps the split on upload and deletes a version; b follows."""
    a = live_server_factory(RESTUNE_STORE=clean_redis)
    b = live_server_factory(RESTUNE_STORE=clean_redis)
    name = "rollout"
    admin = a.admin_headers
    images = noise_pngs(40, seed=3)

    def b_sees(condition: Any) -> None:
        deadline = time.monotonic() + GUARD_S
        while not condition():
            assert time.monotonic() < deadline, "replica b did not follow"
            time.sleep(0.05)

    with a.client() as ca, b.client() as cb:
        assert a.register(name, artifact(name, tiny_backbone, 1)).status_code == 201
        staged = ca.put(
            f"/v1/tuners/{name}?promote=false",
            content=artifact(name, tiny_backbone, 2),
            headers={**admin, "Content-Type": "application/octet-stream"},
        )
        assert (staged.status_code, staged.json()["current"]) == (201, False)
        b_sees(lambda: cb.get(f"/v1/tuners/{name}").status_code == 200)
        assert set(versions_for(cb, images[:8], name)) == {1}  # staged: no traffic on b either
        both = cb.post("/v1/predict", **form(images[:1], f"{name}@2,{name}@1")).json()
        assert [both["results"][0]["tasks"][k]["version"] for k in (f"{name}@2", f"{name}@1")] == [
            2,
            1,
        ]

        split = {"traffic": {"1": 50, "2": 50}}
        assert ca.put(f"/v1/tuners/{name}/traffic", json=split, headers=admin).status_code == 200
        kept = a.register(name, artifact(name, tiny_backbone, 3))
        assert (kept.status_code, kept.json()["current"]) == (201, False)
        b_sees(lambda: cb.get(f"/v1/tuners/{name}/traffic").json()["traffic"] == split["traffic"])
        on_b = versions_for(cb, images, name)
        assert set(on_b) == {1, 2}
        assert versions_for(ca, images, name) == on_b  # the same image, the same version

        refused = ca.delete(f"/v1/tuners/{name}/versions/1", headers=admin)
        assert (refused.status_code, refused.json()["code"]) == (409, "version_in_use")
        forced = ca.delete(f"/v1/tuners/{name}/versions/1?force=true", headers=admin)
        assert forced.json() == {"name": name, "version": 1, "deleted": True, "current": 2}
        b_sees(lambda: cb.get(f"/v1/tuners/{name}/traffic").json()["traffic"] == {"2": 100})
        assert set(versions_for(cb, images[:8], name)) == {2}
        gone = cb.post("/v1/predict", **form(images[:1], f"{name}@1"))
        assert (gone.status_code, gone.json()["code"]) == (404, "unknown_version")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"traffic": {"9": 100}}, 422, "invalid_traffic"),
        ({"traffic": {"1": 0, "2": 0}}, 422, "invalid_traffic"),
        ({"traffic": {"1": -1, "2": 10}}, 422, "validation_error"),
        ({"traffic": {"1": 50.5}}, 422, "validation_error"),
        ({"traffic": {"x": 50}}, 422, "validation_error"),
        ({"traffic": {}}, 422, "validation_error"),
        ({"weights": {"1": 100}}, 422, "validation_error"),
        ({"traffic": {str(v): 1 for v in range(1, 18)}}, 422, "validation_error"),
    ],
)
def test_bad_traffic_is_refused(
    body: dict[str, Any],
    status: int,
    code: str,
    client: httpx.Client,
    live_server: LiveServer,
    tiny_backbone: TorchBackbone,
) -> None:
    name = "split-bad"
    if client.get(f"/v1/tuners/{name}").status_code == 404:
        for seed in (1, 2):
            assert (
                live_server.register(name, artifact(name, tiny_backbone, seed)).status_code == 201
            )
    resp = client.put(f"/v1/tuners/{name}/traffic", json=body, headers=live_server.admin_headers)
    assert (resp.status_code, resp.json()["code"]) == (status, code), resp.text
    assert client.get(f"/v1/tuners/{name}").json()["traffic"] == {"2": 100}


def test_traffic_route_errors(client: httpx.Client, live_server: LiveServer) -> None:
    admin = live_server.admin_headers
    missing = client.put("/v1/tuners/nope/traffic", json={"traffic": {"1": 100}}, headers=admin)
    assert (missing.status_code, missing.json()["code"]) == (404, "tuner_not_found")
    assert client.get("/v1/tuners/nope/traffic").status_code == 404
    form_body = client.put("/v1/tuners/nope/traffic", data={"traffic": "1"}, headers=admin)
    assert form_body.status_code == 415
    anonymous = client.put("/v1/tuners/nope/traffic", json={"traffic": {"1": 100}})
    assert anonymous.status_code == 401


def test_eight_concurrent_identical_uploads_one_version_one_load(
    client: httpx.Client, live_server: LiveServer, tiny_backbone: TorchBackbone
) -> None:
    def loads() -> float:
        text = client.get("/metrics").text
        return metric(text, "restune_tuner_load_seconds_count") or 0.0

    name = "eightfold"
    data = artifact(name, tiny_backbone, 4)
    before = loads()
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: live_server.register(name, data), range(8)))
    assert sorted(r.status_code for r in responses) == [200] * 7 + [201]
    assert {r.json()["version"] for r in responses} == {1}
    assert len(client.get(f"/v1/tuners/{name}").json()["versions"]) == 1
    assert loads() - before == 1


def test_partial_answers_when_a_tuner_cannot_be_loaded(
    client: httpx.Client, live_server: LiveServer, tiny_backbone: TorchBackbone
) -> None:
    """b's blob rots in the store after registration and b leaves memory: a request for a
    and b answers a, and b with a per-task error; unknown tasks and bad images still fail
    the whole request up front."""
    for name, seed in (("part-a", 1), ("part-b", 2)):
        assert live_server.register(name, artifact(name, tiny_backbone, seed)).status_code == 201
    blob = live_server.workdir / "store" / "part-b" / "1.safetensors"
    blob.write_bytes(blob.read_bytes()[:-16] + b"\x00" * 16)
    unload = "/v2/repository/models/part-b/unload"
    assert client.post(unload, headers=live_server.admin_headers).status_code == 200
    images = tiny_images(2, seed=8)
    resp = client.post("/v1/predict", **form(images, "part-a,part-b", top_k=2))
    assert resp.status_code == 200, resp.text
    for result in resp.json()["results"]:
        assert result["tasks"]["part-a"]["version"] == 1
        assert len(result["tasks"]["part-a"]["labels"]) == 2
        assert result["tasks"]["part-b"]["error"]["code"] == "tuner_load_failed"
    unknown = client.post("/v1/predict", **form(images, "part-a,part-b,ghost"))
    assert (unknown.status_code, unknown.json()["code"]) == (404, "unknown_task")
    bad = client.post("/v1/predict", **form([images[0], b"\x89PNG-not"], "part-a,part-b"))
    assert (bad.status_code, bad.json()["code"]) == (422, "bad_image")


def test_oip_routes_per_version(
    client: httpx.Client, live_server: LiveServer, tiny_backbone: TorchBackbone
) -> None:
    name = "oip-versions"
    for seed in (1, 2):
        assert live_server.register(name, artifact(name, tiny_backbone, seed)).status_code == 201
    assert client.get(f"/v2/models/{name}/versions/2/ready").status_code == 200
    # v1 is stored but was swapped out of memory: ready all the same (a request loads it).
    assert client.get(f"/v2/models/{name}/versions/1/ready").status_code == 200
    meta = client.get(f"/v2/models/{name}/versions/1")
    assert meta.status_code == 200, meta.text
    assert meta.json()["versions"] == ["1", "2"]
    assert meta.json()["parameters"]["version"] == "1"
    assert client.get(f"/v2/models/{name}/versions/1/ready").status_code == 200
    image = tiny_images(1, seed=3)[0]
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(image).decode()],
            }
        ]
    }
    scores = {}
    for version in ("1", "2"):
        resp = client.post(f"/v2/models/{name}/versions/{version}/infer", json=body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["model_version"] == version
        scores[version] = next(o for o in resp.json()["outputs"] if o["name"] == "scores")["data"]
        pinned = client.post("/v1/predict", **form([image], f"{name}@{version}", top_k=3))
        labels = pinned.json()["results"][0]["tasks"][name]["labels"]
        assert max(scores[version]) == pytest.approx(labels[0]["score"], rel=1e-5)
    assert scores["1"] != scores["2"]
    assert client.get(f"/v2/models/{name}/versions/7").status_code == 404
    assert client.get(f"/v2/models/{name}/versions/7/ready").status_code == 404
    assert client.post(f"/v2/models/{name}/versions/7/infer", json=body).status_code == 404


# --- hot registration under load, the canary split changing -------------------------------------


@pytest.mark.slow
def test_hot_registration_under_load_with_a_changing_canary_split(
    live_server_factory: StartServer, tiny_backbone: TorchBackbone
) -> None:
    """Requests run without pause while new versions are registered and the split between
    them keeps changing (canary, wider canary, rollback, new version): none fails."""
    server = live_server_factory()
    for name, seed in (("steady", 1), ("other", 2)):
        assert server.register(name, artifact(name, tiny_backbone, seed)).status_code == 201
    stop = threading.Event()
    failures: list[str] = []
    seen: Counter[int] = Counter()
    done = [0]
    images = noise_pngs(16, seed=5)

    def load(offset: int) -> None:
        with server.client() as c:
            i = offset
            while not stop.is_set():
                batch = [images[(i + k) % len(images)] for k in range(4)]
                i += 4
                resp = c.post("/v1/predict", **form(batch, "steady,other"))
                if resp.status_code != 200:
                    failures.append(f"{resp.status_code} {resp.text[:300]}")
                    continue
                for result in resp.json()["results"]:
                    for answer in result["tasks"].values():
                        if "error" in answer:
                            failures.append(str(answer))
                    seen[result["tasks"]["steady"]["version"]] += 1
                done[0] += 1

    def wait_for(condition: Any, what: str) -> None:
        deadline = time.monotonic() + GUARD_S
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    admin = server.admin_headers
    with ThreadPoolExecutor(3) as pool, server.client() as c:
        futures = [pool.submit(load, k * 5) for k in range(3)]
        try:
            wait_for(lambda: done[0] >= 5, "load to start")
            splits = [
                {"1": 90, "2": 10},
                {"1": 50, "2": 50},
                {"2": 100},  # roll forward
                {"1": 100},  # roll back
                {"1": 30, "2": 30, "3": 40},
                {"3": 100},
            ]
            for step, split in enumerate(splits):
                if step < 2 or step == 4:
                    seed = 10 + step
                    for name in ("steady", "other"):
                        new = server.register(name, artifact(name, tiny_backbone, seed))
                        assert new.status_code == 201, new.text
                # Versions of steady: 1 (start), 2 (step 0), 3 (step 1), 4 (step 4)...
                resp = c.put("/v1/tuners/steady/traffic", json={"traffic": split}, headers=admin)
                assert resp.status_code == 200, resp.text
                before = done[0]
                wait_for(lambda b=before: done[0] >= b + 3, "requests under the new split")
        finally:
            stop.set()
            for f in futures:
                f.result()
    assert failures == []
    assert len(seen) >= 3, seen  # several versions answered mid-stream
    print(
        f"\nunder load with a changing split: {done[0]} requests, 0 failures, versions {dict(seen)}"
    )
