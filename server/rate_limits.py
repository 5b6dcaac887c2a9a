"""Per-tenant request rates, shared by every replica through the tuner store's Redis.

A tenant's quota is "``rate`` requests per second with bursts of up to ``burst``". With N
replicas behind a balancer, a per-process bucket would grant N times that, so the counts live
where every replica sees them: the Redis that already holds the tuners (a file store means one
replica, and the counts stay in this process). The limiter is the maintained ``limits``
library (sliding-window counters, one atomic Lua call per request), not a hand-written bucket.

The quota maps onto a window as ``amount`` requests per ``window`` seconds with
``window = ceil(burst / rate)`` (at least 1 s) and ``amount = round(rate * window)`` (at least
1): the long-run rate is ``rate``, and at most ``amount`` requests pass back to back. For the
default burst (the rate rounded up) that is ``ceil(rate)`` requests per second.

A store outage must not turn into refused or stalled requests: when Redis fails, the check
falls back to counts kept in this process (the quota then holds per replica, as a bucket
would) and Redis is not asked again for :data:`SHARED_RETRY_S`, so an outage costs one short
connect timeout per interval instead of one per request. Each fallback is counted
(``restune_rate_limit_fallbacks``) and logged once per outage.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

log = logging.getLogger(__name__)

SHARED_RETRY_S = 2.0
"""After Redis failed, how long the counts stay local before Redis is asked again."""
REDIS_TIMEOUT_S = 0.25
"""Connect and read timeout of a rate check against Redis (loopback answers in ~0.2 ms)."""
_STORE_ONLY_PARAMS = frozenset({"prefix", "poll_interval"})
"""Query parameters of a store URL that mean something to the store, not to redis-py."""


@dataclass(frozen=True)
class Rate:
    """A tenant's request rate: ``per_s`` on average, ``burst`` back to back."""

    per_s: float
    burst: int

    def item(self) -> RateLimitItem:
        """The ``limits`` window this rate maps to (module docstring)."""
        burst = self.burst or max(1, math.ceil(self.per_s))
        window = max(1, math.ceil(burst / self.per_s))
        amount = max(1, round(self.per_s * window))
        return RateLimitItemPerSecond(amount, window)


@dataclass(frozen=True)
class Verdict:
    """The outcome of charging one request: allowed, or the seconds to wait."""

    allowed: bool
    retry_after_s: float = 0.0


def shared_storage_url(store_url: str) -> tuple[str, str] | None:
    """(redis-py URL, key prefix) of a Redis tuner store URL; ``None`` for any other store.

    The store's own parameters (``prefix``, ``poll_interval``) are taken out; the rate keys
    live under ``<prefix>:rate`` beside the store's keys.
    """
    parts = urlsplit(store_url)
    if parts.scheme not in ("redis", "rediss"):
        return None
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    prefix = query.get("prefix") or "restune"
    rest = {k: v for k, v in query.items() if k not in _STORE_ONLY_PARAMS}
    return urlunsplit(parts._replace(query=urlencode(rest))), f"{prefix}:rate"


class TenantRateLimiter:
    """Charges requests to per-tenant windows kept in Redis (shared) or in this process."""

    def __init__(
        self,
        store_url: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_fallback: Callable[[], None] | None = None,
    ) -> None:
        self._local = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._shared: SlidingWindowCounterRateLimiter | None = None
        self._shared_storage: Storage | None = None
        target = shared_storage_url(store_url)
        if target is not None:
            url, prefix = target
            self._shared_storage = RedisStorage(
                url,
                implementation="redispy",
                wrap_exceptions=True,
                key_prefix=prefix,
                socket_connect_timeout=REDIS_TIMEOUT_S,
                socket_timeout=REDIS_TIMEOUT_S,
            )
            self._shared = SlidingWindowCounterRateLimiter(self._shared_storage)
        self._clock = clock
        self.on_fallback = on_fallback
        """Called at each fallback to local counts (the server counts them in a metric)."""
        self._local_until = -math.inf
        self._degraded = False

    @property
    def shared(self) -> bool:
        """Whether the counts are meant to live in Redis (every replica sees them)."""
        return self._shared is not None

    async def charge(self, tenant: str, rate: Rate) -> Verdict:
        """Count one request of ``tenant`` against ``rate``."""
        item = rate.item()
        if self._shared is not None and self._clock() >= self._local_until:
            try:
                verdict = await self._charge(self._shared, item, tenant)
            except (StorageError, OSError) as exc:
                if not self._degraded:
                    log.warning("rate limits kept per replica while Redis fails: %s", exc)
                self._degraded = True
                self._local_until = self._clock() + SHARED_RETRY_S
                if self.on_fallback is not None:
                    self.on_fallback()
            else:
                if self._degraded:
                    log.info("rate limits shared through Redis again")
                    self._degraded = False
                return verdict
        return await self._charge(self._local, item, tenant)

    @staticmethod
    async def _charge(
        limiter: SlidingWindowCounterRateLimiter, item: RateLimitItem, tenant: str
    ) -> Verdict:
        if await limiter.hit(item, "tenant", tenant):
            return Verdict(True)
        stats = await limiter.get_window_stats(item, "tenant", tenant)
        return Verdict(False, max(1.0, stats.reset_time - time.time()))
