"""The in-process bus on asyncio: :class:`MemoryBus`, an :class:`imkit.bus.Bus`.

A thin adapter over the sans-IO :class:`imkit.bus.Fanout`: publishing never waits
(a full subscriber lags or, if it chose REJECT, the publish raises CapacityError);
a subscriber waits on a future that the inbox's ``on_ready`` callback resolves, one
wake-up per empty -> non-empty transition rather than one per envelope.

Single loop, single thread: publish and consume from the loop that runs them.
Payloads are shared by reference between subscribers, not copied: publish
immutable objects (bytes, frozen messages).
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

from imkit.bus import (
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_SUBJECTS,
    DEFAULT_MAX_SUBSCRIBERS,
    Envelope,
    Fanout,
    Inbox,
    Lagged,
    Overflow,
    PublishResult,
)
from imkit.errors import StateError

__all__ = ["MemoryBus", "MemorySubscription"]

T = TypeVar("T")


class MemorySubscription(Generic[T]):
    """One subscriber of a :class:`MemoryBus`: an async iterator of envelopes and markers.

    ``next`` is O(1) when something is queued; otherwise it waits for one wake-up.
    """

    def __init__(self, fanout: Fanout[T], subject: str, max_pending: int, overflow: Overflow):
        self._fanout = fanout
        self._waiter: asyncio.Future[None] | None = None
        self._inbox: Inbox[T] = fanout.subscribe(
            subject, max_pending=max_pending, overflow=overflow, on_ready=self._wake
        )

    @property
    def subject(self) -> str:
        """The subject this subscription receives."""
        return self._inbox.subject

    @property
    def closed(self) -> bool:
        """True once closed (by :meth:`aclose` or the bus)."""
        return self._inbox.closed

    def __len__(self) -> int:
        """Envelopes queued and not yet read. O(1)."""
        return len(self._inbox)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get_nowait(self) -> Envelope[T] | Lagged | None:
        """The next item if one is queued, else None (also once closed). O(1)."""
        return self._inbox.pop()

    async def next(self) -> Envelope[T] | Lagged:
        """The next item, waiting for one. Raises StopAsyncIteration once closed. O(1)."""
        inbox = self._inbox
        while True:
            item = inbox.pop()
            if item is not None:
                return item
            if inbox.closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def __aiter__(self) -> AsyncIterator[Envelope[T] | Lagged]:
        """Iterate until closed."""
        return self

    async def __anext__(self) -> Envelope[T] | Lagged:
        """Same as :meth:`next`."""
        return await self.next()

    async def aclose(self) -> None:
        """Stop receiving and drop what is queued; a waiting ``next`` ends. Idempotent. O(1)."""
        self.close_nowait()

    async def close(self) -> None:
        """Deprecated alias of :meth:`aclose` (async closers are ``aclose``, as in trio).

        Kept for one release; emits DeprecationWarning.
        """
        warnings.warn(
            "MemorySubscription.close() is deprecated, use aclose()",
            DeprecationWarning,
            stacklevel=2,
        )
        await self.aclose()

    def close_nowait(self) -> None:
        """Synchronous :meth:`aclose`."""
        self._fanout.unsubscribe(self._inbox)
        self._wake()


class MemoryBus(Generic[T]):
    """An in-process :class:`imkit.bus.Bus` with bounded per-subscriber queues.

    ``publish`` O(s) for s subscribers of the subject, never waits; ``subscribe`` O(1).

    >>> import asyncio
    >>> async def demo() -> list[object]:
    ...     bus: MemoryBus[bytes] = MemoryBus()
    ...     sub = await bus.subscribe("gw-1")
    ...     await bus.publish("gw-1", b"hello")
    ...     return [(await sub.next()).payload]  # type: ignore[union-attr]
    >>> asyncio.run(demo())
    [b'hello']
    """

    def __init__(
        self,
        *,
        max_subjects: int = DEFAULT_MAX_SUBJECTS,
        max_subscribers: int = DEFAULT_MAX_SUBSCRIBERS,
    ) -> None:
        self._fanout: Fanout[T] = Fanout(max_subjects=max_subjects, max_subscribers=max_subscribers)
        self._subs: set[MemorySubscription[T]] = set()
        self._closed = False

    @property
    def fanout(self) -> Fanout[T]:
        """The sans-IO core (for inspection and ``_check()``)."""
        return self._fanout

    def publish_nowait(self, subject: str, payload: T) -> PublishResult:
        """Synchronous :meth:`publish` (the memory bus never waits). O(s)."""
        if self._closed:
            return PublishResult(delivered=0, lagged=0)
        return self._fanout.publish(subject, payload)

    async def publish(self, subject: str, payload: T) -> PublishResult:
        """Queue ``payload`` for every subscriber of ``subject``; see Fanout.publish. O(s)."""
        return self.publish_nowait(subject, payload)

    def subscribe_nowait(
        self,
        subject: str,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        overflow: Overflow = Overflow.RESYNC,
    ) -> MemorySubscription[T]:
        """Synchronous :meth:`subscribe`. O(1)."""
        if self._closed:
            raise StateError("the bus is closed")
        sub = MemorySubscription(self._fanout, subject, max_pending, overflow)
        self._subs.add(sub)
        return sub

    async def subscribe(
        self,
        subject: str,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        overflow: Overflow = Overflow.RESYNC,
    ) -> MemorySubscription[T]:
        """A subscription receiving every later publish to ``subject``. O(1)."""
        return self.subscribe_nowait(subject, max_pending=max_pending, overflow=overflow)

    async def aclose(self) -> None:
        """Close every subscription (their iterators end). Idempotent. O(subscriptions)."""
        self._closed = True
        for sub in self._subs:
            sub.close_nowait()
        self._subs.clear()

    async def close(self) -> None:
        """Deprecated alias of :meth:`aclose` (async closers are ``aclose``, as in trio).

        Kept for one release; emits DeprecationWarning.
        """
        warnings.warn(
            "MemoryBus.close() is deprecated, use aclose()", DeprecationWarning, stacklevel=2
        )
        await self.aclose()
