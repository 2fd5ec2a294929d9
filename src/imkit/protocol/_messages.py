"""The typed messages of the imkit wire protocol, one class per frame type.

Messages are small frozen, slotted, keyword-only attrs classes (nouns, like h11's
events). Field order is wire order: the codec encodes each message as a CBOR array
of its fields in the order declared here. A new field goes at the end, with a
default, and is listed in the schema with the protocol version that introduced it
(``since``); a decoder skips (after checking they are well-formed) up to
``MAX_EXTRA_FIELDS`` trailing fields it does not know. See docs/protocol.md,
"Evolving the protocol".

Which side may send which frame lives in one table, :data:`SENDERS`.
"""

from __future__ import annotations

import enum
from typing import TypeAlias

import attrs

__all__ = [
    "SENDERS",
    "Error",
    "ErrorCode",
    "FrameType",
    "Kick",
    "Login",
    "LoginAck",
    "Message",
    "Notify",
    "Ping",
    "Pong",
    "Push",
    "PushAck",
    "PushBatch",
    "Receipt",
    "Role",
    "Send",
    "SendAck",
    "SyncPage",
    "SyncRequest",
    "SyncResponse",
]


class Role(enum.Enum):
    """Which end of a connection this is."""

    CLIENT = "client"
    SERVER = "server"


class FrameType(enum.IntEnum):
    """The frame type byte of the header."""

    LOGIN = 1
    LOGIN_ACK = 2
    PING = 3
    PONG = 4
    SEND = 5
    SEND_ACK = 6
    PUSH = 7
    PUSH_BATCH = 8
    PUSH_ACK = 9
    SYNC = 10
    SYNC_RESPONSE = 11
    NOTIFY = 12
    RECEIPT = 13
    KICK = 14
    ERROR = 15


class ErrorCode(enum.IntEnum):
    """Codes carried by :class:`SendAck`, :class:`Kick` and :class:`Error`.

    Codes never carry internal details; ``reason`` strings are short and fixed.
    """

    OK = 0
    BAD_REQUEST = 1  # a frame the server cannot act on (validation passed, semantics did not)
    AUTH_FAILED = 2  # bad, expired or foreign token
    NOT_LOGGED_IN = 3  # a frame before login
    NOT_MEMBER = 4  # send to a conversation the user is not in
    TOO_LARGE = 5  # body over the server's per-message limit
    RATE_LIMITED = 6  # frames per second over quota; honour retry_after_ms
    QUOTA_EXCEEDED = 7  # too many unacked sends in flight
    SERVER_BUSY = 8  # overloaded or draining; reconnect elsewhere after retry_after_ms
    PROTOCOL_ERROR = 9  # the peer broke the protocol; the connection closes
    REPLACED = 10  # kicked: the same user/device logged in on another connection
    HEARTBEAT_TIMEOUT = 11  # kicked: no traffic within the heartbeat deadline
    SLOW_CONSUMER = 12  # kicked: write buffer over its high-water mark; resync later
    SHUTDOWN = 13  # server going away; reconnect after retry_after_ms
    INTERNAL = 14  # something failed on the server; safe to retry


@attrs.frozen(kw_only=True)
class Login:
    """Client -> server: the first frame of every connection.

    ``resume`` is the session id from an earlier :class:`LoginAck` ("" for a fresh
    session); the server resumes it if it is still within its grace period.
    ``min_version`` / ``max_version`` (protocol version 2): the range of protocol
    versions the client speaks; the server picks the highest it speaks too. A
    Login without them (a version 1 client) offers exactly version 1.
    """

    token: str
    device: str
    resume: str = ""
    min_version: int = 1
    max_version: int = 1


@attrs.frozen(kw_only=True)
class LoginAck:
    """Server -> client: login accepted, with the server's timing hints.

    ``heartbeat_ms``: ping at least this often. ``reconnect_min_ms`` /
    ``reconnect_max_ms``: bounds of the client's full-jitter reconnect backoff.

    Since protocol version 2 (sent only to a client that offered it):
    ``version``, the protocol version chosen for this connection (absent: 1);
    the server's per-connection limits the client must stay under,
    ``max_frames_per_s`` and ``frame_burst`` (its token bucket over every frame
    after Login) and ``max_sends_in_flight`` (0: not announced).
    """

    uid: str
    session: str
    resumed: bool = False
    heartbeat_ms: int = 30_000
    reconnect_min_ms: int = 500
    reconnect_max_ms: int = 30_000
    server_ms: int = 0
    version: int = 1
    max_frames_per_s: int = 0
    frame_burst: int = 0
    max_sends_in_flight: int = 0


@attrs.frozen(kw_only=True)
class Ping:
    """Client -> server heartbeat. Any traffic resets the deadline; Ping is for idle links."""

    nonce: int = 0


