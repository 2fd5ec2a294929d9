"""Tests for imkit.merger: MessageMerger and SignalAggregator against simple models."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import imkit.merger
from imkit.errors import CapacityError, ConfigError, TimeWentBackwards
from imkit.merger import (
    DEFAULT_MAX_INFLIGHT,
    MessageMerger,
    Release,
    ReleaseKind,
    Signal,
    SignalAggregator,
)

Msg = tuple[str, int]  # (group, seq): the opaque message, made checkable

GROUPS = ("g1", "g2", "g3", "g4")
USERS = ("u1", "u2", "u3", "u4")
CONVS = ("c1", "c2", "c3", "c4")


def test_doctests() -> None:
    """The examples in the module's docstrings hold."""
    result = doctest.testmod(imkit.merger)
    assert result.attempted > 0
    assert result.failed == 0


def push(group: str, *seqs: int, size: int = 10) -> Release[Msg]:
    """The PUSH release of ``seqs`` of ``group``, each message ``size`` bytes."""
    return Release(
        group=group,
        kind=ReleaseKind.PUSH,
        messages=tuple((group, s) for s in seqs),
        first_seq=seqs[0],
        last_seq=seqs[-1],
        size=size * len(seqs),
    )


# -- MessageMerger: examples -------------------------------------------------------------


class TestMergerExamples:
    """The merger's rules, one at a time."""

    def test_idle_group_pushes_at_once(self) -> None:
        """Under the inflight limit every message goes out alone, immediately."""
        m: MessageMerger[Msg] = MessageMerger(max_inflight=2)
        assert m.offer("g", 1, ("g", 1), 10, 0) == [push("g", 1)]
        assert m.offer("g", 2, ("g", 2), 10, 0) == [push("g", 2)]
        assert m.inflight("g") == 2

    def test_window_merges(self) -> None:
        """At the limit, messages queue and leave as one batch when the window closes."""
        m: MessageMerger[Msg] = MessageMerger(max_inflight=1, window_ms=100)
        m.offer("g", 1, ("g", 1), 10, 0)
        assert m.offer("g", 2, ("g", 2), 10, 5) == []
        assert m.offer("g", 3, ("g", 3), 10, 50) == []
        assert m.next_deadline_ms() == 105
        assert m.done("g") == []  # the window is still open
        assert m.due(104) == []
        assert m.due(105) == [push("g", 2, 3)]
        assert m.next_deadline_ms() is None

    def test_closed_window_waits_for_a_slot(self) -> None:
        """A window closing while every slot is busy is released by the next done()."""
        m: MessageMerger[Msg] = MessageMerger(max_inflight=1, window_ms=10)
        m.offer("g", 1, ("g", 1), 10, 0)
        m.offer("g", 2, ("g", 2), 10, 0)
        assert m.due(10) == []
        assert m.done("g") == [push("g", 2)]

    def test_full_batch_leaves_early(self) -> None:
        """A queue holding max_batch messages is released without waiting for its window."""
        m: MessageMerger[Msg] = MessageMerger(max_inflight=1, window_ms=1000, max_batch=2)
        m.offer("g", 1, ("g", 1), 10, 0)
        m.offer("g", 2, ("g", 2), 10, 0)
        m.offer("g", 3, ("g", 3), 10, 0)
        assert m.done("g") == [push("g", 2, 3)]

    def test_batch_bytes(self) -> None:
        """A batch fills up to max_batch_bytes exactly; a single oversized message still goes."""
        m: MessageMerger[Msg] = MessageMerger(max_inflight=1, window_ms=0, max_batch_bytes=20)
        m.offer("g", 1, ("g", 1), 10, 0)
        for seq in (2, 3, 4):
            m.offer("g", seq, ("g", seq), 10, 0)
        m.offer("g", 5, ("g", 5), 99, 0)
        assert m.done("g") == [push("g", 2, 3)]
        assert m.done("g") == [push("g", 4)]
        assert m.done("g") == [push("g", 5, size=99)]

    def test_overflow_turns_into_notify(self) -> None:
        """Past max_queued the queue is replaced by one NOTIFY that later offers extend."""
        m: MessageMerger[Msg] = MessageMerger(max_inflight=1, window_ms=1000, max_queued=2)
        m.offer("g", 1, ("g", 1), 10, 0)
        m.offer("g", 2, ("g", 2), 10, 0)
        m.offer("g", 3, ("g", 3), 10, 0)
        assert m.offer("g", 4, ("g", 4), 10, 0) == []
        assert m.queued("g") == 0
        assert m.offer("g", 7, ("g", 7), 10, 0) == []
        notify = Release[Msg](
            group="g", kind=ReleaseKind.NOTIFY, messages=(), first_seq=2, last_seq=7, size=0
        )
        assert m.done("g") == [notify]
        assert m.done("g") == []
        assert m.group_count == 0
        assert m.offer("g", 8, ("g", 8), 10, 0) == [push("g", 8)]

    def test_total_overflow(self) -> None:
        """Past max_total the group that needs room switches to notify-and-pull."""
        m: MessageMerger[Msg] = MessageMerger(max_inflight=1, window_ms=1000, max_total=1)
        for g in ("a", "b"):
            m.offer(g, 1, (g, 1), 10, 0)
            m.offer(g, 2, (g, 2), 10, 0)
        assert m.queued("a") == 1 and m.queued("b") == 0
        assert [r.kind for r in m.done("b")] == [ReleaseKind.NOTIFY]
        assert len(m) == 1

    def test_bad_calls(self) -> None:
        """Bad arguments and misuse raise typed errors and change nothing."""
        m: MessageMerger[Msg] = MessageMerger(max_groups=1)
        m.offer("g", 5, ("g", 5), 10, 10)
        with pytest.raises(ConfigError):
            m.offer("g", 5, ("g", 5), 10, 10)
        with pytest.raises(ConfigError):
            m.offer("g", 6, ("g", 6), -1, 10)
        with pytest.raises(ConfigError):
            m.offer("g", -1, ("g", -1), 1, 10)
        with pytest.raises(CapacityError) as err:
            m.offer("h", 1, ("h", 1), 1, 10)
        assert err.value.limit == "max_groups"
        with pytest.raises(TimeWentBackwards):
            m.due(9)
        with pytest.raises(ConfigError):
            m.done("h")
        m.done("g")
        with pytest.raises(ConfigError):
            m.done("g")
        for kw in ("max_inflight", "max_batch", "max_batch_bytes", "max_queued", "max_total"):
            with pytest.raises(ConfigError):
                MessageMerger(**{kw: 0})
        with pytest.raises(ConfigError):
            MessageMerger(window_ms=-1)
        m._check()

    def test_defaults_and_repr(self) -> None:
        """Defaults are the documented constants; repr shows the counts."""
        m: MessageMerger[Msg] = MessageMerger()
        assert m.max_inflight == DEFAULT_MAX_INFLIGHT
        assert repr(m) == "MessageMerger(groups=0, queued=0, windows=0)"

    def test_check_catches_corruption(self) -> None:
        """_check raises AssertionError when the totals disagree."""
        m: MessageMerger[Msg] = MessageMerger()
        m.offer("g", 1, ("g", 1), 1, 0)
        m._total = 3
        with pytest.raises(AssertionError):
            m._check()


