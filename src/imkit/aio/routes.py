"""The in-process route table on asyncio: :class:`MemoryRouteTable`.

It implements :class:`imkit.routetable.AsyncRouteTable` over the sans-IO
:class:`imkit.routetable.RouteTable`, supplying the clock (the event loop's, in ms,
unless a ``clock`` is injected). It is the embedded default: every call runs to
completion without suspending, so it costs what the table costs plus one
coroutine. :class:`imkit.aio.redis.RedisRouteTable` is the same contract shared
between processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from imkit.aio._loop import loop_ms
from imkit.routetable import (
    DEFAULT_GRACE_MS,
    DEFAULT_MAX_DEVICES,
    DEFAULT_MAX_ROUTES,
    Binding,
    BindResult,
    Route,
    RouteTable,
    UnbindResult,
)

__all__ = ["MemoryRouteTable"]


class MemoryRouteTable:
    """Routes of this process, awaited; see :class:`~imkit.routetable.RouteTable`.

    Costs are the table's: ``bind``/``unbind``/``get`` O(d) for d devices of the
    user, ``lookup`` O(1), ``group_by_gateway`` O(k + routes found) for k uids,
    ``expire`` O(1) + O(d) per route removed, ``unbind_gateway`` O(n) over all
    live routes (the table keeps no per-gateway index; a gateway dies rarely).
    No call suspends, so callers on one loop see each call as atomic.

    ``clock`` returns monotonic milliseconds (default: the running loop's clock);
    it must never go back (:class:`~imkit.errors.TimeWentBackwards`).
    ``expire`` reports each route once (it is removed as it is returned). Limits
    and errors are the table's (``CapacityError``, ``ConfigError``).

    >>> import asyncio
    >>> async def demo() -> list[Route]:
    ...     now = [0]
    ...     table = MemoryRouteTable(grace_ms=100, clock=lambda: now[0])
    ...     await table.bind(Route(uid="u", device="phone", gateway="gw1", conn_id=7, epoch=1))
    ...     await table.unbind("u", "phone", 7, 1)
    ...     now[0] = 100
    ...     return await table.expire()
    >>> [r.gateway for r in asyncio.run(demo())]
    ['gw1']
    """

    __slots__ = ("_clock", "table")

    def __init__(
        self,
        *,
        grace_ms: int = DEFAULT_GRACE_MS,
        max_devices: int = DEFAULT_MAX_DEVICES,
        max_routes: int = DEFAULT_MAX_ROUTES,
        clock: Callable[[], int] | None = None,
    ) -> None:
        """An empty table (``ConfigError`` for limits out of range). O(1)."""
        self.table = RouteTable(grace_ms=grace_ms, max_devices=max_devices, max_routes=max_routes)
        self._clock = clock if clock is not None else loop_ms

    @property
    def grace_ms(self) -> int:
        """How long an unbound route stays parked. O(1)."""
        return self.table.grace_ms

    @property
    def max_devices(self) -> int:
        """Devices per user, live or in grace. O(1)."""
        return self.table.max_devices

    @property
    def max_routes(self) -> int:
        """Routes in the table, live or in grace. O(1)."""
        return self.table.max_routes

    def now_ms(self) -> int:
        """The table's clock, in ms. O(1)."""
        return self._clock()

    async def bind(self, route: Route) -> BindResult:
        """Make ``route`` live if its epoch allows (see :meth:`RouteTable.bind`). O(d)."""
        return self.table.bind(route, self._clock())

    async def unbind(self, uid: str, device: str, conn_id: int, epoch: int) -> UnbindResult:
        """Park the route of connection (conn_id, epoch) for ``grace_ms`` (fenced). O(d)."""
        return self.table.unbind(uid, device, conn_id, epoch, self._clock())

    async def unbind_gateway(self, gateway: str) -> list[Route]:
        """Park every live route on ``gateway``; returns them. O(n) over live routes."""
        return self.table.unbind_gateway(gateway, self._clock())

    async def expire(self, limit: int | None = None) -> list[Route]:
        """Remove and return routes whose grace ran out, oldest first. O(1 + d) per route."""
        return self.table.expire(self._clock(), limit)

    def next_expiry_ms(self) -> int | None:
        """When (on :meth:`now_ms`'s clock) the oldest parked route expires; None if none. O(1).

        For a timer that calls :meth:`expire` exactly when needed instead of polling.
        """
        return self.table.next_expiry_ms()

    async def get(self, uid: str, device: str) -> Binding | None:
        """The live or parked route of (uid, device), or None. O(d)."""
        return self.table.get(uid, device)

    async def lookup(self, uid: str) -> tuple[Route, ...]:
        """The live routes of ``uid`` (in bind order here). O(1)."""
        return self.table.lookup(uid)

    async def group_by_gateway(self, uids: Iterable[str]) -> dict[str, list[Route]]:
        """Live routes of ``uids`` grouped by gateway. O(k + routes found)."""
        return self.table.group_by_gateway(uids)

    async def count(self) -> int:
        """Routes held, live plus in grace. O(1)."""
        return len(self.table)

    async def aclose(self) -> None:
        """Nothing to release (for symmetry with the Redis table). O(1)."""

    def __repr__(self) -> str:
        return f"MemoryRouteTable({self.table!r})"

    def _check(self) -> None:
        """Assert the table's invariants (for tests). O(n)."""
        self.table._check()
