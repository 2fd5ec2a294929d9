"""Consistent hashing: imkit.hashring beside uhashring, hashring, jump and a minimal ring.

Sections, all measured in one process with the peers side by side:

* lookups per second at 10 / 100 / 1000 nodes, 160 points per node, random IM-style
  string keys (``"user:<48-bit id>"``, every key different, so no cache helps);
* balance: max / mean keys per node over 1M keys at 100 nodes;
* movement: the share of keys that move when a 101st node joins (ideal 1/101), and
  whether ``transfers()`` lists exactly those;
* bounded loads: placing connections one by one with ``get_bounded`` (c = 1.25);
* build time and memory (bytes per ring point, via tracemalloc).

The "minimal xxh64 + bisect ring" is a forty-line reference written here to show what
plain Python reaches with a flat sorted list; imkit should beat it. ``jump.hash`` (C)
is the upper anchor: no ring at all, but buckets must be numbered 0..n-1 and only the
last one can leave.

    python benchmarks/bench_hashring.py [--quick] [--write]
"""

from __future__ import annotations

import random
import time
import tracemalloc
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial

import hashring as hashring_pkg
import jump
import uhashring
from xxhash import xxh64_intdigest

from _harness import Report, Result, measure, quick
from imkit.hashring import HashRing, jump_hash

SIZES = (10, 100, 1000)
N_LOOKUP = 30_000 if quick() else 200_000
N_BALANCE = 100_000 if quick() else 1_000_000
N_BOUNDED = 20_000 if quick() else 100_000
VNODES = 160


class MinimalRing:
    """The forty-line reference: xxh64 points in a flat sorted list, bisect, wrap."""

    def __init__(self, nodes: Sequence[str], vnodes: int = VNODES) -> None:
        pts = sorted(
            (xxh64_intdigest(f"{n}-{i}".encode()), n) for n in nodes for i in range(vnodes)
        )
        self.points = [p for p, _ in pts]
        self.owners = [n for _, n in pts]

    def get(self, key: str) -> str:
        i = bisect_left(self.points, xxh64_intdigest(key.encode()))
        return self.owners[i if i < len(self.points) else 0]


def node_names(n: int) -> list[str]:
    return [f"gw-{i:04d}.im.internal:7000" for i in range(n)]


