"""PostgresStore: the durable :class:`~imkit.store.AsyncMessageStore` of a cluster, on
PostgreSQL through asyncpg.

Several logic processes share one database: each opens a :class:`PostgresStore` (its
own connection pool) on the same ``schema``. The verbs, results, limits and errors are
those of :class:`~imkit.store.SqliteStore`, checked by the same conformance suite;
what differs is that every call is awaited on the event loop (asyncpg never blocks
it) and that several processes append to one conversation at once.

Layout (one PostgreSQL schema, eight tables; ids are ``text COLLATE "C"``)::

    meta(key, value)                                        ('schema_version', 1)
    users(uid, inbox_last, inbox_first, conv_count)         inbox cursors per user
    conversations(id, conv, kind, last_seq, member_count)   last_seq: the seq counter
    members(conv_id, uid, read_seq)                         + index (uid, conv_id)
    messages(conv_id, seq, sender, cid, body, msg_id, server_ms)
        primary key (conv_id, seq): a timeline is one index range
        unique (conv_id, sender, cid): the idempotency key, for every message ever
    inbox(uid, cursor, conv_id, seq)                        primary key (uid, cursor)
    devices(uid, device, stamp)                             stamp: write order per user
    device_cursors(uid, device, conv_id, seq)

**Appending.** One statement, one round trip, its own transaction: it locks the
conversation's row (``SELECT ... FOR NO KEY UPDATE``: appenders of one conversation,
from any process, queue there), inserts the message with seq ``last_seq + 1``
(``ON CONFLICT (conv_id, sender, cid) DO NOTHING``), and moves ``last_seq`` to it
only if the row went in. So seqs are unique and gap-free, a seq and its message
commit together, and a resent cid stores nothing and answers the first message
(found in the same statement; if the first copy committed while this one waited for
the lock, a second query fetches it). Idempotency is exact and unbounded, as in
SQLite (``dedup_window`` is None): the unique index lives on disk beside the messages
it indexes, so bounding it would save nothing worth the double-store it allows.

**Other writes** that must see rows committed while they waited for a lock run as a
short transaction whose first statement takes the locks, always in one order (a
conversation's row, then user rows sorted by uid), so two processes never deadlock;
should PostgreSQL still report a deadlock or a serialization failure (it rolled the
transaction back), the call is run again, up to ``_ROLLBACK_RETRIES`` times.

**Failures.** A call that PostgreSQL refuses or that cannot reach it raises
:class:`PostgresStoreError` (a :class:`~imkit.errors.StoreError`, so the logic server
answers the client, which resends; and a :class:`~imkit.errors.BackendError`), with
``retryable`` set when trying again later may succeed (connection lost or refused,
server shutting down, timeout, too many connections) and the driver's error chained.
After a connection-level failure the pool's idle connections are replaced, so the
next call gets a fresh one. A call that times out has its statement cancelled on the
server before the error is raised (for a cancelled caller, right after), so a
statement cannot commit long after its caller gave up; but a failed ``append`` may
still have committed (the link can drop during the commit): resending the same cid
is always safe, it answers the stored message. Nothing acknowledged is ever lost: a
call returns only after PostgreSQL committed (the server's ``synchronous_commit``
decides what a commit survives).

**Limits.** ``max_connections`` per store (its own small pool, :class:`_Connections`:
asyncpg's Pool costs ~55 us a call in tasks and timers); ``max_queued`` calls held at
once (waiting for a connection or running), past which a call fails at once with
:class:`~imkit.errors.CapacityError`; ``connect_timeout_ms`` per connection attempt;
``command_timeout_ms`` per statement and per wait for a free connection;
``max_idle_ms`` for an idle pooled connection; and the per-group, per-user and
per-call limits every store shares.

Ids must be PostgreSQL text: a uid, conversation or device id holding NUL or an
unpaired surrogate is refused with ConfigError (the other stores accept them; no id
that arrives over the wire can hold a surrogate).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

try:
    import asyncpg  # type: ignore[import-untyped]
except ImportError as _e:  # pragma: no cover - the extra is not installed
    raise ImportError("imkit.aio.postgres needs asyncpg: pip install 'imkit[postgres]'") from _e

from imkit.aio import DEFAULT_MAX_QUEUED_CALLS
from imkit.errors import (
    BackendError,
    CapacityError,
    ConfigError,
    ConversationNotFound,
    ImkitError,
    NotMember,
    StoreError,
    UserNotFound,
)
from imkit.store import (
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_CONVERSATIONS_PER_USER,
    DEFAULT_MAX_DEVICES_PER_USER,
    DEFAULT_MAX_INBOX,
    DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_READ_LIMIT,
    ConversationInfo,
    ConvKind,
    InboxEntry,
    InboxPage,
    NewMessage,
    Page,
    StoredMessage,
)
from imkit.store._base import (
    MAX_INT,
    check_conv,
    check_cursors,
    check_int,
    check_limit,
    check_new_message,
    check_positive_setting,
    check_uid,
    check_uids,
    direct_conv_id,
    new_message,
)

__all__ = [
    "DEFAULT_PG_COMMAND_TIMEOUT_MS",
    "DEFAULT_PG_CONNECT_TIMEOUT_MS",
    "DEFAULT_PG_MAX_CONNECTIONS",
    "DEFAULT_PG_MAX_IDLE_MS",
    "DEFAULT_PG_MIN_CONNECTIONS",
    "DEFAULT_PG_SCHEMA",
    "SCHEMA_VERSION",
    "PostgresStore",
    "PostgresStoreError",
]

_T = TypeVar("_T")

#: The schema version this code writes into ``meta``; a schema of a newer version
#: (written by a newer imkit) is refused rather than misread.
SCHEMA_VERSION = 1

#: The PostgreSQL schema (namespace) holding the tables. One database can hold several
#: imkit deployments (or test runs) side by side, each in its own schema.
DEFAULT_PG_SCHEMA = "imkit"

#: Connections :meth:`PostgresStore.open` opens at once (checking that the server takes
#: them): one for the hot path (is_member, append, members, inbox_add of a send, one
#: after the other) and one for a concurrent sync or cursor flush, so the first calls
#: skip the connection handshake (3-8 ms on loopback without TLS, bench machine).
DEFAULT_PG_MIN_CONNECTIONS = 2

#: Connections a store opens at most. PostgreSQL allows 100 by default
#: (``max_connections``, 3 reserved for superusers): 8 logic processes at 10 each
#: leave room for operators and migrations. Past about 2-4 active connections per
#: server core, PostgreSQL's throughput stops growing (the PostgreSQL wiki's "Number
#: Of Database Connections": cores x 2 + disks), so more would only queue on the
#: server instead of here.
DEFAULT_PG_MAX_CONNECTIONS = 10

#: How long one connection attempt may take (TCP, TLS, authentication). A healthy
#: server on a LAN answers within milliseconds; asyncpg's own default (60 s) would
#: leave a caller waiting long after its client gave up (clients resend unacked
#: sends within at most 30 s, ``LoginAck``).
DEFAULT_PG_CONNECT_TIMEOUT_MS = 5_000

#: How long a connection may sit idle in the pool and still be used; an older one is
#: closed when next taken and a fresh one opened. Middleboxes drop idle TCP flows
#: silently (Azure's load balancer after 4 min by default, AWS's NLB after 350 s,
#: many NATs after 5 min), and the call that found such a connection would fail;
#: 2 min stays below them all, at the cost of one handshake after a quiet spell.
DEFAULT_PG_MAX_IDLE_MS = 120_000

#: How long one statement, or one wait for a free pooled connection, may take. An
#: append takes about a millisecond (one fsync of the WAL); 5 s means the server is
#: overloaded, locked up or unreachable, and the caller had better answer its client
#: (who resends) than hold the call. A timed-out statement is cancelled on the server.
DEFAULT_PG_COMMAND_TIMEOUT_MS = 5_000

# A transaction PostgreSQL rolled back because of a deadlock or a serialization
# failure is run again this many times in all (it changed nothing). Locks are always
# taken in one order, so this is a second line of defence, not the plan.
_ROLLBACK_RETRIES = 3
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
# SQLSTATE classes after which a later try may succeed: connection exception,
# transaction rollback, insufficient resources, operator intervention (shutdown,
# cancel, cannot connect now).
_RETRYABLE_CLASSES = frozenset({"08", "40", "53", "57"})
_NOT_RETRYABLE = frozenset({"40003"})  # statement_completion_unknown: the outcome is unknown
_SHUTDOWN_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})  # admin/crash shutdown, starting

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # PostgreSQL's 63-byte identifiers
_ADVISORY_LOCK_PREFIX = "imkit.aio.postgres:"


# --- errors -----------------------------------------------------------------------------


class PostgresStoreError(StoreError, BackendError):
    """PostgreSQL refused a call or could not be reached; nothing of the call is known
    to be stored (a failed ``append`` may have committed: resend the same cid).

    A :class:`~imkit.errors.StoreError` (the logic server answers the client, which
    resends) and a :class:`~imkit.errors.BackendError`. ``retryable``: trying again
    later may succeed (connection refused or lost, shutdown, timeout, too many
    connections, deadlock). ``sqlstate``: PostgreSQL's error code, None for a failure
    below SQL (a socket, a timeout). The driver's exception is the ``__cause__``.
    """

    def __init__(self, what: str, *, retryable: bool, sqlstate: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.retryable = retryable
        self.sqlstate = sqlstate

    def __str__(self) -> str:
        code = f" [{self.sqlstate}]" if self.sqlstate else ""
        again = " (retryable)" if self.retryable else ""
        return f"postgres: {self.what}{code}{again}"


def _wrap(error: BaseException) -> PostgresStoreError:
    """The :class:`PostgresStoreError` a driver or socket error becomes."""
    sqlstate = getattr(error, "sqlstate", None)
    sqlstate = sqlstate if isinstance(sqlstate, str) else None
    if isinstance(error, TimeoutError):
        return PostgresStoreError("no answer within the timeout", retryable=True)
    if isinstance(error, OSError):
        return PostgresStoreError(f"cannot reach the server: {error}", retryable=True)
    name = type(error).__name__
    if sqlstate is not None:
        retryable = sqlstate[:2] in _RETRYABLE_CLASSES and sqlstate not in _NOT_RETRYABLE
        return PostgresStoreError(f"{name}: {error}", retryable=retryable, sqlstate=sqlstate)
    return PostgresStoreError(f"{name}: {error}", retryable=False)


def _lost(error: BaseException) -> bool:
    """Whether ``error`` says the connection (or the server) is gone."""
    sqlstate = getattr(error, "sqlstate", None)
    return isinstance(error, OSError) or (
        isinstance(sqlstate, str) and (sqlstate[:2] == "08" or sqlstate in _SHUTDOWN_SQLSTATES)
    )


# Driver errors wrapped into PostgresStoreError (anything else is a bug and propagates).
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)


# --- the parts of asyncpg this module uses (asyncpg ships no type information) ----------


class _Connection(Protocol):
    async def fetch(self, query: str, *args: object) -> list[Any]: ...
    async def fetchrow(self, query: str, *args: object) -> Any: ...
    async def fetchval(self, query: str, *args: object) -> Any: ...
    async def execute(self, query: str, *args: object) -> str: ...
    def transaction(
        self, *, isolation: str | None = None, readonly: bool = False
    ) -> AbstractAsyncContextManager[object]: ...
    def is_closed(self) -> bool: ...
    def is_in_transaction(self) -> bool: ...
    def terminate(self) -> None: ...
    async def close(self, *, timeout: float | None = None) -> None: ...


# --- the connection pool ----------------------------------------------------------------


class _Connections:
    """At most ``max_size`` connections, shared by a store's calls.

    A call waits for one of ``max_size`` slots (a FIFO semaphore, timed only when it
    has to wait), takes the idle connection used last (its server process and
    statement cache are warm) or opens one, and hands it back when done: O(1), no task
    and no timer on the way. (asyncpg's own Pool spends about 55 us a call on a task to
    time the acquire and another to shield the release, benchmarks/bench_postgres.py.)

    A connection whose call did not end with an answer from the server (a socket
    error, a timeout, a cancelled caller) is never reused: :meth:`discard` closes it
    gracefully, which first waits for asyncpg to cancel a statement still running on
    the server, so no statement finishes after its caller was told it failed (unless
    it was finishing already). Its slot stays taken until then: ``max_size`` bounds the
    server's processes too. :meth:`expire` drops the idle connections as well (the
    server went away), and a connection idle for more than ``max_idle_s`` is dropped
    when next taken (checked then: no timer).
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[_Connection]],
        max_size: int,
        *,
        max_idle_s: float,
        close_s: float,
    ) -> None:
        self._connect = connect
        self.max_size = max_size
        self._max_idle_s = max_idle_s
        self._close_s = close_s
        self._slots = asyncio.Semaphore(max_size)
        # idle connections, the one used last at the end: (connection, generation, since)
        self._idle: list[tuple[_Connection, int, float]] = []
        self._generation = 0
        self._closing: set[asyncio.Task[None]] = set()  # discards of cancelled calls

    @property
    def idle(self) -> int:
        """Connections open and not in use now. O(1)."""
        return len(self._idle)

    async def fill(self, n: int) -> None:
        """Open ``n`` connections at once and keep them idle (all or none)."""
        opened = await asyncio.gather(*(self._connect() for _ in range(n)), return_exceptions=True)
        conns = [c for c in opened if not isinstance(c, BaseException)]
        failed = [c for c in opened if isinstance(c, BaseException)]
        if failed:
            for conn in conns:
                conn.terminate()
            raise failed[0]
        now = asyncio.get_running_loop().time()
        self._idle.extend((conn, self._generation, now) for conn in conns)

    async def acquire(self, wait_s: float) -> tuple[_Connection, int]:
        """A connection for one call, and its generation (hand both to release).

        Waits at most ``wait_s`` for a free slot (TimeoutError), then opens a
        connection if none is idle (the driver's errors propagate)."""
        slots = self._slots
        if slots.locked():
            async with asyncio.timeout(wait_s):
                await slots.acquire()
        else:
            await slots.acquire()  # a free slot: returns at once
        try:
            idle = self._idle
            if idle:
                fresh_since = asyncio.get_running_loop().time() - self._max_idle_s
                while idle:
                    conn, generation, since = idle.pop()
                    if (
                        generation == self._generation
                        and since >= fresh_since
                        and not conn.is_closed()
                    ):
                        return conn, generation
                    conn.terminate()  # no statement runs on it: nothing to cancel
            generation = self._generation
            return await self._connect(), generation
        except BaseException:
            slots.release()
            raise

    def release(self, conn: _Connection, generation: int) -> None:
        """Take back ``conn`` after a call that ended with the server's answer. O(1)."""
        if generation == self._generation and not conn.is_closed() and not conn.is_in_transaction():
            self._idle.append((conn, generation, asyncio.get_running_loop().time()))
        else:
            conn.terminate()
        self._slots.release()

    async def discard(self, conn: _Connection) -> None:
        """Close ``conn`` for good (see the class doc), then free its slot."""
        try:
            with contextlib.suppress(Exception):  # close() aborted it then: it is gone
                await conn.close(timeout=self._close_s)
        finally:
            self._slots.release()

    def discard_later(self, conn: _Connection) -> None:
        """:meth:`discard` in the background (for a call whose caller was cancelled)."""
        task = asyncio.get_running_loop().create_task(self.discard(conn))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def expire(self) -> None:
        """Drop every connection open now as it comes back or is next taken (the server
        or the link failed: they are likely dead). O(1)."""
        self._generation += 1

    def _check(self) -> None:
        """Assert the pool's invariants (AssertionError naming the broken one). O(idle)."""
        idle = self._idle
        assert len(idle) <= self.max_size, f"{len(idle)} idle connections > {self.max_size}"
        assert len({id(conn) for conn, _, _ in idle}) == len(idle), "a connection idle twice"
        assert all(g <= self._generation for _, g, _ in idle), "an idle connection from ahead"
        assert [t for _, _, t in idle] == sorted(t for _, _, t in idle), "idle out of order"
        # every idle connection is a free slot (busy ones hold theirs)
        assert self._slots._value >= len(idle), "idle connections without free slots"

    async def aclose(self) -> None:
        """Close the idle connections and wait for the discards under way."""
        idle, self._idle = self._idle, []
        await asyncio.gather(
            *(conn.close(timeout=self._close_s) for conn, _, _ in idle),
            *self._closing,
            return_exceptions=True,
        )
        for conn, _, _ in idle:
            conn.terminate()  # no-op once closed; cuts one whose close failed


