"""Tuner store in Redis, shared by several server replicas.

Keys (``P`` is the prefix, ``restune`` by default)::

    P:index              hash  name -> JSON VersionInfo of the current version
    P:traffic            hash  name -> JSON {version: weight} (absent: all to current)
    P:versions:{name}    hash  version -> JSON VersionInfo
    P:sha:{name}         hash  sha256 -> version (content addressing)
    P:ver:{name}         counter; INCR gives the next version; kept after delete
    P:blob:{name}:{v}    string, the artifact bytes
    P:staging:{uuid}     string, an upload on its way in (expires)
    P:epoch, P:seq       identity of this keyspace and a counter of published events
    P:events             pub/sub channel of JSON {kind, name, version, epoch, seq}

Every mutation is one Lua script, so blobs, index and event are written atomically. Pub/sub
drops messages while a subscriber is disconnected, so :meth:`RedisStore.watch` yields a
``resync`` on every (re)connect and whenever the event sequence has a gap or the keyspace's
epoch changed (a flush, or a restart that lost data), and one ``lost`` when the connection
drops. Reconnects are retried every ``reconnect_max_s`` at most (0.25 s by default), so a
watcher catches up within about that long after Redis returns. Scripts build key names from
the prefix, so this store needs a standalone Redis (or one slot), not a cluster.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff, NoBackoff
from redis.exceptions import RedisError

from tuners_store.base import (
    Promote,
    PutResult,
    StoredTuner,
    StoreEvent,
    TunerStore,
    Validator,
    VersionInfo,
    check_traffic,
    utc_now,
    without_version,
)
from tuners_store.errors import StoreCorrupt, StoreUnavailable, TunerNotFound, VersionNotFound
from tuners_store.names import validate_qualified_name

log = logging.getLogger(__name__)

T = TypeVar("T")

RECONNECT_FIRST_S = 0.05
"""First wait before the watch reconnects after losing Redis (then doubling, capped)."""
STAGING_TTL_MS = 10 * 60 * 1000
"""How long an uploaded blob waits for its script before Redis drops it."""

# Shared by every mutating script: stamp the event with the keyspace epoch and a sequence
# number so a watcher can tell when it missed something.
_PUBLISH = """
local function publish(kind, name, version)
  local epoch = redis.call('GET', KEYS[1])
  if not epoch then
    epoch = ARGV[1]
    redis.call('SET', KEYS[1], epoch)
  end
  local seq = redis.call('INCR', KEYS[2])
  redis.call('PUBLISH', ARGV[2], cjson.encode(
    {kind = kind, name = name, version = version, epoch = epoch, seq = seq}))
end
"""
# The blob is uploaded first to a unique staging key (with a TTL, so an abandoned upload
# vanishes) and renamed in by the script: passing 5 MB through a script argument would copy it
# twice more and block Redis for that long.
# KEYS: 1 epoch, 2 seq, 3 index, 4 traffic, 5 versions, 6 sha, 7 ver, 8 staging
# ARGV: 1 new epoch, 2 channel, 3 name, 4 sha256, 5 size, 6 created_at, 7 blob prefix,
#       8 promote ('1' yes, '0' no, '' unless a split is set; a name's first version always)
# Returns {0, info, current} (bytes already a version), {1, info, current} (new version),
# {-1} (staging gone); ``current`` is 1 when the version is current afterwards.
_PUT = (
    _PUBLISH
    + """
local name = ARGV[3]
if redis.call('EXISTS', KEYS[8]) == 0 then return {-1} end
local was = redis.call('HGET', KEYS[3], name)
local promote = (not was) or ARGV[8] == '1'
  or (ARGV[8] == '' and redis.call('HEXISTS', KEYS[4], name) == 0)
local existing = redis.call('HGET', KEYS[6], ARGV[4])
if existing then
  local info = redis.call('HGET', KEYS[5], existing)
  if info then
    redis.call('DEL', KEYS[8])
    if promote then
      local had_traffic = redis.call('HDEL', KEYS[4], name)
      if was ~= info then
        redis.call('HSET', KEYS[3], name, info)
        publish('current', name, tonumber(existing))
      end
      if had_traffic == 1 then publish('traffic', name, nil) end
      return {0, info, 1}
    end
    return {0, info, was == info and 1 or 0}
  end
