"""Tests of imkit.aio.redis against a real Redis: the AsyncRouteTable suite and its oracle
machine, races between clients and processes, batches, an outage of a private server,
the registry (side by side with MemoryRegistry) and the seq ceilings.

Every test works under its own key prefix (tests/services.unique_name) and deletes
its keys after; tests that kill a server use a private one.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, settings
from redis.asyncio import Redis

from imkit.aio.discovery import MemoryRegistry
from imkit.aio.redis import (
    DEFAULT_REDIS_BATCH,
    DEFAULT_REDIS_MAX_ROUTES,
    RedisCeilingStore,
    RedisRegistry,
    RedisRouteTable,
)
from imkit.discovery import GatewayInfo, Registry
from imkit.errors import BackendError, CapacityError, ConfigError
from imkit.routetable import AsyncRouteTable, BindResult, Route, UnbindResult
from tests.route_suite import (
    Backend,
    FakeClock,
    TestBind,
    TestExpiry,
    TestLimits,
    TestLookup,
    TestRealClock,
    TestUnbind,
    by_key,
    route_machine,
)
from tests.services import private_redis, redis_url, unique_name

__all__ = ["TestBind", "TestExpiry", "TestLimits", "TestLookup", "TestRealClock", "TestUnbind"]

pytestmark = pytest.mark.timeout(120)


async def delete_prefix(client: Redis, prefix: str) -> int:
    """Delete every key under ``prefix:``; returns how many."""
    keys = [key async for key in client.scan_iter(match=prefix + ":*", count=1000)]
    if keys:
        await client.delete(*keys)
    return len(keys)


class RedisTables:
    """Makes RedisRouteTables, each under a fresh prefix; aclose deletes their keys."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.made: list[RedisRouteTable] = []

    async def make(
        self, *, clock: Callable[[], int] | None = None, **limits: int
    ) -> AsyncRouteTable:
        table = RedisRouteTable(self.url, prefix=unique_name("rt"), clock=clock, **limits)
        self.made.append(table)
        return table

    async def aclose(self) -> None:
        for table in self.made:
            await delete_prefix(table.client, table.prefix)
            await table.aclose()


class RedisBackend:
    name = "redis"

    def __init__(self, url: str) -> None:
        self.url = url

    def tables(self) -> RedisTables:
        return RedisTables(self.url)


@pytest.fixture
def backend() -> Backend:
    return RedisBackend(redis_url())


def _machine_backend() -> Backend:
    return RedisBackend(redis_url())


RedisMachine = route_machine(_machine_backend)
# Bounded: 30 runs of 30 steps (~5 s). No shrinking: each shrink step replays calls
# against Redis, and a failure would run into the test's timeout; the failing run
# is printed whole instead (the memory machine, same rules, shrinks).
RedisMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


class TestRedisMachine(RedisMachine.TestCase):  # type: ignore[name-defined,misc]
    """RedisRouteTable agrees with the sync RouteTable under random calls (bounded run)."""


def route(
    uid: str = "u", device: str = "phone", gw: str = "g1", conn: int = 1, epoch: int = 1
) -> Route:
    return Route(uid=uid, device=device, gateway=gw, conn_id=conn, epoch=epoch)


@asynccontextmanager
async def redis_table(url: str | None = None, **kw: Any) -> AsyncIterator[RedisRouteTable]:
    """A RedisRouteTable under a fresh prefix on the shared server, cleaned up after."""
    table = RedisRouteTable(url or redis_url(), prefix=unique_name("rt"), **kw)
    try:
        yield table
    finally:
        await delete_prefix(table.client, table.prefix)
        await table.aclose()


def run(coro: Awaitable[None]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, 60)

    asyncio.run(bounded())


# -- route table: Redis specifics ------------------------------------------------------


