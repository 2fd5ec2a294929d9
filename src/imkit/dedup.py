"""Duplicate filters of delivery: :class:`CidWindow` upstream, :class:`SeqWindow` downstream.

An IM client retries what was not acknowledged, so every message may arrive twice.
Both ends drop the copies with a bounded window instead of a set that grows forever:

* **Upstream** the server keeps one :class:`CidWindow` per session. The client numbers
  its sends with an increasing ``cid``; a retried send that arrives again (even out of
  order, behind newer sends) is recognised and answered with the seq it already got.
  The window is the IPsec anti-replay window (RFC 4303 section 3.4.3) in the block
  layout of RFC 6479: a ring of two blocks, a block cleared at once when the highest
  cid enters it, so a check never shifts a bitmap.
* **Downstream** the client keeps one :class:`SeqWindow` per conversation. Messages
  carry the conversation's ``seq``; the window drops copies, holds messages that come
  early, releases them in seq order and lists the gaps to pull with a sync.

Neither reads a clock or does I/O (floor 1). Neither is thread-safe: each belongs to
one session or one conversation, driven by one task.

See ``docs/dedup.md`` for the algorithm, a worked example, the designs measured and
rejected, and the limits.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from functools import lru_cache
from typing import Generic, TypeVar

from imkit.errors import CapacityError, ConfigError

__all__ = [
    "DEFAULT_MAX_PENDING_SEQS",
    "DEFAULT_SIZE",
    "MAX_CID",
    "MAX_SEQ",
    "MAX_SIZE",
    "CidWindow",
    "SeqWindow",
    "Verdict",
]

T = TypeVar("T")

#: Largest cid and seq accepted: both travel as unsigned integers below 2**63 (the
#: codec rejects larger ones), so every id fits a signed 64-bit column.
MAX_CID = 2**63 - 1
MAX_SEQ = 2**63 - 1

#: Default CidWindow size, in cids. RFC 4303 asks for at least 32 and defaults to 64
#: packets; a chat client has at most a few dozen sends in flight (the gateway's
#: in-flight quota), so 1024 keeps every retry inside the window with a wide margin,
#: for 2 KiB per session (the ring holds two blocks of one byte per cid).
DEFAULT_SIZE = 1024
#: Largest CidWindow size accepted: 2**20 cids is a 2 MiB ring per session, already
#: absurd for a chat session; anything larger is a configuration mistake.
MAX_SIZE = 2**20

#: Default SeqWindow hold limit, in messages. Early arrivals come from pushes racing a
#: sync or a retry; a sync page holds 100 messages (``SyncRequest.limit``), so ten
#: pages of headroom. Past it the window refuses (CapacityError) and the caller leaves
#: the push unacknowledged and syncs later: the server still has it.
DEFAULT_MAX_PENDING_SEQS = 1024


class Verdict(enum.Enum):
    """What a window says about one cid or seq."""

    #: First time seen: recorded now; process (store, deliver) it.
    NEW = "new"
    #: Seen before: drop it (upstream: answer with the seq it already got).
    DUPLICATE = "duplicate"
    #: Older than the window: cannot be told apart from a duplicate; refuse it.
    STALE = "stale"
    #: Strict CidWindow only: the cid skips ahead of highest + 1; refused, nothing
    #: recorded; the client must send the missing cids first.
    GAP = "gap"


_NEW = Verdict.NEW
_DUPLICATE = Verdict.DUPLICATE
_STALE = Verdict.STALE
_GAP = Verdict.GAP
_NO_LOW = MAX_SEQ + 1  # SeqWindow._low when nothing is held early


def _bad_cid(cid: object) -> ConfigError:
    return ConfigError(f"cid must be an int in [1, 2**63 - 1], got {cid!r}")


def _valid_cid(cid: object) -> int:
    """Return ``cid`` if it is an int in [1, MAX_CID]; raise ConfigError otherwise."""
    if isinstance(cid, int) and 0 < cid <= MAX_CID:
        return cid
    raise _bad_cid(cid)


_INVALID = 2  # CidWindow ring byte of a cid <= 0 (see _ring_window)


@lru_cache(maxsize=32)  # one entry per power-of-two block size up to MAX_SIZE (21 sizes)
def _zeros(n: int) -> bytes:
    """A shared run of ``n`` zero bytes, to clear a ring block with one slice copy."""
    return bytes(n)


# The window's state lives in closure cells rather than instance attributes: the hot
# path then reads cells (LOAD_DEREF) instead of attributes, measured up to 9% faster per
# check (docs/dedup.md). These are the accessors the closures return.
_Check = Callable[[int], Verdict]
_State = Callable[[], tuple[int, int, bytearray]]


def _ring_window(size: int) -> tuple[_Check, _Check, _State]:
    """Build the sliding window's closures: ``check``, ``peek`` and a state snapshot.

    The ring has two blocks of ``block`` bytes (``block`` is ``size`` rounded up to a
    power of two); cid ``c`` lives in byte ``c & mask``. Invariants: every byte of a
    cid in ``(high - size, high]`` says whether it was recorded, and every byte of a
    cid in ``(high, end)`` is zero, where ``end`` is the first cid of the block after
    ``high``'s. When ``high`` moves into the next block, that block's bytes (which
    held cids two blocks back, all stale) are cleared with one slice copy.

    Until ``high`` reaches ``size``, the window also spans the invalid cids
    ``(high - size, 0]``; their bytes start as ``_INVALID`` instead of 0 (they are
    cleared, like any other, once ``high`` is past them), so the hot path needs no
    ``cid > 0`` test: only a non-zero byte is looked at twice.
    """
    block = 1 << (size - 1).bit_length()
    shift = block.bit_length() - 1
    mask = 2 * block - 1
    ring = bytearray(2 * block)
    ring[0] = _INVALID  # cid 0; cleared when high enters block 2
    ring[2 * block - size + 1 :] = bytes([_INVALID]) * (size - 1)  # cids 1 - size .. -1
    zeros = _zeros(block)
    high = 0
    end = block  # first cid of the block after high's block

    def cross(cid: int) -> None:
        # high moves to cid >= end: clear cid's block, or everything on a long jump.
        nonlocal end
        if cid > MAX_CID:
            raise _bad_cid(cid)
        b = cid >> shift
        if cid >= end + block:  # skipped a whole block: every recorded cid is stale
            ring[:block] = zeros
            ring[block:] = zeros
        else:
            start = (b & 1) << shift
            ring[start : start + block] = zeros
        end = (b + 1) << shift

    def check(cid: int) -> Verdict:
        """Classify ``cid`` and record it if NEW. O(1); O(size) once per block crossed."""
        nonlocal high
        try:
            if cid > high:
                if cid >= end:
                    cross(cid)
                ring[cid & mask] = 1
                high = cid
                return _NEW
            if cid > high - size:
                i = cid & mask
                if ring[i]:
                    if ring[i] == 1:
                        return _DUPLICATE
                    raise _bad_cid(cid)  # an _INVALID byte: cid <= 0
                ring[i] = 1
                return _NEW
        except TypeError:  # not an int: `>`, `>>` or `&` refused it before any change
            raise _bad_cid(cid) from None
        _valid_cid(cid)
        return _STALE

    def peek(cid: int) -> Verdict:
        """What ``check(cid)`` would answer, without recording anything. O(1)."""
        _valid_cid(cid)
        if cid > high:
            return _NEW
        if cid > high - size:
            return _DUPLICATE if ring[cid & mask] else _NEW
        return _STALE

    def state() -> tuple[int, int, bytearray]:
        return high, end, ring

    return check, peek, state


def _strict_window() -> tuple[_Check, _Check, _State]:
    """The seed's rule: accept only highest + 1. O(1) state: the highest cid."""
    high = 0

    def check(cid: int) -> Verdict:
        """Classify ``cid``; record it only if it is highest + 1. O(1)."""
        nonlocal high
        _valid_cid(cid)
        if cid <= high:
            return _DUPLICATE
        if cid == high + 1:
            high = cid
            return _NEW
        return _GAP

    def peek(cid: int) -> Verdict:
        """What ``check(cid)`` would answer, without recording anything. O(1)."""
        _valid_cid(cid)
        if cid <= high:
            return _DUPLICATE
        return _NEW if cid == high + 1 else _GAP

    def state() -> tuple[int, int, bytearray]:
        return high, 0, bytearray()

    return check, peek, state


