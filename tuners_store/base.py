"""The tuner store contract shared by the filesystem and Redis stores.

A store keeps, per tuner name, numbered immutable versions (artifact bytes), which one is
current, and optional canary traffic weights between versions. Uploads are content-addressed:
putting bytes that already are a version of that name makes that version current instead of
adding a new one. Version numbers only grow; a deleted name never reuses its old numbers.
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Literal, Self

from tuners_store.errors import InvalidTraffic, VersionInUse, VersionNotFound

EventKind = Literal["put", "delete", "current", "traffic", "version_delete", "resync", "lost"]
"""``put``: a new version became current; ``current``: an existing version became current
(rollback, or a re-upload of identical bytes); ``delete``: the name is gone;
``version_delete``: one version of the name is gone (``version`` says which); ``traffic``: canary
weights changed; ``resync``: events may have been missed, re-read the whole index; ``lost``: the
store stopped answering, nothing more arrives until the next ``resync`` (what a watcher holds
is now possibly stale)."""

MAX_TRAFFIC_VERSIONS = 16
"""Most versions one canary split may name."""

Validator = Callable[[bytes], object]
"""Called with the artifact bytes before anything is stored; raises to refuse the upload."""


@dataclass(frozen=True)
class VersionInfo:
    """One stored version of a tuner."""

    name: str
    version: int
    sha256: str
    """Hex digest of the artifact bytes."""
    size: int
    """Artifact size in bytes."""
    created_at: str
    """When this version was stored (ISO 8601, UTC)."""

    def to_dict(self) -> dict[str, str | int]:
        """JSON-able form, as kept in the indexes."""
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> VersionInfo:
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=str(d["name"]),
            version=int(d["version"]),  # type: ignore[call-overload]
            sha256=str(d["sha256"]),
            size=int(d["size"]),  # type: ignore[call-overload]
            created_at=str(d["created_at"]),
        )


@dataclass(frozen=True)
class StoredTuner:
    """A version's metadata and its artifact bytes."""

    info: VersionInfo
    data: bytes


@dataclass(frozen=True)
class PutResult:
    """Outcome of :meth:`TunerStore.put`: ``created`` is False when the bytes already existed;
    ``current`` says whether the version is the current one after the put."""

    info: VersionInfo
    created: bool
    current: bool = True


Promote = bool | None
"""What a put does to the current version: ``True`` makes the version current and clears any
canary split; ``False`` only stores it (the first version of a name is current regardless);
``None`` (the default) promotes unless a canary split is set, so an upload never undoes a
rollout in progress without being asked."""


def should_promote(promote: Promote, *, has_current: bool, has_split: bool) -> bool:
    """The decision :data:`Promote` describes, in one place for both stores."""
    if not has_current:
        return True
    if promote is None:
        return not has_split
    return promote


@dataclass(frozen=True)
class StoreEvent:
    """A change seen by :meth:`TunerStore.watch`; ``name``/``version`` are None for ``resync``
    and ``lost``."""

    kind: EventKind
    name: str | None = None
    version: int | None = None


def utc_now() -> str:
    """Timestamp for ``created_at``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def check_traffic(
    name: str, weights: Mapping[int, int], versions: Collection[int]
) -> dict[int, int]:
    """Validate canary weights against a tuner's versions; return them as a plain dict."""
    if not weights:
        raise InvalidTraffic(f"traffic for {name!r} must name at least one version")
    if len(weights) > MAX_TRAFFIC_VERSIONS:
        raise InvalidTraffic(
            f"traffic for {name!r} names {len(weights)} versions; at most {MAX_TRAFFIC_VERSIONS}"
        )
    out: dict[int, int] = {}
    for version, weight in weights.items():
        if not isinstance(version, int) or isinstance(version, bool):
            raise InvalidTraffic(f"traffic version {version!r} is not an integer")
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
            raise InvalidTraffic(f"traffic weight for version {version} must be an integer >= 0")
        if version not in versions:
            raise InvalidTraffic(f"tuner {name!r} has no version {version}")
        out[version] = weight
    if sum(out.values()) <= 0:
        raise InvalidTraffic(f"traffic weights for {name!r} must sum to more than 0")
    return dict(sorted(out.items()))


