"""uvicorn's httptools protocol with a deadline on request headers (slow-header clients).

uvicorn times out idle keep-alive connections, but a client that sends a request's headers a
byte at a time holds its connection for as long as it likes: nothing reaches the app before
the headers are complete, so no middleware can see it. This protocol arms a timer when a
connection opens and again after each response; the request's headers must be complete
before it fires, or the client gets a 408 (``request_timeout``) and the connection closes.
The body has its own deadline, in :mod:`server.middleware.body_limit`.

Such a request never reaches the app, so it is not in the request metrics or the access log
(it is logged at debug level here).

A request's head (request line and headers) is at most :data:`MAX_REQUEST_HEAD_BYTES`:
httptools sets no limit, so within the header deadline a client could send a header of tens
of MB, or a million small ones (each a tuple uvicorn keeps and every middleware walks: one
8 MB request of ``X-A: b`` lines cost 106 MB of RSS). Past it: 431 ``headers_too_large``,
connection closed.

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


MAX_REQUEST_HEAD_BYTES = 64 * 1024
"""Longest request head: 8x nginx's default header buffer, far above any real client's."""
DISCARD_S = 1.0
"""How long a connection whose head was refused is drained before it closes."""


class _HeadTooLargeError(Exception):
    """Raised from a parser callback to stop parsing a head over the limit."""


class HeaderTimeoutProtocol(HttpToolsProtocol):  # type: ignore[misc]
    """:class:`HttpToolsProtocol` refusing requests whose headers take longer than
    ``header_timeout_s`` (set on a subclass by :func:`protocol_with_header_timeout`) or
    more than :data:`MAX_REQUEST_HEAD_BYTES`."""

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._head_bytes: int | None = None
        """Bytes received of the request head being read; None once its headers are in."""
        self._head_fields = 0
        """Bytes of the request line and headers parsed so far (a head that came whole in
        one read, which the count above never sees incomplete)."""
        self._discarding = False
        """A refused head was answered: what else arrives is dropped until the close."""
        self._message_done = True
        """The request being read has arrived whole (its body too): only then does what
        follows on the connection start a new head. An early answer (a 413 while the body is
        still coming) must not count the rest of that body as the next request's head."""

    def _arm_header_timer(self) -> None:
        self._head_bytes = 0
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

    def data_received(self, data: bytes) -> None:
        if self._discarding or self.transport.is_closing():
            return
        reading_head = self._head_bytes is not None
        super().data_received(data)
        # A head incomplete before and after this chunk: every byte of it was head. (A chunk
        # that ended the previous body and began a head is not counted: the parsed fields are,
        # by _count_head.)
        if reading_head and self._head_bytes is not None and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_REQUEST_HEAD_BYTES:
                self._refuse_head()

    def on_message_begin(self) -> None:
        self._head_fields = 0
        self._message_done = False
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self._message_done = True
        super().on_message_complete()
        # Answered before its body ended: the next head starts now.
        answered = self.cycle is None or self.cycle.response_complete
        if answered and not self.transport.is_closing() and not self.pipeline:
            self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._head_fields += size
        if self._head_fields > MAX_REQUEST_HEAD_BYTES:
            # httptools stops parsing and uvicorn calls send_400_response, which refuses it.
            raise _HeadTooLargeError

    def _refuse_head(self) -> None:
        """431, then drop what the client still sends for :data:`DISCARD_S` before closing:
        closing with unread bytes makes the kernel reset the connection, and a client still
        sending its head would see the reset instead of the answer."""
        self._cancel_header_timer()
        self._head_bytes = None
        self._discarding = True
        self.transport.write(
            _problem_bytes(
                ApiError(
                    "headers_too_large",
                    f"the request line and headers exceed {MAX_REQUEST_HEAD_BYTES} bytes",
                    limit=MAX_REQUEST_HEAD_BYTES,
                )
            )
        )
        self.loop.call_later(DISCARD_S, self.transport.close)

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's headers get their own deadline (a pipelined one is complete),
        # once this request's body has arrived whole (else at its end: on_message_complete).
        if not self.transport.is_closing() and not self.pipeline and self._message_done:
            self._arm_header_timer()

    def send_400_response(self, msg: str) -> None:
        """httptools refused the request: 400 ``bad_request`` as problem+json (``msg`` is
        uvicorn's fixed text, nothing of the client's), or 431 when the head was too long."""
        if self._head_fields > MAX_REQUEST_HEAD_BYTES:
            self._refuse_head()
            return
        self.transport.write(_problem_bytes(ApiError("bad_request", f"malformed HTTP: {msg}")))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


def protocol_with_header_timeout(timeout_s: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class for uvicorn's ``http=`` option, with ``timeout_s`` for headers."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": timeout_s})
