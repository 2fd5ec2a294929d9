"""The server half of the delivery contract: one :class:`ServerSession` per connection.

A gateway holds one session per client connection. The session checks the login,
fixes the identity every later frame is attributed to, drops resent sends (a
:class:`~imkit.dedup.CidWindow` plus a small cache of the answers it gave),
turns sends and sync requests into application events, tracks every push until
the client acknowledges it (retrying from timers on one wheel shared by all
sessions), enforces per-connection quotas, and cuts a connection that goes
silent. See ``docs/session.md`` for the state machine and the contract.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs

from imkit.dedup import CidWindow, Verdict
from imkit.errors import AuthError, ConfigError, LocalProtocolError
from imkit.policy import (
    ExponentialBackoff,
    HeartbeatPolicy,
    TokenBucket,
    _instance_field,
    _int_field,
    rto_update,
)
from imkit.protocol import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
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
    SyncPage,
    SyncRequest,
    SyncResponse,
    downgrade,
)
from imkit.session._common import Counters
from imkit.session._events import (
    CloseConnection,
    Output,
    PushAcked,
    ReceiptPosted,
    SendRequested,
    SessionStarted,
    SyncRequested,
)
from imkit.session._limits import (
    DEFAULT_ACK_CACHE,
    DEFAULT_CID_WINDOW,
    DEFAULT_FRAME_BURST,
    DEFAULT_LOGIN_TIMEOUT_MS,
    DEFAULT_MAX_FRAMES_PER_S,
    DEFAULT_MAX_SENDS_IN_FLIGHT,
)
from imkit.session._state import ServerState, ServerTrigger, server_next
from imkit.timingwheel import TimerHandle, TimingWheel

__all__ = [
    "DEFAULT_ACK_CACHE",
    "DEFAULT_CID_WINDOW",
    "DEFAULT_FRAME_BURST",
    "DEFAULT_LOGIN_TIMEOUT_MS",
    "DEFAULT_MAX_FRAMES_PER_S",
    "DEFAULT_MAX_PUSH_RTO_MS",
    "DEFAULT_MAX_SENDS_IN_FLIGHT",
    "DEFAULT_MAX_SYNCS_IN_FLIGHT",
    "DEFAULT_MAX_SYNC_LIMIT",
    "DEFAULT_MAX_TRACKED_PUSHES",
    "DEFAULT_MAX_VIOLATIONS",
    "DEFAULT_PUSH_RETRY",
    "DEFAULT_QUOTA_RETRY_MS",
    "DEFAULT_RECONNECT_MAX_MS",
    "DEFAULT_RECONNECT_MIN_MS",
    "DEFAULT_VIOLATION_WINDOW_MS",
    "Authenticate",
    "ResumeLookup",
    "ServerConfig",
    "ServerSession",
    "ServerStats",
    "ServerTimer",
]

#: Unacknowledged pushes tracked per connection: ~10 s of a busy group at 100 msg/s.
#: A client further behind is cut (SLOW_CONSUMER) and catches up by sync.
DEFAULT_MAX_TRACKED_PUSHES = 1024
#: Push retries: first after 3 s (the seed's RTO advice: 初始RTO 3s, avoiding
#: retransmission storms on slow mobile links), then 6 s and 12 s; after 3 retries
#: the push is left to sync (33 s in all, past the 30 s heartbeat interval).
DEFAULT_PUSH_RETRY = ExponentialBackoff(base_ms=3_000, cap_ms=12_000, max_attempts=3)
#: Longest first push timeout the per-connection estimate may grow to (RFC 6298's
#: RTO = SRTT + 4 RTTVAR, from the acks of pushes sent once: Karn's rule). A client
#: whose acks come back slower than this is behind by more than the 30 s heartbeat
#: interval; the fixed 3 s would resend every push of a slow but live link again and
#: again (a push arrives, then its copy, doubling the work exactly when the link or
#: the server is overloaded: measured with benchmarks/bench_overload.py).
DEFAULT_MAX_PUSH_RTO_MS = 30_000
#: After 100 refused frames with no quiet gap of ``violation_window_ms``, the client
#: is kicked: half a second of a 2x flood, never a burst that backs off when told.
DEFAULT_MAX_VIOLATIONS = 100
DEFAULT_VIOLATION_WINDOW_MS = 10_000
#: retry_after_ms sent with QUOTA_EXCEEDED (sends or syncs in flight): about one
#: logic-server round trip under load.
DEFAULT_QUOTA_RETRY_MS = 1_000
#: Sync requests awaiting the application's answer: a reconnect sync plus one gap sync.
DEFAULT_MAX_SYNCS_IN_FLIGHT = 2
#: Largest page a client may ask for, per conversation: 500 chat messages of ~100 B
#: stay below the protocol's 64 KiB frame limit once compressed.
DEFAULT_MAX_SYNC_LIMIT = 500

#: A callable that checks a login token for ``device`` and returns the user id, or
#: raises :class:`~imkit.errors.AuthError`. Supplied by the caller (e.g. an HMAC check).
Authenticate = Callable[[str, str], str]
#: ``resume(uid, device, resume_id)``: the caller's lookup of a recently closed
#: session to continue (its upstream dedup state is adopted), or None.
ResumeLookup = Callable[[str, str, str], "ServerSession | None"]

# Server error codes after which a resent cid should be retried (not cached).
_RETRYABLE = frozenset(
    {ErrorCode.INTERNAL, ErrorCode.SERVER_BUSY, ErrorCode.RATE_LIMITED, ErrorCode.QUOTA_EXCEEDED}
)


#: The reconnect back-off a server announces in ``LoginAck``: full jitter between 0
#: and 0.5 s doubling to 30 s (the client's own default, ``DEFAULT_RECONNECT``).
DEFAULT_RECONNECT_MIN_MS = 500
DEFAULT_RECONNECT_MAX_MS = 30_000

_at_least_0 = _int_field(0)
_at_least_1 = _int_field(1)


def _not_below_min(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    low = attribute.name.replace("max_", "min_")
    if value < getattr(instance, low):
        raise ConfigError(f"{attribute.name} ({value}) must be >= {low} ({getattr(instance, low)})")


@attrs.frozen(kw_only=True)
class ServerConfig:
    """Every limit and timing of a :class:`ServerSession`, shared by all sessions of a gateway.

    One frozen object instead of per-session attributes keeps an idle session small
    (a gateway holds ~100k of them). Each field defaults to the ``DEFAULT_*``
    constant of the same name, which documents where the number comes from. An
    attrs value: equal by fields, a readable repr, and a wrong type or range raises
    :class:`~imkit.errors.ConfigError` naming the field.
    """

    login_timeout_ms: int = attrs.field(default=DEFAULT_LOGIN_TIMEOUT_MS, validator=_at_least_1)
    heartbeat: HeartbeatPolicy = attrs.field(
        factory=HeartbeatPolicy, validator=_instance_field(HeartbeatPolicy)
    )
    reconnect_min_ms: int = attrs.field(default=DEFAULT_RECONNECT_MIN_MS, validator=_at_least_1)
    reconnect_max_ms: int = attrs.field(
        default=DEFAULT_RECONNECT_MAX_MS, validator=[_at_least_1, _not_below_min]
    )
    max_sends_in_flight: int = attrs.field(
        default=DEFAULT_MAX_SENDS_IN_FLIGHT, validator=_at_least_1
    )
    ack_cache: int = attrs.field(default=DEFAULT_ACK_CACHE, validator=_at_least_1)
    cid_window: int = attrs.field(default=DEFAULT_CID_WINDOW, validator=_at_least_1)
    max_tracked_pushes: int = attrs.field(default=DEFAULT_MAX_TRACKED_PUSHES, validator=_at_least_1)
    push_retry: ExponentialBackoff = attrs.field(
        default=DEFAULT_PUSH_RETRY, validator=_instance_field(ExponentialBackoff)
    )
    #: the first push timeout adapts to each connection's measured ack time, between
    #: ``push_retry``'s first delay and this; later retries scale with it
    max_push_rto_ms: int = attrs.field(default=DEFAULT_MAX_PUSH_RTO_MS, validator=_at_least_1)
    max_frames_per_s: int = attrs.field(default=DEFAULT_MAX_FRAMES_PER_S, validator=_at_least_1)
    frame_burst: int = attrs.field(default=DEFAULT_FRAME_BURST, validator=_at_least_1)
    max_violations: int = attrs.field(default=DEFAULT_MAX_VIOLATIONS, validator=_at_least_1)
    violation_window_ms: int = attrs.field(
        default=DEFAULT_VIOLATION_WINDOW_MS, validator=_at_least_1
    )
    quota_retry_ms: int = attrs.field(default=DEFAULT_QUOTA_RETRY_MS, validator=_at_least_0)
    max_syncs_in_flight: int = attrs.field(
        default=DEFAULT_MAX_SYNCS_IN_FLIGHT, validator=_at_least_1
    )
    max_sync_limit: int = attrs.field(default=DEFAULT_MAX_SYNC_LIMIT, validator=_at_least_1)
    #: protocol versions this server speaks; it picks the highest one the client
    #: offers too. Lower ``max_version`` during a rolling upgrade to keep every
    #: client on the old version until all servers run the new code.
    min_version: int = attrs.field(
        default=MIN_PROTOCOL_VERSION, validator=_int_field(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
    )
    max_version: int = attrs.field(
        default=PROTOCOL_VERSION,
        validator=[_int_field(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION), _not_below_min],
    )
    #: cut (SLOW_CONSUMER) a client that acknowledged nothing during a push's whole
    #: retry schedule: it keeps the link alive (pings) but does not read, and the
    #: kernel's socket buffer can hide that from the write-buffer limit for a long time
    kick_unresponsive: bool = attrs.field(default=True, validator=_instance_field(bool))
    #: derived: ``push_retry.delay_ms(0)``, computed once (the per-push path reads it)
    first_push_retry_ms: int = attrs.field(init=False, default=0)
    #: derived: from a push's first send to its abandonment, the whole retry schedule
    #: at the initial timeout (a link with a longer measured ack time scales it)
    push_give_up_ms: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        # derived values only; every check is a field validator (run before this)
        object.__setattr__(self, "first_push_retry_ms", self.push_retry.delay_ms(0))
        attempts = self.push_retry.max_attempts or 0
        span = sum(self.push_retry.delay_ms(a) for a in range(attempts + 1))
        object.__setattr__(self, "push_give_up_ms", span)


class ServerStats(Counters):
    """Counters of one session, or of many: pass one shared object to every session.

    Every "ignored and counted" case of the contract lands here. Plain int slots.
    """

    __slots__ = (
        "abuse_kicks",
        "acks_ignored",
        "auth_failures",
        "cid_conflicts",
        "client_errors",
        "duplicate_sends",
        "frames_after_close",
        "heartbeat_timeouts",
        "login_timeouts",
        "protocol_errors",
        "pushes_abandoned",
        "pushes_duplicate",
        "pushes_retried",
        "refused_frames",
        "slow_consumer_kicks",
        "stale_sends",
        "unresponsive_kicks",
        "version_refusals",
    )

    # counters, for type checkers
    abuse_kicks: int
    acks_ignored: int
    auth_failures: int
    cid_conflicts: int
    client_errors: int
    duplicate_sends: int
    frames_after_close: int
    heartbeat_timeouts: int
    login_timeouts: int
    protocol_errors: int
    pushes_abandoned: int
    pushes_duplicate: int
    pushes_retried: int
    refused_frames: int
    slow_consumer_kicks: int
    stale_sends: int
    unresponsive_kicks: int
    version_refusals: int


class ServerTimer:
    """An item on the wheel shared by all sessions; ``item.session.on_timer(item, now_ms)``.

    The driver of the shared :class:`~imkit.timingwheel.TimingWheel` does::

        for item in wheel.advance(now_ms):
            outputs = item.session.on_timer(item, now_ms)
            ...  # write frames / handle events of item.session (item.session.tag)
    """

    __slots__ = ("session",)

    def __init__(self, session: ServerSession) -> None:
        self.session = session


class _Liveness(ServerTimer):
    """The one deadline of a session: login deadline, then heartbeat deadline."""

    __slots__ = ()


class _Flight(ServerTimer):
    """Pushes sent in one frame, retried together by one timer until all are acked."""

    __slots__ = ("attempts", "handle", "live", "pushes", "rto_ms", "sent_ms")

    def __init__(
        self, session: ServerSession, pushes: tuple[Push, ...], sent_ms: int, rto_ms: int
    ) -> None:
        self.session = session
        self.pushes = pushes
        self.live = len(pushes)  # how many of ``pushes`` are still tracked
        self.attempts = 0  # retransmissions so far
        self.sent_ms = sent_ms  # first transmission
        self.rto_ms = rto_ms  # its first timeout; its retries scale with it
        self.handle: TimerHandle[ServerTimer] | None = None


class ServerSession:
    """The server side of one client connection: login, dedup, quotas, push tracking.

    Driven by its caller (sans-IO): :meth:`receive` for every decoded frame,
    :meth:`on_timer` for every item the shared wheel returns, and the
    application's answers :meth:`ack_send`, :meth:`fail_send`,
    :meth:`sync_response`, plus :meth:`push` for downstream messages. Each call
    returns the outputs to act on, in order: wire messages (send them to the
    client), :class:`~imkit.session.SessionEvent` objects (for the application), and
    :class:`~imkit.session.CloseConnection` (close the transport after writing
    what precedes it).

    ``wheel`` is owned by the caller and shared by every session of the process;
    the session keeps one timer on it (login, then heartbeat deadline) plus one
    per frame of unacknowledged pushes. ``authenticate(token, device) -> uid``
    raises :class:`~imkit.errors.AuthError` to refuse a login. ``resume`` looks up
    a recently closed session for ``Login.resume``. ``tag`` is an opaque value for
    the caller (its connection object); the session never reads it. ``stats`` may
    be shared by many sessions. Costs: :meth:`receive` O(1) per frame except a
    cumulative ``PushAck``, O(pushes tracked in that conversation); :meth:`push`
    O(pushes).
    """

    __slots__ = (
        "_acks",
        "_auth",
        "_bucket",
        "_cfg",
        "_cids",
        "_convs",
        "_highest",
        "_last_ack_ms",
        "_last_rx_ms",
        "_last_violation_ms",
        "_limited_until_ms",
        "_liveness",
        "_pending",
        "_resume",
        "_rto_ms",
        "_rttvar_ms",
        "_srtt_ms",
        "_syncs",
        "_tracked",
        "_violations",
        "_wheel",
        "device",
        "session_id",
        "state",
        "stats",
        "tag",
        "uid",
        "version",
    )

    def __init__(
        self,
        *,
        wheel: TimingWheel[ServerTimer],
        authenticate: Authenticate,
        session_id: str,
        now_ms: int,
        config: ServerConfig | None = None,
        stats: ServerStats | None = None,
        resume: ResumeLookup | None = None,
        tag: Any = None,
    ) -> None:
        if not session_id:
            raise ConfigError("session_id must not be empty")
        self._cfg = cfg = config if config is not None else _DEFAULT_CONFIG
        self._wheel = wheel
        self._auth = authenticate
        self._resume = resume
        self.stats = stats if stats is not None else ServerStats()
        self.tag = tag
        self.session_id = session_id
        self.state = ServerState.AWAIT_LOGIN
        self.uid = ""
        self.device = ""
        #: the protocol version negotiated at login (1 until then): what the client
        #: can decode; every message to it is encoded for this version
        self.version = MIN_PROTOCOL_VERSION
        self._last_rx_ms = now_ms
        self._last_ack_ms = now_ms - 1  # the last PushAck accepted: none yet
        # push ack time estimate (RFC 6298): 0 = no sample yet; the first timeout
        self._srtt_ms = 0
        self._rttvar_ms = 0
        self._rto_ms = cfg.first_push_retry_ms
        self._liveness = wheel.add(now_ms + cfg.login_timeout_ms, _Liveness(self))
        self._bucket: TokenBucket | None = None
        # the structures below are created on first use and dropped when empty,
        # so that an idle session stays small
        self._cids: CidWindow | None = None
        self._acks: dict[int, SendAck] | None = None
        self._pending: dict[int, str] | None = None  # cid -> conv, awaiting the app
        self._convs: dict[str, dict[int, _Flight]] | None = None  # tracked pushes
        self._highest: dict[str, int] | None = None  # conv -> highest seq pushed
        self._tracked = 0
        self._syncs: set[int] | None = None  # sync req_ids awaiting the app
        self._violations = 0
        self._last_violation_ms = now_ms
        self._limited_until_ms = now_ms

    def __repr__(self) -> str:
        return (
            f"<ServerSession {self.session_id} {self.state.value} uid={self.uid!r} "
            f"device={self.device!r} tracked={self._tracked}>"
        )

    @property
    def config(self) -> ServerConfig:
        """The limits and timings this session runs with (shared, frozen). O(1)."""
        return self._cfg

    @property
    def tracked_pushes(self) -> int:
        """How many pushes await the client's ack. O(1)."""
        return self._tracked

    @property
    def sends_in_flight(self) -> int:
        """How many sends await the application's answer. O(1)."""
        return len(self._pending) if self._pending else 0

    # -- input: frames -------------------------------------------------------------

    def receive(self, message: Message, now_ms: int) -> list[Output]:
        """Handle one frame from the client. O(1) (a cumulative PushAck: O(tracked in conv)).

        Before login only ``Login`` is accepted; anything else, a bad token, a
        frame the client may not send, or persistent quota abuse ends the session
        with ``Kick`` + :class:`~imkit.session.CloseConnection`. Frames after the
        session closed are counted and ignored.
        """
        state = self.state
        if state is ServerState.ACTIVE:
            self._last_rx_ms = now_ms
            bucket = self._bucket
            if bucket is not None and not bucket.take(now_ms):
                return self._refuse(
                    ErrorCode.RATE_LIMITED, "rate limited", bucket.retry_after_ms(now_ms), now_ms
                )
            handler = _HANDLERS.get(type(message))
            if handler is None:
                self.stats.protocol_errors += 1
                return self._kick(ErrorCode.PROTOCOL_ERROR, "unexpected frame")
            return handler(self, message, now_ms)
        if state is ServerState.AWAIT_LOGIN:
            self._last_rx_ms = now_ms
            if type(message) is Login:
                return self._login(message, now_ms)
            return self._kick(ErrorCode.NOT_LOGGED_IN, "login first")
        self.stats.frames_after_close += 1
        return []

    def _login(self, m: Login, now_ms: int) -> list[Output]:
        cfg = self._cfg
        # the highest version both speak; a Login without an offer is [1, 1]
        version = min(m.max_version, cfg.max_version)
        if m.min_version > m.max_version or version < max(m.min_version, cfg.min_version):
            self.stats.version_refusals += 1
            return self._kick(ErrorCode.PROTOCOL_ERROR, "unsupported protocol version")
        try:
            uid = self._auth(m.token, m.device)
        except AuthError:
            self.stats.auth_failures += 1
            return self._kick(ErrorCode.AUTH_FAILED, "authentication failed")
        if not uid:
            raise LocalProtocolError("authenticate() returned an empty uid")
        self.version = version
        self.uid = uid
        self.device = m.device
        resumed = False
        if m.resume and self._resume is not None:
            old = self._resume(uid, m.device, m.resume)
            if (
                old is not None
                and old is not self
                and old.state is ServerState.CLOSED
                and old.uid == uid
                and old.device == m.device
            ):
                self._cids, old._cids = old._cids, None
                self._acks, old._acks = old._acks, None
                self.session_id = old.session_id
                resumed = True
        self.state = server_next(self.state, ServerTrigger.LOGIN_OK)
        self._bucket = TokenBucket(
            rate_per_s=cfg.max_frames_per_s, burst=cfg.frame_burst, now_ms=now_ms
        )
        self._liveness.reschedule(now_ms + cfg.heartbeat.deadline_ms)
        ack = LoginAck(
            uid=uid,
            session=self.session_id,
            resumed=resumed,
            heartbeat_ms=cfg.heartbeat.interval_ms,
            reconnect_min_ms=cfg.reconnect_min_ms,
            reconnect_max_ms=cfg.reconnect_max_ms,
            server_ms=now_ms,
            version=version,
            max_frames_per_s=cfg.max_frames_per_s,
            frame_burst=cfg.frame_burst,
            max_sends_in_flight=cfg.max_sends_in_flight,
        )
        return [
            downgrade(ack, version),
            SessionStarted(uid=uid, device=m.device, session=self.session_id, resumed=resumed),
        ]

    def _on_ping(self, m: Ping, now_ms: int) -> list[Output]:
        return [Pong(nonce=m.nonce, server_ms=now_ms)]

    def _on_send(self, m: Send, now_ms: int) -> list[Output]:
        cid = m.cid
        pending = self._pending
        if pending is not None and cid in pending:
            if pending[cid] != m.conv:
                return self._cid_conflict(m)
            self.stats.duplicate_sends += 1
            return []  # the answer is on its way
        acks = self._acks
        if acks is not None:
            ack = acks.get(cid)
            if ack is not None:
                if ack.conv != m.conv:
                    return self._cid_conflict(m)
                self.stats.duplicate_sends += 1
                return [ack]
        if pending is None:
            pending = self._pending = {}
        elif len(pending) >= self._cfg.max_sends_in_flight:
            return self._refuse(
                ErrorCode.QUOTA_EXCEEDED,
                "too many sends in flight",
                self._cfg.quota_retry_ms,
                now_ms,
            )
        cids = self._cids
        if cids is None:
            cids = self._cids = CidWindow(self._cfg.cid_window)
        verdict = cids.check(cid) if cid >= 1 else Verdict.STALE  # cids start at 1
        if verdict is Verdict.STALE:
            self.stats.stale_sends += 1
            if not pending:
                self._pending = None
            return [SendAck(cid=cid, conv=m.conv, error=ErrorCode.BAD_REQUEST)]
        repeat = verdict is Verdict.DUPLICATE
        if repeat:
            self.stats.duplicate_sends += 1
        pending[cid] = m.conv
        return [
            SendRequested(
                uid=self.uid,
                device=self.device,
                cid=cid,
                conv=m.conv,
                body=m.body,
                client_ms=m.client_ms,
                repeat=repeat,
            )
        ]

    def _cid_conflict(self, m: Send) -> list[Output]:
        """A cid already used for another conversation: refuse this send, keep the first.

        Answering with the first send's ack would tell the client that this message
        was stored as the other conversation's seq. O(1).
        """
        self.stats.cid_conflicts += 1
        return [SendAck(cid=m.cid, conv=m.conv, error=ErrorCode.BAD_REQUEST)]

    def _on_push_ack(self, m: PushAck, now_ms: int) -> list[Output]:
        convs = self._convs
        conv = m.conv
        seqs = convs.get(conv) if convs is not None else None
        if seqs is None:
            self.stats.acks_ignored += 1
            return []
        s = m.seq
        if m.cumulative:
            assert self._highest is not None
            if s > self._highest[conv]:
                self.stats.acks_ignored += 1  # never advance on a seq we never pushed
                return []
            done = [q for q in seqs if q <= s]
            if not done:
                self.stats.acks_ignored += 1
                return []
            for q in done:
                flight = seqs.pop(q)
                if self._untrack(flight):
                    self._sample_rtt(flight, now_ms)
        else:
            f = seqs.pop(s, None)
            if f is None:
                self.stats.acks_ignored += 1
                return []
            if self._untrack(f):
                self._sample_rtt(f, now_ms)
        if not seqs:
            self._forget_conv(conv)
        self._last_ack_ms = now_ms
        return [PushAcked(conv=conv, seq=s, cumulative=m.cumulative)]

    def _on_sync(self, m: SyncRequest, now_ms: int) -> list[Output]:
        cfg = self._cfg
        syncs = self._syncs
        if syncs is None:
            syncs = self._syncs = set()
        elif m.req_id in syncs:
            return []  # the answer is on its way
        elif len(syncs) >= cfg.max_syncs_in_flight:
            return self._refuse(
                ErrorCode.QUOTA_EXCEEDED, "too many syncs in flight", cfg.quota_retry_ms, now_ms
            )
        syncs.add(m.req_id)
        return [
            SyncRequested(
                uid=self.uid,
                device=self.device,
                req_id=m.req_id,
                after=m.after,
                limit=min(max(m.limit, 1), cfg.max_sync_limit),
            )
        ]

    def _on_receipt(self, m: Receipt, now_ms: int) -> list[Output]:
        return [ReceiptPosted(receipt=Receipt(conv=m.conv, seq=m.seq, reader=self.uid))]

    def _on_error(self, m: Error, now_ms: int) -> list[Output]:
        self.stats.client_errors += 1
        return []

    # -- input: the application's answers ---------------------------------------------

    def ack_send(self, cid: int, seq: int, msg_id: int = 0, wall_ms: int = 0) -> list[Output]:
        """The application stored send ``cid`` as ``seq``: answer the client. O(1).

        ``wall_ms`` is the wall-clock time the store gave the message (it goes to the
        client as ``SendAck.server_ms``; 0: not given), never the session's ``now_ms``.
        The answer is remembered (up to ``ack_cache`` of them) so that a resend of
        ``cid`` gets the same ``SendAck`` without reaching the store. Returns
        nothing once the session is closed. Raises LocalProtocolError for a cid the
        session did not request.
        """
        if self.state is ServerState.CLOSED:
            return []
        conv = self._pop_pending(cid)
        ack = SendAck(cid=cid, conv=conv, seq=seq, msg_id=msg_id, server_ms=wall_ms)
        self._remember(ack)
        return [ack]

    def fail_send(self, cid: int, code: int, *, retry_after_ms: int = 0) -> list[Output]:
        """The application refused send ``cid`` with ``code`` (an ErrorCode != OK). O(1).

        Permanent refusals (``NOT_MEMBER``, ``TOO_LARGE``, ...) are remembered like
        acks; transient ones (``INTERNAL``, ``SERVER_BUSY``, ``RATE_LIMITED``,
        ``QUOTA_EXCEEDED``) are not, so a resend asks the application again.
        ``retry_after_ms`` tells the client when to resend a transient refusal
        (sent to clients of protocol version 2 and later).
        """
        if code == ErrorCode.OK:
            raise ConfigError("fail_send needs an error code other than OK")
        if self.state is ServerState.CLOSED:
            return []
        if type(retry_after_ms) is not int or retry_after_ms < 0:
            raise ConfigError(f"retry_after_ms must be an int >= 0, got {retry_after_ms!r}")
        conv = self._pop_pending(cid)
        ack = SendAck(cid=cid, conv=conv, error=code, retry_after_ms=retry_after_ms)
        if self.version < PROTOCOL_VERSION:
            ack = downgrade(ack, self.version)  # type: ignore[assignment]
        if code not in _RETRYABLE:
            self._remember(ack)
        return [ack]

    def _pop_pending(self, cid: int) -> str:
        pending = self._pending
        if pending is None or cid not in pending:
            raise LocalProtocolError(f"no send with cid={cid} awaits an answer")
        conv = pending.pop(cid)
        if not pending:
            self._pending = None
        return conv

    def _remember(self, ack: SendAck) -> None:
        acks = self._acks
        if acks is None:
            acks = self._acks = {}
        acks[ack.cid] = ack
        if len(acks) > self._cfg.ack_cache:
            del acks[next(iter(acks))]

    def sync_response(self, req_id: int, pages: Iterable[SyncPage]) -> list[Output]:
        """The application's answer to ``SyncRequested(req_id)``. O(1) plus the pages.

        Each page must hold every message of its conversation after the ``after``
        seq of the request, in seq order (``more=True`` when ``limit`` cut it).
        Returns nothing once the session is closed; LocalProtocolError for a
        req_id that was not requested (or answered twice).
        """
        if self.state is ServerState.CLOSED:
            return []
        syncs = self._syncs
        if syncs is None or req_id not in syncs:
            raise LocalProtocolError(f"no sync with req_id={req_id} awaits an answer")
        syncs.discard(req_id)
        if not syncs:
            self._syncs = None
        return [SyncResponse(req_id=req_id, pages=tuple(pages))]

    # -- output: pushes --------------------------------------------------------------

    def push(self, pushes: Push | PushBatch | Iterable[Push], now_ms: int) -> list[Output]:
        """Send stored messages to the client and track them until acknowledged. O(pushes).

        One ``Push`` frame for one message, one ``PushBatch`` for several. A
        (conv, seq) already tracked is not sent again (its timer retries it).
        Unacknowledged pushes are resent from the wheel (``push_retry``), then
        dropped from tracking and announced with a ``Notify`` so the client syncs.
        Over ``max_tracked_pushes`` the client is kicked (SLOW_CONSUMER). After
        close: nothing is sent (the client syncs when it comes back). Before login:
        LocalProtocolError.
        """
        state = self.state
        if state is not ServerState.ACTIVE:
            if state is ServerState.AWAIT_LOGIN:
                raise LocalProtocolError("push() before the client logged in")
            return []
        if type(pushes) is Push:
            return self._push_one(pushes, now_ms)
        if isinstance(pushes, Push):
            items: Iterable[Push] = (pushes,)
        elif isinstance(pushes, PushBatch):
            items = pushes.pushes
        else:
            items = pushes
        convs = self._convs
        if convs is None:
            convs = self._convs = {}
            self._highest = {}
        highest = self._highest
        assert highest is not None
        fresh: list[Push] = []
        flight = _Flight(self, (), now_ms, self._rto_ms)
        for p in items:
            conv = p.conv
            seqs = convs.get(conv)
            if seqs is None:
                seqs = convs[conv] = {}
                highest[conv] = p.seq
            elif p.seq in seqs:
                self.stats.pushes_duplicate += 1
                continue
            elif p.seq > highest[conv]:
                highest[conv] = p.seq
            seqs[p.seq] = flight
            fresh.append(p)
        if not fresh:
            if not convs:
                self._convs = self._highest = None
            return []
        self._tracked += len(fresh)
        if self._tracked > self._cfg.max_tracked_pushes:
            self.stats.slow_consumer_kicks += 1
            return self._kick(ErrorCode.SLOW_CONSUMER, "too many unacknowledged pushes")
        flight.pushes = tuple(fresh)
        flight.live = len(fresh)
        flight.handle = self._wheel.add(now_ms + self._rto_ms, flight)
        if len(fresh) == 1:
            return [fresh[0]]
        return [PushBatch(pushes=flight.pushes)]

    def _push_one(self, p: Push, now_ms: int) -> list[Output]:
        """push() of a single message: the common case, the same rules, fewer steps."""
        convs = self._convs
        highest = self._highest
        if convs is None or highest is None:
            convs = self._convs = {}
            highest = self._highest = {}
        conv = p.conv
        seq = p.seq
        seqs = convs.get(conv)
        if seqs is None:
            seqs = convs[conv] = {}
            highest[conv] = seq
        elif seq in seqs:
            self.stats.pushes_duplicate += 1
            return []
        elif seq > highest[conv]:
            highest[conv] = seq
        flight = _Flight(self, (p,), now_ms, self._rto_ms)
        seqs[seq] = flight
        self._tracked += 1
        cfg = self._cfg
        if self._tracked > cfg.max_tracked_pushes:
            self.stats.slow_consumer_kicks += 1
            return self._kick(ErrorCode.SLOW_CONSUMER, "too many unacknowledged pushes")
        flight.handle = self._wheel.add(now_ms + self._rto_ms, flight)
        return [p]

    def _untrack(self, f: _Flight) -> bool:
        """Forget one push of ``f``; True when that was its last one. O(1)."""
        self._tracked -= 1
        f.live -= 1
        if f.live == 0 and f.handle is not None:
            f.handle.cancel()
            return True
        return False

    def _sample_rtt(self, f: _Flight, now_ms: int) -> None:
        """A flight sent once was acked whole: update the push timeout. O(1).

        RFC 6298 (Jacobson/Karels): SRTT and RTTVAR with gains 1/8 and 1/4, RTO =
        SRTT + 4 RTTVAR, kept between ``push_retry``'s first delay and
        ``max_push_rto_ms``. Retransmitted flights give no sample (Karn's rule: the
        ack may answer either copy).
        """
        if f.attempts:
            return
        sample = now_ms - f.sent_ms
        if sample < 0:
            return
        self._srtt_ms, self._rttvar_ms, rto = rto_update(self._srtt_ms, self._rttvar_ms, sample)
        cfg = self._cfg
        self._rto_ms = min(max(rto, cfg.first_push_retry_ms), cfg.max_push_rto_ms)

    @property
    def push_timeout_ms(self) -> int:
        """The first push timeout now (RFC 6298 estimate, see ``max_push_rto_ms``). O(1)."""
        return self._rto_ms

    def _forget_conv(self, conv: str) -> None:
        convs = self._convs
        highest = self._highest
        assert convs is not None and highest is not None
        del convs[conv]
        del highest[conv]
        if not convs:
            self._convs = self._highest = None

    # -- timers ----------------------------------------------------------------------

    def on_timer(self, item: ServerTimer, now_ms: int) -> list[Output]:
        """Handle an item the shared wheel returned for this session. O(pushes in it).

        Liveness: in AWAIT_LOGIN the login deadline (Kick NOT_LOGGED_IN); once
        active, the heartbeat deadline -- re-armed lazily at ``last frame +
        deadline`` if a frame came since, else Kick HEARTBEAT_TIMEOUT. Flight:
        resend its unacknowledged pushes, or give them up to sync (with a Notify).
        """
        if item.session is not self:
            raise LocalProtocolError("timer item belongs to another session")
        if type(item) is _Liveness:
            state = self.state
            if state is ServerState.ACTIVE:
                dead_at = self._last_rx_ms + self._cfg.heartbeat.deadline_ms
                if now_ms >= dead_at:
                    self.stats.heartbeat_timeouts += 1
                    return self._kick(ErrorCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
                self._liveness.reschedule(dead_at)
                return []
            if state is ServerState.AWAIT_LOGIN:
                self.stats.login_timeouts += 1
                return self._kick(ErrorCode.NOT_LOGGED_IN, "login timeout")
            return []
        assert isinstance(item, _Flight)
        return self._retry(item, now_ms)

    def _retry(self, f: _Flight, now_ms: int) -> list[Output]:
        convs = self._convs
        if self.state is not ServerState.ACTIVE or f.live == 0 or convs is None:
            return []
        live = [p for p in f.pushes if convs.get(p.conv, _NO_SEQS).get(p.seq) is f]
        cfg = self._cfg
        retry = cfg.push_retry
        if retry.exhausted(f.attempts):
            if cfg.kick_unresponsive and self._last_ack_ms < f.sent_ms:
                # Nothing acknowledged since this push first went out: not reading.
                self.stats.pushes_abandoned += len(live)
                self.stats.unresponsive_kicks += 1
                return self._kick(ErrorCode.SLOW_CONSUMER, "pushes unacknowledged")
            entries: dict[str, int] = {}
            for p in live:
                seqs = convs[p.conv]
                del seqs[p.seq]
                self._untrack(f)
                if p.seq > entries.get(p.conv, -1):
                    entries[p.conv] = p.seq
                if not seqs:
                    self._forget_conv(p.conv)
            self.stats.pushes_abandoned += len(live)
            return [Notify(entries=tuple(entries.items()))]
        f.attempts += 1
        f.pushes = tuple(live)
        assert f.handle is not None
        # later retries keep the schedule's shape, scaled to the flight's timeout; a
        # timeout also doubles the link's (RFC 6298 5.5) until an ack of a push sent
        # once gives a new estimate: without it, acks slower than the timeout would
        # make every push a resend, and Karn's rule would never let the timeout grow
        delay = retry.delay_ms(f.attempts) * f.rto_ms // cfg.first_push_retry_ms
        f.handle.reschedule(now_ms + delay)
        self._rto_ms = min(max(self._rto_ms * 2, cfg.first_push_retry_ms), cfg.max_push_rto_ms)
        self.stats.pushes_retried += len(live)
        if len(live) == 1:
            return [live[0]]
        return [PushBatch(pushes=f.pushes)]

    # -- ending ----------------------------------------------------------------------

    def kick(self, code: int, *, reason: str = "", retry_after_ms: int = 0) -> list[Output]:
        """End the session from the application side (REPLACED, SHUTDOWN, ...). O(tracked).

        Returns ``Kick`` + :class:`~imkit.session.CloseConnection`, or nothing if
        already closed.
        """
        if self.state is ServerState.CLOSED:
            return []
        return self._kick(code, reason, retry_after_ms)

    def connection_lost(self, now_ms: int) -> list[Output]:
        """The transport is gone: cancel every timer, forget tracked pushes. O(tracked).

        Idempotent. Returns an empty list (for symmetry with the other inputs).
        """
        self.state = server_next(self.state, ServerTrigger.CONNECTION_LOST)
        self._teardown()
        return []

    def _kick(self, code: int, reason: str, retry_after_ms: int = 0) -> list[Output]:
        self.state = server_next(self.state, ServerTrigger.KICK)
        self._teardown()
        return [
            Kick(code=code, reason=reason, retry_after_ms=retry_after_ms),
            CloseConnection(code=code, reason=reason),
        ]

    def _teardown(self) -> None:
        self._liveness.cancel()
        if self._convs is not None:
            for seqs in self._convs.values():
                for f in seqs.values():
                    if f.handle is not None:
                        f.handle.cancel()
        self._convs = self._highest = None
        self._tracked = 0
        self._pending = None
        self._syncs = None
        self._bucket = None

    def _refuse(self, code: int, reason: str, retry_after_ms: int, now_ms: int) -> list[Output]:
        """A frame over quota: drop it, tell the client once per back-off, kick abusers."""
        cfg = self._cfg
        self.stats.refused_frames += 1
        if now_ms - self._last_violation_ms > cfg.violation_window_ms:
            self._violations = 0
        self._violations += 1
        self._last_violation_ms = now_ms
        if self._violations > cfg.max_violations:
            self.stats.abuse_kicks += 1
            return self._kick(code, "quota abuse", cfg.violation_window_ms)
        if now_ms < self._limited_until_ms:
            return []  # already told; stay quiet until the back-off ends
        retry_after_ms = max(retry_after_ms, 1)
        self._limited_until_ms = now_ms + retry_after_ms
        return [Error(code=code, reason=reason, retry_after_ms=retry_after_ms)]

    # -- invariants ------------------------------------------------------------------

    def _check(self) -> None:
        """Assert every invariant (tests call this after each step). O(state size)."""

        def fail(msg: str) -> None:
            raise AssertionError(f"ServerSession {self.session_id}: {msg}")

        cfg = self._cfg
        state = self.state
        low = min(cfg.first_push_retry_ms, cfg.max_push_rto_ms)
        if not low <= self._rto_ms <= max(cfg.first_push_retry_ms, cfg.max_push_rto_ms):
            fail(f"push timeout {self._rto_ms} ms outside its bounds")
        if self._srtt_ms < 0 or self._rttvar_ms < 0:
            fail("negative ack time estimate")
        if state is ServerState.CLOSED:
            if self._liveness.pending:
                fail("closed with the liveness timer pending")
            if self._convs or self._tracked or self._pending or self._syncs:
                fail("closed but still tracking work")
        elif not self._liveness.pending:
            fail(f"{state.value} without a liveness timer")
        if state is ServerState.ACTIVE and not self.uid:
            fail("active without a uid")
        if state is ServerState.AWAIT_LOGIN and (self._convs or self._pending or self._syncs):
            fail("work before login")
        if self._pending is not None:
            if not self._pending:
                fail("empty pending dict kept")
            if len(self._pending) > cfg.max_sends_in_flight:
                fail("more sends in flight than max_sends_in_flight")
        if self._acks is not None and len(self._acks) > cfg.ack_cache:
            fail("ack cache over its limit")
        if self._syncs is not None:
            if not self._syncs:
                fail("empty syncs set kept")
            if len(self._syncs) > cfg.max_syncs_in_flight:
                fail("more syncs in flight than max_syncs_in_flight")
        convs = self._convs
        if convs is None:
            if self._tracked or self._highest is not None:
                fail("tracked pushes without a conv index")
        else:
            highest = self._highest
            if highest is None or set(highest) != set(convs):
                fail("highest-pushed map out of step with the conv index")
            assert highest is not None
            live: dict[int, int] = {}
            flights: dict[int, _Flight] = {}
            total = 0
            for conv, seqs in convs.items():
                if not seqs:
                    fail(f"empty seq map kept for {conv!r}")
                if max(seqs) > highest[conv]:
                    fail(f"tracked seq above highest pushed in {conv!r}")
                for seq, f in seqs.items():
                    total += 1
                    live[id(f)] = live.get(id(f), 0) + 1
                    flights[id(f)] = f
                    if f.session is not self:
                        fail("flight of another session")
                    if not any(p.conv == conv and p.seq == seq for p in f.pushes):
                        fail(f"({conv!r}, {seq}) tracked by a flight that does not hold it")
            if total != self._tracked:
                fail(f"tracked count {self._tracked} != {total}")
            if total > cfg.max_tracked_pushes:
                fail("more tracked pushes than max_tracked_pushes")
            for key, f in flights.items():
                if f.live != live[key]:
                    fail(f"flight live count {f.live} != {live[key]}")
                if f.handle is None or not f.handle.pending:
                    fail("a flight with live pushes has no pending timer")
        if self._bucket is not None:
            self._bucket._check()


_NO_SEQS: dict[int, _Flight] = {}
_DEFAULT_CONFIG = ServerConfig()

_Handler = Callable[[ServerSession, Any, int], list[Output]]
#: frame type -> handler, for a logged-in session. Frames not here are protocol errors.
_HANDLERS: dict[type, _Handler] = {
    Ping: ServerSession._on_ping,
    Send: ServerSession._on_send,
    PushAck: ServerSession._on_push_ack,
    SyncRequest: ServerSession._on_sync,
    Receipt: ServerSession._on_receipt,
    Error: ServerSession._on_error,
}
