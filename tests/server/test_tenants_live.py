"""Tenants on a real server: every tuner route, OIP included, refuses another tenant's token
(and no token, and a reader's token for writes), listings show one's own tenant only, and
per-tenant quotas answer 429 with Retry-After.

The routes are read from the tenant server's own OpenAPI, so a route added later without a
request here fails :func:`test_every_tenant_route_is_covered`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from restuning.backbone import TorchBackbone
from server.app import create_app
from server.settings import Settings
from server.tenancy import token_sha256
from tests.fixtures.live_server import TEST_ADMIN_TOKEN, LiveServer
from tests.fixtures.models import tiny_images
from tests.fixtures.tuners import make_artifact, make_config

TOKENS: dict[str, tuple[str, str | None]] = {
    "acme-writer": ("writer", "acme"),
    "acme-reader": ("reader", "acme"),
    "bolt-writer": ("writer", "bolt"),
    "bolt-reader": ("reader", "bolt"),
    "tiny-writer": ("writer", "tiny"),
    "slow-reader": ("reader", "slow"),
    "scraper": ("metrics", None),
}
"""Token (its own text, for the test) -> (scope, tenant)."""
TARGET = "acme/kept"
"""acme's tuner (versions 1 and 2) that the other tenant's requests must leave as it is."""
OWN = "acme/open"
"""acme's tuner for the requests acme itself may make."""
SLOW_BURST = 3
TENANT_PATHS = ("/v1/", "/v2/models", "/v2/repository")
LISTINGS = {
    ("GET", "/v1/tuners"),
    ("GET", "/v2/repository/index"),
    ("POST", "/v2/repository/index"),
    ("GET", "/v2/models/stats"),
}
WRITES = [("PUT", "/v1/tuners/{name}"), ("DELETE", "/v1/tuners/{name}")]
WRITES.append(("PUT", "/v1/tuners/{name}/traffic"))
WRITES.append(("DELETE", "/v1/tuners/{name}/versions/{version}"))
# Loading and unloading change what the replica holds: writers only, like the rest.
WRITES += [("POST", f"/v2/repository/models/{{task}}/{action}") for action in ("load", "unload")]
IMAGE = tiny_images(1, seed=2)[0]


def tenant_operations() -> list[tuple[str, str]]:
    """(method, path template) of every route a tenant token governs, from the OpenAPI."""
    spec = create_app(Settings(tenants_enabled=True)).openapi()
    return sorted(
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        for method in ops
        if path.startswith(TENANT_PATHS)
    )


OPERATIONS = tenant_operations()
IDS = [f"{m} {p}" for m, p in OPERATIONS]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def artifact(name: str, backbone: TorchBackbone, seed: int) -> bytes:
    """Artifact bytes of a tuner whose plain name is ``name``'s last part."""
    plain = name.rpartition("/")[2]
    return make_artifact(make_config(plain, backbone), backbone.final_norm, seed=seed)


def request(
    client: httpx.Client,
    method: str,
    template: str,
    name: str,
    headers: dict[str, str],
    backbone: TorchBackbone,
) -> httpx.Response:
    """The request of ``(method, template)`` aimed at tuner ``name``."""
    url = template.replace("{name}", name).replace("{task}", name).replace("{version}", "1")
    kwargs: dict[str, Any] = {"headers": dict(headers)}
    if template == "/v1/predict":
        kwargs["files"] = [("image", ("a.png", IMAGE, "image/png"))]
        kwargs["data"] = {"tasks": name}
    elif (method, template) == ("PUT", "/v1/tuners/{name}"):
        kwargs["content"] = artifact(name, backbone, seed=9)
        kwargs["headers"]["Content-Type"] = "application/octet-stream"
    elif template.endswith("/traffic") and method == "PUT":
        kwargs["json"] = {"traffic": {"1": 50, "2": 50}}
    elif template.endswith("/infer"):
        data = [base64.b64encode(IMAGE).decode()]
        kwargs["json"] = {
            "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": data}]
        }
    elif (method, template) == ("POST", "/v2/repository/index"):
        kwargs["json"] = {}
    return client.request(method, url, **kwargs)


