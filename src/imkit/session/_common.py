"""What the parts of a :class:`~imkit.session.ClientSession` share.

The session is three objects on one timing wheel: the outbox (``_outbox.py``:
sends, retries, pacing), the conversations (``_conversations.py``: windows,
cursors, gap syncs) and the state machine that ties them (``_client.py``). They
share the counters (:class:`ClientStats`), the wheel's item kinds, and the cap on
a server's retry hint.
"""

from __future__ import annotations

from typing import Any, Final, TypeAlias

__all__ = ["MAX_RETRY_HINT_MS", "ClientStats", "TimerItem"]

#: A server's retry_after_ms hint is honoured up to 15 minutes: longer than any
#: sane maintenance pause, short enough that a buggy or hostile hint cannot park a
#: client for days (or overflow its timers: the wire allows up to 2**63 - 1 ms).
MAX_RETRY_HINT_MS: Final = 15 * 60_000

#: An item on the session's own wheel: ``(kind, key)``.
TimerItem: TypeAlias = tuple[int, Any]

# timer kinds: heartbeat (the state machine), send retry, hold and pace (the
# outbox), gap and sync (the conversations)
HB, SEND, GAP, SYNC, HOLD, PACE = range(6)


class Counters:
    """Plain int counters named by a subclass's ``__slots__``, all starting at 0."""

    __slots__: tuple[str, ...] = ()

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        """All counters by name. O(counters)."""
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        nonzero = {k: v for k, v in self.as_dict().items() if v}
        return f"{type(self).__name__}({nonzero})"


class ClientStats(Counters):
    """Counters of a client session: every "ignored and counted" case lands here."""

    __slots__ = (
        "acks_coalesced",
        "cursors_forgotten",
        "duplicate_pushes",
        "frames_ignored",
        "pushes_dropped",
        "resends",
        "stale_sync_responses",
        "sync_timeouts",
        "unexpected_frames",
        "unknown_acks",
        "version_fallbacks",
        "windows_evicted",
    )

    duplicate_pushes: int
    frames_ignored: int
    pushes_dropped: int
    resends: int
    stale_sync_responses: int
    sync_timeouts: int
    unknown_acks: int
    unexpected_frames: int
    windows_evicted: int
    cursors_forgotten: int
    acks_coalesced: int
    version_fallbacks: int
