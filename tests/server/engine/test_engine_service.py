"""The facade the HTTP layer calls: request validation order, response body, per-task errors,
tensor inputs, readiness."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from restuning.preprocess import preprocess
from server.engine.service import InferenceService, TaskRef
from server.errors import ApiError
from server.metrics import Metrics
from server.settings import Settings
from tests.fixtures.models import tiny_images
from tests.server.engine.conftest import ArtifactFactory
from tests.server.engine.engine_kit import Gate, RecordingRuntime, answers_close
from tuners_store import StoreEvent, open_store


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


def test_task_refs() -> None:
    assert TaskRef.parse("pets") == TaskRef("pets", None)
    assert TaskRef.parse(" pets@12 ") == TaskRef("pets", 12)
    assert str(TaskRef("pets", 3)) == "pets@3"
    for bad in ("pets@", "pets@0", "pets@x", "@3"):
        with pytest.raises(ApiError) as err:
            TaskRef.parse(bad)
        assert err.value.code == "validation_error"


def test_predict_body(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    async def main() -> dict[str, Any]:
        async with running(settings, runtime) as svc:
            await svc.registry.register("pets", artifact("pets", seed=1))
            await svc.registry.register("pets", artifact("pets", seed=2))
            await svc.registry.register("ages", artifact("ages", task="regression"))
            await svc.registry.register("look", artifact("look", task="embedding"))
            return await svc.predict(tiny_images(3), refs("look", "pets@1", "ages"), 2)

    body = asyncio.run(main())
    assert [r["image"] for r in body["results"]] == [0, 1, 2]
    for result in body["results"]:
        tasks = result["tasks"]
        assert list(tasks) == ["look", "pets", "ages"]  # the request's order
        assert tasks["pets"]["version"] == 1  # pinned, not the current v2
        assert tasks["pets"]["kind"] == "classification"
        assert len(tasks["pets"]["labels"]) == 2
        assert set(tasks["ages"]["values"]) == {"age", "size"}
        assert len(tasks["look"]["embedding"]) == 6
        assert len(tasks["look"]["sha256"]) == 64
    assert body["backbone"]["arch"] == "vit_test_tiny"
    assert body["backbone"]["fingerprint"] == runtime.fingerprint
    assert body["backbone"]["runtime"] == "torch"
    assert body["backbone"]["device"] == "cpu"
    timing = body["timing"]
    assert set(timing) >= {"queue_ms", "backbone_ms", "fanout_ms", "total_ms", "cache_hits"}
    assert timing["cache_hits"] == 0
    assert timing["total_ms"] >= timing["backbone_ms"]


def test_two_versions_of_one_task_side_by_side(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    """``pets@1,pets@2`` answers both, keyed as written; each equals the version asked alone."""

    async def main() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with running(settings, runtime) as svc:
            await svc.registry.register("pets", artifact("pets", seed=1))
            await svc.registry.register("pets", artifact("pets", seed=2))
            await svc.registry.register("ages", artifact("ages", task="regression"))
            images = tiny_images(3)
            runtime.calls.clear()
            both = await svc.predict(images, refs("pets@1", "ages", "pets@2"), 2)
            # Two batch items per image, one backbone forward per image: the second item's
            # features are the first's (same pixels, same digest).
            assert sum(shape[0] for _, shape in runtime.calls) == 3, runtime.calls
            one = await svc.predict(images, refs("pets@1"), 2)
            two = await svc.predict(images, refs("pets"), 2)
            return both, one, two

    both, one, two = asyncio.run(main())
    for result, alone1, alone2 in zip(both["results"], one["results"], two["results"], strict=True):
        tasks = result["tasks"]
        assert list(tasks) == ["pets@1", "ages", "pets@2"]  # the request's order, as written
        assert (tasks["pets@1"]["version"], tasks["pets@2"]["version"]) == (1, 2)
        assert tasks["pets@1"]["sha256"] != tasks["pets@2"]["sha256"]
        assert answers_close(tasks["pets@1"], alone1["tasks"]["pets"])
        assert answers_close(tasks["pets@2"], alone2["tasks"]["pets"])


@pytest.mark.parametrize(
    ("tasks", "n_images", "code"),
    [
        ([], 1, "no_tasks"),
        (["pets", "pets@1"], 1, "duplicate_task"),
        (["pets@1", "pets"], 1, "duplicate_task"),
        (["pets@1", "pets@1"], 1, "duplicate_task"),
        ([f"t{i}" for i in range(5)], 1, "too_many_tasks"),
        (["pets"], 4, "too_many_images"),
        (["pets", "nope"], 1, "unknown_task"),
        (["pets@9"], 1, "unknown_version"),
    ],
)
def test_request_errors_come_before_decoding(
    settings: Settings,
    runtime: RecordingRuntime,
    artifact: ArtifactFactory,
    tasks: list[str],
    n_images: int,
    code: str,
) -> None:
    limited = settings.model_copy(update={"max_tasks_per_request": 4, "max_images_per_request": 3})

    async def main() -> None:
        async with running(limited, runtime) as svc:
            await svc.registry.register("pets", artifact("pets"))
            junk = [b"not an image"] * n_images  # would be bad_image if it were decoded
            with pytest.raises(ApiError) as err:
                await svc.predict(junk, refs(*tasks), 1)
            assert err.value.code == code
            if code.startswith("unknown"):
                assert err.value.status == 404
                assert err.value.extra["task"] in {"nope", "pets"}

    asyncio.run(main())
    assert runtime.calls == []


def test_a_bad_image_is_named(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    async def main() -> None:
        async with running(settings, runtime) as svc:
            await svc.registry.register("pets", artifact("pets"))
            images = tiny_images(3)
            images[1] = images[1][:40]
            with pytest.raises(ApiError) as err:
                await svc.predict(images, refs("pets"), 1)
            assert (err.value.code, err.value.extra) == ("bad_image", {"image": 1})

    asyncio.run(main())


def test_repeated_images_hit_the_feature_cache(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    async def main() -> None:
        async with running(settings, runtime) as svc:
            await svc.registry.register("pets", artifact("pets"))
            first = await svc.predict(tiny_images(2), refs("pets"), 3)
            forwards = len(runtime.calls)
            second = await svc.predict(tiny_images(2), refs("pets"), 3)
            assert len(runtime.calls) == forwards
            assert second["timing"]["cache_hits"] == 2
            assert second["timing"]["backbone_ms"] < 1000  # sanity: a number, not a timing test
            for a, b in zip(first["results"], second["results"], strict=True):
                assert answers_close(a, b, 1e-6)

    asyncio.run(main())


def test_preprocessed_tensors_answer_like_encoded_images(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    encoded = tiny_images(2)
    pixels = torch.stack(
        [preprocess(Image.open(io.BytesIO(e)).convert("RGB"), runtime.data_config) for e in encoded]
    )

    async def main() -> None:
        async with running(settings, runtime) as svc:
            await svc.registry.register("pets", artifact("pets"))
            config = svc.preprocess_config()
            assert config["input_size"] == [3, 32, 32]
            from_bytes = await svc.predict(encoded, refs("pets"), 3)
            from_tensor = await svc.predict_tensor(pixels, refs("pets"), 3)
            assert answers_close(from_bytes["results"], from_tensor["results"], 1e-5)
            with pytest.raises(ApiError) as err:
                await svc.predict_tensor(pixels[:, :, :16], refs("pets"), 3)
            assert err.value.code == "validation_error"
            with pytest.raises(ApiError):
                await svc.predict_tensor(pixels.double(), refs("pets"), 3)

    asyncio.run(main())


def test_a_tuner_that_cannot_load_answers_per_task(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory, tmp_path: Path
) -> None:
    async def main() -> None:
        async with running(settings, runtime) as svc:
            await svc.registry.register("pets", artifact("pets"))
            other = open_store(settings.store)  # another replica stores it...
            await other.put("rotten", artifact("rotten", seed=5))
            await other.close()
            # ...and then the blob rots on disk (its sha256 no longer matches).
            blob = tmp_path / "tuners" / "rotten" / "1.safetensors"
            blob.write_bytes(blob.read_bytes()[:-8] + b"\x00" * 8)
            # The change feed may have loaded it before the rot: load it again from the store.
            svc.registry.unload("rotten")
            body = await svc.predict(tiny_images(2), refs("pets", "rotten"), 1)
            for result in body["results"]:
                assert "labels" in result["tasks"]["pets"]
                assert result["tasks"]["rotten"]["error"]["code"] == "tuner_load_failed"

    asyncio.run(main())


def test_a_canary_split_is_decided_per_image(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    async def main() -> None:
        async with running(settings, runtime) as svc:
            await svc.registry.register("pets", artifact("pets", seed=1))
            await svc.registry.register("pets", artifact("pets", seed=2))
            await svc.store.set_traffic("pets", {1: 1, 2: 1})
            await svc.registry.apply_event(StoreEvent("traffic", "pets"))
            await svc.registry.settle()
            images = tiny_images(12)
            first = await svc.predict(images, refs("pets"), 1)
            versions = [r["tasks"]["pets"]["version"] for r in first["results"]]
            assert set(versions) == {1, 2}
            again = await svc.predict(images, refs("pets"), 1)
            assert versions == [r["tasks"]["pets"]["version"] for r in again["results"]]

    asyncio.run(main())


def test_readiness(settings: Settings, runtime: RecordingRuntime) -> None:
    async def main() -> None:
        service = InferenceService(settings, Metrics(), backbone=runtime)
        before = await service.ready()
        assert not before["ready"]
        assert before["reasons"]
        await service.start()
        report = await service.ready()
        assert report["ready"], report
        assert report["providers"] == ["torch-cpu"]
        assert report["random_weights"] is True
        await service.stop()
        after = await service.ready()
        assert not after["ready"]
        with pytest.raises(ApiError) as err:
            await service.predict(tiny_images(1), refs("pets"), 1)
        assert err.value.code == "not_ready"

    asyncio.run(main())


def test_overload_is_refused_before_any_image_is_decoded(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    # Under overload a refusal must be cheap: garbage bytes get `overloaded`, not `bad_image`.
    small = settings.model_copy(update={"max_queue_images": 2, "max_batch_images": 1})

    async def main() -> None:
        async with running(small, runtime) as svc:
            await svc.registry.register("pets", artifact("pets", seed=1))
            gate = Gate(svc.batcher.run_batch)
            svc.batcher.run_batch = gate
            busy = asyncio.create_task(svc.predict(tiny_images(1, seed=3), refs("pets"), 1))
            await asyncio.to_thread(gate.entered.wait, 10)
            queued = asyncio.create_task(svc.predict(tiny_images(2, seed=4), refs("pets"), 1))
            for _ in range(500):
                if svc.batcher.queued_images == 2:
                    break
                await asyncio.sleep(0.01)
            assert svc.batcher.queued_images == 2
            with pytest.raises(ApiError) as err:
                await svc.predict([b"not an image"], refs("pets"), 1)
            assert err.value.code == "overloaded"
            assert err.value.retry_after is not None
            gate.open.set()
            await asyncio.gather(busy, queued)

    asyncio.run(main())
