"""Tests of imkit.bus: the Fanout core (bounded inboxes, explicit overflow)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from imkit.bus import (
    DEFAULT_MAX_PENDING,
    Envelope,
    Fanout,
    Inbox,
    Lagged,
    Overflow,
    PublishResult,
)
from imkit.errors import CapacityError, ConfigError


class TestFanoutBasics:
    def test_every_subscriber_receives_in_order(self) -> None:
        """Two subscribers of a subject each read every payload, in publish order."""
        fan: Fanout[int] = Fanout()
        a, b = fan.subscribe("gw"), fan.subscribe("gw")
        for i in range(5):
            assert fan.publish("gw", i) == PublishResult(delivered=2, lagged=0)
        for inbox in (a, b):
            got = [inbox.pop() for _ in range(6)]
            assert got == [Envelope(subject="gw", payload=i) for i in range(5)] + [None]

    def test_other_subjects_are_not_received(self) -> None:
        """A publish reaches only the subscribers of its subject."""
        fan: Fanout[str] = Fanout()
        a = fan.subscribe("gw-a")
        assert fan.publish("gw-b", "x") == PublishResult(delivered=0, lagged=0)
        assert a.pop() is None

    def test_resync_overflow_reports_the_gap_in_place(self) -> None:
        """A full RESYNC inbox skips envelopes and reports them as one Lagged where they were."""
        fan: Fanout[int] = Fanout()
        inbox = fan.subscribe("gw", max_pending=2)
        results = [fan.publish("gw", i) for i in range(5)]
        assert [r.lagged for r in results] == [0, 0, 1, 1, 1]
        assert inbox.pop() == Envelope(subject="gw", payload=0)
        fan.publish("gw", 5)
        assert [inbox.pop() for _ in range(4)] == [
            Envelope(subject="gw", payload=1),
            Lagged(subject="gw", missed=3),
            Envelope(subject="gw", payload=5),
            None,
        ]

    def test_a_slow_subscriber_does_not_affect_others(self) -> None:
        """One full inbox lags while a sibling on the same subject receives everything."""
        fan: Fanout[int] = Fanout()
        slow = fan.subscribe("gw", max_pending=1)
        fast = fan.subscribe("gw", max_pending=100)
        for i in range(10):
            fan.publish("gw", i)
        assert len(fast) == 10
        assert len(slow) == 1
        assert [slow.pop(), slow.pop()] == [
            Envelope(subject="gw", payload=0),
            Lagged(subject="gw", missed=9),
        ]

    def test_reject_overflow_delivers_to_nobody(self) -> None:
        """A full REJECT subscriber makes the publish raise before any inbox changes."""
        fan: Fanout[int] = Fanout()
        other = fan.subscribe("gw")
        strict = fan.subscribe("gw", max_pending=1, overflow=Overflow.REJECT)
        fan.publish("gw", 1)
        with pytest.raises(CapacityError) as info:
            fan.publish("gw", 2)
        assert info.value.limit == "max_pending"
        assert info.value.value == 1
        assert "gw" in str(info.value)
        assert (len(other), len(strict)) == (1, 1)
        assert strict.pop() == Envelope(subject="gw", payload=1)
        assert fan.publish("gw", 3) == PublishResult(delivered=2, lagged=0)

    def test_on_ready_fires_once_per_wakeup(self) -> None:
        """on_ready fires when an inbox gets something to read, not on every envelope."""
        calls: list[int] = []
        fan: Fanout[int] = Fanout()
        inbox = fan.subscribe("gw", on_ready=lambda: calls.append(1))
        fan.publish("gw", 1)
        fan.publish("gw", 2)
        assert len(calls) == 1
        inbox.pop()
        inbox.pop()
        fan.publish("gw", 3)
        assert len(calls) == 2

    def test_unsubscribe_is_idempotent_and_drops_the_subject(self) -> None:
        """unsubscribe twice is fine; the subject disappears with its last subscriber."""
        fan: Fanout[int] = Fanout()
        inbox = fan.subscribe("gw")
        fan.publish("gw", 1)
        fan.unsubscribe(inbox)
        fan.unsubscribe(inbox)
        assert inbox.closed and inbox.pop() is None
        assert fan.subjects() == [] and fan.subscribers("gw") == 0
        fan._check()

    def test_default_limit(self) -> None:
        """An inbox's default limit is DEFAULT_MAX_PENDING."""
        assert Fanout[int]().subscribe("gw").max_pending == DEFAULT_MAX_PENDING


