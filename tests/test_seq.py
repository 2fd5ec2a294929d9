"""Tests of imkit.seq: seq allocation across restarts and evictions, and 64-bit ids."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from imkit.errors import ClockRegression, ConfigError, ImkitError, SeqError
from imkit.seq import (
    DEFAULT_EPOCH_MS,
    DEFAULT_MAX_KEYS,
    DEFAULT_MAX_REGRESSION_MS,
    DEFAULT_STEP,
    MAX_SEQ,
    CeilingStore,
    IdGenerator,
    IdParts,
    MemoryCeilingStore,
    SeqAllocator,
    parse_id,
)

E = DEFAULT_EPOCH_MS


class CheckingStore(MemoryCeilingStore):
    """A memory store that records every seq issued and fails on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    def save(self, key: str, ceiling: int) -> None:
        if self.fail:
            raise OSError("disk full")
        assert ceiling > self.load(key), "ceilings must only grow"
        super().save(key, ceiling)


# --- SeqAllocator ------------------------------------------------------------------


class TestMemoryCeilingStore:
    def test_load_save(self) -> None:
        """Unknown keys load 0; saves are counted and read back."""
        s = MemoryCeilingStore()
        assert s.load("a") == 0
        s.save("a", 10)
        s.save("a", 20)
        assert (s.load("a"), s.saves, len(s)) == (20, 2, 1)

    def test_is_a_ceiling_store(self) -> None:
        """MemoryCeilingStore satisfies the CeilingStore protocol."""
        store: CeilingStore = MemoryCeilingStore()
        assert SeqAllocator(store).next("k") == 1


