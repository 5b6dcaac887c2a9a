"""Store fixtures: the same contract tests run against the filesystem store and a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tuners_store import TunerStore, open_store

StoreFactory = Callable[[], TunerStore]


@pytest.fixture(params=["file", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty store of each kind (Redis: a fresh key prefix on the session server)."""
    if request.param == "file":
        return f"file://{tmp_path / 'store'}?poll_interval=0.02"
    redis_url: str = request.getfixturevalue("redis_url")
    return f"{redis_url}?prefix=t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def new_store(store_url: str) -> StoreFactory:
    """Open another client of the same store (its own connections / file handles)."""
    return lambda: open_store(store_url)
