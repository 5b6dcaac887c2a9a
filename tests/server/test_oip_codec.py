"""The OIP codec against tritonclient's own request encoder and response decoder, and the
compressed request bodies OIP clients send (``Content-Encoding: gzip``/``deflate``)."""

from __future__ import annotations

import gzip
import hashlib
import json
import warnings
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette nudges towards httpx2
    from fastapi.testclient import TestClient

from server.api.json_body import (
    MAX_INT_DIGITS,
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    MAX_JSON_VALUES,
    JsonBodyError,
    load_json,
)
from server.api.oip_codec import (
    HEADER_LENGTH,
    MAX_BYTES_ELEMENTS,
    MAX_INPUTS,
    MAX_NAME_CHARS,
    MAX_OUTPUTS,
    MAX_PARAMETERS,
    MAX_RANK,
    InferRequest,
    OipCodecError,
    OipTooLargeError,
    OutputTensor,
    classification_strings,
    decode_request,
    deserialize_bytes,
    encode_response,
    serialize_bytes,
)
from server.middleware.body_limit import BodyLimit, BodyLimitMiddleware
from server.problems import install_exception_handlers


def _triton_body(
    inputs: list[httpclient.InferInput],
    outputs: list[httpclient.InferRequestedOutput] | None = None,
) -> tuple[bytes, int | None]:
    body, header_length = httpclient.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="req-1"
    )
    return (body if isinstance(body, bytes) else body.encode()), header_length


def test_bytes_roundtrip_and_truncation() -> None:
    elements = [b"", b"\x00\x01png", "é".encode()]
    buf = serialize_bytes(elements)
    assert deserialize_bytes(buf) == elements
    with pytest.raises(OipCodecError):
        deserialize_bytes(buf[:-1])
    with pytest.raises(OipCodecError):
        deserialize_bytes(b"\x01\x00")


@pytest.mark.parametrize("binary", [True, False])
def test_decodes_tritonclient_bytes_and_fp32_inputs(binary: bool) -> None:
    images = np.array([b"abc", b"defg"], dtype=np.object_)
    pixels = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4) / 7
    a = httpclient.InferInput("image", [2], "BYTES")
    a.set_data_from_numpy(images, binary_data=binary)
    b = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
    b.set_data_from_numpy(pixels, binary_data=binary)
    body, header_length = _triton_body([a, b], [httpclient.InferRequestedOutput("scores")])
    req = decode_request(body, header_length)
    assert req.id == "req-1"
    image, px = req.input("image"), req.input("pixels")
    assert image is not None
    assert px is not None
    assert image.binary is binary
    assert px.binary is binary
    assert list(image.data) == [b"abc", b"defg"]
    np.testing.assert_array_equal(px.data, pixels)
    assert px.data.dtype == np.float32
    assert req.outputs is not None
    assert req.outputs[0].name == "scores"
    assert req.outputs[0].binary is True


def test_no_outputs_means_binary_output_default() -> None:
    a = httpclient.InferInput("image", [1], "BYTES")
    a.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    body, header_length = _triton_body([a])
    req = decode_request(body, header_length)
    assert req.outputs is None
    assert req.binary_output_default is True


def test_nested_json_data_is_row_major() -> None:
    doc = {
        "inputs": [{"name": "x", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]
    }
    req = decode_request(json.dumps(doc).encode(), None)
    np.testing.assert_array_equal(req.inputs[0].data, np.array([[1, 2], [3, 4]], dtype=np.int32))


@pytest.mark.parametrize(
    ("doc", "tail", "message"),
    [
        ({"inputs": []}, b"", "non-empty"),
        (
            {"inputs": [{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]},
            b"",
            "datatype",
        ),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}, b"", "shape"),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1]}]},
            b"",
            "1 elements",
        ),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}, b"", "no data"),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": ["a", "b"]}]},
            b"",
            "numbers",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [2],
                        "parameters": {"binary_data_size": 8},
                    }
                ]
            },
            b"\x00" * 4,
            "runs past",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [2],
                        "parameters": {"binary_data_size": 4},
                    }
                ]
            },
            b"\x00" * 4,
            "expected 8",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [1],
                        "parameters": {"binary_data_size": 4},
                    }
                ]
            },
            b"\x00" * 6,
            "belong to no input",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "BYTES",
                        "shape": [2],
                        "parameters": {"binary_data_size": 5},
                    }
                ]
            },
            b"\x01\x00\x00\x00a",
            "1 BYTES elements",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "INT32", "shape": [1], "data": [1]},
                    {"name": "x", "datatype": "INT32", "shape": [1], "data": [1]},
                ]
            },
            b"",
            "unique",
        ),
    ],
)
def test_refuses_malformed_requests(doc: dict[str, object], tail: bytes, message: str) -> None:
    head = json.dumps(doc).encode()
    with pytest.raises(OipCodecError, match=message):
        decode_request(head + tail, len(head) if tail else None)


