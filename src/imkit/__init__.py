"""imkit: instant-messaging building blocks for Python.

Floor 1 (pure, no I/O, time passed in as ``now_ms``): :mod:`imkit.hashring`,
:mod:`imkit.timingwheel`, :mod:`imkit.dedup`, :mod:`imkit.seq`, :mod:`imkit.policy`,
:mod:`imkit.protocol`, :mod:`imkit.routetable`, :mod:`imkit.merger`,
:mod:`imkit.session`. Floor 2: :mod:`imkit.store`. Floor 3: :mod:`imkit.aio`.
"""

from __future__ import annotations

from imkit.errors import (
    AuthError,
    BackendError,
    BadHeader,
    CapacityError,
    ClockRegression,
    ConfigError,
    ConversationNotFound,
    DecompressionError,
    EmptyRingError,
    FrameTooLarge,
    ImkitError,
    InvalidField,
    LocalProtocolError,
    MalformedBody,
    NodeNotFoundError,
    NotLoggedIn,
    ProtocolError,
    QuotaExceeded,
    RemoteProtocolError,
    SendFailed,
    SeqError,
    SessionError,
    StoreError,
    TimeWentBackwards,
    UnexpectedFrame,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "AuthError",
    "BackendError",
    "BadHeader",
    "CapacityError",
    "ClockRegression",
    "ConfigError",
    "ConversationNotFound",
    "DecompressionError",
    "EmptyRingError",
    "FrameTooLarge",
    "ImkitError",
    "InvalidField",
    "LocalProtocolError",
    "MalformedBody",
    "NodeNotFoundError",
    "NotLoggedIn",
    "ProtocolError",
    "QuotaExceeded",
    "RemoteProtocolError",
    "SendFailed",
    "SeqError",
    "SessionError",
    "StoreError",
    "TimeWentBackwards",
    "UnexpectedFrame",
    "__version__",
]
