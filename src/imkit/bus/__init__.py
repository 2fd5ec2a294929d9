"""The bus (the seed's MQ): route a payload to the process that holds its recipients.

Floor 2. :class:`Bus` and :class:`Subscription` are the interface a backend
implements; :class:`Fanout` is the sans-IO core of the in-process backend (bounded
per-subscriber inboxes with an explicit overflow policy). The asyncio in-memory bus
is :class:`imkit.aio.bus.MemoryBus`. See docs/bus.md.
"""

from __future__ import annotations

from imkit.bus._api import Bus, Subscription
from imkit.bus._fanout import (
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_SUBJECTS,
    DEFAULT_MAX_SUBSCRIBERS,
    Envelope,
    Fanout,
    Inbox,
    Lagged,
    Overflow,
    PublishResult,
)

__all__ = [
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_SUBJECTS",
    "DEFAULT_MAX_SUBSCRIBERS",
    "Bus",
    "Envelope",
    "Fanout",
    "Inbox",
    "Lagged",
    "Overflow",
    "PublishResult",
    "Subscription",
]