class TestSeqAllocator:
    def test_counts_from_one_per_key(self) -> None:
        """Each key counts 1, 2, 3 independently."""
        a = SeqAllocator(MemoryCeilingStore())
        assert [a.next("x"), a.next("x"), a.next("y"), a.next("x")] == [1, 2, 1, 3]
        a._check()

    def test_persists_before_issuing(self) -> None:
        """The ceiling is saved before the first seq of each block, once per step."""
        store = MemoryCeilingStore()
        a = SeqAllocator(store, step=3)
        issued = []
        for _ in range(7):
            issued.append(a.next("k"))
            assert store.load("k") >= issued[-1]
        assert issued == [1, 2, 3, 4, 5, 6, 7]
        assert (store.saves, store.load("k")) == (3, 9)

    def test_restart_skips_to_next_block(self) -> None:
        """The worked example: step 10000, seqs 1..3, restart, next is 10001."""
        store = MemoryCeilingStore()
        a = SeqAllocator(store, step=10_000)
        assert [a.next("room") for _ in range(3)] == [1, 2, 3]
        assert store.load("room") == 10_000
        b = SeqAllocator(store, step=10_000)
        assert b.next("room") == 10_001
        assert store.load("room") == 20_000

    def test_restart_at_block_end(self) -> None:
        """A restart right after a block is used up continues without a gap."""
        store = MemoryCeilingStore()
        a = SeqAllocator(store, step=2)
        a.next("k")
        a.next("k")
        assert SeqAllocator(store, step=2).next("k") == 3

    def test_lru_eviction_reloads(self) -> None:
        """The least recently used key is evicted and skips to its next block on return."""
        store = MemoryCeilingStore()
        a = SeqAllocator(store, step=10, max_keys=2)
        a.next("a")
        a.next("b")
        a.next("a")  # b is now least recently used
        a.next("c")  # evicts b
        assert len(a) == 2
        assert a.next("a") == 3  # a was kept
        assert a.next("b") == 11  # b reloaded its ceiling
        a._check()

    def test_discard(self) -> None:
        """discard() forgets a lease safely; unknown and non-str keys are ignored."""
        store = MemoryCeilingStore()
        a = SeqAllocator(store, step=5)
        a.next("k")
        a.discard("k")
        a.discard("never")
        a.discard(["x"])  # type: ignore[arg-type]
        assert len(a) == 0
        assert a.next("k") == 6

    def test_next_n(self) -> None:
        """next_n() returns consecutive seqs, crossing a block with one save."""
        store = MemoryCeilingStore()
        a = SeqAllocator(store, step=4)
        assert a.next_n("k", 3) == range(1, 4)
        assert a.next_n("k", 3) == range(4, 7)
        assert store.load("k") == 8
        assert a.next("k") == 7
        assert a.next_n("k", 4) == range(8, 12)

    def test_store_failure_issues_nothing(self) -> None:
        """If save() raises, next() raises SeqError and no seq of the new block is issued."""
        store = CheckingStore()
        a = SeqAllocator(store, step=2)
        assert [a.next("k"), a.next("k")] == [1, 2]
        store.fail = True
        with pytest.raises(SeqError) as err:
            a.next("k")
        assert isinstance(err.value.__cause__, OSError)
        with pytest.raises(SeqError):
            a.next("new")
        assert len(a) == 1
        store.fail = False
        assert a.next("k") == 3
        assert a.next("new") == 1
        a._check()

    def test_load_failure_and_bad_ceiling(self) -> None:
        """A store whose load() raises or returns garbage gives SeqError."""

        class Broken:
            def __init__(self, value: object) -> None:
                self.value = value

            def load(self, key: str) -> int:
                if isinstance(self.value, Exception):
                    raise self.value
                return self.value  # type: ignore[return-value]

            def save(self, key: str, ceiling: int) -> None:
                pass

        for value in (RuntimeError("down"), -1, "7", 1.5, None, MAX_SEQ + 1):
            with pytest.raises(SeqError):
                SeqAllocator(Broken(value)).next("k")

    def test_exhaustion(self) -> None:
        """Near 2**63 - 1 the ceiling is capped, then SeqError; nothing wraps around."""
        store = MemoryCeilingStore()
        store.save("k", MAX_SEQ - 2)
        a = SeqAllocator(store, step=10)
        assert [a.next("k"), a.next("k")] == [MAX_SEQ - 1, MAX_SEQ]
        assert store.load("k") == MAX_SEQ
        with pytest.raises(SeqError, match="exhausted"):
            a.next("k")
        with pytest.raises(SeqError):
            a.next_n("k", 1)
        a._check()

    def test_defaults_and_repr(self) -> None:
        """Defaults are exposed; repr shows step and key count."""
        a = SeqAllocator(MemoryCeilingStore())
        assert (a.step, a.max_keys) == (DEFAULT_STEP, DEFAULT_MAX_KEYS)
        a.next("k")
        assert repr(a) == f"SeqAllocator(step={DEFAULT_STEP}, keys=1/{DEFAULT_MAX_KEYS})"

    @pytest.mark.parametrize(
        "kwargs", [{"step": 0}, {"step": -1}, {"step": 1.0}, {"max_keys": 0}, {"max_keys": "9"}]
    )
    def test_bad_config(self, kwargs: dict[str, object]) -> None:
        """Bad step or max_keys raises ConfigError."""
        with pytest.raises(ConfigError):
            SeqAllocator(MemoryCeilingStore(), **kwargs)  # type: ignore[arg-type]

    @pytest.mark.parametrize("key", [1, None, b"k", ("t",), ["unhashable"]])
    def test_bad_key(self, key: object) -> None:
        """A key that is not a str raises ConfigError from next() and next_n()."""
        a = SeqAllocator(MemoryCeilingStore())
        with pytest.raises(ConfigError):
            a.next(key)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            a.next_n(key, 1)  # type: ignore[arg-type]
        assert len(a) == 0

    @pytest.mark.parametrize("n", [0, -1, 11, 2.0])
    def test_bad_n(self, n: object) -> None:
        """next_n() outside [1, step] raises ConfigError."""
        with pytest.raises(ConfigError):
            SeqAllocator(MemoryCeilingStore(), step=10).next_n("k", n)  # type: ignore[arg-type]