# -- MessageMerger: state machine vs a model -------------------------------------------------


class GroupModel:
    """What the caller knows about one group: held messages, pending notify, inflight."""

    def __init__(self) -> None:
        self.queued: list[tuple[int, int]] = []  # (seq, size) held in memory, in order
        self.window_open: int | None = None  # when the queue last went non-empty
        self.pending: tuple[int, int] | None = None  # (first, last) a NOTIFY must cover
        self.inflight = 0
        self.last_seq = -1
        self.delivered: list[int] = []  # seqs pushed, in release order
        self.notified = -1  # highest seq covered by a NOTIFY

    @property
    def active(self) -> bool:
        return self.inflight > 0 or bool(self.queued) or self.pending is not None


class MergerMachine(RuleBasedStateMachine):
    """Drive a tiny merger with random offers, dones and clock steps; check each release."""

    merger: MessageMerger[Msg]
    groups: dict[str, GroupModel]
    now: int

    @initialize(
        max_inflight=st.integers(1, 2),
        window_ms=st.sampled_from([0, 5, 20]),
        max_batch=st.integers(1, 4),
        max_batch_bytes=st.sampled_from([10, 40, 1000]),
        max_queued=st.integers(1, 10),
        max_total=st.integers(1, 20),
        max_groups=st.sampled_from([1, 3, 4]),
    )
    def setup(
        self,
        max_inflight: int,
        window_ms: int,
        max_batch: int,
        max_batch_bytes: int,
        max_queued: int,
        max_total: int,
        max_groups: int,
    ) -> None:
        self.merger = MessageMerger(
            max_inflight=max_inflight,
            window_ms=window_ms,
            max_batch=max_batch,
            max_batch_bytes=max_batch_bytes,
            max_queued=max_queued,
            max_total=max_total,
            max_groups=max_groups,
        )
        self.groups = {g: GroupModel() for g in GROUPS}
        self.now = 0

    # -- model helpers --

    def total_queued(self) -> int:
        return sum(len(g.queued) for g in self.groups.values())

    def full(self, g: GroupModel) -> bool:
        m = self.merger
        return len(g.queued) >= m.max_batch or sum(s for _, s in g.queued) >= m.max_batch_bytes

    def apply(self, releases: list[Release[Msg]]) -> None:
        """Check each release against the model, then record it."""
        m = self.merger
        for rel in releases:
            g = self.groups[rel.group]
            assert g.inflight < m.max_inflight, "released beyond max_inflight"
            g.inflight += 1
            if rel.kind is ReleaseKind.NOTIFY:
                event("notify")
                assert g.pending == (rel.first_seq, rel.last_seq)
                assert rel.messages == () and rel.size == 0
                g.notified = rel.last_seq
                g.pending = None
                continue
            n = len(rel.messages)
            event(f"push of {min(n, 3)}+")
            assert 1 <= n <= m.max_batch
            assert rel.size <= m.max_batch_bytes or n == 1
            closed = g.window_open is not None and self.now >= g.window_open + m.window_ms
            assert closed or self.full(g), "released before its window closed or filled"
            head = g.queued[:n]
            assert [seq for seq, _ in head] == [seq for _, seq in rel.messages]
            assert all(grp == rel.group for grp, _ in rel.messages)
            assert (rel.first_seq, rel.last_seq) == (head[0][0], head[-1][0])
            assert rel.size == sum(size for _, size in head)
            rest = g.queued[n:]
            if rest and n < m.max_batch:
                assert rel.size + rest[0][1] > m.max_batch_bytes, "batch not maximal"
            g.delivered.extend(seq for seq, _ in head)
            g.queued = rest
            if not rest:
                g.window_open = None

    # -- rules --

    @rule(group=st.sampled_from(GROUPS), gap=st.integers(1, 3), size=st.integers(0, 30),
          dt=st.integers(0, 6))
    def offer(self, group: str, gap: int, size: int, dt: int) -> None:
        self.now += dt
        self.offer_one(group, gap, size)

    @rule(group=st.sampled_from(GROUPS), sizes=st.lists(st.integers(0, 30), min_size=2, max_size=8))
    def burst(self, group: str, sizes: list[int]) -> None:
        """Several messages to one group at the same instant (builds queues and batches)."""
        for size in sizes:
            self.offer_one(group, 1, size)

    def offer_one(self, group: str, gap: int, size: int) -> None:
        m = self.merger
        g = self.groups[group]
        seq = g.last_seq + gap
        active = sum(1 for x in self.groups.values() if x.active)
        if not g.active and active >= m.max_groups:
            with pytest.raises(CapacityError):
                m.offer(group, seq, (group, seq), size, self.now)
            event("max_groups")
            return
        got = m.offer(group, seq, (group, seq), size, self.now)
        g.last_seq = seq
        if g.pending is not None:
            assert got == []
            g.pending = (g.pending[0], seq)
            return
        if not g.queued and g.inflight < m.max_inflight:
            event("immediate")
            assert got == [push(group, seq, size=size)]
            g.inflight += 1
            g.delivered.append(seq)
            return
        if len(g.queued) >= m.max_queued or self.total_queued() >= m.max_total:
            event("overflow")
            g.pending = (g.queued[0][0] if g.queued else seq, seq)
            g.queued = []
            g.window_open = None
        else:
            if not g.queued:
                g.window_open = self.now
            g.queued.append((seq, size))
        self.apply(got)

    @precondition(lambda self: any(g.inflight for g in self.groups.values()))
    @rule(data=st.data())
    def done(self, data: st.DataObject) -> None:
        busy = sorted(name for name, g in self.groups.items() if g.inflight)
        group = data.draw(st.sampled_from(busy))
        self.groups[group].inflight -= 1
        self.apply(self.merger.done(group))

    @rule(dt=st.integers(0, 25))
    def due(self, dt: int) -> None:
        self.now += dt
        self.apply(self.merger.due(self.now))
        for name, g in self.groups.items():
            if g.inflight < self.merger.max_inflight and g.queued:
                assert g.window_open is not None
                assert self.now < g.window_open + self.merger.window_ms, f"{name}: window overdue"
                deadline = self.merger.next_deadline_ms()
                assert deadline is not None and deadline <= g.window_open + self.merger.window_ms
        deadline = self.merger.next_deadline_ms()
        assert deadline is None or deadline > self.now

    @rule(go=st.integers(0, 4))
    def drain(self, go: int) -> None:
        """Now and then, finish every push and let every window close: everything got out."""
        if go == 0:
            self.drain_all()

    def drain_all(self) -> None:
        m = self.merger
        for _ in range(1000):
            busy = [name for name, g in self.groups.items() if g.inflight]
            if not busy and all(not g.queued and g.pending is None for g in self.groups.values()):
                break
            for name in busy:
                self.groups[name].inflight -= 1
                self.apply(m.done(name))
            self.now += m.window_ms
            self.apply(m.due(self.now))
        else:
            raise AssertionError("the merger never drained")
        assert m.group_count == 0 and len(m) == 0 and m.next_deadline_ms() is None
        for g in self.groups.values():
            # every offered seq was pushed once, in order, or covered by a NOTIFY
            assert g.delivered == sorted(set(g.delivered))
            assert g.last_seq <= max(g.notified, g.delivered[-1] if g.delivered else -1)

    @invariant()
    def consistent(self) -> None:
        m = self.merger
        m._check()
        assert len(m) == self.total_queued()
        for name, g in self.groups.items():
            assert m.inflight(name) == g.inflight
            assert m.queued(name) == len(g.queued)
            if g.inflight < m.max_inflight:
                assert g.pending is None, f"{name}: NOTIFY held with a free slot"
                assert not self.full(g), f"{name}: full batch held with a free slot"

    def teardown(self) -> None:
        if hasattr(self, "merger"):
            self.drain_all()


