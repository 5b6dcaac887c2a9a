"""Bad input cannot crash the server: one real server process, every case a 4xx with its code.

Each case of the corpus is its own test id and asserts the exact status and stable ``code``
(plus the field it names, such as the failing image's index). The module's last test proves
the server survived: same process, same predictions for a reference request as before the
corpus, no 5xx counted in ``/metrics``, nothing written outside the store, and no pickle
payload ever ran.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from restuning.backbone import TorchBackbone
from tests.fixtures.live_server import TEST_ADMIN_TOKEN, LiveServer
from tests.fixtures.models import tiny_images
from tests.reliability import bad_artifacts as art
from tests.reliability import bad_images as img
from tests.reliability.raw_http import (
    BOUNDARY,
    Part,
    RawRequest,
    RawResponse,
    field_part,
    file_part,
    json_request,
    multipart_body,
    multipart_request,
    predict_form,
    send,
)
from tuners_store.artifact import pack_artifact, random_arrays

MiB = 1024 * 1024
REQUEST_LIMIT = 2 * MiB  # tests.fixtures.live_server.TEST_ENV
IMAGE_LIMIT = 256 * 1024
ARTIFACT_LIMIT = 4 * MiB
MAX_IMAGES = 8
MAX_TASKS = 16
CLS, REG, EMB = "ref-cls", "ref-reg", "ref-emb"
REFERENCE_TASKS = f"{CLS},{REG},{EMB}"


@dataclass
class Ctx:
    """What a case needs to build its request: the backbone and a scratch directory."""

    backbone: TorchBackbone
    admin: dict[str, str]
    scratch: Path

    @property
    def sentinel(self) -> Path:
        """The directory a pickle payload would create if anything unpickled it."""
        return self.scratch / "pickle-payload-ran"


@dataclass(frozen=True)
class Case:
    """One bad input: how to build the request, and the exact answer expected."""

    id: str
    build: Callable[[Ctx], RawRequest]
    status: int
    code: str
    fields: dict[str, Any] = field(default_factory=dict)
    """Extra problem fields that must have these values (``image``, ``task``)."""


def good_png(index: int = 0) -> bytes:
    return tiny_images(index + 1, seed=3)[index]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def form_with(*images: bytes, tasks: str = CLS) -> Callable[[Ctx], RawRequest]:
    return lambda ctx: predict_form(images, tasks)


def json_with(body: Any) -> Callable[[Ctx], RawRequest]:
    return lambda ctx: json_request(body)


def typed(content_type: str | None, body: bytes) -> Callable[[Ctx], RawRequest]:
    headers = {"Content-Type": content_type} if content_type else {}
    return lambda ctx: RawRequest("POST", "/v1/predict", body, headers)


def upload(
    data: Callable[[Ctx], bytes],
    name: str = "bad-upload",
    content_type: str = "application/octet-stream",
) -> Callable[[Ctx], RawRequest]:
    """``PUT /v1/tuners/{name}`` (``name`` goes on the request line as written) with the token."""

    def build(ctx: Ctx) -> RawRequest:
        headers = {**ctx.admin, "Content-Type": content_type}
        return RawRequest("PUT", f"/v1/tuners/{name}", data(ctx), headers)

    return build


def artifact_named(name: str) -> Callable[[Ctx], bytes]:
    return lambda ctx: art.valid(name, ctx.backbone)


def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b"{" * size
        sent += size


def endless_image_part(total: int) -> Iterator[bytes]:
    """A multipart body whose one image part streams ``total`` bytes without a length."""
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n\r\n'
    ).encode()
    yield from (b"\x00" * len(chunk) for chunk in chunks(total))


NAMELESS_PART = (
    f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nx\r\n--{BOUNDARY}--\r\n"
).encode()
PNG = img.encode("PNG")
JPEG = img.encode("JPEG")
GIF = img.encode("GIF")
TIFF = img.encode("TIFF")
WEBP = img.encode("WEBP")

IMAGE_CASES = [
    Case("png-truncated", form_with(img.truncated(PNG)), 422, "bad_image", {"image": 0}),
    Case("jpeg-truncated", form_with(img.truncated(JPEG)), 422, "bad_image", {"image": 0}),
    Case("gif-truncated", form_with(img.truncated(GIF)), 422, "bad_image", {"image": 0}),
    Case("tiff-truncated", form_with(img.truncated(TIFF)), 422, "bad_image", {"image": 0}),
    Case("webp-truncated", form_with(img.truncated(WEBP)), 422, "bad_image", {"image": 0}),
    Case("png-corrupt-pixels", form_with(img.png_corrupt_idat()), 422, "bad_image", {"image": 0}),
    Case("jpeg-corrupt-header", form_with(img.jpeg_corrupt_header()), 422, "bad_image"),
    Case("zero-bytes", form_with(b""), 422, "bad_image", {"image": 0}),
    Case("one-byte", form_with(b"\x89"), 422, "bad_image", {"image": 0}),
    Case("png-signature-only", form_with(img.PNG_SIGNATURE), 422, "bad_image", {"image": 0}),
    Case("random-bytes", form_with(bytes(range(256)) * 8), 422, "bad_image", {"image": 0}),
    Case("text-as-image", form_with(b"definitely a cat"), 422, "bad_image", {"image": 0}),
    Case(
        "svg",
        lambda ctx: multipart_request(
            [file_part(img.SVG, "image/svg+xml"), field_part("tasks", CLS)]
        ),
        422,
        "bad_image",
    ),
    Case("html", form_with(img.HTML), 422, "bad_image", {"image": 0}),
    Case("ppm-not-allowed", form_with(img.encode("PPM")), 422, "bad_image", {"image": 0}),
    Case("ico-not-allowed", form_with(img.encode("ICO")), 422, "bad_image", {"image": 0}),
    Case("pdf-not-allowed", form_with(img.encode("PDF")), 422, "bad_image", {"image": 0}),
    Case("png-zero-width", form_with(img.png_zero_width()), 422, "bad_image", {"image": 0}),
    Case("second-image-bad", form_with(good_png(), b"junk"), 422, "bad_image", {"image": 1}),
    Case(
        "png-bomb-30000x30000",
        lambda ctx: predict_form([img.png_bomb()], CLS),
        413,
        "image_too_large",
    ),
    Case("png-header-bomb", form_with(img.png_header_bomb()), 413, "image_too_large"),
    Case(
        "png-50-megapixels",
        form_with(img.png_header_bomb(10_000, 5_000)),
        413,
        "image_too_large",
        {"image": 0},
    ),
    Case(
        "png-strip-100000x1",
        form_with(img.png_strip(100_000)),
        422,
        "image_aspect_ratio",
        {"image": 0},
    ),
    Case(
        "png-strips-3000x1",
        form_with(good_png(), *[img.png_strip(3000)] * 7),
        422,
        "image_aspect_ratio",
    ),
    Case(
        "tiff-tile-bomb",
        form_with(img.tiled_tiff(16, 16, 8192)),
        413,
        "image_too_large",
        {"image": 0},
    ),
    Case(
        "jpeg-scan-bomb",
        form_with(img.jpeg_scan_bomb(2000)),
        413,
        "image_too_large",
        {"image": 0},
    ),
    Case(
        "jpeg-65000x65000",
        form_with(img.jpeg_with_size(65_000, 65_000)),
        413,
        "image_too_large",
        {"image": 0},
    ),
    Case(
        "gif-65535-screen",
        form_with(img.gif_with_screen(65_535, 65_535)),
        413,
        "image_too_large",
        {"image": 0},
    ),
    Case(
        "image-over-byte-limit",
        form_with(img.big_noise_png(IMAGE_LIMIT)),
        413,
        "image_too_large",
        {"image": 0},
    ),
    Case("too-many-images", form_with(*[good_png()] * (MAX_IMAGES + 1)), 413, "too_many_images"),
]

TASK_CASES = [
    Case("tasks-empty", form_with(good_png(), tasks=""), 422, "no_tasks"),
    Case("tasks-only-commas", form_with(good_png(), tasks=" , ,"), 422, "no_tasks"),
    Case("tasks-missing", lambda ctx: multipart_request([file_part(good_png())]), 422, "no_tasks"),
    Case(
        "task-duplicate",
        form_with(good_png(), tasks=f"{CLS},{REG},{CLS}"),
        422,
        "duplicate_task",
        {"task": CLS},
    ),
    Case(
        "task-duplicate-pinned",
        form_with(good_png(), tasks=f"{CLS},{CLS}@1"),
        422,
        "duplicate_task",
    ),
    Case(
        "task-unknown",
        form_with(good_png(), tasks=f"{CLS},ghost"),
        404,
        "unknown_task",
        {"task": "ghost"},
    ),
    Case("task-traversal", form_with(good_png(), tasks="../../etc/passwd"), 404, "unknown_task"),
    Case("task-unicode", form_with(good_png(), tasks="кот"), 404, "unknown_task"),
    Case(
        "too-many-tasks",
        form_with(good_png(), tasks=",".join(f"t{i}" for i in range(17))),
        422,
        "too_many_tasks",
    ),
    Case("task-version-zero", form_with(good_png(), tasks=f"{CLS}@0"), 422, "validation_error"),
    Case(
        "task-version-text", form_with(good_png(), tasks=f"{CLS}@latest"), 422, "validation_error"
    ),
    Case("task-version-unknown", form_with(good_png(), tasks=f"{CLS}@99"), 404, "unknown_version"),
]

MULTIPART_CASES = [
    Case(
        "multipart-no-boundary",
        typed("multipart/form-data", multipart_body([])),
        422,
        "validation_error",
    ),
    Case(
        "multipart-garbage",
        typed(f"multipart/form-data; boundary={BOUNDARY}", b"\x00\x01 not a form at all"),
        422,
        "validation_error",
    ),
    Case(
        "multipart-unterminated",
        typed(f"multipart/form-data; boundary={BOUNDARY}", multipart_body([file_part(PNG)])[:-40]),
        422,
        "validation_error",
    ),
    Case(
        "multipart-no-image",
        lambda ctx: multipart_request([field_part("tasks", CLS)]),
        422,
        "validation_error",
    ),
    Case(
        "multipart-unknown-field",
        lambda ctx: multipart_request(
            [file_part(PNG), field_part("tasks", CLS), field_part("url", "http://127.0.0.1:9/")]
        ),
        422,
        "validation_error",
    ),
    Case(
        "multipart-part-without-name",
        lambda ctx: RawRequest(
            "POST",
            "/v1/predict",
            NAMELESS_PART,
            {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        ),
        422,
        "validation_error",
    ),
    Case(
        "multipart-field-not-utf8",
        lambda ctx: multipart_request([file_part(PNG), Part("tasks", b"\xff\xfe\xfd")]),
        422,
        "validation_error",
    ),
    Case(
        "multipart-top-k-text",
        lambda ctx: multipart_request(
            [file_part(PNG), field_part("tasks", CLS), field_part("top_k", "many")]
        ),
        422,
        "validation_error",
    ),
    Case(
        "multipart-top-k-zero",
        lambda ctx: predict_form([PNG], CLS, top_k=0),
        422,
        "validation_error",
    ),
    Case(
        "multipart-top-k-twice",
        lambda ctx: multipart_request(
            [
                file_part(PNG),
                field_part("tasks", CLS),
                field_part("top_k", "1"),
                field_part("top_k", "2"),
            ]
        ),
        422,
        "validation_error",
    ),
]

JSON_CASES = [
    Case("json-malformed", typed("application/json", b'{"images": [}'), 422, "validation_error"),
    Case("json-empty-body", typed("application/json", b""), 422, "validation_error"),
    Case(
        "json-not-utf8",
        typed("application/json", b'{"tasks": "\xff\xfe"}'),
        422,
        "validation_error",
    ),
    Case("json-array", json_with([1, 2, 3]), 422, "validation_error"),
    Case("json-deeply-nested", typed("application/json", b"[" * 200_000), 422, "validation_error"),
    Case("json-no-images", json_with({"images": [], "tasks": [CLS]}), 422, "validation_error"),
    Case(
        "json-extra-field",
        json_with({"images": [{"b64": b64(PNG)}], "tasks": [CLS], "fetch": True}),
        422,
        "validation_error",
    ),
    Case(
        "json-tasks-number",
        json_with({"images": [{"b64": b64(PNG)}], "tasks": 5}),
        422,
        "validation_error",
    ),
    Case(
        "json-top-k-huge",
        json_with({"images": [{"b64": b64(PNG)}], "tasks": [CLS], "top_k": 10**30}),
        422,
        "validation_error",
    ),
    Case(
        "json-top-k-infinite",
        typed(
            "application/json",
            b'{"images": [{"b64": "AA=="}], "tasks": ["ref-cls"], "top_k": 1e999}',
        ),
        422,
        "validation_error",
    ),
    Case(
        "json-invalid-base64",
        json_with({"images": [{"b64": "not base64!!"}], "tasks": [CLS]}),
        422,
        "bad_image",
        {"image": 0},
    ),
    Case(
        "json-base64-url-alphabet",
        json_with({"images": [{"b64": "__--"}], "tasks": [CLS]}),
        422,
        "bad_image",
        {"image": 0},
    ),
    Case(
        "json-base64-empty",
        json_with({"images": [{"b64": ""}], "tasks": [CLS]}),
        422,
        "bad_image",
        {"image": 0},
    ),
    Case(
        "json-base64-of-text",
        json_with({"images": [{"b64": b64(b"hello")}], "tasks": [CLS]}),
        422,
        "bad_image",
        {"image": 0},
    ),
    Case(
        "json-data-url-not-base64",
        json_with({"images": [{"b64": "data:image/png,abc"}], "tasks": [CLS]}),
        422,
        "bad_image",
    ),
    Case(
        "json-second-image-truncated",
        json_with(
            {"images": [{"b64": b64(PNG)}, {"b64": b64(img.truncated(JPEG))}], "tasks": [CLS]}
        ),
        422,
        "bad_image",
        {"image": 1},
    ),
    Case(
        "json-image-url-refused",
        json_with({"images": [{"url": "http://127.0.0.1:9/a.png"}], "tasks": [CLS]}),
        422,
        "validation_error",
    ),
    Case(
        "json-image-as-string",
        json_with({"images": ["http://127.0.0.1:9/a.png"], "tasks": [CLS]}),
        422,
        "validation_error",
    ),
    Case(
        "json-too-many-images",
        json_with({"images": [{"b64": b64(PNG)}] * (MAX_IMAGES + 1), "tasks": [CLS]}),
        413,
        "too_many_images",
    ),
    Case(
        "json-image-over-byte-limit",
        json_with({"images": [{"b64": b64(img.big_noise_png(IMAGE_LIMIT))}], "tasks": [CLS]}),
        413,
        "image_too_large",
        {"image": 0},
    ),
    Case(
        "json-bomb",
        lambda ctx: json_request({"images": [{"b64": b64(img.png_bomb())}], "tasks": [CLS]}),
        413,
        "image_too_large",
        {"image": 0},
    ),
]

TRANSPORT_CASES = [
    Case("content-type-text", typed("text/plain", b"cat.png"), 415, "unsupported_media_type"),
    Case("content-type-missing", typed(None, PNG), 415, "unsupported_media_type"),
    Case("content-type-image", typed("image/png", PNG), 415, "unsupported_media_type"),
    Case(
        "content-type-urlencoded",
        typed("application/x-www-form-urlencoded", b"tasks=a"),
        415,
        "unsupported_media_type",
    ),
    Case(
        "body-declared-too-large",
        lambda ctx: RawRequest(
            "POST", "/v1/predict", b"{" * (REQUEST_LIMIT + 1), {"Content-Type": "application/json"}
        ),
        413,
        "payload_too_large",
    ),
    Case(
        "body-chunked-too-large",
        lambda ctx: RawRequest(
            "POST", "/v1/predict", chunks(REQUEST_LIMIT + MiB), {"Content-Type": "application/json"}
        ),
        413,
        "payload_too_large",
    ),
    Case(
        "multipart-chunked-endless-image",
        lambda ctx: RawRequest(
            "POST",
            "/v1/predict",
            endless_image_part(REQUEST_LIMIT + MiB),
            {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        ),
        413,
        "image_too_large",
        {"image": 0},
    ),
    Case(
        "predict-wrong-method",
        lambda ctx: RawRequest("GET", "/v1/predict"),
        405,
        "method_not_allowed",
    ),
    Case("unknown-route", lambda ctx: RawRequest("GET", "/v1/../../etc/passwd"), 404, "not_found"),
]

ARTIFACT_CASES = [
    Case(
        "artifact-pickle-dict",
        upload(lambda ctx: __import__("pickle").dumps({"w": [1.0]})),
        422,
        "artifact_bad_format",
    ),
    Case(
        "artifact-pickle-payload",
        upload(lambda ctx: art.evil_pickle(ctx.sentinel)),
        422,
        "artifact_bad_format",
    ),
    Case(
        "artifact-pickle-protocol-0",
        upload(lambda ctx: art.evil_pickle(ctx.sentinel, 0)),
        422,
        "artifact_bad_format",
    ),
    Case(
        "artifact-torch-save-zip",
        upload(lambda ctx: art.evil_torch_save(ctx.sentinel)),
        422,
        "artifact_bad_format",
    ),
    Case("artifact-png-magic", upload(lambda ctx: PNG), 422, "artifact_bad_format"),
    Case("artifact-tiny", upload(lambda ctx: b"\x00" * 4), 422, "artifact_bad_format"),
    Case(
        "artifact-header-length-huge",
        upload(lambda ctx: art.header_length(2**62)),
        413,
        "artifact_header_too_large",
    ),
    Case(
        "artifact-header-past-end",
        upload(lambda ctx: art.header_length(10_000)),
        422,
        "artifact_bad_format",
    ),
    Case(
        "artifact-header-deeply-nested",
        upload(lambda ctx: art.header_of(b'{"a":' + b"[" * 200_000)),
        422,
        "artifact_bad_header",
    ),
    Case(
        "artifact-header-not-json",
        upload(lambda ctx: art.header_not_json()),
        422,
        "artifact_bad_header",
    ),
    Case(
        "artifact-plain-safetensors",
        upload(lambda ctx: art.no_restune_metadata("bad-upload", ctx.backbone)),
        422,
        "artifact_bad_header",
    ),
    Case(
        "artifact-bad-config",
        upload(lambda ctx: art.bad_config("bad-upload", ctx.backbone)),
        422,
        "artifact_bad_config",
    ),
    Case(
        "artifact-wrong-shape",
        upload(lambda ctx: art.wrong_shape("bad-upload", ctx.backbone)),
        422,
        "artifact_bad_shape",
    ),
    Case(
        "artifact-missing-tensor",
        upload(lambda ctx: art.missing_tensor("bad-upload", ctx.backbone)),
        422,
        "artifact_missing_tensor",
    ),
    Case(
        "artifact-unexpected-tensor",
        upload(lambda ctx: art.unexpected_tensor("bad-upload", ctx.backbone)),
        422,
        "artifact_unexpected_tensor",
    ),
    Case(
        "artifact-nan",
        upload(lambda ctx: art.non_finite("bad-upload", ctx.backbone, float("nan"))),
        422,
        "artifact_non_finite",
    ),
    Case(
        "artifact-inf",
        upload(lambda ctx: art.non_finite("bad-upload", ctx.backbone, float("-inf"))),
        422,
        "artifact_non_finite",
    ),
    Case(
        "artifact-int-dtype",
        upload(lambda ctx: art.int_dtype("bad-upload", ctx.backbone)),
        422,
        "artifact_bad_dtype",
    ),
    Case(
        "artifact-overlapping-offsets",
        upload(lambda ctx: art.overlapping_offsets("bad-upload", ctx.backbone)),
        422,
        "artifact_bad_offsets",
    ),
    Case(
        "artifact-foreign-backbone",
        upload(lambda ctx: art.foreign_fingerprint("bad-upload", ctx.backbone)),
        409,
        "backbone_mismatch",
    ),
    Case(
        "artifact-name-mismatch",
        upload(artifact_named("other-name")),
        422,
        "artifact_name_mismatch",
    ),
    Case("artifact-empty", upload(lambda ctx: b""), 422, "validation_error"),
    Case(
        "artifact-too-large",
        upload(lambda ctx: art.sized(ctx.backbone, "bad-upload", ARTIFACT_LIMIT + 1)),
        413,
        "artifact_too_large",
    ),
    Case(
        "artifact-as-multipart",
        upload(artifact_named("bad-upload"), content_type="multipart/form-data; boundary=x"),
        415,
        "unsupported_media_type",
    ),
    Case(
        "artifact-as-json",
        upload(artifact_named("bad-upload"), content_type="application/json"),
        415,
        "unsupported_media_type",
    ),
]

# The artifact itself is valid (named "ok-name"); only the name on the request line is wrong.
NAME_CASES = [
    Case(f"name-{label}", upload(artifact_named("ok-name"), name=raw), status, code)
    for label, raw, status, code in [
        ("dot-dot", "..", 422, "invalid_name"),
        ("dot-dot-encoded", "%2e%2e", 422, "invalid_name"),
        ("dot-dot-slash-encoded", "..%2f..%2fetc", 404, "not_found"),
        ("nested-path", "a/b/c", 404, "not_found"),
        ("leading-dot", ".hidden", 422, "invalid_name"),
        ("unicode", "caf%C3%A9", 422, "invalid_name"),
        ("unicode-homoglyph", "ok-n%D0%B0me", 422, "invalid_name"),
        ("65-chars", "n" * 65, 422, "invalid_name"),
        ("uppercase", "OK-NAME", 422, "invalid_name"),
        ("nul-byte", "ok-name%00", 422, "invalid_name"),
        ("trailing-newline", "ok-name%0A", 422, "invalid_name"),
        ("space", "ok%20name", 422, "invalid_name"),
    ]
]

CASES = [
    *IMAGE_CASES,
    *TASK_CASES,
    *MULTIPART_CASES,
    *JSON_CASES,
    *TRANSPORT_CASES,
    *ARTIFACT_CASES,
    *NAME_CASES,
]
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


@dataclass(frozen=True)
class OipCase:
    """A bad Open Inference Protocol request: answered in the protocol's ``{"error"}`` shape."""

    id: str
    target: str
    body: bytes
    status: int
    headers: dict[str, str] = field(default_factory=dict)


