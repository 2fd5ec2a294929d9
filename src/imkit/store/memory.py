"""MemoryStore: the embedded default :class:`~imkit.store.MessageStore`, all in RAM.

Layout (one process, nothing survives a restart):

* per conversation: a plain list of :class:`StoredMessage` where ``messages[i].seq ==
  i + 1`` (appends always come at the end in seq order, so a list is the sorted
  structure: a range read is one slice), the members as a dict ``uid -> read seq``
  (membership and read cursor in one place), and a dict ``(sender, cid) -> seq`` that
  remembers the keys of the last ``dedup_window`` messages (the idempotency memory);
* per user: the set of its conversations and its inbox, a list of (conv, seq) with a
  dead prefix that is cut off in O(1) amortized steps; and, once written, its
  devices' cursors (a dict ``device -> {conv: seq}`` in write order, so the least
  recently written device is the first one).

Limits: ``max_messages`` and ``max_bytes`` cap what the whole store holds. Reaching
one refuses the append with :class:`~imkit.errors.CapacityError`; nothing stored is
ever evicted, because dropping an acknowledged message breaks the delivery promise.
Give the server a data directory (:class:`~imkit.store.SqliteStore`) to hold more.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NoReturn, cast

from imkit.errors import (
    CapacityError,
    ConfigError,
    ConversationNotFound,
    NotMember,
    StoreError,
    UserNotFound,
)
from imkit.store._base import (
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_CONVERSATIONS_PER_USER,
    DEFAULT_MAX_DEVICES_PER_USER,
    DEFAULT_MAX_INBOX,
    DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_READ_LIMIT,
    MAX_INT,
    MAX_UID_LENGTH,
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

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_MESSAGES",
    "DEFAULT_MAX_STORED_CONVERSATIONS",
    "DEFAULT_MAX_USERS",
    "MemoryStore",
]

#: Max messages held in total. bench_store.py measures ~260 bytes of overhead per
#: message besides its body, so with DEFAULT_MAX_BYTES of bodies the store stays near
#: half a GiB of RAM: an embedded, single-process deployment. Past it, run with a data
#: directory (SqliteStore).
DEFAULT_MAX_MESSAGES = 1_000_000
#: Max body bytes held in total (256 MiB): with DEFAULT_MAX_MESSAGES, the RAM budget.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
#: Max registered users (each costs a set and an inbox; ~1 KiB idle).
DEFAULT_MAX_USERS = 1_000_000
#: Max conversations (each costs ~1 KiB empty; 1:1 chats are created on first message).
DEFAULT_MAX_STORED_CONVERSATIONS = 1_000_000

# An inbox's dead prefix is cut off once it is at least this long and half the list:
# amortized O(1) per entry, at most 2x the live entries in memory.
_COMPACT_MIN = 16


class _Conv:
    __slots__ = ("conv", "frozen", "keys", "kind", "members", "messages")

    def __init__(self, conv: str, kind: ConvKind) -> None:
        self.conv = conv
        self.kind = kind
        self.members: dict[str, int] = {}  # uid -> read seq
        self.frozen: frozenset[str] | None = None  # cached members(); None when stale
        self.messages: list[StoredMessage] = []  # messages[i].seq == i + 1
        self.keys: dict[tuple[str, int], int] = {}  # (sender, cid) -> seq, last W messages


class _User:
    __slots__ = ("convs", "devices", "inbox", "last", "start")

    def __init__(self) -> None:
        self.convs: set[str] = set()
        self.devices: dict[str, dict[str, int]] | None = None  # device -> {conv: seq}
        self.inbox: list[tuple[str, int]] = []  # live entries are inbox[start:]
        self.start = 0
        self.last = 0  # cursor of inbox[-1] (0 before the first entry)


class MemoryStore:
    """All conversations, inboxes, cursors and the registry in process memory.

    Append O(1) amortized, range read O(limit), inbox add O(len(uids)), inbox read
    O(limit), read cursors O(1), join/leave O(1), ``members`` O(1) when unchanged since
    the last call (cached) else O(members). Not thread-safe.

    >>> store = MemoryStore()
    >>> store.create_user("alice"), store.create_user("bob")
    (True, True)
    >>> conv = store.create_direct("alice", "bob")
    >>> store.append(conv, "alice", 1, b"hi", wall_ms=5).seq
    1
    >>> store.append(conv, "alice", 1, b"hi", wall_ms=9).server_ms  # a resend: same message
    5
    >>> [m.body for m in store.read(conv, after_seq=0, limit=10).messages]
    [b'hi']
    """

    #: Nothing survives the process (see :attr:`MessageStore.durable`).
    durable: bool = False

    def __init__(
        self,
        *,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_users: int = DEFAULT_MAX_USERS,
        max_conversations: int = DEFAULT_MAX_STORED_CONVERSATIONS,
        max_members: int = DEFAULT_MAX_MEMBERS,
        max_conversations_per_user: int = DEFAULT_MAX_CONVERSATIONS_PER_USER,
        max_inbox: int = DEFAULT_MAX_INBOX,
        max_read_limit: int = DEFAULT_MAX_READ_LIMIT,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        dedup_window: int | None = DEFAULT_DEDUP_WINDOW,
        max_devices_per_user: int = DEFAULT_MAX_DEVICES_PER_USER,
    ) -> None:
        """An empty store; every limit is documented on its ``DEFAULT_*`` constant. O(1)."""
        self.max_messages = check_positive_setting("max_messages", max_messages)
        self.max_bytes = check_positive_setting("max_bytes", max_bytes)
        self.max_users = check_positive_setting("max_users", max_users)
        self.max_conversations = check_positive_setting("max_conversations", max_conversations)
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
        if dedup_window is not None:
            check_positive_setting("dedup_window", dedup_window)
        self.dedup_window: int | None = dedup_window
        self._convs: dict[str, _Conv] = {}
        self._users: dict[str, _User] = {}
        self._n_messages = 0
        self._n_bytes = 0
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"MemoryStore(users={len(self._users)}, conversations={len(self._convs)}, "
            f"messages={self._n_messages})"
        )

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def message_count(self) -> int:
        """Messages held in total (compare with ``max_messages``). O(1)."""
        return self._n_messages

    @property
    def byte_count(self) -> int:
        """Body bytes held in total (compare with ``max_bytes``). O(1)."""
        return self._n_bytes

    # --- lookups ------------------------------------------------------------------

    def _get_conv(self, conv: str) -> _Conv:
        if self._closed:
            raise StoreError("the store is closed")
        c = self._convs.get(check_conv(conv))
        if c is None:
            raise ConversationNotFound(conv)
        return c

    def _get_user(self, uid: str) -> _User:
        if self._closed:
            raise StoreError("the store is closed")
        u = self._users.get(check_uid(uid))
        if u is None:
            raise UserNotFound(uid)
        return u

    def _ensure_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")

    # --- messages -----------------------------------------------------------------

    def _store(  # noqa: PLR0917 - private hot path, positional on purpose
        self, c: _Conv, sender: str, cid: int, body: bytes, wall_ms: int, msg_id: int
    ) -> StoredMessage:
        messages = c.messages
        seq = len(messages) + 1
        msg = new_message(c.conv, seq, sender, cid, body, msg_id, wall_ms)
        messages.append(msg)
        keys = c.keys
        keys[(sender, cid)] = seq
        window = self.dedup_window
        if window is not None and seq > window:
            # Forget the key of the message that just left the window. (Its key maps to
            # it: a key is stored again only after it left, so never twice in the window.)
            old = messages[seq - window - 1]
            del keys[(old.sender, old.cid)]
        self._n_messages += 1
        self._n_bytes += len(body)
        return msg

    def _refuse(  # noqa: PLR0917 - mirrors append
        self, conv: str, sender: str, cid: int, body: bytes, wall_ms: int, msg_id: int
    ) -> NoReturn:
        """Raise the error append owes these arguments (the fast check found one)."""
        check_new_message(conv, sender, cid, body, msg_id)
        check_int(wall_ms, "wall_ms")
        if len(body) > self.max_body_size:
            raise CapacityError("max_body_size", self.max_body_size, f"body of {len(body)} bytes")
        self._get_conv(conv)
        raise AssertionError("append refused valid arguments")  # pragma: no cover

    def append(
        self, conv: str, sender: str, cid: int, body: bytes, *, wall_ms: int, msg_id: int = 0
    ) -> StoredMessage:
        """Store a message with the next seq of ``conv``; idempotent on (sender, cid).

        A (sender, cid) already among the conversation's last ``dedup_window`` messages
        returns that stored message and stores nothing (beyond the window a resend is
        stored again, under a new seq). Raises ConversationNotFound, ConfigError for
        bad arguments, CapacityError for a body over ``max_body_size`` or a full store
        (nothing is stored then). O(1) amortized.
        """
        # One combined test of every argument on the hot path; the slow path names the
        # first bad one, in the documented order. (A conv found in the dict is valid.)
        c = self._convs.get(conv) if type(conv) is str else None
        size = len(body) if type(body) is bytes else -1
        if (
            c is None
            or type(sender) is not str
            or not 0 < len(sender) <= MAX_UID_LENGTH
            or type(cid) is not int
            or not 0 <= cid <= MAX_INT
            or type(wall_ms) is not int
            or not 0 <= wall_ms <= MAX_INT
            or type(msg_id) is not int
            or not 0 <= msg_id <= MAX_INT
            or not 0 <= size <= self.max_body_size
        ):
            self._refuse(conv, sender, cid, body, wall_ms, msg_id)
        seq = c.keys.get((sender, cid))
        if seq is not None:
            return c.messages[seq - 1]
        if self._n_messages >= self.max_messages:
            raise CapacityError("max_messages", self.max_messages, "the store is full")
        if self._n_bytes + size > self.max_bytes:
            raise CapacityError("max_bytes", self.max_bytes, "the store is full")
        return self._store(c, sender, cid, body, wall_ms, msg_id)

    def append_many(self, items: Iterable[NewMessage], *, wall_ms: int) -> list[StoredMessage]:
        """:meth:`append` each item in order, all or nothing. O(len(items)).

        Every item is checked (arguments, conversation, size, and whether it is a
        resend, exactly as appending one by one would decide) before anything is
        stored, so a CapacityError or a bad item leaves the store unchanged.
        """
        batch = list(items)
        check_int(wall_ms, "wall_ms")
        for item in batch:
            if not isinstance(item, NewMessage):
                raise ConfigError("append_many takes NewMessage items")
            check_new_message(*item)
            size = len(item.body)
            if size > self.max_body_size:
                raise CapacityError("max_body_size", self.max_body_size, f"body of {size} bytes")
        self._ensure_open()
        window = self.dedup_window
        # Dry run: decide, exactly as sequential appends would, which items are new.
        added: dict[str, int] = {}  # conv -> new messages so far in this batch
        local: dict[tuple[str, str, int], int] = {}  # key -> seq it gets in this batch
        new_count = 0
        new_bytes = 0
        for conv, sender, cid, body, _msg_id in batch:
            c = self._get_conv(conv)
            n = added.get(conv, 0)
            top = len(c.messages) + n  # last seq at this point of the batch
            floor = 0 if window is None else top - window  # seqs > floor are remembered
            seq = local.get((conv, sender, cid))
            if seq is None:
                seq = c.keys.get((sender, cid))
            if seq is not None and seq > floor:
                continue
            added[conv] = n + 1
            local[(conv, sender, cid)] = top + 1
            new_count += 1
            new_bytes += len(body)
        if self._n_messages + new_count > self.max_messages:
            raise CapacityError("max_messages", self.max_messages, "the store is full")
        if self._n_bytes + new_bytes > self.max_bytes:
            raise CapacityError("max_bytes", self.max_bytes, "the store is full")
        out = []
        for conv, sender, cid, body, msg_id in batch:
            c = self._convs[conv]
            seq = c.keys.get((sender, cid))
            if seq is not None:
                out.append(c.messages[seq - 1])
            else:
                out.append(self._store(c, sender, cid, body, wall_ms, msg_id))
        return out

    def read(self, conv: str, after_seq: int, limit: int) -> Page:
        """Messages with seq > ``after_seq``, oldest first, at most ``min(limit,
        max_read_limit)``; ``more`` is True when later messages exist. O(limit)."""
        check_conv(conv)
        check_int(after_seq, "after_seq")
        n = min(check_limit(limit), self.max_read_limit)
        c = self._get_conv(conv)
        messages = c.messages
        end = after_seq + n
        return Page(messages=tuple(messages[after_seq:end]), more=end < len(messages))

    def last_seq(self, conv: str) -> int:
        """The highest seq of ``conv``, 0 if it has no message. O(1)."""
        return len(self._get_conv(conv).messages)

    # --- inboxes ------------------------------------------------------------------

    def inbox_add(self, uids: Iterable[str], conv: str, seq: int) -> None:
        """Append (conv, seq) to each user's inbox, once per distinct uid, in one step.

        ``seq`` must be a stored seq of ``conv`` (ConfigError otherwise); an unknown
        uid raises UserNotFound before any inbox changes. A full inbox drops its oldest
        entry. O(len(uids)) amortized.
        """
        check_conv(conv)
        check_int(seq, "seq")
        if isinstance(uids, str | bytes):
            check_uids(uids)  # raises: a bare str is not a list of uids
        try:
            unique = list(dict.fromkeys(uids))
        except TypeError:
            unique = check_uids(uids)  # raises on the unhashable uid
        users = self._users
        targets = [users.get(uid) for uid in unique]
        # A registered uid is well-formed; only on a miss are the formats checked.
        missing = None if None not in targets else unique[targets.index(None)]
        if missing is not None:
            check_uids(unique)
        c = self._get_conv(conv)
        if not 1 <= seq <= len(c.messages):
            raise ConfigError(f"seq {seq} is not a stored seq of {conv!r}")
        if missing is not None:
            raise UserNotFound(missing)
        entry = (c.conv, seq)
        max_inbox = self.max_inbox
        for u in cast(list[_User], targets):  # none missing, checked above
            inbox = u.inbox
            inbox.append(entry)
            u.last += 1
            if len(inbox) - u.start > max_inbox:
                u.start += 1
                if u.start >= _COMPACT_MIN and 2 * u.start >= len(inbox):
                    del inbox[: u.start]
                    u.start = 0

    def inbox_read(self, uid: str, after_cursor: int, limit: int) -> InboxPage:
        """Entries of ``uid`` with cursor > ``after_cursor``, in arrival order, at most
        ``min(limit, max_read_limit)``. See :class:`InboxPage` for ``trimmed``. O(limit)."""
        check_uid(uid)
        check_int(after_cursor, "after_cursor")
        n = min(check_limit(limit), self.max_read_limit)
        u = self._get_user(uid)
        last = u.last
        if after_cursor > last:
            return InboxPage(entries=(), cursor=last, more=False, trimmed=True)
        inbox = u.inbox
        first = last - (len(inbox) - u.start) + 1  # cursor of the oldest live entry
        start = max(after_cursor + 1, first)
        i = u.start + (start - first)
        chunk = inbox[i : i + n]
        entries = tuple(
            InboxEntry(cursor=k, conv=conv, seq=seq)
            for k, (conv, seq) in enumerate(chunk, start)
        )
        cursor = start - 1 + len(chunk)
        return InboxPage(
            entries=entries, cursor=cursor, more=cursor < last, trimmed=start > after_cursor + 1
        )

    def inbox_trim(self, uid: str, through_cursor: int) -> None:
        """Drop the entries of ``uid`` with cursor <= ``through_cursor`` (beyond the last
        entry: all). Later reads from before it report ``trimmed``. O(1) amortized."""
        check_uid(uid)
        check_int(through_cursor, "through_cursor")
        u = self._get_user(uid)
        inbox = u.inbox
        first = u.last - (len(inbox) - u.start) + 1
        drop = min(through_cursor, u.last) - first + 1
        if drop > 0:
            u.start += drop
            if 2 * u.start >= len(inbox):
                del inbox[: u.start]
                u.start = 0

    # --- read cursors -------------------------------------------------------------

    def set_read(self, uid: str, conv: str, seq: int) -> int:
        """Move the read cursor of member ``uid`` in ``conv`` up to ``seq`` (never down);
        return the cursor. ConfigError if ``seq`` is above the last seq (a client may
        not claim to have read what does not exist), NotMember. O(1)."""
        check_conv(conv)
        check_uid(uid)
        check_int(seq, "seq")
        c = self._get_conv(conv)
        if seq > len(c.messages):
            raise ConfigError(f"seq {seq} is beyond the last seq of {conv!r}")
        members = c.members
        old = members.get(uid)
        if old is None:
            raise NotMember(uid, conv)
        if seq > old:
            members[uid] = seq
            return seq
        return old

    def get_read(self, uid: str, conv: str) -> int:
        """The read cursor of ``uid`` in ``conv``: 0 if unset or not a member. O(1)."""
        check_uid(uid)
        c = self._get_conv(conv)
        return c.members.get(uid, 0)

    def read_cursors(self, conv: str) -> dict[str, int]:
        """``uid -> read seq`` of every member who has read something: a receipt for seq
        ``s`` is ``{u for u, r in cursors.items() if r >= s}``. O(members)."""
        c = self._get_conv(conv)
        return {uid: r for uid, r in c.members.items() if r > 0}

    # --- device cursors -------------------------------------------------------------

    def set_device_cursors(self, uid: str, device: str, cursors: Mapping[str, int]) -> None:
        """Move the cursors of ``device`` of ``uid`` up (never down), each clamped to
        its conversation's last seq; conversations ``uid`` is not in are ignored. Past
        ``max_devices_per_user`` the least recently written device is forgotten.
        UserNotFound, ConfigError, CapacityError (more entries than
        ``max_conversations_per_user``). O(len(cursors))."""
        check_uid(uid)
        check_uid(device, "device")
        items = check_cursors(cursors, self.max_conversations_per_user)
        u = self._get_user(uid)
        devices = u.devices
        if devices is None:
            devices = u.devices = {}
        held = devices.pop(device, None)  # re-inserted last: the most recently written
        if held is None:
            held = {}
            if len(devices) >= self.max_devices_per_user:
                del devices[next(iter(devices))]
        devices[device] = held
        convs = self._convs
        for conv, seq in items:
            if conv not in u.convs:
                continue
            top = min(seq, len(convs[conv].messages))
            if top > held.get(conv, 0):
                held[conv] = top

    def device_cursors(self, uid: str, device: str) -> dict[str, int]:
        """The cursors of ``device`` of ``uid`` (a copy; {} for an unknown device).
        UserNotFound. O(conversations of the device)."""
        check_uid(uid)
        check_uid(device, "device")
        devices = self._get_user(uid).devices
        held = None if devices is None else devices.get(device)
        return {} if held is None else dict(held)

    # --- registry -----------------------------------------------------------------

    def create_user(self, uid: str) -> bool:
        """Register ``uid``; False if it already existed. CapacityError past
        ``max_users``. O(1)."""
        check_uid(uid)
        self._ensure_open()
        if uid in self._users:
            return False
        if len(self._users) >= self.max_users:
            raise CapacityError("max_users", self.max_users)
        self._users[uid] = _User()
        return True

    def has_user(self, uid: str) -> bool:
        """Whether ``uid`` is registered. O(1)."""
        check_uid(uid)
        self._ensure_open()
        return uid in self._users

    def _check_can_join(self, uids: list[str]) -> list[_User]:
        users = []
        for uid in uids:
            u = self._users.get(uid)
            if u is None:
                raise UserNotFound(uid)
            users.append(u)
        for uid, u in zip(uids, users, strict=True):
            if len(u.convs) >= self.max_conversations_per_user:
                raise CapacityError(
                    "max_conversations_per_user", self.max_conversations_per_user, uid
                )
        if len(self._convs) >= self.max_conversations:
            raise CapacityError("max_conversations", self.max_conversations)
        return users

    def _create(self, conv: str, kind: ConvKind, uids: list[str]) -> None:
        users = self._check_can_join(uids)
        c = _Conv(conv, kind)
        for uid, u in zip(uids, users, strict=True):
            c.members[uid] = 0
            u.convs.add(conv)
        self._convs[conv] = c

    def create_group(self, conv: str, members: Iterable[str] = ()) -> bool:
        """Create group ``conv`` with ``members``; False (and nothing changes) if
        ``conv`` exists. Ids starting with ``"dm:"`` are reserved for 1:1 chats
        (ConfigError). UserNotFound, CapacityError past ``max_members``,
        ``max_conversations_per_user`` or ``max_conversations``. O(len(members))."""
        check_conv(conv)
        if conv.startswith("dm:"):
            raise ConfigError("conversation ids starting with 'dm:' are reserved for 1:1 chats")
        uids = list(dict.fromkeys(check_uids(members)))
        self._ensure_open()
        if conv in self._convs:
            return False
        if len(uids) > self.max_members:
            raise CapacityError("max_members", self.max_members, f"{len(uids)} members")
        self._create(conv, ConvKind.GROUP, uids)
        return True

    def create_direct(self, a: str, b: str) -> str:
        """Create (if needed) the 1:1 conversation of users ``a`` and ``b`` (``a == b``
        is a note-to-self); return its :func:`direct_conv_id`. UserNotFound,
        CapacityError. O(1)."""
        conv = direct_conv_id(a, b)
        self._ensure_open()
        if conv not in self._convs:
            self._create(conv, ConvKind.DIRECT, list(dict.fromkeys(sorted((a, b)))))
        return conv

    def join(self, uid: str, conv: str) -> bool:
        """Add ``uid`` to group ``conv``; False if already a member. ConfigError for a
        1:1 chat (its members are fixed), UserNotFound, CapacityError. O(1)."""
        check_uid(uid)
        c = self._get_conv(conv)
        if c.kind is ConvKind.DIRECT:
            raise ConfigError("members of a 1:1 conversation are fixed")
        u = self._get_user(uid)
        if uid in c.members:
            return False
        if len(c.members) >= self.max_members:
            raise CapacityError("max_members", self.max_members, conv)
        if len(u.convs) >= self.max_conversations_per_user:
            raise CapacityError("max_conversations_per_user", self.max_conversations_per_user, uid)
        c.members[uid] = 0
        c.frozen = None
        u.convs.add(conv)
        return True

    def leave(self, uid: str, conv: str) -> bool:
        """Remove ``uid`` from group ``conv`` and forget its read and device cursors
        there; False if not a member. ConfigError for a 1:1 chat. O(devices of uid)."""
        check_uid(uid)
        c = self._get_conv(conv)
        if c.kind is ConvKind.DIRECT:
            raise ConfigError("members of a 1:1 conversation are fixed")
        if uid not in c.members:
            return False
        del c.members[uid]
        c.frozen = None
        u = self._users[uid]
        u.convs.discard(conv)
        if u.devices is not None:
            for held in u.devices.values():
                held.pop(conv, None)
        return True

    def members(self, conv: str) -> frozenset[str]:
        """The members of ``conv``. O(1) if unchanged since the last call, else
        O(members)."""
        c = self._get_conv(conv)
        if c.frozen is None:
            c.frozen = frozenset(c.members)
        return c.frozen

    def is_member(self, uid: str, conv: str) -> bool:
        """Whether ``uid`` is a member of ``conv``; False for an unknown conversation. O(1)."""
        check_uid(uid)
        check_conv(conv)
        self._ensure_open()
        c = self._convs.get(conv)
        return c is not None and uid in c.members

    def conversations_of(self, uid: str) -> frozenset[str]:
        """The conversations ``uid`` belongs to. UserNotFound. O(conversations of uid)."""
        return frozenset(self._get_user(uid).convs)

    def conversation(self, conv: str) -> ConversationInfo:
        """Kind, member count and last seq of ``conv``. O(1)."""
        c = self._get_conv(conv)
        return ConversationInfo(
            conv=c.conv, kind=c.kind, member_count=len(c.members), last_seq=len(c.messages)
        )

    # --- lifecycle ----------------------------------------------------------------

    def close(self) -> None:
        """Drop everything; later calls raise StoreError. Idempotent. O(1)."""
        self._closed = True
        self._convs = {}
        self._users = {}
        self._n_messages = 0
        self._n_bytes = 0

    def _check(self) -> None:
        """Assert every invariant (AssertionError naming the broken one). O(everything)."""
        n_messages = 0
        n_bytes = 0
        window = self.dedup_window
        for conv, c in self._convs.items():
            assert c.conv == conv, f"conversation {conv!r} stored under the wrong id"
            msgs = c.messages
            for i, m in enumerate(msgs):
                assert m.seq == i + 1, f"{conv!r}: message {i} has seq {m.seq}"
                assert m.conv == conv, f"{conv!r}: message {m.seq} names {m.conv!r}"
                assert len(m.body) <= self.max_body_size, f"{conv!r}: body over max_body_size"
                n_bytes += len(m.body)
            n_messages += len(msgs)
            recent = msgs if window is None else msgs[-window:]
            assert len(c.keys) == len(recent), f"{conv!r}: {len(c.keys)} dedup keys"
            for m in recent:
                got = c.keys.get((m.sender, m.cid))
                assert got == m.seq, f"{conv!r}: key of seq {m.seq} maps to {got}"
            assert len(c.members) <= self.max_members, f"{conv!r}: too many members"
            for uid, r in c.members.items():
                assert uid in self._users, f"{conv!r}: member {uid!r} is not a user"
                assert conv in self._users[uid].convs, f"{uid!r} misses {conv!r}"
                assert 0 <= r <= len(msgs), f"{conv!r}: read cursor {r} of {uid!r}"
            assert c.frozen is None or c.frozen == set(c.members), f"{conv!r}: stale members"
            if c.kind is ConvKind.DIRECT:
                uids = sorted(c.members)
                assert 1 <= len(uids) <= 2, f"{conv!r}: a 1:1 chat with {len(uids)} members"
                assert direct_conv_id(uids[0], uids[-1]) == conv, f"{conv!r}: wrong members"
            else:
                assert not conv.startswith("dm:"), f"group {conv!r} uses the 1:1 prefix"
        assert n_messages == self._n_messages, "message count out of step"
        assert n_bytes == self._n_bytes, "byte count out of step"
        assert n_messages <= self.max_messages, "over max_messages"
        assert n_bytes <= self.max_bytes, "over max_bytes"
        assert len(self._users) <= self.max_users, "over max_users"
        assert len(self._convs) <= self.max_conversations, "over max_conversations"
        for uid, u in self._users.items():
            assert len(u.convs) <= self.max_conversations_per_user, f"{uid!r}: too many convs"
            for conv in u.convs:
                assert conv in self._convs, f"{uid!r} is in unknown {conv!r}"
                assert uid in self._convs[conv].members, f"{conv!r} misses member {uid!r}"
            if u.devices is not None:
                assert len(u.devices) <= self.max_devices_per_user, f"{uid!r}: too many devices"
                for device, held in u.devices.items():
                    for conv, seq in held.items():
                        assert conv in u.convs, f"{uid!r}/{device!r}: cursor of {conv!r}"
                        last = len(self._convs[conv].messages)
                        assert 1 <= seq <= last, f"{uid!r}/{device!r}: cursor {seq} of {conv!r}"
            live = len(u.inbox) - u.start
            assert 0 <= u.start <= len(u.inbox), f"{uid!r}: inbox start {u.start}"
            assert live <= self.max_inbox, f"{uid!r}: {live} inbox entries"
            assert live <= u.last, f"{uid!r}: inbox cursor {u.last} below {live} entries"
            for conv, seq in u.inbox[u.start :]:
                assert conv in self._convs, f"{uid!r}: inbox names unknown {conv!r}"
                assert 1 <= seq <= len(self._convs[conv].messages), f"{uid!r}: inbox seq {seq}"