MergerMachine.TestCase.settings = settings(stateful_step_count=50, deadline=None)
TestMergerMachine = MergerMachine.TestCase


# -- SignalAggregator ------------------------------------------------------------------------


class TestAggregatorExamples:
    """Aggregation, overflow flushes, and errors."""

    def test_window_collapses(self) -> None:
        """Signals within one window become one signal with the newest seq per conversation."""
        a = SignalAggregator(window_ms=10)
        a.offer("u", "c1", 3, 0)
        a.offer("u", "c2", 1, 2)
        a.offer("u", "c1", 2, 4)  # older than what is pending: ignored
        assert a.next_deadline_ms() == 10
        assert a.due(9) == []
        assert a.due(10) == [("u", (("c1", 3), ("c2", 1)))]
        assert len(a) == 0

    def test_max_convs_flushes_early(self) -> None:
        """A signal reaching max_convs leaves at once; the new conversation starts a window."""
        a = SignalAggregator(window_ms=10, max_convs=2)
        a.offer("u", "c1", 1, 0)
        a.offer("u", "c2", 1, 0)
        assert a.offer("u", "c3", 1, 5) == [("u", (("c1", 1), ("c2", 1)))]
        assert a.next_deadline_ms() == 15

    def test_max_users_flushes_oldest(self) -> None:
        """A new user past max_users flushes the oldest pending user early."""
        a = SignalAggregator(window_ms=10, max_users=1)
        a.offer("u", "c1", 1, 0)
        assert a.offer("v", "c1", 2, 1) == [("u", (("c1", 1),))]
        assert a.flush() == [("v", (("c1", 2),))]
        assert a.next_deadline_ms() is None

    def test_bad_calls(self) -> None:
        """Negative seqs, bad limits and time going back raise typed errors."""
        a = SignalAggregator()
        with pytest.raises(ConfigError):
            a.offer("u", "c", -1, 0)
        a.offer("u", "c", 1, 5)
        with pytest.raises(TimeWentBackwards):
            a.due(4)
        with pytest.raises(TimeWentBackwards):
            a.offer("u", "c", 1, 4)
        for kw in ("max_users", "max_convs"):
            with pytest.raises(ConfigError):
                SignalAggregator(**{kw: 0})
        assert repr(a) == "SignalAggregator(pending=1, window_ms=100)"


