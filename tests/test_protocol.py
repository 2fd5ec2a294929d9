"""Tests for imkit.protocol: the frame header, the strict CBOR codec, limits, the Connection.

The generated codec is compared with the plain reference decoder of
``tests/test_protocol_oracle.py``; the Connection with a model that parses the
whole received stream frame by frame (``model_events``). Fuzz-style tests (every
bad input of RELIABILITY.md, arbitrary bytes, mutations) are in
``tests/test_protocol_fuzz.py``.
"""

from __future__ import annotations

import contextlib
import doctest
import random
import struct
from typing import Any, cast

import attrs
import cbor2
import lz4.block
import pytest
from hypothesis import event as note_event
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import imkit.protocol
import imkit.protocol._codec
import imkit.protocol._connection
from imkit.errors import CapacityError, ConfigError
from imkit.protocol import (
    CLOSED,
    DEFAULT_MAX_FRAME_SIZE,
    MAX_ID_BYTES,
    MAX_ITEMS,
    MAX_REASON_BYTES,
    MAX_TOKEN_BYTES,
    MAX_UINT,
    NEED_DATA,
    SENDERS,
    BadHeader,
    Connection,
    ConnectionState,
    DecompressionError,
    Error,
    ErrorCode,
    Event,
    FrameTooLarge,
    FrameType,
    InvalidField,
    Kick,
    LocalProtocolError,
    Login,
    LoginAck,
    MalformedBody,
    Message,
    Notify,
    Ping,
    Pong,
    Push,
    PushAck,
    PushBatch,
    Receipt,
    RemoteProtocolError,
    Role,
    Send,
    SendAck,
    SyncPage,
    SyncRequest,
    SyncResponse,
    TruncatedFrame,
    UnexpectedFrame,
    decode,
    decode_body,
    encode,
    encode_body,
    encode_push_batch,
)
from imkit.protocol._schema import FRAME_TYPE_OF, SCHEMA
from tests.strategies import (
    client_messages,
    ids,
    messages,
    messages_of,
    pushes,
    server_messages,
)
from tests.test_protocol_oracle import Reject, reference_decode_body, reference_decode_frame

ALL_CLASSES = list(FRAME_TYPE_OF)
BIG = 1 << 20  # a max_frame_size that no generated message reaches


def frame_type_of(message: Message) -> FrameType:
    return FRAME_TYPE_OF[type(message)]


def header(
    frame_type: int, length: int, *, flags: int = 0, magic: int = 0xC1, version: int = 1
) -> bytes:
    return struct.pack(">BBBBI", magic, version, frame_type, flags, length)


def raw_frame(frame_type: int, body: bytes, *, flags: int = 0) -> bytes:
    return header(frame_type, len(body), flags=flags) + body


def sender_of(message: Message) -> Role:
    roles = SENDERS[frame_type_of(message)][1]
    return Role.CLIENT if Role.CLIENT in roles else Role.SERVER


def peer(role: Role) -> Role:
    return Role.SERVER if role is Role.CLIENT else Role.CLIENT


def drain(conn: Connection) -> list[Event]:
    """Every event up to and including NEED_DATA or CLOSED."""
    out: list[Event] = []
    while True:
        event = conn.next_event()
        out.append(event)
        conn._check()
        if event is NEED_DATA or event is CLOSED:
            return out


def test_doctests() -> None:
    """The examples in the docstrings hold."""
    for module in (imkit.protocol._codec, imkit.protocol._connection):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0


class TestRoundTrip:
    """Every valid message survives encode -> decode, identically to the oracle."""

    @pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
    @settings(max_examples=40)
    @given(data=st.data())
    def test_each_type(self, cls: type, data: st.DataObject) -> None:
        """decode(encode(m)) == m, the body is canonical CBOR and the oracle agrees."""
        message = data.draw(messages_of(cls))
        body = encode_body(message)
        assert decode_body(frame_type_of(message), body) == message
        assert reference_decode_body(frame_type_of(message), body) == message
        assert cbor2.dumps(cbor2.loads(body)) == body
        frame = encode(message, max_frame_size=BIG)
        assert decode(frame, max_frame_size=BIG) == message

    @given(messages)
    def test_trailing_defaults_are_omitted(self, message: Message) -> None:
        """The body array stops at the last field that differs from its default."""
        items = cbor2.loads(encode_body(message))
        fields = attrs.fields(type(message))
        values = [getattr(message, f.name) for f in fields]
        keep = len(fields)
        while keep and fields[keep - 1].default is not attrs.NOTHING and (
            values[keep - 1] == fields[keep - 1].default
        ):
            keep -= 1
        assert len(items) == keep

    @given(messages)
    def test_explicit_defaults_decode_too(self, message: Message) -> None:
        """A body that spells out every default decodes to the same message."""
        items = cbor2.loads(encode_body(message))
        fields = attrs.fields(type(message))
        full = [*items]
        for f in fields[len(items) :]:
            default = f.default
            full.append(int(default) if isinstance(default, ErrorCode) else default)
        full_body = cbor2.dumps(_as_cbor(full))
        assert decode_body(frame_type_of(message), full_body) == message

    @given(messages)
    def test_compressed_round_trip(self, message: Message) -> None:
        """With a threshold of 1 byte, frames that compress are sent compressed and decode."""
        frame = encode(message, compress_threshold=1, max_frame_size=BIG)
        if frame[3] & 1:
            assert len(frame) < len(encode(message, compress_threshold=None, max_frame_size=BIG))
        assert decode(frame, max_frame_size=BIG) == message

    @given(messages)
    def test_decoded_fields_have_exact_types(self, message: Message) -> None:
        """Decoded values are exactly str / int / bytes / bool / tuple, codes are ErrorCodes."""
        decoded = decode(encode(message, max_frame_size=BIG), max_frame_size=BIG)
        for f in attrs.fields(type(decoded)):
            value = getattr(decoded, f.name)
            original = getattr(message, f.name)
            if f.name in ("code", "error"):
                assert type(value) is ErrorCode
            elif type(original) is bool:
                assert type(value) is bool
            else:
                assert type(value) is type(original), f.name

    @given(st.lists(pushes, min_size=1, max_size=20))
    def test_encode_push_batch_matches_encode(self, batch: list[Push]) -> None:
        """encode_push_batch over pre-encoded pushes gives the frame encode() gives."""
        fast = encode_push_batch([encode_body(p) for p in batch], max_frame_size=BIG)
        assert fast == encode(PushBatch(pushes=tuple(batch)), max_frame_size=BIG)


