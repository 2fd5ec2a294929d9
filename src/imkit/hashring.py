"""Consistent hashing for routing users to gateways: a ring, bounded loads, jump hash.

An IM deployment shards its long connections by user: ipconf tells a client which
gateway to connect to, and the logic servers must find that gateway again when a
message arrives. Both compute ``ring.get(uid)`` on the same :class:`HashRing`, so
no lookup service is needed, and when a gateway joins or leaves only the users on
the arcs that change owner have to reconnect (:meth:`HashRing.transfers`).

The ring
    Every node places ``weight * vnodes`` *points* on a circle of ``2**64`` positions
    (``2**32`` in ketama mode): point ``i`` of node ``"gw1"`` sits at
    ``xxh64("gw1-i")``. A key is hashed onto the same circle and belongs to the first
    point at or after its hash, wrapping past the top to the lowest point. Adding a
    node moves only the keys that fall just before its new points: about
    ``1/(n+1)`` of them.

Ties
    Two points at the same position (a hash collision) are ordered by node name,
    so the smallest name owns the position. The ring is thus a function of its
    node set alone, never of the order the nodes were added in.

Keys
    ``str`` keys hash as their UTF-8 bytes, ``bytes`` as themselves and ``int``
    keys as their decimal ASCII digits: ``get(42) == get("42")``, which is what a
    service written in another language gets by hashing the uid as text, and what
    the Python ketama clients do. ``bool`` is refused (``True`` is ambiguous).

Lookups run in O(1) expected time: a table of ``2**b`` buckets (``b`` chosen so
that there are 2-4 buckets per point) gives, for most buckets, the owner directly,
and otherwise the few points to bisect. Mutations only record the change; the next
lookup hashes any new points and rebuilds the tables in O(P log P) for P points, so
building a ring by calling :meth:`HashRing.add` in a loop costs one rebuild, not one
per node.

Not thread-safe: mutate and look up from one thread (or one event loop).
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from hashlib import md5
from itertools import accumulate, repeat
from operator import itemgetter
from struct import Struct
from types import MappingProxyType
from typing import Any, Final, TypeAlias

import attrs
from xxhash import xxh64_intdigest

from imkit.errors import CapacityError, ConfigError, EmptyRingError, NodeNotFoundError

__all__ = [
    "DEFAULT_BALANCE",
    "DEFAULT_MAX_POINTS",
    "DEFAULT_VNODES",
    "HashRing",
    "Key",
    "Transfer",
    "jump_hash",
]

Key: TypeAlias = str | bytes | int
"""What the ring accepts as a key: ``str`` (UTF-8), ``bytes``, or ``int`` (decimal digits)."""

# libketama places 40 md5 digests x 4 points per server of average weight; uhashring
# and most Python rings default to the same 160. At 160 points the busiest of 100
# nodes holds about 1.2x the mean load (see docs/benchmarks.md).
DEFAULT_VNODES: Final = 160

# 2**20 points: 6,553 nodes at 160 points, about 60 MB of tables. Past this size a
# lookup is bound by memory latency and a rebuild takes seconds; a deployment that
# large wants a two-level scheme (region, then gateway), not a bigger ring.
DEFAULT_MAX_POINTS: Final = 1 << 20

# The balance factor c of "Consistent Hashing with Bounded Loads" (Mirrokni, Thorup,
# Zadimoghaddam 2018): no node takes more than ceil(c * average). 1.25 is what
# Vimeo deployed in HAProxy (hash-balance-factor 125) and brpc's default; the paper
# bounds the keys moved per change by O(1/(c-1)**2), so smaller c costs stability.
DEFAULT_BALANCE: Final = 1.25

_MASK64: Final = (1 << 64) - 1
_JUMP_MULT: Final = 2862933555777941757
_INT32_MAX: Final = (1 << 31) - 1
# At most 2**22 buckets: 2-4 buckets per point up to DEFAULT_MAX_POINTS points.
_MAX_TABLE_BITS: Final = 22

_ketama_u32 = Struct("<I").unpack_from
_ketama_4u32 = Struct("<4I").unpack_from


# --- hash functions ---------------------------------------------------------------


def _xxh64_points(node: str, start: int, stop: int) -> list[int]:
    """Points ``start..stop-1`` of ``node``: ``xxh64(f"{node}-{i}")``, one per index."""
    return [xxh64_intdigest(f"{node}-{i}".encode()) for i in range(start, stop)]


def _ketama_key(data: bytes) -> int:
    """libketama's key hash: the first four bytes of md5, little-endian."""
    return int(_ketama_u32(md5(data).digest())[0])


