"""RedisRouteTable beside MemoryRouteTable: bind+unbind rate and latency, group_by_gateway
latency by batch size, server time per script, and bytes per route in Redis.

1. **bind + unbind.** A reconnect cycle: bind a newer epoch of a user's device,
   then unbind it (two calls, two round trips for Redis). One at a time (latency,
   p50/p99 per pair) and with 64 in flight (throughput).
2. **group_by_gateway** of 1, 200, 1000 and 5000 uids (a conversation's members) over
   a table of N users (1.2 devices each, 20 gateways, 2/3 of the users online):
   p50/p99 per call. For Redis one round trip whatever the size (an ``HMGET`` per
   ``batch_size`` = 500 uids, several in one pipeline), plus the server time per
   call from ``INFO commandstats`` (the shared resource).
3. **A gateway dies**: ``unbind_gateway`` of one gateway's routes, then ``expire``
   of them all, with the server time per script (what the batch size bounds).
4. **Bytes per route in Redis**: ``MEMORY USAGE <key> SAMPLES 0`` summed over the
   table's keys, live and parked, and the ``used_memory`` delta.

Run::

    python benchmarks/bench_redis.py            # a private redis-server (< 1 min)
    python benchmarks/bench_redis.py --quick    # smoke test
    python benchmarks/bench_redis.py --url redis://host:6379/0   # another server

Caveats: client and server share the machine (loopback, no network latency; on a
LAN add ~0.1-0.3 ms per round trip); the client is one Python process, so past a
few thousand calls/s its CPU, not Redis, is the limit. Memory: the embedded table
needs no round trip at all, the comparison shows what sharing the table costs.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from redis import __version__ as redis_version
from redis.utils import HIREDIS_AVAILABLE as HIREDIS

from _harness import Report, fmt_rate, machine, quick
from imkit.aio import run
from imkit.aio.redis import DEFAULT_REDIS_BATCH, RedisRouteTable
from imkit.aio.routes import MemoryRouteTable
from imkit.routetable import AsyncRouteTable, Route

N_USERS = 5_000 if quick() else 20_000
N_GATEWAYS = 20
SECOND_DEVICE = 0.2
N_PAIRS = 1_000 if quick() else 4_000  # sequential bind+unbind pairs
N_CONCURRENT_PAIRS = 2_000 if quick() else 10_000
IN_FLIGHT = 64
GROUP_SIZES = (1, 200, 1000, 5000)
GROUP_CALLS = {1: 400, 200: 300, 1000: 150, 5000: 40}
if quick():
    GROUP_CALLS = {k: max(10, v // 4) for k, v in GROUP_CALLS.items()}


def users(n: int) -> list[list[Route]]:
    """Routes per user: a phone, and a desktop for SECOND_DEVICE of them; 2/3 online."""
    out = []
    for i in range(n):
        uid = f"user-{i:08d}"
        routes = []
        if i % 3:
            gw = f"gw-{i % N_GATEWAYS:02d}"
            routes.append(Route(uid=uid, device="phone", gateway=gw, conn_id=i, epoch=1))
            if (i * 7919) % 100 < SECOND_DEVICE * 100:
                gw2 = f"gw-{(i * 31) % N_GATEWAYS:02d}"
                routes.append(Route(uid=uid, device="desktop", gateway=gw2, conn_id=i, epoch=1))
        out.append(routes)
    return out


async def bounded(calls: list[Callable[[], Awaitable[Any]]], limit: int) -> None:
    """Run the calls with at most ``limit`` in flight."""
    it = iter(calls)

    async def worker() -> None:
        for call in it:
            await call()

    await asyncio.gather(*(worker() for _ in range(limit)))


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


async def pairs_sequential(table: AsyncRouteTable, epoch0: int) -> tuple[float, list[float]]:
    """N_PAIRS reconnect cycles one at a time: (pairs/s, latency per pair)."""
    lat = []
    t0 = time.perf_counter()
    for k in range(N_PAIRS):
        uid = f"cycler-{k % 500}"
        epoch = epoch0 + k
        a = time.perf_counter()
        await table.bind(Route(uid=uid, device="phone", gateway="gw-x", conn_id=k, epoch=epoch))
        await table.unbind(uid, "phone", k, epoch)
        lat.append(time.perf_counter() - a)
    return N_PAIRS / (time.perf_counter() - t0), lat


async def pairs_concurrent(table: AsyncRouteTable, epoch0: int) -> float:
    """N_CONCURRENT_PAIRS cycles with IN_FLIGHT at once, each on its own user: pairs/s."""
    per = N_CONCURRENT_PAIRS // IN_FLIGHT

    async def worker(w: int) -> None:
        uid = f"worker-{w}"
        for k in range(per):
            epoch = epoch0 + k
            await table.bind(Route(uid=uid, device="phone", gateway="gw-y", conn_id=k, epoch=epoch))
            await table.unbind(uid, "phone", k, epoch)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(IN_FLIGHT)))
    return per * IN_FLIGHT / (time.perf_counter() - t0)


async def group_latency(table: AsyncRouteTable, uids: list[str], size: int) -> list[float]:
    lat = []
    for c in range(GROUP_CALLS[size]):
        start = (c * 997) % (len(uids) - size + 1)
        members = uids[start : start + size]
        a = time.perf_counter()
        await table.group_by_gateway(members)
        lat.append(time.perf_counter() - a)
    return lat


async def server_stats(table: RedisRouteTable, command: str = "") -> tuple[int, int]:
    """(calls, µs) the server spent on ``command`` (all commands but INFO if empty),
    from INFO commandstats. Commands a script calls are counted apart from the
    script's own line, which includes them: read scripts by their EVALSHA line."""
    info = await table.client.info("commandstats")
    calls = usec = 0
    for name, stat in info.items():
        if name == f"cmdstat_{command}" if command else name != "cmdstat_info":
            calls += int(stat["calls"])
            usec += int(stat["usec"])
    return calls, usec


