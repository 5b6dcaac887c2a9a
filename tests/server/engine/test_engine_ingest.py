"""The service's image path: the feature-cache key is the backbone input (duplicates within a
request share one forward row; an image and its preprocessed tensor share cache entries), and
image limits are checked before any decoding."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data

from restuning.preprocess import PreprocessMode, preprocess
from restuning.presets import PRESETS
from restuning.train.data import ImageRef
from server.engine.decode import prepare_image
from server.engine.service import InferenceService, TaskRef
from server.errors import ApiError
from server.metrics import Metrics
from server.settings import Settings
from tests.fixtures.models import tiny_images
from tests.server.engine.conftest import ArtifactFactory
from tests.server.engine.engine_kit import RecordingRuntime, answers_close


@contextlib.asynccontextmanager
async def running(settings: Settings, runtime: RecordingRuntime) -> AsyncIterator[InferenceService]:
    service = InferenceService(settings, Metrics(), backbone=runtime)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def forwarded_images(runtime: RecordingRuntime) -> int:
    """Images the backbone ran on so far (features are (L', B, N', D))."""
    return sum(shape[1] for _, shape in runtime.calls)


def reencoded(png: bytes, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_duplicates_in_one_request_run_once(
    settings: Settings,
    runtime: RecordingRuntime,
    artifact: ArtifactFactory,
    mode: str,
) -> None:
    a, b = tiny_images(2)
    # The same pixels as PNG and as lossless WebP: different bytes, one backbone input.
    images = [a, b, a, reencoded(a, "WEBP", lossless=True)]

    async def main() -> dict[str, object]:
        async with running(settings.model_copy(update={"preprocess": mode}), runtime) as svc:
            await svc.registry.register("pets", artifact("pets"))
            return await svc.predict(images, [TaskRef("pets")], 2)

    body = asyncio.run(main())
    assert forwarded_images(runtime) == 2
    results = body["results"]
    assert isinstance(results, list)
    assert answers_close(results[0]["tasks"], results[2]["tasks"], 0.0)
    assert answers_close(results[0]["tasks"], results[3]["tasks"], 0.0)


def test_an_image_and_its_preprocessed_tensor_share_the_cache(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    encoded = tiny_images(2, seed=3)
    dc = runtime.data_config
    pixels = torch.stack([preprocess(Image.open(io.BytesIO(e)), dc) for e in encoded])

    async def main() -> None:
        async with running(settings, runtime) as svc:
            await svc.registry.register("pets", artifact("pets"))
            await svc.predict(encoded, [TaskRef("pets")], 1)
            forwards = forwarded_images(runtime)
            body = await svc.predict_tensor(pixels, [TaskRef("pets")], 1)
            assert body["timing"]["cache_hits"] == 2
            assert forwarded_images(runtime) == forwards

    asyncio.run(main())


def test_an_extreme_aspect_ratio_is_refused_before_any_decoding(
    settings: Settings, runtime: RecordingRuntime, artifact: ArtifactFactory
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 1)).save(buffer, format="PNG")
    strip = buffer.getvalue()
    limited = settings.model_copy(update={"max_image_aspect_ratio": 4.0})
    square_ish = reencoded(tiny_images(1)[0], "PNG")

    async def main() -> None:
        async with running(limited, runtime) as svc:
            await svc.registry.register("pets", artifact("pets"))
            with pytest.raises(ApiError) as err:
                await svc.predict([square_ish, strip], [TaskRef("pets")], 1)
            assert (err.value.code, err.value.status) == ("image_aspect_ratio", 422)
            assert err.value.extra == {"image": 1}
            assert "the limit is 4" in err.value.detail

    asyncio.run(main())
    assert runtime.calls == []


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_training_prepares_an_image_file_exactly_as_the_server_does(
    mode: PreprocessMode, fmt: str, tmp_path: Path
) -> None:
    """A tuner learns from the pixels it will be served: the trainer's input for an image file
    is the server's input for the same bytes, in either mode (a 2 MP JPEG takes the reduced
    DCT scale in ``fast``)."""
    config = PRESETS["vit_small_patch14_dinov2"].data
    photo = Image.fromarray(data.astronaut()).resize((1728, 1152))
    path = tmp_path / f"photo.{fmt.lower()}"
    photo.save(path, format=fmt, quality=90)
    served = prepare_image(
        path.read_bytes(), 0, config, max_bytes=1 << 26, max_pixels=1 << 24, mode=mode
    )
    trained = ImageRef.from_file(path).prepare(config, mode)
    assert torch.equal(served, trained)
