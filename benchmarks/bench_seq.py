"""Seq allocation and message ids: imkit.seq beside minimal references.

* SeqAllocator.next(key) against a plain dict counter (``d[k] = d.get(k, 0) + 1``),
  which is what allocation costs when nothing is persisted and nothing is bounded:
  the price of the lease check and the LRU bookkeeping. Keys: one hot conversation,
  and 10 000 conversations in random order (with max_keys large enough, and with
  max_keys at a tenth of them so that evictions and reloads happen).
* IdGenerator.next_id(now_ms) against a minimal snowflake (no validation, no clock
  regression handling), with the clock advancing 1 ms every 1000 ids.

    python benchmarks/bench_seq.py [--quick] [--write]
"""

from __future__ import annotations

import random
from collections.abc import Callable

from _harness import Report, Result, measure, quick
from imkit.seq import DEFAULT_EPOCH_MS, IdGenerator, MemoryCeilingStore, SeqAllocator

N = 200_000 if quick() else 2_000_000
ROUNDS = 3 if quick() else 5


class DictCounter:
    """Minimal reference: a counter per key in a dict, nothing persisted or bounded."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def next(self, key: str) -> int:
        counts = self.counts
        seq = counts[key] = counts.get(key, 0) + 1
        return seq


class MiniSnowflake:
    """Minimal reference: the snowflake layout with no checks at all."""

    __slots__ = ("counter", "last", "node")

    def __init__(self, node: int) -> None:
        self.node = node << 12
        self.last = -1
        self.counter = 0

    def next_id(self, now_ms: int) -> int:
        t = now_ms - DEFAULT_EPOCH_MS
        if t > self.last:
            self.last = t
            self.counter = 0
        else:
            self.counter += 1
            if self.counter > 4095:
                self.last += 1
                self.counter = 0
        return self.last << 22 | self.node | self.counter


Job = tuple[Callable[[], object], Callable[[], object]]  # (run, setup)


def interleaved(jobs: dict[str, Job], ops: int) -> dict[str, Result]:
    """Time every job once per round, round-robin, so that load drift hits all alike."""
    times: dict[str, list[float]] = {label: [] for label in jobs}
    for rnd in range(ROUNDS + 1):
        for label, (run, setup) in jobs.items():
            r = measure(run, ops=ops, setup=setup, repeat=1, warmup=0)
            if rnd:  # round 0 is the warm-up
                times[label].extend(r.times)
    return {label: Result(ops=ops, times=tuple(t)) for label, t in times.items()}


def alloc_job(factory: Callable[[], object], keys: list[str]) -> Job:
    box: list[object] = []

    def setup() -> None:
        box[:] = [factory()]

    def run() -> None:
        nxt = box[0].next  # type: ignore[attr-defined]
        for k in keys:
            nxt(k)

    return run, setup


def bench_alloc(report: Report) -> None:
    rnd = random.Random(1)
    many = [f"conv{i}" for i in range(10_000)]
    streams = {
        "1 hot key": ["room"] * N,
        "10k keys, random": [rnd.choice(many) for _ in range(N)],
    }
    rows = []
    latest: dict[str, MemoryCeilingStore] = {}  # label -> the store of its last run

    def imkit(label: str, max_keys: int) -> Callable[[], object]:
        def make() -> object:
            latest[label] = MemoryCeilingStore()
            return SeqAllocator(latest[label], max_keys=max_keys)

        return make

    for name, keys in streams.items():
        latest.clear()
        jobs: dict[str, Job] = {
            "imkit SeqAllocator (step 10000)": alloc_job(imkit("imkit", 100_000), keys),
            "dict counter (no persistence)": alloc_job(DictCounter, keys),
        }
        if name != "1 hot key":
            jobs["imkit, max_keys=1000 (evicting)"] = alloc_job(imkit("evicting", 1000), keys)
        results = interleaved(jobs, len(keys))
        base = results["dict counter (no persistence)"]
        for label, r in results.items():
            rows.append([name, label, r.rate_str, r.spread(), f"{r.ratio(base):.2f}"])
        writes = ", ".join(f"{label} {store.saves:,}" for label, store in latest.items())
        report.note(f"{name}: durable writes per run of {len(keys):,} allocations: {writes}")
    report.table(
        ["keys", "impl", "allocations/s", "ns min/med/max", "vs dict"],
        rows,
        title=f"SeqAllocator.next(): {N:,} allocations, MemoryCeilingStore",
    )


def bench_ids(report: Report) -> None:
    nows = [DEFAULT_EPOCH_MS + 10_000 + i // 1000 for i in range(N)]
    jobs: dict[str, Job] = {}
    for label, factory in (
        ("imkit IdGenerator", lambda: IdGenerator(7)),
        ("minimal snowflake", lambda: MiniSnowflake(7)),
    ):
        box: list[object] = []

        def setup(factory: Callable[[], object] = factory, box: list[object] = box) -> None:
            box[:] = [factory()]

        def run(box: list[object] = box) -> None:
            nxt = box[0].next_id  # type: ignore[attr-defined]
            for now in nows:
                nxt(now)

        jobs[label] = (run, setup)
    g = IdGenerator(7)
    ids = [g.next_id(now) for now in nows]
    assert ids == sorted(set(ids))
    results = interleaved(jobs, N)
    base = results["minimal snowflake"]
    rows = [
        [label, r.rate_str, r.spread(), f"{r.ratio(base):.2f}"] for label, r in results.items()
    ]
    report.table(
        ["impl", "ids/s", "ns min/med/max", "vs minimal"],
        rows,
        title=f"IdGenerator.next_id(): {N:,} ids, 1000 per ms",
    )


def main() -> None:
    report = Report("Seq allocation and ids (imkit.seq)")
    report.note(
        "Implementations run round-robin in the same process; ratios are against the "
        "minimal reference of the same table. The store is in memory: with a real "
        "durable store, add one write per 10 000 seqs of a conversation."
    )
    bench_alloc(report)
    bench_ids(report)
    report.emit(__file__)


if __name__ == "__main__":
    main()