def rows_of(body: Any) -> list[dict[str, Any]]:
    """The rows of a listing: ``tuners`` (/v1), ``model_stats`` (statistics) or the list."""
    if isinstance(body, dict):
        key = "tuners" if "tuners" in body else "model_stats"
        return list(body[key])
    return list(body)


def refused(resp: httpx.Response, status: int, template: str) -> None:
    """``resp`` is a refusal with ``status``, in the route family's error shape."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    if template.startswith("/v2/"):
        assert set(body) == {"error"}  # the protocol's own error shape
    else:
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert body["code"] == {401: "unauthorized", 403: "forbidden"}[status]


@pytest.fixture(scope="module")
def tenant_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_backbone: TorchBackbone
) -> Iterator[LiveServer]:
    """A tenant server: acme, bolt, tiny (small storage quota) and slow (small rate)."""
    workdir = tmp_path_factory.mktemp("tenant-server")
    size = len(artifact("x", tiny_backbone, seed=0))
    tokens_file: dict[str, Any] = {
        "tokens": [
            {"sha256": token_sha256(token), "scope": scope, "tenant": tenant, "label": token}
            for token, (scope, tenant) in TOKENS.items()
        ],
        "tenants": {
            "tiny": {"max_tuners": 2, "max_tuner_bytes": 3 * size + size // 2},
            "slow": {"requests_per_s": 0.01, "burst": SLOW_BURST},
        },
    }
    path = Path(workdir) / "tokens.json"
    path.write_text(json.dumps(tokens_file))
    server = LiveServer(
        workdir / "server",
        {"RESTUNE_TENANTS_ENABLED": "true", "RESTUNE_TOKENS_FILE": str(path)},
    ).start()
    try:
        with server.client() as c:
            for name, seeds in ((TARGET, (1, 2)), (OWN, (1, 2)), ("bolt/own", (1,))):
                writer = bearer(f"{name.partition('/')[0]}-writer")
                for seed in seeds:
                    resp = c.put(
                        f"/v1/tuners/{name}",
                        content=artifact(name, tiny_backbone, seed),
                        headers={**writer, "Content-Type": "application/octet-stream"},
                    )
                    assert resp.status_code == 201, resp.text
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(tenant_server: LiveServer) -> Iterator[httpx.Client]:
    with tenant_server.client() as c:
        yield c


def target_state(client: httpx.Client) -> dict[str, Any]:
    """What acme sees of its target tuner (must not change under the other tenant's hands)."""
    resp = client.get(f"/v1/tuners/{TARGET}", headers=bearer("acme-reader"))
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def test_every_tenant_route_is_covered() -> None:
    covered = {
        ("GET", "/v1/tuners"),
        ("GET", "/v1/tuners/{name}"),
        ("PUT", "/v1/tuners/{name}"),
        ("DELETE", "/v1/tuners/{name}"),
        ("DELETE", "/v1/tuners/{name}/versions/{version}"),
        ("GET", "/v1/tuners/{name}/traffic"),
        ("PUT", "/v1/tuners/{name}/traffic"),
        ("POST", "/v1/predict"),
        ("GET", "/v2/models/{task}"),
        ("GET", "/v2/models/{task}/ready"),
        ("POST", "/v2/models/{task}/infer"),
        ("GET", "/v2/models/{task}/versions/{version}"),
        ("GET", "/v2/models/{task}/versions/{version}/ready"),
        ("POST", "/v2/models/{task}/versions/{version}/infer"),
        ("GET", "/v2/models/{task}/config"),
        ("GET", "/v2/models/{task}/versions/{version}/config"),
        ("GET", "/v2/models/{task}/stats"),
        ("GET", "/v2/models/{task}/versions/{version}/stats"),
        ("GET", "/v2/models/stats"),
        ("GET", "/v2/repository/index"),
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/{task}/load"),
        ("POST", "/v2/repository/models/{task}/unload"),
    }
    assert set(OPERATIONS) == covered
    spec = create_app(Settings(tenants_enabled=True)).openapi()
    for method, path in OPERATIONS:  # the tenant server documents its token everywhere
        assert spec["paths"][path][method.lower()]["security"], (method, path)


@pytest.mark.parametrize("attacker", ["bolt-reader", "bolt-writer"])
@pytest.mark.parametrize(("method", "template"), OPERATIONS, ids=IDS)
def test_another_tenants_token_is_refused(
    method: str,
    template: str,
    attacker: str,
    client: httpx.Client,
    tiny_backbone: TorchBackbone,
) -> None:
    before = target_state(client)
    resp = request(client, method, template, TARGET, bearer(attacker), tiny_backbone)
    if (method, template) in LISTINGS:
        assert resp.status_code == 200, resp.text
        body = resp.json()
        rows = rows_of(body)
        names = {row["name"] for row in rows}
        assert names == {"bolt/own"}, names  # only its own tenant's
    else:
        refused(resp, 403, template)
    assert target_state(client) == before


@pytest.mark.parametrize(("method", "template"), OPERATIONS, ids=IDS)
def test_no_token_or_an_unknown_one_is_refused(
    method: str, template: str, client: httpx.Client, tiny_backbone: TorchBackbone
) -> None:
    before = target_state(client)
    refused(request(client, method, template, TARGET, {}, tiny_backbone), 401, template)
    unknown = bearer("acme-writer-not")
    refused(request(client, method, template, TARGET, unknown, tiny_backbone), 403, template)
    assert target_state(client) == before


@pytest.mark.parametrize(("method", "template"), WRITES, ids=[f"{m} {p}" for m, p in WRITES])
def test_a_reader_cannot_change_its_own_tenants_tuners(
    method: str, template: str, client: httpx.Client, tiny_backbone: TorchBackbone
) -> None:
    before = target_state(client)
    resp = request(client, method, template, TARGET, bearer("acme-reader"), tiny_backbone)
    refused(resp, 403, template)
    assert target_state(client) == before


@pytest.mark.parametrize(("method", "template"), OPERATIONS, ids=IDS)
def test_the_owning_tenant_is_served(
    method: str, template: str, client: httpx.Client, tiny_backbone: TorchBackbone
) -> None:
    """The control: the same requests with acme's own writer token succeed."""
    name = OWN
    if method == "DELETE":
        name = "acme/doomed"
        created = request(
            client, "PUT", "/v1/tuners/{name}", name, bearer("acme-writer"), tiny_backbone
        )
        assert created.status_code in (200, 201), created.text
    if template.endswith("/versions/{version}") and method == "DELETE":
        name = "acme/pruned"  # version 1 of it, once version 2 is current
        for seed in (9, 10):
            created = client.put(
                f"/v1/tuners/{name}",
                content=artifact(name, tiny_backbone, seed),
                headers={**bearer("acme-writer"), "Content-Type": "application/octet-stream"},
            )
            assert created.status_code == 201, created.text
    if template.endswith("/ready"):  # 200 needs the version loaded
        client.post(f"/v2/repository/models/{OWN}/load", headers=bearer("acme-writer"))
        client.get(f"/v2/models/{OWN}/versions/1", headers=bearer("acme-writer"))
    resp = request(client, method, template, name, bearer("acme-writer"), tiny_backbone)
    assert resp.status_code in (200, 201), resp.text
    if (method, template) in LISTINGS:
        body = resp.json()
        rows = rows_of(body)
        assert {row["name"] for row in rows} >= {TARGET, OWN}
        assert all(row["name"].startswith("acme/") for row in rows)
    if template.endswith("/unload"):  # leave it as other tests expect it
        client.post(f"/v2/repository/models/{OWN}/load", headers=bearer("acme-writer"))


def test_the_admin_token_reaches_every_tenant(client: httpx.Client) -> None:
    admin = bearer(TEST_ADMIN_TOKEN)
    names = {t["name"] for t in client.get("/v1/tuners", headers=admin).json()["tuners"]}
    assert {TARGET, OWN, "bolt/own"} <= names
    assert client.get("/v1/tuners/bolt/own", headers=admin).status_code == 200
    # Plain names do not exist on a tenant server.
    assert client.get("/v1/tuners/kept", headers=admin).status_code == 404
    resp = client.post(
        "/v1/predict",
        files=[("image", ("a.png", IMAGE, "image/png"))],
        data={"tasks": "kept"},
        headers=admin,
    )
    assert (resp.status_code, resp.json()["code"]) == (422, "invalid_name")


def test_tuner_count_and_byte_quotas(client: httpx.Client, tiny_backbone: TorchBackbone) -> None:
    writer = {**bearer("tiny-writer"), "Content-Type": "application/octet-stream"}

    def put(name: str, seed: int) -> httpx.Response:
        return client.put(
            f"/v1/tuners/{name}", content=artifact(name, tiny_backbone, seed), headers=writer
        )

    assert put("tiny/a", 1).status_code == 201
    assert put("tiny/b", 1).status_code == 201
    over = put("tiny/c", 1)  # a third name: over max_tuners = 2
    assert (over.status_code, over.json()["code"]) == (429, "quota_exceeded")
    assert int(over.headers["retry-after"]) >= 1
    assert put("tiny/a", 1).status_code == 200  # identical bytes store nothing: allowed
    assert put("tiny/a", 2).status_code == 201  # 3 artifacts stored: within 3.5
    heavy = put("tiny/a", 3)  # a 4th artifact: over max_tuner_bytes
    assert (heavy.status_code, heavy.json()["code"]) == (429, "quota_exceeded")
    assert "bytes" in heavy.json()["detail"]
    assert client.delete("/v1/tuners/tiny/b", headers=bearer("tiny-writer")).status_code == 200
    assert put("tiny/c", 1).status_code == 201  # room again
    # Another tenant is not counted against tiny, nor tiny against it.
    names = {
        t["name"] for t in client.get("/v1/tuners", headers=bearer("tiny-writer")).json()["tuners"]
    }
    assert names == {"tiny/a", "tiny/c"}


def test_request_rate_per_tenant(client: httpx.Client) -> None:
    slow = bearer("slow-reader")
    answers = [client.get("/v1/tuners", headers=slow) for _ in range(SLOW_BURST + 1)]
    assert [a.status_code for a in answers[:SLOW_BURST]] == [200] * SLOW_BURST
    limited = answers[-1]
    assert (limited.status_code, limited.json()["code"]) == (429, "rate_limited")
    assert int(limited.headers["retry-after"]) >= 1
    # OIP answers in its own shape, with the same status and Retry-After.
    oip = client.get("/v2/repository/index", headers=slow)
    assert oip.status_code == 429
    assert "error" in oip.json()
    assert int(oip.headers["retry-after"]) >= 1
    # The other tenants are not slowed by slow's bucket.
    assert client.get("/v1/tuners", headers=bearer("bolt-reader")).status_code == 200
    metrics = client.get("/metrics").text
    assert 'restune_rejected_requests_total{reason="rate_limited"}' in metrics


def test_metrics_name_no_other_tenants_tuners(client: httpx.Client) -> None:
    """An anonymous scrape names no tuner; a tenant's token shows its own tuners' series
    only; the admin and ``metrics`` tokens show every tenant's."""
    for name, token in ((OWN, "acme-reader"), ("bolt/own", "bolt-reader")):
        resp = client.post(
            "/v1/predict",
            files=[("image", ("a.png", IMAGE, "image/png"))],
            data={"tasks": name},
            headers=bearer(token),
        )
        assert resp.status_code == 200, resp.text

    def scrape(headers: dict[str, str]) -> str:
        resp = client.get("/metrics", headers=headers)
        assert resp.status_code == 200
        return resp.text

    for headers in ({}, bearer("not-a-token")):
        text = scrape(headers)
        assert "acme/" not in text
        assert "bolt/" not in text
        assert "restune_requests_total" in text  # series without tuner names still show
    acme = scrape(bearer("acme-reader"))
    assert f'task="{OWN}"' in acme
    assert "bolt/" not in acme
    for token in ("scraper", TEST_ADMIN_TOKEN):
        text = scrape(bearer(token))
        assert f'task="{OWN}"' in text
        assert 'task="bolt/own"' in text
    # The metrics token reads metrics only.
    assert client.get("/v1/tuners", headers=bearer("scraper")).json()["tuners"] == []
    assert client.get(f"/v1/tuners/{OWN}", headers=bearer("scraper")).status_code == 403
