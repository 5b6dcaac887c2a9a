"""The HTTP API in process: the real app and service (tiny random backbone, file store) through
FastAPI's TestClient with the lifespan running. Every error is checked for its problem body."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest

with warnings.catch_warnings():
    # Starlette nudges towards httpx2; the TestClient works the same with httpx.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

import numpy as np
from PIL import Image

from restuning.backbone import TorchBackbone
from server.api.predict import INLINE_JSON_BYTES
from server.api.schemas import PredictResponse, Problem, TunerDetail, TunerList
from server.app import create_app
from server.settings import Settings
from tests.fixtures.models import tiny_backbone_factory, tiny_image, tiny_images
from tests.fixtures.redis_server import RedisProcess
from tests.fixtures.tuners import make_artifact, make_config

TOKEN = "inprocess-admin-token-42"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_REQUEST_BYTES = 1024 * 1024
MAX_IMAGES = 4
MAX_IMAGE_BYTES = 64 * 1024
MAX_ARTIFACT_BYTES = 2 * 1024 * 1024
TASKS = {
    "species": "classification",
    "colours": "multilabel",
    "age": "regression",
    "emb": "embedding",
}


def tiny_settings(tmp: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "backbone": "vit_test_tiny",
        "backbone_weights": "random:0",
        "store": f"file://{tmp / 'store'}",
        "home": str(tmp / "home"),
        "admin_token": TOKEN,
        "max_request_bytes": MAX_REQUEST_BYTES,
        "max_images_per_request": MAX_IMAGES,
        "max_image_bytes": MAX_IMAGE_BYTES,
        "max_tasks_per_request": 8,
        "max_top_k": 10,
        "max_artifact_bytes": MAX_ARTIFACT_BYTES,
        "max_wait_ms": 1,
        "threads": 1,
    }
    values.update(overrides)
    return Settings(**values)


def jpeg(index: int) -> bytes:
    buf = io.BytesIO()
    tiny_image(index, seed=3).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def artifact(name: str, backbone: TorchBackbone, seed: int = 0) -> bytes:
    config = make_config(name, backbone, task=TASKS.get(name, "classification"))  # type: ignore[arg-type]
    return make_artifact(config, backbone.final_norm, seed=seed)


class HttpResponse(Protocol):
    """What the tests read from a response (httpx's or httpx2's, whichever the client uses)."""

    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def json(self) -> Any: ...


def problem(resp: HttpResponse, status: int, code: str) -> dict[str, Any]:
    """Assert ``resp`` is an RFC 9457 problem with ``status`` and ``code``; return its body."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = resp.json()
    Problem.model_validate(body)
    assert body["code"] == code, body
    assert body["status"] == status
    assert body["type"] == f"urn:restune:error:{code}"
    assert "Traceback" not in resp.text
    return body


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = tiny_settings(tmp_path_factory.mktemp("inprocess"))
    app = create_app(settings)

    async def boom() -> None:
        raise RuntimeError(f"secret internals {TOKEN}")

    # A route that fails unexpectedly, to see the last-resort handler.
    app.add_api_route("/test-only/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def registered(app_client: TestClient, tiny_backbone: TorchBackbone) -> dict[str, int]:
    """The four task kinds registered once for the module: name -> version."""
    versions = {}
    for name in TASKS:
        resp = app_client.put(
            f"/v1/tuners/{name}", content=artifact(name, tiny_backbone), headers=AUTH
        )
        assert resp.status_code == 201, resp.text
        versions[name] = resp.json()["version"]
    return versions


def multipart(images: list[bytes], **data: Any) -> dict[str, Any]:
    return {
        "files": [("image", (f"img{i}.png", b, "image/png")) for i, b in enumerate(images)],
        "data": data,
    }


# --- predict ------------------------------------------------------------------------------


def test_multipart_predict_answers_every_task_for_every_image(
    app_client: TestClient, registered: dict[str, int]
) -> None:
    images = [*tiny_images(2), jpeg(0)]
    resp = app_client.post(
        "/v1/predict", **multipart(images, tasks="species,colours,age,emb", top_k="2")
    )
    assert resp.status_code == 200, resp.text
    body = PredictResponse.model_validate(resp.json())
    assert [r.image for r in body.results] == [0, 1, 2]
    for result in body.results:
        assert set(result.tasks) == set(TASKS)
        species = result.tasks["species"].model_dump()
        assert species["version"] == registered["species"]
        assert species["kind"] == "classification"
        assert len(species["labels"]) == 2
        assert species["labels"][0]["score"] >= species["labels"][1]["score"]
        age = result.tasks["age"].model_dump()
        assert set(age["values"]) == {"age", "size"}
        emb = result.tasks["emb"].model_dump()["embedding"]
        assert math.isclose(math.sqrt(sum(x * x for x in emb)), 1.0, rel_tol=1e-4)
    assert body.backbone.arch == "vit_test_tiny"


def test_json_predict_equals_multipart(app_client: TestClient, registered: dict[str, int]) -> None:
    images = [tiny_images(1)[0], jpeg(1)]
    via_form = app_client.post("/v1/predict", **multipart(images, tasks="species,age", top_k="3"))
    via_json = app_client.post(
        "/v1/predict",
        json={
            "images": [{"b64": base64.b64encode(b).decode()} for b in images],
            "tasks": ["species", "age"],
            "top_k": 3,
        },
    )
    assert via_form.status_code == via_json.status_code == 200, via_json.text
    assert via_form.json()["results"] == via_json.json()["results"]


def noise_png(seed: int, side: int = 140) -> bytes:
    """A PNG that barely compresses (~60 KB at 140 px): for bodies of a few hundred KB."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_large_json_body_equals_multipart(
    app_client: TestClient, registered: dict[str, int]
) -> None:
    images = [noise_png(i) for i in range(MAX_IMAGES)]
    assert all(len(b) <= MAX_IMAGE_BYTES for b in images)
    body = {"images": [{"b64": base64.b64encode(b).decode()} for b in images], "tasks": ["age"]}
    assert len(json.dumps(body)) > INLINE_JSON_BYTES  # parsed off the event loop
    via_json = app_client.post("/v1/predict", json=body)
    via_form = app_client.post("/v1/predict", **multipart(images, tasks="age"))
    assert via_json.status_code == 200, via_json.text
    assert via_json.json()["results"] == via_form.json()["results"]


def test_repeated_task_fields_and_data_url(
    app_client: TestClient, registered: dict[str, int]
) -> None:
    image = tiny_images(1)[0]
    repeated = app_client.post(
        "/v1/predict",
        files=[("image", ("a.png", image, "image/png"))],
        data={"task": ["species", "emb"]},
    )
    assert repeated.status_code == 200, repeated.text
    assert set(repeated.json()["results"][0]["tasks"]) == {"species", "emb"}
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    as_json = app_client.post(
        "/v1/predict", json={"images": [{"b64": data_url}], "tasks": "species,emb"}
    )
    assert as_json.status_code == 200, as_json.text
    assert as_json.json()["results"] == repeated.json()["results"]


def test_pinned_version(app_client: TestClient, registered: dict[str, int]) -> None:
    v = registered["species"]
    resp = app_client.post("/v1/predict", **multipart(tiny_images(1), tasks=f"species@{v}"))
    assert resp.status_code == 200, resp.text
    assert resp.json()["results"][0]["tasks"]["species"]["version"] == v
    problem(
        app_client.post("/v1/predict", **multipart(tiny_images(1), tasks="species@999")),
        404,
        "unknown_version",
    )


@pytest.mark.parametrize("top_k", ["0", "11", "two"])
def test_top_k_out_of_range(app_client: TestClient, registered: dict[str, int], top_k: str) -> None:
    resp = app_client.post("/v1/predict", **multipart(tiny_images(1), tasks="species", top_k=top_k))
    body = problem(resp, 422, "validation_error")
    assert "top_k" in body["detail"]


def test_top_k_caps_the_labels(app_client: TestClient, registered: dict[str, int]) -> None:
    resp = app_client.post("/v1/predict", **multipart(tiny_images(1), tasks="species", top_k="1"))
    assert len(resp.json()["results"][0]["tasks"]["species"]["labels"]) == 1


def test_unknown_task_is_404_naming_it(app_client: TestClient, registered: dict[str, int]) -> None:
    resp = app_client.post("/v1/predict", **multipart(tiny_images(1), tasks="species,nosuch"))
    body = problem(resp, 404, "unknown_task")
    assert body["task"] == "nosuch"
    assert "nosuch" in body["detail"]


def test_task_list_errors(app_client: TestClient, registered: dict[str, int]) -> None:
    one = tiny_images(1)
    problem(app_client.post("/v1/predict", **multipart(one, tasks=" , ")), 422, "no_tasks")
    dup = problem(
        app_client.post("/v1/predict", **multipart(one, tasks="age,age")), 422, "duplicate_task"
    )
    assert dup["task"] == "age"
    many = ",".join(f"t{i}" for i in range(9))
    problem(app_client.post("/v1/predict", **multipart(one, tasks=many)), 422, "too_many_tasks")


def test_bad_image_names_the_image(app_client: TestClient, registered: dict[str, int]) -> None:
    images = [tiny_images(1)[0], b"this is not an image at all", jpeg(0)]
    body = problem(
        app_client.post("/v1/predict", **multipart(images, tasks="species")), 422, "bad_image"
    )
    assert body["image"] == 1
    assert "1" in body["detail"]


def test_strips_are_refused_by_aspect_ratio(
    app_client: TestClient, registered: dict[str, int]
) -> None:
    # Real PNGs of a few hundred bytes whose whole-image resize would need gigabytes: 3000 x 1
    # strips after a good image, and one 100000 x 1.
    strips = []
    for size in [(3000, 1)] * (MAX_IMAGES - 1) + [(100_000, 1)]:
        buffer = io.BytesIO()
        Image.new("RGB", size).save(buffer, format="PNG")
        strips.append(buffer.getvalue())
    resp = app_client.post("/v1/predict", **multipart([jpeg(0), *strips[:-1]], tasks="species"))
    body = problem(resp, 422, "image_aspect_ratio")
    assert body["image"] in range(1, MAX_IMAGES)
    body = problem(
        app_client.post("/v1/predict", **multipart(strips[-1:], tasks="species")),
        422,
        "image_aspect_ratio",
    )
    assert (body["image"], "100000x1" in body["detail"]) == (0, True)


def test_bad_base64_names_the_image(app_client: TestClient, registered: dict[str, int]) -> None:
    good = base64.b64encode(tiny_images(1)[0]).decode()
    for broken in ("not base64!", good[:-3], good[:10] + "\n" + good[10:]):
        resp = app_client.post(
            "/v1/predict", json={"images": [{"b64": good}, {"b64": broken}], "tasks": ["species"]}
        )
        assert problem(resp, 422, "bad_image")["image"] == 1


def test_image_urls_are_refused(app_client: TestClient) -> None:
    resp = app_client.post(
        "/v1/predict",
        json={"images": [{"url": "http://169.254.169.254/latest"}], "tasks": ["species"]},
    )
    body = problem(resp, 422, "validation_error")
    assert "not fetched" in body["detail"]
    assert body["errors"][0]["field"] == "body.images.0"


def test_bad_json_and_wrong_shapes(app_client: TestClient) -> None:
    resp = app_client.post(
        "/v1/predict", content=b'{"images": [', headers={"Content-Type": "application/json"}
    )
    assert "not valid JSON" in problem(resp, 422, "validation_error")["detail"]
    resp = app_client.post("/v1/predict", json={"images": "x", "tasks": ["a"], "extra": 1})
    fields = {e["field"] for e in problem(resp, 422, "validation_error")["errors"]}
    assert {"body.images", "body.extra"} <= fields


def test_multipart_form_errors(app_client: TestClient) -> None:
    one = tiny_images(1)
    problem(
        app_client.post("/v1/predict", data={"tasks": "species"}, files={"x": ("", b"")}),
        422,
        "validation_error",
    )
    no_image = app_client.post("/v1/predict", files={"tasks": (None, "species")}, headers={})
    assert problem(no_image, 422, "validation_error")["errors"][0]["field"] == "body.image"
    typo = app_client.post(
        "/v1/predict", files=[("images", ("a.png", one[0]))], data={"tasks": "species"}
    )
    assert "unknown form field" in problem(typo, 422, "validation_error")["detail"]
    truncated = app_client.post(
        "/v1/predict",
        content=b'--xyz\r\nContent-Disposition: form-data; name="tasks"\r\n\r\nspecies',
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    problem(truncated, 422, "validation_error")


def test_unsupported_media_type(app_client: TestClient) -> None:
    resp = app_client.post("/v1/predict", content=b"abc", headers={"Content-Type": "text/plain"})
    problem(resp, 415, "unsupported_media_type")


def test_too_many_images(app_client: TestClient) -> None:
    images = tiny_images(MAX_IMAGES + 1)
    body = problem(
        app_client.post("/v1/predict", **multipart(images, tasks="species")), 413, "too_many_images"
    )
    assert body["limit"] == MAX_IMAGES
    as_json = app_client.post(
        "/v1/predict",
        json={"images": [{"b64": base64.b64encode(b).decode()} for b in images], "tasks": ["a"]},
    )
    problem(as_json, 413, "too_many_images")


def test_image_too_large_names_the_image(app_client: TestClient) -> None:
    big = b"\x89PNG" + bytes(MAX_IMAGE_BYTES)
    images = [tiny_images(1)[0], big]
    body = problem(
        app_client.post("/v1/predict", **multipart(images, tasks="species")), 413, "image_too_large"
    )
    assert body["image"] == 1
    as_json = app_client.post(
        "/v1/predict",
        json={"images": [{"b64": base64.b64encode(b).decode()} for b in images], "tasks": ["a"]},
    )
    assert problem(as_json, 413, "image_too_large")["image"] == 1


def test_oversized_body_with_content_length(app_client: TestClient) -> None:
    body = b"x" * (MAX_REQUEST_BYTES + 1)
    resp = app_client.post(
        "/v1/predict", content=body, headers={"Content-Type": "application/json"}
    )
    assert problem(resp, 413, "payload_too_large")["limit"] == MAX_REQUEST_BYTES


def test_oversized_chunked_body(app_client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_REQUEST_BYTES // 65536 + 2):
            yield b"y" * 65536

    resp = app_client.post(
        "/v1/predict", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    problem(resp, 413, "payload_too_large")


# --- tuners ---------------------------------------------------------------------------------


def test_tuner_crud(app_client: TestClient, tiny_backbone: TorchBackbone) -> None:
    name = "crud-task"
    first = artifact(name, tiny_backbone, seed=1)
    created = app_client.put(f"/v1/tuners/{name}", content=first, headers=AUTH)
    assert created.status_code == 201, created.text
    assert created.headers["location"] == f"/v1/tuners/{name}"
    v1 = created.json()
    assert v1["name"] == name
    assert v1["version"] >= 1
    assert len(v1["sha256"]) == 64

    same = app_client.put(f"/v1/tuners/{name}", content=first, headers=AUTH)
    assert same.status_code == 200
    assert same.json() == v1

    second = app_client.put(
        f"/v1/tuners/{name}", content=artifact(name, tiny_backbone, seed=2), headers=AUTH
    )
    assert second.status_code == 201
    assert second.json()["version"] > v1["version"]

    listed = TunerList.model_validate(app_client.get("/v1/tuners").json())
    row = next(t for t in listed.tuners if t.name == name)
    assert row.version == second.json()["version"]
    assert row.kind == "classification"
    assert row.labels == ["cat", "dog", "bird"]

    detail = TunerDetail.model_validate(app_client.get(f"/v1/tuners/{name}").json())
    assert detail.config is not None
    assert detail.config["name"] == name
    assert [v.version for v in detail.versions] == [v1["version"], second.json()["version"]]

    deleted = app_client.delete(f"/v1/tuners/{name}", headers=AUTH)
    assert deleted.status_code == 200
    assert deleted.json() == {"name": name, "deleted": True}
    problem(app_client.get(f"/v1/tuners/{name}"), 404, "tuner_not_found")
    problem(app_client.delete(f"/v1/tuners/{name}", headers=AUTH), 404, "tuner_not_found")
    assert name not in {t["name"] for t in app_client.get("/v1/tuners").json()["tuners"]}


def test_rollout_routes(app_client: TestClient, tiny_backbone: TorchBackbone) -> None:
    """promote= on upload, per-version delete and its refusals, two versions in one request."""
    name = "rollout"
    put = app_client.put(
        f"/v1/tuners/{name}", content=artifact(name, tiny_backbone, 1), headers=AUTH
    )
    assert (put.status_code, put.json()["current"]) == (201, True)
    staged = app_client.put(
        f"/v1/tuners/{name}?promote=false",
        content=artifact(name, tiny_backbone, 2),
        headers=AUTH,
    )
    assert staged.status_code == 201, staged.text
    assert (staged.json()["version"], staged.json()["current"]) == (2, False)
    assert app_client.get(f"/v1/tuners/{name}").json()["version"] == 1
    problem(
        app_client.put(f"/v1/tuners/{name}?promote=maybe", content=b"x", headers=AUTH),
        422,
        "validation_error",
    )
    body = app_client.post(
        "/v1/predict", **multipart(tiny_images(1), tasks=f"{name}@2,{name}@1")
    ).json()
    tasks = body["results"][0]["tasks"]
    assert list(tasks) == [f"{name}@2", f"{name}@1"]
    assert (tasks[f"{name}@2"]["version"], tasks[f"{name}@1"]["version"]) == (2, 1)

    problem(app_client.delete(f"/v1/tuners/{name}/versions/1", headers=AUTH), 409, "version_in_use")
    problem(
        app_client.delete(f"/v1/tuners/{name}/versions/9", headers=AUTH), 404, "version_not_found"
    )
    problem(
        app_client.delete(f"/v1/tuners/{name}/versions/0", headers=AUTH), 422, "validation_error"
    )
    problem(
        app_client.delete(f"/v1/tuners/{name}/versions/{2**40}", headers=AUTH),
        422,
        "validation_error",
    )
    problem(app_client.delete(f"/v1/tuners/{name}/versions/2"), 401, "unauthorized")
    problem(app_client.delete("/v1/tuners/nope/versions/1", headers=AUTH), 404, "tuner_not_found")
    gone = app_client.delete(f"/v1/tuners/{name}/versions/1?force=true", headers=AUTH)
    assert gone.status_code == 200, gone.text
    assert gone.json() == {"name": name, "version": 1, "deleted": True, "current": 2}
    assert [v["version"] for v in app_client.get(f"/v1/tuners/{name}").json()["versions"]] == [2]
    problem(
        app_client.post("/v1/predict", **multipart(tiny_images(1), tasks=f"{name}@1")),
        404,
        "unknown_version",
    )
    assert app_client.delete(f"/v1/tuners/{name}", headers=AUTH).status_code == 200


def test_admin_auth(app_client: TestClient, tiny_backbone: TorchBackbone) -> None:
    data = artifact("authed", tiny_backbone)
    missing = app_client.put("/v1/tuners/authed", content=data)
    problem(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    problem(
        app_client.put("/v1/tuners/authed", content=data, headers={"Authorization": "Basic abc"}),
        401,
        "unauthorized",
    )
    wrong = app_client.put(
        "/v1/tuners/authed", content=data, headers={"Authorization": "Bearer nope"}
    )
    problem(wrong, 403, "forbidden")
    problem(
        app_client.delete("/v1/tuners/species", headers={"Authorization": f"Bearer {TOKEN}x"}),
        403,
        "forbidden",
    )
    # Nothing was stored by the refused calls.
    problem(app_client.get("/v1/tuners/authed"), 404, "tuner_not_found")


def test_admin_routes_refused_without_a_configured_token(
    tmp_path: Path, tiny_backbone: TorchBackbone
) -> None:
    app = create_app(tiny_settings(tmp_path, admin_token=None))
    with TestClient(app) as client:
        resp = client.put("/v1/tuners/x", content=artifact("x", tiny_backbone), headers=AUTH)
        assert "RESTUNE_ADMIN_TOKEN" in problem(resp, 403, "forbidden")["detail"]


def test_register_refusals(app_client: TestClient, tiny_backbone: TorchBackbone) -> None:
    data = artifact("refused", tiny_backbone)
    form = app_client.put("/v1/tuners/refused", files={"file": ("a", data)}, headers=AUTH)
    problem(form, 415, "unsupported_media_type")
    problem(
        app_client.put("/v1/tuners/refused", content=b"", headers=AUTH), 422, "validation_error"
    )
    garbage = app_client.put("/v1/tuners/refused", content=b"\x00" * 64, headers=AUTH)
    assert garbage.status_code == 422
    assert garbage.json()["code"].startswith("artifact_")
    other = tiny_backbone_factory(seed=1)
    mismatch = app_client.put(
        "/v1/tuners/refused", content=artifact("refused", other), headers=AUTH
    )
    body = problem(mismatch, 409, "backbone_mismatch")
    assert tiny_backbone.fingerprint in body["detail"]
    assert other.fingerprint in body["detail"]
    too_big = app_client.put(
        "/v1/tuners/refused", content=bytes(MAX_ARTIFACT_BYTES + 1), headers=AUTH
    )
    assert problem(too_big, 413, "artifact_too_large")["limit"] == MAX_ARTIFACT_BYTES

    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_ARTIFACT_BYTES // 65536 + 2):
            yield bytes(65536)

    streamed = app_client.put("/v1/tuners/refused", content=chunks(), headers=AUTH)
    problem(streamed, 413, "artifact_too_large")
    problem(app_client.get("/v1/tuners/refused"), 404, "tuner_not_found")


# --- routing, ids, health, metrics, docs --------------------------------------------------------


def test_unknown_route_and_method(app_client: TestClient) -> None:
    problem(app_client.get("/v1/nothing-here"), 404, "not_found")
    resp = app_client.delete("/healthz")
    problem(resp, 405, "method_not_allowed")
    assert "GET" in resp.headers["allow"]


def test_unexpected_error_is_a_bare_500(
    app_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        resp = app_client.get("/test-only/boom", headers={"X-Request-ID": "boom-1"})
    body = problem(resp, 500, "internal")
    assert "secret internals" not in resp.text
    assert TOKEN not in resp.text
    assert body["request_id"] == "boom-1"
    assert resp.headers["x-request-id"] == "boom-1"
    logged = [r for r in caplog.records if getattr(r, "request_id", None) == "boom-1"]
    assert logged
    assert logged[0].exc_info is not None


def test_request_id(app_client: TestClient) -> None:
    given = app_client.get("/healthz", headers={"X-Request-ID": "abc-123.x"})
    assert given.headers["x-request-id"] == "abc-123.x"
    made = app_client.get("/healthz").headers["x-request-id"]
    assert len(made) == 32
    hostile = app_client.get("/healthz", headers={"X-Request-ID": "a b\tc" + "x" * 200})
    assert hostile.headers["x-request-id"] != "a b\tc" + "x" * 200
    err = app_client.get("/nope", headers={"X-Request-ID": "err-7"})
    assert err.json()["request_id"] == "err-7"


def test_health_and_readiness(app_client: TestClient) -> None:
    assert app_client.get("/healthz").json() == {"status": "ok"}
    ready = app_client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True


def test_metrics_after_predict(app_client: TestClient, registered: dict[str, int]) -> None:
    app_client.post("/v1/predict", **multipart(tiny_images(2), tasks="species,age,emb"))
    app_client.get("/v1/tuners/does-not-exist")
    resp = app_client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    count = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("restune_tasks_per_forward_count")
    )
    assert count >= 1
    assert 'restune_requests_total{method="POST",route="/v1/predict",status="200"}' in text
    # Labelled by template, never by the raw name.
    assert 'route="/v1/tuners/{name}"' in text
    assert "does-not-exist" not in text
    assert 'restune_rejected_requests_total{reason="tuner_not_found"}' in text


def test_unmatched_routes_share_one_label(app_client: TestClient) -> None:
    for i in range(3):
        app_client.get(f"/random/path/{i}")
    text = app_client.get("/metrics").text
    assert 'route="unmatched"' in text
    assert "/random/path" not in text


def test_openapi_documents_routes_and_problems(app_client: TestClient) -> None:
    spec = app_client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/v1/predict",
        "/v1/tuners",
        "/v1/tuners/{name}",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths
    predict = paths["/v1/predict"]["post"]
    assert {"multipart/form-data", "application/json"} <= set(predict["requestBody"]["content"])
    for status in ("404", "413", "422"):
        assert set(predict["responses"][status]["content"]) == {"application/problem+json"}
    describe_422 = paths["/v1/tuners/{name}"]["get"]["responses"]["422"]["content"]
    assert set(describe_422) == {"application/problem+json"}
    put = paths["/v1/tuners/{name}"]["put"]
    assert {"201", "200", "401", "403", "409", "413"} <= set(put["responses"])
    assert "Problem" in spec["components"]["schemas"]
    assert app_client.get("/docs").status_code == 200


def test_admin_token_never_logged(
    app_client: TestClient, tiny_backbone: TorchBackbone, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        app_client.put(
            "/v1/tuners/species", content=artifact("species", tiny_backbone), headers=AUTH
        )
        app_client.put("/v1/tuners/x", content=b"1", headers={"Authorization": f"Bearer {TOKEN}0"})
    access = [r for r in caplog.records if r.name == "restune.access"]
    assert access
    assert all(hasattr(r, "route") and hasattr(r, "status") for r in access)
    assert TOKEN not in caplog.text
    assert all(TOKEN not in str(r.__dict__) for r in caplog.records)


# --- readiness with a real store that goes away --------------------------------------------------


@pytest.mark.redis
def test_readyz_stays_200_through_a_redis_outage_and_says_so(
    tmp_path: Path, redis_process: RedisProcess
) -> None:
    """Ready = can serve predictions: an outage after the index was read shows in ``store``
    (and the metric), not as unreadiness that would empty the load balancer."""
    app = create_app(tiny_settings(tmp_path, store=redis_process.url))
    with TestClient(app) as client:
        assert client.get("/readyz").json()["store"]["index"] == "current"
        redis_process.kill()
        resp = client.get("/readyz")
        assert resp.status_code == 200
        store = resp.json()["store"]
        assert (store["reachable"], store["index"]) == (False, "stale")
        assert "restune_tuner_store_up 0.0" in client.get("/metrics").text
        assert client.get("/healthz").status_code == 200


@pytest.mark.redis
def test_readyz_503_with_reasons_when_redis_was_never_reached(
    tmp_path: Path, redis_process: RedisProcess
) -> None:
    redis_process.kill()
    app = create_app(tiny_settings(tmp_path, store=redis_process.url))
    with TestClient(app) as client:
        resp = client.get("/readyz")
        assert resp.status_code == 503
        body = resp.json()
        assert body["ready"] is False
        assert body["store"]["index"] == "missing"
        assert any("store" in reason for reason in body["reasons"])
        assert client.get("/healthz").status_code == 200
