"""The framed transport: an ``asyncio.Protocol`` holding a sans-IO protocol Connection.

Who owns what (websockets' layout): the sans-IO :class:`~imkit.protocol.Connection`
owns the bytes-to-messages conversion and its limits; :class:`FramedConnection`
owns the socket, the clock and every policy that needs one: write coalescing,
back-pressure in both directions, the slow-reader cut and the deadlines.

Bytes in::

    socket -> data_received(data) -> Connection.receive_data(data)
           -> next_event() ... -> message_received(msg) -> bounded inbox -> recv()

Bytes out::

    send(msg) -> Connection.send(msg) -> pending list
              -> one transport.write() per loop iteration (at the end of
                 data_received, or from a call_soon scheduled by the first send)

Limits, each a constructor keyword (see the DEFAULT_* constants):

* ``max_pending``: decoded messages waiting for :meth:`recv`. When the inbox is
  full the transport stops decoding (the rest stays in the Connection's own
  bounded buffer) and calls ``pause_reading()``; it resumes when the
  application has taken half of them.
* ``max_write_buffer``: bytes buffered by the transport for a peer that does not
  read. Past it the peer is a slow consumer and is cut (``abort()``: its buffer is
  dropped, it reconnects and resyncs from the store). Below it,
  ``pause_writing`` / ``resume_writing`` drive :meth:`drain` for producers that
  want to wait instead.
* ``frame_timeout_ms``: a frame must arrive whole within this time of its first
  byte (slowloris: a header then silence, or a byte a second, is cut).
* ``handshake_timeout_ms``: the application must call :meth:`established` (after
  the login) within this time of the connection, or the connection is closed.
* ``close_timeout_ms``: after :meth:`close`, how long the peer has to read what is
  still buffered before the connection is aborted.

``send_encoded(frame)`` queues bytes already encoded (one
:func:`~imkit.protocol.encode` for a fan-out to many connections) through the same
pending list, flush and limits as ``send``. ``close()`` records the close code of
the last Kick sent when no code is given.

Errors sent to the peer never carry internal details: a peer that sends bad bytes
gets ``Error(code=PROTOCOL_ERROR, reason="protocol error")`` and the connection
closes; the exception stays local (:attr:`FramedConnection.close_exc`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from imkit.aio._checks import check_int
from imkit.aio._loop import loop_ms
from imkit.aio._timers import WheelDriver
from imkit.errors import (
    CapacityError,
    ConnectionClosed,
    LocalProtocolError,
    RemoteProtocolError,
)
from imkit.protocol import (
    CLOSED,
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    NEED_DATA,
    SENDERS,
    Connection,
    Error,
    ErrorCode,
    FrameType,
    Kick,
    Message,
    Ping,
    ProtocolError,
    Role,
    decode,
    encode,
)
from imkit.timingwheel import TimerHandle

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT_MS",
    "DEFAULT_FRAME_TIMEOUT_MS",
    "DEFAULT_HANDSHAKE_TIMEOUT_MS",
    "DEFAULT_MAX_PENDING_MESSAGES",
    "DEFAULT_MAX_WRITE_BUFFER",
    "DEFAULT_WRITE_HIGH_WATER",
    "FramedConnection",
    "open_connection",
    "timers_for",
]

#: Decoded messages an application may leave unread before reading is paused. A
#: gateway handles a message in microseconds unless it waits on the store; 64 frames
#: (one client's burst of sends, or a sync answer's pages) keep the pipe busy while
#: bounding what one connection holds decoded (64 x 64 KiB at the very worst).
DEFAULT_MAX_PENDING_MESSAGES = 64

#: Bytes queued for a peer that does not read before it is cut. 256 KiB is four
#: maximal frames or ~1000 typical 250-byte pushes: a reader that far behind (on top
#: of the kernel's socket buffer) has been stalled for seconds on any working link,
#: and resyncing from the store costs less than holding the memory for every such
#: connection (10k stalled readers x 256 KiB = 2.5 GiB is already a lot).
DEFAULT_MAX_WRITE_BUFFER = 256 * 1024

#: Transport buffer level at which pause_writing() is called (asyncio's own default
#: high-water mark); :meth:`FramedConnection.drain` waits while above it.
DEFAULT_WRITE_HIGH_WATER = 64 * 1024

#: Time from a frame's first byte to its last. A 64 KiB frame at 64 kbit/s (a bad
#: 2G link) takes 8 s; 10 s admits that and still cuts a header-then-silence peer
#: (slowloris) long before the heartbeat deadline would.
DEFAULT_FRAME_TIMEOUT_MS = 10_000

#: Time from connect to :meth:`FramedConnection.established` (the login). A Login is
#: one small frame: 10 s covers a TLS-less handshake on a slow mobile link; an
#: unauthenticated connection should cost a server as little time as possible.
DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000

#: After close(), time for the peer to read what is still buffered (a last Kick or
#: Error, pending pushes) before the connection is aborted. A peer that does not
#: read must not keep a closing socket (and its buffer) forever; 5 s is plenty for a
#: few KiB on any live link.
DEFAULT_CLOSE_TIMEOUT_MS = 5_000

_PROTOCOL_ERROR = "protocol error"  # the only text a peer ever sees for bad bytes

# send_encoded()'s header check: bytes 0-1 (magic, version) as this codec writes
# them, byte 2 a frame type the role may send, byte 3 flags (only bit 0, LZ4, is
# defined: docs/protocol.md), bytes 4-7 the body length.
_MAGIC_VERSION = encode(Ping())[:2]
_SENDABLE = {
    role: frozenset(int(t) for t, (_, senders) in SENDERS.items() if role in senders)
    for role in Role
}

_drivers: dict[asyncio.AbstractEventLoop, WheelDriver[Callable[[], object]]] = {}


def _call(fn: Callable[[], object]) -> None:
    fn()


def timers_for(loop: asyncio.AbstractEventLoop | None = None) -> WheelDriver[Callable[[], object]]:
    """The loop's shared :class:`WheelDriver` of callbacks (created on first use). O(1).

    Every :class:`FramedConnection` of a loop arms its deadlines on it: one asyncio
    timer for all connections.
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    driver = _drivers.get(loop)
    if driver is None:
        for old in [lp for lp in _drivers if lp.is_closed()]:
            del _drivers[old]  # a finished asyncio.run(): its timers died with it
        driver = _drivers[loop] = WheelDriver(_call, loop=loop)
    return driver