def _as_cbor(value: Any) -> Any:
    """Python message values as cbor2 input (tuples become lists)."""
    if isinstance(value, tuple):
        return [_as_cbor(v) for v in value]
    if attrs.has(type(value)):
        return [_as_cbor(getattr(value, f.name)) for f in attrs.fields(type(value))]
    return value


class TestHeader:
    """The 8-byte header: layout and the order of its checks."""

    def test_layout(self) -> None:
        """Magic 0xC1, version 1, type, flags, big-endian u32 length, then the body."""
        frame = encode(Ping(nonce=7))
        assert frame == bytes([0xC1, 1, FrameType.PING, 0, 0, 0, 0, 2, 0x81, 0x07])

    def test_doc_example(self) -> None:
        """The annotated Push frame of docs/protocol.md is what encode() writes."""
        push = Push(
            conv="g:42", seq=1001, sender="alice", body="hi 你好".encode(), server_ms=1700000000000
        )
        assert encode(push).hex(" ") == (
            "c1 01 07 00 00 00 00 23 86 64 67 3a 34 32 19 03 e9 65 61 6c 69 63 65 "
            "49 68 69 20 e4 bd a0 e5 a5 bd 00 1b 00 00 01 8b cf e5 68 00"
        )
        assert encode(Ping()).hex(" ") == "c1 01 03 00 00 00 00 01 80"

    @pytest.mark.parametrize(
        ("head", "error"),
        [
            (header(1, 5, magic=0x47), BadHeader),  # 'G' of "GET "
            (header(1, 5, version=2), BadHeader),
            (header(0, 5), BadHeader),
            (header(16, 5), BadHeader),
            (header(255, 5), BadHeader),
            (header(1, 5, flags=2), BadHeader),
            (header(1, 5, flags=0x80), BadHeader),
            (header(1, 0), BadHeader),
            (header(1, DEFAULT_MAX_FRAME_SIZE + 1), FrameTooLarge),
            (header(1, 0xFFFF_FFFF), FrameTooLarge),
        ],
    )
    def test_bad_headers(self, head: bytes, error: type[Exception]) -> None:
        """Each bad header is refused by decode() and by a Connection from its 8 bytes."""
        with pytest.raises(error):
            decode(head + b"\x00" * 5)
        conn = Connection(Role.SERVER)
        conn.receive_data(head)
        with pytest.raises(error):
            conn.next_event()
        assert conn.state is ConnectionState.ERROR

    def test_too_large_carries_sizes(self) -> None:
        """FrameTooLarge says how large the frame claimed to be and the limit."""
        conn = Connection(Role.SERVER, max_frame_size=1000)
        conn.receive_data(header(FrameType.SEND, 0xFFFF_FFFF))
        with pytest.raises(FrameTooLarge) as info:
            conn.next_event()
        assert (info.value.size, info.value.max_size) == (0xFFFF_FFFF, 1000)

    @pytest.mark.parametrize(
        "first", [b"G", b"\x16", b"\x00", b"\xff", b"\xc1\x02", b"\xc1\x01\x00"]
    )
    def test_refused_before_the_header_is_complete(self, first: bytes) -> None:
        """A wrong magic, version or type is refused as soon as its byte arrives."""
        conn = Connection(Role.SERVER)
        conn.receive_data(first)
        with pytest.raises(BadHeader):
            conn.next_event()


