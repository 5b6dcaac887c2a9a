"""Redis store against a real redis-server: watchers converge across restarts and lost messages."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import redis

from tests.fixtures.redis_server import RedisProcess
from tests.tuners_store.artifact_factory import make_artifact
from tuners_store import StoreUnavailable, open_store
from tuners_store.redis_store import RedisStore, redacted

pytestmark = pytest.mark.redis


def fast_store(url: str, prefix: str) -> RedisStore:
    # Short reconnect backoff so the tests spend little time waiting for a restarted server.
    return RedisStore(url, prefix=prefix, reconnect_max_s=0.2, health_check_s=1.0)


@dataclass
class Mirror:
    """What a server replica keeps: name -> current version, rebuilt from watch events."""

    store: RedisStore
    index: dict[str, int] = field(default_factory=dict)
    resyncs: int = 0

    async def follow(self) -> None:
        events: AsyncIterator[object] = self.store.watch()
        async for event in events:  # type: ignore[attr-defined]
            if event.kind == "resync":
                self.resyncs += 1
                self.index = {n: i.version for n, i in (await self.store.list()).items()}
            elif event.kind in ("put", "current"):
                self.index[event.name] = event.version
            elif event.kind == "delete":
                self.index.pop(event.name, None)


async def truth(store: RedisStore) -> dict[str, int]:
    return {n: i.version for n, i in (await store.list()).items()}


async def converge(mirrors: list[Mirror], store: RedisStore, min_resyncs: int = 1) -> None:
    """Wait until every mirror equals the store's index (bounded, so a bug fails the test)."""
    for _ in range(500):
        expected = await truth(store)
        if all(m.index == expected and m.resyncs >= min_resyncs for m in mirrors):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"mirrors {[m.index for m in mirrors]} != store {await truth(store)}")


def test_watchers_converge_across_a_redis_restart(redis_process: RedisProcess) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    url = redis_process.url

    async def main() -> None:
        writer = fast_store(url, prefix)
        mirrors = [Mirror(fast_store(url, prefix)) for _ in range(3)]
        tasks = [asyncio.create_task(m.follow()) for m in mirrors]
        try:
            await writer.put("a", make_artifact(seed=1))
            await writer.put("b", make_artifact(seed=2))
            await writer.put("c", make_artifact(seed=3))
            await converge(mirrors, writer)
            # Persist this state, then change things that the restart will lose.
            client = redis.Redis.from_url(url)
            client.save()
            client.close()
            await writer.put("d", make_artifact(seed=4))
            await writer.put("a", make_artifact(seed=5))
            await writer.delete("b")
            await converge(mirrors, writer)
            assert mirrors[0].index == {"a": 2, "c": 1, "d": 1}

            redis_process.kill()
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(writer.put("e", make_artifact(seed=6)), 5)
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(writer.ping(), 5)
            redis_process.start()  # same port and dir: loads the saved snapshot

            # Without a resync the mirrors would keep d, a:2 and miss b.
            await converge(mirrors, writer, min_resyncs=2)
            assert mirrors[0].index == {"a": 1, "b": 1, "c": 1}
            await writer.put("e", make_artifact(seed=6))
            await writer.set_current("a", 1)
            await converge(mirrors, writer, min_resyncs=2)
            assert mirrors[1].index == {"a": 1, "b": 1, "c": 1, "e": 1}
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            for m in mirrors:
                await m.store.close()
            await writer.close()

    asyncio.run(main())


