"""imkit: instant-messaging building blocks for Python.

This package face exports the few names a newcomer needs: the floor-1 blocks
(:class:`HashRing`, :class:`TimingWheel`, the dedup windows, seq and id
allocation, the merger, the route table), the delivery sessions, the sans-IO
:class:`Connection` with the two messages the README sends, and the errors a
caller catches most. Everything else is imported from the module or subpackage
of its block, whose ``__all__`` is complete for it:

* floor 1 (pure, no I/O, time passed in as ``now_ms``): :mod:`imkit.hashring`,
  :mod:`imkit.timingwheel`, :mod:`imkit.dedup`, :mod:`imkit.seq`,
  :mod:`imkit.policy`, :mod:`imkit.protocol` (every message, the codec and its
  limits), :mod:`imkit.routetable`, :mod:`imkit.merger`, :mod:`imkit.session`
  (the sessions' events and limits) and the exception tree of :mod:`imkit.errors`;
* floor 2: :mod:`imkit.store` (memory and SQLite message stores), :mod:`imkit.bus`
  and :mod:`imkit.discovery` (interfaces and their sans-IO cores);
* :mod:`imkit.aio`: the asyncio adapters, the only package that imports asyncio.
"""

from __future__ import annotations

from imkit.dedup import CidWindow, SeqWindow, Verdict
from imkit.errors import (
    AuthError,
    CapacityError,
    ConfigError,
    ConnectionClosed,
    ImkitError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    SendError,
    StoreError,
)
from imkit.hashring import HashRing, jump_hash
from imkit.merger import MessageMerger, SignalAggregator
from imkit.protocol import CLOSED, NEED_DATA, Connection, Push, Role, Send
from imkit.routetable import Route, RouteTable, TableRouter
from imkit.seq import IdGenerator, MemoryCeilingStore, SeqAllocator
from imkit.session import (
    ClientConfig,
    ClientSession,
    ServerConfig,
    ServerSession,
    ServerTimer,
    initial_cid,
)
from imkit.timingwheel import TimingWheel

__version__ = "0.1.0.dev0"

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "AuthError",
    "CapacityError",
    "CidWindow",
    "ClientConfig",
    "ClientSession",
    "ConfigError",
    "Connection",
    "ConnectionClosed",
    "HashRing",
    "IdGenerator",
    "ImkitError",
    "LocalProtocolError",
    "MemoryCeilingStore",
    "MessageMerger",
    "ProtocolError",
    "Push",
    "RemoteProtocolError",
    "Role",
    "Route",
    "RouteTable",
    "Send",
    "SendError",
    "SeqAllocator",
    "SeqWindow",
    "ServerConfig",
    "ServerSession",
    "ServerTimer",
    "SignalAggregator",
    "StoreError",
    "TableRouter",
    "TimingWheel",
    "Verdict",
    "__version__",
    "initial_cid",
    "jump_hash",
]