def oip_bytes(*elements: str) -> bytes:
    """An infer request with one BYTES ``image`` input holding base64 ``elements``."""
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [len(elements)],
                    "datatype": "BYTES",
                    "data": list(elements),
                }
            ]
        }
    ).encode()


def oip_pixels(shape: list[int], value: float) -> bytes:
    n = 1
    for d in shape:
        n *= d
    return (
        json.dumps(
            {
                "inputs": [
                    {"name": "pixels", "shape": shape, "datatype": "FP32", "data": [value] * n}
                ]
            }
        )
        .replace("NaN", "NaN")
        .encode()
    )


INFER = f"/v2/models/{CLS}/infer"
ADMIN_HEADERS = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
OIP_CASES = [
    OipCase("oip-infer-malformed", INFER, b'{"inputs": [', 400),
    OipCase("oip-infer-deeply-nested", INFER, b"[" * 200_000, 400),
    OipCase("oip-infer-not-object", INFER, b"[]", 400),
    OipCase("oip-infer-no-inputs", INFER, b'{"inputs": []}', 400),
    OipCase(
        "oip-infer-header-length-outside",
        INFER,
        b'{"inputs": []}',
        400,
        {"Inference-Header-Content-Length": "999999"},
    ),
    OipCase(
        "oip-infer-unknown-input",
        INFER,
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "url",
                        "shape": [1],
                        "datatype": "BYTES",
                        "data": ["http://127.0.0.1:9/a.png"],
                    }
                ]
            }
        ).encode(),
        400,
    ),
    OipCase("oip-infer-image-not-base64", INFER, oip_bytes("not base64!!"), 400),
    OipCase("oip-infer-image-truncated", INFER, oip_bytes(b64(img.truncated(PNG))), 422),
    OipCase("oip-infer-bomb", INFER, oip_bytes(b64(img.png_header_bomb())), 413),
    OipCase("oip-infer-pixels-nan", INFER, oip_pixels([1, 3, 32, 32], float("nan")), 422),
    OipCase("oip-infer-pixels-wrong-size", INFER, oip_pixels([1, 3, 8, 8], 0.0), 422),
    OipCase("oip-infer-unknown-model", "/v2/models/ghost/infer", oip_bytes(b64(PNG)), 404),
    OipCase("oip-index-deeply-nested", "/v2/repository/index", b'{"ready":' + b"[" * 200_000, 400),
    OipCase("oip-index-malformed", "/v2/repository/index", b"{", 400),
    # Load and unload change what the replica holds: they take a writer or admin token.
    OipCase(
        "oip-load-deeply-nested",
        f"/v2/repository/models/{CLS}/load",
        b"[" * 200_000,
        400,
        ADMIN_HEADERS,
    ),
    OipCase("oip-load-unknown-model", "/v2/repository/models/ghost/load", b"", 404, ADMIN_HEADERS),
    OipCase("oip-load-anonymous", f"/v2/repository/models/{CLS}/load", b"", 401),
    OipCase("oip-unload-anonymous", f"/v2/repository/models/{CLS}/unload", b"", 401),
]


