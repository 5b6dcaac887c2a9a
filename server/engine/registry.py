"""Which tuners exist, which versions serve, and which are loaded in memory.

The registry mirrors the store's index (current version and canary traffic per name) by
consuming ``store.watch()`` in a background task, so a tuner registered on another replica
serves here without a restart. Loaded versions are immutable :class:`LoadedTuner` snapshots
in an LRU bounded by ``tuner_memory_bytes`` (pinned names are never evicted).

Consistency rules:

- A new current version is loaded off the request path first, then swapped in with one
  assignment; requests in between keep getting the old version.
- Loads of one name are serialised by a per-name ``asyncio.Lock`` and re-check the loaded
  set after taking it (two requests never build the same version twice).
- Every delete bumps the name's generation; a load that started before it sees the change
  when it finishes and discards its result, so a delete is never undone by a racing load.
- If the store is unreachable, what is loaded keeps serving; registration answers 503, and so
  does a request that needs the store (a version not loaded, a name not in the index, or no
  index read yet): ``store_unavailable`` with Retry-After, for the whole request, so a proxy or
  client retries on another replica. A task is never reported unknown because the store could
  not be asked.
- The watch reconnects within ``reconnect_max_s`` (0.25 s) of the store's return and resyncs
  the whole index then.
- Concurrent uploads of identical bytes to one name share one registration (one validation,
  one load); all but the first answer "unchanged".
- Unloading a version (delete, eviction, a newer version swapped in) takes it out of the
  loaded set at once, then waits (bounded by ``unload_drain_s``) for the requests leasing it
  (:mod:`server.engine.leases`) before telling listeners (the engine's group cache) to let go
  of it; past the bound it reports and lets go anyway.
- Canary weights are mirrored per name; the versions of a split are loaded before the split
  takes effect, and a split giving one version all the weight is a rollback: that version
  becomes current.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from restuning.tuners import TaskModule
from server.engine.admission import admit
from server.engine.leases import Leases, LeaseSet
from server.engine.loaded_tuner import LoadedTuner, module_nbytes
from server.engine.runtime import Backbone
from server.errors import ApiError
from server.metrics import Location, Metrics, TunerState
from server.settings import Settings
from tuners_store import (
    InvalidName,
    InvalidTraffic,
    StoreError,
    StoreEvent,
    StoreUnavailable,
    TunerNotFound,
    TunerStore,
    VersionInfo,
    VersionNotFound,
)
from tuners_store.artifact import ArtifactError, read_header
from tuners_store.base import Promote, check_traffic
from tuners_store.config import TunerConfig, parameter_count
from tuners_store.names import split_qualified_name, validate_qualified_name

log = logging.getLogger(__name__)

STORE_RETRY_AFTER_S = 5.0
"""Retry-After sent with ``store_unavailable`` for writes."""
SERVE_RETRY_AFTER_S = 1.0
"""Retry-After of a request that needs the store while it is down: another replica may have
the tuner loaded, and this one catches up within a second of the store's return."""
WATCH_BACKOFF_S = (0.05, 0.5)
"""First and longest wait before re-subscribing to a watch that failed or whose resync did."""

VersionKey = tuple[str, int]
HASH_IN_THREAD_BYTES = 1024 * 1024
"""Uploads at least this large are hashed off the event loop."""
UnloadListener = Callable[[LoadedTuner], None]
"""Told when an unloaded version is no longer used by any request (or the drain gave up)."""
SwapListener = Callable[[str, LoadedTuner | None], None]
"""Told on the event loop when a name's served version changes: the new version as loaded
here, or ``None`` when it is not loaded here. Must be quick (it only queues work)."""


@dataclass(frozen=True)
class Usage:
    """What a set of names holds in the store."""

    tuners: int
    bytes: int
    """Artifact bytes over every stored version (0 when not asked for)."""


@dataclass(frozen=True)
class TunerSummary:
    """One row of ``GET /v1/tuners``."""

    info: VersionInfo
    config: TunerConfig | None
    """``None`` when the artifact could not be read (store unreachable, never loaded here)."""
    loaded: bool

    def to_dict(self) -> dict[str, Any]:
        """The JSON row."""
        c = self.config
        return {
            "name": self.info.name,
            "version": self.info.version,
            "sha256": self.info.sha256,
            "kind": c.task if c else None,
            "labels": list(c.labels) if c else None,
            "params": parameter_count(c) if c else None,
            "bytes": self.info.size,
            "loaded": self.loaded,
            "pooling": c.pooling if c else None,
            "tuner": c.bypass.tuner if c else None,
            "created_at": self.info.created_at,
            "description": c.description if c else None,
            "training": c.training.model_dump(mode="json") if c else None,
        }


@dataclass(frozen=True)
class TunerDetail:
    """``GET /v1/tuners/{name}``: the summary plus config, versions and traffic."""

    summary: TunerSummary
    versions: list[VersionInfo]
    loaded_versions: frozenset[int]
    traffic: dict[int, int]
    answers: dict[int, int] = field(default_factory=dict)
    """Per-image answers each version gave on this replica since it started."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON body."""
        body = self.summary.to_dict()
        body["config"] = (
            self.summary.config.model_dump(mode="json") if self.summary.config else None
        )
        body["versions"] = [
            {
                **v.to_dict(),
                "loaded": v.version in self.loaded_versions,
                "answers": self.answers.get(v.version, 0),
            }
            for v in self.versions
        ]
        body["traffic"] = {str(k): w for k, w in self.traffic.items()}
        return body


