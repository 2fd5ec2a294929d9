"""The codec: whole frames and bodies in and out, through the generated strict CBOR.

The pieces live in their own modules: :mod:`~imkit.protocol._header` (the 8-byte
header, its checks and LZ4), :mod:`~imkit.protocol._codegen` (the generator of one
strict decoder and one encoder per message class, and why it generates code) and
:mod:`~imkit.protocol._cbor` (the run-time helpers the generated code calls). This
module compiles the codecs once, at import, and keeps the public functions:
:func:`encode`, :func:`encode_body`, :func:`encode_push_batch`, :func:`decode`,
:func:`decode_body`. The generated sources are kept in :data:`SOURCES` for reading
and debugging (``print(_codec.SOURCES["Push"])``).

Decoder contract: given any ``bytes``, a generated decoder returns a valid message
(every field of the right type and within its limit) or raises a subclass of
:class:`~imkit.errors.RemoteProtocolError`. Its cost is linear in the body length
and it allocates nothing a peer merely declares. Encoders refuse an invalid local
message with :class:`~imkit.errors.LocalProtocolError`, so a valid peer never sees
bytes its own decoder would refuse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from imkit.errors import BadHeader, LocalProtocolError, MalformedBody, TruncatedFrame
from imkit.protocol._cbor import _array_head_bytes
from imkit.protocol._codegen import compile_codecs
from imkit.protocol._header import (
    FRAME_TYPE_NAMES,
    check_header_prefix,
    decompress,
    frame_body,
    parse_header,
)
from imkit.protocol._limits import (
    DEFAULT_COMPRESS_THRESHOLD,
    DEFAULT_MAX_FRAME_SIZE,
    FLAG_LZ4,
    HEADER_SIZE,
    MAX_ITEMS,
)
from imkit.protocol._messages import SENDERS, FrameType, Message
from imkit.protocol._schema import FRAME_TYPE_OF

__all__ = [
    "BODY_DECODERS",
    "FRAME_ENCODERS",
    "SOURCES",
    "decode",
    "decode_body",
    "decompress",
    "encode",
    "encode_body",
    "encode_push_batch",
    "frame_body",
    "parse_header",
]

#: class name -> the generated Python source of its decoder and encoder.
SOURCES: dict[str, str]
_ENCODERS: dict[type, Callable[[object], bytes]]
_DECODERS: dict[type, Callable[[bytes], Message]]
SOURCES, _ENCODERS, _DECODERS = compile_codecs()


def _unknown_frame_type(frame_type: int) -> Callable[[bytes], Message]:
    def refuse(body: bytes) -> Message:
        raise BadHeader(f"unknown frame type {frame_type}")

    return refuse


#: frame type value (0..255) -> body decoder (one that raises BadHeader for values
#: that are no frame type).
BODY_DECODERS: Final[tuple[Callable[[bytes], Message], ...]] = tuple(
    _DECODERS[SENDERS[FrameType(t)][0]] if t in FRAME_TYPE_NAMES else _unknown_frame_type(t)
    for t in range(256)
)
#: message class -> (frame type value, body encoder).
FRAME_ENCODERS: Final[dict[type, tuple[int, Callable[[object], bytes]]]] = {
    cls: (int(ft), _ENCODERS[cls]) for cls, ft in FRAME_TYPE_OF.items()
}


def encode_body(message: Message) -> bytes:
    """The CBOR body of ``message`` (no header, never compressed). O(encoded size).

    Trailing fields equal to their default are left out. Raises
    :class:`LocalProtocolError` if ``message`` is not a protocol message or a field
    is of the wrong type, out of range, empty where required or over its limit.

    >>> from imkit.protocol import Ping
    >>> encode_body(Ping(nonce=7)).hex()
    '8107'
    """
    try:
        return FRAME_ENCODERS[type(message)][1](message)
    except KeyError:
        raise LocalProtocolError(f"not a protocol message: {type(message).__name__}") from None


def decode_body(frame_type: int, body: bytes | bytearray | memoryview) -> Message:
    """Decode an uncompressed CBOR ``body`` of ``frame_type``. O(len(body)).

    Raises a :class:`~imkit.errors.RemoteProtocolError` subclass for anything but a
    valid body; no other exception escapes.
    """
    if not isinstance(frame_type, int) or not 0 <= frame_type < 256:
        raise BadHeader(f"unknown frame type {frame_type}")
    return BODY_DECODERS[frame_type](body if type(body) is bytes else bytes(body))


def encode(
    message: Message,
    *,
    compress_threshold: int | None = DEFAULT_COMPRESS_THRESHOLD,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
) -> bytes:
    """One whole frame (header + body) for ``message``. O(encoded size).

    The result does not depend on any connection: encode a message once and write
    the same bytes to many peers. Raises :class:`LocalProtocolError` for an
    invalid message or a body over ``max_frame_size``. Sending-role checks are the
    :class:`~imkit.protocol.Connection`'s job.

    >>> from imkit.protocol import Ping
    >>> encode(Ping(nonce=7)).hex()
    'c1010300000000028107'
    """
    try:
        frame_type, encoder = FRAME_ENCODERS[type(message)]
    except KeyError:
        raise LocalProtocolError(f"not a protocol message: {type(message).__name__}") from None
    return frame_body(frame_type, encoder(message), compress_threshold, max_frame_size)


def encode_push_batch(
    pushes: Sequence[bytes],
    *,
    compress_threshold: int | None = DEFAULT_COMPRESS_THRESHOLD,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
) -> bytes:
    """A PUSH_BATCH frame from pushes already encoded with :func:`encode_body`. O(total size).

    The fast path for fan-out: encode each stored message once (``encode_body(push)``),
    keep the bytes, and build every recipient's batch by concatenation. The items are
    checked only for the Push array head, not re-validated: pass only bytes that
    :func:`encode_body` produced for a :class:`Push`. Raises
    :class:`LocalProtocolError` for 0 or more than MAX_ITEMS pushes, or a body over
    ``max_frame_size``.
    """
    n = len(pushes)
    if not 1 <= n <= MAX_ITEMS:
        raise LocalProtocolError(f"a PushBatch takes 1 to {MAX_ITEMS} pushes, got {n}")
    for item in pushes:
        if type(item) is not bytes or not item or not 0x84 <= item[0] <= 0x86:
            raise LocalProtocolError("encode_push_batch takes encode_body(Push) results")
    body = b"\x81" + _array_head_bytes(n) + b"".join(pushes)
    return frame_body(FrameType.PUSH_BATCH, body, compress_threshold, max_frame_size)


def decode(
    frame: bytes | bytearray | memoryview, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> Message:
    """Decode exactly one whole frame (no role check). O(len(frame)).

    Raises :class:`TruncatedFrame` if ``frame`` is shorter than its header says,
    :class:`MalformedBody` if bytes follow the frame, and the other
    :class:`~imkit.errors.RemoteProtocolError` subclasses for a bad header or
    body. No other exception escapes.

    >>> from imkit.protocol import Ping
    >>> decode(bytes.fromhex('c1010300000000028107'))
    Ping(nonce=7)
    """
    data = frame if type(frame) is bytes else bytes(frame)
    if len(data) < HEADER_SIZE:
        check_header_prefix(data, 0, len(data))
        raise TruncatedFrame(len(data), HEADER_SIZE)
    frame_type, flags, length = parse_header(data, 0, max_frame_size)
    total = HEADER_SIZE + length
    if len(data) < total:
        raise TruncatedFrame(len(data), total)
    if len(data) > total:
        raise MalformedBody(f"{len(data) - total} bytes after the frame")
    body = data[HEADER_SIZE:]
    if flags & FLAG_LZ4:
        body = decompress(body, max_frame_size)
    return BODY_DECODERS[frame_type](body)
