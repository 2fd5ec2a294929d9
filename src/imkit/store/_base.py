"""The :class:`MessageStore` interface, its value types, limits and argument checks.

Every backend (:class:`~imkit.store.MemoryStore`, :class:`~imkit.store.SqliteStore`,
later Redis) implements :class:`MessageStore` and passes the same conformance suite
(``tests/store_suite.py``). The values it hands out are small frozen attrs classes.

Vocabulary:

* **conversation** (``conv``): a 1:1 chat (``DIRECT``, id from :func:`direct_conv_id`)
  or a group (``GROUP``). Its messages, in ``seq`` order, are its **timeline**: the
  read fan-out path (a member pulls ``read(conv, after_seq, limit)``).
* **seq**: per conversation, assigned by :meth:`MessageStore.append`, strictly
  increasing, never reused (not even across restarts of a persistent store). Gaps are
  allowed by the contract (a Redis backend may allocate a seq and then fail the write),
  so readers go by what :meth:`MessageStore.read` returns, never by counting.
* **inbox**: per user, the (conversation, seq) entries written to it by write fan-out
  (``inbox_add``), numbered by a per-user **cursor** that increases by one per entry.
* **read cursor**: per (user, conversation), the highest seq the user has read; it
  never moves backwards. Read receipts are derived from it.
* **device cursor**: per (user, device, conversation), the seq up to which that
  device holds the conversation contiguously (learnt by the logic server from
  cumulative push acks and sync requests). An inbox sync of the device starts there,
  so a durable store spares every device a full re-download after a restart.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import NamedTuple, Protocol, runtime_checkable

import attrs

from imkit.errors import CapacityError, ConfigError

__all__ = [
    "DEFAULT_DEDUP_WINDOW",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_MAX_CONVERSATIONS_PER_USER",
    "DEFAULT_MAX_DEVICES_PER_USER",
    "DEFAULT_MAX_INBOX",
    "DEFAULT_MAX_MEMBERS",
    "DEFAULT_MAX_READ_LIMIT",
    "MAX_CONV_LENGTH",
    "MAX_INT",
    "MAX_UID_LENGTH",
    "ConvKind",
    "ConversationInfo",
    "InboxEntry",
    "InboxPage",
    "MessageStore",
    "NewMessage",
    "Page",
    "StoredMessage",
    "direct_conv_id",
]

# --- limits shared by every backend -----------------------------------------------

#: Max members of one group. Telegram caps supergroups at 200k and WhatsApp groups at
#: 1024; 100k is the "超大群" (huge group) size the seed designs for, and it keeps
#: ``members(conv)`` (a full copy) in the tens of milliseconds.
DEFAULT_MAX_MEMBERS = 100_000

#: Max conversations one user belongs to. After an inbox trim the client re-syncs by
#: conversation, so this bounds that work; Telegram allows 500 groups per user, and a
#: heavy user's 1:1 chats stay well under 10k.
DEFAULT_MAX_CONVERSATIONS_PER_USER = 10_000

#: Devices per user whose cursors are kept; writing a new device's cursors past it
#: forgets the device written least recently (it then syncs from 0: correct, more
#: bytes). A user has a phone, a tablet, a laptop and a browser or two; 16 leaves
#: room for reinstalls (each a new device id) without letting one user's device ids
#: grow the store. Per device, at most one cursor per conversation of the user
#: (``max_conversations_per_user``).
DEFAULT_MAX_DEVICES_PER_USER = 16

#: Max (conversation, seq) entries kept per user inbox, oldest trimmed. At ~100
#: messages an hour for a busy user this is about four days offline; past that the
#: client syncs by conversation, which still reaches every message.
DEFAULT_MAX_INBOX = 10_000

#: Max messages one ``read`` returns (larger limits are clamped; ``more`` says to
#: ask again). Ten times the protocol's default sync page (``SyncRequest.limit=100``).
DEFAULT_MAX_READ_LIMIT = 1_000

#: Max body size in bytes: the protocol's 64 KiB frame limit (RELIABILITY.md: "64 KiB
#: is plenty for chat"); a body that cannot arrive in one frame is refused.
DEFAULT_MAX_BODY_SIZE = 65_536

#: How many of a conversation's most recent messages a bounded idempotency memory
#: (the memory store's) remembers the (sender, cid) key of. A client resends only
#: unacked sends, within its reconnect backoff (at most 30 s, ``LoginAck``); at a
#: busy group's ~1000 messages/s that is 30k messages, so 64Ki covers it twice over.
DEFAULT_DEDUP_WINDOW = 65_536

#: Longest user id, in characters (ids are index keys in every backend).
MAX_UID_LENGTH = 128
#: Longest conversation id: room for :func:`direct_conv_id` of two maximal uids.
MAX_CONV_LENGTH = 2 * MAX_UID_LENGTH + 16
#: Largest integer field (cid, msg_id, wall_ms, seq): SQLite's signed 64-bit INTEGER.
MAX_INT = 2**63 - 1


# --- values -----------------------------------------------------------------------


class ConvKind(enum.IntEnum):
    """What a conversation is: a fixed pair of users, or a group with join/leave."""

    DIRECT = 1
    GROUP = 2


@attrs.frozen(kw_only=True)
class StoredMessage:
    """One message as stored: its conversation, seq, sender, the sender's cid, body.

    ``msg_id`` is the caller's global id (e.g. from ``imkit.seq.IdGenerator``; 0 if
    none) and ``server_ms`` the ``wall_ms`` (wall-clock time, ms since the Unix epoch)
    the store was given when it appended it.
    """

    conv: str
    seq: int
    sender: str
    cid: int
    body: bytes
    msg_id: int = 0
    server_ms: int = 0


# The attrs __init__ of a frozen class sets each field through object.__setattr__
# (~600 ns for these seven). Stores build one StoredMessage per append and per message
# read, so they use this factory, which writes the slots through their descriptors
# (~300 ns, bench_store.py); tests check that it builds an equal object.
_new_object = object.__new__
_SET_FIELDS = tuple(
    StoredMessage.__dict__[f.name].__set__ for f in attrs.fields(StoredMessage)
)
(_set_conv, _set_seq, _set_sender, _set_cid, _set_body, _set_msg_id, _set_server_ms) = (
    _SET_FIELDS
)


def new_message(  # noqa: PLR0917 - private hot path, positional on purpose
    conv: str, seq: int, sender: str, cid: int, body: bytes, msg_id: int, server_ms: int
) -> StoredMessage:
    """``StoredMessage(conv=conv, ...)`` for already-validated fields, twice as fast. O(1)."""
    m: StoredMessage = _new_object(StoredMessage)
    _set_conv(m, conv)
    _set_seq(m, seq)
    _set_sender(m, sender)
    _set_cid(m, cid)
    _set_body(m, body)
    _set_msg_id(m, msg_id)
    _set_server_ms(m, server_ms)
    return m


class NewMessage(NamedTuple):
    """One item of :meth:`MessageStore.append_many`: what :meth:`~MessageStore.append` takes."""

    conv: str
    sender: str
    cid: int
    body: bytes
    msg_id: int = 0


@attrs.frozen(kw_only=True)
class Page:
    """The answer to :meth:`MessageStore.read`: messages in seq order, and whether more follow."""

    messages: tuple[StoredMessage, ...]
    more: bool

    @property
    def last_seq(self) -> int:
        """Seq of the last message on the page (0 if the page is empty). O(1)."""
        return self.messages[-1].seq if self.messages else 0


@attrs.frozen(kw_only=True)
class InboxEntry:
    """One inbox entry: message ``seq`` of ``conv`` arrived as this user's ``cursor``."""

    cursor: int
    conv: str
    seq: int


