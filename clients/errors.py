"""One error taxonomy for the SDK and the CLI, parsed from a response in one place.

The server answers every failure as RFC 9457 ``application/problem+json`` with a stable
``code``; :func:`error_from_response` turns that into one exception class. Codes the client
does not know yet fall back on the HTTP status, so a newer server never crashes an older client.
"""

# The class names read like the codes they stand for (``except UnknownTask``), not ``...Error``.
# ruff: noqa: N818

from __future__ import annotations

import email.utils
import json
import time
from typing import Any

import httpx


class RestuneError(Exception):
    """Any failure talking to a restune server.

    ``code`` is the server's stable code (or a client-side one such as ``connection_failed``),
    ``status`` the HTTP status (None when no response came back), ``detail`` a human sentence
    and ``problem`` the full problem body (extra fields such as ``task`` or ``image``).
    """

    default_code = "error"

    def __init__(
        self,
        code: str | None = None,
        status: int | None = None,
        detail: str = "",
        problem: dict[str, Any] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        self.code = code or self.default_code
        self.status = status
        self.detail = detail
        self.problem: dict[str, Any] = dict(problem or {})
        self.retry_after = retry_after
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"HTTP {self.status} " if self.status is not None else ""
        return f"{where}{self.code}: {self.detail}" if self.detail else f"{where}{self.code}"

    @property
    def server_side(self) -> bool:
        """True when the fault is the server's or its load's (5xx), not the request's."""
        return self.status is not None and self.status >= 500


class NotFound(RestuneError):
    """The tuner, version or route does not exist (404)."""

    default_code = "not_found"


class UnknownTask(NotFound):
    """A requested task is not registered (404); ``task`` names it."""

    default_code = "unknown_task"

    @property
    def task(self) -> str | None:
        value = self.problem.get("task")
        return str(value) if value is not None else None


class ValidationFailed(RestuneError):
    """The request was well-formed HTTP but its content was refused (400/409/415/422)."""

    default_code = "validation_error"


class BadImage(ValidationFailed):
    """An image could not be decoded or is invalid (422); ``image`` is its index."""

    default_code = "bad_image"

    @property
    def image(self) -> int | None:
        value = self.problem.get("image")
        return int(value) if isinstance(value, int) else None


class ArtifactRejected(ValidationFailed):
    """An uploaded tuner artifact failed validation (``artifact_*``, ``backbone_mismatch``), or
    a stored one fails it on this server (``tuner_unloadable``)."""

    default_code = "artifact_invalid"


class VersionInUse(ValidationFailed):
    """A version that is current or takes canary traffic was deleted without ``force``, or
    it is the tuner's only version (409)."""

    default_code = "version_in_use"


class Unauthorized(RestuneError):
    """No admin token was sent to an admin route (401)."""

    default_code = "unauthorized"


class Forbidden(RestuneError):
    """The admin token was wrong or not allowed (403)."""

    default_code = "forbidden"


class PayloadTooLarge(RestuneError):
    """The request, an image or an artifact exceeds a server limit (413)."""

    default_code = "payload_too_large"


class RateLimited(RestuneError):
    """A quota or rate limit was hit (429); ``retry_after`` says when to come back."""

    default_code = "rate_limited"


class ServerError(RestuneError):
    """The server failed (5xx) for a reason that is not load."""

    default_code = "internal"


class Overloaded(ServerError):
    """The server shed the request (503): its queue is full or it is not ready yet."""

    default_code = "overloaded"


class StoreUnavailable(ServerError):
    """The tuner store (filesystem or Redis) is unreachable from the server (503)."""

    default_code = "store_unavailable"


class ConnectionFailed(RestuneError):
    """No HTTP answer: connection refused, DNS failure, timeout or a dropped connection."""

    default_code = "connection_failed"


_CLASS_BY_CODE: dict[str, type[RestuneError]] = {
    "unknown_task": UnknownTask,
    "unknown_version": NotFound,
    "tuner_not_found": NotFound,
    "version_not_found": NotFound,
    "not_found": NotFound,
    "bad_image": BadImage,
    "image_aspect_ratio": BadImage,
    "validation_error": ValidationFailed,
    "bad_request": ValidationFailed,
    "too_many_tasks": ValidationFailed,
    "no_tasks": ValidationFailed,
    "duplicate_task": ValidationFailed,
    "invalid_name": ValidationFailed,
    "invalid_traffic": ValidationFailed,
    "unsupported_media_type": ValidationFailed,
    "backbone_mismatch": ArtifactRejected,
    "tuner_unloadable": ArtifactRejected,
    "version_in_use": VersionInUse,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "payload_too_large": PayloadTooLarge,
    "headers_too_large": PayloadTooLarge,
    "image_too_large": PayloadTooLarge,
    "too_many_images": PayloadTooLarge,
    "artifact_too_large": PayloadTooLarge,
    "artifact_header_too_large": PayloadTooLarge,
    "rate_limited": RateLimited,
    "quota_exceeded": RateLimited,
    "overloaded": Overloaded,
    "not_ready": Overloaded,
    "store_unavailable": StoreUnavailable,
    "deadline_exceeded": ServerError,
    "tuner_load_failed": ServerError,
    "internal": ServerError,
}
"""The one code -> exception map. ``artifact_*`` codes not listed are :class:`ArtifactRejected`."""


def _class_for_status(status: int) -> type[RestuneError]:
    """Fallback when a body carries no known code (a proxy's page, a newer server)."""
    if status == 401:
        return Unauthorized
    if status == 403:
        return Forbidden
    if status == 404:
        return NotFound
    if status == 413:
        return PayloadTooLarge
    if status == 429:
        return RateLimited
    if status == 503:
        return Overloaded
    if status >= 500:
        return ServerError
    if status >= 400:
        return ValidationFailed
    return RestuneError


def class_for(code: str, status: int) -> type[RestuneError]:
    """The exception class for a problem ``code`` answered with HTTP ``status``."""
    if code in _CLASS_BY_CODE:
        return _CLASS_BY_CODE[code]
    if code.startswith("artifact_"):
        return PayloadTooLarge if status == 413 else ArtifactRejected
    return _class_for_status(status)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _problem_body(resp: httpx.Response) -> dict[str, Any]:
    """The JSON object of an error body, or {} when the body is not JSON (HTML from a proxy)."""
    try:
        body = json.loads(resp.content)
    except (ValueError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def error_from_response(resp: httpx.Response) -> RestuneError:
    """Map an error response (problem+json ``code``, else the HTTP status) to an exception.

    Also understands the Open Inference Protocol's ``{"error": "..."}`` shape.
    """
    problem = _problem_body(resp)
    raw_code = problem.get("code")
    code = raw_code if isinstance(raw_code, str) and raw_code else None
    detail_value = problem.get("detail", problem.get("error"))
    if isinstance(detail_value, str):
        detail = detail_value
    elif detail_value is not None:
        detail = json.dumps(detail_value)
    else:
        detail = resp.text[:200].strip() or resp.reason_phrase
    cls = class_for(code, resp.status_code) if code else _class_for_status(resp.status_code)
    return cls(
        # No code (a proxy's page, an old server): name the status rather than guess a cause.
        code or f"http_{resp.status_code}",
        resp.status_code,
        detail,
        problem,
        retry_after=parse_retry_after(resp.headers.get("retry-after")),
    )


def connection_failed(exc: Exception, url: str) -> ConnectionFailed:
    """The SDK's error for a request that got no HTTP answer."""
    reason = str(exc) or type(exc).__name__
    return ConnectionFailed("connection_failed", None, f"{url}: {reason}", {"url": url})