class TestDecodeErrors:
    """Each way a body can be wrong raises its documented error (docs/protocol.md table)."""

    @pytest.mark.parametrize(
        ("frame_type", "body", "error"),
        [
            # not strict CBOR
            (FrameType.PING, b"\x81\x07\x00", MalformedBody),  # trailing byte
            (FrameType.PING, b"\x9f\x07\xff", MalformedBody),  # indefinite array
            (FrameType.PING, b"\x81\xc2\x41\x07", MalformedBody),  # bignum tag
            (FrameType.PING, b"\x81\xd8\x1c\x07", MalformedBody),  # shared-ref tag 28
            (FrameType.PING, b"\x81\xf9\x7e\x00", MalformedBody),  # NaN
            (FrameType.PING, b"\x81\xfb" + struct.pack(">d", 1.0), MalformedBody),  # double
            (FrameType.PING, b"\x81\xf6", MalformedBody),  # null
            (FrameType.PING, b"\x81\xa0", MalformedBody),  # a map
            (FrameType.PING, b"\x81\x1c", MalformedBody),  # reserved info 28
            (FrameType.PING, b"\x81\x18\x07", MalformedBody),  # 7 in a 2-byte head
            (FrameType.PING, b"\x81\x19\x00\x07", MalformedBody),
            (FrameType.PING, b"\x81\x1a\x00\x00\x00\x07", MalformedBody),
            (FrameType.PING, b"\x81\x1b" + (7).to_bytes(8, "big"), MalformedBody),
            (FrameType.PING, b"\x98\x12" + b"\x07" * 18, MalformedBody),  # 17 unknown fields
            (FrameType.PING, b"\x98\x02\x07\x07", MalformedBody),  # a non-shortest struct head
            (FrameType.PING, b"\x82\x07\xa0", MalformedBody),  # an unknown field: a map
            (FrameType.PING, b"\x82\x07\xc1\x01", MalformedBody),  # ... a tag
            (FrameType.PING, b"\x82\x07\xf6", MalformedBody),  # ... null
            (FrameType.PING, b"\x82\x07\xf9\x7e\x00", MalformedBody),  # ... a float
            (FrameType.PING, b"\x82\x07\x9f\xff", MalformedBody),  # ... indefinite
            (FrameType.PING, b"\x82\x07\x18\x05", MalformedBody),  # ... non-shortest
            (FrameType.PING, b"\x82\x07\x81\x81\x81\x01", MalformedBody),  # ... too deep
            (FrameType.PING, b"\x82\x07\x20", InvalidField),  # ... negative
            (FrameType.PING, b"\x82\x07\x1b" + b"\xff" * 8, InvalidField),  # ... > 2**63 - 1
            (FrameType.PING, b"\x82\x07\x62\xc3\x28", InvalidField),  # ... bad UTF-8
            (FrameType.PING, b"\x82\x07\x99\x04\x01" + b"\x00" * 1025, InvalidField),  # 1025
            (FrameType.PING, b"\x82\x07\x5a\xff\xff\xff\xff", MalformedBody),  # ... huge
            (FrameType.PING, b"\x82\x07\x83\x01", MalformedBody),  # ... truncated array
            (FrameType.PING, b"\x82\x07", MalformedBody),  # ... missing
            (FrameType.PING, b"\x07", MalformedBody),  # not an array
            (FrameType.PING, b"\x81", MalformedBody),  # truncated
            (FrameType.PING, b"\x81\x1b\x00", MalformedBody),  # truncated uint
            (FrameType.LOGIN, b"\x81\x61t", MalformedBody),  # too few fields
            (FrameType.LOGIN, b"\x82\x78\x18" + b"t" * 23, MalformedBody),  # truncated text
            (FrameType.LOGIN, b"\x82\x78\x05ttttt\x61d", MalformedBody),  # short text, long head
            (FrameType.SEND, b"\x83\x01\x61c\x5b" + b"\xff" * 8, MalformedBody),  # huge bytes
            # valid CBOR, invalid field
            (FrameType.PING, b"\x81\x20", InvalidField),  # negative
            (FrameType.PING, b"\x81\x1b\x80" + b"\x00" * 7, InvalidField),  # 2**63
            (FrameType.PING, b"\x81\x1b" + b"\xff" * 8, InvalidField),  # 2**64 - 1
            (FrameType.PING, b"\x81\x61x", InvalidField),  # text for uint
            (FrameType.PING, b"\x81\xf5", InvalidField),  # bool for uint
            (FrameType.LOGIN, b"\x82\x60\x61d", InvalidField),  # empty token
            (FrameType.LOGIN, b"\x82\x61t\x60", InvalidField),  # empty device
            (FrameType.LOGIN, b"\x82\x61t\x62\xc3\x28", InvalidField),  # bad UTF-8
            (FrameType.LOGIN, b"\x82\x61t\x62\xed\xa0", InvalidField),  # truncated UTF-8
            (FrameType.LOGIN, b"\x82\x61t\x63\xed\xa0\x80", InvalidField),  # a surrogate
            (FrameType.LOGIN, b"\x82\x41t\x61d", InvalidField),  # bytes for text
            (FrameType.LOGIN, b"\x82\x61t\x7b" + b"\xff" * 8, InvalidField),  # huge text
            (FrameType.PUSH_ACK, b"\x83\x61c\x01\x01", InvalidField),  # 1 for a bool
            (FrameType.KICK, b"\x81\x0f", InvalidField),  # unknown code 15
            (FrameType.KICK, b"\x81\x18\x63", InvalidField),  # unknown code 99
            (FrameType.KICK, b"\x81\x61x", InvalidField),  # text for code
            (FrameType.NOTIFY, b"\x81\x80", InvalidField),  # empty entries
            (FrameType.PUSH_BATCH, b"\x81\x80", InvalidField),  # empty batch
            (FrameType.PUSH_BATCH, b"\x81\x9b" + b"\xff" * 8, InvalidField),  # 2**64 pushes
            (FrameType.NOTIFY, b"\x81\x81\x83\x61c\x01\x01", MalformedBody),  # 3-entry pair
            (FrameType.NOTIFY, b"\x81\x81\x01", MalformedBody),  # pair not an array
        ],
    )
    def test_table(self, frame_type: FrameType, body: bytes, error: type[Exception]) -> None:
        """The body raises the documented error, whole and framed, and the oracle refuses it."""
        with pytest.raises(error):
            decode_body(frame_type, body)
        with pytest.raises(error):
            decode(raw_frame(frame_type, body))
        with pytest.raises(Reject):
            reference_decode_body(frame_type, body)

    def test_invalid_field_names_the_field(self) -> None:
        """InvalidField carries the dotted path of the field."""
        batch = encode_body(PushBatch(pushes=(Push(conv="c", seq=1, sender="s", body=b""),)))
        bad = batch.replace(b"\x61s", b"\x60")  # empty sender
        with pytest.raises(InvalidField) as info:
            decode_body(FrameType.PUSH_BATCH, bad)
        assert info.value.field == "pushes.sender"
        assert "empty" in str(info.value)

    def test_unknown_frame_type(self) -> None:
        """decode_body refuses a frame type that does not exist."""
        for frame_type in (0, 16, 255, 256, -1):
            with pytest.raises(BadHeader):
                decode_body(frame_type, b"\x80")

    def test_decode_refuses_trailing_and_truncated_frames(self) -> None:
        """decode() wants exactly one frame: not less, not more."""
        frame = encode(Ping(nonce=1))
        with pytest.raises(MalformedBody):
            decode(frame + b"\x00")
        with pytest.raises(TruncatedFrame) as info:
            decode(frame[:-1])
        assert (info.value.received, info.value.expected) == (len(frame) - 1, len(frame))
        with pytest.raises(TruncatedFrame):
            decode(frame[:3])

    def test_decode_accepts_bytes_likes(self) -> None:
        """decode() and decode_body() accept bytearray and memoryview."""
        frame = encode(Ping(nonce=3))
        assert decode(bytearray(frame)) == Ping(nonce=3)
        assert decode(memoryview(frame)) == Ping(nonce=3)
        assert decode_body(FrameType.PING, bytearray(b"\x81\x03")) == Ping(nonce=3)


