"""Server helpers: listen on TCP, one :class:`FramedConnection` and one handler task per client.

:func:`serve_tcp` is the thin layer (``loop.create_server`` with the socket options
an IM gateway wants). :func:`serve` is the convenient one, shaped like
``websockets.serve``: it runs ``await handler(conn)`` for every accepted connection
and closes the connection when the handler returns, and on :meth:`Server.aclose` it
kicks every client with ``SHUTDOWN`` and a retry hint so that they reconnect
spread out.

Admission limits, each a keyword of :func:`serve` (see the DEFAULT_* constants),
checked in this order when a connection arrives:

* ``max_per_address``: connections (logged in or not) from one peer address: an
  IPv4 address, or an IPv6 /64 (one subscriber's prefix), IPv4-mapped IPv6 counted
  as IPv4. Loopback is not exempt. A newcomer past it is refused with
  ``Kick(SERVER_BUSY, retry_after_ms)``: one address cannot fill the server, and
  since it is checked first, a flood from one address never evicts anyone.
* ``max_pending_logins``: connections that have not logged in yet (the handler has
  not called :meth:`~FramedConnection.established`; with
  ``handshake_timeout_ms=None`` there is no login phase and none is). When this budget is full, or
  the server is at ``max_connections``, a newcomer is let in and the *oldest*
  pending connection is evicted with ``Kick(SERVER_BUSY, retry_after_ms)``. Idle
  connections therefore hold at most this many slots, and under a flood of them a
  fresh login has the whole budget's turnover time (``max_pending_logins`` /
  flood rate) to log in -- refusing newcomers instead would let a flood that
  merely refreshes its idle connections before the login deadline lock every new
  user out.
* ``max_connections``: all connections. Logged-in connections are never evicted;
  when every slot is logged in, a newcomer gets ``Kick(SERVER_BUSY,
  retry_after_ms)`` so it backs off instead of hammering.

Each admission costs O(1): an insertion-ordered map of pending connections and a
count per address.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import random
import socket
import warnings
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from imkit.aio._checks import check_int
from imkit.aio._transport import FramedConnection
from imkit.errors import ConnectionClosed
from imkit.protocol import Error, ErrorCode, Kick, Role

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_BUSY_RETRY_AFTER_MS",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_PENDING_LOGINS",
    "DEFAULT_MAX_PER_ADDRESS",
    "DEFAULT_SHUTDOWN_RETRY_AFTER_MS",
    "Server",
    "address_key",
    "serve",
    "serve_tcp",
]

logger = logging.getLogger("imkit.aio")

#: Listen backlog. Linux caps it at net.core.somaxconn (4096 on recent kernels);
#: a reconnect wave of thousands of clients needs more than asyncio's 100.
DEFAULT_BACKLOG = 4096

#: Connections one server accepts at once. 10k is the classic C10k figure and well
#: within one Python process's memory (PEERS.md: Mosquitto holds ~1 KiB per
#: connection; an imkit connection with its session is a few KiB); raise it together
#: with the process's file-descriptor limit.
DEFAULT_MAX_CONNECTIONS = 10_000

#: Connections not logged in yet that one server holds at once; past it the oldest
#: is evicted. Logins take a round trip or two (< 1 s even on mobile links), so by
#: Little's law 2,000 pending covers a reconnect wave of 2,000+ logins a second (a
#: whole 10k gateway's clients returning within 5 s); it leaves 80% of the default
#: max_connections to logged-in users whatever a flood of idle connections does.
DEFAULT_MAX_PENDING_LOGINS = 2_000

#: Connections from one IPv4 address or IPv6 /64. A carrier-grade NAT or an office
#: puts hundreds of users, at most a few thousand, behind one public IPv4 address
#: (RFC 6888 leaves the ratio to operators; 1:64-1:1000 is common), and a cluster
#: spreads them over its gateways; 2,000 is a fifth of max_connections, so one
#: address cannot fill a gateway, and the 1,000-client benchmarks on loopback fit.
DEFAULT_MAX_PER_ADDRESS = 2_000

#: Retry hint in the Kick sent to a client past max_connections: long enough that a
#: flood does not turn into a retry storm, short enough to come back soon.
DEFAULT_BUSY_RETRY_AFTER_MS = 5_000

#: Mean retry hint in the Kick sent to every client on shutdown. Each client gets
#: its own hint, drawn uniformly from [0.5, 1.5) x this (a client never reconnects
#: before its hint), so a drained gateway's clients return spread over a second
#: instead of in one wave.
DEFAULT_SHUTDOWN_RETRY_AFTER_MS = 1_000

Handler = Callable[[FramedConnection], Awaitable[None]]

AddressKey = int | tuple[int, int]


def address_key(peername: object) -> AddressKey | None:
    """The key ``max_per_address`` counts by: IPv4 address, or IPv6 /64. O(1).

    ``peername`` is what the transport reports (``(host, port, ...)``); an
    IPv4-mapped IPv6 address counts as its IPv4 address. None for what is not an
    IP peer (a Unix socket, an unparsable name): such peers are not counted.
    """
    if not isinstance(peername, tuple) or not peername or not isinstance(peername[0], str):
        return None
    host = peername[0].split("%", 1)[0]  # drop an IPv6 zone id
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return int(ip.ipv4_mapped)
        return (6, int(ip) >> 64)
    return int(ip)


async def serve_tcp(
    protocol_factory: Callable[[], asyncio.Protocol],
    host: str | None,
    port: int,
    *,
    backlog: int = DEFAULT_BACKLOG,
    reuse_port: bool = False,
    **kwargs: Any,
) -> asyncio.Server:
    """Listen on ``host:port`` (port 0: any free port) with ``protocol_factory``.

    ``SO_REUSEADDR`` is on (a restarted gateway binds at once); ``reuse_port`` lets
    several gateway processes share one port (Linux). TCP_NODELAY is set per
    connection by :class:`FramedConnection`. Extra keywords go to ``create_server``.
    """
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        protocol_factory,
        host,
        port,
        backlog=backlog,
        reuse_address=True,
        reuse_port=reuse_port or None,
        **kwargs,
    )


class _ServedConnection(FramedConnection):
    """A FramedConnection that runs the server's handler and reports to the server."""

    def __init__(self, server: Server, **kwargs: Any) -> None:
        super().__init__(Role.SERVER, **kwargs)
        self._server = server
        self._task: asyncio.Task[None] | None = None
        self.address: AddressKey | None = None  # counted in server.per_address while admitted

    def on_open(self) -> None:
        server = self._server
        if not server._admit(self):
            server.refused += 1
            self.close(server._busy_kick())
            return
        self._task = asyncio.get_running_loop().create_task(self._run())
        server.tasks.add(self._task)
        self._task.add_done_callback(server.tasks.discard)

    def established(self) -> None:
        """Logged in: leave the pending-login budget (never evicted from now on). O(1)."""
        super().established()
        self._server._pending.pop(self, None)

    async def _run(self) -> None:
        try:
            await self._server.handler(self)
        except (ConnectionClosed, asyncio.CancelledError):
            pass
        except Exception:
            logger.exception("connection handler failed")
            self.close(Error(code=ErrorCode.INTERNAL, reason="internal error"))
        finally:
            self.close()

    def on_close(self, code: int, exc: BaseException | None) -> None:
        self._server._forget(self)