def test_refuses_bad_header_length_and_json() -> None:
    with pytest.raises(OipCodecError, match="outside"):
        decode_request(b"{}", 10)
    with pytest.raises(OipCodecError, match="integer"):
        decode_request(b"{}", "ten")
    with pytest.raises(OipCodecError, match="invalid"):
        decode_request(b"{nope", None)


def _request(outputs: list[dict[str, object]] | None, binary_default: bool) -> InferRequest:
    doc: dict[str, object] = {
        "id": "r",
        "inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [0]}],
        "parameters": {"binary_data_output": binary_default},
    }
    if outputs is not None:
        doc["outputs"] = outputs
    return decode_request(json.dumps(doc).encode(), None)


@pytest.mark.parametrize("binary", [True, False])
def test_response_decodes_with_tritonclient(binary: bool) -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32)
    labels = np.array([b"cat", b"chat"], dtype=object)
    req = _request(
        [
            {"name": "scores", "parameters": {"binary_data": binary}},
            {"name": "labels", "parameters": {"binary_data": binary}},
        ],
        binary_default=False,
    )
    body, headers = encode_response(
        req,
        model_name="m",
        model_version="3",
        outputs=[OutputTensor("scores", "FP32", scores), OutputTensor("labels", "BYTES", labels)],
    )
    assert (HEADER_LENGTH in headers) is binary
    result = httpclient.InferenceServerClient.parse_response_body(
        body, header_length=int(headers[HEADER_LENGTH]) if binary else None
    )
    np.testing.assert_array_equal(result.as_numpy("scores"), scores)
    # JSON BYTES come back as str, binary ones as bytes: both carry the same elements.
    got = [x if isinstance(x, bytes) else x.encode() for x in result.as_numpy("labels").flat]
    assert got == [b"cat", b"chat"]
    response = result.get_response()
    assert response["model_name"] == "m"
    assert response["model_version"] == "3"
    assert response["id"] == "r"


def test_binary_data_output_default_and_per_output_override() -> None:
    req = _request([{"name": "a", "parameters": {"binary_data": False}}], binary_default=True)
    body, headers = encode_response(
        req,
        model_name="m",
        model_version="1",
        outputs=[
            OutputTensor("a", "FP32", np.zeros((1, 2), np.float32)),
            OutputTensor("b", "FP32", np.ones((1, 2), np.float32)),
        ],
    )
    n = int(headers[HEADER_LENGTH])
    doc = json.loads(body[:n])
    assert doc["outputs"][0]["data"] == [0.0, 0.0]
    assert doc["outputs"][1]["parameters"] == {"binary_data_size": 8}
    np.testing.assert_array_equal(np.frombuffer(body[n:], "<f4"), [1.0, 1.0])


def test_classification_strings_follow_triton_format() -> None:
    scores = np.array([[0.1, 0.7, 0.2]], dtype=np.float32)  # (B=1, C=3)
    out = classification_strings(scores, ["a", "b", "c"], 2)
    assert out.shape == (1, 2)
    first = out[0, 0].decode().split(":")
    assert (float(first[0]), first[1], first[2]) == (pytest.approx(0.7), "1", "b")
    assert out[0, 1].decode().endswith(":2:c")
    assert classification_strings(scores, ["a", "b", "c"], 10).shape == (1, 3)