class TestRedisRouteTable:
    """What only the Redis table shows: layout, batches, clients, configuration."""

    def test_is_an_async_route_table(self) -> None:
        """RedisRouteTable satisfies AsyncRouteTable (mypy) and has the documented defaults."""

        async def main() -> None:
            async with redis_table() as table:
                typed: AsyncRouteTable = table
                assert typed.max_routes == DEFAULT_REDIS_MAX_ROUTES
                assert table.batch_size == DEFAULT_REDIS_BATCH
                assert "RedisRouteTable(prefix=" in repr(table)

        run(main())

    def test_small_batches(self) -> None:
        """With batch_size=3, unbind_gateway, expire and group_by_gateway still see everything."""

        async def main() -> None:
            clock = FakeClock()
            async with redis_table(batch_size=3, grace_ms=10, clock=clock) as table:
                routes = [route(uid=f"u{i}", gw="gw" if i % 5 else "other") for i in range(20)]
                for x in routes:
                    await table.bind(x)
                groups = await table.group_by_gateway(
                    [x.uid for x in routes]
                )  # 7 HMGETs, one pipeline
                assert by_key(groups["gw"]) == by_key([x for x in routes if x.gateway == "gw"])
                assert by_key(groups["other"]) == by_key(
                    [x for x in routes if x.gateway == "other"]
                )
                parked = await table.unbind_gateway("gw")
                assert len(parked) == 16
                await table._check()
                clock.advance(10)
                assert len(await table.expire(limit=5)) == 5
                assert len(await table.expire(limit=None)) == 11
                assert await table.count() == 4
                await table._check()

        run(main())

    def test_prefixes_isolate_tables(self) -> None:
        """Two tables under different prefixes on one server do not see each other."""

        async def main() -> None:
            async with redis_table() as a, redis_table() as b:
                await a.bind(route())
                assert await b.lookup("u") == ()
                assert await b.count() == 0
                assert await b.unbind("u", "phone", 1, 1) is UnbindResult.NOT_FOUND

        run(main())

    def test_shared_client_with_decoded_responses(self) -> None:
        """A caller's client (decode_responses=True) works and is not closed by aclose()."""

        async def main() -> None:
            client = Redis.from_url(redis_url(), decode_responses=True)
            prefix = unique_name("rt")
            table = RedisRouteTable(client, prefix=prefix, grace_ms=0)
            try:
                await table.bind(route(uid="ü"))
                assert await table.lookup("ü") == (route(uid="ü"),)
                assert await table.group_by_gateway(["ü"]) == {"g1": [route(uid="ü")]}
                await table.unbind("ü", "phone", 1, 1)
                await table._check()
                assert await table.expire() == [route(uid="ü")]
                await table.aclose()
                assert await client.ping()
            finally:
                await delete_prefix(client, prefix)
                await client.aclose()

        run(main())

    def test_disconnected_ms_is_redis_time(self) -> None:
        """Without a clock the park time is the server's TIME in ms."""

        async def main() -> None:
            async with redis_table() as table:
                await table.bind(route())
                sec, usec = await table.client.time()
                before = sec * 1000 + usec // 1000
                await table.unbind("u", "phone", 1, 1)
                sec, usec = await table.client.time()
                after = sec * 1000 + usec // 1000
                binding = await table.get("u", "phone")
                assert binding is not None and binding.disconnected_ms is not None
                assert before <= binding.disconnected_ms <= after

        run(main())

    def test_calls_wait_for_a_free_connection(self) -> None:
        """Far more concurrent calls than max_connections queue for a connection, none fails."""

        async def main() -> None:
            async with redis_table(max_connections=4) as table:
                binds = [table.bind(route(uid=f"u{i}")) for i in range(300)]
                assert set(await asyncio.gather(*binds)) == {BindResult.BOUND}
                assert await table.count() == 300

        run(main())

    def test_bad_configuration(self) -> None:
        """Bad prefix, batch size, timeout or client are ConfigErrors."""
        url = redis_url()
        bad: list[dict[str, Any]] = [
            {"prefix": ""},
            {"batch_size": 0},
            {"timeout_ms": 0},
            {"max_connections": 0},
            {"grace_ms": True},
        ]
        for kw in bad:
            with pytest.raises(ConfigError):
                RedisRouteTable(url, **kw)
        with pytest.raises(ConfigError):
            RedisRouteTable(object())  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            RedisRouteTable("localhost:6379")  # not a URL

    def test_check_catches_corruption(self) -> None:
        """_check raises AssertionError when the count or the gateway index is wrong."""

        async def main() -> None:
            async with redis_table() as table:
                await table.bind(route())
                await table._check()
                await table.client.set(table.prefix + ":n", 5)
                with pytest.raises(AssertionError):
                    await table._check()
                await table.client.set(table.prefix + ":n", 1)
                await table.client.sadd(table.prefix + ":g:ghost", "1:uphone")
                with pytest.raises(AssertionError):
                    await table._check()

        run(main())


