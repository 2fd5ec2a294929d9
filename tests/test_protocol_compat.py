"""The wire stays compatible: the frozen version 1 codec and this one, both directions.

``tests/compat/v1`` is the protocol as released with version 1 (read-only). For
every message type:

- v1 encoder -> new decoder: the same message, new fields at their defaults;
- new encoder -> v1 decoder: accepted, and the same message, whenever the new
  fields are at their defaults -- which ``downgrade(message, 1)`` guarantees, and
  is what a server does for a client that negotiated version 1;
- a v1 decoder refuses a message that carries a version 2 field (it refuses longer
  arrays): the compatibility promise for *unknown trailing fields* starts with
  version 2 decoders, which skip up to MAX_EXTRA_FIELDS of them;
- the new decoder skips well-formed unknown trailing fields in every struct (nested
  pushes and pages included) and still refuses everything outside the wire subset,
  exactly as the oracle does.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tests.compat.v1.protocol as v1
from imkit.errors import LocalProtocolError, RemoteProtocolError
from imkit.protocol import (
    MAX_EXTRA_FIELDS,
    MAX_ITEMS,
    MAX_UINT,
    PROTOCOL_VERSION,
    SENDERS,
    Login,
    LoginAck,
    Message,
    Ping,
    Push,
    PushBatch,
    SendAck,
    SyncPage,
    SyncResponse,
    decode,
    decode_body,
    downgrade,
    encode,
    encode_body,
)
from imkit.protocol._schema import SCHEMA, fields_since
from tests.strategies import messages as any_messages
from tests.test_protocol_oracle import Reject, reference_decode_body

FRAME_TYPE = {cls: int(ft) for ft, (cls, _) in SENDERS.items()}


def to_v1(m: Any) -> Any:
    """The v1 message with the same values (fields v1 does not have are dropped)."""
    cls = getattr(v1, type(m).__name__)
    kwargs = {}
    for f in attrs.fields(cls):
        value = getattr(m, f.name)
        if type(value) is tuple and value and attrs.has(type(value[0])):
            value = tuple(to_v1(x) for x in value)
        elif isinstance(value, enum.IntEnum):
            value = int(value)  # the frozen copy has its own ErrorCode class
        kwargs[f.name] = value
    return cls(**kwargs)


def from_v1(m: Any) -> Any:
    """The new message with the same values (new fields at their defaults)."""
    import imkit.protocol as new

    cls = getattr(new, type(m).__name__)
    kwargs = {}
    for f in attrs.fields(type(m)):
        value = getattr(m, f.name)
        if type(value) is tuple and value and attrs.has(type(value[0])):
            value = tuple(from_v1(x) for x in value)
        elif isinstance(value, enum.IntEnum):
            value = new.ErrorCode(int(value))
        kwargs[f.name] = value
    return cls(**kwargs)


#: Messages with their version 2 fields set to something else than the default.
#: Messages as a v1 peer can express them: every field added after v1 at its default.
messages: st.SearchStrategy[Message] = any_messages.map(lambda m: downgrade(m, 1))

v2_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Login,
        token=st.just("tok"),
        device=st.just("phone"),
        min_version=st.integers(1, 3),
        max_version=st.integers(2, 9),
    ),
    st.builds(
        LoginAck,
        uid=st.just("alice"),
        session=st.just("s1"),
        version=st.integers(2, 9),
        max_frames_per_s=st.integers(0, 10_000),
        frame_burst=st.integers(0, 10_000),
        max_sends_in_flight=st.integers(0, 1_000),
    ),
    st.builds(
        SendAck, cid=st.integers(1, 99), conv=st.just("c"), error=st.just(8),
        retry_after_ms=st.integers(1, MAX_UINT),
    ),
)


class TestBothDirections:
    @given(messages)
    def test_v1_encoder_to_new_decoder(self, m: Message) -> None:
        """Anything a deployed v1 peer sends decodes to the same message here."""
        frame = v1.encode(to_v1(m))
        assert decode(frame) == m

    @given(messages)
    def test_new_encoder_to_v1_decoder(self, m: Message) -> None:
        """With the new fields at their defaults, a v1 peer decodes the very same bytes."""
        frame = encode(m)
        assert frame == v1.encode(to_v1(m))
        assert from_v1(v1.decode(frame)) == m

    @given(v2_messages)
    def test_v1_decoders_refuse_v2_fields_and_downgrade_fixes_it(self, m: Message) -> None:
        """A v1 decoder refuses a v2 field (the promise starts at v2); downgrade(m, 1) is v1."""
        with pytest.raises(RemoteProtocolError):
            v1.decode(encode(m))
        old = downgrade(m, 1)
        assert from_v1(v1.decode(encode(old))) == old
        assert all(getattr(old, n) == getattr(type(m)(**_required(m)), n)
                   for n in fields_since(type(m), 1))

    def test_every_message_type_is_covered(self) -> None:
        """The frozen copy has every message class this release has (no type was added)."""
        assert {c.__name__ for c in SCHEMA} == {c.__name__ for c in v1._schema.SCHEMA}

    def test_downgrade(self) -> None:
        """downgrade keeps messages without newer fields, refuses nonsense versions."""
        ping = Ping(nonce=3)
        assert downgrade(ping, 1) is ping
        ack = LoginAck(uid="u", session="s", version=2, frame_burst=9)
        assert downgrade(ack, PROTOCOL_VERSION) is ack
        assert downgrade(ack, 1) == LoginAck(uid="u", session="s")
        with pytest.raises(LocalProtocolError):
            downgrade(ack, 0)
        with pytest.raises(LocalProtocolError):
            downgrade("not a message", 1)  # type: ignore[arg-type]


def _required(m: Message) -> dict[str, Any]:
    return {
        f.name: getattr(m, f.name)
        for f in attrs.fields(type(m))
        if f.default is attrs.NOTHING
    }


# --- unknown trailing fields -------------------------------------------------------------

def _head(major: int, n: int) -> bytes:
    m = major << 5
    if n < 24:
        return bytes([m | n])
    if n < 256:
        return bytes([m | 24, n])
    if n < 65536:
        return bytes([m | 25]) + n.to_bytes(2, "big")
    if n < 2**32:
        return bytes([m | 26]) + n.to_bytes(4, "big")
    return bytes([m | 27]) + n.to_bytes(8, "big")


def _item(depth: int = 0) -> st.SearchStrategy[bytes]:
    """One well-formed CBOR item of the wire subset (arrays at most 2 deep)."""
    scalars = st.one_of(
        st.integers(0, MAX_UINT).map(lambda n: _head(0, n)),
        st.binary(max_size=30).map(lambda b: _head(2, len(b)) + b),
        st.text(max_size=20).map(lambda t: _head(3, len(t.encode())) + t.encode()),
        st.sampled_from([b"\xf4", b"\xf5"]),
    )
    if depth >= 1:
        return scalars
    return st.one_of(
        scalars,
        st.lists(_item(depth + 1), max_size=4).map(lambda xs: _head(4, len(xs)) + b"".join(xs)),
    )


@st.composite
def _extended(draw: st.DrawFn) -> tuple[Message, bytes]:
    """A message and its body with unknown trailing fields added to the top struct."""
    m = draw(messages)
    extras = draw(st.lists(_item(), min_size=1, max_size=MAX_EXTRA_FIELDS))
    # spell every field out, then append the extras (the head grows accordingly)
    n = len(SCHEMA[type(m)])
    full = _spelled_out(m)
    assert full[0] == 0x80 + n or full[:2] == bytes([0x98, n])
    rest = full[1:] if n < 24 else full[2:]
    return m, _head(4, n + len(extras)) + rest + b"".join(extras)


def _spelled_out(m: Message) -> bytes:
    """The body of ``m`` with every field of the top struct present (defaults too)."""
    body = encode_body(m)
    n = len(SCHEMA[type(m)])
    present = body[0] - 0x80
    if present == n:
        return body
    # encode each missing default as the encoder would if a later field differed
    import imkit.protocol._codec as codec

    tail = b""
    for spec, default in list(zip(SCHEMA[type(m)], _defaults(type(m)), strict=True))[present:]:
        tail += _encode_value(spec, default, codec)
    return _head(4, n) + body[1:] + tail


def _defaults(cls: type) -> list[Any]:
    return [f.default for f in attrs.fields(cls)]


def _encode_value(spec: Any, value: Any, codec: Any) -> bytes:
    kind: str = spec.kind.value
    if kind in ("uint", "code"):
        return _head(0, int(value))
    if kind == "bool":
        return b"\xf5" if value else b"\xf4"
    if kind == "text":
        raw: bytes = value.encode()
        return _head(3, len(raw)) + raw
    if kind == "bytes":
        data: bytes = value
        return _head(2, len(data)) + data
    assert value == ()
    return b"\x80"


class TestUnknownTrailingFields:
    @given(_extended())
    def test_skipped_and_the_oracle_agrees(self, case: tuple[Message, bytes]) -> None:
        """Up to MAX_EXTRA_FIELDS well-formed unknown fields are skipped: the same message."""
        m, body = case
        ft = FRAME_TYPE[type(m)]
        assert decode_body(ft, body) == m
        assert reference_decode_body(ft, body) == m

    def test_nested_pushes_and_pages_skip_them_too(self) -> None:
        """A Push inside a batch or a page may carry unknown fields (a future Push field)."""
        p = Push(conv="c", seq=1, sender="s", body=b"x", msg_id=2, server_ms=3)
        push = encode_body(p)
        assert push[0] == 0x86
        future_push = b"\x88" + push[1:] + b"\x01\x63abc"
        batch = b"\x81\x82" + future_push + push
        assert decode_body(FRAME_TYPE[PushBatch], batch) == PushBatch(pushes=(p, p))
        page = b"\x84\x61c\x81" + future_push + b"\xf4\x05"  # SyncPage + 1 unknown
        resp = b"\x82\x07\x81" + page
        expected = SyncResponse(req_id=7, pages=(SyncPage(conv="c", messages=(p,)),))
        assert decode_body(FRAME_TYPE[SyncResponse], resp) == expected
        assert reference_decode_body(FRAME_TYPE[SyncResponse], resp) == expected

    def test_limits(self) -> None:
        """16 unknown fields pass, 17 do not; an unknown array of MAX_ITEMS passes, +1 not."""
        base = encode_body(Ping(nonce=1))  # 81 01
        ok = _head(4, 1 + MAX_EXTRA_FIELDS) + b"\x01" + b"\x00" * MAX_EXTRA_FIELDS
        assert decode_body(FRAME_TYPE[Ping], ok) == Ping(nonce=1)
        too_many = _head(4, 2 + MAX_EXTRA_FIELDS) + b"\x01" + b"\x00" * (1 + MAX_EXTRA_FIELDS)
        with pytest.raises(RemoteProtocolError):
            decode_body(FRAME_TYPE[Ping], too_many)
        big = b"\x82\x01" + _head(4, MAX_ITEMS) + b"\x00" * MAX_ITEMS
        assert decode_body(FRAME_TYPE[Ping], big) == Ping(nonce=1)
        bigger = b"\x82\x01" + _head(4, MAX_ITEMS + 1) + b"\x00" * (MAX_ITEMS + 1)
        with pytest.raises(RemoteProtocolError):
            decode_body(FRAME_TYPE[Ping], bigger)
        with pytest.raises(Reject):
            reference_decode_body(FRAME_TYPE[Ping], bigger)
        assert base == b"\x81\x01"

    @given(st.binary(max_size=40))
    def test_garbage_after_the_known_fields(self, tail: bytes) -> None:
        """Any bytes as an unknown field: the fast decoder and the oracle agree."""
        body = b"\x82\x01" + tail
        try:
            fast: Message | None = decode_body(FRAME_TYPE[Ping], body)
        except RemoteProtocolError:
            fast = None
        try:
            slow: Message | None = reference_decode_body(FRAME_TYPE[Ping], body)
        except Reject:
            slow = None
        assert fast == slow

    def test_a_whole_frame_with_unknown_fields(self) -> None:
        """Through decode(): header and body, a LoginAck from a future version 3 server."""
        ack = LoginAck(uid="u", session="s", version=2, frame_burst=4)
        body = _spelled_out(ack)
        future = _head(4, len(SCHEMA[LoginAck]) + 2) + body[1:] + b"\x03\xf5"
        frame = bytes([0xC1, 1, 2, 0]) + len(future).to_bytes(4, "big") + future
        assert decode(frame) == ack
