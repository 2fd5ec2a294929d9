"""The whole exception tree of imkit, in one place.

Every error imkit raises derives from :class:`ImkitError`, so ``except
ImkitError`` catches them all. Two kinds pass through unchanged, on purpose:
``OSError`` from the operating system (a refused connect, a reset socket; the
reconnecting client keeps it in ``last_error`` and retries) and ``AssertionError``
from a ``_check()`` invariant method (a bug in imkit). Where an error is also the
matching builtin, it derives from that builtin too (a missing ring node is a ``KeyError``, a bad
argument is a ``ValueError``), so callers can catch either. Errors carry data as
attributes and build their message in ``__str__``; the message never carries
internal details meant for a peer.

::

    ImkitError
    ├── ConfigError (ValueError)               bad constructor / call arguments
    ├── UsageError (TypeError)                 the API used the wrong way (a hand-built handle)
    ├── StateError (RuntimeError)              not allowed now (closed, not started)
    ├── CapacityError                          a documented limit was reached
    ├── EmptyRingError (LookupError)           lookup on a ring with no nodes
    ├── NodeNotFoundError (KeyError)           remove() of a node that is not on the ring
    ├── TimeWentBackwards (ValueError)         now_ms smaller than a previous now_ms
    ├── ClockRegression                        id generator clock stepped back too far
    ├── ProtocolError                          anything wrong on the wire
    │   ├── LocalProtocolError                 this side misused the API
    │   └── RemoteProtocolError                the peer sent bad bytes
    │       ├── FrameTooLarge                  .size, .max_size
    │       ├── BadHeader                      magic, version, frame type, flags, zero length
    │       ├── MalformedBody                  not strict CBOR / not the message schema
    │       ├── InvalidField                   .field, .reason: a value out of range or empty
    │       ├── DecompressionError             LZ4 body corrupt or over its max size
    │       ├── UnexpectedFrame                a frame type this side must never receive
    │       └── TruncatedFrame                 .received, .expected: EOF inside a frame
    ├── SessionError                           the delivery state machines
    │   ├── AuthError                          bad, expired or foreign token
    │   └── SendError                          a send was given up (refused, or out of retries)
    ├── SeqError                               seq allocation
    ├── StoreError                             message store backends
    │   ├── ConversationNotFound (KeyError)
    │   ├── UserNotFound (KeyError)
    │   └── NotMember                          e.g. a read cursor of a non-member
    ├── BackendError                           bus / discovery / redis / nats failures
    │   └── HttpError                          .url, .status, .body: a non-2xx HTTP answer
    └── ConnectionClosed (ConnectionError)     .code, .reason: the aio connection is closed
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BackendError",
    "BadHeader",
    "CapacityError",
    "ClockRegression",
    "ConfigError",
    "ConnectionClosed",
    "ConversationNotFound",
    "DecompressionError",
    "EmptyRingError",
    "FrameTooLarge",
    "HttpError",
    "ImkitError",
    "InvalidField",
    "LocalProtocolError",
    "MalformedBody",
    "NodeNotFoundError",
    "NotMember",
    "ProtocolError",
    "RemoteProtocolError",
    "SendError",
    "SeqError",
    "SessionError",
    "StateError",
    "StoreError",
    "TimeWentBackwards",
    "TruncatedFrame",
    "UnexpectedFrame",
    "UsageError",
    "UserNotFound",
]


class ImkitError(Exception):
    """Root of every error imkit raises."""


class ConfigError(ImkitError, ValueError):
    """An argument is outside what the structure accepts (a size of 0, a negative limit)."""


class UsageError(ImkitError, TypeError):
    """The API was used the wrong way: e.g. a timer handle built by hand, not by ``add()``."""


class StateError(ImkitError, RuntimeError):
    """A call the object's state does not allow: used after ``close()``, or before ``start()``."""


class CapacityError(ImkitError):
    """A documented limit was reached; the operation was refused and nothing was lost.

    ``limit`` names the limit (the constructor keyword), ``value`` is its setting.
    """

    def __init__(self, limit: str, value: int, detail: str = "") -> None:
        super().__init__(limit, value, detail)
        self.limit = limit
        self.value = value
        self.detail = detail

    def __str__(self) -> str:
        extra = f": {self.detail}" if self.detail else ""
        return f"limit {self.limit}={self.value} reached{extra}"


class EmptyRingError(ImkitError, LookupError):
    """A lookup was made on a ring that holds no node."""

    def __str__(self) -> str:
        return "the ring has no nodes"


class NodeNotFoundError(ImkitError, KeyError):
    """``remove(node)`` of a node that is not on the ring."""

    def __init__(self, node: object) -> None:
        super().__init__(node)
        self.node = node

    def __str__(self) -> str:
        return f"node {self.node!r} is not on the ring"


# --- time -----------------------------------------------------------------------


class TimeWentBackwards(ImkitError, ValueError):
    """``now_ms`` went backwards: structures driven by time accept only monotonic time."""

    def __init__(self, now_ms: int, last_ms: int) -> None:
        super().__init__(now_ms, last_ms)
        self.now_ms = now_ms
        self.last_ms = last_ms

    def __str__(self) -> str:
        return f"now_ms={self.now_ms} is before the last time seen ({self.last_ms})"


class ClockRegression(ImkitError):
    """The id generator's clock stepped back further than it is allowed to wait out."""

    def __init__(self, wall_ms: int, last_ms: int) -> None:
        super().__init__(wall_ms, last_ms)
        self.wall_ms = wall_ms
        self.last_ms = last_ms

    def __str__(self) -> str:
        return f"clock went back from {self.last_ms} to {self.wall_ms} ms"


