"""Requests sent exactly as written: no URL normalisation, hand-built (and broken) bodies.

httpx resolves ``..`` in paths and always writes well-formed multipart bodies; the reliability
corpus needs both wrong on purpose, so these requests go through ``http.client``.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

BOUNDARY = "restune-reliability-boundary"
TIMEOUT_S = 60.0
"""Socket timeout of one request: far above any answer, a guard against hangs only."""


@dataclass(frozen=True)
class RawRequest:
    """One HTTP request; ``body`` may be an iterable of chunks (sent chunked, no length)."""

    method: str
    target: str
    """Path and query exactly as they go on the request line."""
    body: bytes | Iterable[bytes] = b""
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RawResponse:
    """Status, headers (lower-case names) and body of an answer."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def send(base_url: str, request: RawRequest, timeout: float = TIMEOUT_S) -> RawResponse:
    """Send ``request`` to ``base_url`` (``http://host:port``) on a fresh connection."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        headers = dict(request.headers)
        if isinstance(request.body, bytes):
            conn.request(request.method, request.target, body=request.body, headers=headers)
        else:
            headers.setdefault("Transfer-Encoding", "chunked")
            conn.request(
                request.method,
                request.target,
                body=request.body,
                headers=headers,
                encode_chunked=True,
            )
        resp = conn.getresponse()
        body = resp.read()
        return RawResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


@dataclass(frozen=True)
class Part:
    """One part of a multipart form: a field (``filename`` None) or a file."""

    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None


def file_part(data: bytes, content_type: str = "application/octet-stream") -> Part:
    """An ``image`` file part."""
    return Part("image", data, "upload.bin", content_type)


def field_part(name: str, value: str) -> Part:
    """A text field."""
    return Part(name, value.encode())


def multipart_body(parts: Iterable[Part], boundary: str = BOUNDARY) -> bytes:
    """A well-formed ``multipart/form-data`` body of ``parts``."""
    out = bytearray()
    for part in parts:
        disposition = f'form-data; name="{part.name}"'
        if part.filename is not None:
            disposition += f'; filename="{part.filename}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if part.content_type is not None:
            out += f"Content-Type: {part.content_type}\r\n".encode()
        out += b"\r\n" + part.data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def multipart_request(
    parts: Iterable[Part], *, target: str = "/v1/predict", boundary: str = BOUNDARY
) -> RawRequest:
    """``POST`` of a well-formed form."""
    return RawRequest(
        "POST",
        target,
        multipart_body(parts, boundary),
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )


def predict_form(images: Iterable[bytes], tasks: str, *, top_k: int | None = None) -> RawRequest:
    """A predict form: one ``image`` part per image, ``tasks``, optionally ``top_k``."""
    parts = [file_part(image) for image in images]
    parts.append(field_part("tasks", tasks))
    if top_k is not None:
        parts.append(field_part("top_k", str(top_k)))
    return multipart_request(parts)


def json_request(body: bytes | Any, *, target: str = "/v1/predict") -> RawRequest:
    """``POST`` of JSON: ``body`` as is when bytes, else serialised."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return RawRequest("POST", target, raw, {"Content-Type": "application/json"})
