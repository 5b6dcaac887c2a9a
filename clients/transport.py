"""HTTP transport of the SDK (httpx, sync and async) with retries only where they are safe.

What is retried, and why it is safe:

* **Connect failures** (connection refused, DNS, connect timeout, no free pooled connection):
  the request never reached the server, so any method may be sent again.
* **503 with a ``Retry-After`` header** (``overloaded``, ``store_unavailable``, ``not_ready``):
  the server refused the request before doing any work and said when to come back. The client
  waits at least ``Retry-After`` (plus jitter so that many clients do not return in lockstep),
  and gives up at once when the server asks for longer than ``RetryPolicy.max_retry_after_s``.
* **A connection that broke after the request was sent** (read error, server closed the
  connection, read timeout): only for requests marked ``replay_safe``. GETs are. The tuner
  upload ``PUT /v1/tuners/{name}`` is too, *only because* the server stores artifacts by content:
  re-uploading identical bytes returns the existing version (HTTP 200) instead of creating a
  new one, so a PUT that did land the first time is not duplicated by the retry. ``DELETE``
  (a replay would answer 404 for a delete that succeeded) and ``POST /v1/predict`` (a slow
  server is not helped by a second copy of the work) are not replayed.

Nothing else is retried: 4xx answers, 500, 504 and 503 without ``Retry-After`` go straight to
the caller as :class:`clients.errors.RestuneError`. Backoff between attempts is exponential
with full jitter.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from clients.errors import connection_failed, error_from_response, parse_retry_after

log = logging.getLogger("restune.client")

_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
"""Transport errors raised before any byte of the request reached the server."""

_BROKEN_AFTER_SEND = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)
"""Transport errors that may have happened after the server received the request."""


@dataclass(frozen=True)
class RetryEvent:
    """Passed to ``RetryPolicy.on_retry`` before each wait."""

    attempt: int
    """1 for the first retry."""
    delay_s: float
    reason: str
    """``connect_error``, ``http_503`` or ``broken_connection``."""
    method: str
    path: str


@dataclass(frozen=True)
class RetryPolicy:
    """How many times and how long to retry the safe cases (see the module docstring)."""

    max_attempts: int = 4
    """Tries in all, the first included; 1 disables retries."""
    backoff_s: float = 0.25
    """Cap of the first backoff; doubles each attempt (full jitter draws below the cap)."""
    max_backoff_s: float = 8.0
    """Largest backoff cap."""
    max_retry_after_s: float = 30.0
    """A ``Retry-After`` longer than this is not waited for; the error is raised instead."""
    on_retry: Callable[[RetryEvent], None] | None = field(default=None, compare=False)
    """Called before each wait (logging, metrics, tests)."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.max_retry_after_s < 0:
            raise ValueError("backoff and Retry-After limits must be >= 0")

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full-jitter exponential backoff before retry number ``attempt`` (0-based)."""
        cap = min(self.max_backoff_s, self.backoff_s * (2.0**attempt))
        return rng.uniform(0.0, cap)


NO_RETRY = RetryPolicy(max_attempts=1)
"""A policy that sends every request once."""


@dataclass(frozen=True)
class Request:
    """One API call, built once and sent by either transport."""

    method: str
    path: str
    params: Mapping[str, str] | None = None
    headers: Mapping[str, str] | None = None
    content: bytes | None = None
    json: Any = None
    data: Mapping[str, str] | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    replay_safe: bool = False
    """Sending it twice has the effect of sending it once (see the module docstring)."""
    accept_statuses: frozenset[int] = frozenset()
    """Error statuses handed back as responses instead of raised (and never retried)."""


def retry_delay(
    policy: RetryPolicy,
    request: Request,
    attempt: int,
    outcome: httpx.Response | httpx.TransportError,
    rng: random.Random,
) -> tuple[float, str] | None:
    """Seconds to wait and why before sending ``request`` again, or None to stop.

    ``attempt`` counts the tries already made minus one (0 after the first try).
    """
    if attempt + 1 >= policy.max_attempts:
        return None
    if isinstance(outcome, httpx.Response):
        if outcome.status_code != 503:
            return None
        retry_after = parse_retry_after(outcome.headers.get("retry-after"))
        if retry_after is None or retry_after > policy.max_retry_after_s:
            return None
        # At least what the server asked for; the jitter keeps a crowd of clients apart.
        return retry_after + policy.backoff(attempt, rng), "http_503"
    if isinstance(outcome, _NEVER_SENT):
        return policy.backoff(attempt, rng), "connect_error"
    if request.replay_safe and isinstance(outcome, _BROKEN_AFTER_SEND):
        return policy.backoff(attempt, rng), "broken_connection"
    return None


def _notify(policy: RetryPolicy, request: Request, attempt: int, delay: float, why: str) -> None:
    log.debug("retrying %s %s in %.2fs (%s)", request.method, request.path, delay, why)
    if policy.on_retry is not None:
        policy.on_retry(RetryEvent(attempt + 1, delay, why, request.method, request.path))


def _kwargs(request: Request) -> dict[str, Any]:
    return {
        "params": request.params,
        "headers": request.headers,
        "content": request.content,
        "json": request.json,
        "data": request.data,
        "files": request.files,
    }


class SyncTransport:
    """Blocking transport over one pooled ``httpx.Client``."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | httpx.Timeout = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._client = httpx.Client(
            base_url=base_url, headers=dict(headers or {}), timeout=timeout, transport=transport
        )

    def send(self, request: Request) -> httpx.Response:
        """Send with the retry policy; return a 2xx (or accepted) response or raise."""
        attempt = 0
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = self._client.request(request.method, request.path, **_kwargs(request))
            except httpx.TransportError as exc:
                outcome = exc
            if isinstance(outcome, httpx.Response) and (
                outcome.is_success or outcome.status_code in request.accept_statuses
            ):
                return outcome
            decision = retry_delay(self.retry, request, attempt, outcome, self._rng)
            if decision is None:
                if isinstance(outcome, httpx.Response):
                    raise error_from_response(outcome)
                raise connection_failed(outcome, str(self._client.base_url)) from outcome
            _notify(self.retry, request, attempt, *decision)
            self._sleep(decision[0])
            attempt += 1

    def close(self) -> None:
        """Close pooled connections."""
        self._client.close()


class AsyncTransport:
    """Asyncio transport over one pooled ``httpx.AsyncClient``."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | httpx.Timeout = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._client = httpx.AsyncClient(
            base_url=base_url, headers=dict(headers or {}), timeout=timeout, transport=transport
        )

    async def send(self, request: Request) -> httpx.Response:
        """Send with the retry policy; return a 2xx (or accepted) response or raise."""
        attempt = 0
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = await self._client.request(
                    request.method, request.path, **_kwargs(request)
                )
            except httpx.TransportError as exc:
                outcome = exc
            if isinstance(outcome, httpx.Response) and (
                outcome.is_success or outcome.status_code in request.accept_statuses
            ):
                return outcome
            decision = retry_delay(self.retry, request, attempt, outcome, self._rng)
            if decision is None:
                if isinstance(outcome, httpx.Response):
                    raise error_from_response(outcome)
                raise connection_failed(outcome, str(self._client.base_url)) from outcome
            _notify(self.retry, request, attempt, *decision)
            await self._sleep(decision[0])
            attempt += 1

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self._client.aclose()