# --- the server and what it answered before the corpus ---------------------------------------


@dataclass
class Baseline:
    """The reference request and its answer before any bad input arrived."""

    request: RawRequest
    results: list[dict[str, Any]]
    tuners: list[dict[str, Any]]


def reference_request() -> RawRequest:
    return predict_form([good_png(0), JPEG, GIF, TIFF, WEBP], REFERENCE_TASKS, top_k=3)


def answer_of(resp: RawResponse) -> list[dict[str, Any]]:
    assert resp.status == 200, resp.body[:500]
    results: list[dict[str, Any]] = resp.json()["results"]
    return results


@pytest.fixture(scope="module")
def ctx(
    live_server: LiveServer, tiny_backbone: TorchBackbone, tmp_path_factory: pytest.TempPathFactory
) -> Ctx:
    return Ctx(tiny_backbone, live_server.admin_headers, tmp_path_factory.mktemp("scratch"))


@pytest.fixture(scope="module")
def baseline(live_server: LiveServer, tiny_backbone: TorchBackbone) -> Baseline:
    """Register the reference tuners and record the reference answer (before any case)."""
    for name, task in ((CLS, "classification"), (REG, "regression"), (EMB, "embedding")):
        config = art.config_for(name, tiny_backbone, task=task)
        resp = live_server.register(name, pack_artifact(config, random_arrays(config, seed=5)))
        assert resp.status_code == 201, resp.text
    request = reference_request()
    results = answer_of(send(live_server.url, request))
    with live_server.client() as c:
        tuners = c.get("/v1/tuners").json()["tuners"]
    return Baseline(request, results, tuners)


