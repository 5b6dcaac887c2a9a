"""Filesystem store across processes: concurrent writers, SIGKILLed writers, watchers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.tuners_store.artifact_factory import make_artifact
from tuners_store import StoreEvent, StoreUnavailable, TunerNotFound, open_store
from tuners_store.filesystem import BLOB_SUFFIX, INDEX_FILE, TMP_PREFIX, FilesystemStore

# fork: the children inherit the imported modules, so each starts in milliseconds.
FORK = multiprocessing.get_context("fork")


def _put_one(root: str, name: str, seed: int) -> None:
    FilesystemStore(root).put_sync(name, make_artifact(seed=seed))


def _write_forever(root: str, name: str, size: int, started: Any) -> None:
    store = FilesystemStore(root)
    rng = random.Random(os.getpid())
    started.set()
    while True:
        # Distinct bytes every time so each put creates a version (large enough that a kill
        # often lands inside a write).
        store.put_sync(name, rng.randbytes(size))


def test_eight_processes_write_distinct_versions(tmp_path: Path) -> None:
    root = str(tmp_path)
    procs = [FORK.Process(target=_put_one, args=(root, "cats", 100 + i)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    store = FilesystemStore(root)
    versions = store.versions_sync("cats")
    assert [v.version for v in versions] == list(range(1, 9))
    expected = {hashlib.sha256(make_artifact(seed=100 + i)).hexdigest() for i in range(8)}
    assert {v.sha256 for v in versions} == expected
    for v in versions:
        assert hashlib.sha256(store.get_sync("cats", v.version).data).hexdigest() == v.sha256


def _check_consistent(store: FilesystemStore, name: str, history: dict[int, str]) -> None:
    """Everything the index names is readable and intact; no number ever changes meaning."""
    try:
        versions = store.versions_sync(name)
    except TunerNotFound:
        assert not history, "a name with stored versions vanished"
        return
    numbers = [v.version for v in versions]
    assert numbers == sorted(set(numbers))
    current = store.get_sync(name)  # verifies sha256 against the index
    assert current.info.version in numbers
    for v in versions:
        blob = (store.root / name / f"{v.version}{BLOB_SUFFIX}").read_bytes()
        assert hashlib.sha256(blob).hexdigest() == v.sha256
        assert len(blob) == v.size
        assert history.setdefault(v.version, v.sha256) == v.sha256
    assert set(history) <= set(numbers), "a version disappeared"


def test_sigkilled_writer_never_leaves_torn_state(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    name = "cats"
    rng = random.Random(1234)
    history: dict[int, str] = {}
    leftovers = 0
    for _ in range(60):
        started = FORK.Event()
        writer = FORK.Process(target=_write_forever, args=(str(tmp_path), name, 64 * 1024, started))
        writer.start()
        # The kill window starts when the writer runs, not when it was forked: on a loaded
        # machine a fork can wait longer than the whole window before its first instruction.
        assert started.wait(60)
        deadline = time.monotonic() + rng.uniform(0.0, 0.03)
        while time.monotonic() < deadline:
            # Lock-free readers racing the writer must never see a torn version either.
            with contextlib.suppress(TunerNotFound):
                store.get_sync(name)  # verifies the bytes against the index's sha256
        os.kill(writer.pid, signal.SIGKILL)  # type: ignore[arg-type]
        writer.join()
        assert writer.exitcode == -signal.SIGKILL
        directory = tmp_path / name
        if directory.exists():
            index = (
                json.loads((directory / INDEX_FILE).read_bytes())
                if (directory / INDEX_FILE).exists()
                else {"versions": []}
            )
            named = {f"{v['version']}{BLOB_SUFFIX}" for v in index["versions"]}
            leftovers += any(
                p.name.startswith(TMP_PREFIX) or (p.suffix == BLOB_SUFFIX and p.name not in named)
                for p in directory.iterdir()
            )
        _check_consistent(store, name, history)
    # The kills did land inside writes (temp files or unindexed blobs were left behind) ...
    assert leftovers > 0, leftovers
    assert len(history) > 0
    # ... and the next writer sweeps them away and carries on numbering.
    top = max(history)
    result = store.put_sync(name, b"after the crashes")
    assert result.info.version == top + 1
    assert not [p for p in (tmp_path / name).iterdir() if p.name.startswith(TMP_PREFIX)]
    _check_consistent(store, name, history)


def _mutate(root: str) -> None:
    store = FilesystemStore(root)
    store.put_sync("cats", make_artifact(seed=1))
    store.put_sync("acme/dogs", make_artifact(seed=2))


def test_watch_sees_other_processes(tmp_path: Path) -> None:
    async def main() -> None:
        store = open_store(f"file://{tmp_path}?poll_interval=0.02")
        events = store.watch()
        assert await asyncio.wait_for(anext(events), 10) == StoreEvent("resync")
        child = FORK.Process(target=_mutate, args=(str(tmp_path),))
        child.start()
        await asyncio.to_thread(child.join, 30)
        assert child.exitcode == 0
        seen: set[StoreEvent] = set()
        while len(seen) < 2:
            seen.add(await asyncio.wait_for(anext(events), 10))
        assert seen == {StoreEvent("put", "cats", 1), StoreEvent("put", "acme/dogs", 1)}
        # A name removed behind the store's back (rm -r) is reported as deleted.
        for p in (tmp_path / "cats").iterdir():
            p.unlink()
        (tmp_path / "cats").rmdir()
        assert await asyncio.wait_for(anext(events), 10) == StoreEvent("delete", "cats")
        await events.aclose()  # type: ignore[attr-defined]

    asyncio.run(main())


@pytest.mark.parametrize(
    ("url", "expected"),
    [("file:///tmp/restune-x", "/tmp/restune-x"), ("file://./rel/store", "rel/store")],
)
def test_open_store_file_urls(
    url: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store(url)
    assert isinstance(store, FilesystemStore)
    assert store.root == Path(expected).absolute()


@pytest.mark.parametrize(
    "url", ["file://host/x", "ftp://x", "file:///x?poll_interval=0", "file:///x?bogus=1"]
)
def test_open_store_refuses_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        open_store(url)


def test_missing_root_is_unavailable(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "store")
    (tmp_path / "store").rmdir()

    async def main() -> None:
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.list()

    asyncio.run(main())
