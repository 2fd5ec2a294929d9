"""Tests of imkit.discovery: the GatewayTable core (TTL expiry by now_ms, ranking)."""

from __future__ import annotations

from collections import Counter

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from imkit.discovery import DEFAULT_TTL_MS, GatewayInfo, GatewayTable
from imkit.errors import CapacityError, ConfigError, TimeWentBackwards


def gw(gid: str, region: str = "", **kw: object) -> GatewayInfo:
    return GatewayInfo(id=gid, endpoints=(f"tcp://{gid}:7000",), region=region, **kw)  # type: ignore[arg-type]


class TestRegistration:
    def test_live_until_ttl(self) -> None:
        """A registered gateway is live strictly before now + ttl and gone at it."""
        table = GatewayTable(ttl_ms=100)
        table.register(gw("a"), now_ms=10)
        assert [g.id for g in table.live(109)] == ["a"]
        assert table.live(110) == []
        assert table.get("a", 110) is None

    def test_heartbeat_extends_and_updates_load(self) -> None:
        """A heartbeat moves the deadline and records connections and cpu."""
        table = GatewayTable(ttl_ms=100)
        table.register(gw("a", max_connections=100), now_ms=0)
        assert table.heartbeat("a", 90, connections=25, cpu=0.5)
        info = table.get("a", 189)
        assert info is not None
        assert (info.connections, info.cpu, info.load) == (25, 0.5, 0.5)

    def test_heartbeat_after_expiry_asks_to_register(self) -> None:
        """An expired or unknown gateway's heartbeat returns False and changes nothing."""
        table = GatewayTable(ttl_ms=100)
        table.register(gw("a"), now_ms=0)
        assert not table.heartbeat("a", 100)
        assert not table.heartbeat("zzz", 100)
        assert table.expire(100) == ["a"]
        assert len(table) == 0

    def test_deregister_and_draining(self) -> None:
        """deregister removes at once; draining ranks a gateway after the others."""
        table = GatewayTable()
        for gid in "abc":
            table.register(gw(gid), now_ms=0)
        assert table.set_draining("a", 1)
        assert table.rank(1)[-1].id == "a"
        assert table.deregister("b") and not table.deregister("b")
        assert [g.id for g in table.live(2)] == ["a", "c"]
        assert not table.set_draining("b", 2)

    def test_default_ttl(self) -> None:
        """The default ttl is DEFAULT_TTL_MS."""
        table = GatewayTable()
        table.register(gw("a"), now_ms=0)
        assert table.get("a", DEFAULT_TTL_MS - 1) is not None
        assert table.get("a", DEFAULT_TTL_MS) is None


class TestLimitsAndBadInput:
    def test_capacity_counts_only_live_gateways(self) -> None:
        """A full table evicts expired entries before refusing a new gateway."""
        table = GatewayTable(ttl_ms=10, max_gateways=2)
        table.register(gw("a"), now_ms=0)
        table.register(gw("b"), now_ms=5)
        with pytest.raises(CapacityError) as info:
            table.register(gw("c"), now_ms=9)
        assert info.value.limit == "max_gateways"
        table.register(gw("c"), now_ms=10)
        assert [g.id for g in table.live(10)] == ["b", "c"]
        table.register(gw("c"), now_ms=11)  # re-registering needs no room

    @pytest.mark.parametrize(
        "info",
        [
            GatewayInfo(id="", endpoints=("x",)),
            GatewayInfo(id="a", endpoints=()),
            GatewayInfo(id="a", endpoints=("",)),
            GatewayInfo(id="a", endpoints=("x",) * 17),
            GatewayInfo(id="a", endpoints=("x",), connections=-1),
            GatewayInfo(id="a", endpoints=("x",), cpu=float("nan")),
            GatewayInfo(id="a", endpoints=("x",), cpu=-0.5),
        ],
    )
    def test_invalid_info_is_refused(self, info: GatewayInfo) -> None:
        """Empty ids or endpoints, too many endpoints, negative or NaN load: ConfigError."""
        with pytest.raises(ConfigError):
            GatewayTable().register(info, now_ms=0)

    def test_bad_heartbeat_load(self) -> None:
        """A heartbeat with a negative connection count is a ConfigError."""
        table = GatewayTable()
        table.register(gw("a"), now_ms=0)
        with pytest.raises(ConfigError):
            table.heartbeat("a", 1, connections=-3)

    @pytest.mark.parametrize(
        "kwargs",
        [{"ttl_ms": 0}, {"max_gateways": 0}, {"max_endpoints": 0}, {"load_band": 0.0}],
    )
    def test_bad_constructor(self, kwargs: dict[str, float]) -> None:
        """Limits out of range are a ConfigError."""
        with pytest.raises(ConfigError):
            GatewayTable(**kwargs)  # type: ignore[arg-type]

    def test_time_must_not_go_backwards(self) -> None:
        """now_ms smaller than a previous now_ms raises TimeWentBackwards."""
        table = GatewayTable()
        table.live(100)
        with pytest.raises(TimeWentBackwards):
            table.live(99)