class TestRaces:
    """Several clients and processes on one table: the scripts keep it consistent."""

    def test_concurrent_binds_one_winner(self) -> None:
        """Two clients binding the same devices with equal epochs: exactly one wins each."""

        async def main() -> None:
            async with redis_table() as a:
                b = RedisRouteTable(redis_url(), prefix=a.prefix)
                try:
                    n = 100
                    ours = [a.bind(route(uid=f"u{i}", gw="ga", conn=1, epoch=7)) for i in range(n)]
                    theirs = [
                        b.bind(route(uid=f"u{i}", gw="gb", conn=2, epoch=7)) for i in range(n)
                    ]
                    results = await asyncio.gather(*ours, *theirs)
                    for i in range(n):
                        pair = {results[i], results[n + i]}
                        assert pair == {BindResult.BOUND, BindResult.STALE}
                        winner = "ga" if results[i] is BindResult.BOUND else "gb"
                        assert (await a.lookup(f"u{i}"))[0].gateway == winner
                    assert await a.count() == n
                    await a._check()
                finally:
                    await b.aclose()

        run(main())

    @pytest.mark.timeout(60)
    def test_two_processes_race_by_epoch(self) -> None:
        """Two OS processes race binds for the same devices: equal epochs have one winner,
        different epochs end with the higher one, whatever the arrival order."""
        url = redis_url()
        prefix = unique_name("rt")
        n = 300
        code = textwrap.dedent(
            """
            import asyncio, json, sys
            from imkit.aio.redis import RedisRouteTable
            from imkit.routetable import Route

            url, prefix, me, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

            async def main():
                table = RedisRouteTable(url, prefix=prefix)
                await table.client.blpop([prefix + ":go:" + str(me)], timeout=20)
                gw = "gw%d" % me
                def bind(i, epoch):
                    return table.bind(Route(uid="u%d" % i, device="phone", gateway=gw,
                                            conn_id=me, epoch=epoch))
                equal = [await bind(i, 5) for i in range(n)]
                # process 0 holds the higher epoch on even devices, process 1 on odd ones
                higher = [await bind(i, 100 + ((i + me) % 2 == 0)) for i in range(n)]
                print(json.dumps([[r.value for r in equal], [r.value for r in higher]]))
                await table.aclose()

            asyncio.run(main())
            """
        )

        async def main() -> None:
            procs = [
                await asyncio.create_subprocess_exec(
                    sys.executable, "-c", code, url, prefix, str(me), str(n),
                    stdout=asyncio.subprocess.PIPE,
                )
                for me in (0, 1)
            ]  # fmt: skip
            table = RedisRouteTable(url, prefix=prefix)
            try:
                # both processes wait on their list, so they start binding together
                await table.client.rpush(prefix + ":go:0", 1)
                await table.client.rpush(prefix + ":go:1", 1)
                outs = [json.loads((await p.communicate())[0]) for p in procs]
                assert [p.returncode for p in procs] == [0, 0]
                for i in range(n):
                    assert {outs[0][0][i], outs[1][0][i]} == {"bound", "stale"}
                    high = 0 if i % 2 == 0 else 1
                    assert outs[high][1][i] == "replaced"
                    assert outs[1 - high][1][i] in ("replaced", "stale")
                    (live,) = await table.lookup(f"u{i}")
                    assert (live.gateway, live.epoch) == (f"gw{high}", 101)
                assert await table.count() == n
                await table._check()
            finally:
                await delete_prefix(table.client, prefix)
                await table.aclose()

        run(main())

    def test_expire_reported_once_across_callers(self) -> None:
        """Two clients expiring the same parked routes concurrently: each route reported once."""

        async def main() -> None:
            async with redis_table(grace_ms=0) as a:
                b = RedisRouteTable(redis_url(), prefix=a.prefix, grace_ms=0)
                try:
                    routes = [route(uid=f"u{i}", gw="gw") for i in range(300)]
                    for x in routes:
                        await a.bind(x)
                    assert len(await a.unbind_gateway("gw")) == 300

                    async def drain(table: RedisRouteTable) -> list[Route]:
                        got: list[Route] = []
                        while True:
                            batch = await table.expire(limit=7)
                            if not batch:
                                return got
                            got += batch
                            await asyncio.sleep(0)

                    got_a, got_b = await asyncio.gather(drain(a), drain(b))
                    assert got_a and got_b  # both took part
                    assert by_key(got_a + got_b) == by_key(routes)
                    assert await a.count() == 0
                    await a._check()
                finally:
                    await b.aclose()

        run(main())


