"""Tuner artifacts and the stores that keep them (filesystem, Redis). Never imports torch."""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from tuners_store.base import PutResult, StoredTuner, StoreEvent, TunerStore, VersionInfo
from tuners_store.errors import (
    InvalidName,
    InvalidTraffic,
    StoreCorrupt,
    StoreError,
    StoreUnavailable,
    TunerNotFound,
    VersionInUse,
    VersionNotFound,
)

__all__ = [
    "InvalidName",
    "InvalidTraffic",
    "PutResult",
    "StoreCorrupt",
    "StoreError",
    "StoreEvent",
    "StoreUnavailable",
    "StoredTuner",
    "TunerNotFound",
    "TunerStore",
    "VersionInUse",
    "VersionInfo",
    "VersionNotFound",
    "open_store",
]


def open_store(url: str) -> TunerStore:
    """Open the store a URL names.

    ``file:///abs/path`` or ``file://./rel/path`` (optional ``?poll_interval=0.5`` for
    :meth:`~TunerStore.watch`); ``redis://host:port/db`` or ``rediss://…`` (optional
    ``?prefix=restune`` for the key prefix; other query parameters go to redis-py).
    Raises ``ValueError`` for a URL it cannot use.
    """
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    if parts.scheme == "file":
        from tuners_store.filesystem import FilesystemStore

        if parts.netloc in ("", "localhost"):
            path = parts.path
        elif parts.netloc in (".", ".."):
            path = parts.netloc + parts.path
        else:
            raise ValueError(f"file store URL {url!r}: use file:///abs/path or file://./rel/path")
        if not path:
            raise ValueError(f"file store URL {url!r} has no path")
        unknown = set(query) - {"poll_interval"}
        if unknown:
            raise ValueError(f"file store URL {url!r}: unknown parameters {sorted(unknown)}")
        poll = float(query.get("poll_interval", 0.5))
        if not poll > 0:
            raise ValueError(f"file store URL {url!r}: poll_interval must be > 0")
        return FilesystemStore(path, poll_interval=poll)
    if parts.scheme in ("redis", "rediss"):
        from tuners_store.redis_store import RedisStore

        prefix = query.pop("prefix", "restune")
        if not prefix or any(c in prefix for c in " {}"):
            raise ValueError(f"redis store URL {url!r}: bad prefix {prefix!r}")
        rest = urlunsplit(parts._replace(query=urlencode(query)))
        return RedisStore(rest, prefix=prefix)
    raise ValueError(f"unsupported store URL {url!r}: use file://… or redis://…")
