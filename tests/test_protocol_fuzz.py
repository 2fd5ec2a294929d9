"""Hostile input for imkit.protocol: every wire row of RELIABILITY.md, arbitrary bytes, mutations.

The promise under test: whatever the bytes, the decoder and the Connection yield
only messages, NEED_DATA / CLOSED, or a subclass of RemoteProtocolError -- with
memory bounded by the frame size, not by what the peer declares -- and the fast
decoder accepts exactly what the reference decoder accepts.
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import cbor2
import lz4.block
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imkit.protocol import (
    CLOSED,
    MAX_ITEMS,
    NEED_DATA,
    BadHeader,
    Connection,
    ConnectionState,
    DecompressionError,
    Event,
    FrameTooLarge,
    FrameType,
    InvalidField,
    MalformedBody,
    Message,
    Ping,
    Push,
    PushAck,
    RemoteProtocolError,
    Role,
    TruncatedFrame,
    UnexpectedFrame,
    decode,
    decode_body,
    encode,
    encode_body,
)
from imkit.protocol._schema import FRAME_TYPE_OF
from tests.strategies import messages
from tests.test_protocol_oracle import Reject, reference_decode_body, reference_decode_frame

BIG = 1 << 20


def header(
    frame_type: int, length: int, *, flags: int = 0, magic: int = 0xC1, version: int = 1
) -> bytes:
    return struct.pack(">BBBBI", magic, version, frame_type, flags, length)


def raw_frame(frame_type: int, body: bytes, *, flags: int = 0) -> bytes:
    return header(frame_type, len(body), flags=flags) + body


_zeros = cbor2.dumps([[["c", 1, "s", b"\x00" * 1_000_000]]])
_bomb = lz4.block.compress(_zeros, store_size=True)
_small = encode_body(PushAck(conv="c", seq=1))
_small_packed = lz4.block.compress(_small, store_size=True)

#: (name, receiving role, bytes, error) -- the wire rows of RELIABILITY.md's table
SAMPLES: list[tuple[str, Role, bytes, type[RemoteProtocolError]]] = [
    ("length prefix 0xFFFFFFFF", Role.SERVER, header(FrameType.SEND, 0xFFFF_FFFF), FrameTooLarge),
    ("length prefix max+1", Role.SERVER, header(FrameType.SEND, 64 * 1024 + 1), FrameTooLarge),
    ("zero length", Role.SERVER, header(FrameType.SEND, 0), BadHeader),
    ("bad magic", Role.SERVER, b"GET / HTTP/1.1\r\n\r\n", BadHeader),
    ("TLS client hello", Role.SERVER, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", BadHeader),
    ("bad version", Role.SERVER, header(FrameType.PING, 1, version=9) + b"\x80", BadHeader),
    ("unknown frame type", Role.SERVER, header(99, 1) + b"\x80", BadHeader),
    ("frame type 0", Role.SERVER, header(0, 1) + b"\x80", BadHeader),
    ("reserved flag bits", Role.SERVER, header(FrameType.PING, 1, flags=0x40) + b"\x80", BadHeader),
    (
        "bytes after the CBOR item",
        Role.SERVER,
        raw_frame(FrameType.PING, b"\x81\x01\x02"),
        MalformedBody,
    ),
    ("a second item", Role.SERVER, raw_frame(FrameType.PING, b"\x80\x80"), MalformedBody),
    (
        "deeply nested arrays for a uint",
        Role.SERVER,
        raw_frame(FrameType.PING, b"\x81" * 5000 + b"\x80"),
        InvalidField,
    ),
    (
        "deeply nested arrays for pushes",
        Role.CLIENT,
        raw_frame(FrameType.PUSH_BATCH, b"\x81" * 5000 + b"\x80"),
        MalformedBody,
    ),
    (
        "huge declared text",
        Role.SERVER,
        raw_frame(FrameType.LOGIN, b"\x82\x7b" + b"\x7f" + b"\xff" * 7),
        InvalidField,
    ),
    (
        "huge declared bytes",
        Role.SERVER,
        raw_frame(FrameType.SEND, b"\x83\x01\x61c\x5a\xff\xff\xff\xff"),
        MalformedBody,
    ),
    (
        "huge declared array",
        Role.CLIENT,
        raw_frame(FrameType.PUSH_BATCH, b"\x81\x9b\x7f" + b"\xff" * 7),
        InvalidField,
    ),
    (
        "1024 declared pushes, none sent",
        Role.CLIENT,
        raw_frame(FrameType.PUSH_BATCH, b"\x81\x99\x04\x00"),
        MalformedBody,
    ),
    (
        "many tiny items",
        Role.CLIENT,
        raw_frame(FrameType.PUSH_BATCH, b"\x81\x99\xff\xff" + b"\x80" * 65_000),
        InvalidField,
    ),
    (
        "1 MB of empty arrays",
        Role.CLIENT,
        raw_frame(FrameType.PUSH_BATCH, b"\x81\x9a\x00\x0f\x42\x40" + b"\x80" * 1_000_000),
        FrameTooLarge,
    ),
    (
        "indefinite-length array",
        Role.SERVER,
        raw_frame(FrameType.PING, b"\x9f\x01\xff"),
        MalformedBody,
    ),
    (
        "indefinite-length text",
        Role.SERVER,
        raw_frame(FrameType.LOGIN, b"\x82\x7f\x61t\xff\x61d"),
        MalformedBody,
    ),
    (
        "duplicate map keys",
        Role.SERVER,
        raw_frame(FrameType.PING, b"\xa2\x65nonce\x01\x65nonce\x02"),
        MalformedBody,
    ),
    ("bignum tag", Role.SERVER, raw_frame(FrameType.PING, b"\x81\xc2\x41\x05"), MalformedBody),
    ("shared-ref tag", Role.SERVER, raw_frame(FrameType.PING, b"\x81\xd8\x1d\x00"), MalformedBody),
    ("unknown tag", Role.SERVER, raw_frame(FrameType.PING, b"\x81\xd9\xff\xff\x05"), MalformedBody),
    (
        "self-describe tag",
        Role.SERVER,
        raw_frame(FrameType.PING, b"\xd9\xd9\xf7\x81\x05"),
        MalformedBody,
    ),
    ("negative seq", Role.SERVER, raw_frame(FrameType.PUSH_ACK, b"\x82\x61c\x20"), InvalidField),
    (
        "seq of 2**63",
        Role.SERVER,
        raw_frame(FrameType.PUSH_ACK, b"\x82\x61c\x1b\x80" + b"\x00" * 7),
        InvalidField,
    ),
    (
        "NaN seq",
        Role.SERVER,
        raw_frame(FrameType.PUSH_ACK, b"\x82\x61c\xf9\x7e\x00"),
        MalformedBody,
    ),
    (
        "huge id",
        Role.SERVER,
        raw_frame(FrameType.PUSH_ACK, b"\x82\x78\x81" + b"c" * 129 + b"\x01"),
        InvalidField,
    ),
    ("empty conv", Role.SERVER, raw_frame(FrameType.PUSH_ACK, b"\x82\x60\x01"), InvalidField),
    ("LZ4 bomb", Role.CLIENT, raw_frame(FrameType.PUSH_BATCH, _bomb, flags=1), FrameTooLarge),
    (
        "forged decompressed size (4 GiB)",
        Role.SERVER,
        raw_frame(FrameType.PUSH_ACK, b"\xff\xff\xff\xff" + _small_packed[4:], flags=1),
        FrameTooLarge,
    ),
    (
        "forged decompressed size (too small)",
        Role.SERVER,
        raw_frame(FrameType.PUSH_ACK, b"\x01\x00\x00\x00" + _small_packed[4:], flags=1),
        DecompressionError,
    ),
    (
        "server-only frame from a client",
        Role.SERVER,
        encode(Push(conv="c", seq=1, sender="s", body=b"x")),
        UnexpectedFrame,
    ),
    ("client-only frame from a server", Role.CLIENT, encode(Ping(nonce=1)), UnexpectedFrame),
]

ERROR_CASES = [pytest.param(role, data, error, id=name) for name, role, data, error in SAMPLES]


def run(conn: Connection, chunks: list[bytes]) -> list[Event]:
    """Feed chunks then EOF, draining after each; a RemoteProtocolError propagates."""
    events: list[Event] = []
    # _check() is O(pending chunks): every call for short inputs, every 997th for long
    every = 1 if len(chunks) < 500 else 997
    for i, chunk in enumerate([*chunks, b""]):
        conn.receive_data(chunk)
        while True:
            event = conn.next_event()
            if i % every == 0:
                conn._check()
            if event is NEED_DATA or event is CLOSED:
                break
            events.append(event)
        if event is CLOSED:
            return events
    raise AssertionError("EOF did not end the stream")


def big_connection(role: Role) -> Connection:
    # the 1 MB sample must reach the header check, not the buffer limit
    return Connection(role, max_buffer_size=4 << 20)


class TestReliabilitySamples:
    """Each wire row of RELIABILITY.md raises its error whole, byte by byte, with more bytes."""

    @pytest.mark.parametrize(("role", "data", "error"), ERROR_CASES)
    def test_whole(self, role: Role, data: bytes, error: type[Exception]) -> None:
        """Fed in one piece."""
        conn = big_connection(role)
        with pytest.raises(error):
            run(conn, [data])
        assert conn.state is ConnectionState.ERROR

    @pytest.mark.parametrize(("role", "data", "error"), ERROR_CASES)
    def test_byte_by_byte(self, role: Role, data: bytes, error: type[Exception]) -> None:
        """Fed one byte at a time (the error comes as soon as the bytes prove it)."""
        conn = big_connection(role)
        head = data[:70_000]  # enough for every sample's error to show
        with pytest.raises(error):
            run(conn, [head[i : i + 1] for i in range(len(head))] + [data[70_000:]])

    @pytest.mark.parametrize(("role", "data", "error"), ERROR_CASES)
    def test_with_trailing_bytes(self, role: Role, data: bytes, error: type[Exception]) -> None:
        """Followed by garbage or by a valid frame: the first error still wins."""
        for tail in (b"\x00" * 16, encode(PushAck(conv="c", seq=1)), encode(Ping())):
            with pytest.raises(error):
                run(big_connection(role), [data + tail])

    @pytest.mark.parametrize(("role", "data", "error"), ERROR_CASES)
    def test_decode_whole_frame(self, role: Role, data: bytes, error: type[Exception]) -> None:
        """decode() of the sample raises the same class (or, for roles, decodes: no role there)."""
        if error is UnexpectedFrame:
            assert isinstance(decode(data), (Push, Ping))
            return
        with pytest.raises((error, TruncatedFrame, MalformedBody)):
            decode(data)

    @pytest.mark.parametrize(("role", "data", "error"), ERROR_CASES)
    def test_memory_is_bounded_by_the_input(
        self, role: Role, data: bytes, error: type[Exception]
    ) -> None:
        """Refusing a sample allocates at most a small multiple of what was received."""
        conn = big_connection(role)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            with pytest.raises(error):
                run(conn, [data])
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
        assert peak < 2 * len(data) + 200_000, peak

    def test_header_then_silence(self) -> None:
        """A header and no body: NEED_DATA (a frame is pending) until EOF, then TruncatedFrame."""
        conn = Connection(Role.SERVER)
        conn.receive_data(header(FrameType.SEND, 1000))
        for i in range(3):
            assert conn.next_event() is NEED_DATA
            assert conn.buffered == 8 + i
            conn.receive_data(b"\x83")  # slowloris: a byte now and then
        assert conn.next_event() is NEED_DATA
        conn.receive_data(b"")
        with pytest.raises(TruncatedFrame) as info:
            conn.next_event()
        assert (info.value.received, info.value.expected) == (11, 1008)

    def test_slow_frame_is_joined_once(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A max-size frame arriving byte by byte is joined a bounded number of times (O(n))."""
        joins = []
        original = Connection._join

        def counting_join(conn: Connection) -> None:
            joins.append(conn.buffered)
            original(conn)

        monkeypatch.setattr(Connection, "_join", counting_join)
        push = Push(conv="c", seq=1, sender="s", body=b"x" * 60_000)
        frame = encode(push, compress_threshold=None)
        conn = Connection(Role.CLIENT)
        for i in range(len(frame)):
            conn.receive_data(frame[i : i + 1])
            assert conn.next_event() is NEED_DATA or i == len(frame) - 1
        # one join per header byte at most, then a single one for the whole frame
        assert len(joins) <= 9, joins
        assert conn.buffered == 0