class CidWindow:
    """The server's per-session upstream duplicate filter over client cids.

    ``check(cid)`` answers :class:`Verdict`:

    * ``NEW``: first time seen (recorded now): store the message;
    * ``DUPLICATE``: seen before, inside the window: answer with the same seq again;
    * ``STALE``: ``cid <= highest - size``, too old to tell apart: refuse it.

    A cid above ``highest`` is always NEW and becomes the new ``highest``; a cid in
    ``(highest - size, highest]`` is NEW exactly once, so a retried send that arrives
    behind newer ones is still accepted once. A client that jumps its cid far ahead
    only ages out its own older cids.

    ``strict=True`` is the seed's simpler rule, with O(1) state: only ``highest + 1``
    is NEW; a cid ``<= highest`` is DUPLICATE (exact: nothing below ``highest`` was
    ever skipped); a cid above ``highest + 1`` is ``GAP``: refused and not recorded,
    so the client must resend in order. ``STALE`` never occurs in strict mode.

    A cid must be an ``int`` in ``[1, 2**63 - 1]``; anything else raises
    :class:`~imkit.errors.ConfigError` (a ``ValueError``) and changes nothing.

    Memory: two blocks of one byte per cid (``size`` rounded up to a power of two),
    2 KiB at the default size, whatever the input. Not thread-safe.

    >>> w = CidWindow(8)
    >>> [w.check(c).name for c in (1, 3, 2, 3, 20, 13, 12)]
    ['NEW', 'NEW', 'NEW', 'DUPLICATE', 'NEW', 'NEW', 'STALE']
    """

    __slots__ = {
        "_size": "window size in cids",
        "_state": "state accessor (highest, end, ring) for highest and _check()",
        "_strict": "True for the seed's accept-only-highest+1 rule",
        "check": (
            "check(cid) -> Verdict: classify cid and record it if NEW. O(1); a block of"
            " the ring is cleared (one slice copy) each time highest enters a new block."
        ),
        "peek": "peek(cid) -> Verdict: what check(cid) would answer, recording nothing. O(1).",
    }

    check: _Check
    peek: _Check

    def __init__(self, size: int = DEFAULT_SIZE, *, strict: bool = False) -> None:
        """Create an empty window (``highest == 0``). O(size).

        ``size`` (1 to :data:`MAX_SIZE`) is how far behind ``highest`` a cid is still
        told apart; ignored when ``strict``.
        """
        if type(size) is not int or not 1 <= size <= MAX_SIZE:
            raise ConfigError(f"size must be an int in [1, {MAX_SIZE}], got {size!r}")
        self._size = size
        self._strict = bool(strict)
        if self._strict:
            self.check, self.peek, self._state = _strict_window()
        else:
            self.check, self.peek, self._state = _ring_window(size)

    @property
    def size(self) -> int:
        """The window size in cids. O(1)."""
        return self._size

    @property
    def strict(self) -> bool:
        """Whether the window accepts only ``highest + 1``. O(1)."""
        return self._strict

    @property
    def highest(self) -> int:
        """The largest cid recorded (0 before the first). O(1)."""
        return self._state()[0]

    def seen(self, cid: int) -> bool:
        """True if ``check(cid)`` would answer DUPLICATE. Records nothing. O(1)."""
        return self.peek(cid) is _DUPLICATE

    @property
    def _nbytes(self) -> int:
        """Bytes held by the ring: the structural memory bound (``<= 4 * size``)."""
        return len(self._state()[2])

    def __repr__(self) -> str:
        mode = ", strict=True" if self._strict else ""
        return f"CidWindow(size={self._size}{mode}, highest={self.highest})"

    def _check(self) -> None:
        """Assert the invariants (see ``_ring_window``). O(size). For tests."""
        high, end, ring = self._state()
        if not 0 <= high <= MAX_CID:
            raise AssertionError(f"highest {high} out of range")
        if self._strict:
            if ring:
                raise AssertionError("a strict window holds no ring")
            return
        block = 1 << (self._size - 1).bit_length()
        if not self._size <= block < 2 * self._size:
            raise AssertionError(f"block {block} is not size {self._size} rounded up")
        if len(ring) != 2 * block:
            raise AssertionError(f"ring of {len(ring)} bytes, expected {2 * block}")
        if end != (high // block + 1) * block:
            raise AssertionError(f"end {end} is not the block after highest {high}")
        mask = 2 * block - 1
        invalid = {c & mask for c in range(max(high - self._size + 1, 1 - self._size), 1)}
        for i, b in enumerate(ring):
            if i in invalid and b != _INVALID:
                raise AssertionError(f"byte {i} of an invalid cid in the window is {b}")
            if i not in invalid and b not in (0, 1, _INVALID):
                raise AssertionError(f"byte {i} is {b}")
        dirty = [c for c in range(high + 1, end) if ring[c & mask]]
        if dirty:
            raise AssertionError(f"cids above highest marked recorded: {dirty[:5]}")
        if high and not ring[high & mask]:
            raise AssertionError(f"highest {high} is not marked recorded")


class SeqWindow(Generic[T]):
    """The client's per-conversation downstream filter: drop copies, restore seq order.

    ``offer(seq, item)`` answers NEW (accepted once) or DUPLICATE (``seq <=
    contiguous`` or already held). A NEW message whose predecessors are all in is
    releasable at once; one that comes early (``seq > contiguous + 1``) is held until
    the gap before it closes. ``pop_ready()`` returns every releasable message in seq
    order, exactly once.

    Seqs may legitimately be missing: the allocator skips to a new block after a
    restart (see :mod:`imkit.seq`). So the window never waits for ``seq + 1`` on
    faith: ``gaps()`` lists the missing ranges, the caller pulls them with a sync,
    and ``skip_to(seq)`` records what the server said (nothing else exists up to
    ``seq``). A sync page returns every message after a seq in order, so the caller
    does ``skip_to(m.seq - 1); offer(m.seq, m)`` for each message ``m`` of a page.

    Held items (releasable or early, not yet popped) are bounded by ``max_pending``;
    an offer that would exceed it raises :class:`~imkit.errors.CapacityError` and
    records nothing, so nothing is lost: the caller leaves the push unacknowledged
    and syncs later. Early items may take at most ``max_pending - 1`` places: the
    last one is kept for ``contiguous + 1``, so the message that closes the gap is
    always accepted and a full window can drain. Call ``pop_ready()`` after offers.

    >>> w: SeqWindow[str] = SeqWindow()
    >>> [w.offer(s, f"m{s}").name for s in (1, 3, 3, 1)]
    ['NEW', 'NEW', 'DUPLICATE', 'DUPLICATE']
    >>> w.pop_ready(), w.gaps(10)
    ([(1, 'm1')], [(2, 2)])
    >>> w.skip_to(2); w.pop_ready()
    [(3, 'm3')]
    """

    __slots__ = ("_contiguous", "_early", "_low", "_max_pending", "_ready", "_top")

    def __init__(self, after: int = 0, *, max_pending: int = DEFAULT_MAX_PENDING_SEQS) -> None:
        """Start after ``after`` (the last seq the client already holds). O(1).

        ``max_pending`` (>= 1) bounds the items held and not yet popped.
        """
        if type(after) is not int or not 0 <= after <= MAX_SEQ:
            raise ConfigError(f"after must be an int in [0, 2**63 - 1], got {after!r}")
        if type(max_pending) is not int or max_pending < 1:
            raise ConfigError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self._contiguous = after
        self._max_pending = max_pending
        self._ready: list[tuple[int, T]] = []  # releasable, in seq order, <= contiguous
        self._early: dict[int, T] = {}  # held, every seq > contiguous + 1
        self._low = _NO_LOW  # <= every seq held early (a lower bound, exact after a scan)
        self._top = after  # >= every seq ever held early

    @property
    def contiguous(self) -> int:
        """The highest seq with nothing missing up to it (released or releasable). O(1)."""
        return self._contiguous

    @property
    def highest_seen(self) -> int:
        """The highest seq the window knows: contiguous or held early. O(1)."""
        return self._top if self._top > self._contiguous else self._contiguous

    @property
    def pending(self) -> int:
        """Items held and not yet popped (releasable or early). O(1)."""
        return len(self._ready) + len(self._early)

    @property
    def max_pending(self) -> int:
        """The hold limit. O(1)."""
        return self._max_pending

    def offer(self, seq: int, item: T) -> Verdict:
        """Accept ``item`` at ``seq`` once; hold it if it is early. NEW or DUPLICATE.

        O(1), plus O(1) per held item it makes releasable. Raises CapacityError
        (nothing recorded) if ``pending`` is at ``max_pending``, ConfigError if ``seq``
        is not an int in [1, 2**63 - 1].
        """
        if type(seq) is int:
            c = self._contiguous
            early = self._early
            if seq == c + 1 <= MAX_SEQ:  # in order: releasable at once
                ready = self._ready
                if len(ready) + len(early) >= self._max_pending:
                    raise self._full()
                ready.append((seq, item))
                self._contiguous = seq
                if early and seq + 1 in early:
                    self._release()
                return _NEW
            if 0 < seq <= MAX_SEQ:  # a duplicate, or early: hold it
                if seq <= c or seq in early:
                    return _DUPLICATE
                # The last slot is kept for contiguous + 1: the seq that closes the gap
                # must always fit, or a window full of early items could never drain.
                if len(self._ready) + len(early) >= self._max_pending - 1:
                    raise self._full()
                early[seq] = item
                # Plain ifs, not min()/max(): two builtin calls cost more than the rest.
                if seq < self._low:  # noqa: PLR1730
                    self._low = seq
                if seq > self._top:  # noqa: PLR1730
                    self._top = seq
                return _NEW
        elif isinstance(seq, int) and 0 < seq <= MAX_SEQ:  # an int subclass (bool)
            return self.offer(int(seq), item)
        raise ConfigError(f"seq must be an int in [1, 2**63 - 1], got {seq!r}")

    def _full(self) -> CapacityError:
        return CapacityError(
            "max_pending", self._max_pending, "pop_ready() first, or sync the rest later"
        )

    def _release(self) -> None:
        # Move the held run contiguous + 1, + 2, ... to ready, in seq order.
        c = self._contiguous
        early = self._early
        ready = self._ready
        while c + 1 in early:
            c += 1
            ready.append((c, early.pop(c)))
        self._contiguous = c
        if not early:
            self._low = _NO_LOW

    def pop_ready(self) -> list[tuple[int, T]]:
        """Return and forget every releasable ``(seq, item)``, in seq order. O(1)."""
        ready = self._ready
        if ready:
            self._ready = []
            return ready
        return []

    def skip_to(self, seq: int) -> None:
        """Declare that nothing exists up to ``seq`` beyond what was offered.

        ``contiguous`` becomes ``max(contiguous, seq)`` and then extends through any
        held run; held items at or below it become releasable (``pop_ready`` returns
        them in order). A seq offered later at or below it is a DUPLICATE, so call
        this only with what the server guarantees (a sync page lists every message
        after a seq, in order). O(1) when nothing held is at or next to ``seq`` (the
        sync-page pattern), else O(p log p) with p items pending.
        """
        if not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
            raise ConfigError(f"seq must be an int in [0, 2**63 - 1], got {seq!r}")
        if seq > self._contiguous:
            self._contiguous = int(seq)
            early = self._early
            if early and seq + 1 >= self._low:
                # Held items at or below seq are released in order, then the run after.
                ready = self._ready
                for s in sorted(s for s in early if s <= seq):
                    ready.append((s, early.pop(s)))
                self._low = min(early, default=_NO_LOW)
                self._release()

    def gaps(self, limit: int) -> list[tuple[int, int]]:
        """Missing seq ranges ``(first, last)`` (inclusive) below the highest held seq.

        At most ``limit`` (>= 1) ranges, lowest first; empty when nothing is held
        early. Some may hold no message at all (the allocator skips seqs): pull them
        with a sync and ``skip_to`` what it answers. O(p log p).
        """
        if type(limit) is not int or limit < 1:
            raise ConfigError(f"limit must be an int >= 1, got {limit!r}")
        out: list[tuple[int, int]] = []
        prev = self._contiguous
        for s in sorted(self._early):
            if s > prev + 1:
                out.append((prev + 1, s - 1))
                if len(out) >= limit:
                    break
            prev = s
        return out

    def __repr__(self) -> str:
        return (
            f"SeqWindow(contiguous={self._contiguous}, pending={self.pending}, "
            f"highest_seen={self.highest_seen})"
        )

    def _check(self) -> None:
        """Assert the invariants. O(p log p). For tests."""
        c = self._contiguous
        if not 0 <= c <= MAX_SEQ:
            raise AssertionError(f"contiguous {c} out of range")
        seqs = [s for s, _ in self._ready]
        if seqs != sorted(set(seqs)):
            raise AssertionError(f"ready not strictly increasing: {seqs}")
        if seqs and seqs[-1] > c:
            raise AssertionError(f"ready seq {seqs[-1]} above contiguous {c}")
        if any(s <= c + 1 for s in self._early):
            raise AssertionError(f"an early seq is releasable (contiguous {c})")
        if self._early and min(self._early) < self._low:
            raise AssertionError(f"_low {self._low} above a held seq")
        if self.pending > self._max_pending:
            raise AssertionError(f"{self.pending} pending > max_pending {self._max_pending}")
        if self._early and max(self._early) > self._top:
            raise AssertionError("_top below a held seq")
