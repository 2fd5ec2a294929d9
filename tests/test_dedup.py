"""Tests of imkit.dedup: CidWindow against a set oracle, SeqWindow against a sorted-dict model."""

from __future__ import annotations

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

from imkit.dedup import (
    DEFAULT_MAX_PENDING_SEQS,
    DEFAULT_SIZE,
    MAX_CID,
    MAX_SEQ,
    MAX_SIZE,
    CidWindow,
    SeqWindow,
    Verdict,
)
from imkit.errors import CapacityError, ConfigError

NEW, DUP, STALE, GAP = Verdict.NEW, Verdict.DUPLICATE, Verdict.STALE, Verdict.GAP


# --- CidWindow ---------------------------------------------------------------------


class TestCidWindowBasics:
    def test_defaults(self) -> None:
        """A new window is empty, not strict, of the default size."""
        w = CidWindow()
        assert (w.size, w.strict, w.highest) == (DEFAULT_SIZE, False, 0)
        w._check()

    def test_first_and_repeat(self) -> None:
        """A cid is NEW once, then DUPLICATE."""
        w = CidWindow(8)
        assert w.check(5) is NEW
        assert w.check(5) is DUP
        assert w.highest == 5

    def test_out_of_order_inside_window_accepted_once(self) -> None:
        """A cid that arrives behind newer ones is NEW once, then DUPLICATE."""
        w = CidWindow(8)
        assert [w.check(c) for c in (1, 4, 3, 2, 3, 2)] == [NEW, NEW, NEW, NEW, DUP, DUP]
        assert w.highest == 4

    def test_stale_boundary(self) -> None:
        """cid == highest - size is STALE; highest - size + 1 is still told apart."""
        w = CidWindow(8)
        w.check(20)
        assert w.check(12) is STALE
        assert w.check(13) is NEW
        assert w.check(13) is DUP
        w._check()

    def test_unrecorded_cids_after_a_jump_are_new(self) -> None:
        """Cids skipped by a jump of highest are NEW when they arrive."""
        w = CidWindow(4)
        w.check(1)
        w.check(6)
        assert [w.check(c) for c in (3, 4, 5, 2)] == [NEW, NEW, NEW, STALE]

    def test_long_jump_forgets_everything(self) -> None:
        """A jump of several blocks leaves only the new cid recorded."""
        w = CidWindow(8)
        for c in range(1, 9):
            w.check(c)
        w.check(1000)
        assert [w.check(c) for c in (993, 999, 1000, 992)] == [NEW, NEW, DUP, STALE]
        w._check()

    def test_block_crossing_keeps_previous_block(self) -> None:
        """Crossing into the next block keeps the cids still inside the window."""
        w = CidWindow(8)
        for c in range(1, 9):
            assert w.check(c) is NEW
        assert w.check(9) is NEW  # highest enters the second block
        assert [w.check(c) for c in (2, 5, 8, 1)] == [DUP, DUP, DUP, STALE]
        assert w.check(17) is NEW  # enters the third block: clears the first's bytes
        assert [w.check(c) for c in (10, 12, 9)] == [NEW, NEW, STALE]
        w._check()

    def test_size_one(self) -> None:
        """With size 1 only the highest cid itself is remembered."""
        w = CidWindow(1)
        got = [w.check(c) for c in (1, 1, 3, 2, 3, 4, 3)]
        assert got == [NEW, DUP, NEW, STALE, DUP, NEW, STALE]
        w._check()

    def test_non_power_of_two_size(self) -> None:
        """A size that is not a power of two keeps its exact stale boundary."""
        w = CidWindow(5)
        w.check(10)
        assert (w.check(5), w.check(6)) == (STALE, NEW)
        w._check()

    def test_peek_and_seen_record_nothing(self) -> None:
        """peek() and seen() answer like check() without recording."""
        w = CidWindow(8)
        w.check(10)
        assert (w.peek(9), w.peek(10), w.peek(11), w.peek(2)) == (NEW, DUP, NEW, STALE)
        assert w.seen(10) and not w.seen(9) and not w.seen(11)
        assert w.check(9) is NEW
        assert w.highest == 10

    def test_max_cid_accepted(self) -> None:
        """The largest cid, 2**63 - 1, is valid."""
        w = CidWindow(8)
        assert w.check(MAX_CID) is NEW
        assert w.check(MAX_CID) is DUP
        assert w.check(MAX_CID - 3) is NEW
        w._check()

    def test_repr(self) -> None:
        """repr shows size, mode and highest."""
        w = CidWindow(8)
        w.check(3)
        assert repr(w) == "CidWindow(size=8, highest=3)"
        strict = repr(CidWindow(strict=True))
        assert strict == f"CidWindow(size={DEFAULT_SIZE}, strict=True, highest=0)"


