"""Tests for imkit.routetable: fencing, grace expiry, limits, and the three routers.

The route-table tests are a reusable contract: ``*Contract`` classes and
``route_table_machine(factory)`` take any :class:`RouteTableBackend`. A new backend
(Redis) plugs in with a factory mixin, e.g.::

    class RedisFactory:
        def make_table(self, **limits: int) -> RouteTableBackend:
            return RedisRouteTable(client, **limits)

    class TestRedisBind(RedisFactory, BindContract): ...
    TestRedisMachine = route_table_machine(lambda **kw: RedisRouteTable(client, **kw)).TestCase
"""

from __future__ import annotations

import doctest
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import imkit.routetable
from imkit.errors import CapacityError, ConfigError, EmptyRingError, TimeWentBackwards
from imkit.routetable import (
    DEFAULT_GRACE_MS,
    Binding,
    BindResult,
    BroadcastRouter,
    HashRouter,
    NodeLookup,
    Route,
    Router,
    RouteTable,
    RouteTableBackend,
    TableRouter,
    UnbindResult,
)

TableFactory = Callable[..., RouteTableBackend]

UIDS = ("a", "b", "c")
DEVICES = ("phone", "web", "pad")
GATEWAYS = ("g1", "g2", "g3")

uids = st.sampled_from(UIDS)
devices = st.sampled_from(DEVICES)
gateways = st.sampled_from(GATEWAYS)
conn_ids = st.integers(0, 3)
epochs = st.integers(0, 5)
small_dt = st.integers(0, 8)


def r(
    uid: str = "u", device: str = "phone", gateway: str = "g1", conn: int = 1, epoch: int = 1
) -> Route:
    """A route with short defaults."""
    return Route(uid=uid, device=device, gateway=gateway, conn_id=conn, epoch=epoch)


def by_device(routes: Sequence[Route]) -> list[Route]:
    """Routes in a canonical order (backends need not keep bind order)."""
    return sorted(routes, key=lambda x: (x.uid, x.device))


def test_doctests() -> None:
    """The examples in the module's docstrings hold."""
    result = doctest.testmod(imkit.routetable)
    assert result.attempted > 0
    assert result.failed == 0


def test_protocols_fit() -> None:
    """The memory table is a RouteTableBackend and the routers are Routers (mypy checks)."""
    backend: RouteTableBackend = RouteTable()
    routers: list[Router] = [BroadcastRouter(), HashRouter(_FakeRing()), TableRouter(RouteTable())]
    assert len(backend) == 0
    assert len(routers) == 3


# -- the reusable contract ------------------------------------------------------------


class MemoryFactory:
    """Builds the in-memory table; other backends provide their own factory mixin."""

    def make_table(self, **limits: int) -> RouteTableBackend:
        return RouteTable(**limits)


