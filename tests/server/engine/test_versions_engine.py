"""Versions inside the service: one load for identical concurrent uploads, cache keys that
carry the tuner's sha256, unloads that drain (bounded), memory that comes back after 100
register/delete cycles, canary splits set and followed, and the per-version metrics."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from restuning.backbone import TorchBackbone
from restuning.tuners import TaskModule
from server.engine.engine import BatchItem, Engine
from server.engine.feature_cache import FeatureCache
from server.engine.loaded_tuner import LoadedTuner
from server.engine.service import InferenceService, TaskRef
from server.errors import ApiError
from server.metrics import Metrics
from server.settings import Settings
from tests.fixtures.models import tiny_images
from tests.server.engine.conftest import ArtifactFactory
from tests.server.engine.engine_kit import (
    Gate,
    RecordingRuntime,
    answers_close,
    eventually,
    loaded_tuner,
    open_registry,
    pixels_of,
)

MiB = 1024 * 1024
CYCLES = 100
WARMUP_CYCLES = 20
"""Cycles before the baseline: the allocator's own growth settles in these."""
MANY_LABELS = tuple(f"class-{i}" for i in range(2000))
"""A head of 2000 x 32 floats (256 KiB): 100 leaked versions would be 25 MiB of RSS."""


@contextlib.asynccontextmanager
async def running(
    settings: Settings, runtime: RecordingRuntime, metrics: Metrics | None = None
) -> AsyncIterator[InferenceService]:
    service = InferenceService(settings, metrics or Metrics(), backbone=runtime)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def refs(*names: str) -> list[TaskRef]:
    return [TaskRef.parse(n) for n in names]


def answer(body: dict[str, Any], task: str, image: int = 0) -> dict[str, Any]:
    found: dict[str, Any] = body["results"][image]["tasks"][task]
    return found


# --- one version, one load ----------------------------------------------------------------