class AllocatorMachine(RuleBasedStateMachine):
    """Interleaved next / next_n / restart / evict vs an oracle of every seq ever issued."""

    store: CheckingStore
    alloc: SeqAllocator
    step: int
    max_keys: int

    def __init__(self) -> None:
        super().__init__()
        self.issued: dict[str, list[int]] = {}

    @initialize(step=st.integers(1, 5), max_keys=st.integers(1, 3))
    def make(self, step: int, max_keys: int) -> None:
        self.step, self.max_keys = step, max_keys
        self.store = CheckingStore()
        self.alloc = SeqAllocator(self.store, step=step, max_keys=max_keys)

    def record(self, key: str, seqs: list[int]) -> None:
        log = self.issued.setdefault(key, [])
        assert not log or seqs[0] > log[-1], f"{key}: {seqs[0]} after {log[-1]}"
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert self.store.load(key) >= seqs[-1], "issued beyond the durable ceiling"
        log.extend(seqs)

    @rule(key=st.sampled_from("abcd"))
    def next(self, key: str) -> None:
        """One seq: larger than any issued for the key."""
        self.record(key, [self.alloc.next(key)])

    @rule(key=st.sampled_from("abcd"), data=st.data())
    def next_n(self, key: str, data: st.DataObject) -> None:
        """A batch: consecutive, larger than any issued for the key."""
        n = data.draw(st.integers(1, self.step))
        self.record(key, list(self.alloc.next_n(key, n)))

    @rule()
    def restart(self) -> None:
        """A new allocator over the same store (the process restarted)."""
        self.alloc = SeqAllocator(self.store, step=self.step, max_keys=self.max_keys)

    @rule(step=st.integers(1, 5))
    def restart_with_new_step(self, step: int) -> None:
        """A restart with a different step still never repeats."""
        self.step = step
        self.alloc = SeqAllocator(self.store, step=step, max_keys=self.max_keys)

    @rule(key=st.sampled_from("abcd"))
    def discard(self, key: str) -> None:
        """Forget a key's lease (ownership moved away and back)."""
        self.alloc.discard(key)

    @rule(key=st.sampled_from("abcd"))
    def failed_save(self, key: str) -> None:
        """A failing store: either a seq from the current block, or SeqError and nothing."""
        self.store.fail = True
        try:
            seq = self.alloc.next(key)
        except SeqError:
            pass
        else:
            self.record(key, [seq])
        finally:
            self.store.fail = False

    @invariant()
    def consistent(self) -> None:
        if hasattr(self, "alloc"):
            self.alloc._check()
            assert len(self.alloc) <= self.max_keys
        for log in self.issued.values():
            assert len(log) == len(set(log))


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(stateful_step_count=50)


# --- ids ---------------------------------------------------------------------------


class TestIdLayout:
    def test_layout(self) -> None:
        """41 bits of ms since the epoch, 10 bits of node, 12 bits of counter."""
        g = IdGenerator(5)
        i = g.next_id(E + 1234)
        assert i == 1234 << 22 | 5 << 12
        assert parse_id(i) == IdParts(E + 1234, 5, 0)
        assert g.parse(i) == (E + 1234, 5, 0)

    def test_custom_epoch(self) -> None:
        """A custom epoch moves time zero."""
        g = IdGenerator(1023, epoch_ms=1000)
        i = g.next_id(1001)
        assert i == 1 << 22 | 1023 << 12
        assert g.parse(i) == (1001, 1023, 0)
        assert g.epoch_ms == 1000

    def test_largest_time(self) -> None:
        """The last ms of the 41-bit range works; one more raises SeqError."""
        g = IdGenerator(1)
        last = E + (1 << 41) - 1
        assert parse_id(g.next_id(last)).ms == last
        with pytest.raises(SeqError):
            IdGenerator(1).next_id(last + 1)

    def test_ids_fit_signed_64_bits(self) -> None:
        """Every id is below 2**63."""
        g = IdGenerator(1023)
        assert g.next_id(E + (1 << 41) - 1) < 1 << 63

    @pytest.mark.parametrize("bad", [-1, 1 << 63, 1.0, "1"])
    def test_parse_bad(self, bad: object) -> None:
        """parse_id() of something that is not an id raises ConfigError."""
        with pytest.raises(ConfigError):
            parse_id(bad)  # type: ignore[arg-type]


