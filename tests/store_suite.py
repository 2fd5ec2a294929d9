"""The MessageStore conformance suite: every store backend must pass all of it.

A test module plugs a backend in by defining a ``backend`` fixture that returns a
:class:`Backend` and importing the ``Test*`` classes and the ``store`` fixture from
here (pytest collects imported classes). ``tests/test_store.py`` does it for the
memory and SQLite stores; a Redis store adds a module that does the same::

    from tests.store_suite import Backend, TestAppend, ..., store

    @pytest.fixture
    def backend(tmp_path: Path) -> Backend:
        return RedisBackend(...)

    TestRedisMachine = make_store_machine(lambda directory: RedisBackend(...)).TestCase

Errors are checked in one order by every backend: argument format and per-argument
limits (ConfigError, ``max_body_size``) first, then a closed store (StoreError), then
existence (ConversationNotFound, UserNotFound), then the state (NotMember, ConfigError
for a seq beyond the last, CapacityError). The stateful test holds every backend to
one oracle, :class:`Model`, including that order.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from imkit.errors import (
    CapacityError,
    ConfigError,
    ConversationNotFound,
    ImkitError,
    NotMember,
    StoreError,
    UserNotFound,
)
from imkit.store import (
    ConversationInfo,
    ConvKind,
    InboxEntry,
    InboxPage,
    MessageStore,
    NewMessage,
    Page,
    StoredMessage,
    direct_conv_id,
)

__all__ = [
    "Backend",
    "Model",
    "TestAppend",
    "TestDeviceCursors",
    "TestInbox",
    "TestLifecycle",
    "TestRead",
    "TestReadCursors",
    "TestRegistry",
    "TestRestart",
    "make_store_machine",
    "store",
]

_T = TypeVar("_T")


class Backend(Protocol):
    """How the suite makes stores of one backend."""

    #: Shown in test ids.
    name: str
    #: Whether the data survives ``reopen`` (restart tests run only then).
    persistent: bool

    def make(self, **limits: int) -> MessageStore:
        """A fresh, empty store with these shared limits (``max_inbox=3``, ...)."""
        ...

    def reopen(self, store: MessageStore) -> MessageStore:
        """Close ``store`` and open the same data again, with the same limits."""
        ...


@pytest.fixture
def store(backend: Backend) -> Iterator[MessageStore]:
    """A fresh store with default limits, closed after the test."""
    s = backend.make()
    yield s
    s.close()


def _group(s: MessageStore, conv: str = "g", members: tuple[str, ...] = ("alice", "bob")) -> str:
    for uid in members:
        s.create_user(uid)
    s.create_group(conv, members)
    return conv


def _fill(s: MessageStore, conv: str, n: int, sender: str = "alice") -> list[StoredMessage]:
    return [s.append(conv, sender, i, f"m{i}".encode(), wall_ms=1000 + i) for i in range(n)]


# --- append -----------------------------------------------------------------------


class TestAppend:
    def test_store_satisfies_the_protocol(self, store: MessageStore) -> None:
        """The backend is a MessageStore (runtime check of the protocol's members)."""
        assert isinstance(store, MessageStore)

    def test_seqs_start_at_one_and_increase(self, store: MessageStore) -> None:
        """The first message of a conversation gets seq 1, then each one more."""
        conv = _group(store)
        assert [m.seq for m in _fill(store, conv, 5)] == [1, 2, 3, 4, 5]
        assert store.last_seq(conv) == 5

    def test_returns_what_was_stored(self, store: MessageStore) -> None:
        """append returns every field, and read returns the same message."""
        conv = _group(store)
        msg = store.append(conv, "bob", 42, b"\x00hi", wall_ms=1234, msg_id=99)
        assert msg == StoredMessage(
            conv=conv, seq=1, sender="bob", cid=42, body=b"\x00hi", msg_id=99, server_ms=1234
        )
        assert store.read(conv, 0, 10).messages == (msg,)

    def test_resend_returns_the_original_and_stores_nothing(self, store: MessageStore) -> None:
        """Appending the same (sender, cid) again returns the first message, seq unchanged."""
        conv = _group(store)
        first = store.append(conv, "alice", 7, b"one", wall_ms=10)
        store.append(conv, "bob", 1, b"other", wall_ms=11)
        again = store.append(conv, "alice", 7, b"changed", wall_ms=20, msg_id=5)
        assert again == first
        assert store.last_seq(conv) == 2
        assert [m.body for m in store.read(conv, 0, 10).messages] == [b"one", b"other"]

    def test_same_cid_from_another_sender_is_a_new_message(self, store: MessageStore) -> None:
        """The idempotency key is (sender, cid): another sender's cid 1 is stored too."""
        conv = _group(store)
        a = store.append(conv, "alice", 1, b"a", wall_ms=1)
        b = store.append(conv, "bob", 1, b"b", wall_ms=2)
        assert (a.seq, b.seq) == (1, 2)

    def test_idempotency_is_scoped_to_the_conversation(self, store: MessageStore) -> None:
        """The same (sender, cid) in another conversation is stored there, not deduplicated."""
        g = _group(store, "g")
        h = _group(store, "h")
        a = store.append(g, "alice", 1, b"x", wall_ms=1)
        b = store.append(h, "alice", 1, b"x", wall_ms=1)
        assert (a.conv, b.conv, b.seq) == (g, h, 1)

    def test_seqs_are_per_conversation(self, store: MessageStore) -> None:
        """Each conversation counts its own seqs from 1."""
        g = _group(store, "g")
        h = _group(store, "h")
        _fill(store, g, 3)
        assert store.append(h, "alice", 100, b"x", wall_ms=1).seq == 1
        assert store.last_seq(g) == 3

    def test_unknown_conversation_is_not_found(self, store: MessageStore) -> None:
        """append to a conversation never created raises ConversationNotFound (a KeyError)."""
        with pytest.raises(ConversationNotFound) as info:
            store.append("nowhere", "alice", 1, b"x", wall_ms=1)
        assert isinstance(info.value, KeyError)
        assert info.value.conv == "nowhere"

    def test_body_over_the_limit_is_refused(self, backend: Backend) -> None:
        """A body over max_body_size raises CapacityError and stores nothing; at it, fits."""
        s = backend.make(max_body_size=4)
        conv = _group(s)
        with pytest.raises(CapacityError) as info:
            s.append(conv, "alice", 1, b"12345", wall_ms=1)
        assert info.value.limit == "max_body_size"
        assert s.last_seq(conv) == 0
        assert s.append(conv, "alice", 1, b"1234", wall_ms=1).seq == 1
        s.close()

    @pytest.mark.parametrize(
        ("args", "kwargs"),
        [
            (("g", "alice", 1, "text"), {"wall_ms": 1}),
            (("g", "alice", -1, b"x"), {"wall_ms": 1}),
            (("g", "alice", True, b"x"), {"wall_ms": 1}),
            (("g", "alice", 2**63, b"x"), {"wall_ms": 1}),
            (("g", "", 1, b"x"), {"wall_ms": 1}),
            (("g", "a" * 129, 1, b"x"), {"wall_ms": 1}),
            (("", "alice", 1, b"x"), {"wall_ms": 1}),
            (("g", "alice", 1, b"x"), {"wall_ms": -1}),
            (("g", "alice", 1, b"x"), {"wall_ms": 1.5}),
            (("g", "alice", 1, b"x"), {"wall_ms": 1, "msg_id": -3}),
        ],
    )
    def test_bad_arguments_raise_config_error(
        self, store: MessageStore, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Wrong types and out-of-range values raise ConfigError (a ValueError), storing nothing."""
        conv = _group(store)
        with pytest.raises(ConfigError) as info:
            store.append(*args, **kwargs)
        assert isinstance(info.value, ValueError)
        assert store.last_seq(conv) == 0

    def test_append_many_matches_appending_one_by_one(self, backend: Backend) -> None:
        """append_many returns what sequential appends return, resends inside the batch included."""
        items = [
            NewMessage("g", "alice", 1, b"a", 11),
            NewMessage("h", "bob", 1, b"b"),
            NewMessage("g", "alice", 1, b"again"),
            NewMessage("g", "bob", 2, b"c"),
        ]
        one, many = backend.make(), backend.make()
        for s in (one, many):
            _group(s, "g")
            _group(s, "h")
            s.append("g", "bob", 2, b"before", wall_ms=1)
        want = [one.append(*item[:4], wall_ms=5, msg_id=item.msg_id) for item in items]
        got = many.append_many(items, wall_ms=5)
        assert got == want
        assert [m.seq for m in got] == [2, 1, 2, 1]
        for conv in ("g", "h"):
            assert many.read(conv, 0, 10) == one.read(conv, 0, 10)
        assert many.append_many([], wall_ms=5) == []
        one.close()
        many.close()

    def test_append_many_is_all_or_nothing(self, backend: Backend) -> None:
        """One bad item (unknown conversation, oversized body) leaves the store unchanged."""
        s = backend.make(max_body_size=4)
        conv = _group(s)
        ok = NewMessage(conv, "alice", 1, b"ok")
        for bad in (NewMessage("nowhere", "alice", 2, b"x"), NewMessage(conv, "bob", 3, b"12345")):
            with pytest.raises((ConversationNotFound, CapacityError)):
                s.append_many([ok, bad], wall_ms=1)
            assert s.last_seq(conv) == 0
        with pytest.raises(ConfigError):
            s.append_many([(conv, "alice", 1, b"x", 0)], wall_ms=1)  # type: ignore[list-item]
        s.close()


# --- read ---------------------------------------------------------------------------


class TestRead:
    def test_pages_walk_the_whole_timeline(self, store: MessageStore) -> None:
        """Reading after the last seq of each page, limit 3, yields all 10 messages once."""
        conv = _group(store)
        stored = _fill(store, conv, 10)
        got: list[StoredMessage] = []
        after, mores = 0, []
        while True:
            page = store.read(conv, after, 3)
            got.extend(page.messages)
            mores.append(page.more)
            if not page.more:
                break
            after = page.last_seq
        assert got == stored
        assert mores == [True, True, True, False]

    def test_read_from_the_middle(self, store: MessageStore) -> None:
        """read(after_seq=k) starts at seq k + 1."""
        conv = _group(store)
        _fill(store, conv, 6)
        page = store.read(conv, 4, 10)
        assert [m.seq for m in page.messages] == [5, 6]
        assert page.more is False

    def test_read_at_or_after_the_end_is_empty(self, store: MessageStore) -> None:
        """After the last seq (or far beyond) the page is empty and says no more."""
        conv = _group(store)
        _fill(store, conv, 2)
        for after in (2, 3, 2**62):
            assert store.read(conv, after, 5) == Page(messages=(), more=False)
        assert Page(messages=(), more=False).last_seq == 0

    def test_limit_is_clamped_to_max_read_limit(self, backend: Backend) -> None:
        """A limit above max_read_limit returns max_read_limit messages and more=True."""
        s = backend.make(max_read_limit=4)
        conv = _group(s)
        _fill(s, conv, 6)
        page = s.read(conv, 0, 1000)
        assert [m.seq for m in page.messages] == [1, 2, 3, 4]
        assert page.more is True
        s.close()

    @pytest.mark.parametrize(("after", "limit"), [(0, 0), (0, -1), (-1, 5), (0, True), (0, 2.0)])
    def test_bad_range_raises_config_error(
        self, store: MessageStore, after: Any, limit: Any
    ) -> None:
        """A limit below 1, a negative after_seq, or non-int values raise ConfigError."""
        conv = _group(store)
        with pytest.raises(ConfigError):
            store.read(conv, after, limit)

    def test_unknown_conversation_is_not_found(self, store: MessageStore) -> None:
        """read and last_seq of an unknown conversation raise ConversationNotFound."""
        with pytest.raises(ConversationNotFound):
            store.read("nowhere", 0, 5)
        with pytest.raises(ConversationNotFound):
            store.last_seq("nowhere")

    def test_empty_conversation(self, store: MessageStore) -> None:
        """A conversation without messages has last_seq 0 and an empty timeline."""
        conv = _group(store)
        assert store.last_seq(conv) == 0
        assert store.read(conv, 0, 5) == Page(messages=(), more=False)


# --- inbox --------------------------------------------------------------------------


def _entries(page: InboxPage) -> list[tuple[int, str, int]]:
    return [(e.cursor, e.conv, e.seq) for e in page.entries]


class TestInbox:
    def test_entries_arrive_in_order_with_dense_cursors(self, store: MessageStore) -> None:
        """Each added (conv, seq) gets the user's next cursor, starting at 1."""
        g = _group(store, "g")
        h = _group(store, "h")
        _fill(store, g, 2)
        _fill(store, h, 1)
        store.inbox_add(["alice", "bob"], g, 1)
        store.inbox_add(["alice"], h, 1)
        store.inbox_add(["bob", "alice"], g, 2)
        page = store.inbox_read("alice", 0, 10)
        assert _entries(page) == [(1, g, 1), (2, h, 1), (3, g, 2)]
        assert (page.cursor, page.more, page.trimmed) == (3, False, False)
        assert _entries(store.inbox_read("bob", 0, 10)) == [(1, g, 1), (2, g, 2)]
        assert page.entries[0] == InboxEntry(cursor=1, conv=g, seq=1)

    def test_a_uid_listed_twice_gets_one_entry(self, store: MessageStore) -> None:
        """inbox_add adds once per distinct uid."""
        conv = _group(store)
        _fill(store, conv, 1)
        store.inbox_add(["alice", "alice", "bob", "alice"], conv, 1)
        assert _entries(store.inbox_read("alice", 0, 10)) == [(1, conv, 1)]

    def test_paging_with_the_returned_cursor(self, store: MessageStore) -> None:
        """Passing back page.cursor reads every entry once; more is False at the end."""
        conv = _group(store)
        _fill(store, conv, 5)
        for seq in range(1, 6):
            store.inbox_add(["alice"], conv, seq)
        seen: list[int] = []
        cursor = 0
        while True:
            page = store.inbox_read("alice", cursor, 2)
            seen.extend(e.seq for e in page.entries)
            cursor = page.cursor
            if not page.more:
                break
        assert seen == [1, 2, 3, 4, 5]
        empty = store.inbox_read("alice", cursor, 2)
        assert empty == InboxPage(entries=(), cursor=5, more=False, trimmed=False)

    def test_oldest_entries_are_trimmed(self, backend: Backend) -> None:
        """Past max_inbox the oldest entries go; a reader from before them sees trimmed=True."""
        s = backend.make(max_inbox=3)
        conv = _group(s)
        _fill(s, conv, 5)
        for seq in range(1, 6):
            s.inbox_add(["alice"], conv, seq)
        page = s.inbox_read("alice", 0, 10)
        assert _entries(page) == [(3, conv, 3), (4, conv, 4), (5, conv, 5)]
        assert (page.cursor, page.trimmed) == (5, True)
        assert s.inbox_read("alice", 2, 10).trimmed is False
        assert s.inbox_read("alice", 1, 10).trimmed is True
        s.close()

    def test_trimmed_messages_stay_reachable_by_conversation(self, backend: Backend) -> None:
        """Why trimming is safe: conversations_of + read still reach every message."""
        s = backend.make(max_inbox=2)
        g = _group(s, "g")
        h = _group(s, "h")
        stored = _fill(s, g, 3) + _fill(s, h, 3, sender="bob")
        for m in stored:
            s.inbox_add(s.members(m.conv), m.conv, m.seq)
        assert s.inbox_read("alice", 0, 10).trimmed
        convs = sorted(s.conversations_of("alice"))
        reached = [m for conv in convs for m in s.read(conv, 0, 10).messages]
        assert sorted(reached, key=lambda m: (m.conv, m.seq)) == stored
        s.close()

    def test_a_cursor_ahead_of_the_inbox_is_reported(self, store: MessageStore) -> None:
        """A cursor beyond the last entry (e.g. from before a store reset) gets trimmed=True
        and the inbox's real cursor back."""
        conv = _group(store)
        _fill(store, conv, 1)
        store.inbox_add(["alice"], conv, 1)
        assert store.inbox_read("alice", 50, 10) == InboxPage(
            entries=(), cursor=1, more=False, trimmed=True
        )
        assert store.inbox_read("bob", 0, 10) == InboxPage(
            entries=(), cursor=0, more=False, trimmed=False
        )

    def test_inbox_trim_drops_through_the_cursor(self, store: MessageStore) -> None:
        """inbox_trim(c) drops entries <= c; later cursors stay; trimming past the end empties."""
        conv = _group(store)
        _fill(store, conv, 4)
        for seq in range(1, 5):
            store.inbox_add(["alice"], conv, seq)
        store.inbox_trim("alice", 2)
        store.inbox_trim("alice", 1)  # behind the trim point: no change
        assert _entries(store.inbox_read("alice", 2, 10)) == [(3, conv, 3), (4, conv, 4)]
        page = store.inbox_read("alice", 0, 10)
        assert (_entries(page), page.trimmed) == ([(3, conv, 3), (4, conv, 4)], True)
        store.inbox_trim("alice", 99)
        assert store.inbox_read("alice", 4, 10) == InboxPage(
            entries=(), cursor=4, more=False, trimmed=False
        )
        store.inbox_add(["alice"], conv, 1)
        assert _entries(store.inbox_read("alice", 4, 10)) == [(5, conv, 1)]

    def test_an_unknown_user_changes_no_inbox(self, store: MessageStore) -> None:
        """inbox_add with an unregistered uid raises UserNotFound (a KeyError) and adds nothing."""
        conv = _group(store)
        _fill(store, conv, 1)
        with pytest.raises(UserNotFound) as info:
            store.inbox_add(["alice", "ghost"], conv, 1)
        assert isinstance(info.value, KeyError)
        assert info.value.uid == "ghost"
        assert store.inbox_read("alice", 0, 10).entries == ()
        with pytest.raises(UserNotFound):
            store.inbox_read("ghost", 0, 10)

    def test_seq_must_be_a_stored_seq(self, store: MessageStore) -> None:
        """inbox_add of seq 0 or beyond the last seq raises ConfigError."""
        conv = _group(store)
        _fill(store, conv, 2)
        for seq in (0, 3):
            with pytest.raises(ConfigError):
                store.inbox_add(["alice"], conv, seq)
        with pytest.raises(ConversationNotFound):
            store.inbox_add(["alice"], "nowhere", 1)

    def test_a_bare_string_of_uids_is_refused(self, store: MessageStore) -> None:
        """inbox_add("alice", ...) would add to users "a", "l", ...: ConfigError instead."""
        conv = _group(store)
        _fill(store, conv, 1)
        with pytest.raises(ConfigError):
            store.inbox_add("alice", conv, 1)


# --- read cursors -------------------------------------------------------------------


class TestReadCursors:
    def test_cursor_starts_at_zero(self, store: MessageStore) -> None:
        """A member who read nothing has cursor 0; so has a non-member."""
        conv = _group(store)
        assert store.get_read("alice", conv) == 0
        assert store.get_read("nobody", conv) == 0

    def test_cursor_never_moves_backwards(self, store: MessageStore) -> None:
        """set_read keeps the highest seq ever set and returns it."""
        conv = _group(store)
        _fill(store, conv, 5)
        assert store.set_read("alice", conv, 3) == 3
        assert store.set_read("alice", conv, 2) == 3
        assert store.get_read("alice", conv) == 3
        assert store.set_read("alice", conv, 5) == 5
        assert store.get_read("bob", conv) == 0

    def test_a_seq_beyond_the_last_is_refused(self, store: MessageStore) -> None:
        """Claiming to have read a seq that does not exist raises ConfigError; nothing moves."""
        conv = _group(store)
        _fill(store, conv, 2)
        with pytest.raises(ConfigError):
            store.set_read("alice", conv, 3)
        assert store.get_read("alice", conv) == 0

    def test_a_non_member_has_no_cursor(self, store: MessageStore) -> None:
        """set_read of a user outside the conversation raises NotMember."""
        conv = _group(store)
        store.create_user("carol")
        _fill(store, conv, 1)
        with pytest.raises(NotMember) as info:
            store.set_read("carol", conv, 1)
        assert (info.value.uid, info.value.conv) == ("carol", conv)
        with pytest.raises(ConversationNotFound):
            store.set_read("alice", "nowhere", 0)
        with pytest.raises(ConversationNotFound):
            store.get_read("alice", "nowhere")

    def test_read_cursors_say_who_read_what(self, store: MessageStore) -> None:
        """read_cursors lists members with a cursor above 0: the receipt view."""
        conv = _group(store, members=("alice", "bob", "carol"))
        _fill(store, conv, 4)
        store.set_read("alice", conv, 4)
        store.set_read("bob", conv, 2)
        cursors = store.read_cursors(conv)
        assert cursors == {"alice": 4, "bob": 2}
        assert {uid for uid, r in cursors.items() if r >= 3} == {"alice"}

    def test_leaving_forgets_the_cursor(self, store: MessageStore) -> None:
        """A member who leaves loses the cursor; rejoining starts from 0."""
        conv = _group(store)
        _fill(store, conv, 3)
        store.set_read("bob", conv, 3)
        store.leave("bob", conv)
        assert store.get_read("bob", conv) == 0
        assert store.read_cursors(conv) == {}
        store.join("bob", conv)
        assert store.get_read("bob", conv) == 0


    def test_a_cursor_that_stays_returns_the_cursor(self, store: MessageStore) -> None:
        """Repeating or lowering set_read changes nothing and returns the current cursor."""
        conv = _group(store)
        _fill(store, conv, 3)
        assert store.set_read("alice", conv, 2) == 2
        assert store.set_read("alice", conv, 2) == 2
        assert store.set_read("alice", conv, 0) == 2
        assert store.read_cursors(conv) == {"alice": 2}


# --- device cursors -------------------------------------------------------------------


class TestDeviceCursors:
    def test_an_unknown_device_has_no_cursors(self, store: MessageStore) -> None:
        """device_cursors of a device never written is empty; of an unknown user, UserNotFound."""
        _group(store)
        assert store.device_cursors("alice", "phone") == {}
        with pytest.raises(UserNotFound):
            store.device_cursors("nobody", "phone")
        with pytest.raises(UserNotFound):
            store.set_device_cursors("nobody", "phone", {"g": 1})

    def test_cursors_only_move_forward_and_are_clamped(self, store: MessageStore) -> None:
        """Each cursor keeps its highest value, at most the conversation's last seq."""
        conv = _group(store)
        _fill(store, conv, 5)
        store.set_device_cursors("alice", "phone", {conv: 3})
        store.set_device_cursors("alice", "phone", {conv: 2})
        assert store.device_cursors("alice", "phone") == {conv: 3}
        store.set_device_cursors("alice", "phone", {conv: 99})
        assert store.device_cursors("alice", "phone") == {conv: 5}
        assert store.device_cursors("alice", "laptop") == {}  # per device
        assert store.device_cursors("bob", "phone") == {}  # per user

    def test_conversations_of_others_are_ignored(self, store: MessageStore) -> None:
        """A cursor for a conversation the user is not in (or that does not exist) is dropped."""
        conv = _group(store)
        store.create_user("carol")
        store.create_group("other", ["carol"])
        _fill(store, conv, 2)
        store.append("other", "carol", 1, b"x", wall_ms=1)
        store.set_device_cursors("alice", "phone", {conv: 1, "other": 1, "nowhere": 4})
        assert store.device_cursors("alice", "phone") == {conv: 1}
        store.set_device_cursors("alice", "phone", {conv: 0})  # 0 is no cursor
        assert store.device_cursors("alice", "phone") == {conv: 1}

    def test_leaving_forgets_the_device_cursors(self, store: MessageStore) -> None:
        """After leave, no device of the user keeps a cursor in that conversation."""
        conv = _group(store)
        _fill(store, conv, 2)
        store.set_device_cursors("bob", "phone", {conv: 2})
        store.set_device_cursors("bob", "laptop", {conv: 1})
        store.leave("bob", conv)
        assert store.device_cursors("bob", "phone") == {}
        assert store.device_cursors("bob", "laptop") == {}
        store._check()

    def test_the_least_recently_written_device_is_forgotten(self, backend: Backend) -> None:
        """Past max_devices_per_user, writing a new device drops the stalest one."""
        s = backend.make(max_devices_per_user=2)
        conv = _group(s)
        _fill(s, conv, 3)
        s.set_device_cursors("alice", "a", {conv: 1})
        s.set_device_cursors("alice", "b", {conv: 1})
        s.set_device_cursors("alice", "a", {conv: 2})  # "a" is now the fresher one
        s.set_device_cursors("alice", "c", {conv: 3})  # evicts "b"
        assert s.device_cursors("alice", "a") == {conv: 2}
        assert s.device_cursors("alice", "b") == {}
        assert s.device_cursors("alice", "c") == {conv: 3}
        assert s.device_cursors("bob", "x") == {}
        s._check()
        s.close()

    @pytest.mark.parametrize(
        "cursors", [{"": 1}, {"g": -1}, {"g": 2**63}, {"g": True}, {"g": "1"}, [("g", 1)]]
    )
    def test_bad_cursors_raise_config_error(self, store: MessageStore, cursors: Any) -> None:
        """A malformed conv or seq (or not a mapping) is refused and nothing is written."""
        _group(store)
        with pytest.raises(ConfigError):
            store.set_device_cursors("alice", "phone", cursors)
        with pytest.raises(ConfigError):
            store.device_cursors("alice", "")
        assert store.device_cursors("alice", "phone") == {}

    def test_more_cursors_than_conversations_allowed_is_refused(self, backend: Backend) -> None:
        """A mapping longer than max_conversations_per_user raises CapacityError."""
        s = backend.make(max_conversations_per_user=2)
        _group(s)
        with pytest.raises(CapacityError):
            s.set_device_cursors("alice", "phone", {"a": 1, "b": 1, "c": 1})
        s.close()


# --- registry -----------------------------------------------------------------------


class TestRegistry:
    def test_create_user_is_idempotent(self, store: MessageStore) -> None:
        """create_user returns True once, then False; has_user sees it."""
        assert store.has_user("alice") is False
        assert store.create_user("alice") is True
        assert store.create_user("alice") is False
        assert store.has_user("alice") is True

    def test_create_group_with_members(self, store: MessageStore) -> None:
        """A new group has its members; creating it again returns False and changes nothing."""
        for uid in ("alice", "bob", "carol"):
            store.create_user(uid)
        assert store.create_group("g", ["alice", "bob", "alice"]) is True
        assert store.members("g") == {"alice", "bob"}
        assert store.create_group("g", ["carol"]) is False
        assert store.members("g") == {"alice", "bob"}
        assert store.conversation("g") == ConversationInfo(
            conv="g", kind=ConvKind.GROUP, member_count=2, last_seq=0
        )
        assert store.create_group("empty") is True
        assert store.members("empty") == frozenset()

    def test_join_and_leave(self, store: MessageStore) -> None:
        """join/leave return whether membership changed; queries follow."""
        conv = _group(store)
        store.create_user("carol")
        assert store.join("carol", conv) is True
        assert store.join("carol", conv) is False
        assert store.is_member("carol", conv) is True
        assert store.conversations_of("carol") == {conv}
        assert store.leave("carol", conv) is True
        assert store.leave("carol", conv) is False
        assert store.is_member("carol", conv) is False
        assert store.conversations_of("carol") == frozenset()
        assert store.members(conv) == {"alice", "bob"}

    def test_unknown_users_and_conversations(self, store: MessageStore) -> None:
        """Unknown users raise UserNotFound, unknown conversations ConversationNotFound;
        is_member just says False."""
        conv = _group(store)
        with pytest.raises(UserNotFound):
            store.join("ghost", conv)
        with pytest.raises(UserNotFound):
            store.create_group("g2", ["alice", "ghost"])
        assert store.is_member("alice", "g2") is False
        with pytest.raises(ConversationNotFound):
            store.conversation("g2")
        with pytest.raises(ConversationNotFound):
            store.join("alice", "nowhere")
        with pytest.raises(ConversationNotFound):
            store.members("nowhere")
        with pytest.raises(UserNotFound):
            store.conversations_of("ghost")
        assert store.is_member("alice", "nowhere") is False

    def test_direct_conv_id_is_canonical(self) -> None:
        """The 1:1 id ignores argument order and cannot collide through ':' in uids."""
        assert direct_conv_id("bob", "alice") == direct_conv_id("alice", "bob")
        assert direct_conv_id("a:b", "c") != direct_conv_id("a", "b:c")
        with pytest.raises(ConfigError):
            direct_conv_id("", "bob")

    def test_direct_conversations(self, store: MessageStore) -> None:
        """create_direct is idempotent, holds both users, and its members are fixed."""
        store.create_user("alice")
        store.create_user("bob")
        conv = store.create_direct("bob", "alice")
        assert conv == direct_conv_id("alice", "bob")
        assert store.create_direct("alice", "bob") == conv
        assert store.members(conv) == {"alice", "bob"}
        assert store.conversation(conv).kind is ConvKind.DIRECT
        for change in (store.join, store.leave):
            with pytest.raises(ConfigError):
                change("alice", conv)
        assert store.members(store.create_direct("alice", "alice")) == {"alice"}
        with pytest.raises(UserNotFound):
            store.create_direct("alice", "ghost")

    def test_the_direct_prefix_is_reserved(self, store: MessageStore) -> None:
        """A group may not take an id starting with "dm:"."""
        with pytest.raises(ConfigError):
            store.create_group("dm:1:a:b")

    def test_max_members(self, backend: Backend) -> None:
        """A group refuses members past max_members, at creation and on join."""
        s = backend.make(max_members=2)
        for uid in ("a", "b", "c"):
            s.create_user(uid)
        with pytest.raises(CapacityError) as info:
            s.create_group("g", ["a", "b", "c"])
        assert info.value.limit == "max_members"
        assert s.is_member("a", "g") is False
        s.create_group("g", ["a", "b"])
        with pytest.raises(CapacityError):
            s.join("c", "g")
        assert s.members("g") == {"a", "b"}
        s.close()

    def test_max_conversations_per_user(self, backend: Backend) -> None:
        """A user refuses conversations past max_conversations_per_user, whichever way."""
        s = backend.make(max_conversations_per_user=2)
        for uid in ("a", "b"):
            s.create_user(uid)
        s.create_group("g1", ["a"])
        s.create_direct("a", "b")
        s.create_group("g3")
        with pytest.raises(CapacityError) as info:
            s.join("a", "g3")
        assert info.value.limit == "max_conversations_per_user"
        with pytest.raises(CapacityError):
            s.create_group("g4", ["b", "a"])
        with pytest.raises(CapacityError):
            s.create_direct("a", "a")
        assert s.conversations_of("a") == {"g1", direct_conv_id("a", "b")}
        assert s.is_member("b", "g4") is False
        s.close()

    @pytest.mark.parametrize("bad", ["", "x" * 129, 5, None, b"alice"])
    def test_bad_ids_raise_config_error(self, store: MessageStore, bad: Any) -> None:
        """Empty, overlong or non-str uids are refused with ConfigError."""
        with pytest.raises(ConfigError):
            store.create_user(bad)
        with pytest.raises(ConfigError):
            store.has_user(bad)


# --- lifecycle ----------------------------------------------------------------------


class TestLifecycle:
    def test_calls_after_close_raise_store_error(self, backend: Backend) -> None:
        """Every operation on a closed store raises StoreError."""
        s = backend.make()
        conv = _group(s)
        s.close()
        calls: list[Callable[[], object]] = [
            lambda: s.append(conv, "alice", 1, b"x", wall_ms=1),
            lambda: s.append_many([NewMessage(conv, "alice", 1, b"x")], wall_ms=1),
            lambda: s.read(conv, 0, 1),
            lambda: s.last_seq(conv),
            lambda: s.inbox_read("alice", 0, 1),
            lambda: s.set_read("alice", conv, 0),
            lambda: s.create_user("carol"),
            lambda: s.members(conv),
            lambda: s.is_member("alice", conv),
        ]
        for call in calls:
            with pytest.raises(StoreError):
                call()

    def test_close_is_idempotent(self, backend: Backend) -> None:
        """Closing twice is fine."""
        s = backend.make()
        s.close()
        s.close()


# --- restart (persistent backends) ----------------------------------------------------


class TestRestart:
    @pytest.fixture
    def persistent(self, backend: Backend) -> Backend:
        if not backend.persistent:
            pytest.skip(f"{backend.name} does not persist")
        return backend

    def test_everything_survives_a_restart(self, persistent: Backend) -> None:
        """Messages, registry, inboxes and read cursors read back the same after reopen."""
        s = persistent.make(max_inbox=5)
        conv = _group(s)
        dm = s.create_direct("alice", "bob")
        stored = _fill(s, conv, 4)
        s.append(dm, "bob", 1, b"psst", wall_ms=3)
        for m in stored:
            s.inbox_add(["alice", "bob"], conv, m.seq)
        s.set_read("bob", conv, 3)
        before = (
            s.read(conv, 0, 100),
            s.read(dm, 0, 100),
            s.inbox_read("alice", 0, 100),
            s.read_cursors(conv),
            s.conversations_of("alice"),
            s.conversation(conv),
        )
        s = persistent.reopen(s)
        after = (
            s.read(conv, 0, 100),
            s.read(dm, 0, 100),
            s.inbox_read("alice", 0, 100),
            s.read_cursors(conv),
            s.conversations_of("alice"),
            s.conversation(conv),
        )
        assert after == before
        s._check()
        s.close()

    def test_seqs_are_never_reused_after_a_restart(self, persistent: Backend) -> None:
        """The first seq after reopen is above every seq handed out before."""
        s = persistent.make()
        conv = _group(s)
        top = max(m.seq for m in _fill(s, conv, 3))
        s = persistent.reopen(s)
        assert s.append(conv, "bob", 999, b"new", wall_ms=5).seq > top
        s.close()

    def test_a_resend_after_a_restart_is_still_deduplicated(self, persistent: Backend) -> None:
        """The (sender, cid) memory survives: a resend returns the original message."""
        s = persistent.make()
        conv = _group(s)
        first = s.append(conv, "alice", 77, b"once", wall_ms=1)
        s = persistent.reopen(s)
        assert s.append(conv, "alice", 77, b"once", wall_ms=2) == first
        assert s.last_seq(conv) == 1
        s.close()

    def test_device_cursors_survive_a_restart(self, persistent: Backend) -> None:
        """A device's cursors and the devices' write order read back the same after reopen."""
        s = persistent.make(max_devices_per_user=2)
        conv = _group(s)
        _fill(s, conv, 4)
        s.set_device_cursors("alice", "old", {conv: 1})
        s.set_device_cursors("alice", "phone", {conv: 4})
        s = persistent.reopen(s)
        assert s.durable
        assert s.device_cursors("alice", "phone") == {conv: 4}
        s.set_device_cursors("alice", "new", {conv: 2})  # "old" is still the stalest
        assert s.device_cursors("alice", "old") == {}
        assert s.device_cursors("alice", "phone") == {conv: 4}
        s._check()
        s.close()

    def test_inbox_cursors_continue_after_a_restart(self, persistent: Backend) -> None:
        """New inbox entries after reopen get cursors above the old ones."""
        s = persistent.make()
        conv = _group(s)
        _fill(s, conv, 2)
        s.inbox_add(["alice"], conv, 1)
        s = persistent.reopen(s)
        s.inbox_add(["alice"], conv, 2)
        assert _entries(s.inbox_read("alice", 1, 10)) == [(2, conv, 2)]
        s.close()


# --- the oracle and the stateful test ------------------------------------------------

#: Where the stateful test keeps its databases: RAM-backed when the machine has one
#: (thousands of tiny databases; the logic is under test here, not the disk).
MACHINE_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

#: Limits of the stateful test: small, so that every limit is hit constantly.
MACHINE_LIMITS = {
    "max_members": 2,
    "max_conversations_per_user": 2,
    "max_inbox": 2,
    "max_read_limit": 4,
    "max_body_size": 6,
}

USERS = ("a", "b", "c", "d")
GROUPS = ("g", "h", "dm:x")  # "dm:x" is refused: the 1:1 prefix is reserved
DIRECTS = (direct_conv_id("a", "b"), direct_conv_id("b", "c"), direct_conv_id("a", "a"))
#: Weighted towards conversations the setup creates, so that most operations succeed.
CONVS = ("g", "g", "g", "h", DIRECTS[0], DIRECTS[0], DIRECTS[1], DIRECTS[2], "nowhere")


class _ModelConv:
    def __init__(self, kind: ConvKind, members: list[str]) -> None:
        self.kind = kind
        self.members = dict.fromkeys(members, 0)
        self.messages: list[StoredMessage] = []


class Model:
    """The simplest store that could work: lists and dicts, checked in the suite's order."""

    def __init__(self, limits: dict[str, int], dedup_window: int | None) -> None:
        self.limits = limits
        self.window = dedup_window
        self.users: set[str] = set()
        self.convs: dict[str, _ModelConv] = {}
        self.inbox: dict[str, list[InboxEntry]] = {}  # every entry ever, cursor order
        self.inbox_first: dict[str, int] = {}  # trim point set by inbox_trim

    def _conv(self, conv: str) -> _ModelConv:
        if conv not in self.convs:
            raise ConversationNotFound(conv)
        return self.convs[conv]

    def _user(self, uid: str) -> None:
        if uid not in self.users:
            raise UserNotFound(uid)

    def _find(self, c: _ModelConv, sender: str, cid: int) -> StoredMessage | None:
        recent = c.messages if self.window is None else c.messages[-self.window :]
        for m in reversed(recent):
            if (m.sender, m.cid) == (sender, cid):
                return m
        return None

    def append(self, conv: str, sender: str, cid: int, body: bytes, wall_ms: int) -> StoredMessage:
        if len(body) > self.limits["max_body_size"]:
            raise CapacityError("max_body_size", self.limits["max_body_size"])
        c = self._conv(conv)
        found = self._find(c, sender, cid)
        if found is not None:
            return found
        m = StoredMessage(
            conv=conv, seq=len(c.messages) + 1, sender=sender, cid=cid, body=body,
            msg_id=wall_ms * 10, server_ms=wall_ms,
        )
        c.messages.append(m)
        return m

    def append_many(self, items: list[NewMessage], wall_ms: int) -> list[StoredMessage]:
        for item in items:
            if len(item.body) > self.limits["max_body_size"]:
                raise CapacityError("max_body_size", self.limits["max_body_size"])
        for item in items:
            self._conv(item.conv)
        return [self.append(i.conv, i.sender, i.cid, i.body, wall_ms) for i in items]

    def read(self, conv: str, after: int, limit: int) -> Page:
        msgs = self._conv(conv).messages
        n = min(limit, self.limits["max_read_limit"])
        return Page(messages=tuple(msgs[after : after + n]), more=after + n < len(msgs))

    def last_seq(self, conv: str) -> int:
        return len(self._conv(conv).messages)

    def inbox_add(self, uids: list[str], conv: str, seq: int) -> None:
        c = self._conv(conv)
        if not 1 <= seq <= len(c.messages):
            raise ConfigError("seq")
        targets = list(dict.fromkeys(uids))
        for uid in targets:
            self._user(uid)
        for uid in targets:
            box = self.inbox.setdefault(uid, [])
            box.append(InboxEntry(cursor=len(box) + 1, conv=conv, seq=seq))

    def inbox_read(self, uid: str, after: int, limit: int) -> InboxPage:
        self._user(uid)
        box = self.inbox.get(uid, [])
        last = len(box)
        if after > last:
            return InboxPage(entries=(), cursor=last, more=False, trimmed=True)
        first = max(self.inbox_first.get(uid, 1), last - self.limits["max_inbox"] + 1)
        start = max(after + 1, first)
        n = min(limit, self.limits["max_read_limit"])
        entries = tuple(box[start - 1 : start - 1 + n])
        cursor = start - 1 + len(entries)
        return InboxPage(
            entries=entries, cursor=cursor, more=cursor < last, trimmed=start > after + 1
        )

    def inbox_trim(self, uid: str, through: int) -> None:
        self._user(uid)
        last = len(self.inbox.get(uid, []))
        self.inbox_first[uid] = max(self.inbox_first.get(uid, 1), min(through, last) + 1)

    def set_read(self, uid: str, conv: str, seq: int) -> int:
        c = self._conv(conv)
        if seq > len(c.messages):
            raise ConfigError("seq")
        if uid not in c.members:
            raise NotMember(uid, conv)
        c.members[uid] = max(c.members[uid], seq)
        return c.members[uid]

    def get_read(self, uid: str, conv: str) -> int:
        return self._conv(conv).members.get(uid, 0)

    def read_cursors(self, conv: str) -> dict[str, int]:
        return {u: r for u, r in self._conv(conv).members.items() if r > 0}

    def create_user(self, uid: str) -> bool:
        new = uid not in self.users
        self.users.add(uid)
        return new

    def _n_convs(self, uid: str) -> int:
        return sum(uid in c.members for c in self.convs.values())

    def _create(self, conv: str, kind: ConvKind, uids: list[str]) -> None:
        for uid in uids:
            self._user(uid)
        for uid in uids:
            if self._n_convs(uid) >= self.limits["max_conversations_per_user"]:
                raise CapacityError("max_conversations_per_user", 0)
        self.convs[conv] = _ModelConv(kind, uids)

    def create_group(self, conv: str, members: list[str]) -> bool:
        if conv.startswith("dm:"):
            raise ConfigError("reserved")
        uids = list(dict.fromkeys(members))
        if conv in self.convs:
            return False
        if len(uids) > self.limits["max_members"]:
            raise CapacityError("max_members", 0)
        self._create(conv, ConvKind.GROUP, uids)
        return True

    def create_direct(self, a: str, b: str) -> str:
        conv = direct_conv_id(a, b)
        if conv not in self.convs:
            self._create(conv, ConvKind.DIRECT, list(dict.fromkeys(sorted((a, b)))))
        return conv

    def join(self, uid: str, conv: str) -> bool:
        c = self._conv(conv)
        if c.kind is ConvKind.DIRECT:
            raise ConfigError("fixed")
        self._user(uid)
        if uid in c.members:
            return False
        if len(c.members) >= self.limits["max_members"]:
            raise CapacityError("max_members", 0)
        if self._n_convs(uid) >= self.limits["max_conversations_per_user"]:
            raise CapacityError("max_conversations_per_user", 0)
        c.members[uid] = 0
        return True

    def leave(self, uid: str, conv: str) -> bool:
        c = self._conv(conv)
        if c.kind is ConvKind.DIRECT:
            raise ConfigError("fixed")
        return c.members.pop(uid, None) is not None

    def members(self, conv: str) -> frozenset[str]:
        return frozenset(self._conv(conv).members)

    def is_member(self, uid: str, conv: str) -> bool:
        return conv in self.convs and uid in self.convs[conv].members

    def conversations_of(self, uid: str) -> frozenset[str]:
        self._user(uid)
        return frozenset(k for k, c in self.convs.items() if uid in c.members)

    def conversation(self, conv: str) -> ConversationInfo:
        c = self._conv(conv)
        return ConversationInfo(
            conv=conv, kind=c.kind, member_count=len(c.members), last_seq=len(c.messages)
        )


def make_store_machine(new_backend: Callable[[str], Backend]) -> type[RuleBasedStateMachine]:
    """A stateful test holding the stores of ``new_backend(directory)`` to :class:`Model`.

    Each example gets a fresh temporary directory. Rules mirror every operation with
    small id sets and small limits (:data:`MACHINE_LIMITS`), and persistent backends
    also restart at random points; ``_check()`` runs after every step.
    """

    uids = st.sampled_from(USERS)
    convs = st.sampled_from(CONVS)
    # A seq drawn as an offset back from the conversation's last seq: -1 is one beyond
    # the last (refused), 0 the last, and so on; so most picks name a stored message.
    back = st.sampled_from((0, 0, 1, 1, 2, 9, -1))

    class StoreMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.directory = tempfile.mkdtemp(prefix="imkit-store-", dir=MACHINE_DIR)
            self.backend = new_backend(self.directory)
            self.store = self.backend.make(**MACHINE_LIMITS)
            self.model = Model(MACHINE_LIMITS, self.store.dedup_window)
            self.wall_ms = 0

        @initialize(members=st.lists(st.sampled_from(USERS[:3]), max_size=3))
        def setup(self, members: list[str]) -> None:
            """Users a, b, c (d stays unknown), group g with two messages, the 1:1 chat of
            a and b."""
            for uid in USERS[:3]:
                self.create_user(uid)
            self.create_group("g", members)
            self.create_direct(("a", "b"))
            self.append("g", "a", 0, b"hi")
            self.append("g", "b", 0, b"yo")

        def teardown(self) -> None:
            self.store.close()
            shutil.rmtree(self.directory, ignore_errors=True)

        def same(self, want: Callable[[], _T], got: Callable[[], _T]) -> None:
            """The store answers as the model does, or raises the model's error type."""
            try:
                expected = want()
            except ImkitError as e:
                with pytest.raises(type(e)):
                    got()
                return
            assert got() == expected

        def tick(self) -> int:
            self.wall_ms += 1
            return self.wall_ms

        @rule(uid=uids)
        def create_user(self, uid: str) -> None:
            self.same(lambda: self.model.create_user(uid), lambda: self.store.create_user(uid))

        @rule(conv=st.sampled_from(GROUPS), members=st.lists(uids, max_size=5))
        def create_group(self, conv: str, members: list[str]) -> None:
            self.same(
                lambda: self.model.create_group(conv, members),
                lambda: self.store.create_group(conv, members),
            )

        @rule(pair=st.sampled_from([("a", "b"), ("c", "b"), ("a", "a")]))
        def create_direct(self, pair: tuple[str, str]) -> None:
            self.same(
                lambda: self.model.create_direct(*pair), lambda: self.store.create_direct(*pair)
            )

        @rule(uid=uids, conv=convs)
        def join(self, uid: str, conv: str) -> None:
            self.same(lambda: self.model.join(uid, conv), lambda: self.store.join(uid, conv))

        @rule(uid=uids, conv=convs)
        def leave(self, uid: str, conv: str) -> None:
            self.same(lambda: self.model.leave(uid, conv), lambda: self.store.leave(uid, conv))

        @rule(
            conv=convs,
            sender=st.sampled_from(USERS[:3]),
            cid=st.integers(0, 3),
            body=st.binary(max_size=7),
        )
        def append(self, conv: str, sender: str, cid: int, body: bytes) -> None:
            """Store a message, then fan it out to the members' inboxes (write fan-out)."""
            now = self.tick()
            self.same(
                lambda: self.model.append(conv, sender, cid, body, now),
                lambda: self.store.append(conv, sender, cid, body, wall_ms=now, msg_id=now * 10),
            )
            c = self.model.convs.get(conv)
            if c is not None and c.messages:
                members = sorted(c.members)
                seq = c.messages[-1].seq
                self.model.inbox_add(members, conv, seq)
                self.store.inbox_add(members, conv, seq)

        @rule(
            items=st.lists(
                st.builds(
                    NewMessage,
                    conv=convs,
                    sender=st.sampled_from(USERS[:3]),
                    cid=st.integers(0, 3),
                    body=st.binary(max_size=7),
                ),
                max_size=4,
            )
        )
        def append_many(self, items: list[NewMessage]) -> None:
            now = self.tick()
            batch = [i._replace(msg_id=now * 10) for i in items]
            self.same(
                lambda: self.model.append_many(batch, now),
                lambda: self.store.append_many(batch, wall_ms=now),
            )

        @rule(conv=convs, back=st.sampled_from((0, 1, 2, 3, 5, 9, -1)), limit=st.integers(1, 6))
        def read(self, conv: str, back: int, limit: int) -> None:
            c = self.model.convs.get(conv)
            after = max(0, (0 if c is None else len(c.messages)) - back)
            self.same(
                lambda: self.model.read(conv, after, limit),
                lambda: self.store.read(conv, after, limit),
            )
            self.same(lambda: self.model.last_seq(conv), lambda: self.store.last_seq(conv))

        def seq_back(self, conv: str, back: int) -> int:
            c = self.model.convs.get(conv)
            last = 0 if c is None else len(c.messages)
            return min(last + 1, max(1, last - back)) if last else back % 2

        @rule(
            recipients=st.lists(st.sampled_from((*USERS[:3], *USERS)), max_size=4),
            conv=st.sampled_from(("g", "g", "g", DIRECTS[0], "nowhere")),
            back=back,
        )
        def inbox_add(self, recipients: list[str], conv: str, back: int) -> None:
            seq = self.seq_back(conv, back)
            self.same(
                lambda: self.model.inbox_add(recipients, conv, seq),
                lambda: self.store.inbox_add(recipients, conv, seq),
            )

        def cursor_back(self, uid: str, back: int) -> int:
            return max(0, len(self.model.inbox.get(uid, [])) - back)

        @rule(uid=uids, back=st.sampled_from((0, 1, 2, 3, 4, 9, -1)), limit=st.integers(1, 6))
        def inbox_read(self, uid: str, back: int, limit: int) -> None:
            after = self.cursor_back(uid, back)
            self.same(
                lambda: self.model.inbox_read(uid, after, limit),
                lambda: self.store.inbox_read(uid, after, limit),
            )

        @rule(uid=uids, back=st.sampled_from((1, 2, 3, 4, -1)))
        def inbox_trim(self, uid: str, back: int) -> None:
            through = self.cursor_back(uid, back)
            self.same(
                lambda: self.model.inbox_trim(uid, through),
                lambda: self.store.inbox_trim(uid, through),
            )

        @rule(
            uid=st.one_of(uids, st.integers(0, 3)),
            conv=st.sampled_from(("g", "g", "g", DIRECTS[0], "nowhere")),
            back=back,
        )
        def set_read(self, uid: str | int, conv: str, back: int) -> None:
            """Move a read cursor; an int ``uid`` picks a member (so that most calls do)."""
            if isinstance(uid, int):
                c = self.model.convs.get(conv)
                members = sorted(c.members) if c is not None and c.members else ["a"]
                uid = members[uid % len(members)]
            seq = self.seq_back(conv, back)
            self.same(
                lambda: self.model.set_read(uid, conv, seq),
                lambda: self.store.set_read(uid, conv, seq),
            )

        @rule(uid=uids, conv=convs)
        def queries(self, uid: str, conv: str) -> None:
            m, s = self.model, self.store
            self.same(lambda: m.get_read(uid, conv), lambda: s.get_read(uid, conv))
            self.same(lambda: m.read_cursors(conv), lambda: s.read_cursors(conv))
            self.same(lambda: m.members(conv), lambda: s.members(conv))
            self.same(lambda: m.is_member(uid, conv), lambda: s.is_member(uid, conv))
            self.same(lambda: m.conversations_of(uid), lambda: s.conversations_of(uid))
            self.same(lambda: m.conversation(conv), lambda: s.conversation(conv))
            self.same(lambda: uid in m.users, lambda: s.has_user(uid))

        @precondition(lambda self: self.backend.persistent)
        @rule()
        def restart(self) -> None:
            self.store = self.backend.reopen(self.store)

        @invariant()
        def check(self) -> None:
            self.store._check()

    StoreMachine.__name__ = StoreMachine.__qualname__ = "StoreMachine"
    return StoreMachine