@attrs.frozen(kw_only=True)
class InboxPage:
    """The answer to :meth:`MessageStore.inbox_read`.

    ``cursor``: pass it as ``after_cursor`` next time. ``more``: entries follow.
    ``trimmed``: entries after the ``after_cursor`` asked for are gone (trimmed as the
    inbox overflowed, or the cursor is unknown to this store, e.g. ahead of it): the
    caller must sync by conversation (``conversations_of`` + ``read``) to be complete.
    """

    entries: tuple[InboxEntry, ...]
    cursor: int
    more: bool
    trimmed: bool


@attrs.frozen(kw_only=True)
class ConversationInfo:
    """What :meth:`MessageStore.conversation` reports about a conversation."""

    conv: str
    kind: ConvKind
    member_count: int
    last_seq: int


def direct_conv_id(a: str, b: str) -> str:
    """The canonical id of the 1:1 conversation of users ``a`` and ``b``. O(len).

    Order-free (the smaller uid comes first) and unambiguous for any uids: the first
    uid is length-prefixed, so a ``":"`` inside a uid cannot make two pairs collide.

    >>> direct_conv_id("bob", "alice") == direct_conv_id("alice", "bob") == "dm:5:alice:bob"
    True
    """
    check_uid(a)
    check_uid(b)
    lo, hi = (a, b) if a <= b else (b, a)
    return f"dm:{len(lo)}:{lo}:{hi}"