def _ketama_points(node: str, start: int, stop: int) -> list[int]:
    """Digests ``start..stop-1`` of ``node``: four little-endian u32 of ``md5(f"{node}-{i}")``."""
    out: list[int] = []
    for i in range(start, stop):
        out.extend(_ketama_4u32(md5(f"{node}-{i}".encode()).digest()))
    return out


@attrs.frozen
class _HashSpec:
    """How a ring hashes keys and places node points.

    ``points(node, start, stop)`` returns ``per_index`` points for each index in
    ``start..stop-1``; a node of weight ``w`` uses indexes ``0..count-1``. With
    ``relative`` (ketama) the count depends on the node's share of the total weight.
    """

    name: str
    bits: int
    key_hash: Callable[[bytes], int]
    points: Callable[[str, int, int], list[int]]
    per_index: int
    relative: bool


_HASHES: dict[str, _HashSpec] = {
    "xxh64": _HashSpec("xxh64", 64, xxh64_intdigest, _xxh64_points, 1, False),
    "ketama": _HashSpec("ketama", 32, _ketama_key, _ketama_points, 4, True),
}


def _key_bytes(key: object) -> bytes:
    """The bytes a key hashes as (the slow, checked path of every lookup)."""
    if isinstance(key, str):
        try:
            return key.encode()
        except UnicodeEncodeError:
            raise ConfigError(f"key {key!r} is not encodable as UTF-8") from None
    if isinstance(key, bytes):
        return key
    if isinstance(key, bytearray | memoryview):
        return bytes(key)
    if isinstance(key, int) and not isinstance(key, bool):
        return b"%d" % key
    raise ConfigError(f"a key must be str, bytes or int, not {type(key).__name__}")


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


# --- migration ------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Transfer:
    """An arc of the hash space whose owner changes between two rings.

    Keys whose hash ``h`` (:meth:`HashRing.hash_key`) satisfies ``start <= h < end``
    belong to ``source`` on the old ring and to ``target`` on the new one.
    """

    source: str
    target: str
    start: int
    end: int

    def covers(self, h: int) -> bool:
        """True if hash ``h`` lies in this arc. O(1)."""
        return self.start <= h < self.end


# --- the ring -----------------------------------------------------------------------


