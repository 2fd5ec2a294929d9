"""Redis backends: the route table, the gateway registry and seq ceilings, shared by processes.

Needs the ``redis`` extra (``pip install imkit[redis]``, redis-py's asyncio client;
``redis[hiredis]`` parses replies faster) and a Redis server (tested on 7.0; the
scripts read ``TIME`` before writing, which needs script effects replication, the
default since Redis 5). ``imkit.aio`` does not import this module: import it as
``imkit.aio.redis``.

:class:`RedisRouteTable` (an :class:`~imkit.routetable.AsyncRouteTable`)
    Keys, for ``prefix="imkit:rt"``::

        imkit:rt:r            hash  uid -> the user's routes, live and parked, in bind
                                    order: per device "<len>:<device><len>:<gateway>
                                    <epoch>|<conn_id>|<disconnected_ms>;" (no
                                    disconnected_ms while live; lengths in bytes)
        imkit:rt:g:<gateway>  set   the live routes on that gateway, "<len(uid)>:<uid><device>"
        imkit:rt:q            zset  parked routes, scored by disconnected_ms (the expiry queue)
        imkit:rt:n            int   routes held, live plus parked (for max_routes)

    One hash field per user keeps a user's devices together (a user has a handful)
    and makes the hot read, ``group_by_gateway``, a plain ``HMGET``: about 0.25 us
    of server time per uid, where a Lua loop over one key per user took 3 us and
    the server's CPU is what every process shares. (The client then reads one
    reply item per uid: ``redis[hiredis]`` makes that ten times cheaper.)
    Every write is one Lua script (``EVALSHA``, loaded again on ``NOSCRIPT`` after
    a restart or ``SCRIPT FLUSH``), so fencing, the device cap, the gateway index
    and the count change together or not at all, whichever process calls.
    Epochs are compared as decimal strings (length, then text): Lua numbers are
    doubles and snowflake epochs exceed 2**53.

    Time is the Redis server's (``TIME`` inside the scripts): one clock for every
    process, so no gateway's clock skew decides when a route expires. Keys carry no
    TTL (Redis 7.0 has no per-field ``HEXPIRE``): a parked route leaves when some
    process calls :meth:`~RedisRouteTable.expire`, which pops the due entries of
    the queue inside a script: each route is reported to exactly one caller, however
    many processes poll. (At most once, strictly: if the connection drops after the
    script ran, that caller never sees the routes it removed.)

    ``group_by_gateway`` is **one round trip**: an ``HMGET`` of at most
    ``batch_size`` uids, several in one pipeline for a larger batch (no script).
    ``unbind_gateway`` and ``expire`` work in scripts of at most ``batch_size``
    routes, so one call never blocks the server for long (a few milliseconds per
    script, see :data:`DEFAULT_REDIS_BATCH`); they loop until done.

:class:`RedisRegistry` (an :class:`~imkit.discovery.Registry`)
    A hash per gateway and a sorted set of deadlines (Redis time), updated by
    scripts; ``rank`` fetches the live entries and orders them with the sans-IO
    :class:`~imkit.discovery.GatewayTable` rules, so every backend ranks alike.

:class:`RedisCeilingStore`
    Seq-lease ceilings (the awaited form of :class:`imkit.seq.CeilingStore`); a
    ceiling only grows (a script keeps the larger value).

Failures
    Any error of the client or the connection is raised as
    :class:`~imkit.errors.BackendError` with the cause chained; the outcome of that
    call is unknown, as it is for a call cancelled while awaiting Redis (binds and
    unbinds may be retried: a repeated bind answers ``UNCHANGED``, a repeated unbind
    ``NOT_FOUND``). A client built here from a URL does not retry on its own (a
    blind retry could run a script twice and lose its answer), times out after
    ``timeout_ms`` and keeps at most ``max_connections`` (further calls wait for a
    free one). Routes live only in Redis: a server that restarts without
    persistence comes back empty, and the routes come back as clients reconnect
    and gateways re-bind their connections; until then pushes to those users wait
    in the store and are synced on reconnect.

Scope: one Redis server (or a Sentinel-managed primary). Not Redis Cluster: bind
and unbind touch a key they compute (the index of the gateway a route leaves).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

try:
    from redis.asyncio import BlockingConnectionPool, Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import NoScriptError, RedisError
except ImportError as exc:  # pragma: no cover - the extra is installed in the dev venv
    raise ImportError("imkit.aio.redis needs redis-py: pip install 'imkit[redis]'") from exc

from imkit.discovery import (
    DEFAULT_LOAD_BAND,
    DEFAULT_MAX_ENDPOINTS,
    DEFAULT_MAX_GATEWAYS,
    DEFAULT_TTL_MS,
    GatewayInfo,
    GatewayTable,
)
from imkit.errors import BackendError, CapacityError, ConfigError
from imkit.routetable import (
    DEFAULT_GRACE_MS,
    DEFAULT_MAX_DEVICES,
    Binding,
    BindResult,
    Route,
    UnbindResult,
)

__all__ = [
    "DEFAULT_REDIS_BATCH",
    "DEFAULT_REDIS_MAX_CONNECTIONS",
    "DEFAULT_REDIS_MAX_ROUTES",
    "DEFAULT_REDIS_TIMEOUT_MS",
    "RedisCeilingStore",
    "RedisRegistry",
    "RedisRouteTable",
]

#: Uids per HMGET (group_by_gateway) and routes per script (unbind_gateway,
#: expire). One command blocks the whole server while it runs; measured server time
#: (benchmarks/bench_redis.py, INFO commandstats, a loaded 2-core machine) is 0.3 to
#: 0.6 us per uid read and 5 to 10 us per route parked or expired, so 500 holds
#: Redis for at most 0.3 ms (a read) or 5 ms (a script), pauses other clients
#: barely notice, while a 1000-member group still costs one round trip (two
#: HMGETs in one pipeline).
DEFAULT_REDIS_BATCH = 500
#: Routes in the shared table, live plus parked. Ten times the one-process default:
#: at about 145 bytes per live route and 210 per parked one in Redis (MEMORY USAGE,
#: benchmarks/bench_redis.py), 10 M routes need 1.5 to 2.1 GB, what a modest
#: dedicated Redis holds.
DEFAULT_REDIS_MAX_ROUTES = 10_000_000
#: Socket connect and read timeout of a client built from a URL. A command takes
#: well under 1 ms on a LAN; 2 s without an answer means the server is gone or
#: stuck, and the caller (a login, a push) should fail fast rather than hang.
DEFAULT_REDIS_TIMEOUT_MS = 2_000
#: Connections of a client built from a URL; past them a call waits for a free one
#: (up to timeout_ms) instead of failing. Redis runs one command at a time, so a
#: few dozen connections per process keep it busy; each costs the server ~20 KB.
DEFAULT_REDIS_MAX_CONNECTIONS = 64

_ROUTES_PREFIX = "imkit:rt"
_GATEWAYS_PREFIX = "imkit:gw"
_SEQ_PREFIX = "imkit:seq"

# -- plumbing ---------------------------------------------------------------------


@contextmanager
def _backend_errors(what: str) -> Iterator[None]:
    """Re-raise client and socket errors as BackendError (cause chained)."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise BackendError(f"redis {what} failed: {exc}") from exc


