"""The codec: strict CBOR bodies generated from the schema, and the 8-byte frame header.

Why generated code. The decoder is the hot path of every gateway and client, and
it must be *strict*: only the CBOR subset the schema uses (uint, text, bytes,
array, false, true), shortest-form heads, no tags, maps, floats or
indefinite-length items, declared lengths checked against the limit and against
the bytes left before anything is sliced, nothing after the item. A generic CBOR
decoder followed by a validator walks every item twice; ``cbor2``'s C decoder
would also silently accept tags (a bignum is an int to it), shared references,
non-minimal heads and trailing bytes. So, like ``attrs`` and ``dataclasses``
generate ``__init__``, this module generates one straight-line decoder and one
encoder per message class from :data:`~tests.compat.v1.protocol._schema.SCHEMA` at import
time: every field is read by a few inlined comparisons and one slice, nested
pushes of a batch are decoded inline in the loop, and the decoded message is
built through its slot descriptors (no ``__init__`` call). The benchmark
(``benchmarks/bench_protocol.py``) compares it with ``cbor2.loads`` plus the same
validation. The generated sources are kept in :data:`SOURCES` for reading and
debugging (``print(_codec.SOURCES["Push"])``).

Decoder contract: given any ``bytes``, a generated decoder returns a valid message
(every field of the right type and within its limit) or raises a subclass of
:class:`~imkit.errors.RemoteProtocolError`. Its cost is linear in the body length
and it allocates nothing a peer merely declares. Encoders refuse an invalid local
message with :class:`~imkit.errors.LocalProtocolError`, so a valid peer never sees
bytes its own decoder would refuse.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Final, NoReturn

import attrs
import lz4.block

from imkit.errors import (
    BadHeader,
    DecompressionError,
    FrameTooLarge,
    InvalidField,
    LocalProtocolError,
    MalformedBody,
    TruncatedFrame,
)
from tests.compat.v1.protocol._limits import (
    DEFAULT_COMPRESS_THRESHOLD,
    DEFAULT_MAX_FRAME_SIZE,
    FLAG_LZ4,
    HEADER_SIZE,
    KNOWN_FLAGS,
    LZ4_SIZE_PREFIX,
    MAGIC,
    MAGIC_VERSION,
    MAX_FRAME_SIZE_LIMIT,
    MAX_ID_BYTES,
    MAX_ITEMS,
    MAX_UINT,
    VERSION,
)
from tests.compat.v1.protocol._messages import SENDERS, ErrorCode, FrameType, Message
from tests.compat.v1.protocol._schema import (
    FRAME_TYPE_OF,
    SCHEMA,
    FieldSpec,
    Kind,
    defaults,
    required_count,
)

__all__ = [
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

# --- header --------------------------------------------------------------------------

_HEADER = struct.Struct(">HBBI")
#: ``unpack_header(buf, offset) -> (magic_version, frame_type, flags, length)``
unpack_header: Final = _HEADER.unpack_from
pack_header: Final = _HEADER.pack

_FRAME_TYPE_NAMES: Final = {int(t): t.name for t in FrameType}


def check_header_prefix(data: bytes, pos: int, avail: int) -> None:
    """Refuse a header from its first ``avail`` (< 8) bytes: bad magic at byte 0 already.

    Lets a receiver drop an HTTP request or a TLS hello after one byte instead of
    waiting for eight. Role and length checks need the full header. O(1).
    """
    if avail >= 1 and data[pos] != MAGIC:
        raise BadHeader(f"bad magic 0x{data[pos]:02x}")
    if avail >= 2 and data[pos + 1] != VERSION:
        raise BadHeader(f"unsupported version {data[pos + 1]}")
    if avail >= 3 and data[pos + 2] not in _FRAME_TYPE_NAMES:
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
    if ftype not in _FRAME_TYPE_NAMES:
        raise BadHeader(f"unknown frame type {ftype}")
    if flags & ~KNOWN_FLAGS:
        raise BadHeader(f"reserved flag bits set: 0x{flags:02x}")
    if length == 0:
        raise BadHeader("zero body length")
    if length > max_frame_size:
        raise FrameTooLarge(length, max_frame_size)
    return ftype, flags, length


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


def _text_head(
    data: bytes, pos: int, field: str, limit: int, nonempty: bool
) -> tuple[int, int]:
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


# --- code generation --------------------------------------------------------------------


class _Writer:
    """Accumulates indented source lines and hands out fresh local names."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 1
        self.counter = 0

    def emit(self, line: str) -> None:
        self.lines.append("    " * self.depth + line)

    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}_{self.counter}"

    def indent(self) -> _Indent:
        return _Indent(self)


