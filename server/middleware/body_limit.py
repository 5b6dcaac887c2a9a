"""Refuse request bodies over a limit before they are buffered (413 ``payload_too_large``),
or not received in time (408 ``request_timeout``).

Two checks, both before a route can hold the whole body in memory: a declared
``Content-Length`` over the limit fails the route's first read of the body, before a byte is
taken from the socket; a body that arrives without one (chunked) is counted as it streams, and
the first chunk past the limit stops it. Whatever the route was doing with the body, the
client gets the 413. The request is still routed first, so a route that refuses without
reading the body (401 on an admin route, 404) answers as usual, and metrics see the route.

The whole body must arrive within ``body_timeout_s`` of the request's headers: a client
trickling a body a byte a second holds a connection and a route's buffer for as long as it
likes otherwise. Past it the route's read fails, the client gets a 408 and the connection is
closed. A client that hangs up while sending its body is recorded in the request state
(``client_disconnected``) so the request is counted as a client's hang-up (499), not a
server error, whatever the route made of the interruption.

A body sent with a ``Content-Encoding`` (gzip, deflate, anything but ``identity``), or a
``Transfer-Encoding`` other than ``chunked`` (``gzip, chunked``: uvicorn unchunks it and
passes the compressed bytes on), is refused at the route's first read with 415
``unsupported_media_type`` and ``Accept-Encoding: identity`` (RFC 9110 15.5.16): no route
decompresses, and reading the coded bytes as if they were plain would answer some other
request than the one the client meant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ApiError
from server.problems import problem_response, request_state


@dataclass(frozen=True)
class BodyLimit:
    """The most body bytes a request may send, and the error code past it."""

    max_bytes: int
    code: str = "payload_too_large"
    what: str = "request body"


LimitFor = Callable[[Scope], BodyLimit]
"""The limit of a request (it may depend on the method and path)."""


def _too_large(limit: BodyLimit) -> ApiError:
    return ApiError(
        limit.code,
        f"{limit.what} exceeds the limit of {limit.max_bytes} bytes",
        limit=limit.max_bytes,
    )


def _coded(codings: str) -> ApiError:
    return ApiError(
        "unsupported_media_type",
        f"request bodies are not decoded: send them without a Content-Encoding or a "
        f"Transfer-Encoding other than chunked (got {codings!r})",
    )


def _timed_out(timeout_s: float) -> ApiError:
    return ApiError(
        "request_timeout",
        f"the request body was not received within {timeout_s:g} s",
        limit_s=timeout_s,
    )


class BodyLimitMiddleware:
    """Pure ASGI middleware enforcing ``limit_for(scope)`` and the body read deadline on
    every HTTP request body."""

    def __init__(
        self, app: ASGIApp, limit_for: LimitFor, body_timeout_s: float | None = None
    ) -> None:
        """``body_timeout_s``: how long after its headers the whole body may take to arrive
        (None: no deadline)."""
        self.app = app
        self.limit_for = limit_for
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _content_length(scope)
        coded = _content_coding(scope)
        timeout_s = self.body_timeout_s
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        received = 0
        body_done = False
        tripped: ApiError | None = None
        replaced = False

        async def limited_receive() -> Message:
            nonlocal received, tripped, body_done
            if tripped is not None:
                raise tripped
            if coded is not None:
                tripped = _coded(coded)
                raise tripped
            if declared is not None and declared > limit.max_bytes:
                tripped = _too_large(limit)
                raise tripped
            if body_done or deadline is None:
                message = await receive()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    assert timeout_s is not None
                    tripped = _timed_out(timeout_s)
                    raise tripped from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes:
                    tripped = _too_large(limit)
                    raise tripped
                body_done = not message.get("more_body", False)
            elif message["type"] == "http.disconnect" and not body_done:
                request_state(scope)["client_disconnected"] = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal replaced
            if tripped is None:
                await send(message)
                return
            # The route may have turned the interruption into something else (a 400 from a
            # framework body parser): the client is owed the 413 or 408, exactly once. After
            # a 408 the connection closes (the client is too slow to wait for); after a 413
            # the server reads and drops the rest, so a client still sending sees the answer.
            if not replaced and message["type"] == "http.response.start":
                replaced = True
                extra = (
                    {"Connection": "close"}
                    if tripped.status == 408
                    else {"Accept-Encoding": "identity"}
                    if coded is not None
                    else None
                )
                await problem_response(tripped, scope, headers=extra)(scope, receive, send)

        await self.app(scope, limited_receive, guarded_send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


_CODING_HEADERS: dict[bytes, frozenset[str]] = {
    b"content-encoding": frozenset({"", "identity"}),
    b"transfer-encoding": frozenset({"", "identity", "chunked"}),
}


def _content_coding(scope: Scope) -> str | None:
    """The body codings of the request nobody here decodes, or None: a ``Content-Encoding``
    other than ``identity``, or a ``Transfer-Encoding`` other than ``chunked`` (the server
    only unchunks)."""
    seen: list[str] = []
    for name, value in scope.get("headers", ()):
        if name in _CODING_HEADERS:
            codings = [c.strip().lower() for c in value.decode("latin-1").split(",")]
            if any(c not in _CODING_HEADERS[name] for c in codings):
                seen.append(f"{name.decode()}: {value.decode('latin-1')}")
    return "; ".join(seen) or None
