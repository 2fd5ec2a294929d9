"""Tests of the awaited store adapters (imkit.aio.ThreadedStore, InlineStore): the
conformance suite through them, call order, the queue limit, and an event loop that
keeps running while the worker is busy."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from hypothesis import settings

from imkit.aio import (
    DEFAULT_MAX_QUEUED_CALLS,
    InlineStore,
    ThreadedStore,
    async_store,
)
from imkit.errors import CapacityError, ConfigError, StoreError
from imkit.store import (
    AsyncMessageStore,
    MemoryStore,
    MessageStore,
    NewMessage,
    SqliteStore,
    StoredMessage,
)
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

T = TypeVar("T")


def _typed(threaded: ThreadedStore, inline: InlineStore) -> list[AsyncMessageStore]:
    """Static check (mypy): both adapters implement the AsyncMessageStore protocol."""
    return [threaded, inline]


class Blocking:
    """A synchronous MessageStore over an awaited one, for the conformance suite: each
    call runs to completion on a private event loop (the adapter under test does the
    real work: a thread hop for ThreadedStore)."""

    def __init__(self, inner: ThreadedStore | InlineStore) -> None:
        self.inner = inner
        self.loop = asyncio.new_event_loop()

    @property
    def dedup_window(self) -> int | None:
        return self.inner.dedup_window

    @property
    def durable(self) -> bool:
        return self.inner.durable

    @property
    def path(self) -> str:
        return cast(SqliteStore, self.inner.store).path

    def _check(self) -> None:
        self.loop.run_until_complete(self.inner._check())

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.run_until_complete(self.inner.aclose())
        self.loop.close()

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self.inner, name)
        if self.loop.is_closed():  # after close(): the adapter must still answer (an error)
            return asyncio.run(method(*args, **kwargs))
        return self.loop.run_until_complete(method(*args, **kwargs))


def _blocking_verb(name: str) -> Callable[..., Any]:
    def verb(self: Blocking, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, *args, **kwargs)

    verb.__name__ = name
    return verb


# real methods, not __getattr__: runtime_checkable isinstance looks them up statically
# (Python 3.12+)
for _verb in (
    "append", "append_many", "read", "last_seq", "inbox_add", "inbox_read", "inbox_trim",
    "set_read", "get_read", "read_cursors", "set_device_cursors", "device_cursors",
    "create_user", "has_user", "create_group", "create_direct", "join", "leave", "members",
    "is_member", "conversations_of", "conversation",
):  # fmt: skip
    setattr(Blocking, _verb, _blocking_verb(_verb))


class ThreadedSqliteBackend:
    """SqliteStores, each behind a ThreadedStore (its calls on a worker thread)."""

    name = "sqlite-threaded"
    persistent = True

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.limits: dict[str, dict[str, int]] = {}

    def make(self, **limits: int) -> MessageStore:
        path = self.directory / f"store{len(self.limits)}.sqlite3"
        self.limits[str(path)] = limits
        sqlite = SqliteStore(path, synchronous="NORMAL", **limits)
        return cast(MessageStore, Blocking(ThreadedStore(sqlite)))

    def reopen(self, store: MessageStore) -> MessageStore:
        assert isinstance(store, Blocking)
        path = store.path
        store.close()
        sqlite = SqliteStore(path, synchronous="NORMAL", **self.limits[path])
        return cast(MessageStore, Blocking(ThreadedStore(sqlite)))


class InlineMemoryBackend:
    """MemoryStores behind an InlineStore."""

    name = "memory-inline"
    persistent = False

    def make(self, **limits: int) -> MessageStore:
        return cast(MessageStore, Blocking(InlineStore(MemoryStore(**limits))))

    def reopen(self, store: MessageStore) -> MessageStore:
        raise NotImplementedError("a MemoryStore does not persist")


@pytest.fixture(params=["sqlite-threaded", "memory-inline"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each conformance test runs once per adapter."""
    if request.param == "memory-inline":
        return InlineMemoryBackend()
    return ThreadedSqliteBackend(tmp_path)


ThreadedMachine = make_store_machine(ThreadedSqliteBackend)
ThreadedMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=40)
TestThreadedSqliteMachine = ThreadedMachine.TestCase


def run(main: Callable[[], Coroutine[Any, Any, T]], timeout_s: float = 20.0) -> T:
    """Run ``main()`` on a fresh event loop, bounded by ``timeout_s``."""

    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout_s)

    return asyncio.run(bounded())


