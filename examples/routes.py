"""The route service of the reference system: who is online on which gateway.

What it does
    Wraps :class:`imkit.routetable.RouteTable` with the event-loop clock and one
    timer that expires routes whose grace period ran out. Gateways bind a route
    when a client logs in and unbind it (fenced by ``conn_id`` and ``epoch``)
    when the connection closes; the logic server groups a conversation's members
    by gateway to publish one batch per gateway on the bus (the seed's 路由服务).
    Epochs come from an :class:`imkit.seq.IdGenerator` (snowflake ids: strictly
    increasing per node, ordered by time across nodes).

Policies
    * An unbind keeps the route for ``grace_ms`` (default 60 s): a client that
      reconnects within it resumes its session; routes in grace receive no pushes
      (the messages wait in the store and are synced on reconnect).
    * Time is one monotonic millisecond clock (the loop's) owned here, so the
      table never sees time go backwards whichever gateway calls it.
    * Expired routes are announced to ``on_expire`` callbacks, new binds to
      ``on_bind`` callbacks (gateways drop the closed session they kept for a
      resume once it can no longer be resumed there).

    * Every call is awaited: the same code runs on the in-process table and on a
      shared backend (``imkit.aio.redis.RedisRouteTable``) when the system runs as
      several processes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from imkit.aio import DeadlineTimer
from imkit.errors import ImkitError
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
from imkit.seq import IdGenerator

if TYPE_CHECKING:
    from imkit.routetable import AsyncRouteTable

__all__ = ["DEFAULT_EXPIRE_POLL_MS", "RouteService"]

logger = logging.getLogger("examples.routes")

#: With a shared backend, how often a process asks it for routes whose grace ran
#: out: a parked session kept for a resume lives at most this much past its grace.
DEFAULT_EXPIRE_POLL_MS = 1_000


class RouteService:
    """Who is online where, on the event loop: in-process, or shared through a backend.

    Without ``backend`` the routes live in this process (a
    :class:`~imkit.routetable.RouteTable` on the loop's clock, with a timer that
    expires routes whose grace ran out): the embedded default. With ``backend`` (any
    :class:`~imkit.routetable.AsyncRouteTable`, e.g. ``imkit.aio.redis.RedisRouteTable``)
    every call goes to it and its clock; a task polls ``backend.expire()`` every
    ``expire_poll_ms`` so that ``on_expire`` callbacks still run (each expired route
    is reported to one process only). ``on_bind`` callbacks see the binds made
    through this service (in a cluster of processes, only its own).

    Every method is the table's cost (O(devices of the user), ``group_by_gateway``
    O(uids)); with a backend, plus one round trip. Create it inside a running loop.
    """

    def __init__(
        self,
        *,
        grace_ms: int = DEFAULT_GRACE_MS,
        max_devices: int = DEFAULT_MAX_DEVICES,
        max_routes: int = DEFAULT_MAX_ROUTES,
        node: int = 0,
        backend: AsyncRouteTable | None = None,
        expire_poll_ms: int = DEFAULT_EXPIRE_POLL_MS,
    ) -> None:
        self.table = RouteTable(grace_ms=grace_ms, max_devices=max_devices, max_routes=max_routes)
        self.backend = backend
        self._ids = IdGenerator(node)
        self._timer = DeadlineTimer(self.table.next_expiry_ms, self._expire)
        self.on_expire: list[Callable[[Route], object]] = []
        self.on_bind: list[Callable[[Route], object]] = []
        self.expired = 0
        self._poller: asyncio.Task[None] | None = None
        if backend is not None:
            self._poller = asyncio.get_running_loop().create_task(self._poll(expire_poll_ms))

    def now_ms(self) -> int:
        """The service's monotonic clock (loop time in ms). O(1)."""
        return self._timer.now_ms()

    def new_epoch(self) -> int:
        """A fresh epoch for a new connection: larger than every earlier one. O(1).

        Snowflake ids: increasing within this process, ordered by wall time across
        processes (give each process its own ``node``).
        """
        return self._ids.next_id(int(time.time() * 1000))

    async def bind(self, route: Route) -> BindResult:
        """Bind ``route`` now (see :meth:`RouteTable.bind`; may raise CapacityError)."""
        if self.backend is not None:
            result = await self.backend.bind(route)
        else:
            result = self.table.bind(route, self.now_ms())
            self._timer.rearm()
        if result.accepted:
            for callback in self.on_bind:
                callback(route)
        return result

    async def unbind(self, route: Route) -> UnbindResult:
        """The connection of ``route`` closed: park it for the grace period (fenced)."""
        if self.backend is not None:
            return await self.backend.unbind(route.uid, route.device, route.conn_id, route.epoch)
        result = self.table.unbind(
            route.uid, route.device, route.conn_id, route.epoch, self.now_ms()
        )
        self._timer.rearm()
        return result

    async def unbind_gateway(self, gateway: str) -> list[Route]:
        """A gateway went away: park all its live routes. O(routes)."""
        if self.backend is not None:
            return await self.backend.unbind_gateway(gateway)
        routes = self.table.unbind_gateway(gateway, self.now_ms())
        self._timer.rearm()
        return routes

    async def get(self, uid: str, device: str) -> Binding | None:
        """The live or parked route of (uid, device), or None. O(devices)."""
        if self.backend is not None:
            return await self.backend.get(uid, device)
        return self.table.get(uid, device)

    async def lookup(self, uid: str) -> tuple[Route, ...]:
        """Live routes of ``uid``. O(1)."""
        if self.backend is not None:
            return await self.backend.lookup(uid)
        return self.table.lookup(uid)

    async def group_by_gateway(self, uids: Iterable[str]) -> dict[str, list[Route]]:
        """Live routes of ``uids`` grouped by gateway id. O(uids + routes)."""
        if self.backend is not None:
            return await self.backend.group_by_gateway(uids)
        return self.table.group_by_gateway(uids)

    def _expire(self, now_ms: int) -> None:
        self._announce(self.table.expire(now_ms))

    def _announce(self, routes: Iterable[Route]) -> None:
        for route in routes:
            self.expired += 1
            for callback in self.on_expire:
                try:
                    callback(route)
                except Exception:
                    logger.exception("route expiry callback failed")

    async def _poll(self, every_ms: int) -> None:
        backend = self.backend
        assert backend is not None
        while True:
            await asyncio.sleep(every_ms / 1000)
            try:
                self._announce(await backend.expire())
            except ImkitError:
                logger.warning("could not expire routes (backend unreachable)")

    def close(self) -> None:
        """Stop the expiry timer (and the backend poller). Idempotent."""
        self._timer.close()
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
