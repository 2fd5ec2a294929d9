"""RedisBus (the broadcast channel on Redis pub/sub): the Bus contract suite, and a
Redis restart that every subscriber reads as a gap."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from imkit.aio.redis_bus import RedisBus
from imkit.bus import Bus, Envelope, Lagged, Overflow
from imkit.errors import BackendError, ConfigError
from tests.bus_suite import BusBackend, TestDelivery, TestLifecycle, TestOverflow
from tests.services import private_redis, redis_url, unique_name

__all__ = ["TestDelivery", "TestLifecycle", "TestOverflow"]

pytestmark = pytest.mark.timeout(60)


class RedisBackend:
    """:class:`RedisBus` on the shared Redis, a channel prefix per test (pub/sub keeps
    no keys: nothing to clean up)."""

    name = "redis"
    supports_reject = False
    settle_s = 0.2

    def __init__(self) -> None:
        self.url = redis_url()
        self.prefix = unique_name("imkit_bus")

    async def open(self) -> Bus[bytes]:
        return RedisBus(self.url, prefix=self.prefix)

    async def cleanup(self) -> None:
        return None


@pytest.fixture
def bus_backend() -> BusBackend:
    """The conformance suite on RedisBus."""
    return RedisBackend()


class TestRedisBus:
    def test_delivered_counts_the_subscribed_processes(self) -> None:
        """PUBLISH answers how many connections took it: one per subscribed bus."""

        async def main() -> list[int]:
            prefix = unique_name("imkit_bus")
            a, b = RedisBus(redis_url(), prefix=prefix), RedisBus(redis_url(), prefix=prefix)
            try:
                counts = [(await a.publish("gw", b"0")).delivered]
                await a.subscribe("gw")
                await b.subscribe("gw")
                await b.subscribe("gw")  # a second local subscriber: same connection
                counts.append((await a.publish("gw", b"1")).delivered)
                return counts
            finally:
                await a.aclose()
                await b.aclose()

        assert asyncio.run(main()) == [0, 2]

    def test_reject_and_bad_arguments_are_refused(self) -> None:
        """A publisher in another process cannot see queues: REJECT is a ConfigError."""

        async def main() -> None:
            bus = RedisBus(redis_url(), prefix=unique_name("imkit_bus"))
            try:
                with pytest.raises(ConfigError):
                    await bus.subscribe("gw", overflow=Overflow.REJECT)
                with pytest.raises(ConfigError):
                    await bus.publish("", b"x")
            finally:
                await bus.aclose()
            with pytest.raises(ConfigError):
                RedisBus(redis_url(), prefix="")

        asyncio.run(main())

    def test_a_redis_restart_is_a_gap_every_subscriber_reads(self, tmp_path: Path) -> None:
        """A private redis-server killed and started again: publishing fails while it
        is down (BackendError), every subscriber reads one Lagged marker at the gap,
        and later publishes arrive again without subscribing anew."""

        async def main() -> tuple[list[Envelope[bytes] | Lagged], int, int]:
            with private_redis(tmp_path) as server:
                url = f"redis://127.0.0.1:{server.port}/0"
                pub = RedisBus(url, prefix="p", reconnect_s=0.1)
                bus = RedisBus(url, prefix="p", reconnect_s=0.1)
                sub = await bus.subscribe("gw")
                await pub.publish("gw", b"before")
                items = [await asyncio.wait_for(sub.next(), 5)]
                server.kill()
                with pytest.raises(BackendError):
                    await pub.publish("gw", b"lost")
                items.append(await asyncio.wait_for(sub.next(), 5))  # the gap
                await asyncio.to_thread(server.start)
                delivered = 0
                for _ in range(100):  # until the subscriber is back on the new server
                    try:
                        delivered = (await pub.publish("gw", b"after")).delivered
                    except BackendError:
                        delivered = 0
                    if delivered:
                        break
                    await asyncio.sleep(0.1)
                items.append(await asyncio.wait_for(sub.next(), 5))
                reconnects = bus.reconnects
                await pub.aclose()
                await bus.aclose()
                return items, delivered, reconnects

        items, delivered, reconnects = asyncio.run(main())
        assert items == [
            Envelope(subject="gw", payload=b"before"),
            Lagged(subject="gw", missed=1),
            Envelope(subject="gw", payload=b"after"),
        ]
        assert delivered == 1 and reconnects >= 1