def pick_version(name: str, weights: dict[int, int], digest: str) -> int:
    """The version an image gets under a canary split: deterministic in (name, digest).

    The same image always sees the same version of a task (until the weights change), and
    different tasks split independently.
    """
    total = sum(weights.values())
    point = int.from_bytes(hashlib.sha256(f"{name}\0{digest}".encode()).digest()[:8]) % total
    for version, weight in sorted(weights.items()):
        if point < weight:
            return version
        point -= weight
    raise AssertionError("unreachable: weights sum to total")


class TunerRegistry:
    """Names -> versions -> loaded task modules, kept in step with the store."""

    def __init__(
        self,
        store: TunerStore,
        backbone: Backbone,
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        tuner_device: torch.device | str = "cpu",
    ) -> None:
        self.store = store
        self.backbone = backbone
        self.settings = settings
        self.metrics = metrics
        self.tuner_device = torch.device(tuner_device)
        self.memory_budget = settings.tuner_memory_bytes
        self.pinned = frozenset(settings.pinned_tuners)
        self._index: dict[str, VersionInfo] = {}
        """Current version per name, as served (swapped only once the version is loaded)."""
        self._traffic: dict[str, dict[int, int]] = {}
        """Canary weights per name, only where more than one version gets traffic."""
        self._loaded: OrderedDict[VersionKey, LoadedTuner] = OrderedDict()
        self._loaded_bytes = 0
        self._configs: dict[str, tuple[str, TunerConfig]] = {}
        """Config of each name's current artifact, by sha256 (listing without reloading)."""
        self._unloadable: dict[VersionKey, tuple[str, str, str]] = {}
        """Versions whose stored bytes failed admission here: (sha256, code, message). Kept as
        plain values: an exception object would hold the frames (and bytes) that raised it."""
        self._config_errors: dict[str, tuple[str, str, str]] = {}
        """Why the config of a name's artifact (by sha256) cannot be read here: stored bytes
        that fail validation on this server (written behind admission)."""
        self._locks: dict[str, asyncio.Lock] = {}
        self._generation: dict[str, int] = {}
        """Bumped when a name is deleted: loads started before see it and give up."""
        self._traffic_reads: dict[str, int] = {}
        """Reads of each name's traffic started: only the latest one applies."""
        self._change: dict[str, int] = {}
        """Bumped on every index change of a name: only the latest refresh may swap."""
        self._watch_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._store_ok: bool
        self.index_synced = False
        """Whether the index was ever read from the store: until then this replica cannot tell
        a registered name from an unknown one, so it is not ready."""
        self.store_ok = True
        self.leases = Leases()
        """Requests using each loaded version (unloading waits for them)."""
        self._retiring: dict[LoadedTuner, asyncio.Task[bool]] = {}
        self._unload_listeners: list[UnloadListener] = []
        self._swap_listeners: list[SwapListener] = []
        self._registering: dict[
            tuple[str, str, Promote], asyncio.Future[tuple[VersionInfo, bool]]
        ] = {}
        """In-flight registrations by (name, sha256, promote): identical concurrent uploads
        join one."""
        self._answers: dict[VersionKey, int] = {}

    # ------------------------------------------------------------------ lifecycle

    @property
    def store_ok(self) -> bool:
        """Whether the store answered last time it was used (watch, operation, readiness
        ping); exported as ``restune_tuner_store_up``."""
        return self._store_ok

    @store_ok.setter
    def store_ok(self, ok: bool) -> None:
        self._store_ok = ok
        if self.metrics is not None:
            self.metrics.tuner_store_up.set(1 if ok else 0)

    async def start(self) -> None:
        """Read the index, preload pinned tuners, and start following the store's changes.

        A store that does not answer does not stop the start: the watch keeps reconnecting and
        reads the index (then preloads) once it can; requests get ``store_unavailable`` until
        then.
        """
        try:
            await self._resync()
        except StoreError as exc:
            self.store_ok = False
            log.warning(
                "tuner store %s unreachable at start (%s); serving nothing yet", self.store.url, exc
            )
        else:
            await self._preload_pinned()
        self._watch_task = asyncio.create_task(self._watch_loop(), name="restune-registry-watch")

    async def _preload_pinned(self) -> None:
        for name in sorted(self.pinned & self._index.keys()):
            with contextlib.suppress(ApiError):
                await self.resolve(name)

    async def stop(self) -> None:
        """Stop following the store and finish nothing in the background."""
        self._closed = True
        tasks = [
            *self._background,
            *self._retiring.values(),
            *([self._watch_task] if self._watch_task else []),
        ]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ------------------------------------------------------------------ serving

    def known(self, name: str) -> bool:
        """Whether ``name`` is in the mirrored index."""
        return name in self._index

    def current(self, name: str) -> VersionInfo | None:
        """The version requests for plain ``name`` get (``None`` if unknown here)."""
        return self._index.get(name)

    def has_split(self, name: str) -> bool:
        """Whether plain ``name`` is split between versions (the version depends on the image)."""
        return name in self._traffic

    async def resolve(
        self,
        name: str,
        version: int | None = None,
        image_digest: str | None = None,
        lease: LeaseSet | None = None,
    ) -> LoadedTuner:
        """The loaded tuner a request for ``name`` (``@version``) gets, loading it if needed.

        ``lease``: the request's leases; the tuner is leased before this returns, so an unload
        that starts afterwards waits for the request. Raises ``unknown_task`` /
        ``unknown_version`` (404) or ``tuner_load_failed``.
        """
        info = self._index.get(name)
        if info is None:
            info = await self._discover(name)
        if version is None:
            version = info.version
            weights = self._traffic.get(name)
            if weights and image_digest is not None:
                version = pick_version(name, weights, image_digest)
        key = (name, version)
        found = self._loaded.get(key)
        if found is not None and version == info.version and found.sha256 != info.sha256:
            # The store records other bytes under this number (it was replaced): the old
            # weights must never answer.
            self._unload(key)
            found = None
        if found is None:
            found = await self._load(name, version)
        else:
            self._loaded.move_to_end(key)
        return found if lease is None else lease.add(found)

    async def _discover(self, name: str) -> VersionInfo:
        """A name missing from the index: ask the store once (its event may still be coming).

        If the store cannot answer, whether the name exists is unknown here (no index read
        yet, or one that may be stale): ``store_unavailable``, never ``unknown_task``.
        """
        try:
            # versions() answers cheaply for the common case, a name that does not exist;
            # only a name that does is worth reading the whole index for its current version.
            info = (await self.store.list()).get(name) if await self.store.versions(name) else None
        except (TunerNotFound, InvalidName, VersionNotFound):
            info = None
        except StoreUnavailable as exc:
            raise self._unavailable_for_serving(exc, name) from exc
        except StoreError as exc:
            log.info("store lookup of unknown task %r failed: %s", name, exc)
            info = None
        if info is None or self._closed:
            raise ApiError("unknown_task", f"no task named {name!r} is registered", task=name)
        if name not in self._index:
            self._set_current(name, info)
        return self._index[name]

    async def _load(
        self,
        name: str,
        version: int,
        *,
        generation: int | None = None,
    ) -> LoadedTuner:
        """Read version ``version`` of ``name`` from the store and build it, under its lock.

        ``generation`` is the name's generation the caller started from (default: now); if a
        delete bumped it by the time the module is built, the result is thrown away.
        Bytes that fail admission here (written by another replica or an older server) raise
        ``tuner_unloadable``, which requests report per task.
        """
        async with self._lock(name):
            found = self._loaded.get((name, version))
            if found is not None:
                return found
            if generation is None:
                generation = self._generation.get(name, 0)
            started = time.perf_counter()
            try:
                stored = await self.store.get(name, version)
            except (TunerNotFound, InvalidName):
                raise ApiError(
                    "unknown_task", f"no task named {name!r} is registered", task=name
                ) from None
            except VersionNotFound:
                raise ApiError(
                    "unknown_version",
                    f"task {name!r} has no version {version}",
                    task=name,
                    version=version,
                ) from None
            except StoreUnavailable as exc:
                # Not this version's fault: the whole request is retryable elsewhere.
                raise self._unavailable_for_serving(exc, name) from exc
            except StoreError as exc:
                raise ApiError(
                    "tuner_load_failed",
                    f"task {name!r} v{version} is not loaded and the store failed: {exc}",
                    task=name,
                ) from exc
            data, info = stored.data, stored.info
            refused = self._unloadable.get((name, version))
            if refused is not None and refused[0] == info.sha256:
                # Admission is deterministic for given bytes and backbone: do not pay for it
                # again on every request naming this version.
                raise _unloadable(info, refused[1], refused[2])
            try:
                module = await asyncio.to_thread(self._build, data, info.sha256)
            except ArtifactError as exc:
                log.warning("tuner %s v%d is unloadable: %s", name, version, exc.message)
                self._unloadable[(name, version)] = (info.sha256, exc.code, exc.message)
                raise _unloadable(info, exc.code, exc.message) from None
            return self._install(name, info, module, started, generation)

    def _install(
        self, name: str, info: VersionInfo, module: TaskModule, started: float, generation: int
    ) -> LoadedTuner:
        """Put a built module into the loaded set; the caller holds ``name``'s lock.

        ``started``: when its load began (for the metric); ``generation``: the name's
        generation then (a delete since means the result is thrown away)."""
        if self._generation.get(name, 0) != generation or self._closed:
            # Deleted while we were loading: do not bring it back.
            raise ApiError("unknown_task", f"no task named {name!r} is registered", task=name)
        loaded = LoadedTuner(
            name=name,
            version=info.version,
            sha256=info.sha256,
            config=module.config,
            module=module,
            nbytes=module_nbytes(module),
            info=info,
        )
        key = (name, info.version)
        self._configs[name] = (info.sha256, module.config)
        self._loaded[key] = loaded
        self._loaded_bytes += loaded.nbytes
        self._evict(keep=key)
        if self.metrics is not None:
            self.metrics.tuner_load.observe(time.perf_counter() - started)
        self._report()
        log.info("loaded tuner %s v%d (%d bytes)", name, info.version, loaded.nbytes)
        return loaded

    def _build(self, data: bytes, sha256: str | None = None) -> TaskModule:
        """Validate, admit (against this backbone, with a dry run) and build a task module on
        the tuner device (float32). Runs in a thread."""
        return admit(
            data,
            self.backbone,
            self.tuner_device,
            max_bytes=self.settings.max_artifact_bytes,
            sha256=sha256,
        ).module

    def _evict(self, keep: VersionKey | None = None) -> None:
        """Drop least recently used unpinned versions until the budget holds."""
        for key in list(self._loaded):
            if self._loaded_bytes <= self.memory_budget:
                break
            if key == keep or key[0] in self.pinned:
                continue
            self._unload(key)
            if self.metrics is not None:
                self.metrics.tuners_evicted.inc()
            log.info("evicted tuner %s v%d (memory budget %d bytes)", *key, self.memory_budget)

    def _unload(self, key: VersionKey) -> asyncio.Task[bool] | None:
        """Take a version out of the loaded set now; its drain runs in the background."""
        loaded = self._loaded.pop(key, None)
        if loaded is None:
            return None
        self._loaded_bytes -= loaded.nbytes
        task = self._retiring.get(loaded)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._retire(loaded), name=f"restune-retire-{loaded.name}-v{loaded.version}"
            )
            self._retiring[loaded] = task
        return task

    async def _retire(self, loaded: LoadedTuner) -> bool:
        """Wait (bounded) for the requests using an unloaded version, then let go of it.

        Returns whether it drained; False means the bound passed with requests still holding
        it (they finish on the module they hold, which is freed with them).
        """
        bound = self.settings.unload_drain_s
        try:
            drained = await self.leases.wait_idle(loaded, bound)
            if not drained:
                log.warning(
                    "unloading tuner %s v%d: %d request(s) still used it after %.1fs; "
                    "unloaded anyway",
                    loaded.name,
                    loaded.version,
                    self.leases.in_use(loaded),
                    bound,
                )
                if self.metrics is not None:
                    self.metrics.unload_drain_timeouts.inc()
            for listener in self._unload_listeners:
                listener(loaded)
            return drained
        finally:
            self._retiring.pop(loaded, None)

    def add_unload_listener(self, listener: UnloadListener) -> None:
        """Call ``listener`` with every version once it is unloaded and drained."""
        self._unload_listeners.append(listener)

    def add_swap_listener(self, listener: SwapListener) -> None:
        """Call ``listener(name, loaded)`` whenever another version of ``name`` is swapped in."""
        self._swap_listeners.append(listener)

    def unload(self, name: str) -> int:
        """Drop every loaded version of ``name`` from memory (it stays registered and loads
        again on its next request); returns how many were dropped. Requests using them
        finish on them; the memory goes once they are done."""
        keys = [k for k in self._loaded if k[0] == name]
        for key in keys:
            self._unload(key)
        self._report()
        return len(keys)

    async def drained(self) -> None:
        """Wait for every unload in progress to finish draining (tests, shutdown)."""
        while self._retiring:
            await asyncio.gather(*list(self._retiring.values()), return_exceptions=True)

    def is_loaded(self, name: str, version: int) -> bool:
        return (name, version) in self._loaded

    @property
    def loaded_bytes(self) -> int:
        return self._loaded_bytes

    # ------------------------------------------------------------------ admin

    async def register(
        self, name: str, data: bytes, *, sha256: str | None = None, promote: Promote = None
    ) -> tuple[VersionInfo, bool]:
        """Validate and store an artifact as a version of ``name``, and load it.

        ``promote`` (see :data:`~tuners_store.base.Promote`): whether it becomes current;
        by default it does unless a canary split is set. :meth:`is_current` tells afterwards.
        Returns (version info, created); ``created`` is False when identical bytes already
        were a version of ``name``. Uploads of identical
        bytes to one name while one is in progress wait for it and share its outcome: one
        validation, one version, one load. ``sha256``: the digest of ``data`` if the caller
        already computed it (the upload route does for quotas); the bytes are hashed once.
        """
        # The name first: a bad one ("..", "A", 65 characters) is the caller's real mistake,
        # and a valid artifact would otherwise be answered "upload it under its own name".
        try:
            validate_qualified_name(name)
        except InvalidName as exc:
            self._count_registration(exc.code)
            raise ApiError(exc.code, exc.message, task=name) from exc
        digest = sha256 if sha256 is not None else await sha256_of(data)
        key = (name, digest, promote)
        flight = self._registering.get(key)
        if flight is not None:
            info, _ = await asyncio.shield(flight)
            self._count_registration("unchanged")
            return info, False
        flight = asyncio.ensure_future(self._register(name, data, digest, promote))
        self._registering[key] = flight
        flight.add_done_callback(lambda done: self._flight_done(key, done))
        # Shielded: a client that hangs up must not cancel the registration others wait on.
        return await asyncio.shield(flight)

    def _flight_done(
        self, key: tuple[str, str, Promote], done: asyncio.Future[tuple[VersionInfo, bool]]
    ) -> None:
        self._registering.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved: a failure nobody waits for any more is not logged

    async def _register(
        self, name: str, data: bytes, digest: str, promote: Promote
    ) -> tuple[VersionInfo, bool]:
        """One registration (see :meth:`register`); the name is already valid, ``digest`` is
        the sha256 of ``data``.

        The bytes are hashed once (``digest``, also handed to the store), validated once and
        admitted against the running backbone (built and dry-run) before anything is stored;
        the admitted module is what gets loaded, not a second build.
        """
        started = time.perf_counter()
        try:
            admitted = await asyncio.to_thread(
                admit,
                data,
                self.backbone,
                self.tuner_device,
                max_bytes=self.settings.max_artifact_bytes,
                sha256=digest,
            )
        except ArtifactError as exc:
            self._count_registration(exc.code)
            raise ApiError(exc.code, exc.message, task=name) from exc
        header = admitted.header
        # An artifact carries its plain name; a tenant's namespace comes from where it goes.
        tenant, plain = split_qualified_name(name)
        if header.config.name != plain:
            self._count_registration("artifact_name_mismatch")
            expected = f"{tenant}/{header.config.name}" if tenant else header.config.name
            raise ApiError(
                "artifact_name_mismatch",
                f"the artifact is tuner {header.config.name!r}; upload it as that name "
                f"(PUT /v1/tuners/{expected}), not as {name!r}",
                task=name,
            )
        async with self._lock(name):
            generation = self._generation.get(name, 0)
            try:
                result = await self.store.put(name, data, sha256=digest, promote=promote)
            except StoreError as exc:
                self._count_registration(exc.code)
                raise self._store_error(exc, name) from exc
            self.store_ok = True
            # Installed under the same lock as the put: a refresh started by the store's own
            # event for this version waits, then finds it loaded (no second read or build).
            loaded = self._loaded.get((name, result.info.version)) or self._install(
                name, result.info, admitted.module, started, generation
            )
        if self._generation.get(name, 0) == generation and result.current:
            self._swap(name, result.info, ours=True)
        self._count_registration("created" if result.created else "unchanged")
        log.info(
            "registered tuner %s v%d (%s, %s)",
            name,
            loaded.version,
            "new" if result.created else "identical bytes",
            "current" if result.current else "not promoted",
        )
        return result.info, result.created

    async def delete(self, name: str) -> bool:
        """Remove ``name`` from the store and from memory.

        Returns once the requests using its loaded versions are done, or ``unload_drain_s``
        passed (then False, and the wait is logged and counted).
        """
        async with self._lock(name):
            try:
                await self.store.delete(name)
            except (TunerNotFound, InvalidName):
                raise ApiError("tuner_not_found", f"no tuner named {name!r}", task=name) from None
            except StoreError as exc:
                raise self._store_error(exc, name) from exc
            retiring = self._forget(name)
        drained = all(await asyncio.gather(*retiring)) if retiring else True
        log.info("deleted tuner %s", name)
        return drained

    def is_current(self, name: str, version: int) -> bool:
        """Whether plain ``name`` is served by ``version`` here (what an upload answers)."""
        info = self._index.get(name)
        return info is not None and info.version == version

    async def delete_version(self, name: str, version: int, *, force: bool = False) -> bool:
        """Remove one version of ``name`` from the store and from memory.

        The current version or one in the canary split is refused (409 ``version_in_use``)
        unless ``force``; so is the only version. Forced, the store picks the new current
        version and split (:meth:`~tuners_store.base.TunerStore.delete_version`) and this
        replica serves them before the old version leaves memory. Returns once the requests
        using the version are done, or ``unload_drain_s`` passed (then False).
        """
        async with self._lock(name):
            try:
                info = await self.store.delete_version(name, version, force=force)
            except (TunerNotFound, InvalidName):
                raise ApiError("tuner_not_found", f"no tuner named {name!r}", task=name) from None
            except VersionNotFound:
                raise ApiError(
                    "version_not_found", f"tuner {name!r} has no version {version}", task=name
                ) from None
            except StoreError as exc:
                raise self._store_error(exc, name) from exc
            self.store_ok = True
        doomed = self._loaded.get((name, version))
        if not self.is_loaded(name, info.version):
            with contextlib.suppress(ApiError):  # a request gets the per-task error instead
                await self._load(name, info.version)
        if self._index.get(name) != info:
            self._swap(name, info)
        await self._refresh_traffic(name)
        self._forget_version(name, version)
        retiring = self._retiring.get(doomed) if doomed is not None else None
        drained = await retiring if retiring is not None else True
        log.info("deleted tuner %s v%d", name, version)
        return drained

    def _forget_version(self, name: str, version: int) -> None:
        """Version ``version`` of ``name`` is gone: out of the split, the answers and memory
        (its drain runs in the background)."""
        weights = self._traffic.get(name)
        if weights is not None and version in weights:
            # Out of the split at once (a pick of it would fail the request); the store's own
            # split, which may name a new current version, is read after.
            left = {v: w for v, w in weights.items() if v != version}
            if len(left) > 1:
                self._traffic[name] = left
            else:
                self._traffic.pop(name, None)
            self._spawn(self._refresh_traffic(name))
        self._answers.pop((name, version), None)
        self._unload((name, version))
        self._report()

    async def set_current(self, name: str, version: int) -> VersionInfo:
        """Make an existing version current (rollback); it is loaded first, so no request
        waits for it."""
        await self._load(name, version)
        try:
            info = await self.store.set_current(name, version)
        except (TunerNotFound, InvalidName):
            raise ApiError("tuner_not_found", f"no tuner named {name!r}", task=name) from None
        except VersionNotFound:
            raise ApiError(
                "version_not_found", f"tuner {name!r} has no version {version}", task=name
            ) from None
        except StoreError as exc:
            raise self._store_error(exc, name) from exc
        self._swap(name, info, ours=True)
        return info

    def traffic(self, name: str) -> dict[int, int]:
        """The weights requests for plain ``name`` are split by on this replica
        (``{current: 100}`` without a split)."""
        weights = self._traffic.get(name)
        if weights is not None:
            return dict(weights)
        info = self._index.get(name)
        if info is None:
            raise ApiError("tuner_not_found", f"no tuner named {name!r}", task=name)
        return {info.version: 100}

    async def current_or_404(self, name: str) -> VersionInfo:
        """The current version of ``name``; asks the store once if it is not mirrored yet."""
        info = self._index.get(name)
        if info is not None:
            return info
        try:
            return await self._discover(name)
        except ApiError as exc:
            if exc.code == "store_unavailable":
                raise
            raise ApiError("tuner_not_found", f"no tuner named {name!r}", task=name) from None

    async def set_traffic(self, name: str, weights: Mapping[int, int]) -> dict[int, int]:
        """Split requests for plain ``name`` between versions by integer weights.

        Every version with weight > 0 is loaded first. One version with all the weight is a
        rollback (or roll-forward): it becomes current and the split is cleared. Returns the
        weights in effect. Raises ``invalid_traffic`` (422) for unknown versions, negative
        weights or a zero sum.
        """
        await self.current_or_404(name)
        try:
            versions = {v.version for v in await self.store.versions(name)}
        except (TunerNotFound, InvalidName):
            raise ApiError("tuner_not_found", f"no tuner named {name!r}", task=name) from None
        except StoreError as exc:
            raise self._store_error(exc, name) from exc
        try:
            clean = check_traffic(name, weights, versions)
        except InvalidTraffic as exc:
            raise ApiError(exc.code, exc.message, task=name) from exc
        live = [v for v, w in clean.items() if w > 0]
        if len(live) == 1:
            info = await self.set_current(name, live[0])
            log.info("tuner %s: all traffic to v%d (now current)", name, info.version)
            return {info.version: 100}
        for version in live:
            await self._load(name, version)
        try:
            stored = await self.store.set_traffic(name, clean)
        except (TunerNotFound, InvalidName):
            raise ApiError("tuner_not_found", f"no tuner named {name!r}", task=name) from None
        except StoreError as exc:
            raise self._store_error(exc, name) from exc
        self._install_traffic(name, stored)
        log.info("tuner %s traffic now %s", name, stored)
        return self.traffic(name)

    def _install_traffic(self, name: str, weights: Mapping[int, int]) -> None:
        """Serve ``weights`` for ``name`` (a split only where it differs from "all current");
        traffic reads started before this one are stale."""
        self._traffic_reads[name] = self._traffic_reads.get(name, 0) + 1
        current = self._index.get(name)
        live = {v: w for v, w in sorted(weights.items()) if w > 0}
        if current is None or not live or set(live) == {current.version}:
            self._traffic.pop(name, None)
        else:
            self._traffic[name] = live

    async def list_tuners(self) -> list[TunerSummary]:
        """Every registered tuner's current version, by name."""
        out = []
        for name in sorted(self._index):
            info = self._index.get(name)
            if info is None:
                continue
            try:
                config = await self._config_of(info)
            except (TunerNotFound, VersionNotFound):
                continue  # deleted since the index was read
            out.append(TunerSummary(info, config, self.is_loaded(name, info.version)))
        return out

    async def describe(self, name: str) -> TunerDetail:
        """One tuner: summary, full config, every version, traffic."""
        info = self._index.get(name)
        if info is None:
            try:
                info = await self._discover(name)
            except ApiError as exc:
                if exc.code == "store_unavailable":
                    raise
                raise ApiError("tuner_not_found", f"no tuner named {name!r}", task=name) from None
        try:
            versions = await self.store.versions(name)
        except TunerNotFound:
            raise ApiError("tuner_not_found", f"no tuner named {name!r}", task=name) from None
        except StoreError:
            versions = [info]  # store down: say what we know
        try:
            config = await self._config_of(info)
        except (TunerNotFound, VersionNotFound):
            # Deleted between the index read and the blob read: gone, not a store outage.
            raise ApiError("tuner_not_found", f"no tuner named {name!r}", task=name) from None
        loaded = frozenset(v for (n, v) in self._loaded if n == name)
        traffic = self._traffic.get(name, {info.version: 100})
        answers = {v: n for (owner, v), n in self._answers.items() if owner == name}
        return TunerDetail(
            TunerSummary(info, config, info.version in loaded), versions, loaded, traffic, answers
        )

    def count_answers(self, counts: Mapping[VersionKey, int]) -> None:
        """Add per-image answers given by each (name, version) (shown by :meth:`describe`)."""
        for key, n in counts.items():
            if key[0] in self._index:
                self._answers[key] = self._answers.get(key, 0) + n

    def names(self, prefix: str = "") -> list[str]:
        """Registered names starting with ``prefix`` (a tenant's start with ``"tenant/"``)."""
        return [n for n in self._index if n.startswith(prefix)]

    async def usage(self, prefix: str = "", *, with_bytes: bool = False) -> Usage:
        """How many names start with ``prefix`` and (if asked) their bytes over all versions."""
        names = self.names(prefix)
        total = 0
        if with_bytes:
            for name in names:
                try:
                    total += sum(v.size for v in await self.store.versions(name))
                except TunerNotFound:
                    continue  # deleted meanwhile
                except StoreError as exc:
                    raise self._store_error(exc, name) from exc
        return Usage(len(names), total)

    async def stored_version(self, name: str, digest: str) -> VersionInfo | None:
        """The version of ``name`` whose artifact has sha256 ``digest``, if any."""
        try:
            versions = await self.store.versions(name)
        except (TunerNotFound, InvalidName):
            return None
        except StoreError as exc:
            raise self._store_error(exc, name) from exc
        return next((v for v in versions if v.sha256 == digest), None)

    def tuner_state(self) -> TunerState:
        """Where every loaded version lives and the canary weights (for the metrics)."""
        where: Location = "host" if self.tuner_device.type == "cpu" else "device"
        placements: list[tuple[str, int, Location]] = [(n, v, where) for (n, v) in self._loaded]
        placements.extend(
            (name, info.version, "store")
            for name, info in list(self._index.items())
            if (name, info.version) not in self._loaded
        )
        traffic = {n: dict(w) for n, w in self._traffic.items()}
        return TunerState(placements, traffic)

    async def _config_of(self, info: VersionInfo) -> TunerConfig | None:
        """The config of ``info``'s artifact, or ``None`` when it cannot be read here (an
        invalid artifact: see :meth:`config_error`; the store unreachable). Raises
        ``TunerNotFound`` / ``VersionNotFound`` when the version was deleted meanwhile."""
        cached = self._configs.get(info.name)
        if cached is not None and cached[0] == info.sha256:
            return cached[1]
        loaded = self._loaded.get((info.name, info.version))
        if loaded is not None:
            return loaded.config
        try:
            stored = await self.store.get(info.name, info.version)
            # Off the event loop: a header is up to 16 MiB of JSON.
            header = await asyncio.to_thread(
                read_header,
                stored.data,
                max_bytes=self.settings.max_artifact_bytes,
                sha256=stored.info.sha256,
            )
            config = header.config
        except ArtifactError as exc:
            log.warning("config of %s v%d is invalid: %s", info.name, info.version, exc.message)
            self._config_errors[info.name] = (info.sha256, exc.code, exc.message)
            return None
        except (TunerNotFound, VersionNotFound):
            raise
        except StoreError as exc:
            log.info("config of %s v%d unavailable: %s", info.name, info.version, exc)
            return None
        self._configs[info.name] = (info.sha256, config)
        return config

    # ------------------------------------------------------------------ index mirroring

    def config_error(self, info: VersionInfo) -> ApiError | None:
        """``tuner_unloadable`` when the config of ``info``'s artifact was found invalid here
        (a listing shows it without a config); ``None`` when it was read or never tried."""
        found = self._config_errors.get(info.name)
        if found is None or found[0] != info.sha256:
            return None
        return _unloadable(info, found[1], found[2])

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def _set_current(self, name: str, info: VersionInfo) -> None:
        self._index[name] = info
        self._change[name] = self._change.get(name, 0) + 1
        self._report()

    def _swap(self, name: str, info: VersionInfo, *, ours: bool = False) -> None:
        """Make ``info`` the served version of ``name``; older unused versions leave memory.

        ``ours``: this registry just made it current in the store, which cleared any canary
        split at that instant, so the split goes at once. Either way the split is then re-read:
        an event only says a version became current at some point, and someone may have set
        a split since.
        """
        previous = self._index.get(name)
        self._set_current(name, info)
        if ours:
            self._traffic.pop(name, None)
        self._spawn(self._refresh_traffic(name))
        if previous is not None and previous.version != info.version:
            loaded = self._loaded.get((name, info.version))
            for listener in self._swap_listeners:
                try:
                    listener(name, loaded)
                except Exception:  # a listener's fault must not stop the swap
                    log.exception("a swap listener failed for tuner %s v%d", name, info.version)
            self._unload((name, previous.version))
            self._report()

    def _forget(self, name: str) -> list[asyncio.Task[bool]]:
        """``name`` is gone: bump its generation and drop everything about it. Returns the
        drains of its loaded versions."""
        self._generation[name] = self._generation.get(name, 0) + 1
        self._change[name] = self._change.get(name, 0) + 1
        self._index.pop(name, None)
        self._traffic.pop(name, None)
        self._traffic_reads[name] = self._traffic_reads.get(name, 0) + 1  # reads in flight: stale
        self._configs.pop(name, None)
        for key in [k for k in self._answers if k[0] == name]:
            del self._answers[key]
        retiring = [self._unload(key) for key in [k for k in self._loaded if k[0] == name]]
        lock = self._locks.get(name)
        if lock is not None and not lock.locked():
            del self._locks[name]
        self._report()
        return [task for task in retiring if task is not None]

    async def _watch_loop(self) -> None:
        """Follow the store; a watch that fails, or whose resync fails, is closed and
        subscribed again (which starts with a resync), after a short bounded backoff."""
        delay = WATCH_BACKOFF_S[0]
        while not self._closed:
            try:
                async with contextlib.aclosing(self.store.watch()) as events:
                    async for event in events:
                        delay = WATCH_BACKOFF_S[0]
                        await self.apply_event(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.store_ok = False
                log.warning("tuner store watch failed (%s); again in %.2fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, WATCH_BACKOFF_S[1])

    async def apply_event(self, event: StoreEvent) -> None:
        """Follow one store change (from this process or another replica).

        Raises :class:`StoreError` when a ``resync`` cannot read the index: the watch then
        starts over rather than go on from an index it failed to refresh.
        """
        if event.kind == "lost":
            self.store_ok = False
            log.warning("tuner store %s lost; serving the index as last read", self.store.url)
            return
        if event.kind == "resync" or event.name is None:
            first = not self.index_synced
            await self._resync()
            if first:
                self._spawn(self._preload_pinned())
            return
        name = event.name
        if event.kind == "delete":
            if name in self._index:
                self._forget(name)
                log.info("tuner %s deleted elsewhere", name)
            return
        if event.kind in ("put", "current"):
            current = self._index.get(name)
            if current is not None and current.version == event.version:
                # e.g. our own registration, already applied; the split may have changed
                # since (a put clears it, a later set_traffic sets it): read it.
                self._spawn(self._refresh_traffic(name))
                return
            self._spawn(self._refresh(name, event.version, self._change.get(name, 0)))
        elif event.kind == "traffic":
            self._spawn(self._refresh_traffic(name))
        elif event.kind == "version_delete" and event.version is not None:
            # Pinned requests now get unknown_version; a new current version or split came
            # (or comes) in its own event.
            self._forget_version(name, event.version)

    async def _resync(self) -> None:
        """Re-read the whole index; apply every difference."""
        try:
            snapshot = await self.store.snapshot()
        except StoreError:
            self.store_ok = False
            raise
        self.store_ok = True
        self.index_synced = True
        gone = [n for n in self._index if n not in snapshot]
        for name in gone:
            self._forget(name)
        changed = len(gone)
        for name, info in snapshot.items():
            mine = self._index.get(name)
            changed += mine != info
            if mine is not None and mine.version == info.version and mine.sha256 != info.sha256:
                # Same number, other bytes (the store was replaced): drop the old weights.
                self._unload((name, mine.version))
                self._set_current(name, info)
            elif mine is None:
                self._set_current(name, info)
            elif mine.version != info.version or mine.sha256 != info.sha256:
                if self.is_loaded(name, mine.version):
                    self._spawn(self._refresh(name, info.version, self._change.get(name, 0)))
                else:
                    self._swap(name, info)
            self._spawn(self._refresh_traffic(name))
        self._report()
        log.info("tuner index read: %d names, %d changed", len(snapshot), changed)

    async def _refresh(self, name: str, version: int | None, change: int) -> None:
        """Load ``name`` v``version`` off the request path, then swap it in if still newest."""
        try:
            if version is None:
                version = (await self.store.get(name)).info.version
            loaded = await self._load(name, version)
        except ApiError as exc:
            log.warning("preloading tuner %s v%s failed: %s", name, version, exc.detail)
            if exc.code in ("unknown_task", "unknown_version"):
                return
            # Unloadable (corrupt blob, store down). A name already serving keeps its loaded
            # version; a new name enters the index so requests get a per-task error naming
            # the failure instead of "unknown task".
            if name in self._index:
                return
            try:
                found = [v for v in await self.store.versions(name) if v.version == version]
            except StoreError:
                return
            if found and self._change.get(name, 0) == change:
                self._swap(name, found[0])
            return
        except StoreError as exc:
            log.warning("preloading tuner %s failed: %s", name, exc)
            return
        if self._change.get(name, 0) == change and loaded.info is not None:
            self._swap(name, loaded.info)
            log.info("now serving tuner %s v%d", name, loaded.version)

    async def _refresh_traffic(self, name: str) -> None:
        """Mirror ``name``'s canary weights (set by any replica): the versions of a split are
        loaded first, then it takes effect, unless a later read or change came meanwhile."""
        seq = self._traffic_reads[name] = self._traffic_reads.get(name, 0) + 1
        try:
            weights = await self.store.get_traffic(name)
        except StoreError as exc:
            log.info("traffic of %s unavailable: %s", name, exc)
            return
        current = self._index.get(name)
        if self._traffic_reads.get(name) != seq or current is None:
            return  # a later read is under way (it has the fresher answer), or name is gone
        live = [v for v, w in weights.items() if w > 0]
        if live != [current.version]:
            for version in live:
                try:
                    await self._load(name, version)
                except ApiError as exc:
                    # Requests that pick it get a per-task error naming the failure.
                    log.warning("preloading %s v%d for a split failed: %s", name, version, exc)
            if self._traffic_reads.get(name) != seq:
                return
        self._install_traffic(name, weights)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self) -> None:
        """Wait for background refreshes started so far (tests, orderly shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # ------------------------------------------------------------------ helpers

    def _unavailable_for_serving(self, exc: StoreUnavailable, name: str) -> ApiError:
        """The answer to a request that needs the store while it is down (see the module
        docstring): retryable, for the whole request."""
        self.store_ok = False
        return ApiError(
            "store_unavailable",
            f"task {name!r} needs the tuner store, which is unavailable: {exc.message}",
            retry_after=SERVE_RETRY_AFTER_S,
            task=name,
        )

    def _store_error(self, exc: StoreError, name: str) -> ApiError:
        if isinstance(exc, StoreUnavailable):
            self.store_ok = False
            return ApiError(
                "store_unavailable",
                f"the tuner store is unavailable: {exc.message}",
                retry_after=STORE_RETRY_AFTER_S,
            )
        return ApiError(exc.code, exc.message, task=name)

    def _count_registration(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.registrations.labels(result=result).inc()

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.tuners_registered.set(len(self._index))
            self.metrics.tuners_loaded.set(len(self._loaded))

    def loaded_tuners(self) -> Iterable[LoadedTuner]:
        """Loaded versions, least recently used first."""
        return list(self._loaded.values())


def _unloadable(info: VersionInfo, code: str, message: str) -> ApiError:
    """The error a stored version that fails validation or admission here answers with
    (``code``/``message``: the artifact's :class:`ArtifactError`)."""
    return ApiError(
        "tuner_unloadable",
        f"task {info.name!r} v{info.version} cannot be loaded on this server ({code}): {message}",
        task=info.name,
        version=info.version,
        artifact_code=code,
    )


async def sha256_of(data: bytes) -> str:
    """Hex sha256 of ``data``; large uploads are hashed in a thread (the loop keeps serving)."""
    if len(data) >= HASH_IN_THREAD_BYTES:
        return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
    return hashlib.sha256(data).hexdigest()
