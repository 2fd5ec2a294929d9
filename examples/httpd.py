"""A minimal, bounded HTTP/1.1 server on asyncio streams, for ipconf and the web page.

What it does
    One request per connection (``Connection: close``): read the head (at most
    ``max_header`` bytes), read a ``Content-Length`` body (at most ``max_body``),
    call ``handler(request) -> Response``, write the answer, close. A request that
    asks for a WebSocket upgrade is handed, with its raw head bytes and the
    streams, to ``upgrade`` (the gateway's WebSocket endpoint), which owns the
    connection from then on.

Policies
    Every limit is a keyword with a ``DEFAULT_*`` constant; a client that sends a
    head too large gets 431, a body too large 413, and one too slow (the whole
    request must arrive within ``timeout_ms``) is cut. At most ``max_connections``
    requests are handled at once (upgraded WebSocket links do not count: the
    gateway bounds those); past that a new connection is closed at once.
    Errors never carry internal details (a handler that raises gives a bare 500).

What it leaves out
    Keep-alive, pipelining, chunked request bodies, TLS (put a reverse proxy in
    front), and anything but GET, POST and HEAD.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs

__all__ = [
    "DEFAULT_HTTP_MAX_BODY",
    "DEFAULT_HTTP_MAX_CONNECTIONS",
    "DEFAULT_HTTP_MAX_HEADER",
    "DEFAULT_HTTP_TIMEOUT_MS",
    "HttpServer",
    "Request",
    "Response",
    "is_loopback",
    "json_response",
    "serve_http",
]

logger = logging.getLogger("examples.httpd")

#: Request head bytes: h11's default limit (16 KiB, which cites node.js and tomcat).
DEFAULT_HTTP_MAX_HEADER = 16 * 1024
#: Request body bytes: the admin endpoints take a member list; 64 KiB is ~5000 uids.
DEFAULT_HTTP_MAX_BODY = 64 * 1024
#: Whole request, first byte to last: a slow client (slowloris) is cut after 10 s.
DEFAULT_HTTP_TIMEOUT_MS = 10_000
#: Requests handled at once. ipconf answers from memory in microseconds, so 1000
#: concurrent requests only happen under a reconnect storm; past that, shed load.
DEFAULT_HTTP_MAX_CONNECTIONS = 1000

_REASONS = {
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
    503: "Service Unavailable",
}


@attrs.frozen(kw_only=True)
class Request:
    """One parsed request. ``headers`` keys are lower-case; ``query`` keeps the last value."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    head: bytes  # the raw request head, for a WebSocket handshake
    peer: str = ""  # the client's IP address

    def json(self) -> Any:
        """The body decoded as JSON (ValueError if it is not)."""
        return json.loads(self.body or b"null")


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
    return peer in ("::1", "localhost") or peer.startswith("127.")


Handler = Callable[[Request], Awaitable[Response]]
Upgrade = Callable[[Request, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class HttpServer:
    """What :func:`serve_http` returns: the listener and its port."""

    def __init__(self, server: asyncio.Server, tasks: set[asyncio.Task[None]]) -> None:
        self.server = server
        self._tasks = tasks

    @property
    def port(self) -> int:
        """The bound port (useful after binding port 0)."""
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        """Stop listening and cancel the requests in progress (and upgraded connections)."""
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()


async def serve_http(
    handler: Handler,
    host: str | None,
    port: int,
    *,
    upgrade: Upgrade | None = None,
    max_header: int = DEFAULT_HTTP_MAX_HEADER,
    max_body: int = DEFAULT_HTTP_MAX_BODY,
    timeout_ms: int = DEFAULT_HTTP_TIMEOUT_MS,
    max_connections: int = DEFAULT_HTTP_MAX_CONNECTIONS,
) -> HttpServer:
    """Listen on ``host:port`` and answer each request with ``handler``."""
    tasks: set[asyncio.Task[None]] = set()  # every connection, for close()
    requests: set[asyncio.Task[None]] = set()  # those still in the request phase

    async def on_upgrade(
        request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        assert upgrade is not None
        task = asyncio.current_task()
        if task is not None:
            requests.discard(task)  # a long-lived link, not a request
        await upgrade(request, reader, writer)

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(requests) >= max_connections:
            writer.close()
            return
        tasks.add(task)
        requests.add(task)
        try:
            await _serve_one(
                reader,
                writer,
                handler,
                on_upgrade if upgrade is not None else None,
                max_body=max_body,
                timeout_ms=timeout_ms,
            )
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            tasks.discard(task)
            requests.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(
        on_client, host, port, limit=max_header, reuse_address=True
    )
    return HttpServer(server, tasks)


async def _serve_one(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handler: Handler,
    upgrade: Upgrade | None,
    *,
    max_body: int,
    timeout_ms: int,
) -> None:
    peername = writer.get_extra_info("peername")
    peer = str(peername[0]) if isinstance(peername, tuple) and peername else ""
    try:
        request = await asyncio.wait_for(_read_request(reader, max_body, peer), timeout_ms / 1000)
    except TimeoutError:
        await _write(writer, Response(status=408), head_only=False)
        return
    except _HttpError as exc:
        await _write(writer, Response(status=exc.status), head_only=False)
        return
    if request is None:
        return
    if request.headers.get("upgrade", "").lower() == "websocket":
        if upgrade is None:
            await _write(writer, Response(status=404), head_only=False)
            return
        await upgrade(request, reader, writer)
        return
    try:
        response = await handler(request)
    except Exception:
        logger.exception("HTTP handler failed for %s", request.path)
        response = Response(status=500)
    await _write(writer, response, head_only=request.method == "HEAD")


class _HttpError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def _read_request(
    reader: asyncio.StreamReader, max_body: int, peer: str
) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None  # the client went away
    except asyncio.LimitOverrunError:
        raise _HttpError(431) from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _HttpError(400)
    method, target = parts[0], parts[1]
    if method not in ("GET", "POST", "HEAD"):
        raise _HttpError(405)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _HttpError(400)
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise _HttpError(400)
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise _HttpError(400)
    length = int(length_text)
    if length > max_body:
        raise _HttpError(413)
    body = await reader.readexactly(length) if length else b""
    split = urlsplit(target)
    return Request(
        method=method,
        path=split.path or "/",
        query=dict(parse_qsl(split.query)),
        headers=headers,
        body=body,
        head=head,
        peer=peer,
    )


async def _write(writer: asyncio.StreamWriter, response: Response, *, head_only: bool) -> None:
    reason = _REASONS.get(response.status, "")
    body = response.body
    if not body and response.status >= 400 and response.content_type == "application/json":
        body = json.dumps({"error": reason.lower() or str(response.status)}).encode()
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(body)
    await writer.drain()