class TestOutage:
    """A private Redis killed and restarted (no persistence)."""

    @pytest.mark.timeout(60)
    def test_errors_during_outage_then_recovery(self, tmp_path: Path) -> None:
        """Calls raise BackendError while the server is down and work after it restarts;
        the routes it held are gone (clients and gateways bind again)."""
        with private_redis(tmp_path) as server:
            url = f"redis://127.0.0.1:{server.port}/0"

            async def main() -> None:
                table = RedisRouteTable(
                    url, prefix="p", grace_ms=1000, batch_size=2, timeout_ms=500
                )
                registry = RedisRegistry(url, prefix="r", timeout_ms=500)
                await table.bind(route())
                await registry.register(GatewayInfo(id="gw", endpoints=("tcp://h:1",)))
                server.kill()
                calls: list[Callable[[], Awaitable[object]]] = [
                    lambda: table.bind(route(uid="v")),
                    lambda: table.unbind("u", "phone", 1, 1),
                    lambda: table.unbind_gateway("g1"),
                    table.expire,
                    lambda: table.get("u", "phone"),
                    lambda: table.lookup("u"),
                    lambda: table.group_by_gateway(["u", "v", "w"]),
                    table.count,
                    lambda: registry.heartbeat("gw"),
                    registry.rank,
                ]
                for call in calls:
                    with pytest.raises(BackendError) as err:
                        await asyncio.wait_for(call(), 5)
                    assert err.value.__cause__ is not None
                server.start()
                assert await table.count() == 0  # nothing persisted: routes are lost
                assert await table.lookup("u") == ()
                assert await table.bind(route()) is BindResult.BOUND  # scripts reloaded
                await table.bind(route(uid="v", gw="g2"))
                groups = await table.group_by_gateway(["u", "v", "w"])  # a pipeline of HMGETs
                assert groups == {"g1": [route()], "g2": [route(uid="v", gw="g2")]}
                assert not await registry.heartbeat("gw")  # must register again
                await registry.register(GatewayInfo(id="gw", endpoints=("tcp://h:1",)))
                assert [g.id for g in await registry.rank()] == ["gw"]
                await table.client.script_flush()
                await table.client.script_flush()
                assert await table.unbind("u", "phone", 1, 1) is UnbindResult.GRACE
                await table._check()
                await table.aclose()
                await registry.aclose()

            run(main())


# -- registry: the same behaviour as MemoryRegistry ------------------------------------

RegistryFactory = Callable[..., Registry]


@asynccontextmanager
async def registries(kind: str) -> AsyncIterator[RegistryFactory]:
    """A factory of registries of one kind (fresh prefix each), cleaned up after."""
    made: list[RedisRegistry] = []

    def make(**kw: Any) -> Registry:
        if kind == "memory":
            return MemoryRegistry(**kw)
        registry = RedisRegistry(redis_url(), prefix=unique_name("gw"), **kw)
        made.append(registry)
        return registry

    try:
        yield make
    finally:
        for registry in made:
            await delete_prefix(registry._client, registry.prefix)
            await registry.aclose()


