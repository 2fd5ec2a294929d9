"""imkit on asyncio (floor 3, the only library package that imports asyncio).

Adapters that wire the sans-IO blocks to the event loop:

* :class:`FramedConnection` -- an ``asyncio.Protocol`` holding a protocol
  ``Connection``: coalesced writes, bounded inbox, slow-reader cut, deadlines;
  :func:`serve` / :func:`serve_tcp` / :func:`open_connection`;
* :class:`Client` -- the IM client: endpoints (a static list and/or a pluggable
  :data:`EndpointFetcher`, cached, ranked and raced), login, reconnect with
  backoff, heartbeats, over a ``ClientSession``;
* :class:`WheelDriver` (a timing wheel on the loop clock) and
  :class:`DeadlineTimer` (one timer for a session that keeps its own wheel);
* :func:`run` / :func:`new_event_loop` (uvloop when installed), :func:`loop_ms`;
* :class:`~imkit.aio.bus.MemoryBus` and :class:`~imkit.aio.discovery.MemoryRegistry`;
* :class:`ThreadedStore` (a blocking store on one worker thread, in call order) and
  :class:`InlineStore` (a store that never blocks), the awaited
  :class:`~imkit.store.AsyncMessageStore`; :func:`async_store` picks one.

See docs/aio.md and docs/bus.md.
"""

from __future__ import annotations

from imkit.aio._client import (
    DEFAULT_CONNECT_TIMEOUT_MS,
    DEFAULT_DEMOTE_MS,
    DEFAULT_ENDPOINT_TTL_MS,
    DEFAULT_FETCH_TIMEOUT_MS,
    DEFAULT_MAX_RACING,
    DEFAULT_MAX_UNREAD_MESSAGES,
    DEFAULT_RACE_DELAY_MS,
    Client,
    ClientStatus,
)
from imkit.aio._endpoints import (
    DEFAULT_MAX_IPCONF_ENDPOINTS,
    Endpoint,
    EndpointFetcher,
    parse_endpoints,
)
from imkit.aio._loop import loop_ms, new_event_loop, run, uvloop_available
from imkit.aio._server import (
    DEFAULT_BACKLOG,
    DEFAULT_BUSY_RETRY_AFTER_MS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PENDING_LOGINS,
    DEFAULT_MAX_PER_ADDRESS,
    DEFAULT_SHUTDOWN_RETRY_AFTER_MS,
    Server,
    serve,
    serve_tcp,
)
from imkit.aio._store import DEFAULT_MAX_QUEUED_CALLS, InlineStore, ThreadedStore, async_store
from imkit.aio._timers import DEFAULT_CATCH_UP_MS, DEFAULT_STALL_MS, DeadlineTimer, WheelDriver
from imkit.aio._transport import (
    DEFAULT_CLOSE_TIMEOUT_MS,
    DEFAULT_FRAME_TIMEOUT_MS,
    DEFAULT_HANDSHAKE_TIMEOUT_MS,
    DEFAULT_MAX_PENDING_MESSAGES,
    DEFAULT_MAX_WRITE_BUFFER,
    DEFAULT_WRITE_HIGH_WATER,
    FramedConnection,
    open_connection,
    timers_for,
)
from imkit.aio.bus import MemoryBus, MemorySubscription
from imkit.aio.discovery import MemoryRegistry

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_BUSY_RETRY_AFTER_MS",
    "DEFAULT_CATCH_UP_MS",
    "DEFAULT_CLOSE_TIMEOUT_MS",
    "DEFAULT_CONNECT_TIMEOUT_MS",
    "DEFAULT_DEMOTE_MS",
    "DEFAULT_ENDPOINT_TTL_MS",
    "DEFAULT_FETCH_TIMEOUT_MS",
    "DEFAULT_FRAME_TIMEOUT_MS",
    "DEFAULT_HANDSHAKE_TIMEOUT_MS",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_IPCONF_ENDPOINTS",
    "DEFAULT_MAX_PENDING_LOGINS",
    "DEFAULT_MAX_PENDING_MESSAGES",
    "DEFAULT_MAX_PER_ADDRESS",
    "DEFAULT_MAX_QUEUED_CALLS",
    "DEFAULT_MAX_RACING",
    "DEFAULT_MAX_UNREAD_MESSAGES",
    "DEFAULT_MAX_WRITE_BUFFER",
    "DEFAULT_RACE_DELAY_MS",
    "DEFAULT_SHUTDOWN_RETRY_AFTER_MS",
    "DEFAULT_STALL_MS",
    "DEFAULT_WRITE_HIGH_WATER",
    "Client",
    "ClientStatus",
    "DeadlineTimer",
    "Endpoint",
    "EndpointFetcher",
    "FramedConnection",
    "InlineStore",
    "MemoryBus",
    "MemoryRegistry",
    "MemorySubscription",
    "Server",
    "ThreadedStore",
    "WheelDriver",
    "async_store",
    "loop_ms",
    "new_event_loop",
    "open_connection",
    "parse_endpoints",
    "run",
    "serve",
    "serve_tcp",
    "timers_for",
    "uvloop_available",
]