class RefAggregator:
    """The aggregator's rules on plain dicts: user -> (window opened at, conv -> seq)."""

    def __init__(self, window_ms: int, max_users: int, max_convs: int) -> None:
        self.window_ms = window_ms
        self.max_users = max_users
        self.max_convs = max_convs
        self.pending: dict[str, tuple[int, dict[str, int]]] = {}  # insertion ordered

    def signal(self, user: str) -> Signal:
        return (user, tuple(self.pending.pop(user)[1].items()))

    def offer(self, user: str, conv: str, seq: int, now: int) -> list[Signal]:
        out: list[Signal] = []
        if user not in self.pending:
            if len(self.pending) >= self.max_users:
                out.append(self.signal(next(iter(self.pending))))
            self.pending[user] = (now, {conv: seq})
            return out
        convs = self.pending[user][1]
        if conv in convs:
            convs[conv] = max(convs[conv], seq)
        elif len(convs) < self.max_convs:
            convs[conv] = seq
        else:
            out.append(self.signal(user))
            self.pending[user] = (now, {conv: seq})
        return out

    def due(self, now: int) -> list[Signal]:
        late = [u for u, (opened, _) in self.pending.items() if opened + self.window_ms <= now]
        return [self.signal(u) for u in late]


class AggregatorMachine(RuleBasedStateMachine):
    """Random signals against the reference, plus the timing properties."""

    agg: SignalAggregator
    ref: RefAggregator
    now: int

    @initialize(
        window_ms=st.sampled_from([0, 5, 20]),
        max_users=st.integers(1, 4),
        max_convs=st.integers(1, 4),
    )
    def setup(self, window_ms: int, max_users: int, max_convs: int) -> None:
        self.agg = SignalAggregator(window_ms=window_ms, max_users=max_users, max_convs=max_convs)
        self.ref = RefAggregator(window_ms, max_users, max_convs)
        self.now = 0
        self.last_signal: dict[str, int] = {}  # user -> time of its last signal

    def receive(self, got: list[Signal], expected: list[Signal], *, from_due: bool) -> None:
        # exactly the newest seq of every conversation offered since the user's last signal
        assert got == expected
        users = [user for user, _ in got]
        if from_due:
            assert len(users) == len(set(users)), "two signals for one user in one due()"
        for user, entries in got:
            assert 1 <= len(entries) <= self.agg.max_convs
            if from_due:
                event("due signal")
                # at most one signal per user per window (early flushes excepted)
                if user in self.last_signal:
                    assert self.now - self.last_signal[user] >= self.agg.window_ms
            else:
                event("early flush")
            self.last_signal[user] = self.now

    @rule(user=st.sampled_from(USERS), conv=st.sampled_from(CONVS), seq=st.integers(0, 20),
          dt=st.integers(0, 6))
    def offer(self, user: str, conv: str, seq: int, dt: int) -> None:
        self.now += dt
        expected = self.ref.offer(user, conv, seq, self.now)
        self.receive(self.agg.offer(user, conv, seq, self.now), expected, from_due=False)

    @rule(users=st.lists(st.sampled_from(USERS), unique=True, min_size=1),
          conv=st.sampled_from(CONVS), seq=st.integers(0, 20), dt=st.integers(0, 6))
    def offer_many(self, users: list[str], conv: str, seq: int, dt: int) -> None:
        """One group message to several members at once."""
        self.now += dt
        expected = [s for u in users for s in self.ref.offer(u, conv, seq, self.now)]
        self.receive(self.agg.offer_many(users, conv, seq, self.now), expected, from_due=False)

    @rule(dt=st.integers(0, 25))
    def due(self, dt: int) -> None:
        self.now += dt
        self.receive(self.agg.due(self.now), self.ref.due(self.now), from_due=True)

    @rule(go=st.integers(0, 4))
    def flush(self, go: int) -> None:
        """Now and then, flush everything (shutdown)."""
        if go == 0:
            expected = [self.ref.signal(u) for u in list(self.ref.pending)]
            self.receive(self.agg.flush(), expected, from_due=False)
            assert len(self.agg) == 0

    @invariant()
    def consistent(self) -> None:
        self.agg._check()
        assert len(self.agg) == len(self.ref.pending)
        opened = [t for t, _ in self.ref.pending.values()]
        deadline = self.agg.next_deadline_ms()
        assert deadline == (min(opened) + self.agg.window_ms if opened else None)


AggregatorMachine.TestCase.settings = settings(stateful_step_count=50, deadline=None)
TestAggregatorMachine = AggregatorMachine.TestCase