def assert_problem(resp: RawResponse, case: Case) -> dict[str, Any]:
    assert (resp.status, resp.content_type) == (case.status, "application/problem+json"), (
        f"{case.id}: {resp.status} {resp.body[:600]!r}"
    )
    body: dict[str, Any] = resp.json()
    assert body["code"] == case.code, body
    assert body["status"] == case.status
    assert body["type"] == f"urn:restune:error:{case.code}"
    for key, value in case.fields.items():
        assert body.get(key) == value, (key, body)
    return body


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_its_code(
    case: Case, live_server: LiveServer, ctx: Ctx, baseline: Baseline
) -> None:
    resp = send(live_server.url, case.build(ctx))
    body = assert_problem(resp, case)
    if case.status == 401:
        assert resp.headers["www-authenticate"].startswith("Bearer")
    # Problem bodies never echo megabytes of input back.
    assert len(resp.body) < 16 * 1024, body
    assert live_server.running


@pytest.mark.parametrize("case", OIP_CASES, ids=[c.id for c in OIP_CASES])
def test_oip_bad_input_is_refused(
    case: OipCase, live_server: LiveServer, baseline: Baseline
) -> None:
    headers = {"Content-Type": "application/json", **case.headers}
    resp = send(live_server.url, RawRequest("POST", case.target, case.body, headers))
    assert resp.status == case.status, f"{case.id}: {resp.status} {resp.body[:600]!r}"
    body = resp.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    assert live_server.running


