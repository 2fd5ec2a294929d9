"""Tests of the asyncio in-memory bus and registry (imkit.aio.bus, imkit.aio.discovery)."""

from __future__ import annotations

import asyncio
import warnings

import pytest

from imkit.aio.bus import MemoryBus
from imkit.aio.discovery import MemoryRegistry
from imkit.bus import Bus, Envelope, Lagged, Overflow, PublishResult
from imkit.discovery import GatewayInfo, Registry
from imkit.errors import CapacityError, StateError


class TestMemoryBus:
    def test_is_a_bus(self) -> None:
        """MemoryBus satisfies the Bus protocol (checked by mypy) and round-trips a payload."""

        async def main() -> Envelope[bytes] | Lagged:
            bus: Bus[bytes] = MemoryBus()
            sub = await bus.subscribe("gw-1")
            assert await bus.publish("gw-1", b"x") == PublishResult(delivered=1, lagged=0)
            return await sub.next()

        assert asyncio.run(main()) == Envelope(subject="gw-1", payload=b"x")

    def test_waiting_subscriber_is_woken(self) -> None:
        """A subscriber waiting in next() receives a later publish."""

        async def main() -> list[int]:
            bus: MemoryBus[int] = MemoryBus()
            sub = await bus.subscribe("gw")
            got: list[int] = []

            async def consume() -> None:
                async for item in sub:
                    assert isinstance(item, Envelope)
                    got.append(item.payload)
                    if len(got) == 3:
                        return

            task = asyncio.create_task(consume())
            await asyncio.sleep(0)
            for i in range(3):
                await bus.publish("gw", i)
                await asyncio.sleep(0)
            await task
            return got

        assert asyncio.run(main()) == [0, 1, 2]

    def test_slow_subscriber_reads_a_lag_marker(self) -> None:
        """A subscriber that did not keep up reads its envelopes, then one Lagged marker."""

        async def main() -> list[Envelope[int] | Lagged]:
            bus: MemoryBus[int] = MemoryBus()
            sub = await bus.subscribe("gw", max_pending=2)
            for i in range(5):
                await bus.publish("gw", i)
            return [await sub.next() for _ in range(3)]

        assert asyncio.run(main()) == [
            Envelope(subject="gw", payload=0),
            Envelope(subject="gw", payload=1),
            Lagged(subject="gw", missed=3),
        ]

    def test_reject_subscriber_refuses_the_publish(self) -> None:
        """A full REJECT subscriber makes publish raise CapacityError."""

        async def main() -> None:
            bus: MemoryBus[int] = MemoryBus()
            await bus.subscribe("gw", max_pending=1, overflow=Overflow.REJECT)
            await bus.publish("gw", 1)
            with pytest.raises(CapacityError):
                await bus.publish("gw", 2)

        asyncio.run(main())

    def test_close_ends_iteration(self) -> None:
        """Closing the bus ends a waiting iteration; later publishes reach nobody."""

        async def main() -> list[object]:
            bus: MemoryBus[int] = MemoryBus()
            sub = await bus.subscribe("gw")
            got: list[object] = []

            async def consume() -> None:
                got.extend([item async for item in sub])

            task = asyncio.create_task(consume())
            await asyncio.sleep(0)
            await bus.aclose()
            await task
            assert sub.closed
            assert await bus.publish("gw", 1) == PublishResult(delivered=0, lagged=0)
            with pytest.raises(StateError):
                await bus.subscribe("gw")
            return got

        assert asyncio.run(main()) == []

    def test_subscription_close_is_idempotent(self) -> None:
        """A subscription closed twice stays closed and drops what it held."""

        async def main() -> None:
            bus: MemoryBus[int] = MemoryBus()
            sub = await bus.subscribe("gw")
            await bus.publish("gw", 1)
            await sub.aclose()
            await sub.aclose()
            assert sub.get_nowait() is None
            with pytest.raises(StopAsyncIteration):
                await sub.next()
            bus.fanout._check()
            assert bus.fanout.subscribers("gw") == 0

        asyncio.run(main())


    def test_close_is_a_deprecated_alias_of_aclose(self) -> None:
        """MemoryBus.close() and MemorySubscription.close() still close, and warn (deprecated)."""

        async def main() -> tuple[bool, bool, list[type[Warning]]]:
            bus: MemoryBus[int] = MemoryBus()
            sub = await bus.subscribe("gw")
            other = await bus.subscribe("gw")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                await sub.close()
                await bus.close()
            return sub.closed, other.closed, [w.category for w in caught]

        sub_closed, other_closed, caught = asyncio.run(main())
        assert sub_closed and other_closed
        assert caught == [DeprecationWarning, DeprecationWarning]


class TestMemoryRegistry:
    def test_is_a_registry_with_an_injected_clock(self) -> None:
        """MemoryRegistry satisfies Registry; expiry follows the injected clock."""
        now = [0]

        async def main() -> None:
            registry: Registry = MemoryRegistry(ttl_ms=100, clock=lambda: now[0])
            await registry.register(GatewayInfo(id="gw-1", endpoints=("tcp://h:1",)))
            now[0] = 60
            assert await registry.heartbeat("gw-1", connections=5)
            now[0] = 159
            assert [g.id for g in await registry.live()] == ["gw-1"]
            info = await registry.get("gw-1")
            assert info is not None and info.connections == 5
            now[0] = 160
            assert await registry.live() == []
            assert not await registry.heartbeat("gw-1")

        asyncio.run(main())

    def test_rank_draining_and_deregister(self) -> None:
        """rank puts draining gateways last; deregister removes at once."""

        async def main() -> None:
            registry = MemoryRegistry()
            for gid in ("a", "b"):
                await registry.register(GatewayInfo(id=gid, endpoints=(f"tcp://{gid}:1",)))
            assert await registry.set_draining("a")
            assert [g.id for g in await registry.rank(client_key="u")] == ["b", "a"]
            assert await registry.deregister("b")
            assert [g.id for g in await registry.rank(limit=5)] == ["a"]

        asyncio.run(main())
