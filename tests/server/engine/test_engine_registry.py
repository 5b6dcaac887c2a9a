"""The registry: memory budget and pinning, delete vs load races, version snapshots, following
changes made by another replica (filesystem and real Redis), store outages, canary picks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from restuning.backbone import TorchBackbone
from server.engine.batcher import MicroBatcher
from server.engine.engine import BatchItem, Engine
from server.engine.feature_cache import FeatureCache
from server.engine.registry import pick_version
from server.errors import ApiError
from server.metrics import Metrics
from server.settings import Settings
from tests.fixtures.redis_server import RedisProcess
from tests.fixtures.tuners import FakeBackboneRef, make_artifact, make_config
from tests.server.engine.conftest import ArtifactFactory
from tests.server.engine.engine_kit import (
    Gate,
    GatedFilesystemStore,
    RecordingRuntime,
    answers_close,
    eventually,
    loaded_tuner,
    open_registry,
    pixels_of,
)
from tuners_store import StoreEvent, VersionInfo, open_store
from tuners_store.filesystem import FilesystemStore


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_lru_under_a_small_budget_keeps_pinned_tuners(
    settings: Settings,
    runtime: RecordingRuntime,
    tiny_backbone: TorchBackbone,
    artifact: ArtifactFactory,
) -> None:
    one = loaded_tuner(tiny_backbone, artifact("p")).nbytes
    tight = settings.model_copy(update={"tuner_memory_bytes": 3 * one, "pinned_tuners": ["p"]})
    metrics = Metrics()

    async def main() -> None:
        async with open_registry(tight, runtime, metrics=metrics) as reg:
            for seed, name in enumerate(["p", "a", "b"]):
                await reg.register(name, artifact(name, seed=seed))
            assert all(reg.is_loaded(n, 1) for n in "pab")
            await reg.register("c", artifact("c", seed=3))
            # "p" is older than "a" but pinned: "a" goes.
            assert [reg.is_loaded(n, 1) for n in "pabc"] == [True, False, True, True]
            assert reg.loaded_bytes <= 3 * one
            again = await reg.resolve("a")  # reloaded on demand; "b" is now the oldest unpinned
            assert again.version == 1
            assert [reg.is_loaded(n, 1) for n in "pabc"] == [True, True, False, True]

    run(main())
    sample = metrics.registry.get_sample_value
    assert sample("restune_tuners_evicted_total") == 2
    assert sample("restune_tuners_loaded") == 3
    assert sample("restune_tuners_registered") == 4
    assert sample("restune_registrations_total", {"result": "created"}) == 4
    assert sample("restune_tuner_load_seconds_count") == 5


def test_a_delete_elsewhere_during_a_load_does_not_resurrect_the_tuner(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory, tmp_path: Path
) -> None:
    root = str(tmp_path / "tuners")

    async def main() -> None:
        other = open_store(settings.store)  # "another replica"
        await other.put("x", artifact("x"))
        store = GatedFilesystemStore(root)
        async with open_registry(settings, runtime, store) as reg:
            assert reg.known("x")
            assert not reg.is_loaded("x", 1)
            store.release.clear()
            load = asyncio.create_task(reg.resolve("x"))
            await store.read_done.wait()  # the bytes are read; the load is in flight
            await other.delete("x")
            await reg.apply_event(StoreEvent("delete", "x"))
            store.release.set()
            with pytest.raises(ApiError) as err:
                await load
            assert err.value.code == "unknown_task"
            assert not reg.known("x")
            assert not reg.is_loaded("x", 1)
            with pytest.raises(ApiError):
                await reg.resolve("x")
        await other.close()

    run(main())


def test_a_local_delete_waits_for_the_load_and_wins(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory, tmp_path: Path
) -> None:
    root = str(tmp_path / "tuners")

    async def main() -> None:
        store = GatedFilesystemStore(root)
        async with open_registry(settings, runtime, store) as reg:
            await reg.register("x", artifact("x"))
            await reg.register("x", artifact("x", seed=1))  # v2 current; v1 unloaded
            store.release.clear()
            load = asyncio.create_task(reg.resolve("x", 1))
            await store.read_done.wait()
            delete = asyncio.create_task(reg.delete("x"))
            await asyncio.sleep(0.05)
            assert not delete.done()  # blocked on the name's lock
            store.release.set()
            await load  # started before the delete: it may finish
            await delete
            assert not reg.known("x")
            assert not reg.is_loaded("x", 1)
            assert not reg.is_loaded("x", 2)
            with pytest.raises(ApiError) as err:
                await reg.resolve("x")
            assert err.value.code == "unknown_task"
            assert err.value.extra["task"] == "x"

    run(main())


def test_an_in_flight_batch_finishes_on_the_version_it_resolved(
    settings: Settings,
    runtime: RecordingRuntime,
    tiny_backbone: TorchBackbone,
    artifact: ArtifactFactory,
) -> None:
    engine = Engine(runtime, FeatureCache(0))
    gate = Gate(engine.run_batch)

    async def main() -> None:
        batcher = MicroBatcher(gate, max_batch_images=4, max_wait_ms=0, max_queue_images=16)
        batcher.start()
        async with open_registry(settings, runtime) as reg:
            await reg.register("pets", artifact("pets", seed=1))
            v1 = await reg.resolve("pets")
            pixels, digest = pixels_of(0, tiny_backbone)
            pending = asyncio.create_task(batcher.submit([BatchItem(pixels, digest, (v1,), 3)]))
            await asyncio.to_thread(gate.entered.wait, 10)  # the batch is computing
            await reg.register("pets", artifact("pets", seed=2))
            v2 = await reg.resolve("pets")
            assert v2.version == 2
            gate.open.set()
            (done,) = await pending
            assert done.output.answers["pets"]["version"] == 1
            alone = engine.run_batch([BatchItem(pixels, digest, (v1,), 3)]).items[0]
            assert answers_close(done.output.answers, alone.answers)
            (after,) = await batcher.submit([BatchItem(pixels, digest, (v2,), 3)])
            assert after.output.answers["pets"]["version"] == 2
            assert not answers_close(after.output.answers["pets"], alone.answers["pets"])
        await batcher.drain()

    run(main())


def follow_another_replica(
    settings: Settings, runtime: RecordingRuntime, url: str, artifact: ArtifactFactory
) -> None:
    """Changes made through a second store object show up in a running registry."""

    async def main() -> None:
        other = open_store(url)
        async with open_registry(settings, runtime, open_store(url)) as reg:
            await other.put("remote", artifact("remote", seed=1))

            async def serves(version: int) -> bool:
                cur = reg.current("remote")
                return cur is not None and cur.version == version

            await eventually(lambda: serves(1))
            assert (await reg.resolve("remote")).version == 1
            await other.put("remote", artifact("remote", seed=2))
            await eventually(lambda: serves(2))
            assert reg.is_loaded("remote", 2)  # preloaded before the swap
            assert (await reg.resolve("remote")).version == 2
            await other.delete("remote")

            async def gone() -> bool:
                return not reg.known("remote")

            await eventually(gone)
            with pytest.raises(ApiError) as err:
                await reg.resolve("remote")
            assert err.value.code == "unknown_task"
        await other.close()

    run(main())


def test_follows_another_replica_on_the_filesystem(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    follow_another_replica(settings, runtime, settings.store, artifact)


@pytest.mark.redis
def test_follows_another_replica_on_redis(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory, clean_redis: str
) -> None:
    follow_another_replica(
        settings.model_copy(update={"store": clean_redis}), runtime, clean_redis, artifact
    )


@pytest.mark.redis
def test_serving_continues_while_redis_is_down(
    settings: Settings,
    runtime: RecordingRuntime,
    artifact: ArtifactFactory,
    redis_process: RedisProcess,
) -> None:
    async def main() -> None:
        async with open_registry(settings, runtime, open_store(redis_process.url)) as reg:
            await reg.register("kept", artifact("kept"))
            redis_process.kill()
            assert (await reg.resolve("kept")).version == 1
            with pytest.raises(ApiError) as err:
                await reg.register("new", artifact("new"))
            assert err.value.code == "store_unavailable"
            assert err.value.status == 503
            assert err.value.retry_after is not None
            assert err.value.retry_after > 0
            assert (await reg.resolve("kept")).version == 1

    run(main())


def test_register_validates_before_storing(
    settings: Settings,
    runtime: RecordingRuntime,
    tiny_backbone: TorchBackbone,
    artifact: ArtifactFactory,
) -> None:
    alien = FakeBackboneRef(
        dim=tiny_backbone.dim,
        depth=tiny_backbone.depth,
        arch="vit_test_tiny",
        fingerprint="0123456789abcdef",
    )
    foreign = make_artifact(make_config("alien", alien), tiny_backbone.final_norm)
    metrics = Metrics()

    async def main() -> None:
        async with open_registry(settings, runtime, metrics=metrics) as reg:
            with pytest.raises(ApiError) as err:
                await reg.register("alien", foreign)
            assert (err.value.code, err.value.status) == ("backbone_mismatch", 409)
            assert tiny_backbone.fingerprint in err.value.detail
            with pytest.raises(ApiError) as err:
                await reg.register("other-name", artifact("pets"))
            assert (err.value.code, err.value.status) == ("artifact_name_mismatch", 422)
            with pytest.raises(ApiError) as err:
                await reg.register("pets", b"\x00" * 64)
            assert err.value.code.startswith("artifact_")
            assert await reg.store.list() == {}
            data = artifact("pets")
            info, created = await reg.register("pets", data)
            assert created
            same, created_again = await reg.register("pets", data)
            assert (same.version, created_again) == (info.version, False)

    run(main())
    sample = metrics.registry.get_sample_value
    assert sample("restune_registrations_total", {"result": "backbone_mismatch"}) == 1
    assert sample("restune_registrations_total", {"result": "unchanged"}) == 1


def test_unknown_names_and_versions(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    async def main() -> None:
        async with open_registry(settings, runtime) as reg:
            await reg.register("pets", artifact("pets"))
            for name, version, code in [
                ("nope", None, "unknown_task"),
                ("Bad Name!", None, "unknown_task"),
                ("pets", 7, "unknown_version"),
            ]:
                with pytest.raises(ApiError) as err:
                    await reg.resolve(name, version)
                assert (err.value.code, err.value.status) == (code, 404)
                assert err.value.extra["task"] == name
            with pytest.raises(ApiError) as err:
                await reg.delete("nope")
            assert err.value.code == "tuner_not_found"

    run(main())


def test_canary_split_picks_by_image_digest(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    async def main() -> None:
        async with open_registry(settings, runtime) as reg:
            await reg.register("pets", artifact("pets", seed=1))
            await reg.register("pets", artifact("pets", seed=2))
            await reg.store.set_traffic("pets", {1: 50, 2: 50})
            await reg.apply_event(StoreEvent("traffic", "pets"))
            await reg.settle()
            assert reg.has_split("pets")
            digests = [f"{i:064x}" for i in range(64)]
            picked = [(await reg.resolve("pets", None, d)).version for d in digests]
            assert set(picked) == {1, 2}
            again = [(await reg.resolve("pets", None, d)).version for d in digests]
            assert picked == again
            assert (await reg.resolve("pets")).version == 2  # no digest: the current one
            await reg.register("pets", artifact("pets", seed=3))  # the default keeps a split
            assert reg.has_split("pets")
            await reg.register("pets", artifact("pets", seed=4), promote=True)  # this ends it
            assert not reg.has_split("pets")
            assert reg.is_current("pets", 4)

    run(main())


def test_pick_version_follows_the_weights() -> None:
    digests = [f"{i:064x}" for i in range(2000)]
    assert {pick_version("t", {3: 100}, d) for d in digests} == {3}
    assert {pick_version("t", {1: 0, 2: 5}, d) for d in digests} == {2}
    share = sum(pick_version("t", {1: 10, 2: 90}, d) == 1 for d in digests) / len(digests)
    assert 0.05 < share < 0.15


def test_list_and_describe(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    async def main() -> None:
        async with open_registry(settings, runtime) as reg:
            await reg.register("pets", artifact("pets", seed=1))
            await reg.register("pets", artifact("pets", seed=2))
            await reg.register("ages", artifact("ages", task="regression"))
            rows = [r.to_dict() for r in await reg.list_tuners()]
            assert [r["name"] for r in rows] == ["ages", "pets"]
            assert rows[1]["version"] == 2
            assert rows[1]["kind"] == "classification"
            assert rows[0]["labels"] == ["age", "size"]
            assert rows[0]["loaded"]
            assert rows[0]["params"] > 0
            assert rows[0]["bytes"] > rows[0]["params"]
            detail = (await reg.describe("pets")).to_dict()
            assert [v["version"] for v in detail["versions"]] == [1, 2]
            assert [v["loaded"] for v in detail["versions"]] == [False, True]
            assert detail["config"]["name"] == "pets"
            assert detail["traffic"] == {"2": 100}
            with pytest.raises(ApiError) as err:
                await reg.describe("nope")
            assert err.value.code == "tuner_not_found"

    run(main())


def test_a_store_listing_a_tuner_it_was_never_told_about_is_found(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    async def main() -> None:
        async with open_registry(settings, runtime, start=False) as reg:
            # No watch running: the name is only in the store; resolve asks it once.
            await reg.store.put("late", artifact("late"))
            assert not reg.known("late")
            assert (await reg.resolve("late")).name == "late"
            assert reg.known("late")

    run(main())


def test_unload_frees_memory_and_the_next_request_reloads(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    async def main() -> None:
        async with open_registry(settings, runtime) as reg:
            await reg.register("pets", artifact("pets"))
            assert reg.loaded_bytes > 0
            assert reg.unload("pets") == 1
            assert reg.loaded_bytes == 0
            assert reg.known("pets")
            assert not reg.is_loaded("pets", 1)
            assert (await reg.resolve("pets")).version == 1
            assert reg.is_loaded("pets", 1)

    run(main())


class _DeletedAfterListing(FilesystemStore):
    """The real filesystem store, with another replica's delete landing between listing a
    tuner's versions and reading its blob (the race a live run hit 7 times in 2,315 OIP
    metadata requests)."""

    async def versions(self, name: str) -> list[VersionInfo]:
        listed = await super().versions(name)
        await super().delete(name)
        return listed


def test_a_tuner_deleted_while_described_is_not_found_not_a_store_outage(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory, tmp_path: Path
) -> None:
    root = str(tmp_path / "tuners")

    async def main() -> None:
        other = open_store(settings.store)
        await other.put("x", artifact("x"))
        store = _DeletedAfterListing(root, poll_interval=60, fsync=False)
        async with open_registry(settings, runtime, store) as reg:
            assert reg.known("x")
            with pytest.raises(ApiError) as err:
                await reg.describe("x")
            assert (err.value.code, err.value.status) == ("tuner_not_found", 404)
            assert [t.info.name for t in await reg.list_tuners()] == []
        await other.close()

    run(main())
