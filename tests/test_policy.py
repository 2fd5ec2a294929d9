"""Tests for imkit.policy: backoffs, heartbeat timing, token bucket."""

from __future__ import annotations

import doctest
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import imkit.policy
from imkit.errors import ConfigError, TimeWentBackwards
from imkit.policy import (
    Backoff,
    ExponentialBackoff,
    HeartbeatAction,
    HeartbeatPolicy,
    HeartbeatTracker,
    TokenBucket,
)

rands = st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)
attempts = st.integers(min_value=0, max_value=200)
bases = st.integers(min_value=1, max_value=10_000)


@st.composite
def backoffs(draw: st.DrawFn) -> Backoff:
    base = draw(bases)
    cap = draw(st.integers(min_value=base, max_value=base * 10_000))
    return Backoff(base_ms=base, cap_ms=cap, max_attempts=draw(st.none() | st.integers(1, 20)))


@st.composite
def exp_backoffs(draw: st.DrawFn) -> ExponentialBackoff:
    base = draw(bases)
    cap = draw(st.integers(min_value=base, max_value=base * 10_000))
    return ExponentialBackoff(
        base_ms=base,
        cap_ms=cap,
        factor=draw(st.integers(1, 5)),
        max_attempts=draw(st.none() | st.integers(1, 20)),
    )


def test_doctests() -> None:
    """The examples in the module's docstrings hold."""
    result = doctest.testmod(imkit.policy)
    assert result.attempted > 0
    assert result.failed == 0


class TestBackoff:
    @given(backoffs(), attempts, rands)
    def test_delay_within_full_jitter_range(self, b: Backoff, attempt: int, rand: float) -> None:
        """Full jitter: 0 <= delay < min(cap, base * 2**attempt) (or == 0 when rand is 0)."""
        ceiling = min(b.cap_ms, b.base_ms * 2**attempt)
        assert b.ceiling_ms(attempt) == ceiling
        d = b.delay_ms(attempt, rand)
        assert 0 <= d < ceiling or d == 0

    @given(backoffs(), attempts, rands, st.integers(0, 10**9))
    def test_hint_honoured(self, b: Backoff, attempt: int, rand: float, hint: int) -> None:
        """The server's retry-after hint is never undercut; only a hint can exceed the cap."""
        d = b.delay_ms(attempt, rand, hint_ms=hint)
        assert d >= hint
        assert d == max(hint, b.delay_ms(attempt, rand))

    @given(backoffs(), attempts)
    def test_ceilings_monotone_and_capped(self, b: Backoff, attempt: int) -> None:
        """Ceilings never decrease with the attempt number and never pass the cap."""
        assert b.ceiling_ms(attempt) <= b.ceiling_ms(attempt + 1) <= b.cap_ms

    @given(backoffs(), attempts, rands, rands)
    def test_monotone_in_rand(self, b: Backoff, attempt: int, r1: float, r2: float) -> None:
        """For one attempt, a larger rand never gives a shorter delay."""
        lo, hi = sorted((r1, r2))
        assert b.delay_ms(attempt, lo) <= b.delay_ms(attempt, hi)

    def test_spreads_a_herd(self) -> None:
        """10k clients with independent rands spread over the whole window (no spike)."""
        b = Backoff(base_ms=1000, cap_ms=30_000)
        rng = random.Random(7)
        delays = [b.delay_ms(5, rng.random()) for _ in range(10_000)]
        buckets = [0] * 10
        for d in delays:
            buckets[d * 10 // 30_000] += 1
        assert max(buckets) < 1300 and min(buckets) > 700

    def test_exhausted(self) -> None:
        """max_attempts bounds exhausted(); None never exhausts."""
        assert not Backoff(base_ms=1, cap_ms=1).exhausted(10**9)
        b = Backoff(base_ms=1, cap_ms=1, max_attempts=3)
        assert [b.exhausted(n) for n in range(5)] == [False, False, False, True, True]

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"base_ms": 0, "cap_ms": 10},
            {"base_ms": 10, "cap_ms": 5},
            {"base_ms": 1, "cap_ms": 5, "max_attempts": 0},
        ],
    )
    def test_bad_config(self, kwargs: dict[str, int]) -> None:
        """Impossible settings raise ConfigError."""
        with pytest.raises(ConfigError):
            Backoff(**kwargs)

    @pytest.mark.parametrize("rand", [-0.1, 1.0, float("nan")])
    def test_bad_rand(self, rand: float) -> None:
        """rand outside [0, 1) (or NaN) is refused."""
        with pytest.raises(ConfigError):
            Backoff(base_ms=1, cap_ms=2).delay_ms(0, rand)

    def test_negative_attempt(self) -> None:
        """A negative attempt number is refused."""
        with pytest.raises(ConfigError):
            Backoff(base_ms=1, cap_ms=2).ceiling_ms(-1)


