"""Tests of imkit.timingwheel: a state machine against a heap-based oracle, plus edge cases.

The firing rule under test, exactly: a timer added (or rescheduled) while the wheel's
time is ``now`` with deadline ``d`` is returned by the first ``advance(t)`` with
``t >= due``, where ``due = now`` if ``d <= now`` (overdue: the next advance) and
otherwise ``due = ceil(d / tick_ms) * tick_ms`` (at most one tick late, never early).
Each advance returns its due timers ordered by (deadline, order of add/reschedule).
"""

from __future__ import annotations

import doctest
import heapq

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import imkit.timingwheel
from imkit.errors import CapacityError, ConfigError, ImkitError, TimeWentBackwards
from imkit.timingwheel import (
    DEFAULT_MAX_PENDING_TIMERS,
    MAX_DEADLINE_MS,
    MAX_WHEEL_SIZE,
    TimerHandle,
    TimingWheel,
)


class MockTimer:
    """The oracle: a heap of (due_ms, seq) with lazy deletion, like Kafka's MockTimer."""

    def __init__(self, tick_ms: int, start_ms: int) -> None:
        self.tick = tick_ms
        self.now = start_ms
        self.seq = 0
        self.heap: list[tuple[int, int, int]] = []  # (due_ms, seq, timer id)
        self.pending: dict[int, tuple[int, int, int]] = {}  # id -> (deadline, seq, due_ms)

    def add(self, tid: int, deadline: int) -> None:
        self.seq += 1
        due = self.now if deadline <= self.now else -(-deadline // self.tick) * self.tick
        self.pending[tid] = (deadline, self.seq, due)
        heapq.heappush(self.heap, (due, self.seq, tid))

    def cancel(self, tid: int) -> bool:
        return self.pending.pop(tid, None) is not None

    def reschedule(self, tid: int, deadline: int) -> None:
        self.pending.pop(tid, None)
        self.add(tid, deadline)

    def advance(self, now: int) -> list[int]:
        assert now >= self.now
        self.now = now
        due: list[tuple[int, int, int]] = []
        while self.heap and self.heap[0][0] <= now:
            _, seq, tid = heapq.heappop(self.heap)
            entry = self.pending.get(tid)
            if entry is not None and entry[1] == seq:  # else cancelled or rescheduled
                del self.pending[tid]
                due.append((entry[0], seq, tid))
        return [tid for _, _, tid in sorted(due)]

    def earliest_due(self) -> int | None:
        return min((due for _, _, due in self.pending.values()), default=None)


offsets = st.one_of(
    st.integers(-60, 0),  # overdue or exactly now
    st.integers(1, 40),  # level 0 of a tiny wheel
    st.integers(41, 5_000),  # a few levels up
    st.integers(5_000, 10**9),  # many levels up
    st.just(10**15),
)
steps = st.one_of(st.integers(0, 25), st.integers(0, 3_000), st.integers(0, 10**12))


class WheelVersusOracle(RuleBasedStateMachine):
    """A shrunk wheel (2 or 4 buckets per level) so that cascading happens constantly."""

    wheel: TimingWheel[int]
    oracle: MockTimer
    handles: list[TimerHandle[int]]

    @initialize(
        tick=st.integers(1, 10),
        size=st.sampled_from([2, 4]),
        start=st.one_of(st.just(0), st.integers(0, 10**6)),
    )
    def init_wheel(self, tick: int, size: int, start: int) -> None:
        """A tiny wheel and the oracle, on the same clock."""
        self.wheel = TimingWheel(tick_ms=tick, wheel_size=size, start_ms=start)
        self.oracle = MockTimer(tick, start)
        self.handles = []

    def _add(self, deadline: int) -> None:
        """Add to both; the handle reports what was added."""
        tid = len(self.handles)
        h = self.wheel.add(deadline, tid)
        self.handles.append(h)
        self.oracle.add(tid, deadline)
        assert h.pending and h.item == tid and h.deadline_ms == deadline

    @rule(offset=offsets)
    def add(self, offset: int) -> None:
        """Overdue, near, and far (many levels up) deadlines."""
        self._add(self.wheel.now_ms + offset)

    @precondition(lambda self: bool(self.handles))
    @rule(i=st.integers(0, 10**6))
    def add_same_deadline(self, i: int) -> None:
        """A deadline some earlier timer has: ties must keep insertion order."""
        self._add(self.handles[i % len(self.handles)].deadline_ms)

    @precondition(lambda self: bool(self.oracle.pending))
    @rule(i=st.integers(0, 10**6))
    def add_tie_with_a_pending_timer(self, i: int) -> None:
        """Often overdue but still in the wheel (inside the current tick): ties across both."""
        pending = sorted(self.oracle.pending)
        self._add(self.handles[pending[i % len(pending)]].deadline_ms)

    @precondition(lambda self: bool(self.handles))
    @rule(i=st.integers(0, 10**6))
    def cancel(self, i: int) -> None:
        """Pending, fired or cancelled handles alike; the result says which."""
        tid = i % len(self.handles)
        assert self.handles[tid].cancel() == self.oracle.cancel(tid)
        assert not self.handles[tid].pending

    @precondition(lambda self: bool(self.handles))
    @rule(i=st.integers(0, 10**6), offset=offsets)
    def reschedule(self, i: int, offset: int) -> None:
        """Move a pending handle or re-arm a fired or cancelled one."""
        tid = i % len(self.handles)
        deadline = self.wheel.now_ms + offset
        self.handles[tid].reschedule(deadline)
        self.oracle.reschedule(tid, deadline)
        assert self.handles[tid].pending and self.handles[tid].deadline_ms == deadline

    @precondition(lambda self: bool(self.handles))
    @rule(i=st.integers(0, 10**6), j=st.integers(0, 10**6))
    def reschedule_to_same_deadline(self, i: int, j: int) -> None:
        """Reschedule onto another timer's deadline: a tie, now last in order."""
        tid = i % len(self.handles)
        deadline = max(self.handles[j % len(self.handles)].deadline_ms, 0)
        self.handles[tid].reschedule(deadline)
        self.oracle.reschedule(tid, deadline)

    def _advance(self, now: int) -> None:
        """Advance both; same items in the same order."""
        got = self.wheel.advance(now)
        want = self.oracle.advance(now)
        assert got == want, f"advance({now}): wheel {got}, oracle {want}"
        assert self.wheel.now_ms == now
        for tid in got:
            assert not self.handles[tid].pending

    @rule(step=steps)
    def advance(self, step: int) -> None:
        """Small steps inside and across ticks, and huge jumps over idle gaps."""
        self._advance(self.wheel.now_ms + step)

    @rule()
    def advance_to_last_ms_of_tick(self) -> None:
        """Leaves timers overdue but still in the wheel, for ties with overdue adds."""
        tick = self.wheel.tick_ms
        self._advance(self.wheel.now_ms // tick * tick + tick - 1)

    @rule()
    def advance_to_next_deadline(self) -> None:
        """Advancing to next_deadline_ms() itself; also checks its bounds."""
        nd = self.wheel.next_deadline_ms()
        earliest = self.oracle.earliest_due()
        now = self.wheel.now_ms
        if earliest is None:
            assert nd is None
            return
        assert nd is not None
        if earliest <= now:
            assert nd == now
        else:
            assert now < nd <= earliest
        self._advance(nd)

    @rule()
    def advance_to_just_before_next_deadline(self) -> None:
        """Nothing may come due before next_deadline_ms()."""
        nd = self.wheel.next_deadline_ms()
        if nd is not None and nd - 1 >= self.wheel.now_ms:
            self._advance(nd - 1)
            assert self.oracle.pending  # the oracle returned nothing either

    @invariant()
    def structure_holds(self) -> None:
        """_check() passes, len() and every handle's pending flag match the oracle."""
        if not hasattr(self, "wheel"):
            return
        self.wheel._check()
        assert len(self.wheel) == len(self.oracle.pending)
        for tid, h in enumerate(self.handles):
            assert h.pending == (tid in self.oracle.pending)


WheelVersusOracle.TestCase.settings = settings(max_examples=500, stateful_step_count=50)
TestWheelVersusOracle = WheelVersusOracle.TestCase


def tiny(**kw: int) -> TimingWheel[str]:
    """A 2-bucket wheel with 1 ms ticks, so most deadlines sit several levels up."""
    args = {"tick_ms": 1, "wheel_size": 2} | kw
    return TimingWheel(**args)


class TestConstruction:
    """Constructor arguments and properties."""

    def test_defaults(self) -> None:
        """The defaults are the documented constants and the wheel starts empty."""
        w: TimingWheel[object] = TimingWheel()
        assert (w.tick_ms, w.wheel_size, w.now_ms, len(w), w.levels) == (10, 256, 0, 0, 1)
        assert w.max_pending == DEFAULT_MAX_PENDING_TIMERS
        assert w.next_deadline_ms() is None
        assert "pending=0" in repr(w)
        w._check()

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"tick_ms": 0},
            {"tick_ms": -5},
            {"wheel_size": 0},
            {"wheel_size": 1},
            {"wheel_size": 3},
            {"wheel_size": 100},
            {"wheel_size": MAX_WHEEL_SIZE * 2},
            {"start_ms": -1},
            {"start_ms": MAX_DEADLINE_MS + 1},
            {"max_pending": 0},
        ],
    )
    def test_bad_arguments(self, kwargs: dict[str, int]) -> None:
        """Out-of-range arguments raise ConfigError (a ValueError)."""
        with pytest.raises(ConfigError):
            TimingWheel(**kwargs)
        with pytest.raises(ValueError):
            TimingWheel(**kwargs)

    @pytest.mark.parametrize("name", ["tick_ms", "wheel_size", "start_ms", "max_pending"])
    @pytest.mark.parametrize("value", [2.0, "2", True, None])
    def test_non_int_arguments(self, name: str, value: object) -> None:
        """Arguments that are not ints (bool included) raise ConfigError."""
        with pytest.raises(ConfigError):
            TimingWheel(**{name: value})  # type: ignore[arg-type]

    @pytest.mark.parametrize("size", [2, MAX_WHEEL_SIZE])
    def test_extreme_wheel_sizes(self, size: int) -> None:
        """The smallest and the largest wheel_size work end to end."""
        w = TimingWheel[int](tick_ms=1, wheel_size=size)
        for d in (1, size - 1, size, size * size + 3, 10**9):
            w.add(d, d)
        w._check()
        assert w.advance(10**9) == [1, size - 1, size, size * size + 3, 10**9]

    def test_handles_are_not_built_by_hand(self) -> None:
        """TimerHandle() is refused: handles come from add()."""
        with pytest.raises(TypeError):
            TimerHandle()

    def test_start_ms_sets_the_clock(self) -> None:
        """start_ms is the initial now_ms; deadlines before it are overdue."""
        w = TimingWheel[str](tick_ms=10, start_ms=12_345)
        w.add(12_000, "late")
        assert w.now_ms == 12_345
        assert w.next_deadline_ms() == 12_345
        assert w.advance(12_345) == ["late"]


