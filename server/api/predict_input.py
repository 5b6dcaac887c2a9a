"""Turn a ``POST /v1/predict`` body (multipart or JSON) into images, task names and top_k.

Every limit is applied while the body is read, not after: the multipart form is parsed as it
streams, so the image that crosses ``max_image_bytes`` or the part one past
``max_images_per_request`` stops the request at once. Images stay encoded bytes here;
decoding and pixel limits belong to the engine.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from server.api.json_body import JsonBodyError, load_json
from server.api.schemas import PredictJsonRequest
from server.errors import ApiError
from server.problems import validation_error
from server.settings import Settings

FORM_FIELDS = ("image", "tasks", "task", "top_k")
"""Names a multipart predict form may use; any other is refused (it is most likely a typo)."""
MAX_FIELD_BYTES = 64 * 1024
"""Largest non-image form field (a task list of the longest allowed names fits many times)."""
DEFAULT_TOP_K = 5
MAX_BOUNDARY_BYTES = 70
"""RFC 2046's longest multipart boundary."""
_TOP_K_RE = re.compile(r"-?[0-9]{1,9}")
"""A ``top_k`` form value: an integer small enough to compare (the service checks the range)."""
MAX_TASK_ENTRIES = 1024
"""A task list (JSON list, or comma-separated entries) longer than this is refused before it
is validated or split (the service's own limit, ``max_tasks_per_request``, is far lower and
gives the precise error for shorter lists)."""
MAX_PART_HEADER_BYTES = 8 * 1024
"""Longest header name or value of a multipart part."""


@dataclass(frozen=True)
class PredictLimits:
    """The request limits of a predict call, from the settings."""

    max_images: int
    max_image_bytes: int
    max_tasks: int

    @classmethod
    def from_settings(cls, s: Settings) -> PredictLimits:
        return cls(
            max_images=s.max_images_per_request,
            max_image_bytes=s.max_image_bytes,
            max_tasks=s.max_tasks_per_request,
        )


@dataclass
class PredictInput:
    """A parsed predict request: encoded images in request order, task names, top_k."""

    images: list[bytes] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    top_k: int = DEFAULT_TOP_K


def field_error(name: str, message: str, type_: str = "value_error") -> ApiError:
    """A ``validation_error`` about one field of the body (``body`` for the body itself)."""
    loc = ("body",) if name == "body" else ("body", name)
    return validation_error([{"loc": loc, "msg": message, "type": type_}])


def too_many_images(limits: PredictLimits) -> ApiError:
    return ApiError(
        "too_many_images",
        f"at most {limits.max_images} images per request",
        limit=limits.max_images,
    )


def too_many_tasks(count: int, limits: PredictLimits) -> ApiError:
    return ApiError(
        "too_many_tasks", f"{count} tasks requested; at most {limits.max_tasks} per request"
    )


def image_too_large(index: int, limits: PredictLimits) -> ApiError:
    return ApiError(
        "image_too_large",
        f"image {index} is larger than {limits.max_image_bytes} bytes",
        image=index,
        limit=limits.max_image_bytes,
    )


def task_names(values: list[str], limits: PredictLimits) -> list[str]:
    """Task references from ``tasks=a,b`` and repeated ``task`` values, in order.

    Empty entries are dropped. The service checks the list itself (none, too many,
    duplicates, top_k range) so every protocol gets the same answers; only a list of more
    than :data:`MAX_TASK_ENTRIES` entries is refused here, counted before it is split (a
    64 kB field of commas is 32,000 entries).
    """
    entries = sum(value.count(",") + 1 for value in values)
    if entries > MAX_TASK_ENTRIES:
        raise too_many_tasks(entries, limits)
    names = [part.strip() for value in values for part in value.split(",")]
    return [n for n in names if n]


# --- multipart ---------------------------------------------------------------------------