class TestLimits:
    """Every documented limit: the last value accepted and the first refused, both ways."""

    @pytest.mark.parametrize(
        ("make", "limit"),
        [
            (lambda s: Login(token="t", device=s), MAX_ID_BYTES),
            (lambda s: Login(token=s, device="d"), MAX_TOKEN_BYTES),
            (lambda s: Push(conv=s, seq=1, sender="s", body=b""), MAX_ID_BYTES),
            (lambda s: Receipt(conv="c", seq=1, reader=s), MAX_ID_BYTES),
            (lambda s: Kick(code=0, reason=s), MAX_REASON_BYTES),
            (lambda s: Notify(entries=((s, 1),)), MAX_ID_BYTES),
        ],
    )
    def test_text_limits_count_utf8_bytes(self, make: Any, limit: int) -> None:
        """At the byte limit is fine, one byte over is refused (encode and decode)."""
        ok = make("你" * (limit // 3) + "a" * (limit % 3))
        assert decode(encode(ok)) == ok
        over = make("你" * (limit // 3) + "a" * (limit % 3 + 1))
        with pytest.raises(LocalProtocolError):
            encode(over)
        with pytest.raises(InvalidField):
            decode_body(frame_type_of(ok), cbor2.dumps(_as_cbor(over)))

    def test_uint_limit(self) -> None:
        """2**63 - 1 is the largest integer; 2**63 and negatives are refused."""
        assert decode(encode(Ping(nonce=MAX_UINT))) == Ping(nonce=MAX_UINT)
        for bad in (MAX_UINT + 1, -1, 2**64):
            with pytest.raises(LocalProtocolError):
                encode(Ping(nonce=bad))
        with pytest.raises(InvalidField):
            decode_body(FrameType.PING, b"\x81\x1b" + (MAX_UINT + 1).to_bytes(8, "big"))

    @pytest.mark.parametrize(
        "make",
        [
            lambda n: PushBatch(pushes=(Push(conv="c", seq=1, sender="s", body=b""),) * n),
            lambda n: Notify(entries=(("c", 1),) * n),
            lambda n: SyncRequest(req_id=1, after=(("c", 1),) * n),
            lambda n: SyncResponse(req_id=1, pages=(SyncPage(conv="c", messages=()),) * n),
            lambda n: SyncResponse(
                req_id=1,
                pages=(
                    SyncPage(conv="c", messages=(Push(conv="c", seq=1, sender="s", body=b""),) * n),
                ),
            ),
        ],
    )
    def test_item_limits(self, make: Any) -> None:
        """MAX_ITEMS entries are fine, one more is refused (encode and decode)."""
        ok = make(MAX_ITEMS)
        assert decode(encode(ok)) == ok
        with pytest.raises(LocalProtocolError):
            encode(make(MAX_ITEMS + 1))
        body = cbor2.dumps(_as_cbor(make(MAX_ITEMS + 1)))
        with pytest.raises(InvalidField):
            decode_body(frame_type_of(ok), body)

    def test_frame_size_limit(self) -> None:
        """A body of exactly max_frame_size passes; one byte more is refused both ways."""
        base = len(encode_body(Send(cid=1, conv="c", body=b"")))
        size = 1000
        # bodies of 24..255 bytes take a 2-byte head, 256.. a 3-byte head
        ok = Send(cid=1, conv="c", body=b"x" * (size - base - 2))
        frame = encode(ok, max_frame_size=size, compress_threshold=None)
        assert len(frame) == 8 + size
        assert decode(frame, max_frame_size=size) == ok
        too_big = Send(cid=1, conv="c", body=b"x" * (size - base - 1))
        with pytest.raises(LocalProtocolError):
            encode(too_big, max_frame_size=size, compress_threshold=None)
        with pytest.raises(FrameTooLarge):
            frame = encode(too_big, max_frame_size=BIG, compress_threshold=None)
            decode(frame, max_frame_size=size)


class TestEncodeRefuses:
    """Invalid local messages are refused with LocalProtocolError, never sent."""

    BAD_VALUES: tuple[object, ...] = (
        None,
        -1,
        2**63,
        1.0,
        float("nan"),
        True,
        "",
        "x" * 2000,
        "\ud800",
        b"x",
        bytearray(b"x"),
        [],
        (1, 2),
        ((1, 2),),
        (("", 1),),
        (("c", -1),),
        ErrorCode.OK,
        99,
        object(),
    )

    @given(message=messages, data=st.data())
    def test_one_bad_field(self, message: Message, data: st.DataObject) -> None:
        """Replacing any field with a value of the wrong type or range raises LocalProtocolError."""
        fields = attrs.fields(type(message))
        field = data.draw(st.sampled_from(fields))
        value = data.draw(st.sampled_from(self.BAD_VALUES))
        bad = attrs.evolve(cast(Any, message), **{field.name: value})
        try:
            body = encode_body(bad)
        except LocalProtocolError:
            return
        # accepted: then it must be valid (an ErrorCode for a code, 99 for a uint...)
        assert decode_body(frame_type_of(message), body) == bad

    def test_not_a_message(self) -> None:
        """encode() of something else, or of a SyncPage (no frame type), is refused."""
        for thing in (object(), SyncPage(conv="c", messages=()), b"x"):
            with pytest.raises(LocalProtocolError):
                encode(thing)  # type: ignore[arg-type]
            with pytest.raises(LocalProtocolError):
                encode_body(thing)  # type: ignore[arg-type]

    def test_wrong_item_types(self) -> None:
        """A batch of non-Push items, or pairs that are not pairs, is refused."""
        with pytest.raises(LocalProtocolError):
            encode(PushBatch(pushes=(Ping(),)))  # type: ignore[arg-type]
        with pytest.raises(LocalProtocolError):
            encode(Notify(entries=(("c", 1, 2),)))  # type: ignore[arg-type]
        with pytest.raises(LocalProtocolError):
            encode(Notify(entries=[("c", 1)]))  # type: ignore[arg-type]

    def test_encode_push_batch_checks_its_items(self) -> None:
        """encode_push_batch refuses 0 or too many items and bytes that are no Push body."""
        with pytest.raises(LocalProtocolError):
            encode_push_batch([])
        one = encode_body(Push(conv="c", seq=1, sender="s", body=b""))
        with pytest.raises(LocalProtocolError):
            encode_push_batch([one] * (MAX_ITEMS + 1))
        with pytest.raises(LocalProtocolError):
            encode_push_batch([encode_body(Ping())])
        with pytest.raises(LocalProtocolError):
            encode_push_batch([b""])


class TestCompression:
    """LZ4 bodies: when they are sent, and how bad ones are refused."""

    def batch(self, n: int) -> PushBatch:
        return PushBatch(
            pushes=tuple(
                Push(conv="group:1", seq=i, sender=f"user:{i % 7}", body=b"hello world " * 5)
                for i in range(n)
            )
        )

    def test_threshold(self) -> None:
        """Bodies under the threshold go plain; at or over it, compressed if smaller."""
        message = self.batch(20)
        size = len(encode_body(message))
        assert encode(message, compress_threshold=size + 1, max_frame_size=BIG)[3] == 0
        assert encode(message, compress_threshold=size, max_frame_size=BIG)[3] == 1
        assert encode(message, compress_threshold=None, max_frame_size=BIG)[3] == 0

    def test_only_if_smaller(self) -> None:
        """Incompressible bodies are sent plain whatever the threshold."""
        message = Send(cid=1, conv="c", body=random.Random(0).randbytes(700))
        assert encode(message, compress_threshold=1)[3] == 0

    def test_bomb_is_refused_before_decompressing(self) -> None:
        """A body that would decompress past max_frame_size raises FrameTooLarge."""
        body = cbor2.dumps([[["c", 1, "s", b"\x00" * 200_000]]])
        packed = lz4.block.compress(body, store_size=True)
        assert len(packed) < 2000
        with pytest.raises(FrameTooLarge) as info:
            decode(raw_frame(FrameType.PUSH_BATCH, packed, flags=1))
        assert info.value.size == len(body)

    @pytest.mark.parametrize(
        ("body", "error"),
        [
            (b"\xff\xff\xff\xff" + b"\x00" * 10, FrameTooLarge),  # forged 4 GiB
            (b"\x00\x00\x00\x00\x00", DecompressionError),  # declared 0
            (b"\x05\x00\x00", DecompressionError),  # no room for the prefix
            (b"\x05\x00\x00\x00", DecompressionError),  # prefix only
            (b"\x05\x00\x00\x00\xff\xff", DecompressionError),  # corrupt block
        ],
    )
    def test_bad_lz4(self, body: bytes, error: type[Exception]) -> None:
        """Forged sizes and corrupt blocks raise their errors."""
        with pytest.raises(error):
            decode(raw_frame(FrameType.PING, body, flags=1))

    def test_forged_size_mismatch(self) -> None:
        """A size prefix larger or smaller than the real content is a DecompressionError."""
        body = encode_body(self.batch(10))
        packed = lz4.block.compress(body, store_size=True)
        for size in (len(body) + 1, len(body) - 1):
            forged = size.to_bytes(4, "little") + packed[4:]
            with pytest.raises(DecompressionError):
                decode(raw_frame(FrameType.PUSH_BATCH, forged, flags=1))


# --- Connection -------------------------------------------------------------------------


class TestConnectionBasics:
    """The sans-IO API: buffering, events, EOF, roles, the error state, limits."""

    def test_pair_of_connections(self) -> None:
        """A client and a server joined by a fake link talk both ways."""
        client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
        server.receive_data(client.send(Login(token="t", device="d")))
        assert drain(server) == [Login(token="t", device="d"), NEED_DATA]
        ack = LoginAck(uid="u", session="s")
        push = Push(conv="c", seq=1, sender="u2", body=b"hi")
        client.receive_data(server.send(ack) + server.send(push))
        assert drain(client) == [ack, push, NEED_DATA]
        client.receive_data(b"")
        assert drain(client) == [CLOSED]
        assert client.next_event() is CLOSED
        assert client.state is ConnectionState.CLOSED

    def test_receive_data_only_buffers(self) -> None:
        """receive_data parses nothing: even garbage raises only in next_event."""
        conn = Connection(Role.SERVER)
        conn.receive_data(b"GET / HTTP/1.1\r\n")
        assert conn.buffered == 16
        with pytest.raises(BadHeader):
            conn.next_event()

    def test_buffered_tracks_a_partial_frame(self) -> None:
        """buffered > 0 after NEED_DATA says a frame is in progress (for a deadline)."""
        conn = Connection(Role.SERVER)
        frame = encode(Ping(nonce=1))
        conn.receive_data(frame[:5])
        assert conn.next_event() is NEED_DATA and conn.buffered == 5
        conn.receive_data(frame[5:])
        assert conn.next_event() == Ping(nonce=1)
        assert conn.buffered == 0

    def test_idle_connection_keeps_little(self) -> None:
        """After NEED_DATA only the unparsed bytes (plus < 1 KiB parsed) stay referenced."""
        conn = Connection(Role.SERVER)
        frames = encode(Ping(nonce=1)) * 10_000
        conn.receive_data(frames + encode(Ping(nonce=2))[:5])
        assert drain(conn)[-1] is NEED_DATA
        assert len(conn._buf) < conn.buffered + 1024
        conn.receive_data(encode(Ping(nonce=2))[5:])
        assert drain(conn) == [Ping(nonce=2), NEED_DATA]
        assert conn._buf == b""

    def test_bytes_likes_are_copied(self) -> None:
        """bytearray and memoryview input is copied: reusing the caller's buffer is safe."""
        conn = Connection(Role.SERVER)
        buf = bytearray(encode(Ping(nonce=9)))
        conn.receive_data(memoryview(buf)[:4])
        conn.receive_data(buf[4:])
        buf[:] = b"\x00" * len(buf)
        assert conn.next_event() == Ping(nonce=9)

    def test_eof_inside_a_frame(self) -> None:
        """EOF in the middle of a header or body raises TruncatedFrame with the counts."""
        frame = encode(Ping(nonce=1))
        for cut in (1, 7, 8, len(frame) - 1):
            conn = Connection(Role.SERVER)
            conn.receive_data(frame[:cut])
            conn.receive_data(b"")
            with pytest.raises(TruncatedFrame) as info:
                conn.next_event()
            expected = 8 if cut < 8 else len(frame)
            assert (info.value.received, info.value.expected) == (cut, expected)

    def test_error_state_is_sticky(self) -> None:
        """After a RemoteProtocolError every next_event re-raises the same error."""
        conn = Connection(Role.SERVER)
        conn.receive_data(encode(Ping(nonce=1)) + b"\x00" * 8)
        assert conn.next_event() == Ping(nonce=1)
        with pytest.raises(BadHeader) as first:
            conn.next_event()
        conn.receive_data(encode(Ping(nonce=2)))  # discarded
        with pytest.raises(BadHeader) as again:
            conn.next_event()
        assert again.value is first.value
        assert conn.state is ConnectionState.ERROR and conn.buffered == 0
        conn._check()

    def test_send_works_in_the_error_state(self) -> None:
        """A server can still tell the peer why it closes after a protocol error."""
        conn = Connection(Role.SERVER)
        conn.receive_data(b"\x00")
        with pytest.raises(BadHeader):
            conn.next_event()
        kick = Kick(code=ErrorCode.PROTOCOL_ERROR, reason="bad frame")
        assert decode(conn.send(kick)) == kick

    def test_data_after_eof_is_a_local_error(self) -> None:
        """receive_data after EOF is a bug in the caller."""
        conn = Connection(Role.CLIENT)
        conn.receive_data(b"")
        conn.receive_data(b"")  # a second EOF is harmless
        with pytest.raises(LocalProtocolError):
            conn.receive_data(b"x")
        assert conn.next_event() is CLOSED

    @pytest.mark.parametrize("role", list(Role))
    def test_roles(self, role: Role) -> None:
        """Each side sends only its frame types and refuses the other side's."""
        conn = Connection(role)
        for frame_type, (cls, senders) in SENDERS.items():
            example = _EXAMPLES[cls]
            if role in senders:
                assert decode(conn.send(example)) == example
            else:
                with pytest.raises(LocalProtocolError):
                    conn.send(example)
            receiver = Connection(role)
            receiver.receive_data(encode(example))
            if peer(role) in senders:
                assert receiver.next_event() == example
            else:
                with pytest.raises(UnexpectedFrame) as info:
                    receiver.next_event()
                assert info.value.frame_type == frame_type.name
                assert info.value.role == role.value

    def test_unexpected_frame_refused_at_its_header(self) -> None:
        """A server-only frame is refused before its body arrives."""
        conn = Connection(Role.SERVER)
        frame = encode(Push(conv="c", seq=1, sender="s", body=b"x" * 100))
        conn.receive_data(frame[:8])
        with pytest.raises(UnexpectedFrame):
            conn.next_event()

    def test_buffer_limit(self) -> None:
        """receive_data refuses (buffering nothing) past max_buffer_size; draining frees room."""
        conn = Connection(Role.SERVER, max_frame_size=100, max_buffer_size=120)
        frame = encode(Ping(nonce=1))
        conn.receive_data(frame * 12)  # 120 bytes fit exactly
        with pytest.raises(CapacityError) as info:
            conn.receive_data(b"\xc1")
        assert info.value.limit == "max_buffer_size"
        conn._check()
        assert drain(conn) == [Ping(nonce=1)] * 12 + [NEED_DATA]
        conn.receive_data(frame)
        assert conn.next_event() == Ping(nonce=1)
        with pytest.raises(CapacityError):
            conn.receive_data(b"\x00" * 121)

    def test_buffer_limit_with_pending_chunks(self) -> None:
        """The limit counts joined and pending bytes alike."""
        conn = Connection(Role.SERVER, max_frame_size=100, max_buffer_size=108)
        conn.receive_data(b"\xc1")
        for _ in range(107):
            conn.receive_data(b"\x01")
        with pytest.raises(CapacityError):
            conn.receive_data(b"\x01")
        conn._check()

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"max_frame_size": 0},
            {"max_frame_size": 2**32},
            {"max_frame_size": 1.5},
            {"compress_threshold": 0},
            {"compress_threshold": "1"},
            {"max_frame_size": 1000, "max_buffer_size": 1007},
            {"max_buffer_size": "big"},
        ],
    )
    def test_config_errors(self, kwargs: dict[str, Any]) -> None:
        """Bad limits raise ConfigError."""
        with pytest.raises(ConfigError):
            Connection(Role.CLIENT, **kwargs)

    def test_role_must_be_a_role(self) -> None:
        """The role is a Role member, not its string."""
        with pytest.raises(ConfigError):
            Connection("client")  # type: ignore[arg-type]

    def test_send_refuses_oversized_and_invalid(self) -> None:
        """send() refuses a body over max_frame_size and an invalid message."""
        conn = Connection(Role.CLIENT, max_frame_size=64, compress_threshold=None)
        with pytest.raises(LocalProtocolError):
            conn.send(Send(cid=1, conv="c", body=b"x" * 64))
        with pytest.raises(LocalProtocolError):
            conn.send(Send(cid=-1, conv="c", body=b""))
        with pytest.raises(LocalProtocolError):
            conn.send("hello")  # type: ignore[arg-type]

    @given(st.lists(server_messages, min_size=1, max_size=8), st.data())
    def test_chunking_gives_the_same_events(
        self, batch: list[Message], data: st.DataObject
    ) -> None:
        """Any split of a valid stream yields the same messages as the whole stream."""
        sender = Connection(Role.SERVER, max_frame_size=BIG, compress_threshold=64)
        stream = b"".join(sender.send(m) for m in batch)
        cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=12)))
        conn = Connection(Role.CLIENT, max_frame_size=BIG, max_buffer_size=BIG + 8)
        got: list[Event] = []
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            conn.receive_data(stream[a:b])
            got.extend(e for e in drain(conn) if e is not NEED_DATA)
        conn.receive_data(b"")
        got.extend(drain(conn))
        assert got == [*batch, CLOSED]

    @settings(max_examples=20)
    @given(st.lists(client_messages, min_size=1, max_size=5))
    def test_one_byte_at_a_time(self, batch: list[Message]) -> None:
        """Bytes fed one at a time give the same messages."""
        stream = b"".join(encode(m, max_frame_size=BIG) for m in batch)
        conn = Connection(Role.SERVER, max_frame_size=BIG, max_buffer_size=BIG + 8)
        got: list[Event] = []
        for i in range(len(stream)):
            conn.receive_data(stream[i : i + 1])
            got.extend(e for e in drain(conn) if e is not NEED_DATA)
        assert got == batch