# --- the interface ----------------------------------------------------------------


@runtime_checkable
class MessageStore(Protocol):
    """What the logic server needs from storage: messages, inboxes, cursors, registry.

    Every method raises only :class:`~imkit.errors.StoreError` subclasses (a backend
    failure is wrapped), :class:`~imkit.errors.ConfigError` for bad arguments and
    :class:`~imkit.errors.CapacityError` when a documented limit refuses a write; a
    refused write changes nothing. A store is not safe for concurrent use: serialize
    calls (one thread, or one worker thread for a blocking backend).
    """

    #: Bounded idempotency memory: (sender, cid) keys of this many most recent
    #: messages per conversation are remembered; ``None``: every message's key.
    dedup_window: int | None
    #: Whether what is stored survives a restart of the process (a file, a server).
    durable: bool

    # messages
    def append(
        self, conv: str, sender: str, cid: int, body: bytes, *, wall_ms: int, msg_id: int = 0
    ) -> StoredMessage:
        """Store a message with the next seq of ``conv``, idempotent on (sender, cid).

        ``wall_ms``: the wall-clock time (ms since the Unix epoch) kept as the
        message's ``server_ms``. Appending the same (sender, cid) to the same
        conversation again returns the originally stored message and stores nothing.
        """
        ...

    def append_many(self, items: Iterable[NewMessage], *, wall_ms: int) -> list[StoredMessage]:
        """:meth:`append` each item in order, all or nothing (one transaction)."""
        ...

    def read(self, conv: str, after_seq: int, limit: int) -> Page:
        """Messages of ``conv`` with seq > ``after_seq``, oldest first, at most ``limit``."""
        ...

    def last_seq(self, conv: str) -> int:
        """The highest seq of ``conv`` (0 if it has no message)."""
        ...

    # inboxes (write fan-out)
    def inbox_add(self, uids: Iterable[str], conv: str, seq: int) -> None:
        """Append (conv, seq) to each user's inbox (each uid once), trimming the oldest."""
        ...

    def inbox_read(self, uid: str, after_cursor: int, limit: int) -> InboxPage:
        """Inbox entries of ``uid`` with cursor > ``after_cursor``, in arrival order."""
        ...

    def inbox_trim(self, uid: str, through_cursor: int) -> None:
        """Drop the entries of ``uid`` up to ``through_cursor`` (the client synced them)."""
        ...

    # read cursors and receipts
    def set_read(self, uid: str, conv: str, seq: int) -> int:
        """Move the read cursor of member ``uid`` in ``conv`` up to ``seq``; return it."""
        ...

    def get_read(self, uid: str, conv: str) -> int:
        """The read cursor of ``uid`` in ``conv`` (0 if unset or not a member)."""
        ...

    def read_cursors(self, conv: str) -> dict[str, int]:
        """Every member's read cursor that is above 0: who has read up to what."""
        ...

    # device cursors (where each device's inbox sync starts)
    def set_device_cursors(self, uid: str, device: str, cursors: Mapping[str, int]) -> None:
        """Move the cursors of ``device`` of ``uid`` up to ``cursors`` (conv -> seq).

        A cursor never moves backwards and is clamped to the conversation's last
        seq; conversations ``uid`` is not a member of are ignored. At most
        ``max_devices_per_user`` devices are kept per user (the least recently
        written is forgotten). One transaction.
        """
        ...

    def device_cursors(self, uid: str, device: str) -> dict[str, int]:
        """The cursors of ``device`` of ``uid`` (conv -> seq; {} for an unknown device)."""
        ...

    # registry
    def create_user(self, uid: str) -> bool:
        """Register ``uid``; False if it already existed."""
        ...

    def has_user(self, uid: str) -> bool:
        """Whether ``uid`` is registered."""
        ...

    def create_group(self, conv: str, members: Iterable[str] = ()) -> bool:
        """Create group ``conv`` with ``members``; False (and no change) if it existed."""
        ...

    def create_direct(self, a: str, b: str) -> str:
        """Create (if needed) the 1:1 conversation of ``a`` and ``b``; return its id."""
        ...

    def join(self, uid: str, conv: str) -> bool:
        """Add ``uid`` to group ``conv``; False if already a member."""
        ...

    def leave(self, uid: str, conv: str) -> bool:
        """Remove ``uid`` from group ``conv`` (and its read and device cursors there);
        False if not a member."""
        ...

    def members(self, conv: str) -> frozenset[str]:
        """The members of ``conv``."""
        ...

    def is_member(self, uid: str, conv: str) -> bool:
        """Whether ``uid`` is a member of ``conv`` (False for an unknown conversation)."""
        ...

    def conversations_of(self, uid: str) -> frozenset[str]:
        """The conversations ``uid`` belongs to."""
        ...

    def conversation(self, conv: str) -> ConversationInfo:
        """Kind, member count and last seq of ``conv``."""
        ...

    # lifecycle
    def close(self) -> None:
        """Release the backend; later calls raise StoreError. Idempotent."""
        ...

    def _check(self) -> None:
        """Assert every invariant of the stored state (AssertionError if broken)."""
        ...