class _FormCollector:
    """python-multipart callbacks that keep the predict form's parts under the limits."""

    def __init__(self, limits: PredictLimits) -> None:
        self.limits = limits
        self.images: list[bytes] = []
        self.fields: dict[str, list[str]] = {}
        self.finished = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._name = ""
        self._data = bytearray()

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._name = ""
        self._data = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]
        if len(self._header_name) > MAX_PART_HEADER_BYTES:
            raise field_error("body", f"a part header is longer than {MAX_PART_HEADER_BYTES} bytes")

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        if len(self._header_value) > MAX_PART_HEADER_BYTES:
            raise field_error("body", f"a part header is longer than {MAX_PART_HEADER_BYTES} bytes")

    def on_header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        raw_name = options.get(b"name")
        if raw_name is None:
            raise field_error("body", "a multipart part has no Content-Disposition name")
        name = raw_name.decode("utf-8", "replace")
        if name not in FORM_FIELDS:
            raise field_error(
                name, f"unknown form field {name!r}; expected one of {', '.join(FORM_FIELDS)}"
            )
        if name == "image" and len(self.images) >= self.limits.max_images:
            raise too_many_images(self.limits)
        # Room for one field per task plus top_k: more is not a predict form.
        max_fields = self.limits.max_tasks + 1
        if name != "image" and sum(len(v) for v in self.fields.values()) >= max_fields:
            raise field_error(name, "too many form fields")
        self._name = name

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]
        if self._name == "image":
            if len(self._data) > self.limits.max_image_bytes:
                raise image_too_large(len(self.images), self.limits)
        elif len(self._data) > MAX_FIELD_BYTES:
            raise field_error(self._name, f"form field is larger than {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if self._name == "image":
            self.images.append(bytes(self._data))
            return
        try:
            text = self._data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise field_error(self._name, "form field is not UTF-8 text") from exc
        self.fields.setdefault(self._name, []).append(text)

    def on_end(self) -> None:
        self.finished = True


async def read_multipart(
    chunks: AsyncIterator[bytes], content_type: str, limits: PredictLimits
) -> PredictInput:
    """Parse a ``multipart/form-data`` predict body as it streams in."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise field_error("body", "multipart/form-data without a boundary parameter")
    if len(boundary) > MAX_BOUNDARY_BYTES:
        raise field_error("body", f"multipart boundary longer than {MAX_BOUNDARY_BYTES} bytes")
    form = _FormCollector(limits)
    callbacks: Any = {
        name: getattr(form, name)
        for name in (
            "on_part_begin",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_part_data",
            "on_part_end",
            "on_end",
        )
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:  # MultipartParseError and the parser's own limits
        raise field_error("body", f"malformed multipart body: {exc}") from exc
    if not form.finished:
        raise field_error("body", "multipart body ended before its closing boundary")
    if not form.images:
        raise field_error("image", "no image part; send one or more files named 'image'")
    top_k = DEFAULT_TOP_K
    top_k_values = form.fields.get("top_k", [])
    if len(top_k_values) > 1:
        raise field_error("top_k", "top_k given more than once")
    if top_k_values:
        # ASCII digits of bounded length: int() alone takes "\u0663" and 4,300 digits.
        text = top_k_values[0].strip()
        if not _TOP_K_RE.fullmatch(text):
            raise field_error("top_k", "top_k must be an integer", "int_parsing")
        top_k = int(text)
    tasks = task_names(form.fields.get("tasks", []) + form.fields.get("task", []), limits)
    return PredictInput(form.images, tasks, top_k)


# --- JSON --------------------------------------------------------------------------------


def decode_b64_image(text: str, index: int, limits: PredictLimits) -> bytes:
    """Strict standard base64 (optionally a ``data:`` URL) to bytes, size-checked first."""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(
                "bad_image", f"image {index} is a data: URL that is not base64", image=index
            )
    # 4 characters carry 3 bytes: refuse an oversized image before decoding it.
    if len(text) // 4 * 3 > limits.max_image_bytes + 2:
        raise image_too_large(index, limits)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(
            "bad_image", f"image {index} is not valid base64: {exc}", image=index
        ) from exc
    if not data:
        raise ApiError("bad_image", f"image {index} is empty", image=index)
    if len(data) > limits.max_image_bytes:
        raise image_too_large(index, limits)
    return data


def read_json(body: bytes, limits: PredictLimits) -> PredictInput:
    """Parse and check a JSON predict body."""
    try:
        raw = load_json(body)
    except JsonBodyError as exc:
        if exc.too_large:
            raise ApiError("payload_too_large", str(exc)) from None
        raise field_error("body", str(exc), "json_invalid") from exc
    # Count before validating so a huge list is refused by its length, not item by item.
    images = raw.get("images") if isinstance(raw, dict) else None
    if isinstance(images, list) and len(images) > limits.max_images:
        raise too_many_images(limits)
    raw_tasks = raw.get("tasks") if isinstance(raw, dict) else None
    if isinstance(raw_tasks, list) and len(raw_tasks) > MAX_TASK_ENTRIES:
        raise too_many_tasks(len(raw_tasks), limits)
    try:
        req = PredictJsonRequest.model_validate(raw)
    except ValidationError as exc:
        raise validation_error([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc
    images = [decode_b64_image(img.b64, i, limits) for i, img in enumerate(req.images)]
    tasks = task_names([req.tasks] if isinstance(req.tasks, str) else req.tasks, limits)
    return PredictInput(images, tasks, req.top_k)
