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

What it leaves out
    A shared backend: this table lives in the process of the all-in-one launcher.
    Past one machine the same calls go to a Redis-backed table
    (:class:`imkit.routetable.RouteTableBackend`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from imkit.aio import DeadlineTimer
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

__all__ = ["RouteService"]

logger = logging.getLogger("examples.routes")


class RouteService:
    """A :class:`~imkit.routetable.RouteTable` on the event loop, with grace expiry.

    Every method is the table's cost (O(devices of the user), ``group_by_gateway``
    O(uids)); the expiry timer costs O(1) per expired route. Create it inside a
    running loop.
    """

    def __init__(
        self,
        *,
        grace_ms: int = DEFAULT_GRACE_MS,
        max_devices: int = DEFAULT_MAX_DEVICES,
        max_routes: int = DEFAULT_MAX_ROUTES,
        node: int = 0,
    ) -> None:
        self.table = RouteTable(grace_ms=grace_ms, max_devices=max_devices, max_routes=max_routes)
        self._ids = IdGenerator(node)
        self._timer = DeadlineTimer(self.table.next_expiry_ms, self._expire)
        self.on_expire: list[Callable[[Route], object]] = []
        self.on_bind: list[Callable[[Route], object]] = []
        self.expired = 0

    def now_ms(self) -> int:
        """The service's monotonic clock (loop time in ms). O(1)."""
        return self._timer.now_ms()

    def new_epoch(self) -> int:
        """A fresh epoch for a new connection: larger than every earlier one. O(1)."""
        return self._ids.next_id(int(time.time() * 1000))

    def bind(self, route: Route) -> BindResult:
        """Bind ``route`` now (see :meth:`RouteTable.bind`; may raise CapacityError)."""
        result = self.table.bind(route, self.now_ms())
        self._timer.rearm()
        if result.accepted:
            for callback in self.on_bind:
                callback(route)
        return result

    def unbind(self, route: Route) -> UnbindResult:
        """The connection of ``route`` closed: park it for the grace period (fenced)."""
        result = self.table.unbind(
            route.uid, route.device, route.conn_id, route.epoch, self.now_ms()
        )
        self._timer.rearm()
        return result

    def unbind_gateway(self, gateway: str) -> list[Route]:
        """A gateway went away: park all its live routes. O(routes)."""
        routes = self.table.unbind_gateway(gateway, self.now_ms())
        self._timer.rearm()
        return routes

    def get(self, uid: str, device: str) -> Binding | None:
        """The live or parked route of (uid, device), or None. O(devices)."""
        return self.table.get(uid, device)

    def lookup(self, uid: str) -> tuple[Route, ...]:
        """Live routes of ``uid``. O(1)."""
        return self.table.lookup(uid)

    def group_by_gateway(self, uids: Iterable[str]) -> dict[str, list[Route]]:
        """Live routes of ``uids`` grouped by gateway id. O(uids + routes)."""
        return self.table.group_by_gateway(uids)

    def _expire(self, now_ms: int) -> None:
        for route in self.table.expire(now_ms):
            self.expired += 1
            for callback in self.on_expire:
                try:
                    callback(route)
                except Exception:
                    logger.exception("route expiry callback failed")

    def close(self) -> None:
        """Stop the expiry timer. Idempotent."""
        self._timer.close()

