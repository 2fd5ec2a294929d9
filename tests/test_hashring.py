"""Tests of imkit.hashring against a brute-force oracle ring, uhashring and jump.

The state machine runs the ring on a 6-bit hash space (64 positions) with 1-4 points
per unit of weight, so collisions, wrap-around, keys landing exactly on a point and
(in ketama mode) nodes with no point at all happen constantly; the oracle recomputes
every point and scans linearly, and every one of the 64 positions is checked after
every step.
"""

from __future__ import annotations

import doctest
import enum
import random
from collections.abc import Callable, Iterator
from fractions import Fraction
from hashlib import md5
from itertools import pairwise
from math import ceil

import jump
import pytest
import uhashring
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from xxhash import xxh64_intdigest

import imkit.hashring as hashring_module
from imkit.errors import CapacityError, ConfigError, EmptyRingError, NodeNotFoundError
from imkit.hashring import (
    DEFAULT_VNODES,
    HashRing,
    Key,
    Transfer,
    _HashSpec,
    jump_hash,
)

# --- the tiny hash spaces and the oracle ----------------------------------------------

TINY_BITS = 6
TINY = 1 << TINY_BITS


def tiny_key(data: bytes) -> int:
    """A 6-bit key hash: the low bits of xxh64."""
    return xxh64_intdigest(data) & (TINY - 1)


def tiny_xxh_points(node: str, start: int, stop: int) -> list[int]:
    """One 6-bit point per index, ``xxh64(f"{node}-{i}")``."""
    return [xxh64_intdigest(f"{node}-{i}".encode()) & (TINY - 1) for i in range(start, stop)]


def tiny_ketama_key(data: bytes) -> int:
    """ketama's key hash (md5, first four bytes little-endian) cut to 6 bits."""
    return int.from_bytes(md5(data).digest()[:4], "little") & (TINY - 1)


def tiny_ketama_points(node: str, start: int, stop: int) -> list[int]:
    """Four 6-bit points per md5 digest of ``f"{node}-{i}"``, as ketama places them."""
    out: list[int] = []
    for i in range(start, stop):
        d = md5(f"{node}-{i}".encode()).digest()
        out.extend(int.from_bytes(d[4 * r : 4 * r + 4], "little") & (TINY - 1) for r in range(4))
    return out


TINY_SPECS = {
    "test-tiny-xxh64": _HashSpec("test-tiny-xxh64", TINY_BITS, tiny_key, tiny_xxh_points, 1, False),
    "test-tiny-ketama": _HashSpec(
        "test-tiny-ketama", TINY_BITS, tiny_ketama_key, tiny_ketama_points, 4, True
    ),
}


@pytest.fixture(autouse=True, scope="module")
def tiny_hashes() -> Iterator[None]:
    """Register the 6-bit hash spaces for the duration of this module."""
    hashring_module._HASHES.update(TINY_SPECS)
    try:
        yield
    finally:
        for name in TINY_SPECS:
            hashring_module._HASHES.pop(name, None)


def oracle_key_bytes(key: Key) -> bytes:
    """The documented key encoding, written out independently of the ring."""
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, bytes):
        return key
    return str(int(key)).encode("ascii")


