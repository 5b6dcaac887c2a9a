"""Request id, metrics and the access log for every HTTP request, in one pure ASGI middleware.

* ``X-Request-ID``: a well-formed id sent by the client (or a proxy) is kept, otherwise a new
  one is made; it is in ``request.state.request_id``, the response header and the access log.
* Metrics are labelled by the route *template* (``/v1/tuners/{name}``), never the raw path, so
  the label set stays bounded; a path no route matches is ``unmatched``.
* Probes, scrapes and static files (``PROBE_ROUTES``) are counted apart, in
  ``restune_probe_requests_total{route,status}``: the request rate and error ratio are the API's.
* ``restune_rejected_requests_total{reason}`` counts the error code a handler left in the
  request state (see :mod:`server.problems`).
* A client that hung up while sending its body (:mod:`server.middleware.body_limit` marks
  it) is counted with status 499 and code ``client_disconnected`` and logged at debug level,
  whatever the route answered into the closed connection: a client's hang-up is never a 5xx.
* One access-log record per request; headers are never logged, so neither is the admin token.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import Metrics
from server.problems import CLIENT_CLOSED_STATUS, request_state

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
UNMATCHED = "unmatched"
STATIC = "/static/{path}"
# Probes and scrapes arrive every few seconds; they are logged at debug level only.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
# Not API traffic: counted in restune_probe_requests_total, out of the request rate, latency
# and error ratio that the dashboards and alerts read (a probe every few seconds would dilute a
# quiet replica's error ratio; the playground's static files would inflate its rate).
PROBE_ROUTES = QUIET_ROUTES | {"/v2/health/live", "/v2/health/ready", STATIC}
# A tenant flooding past its rate gets thousands of these a minute: counted in
# restune_rejected_requests_total{reason="rate_limited"}, logged at debug level only.
# A hang-up mid-body is the client's doing and says nothing about the server: debug only.
QUIET_CODES = frozenset({"rate_limited", "client_disconnected"})
# Any string can arrive as a method; only these become label values.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

access_log = logging.getLogger("restune.access")


def route_template(scope: Scope) -> str:
    """The path template of the route that handled the request, or ``unmatched``.

    Without parameter types: ``/v1/tuners/{name}``, not ``/v1/tuners/{name:tuner}``; every
    file of the static mount is ``/static/{path}``.
    """
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(path, str):
        # The static mount leaves no route in the scope: its files share one label.
        return STATIC if str(scope.get("path", "")).startswith("/static/") else UNMATCHED
    return path or "/"


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _VALID_REQUEST_ID.match(text) else None
    return None


class RequestContextMiddleware:
    """Assigns the request id, records request metrics and writes the access log."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        state = request_state(scope)
        state["request_id"] = request_id
        status = 500
        response_bytes = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_bytes
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                response_bytes += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            # The app's last-resort handler answers 500 outside this middleware; count it here.
            status = 500
            state.setdefault("error_code", "internal")
            raise
        finally:
            self._observe(scope, state, request_id, status, response_bytes, start)

    def _observe(
        self,
        scope: Scope,
        state: dict[str, object],
        request_id: str,
        status: int,
        response_bytes: int,
        start: float,
    ) -> None:
        elapsed = time.perf_counter() - start
        if state.get("client_disconnected"):
            status = CLIENT_CLOSED_STATUS
            state["error_code"] = "client_disconnected"
        route = route_template(scope)
        method = str(scope.get("method", ""))
        method_label = method if method in _METHODS else "other"
        m = self.metrics
        if route in PROBE_ROUTES:
            m.probe_requests.labels(route=route, status=str(status)).inc()
        else:
            m.requests.labels(route=route, method=method_label, status=str(status)).inc()
            m.request_duration.labels(route=route).observe(elapsed)
        code = state.get("error_code")
        if isinstance(code, str):
            m.rejected.labels(reason=code).inc()
        client = scope.get("client")
        access_log.log(
            logging.DEBUG
            if (route in QUIET_ROUTES and status < 400) or code in QUIET_CODES
            else logging.INFO,
            "request",
            extra={
                "request_id": request_id,
                "method": method,
                "path": scope.get("path", ""),
                "route": route,
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
                "response_bytes": response_bytes,
                "client": f"{client[0]}:{client[1]}" if client else None,
                "error_code": code,
            },
        )
