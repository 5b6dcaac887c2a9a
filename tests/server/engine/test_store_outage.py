"""A replica and a store outage, against a real redis-server that is killed and restarted.

What must hold: loaded tuners keep answering; a request that needs the store while it is down
(no index read yet, a version not loaded) is refused as a whole with a retryable 503
``store_unavailable``, never 404 or a per-task error; readiness means "can serve predictions",
so an outage after the first index read leaves the replica ready (its ``store`` field and
``restune_tuner_store_up`` say the store is gone); a version whose bytes are broken is still
answered per task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from server.engine.service import InferenceService, TaskRef
from server.errors import ApiError
from server.metrics import Metrics
from server.settings import Settings
from tests.fixtures.models import tiny_images
from tests.fixtures.redis_server import RedisProcess
from tests.server.engine.conftest import ArtifactFactory
from tests.server.engine.engine_kit import RecordingRuntime, eventually
from tuners_store import open_store


@contextlib.asynccontextmanager
async def running(settings: Settings, runtime: RecordingRuntime) -> AsyncIterator[InferenceService]:
    service = InferenceService(settings, Metrics(), backbone=runtime)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def refs(*names: str) -> list[TaskRef]:
    return [TaskRef.parse(n) for n in names]


async def put_and_persist(url: str, artifacts: dict[str, bytes]) -> None:
    """Register through another store client (another replica), then SAVE so a restarted
    redis-server comes back with it."""
    async with open_store(url) as other:
        for name, data in artifacts.items():
            await other.put(name, data)
    client = redis.Redis.from_url(url)
    client.save()
    client.close()


def assert_store_unavailable(err: ApiError) -> None:
    assert (err.code, err.status) == ("store_unavailable", 503)
    assert err.retry_after is not None
    assert 0 < err.retry_after <= 5


@pytest.mark.redis
def test_outage_loaded_tuners_answer_the_rest_is_a_retryable_503(
    settings: Settings,
    runtime: RecordingRuntime,
    artifact: ArtifactFactory,
    redis_process: RedisProcess,
) -> None:
    url = redis_process.url
    asyncio.run(put_and_persist(url, {"hot": artifact("hot"), "cold": artifact("cold", seed=1)}))
    image = tiny_images(1, seed=3)

    async def main() -> None:
        async with running(settings.model_copy(update={"store": url}), runtime) as svc:
            await svc.predict(image, refs("hot"), 1)  # loads "hot" only
            metrics = svc.metrics.registry.get_sample_value
            assert metrics("restune_tuner_store_up") == 1
            redis_process.kill()

            body = await svc.predict(image, refs("hot"), 1)
            assert body["results"][0]["tasks"]["hot"]["version"] == 1
            for tasks in (refs("cold"), refs("hot", "cold"), refs("hot@1", "cold@1")):
                with pytest.raises(ApiError) as err:
                    await svc.predict(image, tasks, 1)
                assert_store_unavailable(err.value)
            # A name this replica has not seen: it cannot know, so it does not say 404.
            with pytest.raises(ApiError) as err:
                await svc.predict(image, refs("never-seen"), 1)
            assert_store_unavailable(err.value)

            report = await svc.ready()
            assert report["ready"] is True, report
            assert report["store"]["reachable"] is False
            assert report["store"]["index"] == "stale"
            assert report["store"]["error"]
            assert metrics("restune_tuner_store_up") == 0

            redis_process.start()  # comes back with the saved index

            async def cold_serves() -> bool:
                with contextlib.suppress(ApiError):
                    body = await svc.predict(image, refs("hot", "cold"), 1)
                    return "version" in body["results"][0]["tasks"]["cold"]
                return False

            await eventually(cold_serves)
            report = await svc.ready()
            assert (report["ready"], report["store"]["index"]) == (True, "current")
            assert metrics("restune_tuner_store_up") == 1
            with pytest.raises(ApiError) as err:
                await svc.predict(image, refs("never-seen"), 1)
            assert err.value.code == "unknown_task"

    asyncio.run(main())


@pytest.mark.redis
def test_a_replica_that_never_reached_the_store_is_not_ready_and_never_says_404(
    settings: Settings,
    runtime: RecordingRuntime,
    artifact: ArtifactFactory,
    redis_process: RedisProcess,
) -> None:
    url = redis_process.url
    asyncio.run(put_and_persist(url, {"pets": artifact("pets")}))
    redis_process.kill()
    image = tiny_images(1, seed=4)

    async def main() -> None:
        async with running(settings.model_copy(update={"store": url}), runtime) as svc:
            report = await svc.ready()
            assert report["ready"] is False
            assert report["store"]["index"] == "missing"
            assert any("index" in reason for reason in report["reasons"]), report
            for tasks in (refs("pets"), refs("no-such-task")):
                with pytest.raises(ApiError) as err:
                    await svc.predict(image, tasks, 1)
                assert_store_unavailable(err.value)

            redis_process.start()

            async def ready() -> bool:
                return bool((await svc.ready())["ready"])

            # The watch reconnects on its own (bounded backoff) and reads the index.
            await eventually(ready)
            body = await svc.predict(image, refs("pets"), 1)
            assert body["results"][0]["tasks"]["pets"]["version"] == 1
            with pytest.raises(ApiError) as err:
                await svc.predict(image, refs("no-such-task"), 1)
            assert err.value.code == "unknown_task"

    asyncio.run(main())


@pytest.mark.redis
def test_a_version_with_missing_bytes_is_still_answered_per_task(
    settings: Settings,
    runtime: RecordingRuntime,
    artifact: ArtifactFactory,
    redis_process: RedisProcess,
) -> None:
    """The store answers but the version cannot be loaded (its blob is gone): that is the
    version's problem, answered per task, not a store outage."""
    url = redis_process.url
    asyncio.run(put_and_persist(url, {"ok": artifact("ok"), "broken": artifact("broken", seed=2)}))
    client = redis.Redis.from_url(url)
    client.delete("restune:blob:broken:1")
    client.close()
    image = tiny_images(1, seed=5)

    async def main() -> None:
        async with running(settings.model_copy(update={"store": url}), runtime) as svc:
            body = await svc.predict(image, refs("ok", "broken"), 1)
            tasks = body["results"][0]["tasks"]
            assert tasks["ok"]["version"] == 1
            assert tasks["broken"]["error"]["code"] == "tuner_load_failed"

    asyncio.run(main())


def test_a_file_store_whose_directory_vanishes_is_reported_then_followed_again(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory, tmp_path: Path
) -> None:
    """The same for the filesystem store: its directory moved away (a volume unmounted) is a
    ``lost`` store, and its return a resync."""
    root = tmp_path / "tuners"
    url = f"file://{root}?poll_interval=0.02"
    image = tiny_images(1, seed=6)

    async def main() -> None:
        async with running(settings.model_copy(update={"store": url}), runtime) as svc:
            await svc.registry.register("kept", artifact("kept"))
            up = svc.metrics.registry.get_sample_value

            async def store_up_is(value: float) -> bool:
                return up("restune_tuner_store_up") == value

            root.rename(tmp_path / "elsewhere")
            await eventually(lambda: store_up_is(0))
            body = await svc.predict(image, refs("kept"), 1)
            assert body["results"][0]["tasks"]["kept"]["version"] == 1
            (tmp_path / "elsewhere").rename(root)
            await eventually(lambda: store_up_is(1))
            assert svc.registry.known("kept")

    asyncio.run(main())
