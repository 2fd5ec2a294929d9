"""Tests of imkit.store: the conformance suite on MemoryStore and SqliteStore, plus
what is particular to each backend (memory limits, SQLite durability and files)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imkit.errors import CapacityError, ConfigError, StoreError
from imkit.store import (
    DEFAULT_DEDUP_WINDOW,
    STORE_FILENAME,
    MemoryStore,
    MessageStore,
    NewMessage,
    SqliteStore,
    StoredMessage,
    open_store,
)
from imkit.store._base import new_message
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


class MemoryBackend:
    """MemoryStores, optionally with a small idempotency window."""

    name = "memory"
    persistent = False

    def __init__(self, dedup_window: int | None = DEFAULT_DEDUP_WINDOW) -> None:
        self.dedup_window = dedup_window

    def make(self, **limits: int) -> MessageStore:
        return MemoryStore(dedup_window=self.dedup_window, **limits)

    def reopen(self, store: MessageStore) -> MessageStore:
        raise NotImplementedError("a MemoryStore does not persist")


class SqliteBackend:
    """SqliteStores, one database file each, in ``directory``."""

    name = "sqlite"
    persistent = True

    def __init__(self, directory: str | Path, synchronous: str = "NORMAL") -> None:
        self.directory = Path(directory)
        self.synchronous = synchronous
        self.limits: dict[str, dict[str, int]] = {}

    def make(self, **limits: int) -> MessageStore:
        path = self.directory / f"store{len(self.limits)}.sqlite3"
        self.limits[str(path)] = limits
        return SqliteStore(path, synchronous=self.synchronous, **limits)

    def reopen(self, store: MessageStore) -> MessageStore:
        assert isinstance(store, SqliteStore)
        store.close()
        return SqliteStore(store.path, synchronous=self.synchronous, **self.limits[store.path])


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each conformance test runs once per backend."""
    if request.param == "memory":
        return MemoryBackend()
    return SqliteBackend(tmp_path)


def _typed(memory: MemoryStore, sqlite: SqliteStore) -> list[MessageStore]:
    """Static check (mypy): both classes implement the MessageStore protocol."""
    return [memory, sqlite]


# --- the stateful tests against the oracle --------------------------------------------

MemoryMachine = make_store_machine(lambda directory: MemoryBackend(dedup_window=3))
MemoryMachine.TestCase.settings = settings(max_examples=250, stateful_step_count=50)
TestMemoryMachine = MemoryMachine.TestCase

MemoryUnboundedMachine = make_store_machine(lambda directory: MemoryBackend(dedup_window=None))
MemoryUnboundedMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=50)
TestMemoryUnboundedMachine = MemoryUnboundedMachine.TestCase

SqliteMachine = make_store_machine(SqliteBackend)
SqliteMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50)
TestSqliteMachine = SqliteMachine.TestCase


class TestValues:
    def test_the_fast_factory_builds_what_the_constructor_builds(self) -> None:
        """new_message (the stores' fast path) equals StoredMessage(...) field for field."""
        fields = {"conv": "g", "seq": 3, "sender": "a", "cid": 9, "body": b"x",
                  "msg_id": 7, "server_ms": 5}
        fast = new_message("g", 3, "a", 9, b"x", 7, 5)
        assert fast == StoredMessage(**fields)  # type: ignore[arg-type]
        assert attrs.asdict(fast) == fields
        assert hash(fast) == hash(StoredMessage(**fields))  # type: ignore[arg-type]
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            fast.seq = 4  # type: ignore[misc]


# --- MemoryStore ------------------------------------------------------------------------


def _memory_group(s: MemoryStore) -> str:
    s.create_user("alice")
    s.create_group("g", ["alice"])
    return "g"


