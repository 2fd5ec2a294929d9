"""The Bus conformance suite: every :class:`imkit.bus.Bus` backend must pass all of it.

A test module plugs backends in by defining a ``bus_backend`` fixture that returns a
:class:`BusBackend` and importing the ``Test*`` classes from here (pytest collects
imported classes). ``tests/test_aio_nats.py`` does it for :class:`MemoryBackend`
(``MemoryBus``) and :class:`NatsBackend` (``NatsBus`` on the shared NATS server, one
stream per test, deleted after)::

    from tests.bus_suite import MemoryBackend, NatsBackend, TestDelivery, ...

    @pytest.fixture(params=["memory", "nats"])
    def bus_backend(request: pytest.FixtureRequest) -> BusBackend:
        return MemoryBackend() if request.param == "memory" else NatsBackend()

What every backend must do (the contract of :class:`imkit.bus.Bus`): publishes to
one subject are read in publish order by every subscriber of that subject (fan-out),
and by no subscriber of another subject; a subscription reads only what was
published after it was made; a subscriber that falls behind (RESYNC) reads a
:class:`~imkit.bus.Lagged` marker at the place of each gap, so that envelopes read
plus ``sum(missed)`` plus envelopes still queued equals envelopes published;
``aclose`` ends iteration (a waiting ``next`` too) and is idempotent; a closed bus
refuses ``subscribe`` (StateError) and publishes to nobody (``delivered == 0``).

``PublishResult.delivered`` is backend-specific beyond that: the memory bus counts
subscribers' queues, a JetStream bus counts the stream (1 once stored). The suite
only asserts ``delivered >= 1`` and ``lagged == 0`` for a publish that a subscriber
with room receives.

Each test runs one ``asyncio.run`` (the backend's connections belong to that loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence, Sized
from typing import Any, Protocol, TypeVar, cast

import pytest

from imkit.aio.bus import MemoryBus
from imkit.bus import Bus, Envelope, Lagged, Overflow, PublishResult, Subscription
from imkit.errors import ConfigError, StateError
from tests.services import nats_url, unique_name

__all__ = [
    "BusBackend",
    "MemoryBackend",
    "NatsBackend",
    "TestDelivery",
    "TestLifecycle",
    "TestOverflow",
    "run_bus",
]

T = TypeVar("T")

#: A whole test's budget (the NATS backend does a few dozen round trips).
TEST_TIMEOUT_S = 40.0
#: How long one read may wait before the test fails.
READ_TIMEOUT_S = 10.0

Item = Envelope[bytes] | Lagged


class BusBackend(Protocol):
    """How the suite makes buses of one backend."""

    #: Shown in test ids.
    name: str
    #: Whether :attr:`~imkit.bus.Overflow.REJECT` subscribers are supported.
    supports_reject: bool
    #: How long a published envelope may take to reach a subscriber's queue (0 when
    #: publish queues it before returning): "nothing more arrives" waits this long.
    settle_s: float

    async def open(self) -> Bus[bytes]:
        """A fresh bus of its own (its own stream / namespace)."""
        ...

    async def cleanup(self) -> None:
        """Remove what :meth:`open` created (after the bus is closed)."""
        ...


class MemoryBackend:
    """In-process :class:`~imkit.aio.bus.MemoryBus` instances."""

    name = "memory"
    supports_reject = True
    settle_s = 0.0

    async def open(self) -> Bus[bytes]:
        return MemoryBus()

    async def cleanup(self) -> None:
        return None


class NatsBackend:
    """:class:`~imkit.aio.nats.NatsBus` on the shared NATS server, a stream per test.

    ``config`` overrides go to :class:`~imkit.aio.nats.NatsBusConfig` (short
    heartbeats by default, so recovery paths run within a test's budget).
    """

    name = "nats"
    supports_reject = False
    settle_s = 0.3

    def __init__(self, **config: Any) -> None:
        self.url = nats_url()
        self.stream = unique_name("IMKIT_BUS_TEST")
        self.prefix = self.stream.lower()
        self.config = {"idle_heartbeat_s": 0.5, "publish_timeout_s": 5.0, **config}

    async def open(self) -> Bus[bytes]:
        from imkit.aio.nats import NatsBus, NatsBusConfig

        config = NatsBusConfig(stream=self.stream, prefix=self.prefix, **self.config)
        return await NatsBus.connect(self.url, config)

    async def cleanup(self) -> None:
        import nats
        import nats.js.errors

        nc = await nats.connect(self.url)
        try:
            await nc.jsm().delete_stream(self.stream)
        except nats.js.errors.NotFoundError:
            pass
        finally:
            await nc.close()


def run_bus(
    backend: BusBackend,
    body: Callable[[Bus[bytes]], Awaitable[T]],
    timeout_s: float = TEST_TIMEOUT_S,
) -> T:
    """Run ``body(bus)`` on a fresh bus of ``backend``; close and clean up after."""

    async def main() -> T:
        bus = await backend.open()
        try:
            return await asyncio.wait_for(body(bus), timeout_s)
        finally:
            await bus.aclose()
            await backend.cleanup()

    return asyncio.run(main())


async def read(sub: Subscription[bytes], n: int) -> list[Item]:
    """The next ``n`` items of ``sub`` (each within READ_TIMEOUT_S)."""
    return [await asyncio.wait_for(sub.next(), READ_TIMEOUT_S) for _ in range(n)]


async def read_envelopes(sub: Subscription[bytes], n: int) -> list[bytes]:
    """Payloads of the next ``n`` items, which must all be envelopes."""
    items = await read(sub, n)
    assert all(isinstance(item, Envelope) for item in items), items
    return [item.payload for item in items if isinstance(item, Envelope)]


async def nothing_more(sub: Subscription[bytes], backend: BusBackend) -> bool:
    """True when no item arrives within the backend's settle time."""
    try:
        item = await asyncio.wait_for(sub.next(), max(backend.settle_s, 0.01))
    except TimeoutError:
        return True
    raise AssertionError(f"unexpected item {item!r}")


def numbered(n: int, start: int = 0) -> list[bytes]:
    return [str(i).encode() for i in range(start, start + n)]


def walk(items: Sequence[Item], published: int) -> tuple[int, int]:
    """Check that ``items`` are envelopes 0, 1, 2, ... with each gap marked in place.

    Envelope payloads are their publish index; a Lagged(missed=k) says the next k
    indices were skipped. Returns (envelopes read, sum of missed); raises if an
    envelope is out of place or the walk passes ``published``.
    """
    expected = 0
    envelopes = 0
    missed = 0
    previous: Item | None = None
    for item in items:
        if isinstance(item, Lagged):
            assert item.missed > 0, item
            assert not isinstance(previous, Lagged), "two markers in a row"
            expected += item.missed
            missed += item.missed
        else:
            assert int(item.payload) == expected, (item, expected)
            expected += 1
            envelopes += 1
        previous = item
    assert expected <= published
    return envelopes, missed


@pytest.mark.timeout(60)
class TestDelivery:
    def test_round_trip(self, bus_backend: BusBackend) -> None:
        """A subscriber reads an Envelope(subject, payload); the publish says it was taken."""

        async def body(bus: Bus[bytes]) -> tuple[PublishResult, list[Item]]:
            sub = await bus.subscribe("gw-1")
            result = await bus.publish("gw-1", b"\x00hello")
            return result, await read(sub, 1)

        result, items = run_bus(bus_backend, body)
        assert items == [Envelope(subject="gw-1", payload=b"\x00hello")]
        assert result.delivered >= 1
        assert result.lagged == 0

    def test_publish_order_per_subject(self, bus_backend: BusBackend) -> None:
        """Publishes interleaved over two subjects: each subscriber reads its own, in order."""

        async def body(bus: Bus[bytes]) -> tuple[list[bytes], list[bytes]]:
            a = await bus.subscribe("gw-a")
            b = await bus.subscribe("gw-b")
            for i in range(100):
                await bus.publish("gw-a" if i % 3 else "gw-b", str(i).encode())
            return await read_envelopes(a, 66), await read_envelopes(b, 34)

        got_a, got_b = run_bus(bus_backend, body)
        assert got_a == [str(i).encode() for i in range(100) if i % 3]
        assert got_b == [str(i).encode() for i in range(100) if not i % 3]

    def test_fan_out_to_every_subscriber_of_the_subject(self, bus_backend: BusBackend) -> None:
        """Three subscribers of one subject all read everything; another subject reads none."""

        async def body(bus: Bus[bytes]) -> tuple[list[list[bytes]], list[bytes]]:
            subs = [await bus.subscribe("gw-1") for _ in range(3)]
            other = await bus.subscribe("gw-2")
            for payload in numbered(20):
                await bus.publish("gw-1", payload)
            await bus.publish("gw-2", b"only")
            got = [await read_envelopes(sub, 20) for sub in subs]
            return got, await read_envelopes(other, 1)

        got, other = run_bus(bus_backend, body)
        assert got == [numbered(20)] * 3
        assert other == [b"only"]

    def test_reads_only_what_was_published_after_subscribing(self, bus_backend: BusBackend) -> None:
        """A publish made before subscribe is not read; the next one is the first item."""

        async def body(bus: Bus[bytes]) -> list[Item]:
            await bus.publish("gw-1", b"before")
            sub = await bus.subscribe("gw-1")
            await bus.publish("gw-1", b"after")
            return await read(sub, 1)

        assert run_bus(bus_backend, body) == [Envelope(subject="gw-1", payload=b"after")]

    def test_waiting_reader_is_woken(self, bus_backend: BusBackend) -> None:
        """A reader already waiting in ``async for`` reads later publishes as they come."""

        async def body(bus: Bus[bytes]) -> list[bytes]:
            sub = await bus.subscribe("gw-1")
            got: list[bytes] = []

            async def consume() -> None:
                async for item in sub:
                    assert isinstance(item, Envelope)
                    got.append(item.payload)
                    if len(got) == 5:
                        return

            task = asyncio.create_task(consume())
            await asyncio.sleep(0)
            for payload in numbered(5):
                await bus.publish("gw-1", payload)
                await asyncio.sleep(0)
            await asyncio.wait_for(task, READ_TIMEOUT_S)
            return got

        assert run_bus(bus_backend, body) == numbered(5)

    def test_reader_that_keeps_up_reads_everything(self, bus_backend: BusBackend) -> None:
        """500 publishes read concurrently by a reader with room: every one, in order."""

        async def body(bus: Bus[bytes]) -> list[Item]:
            sub = await bus.subscribe("gw-1", max_pending=1024)
            reader = asyncio.create_task(read(sub, 500))
            for payload in numbered(500):
                await bus.publish("gw-1", payload)
            return await reader

        items = run_bus(bus_backend, body)
        assert [i.payload for i in items if isinstance(i, Envelope)] == numbered(500)


@pytest.mark.timeout(60)
class TestOverflow:
    def test_resync_accounting(self, bus_backend: BusBackend) -> None:
        """A reader 4 deep that reads nothing while 60 are published: gaps are marked in
        place, read + sum(missed) + queued never exceeds published, and equals it once
        everything arrived."""
        published = 60

        async def body(bus: Bus[bytes]) -> tuple[list[Item], bool]:
            sub = await bus.subscribe("gw-1", max_pending=4)
            for payload in numbered(published):
                await bus.publish("gw-1", payload)
            await asyncio.sleep(bus_backend.settle_s)  # every delivery queued or dropped
            items: list[Item] = []
            while True:
                envelopes, missed = walk(items, published)
                queued = len(cast(Sized, sub))  # both backends count what is queued
                assert envelopes + missed + queued <= published
                if envelopes + missed + queued == published and queued == 0:
                    break
                items.extend(await read(sub, 1))
            return items, await nothing_more(sub, bus_backend)

        items, quiet = run_bus(bus_backend, body)
        envelopes, missed = walk(items, published)
        assert envelopes + missed == published
        assert missed > 0 and any(isinstance(i, Lagged) for i in items)
        assert envelopes >= 4  # what the queue held was read, not dropped
        assert quiet

    def test_lagging_reader_does_not_hold_back_another(self, bus_backend: BusBackend) -> None:
        """A full subscriber lags; another subscriber of the subject reads everything."""

        async def body(bus: Bus[bytes]) -> tuple[list[Item], list[bytes]]:
            slow = await bus.subscribe("gw-1", max_pending=2)
            fast = await bus.subscribe("gw-1", max_pending=100)
            for payload in numbered(10):
                await bus.publish("gw-1", payload)
            await asyncio.sleep(bus_backend.settle_s)
            return await read(slow, 3), await read_envelopes(fast, 10)

        slow_items, fast_items = run_bus(bus_backend, body)
        assert fast_items == numbered(10)
        assert slow_items == [
            Envelope(subject="gw-1", payload=b"0"),
            Envelope(subject="gw-1", payload=b"1"),
            Lagged(subject="gw-1", missed=8),
        ]

    def test_reject_subscriber_refuses_the_publish_or_is_refused(
        self, bus_backend: BusBackend
    ) -> None:
        """REJECT: a full subscriber makes the publish raise CapacityError where it is
        supported; a backend that cannot honour it refuses the subscription (ConfigError)."""
        from imkit.errors import CapacityError

        async def body(bus: Bus[bytes]) -> None:
            if not bus_backend.supports_reject:
                with pytest.raises(ConfigError):
                    await bus.subscribe("gw-1", overflow=Overflow.REJECT)
                return
            await bus.subscribe("gw-1", max_pending=1, overflow=Overflow.REJECT)
            await bus.publish("gw-1", b"1")
            with pytest.raises(CapacityError):
                await bus.publish("gw-1", b"2")

        run_bus(bus_backend, body)

    @pytest.mark.parametrize(("subject", "max_pending"), [("", 10), ("gw-1", 0), ("gw-1", -1)])
    def test_bad_arguments_are_config_errors(
        self, bus_backend: BusBackend, subject: str, max_pending: int
    ) -> None:
        """An empty subject or max_pending < 1 raises ConfigError (a ValueError)."""

        async def body(bus: Bus[bytes]) -> None:
            with pytest.raises(ConfigError):
                await bus.subscribe(subject, max_pending=max_pending)

        run_bus(bus_backend, body)


@pytest.mark.timeout(60)
class TestLifecycle:
    def test_subscription_aclose_ends_a_waiting_reader(self, bus_backend: BusBackend) -> None:
        """aclose ends a reader waiting in ``async for``; next() then raises StopAsyncIteration."""

        async def body(bus: Bus[bytes]) -> list[Item]:
            sub = await bus.subscribe("gw-1")
            got: list[Item] = []

            async def consume() -> None:
                got.extend([item async for item in sub])

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.01)
            await sub.aclose()
            await asyncio.wait_for(task, READ_TIMEOUT_S)
            await sub.aclose()  # idempotent
            with pytest.raises(StopAsyncIteration):
                await sub.next()
            return got

        assert run_bus(bus_backend, body) == []

    def test_aclose_drops_what_is_queued(self, bus_backend: BusBackend) -> None:
        """Envelopes queued and unread when a subscription closes are not read after."""

        async def body(bus: Bus[bytes]) -> None:
            sub = await bus.subscribe("gw-1")
            for payload in numbered(3):
                await bus.publish("gw-1", payload)
            await asyncio.sleep(bus_backend.settle_s)
            await sub.aclose()
            with pytest.raises(StopAsyncIteration):
                await sub.next()

        run_bus(bus_backend, body)

    def test_closing_one_subscriber_leaves_the_others(self, bus_backend: BusBackend) -> None:
        """Another subscriber of the same subject keeps reading after one closes."""

        async def body(bus: Bus[bytes]) -> list[bytes]:
            gone = await bus.subscribe("gw-1")
            stays = await bus.subscribe("gw-1")
            await gone.aclose()
            for payload in numbered(3):
                await bus.publish("gw-1", payload)
            return await read_envelopes(stays, 3)

        assert run_bus(bus_backend, body) == numbered(3)

    def test_bus_aclose_ends_iteration_and_refuses_more(self, bus_backend: BusBackend) -> None:
        """Closing the bus ends its subscriptions; subscribe then raises StateError and a
        publish reaches nobody (delivered == 0)."""

        async def body(bus: Bus[bytes]) -> tuple[list[Item], PublishResult]:
            sub = await bus.subscribe("gw-1")
            got: list[Item] = []

            async def consume() -> None:
                got.extend([item async for item in sub])

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.01)
            await bus.aclose()
            await asyncio.wait_for(task, READ_TIMEOUT_S)
            await bus.aclose()  # idempotent
            with pytest.raises(StateError):
                await bus.subscribe("gw-1")
            return got, await bus.publish("gw-1", b"late")

        got, result = run_bus(bus_backend, body)
        assert got == []
        assert result == PublishResult(delivered=0, lagged=0)
