"""Demo bootstrap at start: trains and registers the demo tuners into an empty store only, off the
event loop, and stops cleanly when the server shuts down. Tiny random backbone, few images."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from restuning.demo import demo_tasks
from restuning.train.progress import TrainingCancelledError
from server.app import create_app
from server.demo import DemoStatus, bootstrap_demo, demo_in_background
from server.engine.service import InferenceService, TaskRef
from server.metrics import Metrics
from server.settings import Settings
from tests.fixtures.models import tiny_images
from tests.fixtures.training_data import one_torch_thread  # noqa: F401  (pytestmark fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def demo_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "backbone": "vit_test_tiny",
        "backbone_weights": "random:0",
        "store": f"file://{tmp_path / 'store'}",
        "home": str(tmp_path / "home"),
        "demo": True,
        "max_wait_ms": 1,
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[InferenceService]:
    service = InferenceService(settings, Metrics())
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.mark.slow
def test_bootstrap_registers_demo_tuners_once(tmp_path: Path) -> None:
    settings = demo_settings(tmp_path)
    names = [t.name for t in demo_tasks()]

    async def main() -> tuple[list[str], list[str], dict[str, Any], bool]:
        async with running(settings) as service:
            loop_ticks = 0

            async def tick() -> None:
                nonlocal loop_ticks
                while True:
                    loop_ticks += 1
                    await asyncio.sleep(0.01)

            ticker = asyncio.create_task(tick())
            first = await bootstrap_demo(service, settings, per_class=3, epochs=1)
            ticker.cancel()
            second = await bootstrap_demo(service, settings, per_class=3, epochs=1)
            body = await service.predict(tiny_images(2), [TaskRef(n) for n in names], 2)
            # The event loop kept running while the tuners trained in a thread.
            return first, second, body, loop_ticks > 5

    first, second, body, loop_was_free = asyncio.run(main())
    assert first == names
    assert second == []  # the store is no longer empty
    assert loop_was_free
    for result in body["results"]:
        assert set(result["tasks"]) == set(names)
        assert all("error" not in answer for answer in result["tasks"].values())
    assert any((tmp_path / "home" / "features").rglob("chunk-*.safetensors"))


def test_bootstrap_does_nothing_when_off_or_store_not_empty(tmp_path: Path) -> None:
    settings = demo_settings(tmp_path, demo=False)

    async def main() -> list[str]:
        async with running(settings) as service:
            return await bootstrap_demo(service, settings, per_class=2, epochs=1)

    assert asyncio.run(main()) == []
    assert not (tmp_path / "home" / "features").exists()


def test_background_bootstrap_stops_with_the_server(tmp_path: Path) -> None:
    settings = demo_settings(tmp_path)

    async def main() -> tuple[bool, dict[str, Any]]:
        async with running(settings) as service:
            async with demo_in_background(service, settings) as task:
                assert task is not None
                await asyncio.sleep(0)  # started, then shut down at once
            done = task.done()
            return done, await service.store.list()

    done, stored = asyncio.run(main())
    assert done
    assert stored == {}  # cancelled before anything was registered


def test_each_demo_tuner_is_registered_as_soon_as_it_is_trained(tmp_path: Path) -> None:
    """Stopped once the first tuner is registered: that one is in the store and answers; the
    status says how far the bootstrap got."""
    settings = demo_settings(tmp_path)
    status = DemoStatus()
    hints: list[str | None] = []

    def stop_after_first() -> bool:
        if status.registered and not hints:
            hints.extend([status.pending_hint("face"), status.pending_hint("digit")])
        return bool(status.registered)

    async def main() -> dict[str, Any]:
        async with running(settings) as service:
            with pytest.raises(TrainingCancelledError):
                await bootstrap_demo(
                    service,
                    settings,
                    status=status,
                    per_class=2,
                    epochs=1,
                    should_stop=stop_after_first,
                )
            return await service.store.list()

    stored = asyncio.run(main())
    first = demo_tasks()[0].name
    assert set(stored) == {first}
    assert status.registered == [first]
    report = status.report()
    assert (report["state"], report["registered"]) == ("cancelled", [first])
    assert report["tasks"] == [t.name for t in demo_tasks()]
    face_hint, digit_hint = hints
    assert face_hint is not None
    assert "still being trained (1 of 5" in face_hint
    assert digit_hint is None  # already registered: no hint
    assert DemoStatus().pending_hint("face") is None  # no bootstrap running


def test_a_request_for_a_demo_tuner_in_training_says_how_far(tmp_path: Path) -> None:
    """The README's first curl can arrive before the demo tuners exist: the 404 says the
    tuner is still training, and ``/readyz`` (ready all along) reports the progress."""
    app = create_app(demo_settings(tmp_path, demo=False))
    image = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image, format="PNG")
    with TestClient(app) as client:
        status: DemoStatus = app.state.demo
        status.state, status.tasks, status.started = "training", ("digit", "face"), 0.0
        status.registered.append("digit")
        resp = client.post(
            "/v1/predict",
            files=[("image", ("a.png", image.getvalue(), "image/png"))],
            data={"tasks": "face"},
        )
        ready = client.get("/readyz")
    assert (resp.status_code, resp.json()["code"]) == (404, "unknown_task")
    assert "demo tuner still being trained (1 of 2" in resp.json()["detail"]
    assert ready.status_code == 200
    demo = ready.json()["demo"]
    assert (demo["state"], demo["registered"], demo["tasks"]) == (
        "training",
        ["digit"],
        ["digit", "face"],
    )