class TestMemoryCapacity:
    def test_max_messages_refuses_new_and_keeps_old(self) -> None:
        """A full store raises CapacityError on append; every stored message stays readable."""
        s = MemoryStore(max_messages=3)
        conv = _memory_group(s)
        stored = [s.append(conv, "alice", i, b"x", wall_ms=i) for i in range(3)]
        with pytest.raises(CapacityError) as info:
            s.append(conv, "alice", 9, b"x", wall_ms=9)
        assert info.value.limit == "max_messages"
        assert s.read(conv, 0, 10).messages == tuple(stored)
        assert s.append(conv, "alice", 1, b"x", wall_ms=9) == stored[1]  # a resend still answers
        s._check()

    def test_max_bytes_counts_bodies(self) -> None:
        """Bodies past max_bytes in total are refused; a smaller one still fits."""
        s = MemoryStore(max_bytes=10)
        conv = _memory_group(s)
        s.append(conv, "alice", 1, b"123456", wall_ms=1)
        with pytest.raises(CapacityError) as info:
            s.append(conv, "alice", 2, b"12345", wall_ms=2)
        assert info.value.limit == "max_bytes"
        s.append(conv, "alice", 3, b"1234", wall_ms=3)
        assert (s.message_count, s.byte_count) == (2, 10)

    def test_append_many_over_capacity_stores_nothing(self) -> None:
        """A batch that does not fit is refused whole; resends in it do not count."""
        s = MemoryStore(max_messages=3)
        conv = _memory_group(s)
        s.append(conv, "alice", 1, b"x", wall_ms=1)
        batch = [NewMessage(conv, "alice", i, b"x") for i in (2, 3, 4)]
        with pytest.raises(CapacityError):
            s.append_many(batch, wall_ms=2)
        assert s.last_seq(conv) == 1
        fits = [NewMessage(conv, "alice", i, b"x") for i in (1, 2, 1, 3)]
        assert [m.seq for m in s.append_many(fits, wall_ms=3)] == [1, 2, 1, 3]
        s._check()

    def test_max_users_and_conversations(self) -> None:
        """Registering past max_users or max_conversations raises CapacityError."""
        s = MemoryStore(max_users=1, max_conversations=1)
        s.create_user("alice")
        assert s.create_user("alice") is False  # an existing user is not a new one
        with pytest.raises(CapacityError):
            s.create_user("bob")
        s.create_group("g")
        with pytest.raises(CapacityError):
            s.create_group("h")
        with pytest.raises(CapacityError):
            s.create_direct("alice", "alice")

    @pytest.mark.parametrize(
        "kwargs",
        [{"max_messages": 0}, {"max_inbox": -1}, {"dedup_window": 0}, {"max_members": True}],
    )
    def test_bad_limits_raise_config_error(self, kwargs: dict[str, int]) -> None:
        """A limit below 1 (or not an int) is refused at construction."""
        with pytest.raises(ConfigError):
            MemoryStore(**kwargs)


class TestMemoryDedupWindow:
    def test_a_resend_within_the_window_is_deduplicated(self) -> None:
        """With window 3, a resend while the original is among the last 3 returns it."""
        s = MemoryStore(dedup_window=3)
        conv = _memory_group(s)
        first = s.append(conv, "alice", 1, b"x", wall_ms=1)
        s.append(conv, "alice", 2, b"x", wall_ms=2)
        s.append(conv, "alice", 3, b"x", wall_ms=3)
        assert s.append(conv, "alice", 1, b"x", wall_ms=4) == first

    def test_a_resend_beyond_the_window_is_stored_again(self) -> None:
        """The documented limit: once 3 newer messages passed, the same key is new again."""
        s = MemoryStore(dedup_window=3)
        conv = _memory_group(s)
        for cid in range(1, 5):
            s.append(conv, "alice", cid, b"x", wall_ms=cid)
        again = s.append(conv, "alice", 1, b"x", wall_ms=9)
        assert again.seq == 5
        assert s.append(conv, "alice", 1, b"x", wall_ms=10) == again
        s._check()

    @given(
        before=st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 3)), max_size=6),
        batch=st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 3)), max_size=8),
    )
    @settings(max_examples=200)
    def test_append_many_decides_resends_as_sequential_appends_do(
        self, before: list[tuple[str, int]], batch: list[tuple[str, int]]
    ) -> None:
        """With window 2, a batch's resend decisions (in-batch and at the window edge) equal
        one-by-one appends."""
        one, many = MemoryStore(dedup_window=2), MemoryStore(dedup_window=2)
        for s in (one, many):
            s.create_group("g")
            for sender, cid in before:
                s.append("g", sender, cid, b"", wall_ms=1)
        items = [NewMessage("g", sender, cid, b"") for sender, cid in batch]
        want = [one.append("g", i.sender, i.cid, b"", wall_ms=2) for i in items]
        assert many.append_many(items, wall_ms=2) == want
        many._check()

    def test_no_window_remembers_every_message(self) -> None:
        """dedup_window=None deduplicates against the whole timeline."""
        s = MemoryStore(dedup_window=None)
        conv = _memory_group(s)
        first = s.append(conv, "alice", 0, b"x", wall_ms=1)
        for cid in range(1, 100):
            s.append(conv, "alice", cid, b"x", wall_ms=1)
        assert s.append(conv, "alice", 0, b"x", wall_ms=2) == first