# --- argument checks (shared so every backend rejects the same input the same way) --


def check_uid(uid: object, what: str = "uid") -> str:
    """``uid`` if it is a non-empty str of at most MAX_UID_LENGTH characters."""
    if type(uid) is not str or not uid or len(uid) > MAX_UID_LENGTH:
        raise ConfigError(f"{what} must be a non-empty str of at most {MAX_UID_LENGTH} chars")
    return uid


def check_uids(uids: Iterable[str]) -> list[str]:
    """``uids`` as a list, each checked by :func:`check_uid` (a bare str is refused)."""
    if isinstance(uids, str | bytes):
        raise ConfigError("uids must be an iterable of uids, not a single str")
    return [check_uid(uid) for uid in uids]


def check_conv(conv: object) -> str:
    """``conv`` if it is a non-empty str of at most MAX_CONV_LENGTH characters."""
    if type(conv) is not str or not conv or len(conv) > MAX_CONV_LENGTH:
        raise ConfigError(f"conv must be a non-empty str of at most {MAX_CONV_LENGTH} chars")
    return conv


def check_int(value: object, what: str) -> int:
    """``value`` if it is an int (not a bool) in [0, MAX_INT]."""
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise ConfigError(f"{what} must be an int in [0, 2**63 - 1], got {value!r}")
    return value


def check_cursors(cursors: object, max_entries: int) -> list[tuple[str, int]]:
    """``cursors`` (a mapping conv -> seq) as checked (conv, seq) pairs.

    ConfigError for a non-mapping or a bad conv or seq; CapacityError past
    ``max_entries`` entries (one per conversation of a user is the most that can
    count). O(len(cursors)).
    """
    if not isinstance(cursors, Mapping):
        raise ConfigError("cursors must be a mapping conv -> seq")
    if len(cursors) > max_entries:
        raise CapacityError("max_conversations_per_user", max_entries, f"{len(cursors)} cursors")
    return [(check_conv(conv), check_int(seq, "seq")) for conv, seq in cursors.items()]


def check_limit(limit: object, what: str = "limit") -> int:
    """``limit`` if it is an int >= 1."""
    if type(limit) is not int or limit < 1:
        raise ConfigError(f"{what} must be an int >= 1, got {limit!r}")
    return limit


def check_positive_setting(name: str, value: object) -> int:
    """A constructor limit: an int >= 1 (ConfigError names the keyword)."""
    if type(value) is not int or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_new_message(
    conv: object, sender: object, cid: object, body: object, msg_id: object
) -> None:
    """Type and range checks of one message to append (not the body size limit)."""
    check_conv(conv)
    check_uid(sender, "sender")
    check_int(cid, "cid")
    check_int(msg_id, "msg_id")
    if type(body) is not bytes:
        raise ConfigError(f"body must be bytes, got {type(body).__name__}")
