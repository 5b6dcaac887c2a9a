"""Defect classes found by attacking a live server from outside, each pinned by generated cases.

Every class below answered wrong before its fix (the module docstring of each fix says why):

* a body coding was read as plain bytes: a plain body labelled gzip answered 200, a gzipped
  one 422 ``validation_error``. Now gzip / x-gzip / deflate are decompressed (bounded) and a
  body that is not what its label says is a 400; any other coding (``br``, ``zstd``,
  ``Transfer-Encoding: gzip, chunked``) is 415 ``unsupported_media_type`` with
  ``Accept-Encoding: identity`` on every route with a body;
* a request httptools cannot parse (bad method, ``Content-Length: -1``, a NUL in a header)
  was answered by uvicorn in ``text/plain``; now a problem+json 400 ``bad_request``;
* a JSON key given twice (``{"tasks": [a], "tasks": [b]}``) silently kept the last one; now
  422 ``validation_error`` (OIP: 400) on every body read through ``load_json``;
* ``top_k`` as ``true``, ``"3"`` or ``3.0`` in a JSON predict was coerced and answered 200;
* a valid big-endian 16-bit TIFF (PIL mode ``I;16B``) answered 422 ``bad_image`` ("image
  has wrong mode"): PIL cannot take its extrema.

One real ``restune serve`` (the fixtures' tiny backbone) holds one classification tuner.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import socket
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from restuning.backbone import TorchBackbone
from restuning.presets import DataConfig
from server.engine.decode import prepare_image
from tests.fixtures.live_server import LiveServer
from tests.fixtures.models import tiny_images
from tests.reliability import bad_artifacts as art
from tests.reliability.raw_http import RawRequest, json_request, predict_form, send

CLS = "rt-cls"
IMAGE = tiny_images(1, seed=3)[0]
B64 = base64.b64encode(IMAGE).decode()
PREDICT_JSON: dict[str, Any] = {"images": [{"b64": B64}], "tasks": [CLS], "top_k": 2}
OIP_JSON: dict[str, Any] = {
    "id": "r1",
    "inputs": [
        {"name": "image", "shape": [1], "datatype": "BYTES", "data": [B64], "parameters": {}}
    ],
    "outputs": [{"name": "scores", "parameters": {"classification": 2}}],
}
OIP_TARGET = f"/v2/models/{CLS}/infer"


@pytest.fixture(scope="module")
def server(live_server: LiveServer, tiny_backbone: TorchBackbone) -> LiveServer:
    resp = live_server.register(CLS, art.valid(CLS, tiny_backbone))
    assert resp.status_code in (200, 201), resp.text
    return live_server


def _problem(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, resp.body[:300]
    assert resp.content_type.startswith("application/problem+json"), resp.content_type
    body: dict[str, Any] = resp.json()
    assert body["code"] == code, body
    return body


# --- body codings -------------------------------------------------------------------------

REFUSED_CODINGS = [
    ("Content-Encoding", "br"),
    ("Content-Encoding", "zstd"),
    ("Content-Encoding", "identity, gzip"),
    ("Content-Encoding", "x" * 3000),
    ("Transfer-Encoding", "gzip, chunked"),
]
"""Codings the server does not decode: refused, never read as plain bytes."""
DECODED_CODINGS = ["gzip", "GZIP", "x-gzip", "deflate"]
"""Content codings decompressed before the route reads the body (bounded: test_oip_codec)."""


def _with(request: RawRequest, header: str, value: str) -> RawRequest:
    body = request.body
    if header == "Transfer-Encoding":  # http.client then chunks it; the coding stays named
        assert isinstance(body, bytes)
        body = [body]
    return RawRequest(request.method, request.target, body, {**request.headers, header: value})


def _compressed(request: RawRequest, coding: str) -> RawRequest:
    body = request.body
    assert isinstance(body, bytes)
    packed = zlib.compress(body) if coding == "deflate" else gzip.compress(body)
    headers = {**request.headers, "Content-Encoding": coding}
    return RawRequest(request.method, request.target, packed, headers)


def _routes(server: LiveServer) -> dict[str, RawRequest]:
    """A valid request of every kind of body; each would answer 2xx without the coding."""
    return {
        "predict-json": json_request(PREDICT_JSON),
        "predict-form": predict_form([IMAGE], CLS),
        "oip-infer": json_request(OIP_JSON, target=OIP_TARGET),
        "traffic": RawRequest(
            "PUT",
            f"/v1/tuners/{CLS}/traffic",
            json.dumps({"traffic": {"1": 100}}).encode(),
            {"Content-Type": "application/json", **server.admin_headers},
        ),
    }


def _refusal(resp: Any, status: int, code: str, route: str) -> str:
    """The refusal's detail, in the route's protocol: OIP's ``{"error"}`` or problem+json."""
    if route.startswith("oip"):
        assert resp.status == status, resp.body[:300]
        detail: str = resp.json()["error"]
        return detail
    return str(_problem(resp, status, code)["detail"])


