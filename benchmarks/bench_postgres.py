"""imkit.aio.postgres: the driver, picked by measurement (asyncpg beside psycopg 3).

Three contenders on the shared PostgreSQL server, one schema, the same statements:

* **PostgresStore** (asyncpg through the store's own pool, with argument checks, error
  wrapping and ``StoredMessage``/``Page`` objects): what imkit ships;
* **asyncpg, raw**: one connection per writer, the store's append and read statements,
  rows left as asyncpg Records (the driver's floor);
* **psycopg 3, raw**: one ``psycopg.AsyncConnection`` per writer (autocommit,
  ``prepare_threshold=0``: server-side prepared statements, as asyncpg does; binary
  results, as asyncpg always has), the same statements with named placeholders.

Measured:

* **append rate** with 1 writer and with 8 concurrent writers (each writer appends to a
  conversation of its own; and all 8 to one conversation, where appends queue on the
  conversation's row lock), durable (``synchronous_commit=on``, as deployed: each
  commit waits for a WAL flush) and again with ``synchronous_commit=off`` for these
  sessions only (commits do not wait for the disk: what is left is the drivers' and
  the store's own cost). Every writer appends for ``DURATION_S``; each configuration
  runs ``ROUNDS`` times, the contenders interleaved and each round starting with
  another; the tables give the median round, the best and the worst.
* **read of the newest 50** of a 2,000-message conversation: latency p50 / p99 over
  ``READS`` reads per round (all rounds pooled).
* **round trips per call**, counted by a relay between client and server that counts
  request -> response turns (a client write answered by the server), one connection,
  after a warm-up that prepares the statements; asyncpg's stock Pool is counted too
  (it resets every connection it takes back: one more round trip per call).

    python benchmarks/bench_postgres.py [--quick] [--write]

Caveats: client and server share one 2-vCPU VM, itself shared with other work (the
best round is the one least disturbed; the worst shows the disturbance); loopback
round trips cost ~50 us, on a LAN 0.2-0.5 ms, where round-trip counts weigh more than
these rates show; fsync latency on this VM's disk varies widely, which is why the
durable rates spread and the ``synchronous_commit=off`` table is the one to compare
drivers with. The event loop is imkit.aio's (uvloop when installed).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg

from _harness import Report, quick
from imkit.aio import run, uvloop_available
from imkit.aio.postgres import PostgresStore, _Statements
from imkit.store import NewMessage

DSN = os.environ.get("IMKIT_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
DURATION_S = 0.3 if quick() else 0.7
ROUNDS = 1 if quick() else 5
READS = 200 if quick() else 1_000
RT_CALLS = 50
FILL = 2_000
BODY = b"x" * 100
WRITERS = 8
CONTENDERS = ("PostgresStore (asyncpg)", "asyncpg, raw", "psycopg 3, raw")


def fmt(rate: float) -> str:
    """A rate to three significant figures or so (appends/s are in the thousands)."""
    return f"{rate:,.0f}"


def named(sql: str) -> str:
    """``$1`` placeholders (asyncpg) as ``%(p1)s`` (psycopg)."""
    return re.sub(r"\$(\d+)", r"%(p\1)s", sql)


def params(*values: object) -> dict[str, object]:
    return {f"p{i}": v for i, v in enumerate(values, 1)}


# --- a relay that counts round trips -----------------------------------------------------


class TurnCounter:
    """A TCP relay to the server counting turns: client bytes answered by server bytes."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.turns = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        asked = [False]

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_client: bool
        ) -> None:
            try:
                while data := await src.read(65536):
                    if from_client:
                        asked[0] = True
                    elif asked[0]:
                        asked[0] = False
                        self.turns += 1
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()


# --- the contenders ------------------------------------------------------------------------