class SlowStore:
    """A MemoryStore whose appends sleep ``delay_s`` (in the calling thread) and record
    which thread ran them and in what order."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.inner = MemoryStore()
        self.delay_s = delay_s
        self.order: list[int] = []
        self.threads: set[int] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def append(
        self, conv: str, sender: str, cid: int, body: bytes, *, wall_ms: int, msg_id: int = 0
    ) -> StoredMessage:
        self.threads.add(threading.get_ident())
        if self.delay_s:
            time.sleep(self.delay_s)
        self.order.append(cid)
        return self.inner.append(conv, sender, cid, body, wall_ms=wall_ms, msg_id=msg_id)


def _seeded(delay_s: float = 0.0) -> SlowStore:
    slow = SlowStore(delay_s)
    slow.inner.create_user("alice")
    slow.inner.create_group("g", ["alice"])
    return slow


class TestThreadedStore:
    def test_calls_run_on_one_worker_thread_in_call_order(self) -> None:
        """500 appends started together run on one thread other than the loop's, in order."""

        async def main() -> tuple[list[int], set[int], list[int]]:
            slow = _seeded()
            store = ThreadedStore(cast(MessageStore, slow))
            calls = [store.append("g", "alice", cid, b"x", wall_ms=1) for cid in range(500)]
            stored = await asyncio.gather(*calls)
            await store.aclose()
            return slow.order, slow.threads, [m.seq for m in stored]

        order, threads, seqs = run(main)
        assert order == list(range(500))
        assert seqs == list(range(1, 501))
        assert len(threads) == 1 and threading.get_ident() not in threads

    def test_the_loop_keeps_running_while_the_worker_is_busy(self) -> None:
        """While one append sleeps 300 ms on the worker, a 10 ms loop ticker keeps ticking."""

        async def main() -> tuple[int, int]:
            store = ThreadedStore(cast(MessageStore, _seeded(0.3)))
            ticks = 0
            append = asyncio.ensure_future(store.append("g", "alice", 1, b"x", wall_ms=1))
            while not append.done():
                await asyncio.sleep(0.01)
                ticks += 1
            seq = (await append).seq
            await store.aclose()
            return ticks, seq

        ticks, seq = run(main)
        assert seq == 1
        assert ticks >= 3  # an inline call would block the loop: 0 ticks

    def test_past_max_queued_a_call_fails_at_once_and_changes_nothing(self) -> None:
        """With max_queued=3 held, the fourth call raises CapacityError; the three complete."""

        async def main() -> tuple[str, int, list[int], int]:
            slow = _seeded(0.05)
            store = ThreadedStore(cast(MessageStore, slow), max_queued=3)
            held = [
                asyncio.ensure_future(store.append("g", "alice", cid, b"x", wall_ms=1))
                for cid in range(3)
            ]
            await asyncio.sleep(0)  # the three are submitted
            with pytest.raises(CapacityError) as refused:
                await store.append("g", "alice", 99, b"x", wall_ms=1)
            seqs = [m.seq for m in await asyncio.gather(*held)]
            after = (await store.append("g", "alice", 3, b"x", wall_ms=1)).seq  # room again
            await store.aclose()
            return refused.value.limit, store.refused, seqs, after

        limit, refused, seqs, after = run(main)
        assert limit == "max_queued"
        assert refused == 1
        assert seqs == [1, 2, 3]
        assert after == 4

    def test_aclose_finishes_queued_calls_then_refuses_new_ones(self) -> None:
        """Calls made before aclose() complete; later ones raise StoreError; aclose twice is
        fine."""

        async def main() -> tuple[list[int], bool]:
            slow = _seeded(0.01)
            store = ThreadedStore(cast(MessageStore, slow))
            calls = [
                asyncio.ensure_future(store.append("g", "alice", cid, b"x", wall_ms=1))
                for cid in range(5)
            ]
            await asyncio.sleep(0)
            await store.aclose()
            await store.aclose()
            with pytest.raises(StoreError):
                await store.has_user("alice")
            return [m.seq for m in await asyncio.gather(*calls)], slow.inner._closed

        seqs, closed = run(main)
        assert seqs == [1, 2, 3, 4, 5]
        assert closed

    def test_run_calls_a_function_with_the_store_on_the_worker(self) -> None:
        """run(fn, *args) is fn(store, *args) on the worker thread, in order with the rest."""

        async def main() -> tuple[int, bool]:
            store = ThreadedStore(SqliteStore(":memory:"))
            await store.create_user("alice")

            def on_worker(s: MessageStore, uid: str) -> tuple[int, bool]:
                return threading.get_ident(), s.has_user(uid)

            ident, known = await store.run(on_worker, "alice")
            await store.aclose()
            return ident, known and ident != threading.get_ident()

        _ident, ok = run(main)
        assert ok

    def test_a_bad_limit_is_a_config_error(self) -> None:
        """max_queued must be an int >= 1."""
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ConfigError):
                ThreadedStore(MemoryStore(), max_queued=bad)  # type: ignore[arg-type]
        assert DEFAULT_MAX_QUEUED_CALLS >= 1


class TestAsyncStore:
    def test_memory_is_inline_and_anything_else_is_threaded(self) -> None:
        """async_store: a MemoryStore is called inline; an SqliteStore gets a worker thread."""
        inline = async_store(MemoryStore())
        threaded = async_store(SqliteStore(":memory:"), max_queued=7)
        assert isinstance(inline, InlineStore)
        assert isinstance(threaded, ThreadedStore) and threaded.max_queued == 7
        assert isinstance(inline, AsyncMessageStore) and isinstance(threaded, AsyncMessageStore)
        run(threaded.aclose)

    def test_inline_calls_run_on_the_loop_thread(self) -> None:
        """InlineStore runs the store's method in the caller's thread (no hop)."""

        async def main() -> set[int]:
            slow = _seeded()
            store = InlineStore(cast(MessageStore, slow))
            await store.append_many([NewMessage("g", "alice", 1, b"x")], wall_ms=1)
            await store.append("g", "alice", 2, b"x", wall_ms=1)
            return slow.threads

        assert run(main) == {threading.get_ident()}

