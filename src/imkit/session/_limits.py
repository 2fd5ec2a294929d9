"""The defaults a client and a server must agree on, side by side, with their relations.

A client that keeps its own limits tighter than its server's never trips them: it
is never refused and never kicked for "quota abuse". These numbers used to live in
two files that each cited the other; they live here together, they are the
defaults of :class:`~imkit.session.ClientConfig` and
:class:`~imkit.session.ServerConfig`, and
``tests/test_session.py::TestPairedDefaults`` pins every relation below on those
two configs' defaults:

- client ``DEFAULT_MAX_IN_FLIGHT`` (64) <= server ``DEFAULT_MAX_SENDS_IN_FLIGHT`` (64)
  and <= server ``DEFAULT_ACK_CACHE`` (64);
- 2 x client ``DEFAULT_MAX_CID_SPAN`` (128) <= server ``DEFAULT_CID_WINDOW`` (256);
- the client's pace (160/s, burst 200, from ``pace_limits``) < the server's
  ``DEFAULT_MAX_FRAMES_PER_S`` (200) and ``DEFAULT_FRAME_BURST`` (400).

Since protocol version 2 the server announces its frame rate, burst and sends in
flight in ``LoginAck``; the client then paces against what it was told (scaled by
the ``DEFAULT_PACE_*_PERCENT`` margins) and caps its in-flight sends at the
announced value. Against a version 1 server it assumes the defaults below.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "DEFAULT_ACK_CACHE",
    "DEFAULT_ACK_DELAY_MS",
    "DEFAULT_CID_WINDOW",
    "DEFAULT_FRAME_BURST",
    "DEFAULT_LOGIN_TIMEOUT_MS",
    "DEFAULT_MAX_CID_SPAN",
    "DEFAULT_MAX_FRAMES_PER_S",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_SENDS_IN_FLIGHT",
    "DEFAULT_PACE_BURST_PERCENT",
    "DEFAULT_PACE_RATE_PERCENT",
    "pace_limits",
]

# --- both -----------------------------------------------------------------------------

#: 10 s for a Login after connecting (the server's deadline) and for its answer (the
#: client's): one small frame needs one RTT (even 2G is well under 2 s); nginx's
#: ``client_header_timeout`` (60 s) is for humans typing. A connection that says
#: nothing is cut at this deadline (slowloris, idle floods).
DEFAULT_LOGIN_TIMEOUT_MS: Final = 10_000

# --- server ---------------------------------------------------------------------------

#: 64 sends awaiting the logic server's answer per connection: a person types a few
#: messages per second; 64 covers a burst of forwarded messages or a reconnect's
#: resends (the client keeps at most this many in flight).
DEFAULT_MAX_SENDS_IN_FLIGHT: Final = 64
#: Answers (SendAck) remembered for resent cids: at least the client's in-flight
#: window (64), so a resend caused by a slow answer is answered from memory; an
#: older resend goes to the store again, which is idempotent on (uid, cid).
DEFAULT_ACK_CACHE: Final = 64
#: The cid dedup window: 256 cids (a 512-byte ring per sending session, see
#: imkit.dedup), 4x the in-flight quota and 2x the client's cid span limit, so a
#: legitimate resend is never STALE.
DEFAULT_CID_WINDOW: Final = 256
#: 200 frames/s sustained, 400 in a burst: acks included, a client receiving a busy
#: group one push per frame answers one ack per frame; a human never gets near.
#: Floods (thousands/s) are refused within the burst.
DEFAULT_MAX_FRAMES_PER_S: Final = 200
DEFAULT_FRAME_BURST: Final = 400

# --- client ---------------------------------------------------------------------------

#: Sends transmitted and not yet acknowledged: the server's per-connection quota,
#: so a reconnect's resends never trip it.
DEFAULT_MAX_IN_FLIGHT: Final = DEFAULT_MAX_SENDS_IN_FLIGHT
#: The newest in-flight cid may be at most this far above the oldest: half the
#: server's cid window, so a resend is never STALE.
DEFAULT_MAX_CID_SPAN: Final = DEFAULT_CID_WINDOW // 2
#: The client paces every frame after Login at 80% of the server's rate, with a
#: bucket of 50% of its burst. Both buckets start full, so the server's holds
#: ``burst - client burst`` (200) frames of slack plus 20% of its rate: frames the
#: client spaced out may arrive bunched after a network stall of up to about a
#: second (200 frames at 200/s) and still fit.
DEFAULT_PACE_RATE_PERCENT: Final = 80
DEFAULT_PACE_BURST_PERCENT: Final = 50
#: When the pacing budget is below half its burst, push acks are held and coalesced
#: (one cumulative ack per conversation) for up to 50 ms: at most 20 ack frames per
#: second per conversation, far inside the server's first push retry (3 s). With
#: budget to spare an ack goes at once, as TCP's delayed ack goes when it can.
DEFAULT_ACK_DELAY_MS: Final = 50


def pace_limits(
    max_frames_per_s: int,
    frame_burst: int,
    *,
    rate_percent: int = DEFAULT_PACE_RATE_PERCENT,
    burst_percent: int = DEFAULT_PACE_BURST_PERCENT,
) -> tuple[int, int]:
    """The client's pacing ``(rate_per_s, burst)`` for a server's announced limits. O(1).

    Each is scaled down by its margin and is at least 1.

    >>> pace_limits(200, 400)
    (160, 200)
    """
    rate = max(1, max_frames_per_s * rate_percent // 100)
    burst = max(1, frame_burst * burst_percent // 100)
    return rate, burst