_EXAMPLES: dict[type, Message] = {
    Login: Login(token="t", device="d"),
    LoginAck: LoginAck(uid="u", session="s"),
    Ping: Ping(nonce=1),
    Pong: Pong(nonce=1),
    Send: Send(cid=1, conv="c", body=b"hi"),
    SendAck: SendAck(cid=1, conv="c", seq=5),
    Push: Push(conv="c", seq=5, sender="u", body=b"hi"),
    PushBatch: PushBatch(pushes=(Push(conv="c", seq=5, sender="u", body=b"hi"),)),
    PushAck: PushAck(conv="c", seq=5),
    SyncRequest: SyncRequest(req_id=1, after=(("c", 4),)),
    SyncResponse: SyncResponse(req_id=1, pages=(SyncPage(conv="c", messages=()),)),
    Notify: Notify(entries=(("c", 5),)),
    Receipt: Receipt(conv="c", seq=5),
    Kick: Kick(code=ErrorCode.REPLACED),
    Error: Error(code=ErrorCode.RATE_LIMITED, retry_after_ms=100),
}


# --- the Connection against a model -------------------------------------------------------

VALID_TYPES = {int(t) for t in FrameType}


def model_events(
    stream: bytes, role: Role, max_frame_size: int, eof: bool
) -> tuple[list[Message], object]:
    """What a receiver of ``stream`` must report: the messages, then how it stops.

    The stop is NEED_DATA, CLOSED, or an error class (RemoteProtocolError when
    only "some protocol error" is specified). Written from docs/protocol.md: the
    header is checked as far as its bytes have arrived, the body once it is whole.
    """
    may_send = {int(t) for t, (_, roles) in SENDERS.items() if peer(role) in roles}
    out: list[Message] = []
    pos = 0
    while True:
        rest = stream[pos:]
        n = len(rest)
        if (
            (n >= 1 and rest[0] != 0xC1)
            or (n >= 2 and rest[1] != 1)
            or (n >= 3 and rest[2] not in VALID_TYPES)
            or (n >= 4 and rest[3] & 0xFE)
        ):
            return out, BadHeader
        if n < 8:
            if not eof:
                return out, NEED_DATA
            return out, CLOSED if n == 0 else TruncatedFrame
        length = int.from_bytes(rest[4:8], "big")
        if length == 0:
            return out, BadHeader
        if length > max_frame_size:
            return out, FrameTooLarge
        if rest[2] not in may_send:
            return out, UnexpectedFrame
        if n < 8 + length:
            return out, TruncatedFrame if eof else NEED_DATA
        try:
            out.append(reference_decode_frame(rest[: 8 + length], max_frame_size))
        except Reject:
            return out, RemoteProtocolError
        pos += 8 + length


