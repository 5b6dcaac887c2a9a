"""Demo tuners at start (``RESTUNE_DEMO=true``): trained on the served backbone, registered one
by one as each is trained.

When the store is empty, :func:`bootstrap_demo` trains :func:`restuning.demo.demo_tasks` in a
worker thread (never on the event loop) from images that ship offline, and registers each
through the registry like any upload as soon as it is trained, so the first one answers while
the others still train. The server is ready meanwhile; :class:`DemoStatus` says how far the
bootstrap is (in ``/readyz``, and in the answer to a request naming a demo task not yet
trained). Features are cached under ``$RESTUNE_HOME/features``, so a second bootstrap skips
the backbone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from restuning.demo import demo_tasks, train_demo_artifacts
from restuning.train.progress import TrainingCancelledError
from server.engine.service import InferenceService
from server.settings import Settings

log = logging.getLogger(__name__)

FEATURE_CACHE_DIR = "features"
"""Sub-directory of the settings' home holding cached training features."""
STOP_TIMEOUT_S = 30.0
"""How long shutdown waits for a cancelled bootstrap to reach its next batch boundary."""

DemoState = Literal["off", "skipped", "training", "done", "failed", "cancelled"]


@dataclass
class DemoStatus:
    """How far the demo bootstrap is. Written by the bootstrap, read by the routes (both on
    the event loop: the training thread hands its results over through the loop)."""

    state: DemoState = "off"
    tasks: tuple[str, ...] = ()
    """Every demo tuner, in training order."""
    registered: list[str] = field(default_factory=list)
    started: float | None = None
    """``time.monotonic()`` when training began."""

    def report(self) -> dict[str, Any]:
        """The ``demo`` field of ``/readyz``."""
        out: dict[str, Any] = {"state": self.state}
        if self.tasks:
            out["tasks"] = list(self.tasks)
            out["registered"] = list(self.registered)
        if self.started is not None and self.state == "training":
            out["elapsed_s"] = round(time.monotonic() - self.started, 1)
        return out

    def pending_hint(self, name: str) -> str | None:
        """What to tell a client naming ``name`` before it exists, if it is a demo tuner
        still being trained; else ``None``."""
        if self.state != "training" or name not in self.tasks or name in self.registered:
            return None
        elapsed = time.monotonic() - (self.started or time.monotonic())
        return (
            f"{name!r} is a demo tuner still being trained ({len(self.registered)} of "
            f"{len(self.tasks)} demo tuners ready after {elapsed:.0f} s); try again shortly, "
            "or watch /readyz"
        )


async def bootstrap_demo(
    service: InferenceService,
    settings: Settings,
    *,
    status: DemoStatus | None = None,
    per_class: int | None = None,
    epochs: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[str]:
    """Train and register the demo tuners if ``settings.demo`` and the store is empty.

    Returns the names registered (empty when skipped). ``status`` follows the progress.
    ``per_class`` / ``epochs`` shrink the run (tests). Raises ``TrainingCancelledError``
    when ``should_stop`` turns true.
    """
    status = status if status is not None else DemoStatus()
    if not settings.demo:
        return []
    existing = await service.store.list()
    if existing:
        status.state = "skipped"
        log.info("demo: the store already holds %d tuners; not adding demo tuners", len(existing))
        return []
    backbone = service.backbone
    if backbone.is_random:
        log.warning("demo: the backbone has random weights; demo tuners will be meaningless")
    cache_dir = settings.home_path / FEATURE_CACHE_DIR
    log.info("demo: training demo tuners on %s (features cached in %s)", backbone.arch, cache_dir)
    status.tasks = tuple(t.name for t in demo_tasks())
    status.state = "training"
    status.started = time.monotonic()
    loop = asyncio.get_running_loop()

    async def register(name: str, data: bytes) -> None:
        info, _ = await service.registry.register(name, data)
        status.registered.append(name)
        log.info(
            "demo: registered %s v%d (%d of %d)",
            name,
            info.version,
            len(status.registered),
            len(status.tasks),
        )

    def on_trained(name: str, data: bytes) -> None:
        # In the training thread: register on the loop and wait, so a failed registration
        # stops the bootstrap here instead of after every task was trained.
        if should_stop is not None and should_stop():
            raise TrainingCancelledError("demo bootstrap cancelled")
        asyncio.run_coroutine_threadsafe(register(name, data), loop).result()

    try:
        await asyncio.to_thread(
            train_demo_artifacts,
            backbone,
            cache_dir,
            lambda message: log.info("demo: %s", message),
            per_class=per_class,
            epochs=epochs,
            should_stop=should_stop,
            on_trained=on_trained,
            preprocess=settings.preprocess,
        )
    except TrainingCancelledError:
        status.state = "cancelled"
        raise
    except BaseException:
        status.state = "failed"
        raise
    status.state = "done"
    log.info(
        "demo: %d tuners ready in %.1f s: %s",
        len(status.registered),
        time.monotonic() - status.started,
        ", ".join(status.registered),
    )
    return list(status.registered)


async def _bootstrap_logged(
    service: InferenceService, settings: Settings, status: DemoStatus, stop: threading.Event
) -> None:
    try:
        await bootstrap_demo(service, settings, status=status, should_stop=stop.is_set)
    except TrainingCancelledError:
        log.info("demo: bootstrap cancelled by shutdown")
    except Exception:  # the server keeps serving without demo tuners
        log.exception("demo: bootstrap failed; serving without demo tuners")


@asynccontextmanager
async def demo_in_background(
    service: InferenceService, settings: Settings, status: DemoStatus | None = None
) -> AsyncIterator[asyncio.Task[None] | None]:
    """Run :func:`bootstrap_demo` beside the server while the context is open.

    Wrap the lifespan's ``yield`` in it: on exit the bootstrap is asked to stop and awaited
    (it stops at its next batch boundary), so shutdown never leaves a thread training.
    """
    if not settings.demo:
        yield None
        return
    stop = threading.Event()
    task = asyncio.create_task(
        _bootstrap_logged(service, settings, status or DemoStatus(), stop), name="demo-bootstrap"
    )
    try:
        yield task
    finally:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("demo: bootstrap did not stop within %.0f s", STOP_TIMEOUT_S)
