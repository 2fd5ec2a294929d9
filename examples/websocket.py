"""The gateway's WebSocket link for browsers (wsproto, the ``imkit[ws]`` extra).

What it does
    :class:`WsLink` accepts a WebSocket upgrade handed over by the HTTP server and
    carries the imkit protocol over it: **every binary WebSocket message holds
    exactly one imkit frame** (8-byte header and body, as on TCP). Incoming frames
    are decoded by a sans-IO :class:`imkit.protocol.Connection` with the server's
    role checks; outgoing messages are encoded by it and sent as binary messages.
    It offers the same small interface the gateway uses for a TCP
    :class:`~imkit.aio.FramedConnection` (``send``, ``close``, ``abort``,
    ``established``, ``closed``, ``close_code``), so one gateway code path serves
    both.

Policies
    * A text message, a message that is not exactly one valid frame, or one larger
      than ``max_frame_size + 8`` bytes is a protocol error: the peer gets
      ``Error(PROTOCOL_ERROR)`` and a WebSocket close (1002 / 1009), never details.
    * No WebSocket extensions are negotiated (no permessage-deflate, so no
      decompression bombs), and imkit's own LZ4 is off on this link
      (``compress_threshold=None``): a browser page then needs no LZ4 decoder.
    * The opening handshake is checked as RFC 6455 (4.2.1) asks: a GET over
      HTTP/1.1 with ``Upgrade: websocket``, ``Connection: upgrade``, a
      ``Sec-WebSocket-Key`` that is base64 of 16 bytes (else 400) and
      ``Sec-WebSocket-Version: 13`` (else 426 naming 13). A refusal costs one log
      line, at most one per second per cause.
    * A message must arrive whole within ``frame_timeout_ms`` of its first byte;
      a peer that does not read is cut once ``max_write_buffer`` bytes wait for it
      (slow consumer), like the TCP transport.
    * After a close (a kick, an error, a heartbeat timeout), a peer that does not
      read what is still queued is aborted after ``close_timeout_ms`` (the TCP
      transport's ``DEFAULT_CLOSE_TIMEOUT_MS``), so its socket, buffers and the
      gateway's connection entry are released; :meth:`WsLink.abort` drops the
      link at once (a reset), as :meth:`imkit.aio.FramedConnection.abort` does.

What it leaves out
    Origin checks (add one before exposing the page beyond localhost),
    subprotocol negotiation, and TLS (``wss://`` belongs to a reverse proxy).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import AsyncIterator

from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError as WsLocalError
from wsproto.utilities import RemoteProtocolError as WsRemoteError
from wsproto.utilities import generate_accept_token

from imkit.aio import DEFAULT_CLOSE_TIMEOUT_MS, DEFAULT_FRAME_TIMEOUT_MS, DEFAULT_MAX_WRITE_BUFFER
from imkit.errors import CapacityError, ConnectionClosed, LocalProtocolError, RemoteProtocolError
from imkit.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    Connection,
    Error,
    ErrorCode,
    Kick,
    Message,
    Role,
    Sentinel,
)

from .httpd import RateLimitedLog, render_response
from .httpd import Request as HttpRequest
from .httpd import Response as HttpResponse

__all__ = ["DEFAULT_WS_READ_SIZE", "WS_VERSION", "WsLink", "handshake_problem"]

logger = logging.getLogger("examples.websocket")

#: Bytes read from the socket at a time (one asyncio read): a few frames.
DEFAULT_WS_READ_SIZE = 64 * 1024

# WebSocket close codes (RFC 6455, section 7.4.1)
_NORMAL = 1000
_GOING_AWAY = 1001
_PROTOCOL = 1002
_UNSUPPORTED = 1003
_TOO_BIG = 1009

#: The only WebSocket version there is (RFC 6455); others get 426 naming it.
WS_VERSION = "13"
#: Length of a Sec-WebSocket-Key once base64-decoded (RFC 6455, section 4.1).
_KEY_BYTES = 16

#: One line per second per cause for refused upgrades: a peer can send them at will.
_refused_log = RateLimitedLog(logger)


def handshake_problem(request: HttpRequest, path: str = "/ws") -> tuple[int, str] | None:
    """Why ``request`` is not a valid WebSocket opening handshake (RFC 6455, 4.2.1), or None.

    Returns ``(status, cause)``: 404 for another path, 426 for a missing or other
    ``Sec-WebSocket-Version`` than 13 (section 4.2.2), 400 for anything else
    malformed (not GET over HTTP/1.1, no ``Connection: upgrade``, a key that is
    not base64 of 16 bytes). O(len(headers)).
    """
    if request.path != path:
        return 404, "unknown path"
    if request.method != "GET" or request.version != "1.1":
        return 400, "not a GET over HTTP/1.1"
    if "websocket" not in request.header_tokens("upgrade"):
        return 400, "no Upgrade: websocket"
    if "upgrade" not in request.header_tokens("connection"):
        return 400, "no Connection: upgrade"
    key = request.headers.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key.encode("ascii"), validate=True)) != _KEY_BYTES:
            return 400, "bad Sec-WebSocket-Key"
    except (binascii.Error, UnicodeEncodeError):
        return 400, "bad Sec-WebSocket-Key"
    if request.headers.get("sec-websocket-version", "").strip() != WS_VERSION:
        return 426, "unsupported Sec-WebSocket-Version"
    return None


class WsLink:
    """One browser connection: imkit frames over WebSocket binary messages.

    ``send`` O(frame); reading O(bytes). Use :meth:`accept` (the handshake), then
    iterate :meth:`messages` until it ends; the gateway calls ``send``/``close``.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
        frame_timeout_ms: int = DEFAULT_FRAME_TIMEOUT_MS,
        close_timeout_ms: int = DEFAULT_CLOSE_TIMEOUT_MS,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._ws = WsConnection(ConnectionType.SERVER)
        self._trailing = b""  # bytes that came right after the handshake
        self._abort_later: asyncio.TimerHandle | None = None
        self.codec = Connection(Role.SERVER, max_frame_size=max_frame_size, compress_threshold=None)
        self.max_message = max_frame_size + HEADER_SIZE
        self.max_write_buffer = max_write_buffer
        self.frame_timeout_ms = frame_timeout_ms
        self.close_timeout_ms = close_timeout_ms
        self.closed = False
        self.close_code = 0
        self.close_reason = ""
        self.frames_sent = 0
        self.frames_received = 0

    def write_buffer_size(self) -> int:
        """Bytes queued for the peer in this process (not yet taken by the kernel). O(1)."""
        return int(self._writer.transport.get_write_buffer_size())

    def peername(self) -> object:
        """The peer's address."""
        return self._writer.get_extra_info("peername")

    async def accept(self, request: HttpRequest, path: str = "/ws") -> bool:
        """Complete the WebSocket handshake for ``request``; False (answered and closed) if refused.

        A malformed handshake gets 400, a wrong or missing version 426 with
        ``Sec-WebSocket-Version: 13``, another path 404 (see
        :func:`handshake_problem`); each refusal logs one line, rate-limited.
        No extension or subprotocol is ever accepted.
        """
        problem = handshake_problem(request, path)
        if problem is not None:
            status, cause = problem
            _refused_log.note(
                cause,
                "refused a WebSocket upgrade from %s: %s (HTTP %d)",
                request.peer,
                cause,
                status,
            )
            headers = (("Sec-WebSocket-Version", WS_VERSION),) if status == 426 else ()
            self._write(render_response(HttpResponse(status=status, headers=headers)))
            self._shut()
            return False
        key = request.headers["sec-websocket-key"].strip().encode("ascii")
        answer = HttpResponse(
            status=101,
            headers=(
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Accept", generate_accept_token(key).decode("ascii")),
            ),
        )
        self._write(render_response(answer))
        self._trailing = request.trailing
        return True

    # -- the gateway's link interface ----------------------------------------------------

    def established(self) -> None:
        """The login succeeded (the session's login deadline already covered the wait)."""

    def send(self, message: Message) -> None:
        """Send one imkit message as one binary WebSocket message; cut a slow consumer."""
        if self.closed:
            raise ConnectionClosed(self.close_code, self.close_reason)
        frame = self.codec.send(message)
        self.frames_sent += 1
        self._write(self._ws.send(BytesMessage(data=frame)))
        transport = self._writer.transport
        if transport.get_write_buffer_size() > self.max_write_buffer:
            self.close_code = ErrorCode.SLOW_CONSUMER
            self.close_reason = "slow consumer"
            self.abort()

    def close(
        self, last: Message | None = None, *, code: int | None = None, reason: str = ""
    ) -> None:
        """Send ``last`` (a Kick or Error) if given, a WebSocket close, and close. Idempotent."""
        if self.closed:
            return
        if code is None:
            code = last.code if isinstance(last, Kick | Error) else 0
        self.close_code = code
        self.close_reason = reason or (last.reason if isinstance(last, Kick | Error) else "")
        if last is not None:
            with contextlib.suppress(LocalProtocolError, WsLocalError):
                self._write(self._ws.send(BytesMessage(data=self.codec.send(last))))
        ws_code = _NORMAL if code == 0 else _GOING_AWAY
        if code == ErrorCode.PROTOCOL_ERROR:
            ws_code = _PROTOCOL
        with contextlib.suppress(WsLocalError):
            self._write(self._ws.send(CloseConnection(code=ws_code)))
        self._shut()

    def abort(self) -> None:
        """Drop the connection at once (a reset), discarding unsent bytes. Idempotent. O(1)."""
        self.closed = True
        self._writer.transport.abort()

    # -- reading ----------------------------------------------------------------------------

    async def messages(self) -> AsyncIterator[Message]:
        """The imkit messages the browser sends, until the connection closes."""
        partial = bytearray()
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        early, self._trailing = self._trailing, b""
        while not self.closed:
            try:
                if early:
                    data, early = early, b""
                elif deadline is None:
                    data = await self._reader.read(DEFAULT_WS_READ_SIZE)
                else:
                    data = await asyncio.wait_for(
                        self._reader.read(DEFAULT_WS_READ_SIZE), max(0.0, deadline - loop.time())
                    )
            except TimeoutError:
                self._fail(ErrorCode.PROTOCOL_ERROR, "frame timeout", _PROTOCOL)
                return
            except ConnectionError:
                break
            if not data:
                break
            try:
                self._ws.receive_data(data)
                events = list(self._ws.events())
            except WsRemoteError:
                self._fail(ErrorCode.PROTOCOL_ERROR, "bad websocket frame", _PROTOCOL)
                return
            for event in events:
                if isinstance(event, BytesMessage):
                    partial += event.data
                    if len(partial) > self.max_message:
                        self._fail(ErrorCode.PROTOCOL_ERROR, "message too large", _TOO_BIG)
                        return
                    if not event.message_finished:
                        continue
                    message = self._decode(bytes(partial))
                    partial.clear()
                    if message is None:
                        return
                    self.frames_received += 1
                    yield message
                    if self.closed:
                        return
                elif isinstance(event, TextMessage):
                    self._fail(ErrorCode.PROTOCOL_ERROR, "text message", _UNSUPPORTED)
                    return
                elif isinstance(event, Ping):
                    with contextlib.suppress(WsLocalError):
                        self._write(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    with contextlib.suppress(WsLocalError):
                        self._write(self._ws.send(event.response()))
                    self._shut()
                    return
            if partial and deadline is None:
                deadline = loop.time() + self.frame_timeout_ms / 1000
            elif not partial:
                deadline = None
        self._shut()

    def _decode(self, frame: bytes) -> Message | None:
        """Exactly one imkit frame per WebSocket message, or a protocol error (None)."""
        codec = self.codec
        try:
            codec.receive_data(frame)
            event = codec.next_event()
        except (RemoteProtocolError, CapacityError):
            self._fail(ErrorCode.PROTOCOL_ERROR, "protocol error", _PROTOCOL)
            return None
        if isinstance(event, Sentinel) or codec.buffered:
            self._fail(ErrorCode.PROTOCOL_ERROR, "not one whole frame", _PROTOCOL)
            return None
        return event

    def _fail(self, code: int, reason: str, ws_code: int) -> None:
        if self.closed:
            return
        self.close_code = code
        self.close_reason = reason
        with contextlib.suppress(LocalProtocolError, WsLocalError):
            error = Error(code=ErrorCode.PROTOCOL_ERROR, reason="protocol error")
            self._write(self._ws.send(BytesMessage(data=self.codec.send(error))))
        with contextlib.suppress(WsLocalError):
            self._write(self._ws.send(CloseConnection(code=ws_code)))
        self._shut()

    def _write(self, data: bytes) -> None:
        if data and not self._writer.transport.is_closing():
            self._writer.write(data)

    def _shut(self) -> None:
        """Close; a peer that does not read what is still queued is aborted after the deadline.

        asyncio keeps a closing socket until its buffer drains, and stops reading
        it meanwhile: without the deadline a peer that stopped reading would hold
        the link (and its buffers) forever, as the TCP transport's
        ``close_timeout_ms`` prevents there.
        """
        self.closed = True
        transport = self._writer.transport
        self._writer.close()
        if self._abort_later is None and transport.get_write_buffer_size():
            loop = asyncio.get_running_loop()
            self._abort_later = loop.call_later(self.close_timeout_ms / 1000, transport.abort)