class Bench:
    """The schema, its conversations, the statements, and a cid counter per sender."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.sql = _Statements(schema)
        self.cids: dict[str, itertools.count[int]] = {}

    def cid(self, sender: str) -> int:
        return next(self.cids.setdefault(sender, itertools.count()))


async def timed_writers(writers: list[Callable[[float], Awaitable[int]]]) -> float:
    """Run the writers together for DURATION_S; appends per second in all."""
    started = time.perf_counter()
    deadline = started + DURATION_S
    counts = await asyncio.gather(*(w(deadline) for w in writers))
    return sum(counts) / (time.perf_counter() - started)


def store_writer(
    b: Bench, store: PostgresStore, conv: str, sender: str
) -> Callable[[float], Awaitable[int]]:
    async def write(deadline: float) -> int:
        n = 0
        while time.perf_counter() < deadline:
            await store.append(conv, sender, b.cid(sender), BODY, wall_ms=1, msg_id=n)
            n += 1
        return n

    return write


def asyncpg_writer(
    b: Bench, conn: Any, conv: str, sender: str
) -> Callable[[float], Awaitable[int]]:
    sql = b.sql.append

    async def write(deadline: float) -> int:
        n = 0
        while time.perf_counter() < deadline:
            await conn.fetchrow(sql, conv, sender, b.cid(sender), BODY, n, 1)
            n += 1
        return n

    return write


def psycopg_writer(
    b: Bench, conn: psycopg.AsyncConnection[Any], conv: str, sender: str
) -> Callable[[float], Awaitable[int]]:
    sql = named(b.sql.append)

    async def write(deadline: float) -> int:
        n = 0
        while time.perf_counter() < deadline:
            cur = await conn.execute(
                sql, params(conv, sender, b.cid(sender), BODY, n, 1), binary=True
            )
            await cur.fetchone()
            n += 1
        return n

    return write


async def psycopg_connect(dsn: str, durable: bool = True) -> psycopg.AsyncConnection[Any]:
    options = "" if durable else "-c synchronous_commit=off"
    return await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, prepare_threshold=0, options=options
    )


def without_fsync(dsn: str) -> str:
    """``dsn`` whose sessions commit without waiting for the WAL flush (asyncpg passes
    unknown DSN parameters on as server settings)."""
    return dsn + ("&" if "?" in dsn else "?") + "synchronous_commit=off"


async def append_rates(b: Bench, durable: bool) -> dict[str, dict[str, list[float]]]:
    """contender -> configuration -> rates (one per round)."""
    rates: dict[str, dict[str, list[float]]] = {c: {} for c in CONTENDERS}
    dsn = DSN if durable else without_fsync(DSN)
    store = await PostgresStore.open(
        dsn, schema=b.schema, min_connections=WRITERS, max_connections=WRITERS
    )
    raw = [await asyncpg.connect(dsn) for _ in range(WRITERS)]
    pgs = [await psycopg_connect(DSN, durable) for _ in range(WRITERS)]
    configs = {
        "1 writer": [("own-0", 0)],
        f"{WRITERS} writers, own conversations": [(f"own-{i}", i) for i in range(WRITERS)],
    }
    if durable:
        configs[f"{WRITERS} writers, one conversation"] = [("shared", i) for i in range(WRITERS)]
    for round_ in range(ROUNDS):
        for config, plan in configs.items():
            makers: dict[str, list[Callable[[float], Awaitable[int]]]] = {
                CONTENDERS[0]: [store_writer(b, store, c, f"s{i}") for c, i in plan],
                CONTENDERS[1]: [asyncpg_writer(b, raw[i], c, f"a{i}") for c, i in plan],
                CONTENDERS[2]: [psycopg_writer(b, pgs[i], c, f"p{i}") for c, i in plan],
            }
            k = round_ % len(CONTENDERS)  # each round starts with another contender
            for contender in CONTENDERS[k:] + CONTENDERS[:k]:
                rate = await timed_writers(makers[contender])
                rates[contender].setdefault(config, []).append(rate)
    await store.aclose()
    for conn in raw:
        await conn.close()
    for p in pgs:
        await p.close()
    return rates


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def read_latencies(b: Bench) -> dict[str, list[float]]:
    """contender -> per-read latencies in microseconds (newest 50 of FILL)."""
    store = await PostgresStore.open(DSN, schema=b.schema, min_connections=1, max_connections=1)
    await store.append_many([NewMessage("read", "u0", i, BODY, i) for i in range(FILL)], wall_ms=1)
    raw = await asyncpg.connect(DSN)
    pg = await psycopg_connect(DSN)
    after, n = FILL - 50, 50
    read_sql, read_named = b.sql.read, named(b.sql.read)

    async def via_store() -> object:
        return await store.read("read", after, n)

    async def via_asyncpg() -> object:
        return await raw.fetch(read_sql, "read", after, n + 1)

    async def via_psycopg() -> object:
        cur = await pg.execute(read_named, params("read", after, n + 1), binary=True)
        return await cur.fetchall()

    calls = dict(zip(CONTENDERS, (via_store, via_asyncpg, via_psycopg), strict=True))
    out: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    for round_ in range(ROUNDS):
        k = round_ % len(CONTENDERS)
        for contender in CONTENDERS[k:] + CONTENDERS[:k]:
            call = calls[contender]
            for _ in range(50):  # warm-up: statements prepared, caches hot
                await call()
            lat = out[contender]
            for _ in range(READS):
                t0 = time.perf_counter_ns()
                await call()
                lat.append((time.perf_counter_ns() - t0) / 1000)
    page = await store.read("read", after, n)
    assert len(page.messages) == 50 and page.messages[-1].seq == FILL
    await store.aclose()
    await raw.close()
    await pg.close()
    return out


async def round_trips(b: Bench) -> dict[str, dict[str, float]]:
    """contender -> call -> round trips per call, through the counting relay."""
    relay = TurnCounter("127.0.0.1", int(DSN.rsplit(":", 1)[1].split("/")[0]))
    port = await relay.start()
    dsn = re.sub(r"@[^/]+/", f"@127.0.0.1:{port}/", DSN)
    store = await PostgresStore.open(dsn, schema=b.schema, min_connections=1, max_connections=1)
    raw = await asyncpg.connect(dsn)
    pg = await psycopg_connect(dsn)
    # asyncpg's pool as it comes: it resets each connection it takes back (RESET ALL...)
    stock = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    sql = b.sql
    after = FILL - 50

    async def stock_append() -> None:
        await stock.fetchrow(sql.append, "rt", "d", b.cid("rt-d"), BODY, 0, 1)

    async def store_append() -> None:
        await store.append("rt", "s", b.cid("rt-s"), BODY, wall_ms=1)

    async def raw_append() -> None:
        await raw.fetchrow(sql.append, "rt", "a", b.cid("rt-a"), BODY, 0, 1)

    async def pg_append() -> None:
        cur = await pg.execute(
            named(sql.append), params("rt", "p", b.cid("rt-p"), BODY, 0, 1), binary=True
        )
        await cur.fetchone()

    async def store_resend() -> None:
        await store.append("rt", "s", 0, BODY, wall_ms=1)

    async def store_read() -> None:
        await store.read("read", after, 50)

    async def raw_read() -> None:
        await raw.fetch(sql.read, "read", after, 51)

    async def pg_read() -> None:
        cur = await pg.execute(named(sql.read), params("read", after, 51), binary=True)
        await cur.fetchall()

    async def store_batch() -> None:
        items = [NewMessage("rt", "s", b.cid("rt-s"), BODY) for _ in range(100)]
        await store.append_many(items, wall_ms=1)

    async def store_fanout() -> None:
        await store.inbox_add([f"u{i}" for i in range(8)], "rt", 1)

    plan: dict[str, dict[str, Callable[[], Awaitable[None]]]] = {
        CONTENDERS[0]: {
            "append": store_append,
            "append (resend)": store_resend,
            "read newest 50": store_read,
            "append_many(100)": store_batch,
            "inbox_add(8 users)": store_fanout,
        },
        CONTENDERS[1]: {"append": raw_append, "read newest 50": raw_read},
        "asyncpg pool, default reset": {"append": stock_append},
        CONTENDERS[2]: {"append": pg_append, "read newest 50": pg_read},
    }
    out: dict[str, dict[str, float]] = {}
    for contender, calls in plan.items():
        for name, call in calls.items():
            for _ in range(5):
                await call()
            before = relay.turns
            for _ in range(RT_CALLS):
                await call()
            out.setdefault(contender, {})[name] = (relay.turns - before) / RT_CALLS
    await store.aclose()
    await stock.close()
    await raw.close()
    await pg.close()
    await relay.aclose()
    return out


async def setup(schema: str) -> Bench:
    store = await PostgresStore.open(DSN, schema=schema, min_connections=1, max_connections=1)
    users = [f"u{i}" for i in range(8)]
    for uid in users:
        await store.create_user(uid)
    for conv in [f"own-{i}" for i in range(WRITERS)] + ["shared", "read", "rt"]:
        await store.create_group(conv, users)
    await store.aclose()
    return Bench(schema)


async def drop(schema: str) -> None:
    conn = await asyncpg.connect(DSN)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await conn.close()


async def main() -> Report:
    schema = f"imkit_bench_{os.getpid()}"
    started = time.perf_counter()
    b = await setup(schema)
    try:
        rates = await append_rates(b, durable=True)
        fast_rates = await append_rates(b, durable=False)
        latencies = await read_latencies(b)
        trips = await round_trips(b)
    finally:
        await drop(schema)
    elapsed = time.perf_counter() - started

    conn = await asyncpg.connect(DSN)
    server = await conn.fetchval("SHOW server_version")
    sync = await conn.fetchval("SHOW synchronous_commit")
    await conn.close()

    report = Report("PostgreSQL store: asyncpg beside psycopg 3")
    report.note(
        f"PostgreSQL {server} on the same 2-vCPU VM as the client (loopback), "
        f"synchronous_commit={sync}; asyncpg {asyncpg.__version__}, psycopg "
        f"{psycopg.__version__}; event loop: {'uvloop' if uvloop_available() else 'asyncio'}. "
        f"Appends: 100-byte bodies, each writer for {DURATION_S} s, {ROUNDS} rounds with "
        f"the contenders interleaved, each round starting with another; on a shared "
        f"machine the best round is the one least disturbed. Reads: newest 50 of a "
        f"{FILL:,}-message conversation, {READS * ROUNDS:,} reads each. Whole run: "
        f"{elapsed:.0f} s. Each append is its own transaction (one round trip); psycopg "
        f"runs with prepared statements and binary results, its fastest settings."
    )
    for title, table in (
        ("Append rate, durable (synchronous_commit=on: each commit waits for a WAL flush)",
         rates),
        ("Append rate, commits not waiting for the disk (synchronous_commit=off for these "
         "sessions): the drivers' and the store's own cost", fast_rates),
    ):  # fmt: skip
        rows = []
        for config in next(iter(table.values())):
            base = table[CONTENDERS[1]][config]
            for contender in CONTENDERS:
                r = table[contender][config]
                med = statistics.median(r)
                rows.append(
                    [config, contender, fmt(med), fmt(max(r)), fmt(min(r)),
                     f"{med / statistics.median(base):.2f}", f"{max(r) / max(base):.2f}"]
                )  # fmt: skip
        report.table(
            ["writers", "driver", "appends/s (median)", "best round", "worst round",
             "vs raw asyncpg (median)", "vs raw asyncpg (best)"],
            rows,
            title=title,
        )  # fmt: skip
    report.table(
        ["driver", "p50 us", "p99 us", "reads/s (1 caller)"],
        [
            [
                c,
                f"{percentile(latencies[c], 0.5):.0f}",
                f"{percentile(latencies[c], 0.99):.0f}",
                fmt(1e6 / statistics.mean(latencies[c])),
            ]
            for c in CONTENDERS
        ],
        title="Read of the newest 50 messages (latency per read)",
    )
    report.table(
        ["driver", "call", "round trips per call"],
        [[c, name, f"{v:.2f}"] for c, calls in trips.items() for name, v in calls.items()],
        title="Round trips (request -> response turns on the wire)",
    )
    return report


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    run(main()).emit(__file__)
