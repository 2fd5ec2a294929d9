"""A hierarchical timing wheel: many timers, O(1) cancel and reschedule.

An IM server keeps a timer per connection (heartbeat deadline, login deadline) and
one per unacknowledged push (retry), and almost all of them are cancelled or pushed
forward before they fire. A heap pays O(log n) per operation and keeps cancelled
entries until they surface; this wheel adds in O(m) for m levels (m is 1-3 in
practice), cancels and reschedules in O(1), and expires due timers in time
proportional to the buckets it touches, not to the ticks that elapsed.

The algorithm is Varghese & Lauck's hierarchical wheel (as in Kafka's ``TimingWheel``
and Netty's ``HashedWheelTimer``); see ``docs/timingwheel.md`` for a worked example.
Time is a tick count ``tick = ms // tick_ms``. A timer with deadline ``d`` is due at
tick ``D = ceil(d / tick_ms)``. Level ``L`` of the wheel has ``wheel_size`` buckets;
a pending timer sits at the level of the highest base-``wheel_size`` digit in which
``D`` and the current tick differ, in the bucket named by that digit of ``D``. When
the clock crosses into a bucket, that bucket *cascades*: its timers move down to
lower levels (or fire). Timers with equal ``D`` always share a bucket, which is why
timers with equal deadlines fire in the order they were added.

The wheel is sans-IO: it never reads a clock. The driver passes ``now_ms`` (from a
monotonic clock) to :meth:`TimingWheel.advance` and may sleep until
:meth:`TimingWheel.next_deadline_ms`. It is not thread-safe: drive one wheel from one
thread or one event loop.

>>> wheel: TimingWheel[str] = TimingWheel(tick_ms=10)
>>> h = wheel.add(25, "retry push 7")
>>> _ = wheel.add(60_000, "heartbeat deadline")
>>> wheel.next_deadline_ms()
30
>>> wheel.advance(29)
[]
>>> wheel.advance(30)
['retry push 7']
>>> h.pending, len(wheel)
(False, 1)
"""

from __future__ import annotations

from operator import attrgetter
from typing import Generic, TypeVar, cast

from imkit.errors import CapacityError, ConfigError, TimeWentBackwards, UsageError

__all__ = [
    "DEFAULT_MAX_PENDING_TIMERS",
    "DEFAULT_TICK_MS",
    "DEFAULT_WHEEL_SIZE",
    "MAX_DEADLINE_MS",
    "MAX_WHEEL_SIZE",
    "TimerHandle",
    "TimingWheel",
]

T = TypeVar("T")

#: 10 ms, between Kafka's purgatory (1 ms) and Netty's HashedWheelTimer default
#: (100 ms): IM timers (ack retries of 1-10 s, heartbeats of 30-300 s) need no finer
#: resolution, and a coarser tick means fewer tick crossings for the driver.
DEFAULT_TICK_MS = 10
#: 256 buckets: level 0 spans 2.56 s at 10 ms ticks, level 1 spans 11 min and level 2
#: 46 h, so IM timers use at most three levels. Power of two, indexed with a mask.
DEFAULT_WHEEL_SIZE = 256
#: 4096 buckets per level: each level keeps an occupancy bitmap as a Python int of
#: wheel_size bits, and every update copies it; past 4096 bits (512 bytes) a copy
#: costs more than the level it saves.
MAX_WHEEL_SIZE = 1 << 12
#: 8 Mi pending timers, about 600 MiB at 72 bytes each: a gateway process with ~1M
#: connections holds a heartbeat and a few unacknowledged-push timers per connection.
#: A backstop against runaway growth, not a per-peer quota (sessions bound those).
DEFAULT_MAX_PENDING_TIMERS = 1 << 23
#: The largest deadline accepted: int64 milliseconds (292 million years), the range
#: of every time field on the wire. Anything beyond it is a bug, not a timeout.
MAX_DEADLINE_MS = (1 << 63) - 1

# Level number given by the bit length of (due tick XOR current tick) when the level
# would be the topmost one the deadline limit allows: forces the slow path, which
# checks the limit exactly.
_FAR = 1 << 40


class _Node:
    """A doubly linked list node: a timer handle or the head of a bucket."""

    __slots__ = ("_next", "_prev")
    _next: _Node
    _prev: _Node