def test_allowed_formats_still_answer(live_server: LiveServer, baseline: Baseline) -> None:
    """Control: the formats the corpus truncates are accepted when whole."""
    for data in (PNG, JPEG, GIF, TIFF, WEBP, img.encode("BMP")):
        assert len(answer_of(send(live_server.url, predict_form([data], CLS)))) == 1


# Runs last (pytest keeps file order): the corpus above must have left no trace.
def test_server_survived_the_corpus_unchanged(
    live_server: LiveServer, baseline: Baseline, ctx: Ctx
) -> None:
    assert live_server.running
    assert answer_of(send(live_server.url, baseline.request)) == baseline.results
    with live_server.client() as c:
        assert c.get("/v1/tuners").json()["tuners"] == baseline.tuners
        metrics = c.get("/metrics").text
    assert not ctx.sentinel.exists(), "an uploaded pickle was unpickled"
    server_errors = [
        line
        for line in metrics.splitlines()
        if line.startswith("restune_requests_total{")
        and re.search(r'status="5\d\d"', line)
        and float(line.rsplit(" ", 1)[1]) > 0
    ]
    assert server_errors == []
    # Nothing under the store but the reference tuners' directories.
    store = live_server.workdir / "store"
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == sorted(
        [CLS, EMB, REG]
    )
    assert "Traceback" not in live_server.stderr_text()
