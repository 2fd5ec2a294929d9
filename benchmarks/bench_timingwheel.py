"""Timers: imkit.timingwheel vs heapq with lazy deletion vs asyncio's call_later.

All three hold the same timers, measured side by side in one process:

* ``imkit wheel``: ``TimingWheel()`` with the defaults (10 ms tick, 256 buckets).
* ``heapq + lazy deletion``: the heapq documentation's recipe: entries are
  ``[deadline_ms, seq, item]`` lists, cancel overwrites the item with a marker, and
  expiry pops entries until the top is in the future, skipping marked ones.
* ``asyncio call_later``: a loop from ``asyncio.new_event_loop()`` that is never run;
  ``loop.call_later(delay_s, cb)`` and ``handle.cancel()`` as an application calls
  them, and expiry done exactly as ``BaseEventLoop._run_once`` does it (purge the heap
  when more than half of it is cancelled, pop cancelled heads, pop due handles),
  with the simulated clock in place of ``loop.time()``.

Definitions (per size N of pending timers, deadlines uniform in [0, 60 000) ms):

* schedule/s: add N timers to an empty structure.
* cancel/s: cancel all N, in random order.
* reschedule/s: move each of the N to its deadline + 30 s, in random order (the
  heartbeat case): ``handle.reschedule`` for the wheel, cancel + add for the others
  (and for the wheel too, in its own row).
* expire/s: advance the clock from 0 to 60 000 ms in 1 ms steps until all N fired.
* IM pattern, ns per timer: schedule N, cancel a random 95% of them in the order
  they were scheduled (acks return in the order the pushes went out), then advance
  from 0 to 60 000 ms in 1 ms steps (60 001 calls) collecting the 5% that fire;
  the total time of the three phases divided by N. The 60 001 advance calls are a
  fixed cost, which is why small N pay more per timer.
* bytes per pending timer: tracemalloc's traced memory after adding N timers minus
  before, over N. Deadlines, delays and the item (one shared callback) exist before
  the first reading and the list the caller keeps handles in is preallocated, so
  what is counted is what the structure allocates: handle, container slot and any
  per-timer object (the heapq entry's seq int, asyncio's per-handle context).

``--quick`` runs 10k and 100k with 3 repetitions; the full run adds 1M with
2 repetitions (about two minutes, most of it asyncio at 1M).
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import random
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "src"))

from _harness import Report, Result, measure, quick
from imkit.timingwheel import TimingWheel

SPAN_MS = 60_000
PUSH_MS = 30_000
CANCEL_FRACTION = 0.95


NOTES = """
Deadlines uniform in [0, 60 s); imkit wheel = `TimingWheel()` (10 ms tick, 256 buckets);
heapq = the heapq docs' recipe (`[deadline, seq, item]` entries, cancel marks the
entry); asyncio = `loop.call_later` / `handle.cancel()` on a loop that is not run,
expired the way `BaseEventLoop._run_once` does. schedule, cancel and reschedule
(deadline + 30 s; cancel + add for heapq and asyncio) are per timer over all N,
cancel and reschedule in random order (the cache-unfriendly case);
expire advances a simulated clock in 1 ms steps through 60 s until all N fired.
IM pattern: schedule N, cancel a random 95% in scheduling order (acks return in
send order), advance through 60 s in 1 ms steps
(60 001 calls, a fixed cost that small N pay more for per timer), total / N.
Bytes per pending timer: tracemalloc, what the structure allocates for N timers
(deadlines and the shared callback exist beforehand).
"""


def _cb() -> None:
    """The one item/callback every timer carries."""


# -- heapq with lazy deletion (the heapq docs' recipe) -------------------------------

_REMOVED = object()


class HeapTimers:
    """A heap of [deadline_ms, seq, item] entries; cancel marks the entry."""

    def __init__(self) -> None:
        self.heap: list[list[Any]] = []
        self.seq = 0

    def add(self, deadline_ms: int, item: Any) -> list[Any]:
        self.seq += 1
        entry = [deadline_ms, self.seq, item]
        heapq.heappush(self.heap, entry)
        return entry

    @staticmethod
    def cancel(entry: list[Any]) -> None:
        entry[2] = _REMOVED

    def advance(self, now_ms: int) -> list[Any]:
        heap = self.heap
        out = []
        while heap and heap[0][0] <= now_ms:
            item = heapq.heappop(heap)[2]
            if item is not _REMOVED:
                out.append(item)
        return out


# -- a minimal hashed wheel, the kind of forty-line wheel PEERS.md's reference row is ---


class MinimalTimer:
    """A timer of MinimalWheel: deadline, item and the dict it sits in."""

    __slots__ = ("deadline", "item", "slot")
    deadline: int
    item: Any
    slot: dict[MinimalTimer, None] | None

    def cancel(self) -> None:
        if self.slot is not None:
            del self.slot[self]
            self.slot = None


class MinimalWheel:
    """Single level, 1024 buckets of 10 ms, a dict per bucket; each tick scans its bucket.

    Written for this benchmark as the plain-Python baseline (Netty's hashed wheel
    without the rounds counter: a timer more than one turn away stays in its bucket
    until the turn it is due, and ticks crossed are visited one by one).
    """

    def __init__(self, tick_ms: int = 10, size: int = 1024) -> None:
        self.tick = tick_ms
        self.mask = size - 1
        self.slots: list[dict[MinimalTimer, None]] = [{} for _ in range(size)]
        self.cur = 0  # the next tick to visit

    def add(self, deadline_ms: int, item: Any) -> MinimalTimer:
        t = MinimalTimer()
        t.deadline = deadline_ms
        t.item = item
        t.slot = slot = self.slots[max(-(-deadline_ms // self.tick), self.cur) & self.mask]
        slot[t] = None
        return t

    def advance(self, now_ms: int) -> list[Any]:
        out = []
        end = now_ms // self.tick
        while self.cur <= end:
            slot = self.slots[self.cur & self.mask]
            self.cur += 1
            if slot:
                limit = self.cur * self.tick
                due = [t for t in slot if t.deadline < limit]
                for t in due:
                    del slot[t]
                    t.slot = None
                    out.append(t.item)
        return out


# -- asyncio: call_later on a loop that is not running --------------------------------


def asyncio_expire(loop: Any, end_time: float, out: list[Any]) -> None:
    """The timer half of ``BaseEventLoop._run_once`` with ``end_time`` as the clock."""
    scheduled = loop._scheduled
    n = len(scheduled)
    if n > 100 and loop._timer_cancelled_count / n > 0.5:
        new = []
        for h in scheduled:
            if h._cancelled:
                h._scheduled = False
            else:
                new.append(h)
        heapq.heapify(new)
        loop._scheduled = scheduled = new
        loop._timer_cancelled_count = 0
    else:
        while scheduled and scheduled[0]._cancelled:
            loop._timer_cancelled_count -= 1
            heapq.heappop(scheduled)._scheduled = False
    while scheduled:
        if scheduled[0]._when >= end_time:
            break
        h = heapq.heappop(scheduled)
        h._scheduled = False
        out.append(h)


# -- the operations, per implementation ------------------------------------------------


class Case:
    """The N timers of one size: deadlines, the random orders, the 95% to cancel."""

    def __init__(self, n: int, seed: int = 42) -> None:
        rng = random.Random(seed)
        self.n = n
        self.deadlines = [rng.randrange(SPAN_MS) for _ in range(n)]
        self.delays = [d / 1000 for d in self.deadlines]
        self.pushed = [d + PUSH_MS for d in self.deadlines]
        self.pushed_delays = [d / 1000 for d in self.pushed]
        self.order = list(range(n))
        rng.shuffle(self.order)
        # The acks of the IM pattern come back in the order the pushes went out.
        self.cancel_idx = sorted(self.order[: int(n * CANCEL_FRACTION)])


class Impl:
    """build / cancel / reschedule / expire for one structure."""

    name = ""

    def new(self) -> Any:
        raise NotImplementedError

    def build(self, s: Any, c: Case) -> list[Any]:
        raise NotImplementedError

    def cancel(self, s: Any, hs: list[Any], idx: list[int]) -> None:
        raise NotImplementedError

    def reschedule(self, s: Any, hs: list[Any], c: Case) -> None:
        raise NotImplementedError

    def expire(self, s: Any, until_ms: int) -> int:
        raise NotImplementedError


class Wheel(Impl):
    name = "imkit wheel"

    def new(self) -> TimingWheel[Any]:
        return TimingWheel()

    def build(self, s: TimingWheel[Any], c: Case) -> list[Any]:
        add = s.add
        return [add(d, _cb) for d in c.deadlines]

    def cancel(self, s: Any, hs: list[Any], idx: list[int]) -> None:
        for i in idx:
            hs[i].cancel()

    def reschedule(self, s: Any, hs: list[Any], c: Case) -> None:
        pushed = c.pushed
        for i in c.order:
            hs[i].reschedule(pushed[i])

    def expire(self, s: TimingWheel[Any], until_ms: int) -> int:
        advance = s.advance
        fired = 0
        for now in range(until_ms + 1):
            fired += len(advance(now))
        return fired


class WheelCancelAdd(Wheel):
    name = "imkit wheel, cancel + add"

    def reschedule(self, s: TimingWheel[Any], hs: list[Any], c: Case) -> None:
        pushed = c.pushed
        add = s.add
        for i in c.order:
            h = hs[i]
            h.cancel()
            hs[i] = add(pushed[i], h.item)


class Minimal(Impl):
    name = "minimal hashed wheel (dict per bucket)"

    def new(self) -> MinimalWheel:
        return MinimalWheel()

    def build(self, s: MinimalWheel, c: Case) -> list[Any]:
        add = s.add
        return [add(d, _cb) for d in c.deadlines]

    def cancel(self, s: Any, hs: list[Any], idx: list[int]) -> None:
        for i in idx:
            hs[i].cancel()

    def reschedule(self, s: MinimalWheel, hs: list[Any], c: Case) -> None:
        pushed = c.pushed
        add = s.add
        for i in c.order:
            h = hs[i]
            h.cancel()
            hs[i] = add(pushed[i], h.item)

    def expire(self, s: MinimalWheel, until_ms: int) -> int:
        advance = s.advance
        fired = 0
        for now in range(until_ms + 1):
            fired += len(advance(now))
        return fired


class Heap(Impl):
    name = "heapq + lazy deletion"

    def new(self) -> HeapTimers:
        return HeapTimers()

    def build(self, s: HeapTimers, c: Case) -> list[Any]:
        add = s.add
        return [add(d, _cb) for d in c.deadlines]

    def cancel(self, s: Any, hs: list[Any], idx: list[int]) -> None:
        for i in idx:
            hs[i][2] = _REMOVED

    def reschedule(self, s: HeapTimers, hs: list[Any], c: Case) -> None:
        pushed = c.pushed
        add = s.add
        for i in c.order:
            h = hs[i]
            item = h[2]
            h[2] = _REMOVED
            hs[i] = add(pushed[i], item)

    def expire(self, s: HeapTimers, until_ms: int) -> int:
        advance = s.advance
        fired = 0
        for now in range(until_ms + 1):
            fired += len(advance(now))
        return fired


class Asyncio(Impl):
    name = "asyncio call_later"

    def new(self) -> Any:
        return asyncio.new_event_loop()

    def build(self, s: Any, c: Case) -> list[Any]:
        call_later = s.call_later
        return [call_later(d, _cb) for d in c.delays]

    def cancel(self, s: Any, hs: list[Any], idx: list[int]) -> None:
        for i in idx:
            hs[i].cancel()

    def reschedule(self, s: Any, hs: list[Any], c: Case) -> None:
        pushed = c.pushed_delays
        call_later = s.call_later
        for i in c.order:
            hs[i].cancel()
            hs[i] = call_later(pushed[i], _cb)

    def expire(self, s: Any, until_ms: int) -> int:
        # call_later read loop.time() for every timer while building; starting the
        # simulated clock after the last one keeps every deadline within until_ms.
        t0 = s.time() + s._clock_resolution
        out: list[Any] = []
        for now in range(until_ms + 1):
            asyncio_expire(s, t0 + now / 1000, out)
        return len(out)


IMPLS: list[Impl] = [Wheel(), WheelCancelAdd(), Minimal(), Heap(), Asyncio()]


def close(s: Any) -> None:
    if isinstance(s, asyncio.AbstractEventLoop):
        s.close()


class Bench:
    """The measurements of one implementation on one Case."""

    def __init__(self, impl: Impl, c: Case, repeat: int, warmup: int) -> None:
        self.impl = impl
        self.c = c
        self.repeat = repeat
        self.warmup = warmup
        self.s: Any = None
        self.hs: list[Any] = []

    def fresh(self) -> None:
        if self.s is not None:
            close(self.s)
        self.s = None
        self.hs = []
        gc.collect()
        self.s = self.impl.new()

    def built(self) -> None:
        self.fresh()
        self.hs = self.impl.build(self.s, self.c)

    def timed(self, fn: Callable[[], object], setup: Callable[[], None]) -> Result:
        return measure(fn, ops=self.c.n, repeat=self.repeat, warmup=self.warmup, setup=setup)

    def schedule(self) -> None:
        self.hs = self.impl.build(self.s, self.c)

    def cancel(self) -> None:
        self.impl.cancel(self.s, self.hs, self.c.order)

    def reschedule(self) -> None:
        self.impl.reschedule(self.s, self.hs, self.c)

    def expire(self) -> None:
        fired = self.impl.expire(self.s, SPAN_MS)
        assert fired == self.c.n, (self.impl.name, fired, self.c.n)

    def im_pattern(self) -> None:
        hs = self.impl.build(self.s, self.c)
        self.impl.cancel(self.s, hs, self.c.cancel_idx)
        fired = self.impl.expire(self.s, SPAN_MS)
        assert fired == self.c.n - len(self.c.cancel_idx), (self.impl.name, fired)

    def run(self) -> dict[str, Result]:
        r: dict[str, Result] = {}
        if not isinstance(self.impl, WheelCancelAdd):
            r["schedule"] = self.timed(self.schedule, self.fresh)
            r["cancel"] = self.timed(self.cancel, self.built)
            r["expire"] = self.timed(self.expire, self.built)
            r["im"] = self.timed(self.im_pattern, self.fresh)
        r["reschedule"] = self.timed(self.reschedule, self.built)
        close(self.s)
        self.s = None
        self.hs = []
        return r


def run_size(n: int, repeat: int, warmup: int) -> dict[str, dict[str, Result]]:
    """Every measurement of every implementation at size n."""
    c = Case(n)
    return {impl.name: Bench(impl, c, repeat, warmup).run() for impl in IMPLS}


def bytes_per_timer(impl: Impl, n: int) -> float:
    """tracemalloc: memory the structure allocates for n pending timers, per timer."""
    c = Case(n)
    gc.collect()
    s = impl.new()
    hs: list[Any] = [None] * n
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    built = impl.build(s, c)
    hs[:] = built  # same length: no reallocation of hs
    del built  # the build's own list is the caller's, not the structure's
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    close(s)
    return (after - before) / n


def main() -> None:
    q = quick()
    sizes = [(10_000, 3, 1), (100_000, 3, 1)] if q else [
        (10_000, 7, 1),
        (100_000, 5, 1),
        (1_000_000, 2, 0),
    ]
    report = Report("Timers: imkit.timingwheel vs heapq and asyncio")
    report.note(NOTES)
    summary = []
    for n, repeat, warmup in sizes:
        res = run_size(n, repeat, warmup)
        rows = []
        for name, r in res.items():
            rows.append(
                [
                    name,
                    r["schedule"].rate_str if "schedule" in r else "",
                    r["cancel"].rate_str if "cancel" in r else "",
                    r["reschedule"].rate_str,
                    r["expire"].rate_str if "expire" in r else "",
                    f"{r['im'].ns_per_op:.0f}" if "im" in r else "",
                ]
            )
        report.table(
            ["impl", "schedule/s", "cancel/s", "reschedule/s", "expire/s", "IM ns/timer"],
            rows,
            title=f"{n:,} pending timers ({repeat} repetitions, median)",
        )
        w, h, a = res["imkit wheel"], res["heapq + lazy deletion"], res["asyncio call_later"]
        m = res["minimal hashed wheel (dict per bucket)"]
        wca = res["imkit wheel, cancel + add"]
        summary.append(
            [
                f"{n:,}",
                f"{w['im'].ratio(a['im']):.2f}x",
                f"{w['im'].ratio(h['im']):.2f}x",
                f"{w['im'].ratio(m['im']):.2f}x",
                f"{w['schedule'].ratio(a['schedule']):.2f}x",
                f"{w['cancel'].ratio(a['cancel']):.2f}x",
                f"{w['reschedule'].ratio(wca['reschedule']):.2f}x",
                f"{w['reschedule'].ratio(a['reschedule']):.2f}x",
                f"{w['expire'].ratio(a['expire']):.2f}x",
            ]
        )
        print(f"done {n}", file=sys.stderr, flush=True)
    report.table(
        [
            "pending",
            "IM vs asyncio",
            "IM vs heapq",
            "IM vs minimal wheel",
            "schedule vs asyncio",
            "cancel vs asyncio",
            "reschedule vs own cancel+add",
            "reschedule vs asyncio",
            "expire vs asyncio",
        ],
        summary,
        title="imkit wheel, times faster (median / median)",
    )
    mem_sizes = [100_000] if q else [100_000, 1_000_000]
    mem_rows = [
        [impl.name, *(f"{bytes_per_timer(impl, n):.1f}" for n in mem_sizes)]
        for impl in (Wheel(), Minimal(), Heap(), Asyncio())
    ]
    report.table(
        ["impl", *(f"bytes/timer at {n:,}" for n in mem_sizes)],
        mem_rows,
        title="Memory per pending timer (tracemalloc)",
    )
    report.emit(__file__)


if __name__ == "__main__":
    main()
