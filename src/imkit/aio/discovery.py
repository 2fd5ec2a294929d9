"""The in-process gateway registry on asyncio: :class:`MemoryRegistry`.

It implements :class:`imkit.discovery.Registry`.

An adapter over the sans-IO :class:`imkit.discovery.GatewayTable` that supplies the
clock (the event loop's, in ms, unless a ``clock`` is injected) and expires dead
gateways lazily on every call, so it needs no background task.
"""

from __future__ import annotations

from collections.abc import Callable

from imkit.aio._loop import loop_ms
from imkit.discovery import (
    DEFAULT_LOAD_BAND,
    DEFAULT_MAX_ENDPOINTS,
    DEFAULT_MAX_GATEWAYS,
    DEFAULT_TTL_MS,
    GatewayInfo,
    GatewayTable,
)

__all__ = ["MemoryRegistry"]


class MemoryRegistry:
    """Gateways registered in this process; see :class:`~imkit.discovery.GatewayTable`.

    Costs are the table's plus one lazy ``expire`` (O(n)) per call that reads.
    ``clock`` returns monotonic milliseconds; default: the running loop's clock.
    """

    def __init__(
        self,
        *,
        ttl_ms: int = DEFAULT_TTL_MS,
        max_gateways: int = DEFAULT_MAX_GATEWAYS,
        max_endpoints: int = DEFAULT_MAX_ENDPOINTS,
        load_band: float = DEFAULT_LOAD_BAND,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self.table = GatewayTable(
            ttl_ms=ttl_ms,
            max_gateways=max_gateways,
            max_endpoints=max_endpoints,
            load_band=load_band,
        )
        self._clock = clock if clock is not None else loop_ms

    async def register(self, info: GatewayInfo, *, ttl_ms: int | None = None) -> None:
        """Add or replace ``info.id``, live for ``ttl_ms``. O(e)."""
        self.table.register(info, self._clock(), ttl_ms=ttl_ms)

    async def heartbeat(
        self, gateway_id: str, *, connections: int | None = None, cpu: float | None = None
    ) -> bool:
        """Extend the TTL and update the load; False if the gateway must register again. O(1)."""
        return self.table.heartbeat(gateway_id, self._clock(), connections=connections, cpu=cpu)

    async def set_draining(self, gateway_id: str, draining: bool = True) -> bool:
        """Rank the gateway last while it drains; False if unknown. O(1)."""
        return self.table.set_draining(gateway_id, self._clock(), draining)

    async def deregister(self, gateway_id: str) -> bool:
        """Remove the gateway now; True if it was registered. O(1)."""
        return self.table.deregister(gateway_id)

    async def get(self, gateway_id: str) -> GatewayInfo | None:
        """The live gateway's info, or None. O(1)."""
        return self.table.get(gateway_id, self._clock())

    async def live(self) -> list[GatewayInfo]:
        """Every live gateway, by id (expired ones are removed first). O(n log n)."""
        now = self._clock()
        self.table.expire(now)
        return self.table.live(now)

    async def rank(
        self, *, region: str = "", client_key: str = "", limit: int | None = None
    ) -> list[GatewayInfo]:
        """Live gateways in the order a client should try them. O(n log n)."""
        now = self._clock()
        self.table.expire(now)
        return self.table.rank(now, region=region, client_key=client_key, limit=limit)
