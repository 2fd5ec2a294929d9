"""The strict CBOR subset at run time: head tables and the slow and error paths.

The generated decoders and encoders (:mod:`imkit.protocol._codegen`) inline the
common case of every field (one-byte heads, short strings) and call into this
module for everything else: longer heads, the exact error for an item outside the
subset, skipping the unknown trailing fields of a newer version, and refusing an
invalid local message. Every ``_``-prefixed name defined here is a global of the
generated code (the generator hands them to it by name), so a name used in a
generated line must exist here. Each function is O(1) unless its docstring says
otherwise.

The subset: uint, text, bytes, array, false and true; shortest-form heads; no
tags, maps, floats, null or indefinite-length items; integers at most
``MAX_UINT``.
"""

from __future__ import annotations

import struct
from typing import Final, NoReturn

from imkit.errors import InvalidField, LocalProtocolError, MalformedBody
from imkit.protocol._limits import MAX_EXTRA_DEPTH, MAX_EXTRA_FIELDS, MAX_ITEMS, MAX_UINT
from imkit.protocol._messages import ErrorCode

__all__: list[str] = []  # private to imkit.protocol: read by the generated code by name

# --- decoding helpers (the slow and error paths of the generated code) ------------------

_u16: Final = struct.Struct(">H").unpack_from
_u32: Final = struct.Struct(">I").unpack_from
_u64: Final = struct.Struct(">Q").unpack_from
_MAJOR_NAMES: Final = (
    "uint",
    "negative int",
    "bytes",
    "text",
    "array",
    "map",
    "tag",
    "simple value",
)
_SIMPLE_NAMES: Final = {
    20: "false",
    21: "true",
    22: "null",
    23: "undefined",
    25: "half float",
    26: "float",
    27: "double",
    31: "break",
}
#: ErrorCode members indexed by value (values are 0..N-1, each fits one CBOR byte).
_CODES: Final = tuple(sorted(ErrorCode, key=int))
assert [int(c) for c in _CODES] == list(range(len(_CODES))) and len(_CODES) <= 24


def _item_name(b: int) -> str:
    """Describe a CBOR initial byte for an error message. O(1)."""
    major, info = b >> 5, b & 0x1F
    if major == 7:
        return _SIMPLE_NAMES.get(info, "simple value")
    if info == 31:
        return f"indefinite-length {_MAJOR_NAMES[major]}"
    if info in (28, 29, 30):
        return "reserved initial byte"
    return _MAJOR_NAMES[major]


def _bad(data: bytes, pos: int, field: str, expected: str) -> NoReturn:
    """Raise the right error for an unexpected item at ``pos``. O(1)."""
    b = data[pos]
    major, info = b >> 5, b & 0x1F
    if major in (5, 6) or info >= 28 or (major == 7 and info not in (20, 21)):
        # outside the strict subset: maps, tags, floats, null, indefinite lengths
        raise MalformedBody(f"{_item_name(b)} not allowed ({field})")
    if major == 1:
        raise InvalidField(field, "negative integer")
    raise InvalidField(field, f"expected {expected}, got {_item_name(b)}")


def _nonminimal(field: str) -> NoReturn:
    raise MalformedBody(f"non-shortest CBOR head ({field})")


def _truncated() -> NoReturn:
    raise MalformedBody("truncated body")


def _bad_uint(field: str, value: int) -> NoReturn:
    """An 8-byte uint head: either above MAX_UINT or one that fits in 4 bytes. O(1)."""
    if value > MAX_UINT:
        raise InvalidField(field, "integer above 2**63 - 1")
    _nonminimal(field)


def _head_len(data: bytes, pos: int, field: str) -> tuple[int, int]:
    """Length argument of a head with info 24..27: ``(n, start of content)``. O(1)."""
    info = data[pos] & 0x1F
    if info == 24:
        n, start, least = data[pos + 1], pos + 2, 24
    elif info == 25:
        n, start, least = _u16(data, pos + 1)[0], pos + 3, 0x100
    elif info == 26:
        n, start, least = _u32(data, pos + 1)[0], pos + 5, 0x1_0000
    else:
        n, start, least = _u64(data, pos + 1)[0], pos + 9, 0x1_0000_0000
    if n < least:
        _nonminimal(field)
    return n, start


def _text_head(data: bytes, pos: int, field: str, limit: int, nonempty: bool) -> tuple[int, int]:
    """``(start, stop)`` of a text item whose head is not the one-byte form. O(1)."""
    b = data[pos]
    if b == 0x60:
        if nonempty:
            raise InvalidField(field, "empty")
        return pos + 1, pos + 1
    if not 0x78 <= b <= 0x7B:
        _bad(data, pos, field, "text")
    n, start = _head_len(data, pos, field)
    if n > limit:
        raise InvalidField(field, f"{n} bytes, limit {limit}")
    return start, start + n


def _bytes_head(data: bytes, pos: int, field: str) -> tuple[int, int]:
    """``(start, stop)`` of a byte string whose head is not one of the inlined forms. O(1)."""
    if not 0x59 <= data[pos] <= 0x5B:
        _bad(data, pos, field, "bytes")
    n, start = _head_len(data, pos, field)
    return start, start + n


def _array_head(data: bytes, pos: int, field: str, limit: int) -> tuple[int, int]:
    """``(count, position after the head)`` of an array of 24 or more entries. O(1)."""
    if not 0x98 <= data[pos] <= 0x9B:
        _bad(data, pos, field, "array")
    n, start = _head_len(data, pos, field)
    if n > limit:
        raise InvalidField(field, f"{n} entries, limit {limit}")
    return n, start