# --- argument checks particular to PostgreSQL ------------------------------------------


def _check_text(value: str, what: str) -> str:
    """``value`` (already a checked id) if PostgreSQL text can hold it. O(len)."""
    if "\x00" in value:
        raise ConfigError(f"{what} must not contain NUL (PostgreSQL text cannot hold it)")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ConfigError(f"{what} must be encodable as UTF-8") from None
    return value


def _check_schema(schema: object) -> str:
    if not isinstance(schema, str) or _SCHEMA_NAME.fullmatch(schema) is None:
        raise ConfigError(
            f"schema must be a lowercase SQL identifier ([a-z_][a-z0-9_]*, at most 63 "
            f"chars), got {schema!r}"
        )
    return schema


def _check_timeout_ms(name: str, value: object) -> int:
    if type(value) is not int or value < 1:
        raise ConfigError(f"{name} must be an int >= 1 (milliseconds), got {value!r}")
    return value


# --- SQL ----------------------------------------------------------------------------------

_DDL = """
CREATE TABLE {s}.meta (
    key text COLLATE "C" PRIMARY KEY,
    value bigint NOT NULL
);
CREATE TABLE {s}.users (
    uid text COLLATE "C" PRIMARY KEY,
    inbox_last bigint NOT NULL DEFAULT 0,
    inbox_first bigint NOT NULL DEFAULT 1,
    conv_count integer NOT NULL DEFAULT 0
);
CREATE TABLE {s}.conversations (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conv text COLLATE "C" NOT NULL UNIQUE,
    kind smallint NOT NULL,
    last_seq bigint NOT NULL DEFAULT 0,
    member_count integer NOT NULL DEFAULT 0
);
CREATE TABLE {s}.members (
    conv_id bigint NOT NULL,
    uid text COLLATE "C" NOT NULL,
    read_seq bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (conv_id, uid)
);
CREATE INDEX members_by_uid ON {s}.members (uid, conv_id);
CREATE TABLE {s}.messages (
    conv_id bigint NOT NULL,
    seq bigint NOT NULL,
    sender text COLLATE "C" NOT NULL,
    cid bigint NOT NULL,
    body bytea NOT NULL,
    msg_id bigint NOT NULL,
    server_ms bigint NOT NULL,
    PRIMARY KEY (conv_id, seq)
);
CREATE UNIQUE INDEX messages_by_key ON {s}.messages (conv_id, sender, cid);
CREATE TABLE {s}.inbox (
    uid text COLLATE "C" NOT NULL,
    cursor bigint NOT NULL,
    conv_id bigint NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (uid, cursor)
);
CREATE TABLE {s}.devices (
    uid text COLLATE "C" NOT NULL,
    device text COLLATE "C" NOT NULL,
    stamp bigint NOT NULL,
    PRIMARY KEY (uid, device)
);
CREATE TABLE {s}.device_cursors (
    uid text COLLATE "C" NOT NULL,
    device text COLLATE "C" NOT NULL,
    conv_id bigint NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (uid, device, conv_id)
);
INSERT INTO {s}.meta (key, value) VALUES ('schema_version', {version});
"""