class TestMissed:
    def test_a_miss_is_a_marker_in_place(self) -> None:
        """Inbox.miss puts a Lagged marker after what was queued, before what comes next."""
        fan: Fanout[str] = Fanout()
        inbox = fan.subscribe("gw-1")
        fan.publish("gw-1", "a")
        inbox.miss(3)
        fan.publish("gw-1", "b")
        items = [inbox.pop(), inbox.pop(), inbox.pop(), inbox.pop()]
        assert items == [
            Envelope(subject="gw-1", payload="a"),
            Lagged(subject="gw-1", missed=3),
            Envelope(subject="gw-1", payload="b"),
            None,
        ]

    def test_a_miss_wakes_an_idle_reader_and_needs_a_positive_count(self) -> None:
        """on_ready fires when a miss makes an empty inbox readable; n < 1 is refused."""
        fan: Fanout[str] = Fanout()
        woken: list[int] = []
        inbox = fan.subscribe("gw-1", on_ready=lambda: woken.append(1))
        inbox.miss()
        inbox.miss()
        assert woken == [1] and inbox.pop() == Lagged(subject="gw-1", missed=2)
        with pytest.raises(ConfigError):
            inbox.miss(0)
        fan.unsubscribe(inbox)
        inbox.miss(5)  # a closed inbox receives nothing
        assert inbox.pop() is None
        strict = fan.subscribe("gw-1", overflow=Overflow.REJECT)
        with pytest.raises(ConfigError):
            strict.miss()
        assert fan.miss_all() == 0  # REJECT inboxes are skipped


class TestFanoutLimits:
    @pytest.mark.parametrize("kwargs", [{"max_subjects": 0}, {"max_subscribers": 0}])
    def test_bad_constructor_limits(self, kwargs: dict[str, int]) -> None:
        """Limits below 1 are a ConfigError."""
        with pytest.raises(ConfigError):
            Fanout[int](**kwargs)

    def test_bad_subscribe_arguments(self) -> None:
        """An empty subject, max_pending < 1 or a non-Overflow policy is a ConfigError."""
        fan: Fanout[int] = Fanout()
        with pytest.raises(ConfigError):
            fan.subscribe("")
        with pytest.raises(ConfigError):
            fan.subscribe("gw", max_pending=0)
        with pytest.raises(ConfigError):
            fan.subscribe("gw", overflow="resync")  # type: ignore[arg-type]

    def test_subject_and_subscriber_caps(self) -> None:
        """max_subjects and max_subscribers refuse with CapacityError naming the limit."""
        fan: Fanout[int] = Fanout(max_subjects=1, max_subscribers=1)
        fan.subscribe("a")
        with pytest.raises(CapacityError) as info:
            fan.subscribe("b")
        assert info.value.limit == "max_subjects"
        with pytest.raises(CapacityError) as info:
            fan.subscribe("a")
        assert info.value.limit == "max_subscribers"


SUBJECTS = st.sampled_from(["a", "b", "c"])


class _Model:
    """Oracle for one inbox: the log of what each publish did, and a read cursor."""

    def __init__(self, cap: int, overflow: Overflow) -> None:
        self.cap = cap
        self.overflow = overflow
        self.log: list[int | None] = []  # payload if queued, None if skipped
        self.cursor = 0
        self.ready_calls = 0

    def unread_envelopes(self) -> int:
        return sum(1 for x in self.log[self.cursor :] if x is not None)

    def expect_pop(self, subject: str) -> Envelope[int] | Lagged | None:
        if self.cursor == len(self.log):
            return None
        if self.log[self.cursor] is None:
            run = 0
            while self.cursor < len(self.log) and self.log[self.cursor] is None:
                run += 1
                self.cursor += 1
            return Lagged(subject=subject, missed=run)
        payload = self.log[self.cursor]
        assert payload is not None
        self.cursor += 1
        return Envelope(subject=subject, payload=payload)


