"""Demo bootstrap at start: trains and registers the demo tuners into an empty store only, off the
event loop, and stops cleanly when the server shuts down. Tiny random backbone, few images."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from restuning.demo import demo_tasks
from server.demo import bootstrap_demo, demo_in_background
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
