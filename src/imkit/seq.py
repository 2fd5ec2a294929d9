"""Numbering messages: per-conversation seqs that never repeat, and 64-bit time-ordered ids.

* :class:`SeqAllocator` hands out each conversation's ``seq`` (1, 2, 3, ...) the way
  WeChat's seqsvr does: it leases a block of ``step`` seqs by durably saving the
  block's ceiling *before* issuing any seq from it. A restart reloads the ceiling and
  continues after it, leaving a gap but never a repeat, for one durable write per
  ``step`` seqs instead of one per message. Clients therefore never assume that
  ``seq + 1`` exists: they ask for "everything after my last seq" (see
  :class:`imkit.dedup.SeqWindow`).
* :class:`IdGenerator` makes snowflake-style 64-bit message ids: 41 bits of
  milliseconds since an epoch, 10 bits of node, 12 bits of counter; strictly
  increasing per generator, roughly time-ordered across nodes.

Floor 1: no clock and no I/O. Ids need the wall clock (Unix ms), which comes in as
``wall_ms`` (imkit says ``now_ms`` only for a caller's monotonic clock); persistence
comes in as a :class:`CeilingStore` (any object with ``load`` and ``save``). Neither class is
thread-safe: each belongs to one owner (one logic shard per conversation, one
generator per node).

See ``docs/seq.md`` for the design, a worked example, the id layout and the limits.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Protocol

from imkit.errors import ClockRegression, ConfigError, SeqError

__all__ = [
    "COUNTER_BITS",
    "DEFAULT_EPOCH_MS",
    "DEFAULT_MAX_KEYS",
    "DEFAULT_MAX_REGRESSION_MS",
    "DEFAULT_STEP",
    "MAX_SEQ",
    "NODE_BITS",
    "TIME_BITS",
    "CeilingStore",
    "IdGenerator",
    "IdParts",
    "MemoryCeilingStore",
    "SeqAllocator",
    "parse_id",
]

#: Largest seq: seqs travel as integers below 2**63 and fit a signed 64-bit column.
MAX_SEQ = 2**63 - 1

#: Seqs per leased block. WeChat's seqsvr uses a step of 10000: one durable write per
#: 10000 messages of a conversation, and a restart skips at most 10000 seqs.
DEFAULT_STEP = 10_000

#: Conversations whose lease is kept in memory (past it, one not used lately is evicted).
#: About 250 bytes each (measured: an OrderedDict entry, a three-item list, two ints; the
#: key str is the caller's): 100k keys ~ 25 MB.
#: An evicted key costs one load and one save when it comes back, and skips the rest
#: of its block: a gap, never a repeat.
DEFAULT_MAX_KEYS = 100_000


class CeilingStore(Protocol):
    """Durable storage of each key's ceiling: the highest seq that may have been issued.

    ``load(key)`` returns the last saved ceiling, 0 if none. ``save(key, ceiling)``
    must be durable when it returns (fsync'd, replicated, committed); it is called
    with ever larger ceilings for a key. If it raises, no seq of the new block is
    issued. Only one allocator may own a key at a time.
    """

    def load(self, key: str) -> int:
        """The last saved ceiling of ``key``, 0 if none."""
        ...

    def save(self, key: str, ceiling: int) -> None:
        """Durably record ``ceiling`` for ``key`` before returning."""
        ...


class MemoryCeilingStore:
    """A :class:`CeilingStore` in a dict, for tests and single-process embedded use.

    "Durable" only as long as the object lives: share one instance between the
    allocators of a test to simulate restarts. ``saves`` counts the durable writes.
    Holds one int per key ever saved and has no limit on purpose: it stands for the
    database row of each conversation, and forgetting a ceiling would let seqs repeat.
    """

    __slots__ = ("_ceilings", "saves")

    def __init__(self) -> None:
        """An empty store. O(1)."""
        self._ceilings: dict[str, int] = {}
        self.saves = 0

    def load(self, key: str) -> int:
        """The last saved ceiling of ``key``, 0 if none. O(1)."""
        return self._ceilings.get(key, 0)

    def save(self, key: str, ceiling: int) -> None:
        """Record ``ceiling`` for ``key``. O(1)."""
        self._ceilings[key] = ceiling
        self.saves += 1

    def __len__(self) -> int:
        """Keys stored. O(1)."""
        return len(self._ceilings)


class SeqAllocator:
    """Per-key (per-conversation) seq allocation that never reuses a seq across restarts.

    ``next(key)`` returns 1, 2, 3, ... for a new key. Before issuing the first seq of
    a block it saves the block's ceiling (``last + step``) through the store; a seq is
    issued only from a ceiling that is durable. After a restart (a new allocator over
    the same store) or an eviction, the key reloads its ceiling and continues *after*
    it: seqs skip the unused rest of the block, and never repeat.

    >>> store = MemoryCeilingStore()
    >>> a = SeqAllocator(store, step=10_000)
    >>> a.next("room"), a.next("room"), a.next("room"), store.load("room")
    (1, 2, 3, 10000)
    >>> SeqAllocator(store, step=10_000).next("room")  # after a restart
    10001

    In-memory state is bounded by ``max_keys``: past it a key not used lately is
    evicted (CLOCK, an O(1) approximation of least-recently-used), safely: it reloads
    its ceiling when it comes back. Keys are ``str``.
    Errors: :class:`~imkit.errors.SeqError` if the store fails (nothing issued) or the
    seq space is exhausted; :class:`~imkit.errors.ConfigError` for bad arguments.
    """

    __slots__ = ("_leases", "_max_keys", "_step", "_store")

    def __init__(
        self,
        store: CeilingStore,
        *,
        step: int = DEFAULT_STEP,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        """Allocate over ``store``, leasing ``step`` seqs per durable write. O(1)."""
        if type(step) is not int or not 1 <= step <= MAX_SEQ:
            raise ConfigError(f"step must be an int in [1, 2**63 - 1], got {step!r}")
        if type(max_keys) is not int or max_keys < 1:
            raise ConfigError(f"max_keys must be an int >= 1, got {max_keys!r}")
        self._store = store
        self._step = step
        self._max_keys = max_keys
        # key -> [last seq issued, durable ceiling, used since the last eviction sweep].
        self._leases: OrderedDict[str, list[int]] = OrderedDict()

    @property
    def step(self) -> int:
        """Seqs leased per durable write. O(1)."""
        return self._step

    @property
    def max_keys(self) -> int:
        """Keys kept in memory at most. O(1)."""
        return self._max_keys

    def __len__(self) -> int:
        """Keys currently in memory. O(1)."""
        return len(self._leases)

    def next(self, key: str) -> int:
        """The next seq of ``key``, larger than every seq it ever issued for ``key``.

        O(1); one ``store.save`` (and one ``store.load`` for a key not in memory) per
        ``step`` seqs.
        """
        try:
            lease = self._leases[key]
        except (KeyError, TypeError):  # not in memory (or not a str: _lease says so)
            return self._lease(key, 1)
        seq = lease[0] + 1
        if seq <= lease[1]:
            lease[0] = seq
            lease[2] = 1  # used: spared by the next eviction sweep
            return seq
        return self._lease(key, 1)

    def next_n(self, key: str, n: int) -> range:
        """``n`` consecutive seqs of ``key`` (1 <= n <= step), as a range. O(1)."""
        if type(n) is not int or not 1 <= n <= self._step:
            raise ConfigError(f"n must be an int in [1, step={self._step}], got {n!r}")
        first = self._lease(key, n)
        return range(first, first + n)

    def discard(self, key: str) -> None:
        """Forget ``key``'s lease (e.g. its conversation moved to another owner). O(1).

        Safe at any time: coming back, the key reloads its ceiling and skips the rest of
        its block. Silent if the key is not in memory.
        """
        if isinstance(key, str):
            self._leases.pop(key, None)

    def _lease(self, key: str, n: int) -> int:
        # Issue n seqs for key, leasing (and durably saving) a new block if needed.
        leases = self._leases
        lease = leases.get(key) if isinstance(key, str) else None
        new = lease is None
        if lease is None:
            if not isinstance(key, str):
                raise ConfigError(f"key must be a str, got {key!r}")
            ceiling = self._load(key)
            lease = [ceiling, ceiling, 0]
        last, ceiling, _ = lease
        if last + n > MAX_SEQ:
            raise SeqError(f"seq space of {key!r} exhausted at {last}")
        if last + n > ceiling:
            # n <= step and last <= ceiling, so one block covers the request.
            new_ceiling = min(ceiling + self._step, MAX_SEQ)
            try:
                self._store.save(key, new_ceiling)
            except Exception as exc:
                raise SeqError(f"cannot persist the ceiling of {key!r}: {exc!r}") from exc
            lease[1] = new_ceiling
        lease[0] = last + n
        if new:
            if len(leases) >= self._max_keys:
                self._evict()
            leases[key] = lease
        else:
            lease[2] = 1
        return last + 1

    def _evict(self) -> None:
        # CLOCK (second chance), an O(1) amortised stand-in for LRU: sweep from the
        # oldest; a key used since the sweep last passed it loses its mark and goes to
        # the back; the first unmarked key is evicted. Ends within one lap.
        leases = self._leases
        while True:
            key, lease = leases.popitem(last=False)
            if not lease[2]:
                return
            lease[2] = 0
            leases[key] = lease

    def _load(self, key: str) -> int:
        try:
            ceiling = self._store.load(key)
        except Exception as exc:
            raise SeqError(f"cannot load the ceiling of {key!r}: {exc!r}") from exc
        if type(ceiling) is not int or not 0 <= ceiling <= MAX_SEQ:
            raise SeqError(f"store returned an invalid ceiling for {key!r}: {ceiling!r}")
        return ceiling

    def __repr__(self) -> str:
        return f"SeqAllocator(step={self._step}, keys={len(self._leases)}/{self._max_keys})"

    def _check(self) -> None:
        """Assert the invariants (in memory only; the store is not read). O(keys)."""
        if len(self._leases) > self._max_keys:
            raise AssertionError(f"{len(self._leases)} keys > max_keys {self._max_keys}")
        for key, lease in self._leases.items():
            if not isinstance(key, str):
                raise AssertionError(f"key {key!r} is not a str")
            if len(lease) != 3 or lease[2] not in (0, 1):
                raise AssertionError(f"lease of {key!r} is {lease!r}")
            last, ceiling, _ = lease
            if not 0 <= last <= ceiling <= MAX_SEQ:
                raise AssertionError(f"lease of {key!r}: need 0 <= {last} <= {ceiling} <= MAX")


# --- ids --------------------------------------------------------------------------

#: Id layout, high bits to low: 1 zero sign bit, 41 bits of ms since the epoch
#: (69.7 years), 10 bits of node (1024 generators), 12 bits of counter (4096 ids per
#: ms per node) -- Twitter's snowflake layout.
TIME_BITS = 41
NODE_BITS = 10
COUNTER_BITS = 12
_MAX_T = (1 << TIME_BITS) - 1
_MAX_NODE = (1 << NODE_BITS) - 1
_MAX_COUNTER = (1 << COUNTER_BITS) - 1
_TIME_SHIFT = NODE_BITS + COUNTER_BITS

#: 2024-01-01T00:00:00Z in Unix ms: ids last until 2093.
DEFAULT_EPOCH_MS = 1_704_067_200_000

#: How far back the clock may step and still be waited out, in ms. NTP slews a synced
#: clock by at most 500 ppm, so only a step moves it back; steps of a few seconds
#: happen (a VM resumed, a first sync). Within this the generator keeps issuing from
#: its last timestamp; beyond it, a clock that far wrong is a fault to report.
DEFAULT_MAX_REGRESSION_MS = 5_000


class IdParts(NamedTuple):
    """The fields of an id: Unix time in ms, node, counter within the ms."""

    ms: int
    node: int
    counter: int


def parse_id(msg_id: int, *, epoch_ms: int = DEFAULT_EPOCH_MS) -> IdParts:
    """Split an id into (Unix ms, node, counter). O(1).

    >>> parse_id(IdGenerator(7).next_id(DEFAULT_EPOCH_MS + 1000))
    IdParts(ms=1704067201000, node=7, counter=0)
    """
    if type(msg_id) is not int or not 0 <= msg_id < 1 << 63:
        raise ConfigError(f"an id is an int in [0, 2**63), got {msg_id!r}")
    return IdParts(
        (msg_id >> _TIME_SHIFT) + epoch_ms,
        (msg_id >> COUNTER_BITS) & _MAX_NODE,
        msg_id & _MAX_COUNTER,
    )


class IdGenerator:
    """Snowflake-style 64-bit message ids, strictly increasing per generator.

    ``id = (wall_ms - epoch_ms) << 22 | node << 12 | counter``. Ids of one generator
    strictly increase; ids of different nodes sort by time to the millisecond.

    * More than 4096 ids in one ms: the counter wraps and the generator borrows the
      next ms (a logical clock a little ahead of the wall clock; it falls back in
      step as soon as the wall clock passes it).
    * The clock going back by at most ``max_regression_ms``: ids keep coming from the
      last timestamp (still increasing). Further back: :class:`~imkit.errors.ClockRegression`,
      nothing issued, until the clock returns.
    * ``after_id``: ids will all be larger than it (pass the last id a previous
      incarnation of this node issued, so a restart with a slow clock cannot repeat).

    >>> g = IdGenerator(node=1)
    >>> a, b = g.next_id(DEFAULT_EPOCH_MS + 5), g.next_id(DEFAULT_EPOCH_MS + 5)
    >>> b > a, g.parse(b)
    (True, IdParts(ms=1704067200005, node=1, counter=1))
    """

    __slots__ = ("_counter", "_epoch_ms", "_last_t", "_max_regression_ms", "_node", "_t")

    def __init__(
        self,
        node: int,
        *,
        epoch_ms: int = DEFAULT_EPOCH_MS,
        max_regression_ms: int = DEFAULT_MAX_REGRESSION_MS,
        after_id: int = 0,
    ) -> None:
        """A generator for ``node`` (0 to 1023). O(1)."""
        if type(node) is not int or not 0 <= node <= _MAX_NODE:
            raise ConfigError(f"node must be an int in [0, {_MAX_NODE}], got {node!r}")
        if type(epoch_ms) is not int or epoch_ms < 0:
            raise ConfigError(f"epoch_ms must be an int >= 0, got {epoch_ms!r}")
        if type(max_regression_ms) is not int or max_regression_ms < 0:
            raise ConfigError(f"max_regression_ms must be an int >= 0, got {max_regression_ms!r}")
        if type(after_id) is not int or not 0 <= after_id < 1 << 63:
            raise ConfigError(f"after_id must be an int in [0, 2**63), got {after_id!r}")
        self._node = node << COUNTER_BITS
        self._epoch_ms = epoch_ms
        self._max_regression_ms = max_regression_ms
        # _t: logical ms since the epoch of the last id; _counter: its counter.
        # _last_t: the largest wall-clock ms seen (<= _t; _t runs ahead when borrowing).
        self._t = -1
        self._counter = _MAX_COUNTER
        self._last_t = -1
        if after_id:
            t = after_id >> _TIME_SHIFT
            # The next id borrows t + 1: larger than after_id whatever its node.
            self._t, self._counter, self._last_t = t, _MAX_COUNTER, t

    @property
    def node(self) -> int:
        """This generator's node number. O(1)."""
        return self._node >> COUNTER_BITS

    @property
    def epoch_ms(self) -> int:
        """Unix ms of id time 0. O(1)."""
        return self._epoch_ms

    def next_id(self, wall_ms: int) -> int:
        """A new id, larger than every id this generator issued. O(1).

        ``wall_ms`` is the wall clock in Unix ms. Raises ClockRegression if it is more
        than ``max_regression_ms`` behind the latest ``wall_ms`` seen, ConfigError if it
        is not an int or before the epoch, SeqError past the 41-bit time range.
        """
        if type(wall_ms) is int:
            t = wall_ms - self._epoch_ms
            logical = self._t
            if t > logical:  # a new ms
                if t > _MAX_T:
                    raise SeqError(f"wall_ms={wall_ms} is past the 41-bit id time range")
                self._t = self._last_t = t
                self._counter = 0
                return t << _TIME_SHIFT | self._node
            if t >= self._last_t:  # the same ms (or a borrowed one), no regression
                self._last_t = t
                counter = self._counter + 1
                if counter <= _MAX_COUNTER:
                    self._counter = counter
                    return logical << _TIME_SHIFT | self._node | counter
        return self._next_slow(wall_ms)

    def _next_slow(self, wall_ms: int) -> int:
        # Same ms, a regression, or a logical clock running ahead of the wall clock.
        if type(wall_ms) is not int:
            raise ConfigError(f"wall_ms must be an int, got {wall_ms!r}")
        t = wall_ms - self._epoch_ms
        if t < 0:
            raise ConfigError(f"wall_ms={wall_ms} is before epoch_ms={self._epoch_ms}")
        if t < self._last_t - self._max_regression_ms:
            raise ClockRegression(wall_ms, self._last_t + self._epoch_ms)
        self._last_t = max(self._last_t, t)
        counter = self._counter + 1
        t = self._t
        if counter > _MAX_COUNTER:
            if t >= _MAX_T:
                raise SeqError("id time range exhausted")
            t += 1
            counter = 0
            self._t = t
        self._counter = counter
        return t << _TIME_SHIFT | self._node | counter

    def parse(self, msg_id: int) -> IdParts:
        """Split an id into (Unix ms, node, counter) with this generator's epoch. O(1)."""
        return parse_id(msg_id, epoch_ms=self._epoch_ms)

    def __repr__(self) -> str:
        return f"IdGenerator(node={self.node}, epoch_ms={self._epoch_ms})"

    def _check(self) -> None:
        """Assert the invariants. O(1)."""
        if not 0 <= self.node <= _MAX_NODE:
            raise AssertionError(f"node {self.node} out of range")
        if not -1 <= self._t <= _MAX_T:
            raise AssertionError(f"logical ms {self._t} out of range")
        if not 0 <= self._counter <= _MAX_COUNTER:
            raise AssertionError(f"counter {self._counter} out of range")
        if self._last_t > self._t:
            raise AssertionError(f"wall clock {self._last_t} ahead of logical {self._t}")
