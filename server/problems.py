"""Every error response is built here: :class:`~server.errors.ApiError` -> RFC 9457 problem.

The app installs :func:`install_exception_handlers`; the body-limit middleware, which answers
before any route runs, uses :func:`problem_response` too, so every refusal has one shape. The
error code is also left in the request's state (``error_code``) for the access log and the
``restune_rejected_requests_total{reason}`` counter, which count it once, in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from server.errors import ApiError

PROBLEM_MEDIA_TYPE = "application/problem+json"

log = logging.getLogger("restune.server")

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


def problem_response(
    err: ApiError, scope: Scope, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The problem+json response for ``err``; records its code on the request."""
    state = request_state(scope)
    state["error_code"] = err.code
    body = err.problem(instance=scope.get("path"))
    request_id = state.get("request_id")
    if request_id:
        body["request_id"] = request_id
    all_headers = dict(err.headers())
    if headers:
        all_headers.update(headers)
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
    fields = field_errors(errors)
    summary = "; ".join(f"{f['field'] or 'body'}: {f['message']}" for f in fields[:10])
    if len(fields) > 10:
        summary += f"; and {len(fields) - 10} more"
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
    app.add_exception_handler(Exception, _unexpected)
