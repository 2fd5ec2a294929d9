"""The 8-byte frame header: pack and parse it, and the LZ4 body it may announce.

Layout (big-endian, see docs/protocol.md): magic u8, version u8, frame type u8,
flags u8, body length u32. Every check here needs the header alone, so a bad
frame is refused before any byte of its body is buffered; the one flag this
version defines (``FLAG_LZ4``) says the body is a size-prefixed LZ4 block, which
:func:`decompress` expands within a bound checked before any memory is reserved.
Nothing here knows CBOR: the body codec is :mod:`imkit.protocol._codec`.
"""

from __future__ import annotations

import struct
from typing import Final

import lz4.block

from imkit.errors import BadHeader, DecompressionError, FrameTooLarge, LocalProtocolError
from imkit.protocol._limits import (
    FLAG_LZ4,
    FRAMING_VERSION,
    KNOWN_FLAGS,
    LZ4_SIZE_PREFIX,
    MAGIC,
    MAGIC_VERSION,
)
from imkit.protocol._messages import FrameType

__all__ = [
    "FRAME_TYPE_NAMES",
    "check_header_prefix",
    "decompress",
    "frame_body",
    "pack_header",
    "parse_header",
    "unpack_header",
]

_HEADER = struct.Struct(">HBBI")
#: ``unpack_header(buf, offset) -> (magic_version, frame_type, flags, length)``
unpack_header: Final = _HEADER.unpack_from
#: ``pack_header(magic_version, frame_type, flags, length) -> 8 bytes``
pack_header: Final = _HEADER.pack

#: frame type value -> its name, for the values that are frame types.
FRAME_TYPE_NAMES: Final = {int(t): t.name for t in FrameType}

_lz4_compress: Final = lz4.block.compress
_lz4_decompress: Final = lz4.block.decompress
_LZ4Error: Final = lz4.block.LZ4BlockError


def check_header_prefix(data: bytes, pos: int, avail: int) -> None:
    """Refuse a header from its first ``avail`` (< 8) bytes: bad magic at byte 0 already.

    Lets a receiver drop an HTTP request or a TLS hello after one byte instead of
    waiting for eight. Role and length checks need the full header. O(1).
    """
    if avail >= 1 and data[pos] != MAGIC:
        raise BadHeader(f"bad magic 0x{data[pos]:02x}")
    if avail >= 2 and data[pos + 1] != FRAMING_VERSION:
        raise BadHeader(f"unsupported version {data[pos + 1]}")
    if avail >= 3 and data[pos + 2] not in FRAME_TYPE_NAMES:
        raise BadHeader(f"unknown frame type {data[pos + 2]}")
    if avail >= 4 and data[pos + 3] & ~KNOWN_FLAGS:
        raise BadHeader(f"reserved flag bits set: 0x{data[pos + 3]:02x}")


def parse_header(data: bytes, pos: int, max_frame_size: int) -> tuple[int, int, int]:
    """Validate the 8-byte header at ``pos``; return ``(frame_type, flags, length)``. O(1).

    Checks, in order: magic, version, frame type, reserved flags, zero length,
    length above ``max_frame_size``. Raises :class:`BadHeader` or
    :class:`FrameTooLarge`; needs no byte of the body, so a bad frame is refused
    before any of it is buffered.
    """
    magic_version, ftype, flags, length = unpack_header(data, pos)
    if magic_version != MAGIC_VERSION:
        check_header_prefix(data, pos, 2)
    if ftype not in FRAME_TYPE_NAMES:
        raise BadHeader(f"unknown frame type {ftype}")
    if flags & ~KNOWN_FLAGS:
        raise BadHeader(f"reserved flag bits set: 0x{flags:02x}")
    if length == 0:
        raise BadHeader("zero body length")
    if length > max_frame_size:
        raise FrameTooLarge(length, max_frame_size)
    return ftype, flags, length


def frame_body(
    frame_type: int, body: bytes, compress_threshold: int | None, max_frame_size: int
) -> bytes:
    """Prefix ``body`` with a header, LZ4-compressing it if that pays. O(len(body)).

    The body is compressed when it is at least ``compress_threshold`` bytes
    (``None``: never) and is sent compressed only if the result is smaller.
    Raises :class:`LocalProtocolError` if the body exceeds ``max_frame_size``
    (the peer would refuse it).
    """
    n = len(body)
    if n > max_frame_size:
        name = FRAME_TYPE_NAMES.get(frame_type, str(frame_type))
        raise LocalProtocolError(
            f"{name} body of {n} bytes exceeds max_frame_size={max_frame_size}"
        )
    if compress_threshold is not None and n >= compress_threshold:
        packed: bytes = _lz4_compress(body, store_size=True)
        if len(packed) < n:
            return pack_header(MAGIC_VERSION, frame_type, FLAG_LZ4, len(packed)) + packed
    return pack_header(MAGIC_VERSION, frame_type, 0, n) + body


def decompress(body: bytes, max_size: int) -> bytes:
    """Decompress a size-prefixed LZ4 body of at most ``max_size`` bytes. O(max_size).

    The little-endian size prefix is checked against ``max_size`` before any
    memory is reserved: a forged size raises :class:`FrameTooLarge`, a corrupt
    block or a size that does not match :class:`DecompressionError`.
    """
    if len(body) <= LZ4_SIZE_PREFIX:
        raise DecompressionError("LZ4 body shorter than its size prefix")
    size = body[0] | body[1] << 8 | body[2] << 16 | body[3] << 24
    if size > max_size:
        raise FrameTooLarge(size, max_size)
    if size == 0:
        raise DecompressionError("declared decompressed size 0")
    try:
        return _lz4_decompress(body)  # type: ignore[no-any-return]
    except (_LZ4Error, ValueError):
        raise DecompressionError("corrupt LZ4 block") from None