class BindContract:
    """bind: fencing by epoch, resume, replace, idempotent retries."""

    def make_table(self, **limits: int) -> RouteTableBackend:
        raise NotImplementedError

    def test_first_bind_is_live(self) -> None:
        """A first bind makes the route live and visible to lookup and get."""
        t = self.make_table()
        assert t.bind(r(), 0) is BindResult.BOUND
        assert list(t.lookup("u")) == [r()]
        assert t.get("u", "phone") == Binding(route=r())
        assert len(t) == 1

    def test_newer_epoch_replaces_live(self) -> None:
        """A newer epoch on a live slot replaces it (the old connection is to be kicked)."""
        t = self.make_table()
        t.bind(r(conn=1, epoch=1), 0)
        assert t.bind(r(gateway="g2", conn=9, epoch=2), 1) is BindResult.REPLACED
        assert list(t.lookup("u")) == [r(gateway="g2", conn=9, epoch=2)]
        assert len(t) == 1

    def test_older_epoch_refused(self) -> None:
        """A bind with an older epoch than the held one changes nothing."""
        t = self.make_table()
        t.bind(r(epoch=5), 0)
        assert t.bind(r(conn=2, epoch=4), 1) is BindResult.STALE
        assert not BindResult.STALE.accepted
        assert list(t.lookup("u")) == [r(epoch=5)]

    def test_same_epoch_other_connection_refused(self) -> None:
        """The same epoch from another connection is a conflict: first writer wins."""
        t = self.make_table()
        t.bind(r(conn=1, epoch=3), 0)
        assert t.bind(r(conn=2, epoch=3), 1) is BindResult.STALE
        assert list(t.lookup("u")) == [r(conn=1, epoch=3)]

    def test_retried_bind_unchanged(self) -> None:
        """Binding exactly the live route again is a no-op that reports UNCHANGED."""
        t = self.make_table()
        t.bind(r(), 0)
        assert t.bind(r(), 1) is BindResult.UNCHANGED
        assert BindResult.UNCHANGED.accepted
        assert len(t) == 1

    def test_quick_reconnect_resumes(self) -> None:
        """A newer connection of a device in grace resumes it and leaves grace."""
        t = self.make_table(grace_ms=100)
        t.bind(r(conn=1, epoch=1), 0)
        t.unbind("u", "phone", 1, 1, 10)
        assert t.bind(r(conn=2, epoch=2), 50) is BindResult.RESUMED
        assert list(t.lookup("u")) == [r(conn=2, epoch=2)]
        assert list(t.lookup_grace("u")) == []
        assert t.expire(1000) == []

    def test_reordered_bind_after_unbind_refused(self) -> None:
        """A retried bind of a connection already unbound does not resurrect it."""
        t = self.make_table()
        t.bind(r(), 0)
        t.unbind("u", "phone", 1, 1, 1)
        assert t.bind(r(), 2) is BindResult.STALE
        assert list(t.lookup("u")) == []

    def test_devices_independent(self) -> None:
        """Each device of a user has its own slot and its own fencing."""
        t = self.make_table()
        t.bind(r(device="phone", epoch=5), 0)
        assert t.bind(r(device="web", epoch=1), 0) is BindResult.BOUND
        assert by_device(t.lookup("u")) == [r(device="phone", epoch=5), r(device="web", epoch=1)]

    def test_bad_route_rejected(self) -> None:
        """Empty ids and negative epochs are a ConfigError (also a ValueError)."""
        t = self.make_table()
        for bad in (r(uid=""), r(device=""), r(gateway=""), r(epoch=-1)):
            with pytest.raises(ConfigError):
                t.bind(bad, 0)
        with pytest.raises(ValueError):
            t.bind(r(uid=""), 0)
        assert len(t) == 0


class UnbindContract:
    """unbind: only the exact live connection is unbound; stale unbinds are fenced."""

    def make_table(self, **limits: int) -> RouteTableBackend:
        raise NotImplementedError

    def test_unbind_enters_grace(self) -> None:
        """Unbinding the live connection parks its route with the disconnect time."""
        t = self.make_table(grace_ms=100)
        t.bind(r(), 0)
        assert t.unbind("u", "phone", 1, 1, 7) is UnbindResult.GRACE
        assert list(t.lookup("u")) == []
        assert list(t.lookup_grace("u")) == [r()]
        binding = t.get("u", "phone")
        assert binding == Binding(route=r(), disconnected_ms=7)
        assert binding is not None and not binding.live
        assert len(t) == 1

    def test_late_unbind_of_old_connection_fenced(self) -> None:
        """A late unbind from the replaced connection leaves the newer binding live."""
        t = self.make_table()
        t.bind(r(conn=1, epoch=1), 0)
        t.bind(r(conn=2, epoch=2), 1)
        assert t.unbind("u", "phone", 1, 1, 2) is UnbindResult.STALE
        assert t.unbind("u", "phone", 2, 1, 2) is UnbindResult.STALE
        assert t.unbind("u", "phone", 1, 2, 2) is UnbindResult.STALE
        assert list(t.lookup("u")) == [r(conn=2, epoch=2)]

    def test_unbind_nothing(self) -> None:
        """Unbinding what is not live (never bound, or already unbound) is NOT_FOUND."""
        t = self.make_table()
        assert t.unbind("u", "phone", 1, 1, 0) is UnbindResult.NOT_FOUND
        t.bind(r(), 0)
        t.unbind("u", "phone", 1, 1, 1)
        assert t.unbind("u", "phone", 1, 1, 2) is UnbindResult.NOT_FOUND
        assert t.get("u", "phone") == Binding(route=r(), disconnected_ms=1)

    def test_unbind_gateway(self) -> None:
        """A dead gateway's live routes all enter grace; other gateways' stay live."""
        t = self.make_table()
        t.bind(r(uid="a", gateway="g1"), 0)
        t.bind(r(uid="b", gateway="g2"), 0)
        t.bind(r(uid="a", device="web", gateway="g1"), 0)
        parked = t.unbind_gateway("g1", 5)
        assert by_device(parked) == [r(uid="a", gateway="g1"), r(uid="a", device="web")]
        assert list(t.lookup("a")) == []
        assert list(t.lookup("b")) == [r(uid="b", gateway="g2")]
        assert len(t.lookup_grace("a")) == 2