class _Indent:
    def __init__(self, w: _Writer) -> None:
        self.w = w

    def __enter__(self) -> None:
        self.w.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.w.depth -= 1


def _setter(cls: type, name: str) -> str:
    return f"_set_{cls.__name__}_{name}"


def _default_expr(spec: FieldSpec, default: object) -> str:
    if spec.kind is Kind.CODE:
        return f"_CODES[{default!r}]"
    return repr(default)


def _gen_decode_struct(w: _Writer, cls: type, out: str, prefix: str) -> None:
    """Emit code reading one ``cls`` array at ``pos`` into local ``out``."""
    specs = SCHEMA[cls]
    least, most = required_count(cls), len(specs)
    name = cls.__name__
    nf = w.fresh("nf")
    w.emit("b = data[pos]")
    if least == most:
        w.emit(f"if b != {0x80 + most}:")
    else:
        w.emit(f"if not {0x80 + least} <= b <= {0x80 + most}:")
    with w.indent():
        w.emit(f"_bad_struct(data, pos, {name!r}, {least}, {most})")
    if least != most:
        w.emit(f"{nf} = b - 0x80")
    w.emit("pos += 1")
    values = []
    for i, (spec, default) in enumerate(zip(specs, defaults(cls), strict=True)):
        v = w.fresh(f"v_{spec.name}")
        values.append(v)
        label = prefix + spec.name
        if i < least:
            _gen_decode_field(w, spec, v, label)
        else:
            w.emit(f"if {nf} > {i}:")
            with w.indent():
                _gen_decode_field(w, spec, v, label)
            w.emit("else:")
            with w.indent():
                w.emit(f"{v} = {_default_expr(spec, default)}")
    w.emit(f"{out} = _new({name})")
    for spec, v in zip(specs, values, strict=True):
        w.emit(f"{_setter(cls, spec.name)}({out}, {v})")


def _gen_decode_uint(w: _Writer, v: str, label: str) -> None:
    w.emit("b = data[pos]")
    w.emit("if b < 24:")
    with w.indent():
        w.emit(f"{v} = b")
        w.emit("pos += 1")
    w.emit("elif b == 0x1B:")
    with w.indent():
        w.emit(f"{v} = _u64(data, pos + 1)[0]")
        w.emit(f"if not 0xFFFFFFFF < {v} <= {MAX_UINT}:")
        with w.indent():
            w.emit(f"_bad_uint({label!r}, {v})")
        w.emit("pos += 9")
    w.emit("elif b == 0x1A:")
    with w.indent():
        w.emit(f"{v} = _u32(data, pos + 1)[0]")
        w.emit(f"if {v} <= 0xFFFF:")
        with w.indent():
            w.emit(f"_nonminimal({label!r})")
        w.emit("pos += 5")
    w.emit("elif b == 0x19:")
    with w.indent():
        w.emit(f"{v} = _u16(data, pos + 1)[0]")
        w.emit(f"if {v} <= 0xFF:")
        with w.indent():
            w.emit(f"_nonminimal({label!r})")
        w.emit("pos += 3")
    w.emit("elif b == 0x18:")
    with w.indent():
        w.emit(f"{v} = data[pos + 1]")
        w.emit(f"if {v} < 24:")
        with w.indent():
            w.emit(f"_nonminimal({label!r})")
        w.emit("pos += 2")
    w.emit("else:")
    with w.indent():
        w.emit(f"_bad(data, pos, {label!r}, 'uint')")


