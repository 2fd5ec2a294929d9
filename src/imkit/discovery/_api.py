"""The interface every discovery backend implements (memory today; Redis later).

Asynchronous because real backends talk to a server; defining it needs no event
loop, so this module stays on floor 2 without importing asyncio. The in-process
implementation is :class:`imkit.aio.discovery.MemoryRegistry`.
"""

from __future__ import annotations

from typing import Protocol

from imkit.discovery._table import GatewayInfo

__all__ = ["Registry"]


class Registry(Protocol):
    """Where gateways announce themselves and ipconf finds them.

    A gateway calls :meth:`register` at start, :meth:`heartbeat` (with its load)
    more often than the TTL, and :meth:`deregister` on a clean shutdown. A gateway
    that stops heartbeating vanishes after its TTL. The backend owns the clock.
    """

    async def register(self, info: GatewayInfo, *, ttl_ms: int | None = None) -> None:
        """Add or replace ``info.id``, live for ``ttl_ms`` (backend default if None)."""
        ...

    async def heartbeat(
        self, gateway_id: str, *, connections: int | None = None, cpu: float | None = None
    ) -> bool:
        """Extend the gateway's TTL and update its load; False if it must register again."""
        ...

    async def set_draining(self, gateway_id: str, draining: bool = True) -> bool:
        """Rank the gateway last (no new clients) while it drains; False if unknown."""
        ...

    async def deregister(self, gateway_id: str) -> bool:
        """Remove the gateway now; True if it was registered."""
        ...

    async def get(self, gateway_id: str) -> GatewayInfo | None:
        """The live gateway's info, or None."""
        ...

    async def live(self) -> list[GatewayInfo]:
        """Every live gateway, by id."""
        ...

    async def rank(
        self, *, region: str = "", client_key: str = "", limit: int | None = None
    ) -> list[GatewayInfo]:
        """Live gateways in the order a client should try them (see GatewayTable.rank)."""
        ...
