"""Tests of imkit.aio.postgres.PostgresStore against the shared PostgreSQL server.

* The whole store conformance suite (``tests/store_suite.py``) and its stateful
  machine against the Model oracle, through :class:`Blocking`, a test-only adapter
  that runs each awaited call to completion on a private event loop.
* What is particular to PostgreSQL: two pools on one schema (two logic processes)
  appending to one conversation, resending the same cid, racing inbox and membership
  writes; schema creation and versions; a closed port, a terminated backend, an outage
  through a proxy, a statement timeout; the call limit, ``aclose`` and the event loop.

Every test works in its own schema (``tests/services.unique_name``), dropped after.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

import asyncpg  # type: ignore[import-untyped]
import pytest
from examples.faultproxy import FaultProxy
from hypothesis import settings

from imkit.aio.postgres import (
    DEFAULT_PG_MAX_CONNECTIONS,
    DEFAULT_PG_MIN_CONNECTIONS,
    SCHEMA_VERSION,
    PostgresStore,
    PostgresStoreError,
)
from imkit.errors import BackendError, CapacityError, ConfigError, StoreError
from imkit.store import AsyncMessageStore, MessageStore, NewMessage, StoredMessage
from tests.services import free_port, postgres_dsn, unique_name
from tests.store_suite import (
    Backend,
    TestAppend,
    TestDeviceCursors,
    TestInbox,
    TestLifecycle,
    TestRead,
    TestReadCursors,
    TestRegistry,
    TestRestart,
    make_store_machine,
    store,
)

__all__ = [
    "TestAppend",
    "TestDeviceCursors",
    "TestInbox",
    "TestLifecycle",
    "TestRead",
    "TestReadCursors",
    "TestRegistry",
    "TestRestart",
    "store",
]

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]

T = TypeVar("T")

#: Pool sizes of the suite's stores: the adapter makes one call at a time.
SUITE_POOL = {"min_connections": 1, "max_connections": 2}


def _typed(store: PostgresStore) -> AsyncMessageStore:
    """Static check (mypy): PostgresStore implements the AsyncMessageStore protocol."""
    return store


async def drop_schemas(dsn: str, schemas: Iterable[str]) -> None:
    """Drop each schema (and everything in it)."""
    conn = await asyncpg.connect(dsn)
    try:
        for schema in schemas:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


# --- the conformance suite through a blocking adapter (tests only) ---------------------


class Blocking:
    """A synchronous MessageStore over a PostgresStore: each call runs to completion
    on the store's private event loop (the loop its pool belongs to)."""

    def __init__(self, dsn: str, schema: str, limits: dict[str, int]) -> None:
        self.schema = schema
        self.loop = asyncio.new_event_loop()
        try:
            self.inner = self.loop.run_until_complete(
                PostgresStore.open(dsn, schema=schema, **SUITE_POOL, **limits)
            )
        except BaseException:
            self.loop.close()
            raise

    @property
    def dedup_window(self) -> int | None:
        return self.inner.dedup_window

    @property
    def durable(self) -> bool:
        return self.inner.durable

    def _check(self) -> None:
        self.loop.run_until_complete(self.inner._check())

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.run_until_complete(self.inner.aclose())
        self.loop.close()

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self.inner, name)
        if self.loop.is_closed():  # after close(): the store must still answer (an error)
            return asyncio.run(method(*args, **kwargs))
        return self.loop.run_until_complete(method(*args, **kwargs))


def _blocking_verb(name: str) -> Callable[..., Any]:
    def verb(self: Blocking, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, *args, **kwargs)

    verb.__name__ = name
    return verb


# real methods, not __getattr__: runtime_checkable isinstance looks them up statically
for _verb in (
    "append", "append_many", "read", "last_seq", "inbox_add", "inbox_read", "inbox_trim",
    "set_read", "get_read", "read_cursors", "set_device_cursors", "device_cursors",
    "create_user", "has_user", "create_group", "create_direct", "join", "leave", "members",
    "is_member", "conversations_of", "conversation",
):  # fmt: skip
    setattr(Blocking, _verb, _blocking_verb(_verb))