@pytest.mark.parametrize(
    ("header", "value"), REFUSED_CODINGS, ids=[f"{h}-{v[:16]}" for h, v in REFUSED_CODINGS]
)
@pytest.mark.parametrize("route", ["predict-json", "predict-form", "oip-infer", "traffic"])
def test_codings_not_decoded_are_refused(
    server: LiveServer, route: str, header: str, value: str
) -> None:
    resp = send(server.url, _with(_routes(server)[route], header, value))
    detail = _refusal(resp, 415, "unsupported_media_type", route)
    assert resp.headers.get("accept-encoding") == "identity"
    assert len(resp.body) < 4096, "the coding named is cut, not echoed whole"
    assert "Encoding" in detail


@pytest.mark.parametrize("coding", DECODED_CODINGS)
@pytest.mark.parametrize("route", ["predict-json", "predict-form", "oip-infer", "traffic"])
def test_decoded_codings_answer_as_plain_and_a_mislabelled_body_is_refused(
    server: LiveServer, route: str, coding: str
) -> None:
    request = _routes(server)[route]
    plain = send(server.url, request)
    packed = send(server.url, _compressed(request, coding))
    assert plain.status == packed.status == 200, packed.body[:300]
    # Plain bytes labelled compressed: refused as corrupt, never read as plain.
    mislabelled = send(server.url, _with(request, "Content-Encoding", coding))
    _refusal(mislabelled, 400, "validation_error", route)


def test_coded_uploads_store_nothing(server: LiveServer, tiny_backbone: TorchBackbone) -> None:
    upload = RawRequest(
        "PUT",
        "/v1/tuners/rt-coded",
        art.valid("rt-coded", tiny_backbone),
        {"Content-Type": "application/octet-stream", **server.admin_headers},
    )
    refused = send(server.url, _with(upload, "Transfer-Encoding", "gzip, chunked"))
    _problem(refused, 415, "unsupported_media_type")
    mislabelled = send(server.url, _with(upload, "Content-Encoding", "gzip"))
    _problem(mislabelled, 400, "validation_error")
    with server.client() as c:
        assert c.get("/v1/tuners/rt-coded").status_code == 404


@pytest.mark.parametrize("value", ["identity", "", "Identity"])
def test_identity_coding_is_plain(server: LiveServer, value: str) -> None:
    resp = send(server.url, _with(json_request(PREDICT_JSON), "Content-Encoding", value))
    assert resp.status == 200, resp.body[:300]


# --- unparseable HTTP ---------------------------------------------------------------------