def outcome(fn: Callable[[], Any]) -> object:
    """The result of ``fn``, or the class of the RemoteProtocolError it raised."""
    try:
        return fn()
    except RemoteProtocolError:
        return RemoteProtocolError


def assert_only_protocol_outcomes(role: Role, chunks: list[bytes]) -> list[Event]:
    """Feed ``chunks``: messages, or a RemoteProtocolError, and nothing else."""
    conn = Connection(role)
    try:
        return run(conn, chunks)
    except RemoteProtocolError:
        assert conn.state is ConnectionState.ERROR
        conn._check()
        return []


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid frame (maybe compressed) with a few bytes flipped, set, inserted or cut."""
    message = draw(messages)
    frame = bytearray(
        encode(message, compress_threshold=draw(st.sampled_from([None, 1, 64])), max_frame_size=BIG)
    )
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["flip", "set", "insert", "delete", "truncate", "extend"]),
                st.integers(0, 10**6),
                st.integers(0, 255),
            ),
            min_size=1,
            max_size=4,
        )
    )
    for op, where, value in ops:
        i = where % (len(frame) + 1)
        if op == "flip" and i < len(frame):
            frame[i] ^= 1 << (value % 8)
        elif op == "set" and i < len(frame):
            frame[i] = value
        elif op == "insert":
            frame.insert(i, value)
        elif op == "delete" and i < len(frame):
            del frame[i]
        elif op == "truncate":
            del frame[i:]
        elif op == "extend":
            frame.extend(bytes([value]) * (where % 5))
    return bytes(frame)


class TestArbitraryBytes:
    """Arbitrary and mutated bytes yield only messages or RemoteProtocolError."""

    @settings(max_examples=300)
    @given(st.binary(max_size=200), st.sampled_from(Role))
    def test_binary_into_a_connection(self, data: bytes, role: Role) -> None:
        """st.binary() fed to either end."""
        assert_only_protocol_outcomes(role, [data])

    @settings(max_examples=300)
    @given(st.binary(max_size=200))
    def test_binary_decode(self, data: bytes) -> None:
        """st.binary() through decode()."""
        result = outcome(lambda: decode(data))
        assert result is RemoteProtocolError or type(result) in FRAME_TYPE_OF

    @settings(max_examples=500)
    @given(st.sampled_from(FrameType), st.binary(max_size=120))
    def test_binary_bodies_agree_with_the_oracle(self, frame_type: FrameType, body: bytes) -> None:
        """Random bodies behind a valid header: accepted iff the reference decoder accepts."""
        fast = outcome(lambda: decode_body(frame_type, body))
        try:
            slow: object = reference_decode_body(frame_type, body)
        except Reject:
            slow = RemoteProtocolError
        assert fast == slow

    @settings(max_examples=500)
    @given(mutated_frames())
    def test_mutated_frames_agree_with_the_oracle(self, frame: bytes) -> None:
        """Bit flips, truncations, insertions: decode() accepts iff the oracle does, equally."""
        fast = outcome(lambda: decode(frame))
        try:
            slow: object = reference_decode_frame(frame)
        except Reject:
            slow = RemoteProtocolError
        assert fast == slow

    @settings(max_examples=200)
    @given(st.lists(mutated_frames(), min_size=1, max_size=4), st.sampled_from(Role), st.data())
    def test_mutated_streams(self, frames: list[bytes], role: Role, data: st.DataObject) -> None:
        """Several mutated frames in one stream, cut anywhere, into either end."""
        stream = b"".join(frames)
        cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=8)))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        whole = outcome(lambda: run(Connection(role), [stream]))
        split = outcome(lambda: run(Connection(role), [c for c in chunks if c]))
        assert whole == split


# --- structure-aware mutation: valid CBOR, wrong shape ------------------------------------------

cbor_values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.integers(min_value=-(2**64), max_value=2**64 + 5),
        st.sampled_from([0, 23, 24, 2**63 - 1, 2**63, -1]),
        st.text(max_size=4),
        st.text(min_size=127, max_size=130),
        st.binary(max_size=4),
        st.booleans(),
        st.none(),
        st.floats(),
    ),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=6,
)


def paths(value: Any, prefix: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    """Every position in a nested list, the root included."""
    out = [prefix]
    if isinstance(value, list):
        for i, item in enumerate(value):
            out.extend(paths(item, (*prefix, i)))
    return out


def replace(value: Any, path: tuple[int, ...], new: Any) -> Any:
    if not path:
        return new
    copy = list(value)
    copy[path[0]] = replace(value[path[0]], path[1:], new)
    return copy


@st.composite
def reshaped_bodies(draw: st.DrawFn) -> tuple[FrameType, bytes]:
    """A valid body with one node replaced by other CBOR, or a list grown or shrunk."""
    message = draw(messages)
    tree = cbor2.loads(encode_body(message))
    path = draw(st.sampled_from(paths(tree)))
    action = draw(st.sampled_from(["replace", "append", "pop"]))
    node = tree
    for i in path:
        node = node[i]
    if action == "replace" or not isinstance(node, list):
        tree = replace(tree, path, draw(cbor_values))
    elif action == "append":
        tree = replace(tree, path, [*node, draw(cbor_values)])
    elif node:
        tree = replace(tree, path, node[:-1])
    return FRAME_TYPE_OF[type(message)], cbor2.dumps(tree)


class TestStructuredMutations:
    """Valid CBOR of the wrong shape: the fast decoder agrees with the reference decoder."""

    @settings(max_examples=500)
    @given(reshaped_bodies())
    def test_reshaped_bodies(self, case: tuple[FrameType, bytes]) -> None:
        """Accepted iff the oracle accepts, with equal messages."""
        frame_type, body = case
        fast = outcome(lambda: decode_body(frame_type, body))
        try:
            slow: object = reference_decode_body(frame_type, body)
        except Reject:
            slow = RemoteProtocolError
        assert fast == slow

    def test_item_limit_is_exact(self) -> None:
        """MAX_ITEMS pairs decode; MAX_ITEMS + 1 are refused before any is read."""
        ok = cbor2.dumps([[["c", 1]] * MAX_ITEMS])
        assert len(decode_body(FrameType.NOTIFY, ok).entries) == MAX_ITEMS  # type: ignore[union-attr]
        with pytest.raises(InvalidField):
            decode_body(FrameType.NOTIFY, cbor2.dumps([[["c", 1]] * (MAX_ITEMS + 1)]))


def test_explicit_defaults_reencode_shorter() -> None:
    """A body that spells out defaults decodes, and re-encodes without them."""
    body = b"\x86\x61c\x01\x61s\x40\x00\x00"
    message: Message = decode_body(FrameType.PUSH, body)
    assert encode_body(message) == b"\x84\x61c\x01\x61s\x40"
