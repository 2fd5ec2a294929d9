"""Hypothesis strategies for imkit's wire messages (shared by every test module).

Every strategy yields only *valid* messages: fields of the right type, within the
limits of docs/protocol.md, required ids non-empty. Boundaries are drawn often:
integers at the CBOR head boundaries (23/24, 255/256, 2**16, 2**32, 2**63 - 1) and
strings at their byte limits, with multi-byte UTF-8 so byte and character lengths
differ.

    from tests.strategies import messages, pushes, server_messages
"""

from __future__ import annotations

from typing import TypeVar

from hypothesis import strategies as st

from imkit.protocol import (
    MAX_ID_BYTES,
    MAX_REASON_BYTES,
    MAX_TOKEN_BYTES,
    MAX_UINT,
    SENDERS,
    Error,
    ErrorCode,
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
    Role,
    Send,
    SendAck,
    SyncPage,
    SyncRequest,
    SyncResponse,
)

__all__ = [
    "bodies",
    "client_messages",
    "error_codes",
    "ids",
    "messages",
    "messages_of",
    "optional_ids",
    "pushes",
    "server_messages",
    "texts",
    "uints",
]

T = TypeVar("T")

#: integers where the CBOR head changes size, and the extremes
UINT_EDGES = (0, 1, 23, 24, 255, 256, 0xFFFF, 0x1_0000, 0xFFFF_FFFF, 0x1_0000_0000, MAX_UINT)

uints: st.SearchStrategy[int] = st.one_of(
    st.sampled_from(UINT_EDGES),
    st.integers(min_value=0, max_value=300),
    st.integers(min_value=0, max_value=MAX_UINT),
)

#: letters of 1 to 4 UTF-8 bytes, no surrogates (they cannot be encoded)
_chars = st.characters(codec="utf-8", exclude_categories=["Cs"])
_wide = st.sampled_from(["a", "é", "你", "😀", "\x00"])


def texts(max_bytes: int, *, min_size: int = 0) -> st.SearchStrategy[str]:
    """Strings of at most ``max_bytes`` UTF-8 bytes (and at least ``min_size`` chars)."""

    def fit(s: str) -> str:
        raw = s.encode()[:max_bytes]
        return raw.decode("utf-8", "ignore")

    short = st.text(_chars, min_size=min_size, max_size=24).map(fit)
    # exactly at (or one multi-byte char short of) the limit
    full = st.tuples(_wide, _wide, st.integers(0, max_bytes)).map(
        lambda t: fit(t[0] * t[2] + t[1] * max_bytes)
    )
    return st.one_of(short, full).filter(lambda s: len(s) >= min_size)


ids: st.SearchStrategy[str] = texts(MAX_ID_BYTES, min_size=1)
optional_ids: st.SearchStrategy[str] = st.one_of(st.just(""), ids)
bodies: st.SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=30),
    st.binary(min_size=40, max_size=200),  # a typical chat message
    st.binary(min_size=250, max_size=300),  # across the 1-byte length head
)
error_codes: st.SearchStrategy[int] = st.one_of(
    st.sampled_from(ErrorCode), st.integers(min_value=0, max_value=len(ErrorCode) - 1)
)
pairs: st.SearchStrategy[tuple[tuple[str, int], ...]] = st.lists(
    st.tuples(ids, uints), max_size=5
).map(tuple)


def _tuples(
    elements: st.SearchStrategy[T], *, min_size: int = 0
) -> st.SearchStrategy[tuple[T, ...]]:
    return st.lists(elements, min_size=min_size, max_size=5).map(tuple)


pushes: st.SearchStrategy[Push] = st.builds(
    Push,
    conv=ids,
    seq=uints,
    sender=ids,
    body=bodies,
    msg_id=st.one_of(st.just(0), uints),
    server_ms=st.one_of(st.just(0), uints),
)

_STRATEGIES: dict[type, st.SearchStrategy[Message]] = {
    Login: st.builds(
        Login,
        token=texts(MAX_TOKEN_BYTES, min_size=1),
        device=ids,
        resume=optional_ids,
        min_version=st.just(1),
        max_version=st.one_of(st.just(1), uints),
    ),
    LoginAck: st.builds(
        LoginAck,
        uid=ids,
        session=ids,
        resumed=st.booleans(),
        heartbeat_ms=st.one_of(st.just(30_000), uints),
        reconnect_min_ms=st.one_of(st.just(500), uints),
        reconnect_max_ms=st.one_of(st.just(30_000), uints),
        server_ms=st.one_of(st.just(0), uints),
        version=st.one_of(st.just(1), uints),
        max_frames_per_s=st.one_of(st.just(0), uints),
        frame_burst=st.one_of(st.just(0), uints),
        max_sends_in_flight=st.one_of(st.just(0), uints),
    ),
    Ping: st.builds(Ping, nonce=st.one_of(st.just(0), uints)),
    Pong: st.builds(Pong, nonce=uints, server_ms=st.one_of(st.just(0), uints)),
    Send: st.builds(Send, cid=uints, conv=ids, body=bodies, client_ms=st.one_of(st.just(0), uints)),
    SendAck: st.builds(
        SendAck,
        cid=uints,
        conv=ids,
        seq=uints,
        msg_id=uints,
        server_ms=uints,
        error=st.one_of(st.just(0), error_codes),
        retry_after_ms=st.one_of(st.just(0), uints),
    ),
    Push: pushes,
    PushBatch: st.builds(PushBatch, pushes=_tuples(pushes, min_size=1)),
    PushAck: st.builds(PushAck, conv=ids, seq=uints, cumulative=st.booleans()),
    SyncRequest: st.builds(
        SyncRequest, req_id=uints, after=pairs, limit=st.one_of(st.just(100), uints)
    ),
    SyncResponse: st.builds(
        SyncResponse,
        req_id=uints,
        pages=_tuples(
            st.builds(SyncPage, conv=ids, messages=_tuples(pushes), more=st.booleans())
        ),
    ),
    Notify: st.builds(Notify, entries=pairs.filter(bool)),
    Receipt: st.builds(Receipt, conv=ids, seq=uints, reader=optional_ids),
    Kick: st.builds(
        Kick, code=error_codes, reason=texts(MAX_REASON_BYTES), retry_after_ms=uints
    ),
    Error: st.builds(
        Error, code=error_codes, reason=texts(MAX_REASON_BYTES), retry_after_ms=uints
    ),
}


def messages_of(cls: type) -> st.SearchStrategy[Message]:
    """Valid messages of one class."""
    return _STRATEGIES[cls]


def _sent_by(role: Role) -> st.SearchStrategy[Message]:
    return st.one_of(
        [_STRATEGIES[cls] for cls, roles in SENDERS.values() if role in roles]
    )


#: any valid message of any frame type
messages: st.SearchStrategy[Message] = st.one_of(list(_STRATEGIES.values()))
#: messages a client may send (what a server receives)
client_messages: st.SearchStrategy[Message] = _sent_by(Role.CLIENT)
#: messages a server may send (what a client receives)
server_messages: st.SearchStrategy[Message] = _sent_by(Role.SERVER)