def make_keys(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [f"user:{rng.getrandbits(48)}" for _ in range(n)]


def lookup_impls(n: int) -> dict[str, Callable[[list[str]], object]]:
    """name -> a function that looks up every key of a list once."""
    names = node_names(n)
    ring = HashRing(names)
    ketama = HashRing(names, hash="ketama")
    minimal = MinimalRing(names)
    uh = uhashring.HashRing(names)
    uk = uhashring.HashRing(names, hash_fn="ketama")
    hr = hashring_pkg.HashRing(names)
    get, kget, mget = ring.get, ketama.get, minimal.get
    uget, ukget, hget = uh.get_node, uk.get_node, hr.get_node
    jhash = jump.hash
    return {
        "imkit get (xxh64)": lambda ks: [get(k) for k in ks],
        "imkit get_many (xxh64)": ring.get_many,
        "imkit get (ketama)": lambda ks: [kget(k) for k in ks],
        "imkit get_many (ketama)": ketama.get_many,
        "minimal xxh64 + bisect ring": lambda ks: [mget(k) for k in ks],
        "uhashring": lambda ks: [uget(k) for k in ks],
        "uhashring (ketama)": lambda ks: [ukget(k) for k in ks],
        "hashring": lambda ks: [hget(k) for k in ks],
        "jump.hash (C), xxh64 of key": lambda ks: [
            jhash(xxh64_intdigest(k.encode()), n) for k in ks
        ],
        "imkit jump_hash (Python), xxh64 of key": lambda ks: [
            jump_hash(xxh64_intdigest(k.encode()), n) for k in ks
        ],
    }


def bench_lookups(report: Report) -> None:
    keys = make_keys(N_LOOKUP)
    results: dict[str, dict[int, Result]] = {}
    for n in SIZES:
        for name, fn in lookup_impls(n).items():
            results.setdefault(name, {})[n] = measure(partial(fn, keys), ops=len(keys))
    rows = []
    for name, by_n in results.items():
        row: list[object] = [name]
        for n in SIZES:
            r = by_n[n]
            row.append(f"{r.rate_str} ({r.ratio(results['uhashring'][n]):.2f}x)")
        rows.append(row)
    report.table(
        ["impl", *(f"{n} nodes" for n in SIZES)],
        rows,
        title=f"Lookups per second, {VNODES} points per node, {len(keys):,} random str keys "
        "(ratio to uhashring in parentheses)",
    )
    lines = []
    for n in SIZES:
        r, m = results["imkit get (xxh64)"][n], results["minimal xxh64 + bisect ring"][n]
        lines.append(
            f"- {n} nodes: imkit get {r.ratio(m):.2f}x the minimal ring, get_many "
            f"{results['imkit get_many (xxh64)'][n].ratio(m):.2f}x; "
            f"ns per get min/median/max {r.spread()}."
        )
    lines.append(
        "- The ketama rows pay for md5 (~300-500 ns per key): use ketama mode only to "
        "share a ring with existing ketama clients."
    )
    report.note("\n".join(lines))


def load_stats(owners: Sequence[object], n: int) -> float:
    counts = Counter(owners)
    return max(counts.values()) / (len(owners) / n)


def bench_balance_and_movement(report: Report) -> None:
    n = 100
    keys = make_keys(N_BALANCE, seed=2)
    names = node_names(n + 1)
    rows = []
    hashes = [xxh64_intdigest(k.encode()) for k in keys]

    def ring_rows(
        label: str,
        old_fn: Callable[[], Sequence[object]],
        new_fn: Callable[[], Sequence[object]],
        newcomer: object,
    ) -> None:
        before, after = old_fn(), new_fn()
        moved = [a for b, a in zip(before, after, strict=True) if a != b]
        rows.append([
            label,
            f"{load_stats(before, n):.3f}",
            f"{len(moved) / len(keys):.2%}",
            "yes" if set(moved) <= {newcomer} else "no",
        ])

    ring_old, ring_new = HashRing(names[:n]), HashRing(names)
    ring_rows("imkit (xxh64)", lambda: ring_old.get_many(keys), lambda: ring_new.get_many(keys),
              names[n])
    k_old, k_new = HashRing(names[:n], hash="ketama"), HashRing(names, hash="ketama")
    ring_rows("imkit (ketama)", lambda: k_old.get_many(keys), lambda: k_new.get_many(keys),
              names[n])
    m_old, m_new = MinimalRing(names[:n]), MinimalRing(names)
    ring_rows("minimal ring", lambda: [m_old.get(k) for k in keys],
              lambda: [m_new.get(k) for k in keys], names[n])
    u_old, u_new = uhashring.HashRing(names[:n]), uhashring.HashRing(names)
    ring_rows("uhashring", lambda: [u_old.get_node(k) for k in keys],
              lambda: [u_new.get_node(k) for k in keys], names[n])
    ring_rows("jump.hash on xxh64", lambda: [jump.hash(h, n) for h in hashes],
              lambda: [jump.hash(h, n + 1) for h in hashes], n)
    report.table(
        ["impl", f"max/mean keys per node ({n} nodes)", "keys moved when node 101 joins",
         "all moved to the newcomer"],
        rows,
        title=f"Balance and movement over {len(keys):,} keys (ideal move: {1 / (n + 1):.2%})",
    )

    # transfers(): the arcs listed must cover exactly the keys that moved.
    t0 = time.perf_counter()
    arcs = ring_old.transfers(ring_new)
    dt = time.perf_counter() - t0
    starts = [t.start for t in arcs]
    before, after = ring_old.get_many(keys), ring_new.get_many(keys)
    exact = True
    for k, b, a in zip(keys, before, after, strict=True):
        h = ring_old.hash_key(k)
        i = bisect_left(starts, h + 1) - 1
        in_arc = i >= 0 and arcs[i].covers(h)
        if in_arc != (a != b) or (in_arc and (arcs[i].source, arcs[i].target) != (b, a)):
            exact = False
            break
    share = sum(t.end - t.start for t in arcs) / 2**64
    report.note(
        f"- `transfers()` 100 -> 101 nodes: {len(arcs)} arcs covering {share:.2%} of the hash "
        f"space, computed in {dt * 1e3:.1f} ms; a key moved iff its hash lies in an arc: "
        f"{'yes' if exact else 'NO'}."
    )


def bench_bounded(report: Report) -> None:
    n = 100
    names = node_names(n)
    keys = make_keys(N_BOUNDED, seed=3)
    rows = []
    for vnodes in (10, VNODES):
        ring = HashRing(names, vnodes=vnodes)
        plain = ring.get_many(keys)

        def place(ring: HashRing = ring) -> dict[str, int]:
            loads: dict[str, int] = {}
            for k in keys:
                node = ring.get_bounded(k, loads, 1.25)
                loads[node] = loads.get(node, 0) + 1
            return loads

        r = measure(place, ops=len(keys), repeat=1 if quick() else 3)
        loads = place()
        rows.append([
            vnodes,
            f"{load_stats(plain, n):.3f}",
            f"{max(loads.values()) / (len(keys) / n):.3f}",
            r.rate_str,
        ])
    report.table(
        ["points per node", "plain get max/mean", "get_bounded c=1.25 max/mean",
         "get_bounded placements/s"],
        rows,
        title=f"Bounded loads: {len(keys):,} connections placed one by one on {n} gateways",
    )
    report.note(
        "- get_bounded sums the loads of all nodes on every call (O(n)): it is meant for "
        "placing connections, not for per-message routing."
    )


def count_points(ring: object) -> int:
    if isinstance(ring, HashRing):
        return len(ring.points())
    if isinstance(ring, MinimalRing):
        return len(ring.points)
    if isinstance(ring, uhashring.HashRing):
        return len(ring.runtime._keys)
    return len(ring._sorted_keys)  # type: ignore[attr-defined]


def build_impls() -> dict[str, Callable[[list[str]], object]]:
    def imkit(names: list[str], hash: str = "xxh64") -> object:
        ring = HashRing(names, hash=hash)
        ring.get("warm")  # the tables are built lazily, on the first lookup
        return ring

    return {
        "imkit (xxh64)": imkit,
        "imkit (ketama)": lambda names: imkit(names, "ketama"),
        "minimal xxh64 + bisect ring": MinimalRing,
        "uhashring": uhashring.HashRing,
        "uhashring (ketama)": lambda names: uhashring.HashRing(names, hash_fn="ketama"),
        "hashring": hashring_pkg.HashRing,
    }


def bench_build(report: Report) -> None:
    sizes = (10, 100) if quick() else SIZES
    rows = []
    for name, build in build_impls().items():
        row: list[object] = [name]
        for n in sizes:
            names = node_names(n)
            slow = n >= 1000
            r = measure(
                partial(build, names),
                ops=1,
                repeat=1 if quick() or slow else 3,
                warmup=0 if slow else 1,
            )
            row.append(f"{r.median * 1e3:.1f} ms")
        names = node_names(100)
        tracemalloc.start()
        obj = build(names)
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        row.append(f"{size / count_points(obj):.0f}")
        del obj
        rows.append(row)
    report.table(
        ["impl", *(f"build {n} nodes" for n in sizes), "bytes per point (100 nodes)"],
        rows,
        title="Build time and memory",
    )
    report.note(
        "- Bytes per point: memory traced while building a 100-node ring, divided by its "
        "points (hashring places 120 per node, 40 md5 digests x 3; the others 160). "
        "imkit's figure includes its bucket table (2-4 buckets per point) and the "
        "per-node point arrays."
    )


def main() -> None:
    report = Report("Consistent hashing (imkit.hashring)")
    report.note(
        "Peers: uhashring (md5; `hash_fn='ketama'`), hashring (md5 ketama-style), "
        "jump-consistent-hash (C), and a minimal xxh64 + bisect ring written for "
        "this benchmark. Keys are distinct random strings, so no caching can help."
    )
    bench_lookups(report)
    bench_balance_and_movement(report)
    bench_bounded(report)
    bench_build(report)
    report.emit(__file__)


if __name__ == "__main__":
    main()