def _gen_decode_text(w: _Writer, spec: FieldSpec, v: str, label: str) -> None:
    # One-byte heads (lengths 0..23) skip the bounds check: a slice is clipped at
    # the end of the body, and the position then lies past it, which the next read
    # (IndexError) or the final position check reports as truncation.
    w.emit("b = data[pos]")
    lowest = 0x61 if spec.nonempty else 0x60
    w.emit(f"if {lowest:#x} <= b <= 0x77:")
    with w.indent():
        w.emit("e = pos + b - 0x5F")
        w.emit("try:")
        with w.indent():
            w.emit(f"{v} = data[pos + 1 : e].decode()")
        w.emit("except UnicodeDecodeError:")
        with w.indent():
            w.emit(f"_bad_text({label!r}, e > end)")
    w.emit("else:")
    with w.indent():
        w.emit(f"s, e = _text_head(data, pos, {label!r}, {spec.limit}, {spec.nonempty})")
        w.emit("if e > end:")
        with w.indent():
            w.emit("_truncated()")
        w.emit("try:")
        with w.indent():
            w.emit(f"{v} = data[s:e].decode()")
        w.emit("except UnicodeDecodeError:")
        with w.indent():
            w.emit(f"_bad_text({label!r}, False)")
    w.emit("pos = e")


def _gen_decode_bytes(w: _Writer, v: str, label: str) -> None:
    # as for text: heads with a length below 256 are clipped, not bounds-checked
    w.emit("b = data[pos]")
    w.emit("if b == 0x58:")
    with w.indent():
        w.emit("e = pos + 2 + data[pos + 1]")
        w.emit("if e < pos + 26:")
        with w.indent():
            w.emit(f"_nonminimal({label!r})")
        w.emit(f"{v} = data[pos + 2 : e]")
    w.emit("elif 0x40 <= b <= 0x57:")
    with w.indent():
        w.emit("e = pos + b - 0x3F")
        w.emit(f"{v} = data[pos + 1 : e]")
    w.emit("else:")
    with w.indent():
        w.emit(f"s, e = _bytes_head(data, pos, {label!r})")
        w.emit("if e > end:")
        with w.indent():
            w.emit("_truncated()")
        w.emit(f"{v} = data[s:e]")
    w.emit("pos = e")


def _gen_decode_array_head(w: _Writer, spec: FieldSpec, n: str, label: str) -> None:
    w.emit("b = data[pos]")
    w.emit("if 0x80 <= b <= 0x97:")
    with w.indent():
        w.emit(f"{n} = b - 0x80")
        w.emit("pos += 1")
    w.emit("else:")
    with w.indent():
        w.emit(f"{n}, pos = _array_head(data, pos, {label!r}, {spec.limit})")
    if spec.nonempty:
        w.emit(f"if not {n}:")
        with w.indent():
            w.emit(f"raise InvalidField({label!r}, 'empty')")


def _gen_decode_field(w: _Writer, spec: FieldSpec, v: str, label: str) -> None:
    kind = spec.kind
    if kind is Kind.UINT:
        _gen_decode_uint(w, v, label)
    elif kind is Kind.TEXT:
        _gen_decode_text(w, spec, v, label)
    elif kind is Kind.BYTES:
        _gen_decode_bytes(w, v, label)
    elif kind is Kind.BOOL:
        w.emit("b = data[pos]")
        w.emit("if b == 0xF5:")
        with w.indent():
            w.emit(f"{v} = True")
        w.emit("elif b == 0xF4:")
        with w.indent():
            w.emit(f"{v} = False")
        w.emit("else:")
        with w.indent():
            w.emit(f"_bad(data, pos, {label!r}, 'bool')")
        w.emit("pos += 1")
    elif kind is Kind.CODE:
        w.emit("b = data[pos]")
        w.emit(f"if b < {len(_CODES)}:")
        with w.indent():
            w.emit(f"{v} = _CODES[b]")
        w.emit("else:")
        with w.indent():
            w.emit(f"_bad_code(data, pos, {label!r})")
        w.emit("pos += 1")
    elif kind is Kind.PAIRS:
        n, items = w.fresh("n"), w.fresh("items")
        conv, seq = w.fresh("conv"), w.fresh("seq")
        _gen_decode_array_head(w, spec, n, label)
        w.emit(f"{items} = []")
        w.emit(f"for _ in range({n}):")
        with w.indent():
            w.emit("if data[pos] != 0x82:")
            with w.indent():
                w.emit(f"_bad_struct(data, pos, {label + ' entry'!r}, 2, 2)")
            w.emit("pos += 1")
            conv_spec = FieldSpec("conv", Kind.TEXT, MAX_ID_BYTES, nonempty=True)
            _gen_decode_text(w, conv_spec, conv, label + ".conv")
            _gen_decode_uint(w, seq, label + ".seq")
            w.emit(f"{items}.append(({conv}, {seq}))")
        w.emit(f"{v} = tuple({items})")
    else:
        assert kind is Kind.ARRAY and spec.item is not None
        n, items, obj = w.fresh("n"), w.fresh("items"), w.fresh("obj")
        _gen_decode_array_head(w, spec, n, label)
        w.emit(f"{items} = []")
        w.emit(f"for _ in range({n}):")
        with w.indent():
            _gen_decode_struct(w, spec.item, obj, label + ".")
            w.emit(f"{items}.append({obj})")
        w.emit(f"{v} = tuple({items})")


