"""SqliteStore: a persistent :class:`~imkit.store.MessageStore` on stdlib sqlite3.

One database file (WAL journal), seven tables::

    users(uid, inbox_last, inbox_first, conv_count)          inbox cursors per user
    conversations(id, conv, kind, last_seq, member_count)    last_seq: the seq counter
    members(conv_id, uid, read_seq)                          membership + read cursor
    messages(conv_id, seq, sender, cid, body, msg_id, server_ms)
        primary key (conv_id, seq): a conversation's timeline is one index range
        unique (conv_id, sender, cid): the idempotency key, for every message ever
    inbox(uid, cursor, conv_id, seq)                         primary key (uid, cursor)
    devices(uid, device, stamp)                              stamp: write order per user
    device_cursors(uid, device, conv_id, seq)                where a device's sync starts

Every write is one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``): a message and
its conversation's new ``last_seq`` commit together, so a seq is never handed out
twice, across crashes and restarts. ``append_many`` puts a whole batch in one
transaction, which is where SQLite's speed is (one commit, one WAL sync).

Durability (``synchronous``): in WAL mode ``"NORMAL"`` (the default) syncs the WAL
only at checkpoints: every committed message survives the process being killed
(``kill -9``), but the last transactions before an OS crash or power loss can be
rolled back. ``"FULL"`` syncs the WAL at every commit, surviving power loss too, at
the cost of one fsync per transaction (batch with ``append_many``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from typing import Concatenate, ParamSpec, TypeVar

from imkit.errors import (
    CapacityError,
    ConfigError,
    ConversationNotFound,
    NotMember,
    StoreError,
    UserNotFound,
)
from imkit.store._base import (
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

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: ``PRAGMA user_version`` of the schema this code writes. Version 1 (before the
#: device cursors) is upgraded in place when opened; any other version is refused.
SCHEMA_VERSION = 2

_DEVICE_TABLES = """
CREATE TABLE devices (
    uid TEXT NOT NULL,
    device TEXT NOT NULL,
    stamp INTEGER NOT NULL,
    PRIMARY KEY (uid, device)
) WITHOUT ROWID;
CREATE TABLE device_cursors (
    uid TEXT NOT NULL,
    device TEXT NOT NULL,
    conv_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (uid, device, conv_id)
) WITHOUT ROWID;
"""

_SCHEMA = """
CREATE TABLE users (
    uid TEXT PRIMARY KEY,
    inbox_last INTEGER NOT NULL DEFAULT 0,
    inbox_first INTEGER NOT NULL DEFAULT 1,
    conv_count INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE conversations (
    id INTEGER PRIMARY KEY,
    conv TEXT NOT NULL UNIQUE,
    kind INTEGER NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    member_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE members (
    conv_id INTEGER NOT NULL,
    uid TEXT NOT NULL,
    read_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (conv_id, uid)
) WITHOUT ROWID;
CREATE INDEX members_by_uid ON members (uid, conv_id);
CREATE TABLE messages (
    conv_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    sender TEXT NOT NULL,
    cid INTEGER NOT NULL,
    body BLOB NOT NULL,
    msg_id INTEGER NOT NULL,
    server_ms INTEGER NOT NULL,
    PRIMARY KEY (conv_id, seq)
);
CREATE UNIQUE INDEX messages_by_key ON messages (conv_id, sender, cid);
CREATE TABLE inbox (
    uid TEXT NOT NULL,
    cursor INTEGER NOT NULL,
    conv_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (uid, cursor)
) WITHOUT ROWID;
""" + _DEVICE_TABLES

_SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")

_SQL_CONV = "SELECT id, last_seq FROM conversations WHERE conv = ?"
_SQL_INSERT = (
    "INSERT INTO messages (conv_id, seq, sender, cid, body, msg_id, server_ms) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (conv_id, sender, cid) DO NOTHING"
)
_SQL_DUP = (
    "SELECT seq, body, msg_id, server_ms FROM messages "
    "WHERE conv_id = ? AND sender = ? AND cid = ?"
)
_SQL_BUMP = "UPDATE conversations SET last_seq = ? WHERE id = ?"
_SQL_DEVICE_CURSOR = (
    "INSERT INTO device_cursors (uid, device, conv_id, seq) "
    "SELECT :uid, :device, c.id, min(:seq, c.last_seq) FROM conversations c "
    "JOIN members m ON m.conv_id = c.id AND m.uid = :uid "
    "WHERE c.conv = :conv AND min(:seq, c.last_seq) > 0 "
    "ON CONFLICT (uid, device, conv_id) DO UPDATE SET seq = max(seq, excluded.seq)"
)
_SQL_READ = (
    "SELECT seq, sender, cid, body, msg_id, server_ms FROM messages "
    "WHERE conv_id = (SELECT id FROM conversations WHERE conv = ?) AND seq > ? "
    "ORDER BY seq LIMIT ?"
)


class SqliteStore:
    """Messages, inboxes, cursors and the registry in one SQLite database file.

    Append O(log n) (one transaction: a few B-tree lookups and inserts), range read
    O(log n + limit), inbox add O(len(uids) log n) in one transaction, inbox read
    O(log n + limit), cursors O(log n), ``members`` O(members). Idempotency is exact
    and unbounded (a unique index: ``dedup_window`` is None). Disk is the only bound
    on messages, users and conversations; the per-group, per-user and per-call limits
    are those of every store. Not safe for concurrent use from several threads at
    once (serialize calls); several processes may share the file (SQLite locks).

    >>> store = SqliteStore(":memory:")
    >>> store.create_user("alice"), store.create_group("g", ["alice"])
    (True, True)
    >>> store.append("g", "alice", 7, b"hello", wall_ms=1).seq
    1
    >>> store.close()
    """

    dedup_window: int | None = None

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "NORMAL",
        max_members: int = DEFAULT_MAX_MEMBERS,
        max_conversations_per_user: int = DEFAULT_MAX_CONVERSATIONS_PER_USER,
        max_inbox: int = DEFAULT_MAX_INBOX,
        max_read_limit: int = DEFAULT_MAX_READ_LIMIT,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        max_devices_per_user: int = DEFAULT_MAX_DEVICES_PER_USER,
        timeout_s: float = 5.0,
    ) -> None:
        """Open (creating if needed) the database at ``path`` (``":memory:"`` for a
        throwaway one). ``synchronous``: ``"NORMAL"``, ``"FULL"`` or ``"EXTRA"`` (see
        the module doc). ``timeout_s``: how long to wait for another process's lock.
        StoreError if the file is not an imkit store of this schema version."""
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
        if not isinstance(synchronous, str) or synchronous.upper() not in _SYNCHRONOUS:
            raise ConfigError(f"synchronous must be one of {_SYNCHRONOUS}, got {synchronous!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s < 0:
            raise ConfigError(f"timeout_s must be a number >= 0, got {timeout_s!r}")
        self.synchronous = synchronous.upper()
        self.path = os.fspath(path)
        #: A file survives the process; ``":memory:"`` (or ``""``: a temporary file) not.
        self.durable = self.path not in (":memory:", "")
        self._db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(
                self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot open {self.path!r}: {e}") from e
        try:
            self.journal_mode = str(db.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            db.execute(f"PRAGMA synchronous = {self.synchronous}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._create_schema(db)
            elif version == 1:
                self._upgrade_from_1(db)
            elif version != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path!r} has schema version {version}, not {SCHEMA_VERSION}"
                )
        except BaseException as e:
            db.close()
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"cannot open {self.path!r}: {e}") from e
            raise
        self._db = db

    def _create_schema(self, db: sqlite3.Connection) -> None:
        """Create the tables in an empty database (one transaction)."""
        if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StoreError(f"{self.path!r} holds another application's tables")
        try:
            db.executescript(
                f"BEGIN IMMEDIATE;\n{_SCHEMA}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;"
            )
        except sqlite3.Error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            # Another process may have created the schema first: then it is ours.
            if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                raise

    def _upgrade_from_1(self, db: sqlite3.Connection) -> None:
        """Add the device cursor tables to a version-1 database (one transaction)."""
        try:
            db.executescript(
                f"BEGIN IMMEDIATE;\n{_DEVICE_TABLES}\n"
                f"PRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;"
            )
        except sqlite3.Error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            # Another process may have upgraded it first.
            if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                raise

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r}, synchronous={self.synchronous!r})"

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        db = self._db
        if db is None:
            raise StoreError("the store is closed")
        return db

    def _write(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Run ``fn(db, ...)`` in one write transaction: all of it commits, or none."""
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StoreError(f"sqlite: {e}") from e
        try:
            result = fn(db, *args, **kwargs)
            db.execute("COMMIT")
        except BaseException as e:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # a broken connection
                    db.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"sqlite: {e}") from e
            raise
        return result

    def _read(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Run ``fn(db, ...)`` in one read transaction (a consistent snapshot)."""
        db = self._conn()
        try:
            db.execute("BEGIN")
            try:
                return fn(db, *args, **kwargs)
            finally:
                db.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(f"sqlite: {e}") from e

    @staticmethod
    def _conv_row(db: sqlite3.Connection, conv: str) -> tuple[int, int, int, int]:
        row = db.execute(
            "SELECT id, kind, last_seq, member_count FROM conversations WHERE conv = ?", (conv,)
        ).fetchone()
        if row is None:
            raise ConversationNotFound(conv)
        return row  # type: ignore[no-any-return]

    @staticmethod
    def _user_row(db: sqlite3.Connection, uid: str) -> tuple[int, int, int]:
        row = db.execute(
            "SELECT inbox_last, inbox_first, conv_count FROM users WHERE uid = ?", (uid,)
        ).fetchone()
        if row is None:
            raise UserNotFound(uid)
        return row  # type: ignore[no-any-return]

    # --- messages -----------------------------------------------------------------

    def _check_message(
        self, conv: str, sender: str, cid: int, body: bytes, msg_id: int
    ) -> None:
        check_new_message(conv, sender, cid, body, msg_id)
        if len(body) > self.max_body_size:
            raise CapacityError("max_body_size", self.max_body_size, f"body of {len(body)} bytes")

    @staticmethod
    def _append1(  # noqa: PLR0917 - private hot path, positional on purpose
        db: sqlite3.Connection,
        conv: str,
        sender: str,
        cid: int,
        body: bytes,
        wall_ms: int,
        msg_id: int,
    ) -> StoredMessage:
        row = db.execute(_SQL_CONV, (conv,)).fetchone()
        if row is None:
            raise ConversationNotFound(conv)
        conv_id, seq = row
        seq += 1
        if db.execute(_SQL_INSERT, (conv_id, seq, sender, cid, body, msg_id, wall_ms)).rowcount:
            db.execute(_SQL_BUMP, (seq, conv_id))
            return new_message(conv, seq, sender, cid, body, msg_id, wall_ms)
        seq, body, msg_id, server_ms = db.execute(_SQL_DUP, (conv_id, sender, cid)).fetchone()
        return new_message(conv, seq, sender, cid, body, msg_id, server_ms)

    def append(
        self, conv: str, sender: str, cid: int, body: bytes, *, wall_ms: int, msg_id: int = 0
    ) -> StoredMessage:
        """Store a message with the next seq of ``conv``, in its own transaction.

        Idempotent on (sender, cid) for every message ever stored (unique index):
        a resend returns the stored message and writes nothing. ConversationNotFound,
        ConfigError, CapacityError (``max_body_size``), StoreError. O(log n).
        """
        self._check_message(conv, sender, cid, body, msg_id)
        check_int(wall_ms, "wall_ms")
        return self._write(self._append1, conv, sender, cid, body, wall_ms, msg_id)

    def append_many(self, items: Iterable[NewMessage], *, wall_ms: int) -> list[StoredMessage]:
        """:meth:`append` each item in order in one transaction: all or nothing.

        One commit for the whole batch: the way to many appends per second, and with
        ``synchronous="FULL"`` one fsync per batch instead of per message.
        O(len(items) log n).
        """
        batch = list(items)
        check_int(wall_ms, "wall_ms")
        for item in batch:
            if not isinstance(item, NewMessage):
                raise ConfigError("append_many takes NewMessage items")
            self._check_message(item.conv, item.sender, item.cid, item.body, item.msg_id)

        return self._write(self._append_batch, batch, wall_ms)

    @staticmethod
    def _append_batch(
        db: sqlite3.Connection, batch: list[NewMessage], wall_ms: int
    ) -> list[StoredMessage]:
        # The transaction holds the write lock, so each conversation's id and seq are
        # read once and its counter written once, at the end: one INSERT per message.
        seqs: dict[str, list[int]] = {}  # conv -> [conv_id, last seq, seq at start]
        out = []
        execute = db.execute
        for conv, sender, cid, body, msg_id in batch:
            state = seqs.get(conv)
            if state is None:
                row = execute(_SQL_CONV, (conv,)).fetchone()
                if row is None:
                    raise ConversationNotFound(conv)
                state = seqs[conv] = [row[0], row[1], row[1]]
            conv_id, seq = state[0], state[1] + 1
            if execute(_SQL_INSERT, (conv_id, seq, sender, cid, body, msg_id, wall_ms)).rowcount:
                state[1] = seq
                out.append(new_message(conv, seq, sender, cid, body, msg_id, wall_ms))
            else:
                old = execute(_SQL_DUP, (conv_id, sender, cid)).fetchone()
                out.append(new_message(conv, old[0], sender, cid, old[1], old[2], old[3]))
        for conv_id, seq, start in seqs.values():
            if seq != start:
                execute(_SQL_BUMP, (seq, conv_id))
        return out

    def read(self, conv: str, after_seq: int, limit: int) -> Page:
        """Messages with seq > ``after_seq``, oldest first, at most ``min(limit,
        max_read_limit)``; ``more`` is True when later messages exist. One indexed
        range query: O(log n + limit). ConversationNotFound."""
        check_conv(conv)
        check_int(after_seq, "after_seq")
        n = min(check_limit(limit), self.max_read_limit)
        db = self._conn()
        try:
            rows = db.execute(_SQL_READ, (conv, after_seq, n + 1)).fetchall()
            if not rows and db.execute(_SQL_CONV, (conv,)).fetchone() is None:
                raise ConversationNotFound(conv)
        except sqlite3.Error as e:
            raise StoreError(f"sqlite: {e}") from e
        messages = tuple(
            new_message(conv, seq, sender, cid, body, msg_id, server_ms)
            for seq, sender, cid, body, msg_id, server_ms in rows[:n]
        )
        return Page(messages=messages, more=len(rows) > n)

    def last_seq(self, conv: str) -> int:
        """The highest seq ever given out in ``conv`` (0 if none). O(log n)."""
        check_conv(conv)
        db = self._conn()
        try:
            row = db.execute(_SQL_CONV, (conv,)).fetchone()
        except sqlite3.Error as e:
            raise StoreError(f"sqlite: {e}") from e
        if row is None:
            raise ConversationNotFound(conv)
        return int(row[1])

    # --- inboxes ------------------------------------------------------------------

    def inbox_add(self, uids: Iterable[str], conv: str, seq: int) -> None:
        """Append (conv, seq) to each user's inbox, once per distinct uid, in one
        transaction; a full inbox drops its oldest entry. ``seq`` must be a stored seq
        (ConfigError); an unknown uid raises UserNotFound and nothing changes.
        O(len(uids) log n)."""
        check_conv(conv)
        check_int(seq, "seq")
        targets = list(dict.fromkeys(check_uids(uids)))
        self._write(self._inbox_add, targets, conv, seq)

    def _inbox_add(self, db: sqlite3.Connection, uids: list[str], conv: str, seq: int) -> None:
        conv_id, _kind, last_seq, _n = self._conv_row(db, conv)
        if not 1 <= seq <= last_seq:
            raise ConfigError(f"seq {seq} is not a stored seq of {conv!r}")
        if not uids:
            return
        params = [(self.max_inbox, uid) for uid in uids]
        changed = db.executemany(
            "UPDATE users SET inbox_last = inbox_last + 1, "
            "inbox_first = max(inbox_first, inbox_last + 2 - ?) WHERE uid = ?",
            params,
        ).rowcount
        if changed != len(uids):
            for uid in uids:
                self._user_row(db, uid)  # raises UserNotFound (and the caller rolls back)
        db.executemany(
            "INSERT INTO inbox (uid, cursor, conv_id, seq) "
            "SELECT uid, inbox_last, ?, ? FROM users WHERE uid = ?",
            [(conv_id, seq, uid) for uid in uids],
        )
        db.executemany(
            "DELETE FROM inbox WHERE uid = ? "
            "AND cursor < (SELECT inbox_first FROM users WHERE uid = ?)",
            [(uid, uid) for uid in uids],
        )

    def inbox_read(self, uid: str, after_cursor: int, limit: int) -> InboxPage:
        """Entries of ``uid`` with cursor > ``after_cursor``, in arrival order, at most
        ``min(limit, max_read_limit)``. See :class:`InboxPage` for ``trimmed``.
        O(log n + limit)."""
        check_uid(uid)
        check_int(after_cursor, "after_cursor")
        n = min(check_limit(limit), self.max_read_limit)
        return self._read(self._inbox_read, uid, after_cursor, n)

    def _inbox_read(
        self, db: sqlite3.Connection, uid: str, after_cursor: int, n: int
    ) -> InboxPage:
        last, first, _count = self._user_row(db, uid)
        if after_cursor > last:
            return InboxPage(entries=(), cursor=last, more=False, trimmed=True)
        first = max(first, last - self.max_inbox + 1)  # max_inbox may be lower than before
        start = max(after_cursor + 1, first)
        rows = db.execute(
            "SELECT i.cursor, c.conv, i.seq FROM inbox i JOIN conversations c "
            "ON c.id = i.conv_id WHERE i.uid = ? AND i.cursor >= ? ORDER BY i.cursor LIMIT ?",
            (uid, start, n),
        ).fetchall()
        entries = tuple(InboxEntry(cursor=k, conv=c, seq=s) for k, c, s in rows)
        cursor = start - 1 + len(entries)
        return InboxPage(
            entries=entries, cursor=cursor, more=cursor < last, trimmed=start > after_cursor + 1
        )

    def inbox_trim(self, uid: str, through_cursor: int) -> None:
        """Drop the entries of ``uid`` with cursor <= ``through_cursor`` (beyond the last
        entry: all). O(log n + dropped)."""
        check_uid(uid)
        check_int(through_cursor, "through_cursor")
        self._write(self._inbox_trim, uid, through_cursor)

    def _inbox_trim(self, db: sqlite3.Connection, uid: str, through_cursor: int) -> None:
        last, first, _count = self._user_row(db, uid)
        new_first = min(through_cursor, last) + 1
        if new_first > first:
            db.execute("UPDATE users SET inbox_first = ? WHERE uid = ?", (new_first, uid))
            db.execute("DELETE FROM inbox WHERE uid = ? AND cursor < ?", (uid, new_first))

    # --- read cursors -------------------------------------------------------------

    def set_read(self, uid: str, conv: str, seq: int) -> int:
        """Move the read cursor of member ``uid`` in ``conv`` up to ``seq`` (never down);
        return the cursor. ConfigError above the last seq, NotMember. O(log n)."""
        check_conv(conv)
        check_uid(uid)
        check_int(seq, "seq")
        # A cursor that stays where it is (a repeated receipt) costs one read and no
        # write transaction; only a move takes the write lock (and checks again).
        current = self._read(self._set_read, uid, conv, seq, write=False)
        if seq <= current:
            return current
        return self._write(self._set_read, uid, conv, seq)

    def _set_read(
        self, db: sqlite3.Connection, uid: str, conv: str, seq: int, *, write: bool = True
    ) -> int:
        conv_id, _kind, last_seq, _n = self._conv_row(db, conv)
        if seq > last_seq:
            raise ConfigError(f"seq {seq} is beyond the last seq of {conv!r}")
        row = db.execute(
            "SELECT read_seq FROM members WHERE conv_id = ? AND uid = ?", (conv_id, uid)
        ).fetchone()
        if row is None:
            raise NotMember(uid, conv)
        if seq <= row[0] or not write:
            return int(row[0])
        db.execute(
            "UPDATE members SET read_seq = ? WHERE conv_id = ? AND uid = ?", (seq, conv_id, uid)
        )
        return seq

    def get_read(self, uid: str, conv: str) -> int:
        """The read cursor of ``uid`` in ``conv``: 0 if unset or not a member. O(log n)."""
        check_conv(conv)
        check_uid(uid)
        return self._read(self._get_read, uid, conv)

    def _get_read(self, db: sqlite3.Connection, uid: str, conv: str) -> int:
        conv_id = self._conv_row(db, conv)[0]
        row = db.execute(
            "SELECT read_seq FROM members WHERE conv_id = ? AND uid = ?", (conv_id, uid)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def read_cursors(self, conv: str) -> dict[str, int]:
        """``uid -> read seq`` of every member who has read something. O(members)."""
        check_conv(conv)
        return self._read(self._read_cursors, conv)

    def _read_cursors(self, db: sqlite3.Connection, conv: str) -> dict[str, int]:
        conv_id = self._conv_row(db, conv)[0]
        rows = db.execute(
            "SELECT uid, read_seq FROM members WHERE conv_id = ? AND read_seq > 0", (conv_id,)
        )
        return dict(rows)

    # --- device cursors -------------------------------------------------------------

    def set_device_cursors(self, uid: str, device: str, cursors: Mapping[str, int]) -> None:
        """Move the cursors of ``device`` of ``uid`` up (never down), each clamped to
        its conversation's last seq; conversations ``uid`` is not in are ignored. Past
        ``max_devices_per_user`` the least recently written device is forgotten. One
        transaction. UserNotFound, ConfigError, CapacityError (more entries than
        ``max_conversations_per_user``). O(len(cursors) log n)."""
        check_uid(uid)
        check_uid(device, "device")
        items = check_cursors(cursors, self.max_conversations_per_user)
        self._write(self._set_device_cursors, uid, device, items)

    def _set_device_cursors(
        self, db: sqlite3.Connection, uid: str, device: str, items: list[tuple[str, int]]
    ) -> None:
        self._user_row(db, uid)
        top, count = db.execute(
            "SELECT coalesce(max(stamp), 0), count(*) FROM devices WHERE uid = ?", (uid,)
        ).fetchone()
        known = db.execute(
            "SELECT stamp FROM devices WHERE uid = ? AND device = ?", (uid, device)
        ).fetchone()
        if known is None:
            if count >= self.max_devices_per_user:
                for (old,) in db.execute(
                    "SELECT device FROM devices WHERE uid = ? ORDER BY stamp LIMIT ?",
                    (uid, count - self.max_devices_per_user + 1),
                ).fetchall():
                    db.execute("DELETE FROM devices WHERE uid = ? AND device = ?", (uid, old))
                    db.execute(
                        "DELETE FROM device_cursors WHERE uid = ? AND device = ?", (uid, old)
                    )
            db.execute("INSERT INTO devices VALUES (?, ?, ?)", (uid, device, top + 1))
        elif known[0] != top:
            db.execute(
                "UPDATE devices SET stamp = ? WHERE uid = ? AND device = ?", (top + 1, uid, device)
            )
        db.executemany(
            _SQL_DEVICE_CURSOR,
            [{"uid": uid, "device": device, "conv": conv, "seq": seq} for conv, seq in items],
        )

    def device_cursors(self, uid: str, device: str) -> dict[str, int]:
        """The cursors of ``device`` of ``uid`` ({} for an unknown device). UserNotFound.
        O(log n + conversations of the device)."""
        check_uid(uid)
        check_uid(device, "device")

        def run(db: sqlite3.Connection) -> dict[str, int]:
            self._user_row(db, uid)
            rows = db.execute(
                "SELECT c.conv, d.seq FROM device_cursors d JOIN conversations c "
                "ON c.id = d.conv_id WHERE d.uid = ? AND d.device = ?",
                (uid, device),
            )
            return dict(rows)

        return self._read(run)

    # --- registry -----------------------------------------------------------------

    def create_user(self, uid: str) -> bool:
        """Register ``uid``; False if it already existed. O(log n)."""
        check_uid(uid)
        return self._write(
            lambda db: db.execute(
                "INSERT INTO users (uid) VALUES (?) ON CONFLICT DO NOTHING", (uid,)
            ).rowcount
            == 1
        )

    def has_user(self, uid: str) -> bool:
        """Whether ``uid`` is registered. O(log n)."""
        check_uid(uid)
        return self._read(
            lambda db: db.execute("SELECT 1 FROM users WHERE uid = ?", (uid,)).fetchone()
            is not None
        )

    def _create(self, db: sqlite3.Connection, conv: str, kind: ConvKind, uids: list[str]) -> None:
        for uid in uids:
            self._user_row(db, uid)
        for uid in uids:
            if self._user_row(db, uid)[2] >= self.max_conversations_per_user:
                raise CapacityError(
                    "max_conversations_per_user", self.max_conversations_per_user, uid
                )
        conv_id = db.execute(
            "INSERT INTO conversations (conv, kind, member_count) VALUES (?, ?, ?)",
            (conv, int(kind), len(uids)),
        ).lastrowid
        db.executemany(
            "INSERT INTO members (conv_id, uid) VALUES (?, ?)", [(conv_id, uid) for uid in uids]
        )
        db.executemany(
            "UPDATE users SET conv_count = conv_count + 1 WHERE uid = ?", [(uid,) for uid in uids]
        )

    def _exists(self, db: sqlite3.Connection, conv: str) -> bool:
        return db.execute(_SQL_CONV, (conv,)).fetchone() is not None

    def create_group(self, conv: str, members: Iterable[str] = ()) -> bool:
        """Create group ``conv`` with ``members``; False (and nothing changes) if
        ``conv`` exists. Ids starting with ``"dm:"`` are reserved for 1:1 chats
        (ConfigError). UserNotFound, CapacityError. O(len(members) log n)."""
        check_conv(conv)
        if conv.startswith("dm:"):
            raise ConfigError("conversation ids starting with 'dm:' are reserved for 1:1 chats")
        uids = list(dict.fromkeys(check_uids(members)))

        def run(db: sqlite3.Connection) -> bool:
            if self._exists(db, conv):
                return False
            if len(uids) > self.max_members:
                raise CapacityError("max_members", self.max_members, f"{len(uids)} members")
            self._create(db, conv, ConvKind.GROUP, uids)
            return True

        return self._write(run)

    def create_direct(self, a: str, b: str) -> str:
        """Create (if needed) the 1:1 conversation of users ``a`` and ``b``; return its
        :func:`direct_conv_id`. UserNotFound, CapacityError. O(log n)."""
        conv = direct_conv_id(a, b)
        uids = list(dict.fromkeys(sorted((a, b))))

        def run(db: sqlite3.Connection) -> None:
            if not self._exists(db, conv):
                self._create(db, conv, ConvKind.DIRECT, uids)

        self._write(run)
        return conv

    def join(self, uid: str, conv: str) -> bool:
        """Add ``uid`` to group ``conv``; False if already a member. ConfigError for a
        1:1 chat, UserNotFound, CapacityError. O(log n)."""
        check_conv(conv)
        check_uid(uid)
        return self._write(self._join, uid, conv)

    def _join(self, db: sqlite3.Connection, uid: str, conv: str) -> bool:
        conv_id, kind, _last, member_count = self._conv_row(db, conv)
        if kind == ConvKind.DIRECT:
            raise ConfigError("members of a 1:1 conversation are fixed")
        conv_count = self._user_row(db, uid)[2]
        if db.execute(
            "SELECT 1 FROM members WHERE conv_id = ? AND uid = ?", (conv_id, uid)
        ).fetchone():
            return False
        if member_count >= self.max_members:
            raise CapacityError("max_members", self.max_members, conv)
        if conv_count >= self.max_conversations_per_user:
            raise CapacityError("max_conversations_per_user", self.max_conversations_per_user, uid)
        db.execute("INSERT INTO members (conv_id, uid) VALUES (?, ?)", (conv_id, uid))
        db.execute(
            "UPDATE conversations SET member_count = member_count + 1 WHERE id = ?", (conv_id,)
        )
        db.execute("UPDATE users SET conv_count = conv_count + 1 WHERE uid = ?", (uid,))
        return True

    def leave(self, uid: str, conv: str) -> bool:
        """Remove ``uid`` from group ``conv`` and its read and device cursors there;
        False if not a member. ConfigError for a 1:1 chat. O(log n + devices of uid)."""
        check_conv(conv)
        check_uid(uid)
        return self._write(self._leave, uid, conv)

    def _leave(self, db: sqlite3.Connection, uid: str, conv: str) -> bool:
        conv_id, kind, _last, _n = self._conv_row(db, conv)
        if kind == ConvKind.DIRECT:
            raise ConfigError("members of a 1:1 conversation are fixed")
        if not db.execute(
            "DELETE FROM members WHERE conv_id = ? AND uid = ?", (conv_id, uid)
        ).rowcount:
            return False
        db.execute(
            "UPDATE conversations SET member_count = member_count - 1 WHERE id = ?", (conv_id,)
        )
        db.execute("UPDATE users SET conv_count = conv_count - 1 WHERE uid = ?", (uid,))
        db.execute("DELETE FROM device_cursors WHERE uid = ? AND conv_id = ?", (uid, conv_id))
        return True

    def members(self, conv: str) -> frozenset[str]:
        """The members of ``conv``. O(members)."""
        check_conv(conv)

        def run(db: sqlite3.Connection) -> frozenset[str]:
            conv_id = self._conv_row(db, conv)[0]
            rows = db.execute("SELECT uid FROM members WHERE conv_id = ?", (conv_id,))
            return frozenset(uid for (uid,) in rows)

        return self._read(run)

    def is_member(self, uid: str, conv: str) -> bool:
        """Whether ``uid`` is a member of ``conv``; False for an unknown conversation.
        O(log n)."""
        check_conv(conv)
        check_uid(uid)
        return self._read(
            lambda db: db.execute(
                "SELECT 1 FROM members WHERE uid = ? "
                "AND conv_id = (SELECT id FROM conversations WHERE conv = ?)",
                (uid, conv),
            ).fetchone()
            is not None
        )

    def conversations_of(self, uid: str) -> frozenset[str]:
        """The conversations ``uid`` belongs to. UserNotFound. O(conversations of uid)."""
        check_uid(uid)

        def run(db: sqlite3.Connection) -> frozenset[str]:
            self._user_row(db, uid)
            rows = db.execute(
                "SELECT c.conv FROM members m JOIN conversations c ON c.id = m.conv_id "
                "WHERE m.uid = ?",
                (uid,),
            )
            return frozenset(conv for (conv,) in rows)

        return self._read(run)

    def conversation(self, conv: str) -> ConversationInfo:
        """Kind, member count and last seq of ``conv``. O(log n)."""
        check_conv(conv)
        _id, kind, last_seq, member_count = self._read(self._conv_row, conv)
        return ConversationInfo(
            conv=conv, kind=ConvKind(kind), member_count=member_count, last_seq=last_seq
        )

    # --- lifecycle ----------------------------------------------------------------

    def close(self) -> None:
        """Close the database (checkpointing the WAL); later calls raise StoreError.
        Idempotent."""
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error as e:  # pragma: no cover - close of a broken connection
                raise StoreError(f"sqlite: {e}") from e

    def _check(self) -> None:
        """Assert the database's integrity and every invariant the schema does not
        enforce (AssertionError naming the broken one). O(everything)."""
        db = self._conn()
        result = [r[0] for r in db.execute("PRAGMA integrity_check")]
        assert result == ["ok"], f"integrity_check: {result}"

        def none(sql: str, what: str) -> None:
            bad = db.execute(sql).fetchmany(3)
            assert not bad, f"{what}: {bad}"

        none(
            "SELECT c.conv, c.last_seq FROM conversations c WHERE c.last_seq < "
            "(SELECT coalesce(max(seq), 0) FROM messages WHERE conv_id = c.id)",
            "a conversation's last_seq is below its messages",
        )
        none("SELECT conv_id, seq FROM messages WHERE seq < 1", "a message with seq < 1")
        none(
            "SELECT m.conv_id FROM messages m LEFT JOIN conversations c ON c.id = m.conv_id "
            "WHERE c.id IS NULL",
            "a message of an unknown conversation",
        )
        none(
            "SELECT conv, member_count FROM conversations c WHERE member_count != "
            "(SELECT count(*) FROM members WHERE conv_id = c.id)",
            "member_count out of step",
        )
        none(
            "SELECT uid, conv_count FROM users u WHERE conv_count != "
            "(SELECT count(*) FROM members WHERE uid = u.uid)",
            "conv_count out of step",
        )
        none(
            "SELECT m.uid FROM members m LEFT JOIN users u ON u.uid = m.uid WHERE u.uid IS NULL",
            "a member that is not a user",
        )
        none(
            "SELECT m.uid, m.read_seq FROM members m LEFT JOIN conversations c "
            "ON c.id = m.conv_id WHERE c.id IS NULL OR m.read_seq < 0 OR m.read_seq > c.last_seq",
            "a read cursor out of range",
        )
        none(
            "SELECT uid, inbox_first, inbox_last FROM users u WHERE inbox_first < 1 "
            "OR inbox_first > inbox_last + 1 OR (SELECT count(*) FROM inbox WHERE uid = u.uid) "
            "!= inbox_last - inbox_first + 1",
            "an inbox whose entries are not exactly inbox_first..inbox_last",
        )
        none(
            "SELECT i.uid, i.cursor FROM inbox i LEFT JOIN conversations c ON c.id = i.conv_id "
            "WHERE c.id IS NULL OR i.seq < 1 OR i.seq > c.last_seq",
            "an inbox entry naming no stored message",
        )
        none(
            "SELECT d.uid, d.device, d.conv_id FROM device_cursors d LEFT JOIN members m "
            "ON m.conv_id = d.conv_id AND m.uid = d.uid LEFT JOIN conversations c "
            "ON c.id = d.conv_id WHERE m.uid IS NULL OR d.seq < 1 OR d.seq > c.last_seq",
            "a device cursor outside its user's conversations or their seqs",
        )
        none(
            "SELECT d.uid, d.device FROM device_cursors d LEFT JOIN devices v "
            "ON v.uid = d.uid AND v.device = d.device WHERE v.uid IS NULL",
            "device cursors of an unregistered device",
        )
        none(
            f"SELECT uid, count(*) FROM devices GROUP BY uid "
            f"HAVING count(*) > {self.max_devices_per_user}",
            "more devices than max_devices_per_user",
        )
        for conv, kind in db.execute("SELECT conv, kind FROM conversations"):
            uids = sorted(
                u for (u,) in db.execute(
                    "SELECT m.uid FROM members m JOIN conversations c ON c.id = m.conv_id "
                    "WHERE c.conv = ?",
                    (conv,),
                )
            )
            if kind == ConvKind.DIRECT:
                assert 1 <= len(uids) <= 2, f"{conv!r}: a 1:1 chat with {len(uids)} members"
                assert direct_conv_id(uids[0], uids[-1]) == conv, f"{conv!r}: wrong members"
            else:
                assert kind == ConvKind.GROUP, f"{conv!r}: unknown kind {kind}"
                assert not conv.startswith("dm:"), f"group {conv!r} uses the 1:1 prefix"
