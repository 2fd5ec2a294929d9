"""The broadcast channel on Redis pub/sub: :class:`RedisBus`, an :class:`imkit.bus.Bus`.

Needs the ``redis`` extra. ``imkit.aio`` does not import this module: import it as
``imkit.aio.redis_bus``.

What it is for
    The seed's first routing scheme, **broadcast**: the logic server publishes each
    message once on one channel, every gateway receives it and keeps what is for its
    own connections (:class:`imkit.routetable.BroadcastRouter`). No route table to
    keep; every gateway pays for every message. Redis pub/sub fits it: fire and
    forget, no storage, ``PUBLISH`` answers how many subscribers got it.

How it behaves
    ``publish(subject, payload)`` is one ``PUBLISH <prefix>:<subject>``: its result's
    ``delivered`` is the number of subscribed connections Redis counted (every
    process subscribed to the subject, not each local subscriber), ``lagged`` is 0.
    ``subscribe`` returns once Redis confirmed the subscription, so the subscriber
    reads every later publish. One connection per bus carries every subscription of
    the process; a reader task hands each message to the local subscribers through
    the same bounded inboxes as :class:`~imkit.aio.bus.MemoryBus` (``max_pending``
    each; a full one drops and reads one :class:`~imkit.bus.Lagged` marker at the
    gap). Pub/sub keeps nothing: when the connection is lost, every local subscriber
    reads a ``Lagged`` marker at that point (the count is unknown: 1 is reported)
    and the bus subscribes again, retrying every ``reconnect_s``; envelopes published
    meanwhile are gone, which is what the marker says (the gateway resyncs its
    clients from the store). ``Overflow.REJECT`` is refused (``ConfigError``): a
    publisher in another process cannot see a subscriber's queue.

Costs
    ``publish``: one round trip, O(subscribers) on the server. A received message:
    O(local subscribers of its subject). ``subscribe``: one round trip for the first
    local subscriber of a subject, none after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from imkit.aio.bus import MemorySubscription
from imkit.aio.redis import DEFAULT_REDIS_TIMEOUT_MS, _connect
from imkit.bus import (
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_SUBJECTS,
    DEFAULT_MAX_SUBSCRIBERS,
    Fanout,
    Overflow,
    PublishResult,
)
from imkit.errors import BackendError, ConfigError, StateError

__all__ = ["DEFAULT_RECONNECT_S", "DEFAULT_REDIS_BUS_PREFIX", "RedisBus", "RedisSubscription"]

logger = logging.getLogger("imkit.aio.redis_bus")

#: Channels are ``<prefix>:<subject>``.
DEFAULT_REDIS_BUS_PREFIX = "imkit:bus"
#: After the connection is lost, the bus tries to subscribe again this often: a
#: restarted Redis is back within a second or two; a dead one costs one attempt a
#: second, not a busy loop.
DEFAULT_RECONNECT_S = 0.5
#: How long ``subscribe`` waits for Redis to confirm a subscription.
SUBSCRIBE_TIMEOUT_S = 5.0


class RedisSubscription(MemorySubscription[bytes]):
    """A local subscriber of a :class:`RedisBus`: a bounded inbox fed by the bus's reader.

    The same reading interface as :class:`~imkit.aio.bus.MemorySubscription`
    (``next``, ``async for``, ``get_nowait``, ``len``, ``aclose``).
    """

    def __init__(self, bus: RedisBus, subject: str, max_pending: int) -> None:
        super().__init__(bus._fanout, subject, max_pending, Overflow.RESYNC)
        self._bus = bus

    def close_nowait(self) -> None:
        """Stop receiving; the bus leaves the channel when its last local subscriber goes."""
        super().close_nowait()
        self._bus._released(self.subject)


class RedisBus:
    """An :class:`imkit.bus.Bus` of bytes on Redis pub/sub (see the module doc).

    ``client_or_url``: a ``redis.asyncio.Redis`` (shared, not closed by
    :meth:`aclose`) or a URL (a client of our own). Create it inside a running loop.
    """

    def __init__(
        self,
        client_or_url: Redis | str,
        *,
        prefix: str = DEFAULT_REDIS_BUS_PREFIX,
        max_subjects: int = DEFAULT_MAX_SUBJECTS,
        max_subscribers: int = DEFAULT_MAX_SUBSCRIBERS,
        reconnect_s: float = DEFAULT_RECONNECT_S,
        timeout_ms: int = DEFAULT_REDIS_TIMEOUT_MS,
    ) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ConfigError("prefix must be a non-empty string")
        if not (isinstance(reconnect_s, int | float) and reconnect_s > 0):
            raise ConfigError(f"reconnect_s must be a number > 0, got {reconnect_s!r}")
        self._client, self._owned = _connect(client_or_url, timeout_ms, 4)
        self._fanout: Fanout[bytes] = Fanout(
            max_subjects=max_subjects, max_subscribers=max_subscribers
        )
        self.prefix = prefix
        self.reconnect_s = reconnect_s
        self._pubsub: PubSub | None = None
        self._channels: set[str] = set()  # subjects this process is subscribed to
        self._confirm: dict[str, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._subs: set[RedisSubscription] = set()
        self._closed = False
        self.reconnects = 0  # connections lost (each one a Lagged for every subscriber)

    def _channel(self, subject: str) -> str:
        return f"{self.prefix}:{subject}"

    async def publish(self, subject: str, payload: bytes) -> PublishResult:
        """``PUBLISH`` to the subject's channel; ``delivered``: subscribed connections.

        A closed bus publishes nothing (``delivered == 0``). Raises BackendError if
        Redis cannot be reached (the envelope is then not delivered).
        """
        if self._closed:
            return PublishResult(delivered=0, lagged=0)
        if not isinstance(subject, str) or not subject:
            raise ConfigError("subject must be a non-empty string")
        try:
            receivers = await self._client.publish(self._channel(subject), payload)
        except (RedisError, OSError) as exc:
            raise BackendError(f"Redis PUBLISH to {subject!r} failed: {exc}") from exc
        return PublishResult(delivered=int(receivers), lagged=0)

    async def subscribe(
        self,
        subject: str,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        overflow: Overflow = Overflow.RESYNC,
    ) -> RedisSubscription:
        """A subscription receiving every publish to ``subject`` made after it returns."""
        if self._closed:
            raise StateError("the bus is closed")
        if overflow is Overflow.REJECT:
            raise ConfigError("Overflow.REJECT is not supported: publishers cannot see queues")
        sub = RedisSubscription(self, subject, max_pending)  # validates the arguments
        self._subs.add(sub)
        if subject not in self._channels:
            try:
                await self._join(subject)
            except BaseException:
                sub.close_nowait()
                raise
        return sub

    async def _join(self, subject: str) -> None:
        self._channels.add(subject)
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        try:
            await self._subscribe_on_server(subject)
        except BaseException:
            self._channels.discard(subject)
            raise

    async def _subscribe_on_server(self, subject: str) -> None:
        """SUBSCRIBE and wait for Redis's confirmation (then nothing later is missed)."""
        loop = asyncio.get_running_loop()
        waiter = self._confirm.get(subject)
        if waiter is None or waiter.done():
            waiter = self._confirm[subject] = loop.create_future()
        pubsub = self._pubsub
        if pubsub is None:
            pubsub = self._pubsub = self._client.pubsub()
        try:
            await pubsub.subscribe(self._channel(subject))
            await asyncio.wait_for(asyncio.shield(waiter), SUBSCRIBE_TIMEOUT_S)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BackendError(f"Redis SUBSCRIBE to {subject!r} failed: {exc}") from exc

    def _released(self, subject: str) -> None:
        if self._closed or self._fanout.subscribers(subject) or subject not in self._channels:
            return
        self._channels.discard(subject)
        pubsub = self._pubsub
        if pubsub is not None:
            task = asyncio.get_running_loop().create_task(self._leave(pubsub, subject))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _leave(self, pubsub: PubSub, subject: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await pubsub.unsubscribe(self._channel(subject))

    async def _read(self) -> None:
        """Hand every message to the local inboxes; on a lost connection mark a gap
        in every inbox and subscribe again."""
        skip = len(self.prefix) + 1
        while not self._closed:
            pubsub = self._pubsub
            if pubsub is None or pubsub.connection is None or not self._channels:
                await asyncio.sleep(0.01)  # no SUBSCRIBE sent yet
                continue
            try:
                message = await pubsub.get_message(timeout=1.0)
            except (RedisError, OSError, RuntimeError) as exc:
                await self._lost(exc)
                continue
            if message is not None:
                self._dispatch(message, skip)

    def _dispatch(self, message: dict[str, Any], skip: int) -> None:
        kind = message.get("type")
        channel = message.get("channel")
        if isinstance(channel, bytes):
            channel = channel.decode("utf-8", "replace")
        if not isinstance(channel, str):
            return
        subject = channel[skip:]
        if kind == "message":
            data = message.get("data")
            if isinstance(data, str):
                data = data.encode()
            if isinstance(data, bytes):
                self._fanout.publish(subject, data)
        elif kind == "subscribe":
            waiter = self._confirm.get(subject)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def _lost(self, exc: BaseException) -> None:
        """The connection is gone: a gap for every subscriber, then subscribe again."""
        self.reconnects += 1
        logger.warning("Redis pub/sub connection lost (%s): resubscribing", exc)
        self._fanout.miss_all(1)
        old, self._pubsub = self._pubsub, None
        if old is not None:
            with contextlib.suppress(RedisError, OSError):
                await old.aclose()
        while not self._closed:
            await asyncio.sleep(self.reconnect_s)
            # SUBSCRIBE again without waiting for the confirmations: this task is the
            # reader that would read them (they come before any later message anyway)
            if not self._channels:
                return  # nothing to subscribe to: the next subscribe() connects
            pubsub = self._pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(*[self._channel(s) for s in self._channels])
                return
            except (RedisError, OSError) as again:
                logger.debug("Redis pub/sub still unreachable: %s", again)
                self._pubsub = None
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    async def aclose(self) -> None:
        """Close every subscription (their iterators end) and the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            MemorySubscription.close_nowait(sub)
        self._subs.clear()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()
        if self._owned:
            with contextlib.suppress(RedisError, OSError):
                await self._client.aclose()
