"""The embedded default store: one directory per tuner name on a local filesystem.

Layout::

    <root>/<name>/index.json            current version, versions, traffic, high-water mark
    <root>/<name>/<version>.safetensors one immutable blob per version
    <root>/<name>/.lock                 flock'd by writers of that name (any process)
    <root>/@<tenant>/<name>/...         the same for ``tenant/name``

Crash safety: every file is written to a temp file in the same directory, fsync'd, renamed
into place and the directory fsync'd. A blob is renamed in before the index names it, and the
index itself is replaced atomically, so readers (which take no lock) see the old or the new
state and never a version whose blob is incomplete. Writers of one name are serialised by
``fcntl.flock``; anything a dead writer left behind is cleaned up by the next one.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import uuid
from collections.abc import AsyncGenerator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tuners_store.base import (
    Promote,
    PutResult,
    StoredTuner,
    StoreEvent,
    TunerStore,
    Validator,
    VersionInfo,
    check_traffic,
    should_promote,
    utc_now,
    without_version,
)
from tuners_store.errors import (
    StoreCorrupt,
    StoreUnavailable,
    TunerNotFound,
    VersionNotFound,
)
from tuners_store.names import split_qualified_name, validate_qualified_name

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
BLOB_SUFFIX = ".safetensors"
TENANT_PREFIX = "@"  # not a legal name character, so tenant dirs never collide with names
INDEX_FORMAT = 1
FULL_RESCAN_EVERY = 20
"""Polls between full re-reads of every index (guards against equal stat signatures)."""


@dataclass
class _Index:
    """One name's ``index.json``."""

    name: str
    high_water: int = 0
    """Highest version ever assigned, kept after delete so numbers are never reused."""
    current: int | None = None
    versions: dict[int, VersionInfo] = field(default_factory=dict)
    traffic: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> bytes:
        doc = {
            "format": INDEX_FORMAT,
            "name": self.name,
            "high_water": self.high_water,
            "current": self.current,
            "versions": [self.versions[v].to_dict() for v in sorted(self.versions)],
            "traffic": {str(v): w for v, w in self.traffic.items()},
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: Path) -> _Index:
        try:
            doc = json.loads(raw)
            versions = [VersionInfo.from_dict(v) for v in doc["versions"]]
            return cls(
                name=str(doc["name"]),
                high_water=int(doc["high_water"]),
                current=None if doc["current"] is None else int(doc["current"]),
                versions={v.version: v for v in versions},
                traffic={int(v): int(w) for v, w in doc["traffic"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreCorrupt(f"unreadable index {where}: {exc}") from None


@dataclass(frozen=True)
class _Seen:
    """What a watcher last knew about one name."""

    signature: tuple[int, int, int]
    digest: bytes
    current: int | None
    versions: frozenset[int]
    traffic: tuple[tuple[int, int], ...]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FilesystemStore(TunerStore):
    """Tuner store in a local directory, safe for many processes on one host.

    Every operation has a blocking ``*_sync`` form; the async API runs it in a worker thread.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, poll_interval: float = 0.5, fsync: bool = True
    ) -> None:
        self.root = Path(root).absolute()
        self.url = f"file://{self.root}"
        self.poll_interval = poll_interval
        self._fsync = fsync
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create store directory {self.root}: {exc}") from exc

    # -- layout -----------------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        tenant, plain = split_qualified_name(name)
        return self.root / f"{TENANT_PREFIX}{tenant}" / plain if tenant else self.root / plain

    def _names_on_disk(self) -> list[str]:
        names: list[str] = []
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            raise StoreUnavailable(f"store directory {self.root} is gone") from None
        for entry in entries:
            if entry.name.startswith(TENANT_PREFIX) and entry.is_dir():
                tenant = entry.name[len(TENANT_PREFIX) :]
                names.extend(f"{tenant}/{sub.name}" for sub in entry.iterdir() if sub.is_dir())
            elif not entry.name.startswith(".") and entry.is_dir():
                names.append(entry.name)
        return sorted(names)

    def _ensure_dir(self, path: Path) -> None:
        if path.is_dir():
            return
        path.mkdir(parents=True, exist_ok=True)
        if self._fsync:
            # Make the new directory entries durable before anything inside them is.
            _fsync_dir(path.parent)
            if path.parent != self.root:
                _fsync_dir(self.root)

    # -- files ------------------------------------------------------------------------------

    def _atomic_write(self, directory: Path, filename: str, data: bytes) -> None:
        tmp = directory / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / filename)
        if self._fsync:
            _fsync_dir(directory)

    def _read_index(self, directory: Path) -> _Index | None:
        path = directory / INDEX_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        return _Index.from_json(raw, path)

    def _write_index(self, directory: Path, index: _Index) -> None:
        self._atomic_write(directory, INDEX_FILE, index.to_json())

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[tuple[Path, _Index]]:
        """Hold ``name``'s writer lock; yield its directory and index (new if none)."""
        directory = self._dir(name)
        try:
            self._ensure_dir(directory)
            fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreUnavailable(f"cannot write to {directory}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            index = self._read_index(directory) or _Index(name=name)
            self._sweep(directory, index)
            yield directory, index
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
                raise StoreUnavailable(f"cannot write to {directory}: {exc}") from exc
            raise
        finally:
            os.close(fd)  # closing releases the flock

    def _sweep(self, directory: Path, index: _Index) -> None:
        """Remove what dead writers left: temp files and blobs the index does not name.

        Safe because temp files and new blobs are only created while holding the lock.
        """
        for entry in os.scandir(directory):
            if entry.name.startswith(TMP_PREFIX):
                os.unlink(entry.path)
            elif entry.name.endswith(BLOB_SUFFIX):
                stem = entry.name[: -len(BLOB_SUFFIX)]
                if not stem.isdigit() or int(stem) not in index.versions:
                    os.unlink(entry.path)

    def _blob_path(self, name: str, version: int) -> Path:
        return self._dir(name) / f"{version}{BLOB_SUFFIX}"

    def _index_or_raise(self, name: str) -> _Index:
        index = self._read_index(self._dir(name))
        if index is None or index.current is None:
            raise TunerNotFound(name)
        return index

    # -- blocking API -----------------------------------------------------------------------

    def put_sync(
        self,
        name: str,
        data: bytes,
        *,
        validate: Validator | None = None,
        sha256: str | None = None,
        promote: Promote = None,
    ) -> PutResult:
        """Blocking :meth:`put`."""
        validate_qualified_name(name)
        if validate is not None:
            validate(data)
        digest = sha256 if sha256 is not None else _sha256(data)
        with self._locked(name) as (directory, index):
            promoting = should_promote(
                promote, has_current=index.current is not None, has_split=bool(index.traffic)
            )
            for info in index.versions.values():
                if info.sha256 == digest:
                    if promoting and (index.current != info.version or index.traffic):
                        index.current, index.traffic = info.version, {}
                        self._write_index(directory, index)
                    return PutResult(info, False, index.current == info.version)
            version = index.high_water + 1
            self._atomic_write(directory, f"{version}{BLOB_SUFFIX}", data)
            info = VersionInfo(name, version, digest, len(data), utc_now())
            index.versions[version] = info
            index.high_water = version
            if promoting:
                index.current, index.traffic = version, {}
            self._write_index(directory, index)
            return PutResult(info, True, promoting)

    def get_sync(self, name: str, version: int | None = None) -> StoredTuner:
        """Blocking :meth:`get`; verifies the bytes against the recorded sha256."""
        validate_qualified_name(name)
        index = self._index_or_raise(name)
        wanted = index.current if version is None else version
        assert wanted is not None  # _index_or_raise guarantees a current version
        info = index.versions.get(wanted)
        if info is None:
            raise VersionNotFound(name, wanted)
        try:
            data = self._blob_path(name, wanted).read_bytes()
        except FileNotFoundError:
            # Deleted between reading the index and the blob.
            if wanted not in self._index_or_raise(name).versions:
                raise VersionNotFound(name, wanted) from None
            raise StoreCorrupt(f"blob of {name!r} version {wanted} is missing") from None
        if _sha256(data) != info.sha256:
            raise StoreCorrupt(f"blob of {name!r} version {wanted} does not match its sha256")
        return StoredTuner(info, data)

    def delete_sync(self, name: str) -> None:
        """Blocking :meth:`delete`: the index forgets the versions, then the blobs go."""
        validate_qualified_name(name)
        if self._read_index(self._dir(name)) is None:
            raise TunerNotFound(name)
        with self._locked(name) as (directory, index):
            if index.current is None:
                raise TunerNotFound(name)
            doomed = list(index.versions)
            index.current, index.versions, index.traffic = None, {}, {}
            self._write_index(directory, index)
            for version in doomed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(directory / f"{version}{BLOB_SUFFIX}")

    def delete_version_sync(self, name: str, version: int, *, force: bool = False) -> VersionInfo:
        """Blocking :meth:`delete_version`: the index forgets the version, then its blob goes."""
        validate_qualified_name(name)
        self._index_or_raise(name)
        with self._locked(name) as (directory, index):
            if index.current is None:
                raise TunerNotFound(name)
            index.current, index.traffic = without_version(
                name,
                version,
                current=index.current,
                versions=index.versions,
                traffic=index.traffic,
                force=force,
            )
            del index.versions[version]
            self._write_index(directory, index)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / f"{version}{BLOB_SUFFIX}")
            return index.versions[index.current]

    def list_sync(self) -> dict[str, VersionInfo]:
        """Blocking :meth:`list`."""
        out: dict[str, VersionInfo] = {}
        for name in self._names_on_disk():
            index = self._read_index(self._dir(name))
            if index is not None and index.current is not None:
                out[name] = index.versions[index.current]
        return out

    def versions_sync(self, name: str) -> builtins.list[VersionInfo]:
        """Blocking :meth:`versions`."""
        validate_qualified_name(name)
        index = self._index_or_raise(name)
        return [index.versions[v] for v in sorted(index.versions)]

    def set_current_sync(self, name: str, version: int) -> VersionInfo:
        """Blocking :meth:`set_current`."""
        validate_qualified_name(name)
        self._index_or_raise(name)
        with self._locked(name) as (directory, index):
            if index.current is None:
                raise TunerNotFound(name)
            if version not in index.versions:
                raise VersionNotFound(name, version)
            if index.current != version or index.traffic:
                index.current, index.traffic = version, {}
                self._write_index(directory, index)
            return index.versions[version]

    def get_traffic_sync(self, name: str) -> dict[int, int]:
        """Blocking :meth:`get_traffic`."""
        validate_qualified_name(name)
        index = self._index_or_raise(name)
        assert index.current is not None
        return dict(index.traffic) if index.traffic else {index.current: 100}

    def set_traffic_sync(self, name: str, weights: Mapping[int, int]) -> dict[int, int]:
        """Blocking :meth:`set_traffic`."""
        validate_qualified_name(name)
        self._index_or_raise(name)
        with self._locked(name) as (directory, index):
            if index.current is None:
                raise TunerNotFound(name)
            index.traffic = check_traffic(name, weights, index.versions)
            self._write_index(directory, index)
            return dict(index.traffic)

    # -- async API --------------------------------------------------------------------------

    async def put(
        self,
        name: str,
        data: bytes,
        *,
        validate: Validator | None = None,
        sha256: str | None = None,
        promote: Promote = None,
    ) -> PutResult:
        return await asyncio.to_thread(
            self.put_sync, name, data, validate=validate, sha256=sha256, promote=promote
        )

    async def get(self, name: str, version: int | None = None) -> StoredTuner:
        return await asyncio.to_thread(self.get_sync, name, version)

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(self.delete_sync, name)

    async def delete_version(self, name: str, version: int, *, force: bool = False) -> VersionInfo:
        return await asyncio.to_thread(self.delete_version_sync, name, version, force=force)

    async def list(self) -> dict[str, VersionInfo]:
        return await asyncio.to_thread(self.list_sync)

    async def versions(self, name: str) -> builtins.list[VersionInfo]:
        return await asyncio.to_thread(self.versions_sync, name)

    async def set_current(self, name: str, version: int) -> VersionInfo:
        return await asyncio.to_thread(self.set_current_sync, name, version)

    async def get_traffic(self, name: str) -> dict[int, int]:
        return await asyncio.to_thread(self.get_traffic_sync, name)

    async def set_traffic(self, name: str, weights: Mapping[int, int]) -> dict[int, int]:
        return await asyncio.to_thread(self.set_traffic_sync, name, weights)

    async def ping(self) -> None:
        ok = await asyncio.to_thread(os.access, self.root, os.W_OK | os.X_OK)
        if not ok:
            raise StoreUnavailable(f"store directory {self.root} is not writable")

    async def close(self) -> None:
        return None

    # -- watching ---------------------------------------------------------------------------

    def _poll(
        self, seen: dict[str, _Seen], full: bool
    ) -> tuple[dict[str, _Seen], builtins.list[StoreEvent]]:
        """Re-read the indexes whose stat changed (all if ``full``); diff against ``seen``."""
        now: dict[str, _Seen] = {}
        events: builtins.list[StoreEvent] = []
        for name in self._names_on_disk():
            path = self._dir(name) / INDEX_FILE
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
            before = seen.get(name)
            if before is not None and before.signature == signature and not full:
                now[name] = before
                continue
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue
            digest = hashlib.blake2b(raw, digest_size=16).digest()
            if before is not None and before.digest == digest:
                now[name] = _Seen(
                    signature, digest, before.current, before.versions, before.traffic
                )
                continue
            index = _Index.from_json(raw, path)
            after = _Seen(
                signature,
                digest,
                index.current,
                frozenset(index.versions),
                tuple(sorted(index.traffic.items())),
            )
            now[name] = after
            events.extend(_diff(name, before, after))
        for name, before in seen.items():
            if name not in now and before.current is not None:
                events.append(StoreEvent("delete", name))
        return now, events

    async def watch(self) -> AsyncGenerator[StoreEvent, None]:
        """Poll every index file each ``poll_interval`` seconds; changes by any process show.

        A failed poll (the directory unreadable, a mount gone) yields ``lost`` once; the first
        good poll after it yields ``resync`` rather than a diff, so a watcher also marks the
        store healthy again.
        """
        seen: dict[str, _Seen] = {}
        polls = 0
        failing = False
        while True:
            try:
                seen, events = await asyncio.to_thread(
                    self._poll, seen, polls % FULL_RESCAN_EVERY == 0
                )
            except (OSError, StoreCorrupt, StoreUnavailable) as exc:
                # Keep watching: the next successful poll diffs against the last good view.
                log.warning("tuner store watch: poll of %s failed: %s", self.root, exc)
                if not failing and polls > 0:
                    yield StoreEvent("lost")
                failing = True
                events = []
            else:
                if failing and polls > 0:
                    failing = False
                    yield StoreEvent("resync")
                    events = []
            if polls == 0:
                yield StoreEvent("resync")
            else:
                for event in events:
                    yield event
            polls += 1
            await asyncio.sleep(self.poll_interval)


def _diff(name: str, before: _Seen | None, after: _Seen) -> list[StoreEvent]:
    was = before.current if before is not None else None
    events: list[StoreEvent] = []
    if after.current is None:
        if was is not None:
            events.append(StoreEvent("delete", name))
        return events
    if after.current != was:
        known = before is not None and after.current in before.versions
        events.append(StoreEvent("current" if known else "put", name, after.current))
    if before is not None:
        events.extend(
            StoreEvent("version_delete", name, v) for v in sorted(before.versions - after.versions)
        )
    if before is not None and after.traffic != before.traffic:
        events.append(StoreEvent("traffic", name))
    return events