class TestCidWindowErrors:
    @pytest.mark.parametrize("size", [0, -1, MAX_SIZE + 1, 2.0, "8", True, None])
    def test_bad_size(self, size: object) -> None:
        """A size that is not an int in [1, MAX_SIZE] raises ConfigError."""
        with pytest.raises(ConfigError):
            CidWindow(size)  # type: ignore[arg-type]

    @pytest.mark.parametrize("strict", [False, True])
    @pytest.mark.parametrize(
        "cid", [0, -1, -(2**70), MAX_CID + 1, 2**80, 3.0, 2.5, "1", None, b"1"]
    )
    def test_bad_cid_changes_nothing(self, strict: bool, cid: object) -> None:
        """A cid that is not an int in [1, 2**63 - 1] raises ConfigError and records nothing."""
        w = CidWindow(8, strict=strict)
        for c in (1, 2, 3):
            w.check(c)
        for op in (w.check, w.peek, w.seen):
            with pytest.raises(ConfigError):
                op(cid)  # type: ignore[arg-type]
        assert w.highest == 3
        assert w.check(4) is NEW
        w._check()

    def test_error_is_a_value_error(self) -> None:
        """ConfigError can be caught as ValueError."""
        with pytest.raises(ValueError, match="cid must be"):
            CidWindow().check(0)


class TestStrictMode:
    def test_only_next_is_new(self) -> None:
        """Strict mode accepts highest + 1 only; below is DUPLICATE, beyond is GAP."""
        w = CidWindow(strict=True)
        assert [w.check(c) for c in (1, 2, 2, 4, 3, 4, 1)] == [NEW, NEW, DUP, GAP, NEW, NEW, DUP]
        assert w.highest == 4
        w._check()

    def test_gap_records_nothing(self) -> None:
        """A GAP cid is refused again until its predecessors arrive."""
        w = CidWindow(strict=True)
        assert w.check(2) is GAP
        assert w.check(2) is GAP
        assert (w.check(1), w.check(2)) == (NEW, NEW)

    def test_never_stale(self) -> None:
        """Strict mode has no window: any old cid is an exact DUPLICATE."""
        w = CidWindow(2, strict=True)
        for c in range(1, 100):
            w.check(c)
        assert w.check(1) is DUP
        assert w._nbytes == 0

    def test_peek(self) -> None:
        """peek() in strict mode answers like check() without recording."""
        w = CidWindow(strict=True)
        assert (w.peek(1), w.peek(2)) == (NEW, GAP)
        w.check(1)
        assert (w.peek(1), w.seen(1), w.highest) == (DUP, True, 1)


