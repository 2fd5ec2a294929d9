"""Tests of imkit.aio.routes.MemoryRouteTable: the AsyncRouteTable suite, the oracle
machine, and what the in-process twin adds (the loop clock, next_expiry_ms)."""

from __future__ import annotations

import asyncio
import doctest
from collections.abc import Callable

import pytest
from hypothesis import settings

import imkit.aio.routes
from imkit.aio.routes import MemoryRouteTable
from imkit.errors import TimeWentBackwards
from imkit.routetable import (
    DEFAULT_GRACE_MS,
    DEFAULT_MAX_DEVICES,
    DEFAULT_MAX_ROUTES,
    AsyncRouteTable,
    Route,
)
from tests.route_suite import (
    Backend,
    FakeClock,
    TestBind,
    TestExpiry,
    TestLimits,
    TestLookup,
    TestRealClock,
    TestUnbind,
    route_machine,
)

__all__ = ["TestBind", "TestExpiry", "TestLimits", "TestLookup", "TestRealClock", "TestUnbind"]


class MemoryTables:
    """Makes MemoryRouteTables (nothing to clean up)."""

    async def make(
        self, *, clock: Callable[[], int] | None = None, **limits: int
    ) -> AsyncRouteTable:
        return MemoryRouteTable(clock=clock, **limits)

    async def aclose(self) -> None:
        pass


class MemoryBackend:
    name = "memory"

    def tables(self) -> MemoryTables:
        return MemoryTables()


@pytest.fixture
def backend() -> Backend:
    return MemoryBackend()


MemoryMachine = route_machine(MemoryBackend)
MemoryMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


class TestMemoryMachine(MemoryMachine.TestCase):  # type: ignore[name-defined,misc]
    """MemoryRouteTable agrees with the sync RouteTable under random calls."""


def route(uid: str = "u", conn: int = 1, epoch: int = 1) -> Route:
    return Route(uid=uid, device="phone", gateway="g1", conn_id=conn, epoch=epoch)


class TestMemorySpecifics:
    """What the in-process twin adds beyond the contract."""

    def test_is_an_async_route_table(self) -> None:
        """MemoryRouteTable satisfies AsyncRouteTable (checked by mypy) with the defaults."""
        table: AsyncRouteTable = MemoryRouteTable()
        assert (table.grace_ms, table.max_devices, table.max_routes) == (
            DEFAULT_GRACE_MS,
            DEFAULT_MAX_DEVICES,
            DEFAULT_MAX_ROUTES,
        )

    def test_doctests(self) -> None:
        """The module's examples hold."""
        result = doctest.testmod(imkit.aio.routes)
        assert result.attempted > 0
        assert result.failed == 0

    def test_default_clock_is_the_loop(self) -> None:
        """Without a clock, disconnected_ms is the loop's clock in ms."""

        async def main() -> None:
            table = MemoryRouteTable()
            await table.bind(route())
            before = int(asyncio.get_running_loop().time() * 1000)
            await table.unbind("u", "phone", 1, 1)
            after = int(asyncio.get_running_loop().time() * 1000)
            binding = await table.get("u", "phone")
            assert binding is not None and binding.disconnected_ms is not None
            assert before <= binding.disconnected_ms <= after
            assert before <= table.now_ms()
            await table.aclose()

        asyncio.run(main())

    def test_next_expiry_ms(self) -> None:
        """next_expiry_ms says when the oldest parked route expires, on the table's clock."""

        async def main() -> None:
            clock = FakeClock(100)
            table = MemoryRouteTable(grace_ms=50, clock=clock)
            assert table.next_expiry_ms() is None
            await table.bind(route())
            await table.unbind("u", "phone", 1, 1)
            assert table.next_expiry_ms() == 150
            clock.now = 150
            assert await table.expire() == [route()]
            assert table.next_expiry_ms() is None

        asyncio.run(main())

    def test_clock_going_back_refused(self) -> None:
        """An injected clock that goes back raises TimeWentBackwards and changes nothing."""

        async def main() -> None:
            clock = FakeClock(100)
            table = MemoryRouteTable(clock=clock)
            await table.bind(route())
            clock.now = 99
            with pytest.raises(TimeWentBackwards):
                await table.unbind("u", "phone", 1, 1)
            assert await table.lookup("u") == (route(),)

        asyncio.run(main())

    def test_calls_do_not_suspend(self) -> None:
        """Every call completes without yielding to the loop (atomic for other tasks)."""

        async def main() -> None:
            table = MemoryRouteTable(clock=FakeClock())
            coro = table.bind(route())
            with pytest.raises(StopIteration):
                coro.send(None)

        asyncio.run(main())

    def test_repr_and_check(self) -> None:
        """repr names the inner table; _check catches a corrupted count."""
        table = MemoryRouteTable(grace_ms=5)
        assert repr(table) == "MemoryRouteTable(RouteTable(live=0, grace=0, grace_ms=5))"
        table.table._count = 3
        with pytest.raises(AssertionError):
            table._check()
