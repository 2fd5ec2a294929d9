"""Retry, reconnect, heartbeat and rate policies: small pure objects driven by ``now_ms``.

An IM client and server keep making the same few timing decisions: how long to
wait before retrying a send, before reconnecting after a crash (without all
clients coming back in the same second), when to ping an idle link, when to
declare a silent one dead, and how many frames per second a peer may send. This
module holds those decisions as tiny deterministic objects. Nothing here reads a
clock or a random source: time comes in as ``now_ms`` and randomness as a float
``rand`` in ``[0, 1)`` chosen by the caller (``random.Random(seed).random()`` in
tests, ``random.random()`` in production), so every decision is reproducible.

* :class:`Backoff` -- full-jitter exponential backoff (Marc Brooker, "Exponential
  Backoff And Jitter", AWS Architecture Blog, 2015): the delay before attempt
  ``n`` is uniform in ``[0, min(cap, base * 2**n))``. Of the schemes compared in
  that article it does the least total work and spreads a thundering herd best,
  which is what the seed's "avalanche" section asks of reconnects (客户端断线后,
  通过随机策略打散重连请求时间).
* :class:`ExponentialBackoff` -- the plain, unjittered variant ``min(cap, base *
  factor**n)``, for retries whose spread does not matter (a client resending an
  unacknowledged message on its own connection).
* :class:`HeartbeatPolicy` / :class:`HeartbeatTracker` -- when to ping (only
  when a direction of the link has been quiet for an interval) and when the link
  is dead (no incoming traffic for ``missed`` intervals).
* :class:`TokenBucket` -- frames per second with a burst, and how long a
  refused caller should wait (the ``retry_after_ms`` of an ``Error`` frame).

Both backoffs honour a server's hint: ``delay_ms(attempt, rand, hint_ms=h)``
returns ``max(h, computed)`` so a ``retry_after_ms`` sent by the server is never
undercut.

Worked example (``Backoff(base_ms=500, cap_ms=30_000)``)::

    attempt  ceiling = min(cap, 500 * 2**attempt)   delay for rand=0.5
    0        500                                    250
    1        1000                                   500
    3        4000                                   2000
    6        30000 (capped; 32000 > cap)            15000
    6, hint_ms=20000                                20000 (hint wins)
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any

import attrs

from imkit.errors import ConfigError, TimeWentBackwards

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL_MS",
    "DEFAULT_HEARTBEAT_JITTER",
    "DEFAULT_HEARTBEAT_MISSED",
    "Backoff",
    "ExponentialBackoff",
    "HeartbeatAction",
    "HeartbeatPolicy",
    "HeartbeatTracker",
    "TokenBucket",
    "rto_update",
]

#: 30 s: below the 5-minute NAT/GGSN idle timeouts common on mobile carriers (the
#: seed's 自适应心跳 discussion) and the WhatsApp/MQTT-style keep-alive range, while
#: costing an idle gateway at most one tiny frame per 30 s per connection.
DEFAULT_HEARTBEAT_INTERVAL_MS = 30_000
#: 3 missed intervals before the link is declared dead: the MQTT spec uses 1.5x the
#: keep-alive; three rides out one lost ping plus a slow answer on a bad mobile link.
DEFAULT_HEARTBEAT_MISSED = 3
#: Pings come up to 10% early, at random, so that clients started together do not
#: ping together (the seed's 心跳潮汐 / "heartbeat tide", solved by 随机打散).
DEFAULT_HEARTBEAT_JITTER = 0.1

# 2**62 ms is far beyond any sane cap; clamping the exponent keeps ints small.
_MAX_SHIFT = 62

_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _require_int(name: str, value: object, lo: int, hi: int | None = None) -> None:
    """ConfigError naming ``name`` unless ``value`` is an int (not a bool) in ``[lo, hi]``."""
    if type(value) is not int:
        raise ConfigError(f"{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{name} must be {bound}, got {value}")


def _int_field(lo: int, hi: int | None = None) -> _Validator:
    """An attrs validator: an int in ``[lo, hi]`` (``hi=None``: no upper bound), else
    ConfigError naming the field. Used by every config of imkit (policy and session)."""

    def check(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        _require_int(attribute.name, value, lo, hi)

    return check


def _optional_int_field(lo: int) -> _Validator:
    """Like :func:`_int_field`, but ``None`` is allowed too."""

    def check(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            _require_int(attribute.name, value, lo)

    return check


def _instance_field(*types: type) -> _Validator:
    """An attrs validator: an instance of one of ``types``, else ConfigError naming the field."""

    def check(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, types):
            names = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{attribute.name} must be a {names}, got {value!r}")

    return check


def _not_below_base(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < instance.base_ms:
        raise ConfigError(f"{attribute.name} ({value}) must be >= base_ms ({instance.base_ms})")


def _fraction(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if type(value) not in (int, float) or not 0.0 <= value < 1.0:  # also rejects NaN
        raise ConfigError(f"{attribute.name} must be a number in [0, 1), got {value!r}")


def _check_rand(rand: float) -> None:
    if not 0.0 <= rand < 1.0:  # also rejects NaN
        raise ConfigError(f"rand must be in [0, 1), got {rand!r}")


def _check_attempt(attempt: int) -> None:
    if attempt < 0:
        raise ConfigError(f"attempt must be >= 0, got {attempt}")


def rto_update(srtt_ms: int, rttvar_ms: int, sample_ms: int) -> tuple[int, int, int]:
    """One RFC 6298 step: the new ``(srtt_ms, rttvar_ms, rto_ms)`` after a round trip. O(1).

    Jacobson/Karels in integer ms: the first sample (``srtt_ms == 0``) sets SRTT to it
    and RTTVAR to half of it; later ones move RTTVAR by 1/4 of the error and SRTT by
    1/8; RTO = SRTT + 4 RTTVAR. Callers clamp the RTO to their own bounds and skip
    samples of retransmitted messages (Karn's rule). Used by both delivery sessions
    for their retry timeouts (pushes, sends).

    >>> rto_update(0, 0, 80)
    (80, 40, 240)
    >>> rto_update(80, 40, 80)
    (80, 30, 200)
    """
    sample = max(0, sample_ms)
    if srtt_ms <= 0:
        srtt, var = max(1, sample), sample // 2
    else:
        var = rttvar_ms + (abs(srtt_ms - sample) - rttvar_ms) // 4
        srtt = max(1, srtt_ms + (sample - srtt_ms) // 8)
    return srtt, var, srtt + 4 * var


@attrs.frozen(kw_only=True)
class Backoff:
    """Full-jitter exponential backoff: the delay before attempt ``n`` is in ``[0, ceiling(n))``.

    ``ceiling(n) = min(cap_ms, base_ms * 2**n)``. Attempts count from 0 (the
    delay before the first retry). ``max_attempts`` (``None``: unlimited) bounds
    how many attempts :meth:`exhausted` allows. A frozen attrs value: equal by
    fields; a wrong type or range raises ConfigError naming the field.

    >>> b = Backoff(base_ms=100, cap_ms=1_000, max_attempts=5)
    >>> b.ceiling_ms(0), b.ceiling_ms(3), b.ceiling_ms(10)
    (100, 800, 1000)
    >>> b.delay_ms(2, 0.5)
    200
    >>> b.delay_ms(2, 0.5, hint_ms=5_000)
    5000
    >>> b.exhausted(4), b.exhausted(5)
    (False, True)
    """

    base_ms: int = attrs.field(validator=_int_field(1))
    cap_ms: int = attrs.field(validator=[_int_field(1), _not_below_base])
    max_attempts: int | None = attrs.field(default=None, validator=_optional_int_field(1))

    def ceiling_ms(self, attempt: int) -> int:
        """The largest delay attempt ``attempt`` may wait: ``min(cap, base * 2**attempt)``. O(1)."""
        _check_attempt(attempt)
        return min(self.cap_ms, self.base_ms << min(attempt, _MAX_SHIFT))

    def delay_ms(self, attempt: int, rand: float, *, hint_ms: int = 0) -> int:
        """Delay before attempt ``attempt``: ``max(hint_ms, floor(rand * ceiling))``. O(1).

        ``rand`` is a uniform float in ``[0, 1)`` supplied by the caller, so the
        result lies in ``[0, ceiling_ms(attempt))`` (or equals ``hint_ms`` when the
        server asked for longer).
        """
        _check_rand(rand)
        return max(hint_ms, math.floor(rand * self.ceiling_ms(attempt)))

    def exhausted(self, attempts: int) -> bool:
        """True when ``attempts`` attempts already reached ``max_attempts``. O(1)."""
        return self.max_attempts is not None and attempts >= self.max_attempts


@attrs.frozen(kw_only=True)
class ExponentialBackoff:
    """Plain exponential backoff without jitter: ``min(cap_ms, base_ms * factor**attempt)``.

    For retries where spreading does not matter (resending an unacknowledged
    message on one connection). Same interface as :class:`Backoff`; ``rand`` is
    accepted and ignored so the two are interchangeable. A frozen attrs value,
    validated like :class:`Backoff`.

    >>> b = ExponentialBackoff(base_ms=2_000, cap_ms=16_000, max_attempts=4)
    >>> [b.delay_ms(n) for n in range(5)]
    [2000, 4000, 8000, 16000, 16000]
    >>> b.delay_ms(0, hint_ms=3_000)
    3000
    """

    base_ms: int = attrs.field(validator=_int_field(1))
    cap_ms: int = attrs.field(validator=[_int_field(1), _not_below_base])
    factor: int = attrs.field(default=2, validator=_int_field(1))
    max_attempts: int | None = attrs.field(default=None, validator=_optional_int_field(1))

    def ceiling_ms(self, attempt: int) -> int:
        """The delay before attempt ``attempt`` without a hint. O(min(attempt, log(cap/base)))."""
        _check_attempt(attempt)
        delay = self.base_ms
        cap = self.cap_ms
        f = self.factor
        if f == 1:
            return delay
        for _ in range(attempt):
            delay *= f
            if delay >= cap:
                return cap
        return delay

    def delay_ms(self, attempt: int, rand: float = 0.0, *, hint_ms: int = 0) -> int:
        """Delay before attempt ``attempt``: ``max(hint_ms, ceiling_ms(attempt))``. O(attempt)."""
        _check_rand(rand)
        return max(hint_ms, self.ceiling_ms(attempt))

    def exhausted(self, attempts: int) -> bool:
        """True when ``attempts`` attempts already reached ``max_attempts``. O(1)."""
        return self.max_attempts is not None and attempts >= self.max_attempts


class HeartbeatAction(enum.Enum):
    """What :meth:`HeartbeatTracker.poll` asks the caller to do now."""

    NONE = "none"
    PING = "ping"
    DEAD = "dead"


@attrs.frozen(kw_only=True)
class HeartbeatPolicy:
    """Heartbeat timing: ping a quiet link every ``interval_ms``, dead after ``missed`` intervals.

    * **When to ping**: only when the link has been quiet. Any outgoing frame
      counts as a heartbeat for the peer, and any incoming frame proves the link
      works, so a ping is due ``interval_ms`` after the *older* of the last frame
      sent and the last frame received. A busy sender that receives nothing still
      pings (to hear a pong); a busy link never does.
    * **When the link is dead**: no incoming frame for ``deadline_ms = interval_ms *
      missed``. Servers, which never ping, use only this half.
    * ``jitter``: pings come up to ``jitter * interval_ms`` early, at random, so
      clients started together spread out.

    All methods are O(1) pure functions of their arguments. A frozen attrs value:
    equal by fields; a wrong type or range raises ConfigError naming the field.

    >>> p = HeartbeatPolicy(interval_ms=1_000, missed=3, jitter=0.0)
    >>> p.deadline_ms
    3000
    >>> p.ping_due_ms(last_sent_ms=500, last_received_ms=200)
    1200
    >>> p.dead_at_ms(last_received_ms=200)
    3200
    """

    interval_ms: int = attrs.field(default=DEFAULT_HEARTBEAT_INTERVAL_MS, validator=_int_field(1))
    missed: int = attrs.field(default=DEFAULT_HEARTBEAT_MISSED, validator=_int_field(1))
    jitter: float = attrs.field(default=DEFAULT_HEARTBEAT_JITTER, validator=_fraction)

    def with_interval(self, interval_ms: int) -> HeartbeatPolicy:
        """A copy with another interval (e.g. the server's ``LoginAck.heartbeat_ms``). O(1)."""
        return attrs.evolve(self, interval_ms=interval_ms)

    @property
    def deadline_ms(self) -> int:
        """How long the link may stay silent before it is dead: ``interval_ms * missed``. O(1)."""
        return self.interval_ms * self.missed

    def ping_due_ms(
        self,
        *,
        last_sent_ms: int,
        last_received_ms: int,
        last_ping_ms: int | None = None,
        rand: float = 0.0,
    ) -> int:
        """When the next ping is due: ``max(min(last_sent, last_received), last_ping) + interval``.

        O(1).

        Minus up to ``jitter * interval`` when ``rand`` > 0. ``last_ping_ms`` keeps
        a link that is quiet only incoming from pinging more than once an interval.
        """
        _check_rand(rand)
        early = math.floor(rand * self.jitter * self.interval_ms)
        quiet_since = min(last_sent_ms, last_received_ms)
        if last_ping_ms is not None and last_ping_ms > quiet_since:
            quiet_since = last_ping_ms
        return quiet_since + self.interval_ms - early

    def dead_at_ms(self, *, last_received_ms: int) -> int:
        """When the link is dead if nothing more arrives: ``last_received + deadline_ms``. O(1)."""
        return last_received_ms + self.deadline_ms

    def is_dead(self, now_ms: int, *, last_received_ms: int) -> bool:
        """True when nothing arrived for ``deadline_ms`` or more. O(1)."""
        return now_ms >= last_received_ms + self.deadline_ms


class HeartbeatTracker:
    """The mutable half of :class:`HeartbeatPolicy`: remembers traffic times, says what to do.

    Call :meth:`on_sent` / :meth:`on_received` for every frame (O(1), two int
    stores), :meth:`poll` when :meth:`next_deadline_ms` is reached. Each ping's
    jitter is drawn from ``rand`` given to :meth:`poll` and :meth:`reset`.

    >>> t = HeartbeatTracker(HeartbeatPolicy(interval_ms=100, missed=2, jitter=0.0), now_ms=0)
    >>> t.next_deadline_ms()
    100
    >>> t.poll(100)
    <HeartbeatAction.PING: 'ping'>
    >>> t.on_sent(100); t.poll(150)
    <HeartbeatAction.NONE: 'none'>
    >>> t.poll(200)
    <HeartbeatAction.DEAD: 'dead'>
    """

    __slots__ = ("_early_ms", "last_ping_ms", "last_received_ms", "last_sent_ms", "policy")

    def __init__(self, policy: HeartbeatPolicy, *, now_ms: int, rand: float = 0.0) -> None:
        if not isinstance(policy, HeartbeatPolicy):
            raise ConfigError(f"policy must be a HeartbeatPolicy, got {policy!r}")
        if type(now_ms) is not int:
            raise ConfigError(f"now_ms must be an int, got {now_ms!r}")
        self.policy = policy
        self.last_sent_ms = now_ms
        self.last_received_ms = now_ms
        self.last_ping_ms = now_ms
        self._early_ms = 0
        self.reset(now_ms, rand=rand)

    def reset(
        self, now_ms: int, *, policy: HeartbeatPolicy | None = None, rand: float = 0.0
    ) -> None:
        """Start over as if a frame was just sent and received (a new connection). O(1)."""
        if policy is not None:
            self.policy = policy
        _check_rand(rand)
        self.last_sent_ms = now_ms
        self.last_received_ms = now_ms
        self.last_ping_ms = now_ms
        self._early_ms = math.floor(rand * self.policy.jitter * self.policy.interval_ms)

    def on_sent(self, now_ms: int) -> None:
        """A frame went out at ``now_ms``. O(1)."""
        self.last_sent_ms = max(self.last_sent_ms, now_ms)

    def on_received(self, now_ms: int) -> None:
        """A frame came in at ``now_ms``. O(1)."""
        self.last_received_ms = max(self.last_received_ms, now_ms)

    def ping_due_ms(self) -> int:
        """When the next ping is due (jitter drawn at the last ping or reset). O(1)."""
        quiet_since = min(self.last_sent_ms, self.last_received_ms)
        quiet_since = max(quiet_since, self.last_ping_ms)
        return quiet_since + self.policy.interval_ms - self._early_ms

    def dead_at_ms(self) -> int:
        """When the link is dead if nothing more arrives. O(1)."""
        return self.last_received_ms + self.policy.deadline_ms

    def next_deadline_ms(self) -> int:
        """The earlier of :meth:`ping_due_ms` and :meth:`dead_at_ms`. O(1)."""
        return min(self.ping_due_ms(), self.dead_at_ms())

    def poll(self, now_ms: int, *, rand: float = 0.0) -> HeartbeatAction:
        """What to do at ``now_ms``: DEAD beats PING beats NONE. O(1).

        On PING the tracker records the ping at ``now_ms`` (so the next ping is a
        whole interval away even if nothing comes back) and draws the next jitter
        from ``rand``.
        """
        if now_ms >= self.dead_at_ms():
            return HeartbeatAction.DEAD
        if now_ms >= self.ping_due_ms():
            _check_rand(rand)
            self.last_sent_ms = now_ms
            self.last_ping_ms = now_ms  # the next ping waits a whole interval for the pong
            self._early_ms = math.floor(rand * self.policy.jitter * self.policy.interval_ms)
            return HeartbeatAction.PING
        return HeartbeatAction.NONE

    def _check(self) -> None:
        """Assert the invariants (tests call this after every step)."""
        if self.last_ping_ms > self.last_sent_ms:
            raise AssertionError("a ping is a sent frame: last_ping_ms > last_sent_ms")
        if not 0 <= self._early_ms <= self.policy.jitter * self.policy.interval_ms:
            raise AssertionError(f"jitter {self._early_ms} outside the policy's bound")


class TokenBucket:
    """A token bucket: ``rate_per_s`` tokens per second, at most ``burst`` saved up.

    Used for per-connection frame quotas. Tokens are kept in milli-tokens (ints)
    so that arithmetic is exact and deterministic. :meth:`take` is O(1).

    >>> b = TokenBucket(rate_per_s=10, burst=2, now_ms=0)
    >>> b.take(0), b.take(0), b.take(0)
    (True, True, False)
    >>> b.retry_after_ms(0)
    100
    >>> b.take(100)
    True
    """

    __slots__ = ("_last_ms", "_milli", "burst", "rate_per_s")

    def __init__(self, *, rate_per_s: int, burst: int, now_ms: int) -> None:
        _require_int("rate_per_s", rate_per_s, 1)
        _require_int("burst", burst, 1)
        if type(now_ms) is not int:
            raise ConfigError(f"now_ms must be an int, got {now_ms!r}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._milli = burst * 1000
        self._last_ms = now_ms

    def _refill(self, now_ms: int) -> None:
        elapsed = now_ms - self._last_ms
        if elapsed < 0:
            raise TimeWentBackwards(now_ms, self._last_ms)
        if elapsed:
            # rate_per_s tokens per 1000 ms == rate_per_s milli-tokens per ms
            self._milli = min(self.burst * 1000, self._milli + elapsed * self.rate_per_s)
            self._last_ms = now_ms

    @property
    def tokens(self) -> float:
        """Tokens available at the last refill (for display). O(1)."""
        return self._milli / 1000

    def take(self, now_ms: int, n: int = 1) -> bool:
        """Take ``n`` tokens if available; False (and nothing taken) otherwise. O(1)."""
        if now_ms != self._last_ms:
            self._refill(now_ms)
        need = n * 1000
        if self._milli >= need:
            self._milli -= need
            return True
        return False

    def retry_after_ms(self, now_ms: int, n: int = 1) -> int:
        """How long until ``n`` tokens are available (0 if they are now). O(1)."""
        self._refill(now_ms)
        missing = n * 1000 - self._milli
        if missing <= 0:
            return 0
        return -(-missing // self.rate_per_s)  # ceil division

    def _check(self) -> None:
        """Assert the invariants."""
        if not 0 <= self._milli <= self.burst * 1000:
            raise AssertionError(f"bucket holds {self._milli} milli-tokens, burst {self.burst}")