# --- bounds: every number of a request is checked before arithmetic or allocation ---------


def _input(**fields: object) -> bytes:
    entry: dict[str, object] = {"name": "x", "datatype": "FP32", "shape": [1], "data": [0.0]}
    entry.update(fields)
    return json.dumps({"inputs": [entry]}).encode()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"shape": [1] * (MAX_RANK + 1)}, "dimensions; at most"),
        ({"shape": [2**63, 0]}, "between 0 and"),
        ({"shape": [2**31, 1]}, "between 0 and"),
        ({"shape": [True]}, "between 0 and"),
        ({"shape": [1.0]}, "between 0 and"),
        ({"shape": [2**31 - 1] * 4}, "more than"),
        ({"datatype": ["FP32"]}, "datatype"),
        ({"datatype": "x" * 5000}, "datatype"),
        ({"name": "n" * (MAX_NAME_CHARS + 1)}, "characters"),
        ({"parameters": {f"p{i}": i for i in range(MAX_PARAMETERS + 1)}}, "parameters"),
        ({"parameters": []}, "parameters must be an object"),
        ({"datatype": "INT8", "data": [300]}, "does not fit"),
        ({"datatype": "BYTES", "data": [5]}, "strings"),
        ({"datatype": "BYTES", "shape": [MAX_BYTES_ELEMENTS + 1], "data": []}, "more than"),
        ({"shape": [2], "data": [0.0, 0.0, 0.0]}, "more elements"),
    ],
)
def test_request_numbers_are_bounded(fields: dict[str, object], message: str) -> None:
    with pytest.raises(OipCodecError, match=message):
        decode_request(_input(**fields), None)


def test_a_shape_of_hundreds_of_thousands_of_dimensions_costs_nothing() -> None:
    """The rank is checked before a dimension is looked at (it used to be multiplied out on
    the event loop: 19 s for 400,000 dimensions); the JSON value limit refuses it first."""
    body = _input(shape=[1] * 400_000)
    with pytest.raises(OipCodecError, match="JSON values"):
        decode_request(body, None)
    body = _input(shape=[1] * 100_000)
    with pytest.raises(OipCodecError, match="dimensions; at most"):
        decode_request(body, None)


@pytest.mark.parametrize("length", ["1\u00b2", "-1", "+2", "1_0", "0x10", "9" * 5000, "١"])
def test_header_length_is_ascii_digits(length: str) -> None:
    with pytest.raises(OipCodecError, match=HEADER_LENGTH):
        decode_request(b"{}", length)


@pytest.mark.parametrize(
    "doc",
    [
        {"id": 5},
        {"id": "i" * (MAX_NAME_CHARS + 1)},
        {"outputs": [{"name": "scores"}] * (MAX_OUTPUTS + 1)},
        {"outputs": [{"name": "scores", "parameters": {"classification": 2**63}}]},
        {"outputs": [{"name": "scores", "parameters": {"classification": -1}}]},
        {"parameters": {f"p{i}": i for i in range(MAX_PARAMETERS + 1)}},
    ],
)
def test_request_fields_are_bounded(doc: dict[str, object]) -> None:
    full = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [0]}], **doc}
    with pytest.raises(OipCodecError):
        decode_request(json.dumps(full).encode(), None)


def test_too_many_inputs() -> None:
    entry = {"name": "x", "datatype": "INT32", "shape": [1], "data": [0]}
    doc = {"inputs": [{**entry, "name": f"x{i}"} for i in range(MAX_INPUTS + 1)]}
    with pytest.raises(OipCodecError, match="inputs; at most"):
        decode_request(json.dumps(doc).encode(), None)


def test_bytes_elements_stop_at_the_shapes_count() -> None:
    """A tail of a million empty elements is refused at the first one past the shape."""
    with pytest.raises(OipCodecError, match="more than 2"):
        deserialize_bytes(b"\x00\x00\x00\x00" * 1_000_000, max_elements=2)


