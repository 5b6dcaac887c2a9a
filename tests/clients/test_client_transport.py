"""Retries happen only where safe: connect failures, 503 + Retry-After, replay-safe requests.

A scripted fault peer answers 503s or drops connections; the sleeps are recorded instead of
waited so that the delays can be checked against ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import random
import socket

import httpx
import pytest

from clients.errors import ConnectionFailed, Overloaded, RestuneError, ServerError
from clients.sdk import Client, delete_tuner_request, predict_request, push_request
from clients.transport import (
    AsyncTransport,
    Request,
    RetryEvent,
    RetryPolicy,
    SyncTransport,
    retry_delay,
)
from tests.clients.fault_peer import FaultPeer, Reply

OVERLOADED = Reply(503, b'{"code":"overloaded","detail":"queue full"}', {"Retry-After": "2"})
OK = Reply(200, b'{"tuners":[]}', {"Content-Type": "application/json"})
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def _transport(peer: FaultPeer, sleeps: list[float], events: list[RetryEvent]) -> SyncTransport:
    policy = RetryPolicy(max_attempts=4, on_retry=events.append)
    return SyncTransport(peer.url, retry=policy, sleep=sleeps.append, rng=random.Random(0))


def test_503_with_retry_after_is_retried_after_at_least_that_long(fault_peer: FaultPeer) -> None:
    fault_peer.replies = [OVERLOADED, OVERLOADED, OK]
    sleeps: list[float] = []
    events: list[RetryEvent] = []
    resp = _transport(fault_peer, sleeps, events).send(predict_request([PNG], "a"))
    assert resp.status_code == 200
    assert len(fault_peer.seen) == 3
    assert [e.reason for e in events] == ["http_503", "http_503"]
    assert all(s >= 2.0 for s in sleeps)
    # Every attempt carried the whole multipart body again.
    assert all(PNG in seen.body for seen in fault_peer.seen)


def test_503_retries_stop_after_max_attempts(fault_peer: FaultPeer) -> None:
    fault_peer.replies = [OVERLOADED]
    sleeps: list[float] = []
    with pytest.raises(Overloaded) as info:
        _transport(fault_peer, sleeps, []).send(Request("GET", "/v1/tuners"))
    assert info.value.retry_after == 2.0
    assert len(fault_peer.seen) == 4
    assert len(sleeps) == 3


@pytest.mark.parametrize(
    "reply",
    [
        Reply(503, b'{"code":"overloaded"}'),  # no Retry-After: no promise it helps
        Reply(503, b'{"code":"overloaded"}', {"Retry-After": "3600"}),  # beyond the cap
        Reply(500, b'{"code":"internal"}', {"Retry-After": "1"}),
        Reply(429, b'{"code":"rate_limited"}', {"Retry-After": "1"}),
    ],
)
def test_other_errors_are_not_retried(fault_peer: FaultPeer, reply: Reply) -> None:
    fault_peer.replies = [reply]
    with pytest.raises(RestuneError) as info:
        _transport(fault_peer, [], []).send(Request("GET", "/v1/tuners"))
    assert len(fault_peer.seen) == 1
    assert info.value.status == reply.status


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("method", ["PUT", "DELETE", "POST"])
def test_connection_refused_is_retried_for_every_method(method: str) -> None:
    sleeps: list[float] = []
    events: list[RetryEvent] = []
    policy = RetryPolicy(max_attempts=3, on_retry=events.append)
    t = SyncTransport(f"http://127.0.0.1:{_closed_port()}", retry=policy, sleep=sleeps.append)
    with pytest.raises(ConnectionFailed):
        t.send(Request(method, "/v1/tuners/x"))
    assert [e.reason for e in events] == ["connect_error", "connect_error"]
    assert all(0 <= s <= policy.max_backoff_s for s in sleeps)


def test_dropped_put_is_replayed_because_pushes_are_content_addressed(
    fault_peer: FaultPeer,
) -> None:
    created = Reply(
        201, b'{"name":"a","version":1,"sha256":"s"}', {"Content-Type": "application/json"}
    )
    fault_peer.replies = [Reply(drop=True), created]
    events: list[RetryEvent] = []
    resp = _transport(fault_peer, [], events).send(push_request("a", b"artifact-bytes"))
    assert resp.status_code == 201
    assert [e.reason for e in events] == ["broken_connection"]
    assert [s.body for s in fault_peer.seen] == [b"artifact-bytes", b"artifact-bytes"]


@pytest.mark.parametrize(
    "request_",
    [delete_tuner_request("a"), predict_request([PNG], "a")],
    ids=["delete", "predict"],
)
def test_dropped_non_replayable_requests_are_not_replayed(
    fault_peer: FaultPeer, request_: Request
) -> None:
    fault_peer.replies = [Reply(drop=True), OK]
    with pytest.raises(ConnectionFailed):
        _transport(fault_peer, [], []).send(request_)
    assert len(fault_peer.seen) == 1


def test_backoff_is_bounded_full_jitter() -> None:
    policy = RetryPolicy(backoff_s=0.5, max_backoff_s=2.0)
    rng = random.Random(1)
    draws = [policy.backoff(attempt, rng) for attempt in range(8) for _ in range(20)]
    assert all(0.0 <= d <= 2.0 for d in draws)
    assert max(draws) > 1.0  # the cap grew past the first one
    never = RetryPolicy(max_attempts=1)
    assert retry_delay(never, Request("GET", "/"), 0, httpx.ConnectError("refused"), rng) is None


def test_async_transport_retries_503_then_succeeds(fault_peer: FaultPeer) -> None:
    fault_peer.replies = [OVERLOADED, OK]
    sleeps: list[float] = []

    async def record(delay: float) -> None:
        sleeps.append(delay)

    async def run() -> int:
        t = AsyncTransport(fault_peer.url, retry=RetryPolicy(), sleep=record)
        try:
            return (await t.send(Request("GET", "/v1/tuners"))).status_code
        finally:
            await t.aclose()

    assert asyncio.run(run()) == 200
    assert len(sleeps) == 1
    assert sleeps[0] >= 2.0


def test_client_waits_for_retry_after_for_real(fault_peer: FaultPeer) -> None:
    """End to end through Client with real sleeping: 503 (Retry-After: 1) twice, then 200."""
    fault_peer.replies = [
        Reply(503, b'{"code":"store_unavailable"}', {"Retry-After": "1"}),
        Reply(503, b'{"code":"store_unavailable"}', {"Retry-After": "1"}),
        OK,
    ]
    events: list[RetryEvent] = []
    with Client(fault_peer.url, retry=RetryPolicy(on_retry=events.append)) as c:
        assert c.list_tuners() == []
    assert len(events) == 2
    assert len(fault_peer.seen) == 3


def test_server_error_without_retry(fault_peer: FaultPeer) -> None:
    fault_peer.replies = [Reply(504, b'{"code":"deadline_exceeded","detail":"late"}')]
    with Client(fault_peer.url) as c, pytest.raises(ServerError) as info:
        c.list_tuners()
    assert info.value.code == "deadline_exceeded"
    assert len(fault_peer.seen) == 1
