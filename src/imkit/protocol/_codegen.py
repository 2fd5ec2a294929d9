"""The code generator: one strict decoder and one encoder per message class.

Why generated code. The decoder is the hot path of every gateway and client, and
it must be *strict*: only the CBOR subset the schema uses (uint, text, bytes,
array, false, true), shortest-form heads, no tags, maps, floats or
indefinite-length items, declared lengths checked against the limit and against
the bytes left before anything is sliced, nothing after the item. Up to
``MAX_EXTRA_FIELDS`` trailing fields a newer protocol version added are checked
for that subset (bounded in nesting and entries) and skipped. A generic CBOR
decoder followed by a validator walks every item twice; ``cbor2``'s C decoder
would also silently accept tags (a bignum is an int to it), shared references,
non-minimal heads and trailing bytes. So, like ``attrs`` and ``dataclasses``
generate ``__init__``, this module writes one straight-line decoder and one
encoder per message class from :data:`~imkit.protocol._schema.SCHEMA`, and
:func:`compile_codecs` compiles them once, at import of
:mod:`imkit.protocol._codec`: every field is read by a few inlined comparisons
and one slice, nested pushes of a batch are decoded inline in the loop, and the
decoded message is built through its slot descriptors (no ``__init__`` call).
The common case of each field is inlined; the rest calls the run-time helpers of
:mod:`imkit.protocol._cbor`, whose ``_`` names are the generated code's globals.
The benchmark (``benchmarks/bench_protocol.py``) compares it with
``cbor2.loads`` plus the same validation.

Generation is O(size of the schema) and runs once per process; nothing here is
on the hot path.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import attrs

from imkit.errors import InvalidField, MalformedBody
from imkit.protocol import _cbor
from imkit.protocol._limits import MAX_FRAME_SIZE_LIMIT, MAX_ID_BYTES, MAX_UINT
from imkit.protocol._messages import ErrorCode, Message
from imkit.protocol._schema import SCHEMA, FieldSpec, Kind, defaults, required_count

__all__ = ["compile_codecs"]

_CODES = _cbor._CODES
_ARRAY_HEADS = _cbor._ARRAY_HEADS


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
        w.emit(f"if b == {0x80 + most}:")
    else:
        w.emit(f"if {0x80 + least} <= b <= {0x80 + most}:")
    with w.indent():
        w.emit(f"{nf} = b - 0x80")
        w.emit("pos += 1")
    w.emit("else:")
    with w.indent():
        # more fields than this version knows (skipped below), or a bad head
        w.emit(f"{nf}, pos = _struct_head(data, pos, {name!r}, {least}, {most})")
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
    w.emit(f"if {nf} > {most}:")
    with w.indent():
        w.emit(f"pos = _skip_fields(data, pos, end, {nf} - {most}, {prefix + name!r})")
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
    """The globals of the generated code: the run-time helpers and the message classes."""
    ns: dict[str, object] = {
        name: value
        for name, value in vars(_cbor).items()
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


def compile_codecs() -> tuple[
    dict[str, str],
    dict[type, Callable[[object], bytes]],
    dict[type, Callable[[bytes], Message]],
]:
    """Generate and compile every message class's codec. O(size of the schema).

    Returns ``(sources, encoders, decoders)``: class name -> generated source,
    class -> ``encode_<Name>(message) -> bytes``, class -> ``decode_<Name>(body)
    -> message``.
    """
    sources: dict[str, str] = {}
    encoders: dict[type, Callable[[object], bytes]] = {}
    decoders: dict[type, Callable[[bytes], Message]] = {}
    ns = _namespace()
    for cls in SCHEMA:
        name = cls.__name__
        src = "\n".join([*_gen_decoder(cls), "", *_gen_encoder(cls)]) + "\n"
        sources[name] = src
        exec(compile(src, f"<imkit.protocol codec {name}>", "exec"), ns)
        decoders[cls] = ns[f"decode_{name}"]  # type: ignore[assignment]
        encoders[cls] = ns[f"encode_{name}"]  # type: ignore[assignment]
    return sources, encoders, decoders