class ConnectionMachine(RuleBasedStateMachine):
    """A receiving Connection, shrunk (tiny frames and buffer), against ``model_events``."""

    def __init__(self) -> None:
        super().__init__()
        self.conn = Connection(Role.CLIENT)
        self.sender = Connection(Role.SERVER)
        self.stream = b""
        self.got: list[Message] = []
        self.stop: object = NEED_DATA
        self.error: RemoteProtocolError | None = None
        self.eof = False
        self.max_frame_size = DEFAULT_MAX_FRAME_SIZE
        self.slack = 0

    @initialize(
        role=st.sampled_from(Role),
        max_frame_size=st.sampled_from([64, 400, 2000]),
        compress_threshold=st.sampled_from([None, 1, 60]),
        slack=st.sampled_from([0, 30, 200]),
    )
    def setup(
        self, role: Role, max_frame_size: int, compress_threshold: int | None, slack: int
    ) -> None:
        self.max_frame_size = max_frame_size
        self.slack = slack
        self.conn = Connection(
            role,
            max_frame_size=max_frame_size,
            compress_threshold=compress_threshold,
            max_buffer_size=max_frame_size + 8 + slack,
        )
        self.sender = Connection(
            peer(role), max_frame_size=max_frame_size, compress_threshold=compress_threshold
        )

    def feed(self, data: bytes, pieces: list[int]) -> None:
        """Feed ``data`` cut at ``pieces``; drain and retry once when the buffer is full."""
        cuts = sorted({p % (len(data) + 1) for p in pieces})
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            chunk = data[a:b]
            if not chunk:
                continue
            try:
                self.conn.receive_data(chunk)
            except CapacityError:
                self.drain()
                try:
                    self.conn.receive_data(chunk)
                except CapacityError:
                    return  # the rest of the data was never accepted
            if self.conn.state is not ConnectionState.ERROR:
                self.stream += chunk

    @precondition(lambda self: not self.eof)
    @rule(
        data=st.data(),
        count=st.integers(1, 4),
        pieces=st.lists(st.integers(0, 10**6), max_size=6),
    )
    def send_frames(self, data: st.DataObject, count: int, pieces: list[int]) -> None:
        """Frames the peer's role may send, cut anywhere."""
        wanted = server_messages if self.sender.role is Role.SERVER else client_messages
        frames = b""
        for _ in range(count):
            with contextlib.suppress(LocalProtocolError):  # over max_frame_size
                frames += self.sender.send(data.draw(wanted))
        self.feed(frames, pieces)

    @precondition(lambda self: not self.eof)
    @rule(data=st.data(), pieces=st.lists(st.integers(0, 10**6), max_size=3))
    def send_bad_frame(self, data: st.DataObject, pieces: list[int]) -> None:
        """Rarely: a frame with one header byte changed, or a frame of the wrong role."""
        if data.draw(st.integers(0, 3)):
            return  # keep most runs alive long enough to carry many frames
        message = data.draw(messages)
        frame = bytearray(encode(message, max_frame_size=BIG))
        index = data.draw(st.integers(0, 7))
        frame[index] = data.draw(st.integers(0, 255))
        self.feed(bytes(frame), pieces)

    @precondition(lambda self: not self.eof)
    @rule(garbage=st.binary(min_size=1, max_size=12), coin=st.integers(0, 3))
    def send_garbage(self, garbage: bytes, coin: int) -> None:
        """Rarely: a few arbitrary bytes."""
        if not coin:
            self.feed(garbage, [])

    @precondition(lambda self: not self.eof)
    @rule()
    def close(self) -> None:
        """The peer closes (EOF)."""
        self.conn.receive_data(b"")
        self.eof = True

    @precondition(lambda self: self.eof)
    @rule()
    def data_after_eof(self) -> None:
        """Feeding after EOF is the caller's bug."""
        with pytest.raises(LocalProtocolError):
            self.conn.receive_data(b"\xc1")

    @rule()
    def drain(self) -> None:
        """Drain every event and compare with the model."""
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                if self.error is not None:
                    assert exc is self.error
                self.error = exc
                self.stop = type(exc)
                break
            self.conn._check()
            if event is NEED_DATA or event is CLOSED:
                self.stop = event
                break
            assert self.error is None
            self.got.append(event)
        expected, stop = model_events(
            self.stream, self.conn.role, self.max_frame_size, self.eof
        )
        note_event(f"{len(self.got) // 3 * 3}+ messages, stop {getattr(stop, '__name__', stop)}")
        assert self.got == expected
        if isinstance(stop, type) and issubclass(stop, Exception):
            assert isinstance(self.stop, type) and issubclass(self.stop, stop), (self.stop, stop)
            assert self.conn.state is ConnectionState.ERROR
        else:
            assert self.stop is stop
            if stop is CLOSED:
                assert self.conn.state is ConnectionState.CLOSED

    @invariant()
    def check(self) -> None:
        self.conn._check()


