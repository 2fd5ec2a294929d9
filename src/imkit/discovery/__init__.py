"""Gateway discovery: registration, load reports, TTL expiry, ranking for ipconf.

Floor 2. :class:`Registry` is the interface a backend implements; :class:`GatewayTable`
is the sans-IO core (time comes in as ``now_ms``) of the in-process backend,
:class:`imkit.aio.discovery.MemoryRegistry`. See docs/bus.md.
"""

from __future__ import annotations

from imkit.discovery._api import Registry
from imkit.discovery._table import (
    DEFAULT_LOAD_BAND,
    DEFAULT_MAX_ENDPOINTS,
    DEFAULT_MAX_GATEWAYS,
    DEFAULT_TTL_MS,
    GatewayInfo,
    GatewayTable,
)

__all__ = [
    "DEFAULT_LOAD_BAND",
    "DEFAULT_MAX_ENDPOINTS",
    "DEFAULT_MAX_GATEWAYS",
    "DEFAULT_TTL_MS",
    "GatewayInfo",
    "GatewayTable",
    "Registry",
]