class TestAdd:
    """add() and its errors."""

    def test_overdue_add_fires_on_the_next_advance(self) -> None:
        """A deadline at or before now fires at the next advance, even at the same time."""
        w = TimingWheel[str](tick_ms=10, start_ms=15)
        w.add(15, "now")
        w.add(-100, "long ago")
        assert w.advance(15) == ["long ago", "now"]

    def test_deadline_within_the_current_tick_waits_for_the_boundary(self) -> None:
        """A deadline after now but inside the current tick fires at the tick boundary."""
        w = TimingWheel[str](tick_ms=10, start_ms=11)
        w.add(13, "x")
        assert w.advance(13) == []
        assert w.advance(19) == []
        assert w.advance(20) == ["x"]

    @pytest.mark.parametrize("bad", [1.5, "10", None, [1]])
    def test_non_int_deadline(self, bad: object) -> None:
        """A deadline that is not an int raises ConfigError and adds nothing."""
        w = tiny()
        with pytest.raises(ConfigError):
            w.add(bad, "x")  # type: ignore[arg-type]
        assert len(w) == 0
        w._check()

    @pytest.mark.parametrize("tick", [1, 7, 10])
    def test_deadline_limit(self, tick: int) -> None:
        """MAX_DEADLINE_MS is accepted; one more raises ConfigError."""
        w = TimingWheel[str](tick_ms=tick, wheel_size=4)
        h = w.add(MAX_DEADLINE_MS, "edge")
        with pytest.raises(ConfigError):
            w.add(MAX_DEADLINE_MS + 1, "beyond")
        with pytest.raises(ConfigError):
            h.reschedule(MAX_DEADLINE_MS + 1)
        assert h.pending and h.deadline_ms == MAX_DEADLINE_MS and len(w) == 1
        w._check()
        # It fires when its tick boundary is reachable: 2**63 - 1 is a multiple of 1 and 7.
        assert w.advance(MAX_DEADLINE_MS) == (["edge"] if MAX_DEADLINE_MS % tick == 0 else [])
        with pytest.raises(ConfigError):
            w.add(MAX_DEADLINE_MS + 1, "beyond")
        with pytest.raises(ConfigError):
            w.advance(MAX_DEADLINE_MS + 1)
        w._check()

    def test_max_pending(self) -> None:
        """The max_pending+1-th timer raises CapacityError; cancelling frees a place."""
        w = TimingWheel[int](max_pending=3)
        hs = [w.add(100 * i, i) for i in range(1, 4)]
        with pytest.raises(CapacityError) as info:
            w.add(500, 9)
        assert info.value.limit == "max_pending" and isinstance(info.value, ImkitError)
        hs[1].reschedule(50)  # a pending handle moves: nothing is added
        hs[0].cancel()
        hs[0].reschedule(700)  # re-arming counts as adding, and there is room again
        with pytest.raises(CapacityError):
            w.add(600, 10)
        hs[2].cancel()
        w.add(600, 10)
        hs[2].cancel()  # no-op: it is not pending
        with pytest.raises(CapacityError):
            hs[2].reschedule(800)
        assert not hs[2].pending and len(w) == 3
        w._check()

    def test_levels_are_built_on_demand(self) -> None:
        """Far deadlines add levels; near ones do not."""
        w = tiny()
        w.add(1, "near")
        assert w.levels == 1
        w.add(10**6, "far")
        assert w.levels == 20
        w._check()