end
local v = redis.call('INCR', KEYS[7])
local info = cjson.encode({name = name, version = v, sha256 = ARGV[4],
                           size = tonumber(ARGV[5]), created_at = ARGV[6]})
redis.call('RENAME', KEYS[8], ARGV[7] .. v)
redis.call('PERSIST', ARGV[7] .. v)
redis.call('HSET', KEYS[5], v, info)
redis.call('HSET', KEYS[6], ARGV[4], v)
if not promote then return {1, info, 0} end
redis.call('HSET', KEYS[3], name, info)
local had_traffic = redis.call('HDEL', KEYS[4], name)
publish('put', name, v)
if had_traffic == 1 then publish('traffic', name, nil) end
return {1, info, 1}
"""
)
# KEYS: 1 epoch, 2 seq, 3 index, 4 traffic, 5 versions, 6 sha. ARGV: 1, 2, 3 name, 4 blob prefix
_DELETE = (
    _PUBLISH
    + """
if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 0 then return 0 end
for _, v in ipairs(redis.call('HKEYS', KEYS[5])) do redis.call('DEL', ARGV[4] .. v) end
redis.call('DEL', KEYS[5], KEYS[6])
redis.call('HDEL', KEYS[3], ARGV[3])
redis.call('HDEL', KEYS[4], ARGV[3])
publish('delete', ARGV[3], nil)
return 1
"""
)
# Compare-and-set: the caller read the state, decided with ``without_version`` and passes
# what it read; anything changed meanwhile answers {-2} and the caller decides again.
# KEYS: 1 epoch, 2 seq, 3 index, 4 traffic, 5 versions, 6 sha.
# ARGV: 1, 2, 3 name, 4 version, 5 current as read, 6 traffic as read ('' none), 7 new current,
#       8 new traffic JSON ('' none), 9 blob prefix, 10 sha256 of the version, 11 versions read
_DELETE_VERSION = (
    _PUBLISH
    + """
local name = ARGV[3]
local was = redis.call('HGET', KEYS[3], name)
if not was then return {0} end
local traffic = redis.call('HGET', KEYS[4], name) or ''
if was ~= ARGV[5] or traffic ~= ARGV[6] or redis.call('HLEN', KEYS[5]) ~= tonumber(ARGV[11])
   or redis.call('HEXISTS', KEYS[5], ARGV[4]) == 0 then
  return {-2}
end
redis.call('HDEL', KEYS[5], ARGV[4])
redis.call('HDEL', KEYS[6], ARGV[10])
redis.call('DEL', ARGV[9] .. ARGV[4])
local info = redis.call('HGET', KEYS[5], ARGV[7])
if info ~= was then
  redis.call('HSET', KEYS[3], name, info)
  publish('current', name, tonumber(ARGV[7]))
end
if ARGV[8] == '' then
  redis.call('HDEL', KEYS[4], name)
else
  redis.call('HSET', KEYS[4], name, ARGV[8])
end
if ARGV[8] ~= traffic then publish('traffic', name, nil) end
publish('version_delete', name, tonumber(ARGV[4]))
return {1, info}
"""
)
DELETE_VERSION_TRIES = 8
"""Compare-and-set rounds of :meth:`RedisStore.delete_version` before it gives up (each
lost round means another writer changed the name meanwhile)."""

# KEYS: 1 epoch, 2 seq, 3 index, 4 traffic, 5 versions. ARGV: 1, 2, 3 name, 4 version.
_SET_CURRENT = (
    _PUBLISH
    + """
if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 0 then return {0} end
local info = redis.call('HGET', KEYS[5], ARGV[4])
if not info then return {-1} end
local was = redis.call('HGET', KEYS[3], ARGV[3])
local had_traffic = redis.call('HDEL', KEYS[4], ARGV[3])
if was ~= info then
  redis.call('HSET', KEYS[3], ARGV[3], info)
  publish('current', ARGV[3], tonumber(ARGV[4]))
end
if had_traffic == 1 then publish('traffic', ARGV[3], nil) end
return {1, info}
"""
)
# KEYS: 1 epoch, 2 seq, 3 index, 4 traffic, 5 versions. ARGV: 1, 2, 3 name, 4 JSON, 5.. versions
_SET_TRAFFIC = (
    _PUBLISH
    + """
