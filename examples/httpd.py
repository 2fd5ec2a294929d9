"""A minimal, bounded HTTP/1.1 server on asyncio streams and h11, for ipconf and the web page.

What it does
    One request per connection (``Connection: close``). The bytes are parsed by
    h11 (the sans-IO HTTP/1.1 parser wsproto is built on): the head (at most
    ``max_header`` bytes), then a ``Content-Length`` or chunked body (at most
    ``max_body``); ``handler(request) -> Response`` is called, the answer
    written, the connection closed. A request that asks for a WebSocket upgrade
    (``Upgrade: websocket``) is handed, with its streams and any bytes that came
    after its head (``Request.trailing``), to ``upgrade`` (the gateway's
    WebSocket endpoint), which validates the handshake and owns the connection
    from then on.

Policies
    Every limit is a keyword with a ``DEFAULT_*`` constant.

    * A head too large gets 431, a body too large 413, a malformed request 400
      (h11's verdict; an HTTP/1.1 request must name its ``Host``), a method other
      than GET, POST and HEAD 405. Errors never carry internal details (a handler
      that raises gives a bare 500).
    * Deadlines: the whole head must arrive within ``head_timeout_ms`` of the
      connection and the whole request within ``timeout_ms``; then 408 and close.
      The response must be taken within ``timeout_ms`` too.
    * Budgets (slowloris defence). A connection is *pending* until its request
      head is complete. At most ``max_pending`` connections are pending, at most
      ``max_connections`` are in their request phase (pending or being answered),
      and at most ``max_per_peer`` of those come from one IP address (loopback
      included, unless ``exempt_loopback``). When a new connection would exceed
      a budget, the **oldest pending connection** (of that address, for the
      per-address cap) is dropped to make room: a client that sends its request
      promptly is answered however many slow ones are held, and the slow ones
      only churn each other. If no pending connection can go (every slot is a
      request being answered), the new connection is closed at once.
      Upgraded WebSocket links leave these budgets (the gateway bounds those).
    * Log lines caused by peers (evictions, bad requests) are rate-limited per
      cause (:class:`RateLimitedLog`).

What it leaves out
    Keep-alive, pipelining, TLS (put a reverse proxy in front; then set
    ``exempt_loopback``, since every client arrives from the proxy), trusting
    ``X-Forwarded-For`` for the per-address cap, and anything but GET, POST and
    HEAD.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs
import h11

from imkit.errors import ConfigError, LocalProtocolError

__all__ = [
    "DEFAULT_HTTP_HEAD_TIMEOUT_MS",
    "DEFAULT_HTTP_MAX_BODY",
    "DEFAULT_HTTP_MAX_CONNECTIONS",
    "DEFAULT_HTTP_MAX_HEADER",
    "DEFAULT_HTTP_MAX_PENDING",
    "DEFAULT_HTTP_MAX_PER_PEER",
    "DEFAULT_HTTP_TIMEOUT_MS",
    "DEFAULT_LOG_INTERVAL_MS",
    "FORWARDING_HEADERS",
    "HttpServer",
    "RateLimitedLog",
    "Request",
    "Response",
    "is_direct_local",
    "is_loopback",
    "json_response",
    "render_response",
    "serve_http",
]

logger = logging.getLogger("examples.httpd")

#: Request head bytes: h11's default limit (16 KiB, which cites node.js and tomcat).
DEFAULT_HTTP_MAX_HEADER = 16 * 1024
#: Request body bytes: the admin endpoints take a member list; 64 KiB is ~5000 uids.
DEFAULT_HTTP_MAX_BODY = 64 * 1024
#: Whole request, first byte to last: a slow body (or a slow reader of the answer)
#: is cut after 10 s; a 64 KiB body at 64 kbit/s (a bad 2G link) takes 8 s.
DEFAULT_HTTP_TIMEOUT_MS = 10_000
#: The request head, from the connection to its last byte. A client writes its
#: head (a few hundred bytes) at once, so it arrives one round trip after the
#: connection; 5 s covers a 1 s-RTT mobile link losing it twice (TCP's initial
#: retransmission timeout is 1 s, then 2 s) and halves the time a slowloris
#: connection holds a pending slot compared with the whole-request 10 s.
DEFAULT_HTTP_HEAD_TIMEOUT_MS = 5_000
#: Requests handled at once. ipconf answers from memory in microseconds, so 1000
#: concurrent requests only happen under a reconnect storm; past that, shed load.
DEFAULT_HTTP_MAX_CONNECTIONS = 1000
#: Connections whose head is not complete yet: a quarter of ``max_connections``,
#: so slow heads can never take more than a quarter of the request slots. A real
#: client's head arrives within one round trip, so 256 pending slots admit ~850
#: new connections/s on 300 ms-RTT links before a prompt client could be evicted.
DEFAULT_HTTP_MAX_PENDING = 256
#: Connections in their request phase from one IP address. A request lasts about
#: one round trip, so 128 at once is ~400 requests/s from one address (a carrier-
#: grade NAT in a reconnect storm fits); one address cannot fill the pending budget
#: alone, so a flood from one address does not evict other addresses' requests.
DEFAULT_HTTP_MAX_PER_PEER = 128
#: Rate-limited log lines: at most one per cause per second.
DEFAULT_LOG_INTERVAL_MS = 1_000

#: Bytes read from the socket at a time: a whole head in one read, usually.
_READ_SIZE = 16 * 1024

#: Headers a proxy adds: a request that carries one did not come straight from a
#: local client, whatever its peer address (RFC 7239, and the de-facto X-* ones).
FORWARDING_HEADERS = (
    "forwarded",
    "via",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
)

_METHODS = ("GET", "POST", "HEAD")

_REASONS = {
    101: "Switching Protocols",
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


@attrs.frozen(kw_only=True)
class Request:
    """One parsed request.

    ``headers`` keys are lower-case; a header sent several times is joined with
    ", " (RFC 9110, section 5.3). ``query`` keeps the last value of a name.
    ``trailing`` holds bytes the client sent after the request (for an upgrade);
    ``peer`` is the client's IP address and ``local`` the address of this machine
    it connected to.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    version: str = "1.1"
    trailing: bytes = b""
    peer: str = ""
    local: str = ""

    def json(self) -> Any:
        """The body decoded as JSON (ValueError if it is not)."""
        return json.loads(self.body or b"null")

    def header_tokens(self, name: str) -> list[str]:
        """The comma-separated tokens of header ``name``, lower-case. O(len)."""
        value = self.headers.get(name, "")
        return [t.strip().lower() for t in value.split(",") if t.strip()]