class TestCancel:
    """cancel()."""

    def test_cancel_is_idempotent(self) -> None:
        """cancel() returns True once, then False; the item never fires."""
        w = tiny()
        h = w.add(5, "x")
        assert h.cancel() is True
        assert h.cancel() is False
        assert len(w) == 0 and not h.pending
        assert w.advance(100) == []

    def test_cancel_after_firing(self) -> None:
        """A fired handle is no longer pending and cancel() says so."""
        w = tiny()
        h = w.add(5, "x")
        assert w.advance(5) == ["x"]
        assert not h.pending and h.cancel() is False
        assert h.item == "x" and h.deadline_ms == 5
        assert "idle" in repr(h)

    def test_cancel_middle_of_bucket(self) -> None:
        """Cancelling one of several timers in a bucket keeps the others in order."""
        w = TimingWheel[str](tick_ms=10)
        a, b, c = (w.add(25, n) for n in "abc")
        assert "pending" in repr(b)
        b.cancel()
        w._check()
        assert w.advance(30) == ["a", "c"]
        assert not a.pending and not c.pending


class TestReschedule:
    """reschedule()."""

    def test_heartbeat_pushes_deadline_forward(self) -> None:
        """Rescheduling repeatedly keeps one pending timer that fires only at the last deadline."""
        w = TimingWheel[str](tick_ms=10)
        h = w.add(30_000, "conn")
        for now in range(0, 100_000, 5_000):
            assert w.advance(now) == []
            h.reschedule(now + 30_000)
            assert len(w) == 1
        assert w.advance(124_999) == []
        assert w.advance(125_000) == ["conn"]

    def test_rearm_after_fire_and_cancel(self) -> None:
        """A fired or cancelled handle is armed again by reschedule()."""
        w = tiny()
        h = w.add(3, "x")
        assert w.advance(3) == ["x"]
        h.reschedule(10)
        assert h.pending and len(w) == 1
        h.cancel()
        h.reschedule(2)  # before now: overdue
        assert w.advance(3) == ["x"]

    def test_reschedule_moves_to_the_back_of_ties(self) -> None:
        """Rescheduling to the same deadline counts as a new add for tie order."""
        w = TimingWheel[str](tick_ms=1)
        a = w.add(50, "a")
        w.add(50, "b")
        a.reschedule(50)
        assert w.advance(50) == ["b", "a"]

    def test_bad_deadline_leaves_handle_alone(self) -> None:
        """A rejected reschedule keeps the old deadline and place."""
        w = tiny()
        h = w.add(40, "x")
        with pytest.raises(ConfigError):
            h.reschedule("soon")  # type: ignore[arg-type]
        assert h.pending and h.deadline_ms == 40
        w._check()
        assert w.advance(40) == ["x"]


