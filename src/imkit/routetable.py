"""Who is online where: the route table, and the three routing schemes of the seed.

A gateway that accepts a login *binds* ``uid/device -> gateway, conn_id, epoch``;
when the connection closes it *unbinds*. The logic server asks the table which
gateways hold a conversation's members and publishes one batch per gateway on the
bus (the seed's ``routeKey``).

Fencing
    Every connection carries an ``epoch`` that strictly increases per (uid, device)
    (a login counter, a timestamp id, the seq allocator...). A bind with an older
    epoch than the one held is refused (:attr:`BindResult.STALE`); an unbind is
    applied only if it names the live connection exactly (``conn_id`` and
    ``epoch``), so a late unbind from an old connection never removes a newer
    binding.

Grace period
    An unbind does not delete the route: it parks it for ``grace_ms`` (the seed:
    "服务端发现连接断开后不立即删除用户状态信息,等待超时时间"), so a quick reconnect
    of the same device finds it (:attr:`BindResult.RESUMED`) and the server can
    resume the session. :meth:`RouteTable.expire` removes the routes whose grace
    ran out and returns them, for the caller to drop session state.

Expiry structure
    ``grace_ms`` is the same for every route and ``now_ms`` never goes backwards
    (checked: :class:`~imkit.errors.TimeWentBackwards`), so the order in which
    routes are parked *is* the order in which they expire. An insertion-ordered
    ``OrderedDict`` keyed by (uid, device) is therefore an exact priority queue:
    park O(1) (append), cancel on re-bind O(1) (delete), expire O(1) per route
    (pop the head) -- no heap, no lazy deletion, no tombstones, and its size is
    exactly the number of parked routes. (A plain ``dict`` would do the same but
    popping its head repeatedly is O(n) in CPython: deleted slots at the front are
    rescanned.)

Nothing here reads a clock: time comes in as ``now_ms``. The table is not
thread-safe; one event loop owns it.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Protocol, cast

import attrs

from imkit.errors import CapacityError, ConfigError, TimeWentBackwards

__all__ = [
    "DEFAULT_GRACE_MS",
    "DEFAULT_MAX_DEVICES",
    "DEFAULT_MAX_ROUTES",
    "AsyncRouteTable",
    "BindResult",
    "Binding",
    "BroadcastRouter",
    "HashRouter",
    "NodeLookup",
    "Route",
    "RouteTable",
    "RouteTableBackend",
    "Router",
    "TableRouter",
    "UnbindResult",
]

#: How long a disconnected route is kept for a quick reconnect. 60 s covers a
#: subway tunnel or a Wi-Fi -> 4G handover (the seed's 快速重连 case) and two
#: missed 30 s heartbeats (LoginAck.heartbeat_ms), after which the client has
#: given up on the old connection anyway.
DEFAULT_GRACE_MS = 60_000
#: Devices bound at once per user, live or in grace. Mainstream IM apps allow one
#: phone plus a handful of other clients (tablet, desktop, web, watch); 8 leaves
#: room for those and for a reconnecting device whose old route is still in grace.
DEFAULT_MAX_DEVICES = 8
#: Routes in the table, live plus in grace. About 1 M connections is what a few
#: large gateways hold; at ~240 bytes per route (tracemalloc, docs/routetable.md)
#: that is ~240 MB, a sane ceiling for one in-memory process.
DEFAULT_MAX_ROUTES = 1_000_000

_NEVER = -(2**63)


@attrs.frozen(kw_only=True)
class Route:
    """Where one device of one user is connected.

    ``conn_id`` identifies the connection on its gateway; ``epoch`` strictly
    increases for every new connection of the same (uid, device) and fences stale
    binds and unbinds.
    """

    uid: str
    device: str
    gateway: str
    conn_id: int
    epoch: int


@attrs.frozen(kw_only=True)
class Binding:
    """What the table holds for one (uid, device): the route and, if the connection
    has gone, when (``disconnected_ms``; ``None`` while live)."""

    route: Route
    disconnected_ms: int | None = None

    @property
    def live(self) -> bool:
        """True while the connection is up (not in its grace period)."""
        return self.disconnected_ms is None


class BindResult(enum.Enum):
    """What :meth:`RouteTable.bind` did."""

    #: No route was held for (uid, device); the new one is live.
    BOUND = "bound"
    #: A route in its grace period was replaced by this newer connection: a quick
    #: reconnect, the server may resume the session.
    RESUMED = "resumed"
    #: A live route with an older epoch was replaced: the old connection must be
    #: kicked (ErrorCode.REPLACED). Read it with :meth:`RouteTable.get` first.
    REPLACED = "replaced"
    #: Exactly this route was already live (a retried bind); nothing changed.
    UNCHANGED = "unchanged"
    #: Refused: the held route has a newer epoch, or the same epoch with another
    #: connection, or the same connection already unbound. Nothing changed.
    STALE = "stale"

    @property
    def accepted(self) -> bool:
        """True if the route given to :meth:`RouteTable.bind` is now live."""
        return self is not BindResult.STALE


class UnbindResult(enum.Enum):
    """What :meth:`RouteTable.unbind` did."""

    #: The live route of this connection entered its grace period.
    GRACE = "grace"
    #: Fenced: (uid, device) is live on another connection (conn_id or epoch
    #: differ). Nothing changed.
    STALE = "stale"
    #: Nothing live for (uid, device): never bound, already unbound, or expired.
    NOT_FOUND = "not_found"


class RouteTableBackend(Protocol):
    """The route-table contract every backend (memory now, Redis later) fulfils.

    ``tests/test_routetable.py`` holds the reusable suite (``RouteTableContract``
    and ``route_table_machine``) that a new backend plugs into.
    """

    grace_ms: int
    max_devices: int
    max_routes: int

    def bind(self, route: Route, now_ms: int) -> BindResult: ...
    def unbind(
        self, uid: str, device: str, conn_id: int, epoch: int, now_ms: int
    ) -> UnbindResult: ...
    def unbind_gateway(self, gateway: str, now_ms: int) -> list[Route]: ...
    def expire(self, now_ms: int, limit: int | None = None) -> list[Route]: ...
    def next_expiry_ms(self) -> int | None: ...
    def lookup(self, uid: str) -> Sequence[Route]: ...
    def lookup_grace(self, uid: str) -> Sequence[Route]: ...
    def get(self, uid: str, device: str) -> Binding | None: ...
    def group_by_gateway(self, uids: Iterable[str]) -> dict[str, list[Route]]: ...
    def __len__(self) -> int: ...


class AsyncRouteTable(Protocol):
    """The awaited route-table contract: one process (memory) or many (Redis).

    The same semantics as :class:`RouteTable` (fencing by ``epoch`` and
    ``conn_id``, several devices per user up to ``max_devices``, a grace period
    after an unbind during which the route is parked and receives no pushes,
    ``STALE`` / ``REPLACED`` results), but **the backend owns the clock**: no
    ``now_ms`` goes in. ``Binding.disconnected_ms`` is in the backend's clock (the
    event loop's for :class:`imkit.aio.routes.MemoryRouteTable`, the Redis
    server's for :class:`imkit.aio.redis.RedisRouteTable`): compare it only with
    other values from the same backend.

    ``expire`` returns the routes whose grace ran out since the last call, each
    reported once however many callers (processes) call it, for the ``on_expire``
    callbacks; drive it from a periodic task. ``tests/route_suite.py`` is the
    suite every implementation passes. Errors: ``ConfigError`` for a bad route or
    argument, ``CapacityError`` for a full table (``.limit`` names it),
    ``BackendError`` when a remote backend fails (the outcome of that call is
    then unknown; binds and unbinds are safe to retry).
    """

    @property
    def grace_ms(self) -> int:
        """How long an unbound route stays parked before it expires."""
        ...

    @property
    def max_devices(self) -> int:
        """Devices bound at once per user, live or in grace."""
        ...

    @property
    def max_routes(self) -> int:
        """Routes held at once in the whole table, live or in grace."""
        ...

    async def bind(self, route: Route) -> BindResult:
        """Make ``route`` the live route of its (uid, device) if its epoch allows."""
        ...

    async def unbind(self, uid: str, device: str, conn_id: int, epoch: int) -> UnbindResult:
        """The connection (conn_id, epoch) closed: park its route for ``grace_ms`` (fenced)."""
        ...

    async def unbind_gateway(self, gateway: str) -> list[Route]:
        """A gateway died: park every live route on it; returns the routes parked."""
        ...

    async def expire(self, limit: int | None = None) -> list[Route]:
        """Remove and return routes whose grace ran out (at most ``limit``), oldest first."""
        ...

    async def get(self, uid: str, device: str) -> Binding | None:
        """What is held for (uid, device), live or in grace, or None."""
        ...

    async def lookup(self, uid: str) -> tuple[Route, ...]:
        """The live routes of ``uid`` (routes in grace excluded), in no fixed order."""
        ...

    async def group_by_gateway(self, uids: Iterable[str]) -> dict[str, list[Route]]:
        """The live routes of ``uids`` grouped by gateway (offline users absent)."""
        ...

    async def count(self) -> int:
        """Routes held, live plus in grace."""
        ...


def _positive(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")


class RouteTable:
    """In-memory route table: uid -> the devices online and where, fenced by epoch.

    Live routes are kept per uid as a small tuple (at most ``max_devices``), so
    :meth:`lookup` returns the stored tuple without copying. Routes in their grace
    period live in a second per-uid map plus the expiry queue (see the module doc).

    Limits: ``max_devices`` per uid and ``max_routes`` in total, both counting live
    and grace routes; a bind that would exceed one raises
    :class:`~imkit.errors.CapacityError` and changes nothing (the gateway answers
    the login with SERVER_BUSY; the client retries elsewhere). ``expire`` frees
    grace routes; call it from a timer at :meth:`next_expiry_ms`.

    >>> t = RouteTable(grace_ms=1000)
    >>> t.bind(Route(uid="u", device="phone", gateway="gw1", conn_id=7, epoch=1), 0)
    <BindResult.BOUND: 'bound'>
    >>> t.unbind("u", "phone", 7, 1, now_ms=10)
    <UnbindResult.GRACE: 'grace'>
    >>> t.lookup("u"), len(t.lookup_grace("u"))
    ((), 1)
    >>> t.expire(1010)[0].gateway
    'gw1'
    """

    __slots__ = (
        "_count",
        "_live",
        "_now",
        "_parked",
        "_queue",
        "grace_ms",
        "max_devices",
        "max_routes",
    )

    def __init__(
        self,
        *,
        grace_ms: int = DEFAULT_GRACE_MS,
        max_devices: int = DEFAULT_MAX_DEVICES,
        max_routes: int = DEFAULT_MAX_ROUTES,
    ) -> None:
        """Create an empty table. O(1)."""
        _positive("grace_ms", grace_ms, 0)
        _positive("max_devices", max_devices, 1)
        _positive("max_routes", max_routes, 1)
        self.grace_ms = grace_ms
        self.max_devices = max_devices
        self.max_routes = max_routes
        self._live: dict[str, tuple[Route, ...]] = {}
        self._parked: dict[str, tuple[Route, ...]] = {}
        # (uid, device) -> disconnected_ms, in park order == expiry order.
        self._queue: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._count = 0
        self._now = _NEVER

    # -- time -----------------------------------------------------------------

    def _tick(self, now_ms: int) -> None:
        if now_ms < self._now:
            raise TimeWentBackwards(now_ms, self._now)
        self._now = now_ms

    # -- writes ---------------------------------------------------------------

    def bind(self, route: Route, now_ms: int) -> BindResult:
        """Make ``route`` the live route of (route.uid, route.device), if its epoch allows.

        Returns what happened (:class:`BindResult`); only ``STALE`` leaves the
        table unchanged because of fencing. Raises ``CapacityError`` if a *new*
        (uid, device) would exceed ``max_devices`` or ``max_routes`` (replacing or
        resuming never does), ``ConfigError`` for an empty uid/device/gateway or a
        negative epoch, ``TimeWentBackwards`` if ``now_ms`` is older than a time
        already seen. O(d) for d devices of the user (d <= max_devices).
        """
        if now_ms < self._now:
            raise TimeWentBackwards(now_ms, self._now)
        self._now = now_ms
        uid = route.uid
        device = route.device
        if not uid or not device or not route.gateway:
            raise ConfigError("route uid, device and gateway must be non-empty")
        if route.epoch < 0:
            raise ConfigError(f"route epoch must be >= 0, got {route.epoch}")
        live = self._live.get(uid, ())
        if live:
            for i, cur in enumerate(live):
                if cur.device == device:
                    if route.epoch > cur.epoch:
                        self._live[uid] = (*live[:i], route, *live[i + 1 :])
                        return BindResult.REPLACED
                    if route == cur:
                        return BindResult.UNCHANGED
                    return BindResult.STALE
        parked = self._parked.get(uid)
        if parked is not None:
            for i, cur in enumerate(parked):
                if cur.device == device:
                    if route.epoch <= cur.epoch:
                        return BindResult.STALE
                    if len(parked) == 1:
                        del self._parked[uid]
                    else:
                        self._parked[uid] = (*parked[:i], *parked[i + 1 :])
                    del self._queue[uid, device]
                    self._live[uid] = (*live, route)
                    return BindResult.RESUMED
            held = len(live) + len(parked)
        else:
            held = len(live)
        if held >= self.max_devices:
            raise CapacityError("max_devices", self.max_devices, f"{held} devices bound")
        if self._count >= self.max_routes:
            raise CapacityError("max_routes", self.max_routes)
        self._live[uid] = (*live, route) if live else (route,)
        self._count += 1
        return BindResult.BOUND

    def unbind(self, uid: str, device: str, conn_id: int, epoch: int, now_ms: int) -> UnbindResult:
        """The connection (conn_id, epoch) of (uid, device) closed: start its grace period.

        Applied only if that exact connection is the live route (fencing); a late
        or foreign unbind changes nothing and says why (:class:`UnbindResult`).
        The route expires at ``now_ms + grace_ms`` unless re-bound first. O(d).
        """
        self._tick(now_ms)
        live = self._live.get(uid, ())
        for i, cur in enumerate(live):
            if cur.device == device:
                if cur.conn_id != conn_id or cur.epoch != epoch:
                    return UnbindResult.STALE
                self._park(uid, live, i, now_ms)
                return UnbindResult.GRACE
        return UnbindResult.NOT_FOUND

    def _park(self, uid: str, live: tuple[Route, ...], i: int, now_ms: int) -> None:
        route = live[i]
        rest = (*live[:i], *live[i + 1 :])
        if rest:
            self._live[uid] = rest
        else:
            del self._live[uid]
        self._parked[uid] = (*self._parked.get(uid, ()), route)
        self._queue[uid, route.device] = now_ms

    def unbind_gateway(self, gateway: str, now_ms: int) -> list[Route]:
        """A whole gateway died: put every live route on it into its grace period.

        Returns the routes parked. O(n) over all live routes (a rare event; the
        table keeps no per-gateway index to stay small).
        """
        self._tick(now_ms)
        parked: list[Route] = []
        for uid in [u for u, rs in self._live.items() if any(r.gateway == gateway for r in rs)]:
            live = self._live[uid]
            for i in range(len(live) - 1, -1, -1):
                if live[i].gateway == gateway:
                    parked.append(live[i])
                    self._park(uid, live, i, now_ms)
                    live = self._live.get(uid, ())
        return parked

    def expire(self, now_ms: int, limit: int | None = None) -> list[Route]:
        """Remove and return the routes whose grace period is over, oldest first.

        A route unbound at ``t`` expires when ``now_ms >= t + grace_ms``. At most
        ``limit`` routes are removed per call (``None``: all due), so a driver can
        spread a mass expiry (a gateway crash) over several ticks. O(1) per route
        removed plus O(d) to take it out of its user's tuple.
        """
        self._tick(now_ms)
        if limit is not None:
            _positive("limit", limit, 0)
        cutoff = now_ms - self.grace_ms
        queue = self._queue
        parked_map = self._parked
        out: list[Route] = []
        n = len(queue) if limit is None else min(limit, len(queue))
        for _ in range(n):
            key, disconnected = queue.popitem(last=False)
            if disconnected > cutoff:  # not due: put it back at the head
                queue[key] = disconnected
                queue.move_to_end(key, last=False)
                break
            uid, device = key
            parked = parked_map[uid]
            if len(parked) == 1:
                del parked_map[uid]
                out.append(parked[0])
            else:
                rest = []
                for r in parked:
                    if r.device == device:
                        out.append(r)
                    else:
                        rest.append(r)
                parked_map[uid] = tuple(rest)
        self._count -= len(out)
        return out

    def next_expiry_ms(self) -> int | None:
        """When the oldest route in grace expires (``None`` if none is in grace). O(1)."""
        for disconnected in self._queue.values():
            return disconnected + self.grace_ms
        return None

    # -- reads ----------------------------------------------------------------

    def lookup(self, uid: str) -> tuple[Route, ...]:
        """The live routes of ``uid``, in bind order (routes in grace are excluded:
        they have no connection to push to; see :meth:`lookup_grace`). O(1)."""
        return self._live.get(uid, ())

    def lookup_grace(self, uid: str) -> tuple[Route, ...]:
        """The routes of ``uid`` in their grace period, in unbind order. O(1)."""
        return self._parked.get(uid, ())

    def get(self, uid: str, device: str) -> Binding | None:
        """What the table holds for (uid, device), live or in grace, or ``None``. O(d)."""
        for r in self._live.get(uid, ()):
            if r.device == device:
                return Binding(route=r)
        for r in self._parked.get(uid, ()):
            if r.device == device:
                return Binding(route=r, disconnected_ms=self._queue[uid, device])
        return None

    def group_by_gateway(self, uids: Iterable[str]) -> dict[str, list[Route]]:
        """The live routes of ``uids`` grouped by gateway: one bus publish per key.

        Users with no live route are absent; a uid given twice contributes its
        routes twice (pass distinct members). O(k + routes found) for k uids.
        """
        out: dict[str, list[Route]] = {}
        get = self._live.get
        for uid in uids:
            for r in get(uid, ()):
                bucket = out.get(r.gateway)
                if bucket is None:
                    out[r.gateway] = [r]
                else:
                    bucket.append(r)
        return out

    def __len__(self) -> int:
        """Routes held, live plus in grace (what ``max_routes`` bounds). O(1)."""
        return self._count

    @property
    def grace_count(self) -> int:
        """Routes in their grace period. O(1)."""
        return len(self._queue)

    def __repr__(self) -> str:
        return (
            f"RouteTable(live={self._count - len(self._queue)}, grace={len(self._queue)}, "
            f"grace_ms={self.grace_ms})"
        )

    def _check(self) -> None:
        """Assert every invariant of the table (for tests). O(n)."""
        total = 0
        for name, table in (("live", self._live), ("grace", self._parked)):
            for uid, routes in table.items():
                if not routes:
                    raise AssertionError(f"{name}: empty tuple kept for {uid!r}")
                for r in routes:
                    if r.uid != uid:
                        raise AssertionError(f"{name}: {r!r} filed under {uid!r}")
                total += len(routes)
        if total != self._count:
            raise AssertionError(f"count {self._count} != {total} routes held")
        if self._count > self.max_routes:
            raise AssertionError(f"{self._count} routes > max_routes={self.max_routes}")
        for uid in self._live.keys() | self._parked.keys():
            devices = [r.device for r in self._live.get(uid, ()) + self._parked.get(uid, ())]
            if len(devices) != len(set(devices)):
                raise AssertionError(f"{uid!r} holds a device twice: {devices}")
            if len(devices) > self.max_devices:
                raise AssertionError(f"{uid!r} has {len(devices)} > max_devices")
        parked_keys = {(r.uid, r.device) for rs in self._parked.values() for r in rs}
        if parked_keys != set(self._queue):
            raise AssertionError("expiry queue and grace routes disagree")
        last = _NEVER
        for t in self._queue.values():
            if t < last:
                raise AssertionError("expiry queue out of order")
            if t > self._now:
                raise AssertionError("a route disconnected in the future")
            last = t


# -- the three routing schemes ----------------------------------------------------


class Router(Protocol):
    """One routing scheme: which gateways must receive a push for these users.

    Returns gateway -> the uids that gateway should deliver to. Users a scheme
    knows to be offline are absent. The returned sequences may be shared between
    gateways (broadcast): do not mutate them.
    """

    def gateways_for(self, uids: Iterable[str]) -> dict[str, Sequence[str]]: ...


class NodeLookup(Protocol):
    """What :class:`HashRouter` needs from a ring (``imkit.hashring.HashRing`` fits)."""

    def get_many(self, keys: Iterable[str], /) -> list[str]: ...


class BroadcastRouter:
    """Every gateway gets every push and delivers to the users it holds (the seed's 广播).

    Simple and stateless for the sender; fits a giant room where most gateways
    hold members anyway. For 1:1 traffic with G gateways, G-1 of the G publishes
    are wasted (the seed's 消息风暴).
    """

    __slots__ = ("_gateways",)

    def __init__(self, gateways: Iterable[str] = ()) -> None:
        """Start with ``gateways`` (in order, duplicates ignored). O(g)."""
        self._gateways: dict[str, None] = dict.fromkeys(gateways)

    def add(self, gateway: str) -> None:
        """Add a gateway (no-op if present). O(1)."""
        self._gateways[gateway] = None

    def discard(self, gateway: str) -> None:
        """Remove a gateway if present. O(1)."""
        self._gateways.pop(gateway, None)

    @property
    def gateways(self) -> tuple[str, ...]:
        """The gateways, in the order added. O(g)."""
        return tuple(self._gateways)

    def gateways_for(self, uids: Iterable[str]) -> dict[str, Sequence[str]]:
        """Every gateway -> all ``uids`` (one shared tuple). O(k + g)."""
        members = tuple(uids)
        if not members:
            return {}
        return dict.fromkeys(self._gateways, members)


class HashRouter:
    """uid -> gateway by consistent hashing (the seed's 一致性哈希).

    ipconf hands each user the gateway the shared ring maps them to, so logic needs
    no table: routing costs one ring lookup per user. It relies on every client
    really being on its ring gateway (discovery must be consistent) and moves
    connections when the ring changes.
    """

    __slots__ = ("ring",)

    def __init__(self, ring: NodeLookup) -> None:
        """Route with ``ring`` (shared, not copied: ring changes apply at once). O(1)."""
        self.ring = ring

    def gateways_for(self, uids: Iterable[str]) -> dict[str, Sequence[str]]:
        """Group ``uids`` by their ring node. O(k) ring lookups.

        Raises :class:`~imkit.errors.EmptyRingError` if the ring is empty and
        ``uids`` is not.
        """
        members = list(uids)
        if not members:
            return {}
        out: dict[str, list[str]] = {}
        for uid, gw in zip(members, self.ring.get_many(members), strict=True):
            bucket = out.get(gw)
            if bucket is None:
                out[gw] = [uid]
            else:
                bucket.append(uid)
        return cast("dict[str, Sequence[str]]", out)


class TableRouter:
    """Route by a route table (the seed's 路由服务层 with MQ per gateway).

    Exact: only gateways that hold a live route are named, and offline users are
    absent (they sync on login). Costs a table that gateways keep up to date.
    """

    __slots__ = ("table",)

    def __init__(self, table: RouteTableBackend) -> None:
        """Route with ``table`` (shared, not copied). O(1)."""
        self.table = table

    def gateways_for(self, uids: Iterable[str]) -> dict[str, Sequence[str]]:
        """Group the online ``uids`` by the gateways of their live routes.

        A user with two devices on one gateway is named once for it. O(k + routes).
        """
        out: dict[str, list[str]] = {}
        table = self.table
        if isinstance(table, RouteTable):  # skip a method call per user
            live = table._live
            pairs: Iterable[tuple[str, Sequence[Route]]] = (
                (uid, live.get(uid, ())) for uid in uids
            )
        else:
            pairs = ((uid, table.lookup(uid)) for uid in uids)
        for uid, routes in pairs:
            if not routes:
                continue
            if len(routes) == 1:
                gw = routes[0].gateway
                bucket = out.get(gw)
                if bucket is None:
                    out[gw] = [uid]
                else:
                    bucket.append(uid)
                continue
            for gw in dict.fromkeys(r.gateway for r in routes):
                bucket = out.get(gw)
                if bucket is None:
                    out[gw] = [uid]
                else:
                    bucket.append(uid)
        return cast("dict[str, Sequence[str]]", out)