class ExpiryContract:
    """expire: grace periods driven by now_ms."""

    def make_table(self, **limits: int) -> RouteTableBackend:
        raise NotImplementedError

    def test_expires_exactly_at_grace(self) -> None:
        """A route unbound at t is kept until t + grace_ms and removed at t + grace_ms."""
        t = self.make_table(grace_ms=100)
        t.bind(r(), 0)
        t.unbind("u", "phone", 1, 1, 10)
        assert t.next_expiry_ms() == 110
        assert t.expire(109) == []
        assert t.expire(110) == [r()]
        assert t.get("u", "phone") is None
        assert len(t) == 0
        assert t.next_expiry_ms() is None

    def test_expire_limit(self) -> None:
        """expire(limit=k) removes at most k routes, the oldest first."""
        t = self.make_table(grace_ms=0)
        for i, uid in enumerate(UIDS):
            t.bind(r(uid=uid), i)
            t.unbind(uid, "phone", 1, 1, i)
        assert t.expire(10, limit=2) == [r(uid="a"), r(uid="b")]
        assert t.expire(10, limit=2) == [r(uid="c")]

    def test_live_routes_never_expire(self) -> None:
        """Time alone never removes a live route."""
        t = self.make_table(grace_ms=1)
        t.bind(r(), 0)
        assert t.expire(10**9) == []
        assert list(t.lookup("u")) == [r()]

    def test_time_going_back_rejected(self) -> None:
        """now_ms older than one already seen raises TimeWentBackwards."""
        t = self.make_table()
        t.bind(r(), 100)
        with pytest.raises(TimeWentBackwards):
            t.expire(99)
        with pytest.raises(TimeWentBackwards):
            t.unbind("u", "phone", 1, 1, 50)
        assert list(t.lookup("u")) == [r()]


class LimitsContract:
    """max_devices and max_routes bound the table; reaching them refuses loudly."""

    def make_table(self, **limits: int) -> RouteTableBackend:
        raise NotImplementedError

    def test_max_devices(self) -> None:
        """A device past max_devices (grace routes count) raises CapacityError."""
        t = self.make_table(max_devices=2)
        t.bind(r(device="phone"), 0)
        t.bind(r(device="web"), 0)
        t.unbind("u", "web", 1, 1, 1)
        with pytest.raises(CapacityError) as err:
            t.bind(r(device="pad"), 2)
        assert err.value.limit == "max_devices"
        assert t.bind(r(device="web", epoch=2), 3) is BindResult.RESUMED

    def test_max_routes(self) -> None:
        """A route past max_routes raises CapacityError; replacing still works."""
        t = self.make_table(max_routes=2)
        t.bind(r(uid="a"), 0)
        t.bind(r(uid="b"), 0)
        with pytest.raises(CapacityError) as err:
            t.bind(r(uid="c"), 0)
        assert err.value.limit == "max_routes"
        assert t.bind(r(uid="a", epoch=2), 0) is BindResult.REPLACED
        assert len(t) == 2

    def test_bad_limits(self) -> None:
        """Limits below their minimum are a ConfigError."""
        for kw in ({"grace_ms": -1}, {"max_devices": 0}, {"max_routes": 0}):
            with pytest.raises(ConfigError):
                self.make_table(**kw)