class TestMemoryInternals:
    def test_members_cache_follows_changes(self) -> None:
        """members() returns the same frozenset until a join or leave, then the new set."""
        s = MemoryStore()
        for uid in ("a", "b"):
            s.create_user(uid)
        s.create_group("g", ["a"])
        first = s.members("g")
        assert s.members("g") is first
        s.join("b", "g")
        assert s.members("g") == {"a", "b"}
        s.leave("a", "g")
        assert s.members("g") == {"b"}
        s._check()

    def test_inbox_compaction_keeps_entries(self) -> None:
        """Many adds through a small inbox compact its list and keep exactly the newest."""
        s = MemoryStore(max_inbox=5)
        conv = _memory_group(s)
        s.append(conv, "alice", 1, b"x", wall_ms=1)
        for _ in range(200):
            s.inbox_add(["alice"], conv, 1)
            s._check()
        page = s.inbox_read("alice", 0, 100)
        assert [e.cursor for e in page.entries] == [196, 197, 198, 199, 200]

    def test_check_detects_corruption(self) -> None:
        """_check raises AssertionError when an invariant is broken behind the store's back."""
        s = MemoryStore()
        conv = _memory_group(s)
        s.append(conv, "alice", 1, b"x", wall_ms=1)
        s._check()
        s._n_messages += 1
        with pytest.raises(AssertionError, match="message count"):
            s._check()
        s._n_messages -= 1
        s._convs[conv].members["ghost"] = 0
        with pytest.raises(AssertionError, match="not a user"):
            s._check()

    def test_context_manager_closes(self) -> None:
        """Leaving a with block closes the store."""
        with MemoryStore() as s:
            s.create_user("alice")
        with pytest.raises(StoreError):
            s.has_user("alice")


# --- SqliteStore --------------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "store.sqlite3"


