"""Every error response is built here: :class:`~server.errors.ApiError` -> RFC 9457 problem,
or the Open Inference Protocol's ``{"error": ...}`` for any path under ``/v2``.

The app installs :func:`install_exception_handlers`; the body-limit middleware, which answers
before any route runs, uses :func:`problem_response` too, so every refusal has one shape. The
error code is also left in the request's state (``error_code``) for the access log and the
``restune_rejected_requests_total{reason}`` counter, which count it once, in one place.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Scope

from server.errors import ApiError

PROBLEM_MEDIA_TYPE = "application/problem+json"

log = logging.getLogger("restune.server")

MAX_DETAIL_CHARS = 2000
"""``detail`` longer than this is cut: it may quote a client's input (a task name, a shape)."""
MAX_FIELD_CHARS = 512
"""Other strings of a problem body (names, field paths, messages) are cut here."""
MAX_LIST_ITEMS = 50
"""Lists in a problem body (``errors``) keep this many entries."""
_MAX_NESTING = 6
CLIENT_CLOSED_STATUS = 499
"""Status recorded (metrics, access log) when the client hung up before its answer; nginx's
convention, so a dashboard's ``5..`` error rate never counts a client's hang-up."""

# Starlette raises HTTPException for routing failures and a few protocol errors; each status
# gets the code a client would look for.
_CODE_BY_HTTP_STATUS = {
    400: "validation_error",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "overloaded",
}


def request_state(scope: Scope) -> dict[str, Any]:
    """The per-request state dict (``request.state``) shared by middleware and handlers."""
    state: dict[str, Any] = scope.setdefault("state", {})
    return state


OIP_PREFIX = "/v2"


def is_oip_path(scope: Scope) -> bool:
    """Whether the request is one of the Open Inference Protocol's (``/v2`` and below), whose
    errors every refusal answers in the protocol's ``{"error": ...}`` form, matched or not."""
    path = str(scope.get("path", ""))
    return path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/")


def safe_text(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """``text`` cut to ``limit`` characters, lone surrogates written as ``\\udxxx``.

    A JSON body may carry any code point, lone surrogates included, and an error message
    quotes what the client sent: encoding that answer must not fail (it would be a 500), and
    a megabyte of input must not come back in the answer.
    """
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def safe_value(value: Any, limit: int = MAX_FIELD_CHARS, _depth: int = 0) -> Any:
    """A JSON-ready copy of ``value`` whose strings pass :func:`safe_text` and whose lists
    and nesting are bounded (problem fields may hold client input)."""
    if isinstance(value, str):
        return safe_text(value, limit)
    if _depth >= _MAX_NESTING:
        return safe_text(repr(type(value).__name__))
    if isinstance(value, Mapping):
        items = list(value.items())[:MAX_LIST_ITEMS]
        return {safe_text(str(k)): safe_value(v, limit, _depth + 1) for k, v in items}
    if isinstance(value, list | tuple):
        return [safe_value(v, limit, _depth + 1) for v in value[:MAX_LIST_ITEMS]]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN or Infinity
    if isinstance(value, bool | None) or (isinstance(value, int) and abs(value) < 2**63):
        return value
    return safe_text(str(value) if not isinstance(value, int) else "<integer too large>")


def problem_response(
    err: ApiError, scope: Scope, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The problem+json response for ``err``; records its code on the request.

    Any text the client sent that the problem quotes is rendered safely (:func:`safe_value`).
    """
    state = request_state(scope)
    state["error_code"] = err.code
    all_headers = dict(err.headers())
    if headers:
        all_headers.update(headers)
    if is_oip_path(scope):
        # Open Inference Protocol clients (tritonclient) decode ``{"error": ...}`` only.
        return JSONResponse(
            {"error": safe_text(err.detail, MAX_DETAIL_CHARS)},
            status_code=err.status,
            headers=all_headers,
        )
    body = err.problem(instance=scope.get("path"))
    detail = safe_text(str(body.pop("detail", "")), MAX_DETAIL_CHARS)
    body = safe_value(body)
    body["detail"] = detail
    request_id = state.get("request_id")
    if request_id:
        body["request_id"] = request_id
    return JSONResponse(
        body, status_code=err.status, headers=all_headers, media_type=PROBLEM_MEDIA_TYPE
    )


def field_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI error entries reduced to ``{"field", "message", "type"}``.

    The input value is left out on purpose: it can be megabytes of base64 or a secret.
    """
    out: list[dict[str, Any]] = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        out.append(
            {"field": ".".join(loc), "message": str(e.get("msg", "")), "type": e.get("type", "")}
        )
    return out


def validation_error(errors: Sequence[Any]) -> ApiError:
    """A ``validation_error`` naming every failing field."""
    fields = field_errors(errors[:MAX_LIST_ITEMS])
    summary = "; ".join(f"{f['field'] or 'body'}: {f['message']}" for f in fields[:10])
    if len(errors) > 10:
        summary += f"; and {len(errors) - 10} more"
    return ApiError("validation_error", f"invalid request: {summary}", errors=fields)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return problem_response(_with_demo_hint(request, exc), request.scope)


def _with_demo_hint(request: Request, exc: ApiError) -> ApiError:
    """``unknown_task`` for a demo tuner still being trained says so and how far: on a first
    start the README's first request can arrive before the demo tuners exist."""
    demo = getattr(request.app.state, "demo", None)
    task = exc.extra.get("task")
    if exc.code != "unknown_task" or demo is None or not isinstance(task, str):
        return exc
    hint = demo.pending_hint(task)
    if hint is None:
        return exc
    return ApiError(exc.code, f"{exc.detail}: {hint}", status=exc.status, **exc.extra)


async def _request_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return problem_response(validation_error(exc.errors()), request.scope)


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODE_BY_HTTP_STATUS.get(exc.status_code, "internal" if exc.status_code >= 500 else "")
    if exc.status_code == 404:
        detail = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    else:
        detail = str(exc.detail)
    err = ApiError(code or "http_error", detail, status=exc.status_code)
    return problem_response(err, request.scope, headers=exc.headers)


async def _client_disconnected(request: Request, exc: Exception) -> Response:
    """The client hung up while sending its body: nothing to answer, nothing went wrong here.

    Logged at debug and recorded as 499 (see ``CLIENT_CLOSED_STATUS``), never as a 5xx.
    """
    state = request_state(request.scope)
    state["error_code"] = "client_disconnected"
    log.debug(
        "client disconnected before its request was read",
        extra={"request_id": state.get("request_id", "-"), "path": request.url.path},
    )
    return Response(status_code=CLIENT_CLOSED_STATUS)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    state = request_state(request.scope)
    request_id = state.get("request_id", "-")
    log.error(
        "unhandled error",
        exc_info=exc,
        extra={"request_id": request_id, "method": request.method, "path": request.url.path},
    )
    err = ApiError("internal", f"internal server error (request id {request_id})")
    # This handler runs outside the request-context middleware: set the id header here.
    return problem_response(err, request.scope, headers={"X-Request-ID": str(request_id)})


def install_exception_handlers(app: FastAPI) -> None:
    """Map every exception that can leave a route to a problem+json response."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(ClientDisconnect, _client_disconnected)
    app.add_exception_handler(Exception, _unexpected)
