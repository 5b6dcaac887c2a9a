"""Refuse request bodies over a limit before they are buffered (413 ``payload_too_large``).

Two checks, both before a route can hold the whole body in memory: a declared
``Content-Length`` over the limit fails the route's first read of the body, before a byte is
taken from the socket; a body that arrives without one (chunked) is counted as it streams, and
the first chunk past the limit stops it. Whatever the route was doing with the body, the
client gets the 413. The request is still routed first, so a route that refuses without
reading the body (401 on an admin route, 404) answers as usual, and metrics see the route.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ApiError
from server.problems import problem_response


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


class BodyLimitMiddleware:
    """Pure ASGI middleware enforcing ``limit_for(scope)`` on every HTTP request body."""

    def __init__(self, app: ASGIApp, limit_for: LimitFor) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _content_length(scope)
        received = 0
        tripped = False
        replaced = False

        async def limited_receive() -> Message:
            nonlocal received, tripped
            if tripped or (declared is not None and declared > limit.max_bytes):
                tripped = True
                raise _too_large(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes:
                    tripped = True
                    raise _too_large(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal replaced
            if not tripped:
                await send(message)
                return
            # The route may have turned the interruption into something else (a 400 from a
            # framework body parser): the client is owed the 413, exactly once.
            if not replaced and message["type"] == "http.response.start":
                replaced = True
                await problem_response(_too_large(limit), scope)(scope, receive, send)

        await self.app(scope, limited_receive, guarded_send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
