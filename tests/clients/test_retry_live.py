"""Retries against real faults: a server whose Redis store is down answers 503 + Retry-After."""

from __future__ import annotations

import pytest

from clients import Client, RetryEvent, RetryPolicy, StoreUnavailable
from restuning.backbone import TorchBackbone
from tests.fixtures.live_server import StartServer
from tests.fixtures.redis_server import RedisProcess
from tests.fixtures.tuners import make_artifact, make_config

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def _artifact(name: str, backbone: TorchBackbone) -> bytes:
    return make_artifact(make_config(name, backbone), backbone.final_norm)


def test_push_waits_out_a_store_outage(
    live_server_factory: StartServer, redis_process: RedisProcess, tiny_backbone: TorchBackbone
) -> None:
    server = live_server_factory(RESTUNE_STORE=redis_process.url)
    redis_process.stop()
    events: list[RetryEvent] = []

    def redis_comes_back(event: RetryEvent) -> None:
        # The server said store_unavailable; bring Redis back while the client waits.
        events.append(event)
        if len(events) == 1:
            redis_process.start()

    policy = RetryPolicy(max_attempts=4, on_retry=redis_comes_back)
    with Client(server.url, admin_token=server.admin_token, retry=policy) as c:
        pushed = c.push_tuner("retry-a", _artifact("retry-a", tiny_backbone))
        assert pushed.created
        assert pushed.version == 1
        assert [t.name for t in c.list_tuners()] == ["retry-a"]
    assert events[0].reason == "http_503"
    assert events[0].delay_s >= 1.0  # at least the server's Retry-After


def test_without_retries_the_outage_is_store_unavailable(
    live_server_factory: StartServer, redis_process: RedisProcess, tiny_backbone: TorchBackbone
) -> None:
    server = live_server_factory(RESTUNE_STORE=redis_process.url)
    redis_process.kill()
    no_retry = RetryPolicy(max_attempts=1)
    artifact = _artifact("retry-b", tiny_backbone)
    with (
        Client(server.url, admin_token=server.admin_token, retry=no_retry) as c,
        pytest.raises(StoreUnavailable) as info,
    ):
        c.push_tuner("retry-b", artifact)
    assert info.value.status == 503
    assert info.value.retry_after is not None
    assert info.value.retry_after >= 1.0