@attrs.frozen(kw_only=True)
class Pong:
    """Server -> client answer to :class:`Ping`, echoing its nonce."""

    nonce: int = 0
    server_ms: int = 0


@attrs.frozen(kw_only=True)
class Send:
    """Client -> server: a message for a conversation.

    ``cid`` is the client's id for this send, increasing within a session and
    unique per user; resending the same cid is answered with the same seq.
    """

    cid: int
    conv: str
    body: bytes
    client_ms: int = 0


@attrs.frozen(kw_only=True)
class SendAck:
    """Server -> client: the send with ``cid`` is stored as ``seq`` (or failed: ``error``).

    ``retry_after_ms`` (protocol version 2): with a transient ``error``
    (SERVER_BUSY, INTERNAL, ...), when the client should send it again.
    """

    cid: int
    conv: str
    seq: int = 0
    msg_id: int = 0
    server_ms: int = 0
    error: int = 0
    retry_after_ms: int = 0


@attrs.frozen(kw_only=True)
class Push:
    """Server -> client: one stored message of a conversation."""

    conv: str
    seq: int
    sender: str
    body: bytes
    msg_id: int = 0
    server_ms: int = 0


@attrs.frozen(kw_only=True)
class PushBatch:
    """Server -> client: several pushes in one frame (merged window, usually compressed)."""

    pushes: tuple[Push, ...]


@attrs.frozen(kw_only=True)
class PushAck:
    """Client -> server: pushes of ``conv`` received up to ``seq``.

    ``cumulative=True`` acknowledges everything up to and including ``seq``;
    ``False`` acknowledges only that seq.
    """

    conv: str
    seq: int
    cumulative: bool = True


@attrs.frozen(kw_only=True)
class SyncRequest:
    """Client -> server: "send me what came after these seqs".

    ``after`` is a tuple of (conversation, last seq the client holds contiguously);
    an empty tuple asks for every conversation with something new (the inbox).
    """

    req_id: int
    after: tuple[tuple[str, int], ...] = ()
    limit: int = 100


@attrs.frozen(kw_only=True)
class SyncPage:
    """One conversation's page inside a :class:`SyncResponse`."""

    conv: str
    messages: tuple[Push, ...]
    more: bool = False


@attrs.frozen(kw_only=True)
class SyncResponse:
    """Server -> client: the answer to :class:`SyncRequest` ``req_id``."""

    req_id: int
    pages: tuple[SyncPage, ...] = ()


@attrs.frozen(kw_only=True)
class Notify:
    """Server -> client pull signal: these conversations have messages up to these seqs.

    Used for big groups (read fan-out): the client syncs instead of receiving pushes.
    The :class:`~imkit.merger.SignalAggregator` collapses signals into one Notify.
    """

    entries: tuple[tuple[str, int], ...]


@attrs.frozen(kw_only=True)
class Receipt:
    """Read receipt: ``reader`` has read ``conv`` up to ``seq``.

    Client -> server with ``reader=""`` (the identity comes from the session);
    server -> client with the reader filled in.
    """

    conv: str
    seq: int
    reader: str = ""


@attrs.frozen(kw_only=True)
class Kick:
    """Server -> client: the server closes this connection (see :class:`ErrorCode`)."""

    code: int
    reason: str = ""
    retry_after_ms: int = 0


@attrs.frozen(kw_only=True)
class Error:
    """Either direction: an error that does not close the connection by itself."""

    code: int
    reason: str = ""
    retry_after_ms: int = 0


Message: TypeAlias = (
    Login
    | LoginAck
    | Ping
    | Pong
    | Send
    | SendAck
    | Push
    | PushBatch
    | PushAck
    | SyncRequest
    | SyncResponse
    | Notify
    | Receipt
    | Kick
    | Error
)

_C = frozenset({Role.CLIENT})
_S = frozenset({Role.SERVER})
_BOTH = frozenset({Role.CLIENT, Role.SERVER})

#: frame type -> (message class, the roles allowed to send it). The one table.
SENDERS: dict[FrameType, tuple[type[Message], frozenset[Role]]] = {
    FrameType.LOGIN: (Login, _C),
    FrameType.LOGIN_ACK: (LoginAck, _S),
    FrameType.PING: (Ping, _C),
    FrameType.PONG: (Pong, _S),
    FrameType.SEND: (Send, _C),
    FrameType.SEND_ACK: (SendAck, _S),
    FrameType.PUSH: (Push, _S),
    FrameType.PUSH_BATCH: (PushBatch, _S),
    FrameType.PUSH_ACK: (PushAck, _C),
    FrameType.SYNC: (SyncRequest, _C),
    FrameType.SYNC_RESPONSE: (SyncResponse, _S),
    FrameType.NOTIFY: (Notify, _S),
    FrameType.RECEIPT: (Receipt, _BOTH),
    FrameType.KICK: (Kick, _S),
    FrameType.ERROR: (Error, _BOTH),
}