def gw(gid: str, region: str = "", **kw: Any) -> GatewayInfo:
    return GatewayInfo(id=gid, endpoints=(f"tcp://{gid}:7000",), region=region, **kw)


KINDS = ["memory", "redis"]


@pytest.mark.parametrize("kind", KINDS)
class TestRegistryBehaviour:
    """MemoryRegistry and RedisRegistry behave alike (the Registry contract)."""

    def test_live_until_ttl(self, kind: str) -> None:
        """A registered gateway is live strictly before its ttl and gone at it."""

        async def main() -> None:
            async with registries(kind) as make:
                clock = FakeClock(10)
                reg = make(ttl_ms=100, clock=clock)
                info = gw("a", "eu", max_connections=10, connections=2, cpu=0.25)
                await reg.register(info)
                await reg.register(gw("b"), ttl_ms=500)
                clock.now = 109
                assert await reg.get("a") == info
                assert [g.id for g in await reg.live()] == ["a", "b"]
                clock.now = 110
                assert await reg.get("a") is None
                assert [g.id for g in await reg.live()] == ["b"]
                assert not await reg.deregister("a")  # live() removed it
                assert await reg.deregister("b")

        run(main())

    def test_heartbeat(self, kind: str) -> None:
        """A heartbeat extends the ttl and updates the load; a dead gateway must re-register."""

        async def main() -> None:
            async with registries(kind) as make:
                clock = FakeClock(0)
                reg = make(ttl_ms=100, clock=clock)
                await reg.register(gw("a", max_connections=100))
                clock.now = 90
                assert await reg.heartbeat("a", connections=25, cpu=0.123456789012345678)
                clock.now = 189
                info = await reg.get("a")
                assert info is not None
                assert (info.connections, info.cpu) == (25, 0.123456789012345678)
                with pytest.raises(ConfigError):
                    await reg.heartbeat("a", connections=-1)
                with pytest.raises(ConfigError):
                    await reg.heartbeat("a", cpu=float("nan"))
                assert await reg.heartbeat("a")
                assert not await reg.heartbeat("zzz")
                clock.now = 289
                assert not await reg.heartbeat("a")

        run(main())

    def test_draining_and_deregister(self, kind: str) -> None:
        """Draining ranks a gateway last without moving its deadline; deregister removes it."""

        async def main() -> None:
            async with registries(kind) as make:
                clock = FakeClock(0)
                reg = make(ttl_ms=100, clock=clock)
                for gid in "abc":
                    await reg.register(gw(gid))
                clock.now = 50
                assert await reg.set_draining("a")
                assert (await reg.rank())[-1].id == "a"
                assert await reg.set_draining("a", False)
                assert not (await reg.get("a") or gw("x", draining=True)).draining
                assert await reg.deregister("b")
                assert not await reg.deregister("b")
                assert not await reg.set_draining("b")
                clock.now = 100
                assert await reg.get("a") is None  # set_draining did not extend the ttl

        run(main())

    def test_capacity_counts_live_gateways(self, kind: str) -> None:
        """A full registry drops dead gateways before refusing a new one."""

        async def main() -> None:
            async with registries(kind) as make:
                clock = FakeClock(0)
                reg = make(ttl_ms=10, max_gateways=2, clock=clock)
                await reg.register(gw("a"))
                clock.now = 5
                await reg.register(gw("b"))
                clock.now = 9
                with pytest.raises(CapacityError) as err:
                    await reg.register(gw("c"))
                assert err.value.limit == "max_gateways"
                await reg.register(gw("b"))  # re-registering needs no room
                clock.now = 10
                await reg.register(gw("c"))
                assert [g.id for g in await reg.live()] == ["b", "c"]

        run(main())

    def test_invalid_info_refused(self, kind: str) -> None:
        """Invalid infos and ttls are ConfigErrors and store nothing."""

        async def main() -> None:
            async with registries(kind) as make:
                reg = make(max_endpoints=2)
                bad = [
                    GatewayInfo(id="", endpoints=("x",)),
                    GatewayInfo(id="a", endpoints=()),
                    GatewayInfo(id="a", endpoints=("x", "y", "z")),
                    GatewayInfo(id="a", endpoints=("x",), cpu=-1.0),
                ]
                for info in bad:
                    with pytest.raises(ConfigError):
                        await reg.register(info)
                with pytest.raises(ConfigError):
                    await reg.register(gw("a"), ttl_ms=0)
                assert await reg.live() == []

        run(main())

    def test_rank_region_then_load(self, kind: str) -> None:
        """Same region first, then lighter load; limit cuts the list."""

        async def main() -> None:
            async with registries(kind) as make:
                reg = make()
                await reg.register(gw("eu-busy", "eu", cpu=0.9))
                await reg.register(gw("eu-idle", "eu", cpu=0.05))
                await reg.register(gw("us-idle", "us", cpu=0.0))
                ranked = [g.id for g in await reg.rank(region="eu")]
                assert ranked == ["eu-idle", "eu-busy", "us-idle"]
                assert [g.id for g in await reg.rank(region="eu", limit=1)] == ["eu-idle"]

        run(main())


