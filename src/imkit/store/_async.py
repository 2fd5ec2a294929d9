"""The :class:`AsyncMessageStore` interface: :class:`~imkit.store.MessageStore` with
every verb awaited.

An event-loop server (the reference logic server) must never wait for storage on
its loop: an SQLite commit with fsync, or a long range read, would stall every
connection of the process. It therefore talks to an ``AsyncMessageStore``:

* :class:`imkit.aio.ThreadedStore` runs any synchronous ``MessageStore`` on one
  dedicated worker thread, in call order (SQLite; any blocking backend);
* :class:`imkit.aio.InlineStore` calls a store that never blocks (``MemoryStore``)
  directly: a thread hop would cost more than the work;
* a natively asynchronous backend (PostgreSQL through asyncpg) implements it as is.

The verbs, arguments, results and errors are those of ``MessageStore`` (see it for
each contract); only ``close`` becomes ``aclose`` (async closers are ``aclose``).
This module imports no event loop: a Protocol of ``async def`` needs none, so
floor 2 stays loop-agnostic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

from imkit.store._base import (
    ConversationInfo,
    InboxPage,
    NewMessage,
    Page,
    StoredMessage,
)

__all__ = ["AsyncMessageStore"]


@runtime_checkable
class AsyncMessageStore(Protocol):
    """:class:`~imkit.store.MessageStore`, awaited: the same verbs, results and errors.

    Calls complete in the order they were made (an adapter over a synchronous store
    serializes them; a native backend must keep the order of one caller's calls).
    An adapter may refuse a call with :class:`~imkit.errors.CapacityError` when its
    documented queue limit is reached (nothing is done then).
    """

    @property
    def dedup_window(self) -> int | None:
        """See :attr:`MessageStore.dedup_window <imkit.store.MessageStore.dedup_window>`."""
        ...

    @property
    def durable(self) -> bool:
        """Whether what is stored survives a restart of the process."""
        ...

    # messages
    async def append(
        self, conv: str, sender: str, cid: int, body: bytes, *, wall_ms: int, msg_id: int = 0
    ) -> StoredMessage:
        """Store a message with the next seq of ``conv``, idempotent on (sender, cid)."""
        ...

    async def append_many(
        self, items: Iterable[NewMessage], *, wall_ms: int
    ) -> list[StoredMessage]:
        """Append each item in order, all or nothing (one transaction)."""
        ...

    async def read(self, conv: str, after_seq: int, limit: int) -> Page:
        """Messages of ``conv`` with seq > ``after_seq``, oldest first, at most ``limit``."""
        ...

    async def last_seq(self, conv: str) -> int:
        """The highest seq of ``conv`` (0 if it has no message)."""
        ...

    # inboxes
    async def inbox_add(self, uids: Iterable[str], conv: str, seq: int) -> None:
        """Append (conv, seq) to each user's inbox (each uid once), trimming the oldest."""
        ...

    async def inbox_read(self, uid: str, after_cursor: int, limit: int) -> InboxPage:
        """Inbox entries of ``uid`` with cursor > ``after_cursor``, in arrival order."""
        ...

    async def inbox_trim(self, uid: str, through_cursor: int) -> None:
        """Drop the entries of ``uid`` up to ``through_cursor``."""
        ...

    # read cursors
    async def set_read(self, uid: str, conv: str, seq: int) -> int:
        """Move the read cursor of member ``uid`` in ``conv`` up to ``seq``; return it."""
        ...

    async def get_read(self, uid: str, conv: str) -> int:
        """The read cursor of ``uid`` in ``conv`` (0 if unset or not a member)."""
        ...

    async def read_cursors(self, conv: str) -> dict[str, int]:
        """Every member's read cursor that is above 0."""
        ...

    # device cursors
    async def set_device_cursors(
        self, uid: str, device: str, cursors: Mapping[str, int]
    ) -> None:
        """Move the cursors of ``device`` of ``uid`` up to ``cursors`` (conv -> seq)."""
        ...

    async def device_cursors(self, uid: str, device: str) -> dict[str, int]:
        """The cursors of ``device`` of ``uid`` (conv -> seq)."""
        ...

    # registry
    async def create_user(self, uid: str) -> bool:
        """Register ``uid``; False if it already existed."""
        ...

    async def has_user(self, uid: str) -> bool:
        """Whether ``uid`` is registered."""
        ...

    async def create_group(self, conv: str, members: Iterable[str] = ()) -> bool:
        """Create group ``conv`` with ``members``; False (and no change) if it existed."""
        ...

    async def create_direct(self, a: str, b: str) -> str:
        """Create (if needed) the 1:1 conversation of ``a`` and ``b``; return its id."""
        ...

    async def join(self, uid: str, conv: str) -> bool:
        """Add ``uid`` to group ``conv``; False if already a member."""
        ...

    async def leave(self, uid: str, conv: str) -> bool:
        """Remove ``uid`` from group ``conv``; False if not a member."""
        ...

    async def members(self, conv: str) -> frozenset[str]:
        """The members of ``conv``."""
        ...

    async def is_member(self, uid: str, conv: str) -> bool:
        """Whether ``uid`` is a member of ``conv``."""
        ...

    async def conversations_of(self, uid: str) -> frozenset[str]:
        """The conversations ``uid`` belongs to."""
        ...

    async def conversation(self, conv: str) -> ConversationInfo:
        """Kind, member count and last seq of ``conv``."""
        ...

    # lifecycle
    async def aclose(self) -> None:
        """Finish the calls already made, then release the backend. Idempotent."""
        ...

    async def _check(self) -> None:
        """Assert every invariant of the stored state (AssertionError if broken)."""
        ...
