"""Store adapters: a synchronous :class:`~imkit.store.MessageStore` behind the
awaited :class:`~imkit.store.AsyncMessageStore` interface.

* :class:`ThreadedStore` runs every call on **one** dedicated worker thread, in the
  order the calls were made (a ``ThreadPoolExecutor`` with one worker: its queue is
  FIFO), so the event loop never waits for SQLite. At most ``max_queued`` calls wait
  or run at once; past that a call fails at once with
  :class:`~imkit.errors.CapacityError` instead of queueing without end.
* :class:`InlineStore` calls a store that never blocks (``MemoryStore``) inline: a
  thread hop (~110 us round trip on a 2-vCPU VM: two thread wake-ups; ~20 us a call
  when calls are pipelined) would cost a hundred times the memory store's work
  (~0.1-1 us). See docs/design.md for the figures.
* :func:`async_store` picks one: inline for a ``MemoryStore``, threaded otherwise.

Cancelling a caller while its call waits in the queue drops the call; a call the
worker already started runs to its end (its result is dropped). A store is used
by its worker only: do not call the wrapped store from elsewhere while the adapter
is open (:meth:`ThreadedStore.run` runs any function on the worker, in order).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar

from imkit.errors import CapacityError, ConfigError, StoreError
from imkit.store import (
    ConversationInfo,
    InboxPage,
    MemoryStore,
    MessageStore,
    NewMessage,
    Page,
    StoredMessage,
)

__all__ = ["DEFAULT_MAX_QUEUED_CALLS", "InlineStore", "ThreadedStore", "async_store"]

_T = TypeVar("_T")
_P = ParamSpec("_P")

#: Store calls a :class:`ThreadedStore` holds at once (queued or running). An SQLite
#: append takes ~28 us (36k/s in a file, synchronous=NORMAL; ~60 us with FULL,
#: benchmarks/results/bench_store.md), so 10,000 calls are 0.3-0.6 s of worker time:
#: one call for each of a gateway's 10,000 connections at once still fits, while a
#: deeper queue would only add latency past the point where clients time out. A
#: refused send is answered SERVER_BUSY and resent with the same cid.
DEFAULT_MAX_QUEUED_CALLS = 10_000


class _Adapter:
    """What both adapters pass through from the blocking store they wrap."""

    store: MessageStore

    @property
    def dedup_window(self) -> int | None:
        """The wrapped store's ``dedup_window``."""
        return self.store.dedup_window

    @property
    def durable(self) -> bool:
        """The wrapped store's ``durable``."""
        return self.store.durable


