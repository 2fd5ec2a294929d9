"""Server helpers: listen on TCP, one :class:`FramedConnection` and one handler task per client.

:func:`serve_tcp` is the thin layer (``loop.create_server`` with the socket options
an IM gateway wants). :func:`serve` is the convenient one, shaped like
``websockets.serve``: it runs ``await handler(conn)`` for every accepted connection
and closes the connection when the handler returns. It bounds the number of
connections (a client past the limit gets ``Kick(SERVER_BUSY, retry_after_ms)``,
so it backs off instead of hammering), and on :meth:`Server.close` it kicks every
client with ``SHUTDOWN`` and a retry hint so that they reconnect spread out.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from imkit.aio._transport import FramedConnection
from imkit.errors import ConfigError, ConnectionClosed
from imkit.protocol import Error, ErrorCode, Kick, Role

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_BUSY_RETRY_AFTER_MS",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_SHUTDOWN_RETRY_AFTER_MS",
    "Server",
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

#: Retry hint in the Kick sent to a client past max_connections: long enough that a
#: flood does not turn into a retry storm, short enough to come back soon.
DEFAULT_BUSY_RETRY_AFTER_MS = 5_000

#: Retry hint in the Kick sent to every client on shutdown; clients add their own
#: full-jitter backoff on top, so a restart does not make them all return at once.
DEFAULT_SHUTDOWN_RETRY_AFTER_MS = 1_000

Handler = Callable[[FramedConnection], Awaitable[None]]


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

    def on_open(self) -> None:
        server = self._server
        if len(server.connections) >= server.max_connections or server.closing:
            server.refused += 1
            self.close(
                Kick(
                    code=ErrorCode.SERVER_BUSY,
                    reason="server busy",
                    retry_after_ms=server.busy_retry_after_ms,
                )
            )
            return
        server.connections.add(self)
        self._task = asyncio.get_running_loop().create_task(self._run())
        server.tasks.add(self._task)
        self._task.add_done_callback(server.tasks.discard)

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
        self._server.connections.discard(self)


class Server:
    """What :func:`serve` returns: the listener and the live connections.

    ``async with`` closes it on exit. :attr:`connections` is the set of accepted,
    not yet closed connections; :attr:`refused` counts connections turned away
    because of ``max_connections``.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        max_connections: int,
        busy_retry_after_ms: int,
        shutdown_retry_after_ms: int,
        connection_kwargs: dict[str, Any],
    ) -> None:
        if max_connections < 1:
            raise ConfigError(f"max_connections must be >= 1, got {max_connections}")
        self.handler = handler
        self.max_connections = max_connections
        self.busy_retry_after_ms = busy_retry_after_ms
        self.shutdown_retry_after_ms = shutdown_retry_after_ms
        self.connection_kwargs = connection_kwargs
        self.connections: set[FramedConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.refused = 0
        self.closing = False
        self.listener: asyncio.Server | None = None

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

    async def close(self, *, kick: bool = True) -> None:
        """Stop listening, kick every client with SHUTDOWN (or just close), wait for handlers."""
        self.closing = True
        if self.listener is not None:
            self.listener.close()
        for conn in list(self.connections):
            if kick:
                conn.close(
                    Kick(
                        code=ErrorCode.SHUTDOWN,
                        reason="shutdown",
                        retry_after_ms=self.shutdown_retry_after_ms,
                    )
                )
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

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def serve(
    handler: Handler,
    host: str | None,
    port: int,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
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
    exception text). Each connection costs O(1) to accept and track.
    """
    server = Server(
        handler,
        max_connections=max_connections,
        busy_retry_after_ms=busy_retry_after_ms,
        shutdown_retry_after_ms=shutdown_retry_after_ms,
        connection_kwargs=connection_kwargs,
    )
    server.listener = await serve_tcp(
        server._factory, host, port, backlog=backlog, reuse_port=reuse_port
    )
    return server