class TestExponentialBackoff:
    @given(exp_backoffs(), attempts)
    def test_matches_formula(self, b: ExponentialBackoff, attempt: int) -> None:
        """delay == min(cap, base * factor**attempt), no jitter."""
        assert b.delay_ms(attempt) == min(b.cap_ms, b.base_ms * b.factor**attempt)

    @given(exp_backoffs(), attempts, rands)
    def test_ignores_rand(self, b: ExponentialBackoff, attempt: int, rand: float) -> None:
        """rand is accepted for interface compatibility and has no effect."""
        assert b.delay_ms(attempt, rand) == b.delay_ms(attempt)

    @given(exp_backoffs(), attempts, st.integers(0, 10**9))
    def test_hint_and_monotone(self, b: ExponentialBackoff, attempt: int, hint: int) -> None:
        """Hints are honoured; delays never decrease and never pass the cap without a hint."""
        assert b.delay_ms(attempt, hint_ms=hint) == max(hint, b.delay_ms(attempt))
        assert b.delay_ms(attempt) <= b.delay_ms(attempt + 1) <= b.cap_ms

    def test_bad_factor(self) -> None:
        """A factor below 1 is refused."""
        with pytest.raises(ConfigError):
            ExponentialBackoff(base_ms=1, cap_ms=2, factor=0)


class TestHeartbeatPolicy:
    @given(st.integers(1, 10**6), st.integers(1, 10), st.integers(0, 10**9), st.integers(0, 10**9))
    def test_ping_due_after_quietest_direction(
        self, interval: int, missed: int, sent: int, received: int
    ) -> None:
        """Without jitter a ping is due one interval after the older of the last send/receive."""
        p = HeartbeatPolicy(interval_ms=interval, missed=missed, jitter=0.0)
        assert p.ping_due_ms(last_sent_ms=sent, last_received_ms=received) == (
            min(sent, received) + interval
        )
        assert p.dead_at_ms(last_received_ms=received) == received + interval * missed

    @given(st.integers(1, 10**6), rands, rands)
    def test_jitter_only_makes_pings_earlier(
        self, interval: int, jitter: float, rand: float
    ) -> None:
        """Jitter moves a ping at most jitter*interval earlier, never later."""
        p = HeartbeatPolicy(interval_ms=interval, jitter=jitter)
        due = p.ping_due_ms(last_sent_ms=0, last_received_ms=0, rand=rand)
        assert interval - jitter * interval - 1 <= due <= interval

    def test_last_ping_delays_next_ping(self) -> None:
        """A ping sent on a link quiet only incoming delays the next ping by an interval."""
        p = HeartbeatPolicy(interval_ms=100, jitter=0.0)
        assert p.ping_due_ms(last_sent_ms=500, last_received_ms=0, last_ping_ms=450) == 550

    def test_is_dead(self) -> None:
        """Dead exactly at last_received + interval * missed."""
        p = HeartbeatPolicy(interval_ms=100, missed=3)
        assert not p.is_dead(299, last_received_ms=0)
        assert p.is_dead(300, last_received_ms=0)

    @pytest.mark.parametrize(
        "kwargs",
        [{"interval_ms": 0}, {"missed": 0}, {"jitter": 1.0}, {"jitter": -0.5}],
    )
    def test_bad_config(self, kwargs: dict[str, float]) -> None:
        """Impossible settings raise ConfigError."""
        with pytest.raises(ConfigError):
            HeartbeatPolicy(**kwargs)  # type: ignore[arg-type]

    def test_with_interval(self) -> None:
        """with_interval keeps missed and jitter."""
        p = HeartbeatPolicy(interval_ms=100, missed=4, jitter=0.2).with_interval(50)
        assert (p.interval_ms, p.missed, p.jitter) == (50, 4, 0.2)


