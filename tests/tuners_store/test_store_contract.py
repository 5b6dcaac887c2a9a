"""The TunerStore contract, run against both stores: versions, rollback, traffic, dedupe."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest

from tests.tuners_store.artifact_factory import FINGERPRINT, make_artifact, tiny_config
from tests.tuners_store.conftest import StoreFactory
from tuners_store import (
    InvalidName,
    InvalidTraffic,
    StoreEvent,
    TunerNotFound,
    TunerStore,
    VersionInUse,
    VersionNotFound,
)
from tuners_store.artifact import ArtifactError, validate_artifact

T = TypeVar("T")
A1, A2, A3 = (make_artifact(seed=s) for s in (1, 2, 3))


def run(new_store: StoreFactory, body: Callable[[TunerStore], Awaitable[T]]) -> T:
    async def main() -> T:
        async with new_store() as store:
            return await body(store)

    return asyncio.run(main())


def test_versions_increase_and_get(new_store: StoreFactory) -> None:
    async def body(s: TunerStore) -> None:
        r1 = await s.put("cats", A1)
        r2 = await s.put("cats", A2)
        assert (r1.created, r1.info.version, r2.created, r2.info.version) == (True, 1, True, 2)
        assert r2.info.sha256 == hashlib.sha256(A2).hexdigest()
        assert r2.info.size == len(A2)
        current = await s.get("cats")
        assert (current.info, current.data) == (r2.info, A2)
        assert (await s.get("cats", 1)).data == A1
        assert [v.version for v in await s.versions("cats")] == [1, 2]
        assert await s.list() == {"cats": r2.info}
        with pytest.raises(TunerNotFound):
            await s.get("dogs")
        with pytest.raises(VersionNotFound):
            await s.get("cats", 9)
        with pytest.raises(TunerNotFound):
            await s.versions("dogs")

    run(new_store, body)


def test_identical_bytes_reuse_and_make_current(new_store: StoreFactory) -> None:
    async def body(s: TunerStore) -> None:
        await s.put("cats", A1)
        await s.put("cats", A2)
        again = await s.put("cats", A1)
        assert (again.created, again.info.version) == (False, 1)
        assert (await s.get("cats")).info.version == 1
        assert [v.version for v in await s.versions("cats")] == [1, 2]
        # Content addressing is per name: the same bytes under another name are a new tuner.
        assert (await s.put("dogs", A1)).created

    run(new_store, body)


def test_set_current_rollback(new_store: StoreFactory) -> None:
    async def body(s: TunerStore) -> None:
        await s.put("cats", A1)
        await s.put("cats", A2)
        info = await s.set_current("cats", 1)
        assert info.version == 1
        assert info.sha256 == hashlib.sha256(A1).hexdigest()
        assert (await s.get("cats")).data == A1
        assert (await s.list())["cats"].version == 1
        with pytest.raises(VersionNotFound):
            await s.set_current("cats", 3)
        with pytest.raises(TunerNotFound):
            await s.set_current("dogs", 1)
        # A new upload still gets a fresh number and becomes current.
        assert (await s.put("cats", A3)).info.version == 3

    run(new_store, body)


def test_traffic(new_store: StoreFactory) -> None:
    async def body(s: TunerStore) -> None:
        await s.put("cats", A1)
        await s.put("cats", A2)
        assert await s.get_traffic("cats") == {2: 100}
        assert await s.set_traffic("cats", {1: 90, 2: 10}) == {1: 90, 2: 10}
        assert await s.get_traffic("cats") == {1: 90, 2: 10}
        assert await s.set_traffic("cats", {1: 0, 2: 5}) == {1: 0, 2: 5}
        for bad in ({3: 1}, {1: 0}, {1: -1, 2: 5}, {}, {1: 1.5}):
            with pytest.raises(InvalidTraffic) as info:
                await s.set_traffic("cats", bad)  # type: ignore[arg-type]
            assert info.value.code == "invalid_traffic"
        assert await s.get_traffic("cats") == {1: 0, 2: 5}
        with pytest.raises(TunerNotFound):
            await s.set_traffic("dogs", {1: 1})
        with pytest.raises(TunerNotFound):
            await s.get_traffic("dogs")
        # Rollback and promoting uploads end a canary.
        await s.set_current("cats", 1)
        assert await s.get_traffic("cats") == {1: 100}
        await s.set_traffic("cats", {1: 50, 2: 50})
        await s.put("cats", A3, promote=True)
        assert await s.get_traffic("cats") == {3: 100}

    run(new_store, body)


def test_upload_promotion(new_store: StoreFactory) -> None:
    async def body(s: TunerStore) -> None:
        # The first version of a name is current even when asked not to promote.
        first = await s.put("cats", A1, promote=False)
        assert (first.created, first.current) == (True, True)
        staged = await s.put("cats", A2, promote=False)
        assert (staged.created, staged.current, staged.info.version) == (True, False, 2)
        assert (await s.get("cats")).info.version == 1
        assert [v.version for v in await s.versions("cats")] == [1, 2]
        assert (await s.get("cats", 2)).data == A2
        # Identical bytes without promotion change nothing either.
        again = await s.put("cats", A2, promote=False)
        assert (again.created, again.current) == (False, False)
        assert (await s.list())["cats"].version == 1
        # The default promotes while no split is set...
        assert (await s.put("cats", A2)).current
        assert (await s.get("cats")).info.version == 2
        # ... and keeps a split (and the current version) when one is set.
        await s.set_traffic("cats", {1: 90, 2: 10})
        kept = await s.put("cats", A3)
        assert (kept.created, kept.current, kept.info.version) == (True, False, 3)
        assert await s.get_traffic("cats") == {1: 90, 2: 10}
        assert (await s.get("cats")).info.version == 2
        # Asked to, it promotes and clears the split.
        forced = await s.put("cats", A3, promote=True)
        assert (forced.created, forced.current) == (False, True)
        assert await s.get_traffic("cats") == {3: 100}

    run(new_store, body)


def test_delete_one_version(new_store: StoreFactory) -> None:
    async def body(s: TunerStore) -> None:
        for blob in (A1, A2, A3):
            await s.put("cats", blob)
        # Current (3) and the only-version rule are refused without force.
        with pytest.raises(VersionInUse) as refused:
            await s.delete_version("cats", 3)
        assert refused.value.code == "version_in_use"
        assert (await s.delete_version("cats", 1)).version == 3
        assert [v.version for v in await s.versions("cats")] == [2, 3]
        with pytest.raises(VersionNotFound):
            await s.get("cats", 1)
        with pytest.raises(VersionNotFound):
            await s.delete_version("cats", 1)
        # A version in the split needs force; forced, the split collapses to what is left.
        await s.set_traffic("cats", {2: 90, 3: 10})
        with pytest.raises(VersionInUse):
            await s.delete_version("cats", 2)
        assert (await s.delete_version("cats", 2, force=True)).version == 3
        assert await s.get_traffic("cats") == {3: 100}
        with pytest.raises(VersionInUse):
            await s.delete_version("cats", 3, force=True)  # the only version
        # Forcing out the current version makes the newest remaining one current; the
        # deleted bytes are a new version if uploaded again (numbers never reused).
        assert (await s.put("cats", A1)).info.version == 4
        assert (await s.delete_version("cats", 4, force=True)).version == 3
        assert (await s.get("cats")).data == A3
        assert (await s.put("cats", A1, promote=False)).info.version == 5
        with pytest.raises(TunerNotFound):
            await s.delete_version("dogs", 1)

    run(new_store, body)


def test_delete_keeps_version_numbers(new_store: StoreFactory) -> None:
    async def body(s: TunerStore) -> None:
        await s.put("cats", A1)
        await s.put("cats", A2)
        await s.put("dogs", A1)
        await s.delete("cats")
        assert set(await s.list()) == {"dogs"}
        with pytest.raises(TunerNotFound):
            await s.get("cats")
        with pytest.raises(TunerNotFound):
            await s.get("cats", 1)
        with pytest.raises(TunerNotFound):
            await s.delete("cats")
        with pytest.raises(TunerNotFound):
            await s.versions("cats")
        again = await s.put("cats", A1)
        assert (again.created, again.info.version) == (True, 3)
        assert [v.version for v in await s.versions("cats")] == [3]

    run(new_store, body)


def test_failed_validation_stores_nothing(new_store: StoreFactory) -> None:
    def check(data: bytes) -> object:
        return validate_artifact(data, expect_fingerprint=FINGERPRINT)

    foreign = make_artifact(tiny_config(backbone={"fingerprint": "fp-elsewhere"}))

    async def body(s: TunerStore) -> None:
        with pytest.raises(ArtifactError) as info:
            await s.put("cats", foreign, validate=check)
        assert info.value.code == "backbone_mismatch"
        assert await s.list() == {}
        with pytest.raises(TunerNotFound):
            await s.versions("cats")
        await s.put("cats", A1, validate=check)
        with pytest.raises(ArtifactError):
            await s.put("cats", b"\x80\x04junk", validate=check)
        assert [v.version for v in await s.versions("cats")] == [1]
        assert (await s.put("cats", A2, validate=check)).info.version == 2

    run(new_store, body)


@pytest.mark.parametrize("name", ["../x", "a/b/c", "Cats", "", "x" * 65, "é"])
def test_invalid_names_are_refused(new_store: StoreFactory, name: str) -> None:
    async def body(s: TunerStore) -> None:
        with pytest.raises(InvalidName):
            await s.put(name, A1)
        with pytest.raises(InvalidName):
            await s.get(name)
        with pytest.raises(InvalidName):
            await s.delete(name)
        assert await s.list() == {}

    run(new_store, body)


def test_tenant_names_are_separate(new_store: StoreFactory) -> None:
    async def body(s: TunerStore) -> None:
        await s.put("cats", A1)
        await s.put("acme/cats", A2)
        await s.put("acme/dogs", A3)
        assert {n: i.version for n, i in (await s.list()).items()} == {
            "cats": 1,
            "acme/cats": 1,
            "acme/dogs": 1,
        }
        assert (await s.get("acme/cats")).data == A2
        await s.delete("acme/cats")
        assert set(await s.list()) == {"cats", "acme/dogs"}

    run(new_store, body)


def test_concurrent_identical_uploads_make_one_version(new_store: StoreFactory) -> None:
    async def main() -> None:
        stores = [new_store() for _ in range(8)]
        try:
            results = await asyncio.gather(*(s.put("cats", A1) for s in stores))
            assert {r.info.version for r in results} == {1}
            assert sum(r.created for r in results) == 1
            assert [v.version for v in await stores[0].versions("cats")] == [1]
        finally:
            for s in stores:
                await s.close()

    asyncio.run(main())


def test_concurrent_distinct_uploads_lose_nothing(new_store: StoreFactory) -> None:
    blobs = [make_artifact(seed=100 + i) for i in range(8)]

    async def main() -> None:
        stores = [new_store() for _ in range(8)]
        try:
            results = await asyncio.gather(
                *(s.put("cats", b) for s, b in zip(stores, blobs, strict=True))
            )
            assert sorted(r.info.version for r in results) == list(range(1, 9))
            assert all(r.created for r in results)
            versions = await stores[0].versions("cats")
            assert [v.version for v in versions] == list(range(1, 9))
            for r, blob in zip(results, blobs, strict=True):
                assert (await stores[1].get("cats", r.info.version)).data == blob
        finally:
            for s in stores:
                await s.close()

    asyncio.run(main())


async def _next(events: AsyncIterator[StoreEvent]) -> StoreEvent:
    return await asyncio.wait_for(anext(events), timeout=10)


def test_watch_reports_changes(new_store: StoreFactory) -> None:
    async def main() -> None:
        async with new_store() as watcher, new_store() as writer:
            events = watcher.watch()
            assert (await _next(events)).kind == "resync"
            await writer.put("cats", A1)
            assert await _next(events) == StoreEvent("put", "cats", 1)
            await writer.put("cats", A2)
            assert await _next(events) == StoreEvent("put", "cats", 2)
            await writer.put("cats", A1)  # identical bytes: version 1 becomes current again
            assert await _next(events) == StoreEvent("current", "cats", 1)
            await writer.set_traffic("cats", {1: 1, 2: 1})
            assert await _next(events) == StoreEvent("traffic", "cats")
            await writer.set_current("cats", 2)
            assert await _next(events) == StoreEvent("current", "cats", 2)
            assert await _next(events) == StoreEvent("traffic", "cats")
            await writer.put("cats", A3, promote=False)
            await writer.delete_version("cats", 1)
            assert await _next(events) == StoreEvent("version_delete", "cats", 1)
            await writer.delete("cats")
            assert await _next(events) == StoreEvent("delete", "cats")
            await events.aclose()  # type: ignore[attr-defined]

    asyncio.run(main())
