"""Test doubles that wrap real parts of the engine, and answer comparison, for engine tests."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import torch

from restuning.artifact_io import load_task
from restuning.backbone import TorchBackbone
from restuning.features import Features, FeatureSpec
from restuning.preprocess import preprocess
from server.engine.decode import input_digest
from server.engine.engine import BatchItem, BatchOutput
from server.engine.loaded_tuner import LoadedTuner, module_nbytes
from server.engine.registry import TunerRegistry
from server.engine.runtime import Backbone, TorchRuntime
from server.metrics import Metrics
from server.settings import Settings
from tests.fixtures.models import tiny_image
from tuners_store import StoredTuner, TunerStore, open_store
from tuners_store.filesystem import FilesystemStore


class RecordingRuntime(TorchRuntime):
    """The real torch runtime, remembering what each forward was asked for and returned."""

    def __init__(self, backbone: TorchBackbone) -> None:
        super().__init__(backbone)
        self.calls: list[tuple[FeatureSpec, tuple[int, ...]]] = []

    def forward_features(self, images: torch.Tensor, spec: FeatureSpec) -> Features:
        features = super().forward_features(images, spec)
        self.calls.append((spec, tuple(features.data.shape)))
        return features


class Gate:
    """Holds the engine worker inside a batch until released: makes "the worker is busy"
    a fact instead of a race. Wraps the real ``run_batch``; records every batch's size."""

    def __init__(self, run_batch: Callable[[list[BatchItem]], BatchOutput]) -> None:
        self.run_batch = run_batch
        self.open = threading.Event()
        self.entered = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, items: list[BatchItem]) -> BatchOutput:
        self.sizes.append(len(items))
        self.entered.set()
        self.open.wait(timeout=30)
        return self.run_batch(items)


def answers_close(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-5) -> bool:
    """Two answers of one task agree: same keys/labels, numbers within ``tol``."""
    return _close(a, b, tol)


def _close(x: Any, y: Any, tol: float) -> bool:
    if isinstance(x, float) and isinstance(y, float):
        return abs(x - y) <= tol
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k], tol) for k in x)
    if isinstance(x, Sequence) and isinstance(y, Sequence) and not isinstance(x, str):
        return len(x) == len(y) and all(_close(p, q, tol) for p, q in zip(x, y, strict=True))
    return bool(x == y)


def loaded_tuner(backbone: TorchBackbone, data: bytes, version: int = 1) -> LoadedTuner:
    """A :class:`LoadedTuner` built from artifact bytes the way the registry builds one."""
    module = load_task(data, backbone.final_norm, expect_fingerprint=backbone.fingerprint)
    return LoadedTuner(
        name=module.config.name,
        version=version,
        sha256=hashlib.sha256(data).hexdigest(),
        config=module.config,
        module=module,
        nbytes=module_nbytes(module),
    )


def pixels_of(index: int, backbone: TorchBackbone, seed: int = 0) -> tuple[torch.Tensor, str]:
    """(pixels (3, H, W), digest) of test photo ``index``, as the service prepares them."""
    pixels = preprocess(tiny_image(index, seed), backbone.data_config)  # (3, H, W)
    return pixels, input_digest(pixels)


class GatedFilesystemStore(FilesystemStore):
    """The real filesystem store whose ``get`` pauses after reading, until released: puts a
    load deterministically "in flight" so a test can race it against a delete."""

    def __init__(self, root: str) -> None:
        super().__init__(root, poll_interval=0.05, fsync=False)
        self.read_done = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def get(self, name: str, version: int | None = None) -> StoredTuner:
        stored = await super().get(name, version)
        self.read_done.set()
        await self.release.wait()
        return stored


@contextlib.asynccontextmanager
async def open_registry(
    settings: Settings,
    backbone: Backbone,
    store: TunerStore | None = None,
    *,
    start: bool = True,
    metrics: Metrics | None = None,
) -> AsyncIterator[TunerRegistry]:
    """A registry over ``store`` (default: the settings' store URL), started and stopped."""
    own = store if store is not None else open_store(settings.store)
    registry = TunerRegistry(own, backbone, settings, metrics or Metrics())
    if start:
        await registry.start()
    try:
        yield registry
    finally:
        await registry.stop()
        await own.close()


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float = 15.0) -> None:
    """Wait until ``check()`` is true (polling); fail after ``within_s`` (a bound, not a timing
    assertion: the watch delivers in well under a second)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within_s}s")
        await asyncio.sleep(0.02)
