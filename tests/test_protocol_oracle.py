"""A deliberately simple reference decoder for imkit's wire format, and its sanity tests.

The oracle is written from docs/protocol.md, independently of the generated codec:
``cbor2.loads`` the body, require that ``cbor2.dumps`` gives the very same bytes
back (this refuses trailing bytes, tags, non-shortest heads, indefinite lengths and
floats in one stroke: cbor2 writes only the shortest definite forms), then check
every field with a plain per-field rule table. It is slow and obviously right;
the codec tests compare the fast decoder with it.

    from tests.test_protocol_oracle import Reject, reference_decode_body
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cbor2
import lz4.block
from hypothesis import given

from imkit.protocol import (
    SENDERS,
    Error,
    ErrorCode,
    FrameType,
    Kick,
    Login,
    LoginAck,
    Message,
    Notify,
    Ping,
    Pong,
    Push,
    PushAck,
    PushBatch,
    Receipt,
    Send,
    SendAck,
    SyncPage,
    SyncRequest,
    SyncResponse,
    encode,
    encode_body,
)
from tests.strategies import messages

__all__ = ["Reject", "reference_decode_body", "reference_decode_frame"]

UINT_LIMIT = 2**63  # exclusive
ITEMS = 1024


class Reject(Exception):
    """The oracle refuses the input."""


Rule = Callable[[Any], Any]


def _uint(v: Any) -> int:
    if type(v) is not int or not 0 <= v < UINT_LIMIT:
        raise Reject(f"not a uint: {v!r}")
    return v


def _text(limit: int, *, nonempty: bool) -> Rule:
    def rule(v: Any) -> str:
        if type(v) is not str or len(v.encode()) > limit or (nonempty and not v):
            raise Reject(f"bad text {v!r}")
        return v

    return rule


def _bytes(v: Any) -> bytes:
    if type(v) is not bytes:
        raise Reject("not bytes")
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise Reject("not a bool")
    return v


def _code(v: Any) -> ErrorCode:
    if type(v) is not int or v not in {int(c) for c in ErrorCode}:
        raise Reject(f"not an error code: {v!r}")
    return ErrorCode(v)


def _list(v: Any, *, nonempty: bool) -> list[Any]:
    if type(v) is not list or len(v) > ITEMS or (nonempty and not v):
        raise Reject("bad list")
    return v


def _pairs(*, nonempty: bool) -> Rule:
    def rule(v: Any) -> tuple[tuple[str, int], ...]:
        out = []
        for pair in _list(v, nonempty=nonempty):
            if type(pair) is not list or len(pair) != 2:
                raise Reject("bad pair")
            out.append((ID(pair[0]), _uint(pair[1])))
        return tuple(out)

    return rule


def _structs(cls: type, *, nonempty: bool) -> Rule:
    def rule(v: Any) -> tuple[Any, ...]:
        return tuple(_build(cls, item) for item in _list(v, nonempty=nonempty))

    return rule


ID = _text(128, nonempty=True)
OPTIONAL_ID = _text(128, nonempty=False)
REASON = _text(256, nonempty=False)

#: class -> [(field, rule, default or REQUIRED)] in wire order, from docs/protocol.md
REQUIRED = object()
FIELDS: dict[type, list[tuple[str, Rule, object]]] = {
    Login: [
        ("token", _text(1024, nonempty=True), REQUIRED),
        ("device", ID, REQUIRED),
        ("resume", OPTIONAL_ID, ""),
        ("min_version", _uint, 1),
        ("max_version", _uint, 1),
    ],
    LoginAck: [
        ("uid", ID, REQUIRED),
        ("session", ID, REQUIRED),
        ("resumed", _bool, False),
        ("heartbeat_ms", _uint, 30_000),
        ("reconnect_min_ms", _uint, 500),
        ("reconnect_max_ms", _uint, 30_000),
        ("server_ms", _uint, 0),
        ("version", _uint, 1),
        ("max_frames_per_s", _uint, 0),
        ("frame_burst", _uint, 0),
        ("max_sends_in_flight", _uint, 0),
    ],
    Ping: [("nonce", _uint, 0)],
    Pong: [("nonce", _uint, 0), ("server_ms", _uint, 0)],
    Send: [("cid", _uint, REQUIRED), ("conv", ID, REQUIRED), ("body", _bytes, REQUIRED),
           ("client_ms", _uint, 0)],
    SendAck: [
        ("cid", _uint, REQUIRED),
        ("conv", ID, REQUIRED),
        ("seq", _uint, 0),
        ("msg_id", _uint, 0),
        ("server_ms", _uint, 0),
        ("error", _code, ErrorCode.OK),
        ("retry_after_ms", _uint, 0),
    ],
    Push: [
        ("conv", ID, REQUIRED),
        ("seq", _uint, REQUIRED),
        ("sender", ID, REQUIRED),
        ("body", _bytes, REQUIRED),
        ("msg_id", _uint, 0),
        ("server_ms", _uint, 0),
    ],
    PushBatch: [("pushes", _structs(Push, nonempty=True), REQUIRED)],
    PushAck: [("conv", ID, REQUIRED), ("seq", _uint, REQUIRED), ("cumulative", _bool, True)],
    SyncRequest: [
        ("req_id", _uint, REQUIRED),
        ("after", _pairs(nonempty=False), ()),
        ("limit", _uint, 100),
    ],
    SyncPage: [
        ("conv", ID, REQUIRED),
        ("messages", _structs(Push, nonempty=False), REQUIRED),
        ("more", _bool, False),
    ],
    SyncResponse: [("req_id", _uint, REQUIRED), ("pages", _structs(SyncPage, nonempty=False), ())],
    Notify: [("entries", _pairs(nonempty=True), REQUIRED)],
    Receipt: [("conv", ID, REQUIRED), ("seq", _uint, REQUIRED), ("reader", OPTIONAL_ID, "")],
    Kick: [("code", _code, REQUIRED), ("reason", REASON, ""), ("retry_after_ms", _uint, 0)],
    Error: [("code", _code, REQUIRED), ("reason", REASON, ""), ("retry_after_ms", _uint, 0)],
}


#: Unknown trailing fields a struct may carry, and array nesting inside one
#: (docs/protocol.md, "Unknown trailing fields").
EXTRA_FIELDS = 16
EXTRA_DEPTH = 2


def _unknown(v: Any, depth: int = 0) -> None:
    """An unknown field: any item of the wire subset, arrays nested at most EXTRA_DEPTH."""
    if type(v) is bool or type(v) is str or type(v) is bytes:
        return
    if type(v) is int:
        _uint(v)
        return
    if type(v) is list and len(v) <= ITEMS and depth < EXTRA_DEPTH:
        for x in v:
            _unknown(x, depth + 1)
        return
    raise Reject(f"unknown field {v!r} outside the wire subset")


def _build(cls: type, item: Any) -> Any:
    fields = FIELDS[cls]
    least = sum(1 for _, _, d in fields if d is REQUIRED)
    if type(item) is not list or not least <= len(item) <= len(fields) + EXTRA_FIELDS:
        raise Reject(f"{cls.__name__}: bad field count")
    kwargs = {}
    for i, (name, rule, default) in enumerate(fields):
        kwargs[name] = rule(item[i]) if i < len(item) else default
    for extra in item[len(fields) :]:
        _unknown(extra)
    return cls(**kwargs)


def reference_decode_body(frame_type: int, body: bytes) -> Message:
    """Decode a CBOR body the slow, obvious way; raise :class:`Reject` if invalid."""
    try:
        cls = SENDERS[FrameType(frame_type)][0]
    except ValueError:
        raise Reject("unknown frame type") from None
    try:
        item = cbor2.loads(body, allow_indefinite=False, max_depth=16)
        canonical = cbor2.dumps(item)
    except Exception as exc:  # anything cbor2 refuses, however it says so
        raise Reject(f"cbor2: {exc}") from None
    if canonical != body:
        raise Reject("not the canonical encoding of one item")
    message: Message = _build(cls, item)
    return message


def reference_decode_frame(frame: bytes, max_frame_size: int = 64 * 1024) -> Message:
    """Decode one whole frame the slow, obvious way; raise :class:`Reject` if invalid."""
    if len(frame) < 8 or frame[0] != 0xC1 or frame[1] != 1:
        raise Reject("bad header")
    frame_type, flags = frame[2], frame[3]
    length = int.from_bytes(frame[4:8], "big")
    if flags not in (0, 1) or not 0 < length <= max_frame_size or len(frame) != 8 + length:
        raise Reject("bad header")
    body = frame[8:]
    if flags:
        size = int.from_bytes(body[:4], "little")
        if len(body) <= 4 or not 0 < size <= max_frame_size:
            raise Reject("bad LZ4 size")
        try:
            body = lz4.block.decompress(body)
        except Exception:
            raise Reject("bad LZ4") from None
    return reference_decode_body(frame_type, body)


class TestOracle:
    """The oracle itself agrees with the documented format."""

    @given(messages)
    def test_accepts_what_encode_produces(self, message: Message) -> None:
        """Every valid message survives encode -> oracle decode."""
        frame_type = next(t for t, (c, _) in SENDERS.items() if c is type(message))
        assert reference_decode_body(frame_type, encode_body(message)) == message
        frame = encode(message, compress_threshold=16, max_frame_size=1 << 20)
        assert reference_decode_frame(frame, 1 << 20) == message

    def test_refuses_what_the_doc_forbids(self) -> None:
        """Trailing bytes, tags, long heads, floats, empty ids and negatives are refused."""
        ok = encode_body(Ping(nonce=5))
        assert reference_decode_body(FrameType.PING, ok) == Ping(nonce=5)
        for bad in (
            ok + b"\x00",  # trailing byte
            b"\x81\xc2\x41\x05",  # bignum tag around 5
            b"\x81\x18\x05",  # 5 in a two-byte head
            b"\x81\xf9\x7e\x00",  # NaN
            b"\x81\x20",  # -1
            b"\x9f\x05\xff",  # indefinite array
        ):
            try:
                reference_decode_body(FrameType.PING, bad)
            except Reject:
                continue
            raise AssertionError(f"oracle accepted {bad.hex()}")