if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 0 then return 0 end
for i = 5, #ARGV do
  if redis.call('HEXISTS', KEYS[5], ARGV[i]) == 0 then return -1 end
end
redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
publish('traffic', ARGV[3], nil)
return 1
"""
)


def redacted(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username + '@' if parts.username else ''}{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisStore(TunerStore):
    """Tuner store on one Redis, for replicas that must agree on the registered tuners."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "restune",
        connect_timeout_s: float = 2.0,
        socket_timeout_s: float = 10.0,
        reconnect_max_s: float = 0.25,
        health_check_s: float = 5.0,
    ) -> None:
        self.url = redacted(url)
        self.prefix = prefix
        self._redis_url = url
        self._connect_timeout_s = connect_timeout_s
        self._socket_timeout_s = socket_timeout_s
        self._reconnect_max_s = reconnect_max_s
        self._health_check_s = health_check_s
        # One quick retry covers a pooled connection that died with a Redis restart; more
        # would only delay the 503 a caller should see while Redis is down.
        self._client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=socket_timeout_s,
            retry=Retry(ConstantBackoff(0.05), 1),
            health_check_interval=health_check_s,
        )
        self._put = self._client.register_script(_PUT)
        self._delete = self._client.register_script(_DELETE)
        self._delete_version = self._client.register_script(_DELETE_VERSION)
        self._set_current = self._client.register_script(_SET_CURRENT)
        self._set_traffic = self._client.register_script(_SET_TRAFFIC)
        self.channel = f"{prefix}:events"

    # -- keys -------------------------------------------------------------------------------

    def _k(self, *parts: object) -> str:
        return ":".join([self.prefix, *(str(p) for p in parts)])

    def _event_keys(self) -> list[str]:
        return [self._k("epoch"), self._k("seq")]

    def _event_args(self) -> list[str]:
        return [uuid.uuid4().hex, self.channel]

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis at {self.url} failed during {what}: {exc}") from exc

    # -- API --------------------------------------------------------------------------------

    async def put(
        self,
        name: str,
        data: bytes,
        *,
        validate: Validator | None = None,
        sha256: str | None = None,
        promote: Promote = None,
    ) -> PutResult:
        validate_qualified_name(name)

        def check() -> str:
            if validate is not None:
                validate(data)
            return sha256 if sha256 is not None else hashlib.sha256(data).hexdigest()

        # Validation and hashing of a multi-MB upload would stall the event loop.
        digest = await asyncio.to_thread(check) if validate or sha256 is None else sha256
        staging = self._k("staging", uuid.uuid4().hex)
        keys = [
            *self._event_keys(),
            self._k("index"),
            self._k("traffic"),
            self._k("versions", name),
            self._k("sha", name),
            self._k("ver", name),
            staging,
        ]
        args = [
            *self._event_args(),
            *(name, digest, str(len(data)), utc_now(), self._k("blob", name, "")),
            {True: "1", False: "0", None: ""}[promote],
        ]

        async def write() -> list[Any]:
            await self._client.set(staging, data, px=STAGING_TTL_MS)
            return await self._put(keys=keys, args=args)  # type: ignore[no-any-return]

        reply = await self._call("put", write)
        if reply[0] == -1:
            raise StoreUnavailable(f"redis at {self.url} lost the uploaded bytes; retry")
        return PutResult(_info(reply[1]), created=bool(reply[0]), current=bool(reply[2]))

    async def get(self, name: str, version: int | None = None) -> StoredTuner:
        validate_qualified_name(name)
        if version is None:
            raw = await self._call("get", lambda: self._client.hget(self._k("index"), name))
            if raw is None:
                raise TunerNotFound(name)
            info = _info(raw)
            blob = await self._call(
                "get", lambda: self._client.get(self._k("blob", name, info.version))
            )
        else:

            async def read() -> list[Any]:
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.hexists(self._k("index"), name)
                    pipe.hget(self._k("versions", name), str(version))
                    pipe.get(self._k("blob", name, version))
                    return await pipe.execute()  # type: ignore[no-any-return]

            exists, raw, blob = await self._call("get", read)
            if not exists:
                raise TunerNotFound(name)
            if raw is None:
                raise VersionNotFound(name, version)
            info = _info(raw)
        if blob is None:
            # Deleted between reading the index and the blob, or the keyspace lost it.
            await self.versions(name)  # raises TunerNotFound if the name is gone
            raise StoreCorrupt(f"blob of {name!r} version {info.version} is missing")
        assert isinstance(blob, bytes)  # the client never decodes responses
        return StoredTuner(info, blob)

    async def delete(self, name: str) -> None:
        validate_qualified_name(name)
        keys = [
            *self._event_keys(),
            self._k("index"),
            self._k("traffic"),
            self._k("versions", name),
            self._k("sha", name),
        ]
        args = [*self._event_args(), name, self._k("blob", name, "")]
        if not await self._call("delete", lambda: self._delete(keys=keys, args=args)):
            raise TunerNotFound(name)

    async def delete_version(self, name: str, version: int, *, force: bool = False) -> VersionInfo:
        validate_qualified_name(name)
        keys = [
            *self._event_keys(),
            self._k("index"),
            self._k("traffic"),
            self._k("versions", name),
            self._k("sha", name),
        ]

        async def read() -> list[Any]:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hget(self._k("index"), name)
                pipe.hget(self._k("traffic"), name)
                pipe.hvals(self._k("versions", name))
                return await pipe.execute()  # type: ignore[no-any-return]

        for _ in range(DELETE_VERSION_TRIES):
            current, traffic, values = await self._call("delete_version", read)
            if current is None:
                raise TunerNotFound(name)
            infos = {i.version: i for i in (_info(v) for v in values)}
            weights = {int(v): int(w) for v, w in json.loads(traffic or b"{}").items()}
            new_current, new_traffic = without_version(
                name,
                version,
                current=_info(current).version,
                versions=infos,
                traffic=weights,
                force=force,
            )
            doc = json.dumps({str(v): w for v, w in new_traffic.items()}) if new_traffic else ""
            args = [
                *self._event_args(),
                *(name, str(version), current, traffic or b"", str(new_current), doc),
                *(self._k("blob", name, ""), infos[version].sha256, str(len(infos))),
            ]
            reply = await self._call("delete_version", functools.partial(self._cas, keys, args))
            if reply[0] == 0:
                raise TunerNotFound(name)
            if reply[0] == 1:
                return _info(reply[1])
        raise StoreUnavailable(
            f"version {version} of {name!r} kept changing during delete ({DELETE_VERSION_TRIES} "
            "tries); retry"
        )

    async def _cas(self, keys: builtins.list[str], args: builtins.list[Any]) -> builtins.list[Any]:
        return await self._delete_version(keys=keys, args=args)  # type: ignore[no-any-return]

    async def list(self) -> dict[str, VersionInfo]:
        raw = await self._call(
            "list",
            lambda: self._client.hgetall(self._k("index")),  # type: ignore[arg-type,return-value]
        )
        infos = (_info(v) for v in raw.values())
        return {i.name: i for i in sorted(infos, key=lambda i: i.name)}

    async def versions(self, name: str) -> builtins.list[VersionInfo]:
        validate_qualified_name(name)

        async def read() -> list[Any]:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hexists(self._k("index"), name)
                pipe.hvals(self._k("versions", name))
                return await pipe.execute()  # type: ignore[no-any-return]

        exists, values = await self._call("versions", read)
        if not exists:
            raise TunerNotFound(name)
        return sorted((_info(v) for v in values), key=lambda i: i.version)

    async def set_current(self, name: str, version: int) -> VersionInfo:
        validate_qualified_name(name)
        keys = [
            *self._event_keys(),
            self._k("index"),
            self._k("traffic"),
            self._k("versions", name),
        ]
        args = [*self._event_args(), name, str(version)]
        reply = await self._call("set_current", lambda: self._set_current(keys=keys, args=args))
        if reply[0] == 0:
            raise TunerNotFound(name)
        if reply[0] == -1:
            raise VersionNotFound(name, version)
        return _info(reply[1])

    async def get_traffic(self, name: str) -> dict[int, int]:
        validate_qualified_name(name)

        async def read() -> list[Any]:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hget(self._k("index"), name)
                pipe.hget(self._k("traffic"), name)
                return await pipe.execute()  # type: ignore[no-any-return]

        current, traffic = await self._call("get_traffic", read)
        if current is None:
            raise TunerNotFound(name)
        if traffic is None:
            return {_info(current).version: 100}
        return {int(v): int(w) for v, w in json.loads(traffic).items()}

    async def set_traffic(self, name: str, weights: Mapping[int, int]) -> dict[int, int]:
        known = {v.version for v in await self.versions(name)}
        clean = check_traffic(name, weights, known)
        keys = [
            *self._event_keys(),
            self._k("index"),
            self._k("traffic"),
            self._k("versions", name),
        ]
        doc = json.dumps({str(v): w for v, w in clean.items()})
        args = [*self._event_args(), name, doc, *(str(v) for v in clean)]
        reply = await self._call("set_traffic", lambda: self._set_traffic(keys=keys, args=args))
        if reply == 0:
            raise TunerNotFound(name)
        if reply == -1:
            # A version vanished between reading and writing: only a concurrent delete does that.
            raise TunerNotFound(name)
        return clean

    async def ping(self) -> None:
        await self._call("ping", self._client.ping)  # type: ignore[arg-type]

    async def close(self) -> None:
        await self._client.aclose()

    # -- watching ---------------------------------------------------------------------------

    async def _position(self, client: aioredis.Redis) -> tuple[str | None, int]:
        async with client.pipeline(transaction=True) as pipe:
            pipe.get(self._k("epoch"))
            pipe.get(self._k("seq"))
            epoch, seq = await pipe.execute()
        return (epoch.decode() if epoch is not None else None), int(seq or 0)

    async def watch(self) -> AsyncGenerator[StoreEvent, None]:
        """Subscribe to the event channel; ``resync`` on (re)connect and on any detected gap.

        While Redis is unreachable this yields one ``lost``, then waits (reconnecting with a
        backoff from ``RECONNECT_FIRST_S`` doubling up to ``reconnect_max_s``) and yields
        nothing until it is back. The cap is what bounds how stale a replica stays after an
        outage, and a refused connect four times a second costs nothing.
        """
        delay = RECONNECT_FIRST_S
        lost = False
        while True:
            # A dedicated client without retries: redis-py's own reconnect would resubscribe
            # silently and hide the messages lost meanwhile.
            client = aioredis.Redis.from_url(
                self._redis_url,
                socket_connect_timeout=self._connect_timeout_s,
                socket_timeout=self._socket_timeout_s,
                socket_keepalive=True,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=self._health_check_s,
            )
            pubsub = client.pubsub()
            failure: Exception | None = None
            try:
                await pubsub.subscribe(self.channel)
                # Only once the server confirmed the subscription is every later change
                # guaranteed to reach us, so the snapshot position is read after it.
                while True:
                    msg = await pubsub.get_message(timeout=self._socket_timeout_s)
                    if msg is not None and msg["type"] == "subscribe":
                        break
                epoch, seq = await self._position(client)
                delay = RECONNECT_FIRST_S
                lost = False
                yield StoreEvent("resync")
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None or msg["type"] != "message":
                        continue
                    event = json.loads(msg["data"])
                    if event["seq"] <= seq and event["epoch"] == epoch:
                        continue  # already reflected in the state read at the last resync
                    if event["seq"] != seq + 1 or epoch not in (None, event["epoch"]):
                        log.info("tuner store watch: missed events on %s; resync", self.channel)
                        epoch, seq = await self._position(client)
                        yield StoreEvent("resync")
                        continue
                    epoch, seq = event["epoch"], event["seq"]
                    yield StoreEvent(event["kind"], event["name"], event.get("version"))
            except (TimeoutError, RedisError, OSError) as exc:
                failure = exc
            finally:
                await _quietly(pubsub.aclose())  # type: ignore[no-untyped-call]
                await _quietly(client.aclose())
            if not lost:
                log.warning(
                    "tuner store watch: %s unreachable (%s); reconnecting every %.2fs at most",
                    self.url,
                    failure,
                    self._reconnect_max_s,
                )
                lost = True
                yield StoreEvent("lost")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._reconnect_max_s)


async def _quietly(op: Awaitable[Any]) -> None:
    with contextlib.suppress(RedisError, OSError):
        await op


def _info(raw: bytes | str) -> VersionInfo:
    return VersionInfo.from_dict(json.loads(raw))