class LookupContract:
    """lookup, lookup_grace, group_by_gateway."""

    def make_table(self, **limits: int) -> RouteTableBackend:
        raise NotImplementedError

    def test_group_by_gateway(self) -> None:
        """Live routes of the given users grouped by gateway; offline users absent."""
        t = self.make_table()
        t.bind(r(uid="a", gateway="g1"), 0)
        t.bind(r(uid="a", device="web", gateway="g2"), 0)
        t.bind(r(uid="b", gateway="g1"), 0)
        t.bind(r(uid="c", gateway="g3"), 0)
        t.unbind("c", "phone", 1, 1, 1)
        groups = t.group_by_gateway(["a", "b", "c", "nobody"])
        assert {g: by_device(rs) for g, rs in groups.items()} == {
            "g1": [r(uid="a", gateway="g1"), r(uid="b", gateway="g1")],
            "g2": [r(uid="a", device="web", gateway="g2")],
        }

    def test_unknown_user(self) -> None:
        """An unknown user has no routes, live or in grace."""
        t = self.make_table()
        assert list(t.lookup("x")) == []
        assert list(t.lookup_grace("x")) == []
        assert t.get("x", "phone") is None
        assert t.group_by_gateway([]) == {}


class TestBind(MemoryFactory, BindContract):
    """Memory table: bind."""


class TestUnbind(MemoryFactory, UnbindContract):
    """Memory table: unbind."""


class TestExpiry(MemoryFactory, ExpiryContract):
    """Memory table: expiry."""


class TestLimits(MemoryFactory, LimitsContract):
    """Memory table: limits."""


class TestLookup(MemoryFactory, LookupContract):
    """Memory table: lookups."""


class TestMemorySpecifics:
    """What the memory table adds beyond the contract."""

    def test_lookup_keeps_bind_order(self) -> None:
        """Live routes come back in bind order; a replaced route keeps its place."""
        t = RouteTable()
        t.bind(r(device="phone"), 0)
        t.bind(r(device="web"), 0)
        t.bind(r(device="phone", epoch=2), 0)
        assert [x.device for x in t.lookup("u")] == ["phone", "web"]
        assert t.lookup("u")[0].epoch == 2

    def test_repr_and_counts(self) -> None:
        """repr and grace_count report live and grace routes."""
        t = RouteTable(grace_ms=5)
        t.bind(r(device="phone"), 0)
        t.bind(r(device="web"), 0)
        t.unbind("u", "web", 1, 1, 0)
        assert t.grace_count == 1
        assert repr(t) == "RouteTable(live=1, grace=1, grace_ms=5)"
        assert RouteTable().grace_ms == DEFAULT_GRACE_MS

    def test_check_catches_corruption(self) -> None:
        """_check raises AssertionError when the count disagrees with the routes."""
        t = RouteTable()
        t.bind(r(), 0)
        t._count = 5
        with pytest.raises(AssertionError):
            t._check()

    def test_bad_expire_limit(self) -> None:
        """A negative expire limit is a ConfigError."""
        with pytest.raises(ConfigError):
            RouteTable().expire(0, limit=-1)


# -- the state machine against an oracle ----------------------------------------------

Slot = tuple[Route, int | None]  # (route, disconnected_ms or None while live)