def test_watchers_resync_after_dropped_connections(redis_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        writer = fast_store(redis_url, prefix)
        mirrors = [Mirror(fast_store(redis_url, prefix)) for _ in range(2)]
        tasks = [asyncio.create_task(m.follow()) for m in mirrors]
        admin = redis.Redis.from_url(redis_url)
        try:
            await converge(mirrors, writer)
            for i in range(6):
                # Drop every subscriber while writes keep coming: messages are lost for good.
                admin.client_kill_filter(_type="pubsub")
                await writer.put(f"n{i}", make_artifact(seed=i))
                await writer.put(f"n{i}", make_artifact(seed=100 + i))
                if i % 2:
                    await writer.delete(f"n{i - 1}")
            await converge(mirrors, writer, min_resyncs=2)
            assert set(mirrors[0].index) == {"n1", "n3", "n5"}
        finally:
            admin.close()
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            for m in mirrors:
                await m.store.close()
            await writer.close()

    asyncio.run(main())


def test_a_gap_in_the_event_sequence_triggers_a_resync(redis_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        store = fast_store(redis_url, prefix)
        events = store.watch()
        try:
            assert (await asyncio.wait_for(anext(events), 10)).kind == "resync"
            await store.put("a", make_artifact(seed=1))
            assert (await asyncio.wait_for(anext(events), 10)).kind == "put"
            # An event whose message never arrived: the sequence skips a number.
            admin = redis.Redis.from_url(redis_url)
            admin.incr(f"{prefix}:seq")
            admin.close()
            await store.put("b", make_artifact(seed=2))
            assert (await asyncio.wait_for(anext(events), 10)).kind == "resync"
            await store.put("c", make_artifact(seed=3))
            event = await asyncio.wait_for(anext(events), 10)
            assert (event.kind, event.name) == ("put", "c")
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            await store.close()

    asyncio.run(main())


def test_registration_fails_fast_while_redis_is_down(redis_process: RedisProcess) -> None:
    url = redis_process.url
    redis_process.kill()

    async def main() -> None:
        store = open_store(f"{url}?prefix=down")
        try:
            for op in (store.put("a", b"x"), store.list(), store.get("a"), store.delete("a")):
                with pytest.raises(StoreUnavailable) as info:
                    await asyncio.wait_for(op, 5)
                assert info.value.code == "store_unavailable"
        finally:
            await store.close()

    asyncio.run(main())


def test_blobs_and_index_live_under_the_prefix(redis_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with open_store(f"{redis_url}?prefix={prefix}") as store:
            await store.put("acme/cats", make_artifact(seed=1))
            await store.put("acme/cats", make_artifact(seed=1))  # identical: staging dropped

    asyncio.run(main())
    client = redis.Redis.from_url(redis_url)
    keys = {k.decode() for k in client.scan_iter(f"{prefix}:*")}
    client.close()
    assert f"{prefix}:blob:acme/cats:1" in keys
    assert f"{prefix}:index" in keys
    assert f"{prefix}:ver:acme/cats" in keys
    assert not [k for k in keys if ":staging:" in k]
    assert not [k for k in keys if ":blob:" in k and k != f"{prefix}:blob:acme/cats:1"]


def test_redacted_url() -> None:
    assert redacted("redis://user:secret@h:6379/0") == "redis://user@h:6379/0"
    assert redacted("redis://:secret@h/1") == "redis://h/1"
    assert redacted("redis://h:1/0") == "redis://h:1/0"


def test_an_outage_is_one_lost_event_then_a_resync_once_redis_is_back(
    redis_process: RedisProcess,
) -> None:
    """A watcher says ``lost`` once however long Redis is down (it keeps reconnecting by
    itself), and ``resync`` first thing after it returns."""
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def main() -> float:
        store = RedisStore(redis_process.url, prefix=prefix)  # the default reconnect backoff
        events = store.watch()
        try:
            assert (await asyncio.wait_for(anext(events), 10)).kind == "resync"
            redis_process.kill()
            assert (await asyncio.wait_for(anext(events), 10)).kind == "lost"
            pending = asyncio.ensure_future(anext(events))
            await asyncio.sleep(1.5)  # several reconnect attempts, all refused
            assert not pending.done(), "only one event per outage"
            redis_process.start()
            back = asyncio.get_running_loop().time()
            assert (await asyncio.wait_for(pending, 10)).kind == "resync"
            return asyncio.get_running_loop().time() - back
        finally:
            await events.aclose()
            await store.close()

    caught_up = asyncio.run(main())
    print(f"watch resynced {caught_up:.3f} s after Redis answered again")