class Oracle:
    """A brute-force ring: recompute every point, scan for the first point >= hash."""

    def __init__(self, spec: _HashSpec, vnodes: int) -> None:
        self.spec = spec
        self.vnodes = vnodes
        self.weights: dict[str, int] = {}
        self._memo: tuple[tuple[tuple[str, int], ...], list[tuple[int, str]]] = ((), [])

    def copy(self) -> Oracle:
        other = Oracle(self.spec, self.vnodes)
        other.weights = dict(self.weights)
        return other

    def counts(self) -> dict[str, int]:
        w = self.weights
        if not self.spec.relative:
            return {name: weight * self.vnodes for name, weight in w.items()}
        n, total = len(w), sum(w.values())
        return {name: 4 * ((self.vnodes // 4) * n * weight // total) for name, weight in w.items()}

    def continuum(self) -> list[tuple[int, str]]:
        state = tuple(sorted(self.weights.items()))
        if self._memo[0] != state or not state:
            per = self.spec.per_index
            pts = [
                (p, name)
                for name, count in self.counts().items()
                for p in self.spec.points(name, 0, count // per)
            ]
            self._memo = (state, sorted(pts))
        return list(self._memo[1])

    def key_hash(self, key: Key) -> int:
        return self.spec.key_hash(oracle_key_bytes(key))

    def start(self, h: int) -> int:
        cont = self.continuum()
        for i, (p, _) in enumerate(cont):
            if p >= h:
                return i
        return 0

    def get(self, h: int) -> str:
        return self.continuum()[self.start(h)][1]

    def walk(self, h: int) -> list[str]:
        cont = self.continuum()
        i = self.start(h)
        return [name for _, name in cont[i:] + cont[:i]]

    def get_n(self, h: int, n: int) -> list[str]:
        out: list[str] = []
        for name in self.walk(h):
            if name not in out and len(out) < n:
                out.append(name)
        return out

    def capacity(self, loads: dict[str, int], c: float) -> int:
        placed = [name for name, count in self.counts().items() if count]
        total = sum(loads.get(name, 0) for name in placed)
        return ceil(Fraction(c) * (total + 1) / len(placed))

    def bounded(self, h: int, loads: dict[str, int], c: float) -> str:
        cap = self.capacity(loads, c)
        return next(name for name in self.walk(h) if loads.get(name, 0) < cap)


def keys_for_every_position(key_hash: Callable[[bytes], int]) -> list[int]:
    """An int key hashing to each of the 64 positions (index = position)."""
    found: dict[int, int] = {}
    k = 0
    while len(found) < TINY:
        found.setdefault(key_hash(str(k).encode()), k)
        k += 1
    return [found[h] for h in range(TINY)]


POSITION_KEYS = {name: keys_for_every_position(spec.key_hash) for name, spec in TINY_SPECS.items()}

NAMES = st.sampled_from(["a", "b", "c", "d", "e", "gw-1", "é"])
KEYS: st.SearchStrategy[Key] = st.one_of(
    st.text(max_size=6), st.binary(max_size=6), st.integers(-(10**20), 10**20)
)
LOADS = st.dictionaries(NAMES, st.integers(0, 6), max_size=7)
BALANCE = st.sampled_from([1, 1.0, 1.1, 1.25, 1.5, 2.0, 3.7])


# --- the state machine ------------------------------------------------------------------


class RingMachine(RuleBasedStateMachine):
    """HashRing on a 6-bit space against the oracle; _check() and all 64 positions each step."""

    def __init__(self) -> None:
        super().__init__()
        self.ring = HashRing()
        self.oracle = Oracle(hashring_module._HASHES["xxh64"], DEFAULT_VNODES)
        self.old_ring: HashRing | None = None
        self.old_oracle: Oracle | None = None
        self.max_points = 0

    @initialize(
        hash_name=st.sampled_from(sorted(TINY_SPECS)),
        vnodes=st.integers(1, 4),
        max_points=st.sampled_from([12, 40, 10_000]),
    )
    def setup(self, hash_name: str, vnodes: int, max_points: int) -> None:
        spec = TINY_SPECS[hash_name]
        vnodes *= spec.per_index
        self.ring = HashRing(vnodes=vnodes, hash=hash_name, max_points=max_points)
        self.oracle = Oracle(spec, vnodes)
        self.max_points = max_points
        self.old_ring = HashRing(vnodes=vnodes, hash=hash_name)
        self.old_oracle = self.oracle.copy()

    @rule(node=NAMES, weight=st.integers(1, 3))
    def add(self, node: str, weight: int) -> None:
        trial = self.oracle.copy()
        trial.weights[node] = weight
        if trial.spec.relative:
            need = trial.vnodes * len(trial.weights)  # ketama: the most the counts can reach
        else:
            need = sum(trial.counts().values())
        if need > self.max_points:
            with pytest.raises(CapacityError):
                self.ring.add(node, weight)
        else:
            self.ring.add(node, weight)
            self.oracle = trial

    @rule(node=NAMES)
    def remove(self, node: str) -> None:
        if node in self.oracle.weights:
            self.ring.remove(node)
            del self.oracle.weights[node]
        else:
            with pytest.raises(NodeNotFoundError):
                self.ring.remove(node)

    @rule(node=NAMES)
    def discard(self, node: str) -> None:
        self.ring.discard(node)
        self.oracle.weights.pop(node, None)

    @rule(key=KEYS)
    def get(self, key: Key) -> None:
        assert self.ring.hash_key(key) == self.oracle.key_hash(key)
        if not self.oracle.weights:
            with pytest.raises(EmptyRingError):
                self.ring.get(key)
        else:
            assert self.ring.get(key) == self.oracle.get(self.oracle.key_hash(key))

    @rule(keys=st.lists(KEYS, max_size=8))
    def get_many(self, keys: list[Key]) -> None:
        if not self.oracle.weights:
            with pytest.raises(EmptyRingError):
                self.ring.get_many(keys)
        else:
            want = [self.oracle.get(self.oracle.key_hash(k)) for k in keys]
            assert self.ring.get_many(iter(keys)) == want

    @rule(key=KEYS, n=st.integers(0, 9))
    def get_n(self, key: Key, n: int) -> None:
        if not self.oracle.weights:
            with pytest.raises(EmptyRingError):
                self.ring.get_n(key, n)
            return
        got = self.ring.get_n(key, n)
        assert got == self.oracle.get_n(self.oracle.key_hash(key), n)
        assert len(set(got)) == len(got)
        if n:
            assert got[0] == self.ring.get(key)

    @rule(key=KEYS, loads=LOADS, c=BALANCE)
    def get_bounded(self, key: Key, loads: dict[str, int], c: float) -> None:
        if not self.oracle.weights:
            with pytest.raises(EmptyRingError):
                self.ring.get_bounded(key, loads, c)
            return
        cap = self.ring.capacity(loads, c)
        assert cap == self.oracle.capacity(loads, c)
        node = self.ring.get_bounded(key, loads, c)
        assert node == self.oracle.bounded(self.oracle.key_hash(key), loads, c)
        assert loads.get(node, 0) + 1 <= cap

    @rule()
    def snapshot(self) -> None:
        self.old_ring = HashRing(
            dict(self.oracle.weights),
            vnodes=self.oracle.vnodes,
            hash=self.oracle.spec.name,
        )
        self.old_oracle = self.oracle.copy()

    @rule()
    def transfers(self) -> None:
        assert self.old_ring is not None
        assert self.old_oracle is not None
        old, new = self.old_oracle, self.oracle
        if not old.weights or not new.weights:
            with pytest.raises(EmptyRingError):
                self.old_ring.transfers(self.ring)
            return
        arcs = self.old_ring.transfers(self.ring)
        for a, b in pairwise(arcs):
            assert a.end <= b.start
            assert a.end < b.start or (a.source, a.target) != (b.source, b.target)
        for t in arcs:
            assert 0 <= t.start < t.end <= TINY
            assert t.source != t.target
        for h in range(TINY):
            covering = [t for t in arcs if t.covers(h)]
            src, dst = old.get(h), new.get(h)
            if src == dst:
                assert covering == []
            else:
                assert [(t.source, t.target) for t in covering] == [(src, dst)]

    @invariant()
    def check(self) -> None:
        self.ring._check()
        assert dict(self.ring.nodes) == self.oracle.weights
        assert len(self.ring) == len(self.oracle.weights)
        assert all(name in self.ring for name in self.oracle.weights)
        if not self.oracle.weights:
            return
        assert self.ring.points() == self.oracle.continuum()
        keys = POSITION_KEYS[self.oracle.spec.name]
        want = [self.oracle.get(h) for h in range(TINY)]
        assert [self.ring.get(k) for k in keys] == want
        assert self.ring.get_many(keys) == want


RingMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40)
TestRingMachine = RingMachine.TestCase


# --- construction and arguments --------------------------------------------------------


class TestConstruction:
    def test_iterable_of_names_gets_weight_one(self) -> None:
        """Names from an iterable all get weight 1; duplicates collapse."""
        ring = HashRing(["a", "b", "a"])
        assert dict(ring.nodes) == {"a": 1, "b": 1}
        assert len(ring) == 2 and "a" in ring and "z" not in ring

    def test_mapping_sets_weights(self) -> None:
        """A mapping gives each node its weight and weight scales its points."""
        ring = HashRing({"a": 1, "b": 3}, vnodes=10)
        counts = {"a": 0, "b": 0}
        for _, name in ring.points():
            counts[name] += 1
        assert counts == {"a": 10, "b": 30}
        ring._check()

    def test_nodes_view_is_read_only_and_live(self) -> None:
        """``nodes`` cannot be mutated and follows the ring."""
        ring = HashRing(["a"])
        view = ring.nodes
        with pytest.raises(TypeError):
            view["b"] = 1  # type: ignore[index]
        ring.add("b", 2)
        assert view["b"] == 2

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"vnodes": 0},
            {"vnodes": -1},
            {"vnodes": True},
            {"vnodes": 1.5},
            {"hash": "md5"},
            {"hash": None},
            {"hash": "ketama", "vnodes": 10},
            {"max_points": 0},
        ],
    )
    def test_bad_arguments(self, kwargs: dict[str, object]) -> None:
        """Bad constructor keywords raise ConfigError (a ValueError)."""
        with pytest.raises(ConfigError):
            HashRing(["a"], **kwargs)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            HashRing(["a"], **kwargs)  # type: ignore[arg-type]

    @pytest.mark.parametrize("weight", [0, -3, True, 2.0, "2"])
    def test_bad_weight(self, weight: object) -> None:
        """A weight that is not an int >= 1 raises ConfigError and changes nothing."""
        ring = HashRing(["a"])
        with pytest.raises(ConfigError):
            ring.add("b", weight)  # type: ignore[arg-type]
        assert "b" not in ring
        with pytest.raises(ConfigError):
            HashRing({"a": weight})

    def test_bad_nodes(self) -> None:
        """A bare string or a non-str name is refused."""
        with pytest.raises(ConfigError):
            HashRing("abc")
        with pytest.raises(ConfigError):
            HashRing([1, 2])  # type: ignore[list-item]

    def test_max_points(self) -> None:
        """Adding past max_points raises CapacityError and leaves the ring as it was."""
        ring = HashRing(["a"], vnodes=10, max_points=25)
        with pytest.raises(CapacityError) as info:
            ring.add("b", 2)
        assert info.value.limit == "max_points"
        assert dict(ring.nodes) == {"a": 1}
        ring.add("b")
        ring._check()

    def test_add_changes_weight_keeping_common_points(self) -> None:
        """Re-adding a node sets its weight; its first points stay where they were."""
        ring = HashRing(["a", "b"], vnodes=4)
        before = {p for p, n in ring.points() if n == "a"}
        ring.add("a", 3)
        after = {p for p, n in ring.points() if n == "a"}
        assert before < after and len(after) == 12
        ring.add("a", 1)
        assert {p for p, n in ring.points() if n == "a"} == before
        ring._check()

    def test_remove_and_discard(self) -> None:
        """remove raises NodeNotFoundError (a KeyError) when absent; discard is silent."""
        ring = HashRing(["a"])
        with pytest.raises(NodeNotFoundError):
            ring.remove("b")
        with pytest.raises(KeyError):
            ring.remove("b")
        ring.discard("b")
        ring.remove("a")
        assert len(ring) == 0
        ring._check()

    def test_repr_and_properties(self) -> None:
        """repr shows nodes, vnodes and hash; properties report the configuration."""
        ring = HashRing({"a": 2}, vnodes=8, hash="ketama")
        assert repr(ring) == "HashRing({'a': 2}, vnodes=8, hash='ketama')"
        assert (ring.vnodes, ring.hash_name, ring.hash_bits) == (8, "ketama", 32)
        assert HashRing().hash_bits == 64


