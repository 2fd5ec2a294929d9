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
    * A message must arrive whole within ``frame_timeout_ms`` of its first byte;
      a peer that does not read is cut once ``max_write_buffer`` bytes wait for it
      (slow consumer), like the TCP transport.

What it leaves out
    Origin checks (add one before exposing the page beyond localhost),
    subprotocol negotiation, and TLS (``wss://`` belongs to a reverse proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError as WsLocalError
from wsproto.utilities import RemoteProtocolError as WsRemoteError

from examples.httpd import Request as HttpRequest
from imkit.aio import DEFAULT_FRAME_TIMEOUT_MS, DEFAULT_MAX_WRITE_BUFFER
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

__all__ = ["DEFAULT_WS_READ_SIZE", "WsLink"]

#: Bytes read from the socket at a time (one asyncio read): a few frames.
DEFAULT_WS_READ_SIZE = 64 * 1024

# WebSocket close codes (RFC 6455, section 7.4.1)
_NORMAL = 1000
_GOING_AWAY = 1001
_PROTOCOL = 1002
_UNSUPPORTED = 1003
_TOO_BIG = 1009


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
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._ws = WSConnection(ConnectionType.SERVER)
        self.codec = Connection(Role.SERVER, max_frame_size=max_frame_size, compress_threshold=None)
        self.max_message = max_frame_size + HEADER_SIZE
        self.max_write_buffer = max_write_buffer
        self.frame_timeout_ms = frame_timeout_ms
        self.closed = False
        self.close_code = 0
        self.close_reason = ""
        self.frames_sent = 0
        self.frames_received = 0

    def peername(self) -> object:
        """The peer's address."""
        return self._writer.get_extra_info("peername")

    async def accept(self, request: HttpRequest, path: str = "/ws") -> bool:
        """Complete the WebSocket handshake for ``request``; False (and closed) if refused."""
        self._ws.receive_data(request.head)
        for event in self._ws.events():
            if isinstance(event, Request) and event.target.split("?", 1)[0] == path:
                self._write(self._ws.send(AcceptConnection()))
                return True
            break
        with contextlib.suppress(WsLocalError):
            self._write(self._ws.send(RejectConnection(status_code=404)))
        self._shut()
        return False

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
        """Drop the connection at once, discarding unsent bytes. Idempotent."""
        self.closed = True
        self._writer.transport.abort()

    # -- reading ----------------------------------------------------------------------------

    async def messages(self) -> AsyncIterator[Message]:
        """The imkit messages the browser sends, until the connection closes."""
        partial = bytearray()
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while not self.closed:
            try:
                if deadline is None:
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
        self.closed = True
        self._writer.close()