class CidWindowMachine(RuleBasedStateMachine):
    """CidWindow vs an oracle: the set of every cid recorded, plus the max."""

    window: CidWindow
    size: int

    def __init__(self) -> None:
        super().__init__()
        self.recorded: set[int] = set()
        self.high = 0

    @initialize(size=st.sampled_from([1, 2, 3, 5, 8, 64]))
    def make(self, size: int) -> None:
        self.size = size
        self.window = CidWindow(size)

    def expected(self, cid: int) -> Verdict:
        if cid > self.high:
            return NEW
        if cid <= self.high - self.size:
            return STALE
        return DUP if cid in self.recorded else NEW

    def run(self, cid: int) -> None:
        cid = min(max(1, cid), MAX_CID)
        want = self.expected(cid)
        assert self.window.peek(cid) is want
        assert self.window.check(cid) is want
        if want is NEW:
            self.recorded.add(cid)
            self.high = max(self.high, cid)
        assert self.window.highest == self.high

    @rule(delta=st.integers(-10, 10))
    def near_highest(self, delta: int) -> None:
        """A cid within a few of highest: in order, retries, small reorderings."""
        self.run(max(1, self.high + delta))

    @rule(frac=st.integers(-300, 300))
    def around_the_window(self, frac: int) -> None:
        """A cid up to three windows either side of highest."""
        self.run(max(1, self.high + frac * self.size // 100))

    @rule(blocks=st.integers(1, 4), off=st.integers(-2, 2))
    def block_jump(self, blocks: int, off: int) -> None:
        """A jump of whole windows: highest skips one block or more of the ring."""
        self.run(self.high + blocks * self.size + off)

    @rule(jump=st.integers(1, 2**40))
    def far_jump(self, jump: int) -> None:
        """A cid far ahead: the whole ring ages out at once."""
        self.run(min(MAX_CID, self.high + jump))

    @precondition(lambda self: self.high > 0)
    @rule(data=st.data())
    def any_recorded_or_not(self, data: st.DataObject) -> None:
        """Any cid from 1 to highest (stale, duplicate or new)."""
        self.run(data.draw(st.integers(1, self.high)))

    @rule(cid=st.integers(-70, 0))
    def invalid(self, cid: int) -> None:
        """A cid <= 0, inside the window's span or not: ConfigError, nothing recorded."""
        with pytest.raises(ConfigError):
            self.window.check(cid)
        with pytest.raises(ConfigError):
            self.window.peek(cid)

    @rule()
    def near_max(self) -> None:
        """The top of the cid range."""
        self.run(MAX_CID - self.size)

    @invariant()
    def consistent(self) -> None:
        if hasattr(self, "window"):
            self.window._check()
            assert self.window._nbytes <= 4 * self.size


class StrictMachine(RuleBasedStateMachine):
    """Strict CidWindow vs an oracle: the max, accepting only max + 1."""

    def __init__(self) -> None:
        super().__init__()
        self.window = CidWindow(4, strict=True)
        self.high = 0

    @rule(delta=st.integers(-5, 3))
    def offer(self, delta: int) -> None:
        """A cid near highest + 1."""
        cid = max(1, self.high + 1 + delta)
        want = DUP if cid <= self.high else NEW if cid == self.high + 1 else GAP
        assert self.window.check(cid) is want
        if want is NEW:
            self.high = cid

    @invariant()
    def consistent(self) -> None:
        self.window._check()
        assert self.window.highest == self.high


TestCidWindowMachine = CidWindowMachine.TestCase
TestCidWindowMachine.settings = settings(max_examples=200, stateful_step_count=60)
TestStrictMachine = StrictMachine.TestCase
TestStrictMachine.settings = settings(max_examples=30, stateful_step_count=30)


class TestCidWindowStreams:
    @settings(max_examples=50)
    @given(
        size=st.sampled_from([1, 4, 8, 16, 1024]),
        jitter=st.lists(st.integers(0, 20), min_size=1, max_size=300),
        dups=st.lists(st.integers(0, 299), max_size=30),
    )
    def test_reordered_stream_accepts_each_cid_once(
        self, size: int, jitter: list[int], dups: list[int]
    ) -> None:
        """A stream reordered within the window, with repeats, accepts each cid exactly once."""
        cids = sorted(range(1, len(jitter) + 1), key=lambda c: c + jitter[c - 1])
        for i in sorted(dups, reverse=True):
            if i < len(cids):
                cids.insert(i + 1, cids[i])
        w = CidWindow(size)
        accepted = [c for c in cids if w.check(c) is NEW]
        # Accepted at most once, and every cid within reach of the window is accepted.
        assert len(accepted) == len(set(accepted))
        if size > 20:
            assert sorted(accepted) == list(range(1, len(jitter) + 1))
        w._check()


# --- SeqWindow ---------------------------------------------------------------------


class TestSeqWindowBasics:
    def test_in_order(self) -> None:
        """In-order seqs are NEW and released in order."""
        w: SeqWindow[str] = SeqWindow()
        assert [w.offer(s, f"m{s}") for s in (1, 2, 3)] == [NEW, NEW, NEW]
        assert w.pop_ready() == [(1, "m1"), (2, "m2"), (3, "m3")]
        assert w.pop_ready() == []
        assert (w.contiguous, w.highest_seen, w.pending) == (3, 3, 0)
        w._check()

    def test_duplicates(self) -> None:
        """A seq already delivered, releasable or held is DUPLICATE and not released again."""
        w: SeqWindow[str] = SeqWindow()
        w.offer(1, "a")
        assert w.offer(1, "again") is DUP  # releasable, not popped
        w.pop_ready()
        assert w.offer(1, "again") is DUP  # delivered
        w.offer(3, "c")
        assert w.offer(3, "again") is DUP  # held early
        w.offer(2, "b")
        assert w.pop_ready() == [(2, "b"), (3, "c")]

    def test_early_held_then_released_in_order(self) -> None:
        """Early seqs wait for the gap before them, then come out in seq order."""
        w: SeqWindow[int] = SeqWindow(after=10)
        for s in (14, 12, 13):
            assert w.offer(s, s) is NEW
        assert w.pop_ready() == []
        assert (w.contiguous, w.highest_seen, w.gaps(5)) == (10, 14, [(11, 11)])
        w.offer(11, 11)
        assert w.pop_ready() == [(11, 11), (12, 12), (13, 13), (14, 14)]
        assert w.contiguous == 14
        w._check()

    def test_gaps(self) -> None:
        """gaps() lists missing ranges up to the highest held seq, at most limit of them."""
        w: SeqWindow[None] = SeqWindow()
        for s in (3, 4, 7, 10):
            w.offer(s, None)
        assert w.gaps(10) == [(1, 2), (5, 6), (8, 9)]
        assert w.gaps(2) == [(1, 2), (5, 6)]
        assert w.gaps(1) == [(1, 2)]
        assert SeqWindow[None]().gaps(3) == []

    def test_skip_to_releases_held_in_order(self) -> None:
        """skip_to() declares missing seqs absent and releases what it unblocks, in order."""
        w: SeqWindow[str] = SeqWindow()
        for s in (5, 3, 8, 6):
            w.offer(s, f"m{s}")
        w.skip_to(4)
        assert w.pop_ready() == [(3, "m3"), (5, "m5"), (6, "m6")]
        assert w.gaps(5) == [(7, 7)]
        w.skip_to(9)  # past a held item: it is released too
        assert w.pop_ready() == [(8, "m8")]
        assert (w.contiguous, w.pending) == (9, 0)
        assert w.offer(7, "late") is DUP
        w._check()

    def test_skip_to_between_held_items(self) -> None:
        """Successive skip_to() calls release each held run as they reach it."""
        w: SeqWindow[int] = SeqWindow()
        for s in (3, 6, 9, 10):
            w.offer(s, s)
        w.skip_to(2)
        assert w.pop_ready() == [(3, 3)]
        w.skip_to(5)
        assert w.pop_ready() == [(6, 6)]
        w._check()
        w.skip_to(7)
        assert (w.pop_ready(), w.gaps(3)) == ([], [(8, 8)])
        w.skip_to(8)
        assert w.pop_ready() == [(9, 9), (10, 10)]
        w._check()

    def test_skip_to_backwards_is_a_no_op(self) -> None:
        """skip_to() below contiguous changes nothing."""
        w: SeqWindow[int] = SeqWindow(after=5)
        w.skip_to(3)
        w.skip_to(0)
        assert w.contiguous == 5

    def test_sync_page_pattern(self) -> None:
        """skip_to(m.seq - 1) then offer(m) for a sync page delivers across allocator gaps."""
        w: SeqWindow[str] = SeqWindow(after=3)
        w.offer(10005, "pushed early")
        page = [10001, 10002, 10003, 10004, 10005, 10006]  # seqs 4..10000 never existed
        verdicts = []
        for s in page:
            w.skip_to(s - 1)
            verdicts.append(w.offer(s, f"m{s}"))
        assert verdicts == [NEW, NEW, NEW, NEW, DUP, NEW]
        assert [s for s, _ in w.pop_ready()] == page
        w._check()

    def test_capacity_refuses_and_loses_nothing(self) -> None:
        """At max_pending an offer raises CapacityError, records nothing, and works after pop."""
        w: SeqWindow[int] = SeqWindow(max_pending=3)
        w.offer(3, 3)
        w.offer(5, 5)
        with pytest.raises(CapacityError) as err:
            w.offer(4, 4)  # early items may use max_pending - 1 places
        assert (err.value.limit, err.value.value) == ("max_pending", 3)
        assert w.pending == 2
        w.skip_to(2)
        assert w.pop_ready() == [(3, 3)]
        assert w.offer(4, 4) is NEW
        assert w.pop_ready() == [(4, 4), (5, 5)]
        w._check()

    def test_the_seq_that_closes_the_gap_always_fits(self) -> None:
        """A window full of early items still accepts contiguous + 1, so it can drain."""
        w: SeqWindow[int] = SeqWindow(max_pending=3)
        w.offer(2, 2)
        w.offer(3, 3)
        with pytest.raises(CapacityError):
            w.offer(5, 5)
        assert w.offer(1, 1) is NEW  # the last place
        with pytest.raises(CapacityError):
            w.offer(4, 4)  # in order, but full until popped: nothing recorded
        assert w.pop_ready() == [(1, 1), (2, 2), (3, 3)]
        assert w.offer(4, 4) is NEW
        w._check()

    def test_duplicate_at_capacity_is_not_an_error(self) -> None:
        """A duplicate offer at the limit answers DUPLICATE rather than raising."""
        w: SeqWindow[int] = SeqWindow(max_pending=1)
        w.offer(1, 1)
        assert w.offer(1, 1) is DUP

    def test_defaults_and_repr(self) -> None:
        """Default limit and repr."""
        w: SeqWindow[int] = SeqWindow()
        assert w.max_pending == DEFAULT_MAX_PENDING_SEQS
        assert repr(w) == "SeqWindow(contiguous=0, pending=0, highest_seen=0)"

    def test_max_seq(self) -> None:
        """The largest seq is accepted."""
        w: SeqWindow[int] = SeqWindow(after=MAX_SEQ - 1)
        assert w.offer(MAX_SEQ, 1) is NEW
        assert w.pop_ready() == [(MAX_SEQ, 1)]


class TestSeqWindowErrors:
    @pytest.mark.parametrize("seq", [0, -1, MAX_SEQ + 1, 1.0, "1", None])
    def test_bad_seq(self, seq: object) -> None:
        """offer() of a seq that is not an int in [1, 2**63 - 1] raises ConfigError."""
        w: SeqWindow[int] = SeqWindow()
        with pytest.raises(ConfigError):
            w.offer(seq, 0)  # type: ignore[arg-type]
        assert w.pending == 0

    def test_nothing_after_max_seq(self) -> None:
        """After MAX_SEQ the next seq is out of range, not in order."""
        w: SeqWindow[int] = SeqWindow(after=MAX_SEQ)
        with pytest.raises(ConfigError):
            w.offer(MAX_SEQ + 1, 0)

    def test_bool_is_an_int(self) -> None:
        """An int subclass is taken as its int value."""
        w: SeqWindow[str] = SeqWindow()
        assert w.offer(True, "one") is NEW
        assert w.pop_ready() == [(1, "one")]
        assert type(w.contiguous) is int

    @pytest.mark.parametrize("seq", [-1, MAX_SEQ + 1, 1.5, "1"])
    def test_bad_skip(self, seq: object) -> None:
        """skip_to() of a bad seq raises ConfigError."""
        with pytest.raises(ConfigError):
            SeqWindow[int]().skip_to(seq)  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("after", "max_pending"), [(-1, 1), (MAX_SEQ + 1, 1), (1.0, 1), (0, 0), (0, -5), (0, 2.0)]
    )
    def test_bad_constructor(self, after: object, max_pending: object) -> None:
        """Bad after or max_pending raises ConfigError."""
        with pytest.raises(ConfigError):
            SeqWindow(after, max_pending=max_pending)  # type: ignore[arg-type]

    @pytest.mark.parametrize("limit", [0, -1, 1.0])
    def test_bad_limit(self, limit: object) -> None:
        """gaps() with a limit below 1 raises ConfigError."""
        with pytest.raises(ConfigError):
            SeqWindow[int]().gaps(limit)  # type: ignore[arg-type]


class SeqWindowMachine(RuleBasedStateMachine):
    """SeqWindow vs a model: a sorted dict of held items, contiguous, and the delivered log."""

    window: SeqWindow[int]
    max_pending: int

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[int, int] = {}  # not yet popped (releasable or early)
        self.c = 0
        self.delivered: list[int] = []
        self.counter = 0

    @initialize(after=st.integers(0, 3), max_pending=st.integers(1, 6))
    def make(self, after: int, max_pending: int) -> None:
        self.window = SeqWindow(after, max_pending=max_pending)
        self.max_pending = max_pending
        self.c = after

    def extend(self) -> None:
        while self.c + 1 in self.held:
            self.c += 1

    @rule(delta=st.integers(-3, 8))
    def offer(self, delta: int) -> None:
        """Offer a seq near contiguous: duplicate, in order, or early."""
        seq = max(1, self.c + delta)
        self.counter += 1
        item = self.counter
        dup = seq <= self.c or seq in self.held
        # Early seqs may use max_pending - 1 places; the last is kept for c + 1.
        limit = self.max_pending if seq == self.c + 1 else self.max_pending - 1
        if not dup and len(self.held) >= limit:
            with pytest.raises(CapacityError):
                self.window.offer(seq, item)
            return
        got = self.window.offer(seq, item)
        assert got is (DUP if dup else NEW)
        if not dup:
            self.held[seq] = item
            self.extend()

    @rule(delta=st.integers(-2, 8))
    def skip_to(self, delta: int) -> None:
        """Declare seqs up to a point absent (as a sync page does)."""
        seq = max(0, self.c + delta)
        self.window.skip_to(seq)
        self.c = max(self.c, seq)
        self.extend()

    @rule()
    def pop_ready(self) -> None:
        """Release everything contiguous; compare with the model, and never twice."""
        want = sorted((s, it) for s, it in self.held.items() if s <= self.c)
        assert self.window.pop_ready() == want
        for s, _ in want:
            del self.held[s]
        seqs = [s for s, _ in want]
        assert not self.delivered or not seqs or seqs[0] > self.delivered[-1]
        self.delivered.extend(seqs)

    @rule(limit=st.integers(1, 4))
    def gaps(self, limit: int) -> None:
        """gaps() equals the model's missing ranges up to the highest held seq."""
        early = sorted(s for s in self.held if s > self.c)
        want: list[tuple[int, int]] = []
        prev = self.c
        for s in early:
            if s > prev + 1:
                want.append((prev + 1, s - 1))
            prev = s
        assert self.window.gaps(limit) == want[:limit]

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "window"):
            return
        self.window._check()
        assert self.window.contiguous == self.c
        assert self.window.pending == len(self.held) <= self.max_pending
        top = max(self.held, default=0)
        assert self.window.highest_seen == max(self.c, top)


TestSeqWindowMachine = SeqWindowMachine.TestCase
TestSeqWindowMachine.settings = settings(stateful_step_count=50)