class TestEmptyRing:
    def test_lookups_raise(self) -> None:
        """Every lookup on an empty ring raises EmptyRingError (a LookupError)."""
        ring = HashRing(["a"])
        ring.remove("a")
        for call in (
            lambda: ring.get("k"),
            lambda: ring.get_many(["k"]),
            lambda: ring.get_n("k", 2),
            lambda: ring.get_bounded("k", {}),
            lambda: ring.capacity({}),
            lambda: ring.transfers(HashRing(["a"])),
            lambda: HashRing(["a"]).transfers(ring),
        ):
            with pytest.raises(EmptyRingError):
                call()
            with pytest.raises(LookupError):
                call()
        assert ring.points() == []

    def test_empty_batch_on_empty_ring_raises(self) -> None:
        """get_many([]) on an empty ring raises too: emptiness is checked first."""
        with pytest.raises(EmptyRingError):
            HashRing().get_many([])


# --- keys ---------------------------------------------------------------------------


class Color(enum.IntEnum):
    RED = 42


class TestKeys:
    def test_int_keys_hash_as_decimal_digits(self) -> None:
        """get(42) == get("42") == get(b"42"), also for int subclasses and negatives."""
        ring = HashRing([f"n{i}" for i in range(20)])
        for k in (42, -7, 0, 2**70, Color.RED):
            assert ring.hash_key(k) == xxh64_intdigest(str(int(k)).encode())
            assert ring.get(k) == ring.get(str(int(k))) == ring.get(str(int(k)).encode())

    def test_str_keys_hash_as_utf8(self) -> None:
        """A str key hashes as its UTF-8 bytes."""
        ring = HashRing(["a", "b", "c"])
        assert ring.hash_key("用户") == xxh64_intdigest("用户".encode())
        assert ring.get("用户") == ring.get("用户".encode())

    def test_bytes_like_keys(self) -> None:
        """bytearray and memoryview keys hash as their bytes."""
        ring = HashRing(["a", "b", "c"])
        want = ring.get(b"key")
        assert ring.get(bytearray(b"key")) == want  # type: ignore[arg-type]
        assert ring.get(memoryview(b"key")) == want  # type: ignore[arg-type]
        assert ring.get_many([bytearray(b"key")]) == [want]  # type: ignore[list-item]

    @pytest.mark.parametrize("key", [None, True, 1.5, ("a",), "\ud800"])
    def test_bad_keys(self, key: object) -> None:
        """Keys that are not str/bytes/int (or not UTF-8 encodable) raise ConfigError."""
        ring = HashRing(["a", "b"])
        with pytest.raises(ConfigError):
            ring.get(key)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            ring.get_many(["ok", key])  # type: ignore[list-item]
        with pytest.raises(ConfigError):
            ring.hash_key(key)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            HashRing().get(key)  # type: ignore[arg-type]

    @given(keys=st.lists(KEYS, max_size=30), n=st.integers(1, 30))
    @settings(max_examples=50)
    def test_real_xxh64_ring_matches_oracle(self, keys: list[Key], n: int) -> None:
        """With the full 64-bit hash, lookups and points match the oracle."""
        ring = HashRing([f"gw{i}" for i in range(n)], vnodes=8)
        oracle = Oracle(hashring_module._HASHES["xxh64"], 8)
        oracle.weights = {f"gw{i}": 1 for i in range(n)}
        assert ring.points() == oracle.continuum()
        want = [oracle.get(oracle.key_hash(k)) for k in keys]
        assert [ring.get(k) for k in keys] == want
        assert ring.get_many(keys) == want

    def test_points_are_xxh64_of_name_dash_index(self) -> None:
        """Point i of node "gw" is xxh64(b"gw-i")."""
        ring = HashRing(["gw"], vnodes=3)
        want = sorted((xxh64_intdigest(f"gw-{i}".encode()), "gw") for i in range(3))
        assert ring.points() == want