_HEAD = b"Host: x\r\n"
MALFORMED = {
    "unknown-method": b"FOO /v1/predict HTTP/1.1\r\n" + _HEAD + b"\r\n",
    "content-length-negative": b"POST /v1/predict HTTP/1.1\r\n"
    + _HEAD
    + b"Content-Length: -1\r\n\r\n",
    "content-length-list": b"POST /v1/predict HTTP/1.1\r\n"
    + _HEAD
    + b"Content-Length: 1, 1\r\n\r\nx",
    "content-length-plus": b"POST /v1/predict HTTP/1.1\r\n"
    + _HEAD
    + b"Content-Length: +1\r\n\r\nx",
    "content-length-23-digits": b"POST /v1/predict HTTP/1.1\r\n"
    + _HEAD
    + b"Content-Length: 99999999999999999999999\r\n\r\n",
    "chunked-and-length": b"POST /v1/predict HTTP/1.1\r\n"
    + _HEAD
    + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    "chunk-size-not-hex": b"POST /v1/predict HTTP/1.1\r\n"
    + _HEAD
    + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nx\r\n0\r\n\r\n",
    "nul-in-header": b"GET /healthz HTTP/1.1\r\n" + _HEAD + b"X-A: a\x00b\r\n\r\n",
    "header-without-colon": b"GET /healthz HTTP/1.1\r\n" + _HEAD + b"NoColon\r\n\r\n",
    "space-before-colon": b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n",
    "header-name-latin1": b"GET /healthz HTTP/1.1\r\n" + _HEAD + b"X-\xff: 1\r\n\r\n",
    "http-9.9": b"GET /healthz HTTP/9.9\r\n" + _HEAD + b"\r\n",
    "space-in-target": b"GET /heal thz HTTP/1.1\r\n" + _HEAD + b"\r\n",
    "control-in-target": b"GET /healthz\x01 HTTP/1.1\r\n" + _HEAD + b"\r\n",
    "tls-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


def _raw_exchange(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_unparseable_requests_get_a_problem(server: LiveServer, data: bytes) -> None:
    head, _, body = _raw_exchange(server.url, data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "HTTP/1.1 400 Bad Request", lines
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    problem = json.loads(body)
    assert problem["code"] == "bad_request"
    assert problem["status"] == 400


OVERSIZED_HEADS = {
    "one-100-kb-header": b"GET /healthz HTTP/1.1\r\n"
    + _HEAD
    + b"X-Big: "
    + b"a" * 100_000
    + b"\r\n\r\n",
    "20-000-headers": b"GET /healthz HTTP/1.1\r\n" + _HEAD + b"X-A: b\r\n" * 20_000 + b"\r\n",
    "100-kb-target": b"GET /healthz?" + b"q" * 100_000 + b" HTTP/1.1\r\n" + _HEAD + b"\r\n",
    "2-mb-header-no-end": b"POST /v1/predict HTTP/1.1\r\n" + _HEAD + b"X-Big: " + b"a" * (2 << 20),
}


@pytest.mark.parametrize("data", OVERSIZED_HEADS.values(), ids=OVERSIZED_HEADS.keys())
def test_oversized_request_heads_are_refused(server: LiveServer, data: bytes) -> None:
    """httptools bounds neither one header nor their number: an 8 MB head of ``X-A: b``
    lines cost the server 106 MB of RSS and answered 200."""
    try:
        answer = _raw_exchange(server.url, data)
    except ConnectionResetError:  # the server closed while we still sent: ask once more
        pytest.fail("connection reset before the 431 could be read")
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "HTTP/1.1 431 Request Header Fields Too Large", lines[:1]
    assert json.loads(body)["code"] == "headers_too_large"


def test_heads_under_the_limit_are_served(server: LiveServer) -> None:
    data = b"GET /healthz HTTP/1.1\r\n" + _HEAD + b"X-A: b\r\n" * 6_000 + b"\r\n"  # 48 KB
    assert _raw_exchange(server.url, data).startswith(b"HTTP/1.1 200 ")


# --- repeated JSON keys -------------------------------------------------------------------


def _objects(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every non-empty object in ``doc``."""
    if isinstance(doc, dict):
        if doc:
            yield path
        for key, value in doc.items():
            yield from _objects(value, (*path, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _objects(value, (*path, index))


def _dumps_repeating(doc: Any, target: tuple[Any, ...], path: tuple[Any, ...] = ()) -> str:
    """``doc`` as JSON text, the first member of the object at ``target`` written twice."""
    if isinstance(doc, dict):
        members = [
            f"{json.dumps(k)}:{_dumps_repeating(v, target, (*path, k))}" for k, v in doc.items()
        ]
        if path == target:
            members.append(members[0])
        return "{" + ",".join(members) + "}"
    if isinstance(doc, list):
        return (
            "[" + ",".join(_dumps_repeating(v, target, (*path, i)) for i, v in enumerate(doc)) + "]"
        )
    return json.dumps(doc)


REPEATED = [("predict", p) for p in _objects(PREDICT_JSON)] + [
    ("oip", p) for p in _objects(OIP_JSON)
]


@pytest.mark.parametrize(
    ("kind", "path"), REPEATED, ids=[f"{k}-{'.'.join(map(str, p)) or 'top'}" for k, p in REPEATED]
)
def test_repeated_json_keys_are_refused(
    server: LiveServer, kind: str, path: tuple[Any, ...]
) -> None:
    doc = PREDICT_JSON if kind == "predict" else OIP_JSON
    raw = _dumps_repeating(doc, path).encode()
    assert json.loads(raw) == doc  # the same request to a parser that keeps one of them
    resp = send(
        server.url, json_request(raw, target="/v1/predict" if kind == "predict" else OIP_TARGET)
    )
    if kind == "predict":
        body = _problem(resp, 422, "validation_error")
        assert "more than once" in json.dumps(body)
    else:
        assert resp.status == 400, resp.body[:300]
        assert "more than once" in resp.json()["error"]


def test_unrepeated_bodies_still_answer(server: LiveServer) -> None:
    """Controls: the same documents, each key once, are served."""
    assert send(server.url, json_request(PREDICT_JSON)).status == 200
    assert send(server.url, json_request(OIP_JSON, target=OIP_TARGET)).status == 200


# --- JSON integers are integers -----------------------------------------------------------


@pytest.mark.parametrize("top_k", [True, False, "3", 3.0, 1.5, "1e1", [3]], ids=repr)
def test_top_k_is_a_json_integer(server: LiveServer, top_k: object) -> None:
    resp = send(server.url, json_request({**PREDICT_JSON, "top_k": top_k}))
    _problem(resp, 422, "validation_error")


# --- 16-bit grey in every byte order ------------------------------------------------------

_GREY = (np.arange(40 * 56, dtype=np.int64).reshape(40, 56) * 29 % 65536).astype(np.uint16)


def _tiff_16(mode: str) -> bytes:
    order = ">" if mode == "I;16B" else "<"
    img = Image.frombytes(mode, (56, 40), _GREY.astype(f"{order}u2").tobytes())
    out = io.BytesIO()
    img.save(out, format="TIFF")
    return out.getvalue()


@pytest.mark.parametrize("mode", ["I;16B", "I;16L", "I;16"])
def test_16_bit_tiffs_decode_alike(mode: str) -> None:
    """Every byte order of the same 16-bit grey image gives the same backbone input."""
    data = _tiff_16(mode)
    if mode == "I;16B":
        with Image.open(io.BytesIO(data)) as img:
            assert img.mode == "I;16B"  # the mode PIL cannot take the extrema of
    config = DataConfig(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    got = prepare_image(data, 0, config, max_bytes=1 << 20, max_pixels=1 << 20)  # (3, 32, 32)
    want = prepare_image(_tiff_16("I;16"), 0, config, max_bytes=1 << 20, max_pixels=1 << 20)
    assert bool((got == want).all())


def test_big_endian_16_bit_tiff_is_served(server: LiveServer) -> None:
    resp = send(server.url, predict_form([_tiff_16("I;16B")], CLS))
    assert resp.status == 200, resp.body[:300]


# --- traffic version keys -----------------------------------------------------------------

ALIASES = ["01", "+1", " 1", "1 ", "1.0", "1_0", "\u0661", "0x1", "1e0"]


@pytest.mark.parametrize("alias", ALIASES, ids=repr)
def test_traffic_keys_are_canonical_versions(server: LiveServer, alias: str) -> None:
    """``{"1": 50, "01": 50}`` named version 1 twice and kept one weight (200); any spelling
    of a version other than its plain number is refused, and the split stays as it was."""
    with server.client() as c:
        before = c.get(f"/v1/tuners/{CLS}/traffic").json()
    for weights in ({alias: 100}, {"1": 50, alias: 50}):
        resp = send(
            server.url,
            RawRequest(
                "PUT",
                f"/v1/tuners/{CLS}/traffic",
                json.dumps({"traffic": weights}).encode(),
                {"Content-Type": "application/json", **server.admin_headers},
            ),
        )
        _problem(resp, 422, "validation_error")
    with server.client() as c:
        assert c.get(f"/v1/tuners/{CLS}/traffic").json() == before


@pytest.mark.parametrize(
    "body",
    [b'{"traffic": {"1": 0, "1": 100}}', b'{"traffic": {"1": 100}, "traffic": {"1": 0}}'],
    ids=["version-twice", "traffic-twice"],
)
def test_a_traffic_key_given_twice_is_refused(server: LiveServer, body: bytes) -> None:
    """A plain parse kept the last of two weights for one version (200); now 422, and the
    split stays as it was."""
    with server.client() as c:
        before = c.get(f"/v1/tuners/{CLS}/traffic").json()
    resp = send(
        server.url,
        RawRequest(
            "PUT",
            f"/v1/tuners/{CLS}/traffic",
            body,
            {"Content-Type": "application/json", **server.admin_headers},
        ),
    )
    assert "more than once" in _problem(resp, 422, "validation_error")["detail"]
    with server.client() as c:
        assert c.get(f"/v1/tuners/{CLS}/traffic").json() == before
