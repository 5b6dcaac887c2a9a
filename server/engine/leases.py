"""Which loaded tuner versions requests are using, so unloading one can wait for them.

A request leases every :class:`LoadedTuner` it resolved, from resolution until its answers
are assembled (or it fails, or is cancelled: the lease goes with the request, so an aborted
request never keeps an unload waiting). Unloading a version (delete, eviction, a newer
version swapped in) takes it out of the registry at once, so no new request gets it, then
waits for its leases to end, at most a bounded time, before its memory is given back.

Used from the event loop only: counts need no lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from server.engine.loaded_tuner import LoadedTuner


class Leases:
    """Per-version counts of the requests holding a loaded tuner."""

    def __init__(self) -> None:
        # Keyed by the object (LoadedTuner compares by identity): a reload of the same
        # version is a different object with leases of its own.
        self._counts: dict[LoadedTuner, int] = {}
        self._idle: dict[LoadedTuner, asyncio.Event] = {}

    def acquire(self, tuner: LoadedTuner) -> None:
        """One more request uses ``tuner``."""
        self._counts[tuner] = self._counts.get(tuner, 0) + 1

    def release(self, tuner: LoadedTuner) -> None:
        """A request using ``tuner`` is done with it."""
        left = self._counts.get(tuner, 0) - 1
        if left > 0:
            self._counts[tuner] = left
            return
        self._counts.pop(tuner, None)
        event = self._idle.pop(tuner, None)
        if event is not None:
            event.set()

    def in_use(self, tuner: LoadedTuner) -> int:
        """Requests holding ``tuner`` now."""
        return self._counts.get(tuner, 0)

    @property
    def held(self) -> int:
        """Distinct versions held by at least one request."""
        return len(self._counts)

    async def wait_idle(self, tuner: LoadedTuner, timeout_s: float) -> bool:
        """Wait until no request holds ``tuner``; False if ``timeout_s`` passed first."""
        if tuner not in self._counts:
            return True
        event = self._idle.get(tuner)
        if event is None:
            event = self._idle[tuner] = asyncio.Event()
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


class LeaseSet:
    """The leases of one request: each version once, all released by :meth:`close`."""

    def __init__(self, leases: Leases) -> None:
        self._leases = leases
        self._held: set[LoadedTuner] = set()
        self._closed = False

    def add(self, tuner: LoadedTuner) -> LoadedTuner:
        """Lease ``tuner`` for this request (idempotent); returns it."""
        if self._closed:
            raise RuntimeError("this request's leases are already released")
        if tuner not in self._held:
            self._held.add(tuner)
            self._leases.acquire(tuner)
        return tuner

    def add_all(self, tuners: Iterable[LoadedTuner]) -> None:
        """Lease every tuner of ``tuners``."""
        for tuner in tuners:
            self.add(tuner)

    def close(self) -> None:
        """Release every lease (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for tuner in self._held:
            self._leases.release(tuner)
        self._held.clear()

    def __enter__(self) -> LeaseSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