class FramedConnection(asyncio.Protocol):
    """One framed connection on asyncio: messages in through :meth:`recv`, out through :meth:`send`.

    Use it as the protocol of ``loop.create_connection`` / ``loop.create_server``
    (or through :func:`imkit.aio.serve` and :class:`imkit.aio.Client`). Subclasses
    may override :meth:`message_received` to handle messages inline (then
    :meth:`recv` is unused) and :meth:`on_close` to learn why it closed.

    Costs: ``send`` is O(frame) (the encode) plus O(1) bookkeeping;
    :meth:`send_encoded` (a frame encoded once for many connections) O(1); a loop
    iteration in which anything was sent costs one ``transport.write``;
    ``data_received`` is O(bytes) plus O(1) per message.

    ``coalesce=False`` writes every frame as soon as it is sent (one
    ``transport.write``, usually one syscall, each): only for comparison.

    Counters: :attr:`writes` (``transport.write`` calls), :attr:`reads`
    (``data_received`` calls), :attr:`frames_sent`, :attr:`frames_received`,
    :attr:`bytes_sent`, :attr:`bytes_received`.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_pending: int = DEFAULT_MAX_PENDING_MESSAGES,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
        write_high_water: int = DEFAULT_WRITE_HIGH_WATER,
        frame_timeout_ms: int | None = DEFAULT_FRAME_TIMEOUT_MS,
        handshake_timeout_ms: int | None = DEFAULT_HANDSHAKE_TIMEOUT_MS,
        close_timeout_ms: int = DEFAULT_CLOSE_TIMEOUT_MS,
        coalesce: bool = True,
        timers: WheelDriver[Callable[[], object]] | None = None,
    ) -> None:
        check_int("max_frame_size", max_frame_size)
        check_int("max_pending", max_pending)
        check_int("write_high_water", write_high_water)
        check_int("max_write_buffer", max_write_buffer, minimum=write_high_water)
        check_int("frame_timeout_ms", frame_timeout_ms, none_ok=True)
        check_int("handshake_timeout_ms", handshake_timeout_ms, none_ok=True)
        check_int("close_timeout_ms", close_timeout_ms)
        self.role = role
        self.conn = Connection(role, max_frame_size=max_frame_size)
        self.max_pending = max_pending
        self.max_write_buffer = max_write_buffer
        self.write_high_water = write_high_water
        self.frame_timeout_ms = frame_timeout_ms
        self.handshake_timeout_ms = handshake_timeout_ms
        self.close_timeout_ms = close_timeout_ms
        self.coalesce = coalesce
        self._timers = timers
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # inbound
        self._inbox: collections.deque[Message] = collections.deque()
        self._recv_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._decode_paused = False  # stopped decoding because the inbox is full
        self._in_batch = False  # inside data_received: sends wait for its end
        # outbound
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # deadlines
        self._handshake_deadline: int | None = None
        self._frame_deadline: int | None = None
        self._deadline_handle: TimerHandle[Callable[[], object]] | None = None
        # closing
        self._closing = False
        self._closed: asyncio.Future[None] | None = None
        self.close_code = 0
        self.close_reason = ""
        self.close_exc: BaseException | None = None
        self._kick: Kick | None = None  # the last Kick sent: close() defaults to its code
        # counters
        self.writes = 0
        self.frames_sent = 0
        self.frames_received = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.reads = 0

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Set TCP_NODELAY and the write limits, start the handshake deadline."""
        # uvloop's transports implement the interface without subclassing asyncio.Transport
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()
        if self._timers is None:
            self._timers = timers_for(self._loop)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=self.write_high_water)
        if self.handshake_timeout_ms is not None:
            self._handshake_deadline = loop_ms(self._loop) + self.handshake_timeout_ms
            self._arm_deadline()
        self.on_open()

    def data_received(self, data: bytes) -> None:
        """Feed the Connection, hand out whole messages, flush what they caused once."""
        if self._closing:
            return
        self.reads += 1
        self.bytes_received += len(data)
        try:
            self.conn.receive_data(data)
        except (RemoteProtocolError, CapacityError) as exc:
            # CapacityError: more undecoded bytes than the Connection's max_buffer_size
            self._protocol_error(exc)
            return
        self._decode()
        self._flush()  # everything the messages of this chunk caused, in one write

    def eof_received(self) -> bool:
        """The peer closed its side: let the Connection check for a truncated frame."""
        if not self._closing:
            try:
                self.conn.receive_data(b"")
            except RemoteProtocolError as exc:
                self._protocol_error(exc)
                return False
            self._decode()
            self._flush()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        """Wake every waiter, cancel the deadline, tell :meth:`on_close`."""
        self._closing = True
        if exc is not None and self.close_exc is None:
            self.close_exc = exc
        self._out.clear()
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
            self._deadline_handle = None
        for waiter in (self._recv_waiter, self._drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        self.on_close(self.close_code, self.close_exc)

    def pause_writing(self) -> None:
        """The transport's buffer passed write_high_water: :meth:`drain` now waits."""
        self._write_paused = True

    def resume_writing(self) -> None:
        """The transport's buffer drained below its low-water mark."""
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- hooks ----------------------------------------------------------------------------

    def on_open(self) -> None:
        """Called once the transport is up (subclasses: start a session here)."""

    def message_received(self, message: Message) -> None:
        """Called for each decoded message; by default queues it for :meth:`recv`."""
        self._inbox.append(message)
        waiter = self._recv_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_close(self, code: int, exc: BaseException | None) -> None:
        """Called once when the connection is gone, with the close code (0 = normal)."""

    # -- inbound --------------------------------------------------------------------------

    def _decode(self) -> None:
        """Decode buffered bytes into messages while the inbox has room. O(bytes).

        Sends made by :meth:`message_received` meanwhile are only queued; the
        caller flushes (data_received at once, a resume through the scheduled flush).
        """
        next_event = self.conn.next_event
        handle = self.message_received
        inbox = self._inbox
        limit = self.max_pending
        n = 0
        self._in_batch = True
        try:
            while not self._closing:
                if len(inbox) >= limit:
                    self._decode_paused = True
                    self._pause_reading()
                    break
                event = next_event()
                if event is NEED_DATA:
                    break
                if event is CLOSED:
                    self.close()
                    break
                n += 1
                handle(event)
        except RemoteProtocolError as exc:
            self._in_batch = False
            self.frames_received += n
            self._protocol_error(exc)
            return
        finally:
            self._in_batch = False
        self.frames_received += n
        got_frame = n > 0
        if not self._closing:
            self._track_partial_frame(got_frame)

    def _track_partial_frame(self, got_frame: bool) -> None:
        """Start, keep or clear the whole-frame deadline after decoding."""
        if self.frame_timeout_ms is None or self._loop is None:
            return
        if self._decode_paused or not _partial(self.conn):
            self._frame_deadline = None  # nothing half-received (or we stopped reading)
            return
        if got_frame or self._frame_deadline is None:
            # a new frame began in this chunk (or the first partial one): its clock starts now
            self._frame_deadline = loop_ms(self._loop) + self.frame_timeout_ms
            self._arm_deadline()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self._closing:
            self._reading_paused = True
            self.transport.pause_reading()

    def _maybe_resume(self) -> None:
        """After the application took messages: decode more, then resume reading."""
        if not self._decode_paused or len(self._inbox) > self.max_pending // 2:
            return
        self._decode_paused = False
        self._decode()
        self._schedule_flush()
        if not self._decode_paused and self._reading_paused and not self._closing:
            self._reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    def pending(self) -> int:
        """Decoded messages waiting for :meth:`recv`. O(1)."""
        return len(self._inbox)

    def recv_nowait(self) -> Message | None:
        """The next decoded message, or None if none is waiting. O(1)."""
        if not self._inbox:
            return None
        message = self._inbox.popleft()
        if self._decode_paused:
            self._maybe_resume()
        return message

    async def recv(self) -> Message:
        """The next message; :class:`~imkit.errors.ConnectionClosed` once closed and drained."""
        while True:
            if self._inbox:
                message = self._inbox.popleft()
                if self._decode_paused:
                    self._maybe_resume()
                return message
            if self._closing or self._loop is None:
                raise ConnectionClosed(self.close_code, self.close_reason)
            self._recv_waiter = self._loop.create_future()
            try:
                await self._recv_waiter
            finally:
                self._recv_waiter = None

    def __aiter__(self) -> AsyncIterator[Message]:
        """``async for message in conn``: until the connection closes."""
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.recv()
            except ConnectionClosed:
                return

    # -- outbound -------------------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Encode ``message`` and queue it; all sends of one loop iteration go out in one write.

        Raises :class:`~imkit.errors.ConnectionClosed` once the connection is
        closing, and :class:`~imkit.errors.LocalProtocolError` for a message this
        role may not send. O(frame).
        """
        if self._closing or self.transport is None:
            raise ConnectionClosed(self.close_code, self.close_reason)
        data = self.conn.send(message)
        if type(message) is Kick:
            self._kick = message
        self.frames_sent += 1
        self._out.append(data)
        if not self.coalesce:
            self._flush()  # one write per frame (for comparison; costs a syscall each)
        elif not self._in_batch:
            self._schedule_flush()

    def send_encoded(self, frame: bytes) -> None:
        """Queue a whole frame encoded beforehand, e.g. once for many connections. O(1).

        ``frame`` must come from :func:`imkit.protocol.encode` or
        :func:`~imkit.protocol.encode_push_batch` (never from a peer): the caller is
        responsible for it being a valid frame. Only its header is checked --
        magic and version, a frame type this role may send, no undefined flag, and
        a length that matches ``len(frame)`` and ``max_frame_size`` -- the body is
        not re-validated. A bad header raises
        :class:`~imkit.errors.LocalProtocolError`. Otherwise exactly like
        :meth:`send`: coalesced with the other sends of this loop iteration,
        counted, subject to the slow-reader cut, and
        :class:`~imkit.errors.ConnectionClosed` once closing. Fan-out: encode the
        frame once, then ``send_encoded`` the same bytes to every connection.
        """
        if self._closing or self.transport is None:
            raise ConnectionClosed(self.close_code, self.close_reason)
        if type(frame) is not bytes:
            raise LocalProtocolError(f"send_encoded takes bytes, not {type(frame).__name__}")
        n = len(frame) - HEADER_SIZE
        if (
            n < 1
            or frame[:2] != _MAGIC_VERSION
            or frame[2] not in _SENDABLE[self.role]
            or frame[3] & 0xFE
            or int.from_bytes(frame[4:HEADER_SIZE], "big") != n
            or n > self.conn.max_frame_size
        ):
            raise LocalProtocolError(
                f"not a whole frame a {self.role.value} may send (use imkit.protocol.encode)"
            )
        if frame[2] == FrameType.KICK:  # rare: decode it, so close() knows its code
            try:
                kick = decode(frame, max_frame_size=self.conn.max_frame_size)
            except ProtocolError:
                raise LocalProtocolError("send_encoded: not a valid Kick frame") from None
            assert isinstance(kick, Kick)
            self._kick = kick
        self.frames_sent += 1
        self._out.append(frame)
        if not self.coalesce:
            self._flush()
        elif not self._in_batch:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._out and not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def send_many(self, messages: list[Message]) -> None:
        """:meth:`send` each message (they go out in the same write). O(total bytes)."""
        for message in messages:
            self.send(message)

    def _flush(self) -> None:
        """Write everything pending in one call; cut the peer if it does not read."""
        self._flush_scheduled = False
        out = self._out
        transport = self.transport
        if not out or transport is None or transport.is_closing():
            out.clear()
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        transport.write(data)
        self.writes += 1
        self.bytes_sent += len(data)
        if transport.get_write_buffer_size() > self.max_write_buffer:
            self._cut(ErrorCode.SLOW_CONSUMER, "slow consumer")

    def write_buffer_size(self) -> int:
        """Bytes queued in the transport (not yet taken by the kernel). O(1)."""
        return 0 if self.transport is None else self.transport.get_write_buffer_size()

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark (or closed)."""
        self._flush()
        while self._write_paused and not self._closing:
            assert self._loop is not None
            self._drain_waiter = self._loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self._closing:
            raise ConnectionClosed(self.close_code, self.close_reason)

    # -- deadlines ------------------------------------------------------------------------

    def established(self) -> None:
        """The application accepted the peer (login done): stop the handshake deadline. O(1)."""
        self._handshake_deadline = None

    def _arm_deadline(self) -> None:
        candidates = [d for d in (self._handshake_deadline, self._frame_deadline) if d is not None]
        if not candidates or self._timers is None or self._closing:
            return
        deadline = min(candidates)
        handle = self._deadline_handle
        if handle is None:
            self._deadline_handle = self._timers.add(deadline, self._on_deadline)
        elif not handle.pending or handle.deadline_ms > deadline:
            self._timers.reschedule(handle, deadline)
        # else: it fires earlier than needed and re-arms itself (lazy, no cancel churn)

    def _on_deadline(self) -> None:
        if self._closing or self._loop is None:
            return
        now = loop_ms(self._loop)
        if self._handshake_deadline is not None and now >= self._handshake_deadline:
            if self.role is Role.SERVER:
                self.close(Kick(code=ErrorCode.NOT_LOGGED_IN, reason="login timeout"))
            else:
                self.close(code=ErrorCode.NOT_LOGGED_IN, reason="login timeout")
            return
        if self._frame_deadline is not None and now >= self._frame_deadline:
            self.close(
                Error(code=ErrorCode.PROTOCOL_ERROR, reason="frame timeout"),
                code=ErrorCode.PROTOCOL_ERROR,
            )
            return
        self._arm_deadline()

    # -- closing --------------------------------------------------------------------------

    def _protocol_error(self, exc: Exception) -> None:
        """The peer sent bad bytes: answer a fixed Error frame (no details) and close."""
        self.close_exc = exc
        self.close(Error(code=ErrorCode.PROTOCOL_ERROR, reason=_PROTOCOL_ERROR))

    def close(
        self, last: Message | None = None, *, code: int | None = None, reason: str = ""
    ) -> None:
        """Send ``last`` (a Kick or Error) if given, flush, and close. Idempotent. O(1).

        The recorded :attr:`close_code` (and :attr:`close_reason`) is, first found:
        ``code`` if given; the code of ``last`` if it is a Kick or Error; the code
        of the last Kick already sent on this connection (through :meth:`send` or
        :meth:`send_encoded`), so ``send(Kick(...))`` then ``close()`` keeps the
        kick's code; else 0 (a normal close).
        """
        if self._closing:
            return
        told = last if isinstance(last, Kick | Error) else None
        if told is None and code is None:
            told = self._kick
        if code is None:
            code = told.code if told is not None else 0
        self.close_code = code
        self.close_reason = reason or (told.reason if told is not None else "")
        if last is not None and self.transport is not None:
            # a frame this role may not send (a client's Kick) is simply not sent
            with contextlib.suppress(LocalProtocolError):
                self._out.append(self.conn.send(last))
                self.frames_sent += 1
        self._flush()
        self._closing = True
        transport = self.transport
        if transport is not None:
            transport.close()
            if transport.get_write_buffer_size() and self._loop is not None:
                # asyncio keeps the socket until the buffer drains: bound that wait
                self._loop.call_later(self.close_timeout_ms / 1000, self._abort_transport)

    def _abort_transport(self) -> None:
        if self._closed is not None and not self._closed.done() and self.transport is not None:
            self.transport.abort()

    def _cut(self, code: int, reason: str) -> None:
        """Drop the connection now, discarding the unsent buffer (slow consumer)."""
        if self._closing:
            return
        self.close_code = code
        self.close_reason = reason
        self._closing = True
        self._out.clear()
        if self.transport is not None:
            self.transport.abort()

    def abort(self) -> None:
        """Drop the connection at once, discarding unsent bytes. Idempotent."""
        self._cut(self.close_code, self.close_reason)

    @property
    def closed(self) -> bool:
        """True once closing has begun (no more sends)."""
        return self._closing

    async def wait_closed(self) -> None:
        """Wait until the transport is gone."""
        if self._closed is not None:
            await asyncio.shield(self._closed)

    async def aclose(
        self, last: Message | None = None, *, code: int | None = None, reason: str = ""
    ) -> None:
        """:meth:`close` (same arguments), then :meth:`wait_closed`. Idempotent.

        Returns once the transport is gone: at most ``close_timeout_ms`` after the
        call when the peer does not read what is still buffered.
        """
        self.close(last, code=code, reason=reason)
        await self.wait_closed()

    def peername(self) -> Any:
        """The peer's address, as the transport reports it."""
        return None if self.transport is None else self.transport.get_extra_info("peername")

    def _check(self) -> None:
        """Assert the invariants: bounded inbox, no pending bytes once flushed, coherent flags."""
        if len(self._inbox) > self.max_pending:
            raise AssertionError(f"inbox holds {len(self._inbox)} > max_pending")
        if self._out and not (self._flush_scheduled or self._in_batch):
            raise AssertionError("bytes pending with no flush scheduled")
        if self._reading_paused and not (self._decode_paused or self._closing):
            raise AssertionError("reading paused although the inbox has room")


def _partial(conn: Connection) -> bool:
    """True when the Connection holds part of a frame (called after NEED_DATA)."""
    return conn.buffered > 0


async def open_connection(
    host: str,
    port: int,
    *,
    role: Role = Role.CLIENT,
    factory: Callable[[], FramedConnection] | None = None,
    **kwargs: Any,
) -> FramedConnection:
    """Connect over TCP and return the :class:`FramedConnection` (keywords go to it)."""
    loop = asyncio.get_running_loop()
    if factory is None:

        def factory() -> FramedConnection:
            return FramedConnection(role, **kwargs)

    _, protocol = await loop.create_connection(factory, host, port)
    return protocol