class TestRegistryAgreement:
    """RedisRegistry ranks exactly like MemoryRegistry (GatewayTable's rules)."""

    def test_same_ranking_as_memory(self) -> None:
        """Random fleets and clients: both registries return the same order."""

        async def main() -> None:
            rnd = random.Random(7)
            async with registries("redis") as make:
                for _ in range(10):
                    memory = MemoryRegistry(clock=lambda: 0)
                    redis_reg = make(clock=lambda: 0)
                    for i in range(rnd.randint(1, 12)):
                        info = gw(
                            f"gw-{i}",
                            rnd.choice(["", "eu", "us"]),
                            max_connections=rnd.choice([0, 1000]),
                            connections=rnd.randint(0, 1000),
                            cpu=rnd.random(),
                            draining=rnd.random() < 0.2,
                        )
                        await memory.register(info)
                        await redis_reg.register(info)
                    assert await redis_reg.live() == await memory.live()
                    for key in ("", "alice", "bob", "carol"):
                        region = rnd.choice(["", "eu", "us"])
                        assert await redis_reg.rank(region=region, client_key=key) == (
                            await memory.rank(region=region, client_key=key)
                        )

        run(main())

    def test_ttl_on_redis_time(self) -> None:
        """Without a clock, a gateway expires by the server's time."""

        async def main() -> None:
            async with registries("redis") as make:
                reg = make(ttl_ms=200)
                await reg.register(gw("a"))
                assert [g.id for g in await reg.live()] == ["a"]
                for _ in range(100):  # at most 2 s
                    await asyncio.sleep(0.02)
                    if not await reg.live():
                        break
                assert await reg.live() == []
                assert not await reg.heartbeat("a")

        run(main())


# -- seq ceilings ------------------------------------------------------------------------


class TestCeilingStore:
    """RedisCeilingStore keeps the largest ceiling ever saved."""

    def test_ceilings_only_grow(self) -> None:
        """save keeps the max (exactly, beyond 2**53); load returns it; 0 when unknown."""

        async def main() -> None:
            store = RedisCeilingStore(redis_url(), prefix=unique_name("seq"))
            try:
                assert await store.load("room") == 0
                assert await store.save("room", 10_000) == 10_000
                assert await store.save("room", 5_000) == 10_000
                assert await store.load("room") == 10_000
                big = 2**60 + 1
                assert await store.save("room", big) == big
                assert await store.save("room", 2**60) == big
                assert await store.load("room") == big
                for bad in (-1, 2**63, True):
                    with pytest.raises(ConfigError):
                        await store.save("room", bad)
                # concurrent saves from two owners: the largest wins
                other = RedisCeilingStore(redis_url(), prefix=store.prefix)
                values = [big + i for i in range(1, 51)]
                random.Random(3).shuffle(values)
                await asyncio.gather(
                    *(s.save("room", v) for s, v in zip([store, other] * 25, values, strict=True))
                )
                assert await store.load("room") == big + 50
                await other.aclose()
            finally:
                await delete_prefix(store._client, store.prefix)
                await store.aclose()

        run(main())
