"""The wire schema: for every message class, its fields in wire order with kind and limit.

This table is the single source the codec is generated from (see ``_codec.py``),
the doc's field lists are written from, and the test strategies draw from. It adds
to the attrs classes of ``_messages.py`` what a wire needs and Python types do not
say: the CBOR kind of each field, its byte or item limit, and whether it may be
empty. Field names and order must match the attrs classes exactly; ``_check_schema``
asserts that at import time, so a field added to a message without a schema entry
fails loudly instead of being dropped from the wire.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import attrs

from tests.compat.v1.protocol._limits import (
    MAX_ID_BYTES,
    MAX_ITEMS,
    MAX_REASON_BYTES,
    MAX_TOKEN_BYTES,
)
from tests.compat.v1.protocol._messages import (
    SENDERS,
    Error,
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
)


class Kind(enum.Enum):
    """The CBOR shape of a field."""

    UINT = "uint"  # major type 0, 0 <= x <= MAX_UINT, shortest form
    BOOL = "bool"  # simple values false (0xf4) / true (0xf5)
    TEXT = "text"  # major type 3, UTF-8, at most ``limit`` bytes
    BYTES = "bytes"  # major type 2, bounded only by the frame size
    CODE = "code"  # a uint that must be an ErrorCode value; decoded to the ErrorCode
    PAIRS = "pairs"  # array of [text id, uint] 2-arrays: tuple[tuple[str, int], ...]
    ARRAY = "array"  # array of nested structs (``item``): tuple[Push, ...] etc.


@dataclass(frozen=True)
class FieldSpec:
    """One field of a message on the wire.

    ``limit``: UTF-8 bytes for TEXT, entries for PAIRS / ARRAY, unused otherwise.
    ``nonempty``: an empty string or tuple is refused (required ids, batches).
    ``item``: the nested message class of an ARRAY field.
    """

    name: str
    kind: Kind
    limit: int = 0
    nonempty: bool = False
    item: type | None = None


def _uint(name: str) -> FieldSpec:
    return FieldSpec(name, Kind.UINT)


def _bool(name: str) -> FieldSpec:
    return FieldSpec(name, Kind.BOOL)


def _id(name: str, *, required: bool = True) -> FieldSpec:
    return FieldSpec(name, Kind.TEXT, MAX_ID_BYTES, nonempty=required)


_KICK_FIELDS = (
    FieldSpec("code", Kind.CODE),
    FieldSpec("reason", Kind.TEXT, MAX_REASON_BYTES),
    _uint("retry_after_ms"),
)

#: message class -> its fields in wire order. SyncPage is a nested struct only.
SCHEMA: dict[type, tuple[FieldSpec, ...]] = {
    Login: (
        FieldSpec("token", Kind.TEXT, MAX_TOKEN_BYTES, nonempty=True),
        _id("device"),
        _id("resume", required=False),
    ),
    LoginAck: (
        _id("uid"),
        _id("session"),
        _bool("resumed"),
        _uint("heartbeat_ms"),
        _uint("reconnect_min_ms"),
        _uint("reconnect_max_ms"),
        _uint("server_ms"),
    ),
    Ping: (_uint("nonce"),),
    Pong: (_uint("nonce"), _uint("server_ms")),
    Send: (_uint("cid"), _id("conv"), FieldSpec("body", Kind.BYTES), _uint("client_ms")),
    SendAck: (
        _uint("cid"),
        _id("conv"),
        _uint("seq"),
        _uint("msg_id"),
        _uint("server_ms"),
        FieldSpec("error", Kind.CODE),
    ),
    Push: (
        _id("conv"),
        _uint("seq"),
        _id("sender"),
        FieldSpec("body", Kind.BYTES),
        _uint("msg_id"),
        _uint("server_ms"),
    ),
    PushBatch: (FieldSpec("pushes", Kind.ARRAY, MAX_ITEMS, nonempty=True, item=Push),),
    PushAck: (_id("conv"), _uint("seq"), _bool("cumulative")),
    SyncRequest: (_uint("req_id"), FieldSpec("after", Kind.PAIRS, MAX_ITEMS), _uint("limit")),
    SyncPage: (
        _id("conv"),
        FieldSpec("messages", Kind.ARRAY, MAX_ITEMS, item=Push),
        _bool("more"),
    ),
    SyncResponse: (_uint("req_id"), FieldSpec("pages", Kind.ARRAY, MAX_ITEMS, item=SyncPage)),
    Notify: (FieldSpec("entries", Kind.PAIRS, MAX_ITEMS, nonempty=True),),
    Receipt: (_id("conv"), _uint("seq"), _id("reader", required=False)),
    Kick: _KICK_FIELDS,
    Error: _KICK_FIELDS,
}

#: message class -> its frame type (the inverse of SENDERS' first column).
FRAME_TYPE_OF: dict[type[Message], FrameType] = {cls: ft for ft, (cls, _) in SENDERS.items()}


def required_count(cls: type) -> int:
    """Number of leading fields without a default (always present on the wire). O(fields)."""
    return sum(1 for f in attrs.fields(cls) if f.default is attrs.NOTHING)


def defaults(cls: type) -> tuple[object, ...]:
    """Default of every field in order (``attrs.NOTHING`` for required ones). O(fields)."""
    return tuple(f.default for f in attrs.fields(cls))


def _check_schema() -> None:
    """Assert that SCHEMA matches the attrs classes field for field. O(total fields)."""
    for cls, specs in SCHEMA.items():
        names = tuple(f.name for f in attrs.fields(cls))
        assert names == tuple(s.name for s in specs), f"{cls.__name__}: schema {specs} vs {names}"
        fields = attrs.fields(cls)
        seen_default = False
        for f in fields:
            assert not (seen_default and f.default is attrs.NOTHING), f"{cls.__name__}.{f.name}"
            seen_default = seen_default or f.default is not attrs.NOTHING
        for s in specs:
            if s.kind is Kind.TEXT:
                # the decoder's one-byte fast path (lengths 0..23) skips the limit check
                assert s.limit >= 23, f"{cls.__name__}.{s.name}: limit below 23"
            if s.kind is Kind.ARRAY:
                assert s.item in SCHEMA, f"{cls.__name__}.{s.name}: unknown item {s.item}"
    assert set(FRAME_TYPE_OF) | {SyncPage} == set(SCHEMA), "a message class lacks a schema"
    assert len(SCHEMA) < 24


_check_schema()