class TestIdGenerator:
    def test_same_ms_counts(self) -> None:
        """Ids within one ms differ by the counter."""
        g = IdGenerator(3)
        ids = [g.next_id(E + 7) for _ in range(3)]
        assert [parse_id(i).counter for i in ids] == [0, 1, 2]

    def test_counter_overflow_borrows_next_ms(self) -> None:
        """The 4097th id of one ms is stamped with the next ms, counter 0."""
        g = IdGenerator(3)
        ids = [g.next_id(E + 7) for _ in range(4097)]
        assert parse_id(ids[4095]) == (E + 7, 3, 4095)
        assert parse_id(ids[4096]) == (E + 8, 3, 0)
        assert ids == sorted(set(ids))
        nxt = g.next_id(E + 8)  # the wall clock reaches the borrowed ms
        assert parse_id(nxt) == (E + 8, 3, 1)
        assert parse_id(g.next_id(E + 9)) == (E + 9, 3, 0)
        g._check()

    def test_small_regression_waits_it_out(self) -> None:
        """A clock step back within the tolerance keeps issuing from the last ms."""
        g = IdGenerator(0)
        a = g.next_id(E + 10_000)
        b = g.next_id(E + 10_000 - DEFAULT_MAX_REGRESSION_MS)
        c = g.next_id(E + 9_000)
        assert a < b < c
        assert parse_id(c) == (E + 10_000, 0, 2)
        g._check()

    def test_large_regression_raises_and_recovers(self) -> None:
        """A step back beyond the tolerance raises ClockRegression, then recovers."""
        g = IdGenerator(0, max_regression_ms=100)
        a = g.next_id(E + 10_000)
        with pytest.raises(ClockRegression) as err:
            g.next_id(E + 9_899)
        assert (err.value.wall_ms, err.value.last_ms) == (E + 9_899, E + 10_000)
        assert g.next_id(E + 9_900) > a
        g._check()

    def test_regression_measured_against_wall_clock(self) -> None:
        """Borrowed ms do not count as clock regression."""
        g = IdGenerator(0, max_regression_ms=0)
        for _ in range(3 * 4096):
            g.next_id(E + 5)  # borrows two ms ahead
        assert g.next_id(E + 5) > 0  # same wall ms: no ClockRegression
        g.next_id(E + 6)  # the wall clock moves on inside the borrowed ms
        with pytest.raises(ClockRegression):
            g.next_id(E + 5)  # ...and going back from there is a regression

    def test_after_id(self) -> None:
        """after_id makes every id larger than it, whatever the node."""
        t = E + 100_000
        old = IdGenerator(1000).next_id(t)
        g = IdGenerator(1, after_id=old)
        assert g.next_id(t) > old
        assert g.next_id(t - 1) > old
        with pytest.raises(ClockRegression):
            IdGenerator(1, after_id=old).next_id(t - DEFAULT_MAX_REGRESSION_MS - 1)

    def test_node_and_repr(self) -> None:
        """node is exposed; repr shows node and epoch."""
        g = IdGenerator(9)
        assert g.node == 9
        assert repr(g) == f"IdGenerator(node=9, epoch_ms={E})"

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"node": -1},
            {"node": 1024},
            {"node": 1.0},
            {"node": 1, "epoch_ms": -1},
            {"node": 1, "max_regression_ms": -1},
            {"node": 1, "after_id": -1},
            {"node": 1, "after_id": 1 << 63},
        ],
    )
    def test_bad_config(self, kwargs: dict[str, object]) -> None:
        """Out-of-range node, epoch, tolerance or after_id raises ConfigError."""
        with pytest.raises(ConfigError):
            IdGenerator(**kwargs)  # type: ignore[arg-type]

    @pytest.mark.parametrize("now", [E - 1, 0, float(E + 1), "1", None])
    def test_bad_now(self, now: object) -> None:
        """now_ms that is not an int at or after the epoch raises ConfigError."""
        g = IdGenerator(1)
        with pytest.raises(ConfigError):
            g.next_id(now)  # type: ignore[arg-type]
        g.next_id(E + 100)
        with pytest.raises(ImkitError):
            g.next_id(now)  # type: ignore[arg-type]
        g._check()

    @settings(max_examples=200)
    @given(
        node=st.integers(0, 1023),
        start=st.integers(0, 10**6),
        steps=st.lists(st.integers(-2 * DEFAULT_MAX_REGRESSION_MS, 50), max_size=200),
    )
    def test_strictly_increasing(self, node: int, start: int, steps: list[int]) -> None:
        """Under any clock walk, ids strictly increase; regressions past the limit raise."""
        g = IdGenerator(node)
        now = E + start
        peak = 0  # the largest now_ms the generator has seen
        last = -1
        for step in steps:
            now = max(E, now + step)
            if now < peak - DEFAULT_MAX_REGRESSION_MS:
                with pytest.raises(ClockRegression):
                    g.next_id(now)
                now = peak  # the clock comes back
                continue
            i = g.next_id(now)
            assert i > last
            parts = parse_id(i)
            assert parts.node == node
            assert parts.ms >= max(peak, now)
            peak = max(peak, now)
            last = i
            g._check()