@pytest.mark.parametrize(
    ("body", "too_large"),
    [
        (b"[" * 33 + b"]" * 33, False),
        (b"[" * 200_000, False),
        (b"[" + b"9" * 5000 + b"]", False),
        (b"[" + b"9" * (MAX_INT_DIGITS + 1) + b"]", False),
        (b"[" + b"[]," * (MAX_JSON_VALUES + 1) + b"[]]", True),
        (b'"' + b"x" * MAX_JSON_BYTES + b'"', True),
        (b"\xff\xfe{}", False),
    ],
)
def test_json_bodies_are_bounded(body: bytes, too_large: bool) -> None:
    with pytest.raises(JsonBodyError) as err:
        load_json(body)
    assert err.value.too_large is too_large
    if too_large:
        with pytest.raises(OipTooLargeError):
            decode_request(body, None)
    else:
        with pytest.raises(OipCodecError):
            decode_request(body, None)


def test_json_at_the_bounds_is_accepted() -> None:
    assert load_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is not None
    assert load_json(b"[-" + b"9" * MAX_INT_DIGITS + b", 1.5e308, NaN]")[0] < 0


# --- compressed request bodies (server.middleware.body_limit) ----------------------------------

LIMIT = 64 * 1024


def _echo_app() -> Starlette:
    """An app that answers the length and sha of the body it read, behind the body limit."""

    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse(
            {
                "length": len(body),
                "sha": hashlib.sha256(body).hexdigest(),
                "encoding": request.headers.get("content-encoding"),
            }
        )

    app = Starlette(routes=[Route("/v2/echo", echo, methods=["POST"])])
    install_exception_handlers(app)  # type: ignore[arg-type]
    app.add_middleware(BodyLimitMiddleware, limit_for=lambda scope: BodyLimit(LIMIT))
    return app


def _chunks(data: bytes, size: int = 1000) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize(
    ("coding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("x-gzip", gzip.compress)],
)
def test_compressed_bodies_reach_the_route_plain(
    coding: str, compress: Callable[[bytes], bytes]
) -> None:
    plain = np.random.default_rng(0).integers(0, 4, LIMIT - 10, dtype=np.uint8).tobytes()
    with TestClient(_echo_app()) as client:
        # Streamed in 1000-byte chunks without a Content-Length: inflated chunk by chunk.
        resp = client.post(
            "/v2/echo", content=_chunks(compress(plain)), headers={"Content-Encoding": coding}
        )
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "length": len(plain),
        "sha": hashlib.sha256(plain).hexdigest(),
        "encoding": None,
    }


def test_a_zip_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (64 * LIMIT))  # 4 MiB of zeros in about 4 KiB
    gz = {"Content-Encoding": "gzip"}
    with TestClient(_echo_app()) as client:
        whole = client.post("/v2/echo", content=bomb, headers=gz)
        over = client.post("/v2/echo", content=gzip.compress(b"\0" * (LIMIT + 1)), headers=gz)
        at_limit = client.post("/v2/echo", content=gzip.compress(b"\0" * LIMIT), headers=gz)
    assert whole.status_code == 413
    message = f"decompressed request body exceeds the limit of {LIMIT} bytes"
    assert whole.json() == {"error": message}
    assert over.status_code == 413
    assert at_limit.status_code == 200
    assert at_limit.json()["length"] == LIMIT


@pytest.mark.parametrize(
    ("coding", "body", "status"),
    [
        ("gzip", b"\x1f\x8b\x08\x00 not gzip", 400),
        ("gzip", gzip.compress(b"x" * 100)[:-8], 400),  # cut before the end marker
        ("deflate", gzip.compress(b"x"), 400),  # gzip framing under the deflate name
        ("br", b"{}", 415),
        ("gzip, gzip", gzip.compress(gzip.compress(b"x")), 415),
    ],
)
def test_bad_compressed_bodies_are_client_errors(coding: str, body: bytes, status: int) -> None:
    with TestClient(_echo_app()) as client:
        resp = client.post("/v2/echo", content=body, headers={"Content-Encoding": coding})
    assert resp.status_code == status, resp.text
    assert set(resp.json()) == {"error"}