class Oracle:
    """The table as a plain dict: (uid, device) -> (route, disconnected_ms)."""

    def __init__(self, grace_ms: int, max_devices: int, max_routes: int) -> None:
        self.grace_ms = grace_ms
        self.max_devices = max_devices
        self.max_routes = max_routes
        self.slots: dict[tuple[str, str], Slot] = {}

    def bind(self, route: Route) -> BindResult | str:
        key = (route.uid, route.device)
        cur = self.slots.get(key)
        if cur is None:
            if sum(1 for u, _ in self.slots if u == route.uid) >= self.max_devices:
                return "max_devices"
            if len(self.slots) >= self.max_routes:
                return "max_routes"
            self.slots[key] = (route, None)
            return BindResult.BOUND
        held, disconnected = cur
        if route.epoch > held.epoch:
            self.slots[key] = (route, None)
            return BindResult.REPLACED if disconnected is None else BindResult.RESUMED
        if disconnected is None and route == held:
            return BindResult.UNCHANGED
        return BindResult.STALE

    def unbind(self, uid: str, device: str, conn: int, epoch: int, now: int) -> UnbindResult:
        cur = self.slots.get((uid, device))
        if cur is None or cur[1] is not None:
            return UnbindResult.NOT_FOUND
        if cur[0].conn_id != conn or cur[0].epoch != epoch:
            return UnbindResult.STALE
        self.slots[uid, device] = (cur[0], now)
        return UnbindResult.GRACE

    def due(self, now: int) -> dict[tuple[str, str], int]:
        return {
            k: d for k, (_, d) in self.slots.items() if d is not None and d + self.grace_ms <= now
        }

    def live(self, uid: str) -> list[Route]:
        return by_device([x for (u, _), (x, d) in self.slots.items() if u == uid and d is None])

    def grace(self, uid: str) -> list[Route]:
        return by_device([x for (u, _), (x, d) in self.slots.items() if u == uid and d is not None])