def test_eight_concurrent_identical_uploads_make_one_version_and_one_load(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    metrics = Metrics()
    data = artifact("same", seed=3)

    async def main() -> None:
        async with open_registry(settings, runtime, metrics=metrics) as reg:
            results = await asyncio.gather(*(reg.register("same", data) for _ in range(8)))
            assert sorted(created for _, created in results) == [False] * 7 + [True]
            assert {info.version for info, _ in results} == {1}
            assert len(await reg.store.versions("same")) == 1

    asyncio.run(main())
    sample = metrics.registry.get_sample_value
    assert sample("restune_tuner_load_seconds_count") == 1
    assert sample("restune_registrations_total", {"result": "created"}) == 1
    assert sample("restune_registrations_total", {"result": "unchanged"}) == 7


def test_identical_uploads_that_fail_all_fail_alike(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    wrong_name = artifact("other-name")

    async def main() -> None:
        async with open_registry(settings, runtime) as reg:
            results = await asyncio.gather(
                *(reg.register("named", wrong_name) for _ in range(4)), return_exceptions=True
            )
            assert all(isinstance(r, ApiError) for r in results)
            assert {r.code for r in results if isinstance(r, ApiError)} == {
                "artifact_name_mismatch"
            }
            assert not reg.known("named")

    asyncio.run(main())


# --- cache keys carry the sha256 ---------------------------------------------------------------


def test_group_cache_keys_carry_the_sha256(
    tiny_backbone: TorchBackbone, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    """Same name, same version number, other bytes (a store replaced under a replica): the
    engine must not answer with the group built from the old weights."""
    old = loaded_tuner(tiny_backbone, artifact("pets", seed=1), version=1)
    new = loaded_tuner(tiny_backbone, artifact("pets", seed=2), version=1)
    assert old.key[:2] == new.key[:2]
    assert old.sha256 != new.sha256
    engine = Engine(runtime, FeatureCache(1 << 20))
    pixels, digest = pixels_of(0, tiny_backbone)
    first = engine.run_batch([BatchItem(pixels, digest, (old,), 3)]).items[0].answers["pets"]
    second = engine.run_batch([BatchItem(pixels, digest, (new,), 3)]).items[0].answers["pets"]
    alone = Engine(runtime, FeatureCache(0)).run_batch([BatchItem(pixels, digest, (new,), 3)])
    assert second["sha256"] == new.sha256
    assert answers_close(second, alone.items[0].answers["pets"])
    assert not answers_close(first["labels"], second["labels"])


def test_new_weights_answer_at_once_for_a_cached_image(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    """Re-registering a name with new weights (a new version, and after a delete a fresh
    one) is served by the very next request, whose image features come from the cache."""
    image = tiny_images(1, seed=9)
    weights = [artifact("swap", seed=s) for s in (1, 2, 3)]
    uncached = settings.model_copy(
        update={"store": settings.store.replace("tuners", "alone"), "feature_cache_bytes": 0}
    )

    async def main() -> None:
        # What each set of weights answers, computed without any cache.
        reference = {}
        async with running(uncached, runtime) as alone:
            for data in weights:
                await alone.registry.register("swap", data)
                body = await alone.predict(image, refs("swap"), 3)
                reference[hashlib.sha256(data).hexdigest()] = answer(body, "swap")
        async with running(settings, runtime) as svc:
            await svc.registry.register("swap", weights[0])
            first = await svc.predict(image, refs("swap"), 3)
            assert first["timing"]["cache_hits"] == 0
            await svc.registry.register("swap", weights[1])
            second = await svc.predict(image, refs("swap"), 3)
            assert second["timing"]["cache_hits"] == 1
            await svc.registry.delete("swap")
            await svc.registry.register("swap", weights[2])
            third = await svc.predict(image, refs("swap"), 3)
            assert third["timing"]["cache_hits"] == 1
            seen = [answer(b, "swap") for b in (first, second, third)]
            assert [a["version"] for a in seen] == [1, 2, 3]
            for got, data in zip(seen, weights, strict=True):
                digest = hashlib.sha256(data).hexdigest()
                assert got["sha256"] == digest
                assert answers_close(got, {**reference[digest], "version": got["version"]})
            assert not answers_close(seen[0]["labels"], seen[1]["labels"])

    asyncio.run(main())


# --- unloads that drain ---------------------------------------------------------------------


def test_delete_waits_for_the_request_using_the_version(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    metrics = Metrics()

    async def main() -> None:
        async with running(settings, runtime, metrics) as svc:
            await svc.registry.register("pets", artifact("pets"))
            gate = Gate(svc.batcher.run_batch)
            svc.batcher.run_batch = gate
            request = asyncio.create_task(svc.predict(tiny_images(1), refs("pets"), 1))
            try:
                assert await asyncio.to_thread(gate.entered.wait, 20)  # the batch is running
                delete = asyncio.create_task(svc.registry.delete("pets"))
                await asyncio.sleep(0.3)
                assert not delete.done()  # held by the request's lease
                assert not svc.registry.known("pets")  # new requests no longer get it
                assert svc.registry.leases.held == 1
            finally:
                gate.open.set()
            body = await request
            assert answer(body, "pets")["version"] == 1
            assert await delete is True
            assert svc.registry.leases.held == 0

    asyncio.run(main())
    assert metrics.registry.get_sample_value("restune_unload_drain_timeouts_total") == 0


def test_the_drain_is_bounded_and_reported(
    settings: Settings,
    runtime: RecordingRuntime,
    artifact: ArtifactFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request that holds a version past ``unload_drain_s`` (stuck, say) does not hang the
    delete: it returns after the bound, says so in the log and the metric, and the stuck
    request still finishes on the module it holds."""
    metrics = Metrics()
    short = settings.model_copy(update={"unload_drain_s": 0.3})

    async def main() -> None:
        async with running(short, runtime, metrics) as svc:
            await svc.registry.register("pets", artifact("pets"))
            gate = Gate(svc.batcher.run_batch)
            svc.batcher.run_batch = gate
            request = asyncio.create_task(svc.predict(tiny_images(1), refs("pets"), 1))
            try:
                assert await asyncio.to_thread(gate.entered.wait, 20)
                drained = await asyncio.wait_for(svc.registry.delete("pets"), 20)
                assert drained is False
            finally:
                gate.open.set()
            assert answer(await request, "pets")["version"] == 1

    with caplog.at_level("WARNING", logger="server.engine.registry"):
        asyncio.run(main())
    assert metrics.registry.get_sample_value("restune_unload_drain_timeouts_total") == 1
    assert any("still used it" in r.getMessage() for r in caplog.records)


def test_a_cancelled_request_does_not_hold_the_drain(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    metrics = Metrics()

    async def main() -> None:
        async with running(settings, runtime, metrics) as svc:
            await svc.registry.register("pets", artifact("pets"))
            gate = Gate(svc.batcher.run_batch)
            svc.batcher.run_batch = gate
            # Two requests: the first holds the worker, the second waits in the queue.
            first = asyncio.create_task(svc.predict(tiny_images(1, seed=1), refs("pets"), 1))
            assert await asyncio.to_thread(gate.entered.wait, 20)
            second = asyncio.create_task(svc.predict(tiny_images(1, seed=2), refs("pets"), 1))
            await eventually(lambda: _true(svc.batcher.queued_images == 1))
            try:
                first.cancel()
                second.cancel()  # the client went away
                for task in (first, second):
                    with pytest.raises(asyncio.CancelledError):
                        await task
                assert svc.registry.leases.held == 0
                # settings.unload_drain_s is 10 s; the bound here only guards a hang.
                assert await asyncio.wait_for(svc.registry.delete("pets"), 5) is True
            finally:
                gate.open.set()

    asyncio.run(main())
    assert metrics.registry.get_sample_value("restune_unload_drain_timeouts_total") == 0


async def _true(value: bool) -> bool:
    return value


def test_an_unloaded_version_leaves_the_group_cache(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    async def main() -> None:
        async with running(settings, runtime) as svc:
            await svc.registry.register("a", artifact("a", seed=1))
            await svc.registry.register("b", artifact("b", seed=2))
            await svc.predict(tiny_images(2), refs("a", "b"), 1)
            assert len(svc.engine.groups) >= 1
            svc.registry.unload("a")
            await svc.registry.drained()
            assert all(
                ("a", 1) not in {k[:2] for k in key}
                for key in svc.engine.groups._groups  # the cache under test
            )

    asyncio.run(main())


# --- memory after 100 register/delete cycles -------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process (``VmRSS`` of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def live_objects(name: str = "cycle") -> tuple[int, int, int]:
    """(tensor bytes held by live tensors, live TaskModules and LoadedTuners of tuner
    ``name``), after a full collection. Storages are counted once however many tensors view
    them. Only this test's tuner is counted: other test modules may still hold theirs."""
    gc.collect()
    storages: dict[int, int] = {}
    modules = tuners = 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            if obj.is_meta:
                continue
            try:
                storage = obj.untyped_storage()
                ptr = storage.data_ptr()
            except (RuntimeError, NotImplementedError):
                # Fake/functional tensors left alive by an earlier ONNX (dynamo) export in
                # this process hold no memory of their own.
                continue
            storages[ptr] = storage.nbytes()
        elif isinstance(obj, TaskModule) and obj.config.name == name:
            modules += 1
        elif isinstance(obj, LoadedTuner) and obj.name == name:
            tuners += 1
    return sum(storages.values()), modules, tuners


def test_memory_returns_after_100_register_delete_cycles(
    settings: Settings,
    runtime: RecordingRuntime,
    tiny_backbone: TorchBackbone,
    artifact: ArtifactFactory,
) -> None:
    """Register new weights, answer with them (building a group), delete: 100 times. After
    a warm-up, no tensor bytes, modules or loaded versions stay behind, and RSS does not
    grow by what the tuners would leak (each holds a 256 KiB head)."""
    images = tiny_images(2, seed=4)
    artifacts = [
        artifact("cycle", seed=i, labels=MANY_LABELS) for i in range(CYCLES + WARMUP_CYCLES)
    ]
    one_tuner = loaded_tuner(tiny_backbone, artifacts[0]).nbytes
    figures: dict[str, int] = {}

    async def cycle(svc: InferenceService, data: bytes) -> None:
        await svc.registry.register("cycle", data)
        body = await svc.predict(images, refs("cycle"), 1)
        assert "labels" in answer(body, "cycle")
        assert await svc.registry.delete("cycle") is True

    async def main() -> None:
        async with running(settings, runtime) as svc:
            for data in artifacts[:WARMUP_CYCLES]:
                await cycle(svc, data)
            # The batcher's loop keeps its last batch (one version) until the next one: the
            # same before and after, so compare the two.
            figures["tensor_bytes_before"], modules_before, tuners_before = live_objects()
            figures["rss_before"] = rss_bytes()
            for data in artifacts[WARMUP_CYCLES:]:
                await cycle(svc, data)
            await svc.registry.drained()
            figures["tensor_bytes_after"], modules_after, tuners_after = live_objects()
            figures["rss_after"] = rss_bytes()
            assert tuners_after == tuners_before <= 1
            assert modules_after == modules_before
            assert svc.registry.loaded_bytes == 0
            assert len(svc.engine.groups) == 0

    asyncio.run(main())
    tensor_growth = figures["tensor_bytes_after"] - figures["tensor_bytes_before"]
    rss_growth = figures["rss_after"] - figures["rss_before"]
    print(
        f"\n{CYCLES} register/delete cycles (tuner {one_tuner / 1024:.0f} KiB): RSS "
        f"{figures['rss_before'] / MiB:.1f} -> {figures['rss_after'] / MiB:.1f} MiB "
        f"({rss_growth / MiB:+.2f} MiB), live tensor bytes {figures['tensor_bytes_before']} -> "
        f"{figures['tensor_bytes_after']} ({tensor_growth:+d})"
    )
    assert tensor_growth < one_tuner  # not one tuner's worth stays behind
    # 100 leaked versions would add 100 tuners; the allocator's noise is a few of them.
    assert rss_growth < CYCLES * one_tuner / 4


# --- canary splits ----------------------------------------------------------------------------


def test_traffic_splits_roll_back_and_refuse_bad_weights(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    async def main() -> None:
        async with open_registry(settings, runtime) as reg:
            for seed in (1, 2, 3):
                await reg.register("pets", artifact("pets", seed=seed))
            reg.unload("pets")
            assert await reg.set_traffic("pets", {2: 90, 3: 10}) == {2: 90, 3: 10}
            assert reg.is_loaded("pets", 2)  # loaded first
            assert reg.is_loaded("pets", 3)
            assert reg.has_split("pets")
            assert (await reg.describe("pets")).traffic == {2: 90, 3: 10}
            # All the weight on one version: the rollback. It becomes current.
            assert await reg.set_traffic("pets", {1: 100, 3: 0}) == {1: 100}
            assert not reg.has_split("pets")
            assert reg.current("pets").version == 1  # type: ignore[union-attr]
            assert (await reg.resolve("pets", None, "ab" * 32)).version == 1
            assert await reg.store.get_traffic("pets") == {1: 100}
            for bad in ({9: 100}, {1: 0, 2: 0}, {1: -5, 2: 10}, {}):
                with pytest.raises(ApiError) as err:
                    await reg.set_traffic("pets", bad)
                assert (err.value.code, err.value.status) == ("invalid_traffic", 422)
            with pytest.raises(ApiError) as err:
                await reg.set_traffic("nope", {1: 100})
            assert err.value.code == "tuner_not_found"

    asyncio.run(main())


def follow_a_split(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    """Replica a sets splits and a rollback; replica b (same store) follows them."""

    async def main() -> None:
        async with open_registry(settings, runtime) as a, open_registry(settings, runtime) as b:
            await a.register("pets", artifact("pets", seed=1))
            await a.register("pets", artifact("pets", seed=2))
            await eventually(lambda: _true(b.current("pets") is not None))
            await a.set_traffic("pets", {1: 50, 2: 50})
            await eventually(lambda: _true(b.traffic("pets") == {1: 50, 2: 50}))
            # The split took effect on b only once both versions were loaded there.
            assert b.is_loaded("pets", 1)
            assert b.is_loaded("pets", 2)
            digests = [f"{i:064x}" for i in range(40)]
            on_a = [(await a.resolve("pets", None, d)).version for d in digests]
            on_b = [(await b.resolve("pets", None, d)).version for d in digests]
            assert on_a == on_b  # the same image gets the same version on every replica
            assert set(on_a) == {1, 2}
            await a.set_traffic("pets", {1: 100})  # rollback, seen by b as "current"
            await eventually(lambda: _true(b.current("pets").version == 1))  # type: ignore[union-attr]
            await eventually(lambda: _true(not b.has_split("pets")))

    asyncio.run(main())


def test_another_replica_follows_a_split_with_its_versions_loaded(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    follow_a_split(settings, runtime, artifact)


@pytest.mark.redis
def test_another_replica_follows_a_split_on_redis(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory, clean_redis: str
) -> None:
    follow_a_split(settings.model_copy(update={"store": clean_redis}), runtime, artifact)


def roll_out(settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory) -> None:
    """Staged uploads, a split an upload keeps, per-version deletes; replica b follows a."""

    async def main() -> None:
        async with open_registry(settings, runtime) as a, open_registry(settings, runtime) as b:
            await a.register("pets", artifact("pets", seed=1), promote=False)
            assert a.is_current("pets", 1)  # a first version is always live
            info, created = await a.register("pets", artifact("pets", seed=2), promote=False)
            assert (info.version, created) == (2, True)
            assert a.is_loaded("pets", 2)  # stored and loaded, ...
            assert a.is_current("pets", 1)  # ... but not serving plain requests
            assert (await a.resolve("pets", None, "ab" * 32)).version == 1
            assert (await a.resolve("pets", 2)).version == 2  # pinned works at once
            await a.set_traffic("pets", {1: 90, 2: 10})
            # The default upload keeps a split in progress; promote=True ends it.
            info, _ = await a.register("pets", artifact("pets", seed=3))
            assert (info.version, a.traffic("pets"), a.is_current("pets", 1)) == (
                3,
                {1: 90, 2: 10},
                True,
            )
            # b may not have read the name yet: its traffic is then unknown, not wrong.
            await eventually(lambda: _true(b.known("pets") and b.traffic("pets") == {1: 90, 2: 10}))
            # Deleting a version in the split or the current one needs force: 409.
            for version in (1, 2):
                with pytest.raises(ApiError) as err:
                    await a.delete_version("pets", version)
                assert (err.value.code, err.value.status) == ("version_in_use", 409)
            assert await a.delete_version("pets", 3)  # in no split, not current
            with pytest.raises(ApiError) as err:
                await a.resolve("pets", 3)
            assert err.value.code == "unknown_version"
            # Forced out of the split: v2 alone is left with weight, so it is current.
            await a.delete_version("pets", 1, force=True)
            assert (a.current("pets").version, a.traffic("pets")) == (2, {2: 100})  # type: ignore[union-attr]
            assert not a.is_loaded("pets", 1)
            await eventually(lambda: _true(b.current("pets").version == 2))  # type: ignore[union-attr]
            await eventually(lambda: _true(not b.is_loaded("pets", 1)))
            await eventually(lambda: _true(not b.has_split("pets")))
            with pytest.raises(ApiError) as err:
                await b.resolve("pets", 1)
            assert err.value.code == "unknown_version"
            with pytest.raises(ApiError) as err:
                await a.delete_version("pets", 2, force=True)  # the only version
            assert err.value.code == "version_in_use"
            with pytest.raises(ApiError) as err:
                await a.delete_version("pets", 9)
            assert err.value.code == "version_not_found"
            with pytest.raises(ApiError) as err:
                await a.delete_version("nope", 1)
            assert err.value.code == "tuner_not_found"

    asyncio.run(main())


def test_staged_uploads_and_per_version_deletes(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    roll_out(settings, runtime, artifact)


@pytest.mark.redis
def test_staged_uploads_and_per_version_deletes_on_redis(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory, clean_redis: str
) -> None:
    roll_out(settings.model_copy(update={"store": clean_redis}), runtime, artifact)


# --- metrics per version --------------------------------------------------------------------


def test_answers_per_version_and_where_tuners_live(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    metrics = Metrics(max_task_labels=2, max_version_labels=3)

    async def main() -> str:
        async with running(settings, runtime, metrics) as svc:
            for seed in (1, 2):
                await svc.registry.register("pets", artifact("pets", seed=seed))
            for name in ("ages", "eyes", "ears"):
                await svc.registry.register(name, artifact(name))
            await svc.registry.set_traffic("pets", {1: 50, 2: 50})
            body = await svc.predict(tiny_images(8), refs("pets", "ages", "eyes"), 1)
            versions = [r["tasks"]["pets"]["version"] for r in body["results"]]
            detail = (await svc.registry.describe("pets")).to_dict()
            by_version = {v["version"]: v["answers"] for v in detail["versions"]}
            assert by_version == {1: versions.count(1), 2: versions.count(2)}
            assert detail["traffic"] == {"1": 50, "2": 50}
            svc.registry.unload("ears")
            text = metrics.render().decode()
            # The scrape reads the registry: "ears" is idle, only in the store.
            placements = re.findall(r"^restune_tuner_location\{(.*)\} (\S+)$", text, re.M)
            assert placements, text
            return text

    text = asyncio.run(main())
    sample = metrics.registry.get_sample_value
    # Two labels ("pets" took one, "ages" the other); "eyes" is counted as "other".
    assert sample("restune_answers_total", {"task": "pets", "version": "1"}) is not None
    assert sample("restune_answers_total", {"task": "other", "version": "other"}) == 8
    counted = {
        v: sample("restune_answers_total", {"task": "pets", "version": v}) or 0 for v in "12"
    }
    assert sum(counted.values()) == 8
    assert sample("restune_tuner_traffic_weight", {"task": "pets", "version": "1"}) == 50
    assert sample("restune_tuner_location", {"task": "ages", "version": "1", "location": "host"})
    # eyes (loaded) and ears (store only) have no label of their own.
    assert sample("restune_tuner_location", {"task": "other", "version": "", "location": "host"})
    assert (
        sample("restune_tuner_location", {"task": "other", "version": "", "location": "store"}) == 1
    )
    assert 'task="eyes"' not in text
    assert 'task="ears"' not in text


def test_two_tenants_tuners_of_one_plain_name_answer_side_by_side(
    settings: Settings,
    runtime: RecordingRuntime,
    artifact: ArtifactFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``acme/pets`` and ``bolt/pets`` carry the same artifact name and share a shape: they
    must not be stacked into one group (which refuses duplicate names)."""
    images = tiny_images(2, seed=5)

    async def main() -> None:
        async with running(settings, runtime) as svc:
            await svc.registry.register("acme/pets", artifact("pets", seed=1))
            await svc.registry.register("bolt/pets", artifact("pets", seed=2))
            both = await svc.predict(images, refs("acme/pets", "bolt/pets"), 3)
            for name in ("acme/pets", "bolt/pets"):
                alone = await svc.predict(images, refs(name), 3)
                for image in (0, 1):
                    assert answers_close(answer(both, name, image), answer(alone, name, image))
            assert not answers_close(
                answer(both, "acme/pets")["labels"], answer(both, "bolt/pets")["labels"]
            )

    with caplog.at_level("ERROR"):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