class Server:
    """What :func:`serve` returns: the listener and the live connections.

    ``async with`` closes it on exit. :attr:`connections` is the set of admitted,
    not yet closed (nor evicted) connections; :attr:`pending_logins` how many of
    them have not logged in. Counters: :attr:`refused` (newcomers turned away:
    ``max_connections`` full of logged-in users, ``max_per_address``, or closing),
    :attr:`evicted` (pending connections evicted to make room for a newcomer).
    Admission is O(1) (module docstring).
    """

    def __init__(
        self,
        handler: Handler,
        *,
        max_connections: int,
        max_pending_logins: int = DEFAULT_MAX_PENDING_LOGINS,
        max_per_address: int = DEFAULT_MAX_PER_ADDRESS,
        busy_retry_after_ms: int,
        shutdown_retry_after_ms: int,
        connection_kwargs: dict[str, Any],
    ) -> None:
        check_int("max_connections", max_connections)
        check_int("max_pending_logins", max_pending_logins)
        check_int("max_per_address", max_per_address)
        check_int("busy_retry_after_ms", busy_retry_after_ms, minimum=0)
        check_int("shutdown_retry_after_ms", shutdown_retry_after_ms, minimum=0)
        self.handler = handler
        self.max_connections = max_connections
        self.max_pending_logins = max_pending_logins
        self.max_per_address = max_per_address
        self.busy_retry_after_ms = busy_retry_after_ms
        self.shutdown_retry_after_ms = shutdown_retry_after_ms
        self.connection_kwargs = connection_kwargs
        self.connections: set[FramedConnection] = set()
        # admitted connections not logged in yet, oldest first (values unused)
        self._pending: collections.OrderedDict[_ServedConnection, None] = (
            collections.OrderedDict()
        )
        self.per_address: dict[AddressKey, int] = {}  # admitted connections per address key
        self.tasks: set[asyncio.Task[None]] = set()
        self.refused = 0
        self.evicted = 0
        self.closing = False
        self.listener: asyncio.Server | None = None

    @property
    def pending_logins(self) -> int:
        """Admitted connections that have not logged in yet. O(1)."""
        return len(self._pending)

    def _busy_kick(self) -> Kick:
        return Kick(
            code=ErrorCode.SERVER_BUSY,
            reason="server busy",
            retry_after_ms=self.busy_retry_after_ms,
        )

    def _admit(self, conn: _ServedConnection) -> bool:
        """Let ``conn`` in (evicting the oldest pending login if needed), or say no. O(1)."""
        if self.closing:
            return False
        key = address_key(conn.peername())
        if key is not None and self.per_address.get(key, 0) >= self.max_per_address:
            return False
        pending = self._pending
        if len(pending) >= self.max_pending_logins or len(self.connections) >= self.max_connections:
            if not pending:
                return False  # every slot is a logged-in user: they are never evicted
            oldest, _ = pending.popitem(last=False)
            self.evicted += 1
            self._forget(oldest)
            oldest.close(self._busy_kick())
        self.connections.add(conn)
        if conn.handshake_timeout_ms is not None:  # no login phase: admitted as logged in
            pending[conn] = None
        if key is not None:
            conn.address = key
            self.per_address[key] = self.per_address.get(key, 0) + 1
        return True

    def _forget(self, conn: _ServedConnection) -> None:
        """Release ``conn``'s slot, pending place and address count. Idempotent, O(1)."""
        self.connections.discard(conn)
        self._pending.pop(conn, None)
        key = conn.address
        if key is not None:
            conn.address = None
            left = self.per_address[key] - 1
            if left:
                self.per_address[key] = left
            else:
                del self.per_address[key]

    def _check(self) -> None:
        """Assert the admission invariants (limits held, counts consistent)."""
        if len(self.connections) > self.max_connections:
            raise AssertionError(f"{len(self.connections)} connections > max_connections")
        if len(self._pending) > self.max_pending_logins:
            raise AssertionError(f"{len(self._pending)} pending > max_pending_logins")
        if not set(self._pending) <= self.connections:
            raise AssertionError("a pending connection is not among the connections")
        counts: dict[AddressKey, int] = {}
        for conn in self.connections:
            if isinstance(conn, _ServedConnection) and conn.address is not None:
                counts[conn.address] = counts.get(conn.address, 0) + 1
        if counts != self.per_address:
            raise AssertionError("per-address counts do not match the connections")
        if any(n > self.max_per_address for n in counts.values()):
            raise AssertionError("an address holds more than max_per_address")

    def _factory(self) -> FramedConnection:
        return _ServedConnection(self, **self.connection_kwargs)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets."""
        return () if self.listener is None else tuple(self.listener.sockets)

    @property
    def port(self) -> int:
        """The port of the first listening socket (useful after binding port 0)."""
        port: int = self.sockets[0].getsockname()[1]
        return port

    async def aclose(self, *, kick: bool = True) -> None:
        """Stop listening, kick every client with SHUTDOWN (or just close), wait for handlers.

        Idempotent. O(connections + handler tasks).
        """
        self.closing = True
        if self.listener is not None:
            self.listener.close()
        mean = self.shutdown_retry_after_ms
        for conn in list(self.connections):
            if kick:
                # spread: each client its own hint in [0.5, 1.5) x mean
                hint = mean // 2 + int(random.random() * mean)
                conn.close(Kick(code=ErrorCode.SHUTDOWN, reason="shutdown", retry_after_ms=hint))
            else:
                conn.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for conn in list(self.connections):
            await conn.wait_closed()
        if self.listener is not None:
            await self.listener.wait_closed()

    async def close(self, *, kick: bool = True) -> None:
        """Deprecated alias of :meth:`aclose` (async closers are ``aclose``, as in trio).

        Kept for one release; emits DeprecationWarning.
        """
        warnings.warn(
            "Server.close() is deprecated, use aclose()", DeprecationWarning, stacklevel=2
        )
        await self.aclose(kick=kick)

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def serve(
    handler: Handler,
    host: str | None,
    port: int,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_pending_logins: int = DEFAULT_MAX_PENDING_LOGINS,
    max_per_address: int = DEFAULT_MAX_PER_ADDRESS,
    busy_retry_after_ms: int = DEFAULT_BUSY_RETRY_AFTER_MS,
    shutdown_retry_after_ms: int = DEFAULT_SHUTDOWN_RETRY_AFTER_MS,
    backlog: int = DEFAULT_BACKLOG,
    reuse_port: bool = False,
    **connection_kwargs: Any,
) -> Server:
    """Serve framed connections: ``await handler(conn)`` per client, closed when it returns.

    ``connection_kwargs`` go to :class:`FramedConnection` (``max_pending``,
    ``max_write_buffer``, ``frame_timeout_ms``, ``handshake_timeout_ms``, ...). A
    handler that raises is logged and its client gets ``Error(INTERNAL)`` (never the
    exception text). Each connection costs O(1) to accept and track. The admission
    limits (``max_connections``, ``max_pending_logins``, ``max_per_address``) are
    described in the module docstring; the handler must call ``conn.established()``
    once the client has logged in, or the connection stays evictable.
    """
    server = Server(
        handler,
        max_connections=max_connections,
        max_pending_logins=max_pending_logins,
        max_per_address=max_per_address,
        busy_retry_after_ms=busy_retry_after_ms,
        shutdown_retry_after_ms=shutdown_retry_after_ms,
        connection_kwargs=connection_kwargs,
    )
    server.listener = await serve_tcp(
        server._factory, host, port, backlog=backlog, reuse_port=reuse_port
    )
    return server
