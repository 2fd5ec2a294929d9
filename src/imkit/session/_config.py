"""Every limit and timing of a :class:`~imkit.session.ClientSession`: :class:`ClientConfig`.

One frozen attrs value, like :class:`~imkit.session.ServerConfig` on the other
side: equal by fields, a readable repr, and a wrong type or range raises
:class:`~imkit.errors.ConfigError` naming the field. Each field defaults to a
``DEFAULT_*`` constant that says where its number comes from; the defaults a
client and a server must agree on live in :mod:`imkit.session._limits`.
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from imkit.errors import ConfigError
from imkit.policy import (
    Backoff,
    ExponentialBackoff,
    HeartbeatPolicy,
    _instance_field,
    _int_field,
)
from imkit.protocol import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
from imkit.session._limits import (
    DEFAULT_ACK_DELAY_MS,
    DEFAULT_LOGIN_TIMEOUT_MS,
    DEFAULT_MAX_CID_SPAN,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_PACE_BURST_PERCENT,
    DEFAULT_PACE_RATE_PERCENT,
)

__all__ = [
    "DEFAULT_GAP_DELAY_MS",
    "DEFAULT_MAX_CONVERSATIONS",
    "DEFAULT_MAX_CURSORS",
    "DEFAULT_MAX_HELD",
    "DEFAULT_MAX_QUEUED",
    "DEFAULT_MAX_SEND_RTO_MS",
    "DEFAULT_MAX_SYNC_CONVS",
    "DEFAULT_RECONNECT",
    "DEFAULT_SEND_RETRY",
    "DEFAULT_SYNC_LIMIT",
    "DEFAULT_SYNC_TIMEOUT_MS",
    "DEFAULT_VERSION_FALLBACK_MS",
    "ClientConfig",
]

#: Sends waiting for a free in-flight slot (offline, or a burst): a long subway
#: ride of typing; past it ``send()`` raises CapacityError and the app keeps the draft.
DEFAULT_MAX_QUEUED: Final = 1024
#: Send retries: 2 s, 4 s, 8 s, 16 s after each transmission on a live connection,
#: then give up (30 s after the first try, plus the last 16 s wait). Reconnects
#: resend without counting: a lost connection is not a failed send.
DEFAULT_SEND_RETRY: Final = ExponentialBackoff(base_ms=2_000, cap_ms=16_000, max_attempts=4)
#: Longest first send timeout the per-connection estimate of the server's answer
#: time may grow to (RFC 6298 from sends answered on their first transmission, as
#: the server does for pushes). A server that answers slower than the 30 s heartbeat
#: interval is as good as gone; below it, a fixed 2 s timeout would resend every send
#: of a loaded server, which then does the work twice (measured with
#: benchmarks/bench_overload.py: ~1 duplicate send per message at 2x saturation).
DEFAULT_MAX_SEND_RTO_MS: Final = 30_000
#: Reconnect: full jitter between 0 and 0.5 s doubling to 30 s (AWS "Exponential
#: Backoff And Jitter"); replaced by the server's ``LoginAck`` hints once logged in.
DEFAULT_RECONNECT: Final = Backoff(base_ms=500, cap_ms=30_000)
#: Conversations with a SeqWindow: WeChat caps contacts at 10 000 and groups at a few
#: hundred; past it an idle window is evicted (pass ``cursor_loader`` to restore it).
DEFAULT_MAX_CONVERSATIONS: Final = 10_000
#: Cursors (conversation -> contiguous seq) of evicted windows, so a conversation that
#: comes back resumes where it was instead of at 0 (which would deliver old messages
#: twice). An int per conversation (~100 bytes): ten windows' worth per window slot.
#: Past it the oldest cursor is forgotten (counted): pass ``cursor_loader`` for more.
DEFAULT_MAX_CURSORS: Final = 100_000
#: Messages held per conversation while a gap is open (SeqWindow ``max_pending``):
#: ten sync pages. Past it pushes are left unacknowledged and fetched by sync.
DEFAULT_MAX_HELD: Final = 1024
#: Wait before syncing a gap: one TCP stream never reorders, but pushes of one
#: conversation may come through two logic servers and the bus; 300 ms covers a
#: bus hop (p99 of a few ms) with a wide margin without leaving a real gap open long.
DEFAULT_GAP_DELAY_MS: Final = 300
#: Messages per conversation per sync page (the protocol's default ``limit``).
DEFAULT_SYNC_LIMIT: Final = 100
#: A sync unanswered after 10 s is asked again (the server may have dropped it
#: under quota); the heartbeat catches a dead link separately.
DEFAULT_SYNC_TIMEOUT_MS: Final = 10_000
#: Conversations listed in one SyncRequest: 200 entries of ~30 bytes stay far
#: below the 64 KiB frame limit.
DEFAULT_MAX_SYNC_CONVS: Final = 200
#: After a server refused the version offer (an old server: PROTOCOL_ERROR before
#: LoginAck), the client offers only version 1 for an hour: a rolling upgrade of a
#: cluster takes minutes to an hour, and one refused login per client per hour is
#: negligible load.
DEFAULT_VERSION_FALLBACK_MS: Final = 60 * 60_000

_at_least_0 = _int_field(0)
_at_least_1 = _int_field(1)
_percent = _int_field(1, 100)


def _covers_flight(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < instance.max_in_flight:
        raise ConfigError(
            f"{attribute.name} ({value}) must be >= max_in_flight ({instance.max_in_flight})"
        )


@attrs.frozen(kw_only=True)
class ClientConfig:
    """Every limit and timing of a :class:`~imkit.session.ClientSession`.

    ``ClientSession(token=..., device=..., now_ms=..., first_cid=...,
    config=ClientConfig(max_in_flight=8))``. Each field defaults to the
    ``DEFAULT_*`` constant of the same name (``heartbeat``: a default
    :class:`~imkit.policy.HeartbeatPolicy`, until the server's ``LoginAck`` sets
    the interval; ``max_version``: the newest protocol version). Frozen, so one
    config may be shared by many sessions. O(1) to build.

    >>> ClientConfig(max_in_flight=8, max_cid_span=16).max_cid_span
    16
    >>> ClientConfig(max_in_flight="8")
    Traceback (most recent call last):
    ...
    imkit.errors.ConfigError: max_in_flight must be an int, got '8'
    """

    heartbeat: HeartbeatPolicy = attrs.field(
        factory=HeartbeatPolicy, validator=_instance_field(HeartbeatPolicy)
    )
    send_retry: ExponentialBackoff | Backoff = attrs.field(
        default=DEFAULT_SEND_RETRY, validator=_instance_field(ExponentialBackoff, Backoff)
    )
    #: the first send timeout adapts to the server's measured answer time, between
    #: ``send_retry``'s first delay and this (an ExponentialBackoff ``send_retry`` only)
    max_send_rto_ms: int = attrs.field(default=DEFAULT_MAX_SEND_RTO_MS, validator=_at_least_1)
    reconnect: Backoff = attrs.field(default=DEFAULT_RECONNECT, validator=_instance_field(Backoff))
    #: sends transmitted and unanswered (lowered to the quota a v2 server announces)
    max_in_flight: int = attrs.field(default=DEFAULT_MAX_IN_FLIGHT, validator=_at_least_1)
    max_queued: int = attrs.field(default=DEFAULT_MAX_QUEUED, validator=_at_least_1)
    #: the newest in-flight cid is less than this above the oldest (>= max_in_flight)
    max_cid_span: int = attrs.field(
        default=DEFAULT_MAX_CID_SPAN, validator=[_at_least_1, _covers_flight]
    )
    max_conversations: int = attrs.field(default=DEFAULT_MAX_CONVERSATIONS, validator=_at_least_1)
    max_cursors: int = attrs.field(default=DEFAULT_MAX_CURSORS, validator=_at_least_1)
    max_held: int = attrs.field(default=DEFAULT_MAX_HELD, validator=_at_least_1)
    gap_delay_ms: int = attrs.field(default=DEFAULT_GAP_DELAY_MS, validator=_at_least_0)
    sync_limit: int = attrs.field(default=DEFAULT_SYNC_LIMIT, validator=_at_least_1)
    sync_timeout_ms: int = attrs.field(default=DEFAULT_SYNC_TIMEOUT_MS, validator=_at_least_1)
    max_sync_convs: int = attrs.field(default=DEFAULT_MAX_SYNC_CONVS, validator=_at_least_1)
    login_timeout_ms: int = attrs.field(default=DEFAULT_LOGIN_TIMEOUT_MS, validator=_at_least_1)
    #: the newest protocol version offered in Login (1 offers only version 1)
    max_version: int = attrs.field(
        default=PROTOCOL_VERSION, validator=_int_field(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
    )
    version_fallback_ms: int = attrs.field(
        default=DEFAULT_VERSION_FALLBACK_MS, validator=_at_least_0
    )
    #: pacing margins: this share of the server's announced rate and burst (1-100)
    pace_rate_percent: int = attrs.field(default=DEFAULT_PACE_RATE_PERCENT, validator=_percent)
    pace_burst_percent: int = attrs.field(default=DEFAULT_PACE_BURST_PERCENT, validator=_percent)
    ack_delay_ms: int = attrs.field(default=DEFAULT_ACK_DELAY_MS, validator=_at_least_0)