# --- protocol -------------------------------------------------------------------


class ProtocolError(ImkitError):
    """Anything wrong on the wire."""


class LocalProtocolError(ProtocolError):
    """This side misused the API (e.g. a client tried to send a server-only frame)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol. The connection must be closed.

    The decoder promises that arbitrary input yields only messages or a subclass of
    this error; any other exception is a bug in imkit.
    """


class FrameTooLarge(RemoteProtocolError):
    """A frame's declared (or decompressed) size is above the limit."""

    def __init__(self, size: int, max_size: int) -> None:
        super().__init__(size, max_size)
        self.size = size
        self.max_size = max_size

    def __str__(self) -> str:
        return f"frame of {self.size} bytes exceeds max_frame_size={self.max_size}"


class BadHeader(RemoteProtocolError):
    """Bad magic, version, frame type or flags, or a zero body length."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"bad frame header: {self.reason}"


class MalformedBody(RemoteProtocolError):
    """The body is not strict CBOR or does not match the message schema."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"malformed body: {self.reason}"


class InvalidField(RemoteProtocolError):
    """A decoded field has the wrong type, is out of range, or is empty but required."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return f"invalid field {self.field!r}: {self.reason}"


class DecompressionError(RemoteProtocolError):
    """An LZ4 body is corrupt or would decompress past its maximum size."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot decompress body: {self.reason}"


class UnexpectedFrame(RemoteProtocolError):
    """A frame type this side must never receive (a server-only frame sent by a client)."""

    def __init__(self, frame_type: str, role: str) -> None:
        super().__init__(frame_type, role)
        self.frame_type = frame_type
        self.role = role

    def __str__(self) -> str:
        return f"{self.frame_type} frames may not be sent to the {self.role}"


class TruncatedFrame(RemoteProtocolError):
    """The stream ended (EOF) inside a frame: ``received`` of its ``expected`` bytes arrived."""

    def __init__(self, received: int, expected: int) -> None:
        super().__init__(received, expected)
        self.received = received
        self.expected = expected

    def __str__(self) -> str:
        return f"stream ended inside a frame after {self.received} of {self.expected} bytes"


# --- session --------------------------------------------------------------------


class SessionError(ImkitError):
    """An error in the delivery state machines."""


class AuthError(SessionError):
    """A login token is invalid, expired, or bound to another user or device."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"authentication failed: {self.reason}"


class SendError(SessionError):
    """A send was given up: the server refused it (``code``), or no answer came.

    ``code`` is the server's ``ErrorCode`` (``NOT_MEMBER``, ``TOO_LARGE``, ...: not
    stored); 0 means the retries ran out unanswered (the outcome is unknown: a sync
    of the conversation shows whether it was stored).
    """

    def __init__(self, cid: int, attempts: int, code: int = 0) -> None:
        super().__init__(cid, attempts, code)
        self.cid = cid
        self.attempts = attempts
        self.code = code

    def __str__(self) -> str:
        if self.code:
            return f"send cid={self.cid} refused by the server (error code {self.code})"
        return f"send cid={self.cid} unacknowledged after {self.attempts} attempts"


# --- seq ------------------------------------------------------------------------


class SeqError(ImkitError):
    """Seq allocation failed (e.g. the ceiling could not be persisted)."""


# --- store ----------------------------------------------------------------------


class StoreError(ImkitError):
    """A message store backend failed."""


class ConversationNotFound(StoreError, KeyError):
    """The conversation does not exist in the store."""

    def __init__(self, conv: str) -> None:
        super().__init__(conv)
        self.conv = conv

    def __str__(self) -> str:
        return f"conversation {self.conv!r} not found"


class UserNotFound(StoreError, KeyError):
    """The user is not registered in the store."""

    def __init__(self, uid: str) -> None:
        super().__init__(uid)
        self.uid = uid

    def __str__(self) -> str:
        return f"user {self.uid!r} not found"


class NotMember(StoreError):
    """The user is not a member of the conversation (e.g. setting its read cursor)."""

    def __init__(self, uid: str, conv: str) -> None:
        super().__init__(uid, conv)
        self.uid = uid
        self.conv = conv

    def __str__(self) -> str:
        return f"user {self.uid!r} is not a member of conversation {self.conv!r}"


# --- backends -------------------------------------------------------------------


class BackendError(ImkitError):
    """A bus, discovery or storage backend (memory, redis, nats) failed."""


# --- aio ------------------------------------------------------------------------


class HttpError(BackendError):
    """An HTTP server answered ``status`` (not 2xx); ``body`` is its parsed JSON body.

    ``body`` is None when the answer had no JSON body or a larger one than the
    caller's bound (``examples/httpclient.fetch_json``'s ``max_error_body``). The
    message quotes the body's ``"error"`` string, if any, cut to 200 characters.
    """

    def __init__(self, url: str, status: int, body: object = None) -> None:
        super().__init__(url, status, body)
        self.url = url
        self.status = status
        self.body = body

    def __str__(self) -> str:
        text = f"GET {self.url}: HTTP {self.status}"
        error = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(error, str) and error:  # a peer's text: printable characters only
            text += " (" + "".join(c if c.isprintable() else "?" for c in error[:200]) + ")"
        return text


class ConnectionClosed(ImkitError, ConnectionError):
    """The connection is closed; ``code`` is the ErrorCode that closed it (0: normal close)."""

    def __init__(self, code: int = 0, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        extra = f": {self.reason}" if self.reason else ""
        return f"connection closed (code {self.code}){extra}"