class TestAdvance:
    """advance(): timing, order, errors, long gaps."""

    def test_time_went_backwards(self) -> None:
        """A smaller now_ms raises TimeWentBackwards (a ValueError) and changes nothing."""
        w = TimingWheel[str](tick_ms=10)
        w.advance(100)
        for bad in (99, 0):
            with pytest.raises(TimeWentBackwards) as info:
                w.advance(bad)
            assert (info.value.now_ms, info.value.last_ms) == (bad, 100)
            assert isinstance(info.value, ValueError)
        assert w.now_ms == 100
        assert w.advance(100) == []

    @pytest.mark.parametrize("bad", [1.0, "5", None])
    def test_non_int_now(self, bad: object) -> None:
        """now_ms that is not an int raises ConfigError."""
        w = tiny()
        with pytest.raises(ConfigError):
            w.advance(bad)  # type: ignore[arg-type]

    def test_one_tick_lateness_exactly(self) -> None:
        """A deadline fires at ceil(deadline / tick) * tick, never before its deadline."""
        w = TimingWheel[int](tick_ms=10)
        for d in range(1, 41):
            w.add(d, d)
        fired: dict[int, int] = {}
        for now in range(41):
            for d in w.advance(now):
                fired[d] = now
        assert fired == {d: -(-d // 10) * 10 for d in range(1, 41)}

    def test_deadline_order_within_a_tick(self) -> None:
        """Timers of one tick come out by deadline, not by add order."""
        w = TimingWheel[int](tick_ms=100)
        for d in (150, 120, 199, 101, 120):
            w.add(d, d)
        assert w.advance(200) == [101, 120, 120, 150, 199]

    def test_ties_keep_insertion_order_across_cascades(self) -> None:
        """Equal deadlines added at different times (on different levels) fire in add order."""
        w = tiny()
        w.add(1000, "first")  # level 9 (1000 < 2**10)
        w.advance(900)
        w.add(1000, "second")  # level 6 (1000 ^ 900 = 116)
        w.advance(998)
        w.add(1000, "third")  # level 1 (1000 ^ 998 = 14)
        w.advance(999)
        w.add(1000, "fourth")  # level 0
        assert w.advance(1000) == ["first", "second", "third", "fourth"]

    def test_overdue_ties_come_after_wheel_ties(self) -> None:
        """An overdue add with the same deadline fires after earlier adds of that deadline."""
        w = TimingWheel[str](tick_ms=10)
        w.add(17, "in the wheel")
        w.advance(17)
        w.add(17, "overdue")
        assert w.advance(17) == ["overdue"]  # due at the next advance
        w.add(17, "overdue 2")
        w.add(15, "overdue 3")
        assert w.advance(20) == ["overdue 3", "in the wheel", "overdue 2"]

    def test_long_idle_gap_is_one_step(self) -> None:
        """Advancing over 10**15 ms (10**15 ticks) is cheap and returns exactly the due timers."""
        w = TimingWheel[str](tick_ms=1, wheel_size=4)
        w.add(5, "soon")
        w.add(10**15, "then")
        w.add(10**15 + 1, "later")
        assert w.advance(10**15) == ["soon", "then"]
        w._check()
        assert w.next_deadline_ms() == 10**15 + 1
        assert w.advance(10**18) == ["later"]

    def test_many_idle_gaps(self) -> None:
        """A driver sleeping until next_deadline_ms() sees each timer once, on time."""
        w = TimingWheel[int](tick_ms=10, wheel_size=8)
        deadlines = [7, 80, 81, 640, 5_000, 5_000, 10**7, 10**11]
        for i, d in enumerate(deadlines):
            w.add(d, i)
        seen: list[tuple[int, int]] = []
        wakeups = 0
        while (nd := w.next_deadline_ms()) is not None:
            wakeups += 1
            seen.extend((i, nd) for i in w.advance(nd))
            w._check()
        assert [i for i, _ in seen] == list(range(len(deadlines)))
        assert all(-(-deadlines[i] // 10) * 10 == at for i, at in seen)
        assert wakeups < 40  # bounded by levels per timer, not by elapsed ticks


class TestNextDeadline:
    """next_deadline_ms()."""

    def test_exact_on_level_zero(self) -> None:
        """Within level 0's span the answer is the deadline rounded up to a tick."""
        w = TimingWheel[str](tick_ms=10)
        w.add(1234, "x")
        assert w.next_deadline_ms() == 1240

    def test_bucket_start_on_higher_levels(self) -> None:
        """On a higher level the answer is the bucket's start, then it tightens."""
        w = TimingWheel[str](tick_ms=1, wheel_size=4)
        w.add(27, "x")  # tick 27 = 1,2,3 in base 4: level 2, bucket starting at 16
        assert w.next_deadline_ms() == 16
        assert w.advance(16) == []
        assert w.next_deadline_ms() == 24
        assert w.advance(24) == []
        assert w.next_deadline_ms() == 27

    def test_overdue_means_now(self) -> None:
        """With an overdue timer, next_deadline_ms() is now."""
        w = TimingWheel[str](tick_ms=10, start_ms=55)
        w.add(50, "x")
        assert w.next_deadline_ms() == 55

    def test_cancelled_timers_are_skipped(self) -> None:
        """Buckets emptied by cancel do not count."""
        w = TimingWheel[str](tick_ms=10)
        a = w.add(100, "a")
        w.add(900, "b")
        a.cancel()
        assert w.next_deadline_ms() == 900
        w._check()


class TestBulk:
    """Larger runs on the default geometry."""

    @settings(max_examples=30)
    @given(
        deadlines=st.lists(st.integers(0, 200_000), min_size=1, max_size=300),
        cancel_mask=st.lists(st.booleans(), min_size=300, max_size=300),
        step=st.integers(1, 5_000),
    )
    def test_default_wheel_matches_oracle(
        self, deadlines: list[int], cancel_mask: list[bool], step: int
    ) -> None:
        """Many timers, some cancelled, expired in steps: same as the oracle."""
        w = TimingWheel[int]()
        oracle = MockTimer(10, 0)
        handles = []
        for i, d in enumerate(deadlines):
            handles.append(w.add(d, i))
            oracle.add(i, d)
        for i, h in enumerate(handles):
            if cancel_mask[i]:
                assert h.cancel() == oracle.cancel(i)
        w._check()
        now = 0
        while oracle.pending or len(w):
            now += step
            assert w.advance(now) == oracle.advance(now)
        w._check()


class TestCheck:
    """_check() detects corruption."""

    def test_check_catches_a_misplaced_timer(self) -> None:
        """Editing a pending handle's deadline behind the wheel's back is caught."""
        w = TimingWheel[str](tick_ms=1, wheel_size=4)
        h = w.add(100, "x")
        h._deadline = 3
        with pytest.raises(AssertionError, match="belongs at"):
            w._check()

    def test_check_catches_a_wrong_count(self) -> None:
        """A count that disagrees with the linked timers is caught."""
        w = TimingWheel[str]()
        w.add(100, "x")
        w._count = 2
        with pytest.raises(AssertionError, match="len"):
            w._check()


def test_doctests() -> None:
    """The examples in the module's docstrings run as written."""
    result = doctest.testmod(imkit.timingwheel)
    assert result.attempted > 10 and result.failed == 0