class FanoutMachine(RuleBasedStateMachine):
    """Fanout with tiny limits against an event-log oracle; _check() after every step."""

    inboxes = Bundle("inboxes")

    def __init__(self) -> None:
        super().__init__()
        self.fan: Fanout[int] = Fanout(max_subjects=2, max_subscribers=2)
        self.models: dict[int, _Model] = {}
        self.live: dict[int, Inbox[int]] = {}
        self.counter = 0

    @rule(target=inboxes, subject=SUBJECTS, cap=st.integers(1, 3), reject=st.booleans())
    def subscribe(self, subject: str, cap: int, reject: bool) -> Inbox[int] | None:
        overflow = Overflow.REJECT if reject else Overflow.RESYNC
        subjects = {i.subject for i in self.live.values()}
        on_subject = sum(1 for i in self.live.values() if i.subject == subject)
        model = _Model(cap, overflow)
        refuse = (subject not in subjects and len(subjects) >= 2) or on_subject >= 2
        if refuse:
            with pytest.raises(CapacityError):
                self.fan.subscribe(subject, max_pending=cap, overflow=overflow)
            return None

        def ready() -> None:
            model.ready_calls += 1

        inbox = self.fan.subscribe(subject, max_pending=cap, overflow=overflow, on_ready=ready)
        self.models[inbox.id] = model
        self.live[inbox.id] = inbox
        return inbox

    @rule(subject=SUBJECTS)
    def publish(self, subject: str) -> None:
        self.counter += 1
        targets = [i for i in self.live.values() if i.subject == subject]
        models = [self.models[i.id] for i in targets]
        if any(m.overflow is Overflow.REJECT and m.unread_envelopes() >= m.cap for m in models):
            with pytest.raises(CapacityError):
                self.fan.publish(subject, self.counter)
            return
        expected_calls = [m.ready_calls + (m.cursor == len(m.log)) for m in models]
        result = self.fan.publish(subject, self.counter)
        queued = 0
        for model in models:
            keep = model.unread_envelopes() < model.cap
            model.log.append(self.counter if keep else None)
            queued += keep
        assert result == PublishResult(delivered=queued, lagged=len(models) - queued)
        assert [m.ready_calls for m in models] == expected_calls

    @rule(n=st.integers(1, 3))
    def miss_all(self, n: int) -> None:
        """A networked backend lost envelopes upstream: every inbox reads a gap."""
        models = [m for i, m in self.models.items() if i in self.live]
        models = [m for m in models if m.overflow is Overflow.RESYNC]
        expected_calls = [m.ready_calls + (m.cursor == len(m.log)) for m in models]
        assert self.fan.miss_all(n) == len(models)
        for model in models:
            model.log.extend([None] * n)
        assert [m.ready_calls for m in models] == expected_calls

    @rule(inbox=inboxes)
    def pop(self, inbox: Inbox[int] | None) -> None:
        if inbox is None:
            return
        if inbox.closed:
            assert inbox.pop() is None
            return
        model = self.models[inbox.id]
        assert inbox.ready() == (model.cursor < len(model.log))
        assert inbox.pop() == model.expect_pop(inbox.subject)

    @rule(inbox=consumes(inboxes))
    def unsubscribe(self, inbox: Inbox[int] | None) -> None:
        if inbox is None:
            return
        self.fan.unsubscribe(inbox)
        self.live.pop(inbox.id, None)
        assert inbox.pop() is None

    @invariant()
    def check(self) -> None:
        self.fan._check()
        for inbox in self.live.values():
            inbox._check()
            model = self.models[inbox.id]
            assert len(inbox) == model.unread_envelopes()
            assert self.fan.subscribers(inbox.subject) >= 1


FanoutMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40)
TestFanoutMachine = FanoutMachine.TestCase


class TestNothingSilentlyLost:
    @settings(max_examples=100)
    @given(cap=st.integers(1, 4), steps=st.lists(st.booleans(), max_size=60))
    def test_read_plus_missed_equals_published(self, cap: int, steps: list[bool]) -> None:
        """For any publish/pop interleaving, envelopes read + missed == published, in order."""
        fan: Fanout[int] = Fanout()
        inbox = fan.subscribe("s", max_pending=cap)
        published = 0
        read: list[int] = []
        missed = 0

        def take(item: Envelope[int] | Lagged | None) -> None:
            nonlocal missed
            if isinstance(item, Envelope):
                read.append(item.payload)
            elif isinstance(item, Lagged):
                missed += item.missed

        for is_publish in steps:
            if is_publish:
                fan.publish("s", published)
                published += 1
            else:
                take(inbox.pop())
            inbox._check()
        while inbox.ready():
            take(inbox.pop())
        assert len(read) + missed == published
        assert read == sorted(read)

    @settings(max_examples=50)
    @given(cap=st.integers(1, 4), n=st.integers(0, 30))
    def test_a_keeping_up_consumer_never_lags(self, cap: int, n: int) -> None:
        """A consumer that reads after every publish receives everything and no marker."""
        fan: Fanout[int] = Fanout()
        inbox = fan.subscribe("s", max_pending=cap)
        for i in range(n):
            fan.publish("s", i)
            assert inbox.pop() == Envelope(subject="s", payload=i)
        assert inbox.pop() is None