def _gen_decoder(cls: type) -> list[str]:
    w = _Writer()
    w.emit("end = len(data)")
    w.emit("pos = 0")
    w.emit("try:")
    with w.indent():
        _gen_decode_struct(w, cls, "msg", "")
    w.emit("except (IndexError, _struct_error):")
    with w.indent():
        w.emit("raise MalformedBody('truncated body') from None")
    w.emit("if pos != end:")
    with w.indent():
        w.emit("_trailing(pos, end)")
    w.emit("return msg")
    return [f"def decode_{cls.__name__}(data):", *w.lines]


def _changed(spec: FieldSpec, v: str, default: object) -> str:
    """Condition under which an optional field differs from its default (so is sent)."""
    if spec.kind is Kind.CODE:
        return f"{v} != {default!r} or type({v}) not in _CODE_TYPES"
    pytype = {
        Kind.UINT: "int",
        Kind.BOOL: "bool",
        Kind.TEXT: "str",
        Kind.BYTES: "bytes",
        Kind.PAIRS: "tuple",
        Kind.ARRAY: "tuple",
    }[spec.kind]
    return f"{v} != {default!r} or type({v}) is not {pytype}"


def _gen_encode_struct(w: _Writer, cls: type, m: str, prefix: str) -> None:
    """Emit code appending the CBOR of ``cls`` instance ``m`` to the parts list."""
    specs = SCHEMA[cls]
    least, most = required_count(cls), len(specs)
    dflts = defaults(cls)
    values = []
    for spec in specs:
        v = w.fresh(f"v_{spec.name}")
        values.append(v)
        w.emit(f"{v} = {m}.{spec.name}")
    nf = w.fresh("nf")
    if least == most:
        w.emit(f"ap({_ARRAY_HEADS[most]!r})")
    else:
        keyword = "if"
        for i in range(most - 1, least - 1, -1):
            w.emit(f"{keyword} {_changed(specs[i], values[i], dflts[i])}:")
            with w.indent():
                w.emit(f"{nf} = {i + 1}")
            keyword = "elif"
        w.emit("else:")
        with w.indent():
            w.emit(f"{nf} = {least}")
        w.emit(f"ap(_ARRAY_HEADS[{nf}])")
    for i, (spec, v) in enumerate(zip(specs, values, strict=True)):
        label = prefix + spec.name
        if i < least:
            _gen_encode_field(w, spec, v, label)
        else:
            w.emit(f"if {nf} > {i}:")
            with w.indent():
                _gen_encode_field(w, spec, v, label)


def _gen_encode_uint(w: _Writer, v: str, label: str) -> None:
    w.emit(f"if type({v}) is not int or not 0 <= {v} <= {MAX_UINT}:")
    with w.indent():
        w.emit(f"_lbad({label!r}, {v}, 'an int in [0, 2**63 - 1]')")
    w.emit(f"if {v} < 256:")
    with w.indent():
        w.emit(f"ap(_UINT_HEADS[{v}])")
    w.emit(f"elif {v} <= 0xFFFF:")
    with w.indent():
        w.emit(f"ap(_p16(0x19, {v}))")
    w.emit(f"elif {v} <= 0xFFFFFFFF:")
    with w.indent():
        w.emit(f"ap(_p32(0x1A, {v}))")
    w.emit("else:")
    with w.indent():
        w.emit(f"ap(_p64(0x1B, {v}))")


def _gen_encode_text(w: _Writer, spec: FieldSpec, v: str, label: str) -> None:
    t = w.fresh("t")
    w.emit(f"if type({v}) is not str:")
    with w.indent():
        w.emit(f"_lbad({label!r}, {v}, 'str')")
    w.emit("try:")
    with w.indent():
        w.emit(f"{t} = {v}.encode()")
    w.emit("except UnicodeEncodeError:")
    with w.indent():
        w.emit(f"_lbad({label!r}, {v}, 'a str encodable as UTF-8')")
    w.emit(f"n = len({t})")
    lowest = 1 if spec.nonempty else 0
    w.emit(f"if not {lowest} <= n <= {spec.limit}:")
    with w.indent():
        span = f"{lowest} to {spec.limit}"
        w.emit(f"_lbad({label!r}, {v}, 'a str of {span} UTF-8 bytes')")
    w.emit("ap(_TEXT_HEADS[n] if n < 256 else _p16(0x79, n))")
    w.emit(f"ap({t})")