class HeartbeatMachine(RuleBasedStateMachine):
    """HeartbeatTracker against a model that replays every event since the last ping."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.policy = HeartbeatPolicy(interval_ms=10, missed=3, jitter=0.0)
        self.tracker = HeartbeatTracker(self.policy, now_ms=0)
        self.sent = 0
        self.received = 0
        self.ping = 0
        self.dead = False

    @rule(dt=st.integers(0, 15))
    def advance(self, dt: int) -> None:
        self.now += dt

    @precondition(lambda self: not self.dead)
    @rule()
    def send(self) -> None:
        self.tracker.on_sent(self.now)
        self.sent = self.now

    @precondition(lambda self: not self.dead)
    @rule()
    def receive(self) -> None:
        self.tracker.on_received(self.now)
        self.received = self.now

    @precondition(lambda self: not self.dead)
    @rule()
    def poll(self) -> None:
        action = self.tracker.poll(self.now)
        if self.now >= self.received + 30:
            assert action is HeartbeatAction.DEAD
            self.dead = True
        elif self.now >= max(min(self.sent, self.received), self.ping) + 10:
            assert action is HeartbeatAction.PING
            self.sent = self.ping = self.now
        else:
            assert action is HeartbeatAction.NONE

    @invariant()
    def deadlines(self) -> None:
        self.tracker._check()
        if not self.dead:
            assert self.tracker.dead_at_ms() == self.received + 30
            assert self.tracker.ping_due_ms() == max(min(self.sent, self.received), self.ping) + 10


TestHeartbeatMachine = HeartbeatMachine.TestCase
TestHeartbeatMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


class TestHeartbeatTracker:
    def test_polls_never_flood_pings(self) -> None:
        """On a link where nothing comes back, pings are an interval apart, then DEAD."""
        t = HeartbeatTracker(HeartbeatPolicy(interval_ms=10, missed=3, jitter=0.0), now_ms=0)
        actions = [t.poll(now) for now in range(0, 40)]
        pings = [now for now, a in enumerate(actions) if a is HeartbeatAction.PING]
        assert pings == [10, 20]
        assert actions[30] is HeartbeatAction.DEAD

    def test_reset_with_new_policy(self) -> None:
        """reset() adopts a new policy and restarts both clocks."""
        t = HeartbeatTracker(HeartbeatPolicy(interval_ms=10, jitter=0.0), now_ms=0)
        t.reset(100, policy=HeartbeatPolicy(interval_ms=50, missed=2, jitter=0.0))
        assert t.next_deadline_ms() == 150
        assert t.dead_at_ms() == 200


class BucketMachine(RuleBasedStateMachine):
    """TokenBucket against an exact fractional model."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.bucket = TokenBucket(rate_per_s=7, burst=3, now_ms=0)
        self.model = 3000  # milli-tokens

    @rule(dt=st.integers(0, 700))
    def advance(self, dt: int) -> None:
        self.now += dt
        self.model = min(3000, self.model + dt * 7)
        self.bucket.retry_after_ms(self.now)  # refills

    @rule(n=st.integers(1, 3))
    def take(self, n: int) -> None:
        ok = self.bucket.take(self.now, n)
        assert ok == (self.model >= n * 1000)
        if ok:
            self.model -= n * 1000
        else:
            wait = self.bucket.retry_after_ms(self.now, n)
            assert wait > 0
            assert self.model + wait * 7 >= n * 1000 > self.model + (wait - 1) * 7

    @invariant()
    def same(self) -> None:
        self.bucket._check()
        assert self.bucket.tokens * 1000 == pytest.approx(self.model)


TestBucketMachine = BucketMachine.TestCase
TestBucketMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