#: The "in no bucket" marker: a handle that is not pending points here both ways
#: (never None, so that a fired handle keeps no neighbour alive and types stay simple).
_DETACHED = _Node()
_DETACHED._next = _DETACHED._prev = _DETACHED


class _Bucket(_Node):
    """The head of a circular list of handles (an empty bucket points at itself).

    ``_lv`` is its level and ``_slot`` its index there (and its bit in the level's
    occupancy bitmap).
    """

    __slots__ = ("_lv", "_slot")

    def __init__(self, lv: int, slot: int) -> None:
        self._next = self._prev = self
        self._lv = lv
        self._slot = slot


class TimerHandle(_Node, Generic[T]):
    """One timer: returned by :meth:`TimingWheel.add`, owned by the caller.

    A handle is *pending* from ``add`` (or ``reschedule``) until it fires in
    :meth:`TimingWheel.advance` or is cancelled. It stays usable afterwards: read
    its fields, or :meth:`reschedule` it to arm it again without allocating.
    A handle is 72 bytes: five slots (two list links, deadline, item, wheel), no
    ``__dict__`` or ``__weakref__``; the wheel allocates nothing else per timer.
    """

    __slots__ = ("_deadline", "_item", "_wheel")
    _deadline: int
    _item: T
    _wheel: TimingWheel[T]

    def __init__(self) -> None:
        raise UsageError("timer handles are created by TimingWheel.add()")

    @property
    def pending(self) -> bool:
        """True until the timer fires or is cancelled. O(1)."""
        return self._prev is not _DETACHED

    @property
    def deadline_ms(self) -> int:
        """The deadline the timer was last added or rescheduled with. O(1)."""
        return self._deadline

    @property
    def item(self) -> T:
        """The item given to ``add``; :meth:`TimingWheel.advance` returns it. O(1)."""
        return self._item

    def cancel(self) -> bool:
        """Stop the timer; return whether it was pending. O(1), idempotent.

        >>> wheel: TimingWheel[str] = TimingWheel()
        >>> h = wheel.add(100, "x")
        >>> h.cancel(), h.cancel(), len(wheel)
        (True, False, 0)
        """
        p = self._prev
        if p is _DETACHED:
            return False
        n = self._next
        p._next = n
        n._prev = p
        self._prev = self._next = _DETACHED
        self._wheel._count -= 1
        return True

    def reschedule(self, deadline_ms: int) -> None:
        """Move the timer to ``deadline_ms``, arming it again if it fired or was cancelled.

        O(1) for deadlines within the levels already built (O(m) the first time a
        deadline needs a new level) and allocates no handle or container: this is the
        heartbeat path, where every heartbeat pushes a connection's deadline forward.
        It counts as a new ``add`` for ordering: among timers with equal deadlines it
        now fires last. On an error (bad deadline, ``max_pending`` reached when
        re-arming) the handle is left as it was.

        >>> wheel: TimingWheel[str] = TimingWheel(tick_ms=1)
        >>> h = wheel.add(30_000, "conn 42")
        >>> h.reschedule(60_000)
        >>> wheel.advance(30_000), h.pending, h.deadline_ms
        ([], True, 60000)
        """
        w = self._wheel
        try:
            if deadline_ms > w._now:
                d = (deadline_ms + w._tick_m1) // w._tick
                if d <= w._end0:
                    if deadline_ms > MAX_DEADLINE_MS:
                        raise ConfigError(f"deadline_ms={deadline_ms} > {MAX_DEADLINE_MS}")
                    b = w._buckets[d & w._mask]
                elif d <= w._end1:
                    b = w._buckets[w._size | ((d >> w._bits) & w._mask)]
                else:
                    lv = w._lvl[(d ^ w._cur).bit_length()]
                    b = w._buckets[(lv << w._bits) | ((d >> (lv * w._bits)) & w._mask)]
                if b._prev is b:
                    w._occ[b._lv] |= 1 << b._slot
            else:
                b = w._ready
                if not isinstance(deadline_ms, int):
                    raise TypeError
        except TypeError:
            raise ConfigError(f"deadline_ms must be an int, not {deadline_ms!r}") from None
        except IndexError:
            b = w._far_bucket(deadline_ms)
        p = self._prev
        if p is _DETACHED:
            if w._count >= w._max_pending:
                raise CapacityError("max_pending", w._max_pending)
            w._count += 1
        else:
            n = self._next
            p._next = n
            n._prev = p
        self._deadline = deadline_ms
        tail = b._prev
        self._prev = tail
        self._next = b
        tail._next = self
        b._prev = self

    def __repr__(self) -> str:
        state = "pending" if self.pending else "idle"
        return f"<TimerHandle deadline_ms={self._deadline} item={self._item!r} {state}>"


