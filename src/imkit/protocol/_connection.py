"""The sans-IO connection: bytes in, messages out; messages in, bytes out.

A :class:`Connection` owns no socket, clock or thread. The I/O layer feeds it what
it reads (``receive_data``), drains messages (``next_event`` until ``NEED_DATA``)
and writes what ``send`` returns. It knows which end it is, so a frame the peer's
role may not send is refused at its header, before its body is buffered.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Callable
from typing import Final, Literal, TypeAlias

from imkit.errors import (
    CapacityError,
    ConfigError,
    LocalProtocolError,
    RemoteProtocolError,
    TruncatedFrame,
    UnexpectedFrame,
)
from imkit.protocol._codec import BODY_DECODERS, FRAME_ENCODERS
from imkit.protocol._header import check_header_prefix, decompress, frame_body, parse_header
from imkit.protocol._limits import (
    DEFAULT_COMPRESS_THRESHOLD,
    DEFAULT_MAX_FRAME_SIZE,
    FLAG_LZ4,
    HEADER_SIZE,
    MAGIC_VERSION,
    MAX_FRAME_SIZE_LIMIT,
    READ_ALLOWANCE,
)
from imkit.protocol._messages import SENDERS, FrameType, Message, Role
from imkit.protocol._schema import FRAME_TYPE_OF

__all__ = ["CLOSED", "NEED_DATA", "Connection", "ConnectionState", "Event", "Sentinel"]


class Sentinel(enum.Enum):
    """The two non-message results of :meth:`Connection.next_event`."""

    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"

    def __repr__(self) -> str:
        return self.value


#: ``next_event()`` needs more bytes (call ``receive_data`` first).
NEED_DATA: Final = Sentinel.NEED_DATA
#: The peer closed the stream cleanly (EOF at a frame boundary); returned forever after.
CLOSED: Final = Sentinel.CLOSED

#: What ``next_event()`` returns.
Event: TypeAlias = Message | Literal[Sentinel.NEED_DATA, Sentinel.CLOSED]


_unpack_lead: Final = struct.Struct(">II").unpack_from

#: At NEED_DATA, parsed bytes at the front of the buffer are dropped once they are at
#: least this many (or when nothing unparsed is left): an idle connection then keeps
#: its incomplete frame plus less than 1 KiB, not its whole last read (up to 256 KiB).
_COMPACT_AFTER: Final = 1024


def _decompressing(
    decoder: Callable[[bytes], Message], max_frame_size: int
) -> Callable[[bytes], Message]:
    """``decoder`` for an LZ4 body of at most ``max_frame_size`` bytes decompressed."""

    def decode_lz4(body: bytes) -> Message:
        return decoder(decompress(body, max_frame_size))

    return decode_lz4


@functools.lru_cache(maxsize=64)
def _receive_table(role: Role, max_frame_size: int) -> dict[int, Callable[[bytes], Message]]:
    """First 4 header bytes (magic, version, type, flags) of every frame ``role`` accepts
    -> its body decoder (decompressing first when the LZ4 flag is set). One dict lookup
    then checks magic, version, frame type, flags and the peer's role. O(frame types).
    """
    peer = Role.SERVER if role is Role.CLIENT else Role.CLIENT
    table: dict[int, Callable[[bytes], Message]] = {}
    for frame_type, (_, senders) in SENDERS.items():
        if peer in senders:
            decoder = BODY_DECODERS[frame_type]
            lead = MAGIC_VERSION << 16 | frame_type << 8
            table[lead] = decoder
            table[lead | FLAG_LZ4] = _decompressing(decoder, max_frame_size)
    return table


#: role -> the message classes it may send
_SEND_TABLE: Final = {
    role: frozenset(cls for cls, senders in SENDERS.values() if role in senders)
    for role in Role
}


class ConnectionState(enum.Enum):
    """Where the receiving side of a :class:`Connection` is."""

    OPEN = "open"  # frames may arrive
    CLOSED = "closed"  # clean EOF seen and every buffered frame returned
    ERROR = "error"  # the peer broke the protocol; next_event() re-raises the error


#: The one table of transitions: (state, what happened) -> new state.
_TRANSITIONS: Final = {
    (ConnectionState.OPEN, "eof"): ConnectionState.CLOSED,
    (ConnectionState.OPEN, "remote_error"): ConnectionState.ERROR,
}


class Connection:
    """One end of an imkit connection, sans-IO (h11 / wsproto style).

    ``role`` says which end this is; a frame type the other role may not send
    (:data:`~imkit.protocol.SENDERS`) is refused with
    :class:`~imkit.errors.UnexpectedFrame`, and sending a frame this role may not
    send raises :class:`~imkit.errors.LocalProtocolError`.

    Limits (keywords, each with a ``DEFAULT_*`` constant in ``imkit.protocol``):

    - ``max_frame_size``: largest body accepted or sent, compressed or not, and
      largest decompressed body (default 64 KiB).
    - ``compress_threshold``: bodies this long or longer are LZ4-compressed on send
      if that makes them smaller; ``None`` never compresses (default 512).
    - ``max_buffer_size``: bytes held between ``receive_data`` and ``next_event``;
      ``receive_data`` refuses more with :class:`~imkit.errors.CapacityError`.
      ``None`` (default): one incomplete frame plus one 256 KiB read,
      ``8 + max_frame_size + READ_ALLOWANCE`` (``DEFAULT_MAX_BUFFER_SIZE``, 320 KiB: 327,688 bytes,
      with the default frame size). At least ``max_frame_size + 8``.

    Receiving: ``receive_data(data)`` only buffers (``b""`` means EOF);
    ``next_event()`` returns the next message, :data:`NEED_DATA`, or after a clean
    EOF :data:`CLOSED`. Every bad input raises a subclass of
    :class:`~imkit.errors.RemoteProtocolError` (EOF inside a frame:
    :class:`~imkit.errors.TruncatedFrame`); the connection then stays in
    :attr:`ConnectionState.ERROR` and every later ``next_event()`` raises the same
    error again, while ``receive_data`` discards what it is given. Sending is not
    affected by the receiving state: after a protocol error a server can still
    ``send(Kick(code=ErrorCode.PROTOCOL_ERROR))`` before closing.

    Memory is bounded by ``max_buffer_size`` and time per byte is constant: a frame's
    header is checked as soon as its 8 bytes are here, bytes are joined only once
    the whole frame has arrived (so a frame trickling in byte by byte costs O(n)),
    and a body is decoded once.

    >>> from imkit.protocol import Ping, Pong
    >>> client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    >>> server.receive_data(client.send(Ping(nonce=1)))
    >>> server.next_event()
    Ping(nonce=1)
    >>> server.next_event()
    NEED_DATA
    """

    __slots__ = (
        "_buf",
        "_compress_threshold",
        "_decoders",
        "_eof",
        "_error",
        "_max_buffer_size",
        "_max_frame_size",
        "_may_send",
        "_pending",
        "_pending_len",
        "_pos",
        "_state",
        "role",
    )

    def __init__(
        self,
        role: Role,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        compress_threshold: int | None = DEFAULT_COMPRESS_THRESHOLD,
        max_buffer_size: int | None = None,
    ) -> None:
        """Create the connection for ``role``. O(1)."""
        if not isinstance(role, Role):
            raise ConfigError(f"role must be a Role, got {role!r}")
        if type(max_frame_size) is not int or not 1 <= max_frame_size <= MAX_FRAME_SIZE_LIMIT:
            raise ConfigError(f"max_frame_size must be in [1, 2**32 - 1], got {max_frame_size!r}")
        if compress_threshold is not None and (
            type(compress_threshold) is not int or compress_threshold < 1
        ):
            raise ConfigError(
                f"compress_threshold must be None or >= 1, got {compress_threshold!r}"
            )
        if max_buffer_size is None:
            max_buffer_size = HEADER_SIZE + max_frame_size + READ_ALLOWANCE
        if type(max_buffer_size) is not int or max_buffer_size < HEADER_SIZE + max_frame_size:
            raise ConfigError(
                f"max_buffer_size must be at least max_frame_size + {HEADER_SIZE} "
                f"= {HEADER_SIZE + max_frame_size}, got {max_buffer_size!r}"
            )
        self.role: Final = role
        self._max_frame_size = max_frame_size
        self._compress_threshold = compress_threshold
        self._max_buffer_size = max_buffer_size
        # shared by every connection of the same role and frame size (a gateway
        # holds many): first 4 header bytes -> body decoder, and the classes it sends
        self._decoders = _receive_table(role, max_frame_size)
        self._may_send = _SEND_TABLE[role]
        # received bytes: self._buf[self._pos:] is parsed from; self._pending holds
        # chunks not yet joined into _buf (joined only once a whole header or
        # frame is there, so trickling input is not copied over and over)
        self._buf = b""
        self._pos = 0
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._eof = False
        self._state = ConnectionState.OPEN
        self._error: RemoteProtocolError | None = None

    # --- properties ------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """The receiving state (OPEN, CLOSED or ERROR). O(1)."""
        return self._state

    @property
    def max_frame_size(self) -> int:
        """Largest body accepted or sent. O(1)."""
        return self._max_frame_size

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages. O(1).

        Nonzero after ``next_event()`` returned ``NEED_DATA`` means a frame has
        started and not finished: arm the whole-frame deadline (slowloris defence)
        in the I/O layer, which owns the clock.
        """
        return len(self._buf) - self._pos + self._pending_len

    # --- receiving --------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes read from the peer; ``b""`` means the peer closed (EOF). O(len(data)).

        Only buffers: parsing happens in :meth:`next_event`. Raises
        :class:`~imkit.errors.CapacityError` (buffering nothing) if the buffered bytes
        would exceed ``max_buffer_size`` -- drain events first -- and
        :class:`~imkit.errors.LocalProtocolError` for data after EOF. In the ERROR
        state the data is discarded.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if self._state is ConnectionState.ERROR:
            return
        if type(data) is not bytes:
            data = bytes(data)
        n = len(data)
        if self._pos == len(self._buf) and not self._pending:
            if n > self._max_buffer_size:
                raise CapacityError("max_buffer_size", self._max_buffer_size, f"{n} bytes")
            self._buf = data
            self._pos = 0
            return
        buffered = len(self._buf) - self._pos + self._pending_len + n
        if buffered > self._max_buffer_size:
            raise CapacityError(
                "max_buffer_size", self._max_buffer_size, f"{buffered} bytes buffered"
            )
        self._pending.append(data)
        self._pending_len += n

    def next_event(self) -> Event:
        """The next message, ``NEED_DATA``, or ``CLOSED``. O(frame size) per message.

        Raises a :class:`~imkit.errors.RemoteProtocolError` subclass for bad input
        and then keeps raising it. Never raises anything else for anything the peer
        sends.
        """
        buf = self._buf
        pos = self._pos
        if len(buf) - pos >= HEADER_SIZE:
            lead, length = _unpack_lead(buf, pos)
            decoder = self._decoders.get(lead)
            if decoder is not None and 0 < length <= self._max_frame_size:
                end = pos + HEADER_SIZE + length
                if end <= len(buf):
                    self._pos = end
                    try:
                        message: Message = decoder(buf[pos + HEADER_SIZE : end])
                    except RemoteProtocolError as exc:
                        self._fail(exc)
                        raise
                    return message
        return self._next_event_slow()

    def _next_event_slow(self) -> Event:
        """Everything but a whole valid frame already joined in ``_buf``. O(buffered)."""
        if self._state is ConnectionState.CLOSED:
            return CLOSED
        if self._error is not None:
            raise self._error
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        try:
            if avail < HEADER_SIZE:
                check_header_prefix(buf, pos, avail)
                need = HEADER_SIZE
            else:
                lead, length = _unpack_lead(buf, pos)
                if lead not in self._decoders or not 0 < length <= self._max_frame_size:
                    ftype, _, length = parse_header(buf, pos, self._max_frame_size)
                    # parse_header passed: only the role can be wrong
                    raise UnexpectedFrame(FrameType(ftype).name, self.role.value)
                # the header is valid and the frame incomplete (else the fast path
                # had returned it)
                need = HEADER_SIZE + length
            if not (
                self._pending and (avail < HEADER_SIZE or avail + self._pending_len >= need)
            ):
                if not self._eof:
                    if pos >= _COMPACT_AFTER or not avail:
                        # drop what was parsed so that an idle connection does not
                        # keep its last read alive
                        self._buf = buf[pos:]
                        self._pos = 0
                    return NEED_DATA
                if avail + self._pending_len == 0:
                    self._state = _TRANSITIONS[(self._state, "eof")]
                    return CLOSED
                raise TruncatedFrame(avail + self._pending_len, need)
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        # join the pending chunks once the header, or the whole frame, is there: a
        # frame trickling in byte by byte is joined once, not once per byte
        self._join()
        return self.next_event()

    def _join(self) -> None:
        """Move the pending chunks into ``_buf``, dropping what was parsed. O(buffered)."""
        self._buf = self._buf[self._pos :] + b"".join(self._pending)
        self._pos = 0
        self._pending.clear()
        self._pending_len = 0

    def _fail(self, exc: RemoteProtocolError) -> None:
        """Enter the ERROR state holding ``exc``; drop the buffers. O(1)."""
        if self._state is ConnectionState.OPEN:
            self._state = _TRANSITIONS[(self._state, "remote_error")]
            self._error = exc
        self._buf = b""
        self._pos = 0
        self._pending.clear()
        self._pending_len = 0

    # --- sending ----------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """The frame to write for ``message``. O(encoded size).

        Raises :class:`~imkit.errors.LocalProtocolError` if this role may not send
        that frame type, the message is invalid, or its body exceeds
        ``max_frame_size``. Works in every receiving state.
        """
        cls = type(message)
        if cls not in self._may_send:
            if cls in FRAME_TYPE_OF:
                raise LocalProtocolError(
                    f"a {self.role.value} may not send {FRAME_TYPE_OF[cls].name} frames"
                )
            raise LocalProtocolError(f"not a protocol message: {cls.__name__}")
        frame_type, encoder = FRAME_ENCODERS[cls]
        return frame_body(
            frame_type, encoder(message), self._compress_threshold, self._max_frame_size
        )

    # --- invariants -------------------------------------------------------------------

    def _check(self) -> None:
        """Assert the invariants of the buffers and the state. O(pending chunks)."""
        if not 0 <= self._pos <= len(self._buf):
            raise AssertionError(f"pos {self._pos} outside buffer of {len(self._buf)}")
        if self._pending_len != sum(len(c) for c in self._pending):
            raise AssertionError("pending_len does not match the pending chunks")
        if any(not c for c in self._pending):
            raise AssertionError("an empty chunk is pending")
        if self.buffered > self._max_buffer_size:
            raise AssertionError(f"{self.buffered} bytes buffered > {self._max_buffer_size}")
        if (self._state is ConnectionState.ERROR) != (self._error is not None):
            raise AssertionError(f"state {self._state} with error {self._error!r}")
        if self._state is not ConnectionState.OPEN and self.buffered:
            raise AssertionError(f"{self.buffered} bytes buffered in state {self._state}")
        if self._state is ConnectionState.CLOSED and not self._eof:
            raise AssertionError("CLOSED without EOF")
        peer = Role.SERVER if self.role is Role.CLIENT else Role.CLIENT
        expected = {
            MAGIC_VERSION << 16 | t << 8 | flags
            for t, (_, senders) in SENDERS.items()
            if peer in senders
            for flags in (0, FLAG_LZ4)
        }
        if set(self._decoders) != expected:
            raise AssertionError("receive table does not match SENDERS")