def _connect(
    client_or_url: Redis | str, timeout_ms: int, max_connections: int
) -> tuple[Redis, bool]:
    """(client, owned): a URL gets a client of our own: no automatic retries, and a
    pool where a call waits (up to ``timeout_ms``) for one of ``max_connections``."""
    if isinstance(client_or_url, str):
        _check_int("timeout_ms", timeout_ms, 1)
        _check_int("max_connections", max_connections, 1)
        try:
            pool = BlockingConnectionPool.from_url(
                client_or_url,
                max_connections=max_connections,
                timeout=timeout_ms / 1000,
                socket_timeout=timeout_ms / 1000,
                socket_connect_timeout=timeout_ms / 1000,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:  # not a redis:// URL (nothing connects yet)
            raise ConfigError(f"bad Redis URL {client_or_url!r}: {exc}") from exc
        return Redis.from_pool(pool), True
    if not isinstance(client_or_url, Redis):
        raise ConfigError(f"expected a redis.asyncio.Redis or a URL, got {client_or_url!r}")
    return client_or_url, False


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")


def _text(value: object) -> str:
    """A reply item as str (clients may or may not decode responses)."""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


_LUA_PRELUDE = """
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local function now_ms(given)
  if given ~= '' then return given end
  local t = redis.call('TIME')
  return string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
local function unmember(m)
  local colon = string.find(m, ':', 1, true)
  local n = tonumber(string.sub(m, 1, colon - 1))
  return string.sub(m, colon + 1, colon + n), string.sub(m, colon + n + 1)
end
local function bulk(cmd, key, items)
  for i = 1, #items, 1000 do
    redis.call(cmd, key, unpack(items, i, math.min(i + 999, #items)))
  end
end
local function packed(fields)
  local lens = {}
  for i = 1, #fields do lens[i] = #fields[i] end
  return {table.concat(lens, ','), table.concat(fields)}
end
-- A user's routes: per device "<len>:<device><len>:<gateway><epoch>|<conn>|<disc>;"
-- decoded as {device, gateway, epoch, conn_id, disconnected_ms ('' while live)}.
local function decode(v)
  local recs, pos = {}, 1
  while pos <= #v do
    local c = string.find(v, ':', pos, true)
    local n = tonumber(string.sub(v, pos, c - 1))
    local device = string.sub(v, c + 1, c + n)
    pos = c + n + 1
    c = string.find(v, ':', pos, true)
    n = tonumber(string.sub(v, pos, c - 1))
    local gw = string.sub(v, c + 1, c + n)
    pos = c + n + 1
    local semi = string.find(v, ';', pos, true)
    local e, cn, d = string.match(string.sub(v, pos, semi - 1), '^(%d+)|(-?%d+)|(%d*)$')
    recs[#recs + 1] = {device, gw, e, cn, d}
    pos = semi + 1
  end
  return recs
end
local function encode(recs)
  local parts = {}
  for i, r in ipairs(recs) do
    parts[i] = #r[1] .. ':' .. r[1] .. #r[2] .. ':' .. r[2]
      .. r[3] .. '|' .. r[4] .. '|' .. r[5] .. ';'
  end
  return table.concat(parts)
end
local function find(recs, device)
  for i, r in ipairs(recs) do
    if r[1] == device then return i end
  end
  return nil
end
local function store(key, uid, recs)
  if #recs == 0 then
    redis.call('HDEL', key, uid)
  else
    redis.call('HSET', key, uid, encode(recs))
  end
end
"""


class _Script:
    """A Lua script run by ``EVALSHA``, loaded again when the server says ``NOSCRIPT``."""

    __slots__ = ("sha", "source")

    def __init__(self, body: str) -> None:
        self.source = _LUA_PRELUDE + body
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def run(self, client: Redis, keys: Sequence[str], args: Sequence[object]) -> Any:
        """One call: one round trip (two more after a server restart). Raises RedisError."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[arg-type]
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[arg-type]


def _fields(lengths: object, data: object) -> list[bytes]:
    """The fields of a ``packed()`` script reply: one bulk string instead of thousands
    of items, which a pure-Python RESP parser reads at a few microseconds apiece."""
    if isinstance(data, str):  # a client with decode_responses=True
        data = data.encode()
    text = _text(lengths)
    if not text or not isinstance(data, bytes):
        return []
    out = []
    pos = 0
    for n in map(int, text.split(",")):
        out.append(data[pos : pos + n])
        pos += n
    return out


# -- the route table ----------------------------------------------------------------

# Codes shared by the scripts and the Python side.
_BIND_RESULTS = (
    BindResult.BOUND,
    BindResult.RESUMED,
    BindResult.REPLACED,
    BindResult.UNCHANGED,
    BindResult.STALE,
)
_UNBIND_RESULTS = (UnbindResult.GRACE, UnbindResult.STALE, UnbindResult.NOT_FOUND)

# KEYS: routes, new gateway's index, queue, count.
# ARGV: prefix, uid, device, epoch, conn_id, gateway, max_devices, max_routes.
_BIND = _Script("""
local uid, device, epoch, conn, gw = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local member = #uid .. ':' .. uid .. device
local v = redis.call('HGET', KEYS[1], uid)
local recs = v and decode(v) or {}
local i = find(recs, device)
if not i then
  if #recs >= tonumber(ARGV[7]) then return {-1, #recs} end
  local n = tonumber(redis.call('GET', KEYS[4]) or '0')
  if n >= tonumber(ARGV[8]) then return {-2, n} end
  recs[#recs + 1] = {device, gw, epoch, conn, ''}
  store(KEYS[1], uid, recs)
  redis.call('SADD', KEYS[2], member)
  redis.call('INCR', KEYS[4])
  return {0}
end
local r = recs[i]
if r[5] == '' then
  if newer(epoch, r[3]) then
    recs[i] = {device, gw, epoch, conn, ''}
    store(KEYS[1], uid, recs)
    if r[2] ~= gw then
      redis.call('SREM', ARGV[1] .. 'g:' .. r[2], member)
      redis.call('SADD', KEYS[2], member)
    end
    return {2}
  end
  if epoch == r[3] and conn == r[4] and gw == r[2] then return {3} end
  return {4}
end
if not newer(epoch, r[3]) then return {4} end
recs[i] = {device, gw, epoch, conn, ''}
store(KEYS[1], uid, recs)
redis.call('ZREM', KEYS[3], member)
redis.call('SADD', KEYS[2], member)
return {1}
""")

# KEYS: routes, queue. ARGV: prefix, uid, device, conn_id, epoch, now ('' = TIME).
_UNBIND = _Script("""
local uid, device = ARGV[2], ARGV[3]
local v = redis.call('HGET', KEYS[1], uid)
if not v then return 2 end
local recs = decode(v)
local i = find(recs, device)
if not i or recs[i][5] ~= '' then return 2 end
local r = recs[i]
if r[4] ~= ARGV[4] or r[3] ~= ARGV[5] then return 1 end
local now = now_ms(ARGV[6])
local member = #uid .. ':' .. uid .. device
r[5] = now
store(KEYS[1], uid, recs)
redis.call('SREM', ARGV[1] .. 'g:' .. r[2], member)
redis.call('ZADD', KEYS[2], now, member)
return 0
""")

# KEYS: gateway index, queue, routes. ARGV: gateway, batch, now.
# Reply: {members popped, packed(uid, device, epoch, conn_id per route parked)}.
_UNBIND_GATEWAY = _Script("""
local members = redis.call('SPOP', KEYS[1], tonumber(ARGV[2]))
local now = now_ms(ARGV[3])
local out, queued = {}, {}
for _, m in ipairs(members) do
  local uid, device = unmember(m)
  local v = redis.call('HGET', KEYS[3], uid)
  if v then
    local recs = decode(v)
    local i = find(recs, device)
    local r = i and recs[i]
    if r and r[5] == '' and r[2] == ARGV[1] then
      r[5] = now
      store(KEYS[3], uid, recs)
      queued[#queued + 1] = now
      queued[#queued + 1] = m
      out[#out + 1] = uid
      out[#out + 1] = device
      out[#out + 1] = r[3]
      out[#out + 1] = r[4]
    end
  end
end
bulk('ZADD', KEYS[2], queued)
local reply = packed(out)
return {#members, reply[1], reply[2]}
""")

# KEYS: queue, count, routes. ARGV: grace_ms, limit, now.
# Reply: {members taken, packed(uid, device, epoch, conn_id, gateway per route expired)}.
_EXPIRE = _Script("""
local cutoff = tonumber(now_ms(ARGV[3])) - tonumber(ARGV[1])
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff, 'LIMIT', 0, tonumber(ARGV[2]))
if #members == 0 then return {0, '', ''} end
bulk('ZREM', KEYS[1], members)
local out = {}
for _, m in ipairs(members) do
  local uid, device = unmember(m)
  local v = redis.call('HGET', KEYS[3], uid)
  if v then
    local recs = decode(v)
    local i = find(recs, device)
    if i and recs[i][5] ~= '' then
      local r = table.remove(recs, i)
      store(KEYS[3], uid, recs)
      out[#out + 1] = uid
      out[#out + 1] = device
      out[#out + 1] = r[3]
      out[#out + 1] = r[4]
      out[#out + 1] = r[2]
    end
  end
end
if #out > 0 then redis.call('DECRBY', KEYS[2], #out / 5) end
local reply = packed(out)
return {#members, reply[1], reply[2]}
""")


def _decode(uid: str, value: bytes) -> list[tuple[Route, int | None]]:
    """A user's stored routes (see the module doc) as (route, disconnected_ms) pairs."""
    out = []
    pos = 0
    end = len(value)
    while pos < end:
        colon = value.index(b":", pos)
        start = colon + 1
        pos = start + int(value[pos:colon])
        device = value[start:pos].decode()
        colon = value.index(b":", pos)
        start = colon + 1
        pos = start + int(value[pos:colon])
        gateway = value[start:pos].decode()
        semi = value.index(b";", pos)
        epoch, conn, disconnected = value[pos:semi].split(b"|")
        pos = semi + 1
        route = Route(uid=uid, device=device, gateway=gateway, conn_id=int(conn), epoch=int(epoch))
        out.append((route, int(disconnected) if disconnected else None))
    return out


def _validate(route: Route) -> None:
    if not route.uid or not route.device or not route.gateway:
        raise ConfigError("route uid, device and gateway must be non-empty")
    if isinstance(route.epoch, bool) or not isinstance(route.epoch, int) or route.epoch < 0:
        raise ConfigError(f"route epoch must be an int >= 0, got {route.epoch!r}")
    if isinstance(route.conn_id, bool) or not isinstance(route.conn_id, int):
        raise ConfigError(f"route conn_id must be an int, got {route.conn_id!r}")


class RedisRouteTable:
    """The route table in Redis, shared by every gateway and logic process.

    Same contract as :class:`~imkit.aio.routes.MemoryRouteTable` (see
    :class:`~imkit.routetable.AsyncRouteTable`); the layout and the scripts are in
    the module doc. Costs (server work; round trips), d = devices of the user
    (<= ``max_devices``), k = uids asked for, g = routes of the gateway, e = routes
    expired, n = routes parked, b = ``batch_size``:

    * ``bind``, ``unbind``, ``get``: O(d); 1.
    * ``lookup``: O(d); 1.
    * ``group_by_gateway``: O(k + routes found); 1 (k/b scripts in one pipeline).
    * ``unbind_gateway``: O(g log n); g/b + 1.
    * ``expire``: O(e log n); e/b + 1.
    * ``count``: O(1); 1.

    ``client_or_url``: a ``redis.asyncio.Redis`` (shared, not closed by
    :meth:`aclose`; its retry policy applies) or a URL (a client of our own, see
    the module doc). ``clock``: None for the server's ``TIME`` (production);
    a callable returning ms makes every process use it instead (tests; all
    processes must then share one clock). Every process must use the same
    ``prefix``, ``grace_ms``, ``max_devices`` and ``max_routes``.
    """

    def __init__(
        self,
        client_or_url: Redis | str,
        *,
        prefix: str = _ROUTES_PREFIX,
        grace_ms: int = DEFAULT_GRACE_MS,
        max_devices: int = DEFAULT_MAX_DEVICES,
        max_routes: int = DEFAULT_REDIS_MAX_ROUTES,
        batch_size: int = DEFAULT_REDIS_BATCH,
        timeout_ms: int = DEFAULT_REDIS_TIMEOUT_MS,
        max_connections: int = DEFAULT_REDIS_MAX_CONNECTIONS,
        clock: Callable[[], int] | None = None,
    ) -> None:
        """A handle on the table under ``prefix`` (no I/O here). O(1)."""
        _check_int("grace_ms", grace_ms, 0)
        _check_int("max_devices", max_devices, 1)
        _check_int("max_routes", max_routes, 1)
        _check_int("batch_size", batch_size, 1)
        if not isinstance(prefix, str) or not prefix:
            raise ConfigError("prefix must be a non-empty string")
        self._client, self._owned = _connect(client_or_url, timeout_ms, max_connections)
        self._grace_ms = grace_ms
        self._max_devices = max_devices
        self._max_routes = max_routes
        self.batch_size = batch_size
        self.prefix = prefix
        self._p = prefix + ":"
        self._routes = self._p + "r"
        self._queue = self._p + "q"
        self._count = self._p + "n"
        self._clock = clock

    @property
    def grace_ms(self) -> int:
        """How long an unbound route stays parked. O(1)."""
        return self._grace_ms

    @property
    def max_devices(self) -> int:
        """Devices per user, live or in grace. O(1)."""
        return self._max_devices

    @property
    def max_routes(self) -> int:
        """Routes in the table, live or in grace. O(1)."""
        return self._max_routes

    @property
    def client(self) -> Redis:
        """The Redis client in use. O(1)."""
        return self._client

    def _now(self) -> str:
        return "" if self._clock is None else str(self._clock())

    # -- writes -----------------------------------------------------------------

    async def bind(self, route: Route) -> BindResult:
        """Make ``route`` the live route of its (uid, device) if its epoch allows.

        One script, one round trip. Raises ConfigError for an empty uid, device
        or gateway or a negative epoch, CapacityError past ``max_devices`` or
        ``max_routes`` (nothing changed), BackendError if Redis fails.
        """
        _validate(route)
        keys = (self._routes, self._p + "g:" + route.gateway, self._queue, self._count)
        args = (
            self._p,
            route.uid,
            route.device,
            route.epoch,
            route.conn_id,
            route.gateway,
            self._max_devices,
            self._max_routes,
        )
        with _backend_errors("bind"):
            reply = await _BIND.run(self._client, keys, args)
        code = int(reply[0])
        if code == -1:
            raise CapacityError("max_devices", self._max_devices, f"{reply[1]} devices bound")
        if code == -2:
            raise CapacityError("max_routes", self._max_routes)
        return _BIND_RESULTS[code]

    async def unbind(self, uid: str, device: str, conn_id: int, epoch: int) -> UnbindResult:
        """Park the live route of connection (conn_id, epoch) for ``grace_ms``. One round trip.

        Fenced: ``STALE`` if another connection holds (uid, device), ``NOT_FOUND``
        if nothing is live there.
        """
        keys = (self._routes, self._queue)
        args = (self._p, uid, device, conn_id, epoch, self._now())
        with _backend_errors("unbind"):
            code = await _UNBIND.run(self._client, keys, args)
        return _UNBIND_RESULTS[int(code)]

    async def unbind_gateway(self, gateway: str) -> list[Route]:
        """Park every live route on ``gateway``; returns them. O(g log n) in g/b + 1 scripts.

        Each script takes at most ``batch_size`` routes from the gateway's index, so
        the whole call is not atomic: a bind on that gateway made meanwhile may be
        parked too (it is being declared dead anyway).
        """
        keys = (self._p + "g:" + gateway, self._queue, self._routes)
        out: list[Route] = []
        while True:
            args = (gateway, self.batch_size, self._now())
            with _backend_errors("unbind_gateway"):
                reply = await _UNBIND_GATEWAY.run(self._client, keys, args)
            f = _fields(reply[1], reply[2])
            out.extend(
                Route(
                    uid=f[i].decode(),
                    device=f[i + 1].decode(),
                    gateway=gateway,
                    conn_id=int(f[i + 3]),
                    epoch=int(f[i + 2]),
                )
                for i in range(0, len(f), 4)
            )
            if int(reply[0]) < self.batch_size:
                return out

    async def expire(self, limit: int | None = None) -> list[Route]:
        """Remove and return parked routes whose grace ran out, oldest first.

        At most ``limit`` (None: all due). Each route is returned to exactly one
        caller across all processes (a script pops it). O(e log n), e/b + 1 scripts.
        """
        if limit is not None:
            _check_int("limit", limit, 0)
        out: list[Route] = []
        keys = (self._queue, self._count, self._routes)
        while limit is None or len(out) < limit:
            want = self.batch_size if limit is None else min(self.batch_size, limit - len(out))
            args = (self._grace_ms, want, self._now())
            with _backend_errors("expire"):
                reply = await _EXPIRE.run(self._client, keys, args)
            f = _fields(reply[1], reply[2])
            out.extend(
                Route(
                    uid=f[i].decode(),
                    device=f[i + 1].decode(),
                    gateway=f[i + 4].decode(),
                    conn_id=int(f[i + 3]),
                    epoch=int(f[i + 2]),
                )
                for i in range(0, len(f), 5)
            )
            if int(reply[0]) < want:
                break
        return out

    # -- reads --------------------------------------------------------------------

    async def _held(self, uid: str) -> list[tuple[Route, int | None]]:
        with _backend_errors("read"):
            value = await self._client.hget(self._routes, uid)
        return _decode(uid, _raw(value)) if value is not None else []

    async def get(self, uid: str, device: str) -> Binding | None:
        """What is held for (uid, device), live or parked, or None. One ``HGET``, O(d)."""
        for route, disconnected in await self._held(uid):
            if route.device == device:
                return Binding(route=route, disconnected_ms=disconnected)
        return None

    async def lookup(self, uid: str) -> tuple[Route, ...]:
        """The live routes of ``uid``, in bind order. One ``HGET``, O(d)."""
        return tuple(route for route, disconnected in await self._held(uid) if disconnected is None)

    async def group_by_gateway(self, uids: Iterable[str]) -> dict[str, list[Route]]:
        """Live routes of ``uids`` grouped by gateway. One round trip for any number of uids.

        One ``HMGET`` per ``batch_size`` uids, all in one pipeline (no script: the
        server's cheapest read); offline users are absent, a uid given twice counts
        twice. O(k + routes found).
        """
        members = list(uids)
        if not members:
            return {}
        size = self.batch_size
        chunks = [members[i : i + size] for i in range(0, len(members), size)]
        with _backend_errors("group_by_gateway"):
            if len(chunks) == 1:
                replies = [await self._client.hmget(self._routes, members)]
            else:
                pipe = self._client.pipeline(transaction=False)
                for chunk in chunks:
                    pipe.hmget(self._routes, chunk)
                replies = await pipe.execute()
        out: dict[str, list[Route]] = {}
        for chunk, reply in zip(chunks, replies, strict=True):
            for uid, value in zip(chunk, reply, strict=True):
                if value is None:
                    continue
                for route, disconnected in _decode(uid, _raw(value)):
                    if disconnected is None:
                        bucket = out.get(route.gateway)
                        if bucket is None:
                            out[route.gateway] = [route]
                        else:
                            bucket.append(route)
        return out

    async def count(self) -> int:
        """Routes held, live plus parked. One ``GET``."""
        with _backend_errors("count"):
            value = await self._client.get(self._count)
        return 0 if value is None else int(value)

    async def aclose(self) -> None:
        """Close the client if this table made it from a URL. Idempotent."""
        if self._owned:
            with _backend_errors("close"):
                await self._client.aclose()

    def __repr__(self) -> str:
        return f"RedisRouteTable(prefix={self.prefix!r}, grace_ms={self._grace_ms})"

    async def _check(self) -> None:
        """Assert every invariant of the stored table (for tests). O(keys under prefix)."""
        client = self._client
        live: dict[str, set[bytes]] = {}
        parked: dict[bytes, int] = {}
        total = 0
        async for uid_raw, value in client.hscan_iter(self._routes, count=1000):
            uid = _text(uid_raw)
            held = _decode(uid, _raw(value))
            devices = [route.device for route, _ in held]
            if not held:
                raise AssertionError(f"empty routes kept for {uid!r}")
            if len(held) > self._max_devices:
                raise AssertionError(f"{uid!r} holds {len(held)} > max_devices routes")
            if len(set(devices)) != len(devices):
                raise AssertionError(f"{uid!r} holds a device twice: {devices}")
            for route, disconnected in held:
                member = _member(uid, route.device)
                if disconnected is None:
                    live.setdefault(route.gateway, set()).add(member)
                else:
                    parked[member] = disconnected
            total += len(held)
        if total != await self.count():
            raise AssertionError(f"count {await self.count()} != {total} routes held")
        if total > self._max_routes:
            raise AssertionError(f"{total} routes > max_routes={self._max_routes}")
        index: dict[str, set[bytes]] = {}
        async for key in client.scan_iter(match=_glob(self._p + "g:") + "*", count=1000):
            members = await client.smembers(key)
            index[_text(key)[len(self._p) + 2 :]] = {_raw(m) for m in members}
        if index != live:
            raise AssertionError(f"gateway index {index} != live routes {live}")
        queue: Any = await client.zrange(self._queue, 0, -1, withscores=True)
        if {_raw(m): int(s) for m, s in queue} != parked:
            raise AssertionError("expiry queue and parked routes disagree")


def _member(uid: str, device: str) -> bytes:
    raw = uid.encode()
    return b"%d:" % len(raw) + raw + device.encode()


def _raw(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _glob(text: str) -> str:
    """``text`` with Redis glob characters escaped, for SCAN MATCH."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


# -- the gateway registry -----------------------------------------------------------

_REGISTRY_DROP_DEAD = """
local function drop_dead(zkey, prefix, now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', zkey, '-inf', now)) do
    redis.call('DEL', prefix .. 'gw:' .. id)
  end
  redis.call('ZREMRANGEBYSCORE', zkey, '-inf', now)
end
"""

# KEYS: gateway hash, deadlines. ARGV: prefix, id, now, ttl, max_gateways, field/value...
_REGISTER = _Script(
    _REGISTRY_DROP_DEAD
    + """
local now = tonumber(now_ms(ARGV[3]))
if not redis.call('ZSCORE', KEYS[2], ARGV[2]) then
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then
    drop_dead(KEYS[2], ARGV[1], now)
    if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return 0 end
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[2])
return 1
"""
)

# KEYS: gateway hash, deadlines. ARGV: id, now, extend ('1': a heartbeat moves the
# deadline to now + the gateway's ttl; '0': set_draining leaves it), field/value...
# Changes nothing and returns 0 if the gateway is unknown or dead.
_TOUCH = _Script("""
local now = tonumber(now_ms(ARGV[2]))
local deadline = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not deadline or tonumber(deadline) <= now then return 0 end
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
if ARGV[3] == '1' then
  local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl'))
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
end
return 1
""")

# KEYS: gateway hash, deadlines. ARGV: id.
_DEREGISTER = _Script("""
redis.call('DEL', KEYS[1])
return redis.call('ZREM', KEYS[2], ARGV[1])
""")

# KEYS: gateway hash, deadlines. ARGV: id, now.
_GET_GATEWAY = _Script("""
local now = tonumber(now_ms(ARGV[2]))
local deadline = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not deadline or tonumber(deadline) <= now then return {} end
return redis.call('HMGET', KEYS[1],
  'endpoints', 'region', 'connections', 'max_connections', 'cpu', 'draining')
""")

# KEYS: deadlines. ARGV: prefix, now. Reply: packed(id, then its six HMGET values, per
# live gateway), one bulk string however many gateways.
_LIVE = _Script(
    _REGISTRY_DROP_DEAD
    + """
local now = tonumber(now_ms(ARGV[2]))
drop_dead(KEYS[1], ARGV[1], now)
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do
  local v = redis.call('HMGET', ARGV[1] .. 'gw:' .. id,
    'endpoints', 'region', 'connections', 'max_connections', 'cpu', 'draining')
  if v[1] then
    out[#out + 1] = id
    for i = 1, 6 do out[#out + 1] = v[i] end
  end
end
return packed(out)
"""
)


def _check_load(connections: int | None, cpu: float | None) -> None:
    if connections is not None and (
        isinstance(connections, bool) or not isinstance(connections, int) or connections < 0
    ):
        raise ConfigError("connections must be an int >= 0")
    if cpu is not None and not (isinstance(cpu, int | float) and math.isfinite(cpu) and cpu >= 0.0):
        raise ConfigError(f"cpu must be a finite fraction >= 0, got {cpu!r}")


def _info(gateway_id: str, values: Sequence[str]) -> GatewayInfo:
    """A GatewayInfo from the hash's values in the scripts' HMGET order."""
    endpoints, region, connections, max_connections, cpu, draining = values
    return GatewayInfo(
        id=gateway_id,
        endpoints=tuple(json.loads(endpoints)),
        region=region,
        connections=int(connections),
        max_connections=int(max_connections),
        cpu=float(cpu),
        draining=draining == "1",
    )


class RedisRegistry:
    """Gateway discovery in Redis: an :class:`~imkit.discovery.Registry` for many processes.

    A hash per gateway (``<prefix>:gw:<id>``) and a sorted set of deadlines
    (``<prefix>:deadlines``, Redis time). ``register``/``heartbeat``/
    ``set_draining``/``deregister``/``get``: one script, O(1) on the server, one
    round trip. ``live`` and ``rank``: one script that drops dead gateways and
    returns the live ones (O(n), n <= ``max_gateways``), then ``rank`` orders them
    locally with :meth:`GatewayTable.rank <imkit.discovery.GatewayTable.rank>`
    (O(n log n)), so every backend ranks alike. Same limits, TTL semantics and
    errors as :class:`~imkit.aio.discovery.MemoryRegistry`, plus BackendError;
    ``clock`` as for :class:`RedisRouteTable`.
    """

    def __init__(
        self,
        client_or_url: Redis | str,
        *,
        prefix: str = _GATEWAYS_PREFIX,
        ttl_ms: int = DEFAULT_TTL_MS,
        max_gateways: int = DEFAULT_MAX_GATEWAYS,
        max_endpoints: int = DEFAULT_MAX_ENDPOINTS,
        load_band: float = DEFAULT_LOAD_BAND,
        timeout_ms: int = DEFAULT_REDIS_TIMEOUT_MS,
        max_connections: int = DEFAULT_REDIS_MAX_CONNECTIONS,
        clock: Callable[[], int] | None = None,
    ) -> None:
        """A handle on the registry under ``prefix`` (no I/O here). O(1)."""
        # The sans-IO table validates the limits (same errors as MemoryRegistry).
        GatewayTable(
            ttl_ms=ttl_ms,
            max_gateways=max_gateways,
            max_endpoints=max_endpoints,
            load_band=load_band,
        )
        if not isinstance(prefix, str) or not prefix:
            raise ConfigError("prefix must be a non-empty string")
        self._client, self._owned = _connect(client_or_url, timeout_ms, max_connections)
        self.ttl_ms = ttl_ms
        self.max_gateways = max_gateways
        self.max_endpoints = max_endpoints
        self.load_band = load_band
        self.prefix = prefix
        self._p = prefix + ":"
        self._deadlines = self._p + "deadlines"
        self._clock = clock

    def _now(self) -> str:
        return "" if self._clock is None else str(self._clock())

    def _keys(self, gateway_id: str) -> tuple[str, str]:
        return (self._p + "gw:" + gateway_id, self._deadlines)

    async def register(self, info: GatewayInfo, *, ttl_ms: int | None = None) -> None:
        """Add or replace ``info.id``, live for ``ttl_ms`` (default ``self.ttl_ms``).

        ConfigError for an invalid ``info`` or ttl; CapacityError past
        ``max_gateways`` live gateways (dead ones are dropped first).
        """
        info.validate(self.max_endpoints)
        ttl = self.ttl_ms if ttl_ms is None else ttl_ms
        _check_int("ttl_ms", ttl, 1)
        fields = (
            "endpoints", json.dumps(list(info.endpoints)),
            "region", info.region,
            "connections", info.connections,
            "max_connections", info.max_connections,
            "cpu", repr(float(info.cpu)),
            "draining", "1" if info.draining else "0",
            "ttl", ttl,
        )  # fmt: skip
        args = (self._p, info.id, self._now(), ttl, self.max_gateways, *fields)
        with _backend_errors("register"):
            done = await _REGISTER.run(self._client, self._keys(info.id), args)
        if not int(done):
            raise CapacityError("max_gateways", self.max_gateways)

    async def heartbeat(
        self, gateway_id: str, *, connections: int | None = None, cpu: float | None = None
    ) -> bool:
        """Extend the TTL and update the load; False if the gateway must register again."""
        _check_load(connections, cpu)
        fields: list[object] = []
        if connections is not None:
            fields += ["connections", connections]
        if cpu is not None:
            fields += ["cpu", repr(float(cpu))]
        args = (gateway_id, self._now(), "1", *fields)
        with _backend_errors("heartbeat"):
            return bool(await _TOUCH.run(self._client, self._keys(gateway_id), args))

    async def set_draining(self, gateway_id: str, draining: bool = True) -> bool:
        """Rank the gateway last while it drains; False if unknown or expired."""
        args = (gateway_id, self._now(), "0", "draining", "1" if draining else "0")
        with _backend_errors("set_draining"):
            return bool(await _TOUCH.run(self._client, self._keys(gateway_id), args))

    async def deregister(self, gateway_id: str) -> bool:
        """Remove the gateway now; True if it was registered (even if expired)."""
        with _backend_errors("deregister"):
            return bool(await _DEREGISTER.run(self._client, self._keys(gateway_id), (gateway_id,)))

    async def get(self, gateway_id: str) -> GatewayInfo | None:
        """The live gateway's info, or None."""
        args = (gateway_id, self._now())
        with _backend_errors("get"):
            values = await _GET_GATEWAY.run(self._client, self._keys(gateway_id), args)
        return _info(gateway_id, [_text(v) for v in values]) if values else None

    async def live(self) -> list[GatewayInfo]:
        """Every live gateway, by id (dead ones are removed first). O(n), one round trip."""
        with _backend_errors("live"):
            reply = await _LIVE.run(self._client, (self._deadlines,), (self._p, self._now()))
        f = [field.decode() for field in _fields(reply[0], reply[1])]
        infos = [_info(f[i], f[i + 1 : i + 7]) for i in range(0, len(f), 7)]
        return sorted(infos, key=lambda info: info.id)

    async def rank(
        self, *, region: str = "", client_key: str = "", limit: int | None = None
    ) -> list[GatewayInfo]:
        """Live gateways in the order a client should try them (GatewayTable's rules).

        One round trip, then O(n log n) here.
        """
        infos = await self.live()
        table = GatewayTable(
            ttl_ms=self.ttl_ms,
            max_gateways=max(1, len(infos)),
            max_endpoints=max([self.max_endpoints, *(len(i.endpoints) for i in infos)]),
            load_band=self.load_band,
        )
        for info in infos:
            table.register(info, 0)
        return table.rank(0, region=region, client_key=client_key, limit=limit)

    async def aclose(self) -> None:
        """Close the client if this registry made it from a URL. Idempotent."""
        if self._owned:
            with _backend_errors("close"):
                await self._client.aclose()

    def __repr__(self) -> str:
        return f"RedisRegistry(prefix={self.prefix!r}, ttl_ms={self.ttl_ms})"


# -- seq ceilings ---------------------------------------------------------------------

# KEYS: the ceiling. ARGV: the new ceiling. Keeps the larger; returns the stored one.
_RAISE_CEILING = _Script("""
local cur = redis.call('GET', KEYS[1])
if not cur or newer(ARGV[1], cur) then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return cur
""")


class RedisCeilingStore:
    """Seq-lease ceilings in Redis: the awaited form of :class:`imkit.seq.CeilingStore`.

    ``load`` is one ``GET``; ``save`` one script that keeps the larger of the stored
    and the given ceiling (ceilings only grow, so a late save from an old owner can
    never lower one). One string key per conversation, ``<prefix>:<key>``; no limit,
    on purpose (a forgotten ceiling would let seqs repeat).

    Durable only as far as the server is: with ``appendonly yes`` and
    ``appendfsync always`` a returned ``save`` survives a crash of the server;
    with the default ``everysec`` up to a second of saves can be lost, and a
    server without persistence loses them all (seqs would then repeat).
    """

    def __init__(
        self,
        client_or_url: Redis | str,
        *,
        prefix: str = _SEQ_PREFIX,
        timeout_ms: int = DEFAULT_REDIS_TIMEOUT_MS,
        max_connections: int = DEFAULT_REDIS_MAX_CONNECTIONS,
    ) -> None:
        """A handle on the ceilings under ``prefix`` (no I/O here). O(1)."""
        if not isinstance(prefix, str) or not prefix:
            raise ConfigError("prefix must be a non-empty string")
        self._client, self._owned = _connect(client_or_url, timeout_ms, max_connections)
        self.prefix = prefix
        self._p = prefix + ":"

    async def load(self, key: str) -> int:
        """The stored ceiling of ``key``, 0 if none. One round trip."""
        with _backend_errors("load"):
            value = await self._client.get(self._p + key)
        return 0 if value is None else int(value)

    async def save(self, key: str, ceiling: int) -> int:
        """Store ``ceiling`` unless a larger one is stored; returns the stored ceiling.

        One script. ConfigError for a ceiling that is not an int in [0, 2**63).
        """
        if isinstance(ceiling, bool) or not isinstance(ceiling, int) or not 0 <= ceiling < 2**63:
            raise ConfigError(f"a ceiling is an int in [0, 2**63), got {ceiling!r}")
        with _backend_errors("save"):
            stored = await _RAISE_CEILING.run(self._client, (self._p + key,), (ceiling,))
        return int(stored)

    async def aclose(self) -> None:
        """Close the client if this store made it from a URL. Idempotent."""
        if self._owned:
            with _backend_errors("close"):
                await self._client.aclose()