class ThreadedStore(_Adapter):
    """A synchronous :class:`~imkit.store.MessageStore` run on one worker thread.

    Each call is queued to the worker (calls run one at a time, in call order) and
    awaited; the event loop keeps running meanwhile. O(1) per call on the loop, plus
    the store's own cost on the worker. ``max_queued``: calls held at once (queued or
    running); one more raises CapacityError(``max_queued``) at once.

    Create it anywhere; await its calls from one event loop. :meth:`aclose` finishes
    the calls already made, closes the store on the worker and stops the thread.
    """

    def __init__(
        self,
        store: MessageStore,
        *,
        max_queued: int = DEFAULT_MAX_QUEUED_CALLS,
        thread_name: str = "imkit-store",
    ) -> None:
        if type(max_queued) is not int or max_queued < 1:
            raise ConfigError(f"max_queued must be an int >= 1, got {max_queued!r}")
        self.store = store
        self.max_queued = max_queued
        #: Calls held now (queued or running).
        self.queued = 0
        #: Calls refused because ``max_queued`` were held.
        self.refused = 0
        self._pool: concurrent.futures.ThreadPoolExecutor | None = (
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        )
        # outcomes the worker finished, handed to the loop in batches: one wake-up
        # (call_soon_threadsafe) per batch, not per call, when the loop is behind
        self._lock = threading.Lock()
        self._finished: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self._waking = False

    def __repr__(self) -> str:
        return f"ThreadedStore({self.store!r}, queued={self.queued}/{self.max_queued})"

    def _work(
        self, loop: asyncio.AbstractEventLoop, call: Callable[[], Any], future: asyncio.Future[Any]
    ) -> None:
        """On the worker: run ``call`` (unless its caller gave up) and hand the outcome
        to the loop."""
        value: Any = None
        error: BaseException | None = None
        if not future.cancelled():  # a caller cancelled while queued: drop the call
            try:
                value = call()
            except BaseException as e:  # handed to the caller, whatever it is
                error = e
        with self._lock:
            self._finished.append((future, value, error))
            if self._waking:
                return  # a wake-up is already on its way; it takes this one too
            self._waking = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        """On the loop: complete the futures of the calls the worker finished."""
        with self._lock:
            finished, self._finished = self._finished, []
            self._waking = False
        self.queued -= len(finished)
        for future, value, error in finished:
            if future.done():
                continue
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)

    def _submit(self, call: Callable[[], _T]) -> asyncio.Future[_T]:
        pool = self._pool
        if pool is None:
            # closed: the closed store answers at once, without I/O, with the errors
            # every store gives in the documented order (ConfigError, then StoreError)
            call()
            raise StoreError("the store is closed")  # (a store that did not refuse)
        if self.queued >= self.max_queued:
            self.refused += 1
            raise CapacityError("max_queued", self.max_queued, "store calls waiting")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        pool.submit(self._work, loop, call, future)
        self.queued += 1
        return future

    async def run(
        self, fn: Callable[Concatenate[MessageStore, _P], _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """``fn(store, *args, **kwargs)`` on the worker, in order with the other calls.

        For what the interface lacks (an admin command, several calls in a row that
        must see one state). O(1) on the loop.
        """
        return await self._submit(functools.partial(fn, self.store, *args, **kwargs))

    # messages
    async def append(
        self, conv: str, sender: str, cid: int, body: bytes, *, wall_ms: int, msg_id: int = 0
    ) -> StoredMessage:
        """:meth:`MessageStore.append <imkit.store.MessageStore.append>` on the worker."""
        return await self._submit(
            functools.partial(
                self.store.append, conv, sender, cid, body, wall_ms=wall_ms, msg_id=msg_id
            )
        )

    async def append_many(
        self, items: Iterable[NewMessage], *, wall_ms: int
    ) -> list[StoredMessage]:
        """``append_many`` on the worker (``items`` is copied first)."""
        batch = list(items)
        return await self._submit(
            functools.partial(self.store.append_many, batch, wall_ms=wall_ms)
        )

    async def read(self, conv: str, after_seq: int, limit: int) -> Page:
        """``read`` on the worker."""
        return await self._submit(functools.partial(self.store.read, conv, after_seq, limit))

    async def last_seq(self, conv: str) -> int:
        """``last_seq`` on the worker."""
        return await self._submit(functools.partial(self.store.last_seq, conv))

    # inboxes
    async def inbox_add(self, uids: Iterable[str], conv: str, seq: int) -> None:
        """``inbox_add`` on the worker (``uids`` is copied first)."""
        members = uids if isinstance(uids, str | frozenset) else list(uids)
        await self._submit(functools.partial(self.store.inbox_add, members, conv, seq))

    async def inbox_read(self, uid: str, after_cursor: int, limit: int) -> InboxPage:
        """``inbox_read`` on the worker."""
        return await self._submit(
            functools.partial(self.store.inbox_read, uid, after_cursor, limit)
        )

    async def inbox_trim(self, uid: str, through_cursor: int) -> None:
        """``inbox_trim`` on the worker."""
        await self._submit(functools.partial(self.store.inbox_trim, uid, through_cursor))

    # read cursors
    async def set_read(self, uid: str, conv: str, seq: int) -> int:
        """``set_read`` on the worker."""
        return await self._submit(functools.partial(self.store.set_read, uid, conv, seq))

    async def get_read(self, uid: str, conv: str) -> int:
        """``get_read`` on the worker."""
        return await self._submit(functools.partial(self.store.get_read, uid, conv))

    async def read_cursors(self, conv: str) -> dict[str, int]:
        """``read_cursors`` on the worker."""
        return await self._submit(functools.partial(self.store.read_cursors, conv))

    # device cursors
    async def set_device_cursors(
        self, uid: str, device: str, cursors: Mapping[str, int]
    ) -> None:
        """``set_device_cursors`` on the worker (``cursors`` is copied first)."""
        snapshot = dict(cursors) if isinstance(cursors, Mapping) else cursors
        await self._submit(
            functools.partial(self.store.set_device_cursors, uid, device, snapshot)
        )

    async def device_cursors(self, uid: str, device: str) -> dict[str, int]:
        """``device_cursors`` on the worker."""
        return await self._submit(functools.partial(self.store.device_cursors, uid, device))

    # registry
    async def create_user(self, uid: str) -> bool:
        """``create_user`` on the worker."""
        return await self._submit(functools.partial(self.store.create_user, uid))

    async def has_user(self, uid: str) -> bool:
        """``has_user`` on the worker."""
        return await self._submit(functools.partial(self.store.has_user, uid))

    async def create_group(self, conv: str, members: Iterable[str] = ()) -> bool:
        """``create_group`` on the worker (``members`` is copied first)."""
        uids = members if isinstance(members, str | frozenset) else list(members)
        return await self._submit(functools.partial(self.store.create_group, conv, uids))

    async def create_direct(self, a: str, b: str) -> str:
        """``create_direct`` on the worker."""
        return await self._submit(functools.partial(self.store.create_direct, a, b))

    async def join(self, uid: str, conv: str) -> bool:
        """``join`` on the worker."""
        return await self._submit(functools.partial(self.store.join, uid, conv))

    async def leave(self, uid: str, conv: str) -> bool:
        """``leave`` on the worker."""
        return await self._submit(functools.partial(self.store.leave, uid, conv))

    async def members(self, conv: str) -> frozenset[str]:
        """``members`` on the worker."""
        return await self._submit(functools.partial(self.store.members, conv))

    async def is_member(self, uid: str, conv: str) -> bool:
        """``is_member`` on the worker."""
        return await self._submit(functools.partial(self.store.is_member, uid, conv))

    async def conversations_of(self, uid: str) -> frozenset[str]:
        """``conversations_of`` on the worker."""
        return await self._submit(functools.partial(self.store.conversations_of, uid))

    async def conversation(self, conv: str) -> ConversationInfo:
        """``conversation`` on the worker."""
        return await self._submit(functools.partial(self.store.conversation, conv))

    # lifecycle
    async def aclose(self) -> None:
        """Run the calls already queued, close the store on the worker, stop the thread.

        Later calls raise StoreError. Idempotent.
        """
        pool = self._pool
        if pool is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(pool, self.store.close)
        finally:
            self._pool = None
            pool.shutdown(wait=False)

    async def _check(self) -> None:
        """The wrapped store's ``_check`` on the worker."""
        await self._submit(self.store._check)


class InlineStore(_Adapter):
    """A store that never blocks (``MemoryStore``), awaited without leaving the loop.

    Each call runs the store's method at once, on the loop: O(the store's cost) plus
    one coroutine (~0.1 us). Calls complete in call order by construction.
    """

    def __init__(self, store: MessageStore) -> None:
        self.store = store

    def __repr__(self) -> str:
        return f"InlineStore({self.store!r})"

    async def run(
        self, fn: Callable[Concatenate[MessageStore, _P], _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """``fn(store, *args, **kwargs)`` now. O(fn)."""
        return fn(self.store, *args, **kwargs)

    async def append(
        self, conv: str, sender: str, cid: int, body: bytes, *, wall_ms: int, msg_id: int = 0
    ) -> StoredMessage:
        """:meth:`MessageStore.append <imkit.store.MessageStore.append>`, inline."""
        return self.store.append(conv, sender, cid, body, wall_ms=wall_ms, msg_id=msg_id)

    async def append_many(
        self, items: Iterable[NewMessage], *, wall_ms: int
    ) -> list[StoredMessage]:
        """``append_many``, inline."""
        return self.store.append_many(items, wall_ms=wall_ms)

    async def read(self, conv: str, after_seq: int, limit: int) -> Page:
        """``read``, inline."""
        return self.store.read(conv, after_seq, limit)

    async def last_seq(self, conv: str) -> int:
        """``last_seq``, inline."""
        return self.store.last_seq(conv)

    async def inbox_add(self, uids: Iterable[str], conv: str, seq: int) -> None:
        """``inbox_add``, inline."""
        self.store.inbox_add(uids, conv, seq)

    async def inbox_read(self, uid: str, after_cursor: int, limit: int) -> InboxPage:
        """``inbox_read``, inline."""
        return self.store.inbox_read(uid, after_cursor, limit)

    async def inbox_trim(self, uid: str, through_cursor: int) -> None:
        """``inbox_trim``, inline."""
        self.store.inbox_trim(uid, through_cursor)

    async def set_read(self, uid: str, conv: str, seq: int) -> int:
        """``set_read``, inline."""
        return self.store.set_read(uid, conv, seq)

    async def get_read(self, uid: str, conv: str) -> int:
        """``get_read``, inline."""
        return self.store.get_read(uid, conv)

    async def read_cursors(self, conv: str) -> dict[str, int]:
        """``read_cursors``, inline."""
        return self.store.read_cursors(conv)

    async def set_device_cursors(
        self, uid: str, device: str, cursors: Mapping[str, int]
    ) -> None:
        """``set_device_cursors``, inline."""
        self.store.set_device_cursors(uid, device, cursors)

    async def device_cursors(self, uid: str, device: str) -> dict[str, int]:
        """``device_cursors``, inline."""
        return self.store.device_cursors(uid, device)

    async def create_user(self, uid: str) -> bool:
        """``create_user``, inline."""
        return self.store.create_user(uid)

    async def has_user(self, uid: str) -> bool:
        """``has_user``, inline."""
        return self.store.has_user(uid)

    async def create_group(self, conv: str, members: Iterable[str] = ()) -> bool:
        """``create_group``, inline."""
        return self.store.create_group(conv, members)

    async def create_direct(self, a: str, b: str) -> str:
        """``create_direct``, inline."""
        return self.store.create_direct(a, b)

    async def join(self, uid: str, conv: str) -> bool:
        """``join``, inline."""
        return self.store.join(uid, conv)

    async def leave(self, uid: str, conv: str) -> bool:
        """``leave``, inline."""
        return self.store.leave(uid, conv)

    async def members(self, conv: str) -> frozenset[str]:
        """``members``, inline."""
        return self.store.members(conv)

    async def is_member(self, uid: str, conv: str) -> bool:
        """``is_member``, inline."""
        return self.store.is_member(uid, conv)

    async def conversations_of(self, uid: str) -> frozenset[str]:
        """``conversations_of``, inline."""
        return self.store.conversations_of(uid)

    async def conversation(self, conv: str) -> ConversationInfo:
        """``conversation``, inline."""
        return self.store.conversation(conv)

    async def aclose(self) -> None:
        """Close the store. Idempotent."""
        self.store.close()

    async def _check(self) -> None:
        """The wrapped store's ``_check``."""
        self.store._check()


def async_store(
    store: MessageStore, *, max_queued: int = DEFAULT_MAX_QUEUED_CALLS
) -> ThreadedStore | InlineStore:
    """``store`` behind the awaited interface: :class:`InlineStore` for a
    :class:`~imkit.store.MemoryStore` (it never blocks), else a :class:`ThreadedStore`
    (any other store may block: SQLite, a network backend). O(1).
    """
    if isinstance(store, MemoryStore):
        return InlineStore(store)
    return ThreadedStore(store, max_queued=max_queued)
