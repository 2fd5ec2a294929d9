"""The client half of the delivery contract: :class:`ClientSession`.

One object per logged-in user device, alive across connections. It numbers
sends with increasing cids and keeps them until acknowledged (resending with the
same cid after a timeout or a reconnect), holds one
:class:`~imkit.dedup.SeqWindow` per conversation so the application sees every
message exactly once and in seq order, acknowledges pushes, pulls what it
missed with sync requests, and times heartbeats. See ``docs/session.md``.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Container, Iterable
from typing import Any

from imkit.dedup import SeqWindow, Verdict
from imkit.errors import CapacityError, ConfigError, LocalProtocolError
from imkit.policy import (
    Backoff,
    ExponentialBackoff,
    HeartbeatAction,
    HeartbeatPolicy,
    HeartbeatTracker,
)
from imkit.timingwheel import TimerHandle, TimingWheel
from tests.compat.v1.protocol import (
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
    Send,
    SendAck,
    SyncRequest,
    SyncResponse,
)
from tests.compat.v1.session._events import (
    CloseConnection,
    ConnectionDead,
    Kicked,
    LoggedIn,
    MessageReceived,
    Output,
    ReceiptReceived,
    SendAcked,
    SendFailure,
    ServerError,
    SessionEvent,
)
from tests.compat.v1.session._state import ClientState, ClientTrigger, client_next

__all__ = [
    "DEFAULT_GAP_DELAY_MS",
    "DEFAULT_LOGIN_TIMEOUT_MS",
    "DEFAULT_MAX_CID_SPAN",
    "DEFAULT_MAX_CONVERSATIONS",
    "DEFAULT_MAX_HELD",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_QUEUED",
    "DEFAULT_MAX_SYNC_CONVS",
    "DEFAULT_RECONNECT",
    "DEFAULT_SEND_RETRY",
    "DEFAULT_SYNC_LIMIT",
    "DEFAULT_SYNC_TIMEOUT_MS",
    "ClientSession",
    "ClientStats",
    "CursorLoader",
    "initial_cid",
]

#: Sends transmitted and not yet acknowledged: the server's per-connection quota
#: (``DEFAULT_MAX_SENDS_IN_FLIGHT`` = 64), so a reconnect's resends never trip it.
DEFAULT_MAX_IN_FLIGHT = 64
#: Sends waiting for a free in-flight slot (offline, or a burst): a long subway
#: ride of typing; past it ``send()`` raises CapacityError and the app keeps the draft.
DEFAULT_MAX_QUEUED = 1024
#: The newest in-flight cid may be at most this far above the oldest: half the
#: server's cid window (``DEFAULT_CID_WINDOW`` = 256), so a resend is never STALE.
DEFAULT_MAX_CID_SPAN = 128
#: Send retries: 2 s, 4 s, 8 s, 16 s after each transmission on a live connection,
#: then give up (30 s after the first try, plus the last 16 s wait). Reconnects
#: resend without counting: a lost connection is not a failed send.
DEFAULT_SEND_RETRY = ExponentialBackoff(base_ms=2_000, cap_ms=16_000, max_attempts=4)
#: Reconnect: full jitter between 0 and 0.5 s doubling to 30 s (AWS "Exponential
#: Backoff And Jitter"); replaced by the server's ``LoginAck`` hints once logged in.
DEFAULT_RECONNECT = Backoff(base_ms=500, cap_ms=30_000)
#: Conversations with a SeqWindow: WeChat caps contacts at 10 000 and groups at a few
#: hundred; past it an idle window is evicted (pass ``cursor_loader`` to restore it).
DEFAULT_MAX_CONVERSATIONS = 10_000
#: Cursors (conversation -> contiguous seq) of evicted windows, so a conversation that
#: comes back resumes where it was instead of at 0 (which would deliver old messages
#: twice). An int per conversation (~100 bytes): ten windows' worth per window slot.
#: Past it the oldest cursor is forgotten (counted): pass ``cursor_loader`` for more.
DEFAULT_MAX_CURSORS = 100_000
#: Messages held per conversation while a gap is open (SeqWindow ``max_pending``):
#: ten sync pages. Past it pushes are left unacknowledged and fetched by sync.
DEFAULT_MAX_HELD = 1024
#: Wait before syncing a gap: one TCP stream never reorders, but pushes of one
#: conversation may come through two logic servers and the bus; 300 ms covers a
#: bus hop (p99 of a few ms) with a wide margin without leaving a real gap open long.
DEFAULT_GAP_DELAY_MS = 300
#: Messages per conversation per sync page (the protocol's default ``limit``).
DEFAULT_SYNC_LIMIT = 100
#: A sync unanswered after 10 s is asked again (the server may have dropped it
#: under quota); the heartbeat catches a dead link separately.
DEFAULT_SYNC_TIMEOUT_MS = 10_000
#: Conversations listed in one SyncRequest: 200 entries of ~30 bytes stay far
#: below the 64 KiB frame limit.
DEFAULT_MAX_SYNC_CONVS = 200
#: Login must be answered within 10 s of connecting, else the connection is dead.
DEFAULT_LOGIN_TIMEOUT_MS = 10_000

#: A server's retry_after_ms hint is honoured up to 15 minutes: longer than any
#: sane maintenance pause, short enough that a buggy or hostile hint cannot park a
#: client for days (or overflow its timers: the wire allows up to 2**63 - 1 ms).
MAX_RETRY_HINT_MS = 15 * 60_000

#: ``cursor_loader(conv) -> seq``: the last seq of ``conv`` the application holds
#: (0 if none); called when the session starts tracking a conversation.
CursorLoader = Callable[[str], int]

# timer kinds on the client's own wheel; an item is (kind, key)
_HB, _SEND, _GAP, _SYNC, _HOLD = range(5)

# SendAck error codes after which the send is retried rather than failed
_RETRYABLE = frozenset(
    {ErrorCode.INTERNAL, ErrorCode.SERVER_BUSY, ErrorCode.RATE_LIMITED, ErrorCode.QUOTA_EXCEEDED}
)
# Kick codes after which reconnecting cannot help
_FINAL_KICKS = frozenset({ErrorCode.AUTH_FAILED, ErrorCode.REPLACED})

_MAX_WALL_MS = 1 << 42  # year 2109


def initial_cid(wall_ms: int, device_slot: int = 0) -> int:
    """The first cid of a new session: ``((wall_ms << 4 | device_slot) << 16) + 1``. O(1).

    The store is idempotent on (sender, cid), so cids must never repeat for a
    user, across sessions and devices. A session started at wall-clock ``wall_ms``
    on device slot ``device_slot`` (0-15, e.g. a hash of the device id) uses cids
    from this value upwards. Another session of the same user can only collide if
    it started in the same millisecond on the same slot, or if one session sends
    more than 65 536 messages per millisecond between the two starts (a million
    messages for a 16 ms head start; never, for a person). The result stays below
    ``2**62``, leaving room to count up.

    >>> initial_cid(0), initial_cid(1), initial_cid(1, device_slot=3)
    (1, 1048577, 1245185)
    """
    if not 0 <= wall_ms < _MAX_WALL_MS:
        raise ConfigError(f"wall_ms must be in [0, 2**42), got {wall_ms}")
    if not 0 <= device_slot < 16:
        raise ConfigError(f"device_slot must be in [0, 16), got {device_slot}")
    return ((wall_ms << 4 | device_slot) << 16) + 1


class ClientStats:
    """Counters of a client session: every "ignored and counted" case lands here."""

    __slots__ = (
        "cursors_forgotten",
        "duplicate_pushes",
        "frames_ignored",
        "pushes_dropped",
        "resends",
        "stale_sync_responses",
        "sync_timeouts",
        "unexpected_frames",
        "unknown_acks",
        "windows_evicted",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        """All counters by name. O(counters)."""
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return f"ClientStats({ {k: v for k, v in self.as_dict().items() if v} })"

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


class _Outgoing:
    """A transmitted, unacknowledged send."""

    __slots__ = ("handle", "msg", "retries", "sent")

    def __init__(self, msg: Send) -> None:
        self.msg = msg
        self.retries = 0  # timer-driven retransmissions on a live connection
        self.sent = 0  # transmissions in all (first, retries, reconnect resends)
        self.handle: TimerHandle[tuple[int, Any]] | None = None


class ClientSession:
    """The client side of the delivery contract, alive across reconnects.

    Driven by its caller (sans-IO): :meth:`connection_made` /
    :meth:`connection_lost` for the transport, :meth:`receive` for every decoded
    frame, :meth:`tick` when :meth:`next_deadline_ms` is reached, and
    :meth:`send` / :meth:`mark_read` / :meth:`sync` for the application. Each call
    returns outputs in order: wire messages (send them), events (for the
    application) and :class:`~tests.compat.v1.session.CloseConnection` (close the transport).

    Guarantees (given a server that keeps the protocol): every message of a
    conversation is handed to the application once, in seq order
    (:class:`~tests.compat.v1.session.MessageReceived`); every send ends with exactly one
    :class:`~tests.compat.v1.session.SendAcked` or :class:`~tests.compat.v1.session.SendFailure`
    (unless the session is closed first); a resend always carries the same cid.

    ``first_cid`` defaults to :func:`initial_cid` of ``now_ms`` -- right only if
    ``now_ms`` is wall-clock milliseconds; otherwise pass
    ``initial_cid(wall_ms)``. ``rng`` supplies the jitter of reconnects and pings
    (seed it in tests). Costs: a push O(1) (O(log held) when out of order), a send
    O(1), a sync page O(messages).
    """

    def __init__(
        self,
        *,
        token: str,
        device: str,
        now_ms: int,
        first_cid: int | None = None,
        heartbeat: HeartbeatPolicy | None = None,
        send_retry: ExponentialBackoff | Backoff = DEFAULT_SEND_RETRY,
        reconnect: Backoff = DEFAULT_RECONNECT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_cid_span: int = DEFAULT_MAX_CID_SPAN,
        max_conversations: int = DEFAULT_MAX_CONVERSATIONS,
        max_held: int = DEFAULT_MAX_HELD,
        gap_delay_ms: int = DEFAULT_GAP_DELAY_MS,
        sync_limit: int = DEFAULT_SYNC_LIMIT,
        sync_timeout_ms: int = DEFAULT_SYNC_TIMEOUT_MS,
        max_sync_convs: int = DEFAULT_MAX_SYNC_CONVS,
        login_timeout_ms: int = DEFAULT_LOGIN_TIMEOUT_MS,
        cursor_loader: CursorLoader | None = None,
        max_cursors: int = DEFAULT_MAX_CURSORS,
        rng: random.Random | None = None,
    ) -> None:
        for name, value in (
            ("max_in_flight", max_in_flight),
            ("max_queued", max_queued),
            ("max_cid_span", max_cid_span),
            ("max_conversations", max_conversations),
            ("max_cursors", max_cursors),
            ("max_held", max_held),
            ("sync_limit", sync_limit),
            ("sync_timeout_ms", sync_timeout_ms),
            ("max_sync_convs", max_sync_convs),
            ("login_timeout_ms", login_timeout_ms),
        ):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if gap_delay_ms < 0:
            raise ConfigError(f"gap_delay_ms must be >= 0, got {gap_delay_ms}")
        if max_cid_span < max_in_flight:
            raise ConfigError("max_cid_span must be >= max_in_flight")
        if not token or not device:
            raise ConfigError("token and device must not be empty")
        if first_cid is None:
            first_cid = initial_cid(now_ms)
        if not 1 <= first_cid < 2**63 - 2**32:
            raise ConfigError(f"first_cid must be in [1, 2**63 - 2**32), got {first_cid}")
        self.token = token
        self.device = device
        self.state = ClientState.DISCONNECTED
        self._live = False  # state is LOGGING_IN or READY (a transport is up)
        self.uid = ""
        self.resume_id = ""
        self.stats = ClientStats()
        self._next_cid = first_cid
        self._rng = rng if rng is not None else random.Random()
        self._wheel: TimingWheel[tuple[int, Any]] = TimingWheel(start_ms=max(now_ms, 0))
        self._hb_policy = heartbeat if heartbeat is not None else HeartbeatPolicy()
        self._hb = HeartbeatTracker(self._hb_policy, now_ms=now_ms)
        self._hb_handle: TimerHandle[tuple[int, Any]] | None = None
        self._connected_ms = now_ms
        self._ping_nonce = 0
        self._send_retry = send_retry
        # without jitter the first delay is a constant: skip the policy call per send
        self._first_retry_ms = (
            send_retry.delay_ms(0) if isinstance(send_retry, ExponentialBackoff) else None
        )
        self._reconnect_default = reconnect
        self._reconnect = reconnect
        self._reconnects = 0
        self._retry_hint_ms = 0
        self._hold_until_ms = now_ms
        self._hold_handle: TimerHandle[tuple[int, Any]] | None = None
        self._max_in_flight = max_in_flight
        self._max_queued = max_queued
        self._max_cid_span = max_cid_span
        self._max_conversations = max_conversations
        self._max_held = max_held
        self._gap_delay_ms = gap_delay_ms
        self._sync_limit = sync_limit
        self._sync_timeout_ms = sync_timeout_ms
        self._max_sync_convs = max_sync_convs
        self._login_timeout_ms = login_timeout_ms
        self._cursor_loader = cursor_loader
        self._max_cursors = max_cursors
        self._cursors: dict[str, int] = {}  # evicted windows' contiguous seqs, oldest first
        self._queue: deque[Send] = deque()
        self._in_flight: dict[int, _Outgoing] = {}
        self._windows: dict[str, SeqWindow[Push]] = {}
        self._gap: dict[str, TimerHandle[tuple[int, Any]]] = {}
        self._sync_inbox = False  # an inbox sync (after=()) is wanted
        self._sync_wanted: dict[str, None] = {}  # conversations to sync (ordered set)
        # conversations to sync that had no free window (bounded by max_conversations)
        self._deferred: dict[str, None] = {}
        self._inbox_after_deferred = False
        self._sync_req: int | None = None  # the outstanding request
        self._sync_after: dict[str, int] | None = None  # its listed cursors; None: inbox
        self._sync_handle: TimerHandle[tuple[int, Any]] | None = None
        self._next_req_id = 1

    def __repr__(self) -> str:
        return (
            f"<ClientSession {self.device} {self.state.value} uid={self.uid!r} "
            f"in_flight={len(self._in_flight)} queued={len(self._queue)} "
            f"conversations={len(self._windows)}>"
        )

    # -- queries -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a transport is up (logging in or ready). O(1)."""
        return self._live

    @property
    def next_cid(self) -> int:
        """The cid the next :meth:`send` will use. O(1)."""
        return self._next_cid

    @property
    def in_flight(self) -> int:
        """Sends transmitted and not yet acknowledged. O(1)."""
        return len(self._in_flight)

    @property
    def queued(self) -> int:
        """Sends waiting for an in-flight slot or a connection. O(1)."""
        return len(self._queue)

    def unacknowledged(self) -> list[Send]:
        """Every send without an answer yet (in flight, then queued), in cid order. O(n)."""
        return [e.msg for e in self._in_flight.values()] + list(self._queue)

    def contiguous(self, conv: str) -> int | None:
        """The last seq of ``conv`` delivered with nothing missing, or None if untracked. O(1)."""
        w = self._windows.get(conv)
        return None if w is None else w.contiguous

    def conversations(self) -> list[str]:
        """The conversations with a SeqWindow. O(n)."""
        return list(self._windows)

    def next_deadline_ms(self) -> int | None:
        """When :meth:`tick` next has something to do (None: nothing timed). O(levels)."""
        return self._wheel.next_deadline_ms()

    # -- transport ---------------------------------------------------------------------

    def connection_made(self, now_ms: int) -> list[Output]:
        """A transport is up: Login, then every unacknowledged send (same cids), then a sync.

        The frames are pipelined: the server handles Login before what follows
        it on the stream. Resends after a reconnect do not count as retries.
        O(in flight). LocalProtocolError if already connected or closed.
        """
        self._go(ClientTrigger.CONNECTION_MADE)
        self._connected_ms = now_ms
        self._hb.reset(now_ms, policy=self._hb_policy, rand=self._rng.random())
        self._hold_until_ms = now_ms
        out: list[Output] = [Login(token=self.token, device=self.device, resume=self.resume_id)]
        wheel = self._wheel
        for cid, e in self._in_flight.items():
            e.sent += 1
            self.stats.resends += 1
            e.handle = wheel.add(now_ms + self._retry_ms(e.retries), (_SEND, cid))
            out.append(e.msg)
        self._pump(now_ms, out)
        self._sync_inbox = True
        self._maybe_sync(now_ms, out)
        self._arm_hb()
        return out

    def connection_lost(self, now_ms: int) -> list[Output]:
        """The transport is gone: stop every timer; keep sends and windows. O(in flight).

        Idempotent. Call :meth:`reconnect_delay_ms` for when to try again.
        """
        self._go(ClientTrigger.CONNECTION_LOST)
        self._drop_connection()
        return []

    def _drop_connection(self) -> None:
        for e in self._in_flight.values():
            if e.handle is not None:
                e.handle.cancel()
                e.handle = None
        for h in self._gap.values():
            h.cancel()
        self._gap.clear()
        self._sync_wanted.clear()
        self._deferred.clear()  # the inbox sync of the next connection covers them
        self._inbox_after_deferred = False
        self._sync_inbox = False
        self._sync_req = None
        self._sync_after = None
        if self._sync_handle is not None:
            self._sync_handle.cancel()
            self._sync_handle = None
        if self._hb_handle is not None:
            self._hb_handle.cancel()
        if self._hold_handle is not None:
            self._hold_handle.cancel()

    def reconnect_delay_ms(self) -> int:
        """How long to wait before the next connection attempt (full jitter). O(1).

        Counts attempts since the last successful login and honours the server's
        last ``retry_after_ms`` (from Kick or Error). Uses the server's
        ``LoginAck`` bounds once known.
        """
        delay = self._reconnect.delay_ms(
            self._reconnects, self._rng.random(), hint_ms=self._retry_hint_ms
        )
        self._reconnects += 1
        self._retry_hint_ms = 0
        return delay

    def close(self, now_ms: int) -> list[Output]:
        """End the session for good (logout). Unacknowledged sends stay readable. O(n)."""
        was_connected = self.connected
        self._go(ClientTrigger.CLOSE)
        self._drop_connection()
        self._queue_to_front()
        return [CloseConnection(code=ErrorCode.OK, reason="closed")] if was_connected else []

    def _queue_to_front(self) -> None:
        # in-flight sends go back to the queue so that unacknowledged() stays whole
        if self._in_flight:
            self._queue.extendleft(reversed([e.msg for e in self._in_flight.values()]))
            self._in_flight.clear()

    # -- application -------------------------------------------------------------------

    def send(self, conv: str, body: bytes, now_ms: int) -> tuple[int, list[Output]]:
        """Queue a message for ``conv``; return its cid and the frames to send now. O(1).

        The send is transmitted at once if connected and the in-flight window has
        room, else when it does. Raises CapacityError when ``max_queued`` sends
        wait already, LocalProtocolError after :meth:`close`.
        """
        if self.state is ClientState.CLOSED:
            raise LocalProtocolError("send() on a closed session")
        if not conv:
            raise ConfigError("conv must not be empty")
        if len(self._queue) >= self._max_queued:
            raise CapacityError("max_queued", self._max_queued, "too many unsent messages")
        cid = self._next_cid
        self._next_cid = cid + 1
        self._queue.append(Send(cid=cid, conv=conv, body=body, client_ms=now_ms))
        out: list[Output] = []
        if self._live:
            self._pump(now_ms, out)
            if out:
                self._hb.on_sent(now_ms)
        return cid, out

    def mark_read(self, conv: str, seq: int, now_ms: int) -> list[Output]:
        """Tell the server ``conv`` was read up to ``seq`` (a Receipt). Nothing offline. O(1)."""
        if not self._live:
            return []
        self._hb.on_sent(now_ms)
        return [Receipt(conv=conv, seq=seq)]

    def set_cursor(self, conv: str, seq: int) -> None:
        """Start tracking ``conv`` after ``seq`` (the app already holds up to it). O(1).

        Only moves forward: a tracked conversation whose cursor is beyond ``seq``
        is left alone. Use before connecting, with cursors from local storage.
        """
        w = self._windows.get(conv)
        if w is None:
            w = self._new_window(conv, seq)
            if w is None:
                raise CapacityError("max_conversations", self._max_conversations)
        elif seq > w.contiguous:
            w.skip_to(seq)

    def sync(self, now_ms: int, convs: Iterable[str] | None = None) -> list[Output]:
        """Ask the server for what came after our cursors (``None``: every conversation).

        One sync is outstanding at a time; more requests queue behind it. Nothing
        while disconnected (every connection starts with an inbox sync anyway).
        O(convs).
        """
        if not self._live:
            return []
        if convs is None:
            self._sync_inbox = True
        else:
            for conv in convs:
                self._want(conv)
        out: list[Output] = []
        self._maybe_sync(now_ms, out)
        self._finish(now_ms, out)
        return out

    # -- frames ------------------------------------------------------------------------

    def receive(self, message: Message, now_ms: int) -> list[Output]:
        """Handle one frame from the server. O(1) per push; O(messages) per sync page.

        A frame a server may not send closes the connection (PROTOCOL_ERROR);
        frames while disconnected are counted and ignored.
        """
        if not self._live:
            self.stats.frames_ignored += 1
            return []
        hb = self._hb
        hb.last_received_ms = max(hb.last_received_ms, now_ms)
        handler = _HANDLERS.get(type(message))
        out: list[Output] = []
        if handler is None:
            self.stats.unexpected_frames += 1
            self._go(ClientTrigger.CONNECTION_LOST)
            self._drop_connection()
            return [CloseConnection(code=ErrorCode.PROTOCOL_ERROR, reason="unexpected frame")]
        handler(self, message, now_ms, out)
        self._finish(now_ms, out)
        return out

    def _finish(self, now_ms: int, out: list[Output]) -> None:
        """Count a frame among ``out`` as outgoing traffic for the heartbeat."""
        if out and self._live:
            for o in out:
                if not isinstance(o, SessionEvent):
                    self._hb.on_sent(now_ms)
                    break

    def _on_login_ack(self, m: LoginAck, now_ms: int, out: list[Output]) -> None:
        if self.state is not ClientState.LOGGING_IN:
            self.stats.unexpected_frames += 1
            return
        self._go(ClientTrigger.LOGIN_ACK)
        self.uid = m.uid
        self.resume_id = m.session
        if m.heartbeat_ms > 0:
            self._hb_policy = self._hb_policy.with_interval(m.heartbeat_ms)
        self._hb.reset(now_ms, policy=self._hb_policy, rand=self._rng.random())
        if 0 < m.reconnect_min_ms <= m.reconnect_max_ms:
            self._reconnect = Backoff(base_ms=m.reconnect_min_ms, cap_ms=m.reconnect_max_ms)
        self._reconnects = 0
        self._arm_hb()
        out.append(LoggedIn(ack=m))

    def _on_pong(self, m: Pong, now_ms: int, out: list[Output]) -> None:
        pass  # receive() already counted the traffic

    def _on_send_ack(self, m: SendAck, now_ms: int, out: list[Output]) -> None:
        e = self._in_flight.get(m.cid)
        if e is None:
            self.stats.unknown_acks += 1
            return
        if not m.error:
            del self._in_flight[m.cid]
            if e.handle is not None:
                e.handle.cancel()
            out.append(
                SendAcked(
                    cid=m.cid, conv=e.msg.conv, seq=m.seq, msg_id=m.msg_id, server_ms=m.server_ms
                )
            )
            if self._queue:
                self._pump(now_ms, out)
            return
        elif m.error in _RETRYABLE and not self._send_retry.exhausted(e.retries):
            # the server did not take it: resend after the back-off (a retry)
            assert e.handle is not None
            e.handle.reschedule(now_ms + self._retry_ms(e.retries))
            return
        else:
            self._settle(e)
            out.append(SendFailure(cid=m.cid, conv=e.msg.conv, code=m.error, attempts=e.sent))
        self._pump(now_ms, out)

    def _settle(self, e: _Outgoing) -> None:
        del self._in_flight[e.msg.cid]
        if e.handle is not None:
            e.handle.cancel()

    def _on_push(self, p: Push, now_ms: int, out: list[Output]) -> None:
        # the common case, kept apart from _on_pushes for speed; same rules
        seq = p.seq
        conv = p.conv
        w = self._windows.get(conv)
        if w is None or seq < 1:
            self._on_pushes((p,), now_ms, out)
            return
        if not self._offer(w, p, out):
            return
        held = seq > w.contiguous
        out.append(PushAck(conv=conv, seq=seq, cumulative=not held))
        if held or conv in self._gap:
            self._watch_gap(conv, w, now_ms)

    def _offer(self, w: SeqWindow[Push], p: Push, out: list[Output]) -> bool:
        """Offer one message to its window and deliver what it releases. O(1) in order.

        Returns False if it was dropped (unacknowledged: the server retries, or a
        sync fetches it). The window has ``max_held + 1`` places and keeps its last
        one for the message that closes the gap, so early messages may fill
        ``max_held`` and the gap-closer is always accepted.
        """
        seq = p.seq
        try:
            verdict = w.offer(seq, p)
        except CapacityError:  # an early push past max_held
            self.stats.pushes_dropped += 1
            return False
        if verdict is not Verdict.NEW:
            self.stats.duplicate_pushes += 1
        elif seq <= w.contiguous:
            for _, push in w.pop_ready():
                out.append(MessageReceived(push=push))
        return True

    def _on_push_batch(self, m: PushBatch, now_ms: int, out: list[Output]) -> None:
        self._on_pushes(m.pushes, now_ms, out)

    def _on_pushes(self, pushes: Iterable[Push], now_ms: int, out: list[Output]) -> None:
        touched: dict[str, SeqWindow[Push]] = {}
        accepted: list[Push] = []
        stats = self.stats
        for p in pushes:
            if p.seq < 1:
                stats.unexpected_frames += 1  # seqs start at 1; 0 is a broken server
                continue
            conv = p.conv
            w = touched.get(conv)
            if w is None:
                w = self._window(conv)
                if w is None:
                    stats.pushes_dropped += 1  # unacked: the server retries, we sync later
                    self._want(conv)
                    continue
                touched[conv] = w
            if self._offer(w, p, out):
                accepted.append(p)
        # Ack: cumulatively up to the highest pushed seq we hold contiguously (never
        # above what this connection pushed), singly for pushes held beyond a gap.
        cumulative: dict[str, int] = {}
        for p in accepted:
            if p.seq <= touched[p.conv].contiguous:
                if p.seq > cumulative.get(p.conv, 0):
                    cumulative[p.conv] = p.seq
            else:
                out.append(PushAck(conv=p.conv, seq=p.seq, cumulative=False))
        for conv, seq in cumulative.items():
            out.append(PushAck(conv=conv, seq=seq))
        for conv, w in touched.items():
            self._watch_gap(conv, w, now_ms)

    def _on_sync_response(self, m: SyncResponse, now_ms: int, out: list[Output]) -> None:
        listed: dict[str, int] | None = None
        if m.req_id == self._sync_req:
            listed = self._sync_after if self._sync_after is not None else {}
            self._sync_req = None
            self._sync_after = None
            if self._sync_handle is not None:
                self._sync_handle.cancel()
                self._sync_handle = None
        else:
            self.stats.stale_sync_responses += 1  # still useful: offer without skipping
            listed = {}
        touched: dict[str, SeqWindow[Push]] = {}
        for page in m.pages:
            conv = page.conv
            w = self._window(conv)
            if w is None:
                self.stats.pushes_dropped += len(page.messages)
                self._want(conv)  # synced again once a window is free
                continue
            touched[conv] = w
            # skip_to is only sound for a conversation we listed: the page then holds
            # every message after our cursor at request time, in seq order.
            skip = conv in listed
            for p in page.messages:
                if p.conv != conv or p.seq < 1:
                    self.stats.unexpected_frames += 1
                    continue
                if skip and p.seq - 1 > w.contiguous:
                    w.skip_to(p.seq - 1)
                    for _, push in w.pop_ready():  # held messages the skip released
                        out.append(MessageReceived(push=push))
                if not self._offer(w, p, out):
                    skip = False  # the rest is no longer "right after" what we hold
            if page.more:
                self._sync_wanted[conv] = None
        for conv, w in touched.items():
            self._watch_gap(conv, w, now_ms)
        self._maybe_sync(now_ms, out)

    def _on_notify(self, m: Notify, now_ms: int, out: list[Output]) -> None:
        for conv, seq in m.entries:
            w = self._windows.get(conv)
            if w is None or seq > w.contiguous:
                self._want(conv)
        self._maybe_sync(now_ms, out)

    def _on_receipt(self, m: Receipt, now_ms: int, out: list[Output]) -> None:
        out.append(ReceiptReceived(receipt=m))

    def _on_kick(self, m: Kick, now_ms: int, out: list[Output]) -> None:
        self._retry_hint_ms = min(max(0, m.retry_after_ms), MAX_RETRY_HINT_MS)
        self._go(ClientTrigger.CONNECTION_LOST)
        self._drop_connection()
        out.append(
            Kicked(
                code=m.code,
                reason=m.reason,
                retry_after_ms=m.retry_after_ms,
                reconnect=m.code not in _FINAL_KICKS,
            )
        )
        out.append(CloseConnection(code=m.code, reason=m.reason))

    def _on_error(self, m: Error, now_ms: int, out: list[Output]) -> None:
        out.append(ServerError(code=m.code, reason=m.reason, retry_after_ms=m.retry_after_ms))
        if m.code in (ErrorCode.RATE_LIMITED, ErrorCode.QUOTA_EXCEEDED) and m.retry_after_ms > 0:
            # hold new sends and due retries until the server is ready again
            until = now_ms + min(m.retry_after_ms, MAX_RETRY_HINT_MS)
            if until > self._hold_until_ms:
                self._hold_until_ms = until
                if self._hold_handle is None:
                    self._hold_handle = self._wheel.add(until, (_HOLD, 0))
                else:
                    self._hold_handle.reschedule(until)
        elif m.code in (ErrorCode.SERVER_BUSY, ErrorCode.SHUTDOWN):
            self._retry_hint_ms = min(max(0, m.retry_after_ms), MAX_RETRY_HINT_MS)

    # -- internals ---------------------------------------------------------------------

    def _go(self, trigger: ClientTrigger) -> None:
        """Take a transition of the table in tests.compat.v1.session._state."""
        self.state = state = client_next(self.state, trigger)
        self._live = state is ClientState.LOGGING_IN or state is ClientState.READY

    def _retry_ms(self, retries: int) -> int:
        if retries == 0 and self._first_retry_ms is not None:
            return self._first_retry_ms
        return self._send_retry.delay_ms(retries, self._rng.random())

    def _pump(self, now_ms: int, out: list[Output]) -> None:
        """Move queued sends into flight while the window allows. O(moved)."""
        queue = self._queue
        if not queue or not self._live or now_ms < self._hold_until_ms:
            return
        in_flight = self._in_flight
        wheel = self._wheel
        first = self._retry_ms(0)
        while queue and len(in_flight) < self._max_in_flight:
            msg = queue[0]
            if in_flight and msg.cid - next(iter(in_flight)) >= self._max_cid_span:
                break  # wait for the oldest send to settle
            queue.popleft()
            e = _Outgoing(msg)
            e.sent = 1
            e.handle = wheel.add(now_ms + first, (_SEND, msg.cid))
            in_flight[msg.cid] = e
            out.append(msg)

    def _want(self, conv: str) -> None:
        """Sync ``conv`` soon: listed if it has (or gets) a window, else deferred."""
        if self._window(conv) is not None:
            self._sync_wanted[conv] = None
        elif conv not in self._deferred:
            if len(self._deferred) < self._max_conversations:
                self._deferred[conv] = None
            else:
                self._inbox_after_deferred = True  # too many to remember: ask for all later

    def _window(self, conv: str, keep: Container[str] = ()) -> SeqWindow[Push] | None:
        w = self._windows.get(conv)
        if w is not None:
            return w
        after = self._cursors.get(conv, 0)
        if self._cursor_loader is not None:
            after = max(after, self._cursor_loader(conv))
        w = self._new_window(conv, after, keep)
        if w is not None:
            self._cursors.pop(conv, None)
        return w

    def _new_window(
        self, conv: str, after: int, keep: Container[str] = ()
    ) -> SeqWindow[Push] | None:
        windows = self._windows
        if len(windows) >= self._max_conversations:
            victim = next(
                (
                    c
                    for c, w in windows.items()
                    if w.highest_seen == w.contiguous
                    and not w.pending
                    and c not in self._gap
                    and c not in self._sync_wanted
                    and (self._sync_after is None or c not in self._sync_after)
                    and c not in keep
                ),
                None,
            )
            if victim is None:
                return None
            self._remember(victim, windows.pop(victim).contiguous)
            self.stats.windows_evicted += 1
        # one slot above max_held: room for the message that closes a gap (see _offer)
        w: SeqWindow[Push] = SeqWindow(after, max_pending=self._max_held + 1)
        windows[conv] = w
        return w

    def _remember(self, conv: str, contiguous: int) -> None:
        """Keep an evicted window's cursor (bounded: the oldest is forgotten). O(1)."""
        cursors = self._cursors
        if contiguous <= 0:
            return
        if conv not in cursors and len(cursors) >= self._max_cursors:
            del cursors[next(iter(cursors))]
            self.stats.cursors_forgotten += 1
        cursors[conv] = contiguous

    def _watch_gap(self, conv: str, w: SeqWindow[Push], now_ms: int) -> None:
        h = self._gap.get(conv)
        if w.highest_seen > w.contiguous:
            if h is None and conv not in self._sync_wanted:
                self._gap[conv] = self._wheel.add(now_ms + self._gap_delay_ms, (_GAP, conv))
        elif h is not None:
            h.cancel()
            del self._gap[conv]

    def _maybe_sync(self, now_ms: int, out: list[Output]) -> None:
        """Send the next sync request if none is outstanding. O(convs listed)."""
        if self._sync_req is not None or not self._live:
            return
        if self._sync_inbox:
            self._sync_inbox = False
            after: tuple[tuple[str, int], ...] = ()
            self._sync_after = None
        elif self._sync_wanted:
            wanted = self._sync_wanted
            take = []
            for conv in wanted:
                take.append(conv)
                if len(take) >= self._max_sync_convs:
                    break
            listed: dict[str, int] = {}
            for conv in take:
                del wanted[conv]
                w = self._windows.get(conv)
                if w is not None:
                    listed[conv] = w.contiguous
            if not listed:
                return
            after = tuple(listed.items())
            self._sync_after = listed
        elif self._deferred:
            # conversations the server has news for that had no free window
            listed = {}
            for conv in list(self._deferred):
                w = self._window(conv, keep=listed)
                if w is None:
                    break  # every window is busy: retried after the next answer
                del self._deferred[conv]
                listed[conv] = w.contiguous
                if len(listed) >= self._max_sync_convs:
                    break
            if not listed:
                return
            after = tuple(listed.items())
            self._sync_after = listed
        elif self._inbox_after_deferred:
            self._inbox_after_deferred = False
            after = ()
            self._sync_after = None
        else:
            return
        req_id = self._next_req_id
        self._next_req_id = req_id + 1
        self._sync_req = req_id
        self._sync_handle = self._wheel.add(now_ms + self._sync_timeout_ms, (_SYNC, req_id))
        out.append(SyncRequest(req_id=req_id, after=after, limit=self._sync_limit))

    def _arm_hb(self) -> None:
        if self.state is ClientState.LOGGING_IN:
            due = self._connected_ms + self._login_timeout_ms
        else:
            due = self._hb.next_deadline_ms()
        if self._hb_handle is None:
            self._hb_handle = self._wheel.add(due, (_HB, 0))
        else:
            self._hb_handle.reschedule(due)

    # -- timers ------------------------------------------------------------------------

    def tick(self, now_ms: int) -> list[Output]:
        """Run every timer due at ``now_ms``: pings, death, resends, gap syncs. O(due).

        Call it when :meth:`next_deadline_ms` is reached (earlier calls are cheap).
        """
        out: list[Output] = []
        due = self._wheel.advance(now_ms)
        for kind, key in due:
            if not self._live:
                break
            if kind == _SEND:
                self._on_send_timer(key, now_ms, out)
            elif kind == _HB:
                self._on_hb_timer(now_ms, out)
            elif kind == _GAP:
                self._on_gap_timer(key, now_ms, out)
            elif kind == _SYNC:
                self._on_sync_timer(key, now_ms, out)
            else:  # _HOLD
                self._pump(now_ms, out)
        self._finish(now_ms, out)
        return out

    def _on_send_timer(self, cid: int, now_ms: int, out: list[Output]) -> None:
        e = self._in_flight.get(cid)
        if e is None or e.handle is None:
            return
        if now_ms < self._hold_until_ms:
            e.handle.reschedule(self._hold_until_ms)
            return
        retry = self._send_retry
        if retry.exhausted(e.retries):
            self._settle(e)
            out.append(SendFailure(cid=cid, conv=e.msg.conv, code=0, attempts=e.sent))
            self._pump(now_ms, out)
            return
        e.retries += 1
        e.sent += 1
        self.stats.resends += 1
        e.handle.reschedule(now_ms + self._retry_ms(e.retries))
        out.append(e.msg)

    def _on_hb_timer(self, now_ms: int, out: list[Output]) -> None:
        if self.state is ClientState.LOGGING_IN:
            if now_ms >= self._connected_ms + self._login_timeout_ms:
                self._dead(now_ms, out)
                return
        else:
            action = self._hb.poll(now_ms, rand=self._rng.random())
            if action is HeartbeatAction.DEAD:
                self._dead(now_ms, out)
                return
            if action is HeartbeatAction.PING:
                self._ping_nonce += 1
                out.append(Ping(nonce=self._ping_nonce))
        self._arm_hb()

    def _dead(self, now_ms: int, out: list[Output]) -> None:
        silent = now_ms - self._hb.last_received_ms
        self._go(ClientTrigger.CONNECTION_LOST)
        self._drop_connection()
        out.append(ConnectionDead(silent_ms=silent))
        out.append(CloseConnection(code=ErrorCode.HEARTBEAT_TIMEOUT, reason="heartbeat timeout"))

    def _on_gap_timer(self, conv: str, now_ms: int, out: list[Output]) -> None:
        self._gap.pop(conv, None)
        w = self._windows.get(conv)
        if w is not None and w.highest_seen > w.contiguous:
            self._sync_wanted[conv] = None
            self._maybe_sync(now_ms, out)

    def _on_sync_timer(self, req_id: int, now_ms: int, out: list[Output]) -> None:
        if req_id != self._sync_req:
            return
        self.stats.sync_timeouts += 1
        if self._sync_after is None:
            self._sync_inbox = True
        else:
            for conv in self._sync_after:
                self._sync_wanted[conv] = None
        self._sync_req = None
        self._sync_after = None
        self._sync_handle = None
        self._maybe_sync(now_ms, out)

    # -- invariants --------------------------------------------------------------------

    def _check(self) -> None:
        """Assert every invariant (tests call this after each step). O(state size)."""

        def fail(msg: str) -> None:
            raise AssertionError(f"ClientSession {self.device}: {msg}")

        if len(self._cursors) > self._max_cursors:
            fail(f"{len(self._cursors)} cursors > max_cursors {self._max_cursors}")
        if any(c in self._windows for c in self._cursors):
            fail("a conversation has both a window and an evicted cursor")
        connected = self._live
        cids = list(self._in_flight)
        if cids != sorted(cids):
            fail("in-flight sends out of cid order")
        queued = [m.cid for m in self._queue]
        if queued != sorted(queued):
            fail("queued sends out of cid order")
        if cids and queued and cids[-1] >= queued[0]:
            fail("a queued send is older than one in flight")
        if (cids + queued) and max(cids + queued) >= self._next_cid:
            fail("a send has a cid not below next_cid")
        if len(cids) > self._max_in_flight:
            fail("more sends in flight than max_in_flight")
        if len(queued) > self._max_queued:
            fail("more sends queued than max_queued")
        if cids and cids[-1] - cids[0] >= self._max_cid_span:
            fail("in-flight cid span over max_cid_span")
        for cid, e in self._in_flight.items():
            if e.msg.cid != cid:
                fail("in-flight entry under the wrong cid")
            pending = e.handle is not None and e.handle.pending
            if pending != connected:
                fail(f"send {cid}: retry timer pending={pending} while connected={connected}")
            if e.sent < e.retries + 1:
                fail(f"send {cid}: fewer transmissions than retries")
        if self.state is ClientState.CLOSED and self._in_flight:
            fail("closed with sends in flight")
        if len(self._windows) > self._max_conversations:
            fail("more windows than max_conversations")
        for w in self._windows.values():
            w._check()
            if w.pending and w.highest_seen == w.contiguous:
                fail("a window holds released messages nobody popped")
            if w.pending > self._max_held:
                fail("a window holds more than max_held messages")
        for conv, h in self._gap.items():
            if conv not in self._windows:
                fail(f"gap timer for untracked {conv!r}")
            if not h.pending:
                fail(f"gap timer for {conv!r} not pending")
        if not set(self._sync_wanted) <= set(self._windows):
            fail("sync wanted for an untracked conversation")
        if len(self._deferred) > self._max_conversations:
            fail("more deferred syncs than max_conversations")
        if (self._sync_req is None) != (self._sync_handle is None):
            fail("outstanding sync and its timer out of step")
        if self._sync_req is None and self._sync_after is not None:
            fail("listed cursors without an outstanding sync")
        if not connected:
            if self._gap or self._sync_req is not None or self._sync_wanted or self._deferred:
                fail("sync work while disconnected")
            if self._hb_handle is not None and self._hb_handle.pending:
                fail("heartbeat timer pending while disconnected")
        elif self._hb_handle is None or not self._hb_handle.pending:
            fail("connected without a heartbeat timer")
        self._hb._check()


_Handler = Callable[[ClientSession, Any, int, list[Output]], None]
#: frame type -> handler. Frames not here may not be sent by a server.
_HANDLERS: dict[type, _Handler] = {
    LoginAck: ClientSession._on_login_ack,
    Pong: ClientSession._on_pong,
    SendAck: ClientSession._on_send_ack,
    Push: ClientSession._on_push,
    PushBatch: ClientSession._on_push_batch,
    SyncResponse: ClientSession._on_sync_response,
    Notify: ClientSession._on_notify,
    Receipt: ClientSession._on_receipt,
    Kick: ClientSession._on_kick,
    Error: ClientSession._on_error,
}