# --- ring behaviour on realistic sizes --------------------------------------------------


def random_keys(n: int, seed: int) -> list[Key]:
    rng = random.Random(seed)
    keys: list[Key] = [f"user:{rng.getrandbits(48)}" for _ in range(n // 2)]
    keys += [rng.getrandbits(40) for _ in range(n - len(keys))]
    return keys


class TestMovement:
    def test_join_moves_keys_only_to_the_new_node(self) -> None:
        """When a node joins, a key either stays or moves to the newcomer, about 1/(n+1)."""
        old = HashRing([f"gw{i}" for i in range(20)])
        new = HashRing([f"gw{i}" for i in range(21)])
        keys = random_keys(20_000, 1)
        before, after = old.get_many(keys), new.get_many(keys)
        moved = [a for b, a in zip(before, after, strict=True) if a != b]
        assert set(moved) == {"gw20"}
        assert 0.02 < len(moved) / len(keys) < 0.08

    def test_leave_moves_only_the_leavers_keys(self) -> None:
        """When a node leaves, only its own keys move."""
        ring = HashRing([f"gw{i}" for i in range(10)])
        keys = random_keys(5_000, 2)
        before = ring.get_many(keys)
        ring.remove("gw3")
        after = ring.get_many(keys)
        assert all(b == a or b == "gw3" for b, a in zip(before, after, strict=True))
        assert "gw3" not in after

    def test_insertion_order_does_not_matter(self) -> None:
        """Two rings with the same nodes added in different orders are identical."""
        names = [f"n{i}" for i in range(30)]
        a = HashRing(names, hash="ketama")
        b = HashRing(list(reversed(names)), hash="ketama")
        assert a.points() == b.points()

    def test_add_in_a_loop_rebuilds_once(self) -> None:
        """add() in a loop stays cheap and the ring checks out afterwards."""
        ring = HashRing(vnodes=16)
        for i in range(300):
            ring.add(f"gw{i}")
        assert len(ring.points()) == 300 * 16
        ring._check()


class TestGetN:
    def test_failover_order(self) -> None:
        """get_n starts with get() and lists distinct nodes; n > len gives all nodes."""
        ring = HashRing([f"gw{i}" for i in range(5)])
        for k in random_keys(200, 3):
            order = ring.get_n(k, 9)
            assert order[0] == ring.get(k)
            assert sorted(order) == sorted(ring.nodes)
            assert ring.get_n(k, 2) == order[:2]
        assert ring.get_n("k", 0) == []

    def test_bad_n(self) -> None:
        """A negative or non-int n raises ConfigError."""
        ring = HashRing(["a"])
        with pytest.raises(ConfigError):
            ring.get_n("k", -1)
        with pytest.raises(ConfigError):
            ring.get_n("k", 1.0)  # type: ignore[arg-type]


class TestBoundedLoads:
    @pytest.mark.parametrize("c", [1, 1.1, 1.25, 2.0])
    def test_no_node_exceeds_capacity(self, c: float) -> None:
        """Placing keys one by one never lifts any node above ceil(c * (m + 1) / n)."""
        ring = HashRing([f"gw{i}" for i in range(10)], vnodes=20)
        loads: dict[str, int] = {}
        for m, k in enumerate(random_keys(3_000, 4)):
            cap = ceil(Fraction(c) * (m + 1) / 10)
            assert ring.capacity(loads, c) == cap
            node = ring.get_bounded(k, loads, c)
            loads[node] = loads.get(node, 0) + 1
            assert loads[node] <= cap
        assert max(loads.values()) <= ceil(Fraction(c) * 3_000 / 10)

    def test_unloaded_ring_is_plain_lookup(self) -> None:
        """With room everywhere, get_bounded agrees with get."""
        ring = HashRing([f"gw{i}" for i in range(10)])
        for k in random_keys(300, 5):
            assert ring.get_bounded(k, {}) == ring.get(k)

    def test_loads_of_other_names_are_ignored(self) -> None:
        """Loads of names not on the ring do not count toward the total."""
        ring = HashRing(["a", "b"])
        assert ring.capacity({"gone": 1000}, 1.0) == 1

    @pytest.mark.parametrize("c", [0.99, 0, -1, float("nan"), float("inf"), True, "1.5"])
    def test_bad_balance(self, c: object) -> None:
        """c must be a finite number >= 1."""
        ring = HashRing(["a"])
        with pytest.raises(ConfigError):
            ring.get_bounded("k", {}, c)  # type: ignore[arg-type]

    @pytest.mark.parametrize("load", [-1, 1.5, None, True])
    def test_bad_loads(self, load: object) -> None:
        """A load that is not an int >= 0 raises ConfigError."""
        ring = HashRing(["a"])
        with pytest.raises(ConfigError):
            ring.get_bounded("k", {"a": load})  # type: ignore[dict-item]


# --- ketama compatibility ---------------------------------------------------------------


def assert_matches_uhashring(ring: HashRing, peer: uhashring.HashRing, keys: list[Key]) -> int:
    """Every key goes where uhashring sends it, except where the two rules may differ.

    uhashring takes the first point > hash (bisect_right) and keeps the last inserted
    node on a colliding point; imkit (and libketama) take the first point >= hash
    and the smallest name. Returns how many keys hit such a spot.
    """
    positions: dict[int, set[str]] = {}
    for p, name in ring.points():
        positions.setdefault(p, set()).add(name)
    exceptions = 0
    for k, got in zip(keys, ring.get_many(keys), strict=True):
        want = peer.get_node(k)
        assert ring.get(k) == got
        if got != want:
            h = ring.hash_key(k)
            owner_point = min(p for p in [*positions, 1 << 32] if p >= h)
            assert h in positions or len(positions.get(owner_point, ())) > 1
            exceptions += 1
    return exceptions


NODES_40 = [f"10.0.{i // 256}.{i % 256}:11211" for i in range(40)]


class TestKetama:
    def test_same_points_as_uhashring(self) -> None:
        """The continuum has exactly uhashring's ketama points."""
        ring = HashRing(NODES_40, hash="ketama")
        peer = uhashring.HashRing(NODES_40, hash_fn="ketama")
        assert sorted(p for p, _ in ring.points()) == sorted(p for p, _ in peer.get_points())
        assert len(ring.points()) == 160 * len(NODES_40)

    def test_same_nodes_as_uhashring(self) -> None:
        """Random str and int keys go to the node uhashring's ketama mode picks."""
        ring = HashRing(NODES_40, hash="ketama")
        peer = uhashring.HashRing(NODES_40, hash_fn="ketama")
        assert assert_matches_uhashring(ring, peer, random_keys(40_000, 6)) <= 2

    @pytest.mark.parametrize("seed", [7, 8])
    def test_same_nodes_as_uhashring_with_weights(self, seed: int) -> None:
        """With weights, point counts follow (40 * n * w) // W digests as in uhashring."""
        rng = random.Random(seed)
        weights = {n: rng.randint(1, 6) for n in NODES_40[:25]}
        weights["tiny"] = 1
        weights["huge"] = 60  # pushes "tiny" and others down, some to few digests
        ring = HashRing(weights, hash="ketama")
        peer = uhashring.HashRing(dict(weights), hash_fn="ketama")
        assert sorted(p for p, _ in ring.points()) == sorted(p for p, _ in peer.get_points())
        assert assert_matches_uhashring(ring, peer, random_keys(30_000, seed)) <= 2

    def test_zero_point_node_is_skipped(self) -> None:
        """A node too light to earn a digest holds no points and receives no keys."""
        ring = HashRing({"light": 1, "heavy": 1000}, hash="ketama")
        assert {n for _, n in ring.points()} == {"heavy"}
        assert set(ring.get_many(random_keys(500, 9))) == {"heavy"}
        assert ring.get_n("k", 5) == ["heavy"]
        assert ring.get_bounded("k", {"heavy": 10**6, "light": 0}) == "heavy"
        ring._check()

    def test_key_hash_is_libketama(self) -> None:
        """The key hash is the first four md5 bytes, little-endian."""
        ring = HashRing(["a"], hash="ketama")
        d = md5(b"some key").digest()
        assert ring.hash_key("some key") == int.from_bytes(d[:4], "little")
        assert ring.hash_key(b"some key") == ring.hash_key("some key")


# --- jump hash ----------------------------------------------------------------------


class TestJumpHash:
    @given(key=st.integers(0, 2**64 - 1), buckets=st.integers(1, 2**31 - 1))
    @settings(max_examples=300)
    def test_matches_jump_package(self, key: int, buckets: int) -> None:
        """jump_hash equals the C implementation of the jump package."""
        assert jump_hash(key, buckets) == jump.hash(key, buckets)

    def test_many_keys(self) -> None:
        """Bit-exact on many random keys and bucket counts, negatives masked as uint64."""
        rng = random.Random(10)
        for _ in range(3_000):
            key = rng.randrange(-(2**63), 2**64)
            buckets = rng.choice([1, 2, 3, 10, 100, 1000, rng.randrange(1, 2**31)])
            assert jump_hash(key, buckets) == jump.hash(key, buckets)

    @given(key=st.integers(0, 2**64 - 1), buckets=st.integers(1, 500))
    @settings(max_examples=100)
    def test_growing_moves_only_to_the_new_bucket(self, key: int, buckets: int) -> None:
        """Adding bucket n either keeps a key or moves it to bucket n."""
        assert jump_hash(key, buckets + 1) in (jump_hash(key, buckets), buckets)

    @pytest.mark.parametrize(
        ("key", "buckets"),
        [(1, 0), (1, -1), (1, 2**31), (-(2**63) - 1, 1), (2**64, 1), (True, 1), (1.0, 1), (1, 2.0)],
    )
    def test_bad_arguments(self, key: object, buckets: object) -> None:
        """Out-of-range or non-int arguments raise ConfigError."""
        with pytest.raises(ConfigError):
            jump_hash(key, buckets)  # type: ignore[arg-type]


# --- transfers ------------------------------------------------------------------------


class TestTransfers:
    @pytest.mark.parametrize("hash_name", ["xxh64", "ketama"])
    def test_scale_out_moves_exactly_the_listed_arcs(self, hash_name: str) -> None:
        """A key moves iff its hash lies in a listed arc, from its source to its target."""
        old = HashRing([f"gw{i}" for i in range(12)], hash=hash_name)
        new = HashRing({**{f"gw{i}": 1 for i in range(12) if i != 5}, "gw12": 2}, hash=hash_name)
        arcs = old.transfers(new)
        starts = [t.start for t in arcs]
        assert starts == sorted(starts)
        for k in random_keys(20_000, 11):
            h = old.hash_key(k)
            src, dst = old.get(k), new.get(k)
            covering = [t for t in arcs if t.covers(h)]
            if src == dst:
                assert covering == []
            else:
                assert [(t.source, t.target) for t in covering] == [(src, dst)]

    def test_identical_rings_transfer_nothing(self) -> None:
        """Two rings with the same nodes have no transfers."""
        assert HashRing(["a", "b"]).transfers(HashRing(["b", "a"])) == []

    def test_arc_to_the_top(self) -> None:
        """The arc past the last point ends at 2**64 and belongs to the first point."""
        a, b = HashRing(["a"]), HashRing(["b"])
        assert a.transfers(b) == [Transfer(source="a", target="b", start=0, end=2**64)]

    @pytest.mark.parametrize(("old", "new"), [("n119", "n6"), ("n6", "n119"), ("n5", "n24")])
    def test_last_position_of_the_space(self, old: str, new: str) -> None:
        """Arcs reach the very top of a 6-bit space (points at 62, 63, 0 and 10)."""
        spec = TINY_SPECS["test-tiny-xxh64"]
        assert [spec.points(n, 0, 1) for n in ("n119", "n5", "n24", "n6")] == [
            [62], [63], [0], [10]
        ]
        a = HashRing([old], vnodes=1, hash=spec.name)
        b = HashRing([new], vnodes=1, hash=spec.name)
        assert a.transfers(b) == [Transfer(source=old, target=new, start=0, end=TINY)]
        both = HashRing([old, new], vnodes=1, hash=spec.name)
        for h in range(TINY):
            moved = [t for t in a.transfers(both) if t.covers(h)]
            assert bool(moved) == (both._lookup(h) != old)

    def test_different_hashes_refused(self) -> None:
        """Rings with different hashes cannot be compared."""
        with pytest.raises(ConfigError):
            HashRing(["a"]).transfers(HashRing(["a"], hash="ketama"))
        with pytest.raises(ConfigError):
            HashRing(["a"]).transfers("ring")  # type: ignore[arg-type]


class TestDocs:
    def test_doctests(self) -> None:
        """The docstring examples run."""
        result = doctest.testmod(hashring_module)
        assert result.attempted > 0 and result.failed == 0