class PostgresBackend:
    """PostgresStores, each made in a schema of its own; ``drop`` closes them all and
    drops their schemas."""

    name = "postgres"
    persistent = True

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.limits: dict[str, dict[str, int]] = {}  # schema -> limits
        self.opened: list[Blocking] = []

    def _open(self, schema: str) -> MessageStore:
        store = Blocking(self.dsn, schema, self.limits[schema])
        self.opened.append(store)
        return cast(MessageStore, store)

    def make(self, **limits: int) -> MessageStore:
        schema = unique_name("imkit_pg")
        self.limits[schema] = limits
        return self._open(schema)

    def reopen(self, store: MessageStore) -> MessageStore:
        assert isinstance(store, Blocking)
        store.close()
        return self._open(store.schema)

    def drop(self) -> None:
        for opened in self.opened:
            opened.close()
        self.opened.clear()
        asyncio.run(drop_schemas(self.dsn, self.limits))
        self.limits.clear()


@pytest.fixture
def backend() -> Iterator[Backend]:
    """Each conformance test runs on PostgreSQL; its schemas are dropped after."""
    pg = PostgresBackend(postgres_dsn())
    yield pg
    pg.drop()


_MachineBase = make_store_machine(lambda directory: PostgresBackend(postgres_dsn()))


class PostgresMachine(_MachineBase):  # type: ignore[misc,valid-type]
    """The suite's machine; each example's schemas are dropped when it ends."""

    backend: PostgresBackend

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            self.backend.drop()


PostgresMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestPostgresMachine = PostgresMachine.TestCase


# --- helpers for the PostgreSQL-specific tests -------------------------------------------


def run(main: Callable[[], Coroutine[Any, Any, T]], timeout_s: float = 60.0) -> T:
    """Run ``main()`` on a fresh event loop, bounded by ``timeout_s``."""

    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout_s)

    return asyncio.run(bounded())


class Pg:
    """The shared server's DSN and a schema of this test's own."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema

    async def open(self, dsn: str | None = None, **kw: Any) -> PostgresStore:
        """A store on this test's schema (``dsn``: another way to the same server)."""
        kw.setdefault("min_connections", 1)
        kw.setdefault("max_connections", 4)
        return await PostgresStore.open(dsn or self.dsn, schema=self.schema, **kw)

    @asynccontextmanager
    async def admin(self) -> AsyncIterator[Any]:
        """A plain asyncpg connection of the test's own (to lock rows, inspect, kill)."""
        conn = await asyncpg.connect(self.dsn)
        try:
            yield conn
        finally:
            await conn.close()


@pytest.fixture
def pg() -> Iterator[Pg]:
    """A fresh schema name on the shared server, dropped after the test."""
    dsn = postgres_dsn()
    schema = unique_name("imkit_pg")
    yield Pg(dsn, schema)
    asyncio.run(drop_schemas(dsn, [schema]))


async def seeded(store: PostgresStore, conv: str = "g", users: int = 8) -> list[str]:
    """Users u0..u{users-1} and group ``conv`` holding them all."""
    uids = [f"u{i}" for i in range(users)]
    for uid in uids:
        await store.create_user(uid)
    await store.create_group(conv, uids)
    return uids


@asynccontextmanager
async def row_locked(pg: Pg, conv: str = "g") -> AsyncIterator[Any]:
    """Hold the row lock of ``conv`` from another connection (appends to it wait)."""
    async with pg.admin() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(
            f'SELECT 1 FROM "{pg.schema}".conversations WHERE conv = $1 FOR UPDATE', conv
        )
        try:
            yield conn
        finally:
            await tx.rollback()


