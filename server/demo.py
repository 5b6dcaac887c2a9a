"""Demo tuners at start (``RESTUNE_DEMO=true``): trained on the served backbone, then registered.

When the store is empty, :func:`bootstrap_demo` trains :func:`restuning.demo.demo_tasks` in a
worker thread (never on the event loop) from images that ship offline, and registers them
through the registry like any upload. The server is ready meanwhile; the tuners appear when
trained (progress goes to the log). Features are cached under ``$RESTUNE_HOME/features``, so a
second bootstrap skips the backbone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from restuning.demo import train_demo_artifacts
from restuning.train.progress import TrainingCancelledError
from server.engine.service import InferenceService
from server.settings import Settings

log = logging.getLogger(__name__)

FEATURE_CACHE_DIR = "features"
"""Sub-directory of the settings' home holding cached training features."""
STOP_TIMEOUT_S = 30.0
"""How long shutdown waits for a cancelled bootstrap to reach its next batch boundary."""


async def bootstrap_demo(
    service: InferenceService,
    settings: Settings,
    *,
    per_class: int | None = None,
    epochs: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[str]:
    """Train and register the demo tuners if ``settings.demo`` and the store is empty.

    Returns the names registered (empty when skipped). ``per_class`` / ``epochs`` shrink the
    run (tests). Raises ``TrainingCancelledError`` when ``should_stop`` turns true.
    """
    if not settings.demo:
        return []
    existing = await service.store.list()
    if existing:
        log.info("demo: the store already holds %d tuners; not adding demo tuners", len(existing))
        return []
    backbone = service.backbone
    if backbone.is_random:
        log.warning("demo: the backbone has random weights; demo tuners will be meaningless")
    cache_dir = settings.home_path / FEATURE_CACHE_DIR
    log.info("demo: training demo tuners on %s (features cached in %s)", backbone.arch, cache_dir)
    started = time.perf_counter()
    artifacts = await asyncio.to_thread(
        train_demo_artifacts,
        backbone,
        cache_dir,
        lambda message: log.info("demo: %s", message),
        per_class=per_class,
        epochs=epochs,
        should_stop=should_stop,
    )
    registered = []
    for name, data in artifacts:
        if should_stop is not None and should_stop():
            raise TrainingCancelledError("demo bootstrap cancelled")
        info, _ = await service.registry.register(name, data)
        registered.append(name)
        log.info("demo: registered %s v%d", name, info.version)
    log.info(
        "demo: %d tuners ready in %.1f s: %s",
        len(registered),
        time.perf_counter() - started,
        ", ".join(registered),
    )
    return registered


async def _bootstrap_logged(
    service: InferenceService, settings: Settings, stop: threading.Event
) -> None:
    try:
        await bootstrap_demo(service, settings, should_stop=stop.is_set)
    except TrainingCancelledError:
        log.info("demo: bootstrap cancelled by shutdown")
    except Exception:  # the server keeps serving without demo tuners
        log.exception("demo: bootstrap failed; serving without demo tuners")


@asynccontextmanager
async def demo_in_background(
    service: InferenceService, settings: Settings
) -> AsyncIterator[asyncio.Task[None] | None]:
    """Run :func:`bootstrap_demo` beside the server while the context is open.

    Wrap the lifespan's ``yield`` in it: on exit the bootstrap is asked to stop and awaited
    (it stops at its next batch boundary), so shutdown never leaves a thread training.
    """
    if not settings.demo:
        yield None
        return
    stop = threading.Event()
    task = asyncio.create_task(_bootstrap_logged(service, settings, stop), name="demo-bootstrap")
    try:
        yield task
    finally:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("demo: bootstrap did not stop within %.0f s", STOP_TIMEOUT_S)