def _gen_encode_field(w: _Writer, spec: FieldSpec, v: str, label: str) -> None:
    kind = spec.kind
    if kind is Kind.UINT:
        _gen_encode_uint(w, v, label)
    elif kind is Kind.TEXT:
        _gen_encode_text(w, spec, v, label)
    elif kind is Kind.BYTES:
        w.emit(f"if type({v}) is not bytes:")
        with w.indent():
            w.emit(f"_lbad({label!r}, {v}, 'bytes')")
        w.emit(f"n = len({v})")
        w.emit("if n < 256:")
        with w.indent():
            w.emit("ap(_BYTES_HEADS[n])")
        w.emit("elif n <= 0xFFFF:")
        with w.indent():
            w.emit("ap(_p16(0x59, n))")
        w.emit(f"elif n <= {MAX_FRAME_SIZE_LIMIT}:")
        with w.indent():
            w.emit("ap(_p32(0x5A, n))")
        w.emit("else:")
        with w.indent():
            w.emit(f"_lbad({label!r}, n, 'at most 2**32 - 1 bytes')")
        w.emit(f"ap({v})")
    elif kind is Kind.BOOL:
        w.emit(f"if {v} is True:")
        with w.indent():
            w.emit("ap(b'\\xf5')")
        w.emit(f"elif {v} is False:")
        with w.indent():
            w.emit("ap(b'\\xf4')")
        w.emit("else:")
        with w.indent():
            w.emit(f"_lbad({label!r}, {v}, 'a bool')")
    elif kind is Kind.CODE:
        w.emit(f"if type({v}) not in _CODE_TYPES or {v} not in _CODE_VALUES:")
        with w.indent():
            w.emit(f"_lbad({label!r}, {v}, 'an ErrorCode')")
        w.emit(f"ap(_UINT_HEADS[{v}])")
    else:
        item = w.fresh("item")
        what = "(str, int) pairs" if kind is Kind.PAIRS else f"{spec.item.__name__}s"  # type: ignore[union-attr]
        w.emit(f"if type({v}) is not tuple:")
        with w.indent():
            w.emit(f"_lbad({label!r}, {v}, 'a tuple of {what}')")
        w.emit(f"n = len({v})")
        lowest = 1 if spec.nonempty else 0
        w.emit(f"if not {lowest} <= n <= {spec.limit}:")
        with w.indent():
            w.emit(f"_lbad({label!r}, n, '{lowest} to {spec.limit} entries')")
        w.emit("ap(_array_head_bytes(n))")
        w.emit(f"for {item} in {v}:")
        with w.indent():
            if kind is Kind.PAIRS:
                conv, seq = w.fresh("conv"), w.fresh("seq")
                w.emit(f"if type({item}) is not tuple or len({item}) != 2:")
                with w.indent():
                    w.emit(f"_lbad({label!r}, {item}, 'a (str, int) pair')")
                w.emit(f"{conv}, {seq} = {item}")
                w.emit("ap(b'\\x82')")
                conv_spec = FieldSpec("conv", Kind.TEXT, MAX_ID_BYTES, nonempty=True)
                _gen_encode_text(w, conv_spec, conv, label + ".conv")
                _gen_encode_uint(w, seq, label + ".seq")
            else:
                assert spec.item is not None
                name = spec.item.__name__
                w.emit(f"if type({item}) is not {name}:")
                with w.indent():
                    w.emit(f"_lbad({label!r}, {item}, 'a {name}')")
                _gen_encode_struct(w, spec.item, item, label + ".")


def _gen_encoder(cls: type) -> list[str]:
    w = _Writer()
    w.emit("parts = []")
    w.emit("ap = parts.append")
    _gen_encode_struct(w, cls, "m", "")
    w.emit("return b''.join(parts)")
    return [f"def encode_{cls.__name__}(m):", *w.lines]


