"""The interface every bus backend implements (memory today; NATS JetStream later).

The interface is asynchronous because real backends talk to a server; defining it
needs no event loop, so this module stays on floor 2 without importing asyncio.
The in-process implementation is :class:`imkit.aio.bus.MemoryBus`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, TypeVar

from imkit.bus._fanout import DEFAULT_MAX_PENDING, Envelope, Lagged, Overflow, PublishResult

__all__ = ["Bus", "Subscription"]

T = TypeVar("T")


class Subscription(Protocol[T]):
    """A stream of what was published to one subject after subscribing.

    Read it with ``async for item in sub`` or ``await sub.next()``; every item is an
    :class:`~imkit.bus.Envelope` or, where envelopes were missed because this
    subscriber fell behind, one :class:`~imkit.bus.Lagged` marker in their place.
    Iteration ends after :meth:`close`.
    """

    @property
    def subject(self) -> str:
        """The subject (route key) this subscription receives."""
        ...

    def __aiter__(self) -> AsyncIterator[Envelope[T] | Lagged]:
        """Iterate until the subscription is closed."""
        ...

    async def next(self) -> Envelope[T] | Lagged:
        """The next item, waiting for one. Raises StopAsyncIteration once closed."""
        ...

    async def aclose(self) -> None:
        """Stop receiving; drop what is queued. Idempotent."""
        ...


class Bus(Protocol[T]):
    """Publish payloads under a subject; every subscriber of the subject receives them.

    In imkit the subject is a route key: the id of the gateway holding the
    recipients (the seed's ``routeKey``). Delivery is at most once per subscriber and
    in publish order per subject; a subscriber that falls behind is told so in-band
    (:class:`~imkit.bus.Lagged`) instead of silently losing envelopes, and resyncs
    from the store. Backends must keep that contract.
    """

    async def publish(self, subject: str, payload: T) -> PublishResult:
        """Send ``payload`` to every current subscriber of ``subject``.

        Raises :class:`~imkit.errors.CapacityError` if a subscriber that chose
        :attr:`~imkit.bus.Overflow.REJECT` is full (nothing is delivered then), and
        :class:`~imkit.errors.BackendError` if the backend cannot be reached.
        """
        ...

    async def subscribe(
        self,
        subject: str,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        overflow: Overflow = Overflow.RESYNC,
    ) -> Subscription[T]:
        """A subscription receiving every later publish to ``subject``."""
        ...

    async def aclose(self) -> None:
        """Close every subscription and release the backend. Idempotent."""
        ...
