"""Message storage for the logic server: timelines, inboxes, read and device cursors,
registry.

:class:`MessageStore` is the interface; :class:`MemoryStore` (the embedded default,
everything in RAM) and :class:`SqliteStore` (persistent, one SQLite file) implement it
and pass the same conformance suite. :func:`open_store` picks one: memory without a
data directory, SQLite with one. :class:`AsyncMessageStore` is the same interface
awaited, for event-loop servers (``imkit.aio.ThreadedStore`` and
``imkit.aio.InlineStore`` adapt a ``MessageStore`` to it). See docs/store.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from imkit.errors import StoreError
from imkit.store._async import AsyncMessageStore
from imkit.store._base import (
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_CONVERSATIONS_PER_USER,
    DEFAULT_MAX_DEVICES_PER_USER,
    DEFAULT_MAX_INBOX,
    DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_READ_LIMIT,
    MAX_CONV_LENGTH,
    MAX_UID_LENGTH,
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
from imkit.store.memory import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_MESSAGES,
    DEFAULT_MAX_STORED_CONVERSATIONS,
    DEFAULT_MAX_USERS,
    MemoryStore,
)
from imkit.store.sqlite import SqliteStore

__all__ = [
    "DEFAULT_DEDUP_WINDOW",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_CONVERSATIONS_PER_USER",
    "DEFAULT_MAX_DEVICES_PER_USER",
    "DEFAULT_MAX_INBOX",
    "DEFAULT_MAX_MEMBERS",
    "DEFAULT_MAX_MESSAGES",
    "DEFAULT_MAX_READ_LIMIT",
    "DEFAULT_MAX_STORED_CONVERSATIONS",
    "DEFAULT_MAX_USERS",
    "MAX_CONV_LENGTH",
    "MAX_UID_LENGTH",
    "STORE_FILENAME",
    "AsyncMessageStore",
    "ConvKind",
    "ConversationInfo",
    "InboxEntry",
    "InboxPage",
    "MemoryStore",
    "MessageStore",
    "NewMessage",
    "Page",
    "SqliteStore",
    "StoredMessage",
    "direct_conv_id",
    "open_store",
]

#: The database file :func:`open_store` keeps in a data directory.
STORE_FILENAME = "imkit-store.sqlite3"


def open_store(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_conversations_per_user: int = DEFAULT_MAX_CONVERSATIONS_PER_USER,
    max_inbox: int = DEFAULT_MAX_INBOX,
    max_read_limit: int = DEFAULT_MAX_READ_LIMIT,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
) -> MessageStore:
    """The default store: a :class:`MemoryStore` without ``data_dir``, else a
    :class:`SqliteStore` in ``data_dir/imkit-store.sqlite3`` (the directory is
    created). The limits are those every store shares. O(1) plus opening the file."""
    if data_dir is None:
        return MemoryStore(
            max_members=max_members,
            max_conversations_per_user=max_conversations_per_user,
            max_inbox=max_inbox,
            max_read_limit=max_read_limit,
            max_body_size=max_body_size,
        )
    directory = Path(data_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create data directory {str(directory)!r}: {e}") from e
    return SqliteStore(
        directory / STORE_FILENAME,
        max_members=max_members,
        max_conversations_per_user=max_conversations_per_user,
        max_inbox=max_inbox,
        max_read_limit=max_read_limit,
        max_body_size=max_body_size,
    )
