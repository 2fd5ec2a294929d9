"""Ring balance at 1,000 nodes (docs/scaling.md): ``python -m benchmarks.ring_balance``.

Hashes 2,000,000 user ids onto 1,000 gateways with :class:`imkit.hashring.HashRing`
at several virtual-node counts and with :func:`imkit.hashring.jump_hash`, and prints
the most and least loaded node relative to the mean, and the standard deviation.
"""

from __future__ import annotations

import collections
import statistics

import xxhash

from imkit.hashring import DEFAULT_VNODES, HashRing, jump_hash

NODES = 1_000
KEYS = 2_000_000


def spread(loads: list[int]) -> str:
    """max/mean, min/mean and stdev/mean of ``loads``."""
    mean = KEYS / NODES
    return (
        f"max/mean {max(loads) / mean:.3f}, min/mean {min(loads) / mean:.3f}, "
        f"stdev/mean {statistics.pstdev(loads) / mean:.3f}"
    )


def main() -> None:
    """Print one line per placement scheme."""
    keys = [f"user{i}" for i in range(KEYS)]
    names = [f"gw-{i}" for i in range(NODES)]
    for vnodes in sorted({40, DEFAULT_VNODES, 400}):
        ring = HashRing(names, vnodes=vnodes)
        counts = collections.Counter(ring.get_many(keys))
        print(f"HashRing vnodes={vnodes}: {spread([counts[n] for n in names])}")
    jumps = collections.Counter(jump_hash(xxhash.xxh64_intdigest(k.encode()), NODES) for k in keys)
    print(f"jump_hash: {spread([jumps[i] for i in range(NODES)])}")


if __name__ == "__main__":
    main()