TestConnectionMachine = ConnectionMachine.TestCase
TestConnectionMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


class TestSchema:
    """The schema table matches the message classes."""

    def test_schema_covers_every_field_in_order(self) -> None:
        """Every attrs field of every message has a schema entry, in the same order."""
        for cls, specs in SCHEMA.items():
            assert [s.name for s in specs] == [f.name for f in attrs.fields(cls)]

    def test_frame_types_are_one_to_one(self) -> None:
        """Each frame type has one message class and each class one frame type."""
        assert len(FRAME_TYPE_OF) == len(FrameType) == len(SENDERS)
        assert {FRAME_TYPE_OF[cls] for cls, _ in SENDERS.values()} == set(FrameType)

    def test_generated_sources_are_kept(self) -> None:
        """The generated codec's source is available for reading."""
        source = imkit.protocol._codec.SOURCES["Push"]
        assert "def decode_Push(data):" in source and "def encode_Push(m):" in source

    def test_generated_code_globals_resolve(self) -> None:
        """Every global a generated codec loads is defined (error paths included)."""
        import builtins
        import dis

        codec = imkit.protocol._codec
        codecs = [*codec._DECODERS.values(), *codec._ENCODERS.values()]
        for function in codecs:
            for ins in dis.get_instructions(function):
                if ins.opname == "LOAD_GLOBAL":
                    name = ins.argval
                    assert name in function.__globals__ or hasattr(builtins, name), name

    @given(ids)
    def test_public_names(self, conv: str) -> None:
        """Everything in __all__ is importable from imkit.protocol."""
        for name in imkit.protocol.__all__:
            assert hasattr(imkit.protocol, name)
        assert decode(encode(PushAck(conv=conv, seq=1))) == PushAck(conv=conv, seq=1)


@given(messages)
def test_decoded_equals_constructed(message: Message) -> None:
    """A decoded message is equal, and hashes equal, to one built by its constructor."""
    decoded = decode(encode(message, max_frame_size=BIG), max_frame_size=BIG)
    fields = attrs.fields(type(message))
    rebuilt = type(message)(**{f.name: getattr(decoded, f.name) for f in fields})
    assert decoded == rebuilt == message
    assert hash(decoded) == hash(rebuilt)