def route_table_machine(factory: TableFactory) -> type[RuleBasedStateMachine]:
    """A state machine comparing the backend built by ``factory(**limits)`` with Oracle."""

    class RouteTableMachine(RuleBasedStateMachine):
        table: RouteTableBackend
        oracle: Oracle
        now: int

        @initialize(
            grace_ms=st.sampled_from([0, 5, 20]),
            max_devices=st.integers(1, 3),
            max_routes=st.integers(1, 7),
        )
        def setup(self, grace_ms: int, max_devices: int, max_routes: int) -> None:
            limits = {"grace_ms": grace_ms, "max_devices": max_devices, "max_routes": max_routes}
            self.table = factory(**limits)
            self.oracle = Oracle(**limits)
            self.now = 0

        def advance(self, dt: int) -> int:
            self.now += dt
            return self.now

        @rule(uid=uids, device=devices, gw=gateways, conn=conn_ids, epoch=epochs, dt=small_dt)
        def bind(self, uid: str, device: str, gw: str, conn: int, epoch: int, dt: int) -> None:
            route = Route(uid=uid, device=device, gateway=gw, conn_id=conn, epoch=epoch)
            self._bind(route, dt)

        @precondition(lambda self: bool(self.oracle.slots))
        @rule(data=st.data(), gw=gateways, conn=conn_ids, bump=st.integers(1, 2), dt=small_dt)
        def reconnect(self, data: st.DataObject, gw: str, conn: int, bump: int, dt: int) -> None:
            """A newer connection of a device the table holds (RESUMED / REPLACED)."""
            key = data.draw(st.sampled_from(sorted(self.oracle.slots)))
            held = self.oracle.slots[key][0]
            epoch = held.epoch + bump
            route = Route(uid=key[0], device=key[1], gateway=gw, conn_id=conn, epoch=epoch)
            self._bind(route, dt)

        @precondition(lambda self: bool(self.oracle.slots))
        @rule(data=st.data(), dt=small_dt)
        def retry_bind(self, data: st.DataObject, dt: int) -> None:
            """The bind of a held route arrives again (UNCHANGED if live, STALE in grace)."""
            key = data.draw(st.sampled_from(sorted(self.oracle.slots)))
            self._bind(self.oracle.slots[key][0], dt)

        def _bind(self, route: Route, dt: int) -> None:
            now = self.advance(dt)
            expected = self.oracle.bind(route)
            event(f"bind -> {expected}")
            if isinstance(expected, str):
                with pytest.raises(CapacityError) as err:
                    self.table.bind(route, now)
                assert err.value.limit == expected
            else:
                assert self.table.bind(route, now) is expected

        @rule(uid=uids, device=devices, conn=conn_ids, epoch=epochs, dt=small_dt)
        def unbind(self, uid: str, device: str, conn: int, epoch: int, dt: int) -> None:
            now = self.advance(dt)
            expected = self.oracle.unbind(uid, device, conn, epoch, now)
            event(f"unbind -> {expected}")
            assert self.table.unbind(uid, device, conn, epoch, now) is expected

        @precondition(lambda self: any(d is None for _, d in self.oracle.slots.values()))
        @rule(data=st.data(), dt=st.integers(0, 8))
        def disconnect(self, data: st.DataObject, dt: int) -> None:
            """The live connection of a held device closes (GRACE)."""
            live = sorted(k for k, (_, d) in self.oracle.slots.items() if d is None)
            uid, device = data.draw(st.sampled_from(live))
            held = self.oracle.slots[uid, device][0]
            now = self.advance(dt)
            conn, epoch = held.conn_id, held.epoch
            assert self.oracle.unbind(uid, device, conn, epoch, now) is UnbindResult.GRACE
            assert self.table.unbind(uid, device, conn, epoch, now) is UnbindResult.GRACE

        @rule(gw=gateways, dt=st.integers(0, 8))
        def gateway_dies(self, gw: str, dt: int) -> None:
            now = self.advance(dt)
            expected = [
                x for x, d in self.oracle.slots.values() if d is None and x.gateway == gw
            ]
            for x in expected:
                self.oracle.slots[x.uid, x.device] = (x, now)
            assert by_device(self.table.unbind_gateway(gw, now)) == by_device(expected)

        @rule(dt=st.integers(0, 30), limit=st.none() | st.integers(0, 3))
        def expire(self, dt: int, limit: int | None) -> None:
            now = self.advance(dt)
            due = self.oracle.due(now)
            got = self.table.expire(now, limit)
            event(f"expired {min(len(got), 2)}+")
            assert len(got) == (len(due) if limit is None else min(limit, len(due)))
            got_keys = [(x.uid, x.device) for x in got]
            assert len(set(got_keys)) == len(got_keys)
            for x in got:
                key = (x.uid, x.device)
                assert key in due and self.oracle.slots[key][0] == x
            # oldest first: nothing left due is older than what was taken
            times = [due[k] for k in got_keys]
            assert times == sorted(times)
            left = [d for k, d in due.items() if k not in got_keys]
            assert not times or not left or max(times) <= min(left)
            for key in got_keys:
                del self.oracle.slots[key]

        @invariant()
        def agrees_with_oracle(self) -> None:
            check = getattr(self.table, "_check", None)
            if check is not None:
                check()
            o = self.oracle
            assert len(self.table) == len(o.slots)
            for uid in UIDS:
                assert by_device(self.table.lookup(uid)) == o.live(uid)
                assert by_device(self.table.lookup_grace(uid)) == o.grace(uid)
                for device in DEVICES:
                    slot = o.slots.get((uid, device))
                    got = self.table.get(uid, device)
                    if slot is None:
                        assert got is None
                    else:
                        assert got == Binding(route=slot[0], disconnected_ms=slot[1])
            waiting = [d for _, d in o.slots.values() if d is not None]
            assert self.table.next_expiry_ms() == (min(waiting) + o.grace_ms if waiting else None)
            groups = self.table.group_by_gateway(UIDS)
            flat = by_device([x for rs in groups.values() for x in rs])
            assert flat == by_device([x for u in UIDS for x in o.live(u)])
            assert all(x.gateway == g for g, rs in groups.items() for x in rs)

    return RouteTableMachine


MemoryMachine = route_table_machine(RouteTable)
MemoryMachine.TestCase.settings = settings(stateful_step_count=40, deadline=None)


class TestRouteTableMachine(MemoryMachine.TestCase):  # type: ignore[name-defined,misc]
    """The memory table agrees with the oracle under random binds, unbinds and expiry."""