class TestSqliteFiles:
    def test_a_file_store_uses_wal(self, db_path: Path) -> None:
        """A file database opens in WAL journal mode with the synchronous level asked for."""
        with SqliteStore(db_path, synchronous="full") as s:
            assert s.journal_mode == "wal"
            assert s._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        with SqliteStore(db_path) as s:
            assert s._conn().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL

    @pytest.mark.parametrize(
        "kwargs",
        [{"synchronous": "OFF"}, {"max_inbox": 0}, {"timeout_s": -1.0}, {"max_body_size": "9"}],
    )
    def test_bad_settings_raise_config_error(
        self, db_path: Path, kwargs: dict[str, object]
    ) -> None:
        """synchronous=OFF (acked messages could vanish) and bad limits are refused."""
        with pytest.raises(ConfigError):
            SqliteStore(db_path, **kwargs)  # type: ignore[arg-type]

    def test_a_file_that_is_not_a_database_is_refused(self, db_path: Path) -> None:
        """Opening garbage raises StoreError, not sqlite3.DatabaseError."""
        db_path.write_bytes(b"definitely not sqlite" * 100)
        with pytest.raises(StoreError):
            SqliteStore(db_path)

    def test_another_applications_database_is_refused(self, db_path: Path) -> None:
        """A database with foreign tables is not taken over."""
        con = sqlite3.connect(db_path)
        con.execute("CREATE TABLE accounts (id INTEGER)")
        con.commit()
        con.close()
        with pytest.raises(StoreError, match="another application"):
            SqliteStore(db_path)

    def test_another_schema_version_is_refused(self, db_path: Path) -> None:
        """A store written by an unknown schema version raises StoreError."""
        SqliteStore(db_path).close()
        con = sqlite3.connect(db_path)
        con.execute("PRAGMA user_version = 99")
        con.close()
        with pytest.raises(StoreError, match="schema version 99"):
            SqliteStore(db_path)

    def test_a_version_1_store_is_upgraded_in_place(self, db_path: Path) -> None:
        """A store from before the device cursors opens, keeps its messages, gains the tables."""
        s = SqliteStore(db_path)
        s.create_user("alice")
        s.create_group("g", ["alice"])
        s.append("g", "alice", 1, b"kept", wall_ms=1)
        s.close()
        con = sqlite3.connect(db_path)
        con.executescript(
            "DROP TABLE device_cursors; DROP TABLE devices; PRAGMA user_version = 1;"
        )
        con.close()
        s = SqliteStore(db_path)
        assert [m.body for m in s.read("g", 0, 10).messages] == [b"kept"]
        s.set_device_cursors("alice", "phone", {"g": 1})
        assert s.device_cursors("alice", "phone") == {"g": 1}
        s._check()
        s.close()

    def test_a_cursor_that_stays_takes_no_write_lock(self, db_path: Path) -> None:
        """set_read at or below the cursor (a repeated receipt) runs no write statement."""
        s = SqliteStore(db_path)
        s.create_user("alice")
        s.create_group("g", ["alice"])
        for cid in range(3):
            s.append("g", "alice", cid, b"x", wall_ms=1)
        s.set_read("alice", "g", 2)
        statements: list[str] = []
        db = s._conn()
        db.set_trace_callback(statements.append)
        assert s.set_read("alice", "g", 2) == 2
        assert s.set_read("alice", "g", 1) == 2
        db.set_trace_callback(None)
        writes = [q for q in statements if q.startswith(("BEGIN IMMEDIATE", "UPDATE", "INSERT"))]
        assert writes == []
        assert s.set_read("alice", "g", 3) == 3
        s.close()

    def test_an_unopenable_path_raises_store_error(self, tmp_path: Path) -> None:
        """A path in a missing directory raises StoreError."""
        with pytest.raises(StoreError):
            SqliteStore(tmp_path / "missing" / "dir" / "store.sqlite3")

    def test_sqlite_errors_are_wrapped(self, db_path: Path) -> None:
        """A failure inside SQLite surfaces as StoreError and rolls the transaction back."""
        s = SqliteStore(db_path)
        s.create_user("alice")
        s.create_group("g", ["alice"])
        s._conn().execute("DROP TABLE inbox")
        s.append("g", "alice", 1, b"x", wall_ms=1)
        with pytest.raises(StoreError):
            s.inbox_add(["alice"], "g", 1)
        assert s._conn().in_transaction is False
        assert s.read("g", 0, 5).messages[0].body == b"x"
        s.close()

    def test_check_detects_tampering(self, db_path: Path) -> None:
        """_check catches a seq counter moved below the stored messages."""
        s = SqliteStore(db_path)
        s.create_user("alice")
        s.create_group("g", ["alice"])
        s.append("g", "alice", 1, b"x", wall_ms=1)
        s._check()
        s._conn().execute("UPDATE conversations SET last_seq = 0")
        with pytest.raises(AssertionError, match="last_seq"):
            s._check()
        s.close()

    def test_a_smaller_max_inbox_after_reopen_trims_logically(self, db_path: Path) -> None:
        """Reopening with a lower max_inbox shows only the newest entries at once."""
        s = SqliteStore(db_path, max_inbox=10)
        s.create_user("alice")
        s.create_group("g", ["alice"])
        s.append("g", "alice", 1, b"x", wall_ms=1)
        for _ in range(6):
            s.inbox_add(["alice"], "g", 1)
        s.close()
        s = SqliteStore(db_path, max_inbox=2)
        page = s.inbox_read("alice", 0, 10)
        assert ([e.cursor for e in page.entries], page.trimmed) == ([5, 6], True)
        s.inbox_add(["alice"], "g", 1)
        s._check()
        s.close()

    def test_two_connections_share_one_file(self, db_path: Path) -> None:
        """Two stores on one file (two processes, say) see each other's commits; no seq clash."""
        a, b = SqliteStore(db_path), SqliteStore(db_path)
        a.create_user("alice")
        a.create_group("g", ["alice"])
        seqs = [a.append("g", "alice", 1, b"x", wall_ms=1).seq]
        seqs.append(b.append("g", "alice", 2, b"y", wall_ms=2).seq)
        seqs.append(a.append("g", "alice", 3, b"z", wall_ms=3).seq)
        assert seqs == [1, 2, 3]
        assert b.append("g", "alice", 1, b"x", wall_ms=4).seq == 1
        a.close()
        b.close()


class TestSqlitePlaceholders:
    def test_statements_use_only_nameless_placeholders(self) -> None:
        """No SQL of SqliteStore uses numbered placeholders (?1) with sequence parameters:
        Python 3.12 warns about it and 3.14 raises ProgrammingError."""
        import inspect
        import re

        import imkit.store.sqlite as module

        numbered = re.findall(r"\?\d+", inspect.getsource(module))
        assert numbered == []


class TestOpenStore:
    def test_without_a_directory_the_store_is_in_memory(self) -> None:
        """open_store() is a MemoryStore, with the limits given."""
        s = open_store(max_inbox=7)
        assert isinstance(s, MemoryStore)
        assert s.max_inbox == 7

    def test_with_a_directory_the_store_persists(self, tmp_path: Path) -> None:
        """open_store(dir) creates dir and a SqliteStore in it that a later open reads back."""
        data = tmp_path / "data" / "nested"
        s = open_store(data)
        assert isinstance(s, SqliteStore)
        s.create_user("alice")
        s.close()
        assert (data / STORE_FILENAME).exists()
        s = open_store(data)
        assert s.has_user("alice")
        s.close()

    def test_an_uncreatable_directory_raises_store_error(self, tmp_path: Path) -> None:
        """A data directory under a regular file raises StoreError."""
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises(StoreError):
            open_store(blocker / "data")