class _Statements:
    """Every statement of the store, with the schema filled in (built once per store)."""

    def __init__(self, schema: str) -> None:
        s = f'"{schema}"'
        self.schema = schema
        self.ddl = _DDL.format(s=s, version=SCHEMA_VERSION)
        self.version = f"SELECT value FROM {s}.meta WHERE key = 'schema_version'"

        # messages
        self.append = f"""
WITH c AS (
    SELECT id, last_seq FROM {s}.conversations WHERE conv = $1 FOR NO KEY UPDATE
), ins AS (
    INSERT INTO {s}.messages (conv_id, seq, sender, cid, body, msg_id, server_ms)
    SELECT id, last_seq + 1, $2, $3, $4, $5, $6 FROM c
    ON CONFLICT (conv_id, sender, cid) DO NOTHING
    RETURNING conv_id, seq
), bump AS (
    UPDATE {s}.conversations AS k SET last_seq = ins.seq FROM ins WHERE k.id = ins.conv_id
)
SELECT true, seq, NULL::bytea, NULL::bigint, NULL::bigint FROM ins
UNION ALL
SELECT false, m.seq, m.body, m.msg_id, m.server_ms
FROM {s}.messages AS m JOIN c ON m.conv_id = c.id WHERE m.sender = $2 AND m.cid = $3"""
        self.find_key = f"""
SELECT m.seq, m.body, m.msg_id, m.server_ms FROM {s}.conversations AS c
LEFT JOIN {s}.messages AS m ON m.conv_id = c.id AND m.sender = $2 AND m.cid = $3
WHERE c.conv = $1"""
        self.lock_convs = f"""
SELECT conv, id, last_seq FROM {s}.conversations WHERE conv = ANY($1::text[])
ORDER BY id FOR NO KEY UPDATE"""
        self.find_keys = f"""
SELECT m.conv_id, m.sender, m.cid, m.seq, m.body, m.msg_id, m.server_ms
FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS k(conv_id, sender, cid)
JOIN {s}.messages AS m ON m.conv_id = k.conv_id AND m.sender = k.sender AND m.cid = k.cid"""
        self.insert_many = f"""
WITH ins AS (
    INSERT INTO {s}.messages (conv_id, seq, sender, cid, body, msg_id, server_ms)
    SELECT v.conv_id, v.seq, v.sender, v.cid, v.body, v.msg_id, $6
    FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::bytea[],
                $7::bigint[]) AS v(conv_id, seq, sender, cid, body, msg_id)
)
UPDATE {s}.conversations AS k SET last_seq = v.last_seq
FROM unnest($8::bigint[], $9::bigint[]) AS v(id, last_seq) WHERE k.id = v.id"""
        self.read = f"""
SELECT m.seq, m.sender, m.cid, m.body, m.msg_id, m.server_ms
FROM {s}.conversations AS c
LEFT JOIN LATERAL (
    SELECT seq, sender, cid, body, msg_id, server_ms FROM {s}.messages
    WHERE conv_id = c.id AND seq > $2 ORDER BY seq LIMIT $3
) AS m ON true
WHERE c.conv = $1 ORDER BY m.seq"""
        self.last_seq = f"SELECT last_seq FROM {s}.conversations WHERE conv = $1"

        # inboxes
        self.inbox_lock = f"""
SELECT (SELECT id FROM {s}.conversations WHERE conv = $1),
       (SELECT last_seq FROM {s}.conversations WHERE conv = $1),
       ARRAY(SELECT uid FROM {s}.users WHERE uid = ANY($2::text[]) ORDER BY uid FOR UPDATE)"""
        self.inbox_add = f"""
WITH u AS (
    UPDATE {s}.users SET inbox_last = inbox_last + 1,
        inbox_first = greatest(inbox_first, inbox_last + 2 - $3)
    WHERE uid = ANY($1::text[])
    RETURNING uid, inbox_last, inbox_first
), ins AS (
    INSERT INTO {s}.inbox (uid, cursor, conv_id, seq) SELECT uid, inbox_last, $2, $4 FROM u
)
DELETE FROM {s}.inbox AS i USING u WHERE i.uid = u.uid AND i.cursor < u.inbox_first"""
        self.inbox_read = f"""
SELECT u.inbox_last, u.inbox_first, e.cursor, e.conv, e.seq
FROM {s}.users AS u
LEFT JOIN LATERAL (
    SELECT i.cursor, c.conv, i.seq FROM {s}.inbox AS i
    JOIN {s}.conversations AS c ON c.id = i.conv_id
    WHERE i.uid = u.uid AND i.cursor >= greatest($2::bigint, u.inbox_first, u.inbox_last - $3 + 1)
    ORDER BY i.cursor LIMIT $4
) AS e ON true
WHERE u.uid = $1 ORDER BY e.cursor"""
        self.lock_user_inbox = (
            f"SELECT inbox_last, inbox_first FROM {s}.users WHERE uid = $1 FOR UPDATE"
        )
        self.inbox_trim = f"""
WITH up AS (UPDATE {s}.users SET inbox_first = $2 WHERE uid = $1)
DELETE FROM {s}.inbox WHERE uid = $1 AND cursor < $2"""

        # read cursors
        self.set_read = f"""
WITH c AS (
    SELECT id, last_seq FROM {s}.conversations WHERE conv = $1
), m AS (
    SELECT read_seq FROM {s}.members WHERE conv_id = (SELECT id FROM c) AND uid = $2
), up AS (
    UPDATE {s}.members SET read_seq = $3
    WHERE conv_id = (SELECT id FROM c) AND uid = $2 AND read_seq < $3
        AND $3 <= (SELECT last_seq FROM c)
)
SELECT c.last_seq, (SELECT read_seq FROM m) FROM c"""
        self.get_read = f"""
SELECT m.read_seq FROM {s}.conversations AS c
LEFT JOIN {s}.members AS m ON m.conv_id = c.id AND m.uid = $2 WHERE c.conv = $1"""
        self.read_cursors = f"""
SELECT m.uid, m.read_seq FROM {s}.conversations AS c
LEFT JOIN {s}.members AS m ON m.conv_id = c.id AND m.read_seq > 0 WHERE c.conv = $1"""

        # device cursors
        self.lock_devices = f"""
SELECT d.device, d.stamp FROM {s}.users AS u
LEFT JOIN {s}.devices AS d ON d.uid = u.uid WHERE u.uid = $1 FOR UPDATE OF u"""
        self.set_device_cursors = f"""
WITH gone AS (
    DELETE FROM {s}.devices WHERE uid = $1 AND device = ANY($3::text[])
), gone_cursors AS (
    DELETE FROM {s}.device_cursors WHERE uid = $1 AND device = ANY($3::text[])
), dev AS (
    INSERT INTO {s}.devices AS d (uid, device, stamp) VALUES ($1, $2, $4)
    ON CONFLICT (uid, device) DO UPDATE SET stamp = excluded.stamp
    WHERE d.stamp <> excluded.stamp
)
INSERT INTO {s}.device_cursors AS d (uid, device, conv_id, seq)
SELECT $1, $2, c.id, least(v.seq, c.last_seq)
FROM unnest($5::text[], $6::bigint[]) AS v(conv, seq)
JOIN {s}.conversations AS c ON c.conv = v.conv
JOIN {s}.members AS m ON m.conv_id = c.id AND m.uid = $1
WHERE least(v.seq, c.last_seq) > 0
ON CONFLICT (uid, device, conv_id) DO UPDATE SET seq = excluded.seq
WHERE d.seq < excluded.seq"""
        self.device_cursors = f"""
SELECT c.conv, d.seq FROM {s}.users AS u
LEFT JOIN {s}.device_cursors AS d ON d.uid = u.uid AND d.device = $2
LEFT JOIN {s}.conversations AS c ON c.id = d.conv_id
WHERE u.uid = $1"""

        # registry
        self.create_user = (
            f"INSERT INTO {s}.users (uid) VALUES ($1) ON CONFLICT DO NOTHING RETURNING true"
        )
        self.has_user = f"SELECT EXISTS (SELECT 1 FROM {s}.users WHERE uid = $1)"
        self.conv_exists = f"SELECT EXISTS (SELECT 1 FROM {s}.conversations WHERE conv = $1)"
        self.insert_conv = f"""
INSERT INTO {s}.conversations (conv, kind, member_count) VALUES ($1, $2, $3)
ON CONFLICT (conv) DO NOTHING RETURNING id"""
        self.lock_users = f"""
SELECT uid, conv_count FROM {s}.users WHERE uid = ANY($1::text[]) ORDER BY uid FOR UPDATE"""
        self.add_members = f"""
WITH m AS (INSERT INTO {s}.members (conv_id, uid) SELECT $1, unnest($2::text[]))
UPDATE {s}.users SET conv_count = conv_count + 1 WHERE uid = ANY($2::text[])"""
        self.lock_conv = f"""
SELECT id, kind, member_count FROM {s}.conversations WHERE conv = $1 FOR NO KEY UPDATE"""
        self.lock_joiner = f"""
SELECT u.conv_count, EXISTS (SELECT 1 FROM {s}.members WHERE conv_id = $1 AND uid = $2)
FROM {s}.users AS u WHERE u.uid = $2 FOR UPDATE OF u"""
        self.join = f"""
WITH m AS (
    INSERT INTO {s}.members (conv_id, uid) VALUES ($1, $2)
), c AS (
    UPDATE {s}.conversations SET member_count = member_count + 1 WHERE id = $1
)
UPDATE {s}.users SET conv_count = conv_count + 1 WHERE uid = $2"""
        self.lock_user = f"SELECT 1 FROM {s}.users WHERE uid = $1 FOR UPDATE"
        self.leave = f"""
WITH d AS (
    DELETE FROM {s}.members WHERE conv_id = $1 AND uid = $2 RETURNING uid
), c AS (
    UPDATE {s}.conversations SET member_count = member_count - 1
    WHERE id = $1 AND EXISTS (SELECT 1 FROM d)
), u AS (
    UPDATE {s}.users SET conv_count = conv_count - 1 WHERE uid IN (SELECT uid FROM d)
), dc AS (
    DELETE FROM {s}.device_cursors WHERE uid = $2 AND conv_id = $1
)
SELECT count(*) FROM d"""
        self.members = f"""
SELECT m.uid FROM {s}.conversations AS c
LEFT JOIN {s}.members AS m ON m.conv_id = c.id WHERE c.conv = $1"""
        self.is_member = f"""
SELECT EXISTS (SELECT 1 FROM {s}.conversations AS c
JOIN {s}.members AS m ON m.conv_id = c.id WHERE c.conv = $1 AND m.uid = $2)"""
        self.conversations_of = f"""
SELECT c.conv FROM {s}.users AS u
LEFT JOIN {s}.members AS m ON m.uid = u.uid
LEFT JOIN {s}.conversations AS c ON c.id = m.conv_id
WHERE u.uid = $1"""
        self.conversation = (
            f"SELECT kind, member_count, last_seq FROM {s}.conversations WHERE conv = $1"
        )

        # invariants (_check): each query lists what breaks one
        self.checks = (
            (
                "a conversation's last_seq is not its message count and highest seq",
                f"SELECT c.conv, c.last_seq, x.n, x.top FROM {s}.conversations AS c "
                f"LEFT JOIN (SELECT conv_id, count(*) AS n, max(seq) AS top "
                f"FROM {s}.messages GROUP BY conv_id) AS x ON x.conv_id = c.id "
                f"WHERE c.last_seq <> coalesce(x.n, 0) OR c.last_seq <> coalesce(x.top, 0)",
            ),
            (
                "a message of an unknown conversation, or with seq < 1",
                f"SELECT m.conv_id, m.seq FROM {s}.messages AS m LEFT JOIN "
                f"{s}.conversations AS c ON c.id = m.conv_id WHERE c.id IS NULL OR m.seq < 1",
            ),
            (
                "member_count out of step",
                f"SELECT conv, member_count FROM {s}.conversations AS c WHERE member_count <> "
                f"(SELECT count(*) FROM {s}.members WHERE conv_id = c.id)",
            ),
            (
                "conv_count out of step",
                f"SELECT uid, conv_count FROM {s}.users AS u WHERE conv_count <> "
                f"(SELECT count(*) FROM {s}.members WHERE uid = u.uid)",
            ),
            (
                "a member that is not a user, or a read cursor out of range",
                f"SELECT m.uid, m.read_seq FROM {s}.members AS m "
                f"LEFT JOIN {s}.users AS u ON u.uid = m.uid "
                f"LEFT JOIN {s}.conversations AS c ON c.id = m.conv_id "
                f"WHERE u.uid IS NULL OR c.id IS NULL OR m.read_seq < 0 "
                f"OR m.read_seq > c.last_seq",
            ),
            (
                "an inbox whose entries are not exactly inbox_first..inbox_last",
                f"SELECT uid, inbox_first, inbox_last FROM {s}.users AS u "
                f"WHERE inbox_first < 1 OR inbox_first > inbox_last + 1 "
                f"OR (SELECT count(*) FROM {s}.inbox WHERE uid = u.uid) "
                f"<> inbox_last - inbox_first + 1 "
                f"OR EXISTS (SELECT 1 FROM {s}.inbox WHERE uid = u.uid "
                f"AND (cursor < u.inbox_first OR cursor > u.inbox_last))",
            ),
            (
                "an inbox entry of an unknown user or naming no stored message",
                f"SELECT i.uid, i.cursor FROM {s}.inbox AS i "
                f"LEFT JOIN {s}.users AS u ON u.uid = i.uid "
                f"LEFT JOIN {s}.conversations AS c ON c.id = i.conv_id "
                f"WHERE u.uid IS NULL OR c.id IS NULL OR i.seq < 1 OR i.seq > c.last_seq",
            ),
            (
                "a device cursor outside its user's conversations or their seqs",
                f"SELECT d.uid, d.device, d.conv_id FROM {s}.device_cursors AS d "
                f"LEFT JOIN {s}.members AS m ON m.conv_id = d.conv_id AND m.uid = d.uid "
                f"LEFT JOIN {s}.conversations AS c ON c.id = d.conv_id "
                f"WHERE m.uid IS NULL OR d.seq < 1 OR d.seq > c.last_seq",
            ),
            (
                "device cursors of an unregistered device",
                f"SELECT d.uid, d.device FROM {s}.device_cursors AS d "
                f"LEFT JOIN {s}.devices AS v ON v.uid = d.uid AND v.device = d.device "
                f"WHERE v.uid IS NULL",
            ),
        )
        self.check_devices = (
            f"SELECT uid, count(*) FROM {s}.devices GROUP BY uid HAVING count(*) > $1"
        )
        self.check_kinds = f"""
SELECT c.conv, c.kind, array_agg(m.uid ORDER BY m.uid) FILTER (WHERE m.uid IS NOT NULL)
FROM {s}.conversations AS c LEFT JOIN {s}.members AS m ON m.conv_id = c.id
GROUP BY c.id, c.conv, c.kind"""