def without_version(
    name: str,
    version: int,
    *,
    current: int,
    versions: Collection[int],
    traffic: Mapping[int, int],
    force: bool,
) -> tuple[int, dict[int, int]]:
    """(current, traffic) once ``version`` is deleted, or why it may not be (both stores).

    ``traffic`` is the stored split (empty: none). Raises :class:`VersionNotFound` or
    :class:`VersionInUse` (see :meth:`TunerStore.delete_version`).
    """
    if version not in versions:
        raise VersionNotFound(name, version)
    if len(versions) == 1:
        raise VersionInUse(name, version, "is its only version; delete the tuner instead")
    in_split = traffic.get(version, 0) > 0
    if not force and version == current:
        raise VersionInUse(name, version, "is current; promote another first or force")
    if not force and in_split:
        raise VersionInUse(name, version, "takes canary traffic; change the split or force")
    left = {v: w for v, w in traffic.items() if v != version}
    live = [v for v, w in left.items() if w > 0]
    if version == current:
        current = max(live or [v for v in versions if v != version])
    if len(live) == 1:
        # What is left of the split sends everything to one version: that is "current".
        current, left = live[0], {}
    elif not live:
        left = {}
    return current, left


class TunerStore(ABC):
    """Versioned, content-addressed storage of tuner artifacts, with change notification."""

    url: str
    """Where the store lives (for logs and /readyz), without credentials."""

    @abstractmethod
    async def put(
        self,
        name: str,
        data: bytes,
        *,
        validate: Validator | None = None,
        sha256: str | None = None,
        promote: Promote = None,
    ) -> PutResult:
        """Store ``data`` as a version of ``name``; make it current as ``promote`` says.

        ``validate`` runs first; if it raises, nothing is stored. If identical bytes already are
        a version of ``name``, no version is added and ``created`` is False. Promoting makes
        the version current and clears any canary traffic split; the decision and the write
        are one atomic step. ``sha256``: the hex digest of ``data`` when the caller has
        already computed it (it is trusted, not recomputed: a registration hashes once).
        """

    @abstractmethod
    async def get(self, name: str, version: int | None = None) -> StoredTuner:
        """The current (or the given) version of ``name`` with its bytes."""

    @abstractmethod
    async def delete(self, name: str) -> None:
        """Remove ``name`` and all its versions from the index (its numbers are not reused)."""

    @abstractmethod
    async def delete_version(self, name: str, version: int, *, force: bool = False) -> VersionInfo:
        """Remove one version of ``name`` (its number is not reused); return the current one.

        The current version, or one with weight in the canary split, is refused with
        :class:`~tuners_store.errors.VersionInUse` unless ``force``; forced, the version leaves
        the split (a split left with one version, or none with weight, is cleared) and, if
        it was current, the newest remaining version becomes current. The only version of a
        name is always refused (delete the name instead).
        """

    @abstractmethod
    async def list(self) -> dict[str, VersionInfo]:
        """Every name with its current version (each entry self-consistent)."""

    async def snapshot(self) -> dict[str, VersionInfo]:
        """The full index of current versions (what a watcher rebuilds from on ``resync``)."""
        return await self.list()

    @abstractmethod
    async def versions(self, name: str) -> builtins.list[VersionInfo]:
        """All versions of ``name``, oldest first."""

    @abstractmethod
    async def set_current(self, name: str, version: int) -> VersionInfo:
        """Make an existing version current (rollback); clears any canary traffic split."""

    @abstractmethod
    async def get_traffic(self, name: str) -> dict[int, int]:
        """Canary weights by version; ``{current: 100}`` when no split is set."""

    @abstractmethod
    async def set_traffic(self, name: str, weights: Mapping[int, int]) -> dict[int, int]:
        """Split traffic between existing versions by integer weights (>= 0, sum > 0)."""

    @abstractmethod
    def watch(self) -> AsyncGenerator[StoreEvent, None]:
        """Changes made by anyone (this process or others), starting with a ``resync``.

        While the store is unreachable the watcher yields one ``lost`` and keeps reconnecting
        by itself; the first event after the outage is a ``resync``. Close it with ``aclose()``.
        """

    @abstractmethod
    async def ping(self) -> None:
        """Raise :class:`~tuners_store.errors.StoreUnavailable` if the store is unreachable."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