async def delete_prefix(table: RedisRouteTable) -> None:
    keys = [k async for k in table.client.scan_iter(match=table.prefix + ":*", count=1000)]
    for i in range(0, len(keys), 1000):
        await table.client.delete(*keys[i : i + 1000])


async def redis_bytes(table: RedisRouteTable) -> int:
    """Sum of MEMORY USAGE (exact: SAMPLES 0) over every key of the table."""
    client = table.client
    keys = [k async for k in client.scan_iter(match=table.prefix + ":*", count=1000)]
    total = 0
    for i in range(0, len(keys), 1000):
        pipe = client.pipeline(transaction=False)
        for key in keys[i : i + 1000]:
            pipe.memory_usage(key, samples=0)
        total += sum(int(x or 0) for x in await pipe.execute())
    return total


async def bench(url: str) -> Report:
    report = Report("Redis route table beside the in-process one")
    started = time.perf_counter()
    population = users(N_USERS)
    routes = [r for rs in population for r in rs]
    uids = [rs[0].uid if rs else f"user-{i:08d}" for i, rs in enumerate(population)]

    memory = MemoryRouteTable(grace_ms=60_000)
    redis_t = RedisRouteTable(url, prefix="bench:rt", grace_ms=60_000)
    client = redis_t.client
    await delete_prefix(redis_t)  # never FLUSHDB: --url may name a shared server
    info = await client.info("server")

    # fill both tables (the pool's connections are opened first: not route memory)
    for r in routes:
        await memory.bind(r)
    await asyncio.gather(*(redis_t.count() for _ in range(IN_FLIGHT)))
    mem0 = int((await client.info("memory"))["used_memory"])
    t0 = time.perf_counter()
    await bounded([functools.partial(redis_t.bind, r) for r in routes], IN_FLIGHT)
    fill_rate = len(routes) / (time.perf_counter() - t0)
    mem1 = int((await client.info("memory"))["used_memory"])
    n_routes = await redis_t.count()
    assert n_routes == len(routes) == await memory.count()
    live_bytes = await redis_bytes(redis_t)

    # 1. group_by_gateway
    rows = []
    for size in GROUP_SIZES:
        lat_m = await group_latency(memory, uids, size)
        before = await server_stats(redis_t)
        lat_r = await group_latency(redis_t, uids, size)
        after = await server_stats(redis_t)
        calls = GROUP_CALLS[size]
        rows.append(
            [
                size,
                ms(pct(lat_m, 0.5)),
                ms(pct(lat_m, 0.99)),
                ms(pct(lat_r, 0.5)),
                ms(pct(lat_r, 0.99)),
                f"{(after[0] - before[0]) // calls}",
                f"{(after[1] - before[1]) / calls:.0f}",
            ]
        )
    report.table(
        [
            "uids",
            "memory p50 ms",
            "memory p99 ms",
            "redis p50 ms",
            "redis p99 ms",
            "HMGETs per call",
            "server µs per call",
        ],
        rows,
        title=f"group_by_gateway over {N_USERS} users ({n_routes} routes, {N_GATEWAYS} gateways)"
        " - one round trip per call",
    )

    # 2. a gateway dies, then its routes expire
    before = await server_stats(redis_t, "evalsha")
    a = time.perf_counter()
    parked = await redis_t.unbind_gateway("gw-03")
    t_unbind = time.perf_counter() - a
    after = await server_stats(redis_t, "evalsha")
    unbind_us = (after[1] - before[1]) / max(1, after[0] - before[0])
    parked_bytes = await redis_bytes(redis_t)
    assert len(parked) == sum(1 for r in routes if r.gateway == "gw-03")
    sweeper = RedisRouteTable(client, prefix=redis_t.prefix, grace_ms=0)  # grace over at once
    before = await server_stats(redis_t, "evalsha")
    a = time.perf_counter()
    expired = await sweeper.expire()
    t_expire = time.perf_counter() - a
    after = await server_stats(redis_t, "evalsha")
    expire_us = (after[1] - before[1]) / max(1, after[0] - before[0])
    assert len(expired) == len(parked)
    b = time.perf_counter()
    parked_m = await memory.unbind_gateway("gw-03")
    t_unbind_m = time.perf_counter() - b
    memory.table.grace_ms = 0
    b = time.perf_counter()
    expired_m = await memory.expire()
    t_expire_m = time.perf_counter() - b
    assert len(parked_m) == len(expired_m) == len(parked)
    report.table(
        ["step", "routes", "redis ms", "redis server µs per script", "memory ms"],
        [
            ["unbind_gateway", len(parked), ms(t_unbind), f"{unbind_us:.0f}", ms(t_unbind_m)],
            ["expire (all due)", len(expired), ms(t_expire), f"{expire_us:.0f}", ms(t_expire_m)],
        ],
        title=f"a gateway dies ({N_GATEWAYS} gateways; scripts of at most "
        f"{DEFAULT_REDIS_BATCH} routes)",
    )

    # 3. bind + unbind
    rows = []
    for name, table in (("memory", memory), ("redis", redis_t)):
        rate, lat = await pairs_sequential(table, 10)
        conc = await pairs_concurrent(table, 10)
        rows.append([name, fmt_rate(rate), ms(pct(lat, 0.5)), ms(pct(lat, 0.99)), fmt_rate(conc)])
    report.table(
        ["table", "pairs/s, one at a time", "p50 ms", "p99 ms", f"pairs/s, {IN_FLIGHT} in flight"],
        rows,
        title=f"bind + unbind (a reconnect cycle; {N_PAIRS} pairs one at a time, "
        f"{N_CONCURRENT_PAIRS} with {IN_FLIGHT} in flight)",
    )

    # 4. bytes per route
    per_live = live_bytes / n_routes
    # a parked route leaves its gateway's set and enters the expiry queue
    per_parked = per_live + (parked_bytes - live_bytes) / len(parked)
    report.table(
        ["measure", "bytes per route"],
        [
            ["MEMORY USAGE (SAMPLES 0) over the table's keys, live", f"{per_live:.0f}"],
            ["the same, a parked route", f"{per_parked:.0f}"],
            ["used_memory delta over the fill, live", f"{(mem1 - mem0) / n_routes:.0f}"],
        ],
        title=f"Redis memory ({n_routes} routes of {N_USERS} users, 2/3 online, "
        f"{SECOND_DEVICE:.0%} of them with two devices)",
    )
    report.note(
        f"Fill: {fmt_rate(fill_rate)} binds/s with {IN_FLIGHT} in flight. Redis "
        f"{info['redis_version']} on loopback; {machine()}; event loop: "
        f"{type(asyncio.get_running_loop()).__module__.split('.')[0]}; redis-py "
        f"{redis_version} ({'hiredis' if HIREDIS else 'pure-Python'} parser). "
        f"Whole run: {time.perf_counter() - started:.0f} s."
    )
    await delete_prefix(redis_t)
    await redis_t.aclose()
    return report


def main() -> None:
    with ExitStack() as stack:
        if "--url" in sys.argv:
            url = sys.argv[sys.argv.index("--url") + 1]
        else:
            from tests.services import private_redis

            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            server = stack.enter_context(private_redis(workdir))
            url = f"redis://127.0.0.1:{server.port}/0"
        report = run(bench(url))
    report.emit(__file__)


if __name__ == "__main__":
    main()