class HashRing:
    """A consistent-hash ring of named nodes with weights (see the module docstring).

    ``nodes`` is an iterable of names or a mapping name -> weight. ``vnodes`` is the
    number of points per unit of weight. ``hash`` is ``"xxh64"`` (default, fast) or
    ``"ketama"`` (libketama-compatible md5 placement, for sharing a ring with existing
    ketama clients; ``vnodes`` must then be a multiple of 4). ``max_points`` caps the
    total number of points (in ketama mode, ``vnodes * len(ring)``, the most the
    relative counts can add up to, since removing a node can raise the others').

    Building from ``n`` nodes is O(P log P) for P points, paid by the first lookup.

    >>> ring = HashRing(["gw1", "gw2", "gw3"])
    >>> ring.get("alice") in ring
    True
    >>> len(ring), ring.nodes["gw2"]
    (3, 1)
    """

    __slots__ = (
        "_counts",
        "_direct",
        "_dirty",
        "_key_hash",
        "_max_points",
        "_node_points",
        "_owners",
        "_placed",
        "_points",
        "_shift",
        "_spec",
        "_starts",
        "_total_points",
        "_vnodes",
        "_weights",
    )

    def __init__(
        self,
        nodes: Iterable[str] | Mapping[str, int] = (),
        *,
        vnodes: int = DEFAULT_VNODES,
        hash: str = "xxh64",
        max_points: int = DEFAULT_MAX_POINTS,
    ) -> None:
        spec = _HASHES.get(hash) if isinstance(hash, str) else None
        if spec is None:
            names = ", ".join(sorted(_HASHES))
            raise ConfigError(f"unknown hash {hash!r}; expected one of {names}")
        self._spec = spec
        self._key_hash = spec.key_hash
        self._vnodes = _check_int("vnodes", vnodes, 1)
        if vnodes % spec.per_index:
            raise ConfigError(
                f"vnodes must be a multiple of {spec.per_index} with hash={hash!r}, got {vnodes}"
            )
        self._max_points = _check_int("max_points", max_points, 1)
        self._weights: dict[str, int] = {}
        self._node_points: dict[str, array[int]] = {}  # generated points, maybe more than used
        self._counts: dict[str, int] = {}  # points in use per node (set by _rebuild)
        self._total_points = 0
        self._placed: tuple[str, ...] = ()  # nodes holding at least one point
        self._points: array[int] = array("Q")  # sorted positions, ties by owner name
        self._owners: list[str] = []  # owner of each point, plus owners[0] again at the end
        self._starts: array[int] = array("I")  # first point index of each bucket, then P
        self._direct: list[str | None] = []  # owner of a bucket holding no point, else None
        self._shift = 0
        self._dirty = True
        if isinstance(nodes, str | bytes):
            raise ConfigError("nodes must be an iterable of names or a mapping, not one name")
        if isinstance(nodes, Mapping):
            for name, weight in nodes.items():
                self.add(name, weight)
        else:
            for name in nodes:
                self.add(name)

    # --- container protocol ---------------------------------------------------------

    def __len__(self) -> int:
        """Number of nodes. O(1)."""
        return len(self._weights)

    def __contains__(self, node: object) -> bool:
        """True if ``node`` is on the ring. O(1)."""
        return node in self._weights

    def __repr__(self) -> str:
        return (
            f"HashRing({dict(self._weights)!r}, vnodes={self._vnodes}, "
            f"hash={self._spec.name!r})"
        )

    @property
    def nodes(self) -> Mapping[str, int]:
        """A live read-only view: node name -> weight, in insertion order. O(1)."""
        return MappingProxyType(self._weights)

    @property
    def vnodes(self) -> int:
        """Points per unit of weight."""
        return self._vnodes

    @property
    def hash_name(self) -> str:
        """The hash this ring was built with (``"xxh64"`` or ``"ketama"``)."""
        return self._spec.name

    @property
    def hash_bits(self) -> int:
        """Positions on the ring are ``0 <= h < 2**hash_bits`` (64, or 32 for ketama)."""
        return self._spec.bits

    # --- mutation ---------------------------------------------------------------------

    def add(self, node: str, weight: int = 1) -> None:
        """Add ``node`` with ``weight`` (or change the weight of a node already present).

        O(1) (O(n) in ketama mode); the next lookup hashes the new points, O(weight *
        vnodes), and rebuilds the tables. Changing a weight keeps the node's first
        points, so only the difference moves. Raises :class:`ConfigError` for a
        non-str name or a weight < 1, and :class:`CapacityError` if the ring would
        exceed ``max_points``.
        """
        if not isinstance(node, str):
            raise ConfigError(f"a node name must be a str, not {type(node).__name__}")
        _check_int("weight", weight, 1)
        old = self._weights.get(node)
        if old == weight:
            return
        if self._spec.relative:
            # ketama counts are relative, so removing a node can raise the others'
            # counts: cap their ceiling, vnodes per node, which never grows on removal.
            weights = dict(self._weights)
            weights[node] = weight
            total = sum(self._point_counts(weights).values())
            need = self._vnodes * len(weights)
        else:
            total = need = self._total_points + (weight - (old or 0)) * self._vnodes
        if need > self._max_points:
            raise CapacityError("max_points", self._max_points, f"adding {node!r} needs {need}")
        self._weights[node] = weight
        self._total_points = total
        self._invalidate()

    def remove(self, node: str) -> None:
        """Remove ``node``; raise :class:`NodeNotFoundError` (a ``KeyError``) if absent.

        O(1); the next lookup rebuilds the tables in O(P log P).
        """
        if node not in self._weights:
            raise NodeNotFoundError(node)
        self.discard(node)

    def discard(self, node: str) -> None:
        """Remove ``node`` if present; do nothing otherwise. O(1), as :meth:`remove`."""
        weight = self._weights.pop(node, None)
        if weight is None:
            return
        self._node_points.pop(node, None)
        if self._spec.relative:
            self._total_points = sum(self._point_counts(self._weights).values())
        else:
            self._total_points -= weight * self._vnodes
        self._invalidate()

    def _invalidate(self) -> None:
        # An empty bucket table makes the next fast lookup raise IndexError, whose
        # handler rebuilds: the hot path never tests a dirty flag.
        self._dirty = True
        self._direct = []

    def _point_counts(self, weights: Mapping[str, int]) -> dict[str, int]:
        """Points per node for these weights (ketama: relative to the mean weight)."""
        spec = self._spec
        per_node = self._vnodes // spec.per_index
        if not spec.relative:
            return {name: per_node * w * spec.per_index for name, w in weights.items()}
        # uhashring's integer form of libketama's floorf(w / W * 40 * n).
        n, total = len(weights), sum(weights.values())
        return {name: per_node * n * w // total * spec.per_index for name, w in weights.items()}

    def _ensure(self) -> None:
        if self._dirty:
            self._rebuild()

    def _rebuild(self) -> None:
        """Recompute the sorted points and the bucket tables. O(P log P)."""
        spec = self._spec
        counts = self._point_counts(self._weights)
        pairs: list[tuple[int, str]] = []
        placed: list[str] = []
        for name, count in counts.items():
            pts = self._node_points.get(name)
            if pts is None:
                pts = self._node_points[name] = array("Q")
            if len(pts) < count:
                have = len(pts) // spec.per_index
                pts.extend(spec.points(name, have, count // spec.per_index))
            elif not spec.relative and len(pts) > count:
                del pts[count:]  # a lowered weight: drop the points it no longer uses
            used = pts[:count]
            if used:
                placed.append(name)
            pairs.extend(zip(used, repeat(name)))
        pairs.sort()  # by position, then by node name: the tie-break rule
        points = array("Q", map(itemgetter(0), pairs))
        owners = list(map(itemgetter(1), pairs))
        n_points = len(points)
        if n_points:
            owners.append(owners[0])  # a hash past the last point wraps to the first
        bits = min((n_points - 1).bit_length() + 1 if n_points else 0, spec.bits, _MAX_TABLE_BITS)
        shift = spec.bits - bits
        n_buckets = 1 << bits if n_points else 0
        sizes = [0] * n_buckets
        for p in points:
            sizes[p >> shift] += 1
        starts = array("I", [0])
        starts.extend(accumulate(sizes))
        self._counts = counts
        self._placed = tuple(placed)
        self._points = points
        self._owners = owners
        self._starts = starts
        self._shift = shift
        self._direct = [None if size else owners[s] for size, s in zip(sizes, starts, strict=False)]
        self._dirty = False

    # --- lookups ------------------------------------------------------------------------

    def hash_key(self, key: Key) -> int:
        """The key's position on the ring, ``0 <= h < 2**hash_bits``. O(len(key))."""
        return self._key_hash(_key_bytes(key))

    def get(self, key: Key) -> str:
        """The node owning ``key``: the first point at or after its hash. O(1) expected.

        Raises :class:`EmptyRingError` on an empty ring, :class:`ConfigError` for a
        key that is not str, bytes or int.
        """
        k: Any = key
        try:
            c = k.__class__
            if c is str:
                k = k.encode()
            elif c is int:
                k = b"%d" % k
            elif c is not bytes:
                k = _key_bytes(k)
            h = self._key_hash(k)
            b = h >> self._shift
            o = self._direct[b]  # IndexError when dirty or empty
            if o is None:
                st = self._starts
                o = self._owners[bisect_left(self._points, h, st[b], st[b + 1])]
            return o
        except (IndexError, UnicodeEncodeError):
            return self._lookup(self._key_hash(_key_bytes(key)))

    def get_many(self, keys: Iterable[Key]) -> list[str]:
        """``[get(k) for k in keys]``, faster: the batch path. O(len(keys)) expected."""
        self._ensure()
        if not self._placed:
            raise EmptyRingError
        key_hash, shift, direct = self._key_hash, self._shift, self._direct
        owners, points, starts = self._owners, self._points, self._starts
        out: list[str] = []
        append = out.append
        any_keys: Iterable[Any] = keys
        try:
            for k in any_keys:
                c = k.__class__
                if c is str:
                    kb = k.encode()
                elif c is int:
                    kb = b"%d" % k
                elif c is bytes:
                    kb = k
                else:
                    kb = _key_bytes(k)
                h = key_hash(kb)
                b = h >> shift
                o = direct[b]
                if o is None:
                    o = owners[bisect_left(points, h, starts[b], starts[b + 1])]
                append(o)
        except UnicodeEncodeError as exc:
            raise ConfigError(f"key {exc.object!r} is not encodable as UTF-8") from None
        return out

    def _lookup(self, h: int) -> str:
        """The owner of position ``h`` (checked path)."""
        self._ensure()
        if not self._placed:
            raise EmptyRingError
        b = h >> self._shift
        o = self._direct[b]
        if o is None:
            st = self._starts
            o = self._owners[bisect_left(self._points, h, st[b], st[b + 1])]
        return o

    def _index(self, key: Key) -> int:
        """Index of the first point at or after the key's hash (after wrapping)."""
        h = self._key_hash(_key_bytes(key))
        self._ensure()
        if not self._placed:
            raise EmptyRingError
        i = bisect_left(self._points, h)
        return 0 if i == len(self._points) else i

    def get_n(self, key: Key, n: int) -> list[str]:
        """The first ``n`` distinct nodes clockwise from ``key``: owner, then failovers.

        ``get_n(key, 1) == [get(key)]``. If ``n`` exceeds the number of nodes, all
        nodes are returned (those that hold points), in ring order. O(log P + n)
        expected for n much smaller than the node count, O(P) worst case.
        """
        _check_int("n", n, 0)
        i = self._index(key)
        owners, n_points = self._owners, len(self._points)
        want = min(n, len(self._placed))
        out: list[str] = []
        if not want:
            return out
        seen: set[str] = set()
        for _ in range(n_points):  # at most one lap
            o = owners[i]
            if o not in seen:
                seen.add(o)
                out.append(o)
                if len(out) == want:
                    break
            i += 1
            if i == n_points:
                i = 0
        return out

    def capacity(self, loads: Mapping[str, int], c: float = DEFAULT_BALANCE) -> int:
        """The bounded-load cap: ``ceil(c * (total + 1) / n)``, computed exactly.

        ``n`` counts the nodes holding points, ``total`` sums their loads (a node
        missing from ``loads`` has load 0; entries for other names are ignored).
        ``c`` is taken as the exact binary value of the float. O(n).
        """
        self._ensure()
        if not self._placed:
            raise EmptyRingError
        if not isinstance(c, int | float) or isinstance(c, bool) or not c >= 1 or math.isinf(c):
            raise ConfigError(f"the balance factor c must be a finite number >= 1, got {c!r}")
        total = 0
        for node in self._placed:
            load = loads.get(node, 0)
            if not isinstance(load, int) or isinstance(load, bool) or load < 0:
                raise ConfigError(f"load of {node!r} must be an int >= 0, got {load!r}")
            total += load
        num, den = float(c).as_integer_ratio()
        return -(-num * (total + 1) // (den * len(self._placed)))

    def get_bounded(
        self, key: Key, loads: Mapping[str, int], c: float = DEFAULT_BALANCE
    ) -> str:
        """The first node clockwise from ``key`` whose load is below :meth:`capacity`.

        Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam): with
        ``capacity = ceil(c * (total + 1) / n)``, placing a key on the returned node
        leaves every node at or under the cap. Such a node always exists for c >= 1.
        The caller updates ``loads`` after placing. O(n) for the cap plus a walk
        whose expected length depends only on c (longer as c approaches 1).
        """
        cap = self.capacity(loads, c)
        i = self._index(key)
        owners, n_points = self._owners, len(self._points)
        get = loads.get
        for _ in range(n_points):  # at most one lap
            o = owners[i]
            if get(o, 0) < cap:
                return o
            i += 1
            if i == n_points:
                i = 0
        raise AssertionError("no node under capacity: a bug in HashRing")  # pragma: no cover

    def points(self) -> list[tuple[int, str]]:
        """The whole continuum: ``(position, owner)`` sorted, ties by owner name. O(P)."""
        self._ensure()
        return list(zip(self._points, self._owners, strict=False))  # drop the sentinel

    # --- migration ------------------------------------------------------------------------

    def transfers(self, other: HashRing) -> list[Transfer]:
        """The arcs whose owner differs between this ring (before) and ``other`` (after).

        A key moves from ``t.source`` to ``t.target`` exactly when ``t.covers(h)`` for
        ``h = hash_key(key)`` and some returned ``t``. Arcs are half-open
        ``[start, end)``, sorted by ``start``, non-overlapping, never wrapping (the arc
        across the top of the ring is split at 0), and adjacent arcs with the same
        source and target are merged. Both rings must use the same hash and hold
        points. O(P + Q) for P and Q points after the rebuilds.
        """
        if not isinstance(other, HashRing):
            raise ConfigError(f"transfers() needs a HashRing, not {type(other).__name__}")
        if other._spec is not self._spec:
            raise ConfigError(
                f"rings hash differently ({self._spec.name} vs {other._spec.name})"
            )
        self._ensure()
        other._ensure()
        if not self._placed or not other._placed:
            raise EmptyRingError
        a_pts, a_own = self._points, self._owners
        b_pts, b_own = other._points, other._owners
        na, nb = len(a_pts), len(b_pts)
        out: list[Transfer] = []
        i = j = 0
        start = 0
        # Walk the union of both rings' positions; each boundary p closes the arc
        # (previous boundary, p], owned on each ring by the first point >= p.
        while i < na or j < nb:
            p = a_pts[i] if i < na else b_pts[j]
            if j < nb and b_pts[j] < p:
                p = b_pts[j]
            src, dst = a_own[i], b_own[j]  # index na / nb is the wrap sentinel
            if src != dst:
                _append_arc(out, src, dst, start, p + 1)
            start = p + 1
            while i < na and a_pts[i] == p:
                i += 1
            while j < nb and b_pts[j] == p:
                j += 1
        top = 1 << self._spec.bits
        if start < top and a_own[0] != b_own[0]:  # past the last point: wraps to the first
            _append_arc(out, a_own[0], b_own[0], start, top)
        return out

    # --- invariants -------------------------------------------------------------------

    def _check(self) -> None:
        """Assert every invariant of the ring (tests call this after each step). O(P log P)."""
        spec = self._spec
        for name, weight in self._weights.items():
            if not isinstance(name, str):
                raise AssertionError(f"node name {name!r} is not a str")
            if not isinstance(weight, int) or weight < 1:
                raise AssertionError(f"node {name!r} has weight {weight!r}")
        counts = self._point_counts(self._weights)
        if sum(counts.values()) != self._total_points:
            raise AssertionError(f"total points {self._total_points} != {sum(counts.values())}")
        ceiling = self._vnodes * len(self._weights) if spec.relative else self._total_points
        if self._total_points > ceiling or ceiling > self._max_points:
            raise AssertionError(f"{self._total_points} points exceed max_points")
        if set(self._node_points) - set(self._weights):
            raise AssertionError("points cached for a node that left")
        if self._dirty:
            if self._direct:
                raise AssertionError("a dirty ring must have an empty bucket table")
            self._rebuild()
        if self._counts != counts:
            raise AssertionError(f"point counts {self._counts} != {counts}")
        expected: list[tuple[int, str]] = []
        for name, count in counts.items():
            fresh = spec.points(name, 0, count // spec.per_index)
            if list(self._node_points.get(name, array("Q"))[:count]) != fresh:
                raise AssertionError(f"cached points of {name!r} differ from their hashes")
            expected.extend((p, name) for p in fresh)
        expected.sort()
        points, owners = self._points, self._owners
        if list(zip(points, owners, strict=False)) != expected:
            raise AssertionError("the continuum is not the sorted points of the nodes")
        if points and points[-1] >> spec.bits:
            raise AssertionError("a point lies outside the hash space")
        n_points = len(points)
        if len(owners) != n_points + (1 if n_points else 0):
            raise AssertionError("owners must have one entry per point plus the wrap sentinel")
        if n_points and owners[-1] != owners[0]:
            raise AssertionError("the wrap sentinel must repeat the first owner")
        if set(self._placed) != {name for name, count in counts.items() if count}:
            raise AssertionError("placed nodes differ from the nodes holding points")
        if not n_points:
            if self._direct or len(self._starts) != 1:
                raise AssertionError("an empty ring must have empty tables")
            return
        n_buckets = len(self._direct)
        bits = min((n_points - 1).bit_length() + 1, spec.bits, _MAX_TABLE_BITS)
        if n_buckets != 1 << bits or self._shift != spec.bits - bits:
            raise AssertionError(f"{n_buckets} buckets, shift {self._shift} for {n_points} points")
        if len(self._starts) != n_buckets + 1 or self._starts[-1] != n_points:
            raise AssertionError("starts must have one entry per bucket plus the end")
        for b in range(n_buckets):
            s = self._starts[b]
            if s != bisect_left(points, b << self._shift):
                raise AssertionError(f"bucket {b} starts at {s}")
            want = owners[s] if s == self._starts[b + 1] else None
            if self._direct[b] != want:
                raise AssertionError(f"bucket {b} direct owner {self._direct[b]!r} != {want!r}")


def _append_arc(out: list[Transfer], source: str, target: str, start: int, end: int) -> None:
    """Append an arc, merging it into the previous one when they touch and agree."""
    if out:
        last = out[-1]
        if last.end == start and last.source == source and last.target == target:
            out[-1] = Transfer(source=source, target=target, start=last.start, end=end)
            return
    out.append(Transfer(source=source, target=target, start=start, end=end))


# --- jump hash ------------------------------------------------------------------------


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash (Lamping & Veach 2014): the bucket in ``range(buckets)`` of ``key``.

    Bit-exact with the published C++ (64-bit LCG 2862933555777941757, double
    arithmetic). ``key`` is an int in ``[-2**63, 2**64)``, taken modulo ``2**64``
    as the C ``uint64_t``; ``buckets`` is in ``[1, 2**31 - 1]``. Growing ``buckets``
    by one moves ``1/buckets`` of keys, all to the new bucket; only the last bucket
    can be removed. O(log buckets) expected.

    >>> [jump_hash(k, 10) for k in range(5)]
    [0, 6, 6, 8, 1]
    """
    if not isinstance(key, int) or isinstance(key, bool):
        raise ConfigError(f"jump_hash key must be an int, not {type(key).__name__}")
    if not -(1 << 63) <= key <= _MASK64:
        raise ConfigError(f"jump_hash key must be in [-2**63, 2**64), got {key}")
    _check_int("buckets", buckets, 1)
    if buckets > _INT32_MAX:
        raise ConfigError(f"buckets must be <= 2**31 - 1, got {buckets}")
    key &= _MASK64
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * _JUMP_MULT + 1) & _MASK64
        j = int((b + 1) * (2147483648.0 / ((key >> 33) + 1)))
    return b