@attrs.frozen(kw_only=True)
class Response:
    """What a handler returns."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_response(doc: Any, status: int = 200) -> Response:
    """A JSON response (with ``Cache-Control: no-store``: the answers change). O(size)."""
    return Response(
        status=status,
        body=json.dumps(doc, separators=(",", ":")).encode(),
        headers=(("Cache-Control", "no-store"),),
    )


def is_loopback(peer: str) -> bool:
    """Whether ``peer`` (an IP address) is this machine. O(1)."""
    return peer in ("::1", "localhost") or peer.startswith(("127.", "::ffff:127."))


def is_direct_local(request: Request) -> bool:
    """True for a request from this machine that no proxy forwarded. O(1).

    A reverse proxy on the same host connects from loopback on behalf of anyone,
    so loopback alone proves nothing; a request carrying any of
    :data:`FORWARDING_HEADERS` is treated as remote. (A proxy that strips every
    such header defeats this: never put one in front of a development server.)
    """
    if not is_loopback(request.peer):
        return False
    return not any(name in request.headers for name in FORWARDING_HEADERS)


def render_response(response: Response, *, head_only: bool = False) -> bytes:
    """The bytes of ``response`` with ``Connection: close``. O(size).

    An error status without a body gets a small JSON one. Raises
    :class:`~imkit.errors.LocalProtocolError` for a header that would break the
    framing (a CR, LF or NUL in a name or value): a handler bug, never a peer's.
    """
    reason = _REASONS.get(response.status, "")
    body = response.body
    if not body and response.status >= 400 and response.content_type == "application/json":
        body = json.dumps({"error": reason.lower() or str(response.status)}).encode()
    headers: list[tuple[str, str]] = []
    if response.status != 101:
        headers += [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    headers += response.headers
    for name, value in headers:
        if any(c in name or c in value for c in "\r\n\0") or not name:
            raise LocalProtocolError(f"bad response header {name!r}")
    lines = [f"HTTP/1.1 {response.status} {reason}", *(f"{n}: {v}" for n, v in headers)]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if head_only or response.status == 101:
        return head
    return head + body


class RateLimitedLog:
    """At most one log line per cause per ``interval_ms``; the next says how many were held.

    For lines a peer can cause at will (a bad request, an eviction): a flood costs
    a few lines a second, not one per connection. ``cause`` strings come from this
    program, never from a peer, so the map of causes stays as small as the code's
    list of them. ``clock`` returns seconds (default ``time.monotonic``). O(1).
    """

    def __init__(
        self,
        log: logging.Logger,
        *,
        interval_ms: int = DEFAULT_LOG_INTERVAL_MS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_ms < 0:
            raise ConfigError(f"interval_ms must be >= 0, got {interval_ms}")
        self.logger = log
        self.interval_ms = interval_ms
        self._clock = clock
        self._causes: dict[str, list[float]] = {}  # cause -> [last line's time, held back]

    def note(
        self,
        cause: str,
        msg: str,
        *args: object,
        level: int = logging.WARNING,
        exc_info: bool = False,
    ) -> bool:
        """Log ``msg % args`` unless ``cause`` logged within the interval; True if logged."""
        now = self._clock()
        state = self._causes.get(cause)
        if state is not None and now - state[0] < self.interval_ms / 1000:
            state[1] += 1
            return False
        held = int(state[1]) if state is not None else 0
        self._causes[cause] = [now, 0]
        if held:
            msg += f" ({held} more like it since the last line)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True


Handler = Callable[[Request], Awaitable[Response]]
Upgrade = Callable[[Request, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class _HttpError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Client:
    """One accepted connection while it counts against the budgets."""

    __slots__ = ("active", "peer", "pending", "task", "writer")

    def __init__(self, peer: str, writer: asyncio.StreamWriter, task: asyncio.Task[None]) -> None:
        self.peer = peer
        self.writer = writer
        self.task = task
        self.pending = False  # head not complete yet
        self.active = False  # in the request phase (counts for the caps)


class HttpServer:
    """What :func:`serve_http` returns: the listener, its port, its counters.

    Admission, eviction and release are O(1) per connection.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        upgrade: Upgrade | None = None,
        max_header: int = DEFAULT_HTTP_MAX_HEADER,
        max_body: int = DEFAULT_HTTP_MAX_BODY,
        timeout_ms: int = DEFAULT_HTTP_TIMEOUT_MS,
        head_timeout_ms: int = DEFAULT_HTTP_HEAD_TIMEOUT_MS,
        max_connections: int = DEFAULT_HTTP_MAX_CONNECTIONS,
        max_pending: int = DEFAULT_HTTP_MAX_PENDING,
        max_per_peer: int = DEFAULT_HTTP_MAX_PER_PEER,
        exempt_loopback: bool = False,
    ) -> None:
        for name, value in (
            ("max_header", max_header),
            ("timeout_ms", timeout_ms),
            ("head_timeout_ms", head_timeout_ms),
            ("max_connections", max_connections),
            ("max_pending", max_pending),
            ("max_per_peer", max_per_peer),
        ):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if max_body < 0:
            raise ConfigError(f"max_body must be >= 0, got {max_body}")
        self.handler = handler
        self.upgrade = upgrade
        self.max_header = max_header
        self.max_body = max_body
        self.timeout_ms = timeout_ms
        self.head_timeout_ms = head_timeout_ms
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.max_per_peer = max_per_peer
        self.exempt_loopback = exempt_loopback
        self.server: asyncio.Server  # set by start()
        self.refused = 0  # new connections closed at once (every slot busy answering)
        self.evicted = 0  # pending connections dropped to make room
        self.timed_out = 0  # requests cut at a deadline (408)
        self.log = RateLimitedLog(logger)
        self._tasks: set[asyncio.Task[None]] = set()  # every connection, for close()
        self._active: set[_Client] = set()
        self._pending: dict[_Client, None] = {}  # oldest first
        self._pending_of: dict[str, dict[_Client, None]] = {}  # peer -> its pending, oldest first
        self._count_of: dict[str, int] = {}  # peer -> its active connections
        self._closing = False

    @property
    def port(self) -> int:
        """The bound port (useful after binding port 0)."""
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    @property
    def pending(self) -> int:
        """Connections whose request head is not complete yet."""
        return len(self._pending)

    @property
    def active(self) -> int:
        """Connections in their request phase (pending or being answered)."""
        return len(self._active)

    def connections_of(self, peer: str) -> int:
        """Connections of ``peer`` in their request phase. O(1)."""
        return self._count_of.get(peer, 0)

    async def start(self, host: str | None, port: int) -> None:
        """Listen on ``host:port``."""
        self.server = await asyncio.start_server(
            self._on_client, host, port, limit=self.max_header, reuse_address=True
        )

    async def aclose(self) -> None:
        """Stop listening and cancel the requests in progress (and upgraded connections)."""
        self._closing = True
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()

    def _check(self) -> None:
        """Assert the invariants of the budgets."""
        pending = [c for c in self._active if c.pending]
        if set(pending) != set(self._pending) or len(self._pending) > self.max_pending:
            raise AssertionError("pending set out of step")
        if sum(len(d) for d in self._pending_of.values()) != len(self._pending):
            raise AssertionError("pending-per-peer out of step")
        if sum(self._count_of.values()) != len(self._active):
            raise AssertionError("per-peer counts out of step")
        if len(self._active) > self.max_connections:
            raise AssertionError("more active connections than max_connections")

    # -- budgets ----------------------------------------------------------------------------

    def _admit(self, client: _Client) -> bool:
        """Make room for ``client`` (evicting the oldest pending if need be); False: refuse."""
        if self._closing:
            return False
        peer = client.peer
        capped = not (self.exempt_loopback and is_loopback(peer))
        full = capped and self._count_of.get(peer, 0) >= self.max_per_peer
        if full and not self._evict_oldest(self._pending_of.get(peer)):
            return False
        if len(self._pending) >= self.max_pending:
            self._evict_oldest(self._pending)
        if len(self._active) >= self.max_connections and not self._evict_oldest(self._pending):
            return False
        client.active = client.pending = True
        self._active.add(client)
        self._pending[client] = None
        self._pending_of.setdefault(peer, {})[client] = None
        self._count_of[peer] = self._count_of.get(peer, 0) + 1
        return True

    def _evict_oldest(self, pending: dict[_Client, None] | None) -> bool:
        if not pending:
            return False
        victim = next(iter(pending))
        self._release(victim)
        victim.writer.transport.abort()  # its partial head is worth nothing
        victim.task.cancel()
        self.evicted += 1
        self.log.note("evict", "HTTP: dropped a slow connection from %s to make room", victim.peer)
        return True

    def _head_done(self, client: _Client) -> None:
        if client.pending:
            client.pending = False
            del self._pending[client]
            of_peer = self._pending_of[client.peer]
            del of_peer[client]
            if not of_peer:
                del self._pending_of[client.peer]

    def _release(self, client: _Client) -> None:
        """``client`` leaves every budget (done, evicted, or upgraded). Idempotent."""
        if not client.active:
            return
        self._head_done(client)
        client.active = False
        self._active.discard(client)
        left = self._count_of[client.peer] - 1
        if left:
            self._count_of[client.peer] = left
        else:
            del self._count_of[client.peer]

    # -- one connection ---------------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else ""
        client = _Client(peer, writer, task)
        if not self._admit(client):
            self.refused += 1
            writer.close()
            return
        self._tasks.add(task)
        try:
            await self._serve(client, reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # a bug in a handler or upgrade: log it, keep serving
            self.log.note("bug", "HTTP connection failed", level=logging.ERROR, exc_info=True)
        finally:
            self._release(client)
            self._tasks.discard(task)
            if self._closing:
                writer.transport.abort()
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve(
        self, client: _Client, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            request = await self._read(client, reader, writer)
        except TimeoutError:
            self.timed_out += 1
            await self._write(writer, Response(status=408))
            return
        except _HttpError as exc:
            self.log.note(
                f"http-{exc.status}", "HTTP %d to %s", exc.status, client.peer, level=logging.INFO
            )
            await self._write(writer, Response(status=exc.status))
            return
        if request is None:
            return  # the client went away
        if "websocket" in request.header_tokens("upgrade"):
            if self.upgrade is None:
                await self._write(writer, Response(status=404))
                return
            self._release(client)  # a long-lived link, not a request
            await self.upgrade(request, reader, writer)
            return
        try:
            response = await self.handler(request)
            data = render_response(response, head_only=request.method == "HEAD")
        except Exception:
            self.log.note(
                "handler",
                "HTTP handler failed for %s",
                request.path,
                level=logging.ERROR,
                exc_info=True,
            )
            data = render_response(Response(status=500))
        await self._send(writer, data)

    async def _read(
        self, client: _Client, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Request | None:
        """Parse one request with h11 within the deadlines; None if the client left first."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header)
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + self.timeout_ms / 1000
        head: h11.Request | None = None
        head_bytes = 0  # fed to h11 before the head was complete
        body = bytearray()
        async with asyncio.timeout_at(min(end, start + self.head_timeout_ms / 1000)) as deadline:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    raise _HttpError(exc.error_status_hint) from None
                if event is h11.NEED_DATA:
                    if head is None:
                        # h11 checks its limit only on an incomplete head: never feed it
                        # more than max_header + 1 bytes before the head is complete
                        data = await reader.read(min(_READ_SIZE, self.max_header + 1 - head_bytes))
                        head_bytes += len(data)
                    else:
                        data = await reader.read(_READ_SIZE)
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    head = event
                    self._head_done(client)
                    deadline.reschedule(end)
                    self._check_head(event)
                    if conn.they_are_waiting_for_100_continue:
                        go_on = h11.InformationalResponse(status_code=100, headers=[])
                        writer.write(conn.send(go_on))
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > self.max_body:
                        raise _HttpError(413)
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return None
                else:  # PAUSED cannot come before EndOfMessage
                    raise _HttpError(400)
        assert head is not None
        headers: dict[str, str] = {}
        for raw_name, raw_value in head.headers:
            name, value = raw_name.decode("ascii"), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        split = urlsplit(head.target.decode("latin-1"))
        sockname = writer.get_extra_info("sockname")
        return Request(
            method=head.method.decode("ascii"),
            path=split.path or "/",
            query=dict(parse_qsl(split.query)),
            headers=headers,
            body=bytes(body),
            version=head.http_version.decode("ascii"),
            trailing=conn.trailing_data[0],
            peer=client.peer,
            local=str(sockname[0]) if isinstance(sockname, tuple) and sockname else "",
        )

    def _check_head(self, head: h11.Request) -> None:
        if head.method.decode("ascii", "replace") not in _METHODS:
            raise _HttpError(405)
        names = {name for name, _ in head.headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            raise _HttpError(400)  # RFC 9112, 6.1 allows refusing it: a smuggling vector
        for name, value in head.headers:
            if name == b"content-length" and int(value) > self.max_body:
                raise _HttpError(413)  # before reading (or asking for) any of it

    async def _write(self, writer: asyncio.StreamWriter, response: Response) -> None:
        await self._send(writer, render_response(response))

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Write an answer; a client that does not take it within ``timeout_ms`` is cut."""
        if writer.transport.is_closing():
            return
        writer.write(data)
        try:
            async with asyncio.timeout(self.timeout_ms / 1000):
                await writer.drain()
        except TimeoutError:
            writer.transport.abort()


async def serve_http(
    handler: Handler,
    host: str | None,
    port: int,
    *,
    upgrade: Upgrade | None = None,
    max_header: int = DEFAULT_HTTP_MAX_HEADER,
    max_body: int = DEFAULT_HTTP_MAX_BODY,
    timeout_ms: int = DEFAULT_HTTP_TIMEOUT_MS,
    head_timeout_ms: int = DEFAULT_HTTP_HEAD_TIMEOUT_MS,
    max_connections: int = DEFAULT_HTTP_MAX_CONNECTIONS,
    max_pending: int = DEFAULT_HTTP_MAX_PENDING,
    max_per_peer: int = DEFAULT_HTTP_MAX_PER_PEER,
    exempt_loopback: bool = False,
) -> HttpServer:
    """Listen on ``host:port`` and answer each request with ``handler`` (see the module doc)."""
    server = HttpServer(
        handler,
        upgrade=upgrade,
        max_header=max_header,
        max_body=max_body,
        timeout_ms=timeout_ms,
        head_timeout_ms=head_timeout_ms,
        max_connections=max_connections,
        max_pending=max_pending,
        max_per_peer=max_per_peer,
        exempt_loopback=exempt_loopback,
    )
    await server.start(host, port)
    return server
