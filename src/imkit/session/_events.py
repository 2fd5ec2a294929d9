"""What sessions output besides wire messages: application events and close requests.

Every method of :class:`~imkit.session.ClientSession` and
:class:`~imkit.session.ServerSession` returns a list of outputs. An output is
either a wire message (a :mod:`imkit.protocol` message object: hand it to the
protocol connection, which encodes it) or a :class:`SessionEvent` (hand it to the
application, or -- for :class:`CloseConnection` -- close the transport).
``isinstance(out, SessionEvent)`` tells them apart.

Events are small frozen, slotted, keyword-only attrs classes named with nouns or
past participles, like h11's events.
"""

from __future__ import annotations

from typing import TypeAlias

import attrs

from imkit.protocol import LoginAck, Message, Push, Receipt

__all__ = [
    "CloseConnection",
    "ConnectionDead",
    "Kicked",
    "LoggedIn",
    "MessageReceived",
    "Output",
    "PushAcked",
    "ReceiptPosted",
    "ReceiptReceived",
    "SendAcked",
    "SendFailed",
    "SendRequested",
    "ServerError",
    "SessionEvent",
    "SessionStarted",
    "SyncRequested",
]


@attrs.frozen
class SessionEvent:
    """Base class of every non-wire output of a session."""


# --- both sides -------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class CloseConnection(SessionEvent):
    """Close the transport now (after writing the frames that precede this output).

    ``code`` is an :class:`~imkit.protocol.ErrorCode` saying why (0 for a normal close).
    """

    code: int
    reason: str = ""


# --- client side ------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LoggedIn(SessionEvent):
    """Client: the server accepted the login. ``ack`` carries the server's timing hints."""

    ack: LoginAck


@attrs.frozen(kw_only=True)
class MessageReceived(SessionEvent):
    """Client: a message for the application. Exactly once per (conv, seq), in seq order."""

    push: Push


@attrs.frozen(kw_only=True)
class SendAcked(SessionEvent):
    """Client: the send ``cid`` is stored as ``seq`` of ``conv``; it will never be lost."""

    cid: int
    conv: str
    seq: int
    msg_id: int = 0
    server_ms: int = 0


@attrs.frozen(kw_only=True)
class SendFailed(SessionEvent):
    """Client: the send ``cid`` was given up after ``attempts`` transmissions.

    ``code`` is the server's :class:`~imkit.protocol.ErrorCode` when the server
    refused the message (``NOT_MEMBER``, ``TOO_LARGE``, ...): it was not stored.
    ``code == 0`` means no answer came before the retries ran out: the outcome is
    unknown (it may have been stored; a sync of ``conv`` will show it).
    """

    cid: int
    conv: str
    code: int
    attempts: int


@attrs.frozen(kw_only=True)
class ReceiptReceived(SessionEvent):
    """Client: a read receipt from another member (``receipt.reader`` is filled in)."""

    receipt: Receipt


@attrs.frozen(kw_only=True)
class Kicked(SessionEvent):
    """Client: the server closed the session (a ``Kick`` frame); see ``reconnect``.

    ``reconnect`` is False for codes where reconnecting cannot help
    (``AUTH_FAILED``, ``REPLACED``); ``retry_after_ms`` is the server's hint.
    """

    code: int
    reason: str
    retry_after_ms: int
    reconnect: bool


@attrs.frozen(kw_only=True)
class ServerError(SessionEvent):
    """Client: the server reported an ``Error`` frame (the connection stays open)."""

    code: int
    reason: str
    retry_after_ms: int


@attrs.frozen(kw_only=True)
class ConnectionDead(SessionEvent):
    """Client: nothing arrived for ``silent_ms`` (the heartbeat deadline); reconnect."""

    silent_ms: int


# --- server side ------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SessionStarted(SessionEvent):
    """Server: the client logged in as ``uid`` on ``device`` (bind the route now)."""

    uid: str
    device: str
    session: str
    resumed: bool


@attrs.frozen(kw_only=True)
class SendRequested(SessionEvent):
    """Server: store this message and answer with ``ack_send`` or ``fail_send``.

    ``uid``/``device`` come from the session, never from the frame. ``repeat`` is
    True when the cid was seen before but its answer is no longer known to the
    session (the store is idempotent on (uid, cid) and returns the first seq).
    """

    uid: str
    device: str
    cid: int
    conv: str
    body: bytes
    client_ms: int
    repeat: bool = False


@attrs.frozen(kw_only=True)
class SyncRequested(SessionEvent):
    """Server: the client asks for messages after ``after``; answer with ``sync_response``.

    ``after`` lists (conversation, last seq the client holds contiguously); an
    empty tuple means "every conversation of ``uid``". ``limit`` is already
    clamped to the session's ``max_sync_limit``.
    """

    uid: str
    device: str
    req_id: int
    after: tuple[tuple[str, int], ...]
    limit: int


@attrs.frozen(kw_only=True)
class PushAcked(SessionEvent):
    """Server: the client acknowledged pushes of ``conv`` that this session sent.

    ``cumulative=True``: every push of ``conv`` up to and including ``seq`` -- the
    client's claim that it holds ``conv`` contiguously through ``seq`` (a device
    cursor; ``seq`` is never above the highest seq this session pushed in ``conv``).
    ``cumulative=False``: that one seq only (the client holds it beyond a gap).
    Emitted only for an ack that released at least one tracked push: an ack for an
    unknown conversation, a seq never sent or above the highest pushed, or pushes
    already acknowledged or given up, is ignored (``stats.acks_ignored``) and emits
    nothing.
    """

    conv: str
    seq: int
    cumulative: bool = True


@attrs.frozen(kw_only=True)
class ReceiptPosted(SessionEvent):
    """Server: the client read ``receipt.conv`` up to ``receipt.seq``; reader from the session."""

    receipt: Receipt


Output: TypeAlias = Message | SessionEvent
"""One item of a session's output list: a wire message or a :class:`SessionEvent`."""
