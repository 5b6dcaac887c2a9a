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

A body sent with ``Content-Encoding: gzip`` or ``deflate`` (``tritonclient`` sends one when
asked) is decompressed here, incrementally, and the limit applies to the decompressed bytes as
well as to the bytes on the wire: a small body that inflates past the limit (a zip bomb) is a
413 after at most the limit's worth of output, never a buffer of its full size. The route sees
the plain body and no ``Content-Encoding``; a corrupt or truncated stream is a 400
``validation_error``, any other encoding (or a ``Transfer-Encoding`` other than ``chunked``) a
415 ``unsupported_media_type``. Each chunk inflates in
a worker thread (an inflate of the limit's worth of output takes tens of milliseconds).
"""

from __future__ import annotations

import asyncio
import zlib
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


def _too_large(limit: BodyLimit, what: str | None = None) -> ApiError:
    return ApiError(
        limit.code,
        f"{what or limit.what} exceeds the limit of {limit.max_bytes} bytes",
        limit=limit.max_bytes,
    )


_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
"""zlib window settings of the content codings decompressed (``deflate`` is zlib-wrapped, as
RFC 9110 defines it)."""


class _Inflater:
    """Decompresses one request body chunk by chunk, never past ``max_bytes`` of output."""

    def __init__(self, wbits: int, limit: BodyLimit) -> None:
        self._z = zlib.decompressobj(wbits)
        self._limit = limit
        self._produced = 0

    def feed(self, chunk: bytes, last: bool) -> bytes:
        """The plain bytes of ``chunk``; raises the 413 once the output passes the limit and
        a 400 for a corrupt stream, or one that ends before its end marker (``last``)."""
        room = self._limit.max_bytes - self._produced
        try:
            out = self._z.decompress(chunk, room + 1)
            if len(out) > room or self._z.unconsumed_tail:
                raise _too_large(self._limit, "decompressed request body")
            if last:
                out += self._z.flush()
        except zlib.error as exc:
            raise _corrupt(f"the compressed request body is corrupt ({exc})") from None
        self._produced += len(out)
        if self._produced > self._limit.max_bytes:
            raise _too_large(self._limit, "decompressed request body")
        if last and not self._z.eof:
            raise _corrupt("the compressed request body ends before its end")
        return out


def _corrupt(detail: str) -> ApiError:
    return ApiError("validation_error", detail, status=400)


def _content_coding(scope: Scope) -> tuple[int | None, ApiError | None]:
    """(zlib wbits or None for a plain body, the error for a coding not served).

    A ``Transfer-Encoding`` other than ``chunked`` (``gzip, chunked``: uvicorn unchunks and
    passes the compressed bytes on) is refused too: read as plain, the coded bytes would answer
    some other request than the one the client meant."""
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding":
            codings = {c.strip().lower() for c in value.decode("latin-1").split(",")}
            if not codings <= {"", "identity", "chunked"}:
                return None, ApiError(
                    "unsupported_media_type",
                    f"Transfer-Encoding {value.decode('latin-1')[:40]!r} is not supported: "
                    "send chunked or a Content-Encoding of gzip or deflate",
                )
    for name, value in scope.get("headers", ()):
        if name == b"content-encoding":
            coding = value.decode("latin-1").strip().lower()
            if coding in ("", "identity"):
                return None, None
            if coding in _WBITS:
                return _WBITS[coding], None
            return None, ApiError(
                "unsupported_media_type",
                f"Content-Encoding {coding[:40]!r} is not supported: send gzip, deflate or none",
            )
    return None, None


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
        timeout_s = self.body_timeout_s
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        received = 0
        body_done = False
        tripped: ApiError | None = None
        replaced = False
        wbits, refused = _content_coding(scope)
        inflater = None if wbits is None else _Inflater(wbits, limit)
        if wbits is not None:
            # The route reads the plain body: its length is no longer the header's.
            scope["headers"] = [
                (k, v)
                for k, v in scope.get("headers", ())
                if k not in (b"content-encoding", b"content-length")
            ]

        async def limited_receive() -> Message:
            nonlocal received, tripped, body_done
            if tripped is not None:
                raise tripped
            if refused is not None:
                tripped = refused
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
                if inflater is not None:
                    try:
                        plain = await asyncio.to_thread(
                            inflater.feed, message.get("body", b""), body_done
                        )
                    except ApiError as exc:
                        tripped = exc
                        raise
                    message = {**message, "body": plain}
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
                    if refused is not None
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