async def waiting_backends(
    admin: Any, schema: str, at_least: int = 1, timeout_s: float = 5.0
) -> list[int]:
    """Pids of the server backends waiting for a lock on a statement of ``schema``,
    once there are ``at_least`` of them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await admin.execute("SELECT pg_stat_clear_snapshot()")  # fresh within a transaction
        pids = await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE $1 AND pid <> pg_backend_pid()",
            f'%"{schema}".%',
        )
        if len(pids) >= at_least:
            return [int(r[0]) for r in pids]
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {at_least} backends of the store wait for the lock")


# --- schema and settings ------------------------------------------------------------------


class TestSchema:
    def test_open_creates_the_tables_and_records_the_version(self, pg: Pg) -> None:
        """A first open creates the schema's eight tables and the version row; the store
        is durable with exact idempotency."""

        async def main() -> tuple[int, int, PostgresStore]:
            store = await pg.open()
            await store.aclose()
            async with pg.admin() as conn:
                version = await conn.fetchval(
                    f"SELECT value FROM \"{pg.schema}\".meta WHERE key = 'schema_version'"
                )
                tables = await conn.fetchval(
                    "SELECT count(*) FROM pg_tables WHERE schemaname = $1", pg.schema
                )
            return version, tables, store

        version, tables, store = run(main)
        assert version == SCHEMA_VERSION
        assert tables == 8
        assert store.durable is True and store.dedup_window is None
        assert isinstance(store, AsyncMessageStore)

    def test_a_newer_schema_version_is_refused(self, pg: Pg) -> None:
        """A schema written by a newer imkit is refused with a StoreError saying so."""

        async def main() -> str:
            await (await pg.open()).aclose()
            async with pg.admin() as conn:
                await conn.execute(f'UPDATE "{pg.schema}".meta SET value = $1', SCHEMA_VERSION + 1)
            with pytest.raises(StoreError) as info:
                await pg.open()
            assert not isinstance(info.value, PostgresStoreError)
            return str(info.value)

        message = run(main)
        assert f"version {SCHEMA_VERSION + 1}" in message and "upgrade imkit" in message

    def test_a_schema_holding_other_tables_is_refused(self, pg: Pg) -> None:
        """A schema with another application's tables is not taken over."""

        async def main() -> str:
            async with pg.admin() as conn:
                await conn.execute(f'CREATE SCHEMA "{pg.schema}"')
                await conn.execute(f'CREATE TABLE "{pg.schema}".orders (id int)')
            with pytest.raises(StoreError) as info:
                await pg.open()
            return str(info.value)

        assert "another application" in run(main)

    def test_concurrent_opens_create_the_schema_once(self, pg: Pg) -> None:
        """Four stores opening a new schema at once all succeed and share the data."""

        async def main() -> list[bool]:
            stores = await asyncio.gather(*(pg.open() for _ in range(4)))
            await stores[0].create_user("alice")
            seen = [await s.has_user("alice") for s in stores]
            for s in stores:
                await s.aclose()
            return seen

        assert run(main) == [True] * 4

    @pytest.mark.parametrize(
        "settings_",
        [
            {"schema": "Imkit"},
            {"schema": "x" * 64},
            {"schema": "a-b"},
            {"schema": 'x"; DROP TABLE y; --'},
            {"min_connections": -1},
            {"min_connections": 3, "max_connections": 2},
            {"max_connections": 0},
            {"max_queued": 0},
            {"connect_timeout_ms": 0},
            {"command_timeout_ms": 1.5},
            {"max_idle_ms": 0},
            {"max_inbox": 0},
        ],
    )
    def test_bad_settings_are_config_errors(self, settings_: dict[str, Any]) -> None:
        """Bad settings raise ConfigError before any connection is tried (the DSN points
        nowhere)."""
        dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
        with pytest.raises(ConfigError):
            run(lambda: PostgresStore.open(dsn, **settings_))

    def test_a_malformed_dsn_is_a_config_error(self) -> None:
        """A DSN asyncpg cannot parse raises ConfigError."""
        with pytest.raises(ConfigError):
            run(lambda: PostgresStore.open("http://127.0.0.1/postgres"))

    def test_defaults(self) -> None:
        """The default pool keeps a couple of connections and allows ten."""
        assert 1 <= DEFAULT_PG_MIN_CONNECTIONS <= DEFAULT_PG_MAX_CONNECTIONS == 10

    def test_a_store_never_opened_refuses_calls(self) -> None:
        """A store built without open() raises StoreError (after the argument checks)."""
        store = PostgresStore()
        with pytest.raises(StoreError):
            run(lambda: store.has_user("alice"))
        with pytest.raises(ConfigError):
            run(lambda: store.has_user(""))

    def test_imkit_aio_does_not_import_the_module(self) -> None:
        """The optional backend stays optional: importing imkit.aio loads no asyncpg."""
        code = (
            "import sys, imkit.aio; "
            "assert 'imkit.aio.postgres' not in sys.modules and 'asyncpg' not in sys.modules"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- several logic processes on one schema -----------------------------------------------


class TestCluster:
    def test_concurrent_appends_from_two_pools_get_unique_gap_free_seqs(self, pg: Pg) -> None:
        """2 pools x 4 writers x 40 appends to one conversation: seqs are exactly 1..320,
        each writer's in its call order, and the timeline reads back complete."""
        writers, per_writer = 4, 40

        async def main() -> tuple[list[list[int]], list[StoredMessage], int]:
            a, b = await pg.open(), await pg.open()
            await seeded(a, users=2 * writers)

            async def writer(store: PostgresStore, uid: str) -> list[int]:
                return [
                    (await store.append("g", uid, cid, f"{uid}-{cid}".encode(), wall_ms=cid)).seq
                    for cid in range(per_writer)
                ]

            seqs = await asyncio.gather(
                *(writer(s, f"u{i}") for i, s in enumerate([a, b] * writers))
            )
            timeline: list[StoredMessage] = []
            after = 0
            while True:
                page = await b.read("g", after, 1000)
                timeline.extend(page.messages)
                if not page.more:
                    break
                after = page.last_seq
            last = await a.last_seq("g")
            await a._check()
            await a.aclose()
            await b.aclose()
            return list(seqs), timeline, last

        seqs, timeline, last = run(main)
        total = 2 * writers * per_writer
        assert sorted(s for w in seqs for s in w) == list(range(1, total + 1))
        assert all(w == sorted(w) for w in seqs)  # one caller's calls in order
        assert last == total
        assert [m.seq for m in timeline] == list(range(1, total + 1))
        assert all(m.body == f"{m.sender}-{m.cid}".encode() for m in timeline)

    def test_a_resent_cid_across_pools_is_stored_once(self, pg: Pg) -> None:
        """The same (sender, cid) sent through two pools at once, 30 times: each is
        stored once, both callers get the same message, seqs stay gap-free."""

        async def main() -> tuple[list[tuple[StoredMessage, StoredMessage]], int]:
            a, b = await pg.open(), await pg.open()
            await seeded(a, users=2)
            pairs = []
            for cid in range(30):
                first, second = await asyncio.gather(
                    a.append("g", "u0", cid, b"via-a", wall_ms=1, msg_id=1),
                    b.append("g", "u0", cid, b"via-b", wall_ms=2, msg_id=2),
                )
                pairs.append((first, second))
            last = await b.last_seq("g")
            await b._check()
            await a.aclose()
            await b.aclose()
            return pairs, last

        pairs, last = run(main)
        assert all(x == y for x, y in pairs)
        assert sorted(x.seq for x, _ in pairs) == list(range(1, 31))
        assert last == 30

    def test_batches_and_single_appends_race_consistently(self, pg: Pg) -> None:
        """append_many batches on one pool and single appends of overlapping keys on the
        other: every key is stored once, under one seq, with no gap."""

        async def main() -> tuple[dict[tuple[str, int], set[int]], int]:
            a, b = await pg.open(), await pg.open()
            await seeded(a, conv="g", users=2)
            await a.create_group("h", ["u0", "u1"])
            got: dict[tuple[str, int], set[int]] = {}

            async def batches() -> None:
                for start in range(0, 60, 6):
                    items = [
                        NewMessage("g" if cid % 2 else "h", "u0", cid, b"batch")
                        for cid in range(start, start + 6)
                    ]
                    for m in await a.append_many(items, wall_ms=1):
                        got.setdefault((m.conv, m.cid), set()).add(m.seq)

            async def singles() -> None:
                for cid in range(59, -1, -1):
                    conv = "g" if cid % 2 else "h"
                    m = await b.append(conv, "u0", cid, b"single", wall_ms=2)
                    got.setdefault((m.conv, m.cid), set()).add(m.seq)

            await asyncio.gather(batches(), singles())
            total = await a.last_seq("g") + await a.last_seq("h")
            await a._check()
            await a.aclose()
            await b.aclose()
            return got, total

        got, total = run(main)
        assert len(got) == 60 and all(len(seqs) == 1 for seqs in got.values())
        assert total == 60

    def test_inbox_membership_and_device_writes_race_safely(self, pg: Pg) -> None:
        """Two pools fan out to overlapping inboxes (max_inbox=1) and trim them, while
        members leave and rejoin and their devices' cursors are written: every
        invariant holds after (inboxes exactly first..last, no cursor of a non-member)."""

        async def main() -> None:
            a = await pg.open(max_inbox=1)
            b = await pg.open(max_inbox=1)
            uids = await seeded(a, users=6)
            for cid in range(5):
                await a.append("g", "u0", cid, b"x", wall_ms=1)

            async def fan_out(store: PostgresStore, order: list[str]) -> None:
                for i in range(25):
                    await store.inbox_add(order, "g", 1 + i % 5)
                    if i % 4 == 3:
                        await store.inbox_trim(order[0], i)

            async def churn(store: PostgresStore) -> None:
                for i in range(15):
                    uid = uids[1 + i % 3]
                    await store.leave(uid, "g")
                    await store.join(uid, "g")

            async def devices(store: PostgresStore) -> None:
                for i in range(30):
                    uid = uids[1 + i % 3]
                    await store.set_device_cursors(uid, f"d{i % 4}", {"g": 1 + i % 5})

            await asyncio.gather(
                fan_out(a, uids),
                fan_out(b, uids[::-1]),
                churn(a),
                devices(b),
                devices(a),
            )
            await a._check()
            await a.aclose()
            await b.aclose()

        run(main)

    def test_an_inbox_add_behind_another_sees_the_entry_it_trims(self, pg: Pg) -> None:
        """Another process's inbox_add holds the user's row (not yet committed) when this
        one starts: this one waits, then trims the entry that add made (max_inbox=1),
        so the inbox holds exactly its last entry."""

        async def main() -> list[tuple[int, int]]:
            store = await pg.open(max_inbox=1)
            await seeded(store, users=1)
            for cid in range(3):
                await store.append("g", "u0", cid, b"x", wall_ms=1)
            await store.inbox_add(["u0"], "g", 1)
            sql = store._sql
            async with pg.admin() as other:
                tx = other.transaction()
                await tx.start()
                conv_id, _last, _found = await other.fetchrow(sql.inbox_lock, "g", ["u0"])
                await other.execute(sql.inbox_add, ["u0"], conv_id, 1, 2)
                pending = asyncio.ensure_future(store.inbox_add(["u0"], "g", 3))
                await waiting_backends(other, pg.schema)
                await tx.commit()
                await pending
            page = await store.inbox_read("u0", 0, 10)
            await store._check()
            await store.aclose()
            return [(e.cursor, e.seq) for e in page.entries]

        assert run(main) == [(3, 3)]

    def test_a_leave_behind_a_device_write_drops_its_cursor(self, pg: Pg) -> None:
        """Another process's set_device_cursors holds the user's row (not yet committed)
        when leave starts: leave waits, then drops the cursor that write made."""

        async def main() -> dict[str, int]:
            store = await pg.open()
            await seeded(store, users=2)
            await store.append("g", "u0", 1, b"x", wall_ms=1)
            sql = store._sql
            async with pg.admin() as other:
                tx = other.transaction()
                await tx.start()
                await other.fetch(sql.lock_devices, "u1")
                await other.execute(sql.set_device_cursors, "u1", "phone", [], 1, ["g"], [1])
                pending = asyncio.ensure_future(store.leave("u1", "g"))
                await waiting_backends(other, pg.schema)
                await tx.commit()
                assert await pending is True
            cursors = await store.device_cursors("u1", "phone")
            await store._check()
            await store.aclose()
            return cursors

        assert run(main) == {}

    def test_a_reopened_store_reads_what_another_pool_wrote(self, pg: Pg) -> None:
        """Data written through one store is read back the same by a store opened later
        with another pool size; seqs and inbox cursors continue."""

        async def main() -> None:
            a = await pg.open()
            await seeded(a, users=2)
            stored = [await a.append("g", "u0", i, b"m%d" % i, wall_ms=i) for i in range(5)]
            await a.inbox_add(["u1"], "g", 5)
            await a.set_read("u1", "g", 4)
            await a.aclose()
            b = await pg.open(min_connections=0, max_connections=1)
            assert (await b.read("g", 0, 10)).messages == tuple(stored)
            assert await b.get_read("u1", "g") == 4
            assert (await b.append("g", "u1", 0, b"after", wall_ms=9)).seq == 6
            await b.inbox_add(["u1"], "g", 6)
            entries = (await b.inbox_read("u1", 0, 10)).entries
            assert [(e.cursor, e.seq) for e in entries] == [(1, 5), (2, 6)]
            await b.aclose()

        run(main)


# --- failures -----------------------------------------------------------------------------


class TestFailures:
    def test_a_closed_port_is_a_retryable_error(self) -> None:
        """Nothing listening: open raises PostgresStoreError (retryable, a StoreError and a
        BackendError, the socket error chained) within the connect timeout."""
        dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
        started = time.monotonic()
        with pytest.raises(PostgresStoreError) as info:
            run(lambda: PostgresStore.open(dsn, connect_timeout_ms=2000))
        assert time.monotonic() - started < 5
        error = info.value
        assert error.retryable and error.sqlstate is None
        assert isinstance(error, StoreError) and isinstance(error, BackendError)
        assert isinstance(error.__cause__, OSError)

    def test_a_terminated_backend_fails_the_call_then_the_next_one_works(self, pg: Pg) -> None:
        """The server kills the connection of an append waiting for a lock: the append
        raises a retryable PostgresStoreError and stores nothing; the next call works
        and a resend of the same cid is stored once."""

        async def main() -> None:
            store = await pg.open(min_connections=1, max_connections=1)
            await seeded(store, users=1)
            acked = await store.append("g", "u0", 1, b"acked", wall_ms=1)
            async with row_locked(pg) as admin:
                pending = asyncio.ensure_future(store.append("g", "u0", 2, b"x", wall_ms=2))
                for pid in await waiting_backends(admin, pg.schema):
                    await admin.execute("SELECT pg_terminate_backend($1)", pid)
                with pytest.raises(PostgresStoreError) as info:
                    await pending
            assert info.value.retryable, info.value
            assert await store.last_seq("g") == 1  # nothing of the failed call stored
            again = await store.append("g", "u0", 2, b"x", wall_ms=3)
            assert again.seq == 2
            assert await store.append("g", "u0", 2, b"x", wall_ms=4) == again
            assert (await store.read("g", 0, 10)).messages[0] == acked
            await store._check()
            await store.aclose()

        run(main)

    def test_an_outage_is_retryable_and_loses_nothing_acked(self, pg: Pg) -> None:
        """Through a proxy that drops every connection and refuses new ones: calls raise
        retryable errors; once it lets connections through again the next call works
        and every acknowledged message is there."""

        async def main() -> None:
            proxy = FaultProxy("127.0.0.1", 5432)
            port = await proxy.start()
            try:
                dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
                store = await pg.open(dsn, min_connections=2, max_connections=2,
                                      connect_timeout_ms=1000)  # fmt: skip
                await seeded(store, users=1)
                acked = [await store.append("g", "u0", i, b"x", wall_ms=i) for i in range(5)]
                proxy.refuse = True
                proxy.reset()
                await asyncio.sleep(0.05)
                for cid in (10, 11):
                    with pytest.raises(PostgresStoreError) as info:
                        await store.append("g", "u0", cid, b"lost?", wall_ms=9)
                    assert info.value.retryable, info.value
                proxy.refuse = False
                page = await store.read("g", 0, 100)  # the next call works
                assert page.messages == tuple(acked)
                assert (await store.append("g", "u0", 10, b"y", wall_ms=10)).seq == 6
                await store._check()
                await store.aclose()
            finally:
                await proxy.aclose()

        run(main)

    def test_a_statement_over_the_command_timeout_is_a_retryable_error(self, pg: Pg) -> None:
        """An append stuck behind a lock past command_timeout_ms fails (retryable,
        stores nothing); the connection stays usable."""

        async def main() -> float:
            store = await pg.open(min_connections=1, max_connections=1, command_timeout_ms=300)
            await seeded(store, users=1)
            async with row_locked(pg):
                started = time.monotonic()
                with pytest.raises(PostgresStoreError) as info:
                    await store.append("g", "u0", 1, b"x", wall_ms=1)
                waited = time.monotonic() - started
            assert info.value.retryable
            assert isinstance(info.value.__cause__, TimeoutError)
            assert await store.last_seq("g") == 0
            assert (await store.append("g", "u0", 1, b"x", wall_ms=2)).seq == 1
            await store.aclose()
            return waited

        assert 0.25 < run(main) < 3.0

    def test_a_cancelled_caller_leaves_nothing_behind(self, pg: Pg) -> None:
        """Cancelling an append that waits for a lock cancels its statement on the
        server (nothing is stored once the lock goes), frees its connection slot, and
        the store keeps working on a fresh connection."""

        async def main() -> None:
            store = await pg.open(min_connections=1, max_connections=1)
            await seeded(store, users=1)
            async with row_locked(pg) as admin:
                pending = asyncio.ensure_future(store.append("g", "u0", 1, b"x", wall_ms=1))
                await waiting_backends(admin, pg.schema)
                pending.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await pending
                deadline = time.monotonic() + 5
                while await waiting_backends(admin, pg.schema, at_least=0):
                    assert time.monotonic() < deadline, "the statement was not cancelled"
                    await asyncio.sleep(0.01)
            assert store.queued == 0
            assert await store.last_seq("g") == 0
            assert (await store.append("g", "u0", 1, b"x", wall_ms=2)).seq == 1
            await store.aclose()

        run(main)


# --- limits and lifecycle -----------------------------------------------------------------


class TestLimits:
    def test_past_max_queued_a_call_fails_at_once(self, pg: Pg) -> None:
        """With max_queued=2 calls held (stuck behind a lock), a third raises
        CapacityError(max_queued) at once; the two complete once the lock goes."""

        async def main() -> None:
            store = await pg.open(max_connections=2, max_queued=2)
            await seeded(store, users=1)
            async with row_locked(pg):
                held = [
                    asyncio.ensure_future(store.append("g", "u0", cid, b"x", wall_ms=1))
                    for cid in range(2)
                ]
                await asyncio.sleep(0.05)
                started = time.monotonic()
                with pytest.raises(CapacityError) as info:
                    await store.has_user("u0")
                assert time.monotonic() - started < 0.05
                assert info.value.limit == "max_queued" and store.refused == 1
            assert sorted(m.seq for m in await asyncio.gather(*held)) == [1, 2]
            assert await store.has_user("u0")
            await store.aclose()

        run(main)

    def test_max_connections_bounds_the_server_connections(self, pg: Pg) -> None:
        """Ten appends stuck behind a lock with max_connections=3: three reach the
        server, seven wait in the store; all ten complete, in order, once it goes."""

        async def main() -> None:
            store = await pg.open(min_connections=1, max_connections=3)
            await seeded(store, users=1)
            async with row_locked(pg) as admin:
                calls = [
                    asyncio.ensure_future(store.append("g", "u0", cid, b"x", wall_ms=1))
                    for cid in range(10)
                ]
                await waiting_backends(admin, pg.schema, at_least=3)
                await asyncio.sleep(0.3)  # time for more to arrive, if the bound failed
                assert len(await waiting_backends(admin, pg.schema)) == 3
                assert store.queued == 10
            assert sorted(m.seq for m in await asyncio.gather(*calls)) == list(range(1, 11))
            await store.aclose()

        run(main)

    def test_a_connection_idle_past_max_idle_ms_is_replaced(self, pg: Pg) -> None:
        """A pooled connection used again within max_idle_ms is the same server process;
        one idle longer is closed when next taken and a fresh one serves the call."""

        async def backend_pid(store: PostgresStore) -> int:
            return int(await store._run(lambda conn: conn.fetchval("SELECT pg_backend_pid()")))

        async def main() -> tuple[int, int, int, int]:
            kept = await pg.open(min_connections=1, max_connections=1)
            renewed = await pg.open(min_connections=1, max_connections=1, max_idle_ms=50)
            first_kept, first_renewed = await backend_pid(kept), await backend_pid(renewed)
            await asyncio.sleep(0.2)
            second_kept, second_renewed = await backend_pid(kept), await backend_pid(renewed)
            await kept.aclose()
            await renewed.aclose()
            return first_kept, second_kept, first_renewed, second_renewed

        first_kept, second_kept, first_renewed, second_renewed = run(main)
        assert first_kept == second_kept
        assert first_renewed != second_renewed

    def test_aclose_finishes_calls_in_flight_then_refuses(self, pg: Pg) -> None:
        """An append in flight when aclose() starts completes; later calls raise
        StoreError; aclose twice is fine."""

        async def main() -> None:
            store = await pg.open()
            await seeded(store, users=1)
            async with row_locked(pg):
                pending = asyncio.ensure_future(store.append("g", "u0", 1, b"x", wall_ms=1))
                await asyncio.sleep(0.05)
                closing = asyncio.ensure_future(store.aclose())
                await asyncio.sleep(0.05)
                assert not closing.done()
                with pytest.raises(StoreError):
                    await store.has_user("u0")
            assert (await pending).seq == 1
            await closing
            await store.aclose()
            with pytest.raises(StoreError):
                await store.append("g", "u0", 2, b"x", wall_ms=1)

        run(main)

    def test_the_loop_keeps_running_while_a_call_waits(self, pg: Pg) -> None:
        """While an append waits 300 ms for a lock, a 10 ms ticker keeps ticking."""

        async def main() -> int:
            store = await pg.open()
            await seeded(store, users=1)
            ticks = 0
            async with row_locked(pg):
                pending = asyncio.ensure_future(store.append("g", "u0", 1, b"x", wall_ms=1))
                for _ in range(30):
                    await asyncio.sleep(0.01)
                    ticks += 1
                assert not pending.done()
            await pending
            await store.aclose()
            return ticks

        assert run(main) == 30

    def test_ids_postgres_cannot_hold_are_config_errors(self, pg: Pg) -> None:
        """A NUL or an unpaired surrogate in an id raises ConfigError; nothing is stored."""

        async def main() -> None:
            store = await pg.open()
            await seeded(store, users=1)
            await store.append("g", "u0", 1, b"x", wall_ms=1)
            for bad in ("a\x00b", "a\ud800b"):
                with pytest.raises(ConfigError):
                    await store.create_user(bad)
                with pytest.raises(ConfigError):
                    await store.append("g", bad, 1, b"x", wall_ms=1)
                with pytest.raises(ConfigError):
                    await store.inbox_add(["u0", bad], "g", 1)
            assert await store.last_seq("g") == 1
            assert (await store.inbox_read("u0", 0, 10)).entries == ()
            await store.aclose()

        run(main)