_new_handle = object.__new__
_by_deadline = attrgetter("_deadline")


class TimingWheel(Generic[T]):
    """Timers keyed by a deadline in ms, carrying an item of type ``T``.

    ``tick_ms`` is the resolution: a timer fires at the first :meth:`advance` whose
    ``now_ms`` reaches its deadline rounded up to a multiple of ``tick_ms`` (at most
    one tick late, never early); a timer added with a deadline at or before the
    current time fires at the next ``advance``. ``wheel_size`` (a power of two, 2 to
    :data:`MAX_WHEEL_SIZE`) is the number of buckets per level; levels are added on
    demand, so any deadline up to :data:`MAX_DEADLINE_MS` is accepted. ``start_ms``
    is the initial time (>= 0). At most ``max_pending`` timers may be pending.

    Complexity, with m levels (m = 1 + log_wheel_size((deadline - now) / tick_ms)):
    ``add`` O(m) (arithmetic and one list index, no loop), ``cancel`` and
    ``reschedule`` O(1), ``advance`` O(fired + cascaded + m) plus the sort of the
    fired timers, ``next_deadline_ms`` O(m), ``len`` O(1). Not thread-safe.
    """

    __slots__ = (
        "_bits",
        "_buckets",
        "_count",
        "_cur",
        "_end0",
        "_end1",
        "_lvl",
        "_mask",
        "_max_pending",
        "_next_ms",
        "_now",
        "_occ",
        "_ready",
        "_size",
        "_size2",
        "_tick",
        "_tick_m1",
        "_top",
    )

    def __init__(
        self,
        *,
        tick_ms: int = DEFAULT_TICK_MS,
        wheel_size: int = DEFAULT_WHEEL_SIZE,
        start_ms: int = 0,
        max_pending: int = DEFAULT_MAX_PENDING_TIMERS,
    ) -> None:
        """Build an empty wheel with one level. O(wheel_size).

        Raises :class:`~imkit.errors.ConfigError` for a ``tick_ms`` below 1, a
        ``wheel_size`` that is not a power of two in [2, MAX_WHEEL_SIZE], a
        ``start_ms`` outside [0, MAX_DEADLINE_MS] or a ``max_pending`` below 1.
        """
        for name, value in (
            ("tick_ms", tick_ms),
            ("wheel_size", wheel_size),
            ("start_ms", start_ms),
            ("max_pending", max_pending),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be an int, not {value!r}")
        if tick_ms < 1:
            raise ConfigError(f"tick_ms must be >= 1, not {tick_ms}")
        if not 2 <= wheel_size <= MAX_WHEEL_SIZE or wheel_size & (wheel_size - 1):
            raise ConfigError(
                f"wheel_size must be a power of two in [2, {MAX_WHEEL_SIZE}], not {wheel_size}"
            )
        if not 0 <= start_ms <= MAX_DEADLINE_MS:
            raise ConfigError(f"start_ms must be in [0, {MAX_DEADLINE_MS}], not {start_ms}")
        if max_pending < 1:
            raise ConfigError(f"max_pending must be >= 1, not {max_pending}")
        self._tick = tick_ms
        self._size = wheel_size
        self._mask = wheel_size - 1
        self._bits = bits = wheel_size.bit_length() - 1
        self._max_pending = max_pending
        self._now = start_ms
        self._cur = start_ms // tick_ms
        # The next time advance() must do more than store now_ms (capped so that a
        # now_ms past the limit always takes the path that rejects it).
        self._next_ms = min((self._cur + 1) * tick_ms, MAX_DEADLINE_MS + 1)
        self._count = 0
        # Ticks are < 2**maxbl for every deadline <= MAX_DEADLINE_MS, and so is
        # (due tick XOR current tick); it names the level through this table.
        maxbl = (-(-MAX_DEADLINE_MS // tick_ms)).bit_length()
        self._top = (maxbl - 1) // bits
        self._lvl = [0] + [
            lv if lv < self._top else _FAR
            for lv in ((bl - 1) // bits for bl in range(1, maxbl + 1))
        ]
        # Buckets of all levels in one flat list: level L, slot s is at (L << bits) | s.
        self._buckets: list[_Bucket] = [_Bucket(0, s) for s in range(wheel_size)]
        # Per level, an occupancy bitmap: above the current tick's digit on that level,
        # bit s is set if bucket s may be non-empty (set when a timer enters an empty
        # bucket, cleared lazily); at and below the digit the bits mean nothing (those
        # buckets are empty), so passing a bucket costs no bitmap write.
        self._occ: list[int] = [0]
        # add() looks up level 1 without a bit length when the limit allows level 2.
        self._size2 = wheel_size * wheel_size if self._top > 1 else 0
        self._tick_m1 = tick_ms - 1
        self._set_ends()
        # Timers added with a deadline at or before now: due at the next advance.
        self._ready = _Bucket(-1, -1)

    def _set_ends(self) -> None:
        """The last tick of the current level-0 and level-1 blocks (add's fast paths)."""
        self._end0 = self._cur | self._mask
        self._end1 = self._cur | (self._size2 - 1) if self._size2 else -1

    # -- properties ------------------------------------------------------------------

    @property
    def now_ms(self) -> int:
        """The last time given to :meth:`advance` (or ``start_ms``). O(1)."""
        return self._now

    @property
    def tick_ms(self) -> int:
        """The resolution in ms. O(1)."""
        return self._tick

    @property
    def wheel_size(self) -> int:
        """Buckets per level. O(1)."""
        return self._size

    @property
    def levels(self) -> int:
        """Levels built so far (they are added on demand, never removed). O(1)."""
        return len(self._occ)

    @property
    def max_pending(self) -> int:
        """The limit on pending timers. O(1)."""
        return self._max_pending

    def __len__(self) -> int:
        """The number of pending timers. O(1)."""
        return self._count

    def __repr__(self) -> str:
        return (
            f"<TimingWheel now_ms={self._now} pending={self._count} tick_ms={self._tick} "
            f"wheel_size={self._size} levels={len(self._occ)}>"
        )

    # -- adding ------------------------------------------------------------------------

    def add(self, deadline_ms: int, item: T) -> TimerHandle[T]:
        """Arm a timer for ``deadline_ms`` carrying ``item``; return its handle.

        O(m) for m levels: a ceiling division, a comparison or two (levels 0 and 1;
        a XOR and a bit length beyond), a list index and four pointer writes, plus
        building a level, once, the first time a deadline needs it. A deadline at
        or before :attr:`now_ms` fires at the next :meth:`advance`. Raises
        :class:`~imkit.errors.ConfigError` for a deadline that is not an int or
        exceeds :data:`MAX_DEADLINE_MS`, and
        :class:`~imkit.errors.CapacityError` when ``max_pending`` timers are pending.

        >>> wheel: TimingWheel[str] = TimingWheel(tick_ms=10, start_ms=1000)
        >>> h = wheel.add(1500, "ack timeout")
        >>> h.pending, h.deadline_ms, h.item, len(wheel)
        (True, 1500, 'ack timeout', 1)
        """
        if self._count >= self._max_pending:
            raise CapacityError("max_pending", self._max_pending)
        try:
            if deadline_ms > self._now:
                d = (deadline_ms + self._tick_m1) // self._tick
                if d <= self._end0:
                    if deadline_ms > MAX_DEADLINE_MS:
                        raise ConfigError(f"deadline_ms={deadline_ms} > {MAX_DEADLINE_MS}")
                    b = self._buckets[d & self._mask]
                elif d <= self._end1:
                    b = self._buckets[self._size | ((d >> self._bits) & self._mask)]
                else:
                    lv = self._lvl[(d ^ self._cur).bit_length()]
                    b = self._buckets[(lv << self._bits) | ((d >> (lv * self._bits)) & self._mask)]
                tail = b._prev
                if tail is b:
                    self._occ[b._lv] |= 1 << b._slot
            else:
                b = self._ready
                tail = b._prev
                if not isinstance(deadline_ms, int):
                    raise TypeError
        except TypeError:
            raise ConfigError(f"deadline_ms must be an int, not {deadline_ms!r}") from None
        except IndexError:
            b = self._far_bucket(deadline_ms)
            tail = b._prev
        h: TimerHandle[T] = _new_handle(TimerHandle)
        h._deadline = deadline_ms
        h._item = item
        h._wheel = self
        h._prev = tail
        h._next = b
        tail._next = h
        b._prev = h
        self._count += 1
        return h

    def _far_bucket(self, deadline_ms: int) -> _Bucket:
        """The bucket for a deadline on a level not built yet or on the top level.

        Checks the deadline limit, builds the missing levels and marks the bucket
        occupied. O(levels added * wheel_size), once per level.
        """
        if deadline_ms > MAX_DEADLINE_MS:
            raise ConfigError(f"deadline_ms={deadline_ms} > {MAX_DEADLINE_MS}")
        d = -(-deadline_ms // self._tick)
        lv = ((d ^ self._cur).bit_length() - 1) // self._bits
        while len(self._occ) <= lv:
            new_lv = len(self._occ)
            self._buckets.extend(_Bucket(new_lv, s) for s in range(self._size))
            self._occ.append(0)
        b = self._buckets[(lv << self._bits) | ((d >> (lv * self._bits)) & self._mask)]
        self._occ[lv] |= 1 << b._slot
        return b

    # -- expiring ----------------------------------------------------------------------

    def advance(self, now_ms: int) -> list[T]:
        """Move the clock to ``now_ms`` and return the items of the timers now due.

        A timer is due once ``now_ms`` reaches its deadline rounded up to a multiple
        of ``tick_ms`` (or, if it was added with a deadline at or before the time
        then current, at this call). Items come in deadline order, ties in the order
        of ``add`` / ``reschedule``. Cost: O(1) when no tick boundary is crossed;
        otherwise O(m + buckets fired + timers fired + timers cascaded) plus the
        sort of the fired timers; never proportional to the ticks elapsed, so one
        call may jump over a long idle gap. Raises
        :class:`~imkit.errors.TimeWentBackwards` if ``now_ms`` is smaller than the
        current time, and :class:`~imkit.errors.ConfigError` if it is not an int or
        exceeds :data:`MAX_DEADLINE_MS`.

        >>> wheel: TimingWheel[str] = TimingWheel(tick_ms=10)
        >>> for d, name in ((21, "b"), (12, "a"), (21, "c"), (400_000, "z")):
        ...     _ = wheel.add(d, name)
        >>> wheel.advance(15), wheel.advance(20), wheel.advance(10**9)
        ([], ['a'], ['b', 'c', 'z'])
        """
        if type(now_ms) is not int and not isinstance(now_ms, int):
            raise ConfigError(f"now_ms must be an int, not {now_ms!r}")
        r = self._ready
        if now_ms < self._next_ms:
            # Within the current tick: only overdue adds can be due.
            if now_ms < self._now:
                raise TimeWentBackwards(now_ms, self._now)
            self._now = now_ms
            if r._next is r:
                return []
            fired: list[_Node] = []
            _drain(r, fired)
            return self._finish(fired)
        new = now_ms // self._tick
        if new != self._cur + 1 or not new & self._mask or now_ms > MAX_DEADLINE_MS:
            return self._advance_ticks(now_ms, new)
        # One tick forward, no carry into level 1: only the level-0 bucket just
        # entered can be due (the driver that steps tick by tick lives here).
        self._now = now_ms
        self._cur = new
        nxt = (new + 1) * self._tick
        self._next_ms = nxt if nxt <= MAX_DEADLINE_MS else MAX_DEADLINE_MS + 1
        b = self._buckets[new & self._mask]
        if b._next is b:
            if r._next is r:
                return []
            fired = []
        else:
            fired = []
            _drain(b, fired)
        if r._next is not r:
            _drain(r, fired)
        return self._finish(fired)

    def _advance_ticks(self, now_ms: int, new: int) -> list[T]:
        """``advance`` to tick ``new`` across more than one tick boundary (or a carry)."""
        if now_ms > MAX_DEADLINE_MS:
            raise ConfigError(f"now_ms={now_ms} > {MAX_DEADLINE_MS}")
        tick = self._tick
        bits = self._bits
        mask = self._mask
        buckets = self._buckets
        occ = self._occ
        old = self._cur
        self._now = now_ms
        self._cur = new
        self._next_ms = min((new + 1) * tick, MAX_DEADLINE_MS + 1)
        self._set_ends()
        fired: list[_Node] = []
        # hi: the highest level whose digit of the tick changes. Every timer on a
        # level below it is due; on level hi the buckets passed over are due and the
        # bucket now entered cascades; levels above it do not move.
        hi = ((old ^ new).bit_length() - 1) // bits
        nlev = len(occ)
        for lv in range(min(hi, nlev)):
            # Only bits above the old digit mean something.
            o = occ[lv] & -(2 << ((old >> (lv * bits)) & mask))
            occ[lv] = 0
            if o:
                base = lv << bits
                while o:
                    low = o & -o
                    o ^= low
                    _drain(buckets[base + low.bit_length() - 1], fired)
        if hi < nlev:
            sh = hi * bits
            o = occ[hi]
            od = (old >> sh) & mask
            nd = (new >> sh) & mask
            # Buckets strictly between the old and the new digit are due; on level 0
            # the bucket entered holds a single tick, so it is due too. The bits at
            # and below the new digit now mean nothing: no write back.
            due = o & (((2 << nd) if hi == 0 else (1 << nd)) - (2 << od))
            base = hi << bits
            while due:
                low = due & -due
                due ^= low
                _drain(buckets[base + low.bit_length() - 1], fired)
            if hi and (o >> nd) & 1:
                self._cascade(buckets[base + nd], new, fired)
        r = self._ready
        if r._next is not r:
            _drain(r, fired)
        if not fired:
            return []
        return self._finish(fired)

    def _cascade(self, b: _Bucket, new: int, fired: list[_Node]) -> None:
        """Empty bucket ``b``: due timers into ``fired``, the rest to lower levels.

        The timers keep their order: each is appended to its new bucket, and timers
        with equal due ticks all come from ``b``, so ties stay in insertion order.
        """
        tick, size, bits, mask = self._tick, self._size, self._bits, self._mask
        buckets, occ = self._buckets, self._occ
        n = b._next
        b._next = b._prev = b
        while n is not b:
            nxt = n._next
            d = -(-n._deadline // tick)  # type: ignore[attr-defined]
            if d <= new:
                n._prev = n._next = _DETACHED
                fired.append(n)
            else:
                x = d ^ new
                if x < size:
                    t = buckets[d & mask]
                else:
                    lv = (x.bit_length() - 1) // bits
                    t = buckets[(lv << bits) | ((d >> (lv * bits)) & mask)]
                tail = t._prev
                if tail is t:
                    occ[t._lv] |= 1 << t._slot
                n._prev = tail
                n._next = t
                tail._next = n
                t._prev = n
            n = nxt

    def _finish(self, fired: list[_Node]) -> list[T]:
        """Count, order (deadline, then insertion: the sort is stable) and unwrap."""
        self._count -= len(fired)
        if len(fired) == 1:
            return [fired[0]._item]  # type: ignore[attr-defined]
        fired.sort(key=_by_deadline)
        return [h._item for h in fired]  # type: ignore[attr-defined]

    def next_deadline_ms(self) -> int | None:
        """The earliest time at which :meth:`advance` may return something, or None.

        ``now_ms`` if a timer is overdue; else, for the first non-empty bucket, its
        tick boundary: exact (the earliest deadline rounded up to a tick) when that
        bucket is on level 0, and the start of the bucket (earlier) on higher
        levels, where advancing to it cascades the bucket and the next call is
        tighter. Never later than the earliest due time, so a driver may sleep until
        then. None when no timer is pending. O(m) (plus stale bits it clears).

        >>> wheel: TimingWheel[str] = TimingWheel(tick_ms=10, wheel_size=4)
        >>> _ = wheel.add(95, "x")
        >>> wheel.next_deadline_ms(), wheel.advance(80), wheel.next_deadline_ms()
        (80, [], 100)
        """
        r = self._ready
        if r._next is not r:
            return self._now
        if not self._count:
            return None
        bits = self._bits
        buckets = self._buckets
        occ = self._occ
        cur = self._cur
        for lv in range(len(occ)):
            sh = lv * bits
            first = ((cur >> sh) & self._mask) + 1  # bits below this mean nothing
            o = occ[lv] >> first
            while o:
                low = o & -o
                s = first + low.bit_length() - 1
                b = buckets[(lv << bits) | s]
                if b._next is b:  # emptied by cancel: clear the stale bit
                    o ^= low
                    occ[lv] ^= low << first
                    continue
                start = ((cur >> (sh + bits)) << (sh + bits)) | (s << sh)
                return start * self._tick
        return None  # pragma: no cover - _count > 0 means some bucket is non-empty

    # -- invariants --------------------------------------------------------------------

    def _check(self) -> None:
        """Assert every invariant; raise AssertionError naming the broken one. O(n)."""

        def fail(msg: str) -> None:
            raise AssertionError(f"TimingWheel invariant: {msg}")

        tick, bits, mask = self._tick, self._bits, self._mask
        if self._size != 1 << bits or mask != self._size - 1:
            fail("wheel_size, bits and mask disagree")
        if self._cur != self._now // tick or self._next_ms != min(
            (self._cur + 1) * tick, MAX_DEADLINE_MS + 1
        ):
            fail(f"current tick {self._cur} / next boundary {self._next_ms} vs now {self._now}")
        if (self._end0, self._end1) != (
            self._cur | mask,
            self._cur | (self._size2 - 1) if self._size2 else -1,
        ):
            fail("the level-0/level-1 block ends are stale")
        if len(self._buckets) != len(self._occ) << bits:
            fail("bucket list length is not levels * wheel_size")
        if len(self._occ) > self._top + 1:
            fail("more levels than the deadline limit needs")
        if not 0 <= self._count <= self._max_pending:
            fail(f"count {self._count} outside [0, max_pending]")
        if _DETACHED._next is not _DETACHED or _DETACHED._prev is not _DETACHED:
            fail("the detached marker was linked into a list")
        seen: set[int] = set()

        def walk(b: _Bucket, where: str) -> list[TimerHandle[T]]:
            out: list[TimerHandle[T]] = []
            p: _Node = b
            n = b._next
            while n is not b:
                if len(out) > self._count:
                    fail(f"{where}: more timers than len() (a cycle?)")
                if not isinstance(n, TimerHandle):
                    fail(f"{where}: a non-handle node in the list")
                h = cast("TimerHandle[T]", n)
                if h._prev is not p:
                    fail(f"{where}: broken back link")
                if h._wheel is not self:
                    fail(f"{where}: a handle of another wheel")
                if id(h) in seen:
                    fail(f"{where}: a handle in two places")
                seen.add(id(h))
                out.append(h)
                p, n = n, n._next
            if b._prev is not p:
                fail(f"{where}: head's back link is not the last node")
            return out

        total = 0
        for lv, o in enumerate(self._occ):
            if o >> self._size:
                fail(f"level {lv}: occupancy bits beyond wheel_size")
            digit = (self._cur >> (lv * bits)) & mask
            for s in range(self._size):
                b = self._buckets[(lv << bits) | s]
                if (b._lv, b._slot) != (lv, s):
                    fail(f"level {lv} slot {s}: bucket labelled {b._lv}/{b._slot}")
                handles = walk(b, f"level {lv} slot {s}")
                if handles and not (o >> s) & 1:
                    fail(f"level {lv} slot {s}: non-empty bucket without its bit")
                if handles and s <= digit:
                    fail(f"level {lv} slot {s}: non-empty at or below the current digit")
                for h in handles:
                    d = -(-h._deadline // tick)
                    if d <= self._cur:
                        fail(f"{h!r} is overdue but still in the wheel")
                    x = d ^ self._cur
                    want_lv = (x.bit_length() - 1) // bits
                    want_s = (d >> (want_lv * bits)) & mask
                    if (want_lv, want_s) != (lv, s):
                        fail(f"{h!r} at level {lv} slot {s}, belongs at {want_lv}/{want_s}")
                total += len(handles)
        for h in walk(self._ready, "ready list"):
            if h._deadline > self._now:
                fail(f"{h!r} in the ready list but its deadline is after now {self._now}")
            total += 1
        if total != self._count:
            fail(f"{total} linked timers, len() says {self._count}")


def _drain(b: _Bucket, out: list[_Node]) -> None:
    """Move every handle of bucket ``b`` to ``out`` in list order and detach it."""
    n = b._next
    b._next = b._prev = b
    append = out.append
    while n is not b:
        nxt = n._next
        n._prev = n._next = _DETACHED
        append(n)
        n = nxt
