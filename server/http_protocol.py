"""uvicorn's httptools protocol with a deadline on request headers (slow-header clients).

uvicorn times out idle keep-alive connections, but a client that sends a request's headers a
byte at a time holds its connection for as long as it likes: nothing reaches the app before
the headers are complete, so no middleware can see it. This protocol arms a timer when a
connection opens and again after each response; the request's headers must be complete
before it fires, or the client gets a 408 (``request_timeout``) and the connection closes.
The body has its own deadline, in :mod:`server.middleware.body_limit`.

Such a request never reaches the app, so it is not in the request metrics or the access log
(it is logged at debug level here).

A request httptools cannot parse (a bad method, a ``Content-Length`` of ``-1`` or ``1, 1``,
control bytes in a header, bytes after a body shorter than its declared length) is answered
400 ``bad_request`` as problem+json like every other refusal, not uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.errors import ApiError

log = logging.getLogger("restune.server")


def _problem_bytes(err: ApiError) -> bytes:
    """A whole HTTP/1.1 response of ``err`` as problem+json, closing the connection (written
    straight to the transport: the request never reached the app)."""
    body = json.dumps(err.problem()).encode()
    head = (
        f"HTTP/1.1 {err.status} {http.HTTPStatus(err.status).phrase}\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode()
    return head + body


def _timeout_response(timeout_s: float) -> bytes:
    return _problem_bytes(
        ApiError(
            "request_timeout",
            f"the request headers were not received within {timeout_s:g} s",
        )
    )


class HeaderTimeoutProtocol(HttpToolsProtocol):  # type: ignore[misc]
    """:class:`HttpToolsProtocol` refusing requests whose headers take longer than
    ``header_timeout_s`` (set on a subclass by :func:`protocol_with_header_timeout`)."""

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being served: its headers were complete
        client = self.client
        log.debug(
            "request headers not received in time",
            extra={"client": f"{client[0]}:{client[1]}" if client else None},
        )
        self.transport.write(_timeout_response(self.header_timeout_s))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's headers get their own deadline (a pipelined one is complete).
        if not self.transport.is_closing() and not self.pipeline:
            self._arm_header_timer()

    def send_400_response(self, msg: str) -> None:
        """httptools refused the request: 400 ``bad_request`` as problem+json (``msg`` is
        uvicorn's fixed text, nothing of the client's)."""
        self.transport.write(_problem_bytes(ApiError("bad_request", f"malformed HTTP: {msg}")))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


def protocol_with_header_timeout(timeout_s: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class for uvicorn's ``http=`` option, with ``timeout_s`` for headers."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": timeout_s})
