"""The client half of the delivery contract: :class:`ClientSession`.

One object per logged-in user device, alive across connections. It is the state
machine (``_state.py``) that ties two parts on one timing wheel:

* the **outbox** (``_outbox.py``): numbers sends with increasing cids and keeps
  them until acknowledged (resending with the same cid after a timeout or a
  reconnect), and paces every frame at the rate the server announced;
* the **conversations** (``_conversations.py``): one
  :class:`~imkit.dedup.SeqWindow` per conversation, so the application sees every
  message exactly once and in seq order; push acks; sync requests for what it
  missed.

This module adds the login (version negotiation, the server's hints), the
heartbeat and reconnect timing, and the dispatch of frames and timers. Its
limits are a :class:`~imkit.session.ClientConfig`. See ``docs/session.md``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

from imkit.errors import ConfigError, LocalProtocolError
from imkit.policy import Backoff, HeartbeatAction, HeartbeatTracker
from imkit.protocol import (
    MIN_PROTOCOL_VERSION,
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
    PushBatch,
    Receipt,
    Send,
    SendAck,
    SyncResponse,
)
from imkit.session._common import (
    GAP,
    HB,
    MAX_RETRY_HINT_MS,
    SYNC,
    ClientStats,
    TimerItem,
)
from imkit.session._config import ClientConfig
from imkit.session._conversations import Conversations, CursorLoader
from imkit.session._events import (
    CloseConnection,
    ConnectionDead,
    Kicked,
    LoggedIn,
    Output,
    ReceiptReceived,
    ServerError,
    SessionEvent,
)
from imkit.session._outbox import Outbox
from imkit.session._state import ClientState, ClientTrigger, client_next
from imkit.timingwheel import TimerHandle, TimingWheel

__all__ = ["ClientSession", "initial_cid"]

# Kick codes after which reconnecting cannot help
_FINAL_KICKS = frozenset({ErrorCode.AUTH_FAILED, ErrorCode.REPLACED})

_MAX_WALL_MS = 1 << 42  # year 2109
_DEFAULT_CONFIG = ClientConfig()


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
    if type(wall_ms) is not int or not 0 <= wall_ms < _MAX_WALL_MS:
        raise ConfigError(f"wall_ms must be an int in [0, 2**42), got {wall_ms!r}")
    if type(device_slot) is not int or not 0 <= device_slot < 16:
        raise ConfigError(f"device_slot must be an int in [0, 16), got {device_slot!r}")
    return ((wall_ms << 4 | device_slot) << 16) + 1


class ClientSession:
    """The client side of the delivery contract, alive across reconnects.

    Driven by its caller (sans-IO): :meth:`connection_made` /
    :meth:`connection_lost` for the transport, :meth:`receive` for every decoded
    frame, :meth:`tick` when :meth:`next_deadline_ms` is reached, and
    :meth:`send` / :meth:`mark_read` / :meth:`sync` for the application. Each call
    returns outputs in order: wire messages (send them), events (for the
    application) and :class:`~imkit.session.CloseConnection` (close the transport).
    Every ``now_ms`` is the caller's monotonic clock.

    Guarantees (given a server that keeps the protocol): every message of a
    conversation is handed to the application once, in seq order
    (:class:`~imkit.session.MessageReceived`); every send ends with exactly one
    :class:`~imkit.session.SendAcked` or :class:`~imkit.session.SendFailed`
    (unless the session is closed first); a resend always carries the same cid.

    ``first_cid`` is where this session's cids start: :func:`initial_cid` of the
    wall clock (a monotonic clock would repeat the cids of an earlier session).
    ``config`` holds every limit and timing (:class:`~imkit.session.ClientConfig`;
    default: all defaults). ``cursor_loader(conv)`` restores an evicted
    conversation's cursor from the application. ``rng`` supplies the jitter of
    reconnects and pings (seed it in tests). Costs: a push O(1) (O(log held) when
    out of order), a send O(1), a sync page O(messages).
    """

    def __init__(
        self,
        *,
        token: str,
        device: str,
        now_ms: int,
        first_cid: int,
        config: ClientConfig | None = None,
        cursor_loader: CursorLoader | None = None,
        rng: random.Random | None = None,
    ) -> None:
        cfg = config if config is not None else _DEFAULT_CONFIG
        if not isinstance(cfg, ClientConfig):
            raise ConfigError(f"config must be a ClientConfig, got {cfg!r}")
        if not isinstance(token, str) or not token or not isinstance(device, str) or not device:
            raise ConfigError("token and device must be non-empty strings")
        if type(now_ms) is not int:
            raise ConfigError(f"now_ms must be an int, got {now_ms!r}")
        if type(first_cid) is not int or not 1 <= first_cid < 2**63 - 2**32:
            raise ConfigError(f"first_cid must be an int in [1, 2**63 - 2**32), got {first_cid!r}")
        self.config = cfg
        self.token = token
        self.device = device
        self.state = ClientState.DISCONNECTED
        self._live = False  # state is LOGGING_IN or READY (a transport is up)
        self.uid = ""
        self.resume_id = ""
        self.stats = ClientStats()
        self._rng = rng if rng is not None else random.Random()
        self._wheel: TimingWheel[TimerItem] = TimingWheel(start_ms=max(now_ms, 0))
        self._outbox = Outbox(
            cfg,
            first_cid=first_cid,
            wheel=self._wheel,
            stats=self.stats,
            rng=self._rng,
            now_ms=now_ms,
        )
        self._convs = Conversations(
            cfg, wheel=self._wheel, stats=self.stats, cursor_loader=cursor_loader
        )
        self._hb_policy = cfg.heartbeat
        self._hb = HeartbeatTracker(self._hb_policy, now_ms=now_ms)
        self._hb_handle: TimerHandle[TimerItem] | None = None
        self._connected_ms = now_ms
        self._login_timeout_ms = cfg.login_timeout_ms
        self._ping_nonce = 0
        self._reconnect = cfg.reconnect
        self._reconnects = 0
        self._retry_hint_ms = 0
        # protocol version: offered range [MIN_PROTOCOL_VERSION, offer], negotiated one
        self.version = MIN_PROTOCOL_VERSION
        self._max_version = cfg.max_version
        self._offered = MIN_PROTOCOL_VERSION
        self._version_fallback_ms = cfg.version_fallback_ms
        self._fallback_until_ms: int | None = None

    def __repr__(self) -> str:
        return (
            f"<ClientSession {self.device} {self.state.value} uid={self.uid!r} "
            f"in_flight={len(self._outbox.in_flight)} queued={len(self._outbox.queue)} "
            f"conversations={len(self._convs.windows)}>"
        )

    # -- queries -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a transport is up (logging in or ready). O(1)."""
        return self._live

    @property
    def next_cid(self) -> int:
        """The cid the next :meth:`send` will use. O(1)."""
        return self._outbox.next_cid

    @property
    def in_flight(self) -> int:
        """Sends transmitted and not yet acknowledged. O(1)."""
        return len(self._outbox.in_flight)

    @property
    def send_timeout_ms(self) -> int | None:
        """The first send timeout now: ``send_retry``'s first delay, adapted to the
        server's measured answer time (RFC 6298, up to ``max_send_rto_ms``); None for
        a jittered ``send_retry``, which is used as it is. O(1)."""
        return self._outbox.send_timeout_ms

    @property
    def queued(self) -> int:
        """Sends waiting for an in-flight slot or a connection. O(1)."""
        return len(self._outbox.queue)

    def unacknowledged(self) -> list[Send]:
        """Every send without an answer yet (in flight, then queued), in cid order. O(n)."""
        return self._outbox.unacknowledged()

    def contiguous(self, conv: str) -> int | None:
        """The last seq of ``conv`` delivered with nothing missing, or None if untracked. O(1)."""
        return self._convs.contiguous(conv)

    def conversations(self) -> list[str]:
        """The conversations with a SeqWindow. O(n)."""
        return list(self._convs.windows)

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
        self.version = MIN_PROTOCOL_VERSION
        offer = self._max_version
        if self._fallback_until_ms is not None:
            if now_ms < self._fallback_until_ms:
                offer = MIN_PROTOCOL_VERSION  # an old server refused the offer lately
            else:
                self._fallback_until_ms = None
        self._offered = offer
        out: list[Output] = [
            Login(
                token=self.token,
                device=self.device,
                resume=self.resume_id,
                max_version=offer,  # a Login offering only 1 is version 1's Login
            )
        ]
        self._outbox.connect(now_ms, out)
        self._convs.connect(now_ms, out)
        self._arm_hb()
        return self._flush(now_ms, out)

    def connection_lost(self, now_ms: int) -> list[Output]:
        """The transport is gone: stop every timer; keep sends and windows. O(in flight).

        Idempotent. Call :meth:`reconnect_delay_ms` for when to try again.
        """
        self._go(ClientTrigger.CONNECTION_LOST)
        self._drop_connection()
        return []

    def _drop_connection(self) -> None:
        self._outbox.drop()
        self._convs.drop()
        if self._hb_handle is not None:
            self._hb_handle.cancel()

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
        self._outbox.close()
        return [CloseConnection(code=ErrorCode.OK, reason="closed")] if was_connected else []

    # -- application -------------------------------------------------------------------

    def send(
        self, conv: str, body: bytes, now_ms: int, *, wall_ms: int = 0
    ) -> tuple[int, list[Output]]:
        """Queue a message for ``conv``; return its cid and the frames to send now. O(1).

        ``wall_ms`` (optional) is the wall-clock time of the send, carried to the
        server as ``Send.client_ms`` (0: not given). The send is transmitted at once
        if connected and the in-flight window has room, else when it does. Raises
        CapacityError when ``max_queued`` sends wait already, LocalProtocolError
        after :meth:`close`.
        """
        if self.state is ClientState.CLOSED:
            raise LocalProtocolError("send() on a closed session")
        if not conv:
            raise ConfigError("conv must not be empty")
        out: list[Output] = []
        cid = self._outbox.send(conv, body, now_ms, wall_ms, out)
        if self._live:
            return cid, self._flush(now_ms, out)
        return cid, out

    def mark_read(self, conv: str, seq: int, now_ms: int) -> list[Output]:
        """Tell the server ``conv`` was read up to ``seq`` (a Receipt). Nothing offline. O(1)."""
        if not self._live:
            return []
        return self._flush(now_ms, [Receipt(conv=conv, seq=seq)])

    def set_cursor(self, conv: str, seq: int) -> None:
        """Start tracking ``conv`` after ``seq`` (the app already holds up to it). O(1).

        Only moves forward: a tracked conversation whose cursor is beyond ``seq``
        is left alone. Use before connecting, with cursors from local storage.
        CapacityError when ``max_conversations`` windows are busy.
        """
        self._convs.set_cursor(conv, seq)

    def sync(self, now_ms: int, convs: Iterable[str] | None = None) -> list[Output]:
        """Ask the server for what came after our cursors (``None``: every conversation).

        One sync is outstanding at a time; more requests queue behind it. Nothing
        while disconnected (every connection starts with an inbox sync anyway).
        O(convs).
        """
        if not self._live:
            return []
        out: list[Output] = []
        self._convs.sync(now_ms, convs, out)
        return self._flush(now_ms, out)

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
        return self._flush(now_ms, out)

    def _flush(self, now_ms: int, out: list[Output]) -> list[Output]:
        """Pass ``out`` through the outbox's pacer; note outgoing traffic for the heartbeat."""
        if not self._live:
            return out
        result = self._outbox.flush(now_ms, out)
        for o in result:
            if not isinstance(o, SessionEvent):
                self._hb.on_sent(now_ms)  # outgoing traffic, for the heartbeat
                break
        return result

    def _on_login_ack(self, m: LoginAck, now_ms: int, out: list[Output]) -> None:
        if self.state is not ClientState.LOGGING_IN:
            self.stats.unexpected_frames += 1
            return
        self._go(ClientTrigger.LOGIN_ACK)
        self.uid = m.uid
        self.resume_id = m.session
        # a server never picks above the offer; one that does is held to the offer
        self.version = max(MIN_PROTOCOL_VERSION, min(m.version, self._offered))
        if self.version >= 2:
            self._outbox.logged_in(m, now_ms)
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
        self._outbox.on_send_ack(m, now_ms, out)

    def _on_push(self, m: Push, now_ms: int, out: list[Output]) -> None:
        self._convs.on_push(m, now_ms, out)

    def _on_push_batch(self, m: PushBatch, now_ms: int, out: list[Output]) -> None:
        self._convs.on_push_batch(m, now_ms, out)

    def _on_sync_response(self, m: SyncResponse, now_ms: int, out: list[Output]) -> None:
        self._convs.on_sync_response(m, now_ms, out)

    def _on_notify(self, m: Notify, now_ms: int, out: list[Output]) -> None:
        self._convs.on_notify(m, now_ms, out)

    def _on_receipt(self, m: Receipt, now_ms: int, out: list[Output]) -> None:
        out.append(ReceiptReceived(receipt=m))

    def _refused_offer(self, code: int, now_ms: int) -> None:
        """PROTOCOL_ERROR before LoginAck after offering version 2+: an old server.

        Offer only version 1 for ``version_fallback_ms``; the next connection then
        sends version 1's Login, which every server decodes.
        """
        if (
            code == ErrorCode.PROTOCOL_ERROR
            and self.state is ClientState.LOGGING_IN
            and self._offered > MIN_PROTOCOL_VERSION
        ):
            self._fallback_until_ms = now_ms + self._version_fallback_ms
            self.stats.version_fallbacks += 1

    def _on_kick(self, m: Kick, now_ms: int, out: list[Output]) -> None:
        self._refused_offer(m.code, now_ms)
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
        self._refused_offer(m.code, now_ms)
        # a quota code holds new sends and due retries until the server is ready again
        self._outbox.hold(m.code, m.retry_after_ms, now_ms)
        if m.code in (ErrorCode.SERVER_BUSY, ErrorCode.SHUTDOWN):
            self._retry_hint_ms = min(max(0, m.retry_after_ms), MAX_RETRY_HINT_MS)

    # -- internals ---------------------------------------------------------------------

    def _go(self, trigger: ClientTrigger) -> None:
        """Take a transition of the table in imkit.session._state."""
        self.state = state = client_next(self.state, trigger)
        self._live = state is ClientState.LOGGING_IN or state is ClientState.READY

    def _arm_hb(self) -> None:
        if self.state is ClientState.LOGGING_IN:
            due = self._connected_ms + self._login_timeout_ms
        else:
            due = self._hb.next_deadline_ms()
        if self._hb_handle is None:
            self._hb_handle = self._wheel.add(due, (HB, 0))
        else:
            self._hb_handle.reschedule(due)

    # -- timers ------------------------------------------------------------------------

    def tick(self, now_ms: int) -> list[Output]:
        """Run every timer due at ``now_ms``: pings, death, resends, gap syncs. O(due).

        Call it when :meth:`next_deadline_ms` is reached (earlier calls are cheap).
        """
        out: list[Output] = []
        due = self._wheel.advance(now_ms)
        outbox = self._outbox
        for kind, key in due:
            if not self._live:
                break
            if kind == HB:
                self._on_hb_timer(now_ms, out)
            elif kind in (GAP, SYNC):
                self._convs.on_timer(kind, key, now_ms, out)
            else:  # SEND, HOLD, PACE
                outbox.on_timer(kind, key, now_ms, out)
        return self._flush(now_ms, out)

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

    # -- invariants --------------------------------------------------------------------

    def _check(self) -> None:
        """Assert every invariant, the outbox's and the conversations' too. O(state size)."""

        def fail(msg: str) -> None:
            raise AssertionError(f"ClientSession {self.device}: {msg}")

        connected = self._live
        if connected != (self.state in (ClientState.LOGGING_IN, ClientState.READY)):
            fail(f"live={connected} in state {self.state.value}")
        try:
            self._outbox._check(connected)
            self._convs._check(connected)
        except AssertionError as e:
            fail(str(e))
        if not MIN_PROTOCOL_VERSION <= self.version <= self._offered <= self._max_version:
            fail(f"version {self.version} outside the offer {self._offered}")
        if self.state is ClientState.CLOSED and self._outbox.in_flight:
            fail("closed with sends in flight")
        if not connected:
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