class TestRanking:
    def test_region_then_load(self) -> None:
        """Same region first, then lighter load bands first."""
        table = GatewayTable()
        table.register(gw("eu-busy", "eu", cpu=0.9), now_ms=0)
        table.register(gw("eu-idle", "eu", cpu=0.05), now_ms=0)
        table.register(gw("us-idle", "us", cpu=0.0), now_ms=0)
        assert [g.id for g in table.rank(1, region="eu")] == ["eu-idle", "eu-busy", "us-idle"]
        assert [g.id for g in table.rank(1, region="eu", limit=1)] == ["eu-idle"]

    def test_equal_load_spreads_clients(self) -> None:
        """Clients spread their first choice over equally loaded gateways, stably per client."""
        table = GatewayTable()
        for i in range(8):
            table.register(gw(f"gw-{i}"), now_ms=0)
        firsts = Counter(table.rank(1, client_key=f"user-{u}")[0].id for u in range(800))
        assert len(firsts) == 8
        assert max(firsts.values()) < 3 * min(firsts.values())
        assert table.rank(1, client_key="u") == table.rank(1, client_key="u")


IDS = st.sampled_from(["a", "b", "c", "d"])


@attrs.define
class _Row:
    info: GatewayInfo
    deadline: int
    ttl: int


class TableMachine(RuleBasedStateMachine):
    """GatewayTable with a tiny capacity against a dict oracle; _check() after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.table = GatewayTable(ttl_ms=50, max_gateways=3)
        self.now = 0
        self.oracle: dict[str, _Row] = {}

    def live_ids(self) -> list[str]:
        return sorted(g for g, r in self.oracle.items() if r.deadline > self.now)

    @rule(dt=st.integers(0, 40))
    def advance(self, dt: int) -> None:
        self.now += dt

    @rule(
        gid=IDS,
        region=st.sampled_from(["", "eu", "us"]),
        cpu=st.sampled_from([0.0, 0.05, 0.3, 0.95]),
        ttl=st.none() | st.integers(1, 80),
    )
    def register(self, gid: str, region: str, cpu: float, ttl: int | None) -> None:
        info = gw(gid, region, cpu=cpu)
        if gid not in self.oracle and len(self.oracle) >= 3:
            self.oracle = {g: r for g, r in self.oracle.items() if r.deadline > self.now}
            if len(self.oracle) >= 3:
                with pytest.raises(CapacityError):
                    self.table.register(info, self.now, ttl_ms=ttl)
                return
        self.table.register(info, self.now, ttl_ms=ttl)
        ttl_used = 50 if ttl is None else ttl
        self.oracle[gid] = _Row(info, self.now + ttl_used, ttl_used)

    @rule(gid=IDS, conns=st.none() | st.integers(0, 100), cpu=st.none() | st.floats(0, 1))
    def heartbeat(self, gid: str, conns: int | None, cpu: float | None) -> None:
        row = self.oracle.get(gid)
        alive = row is not None and row.deadline > self.now
        assert self.table.heartbeat(gid, self.now, connections=conns, cpu=cpu) == alive
        if row is not None and alive:
            changes: dict[str, object] = {}
            if conns is not None:
                changes["connections"] = conns
            if cpu is not None:
                changes["cpu"] = cpu
            row.info = attrs.evolve(row.info, **changes)  # type: ignore[arg-type]
            row.deadline = self.now + row.ttl

    @rule(gid=IDS)
    def deregister(self, gid: str) -> None:
        assert self.table.deregister(gid) == (self.oracle.pop(gid, None) is not None)

    @rule(gid=IDS)
    def drain(self, gid: str) -> None:
        row = self.oracle.get(gid)
        alive = row is not None and row.deadline > self.now
        assert self.table.set_draining(gid, self.now) == alive
        if row is not None and alive:
            row.info = attrs.evolve(row.info, draining=True)

    @precondition(lambda self: self.oracle)
    @rule()
    def expire(self) -> None:
        dead = sorted(g for g, r in self.oracle.items() if r.deadline <= self.now)
        assert sorted(self.table.expire(self.now)) == dead
        for g in dead:
            del self.oracle[g]

    @rule(region=st.sampled_from(["", "eu", "us"]), key=st.sampled_from(["", "u1", "u2"]))
    def rank(self, region: str, key: str) -> None:
        ranked = self.table.rank(self.now, region=region, client_key=key)
        assert sorted(g.id for g in ranked) == self.live_ids()
        order = [
            (g.draining, bool(region) and g.region != region, int(g.load / 0.1)) for g in ranked
        ]
        assert order == sorted(order)

    @invariant()
    def check(self) -> None:
        self.table._check()
        assert [g.id for g in self.table.live(self.now)] == self.live_ids()
        for gid in self.live_ids():
            assert self.table.get(gid, self.now) == self.oracle[gid].info


TableMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40)
TestTableMachine = TableMachine.TestCase