class TestTokenBucket:
    def test_rate_over_a_long_run(self) -> None:
        """Taking greedily every ms for 10 s yields burst + 10 s * rate tokens."""
        b = TokenBucket(rate_per_s=100, burst=5, now_ms=0)
        taken = sum(b.take(now) for now in range(10_001))
        assert taken == 5 + 1000

    def test_time_backwards(self) -> None:
        """now_ms going backwards raises TimeWentBackwards."""
        b = TokenBucket(rate_per_s=1, burst=1, now_ms=10)
        with pytest.raises(TimeWentBackwards):
            b.take(5)

    @pytest.mark.parametrize(
        "kwargs", [{"rate_per_s": 0, "burst": 1}, {"rate_per_s": 1, "burst": 0}]
    )
    def test_bad_config(self, kwargs: dict[str, int]) -> None:
        """Zero rate or burst is refused."""
        with pytest.raises(ConfigError):
            TokenBucket(now_ms=0, **kwargs)


class TestConfigValues:
    """Backoff, ExponentialBackoff and HeartbeatPolicy are attrs values (issue 9)."""

    def test_equal_by_value_with_repr_and_hash(self) -> None:
        """Two policies with the same fields are equal, hash alike and repr their fields."""
        assert Backoff(base_ms=1, cap_ms=2) == Backoff(base_ms=1, cap_ms=2)
        assert Backoff(base_ms=1, cap_ms=2) != Backoff(base_ms=1, cap_ms=3)
        assert ExponentialBackoff(base_ms=1, cap_ms=2) == ExponentialBackoff(base_ms=1, cap_ms=2)
        assert HeartbeatPolicy(interval_ms=5) == HeartbeatPolicy(interval_ms=5)
        assert len({HeartbeatPolicy(), HeartbeatPolicy()}) == 1
        want = "Backoff(base_ms=1, cap_ms=2, max_attempts=None)"
        assert repr(Backoff(base_ms=1, cap_ms=2)) == want
        assert "missed=3" in repr(HeartbeatPolicy())

    def test_frozen(self) -> None:
        """A policy cannot be changed after it is built (it is shared by many sessions)."""
        import attrs

        b = Backoff(base_ms=1, cap_ms=2)
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            b.base_ms = 5  # type: ignore[misc]

    @pytest.mark.parametrize(
        ("cls", "kwargs", "field"),
        [
            (Backoff, {"base_ms": "5", "cap_ms": 10}, "base_ms"),
            (Backoff, {"base_ms": 5, "cap_ms": 10.0}, "cap_ms"),
            (Backoff, {"base_ms": 5, "cap_ms": 10, "max_attempts": True}, "max_attempts"),
            (Backoff, {"base_ms": 10, "cap_ms": 5}, "cap_ms"),
            (ExponentialBackoff, {"base_ms": 5, "cap_ms": 10, "factor": 1.5}, "factor"),
            (ExponentialBackoff, {"base_ms": 0, "cap_ms": 10}, "base_ms"),
            (HeartbeatPolicy, {"interval_ms": None}, "interval_ms"),
            (HeartbeatPolicy, {"missed": "3"}, "missed"),
            (HeartbeatPolicy, {"jitter": "0.1"}, "jitter"),
            (HeartbeatPolicy, {"jitter": float("nan")}, "jitter"),
        ],
    )
    def test_bad_field_names_it(self, cls: type, kwargs: dict[str, object], field: str) -> None:
        """A wrong type or range raises ConfigError naming the field."""
        with pytest.raises(ConfigError, match=field):
            cls(**kwargs)

    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [
            ({"rate_per_s": 1.5, "burst": 1, "now_ms": 0}, "rate_per_s"),
            ({"rate_per_s": 1, "burst": "2", "now_ms": 0}, "burst"),
            ({"rate_per_s": 1, "burst": 2, "now_ms": 0.5}, "now_ms"),
        ],
    )
    def test_token_bucket_arguments(self, kwargs: dict[str, object], field: str) -> None:
        """TokenBucket's wrong-typed arguments raise ConfigError naming the argument."""
        with pytest.raises(ConfigError, match=field):
            TokenBucket(**kwargs)  # type: ignore[arg-type]

    def test_heartbeat_tracker_arguments(self) -> None:
        """HeartbeatTracker refuses a policy that is not a HeartbeatPolicy, naming it."""
        with pytest.raises(ConfigError, match="policy"):
            HeartbeatTracker(30_000, now_ms=0)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="now_ms"):
            HeartbeatTracker(HeartbeatPolicy(), now_ms="0")  # type: ignore[arg-type]
