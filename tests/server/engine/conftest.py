"""Fixtures of the engine tests: the tiny backbone behind the runtime protocol, a file store
in ``tmp_path``, settings for both, and tuner artifacts trained on that backbone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from restuning.backbone import TorchBackbone
from server.settings import Settings
from tests.fixtures.tuners import make_artifact, make_config
from tests.server.engine.engine_kit import RecordingRuntime

ArtifactFactory = Callable[..., bytes]


@pytest.fixture
def runtime(tiny_backbone: TorchBackbone) -> RecordingRuntime:
    """The session's tiny backbone (vit_test_tiny, random:0) as a recording runtime."""
    return RecordingRuntime(tiny_backbone)


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """A fresh filesystem store polled quickly, so watch events arrive fast."""
    return f"file://{tmp_path / 'tuners'}?poll_interval=0.05"


@pytest.fixture
def settings(store_url: str) -> Settings:
    """Settings of a small server over ``store_url``."""
    return Settings(
        backbone="vit_test_tiny",
        backbone_weights="random:0",
        store=store_url,
        max_batch_images=8,
        max_wait_ms=2.0,
        max_queue_images=64,
        request_timeout_s=30.0,
        feature_cache_bytes=1 << 20,
    )


@pytest.fixture
def artifact(tiny_backbone: TorchBackbone) -> ArtifactFactory:
    """``artifact(name, seed=0, **config)``: artifact bytes of a tuner on the tiny backbone."""

    def build(name: str, seed: int = 0, **config: Any) -> bytes:
        cfg = make_config(name, tiny_backbone, **config)
        return make_artifact(cfg, tiny_backbone.final_norm, seed=seed)

    return build