def _bad_struct(data: bytes, pos: int, name: str, least: int, most: int) -> NoReturn:
    """A message (or pair) array with the wrong field count, or not an array. O(1)."""
    b = data[pos]
    if b >> 5 != 4 or b & 0x1F >= 28:
        raise MalformedBody(f"{name}: expected an array, got {_item_name(b)}")
    n = b & 0x1F if b & 0x1F < 24 else _head_len(data, pos, name)[0]
    span = f"{least}" if least == most else f"{least} to {most}"
    raise MalformedBody(f"{name} takes {span} fields, got {n}")


def _struct_head(data: bytes, pos: int, name: str, least: int, most: int) -> tuple[int, int]:
    """``(field count, position after the head)`` of a struct with unknown trailing fields.

    The count may exceed the schema's ``most`` by at most MAX_EXTRA_FIELDS (the
    fields a newer version added); anything else raises. O(1).
    """
    b = data[pos]
    if 0x80 <= b <= 0x97:
        n, start = b - 0x80, pos + 1
    elif b == 0x98:
        n, start = _head_len(data, pos, name)
    else:
        _bad_struct(data, pos, name, least, most + MAX_EXTRA_FIELDS)
    if not most < n <= most + MAX_EXTRA_FIELDS:
        _bad_struct(data, pos, name, least, most + MAX_EXTRA_FIELDS)
    return n, start


def _skip_fields(data: bytes, pos: int, end: int, count: int, name: str) -> int:
    """Skip ``count`` unknown trailing fields; return the position after them.

    An unknown field is checked to be well-formed in the wire's CBOR subset (the
    same rules as known fields: shortest heads, integers within MAX_UINT, valid
    UTF-8, no tags, maps, floats, null or indefinite lengths, arrays of at most
    MAX_ITEMS entries nested at most MAX_EXTRA_DEPTH deep, nothing running past the
    body) but not for its type or limits: a decoder cannot know a field it does
    not know. Its value is dropped. O(bytes skipped).
    """
    for i in range(count):
        pos = _skip_item(data, pos, end, f"{name}[{i}]", 0)
    return pos


def _skip_item(data: bytes, pos: int, end: int, field: str, depth: int) -> int:
    """Skip one well-formed item of the allowed subset; return the position after it."""
    b = data[pos]
    major, info = b >> 5, b & 0x1F
    if major == 7:
        if info in (20, 21):
            return pos + 1
        _bad(data, pos, field, "a known item")
    if info >= 28 or major in (1, 5, 6):
        _bad(data, pos, field, "a known item")
    if info < 24:
        n, start = info, pos + 1
    else:
        n, start = _head_len(data, pos, field)
    if major == 0:
        if n > MAX_UINT:
            raise InvalidField(field, "integer above 2**63 - 1")
        return start
    if major == 4:
        if n > MAX_ITEMS:
            raise InvalidField(field, f"{n} entries, limit {MAX_ITEMS}")
        if depth >= MAX_EXTRA_DEPTH:
            raise MalformedBody(f"unknown field nested too deep ({field})")
        for _ in range(n):
            if start >= end:
                _truncated()
            start = _skip_item(data, start, end, field, depth + 1)
        return start
    stop = start + n
    if stop > end:
        _truncated()
    if major == 3:
        try:
            data[start:stop].decode()
        except UnicodeDecodeError:
            raise InvalidField(field, "not valid UTF-8") from None
    return stop


def _bad_text(field: str, truncated: bool) -> NoReturn:
    """A text that does not decode: cut short by the end of the body, or bad UTF-8."""
    if truncated:
        _truncated()
    raise InvalidField(field, "not valid UTF-8")


def _bad_code(data: bytes, pos: int, field: str) -> NoReturn:
    b = data[pos]
    if b < 24:
        raise InvalidField(field, f"unknown error code {b}")
    if b < 28:
        n, _ = _head_len(data, pos, field)
        raise InvalidField(field, f"unknown error code {n}")
    _bad(data, pos, field, "error code")


def _trailing(pos: int, end: int) -> NoReturn:
    """The message ended at ``pos``, not at the body's ``end``."""
    if pos > end:
        _truncated()
    raise MalformedBody(f"{end - pos} bytes after the message")


# --- encoding helpers ---------------------------------------------------------------

_p16: Final = struct.Struct(">BH").pack
_p32: Final = struct.Struct(">BI").pack
_p64: Final = struct.Struct(">BQ").pack


def _heads(major: int) -> tuple[bytes, ...]:
    """Shortest CBOR heads for arguments 0..255 of a major type."""
    m = major << 5
    return tuple(bytes([m | n]) if n < 24 else bytes([m | 24, n]) for n in range(256))


_UINT_HEADS: Final = _heads(0)
_BYTES_HEADS: Final = _heads(2)
_TEXT_HEADS: Final = _heads(3)
_ARRAY_HEADS: Final = _heads(4)
_CODE_TYPES: Final = (int, ErrorCode)
_CODE_VALUES: Final = frozenset(int(c) for c in ErrorCode)


def _array_head_bytes(n: int) -> bytes:
    """Shortest array head for ``n`` entries (n < 2**16). O(1)."""
    return _ARRAY_HEADS[n] if n < 256 else _p16(0x99, n)


def _lbad(field: str, value: object, expected: str) -> NoReturn:
    """Refuse an invalid local message. O(1)."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    raise LocalProtocolError(f"invalid field {field!r}: expected {expected}, got {text}")