# -- routers ------------------------------------------------------------------------


class _FakeRing:
    """A stand-in ring (sum of characters mod 3) so router tests don't depend on hashring."""

    nodes = GATEWAYS

    def get_many(self, keys: Any, /) -> list[str]:
        return [self.nodes[sum(map(ord, k)) % len(self.nodes)] for k in keys]


class _EmptyRing:
    def get_many(self, keys: Any, /) -> list[str]:
        raise EmptyRingError


routes = st.builds(
    Route, uid=uids, device=devices, gateway=gateways, conn_id=conn_ids, epoch=epochs
)


class TestRouters:
    """The three routing schemes agree with brute force on who gets what."""

    @given(st.lists(uids, unique=True), st.lists(gateways, unique=True))
    def test_broadcast(self, members: list[str], gws: list[str]) -> None:
        """Broadcast names every gateway with every member (nothing for no members)."""
        router = BroadcastRouter(gws)
        got = router.gateways_for(members)
        assert got == ({g: tuple(members) for g in gws} if members else {})
        router.add("gx")
        router.discard(gws[0] if gws else "none")
        assert router.gateways == (*gws[1:], "gx")

    @given(st.lists(st.text(min_size=1, max_size=4), unique=True))
    def test_hash_router(self, members: list[str]) -> None:
        """HashRouter groups each member under the gateway its ring names."""
        ring = _FakeRing()
        got = HashRouter(ring).gateways_for(members)
        expected: dict[str, list[str]] = {}
        for m in members:
            expected.setdefault(ring.get_many([m])[0], []).append(m)
        assert got == expected

    def test_hash_router_empty_ring(self) -> None:
        """An empty ring raises EmptyRingError, but no members need no ring."""
        router = HashRouter(_EmptyRing())
        assert router.gateways_for([]) == {}
        with pytest.raises(EmptyRingError):
            router.gateways_for(["a"])

    @given(st.lists(routes, max_size=12), st.lists(uids, unique=True))
    def test_table_router(self, binds: list[Route], members: list[str]) -> None:
        """TableRouter names each online member once per gateway holding a live route."""
        table = RouteTable()
        for x in binds:
            table.bind(x, 0)
        got = TableRouter(table).gateways_for(members)
        expected: dict[str, set[str]] = {}
        for m in members:
            for x in table.lookup(m):
                expected.setdefault(x.gateway, set()).add(m)
        assert {g: sorted(us) for g, us in got.items()} == {
            g: sorted(us) for g, us in expected.items()
        }
        assert all(len(us) == len(set(us)) for us in got.values())

    def test_table_router_any_backend(self) -> None:
        """TableRouter also works with a backend that is not the memory RouteTable."""

        class Wrapped:
            def __init__(self, inner: RouteTable) -> None:
                self.inner = inner

            def lookup(self, uid: str) -> tuple[Route, ...]:
                return self.inner.lookup(uid)

        inner = RouteTable()
        inner.bind(r(uid="a", gateway="g1"), 0)
        inner.bind(r(uid="a", device="web", gateway="g1"), 0)
        inner.bind(r(uid="a", device="pad", gateway="g2"), 0)
        inner.bind(r(uid="b", gateway="g2"), 0)
        backend: Any = Wrapped(inner)
        got = TableRouter(backend).gateways_for(["a", "b", "c"])
        assert got == {"g1": ["a"], "g2": ["a", "b"]}
        assert TableRouter(inner).gateways_for(["a", "b", "c"]) == got

    def test_hash_router_with_real_ring(self) -> None:
        """HashRouter works with imkit.hashring.HashRing when it is installed."""
        hashring = pytest.importorskip("imkit.hashring")
        ring = hashring.HashRing(GATEWAYS)
        lookup: NodeLookup = ring
        got = HashRouter(lookup).gateways_for(["u1", "u2", "u3"])
        assert sorted(u for us in got.values() for u in us) == ["u1", "u2", "u3"]
        for gw, us in got.items():
            assert all(ring.get(u) == gw for u in us)