def _namespace() -> dict[str, object]:
    ns: dict[str, object] = {
        name: value
        for name, value in globals().items()
        if name.startswith("_") and not name.startswith("__")
    }
    ns.update(
        InvalidField=InvalidField,
        MalformedBody=MalformedBody,
        ErrorCode=ErrorCode,
        _new=object.__new__,
        _struct_error=struct.error,
    )
    for cls in SCHEMA:
        ns[cls.__name__] = cls
        for a in attrs.fields(cls):
            # slotted attrs classes: set each slot through its member descriptor,
            # ~35 ns per field instead of ~90 ns through the frozen __init__
            ns[_setter(cls, a.name)] = cls.__dict__[a.name].__set__
    return ns


def _compile() -> tuple[
    dict[str, str],
    dict[type, Callable[[object], bytes]],
    dict[type, Callable[[bytes], Message]],
]:
    sources: dict[str, str] = {}
    encoders: dict[type, Callable[[object], bytes]] = {}
    decoders: dict[type, Callable[[bytes], Message]] = {}
    ns = _namespace()
    for cls in SCHEMA:
        name = cls.__name__
        src = "\n".join([*_gen_decoder(cls), "", *_gen_encoder(cls)]) + "\n"
        sources[name] = src
        exec(compile(src, f"<tests.compat.v1.protocol codec {name}>", "exec"), ns)
        decoders[cls] = ns[f"decode_{name}"]  # type: ignore[assignment]
        encoders[cls] = ns[f"encode_{name}"]  # type: ignore[assignment]
    return sources, encoders, decoders


#: class name -> the generated Python source of its decoder and encoder.
SOURCES: dict[str, str]
_ENCODERS: dict[type, Callable[[object], bytes]]
_DECODERS: dict[type, Callable[[bytes], Message]]
SOURCES, _ENCODERS, _DECODERS = _compile()

def _unknown_frame_type(frame_type: int) -> Callable[[bytes], Message]:
    def refuse(body: bytes) -> Message:
        raise BadHeader(f"unknown frame type {frame_type}")

    return refuse


#: frame type value (0..255) -> body decoder (one that raises BadHeader for values
#: that are no frame type).
BODY_DECODERS: Final[tuple[Callable[[bytes], Message], ...]] = tuple(
    _DECODERS[SENDERS[FrameType(t)][0]] if t in _FRAME_TYPE_NAMES else _unknown_frame_type(t)
    for t in range(256)
)
#: message class -> (frame type value, body encoder).
FRAME_ENCODERS: Final[dict[type, tuple[int, Callable[[object], bytes]]]] = {
    cls: (int(ft), _ENCODERS[cls]) for cls, ft in FRAME_TYPE_OF.items()
}

_lz4_compress: Final = lz4.block.compress
_lz4_decompress: Final = lz4.block.decompress
_LZ4Error: Final = lz4.block.LZ4BlockError


# --- public codec functions ---------------------------------------------------------------


def encode_body(message: Message) -> bytes:
    """The CBOR body of ``message`` (no header, never compressed). O(encoded size).

    Trailing fields equal to their default are left out. Raises
    :class:`LocalProtocolError` if ``message`` is not a protocol message or a field
    is of the wrong type, out of range, empty where required or over its limit.

    >>> from tests.compat.v1.protocol import Ping
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
        name = _FRAME_TYPE_NAMES.get(frame_type, str(frame_type))
        raise LocalProtocolError(
            f"{name} body of {n} bytes exceeds max_frame_size={max_frame_size}"
        )
    if compress_threshold is not None and n >= compress_threshold:
        packed: bytes = _lz4_compress(body, store_size=True)
        if len(packed) < n:
            return pack_header(MAGIC_VERSION, frame_type, FLAG_LZ4, len(packed)) + packed
    return pack_header(MAGIC_VERSION, frame_type, 0, n) + body


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
    :class:`~tests.compat.v1.protocol.Connection`'s job.

    >>> from tests.compat.v1.protocol import Ping
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


def decode(
    frame: bytes | bytearray | memoryview, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> Message:
    """Decode exactly one whole frame (no role check). O(len(frame)).

    Raises :class:`TruncatedFrame` if ``frame`` is shorter than its header says,
    :class:`MalformedBody` if bytes follow the frame, and the other
    :class:`~imkit.errors.RemoteProtocolError` subclasses for a bad header or
    body. No other exception escapes.

    >>> from tests.compat.v1.protocol import Ping
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