# --- the store ----------------------------------------------------------------------------


class PostgresStore:
    """Messages, inboxes, cursors and the registry in one PostgreSQL schema, shared by
    every logic process of a cluster; open with :meth:`open`.

    Round trips per call (counted on the wire by benchmarks/bench_postgres.py; a round
    trip is ~0.05 ms on loopback, 0.2-0.5 ms on a LAN, plus the server's work; every
    write waits for one WAL flush): 1 for ``append`` (2 for a resend whose first copy
    committed while it waited), ``read``, ``last_seq``, ``inbox_read``, ``set_read``,
    ``get_read``, ``read_cursors``, ``device_cursors``, ``members``, ``is_member``,
    ``conversations_of``, ``conversation``, ``create_user`` and ``has_user``; 3-4 for
    ``inbox_trim``; 4 for ``inbox_add`` and ``set_device_cursors`` (a transaction:
    BEGIN, lock, write, COMMIT); 5 for ``join``, ``leave``, ``create_group`` and
    ``create_direct`` (3 when the conversation exists) and ``append_many`` (per batch).
    A statement's first use on a connection adds one (asyncpg prepares it). Server
    work: O(log n) per row touched (B-tree indexes), O(log n + limit) per range read.
    Idempotency is exact and unbounded (``dedup_window`` is None).

    Calls may be made concurrently from many tasks: each runs on a pooled connection
    (at most ``max_connections``); one task's calls complete in the order it made
    them. Several stores (processes) may share the schema: appends of one
    conversation queue on its row, so seqs stay unique and gap-free.

    >>> async def demo(dsn: str) -> int:  # doctest: +SKIP
    ...     store = await PostgresStore.open(dsn, schema="imkit")
    ...     await store.create_user("alice")
    ...     await store.create_group("g", ["alice"])
    ...     msg = await store.append("g", "alice", 7, b"hello", wall_ms=1)
    ...     await store.aclose()
    ...     return msg.seq
    """

    #: Exact, unbounded idempotency (a unique index), as in SqliteStore.
    dedup_window: int | None = None
    #: What is stored survives the process (and the server, per its settings).
    durable: bool = True

    def __init__(
        self,
        *,
        schema: str = DEFAULT_PG_SCHEMA,
        min_connections: int = DEFAULT_PG_MIN_CONNECTIONS,
        max_connections: int = DEFAULT_PG_MAX_CONNECTIONS,
        max_queued: int = DEFAULT_MAX_QUEUED_CALLS,
        connect_timeout_ms: int = DEFAULT_PG_CONNECT_TIMEOUT_MS,
        command_timeout_ms: int = DEFAULT_PG_COMMAND_TIMEOUT_MS,
        max_idle_ms: int = DEFAULT_PG_MAX_IDLE_MS,
        max_members: int = DEFAULT_MAX_MEMBERS,
        max_conversations_per_user: int = DEFAULT_MAX_CONVERSATIONS_PER_USER,
        max_inbox: int = DEFAULT_MAX_INBOX,
        max_read_limit: int = DEFAULT_MAX_READ_LIMIT,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        max_devices_per_user: int = DEFAULT_MAX_DEVICES_PER_USER,
    ) -> None:
        """Check the settings; no I/O. Use :meth:`open`, which also connects: a store
        built here and never opened refuses every call with StoreError."""
        self.schema = _check_schema(schema)
        if type(min_connections) is not int or min_connections < 0:
            raise ConfigError(f"min_connections must be an int >= 0, got {min_connections!r}")
        self.min_connections = min_connections
        self.max_connections = check_positive_setting("max_connections", max_connections)
        if min_connections > max_connections:
            raise ConfigError(
                f"min_connections ({min_connections}) exceeds max_connections ({max_connections})"
            )
        self.max_queued = check_positive_setting("max_queued", max_queued)
        self.connect_timeout_ms = _check_timeout_ms("connect_timeout_ms", connect_timeout_ms)
        self.command_timeout_ms = _check_timeout_ms("command_timeout_ms", command_timeout_ms)
        self.max_idle_ms = _check_timeout_ms("max_idle_ms", max_idle_ms)
        self.max_members = check_positive_setting("max_members", max_members)
        self.max_conversations_per_user = check_positive_setting(
            "max_conversations_per_user", max_conversations_per_user
        )
        self.max_inbox = check_positive_setting("max_inbox", max_inbox)
        self.max_read_limit = check_positive_setting("max_read_limit", max_read_limit)
        self.max_body_size = check_positive_setting("max_body_size", max_body_size)
        self.max_devices_per_user = check_positive_setting(
            "max_devices_per_user", max_devices_per_user
        )
        #: Calls held now (waiting for a connection or running).
        self.queued = 0
        #: Calls refused because ``max_queued`` were held.
        self.refused = 0
        self._sql = _Statements(self.schema)
        self._pool: _Connections | None = None
        self._closed = False
        self._opened = False
        self._drained: asyncio.Event | None = None  # set by aclose: the last call ended

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        schema: str = DEFAULT_PG_SCHEMA,
        min_connections: int = DEFAULT_PG_MIN_CONNECTIONS,
        max_connections: int = DEFAULT_PG_MAX_CONNECTIONS,
        max_queued: int = DEFAULT_MAX_QUEUED_CALLS,
        connect_timeout_ms: int = DEFAULT_PG_CONNECT_TIMEOUT_MS,
        command_timeout_ms: int = DEFAULT_PG_COMMAND_TIMEOUT_MS,
        max_idle_ms: int = DEFAULT_PG_MAX_IDLE_MS,
        max_members: int = DEFAULT_MAX_MEMBERS,
        max_conversations_per_user: int = DEFAULT_MAX_CONVERSATIONS_PER_USER,
        max_inbox: int = DEFAULT_MAX_INBOX,
        max_read_limit: int = DEFAULT_MAX_READ_LIMIT,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        max_devices_per_user: int = DEFAULT_MAX_DEVICES_PER_USER,
    ) -> PostgresStore:
        """Connect to ``dsn`` (``postgresql://user@host:port/db``; asyncpg's syntax),
        open ``min_connections`` connections, and create ``schema`` and its tables if
        they are missing (concurrent openers serialize on an advisory lock).

        ConfigError for a bad setting or DSN; StoreError if the schema holds another
        application's tables or was written by a newer imkit (its schema version is
        above :data:`SCHEMA_VERSION`); :class:`PostgresStoreError` if the server cannot
        be reached (``retryable``) or refuses (bad credentials, unknown database).
        O(1) round trips, plus creating the tables once.
        """
        store = cls(
            schema=schema,
            min_connections=min_connections,
            max_connections=max_connections,
            max_queued=max_queued,
            connect_timeout_ms=connect_timeout_ms,
            command_timeout_ms=command_timeout_ms,
            max_idle_ms=max_idle_ms,
            max_members=max_members,
            max_conversations_per_user=max_conversations_per_user,
            max_inbox=max_inbox,
            max_read_limit=max_read_limit,
            max_body_size=max_body_size,
            max_devices_per_user=max_devices_per_user,
        )
        if not isinstance(dsn, str):
            raise ConfigError("dsn must be a str")
        await store._connect(dsn)
        return store

    async def _connect(self, dsn: str) -> None:
        connect_timeout = self.connect_timeout_ms / 1000
        command_timeout = self.command_timeout_ms / 1000

        async def connect() -> _Connection:
            conn: _Connection = await asyncpg.connect(
                dsn, timeout=connect_timeout, command_timeout=command_timeout
            )
            return conn

        pool = _Connections(
            connect,
            self.max_connections,
            max_idle_s=self.max_idle_ms / 1000,
            close_s=command_timeout,
        )
        try:
            await pool.fill(max(self.min_connections, 1))
            conn, generation = await pool.acquire(command_timeout)
            try:
                await self._setup_schema(conn)
            finally:
                pool.release(conn, generation)
            if self.min_connections == 0:
                await pool.aclose()
        except BaseException as e:
            await pool.aclose()
            if isinstance(e, asyncpg.exceptions.ClientConfigurationError):
                raise ConfigError(f"bad PostgreSQL dsn: {e}") from e
            if isinstance(e, _DRIVER_ERRORS):
                raise _wrap(e) from e
            raise
        self._pool = pool
        self._opened = True

    async def _setup_schema(self, conn: _Connection) -> None:
        """Create the schema's tables if missing; refuse another version. One transaction."""
        schema = self.schema
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                _ADVISORY_LOCK_PREFIX + schema,
            )
            has_meta = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{schema}".meta')
            if has_meta:
                version = await conn.fetchval(self._sql.version)
                if version != SCHEMA_VERSION:
                    newer = isinstance(version, int) and version > SCHEMA_VERSION
                    hint = ": upgrade imkit" if newer else ""
                    raise StoreError(
                        f"schema {schema!r} has imkit schema version {version}, this imkit "
                        f"reads version {SCHEMA_VERSION}{hint}"
                    )
                return
            tables = await conn.fetchval(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
                schema,
            )
            if tables:
                raise StoreError(f"schema {schema!r} holds another application's tables")
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(self._sql.ddl)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._opened else "not open"
        return (
            f"PostgresStore(schema={self.schema!r}, {state}, "
            f"queued={self.queued}/{self.max_queued})"
        )

    # --- plumbing -------------------------------------------------------------------

    async def _run(
        self, work: Callable[[_Connection], Awaitable[_T]], *, transaction: bool = False
    ) -> _T:
        """``await work(conn)`` on a pooled connection (in one transaction if asked);
        driver errors become PostgresStoreError, rolled-back conflicts are retried."""
        pool = self._pool
        if pool is None or self._closed:
            raise StoreError("the store is closed" if self._closed else "the store is not open")
        if self.queued >= self.max_queued:
            self.refused += 1
            raise CapacityError("max_queued", self.max_queued, "store calls waiting")
        self.queued += 1
        try:
            tries = 0
            while True:
                tries += 1
                try:
                    conn, generation = await pool.acquire(self.command_timeout_ms / 1000)
                except TimeoutError as e:
                    raise PostgresStoreError(
                        f"all {pool.max_size} connections busy for {self.command_timeout_ms} ms",
                        retryable=True,
                    ) from e
                except _DRIVER_ERRORS as e:
                    if _lost(e):
                        pool.expire()
                    raise _wrap(e) from e
                answered = False  # the call ended with the server's answer
                cancelled = False
                try:
                    if transaction:
                        async with conn.transaction():
                            result = await work(conn)
                    else:
                        result = await work(conn)
                    answered = True
                    return result
                except ImkitError:  # the store's own refusal, after an answer
                    answered = True
                    raise
                except asyncio.CancelledError:
                    cancelled = True
                    raise
                except _DRIVER_ERRORS as e:
                    lost = _lost(e)
                    answered = isinstance(e, asyncpg.PostgresError) and not lost
                    error = _wrap(e)
                    if error.sqlstate in _RETRY_SQLSTATES and tries < _ROLLBACK_RETRIES:
                        continue
                    if lost:  # the server or the link failed: the idle ones are suspect
                        pool.expire()
                    raise error from e
                finally:
                    if answered:
                        pool.release(conn, generation)
                    elif cancelled:
                        pool.discard_later(conn)
                    else:  # a timeout or a broken link: cancel on the server, then tell
                        await pool.discard(conn)
        finally:
            self.queued -= 1
            if self.queued == 0 and self._drained is not None:
                self._drained.set()

    # --- messages -------------------------------------------------------------------

    async def append(
        self, conv: str, sender: str, cid: int, body: bytes, *, wall_ms: int, msg_id: int = 0
    ) -> StoredMessage:
        """Store a message with the next seq of ``conv`` (one statement, one round trip).

        Idempotent on (sender, cid) for every message ever stored, whichever process
        stored it: a resend returns the stored message and writes nothing.
        ConversationNotFound, ConfigError, CapacityError (``max_body_size``,
        ``max_queued``), PostgresStoreError (then resend: it is safe). O(log n).
        """
        check_new_message(conv, sender, cid, body, msg_id)
        check_int(wall_ms, "wall_ms")
        if len(body) > self.max_body_size:
            raise CapacityError("max_body_size", self.max_body_size, f"body of {len(body)} bytes")
        _check_text(conv, "conv")
        _check_text(sender, "sender")
        sql = self._sql

        async def work(conn: _Connection) -> StoredMessage:
            for _ in range(_ROLLBACK_RETRIES):
                row = await conn.fetchrow(sql.append, conv, sender, cid, body, msg_id, wall_ms)
                if row is not None:
                    if row[0]:
                        return new_message(conv, row[1], sender, cid, body, msg_id, wall_ms)
                    return new_message(conv, row[1], sender, cid, row[2], row[3], row[4])
                # no row: an unknown conversation, or the first copy of this (sender,
                # cid) committed while this statement waited (its snapshot missed it)
                row = await conn.fetchrow(sql.find_key, conv, sender, cid)
                if row is None:
                    raise ConversationNotFound(conv)
                if row[0] is not None:
                    return new_message(conv, row[0], sender, cid, row[1], row[2], row[3])
            raise PostgresStoreError("append found neither a slot nor its key", retryable=True)

        return await self._run(work)

    async def append_many(
        self, items: Iterable[NewMessage], *, wall_ms: int
    ) -> list[StoredMessage]:
        """:meth:`append` each item in order, in one transaction: all or nothing.

        Locks the batch's conversations (in id order), looks up which keys are stored
        already, then inserts every new message and moves each conversation's counter
        in one statement: 5 round trips per batch, whatever its size.
        O(len(items) log n).
        """
        batch = list(items)
        check_int(wall_ms, "wall_ms")
        for item in batch:
            if not isinstance(item, NewMessage):
                raise ConfigError("append_many takes NewMessage items")
            check_new_message(*item)
            if len(item.body) > self.max_body_size:
                raise CapacityError(
                    "max_body_size", self.max_body_size, f"body of {len(item.body)} bytes"
                )
            _check_text(item.conv, "conv")
            _check_text(item.sender, "sender")
        sql = self._sql

        async def work(conn: _Connection) -> list[StoredMessage]:
            if not batch:
                return []
            convs = list(dict.fromkeys(item.conv for item in batch))
            locked = {r[0]: (r[1], r[2]) for r in await conn.fetch(sql.lock_convs, convs)}
            for item in batch:
                if item.conv not in locked:
                    raise ConversationNotFound(item.conv)
            ids = [locked[item.conv][0] for item in batch]
            stored = {
                (r[0], r[1], r[2]): r
                for r in await conn.fetch(
                    sql.find_keys, ids, [i.sender for i in batch], [i.cid for i in batch]
                )
            }
            last = dict(locked.values())
            start = dict(last)
            new: dict[tuple[int, str, int], StoredMessage] = {}
            out = []
            for conv_id, (conv, sender, cid, body, msg_id) in zip(ids, batch, strict=True):
                key = (conv_id, sender, cid)
                msg = new.get(key)
                if msg is None:
                    old = stored.get(key)
                    if old is not None:
                        msg = new_message(conv, old[3], sender, cid, old[4], old[5], old[6])
                    else:
                        seq = last[conv_id] = last[conv_id] + 1
                        msg = new[key] = new_message(conv, seq, sender, cid, body, msg_id, wall_ms)
                out.append(msg)
            if new:
                moved = [(i, s) for i, s in last.items() if s != start[i]]
                rows = list(new.items())
                await conn.execute(
                    sql.insert_many,
                    [k[0] for k, _ in rows],
                    [m.seq for _, m in rows],
                    [m.sender for _, m in rows],
                    [m.cid for _, m in rows],
                    [m.body for _, m in rows],
                    wall_ms,
                    [m.msg_id for _, m in rows],
                    [i for i, _ in moved],
                    [s for _, s in moved],
                )
            return out

        return await self._run(work, transaction=True)

    async def read(self, conv: str, after_seq: int, limit: int) -> Page:
        """Messages with seq > ``after_seq``, oldest first, at most ``min(limit,
        max_read_limit)``; ``more`` is True when later messages exist. One indexed
        range query, one round trip: O(log n + limit). ConversationNotFound."""
        check_conv(conv)
        check_int(after_seq, "after_seq")
        n = min(check_limit(limit), self.max_read_limit)
        _check_text(conv, "conv")
        sql = self._sql
        rows: list[Any] = await self._run(lambda conn: conn.fetch(sql.read, conv, after_seq, n + 1))
        if not rows:
            raise ConversationNotFound(conv)
        if rows[0][0] is None:
            return Page(messages=(), more=False)
        messages = tuple(
            new_message(conv, seq, sender, cid, body, msg_id, server_ms)
            for seq, sender, cid, body, msg_id, server_ms in rows[:n]
        )
        return Page(messages=messages, more=len(rows) > n)

    async def last_seq(self, conv: str) -> int:
        """The highest seq of ``conv`` (0 if none). One round trip, O(log n)."""
        check_conv(conv)
        _check_text(conv, "conv")
        sql = self._sql
        seq = await self._run(lambda conn: conn.fetchval(sql.last_seq, conv))
        if seq is None:
            raise ConversationNotFound(conv)
        return int(seq)

    # --- inboxes --------------------------------------------------------------------

    async def inbox_add(self, uids: Iterable[str], conv: str, seq: int) -> None:
        """Append (conv, seq) to each user's inbox, once per distinct uid, in one
        transaction; a full inbox drops its oldest entry. ``seq`` must be a stored seq
        (ConfigError); an unknown uid raises UserNotFound and nothing changes.
        4 round trips; O(len(uids) log n)."""
        check_conv(conv)
        check_int(seq, "seq")
        targets = list(dict.fromkeys(check_uids(uids)))
        _check_text(conv, "conv")
        for uid in targets:
            _check_text(uid, "uid")
        sql = self._sql

        async def work(conn: _Connection) -> None:
            conv_id, last_seq, found = await conn.fetchrow(sql.inbox_lock, conv, targets)
            if conv_id is None:
                raise ConversationNotFound(conv)
            if not 1 <= seq <= last_seq:
                raise ConfigError(f"seq {seq} is not a stored seq of {conv!r}")
            if len(found) != len(targets):
                known = set(found)
                raise UserNotFound(next(uid for uid in targets if uid not in known))
            if targets:
                await conn.execute(sql.inbox_add, targets, conv_id, self.max_inbox, seq)

        await self._run(work, transaction=True)

    async def inbox_read(self, uid: str, after_cursor: int, limit: int) -> InboxPage:
        """Entries of ``uid`` with cursor > ``after_cursor``, in arrival order, at most
        ``min(limit, max_read_limit)``. See :class:`~imkit.store.InboxPage` for
        ``trimmed``. One round trip, O(log n + limit). UserNotFound."""
        check_uid(uid)
        check_int(after_cursor, "after_cursor")
        n = min(check_limit(limit), self.max_read_limit)
        _check_text(uid, "uid")
        sql = self._sql
        first_wanted = min(after_cursor, MAX_INT - 1) + 1
        rows: list[Any] = await self._run(
            lambda conn: conn.fetch(sql.inbox_read, uid, first_wanted, self.max_inbox, n)
        )
        if not rows:
            raise UserNotFound(uid)
        last, first = int(rows[0][0]), int(rows[0][1])
        if after_cursor > last:
            return InboxPage(entries=(), cursor=last, more=False, trimmed=True)
        first = max(first, last - self.max_inbox + 1)  # max_inbox may be lower than before
        start = max(after_cursor + 1, first)
        entries = tuple(
            InboxEntry(cursor=k, conv=c, seq=s) for _l, _f, k, c, s in rows if k is not None
        )
        cursor = start - 1 + len(entries)
        return InboxPage(
            entries=entries, cursor=cursor, more=cursor < last, trimmed=start > after_cursor + 1
        )

    async def inbox_trim(self, uid: str, through_cursor: int) -> None:
        """Drop the entries of ``uid`` with cursor <= ``through_cursor`` (beyond the last
        entry: all). 3 round trips (4 when something is dropped). O(log n + dropped)."""
        check_uid(uid)
        check_int(through_cursor, "through_cursor")
        _check_text(uid, "uid")
        sql = self._sql

        async def work(conn: _Connection) -> None:
            row = await conn.fetchrow(sql.lock_user_inbox, uid)
            if row is None:
                raise UserNotFound(uid)
            last, first = row
            new_first = min(through_cursor, last) + 1
            if new_first > first:
                await conn.execute(sql.inbox_trim, uid, new_first)

        await self._run(work, transaction=True)

    # --- read cursors ---------------------------------------------------------------

    async def set_read(self, uid: str, conv: str, seq: int) -> int:
        """Move the read cursor of member ``uid`` in ``conv`` up to ``seq`` (never down);
        return the cursor. ConfigError above the last seq, NotMember. One statement,
        one round trip (a cursor that stays writes nothing). O(log n)."""
        check_conv(conv)
        check_uid(uid)
        check_int(seq, "seq")
        _check_text(conv, "conv")
        _check_text(uid, "uid")
        sql = self._sql
        row = await self._run(lambda conn: conn.fetchrow(sql.set_read, conv, uid, seq))
        if row is None:
            raise ConversationNotFound(conv)
        last_seq, current = row
        if seq > last_seq:
            raise ConfigError(f"seq {seq} is beyond the last seq of {conv!r}")
        if current is None:
            raise NotMember(uid, conv)
        # moved to seq, or stays at a cursor already >= seq
        return max(int(current), seq)

    async def get_read(self, uid: str, conv: str) -> int:
        """The read cursor of ``uid`` in ``conv``: 0 if unset or not a member.
        One round trip, O(log n)."""
        check_conv(conv)
        check_uid(uid)
        _check_text(conv, "conv")
        _check_text(uid, "uid")
        sql = self._sql
        rows: list[Any] = await self._run(lambda conn: conn.fetch(sql.get_read, conv, uid))
        if not rows:
            raise ConversationNotFound(conv)
        value = rows[0][0]
        return 0 if value is None else int(value)

    async def read_cursors(self, conv: str) -> dict[str, int]:
        """``uid -> read seq`` of every member who has read something. One round trip,
        O(members)."""
        check_conv(conv)
        _check_text(conv, "conv")
        sql = self._sql
        rows: list[Any] = await self._run(lambda conn: conn.fetch(sql.read_cursors, conv))
        if not rows:
            raise ConversationNotFound(conv)
        return {uid: int(r) for uid, r in rows if uid is not None}

    # --- device cursors -------------------------------------------------------------

    async def set_device_cursors(self, uid: str, device: str, cursors: Mapping[str, int]) -> None:
        """Move the cursors of ``device`` of ``uid`` up (never down), each clamped to
        its conversation's last seq; conversations ``uid`` is not in are ignored. Past
        ``max_devices_per_user`` the least recently written device is forgotten. One
        transaction, 4 round trips. UserNotFound, ConfigError, CapacityError (more
        entries than ``max_conversations_per_user``). O(len(cursors) log n)."""
        check_uid(uid)
        check_uid(device, "device")
        items = check_cursors(cursors, self.max_conversations_per_user)
        _check_text(uid, "uid")
        _check_text(device, "device")
        for conv, _seq in items:
            _check_text(conv, "conv")
        sql = self._sql
        limit = self.max_devices_per_user

        async def work(conn: _Connection) -> None:
            rows = await conn.fetch(sql.lock_devices, uid)
            if not rows:
                raise UserNotFound(uid)
            devices = {r[0]: int(r[1]) for r in rows if r[0] is not None}
            top = max(devices.values(), default=0)
            known = devices.get(device)
            evict: list[str] = []
            if known is None:
                excess = len(devices) - limit + 1
                if excess > 0:
                    evict = sorted(devices, key=devices.__getitem__)[:excess]
                stamp = top + 1
            else:
                stamp = known if known == top else top + 1
            await conn.execute(
                sql.set_device_cursors,
                uid,
                device,
                evict,
                stamp,
                [conv for conv, _ in items],
                [seq for _, seq in items],
            )

        await self._run(work, transaction=True)

    async def device_cursors(self, uid: str, device: str) -> dict[str, int]:
        """The cursors of ``device`` of ``uid`` ({} for an unknown device). UserNotFound.
        One round trip, O(log n + conversations of the device)."""
        check_uid(uid)
        check_uid(device, "device")
        _check_text(uid, "uid")
        _check_text(device, "device")
        sql = self._sql
        rows: list[Any] = await self._run(lambda conn: conn.fetch(sql.device_cursors, uid, device))
        if not rows:
            raise UserNotFound(uid)
        return {conv: int(seq) for conv, seq in rows if conv is not None}

    # --- registry -------------------------------------------------------------------

    async def create_user(self, uid: str) -> bool:
        """Register ``uid``; False if it already existed. One round trip, O(log n)."""
        check_uid(uid)
        _check_text(uid, "uid")
        sql = self._sql
        return bool(await self._run(lambda conn: conn.fetchval(sql.create_user, uid)))

    async def has_user(self, uid: str) -> bool:
        """Whether ``uid`` is registered. One round trip, O(log n)."""
        check_uid(uid)
        _check_text(uid, "uid")
        sql = self._sql
        return bool(await self._run(lambda conn: conn.fetchval(sql.has_user, uid)))

    async def _create(self, conn: _Connection, conv: str, kind: ConvKind, uids: list[str]) -> bool:
        """Insert conversation ``conv`` with members ``uids`` unless it exists; False
        if it did. Run inside a transaction (a refusal rolls the insert back)."""
        sql = self._sql
        conv_id = await conn.fetchval(sql.insert_conv, conv, int(kind), len(uids))
        if conv_id is None:
            return False
        if not uids:
            return True
        counts = dict(await conn.fetch(sql.lock_users, uids))
        for uid in uids:
            if uid not in counts:
                raise UserNotFound(uid)
        for uid in uids:
            if counts[uid] >= self.max_conversations_per_user:
                raise CapacityError(
                    "max_conversations_per_user", self.max_conversations_per_user, uid
                )
        await conn.execute(sql.add_members, conv_id, uids)
        return True

    async def create_group(self, conv: str, members: Iterable[str] = ()) -> bool:
        """Create group ``conv`` with ``members``; False (and nothing changes) if
        ``conv`` exists. Ids starting with ``"dm:"`` are reserved for 1:1 chats
        (ConfigError). UserNotFound, CapacityError. One transaction, 5 round trips (3
        if it exists); O(len(members) log n)."""
        check_conv(conv)
        if conv.startswith("dm:"):
            raise ConfigError("conversation ids starting with 'dm:' are reserved for 1:1 chats")
        uids = list(dict.fromkeys(check_uids(members)))
        _check_text(conv, "conv")
        for uid in uids:
            _check_text(uid, "uid")
        sql = self._sql

        async def work(conn: _Connection) -> bool:
            if len(uids) > self.max_members:
                if await conn.fetchval(sql.conv_exists, conv):
                    return False
                raise CapacityError("max_members", self.max_members, f"{len(uids)} members")
            return await self._create(conn, conv, ConvKind.GROUP, uids)

        return await self._run(work, transaction=True)

    async def create_direct(self, a: str, b: str) -> str:
        """Create (if needed) the 1:1 conversation of users ``a`` and ``b``; return its
        :func:`~imkit.store.direct_conv_id`. UserNotFound, CapacityError. One
        transaction, 5 round trips (3 if it exists). O(log n)."""
        conv = direct_conv_id(a, b)
        uids = list(dict.fromkeys(sorted((a, b))))
        _check_text(a, "uid")
        _check_text(b, "uid")
        await self._run(
            lambda conn: self._create(conn, conv, ConvKind.DIRECT, uids), transaction=True
        )
        return conv

    async def join(self, uid: str, conv: str) -> bool:
        """Add ``uid`` to group ``conv``; False if already a member. ConfigError for a
        1:1 chat, UserNotFound, CapacityError. One transaction, 5 round trips.
        O(log n)."""
        check_conv(conv)
        check_uid(uid)
        _check_text(conv, "conv")
        _check_text(uid, "uid")
        sql = self._sql

        async def work(conn: _Connection) -> bool:
            row = await conn.fetchrow(sql.lock_conv, conv)
            if row is None:
                raise ConversationNotFound(conv)
            conv_id, kind, member_count = row
            if kind == ConvKind.DIRECT:
                raise ConfigError("members of a 1:1 conversation are fixed")
            user = await conn.fetchrow(sql.lock_joiner, conv_id, uid)
            if user is None:
                raise UserNotFound(uid)
            conv_count, already = user
            if already:
                return False
            if member_count >= self.max_members:
                raise CapacityError("max_members", self.max_members, conv)
            if conv_count >= self.max_conversations_per_user:
                raise CapacityError(
                    "max_conversations_per_user", self.max_conversations_per_user, uid
                )
            await conn.execute(sql.join, conv_id, uid)
            return True

        return await self._run(work, transaction=True)

    async def leave(self, uid: str, conv: str) -> bool:
        """Remove ``uid`` from group ``conv`` and its read and device cursors there;
        False if not a member. ConfigError for a 1:1 chat. One transaction, 5 round
        trips. O(log n + devices of uid)."""
        check_conv(conv)
        check_uid(uid)
        _check_text(conv, "conv")
        _check_text(uid, "uid")
        sql = self._sql

        async def work(conn: _Connection) -> bool:
            row = await conn.fetchrow(sql.lock_conv, conv)
            if row is None:
                raise ConversationNotFound(conv)
            conv_id, kind, _count = row
            if kind == ConvKind.DIRECT:
                raise ConfigError("members of a 1:1 conversation are fixed")
            # the user's row next (as set_device_cursors holds it), then the deletes
            # see every device cursor committed before
            await conn.execute(sql.lock_user, uid)
            return bool(await conn.fetchval(sql.leave, conv_id, uid))

        return await self._run(work, transaction=True)

    async def members(self, conv: str) -> frozenset[str]:
        """The members of ``conv``. One round trip, O(members)."""
        check_conv(conv)
        _check_text(conv, "conv")
        sql = self._sql
        rows: list[Any] = await self._run(lambda conn: conn.fetch(sql.members, conv))
        if not rows:
            raise ConversationNotFound(conv)
        return frozenset(uid for (uid,) in rows if uid is not None)

    async def is_member(self, uid: str, conv: str) -> bool:
        """Whether ``uid`` is a member of ``conv``; False for an unknown conversation.
        One round trip, O(log n)."""
        check_conv(conv)
        check_uid(uid)
        _check_text(conv, "conv")
        _check_text(uid, "uid")
        sql = self._sql
        return bool(await self._run(lambda conn: conn.fetchval(sql.is_member, conv, uid)))

    async def conversations_of(self, uid: str) -> frozenset[str]:
        """The conversations ``uid`` belongs to. UserNotFound. One round trip,
        O(conversations of uid)."""
        check_uid(uid)
        _check_text(uid, "uid")
        sql = self._sql
        rows: list[Any] = await self._run(lambda conn: conn.fetch(sql.conversations_of, uid))
        if not rows:
            raise UserNotFound(uid)
        return frozenset(conv for (conv,) in rows if conv is not None)

    async def conversation(self, conv: str) -> ConversationInfo:
        """Kind, member count and last seq of ``conv``. One round trip, O(log n)."""
        check_conv(conv)
        _check_text(conv, "conv")
        sql = self._sql
        row = await self._run(lambda conn: conn.fetchrow(sql.conversation, conv))
        if row is None:
            raise ConversationNotFound(conv)
        kind, member_count, last_seq = row
        return ConversationInfo(
            conv=conv, kind=ConvKind(kind), member_count=member_count, last_seq=last_seq
        )

    # --- lifecycle ------------------------------------------------------------------

    async def aclose(self) -> None:
        """Let the calls already made finish, then close the pool's connections; later
        calls raise StoreError. Idempotent. Each call in flight is bounded by its own
        timeouts; connections still busy ``command_timeout_ms`` after that are cut."""
        if self._closed:
            return
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if self.queued:
            self._drained = asyncio.Event()
            await self._drained.wait()
        await pool.aclose()

    async def _check(self) -> None:
        """Assert every invariant the schema does not enforce (AssertionError naming the
        broken one): counters in step with rows, seqs gap-free, cursors in range.
        O(everything)."""
        sql = self._sql
        limit = self.max_devices_per_user
        if self._pool is not None:
            self._pool._check()

        async def work(conn: _Connection) -> None:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await checks(conn)

        async def checks(conn: _Connection) -> None:
            for what, query in sql.checks:
                bad = (await conn.fetch(query))[:3]
                assert not bad, f"{what}: {[tuple(r) for r in bad]}"
            bad = (await conn.fetch(sql.check_devices, limit))[:3]
            assert not bad, f"more devices than max_devices_per_user: {[tuple(r) for r in bad]}"
            for conv, kind, uids in await conn.fetch(sql.check_kinds):
                members = list(uids or ())
                if kind == ConvKind.DIRECT:
                    assert 1 <= len(members) <= 2, f"{conv!r}: a 1:1 chat with {len(members)}"
                    assert direct_conv_id(members[0], members[-1]) == conv, f"{conv!r}: members"
                else:
                    assert kind == ConvKind.GROUP, f"{conv!r}: unknown kind {kind}"
                    assert not conv.startswith("dm:"), f"group {conv!r} uses the 1:1 prefix"

        await self._run(work)  # one snapshot for all the checks
