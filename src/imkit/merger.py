"""Huge groups: cap concurrent pushes per group, merge a window of messages, fall back
to notify-and-pull, and aggregate pull signals per user.

The seed's 超大群 section (read:write 9999:1, one message to a 10k group is 10k
deliveries) lists four measures; this module implements them as two sans-IO
structures driven by ``now_ms``:

- 并发控制 (per-group concurrency): :class:`MessageMerger` lets at most
  ``max_inflight`` pushes (fan-outs) of one group be in flight.
- 消息合并 (merging): once the limit is reached, messages queue per group and are
  released as *one* batch when the group's window closes (``window_ms`` after the
  first queued message) or the batch is full (``max_batch`` messages or
  ``max_batch_bytes``). The caller encodes a batch as one ``PushBatch`` frame; the
  protocol layer lz4-compresses frames above its ``compress_threshold``. The merger
  itself never compresses (it only sees sizes), so it stays codec-agnostic.
- 推拉结合 (push-pull): a group whose queue would pass ``max_queued`` (or all
  groups past ``max_total``) switches to notify-and-pull: its queued messages are
  released from memory -- they are already in the store -- and one
  :attr:`ReleaseKind.NOTIFY` release tells members "sync up to seq N". Nothing is
  silently dropped: every offered message is either pushed exactly once or covered
  by a later NOTIFY whose ``last_seq`` is >= its seq.
- 信令聚合 (signal aggregation): :class:`SignalAggregator` collapses the pull
  signals for one user arriving within ``window_ms`` into one signal carrying the
  newest seq per conversation.

Messages are opaque to the merger: the caller passes each message's ``seq``
(increasing per group) and its encoded ``size`` in bytes. Every release (a push,
a batch or a notify) occupies one in-flight slot of its group until the caller
reports it finished with :meth:`MessageMerger.done`.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Generic, TypeAlias, TypeVar

import attrs

from imkit.errors import CapacityError, ConfigError, TimeWentBackwards

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MAX_CONVS",
    "DEFAULT_MAX_GROUPS",
    "DEFAULT_MAX_INFLIGHT",
    "DEFAULT_MAX_QUEUED_PER_GROUP",
    "DEFAULT_MAX_SIGNAL_USERS",
    "DEFAULT_MAX_TOTAL",
    "DEFAULT_MERGE_WINDOW_MS",
    "DEFAULT_SIGNAL_WINDOW_MS",
    "MessageMerger",
    "Release",
    "ReleaseKind",
    "Signal",
    "SignalAggregator",
]

M = TypeVar("M")

#: Fan-outs of one group in flight at once. A push to a group is published once
#: per gateway and then fans out to every member; 4 keeps the pipeline busy across
#: a bus round trip while a hot group holds at most 4 x members deliveries in
#: flight (the seed: 按群维度限制最大并发数).
DEFAULT_MAX_INFLIGHT = 4
#: How long the first queued message of a congested group waits for company. 100 ms
#: is below what a reader perceives as a delay in a busy group; at 100 msgs/s into a
#: 10k group it merges ~5 messages per push and cuts member pushes ~5x
#: (benchmarks/bench_merger.py).
DEFAULT_MERGE_WINDOW_MS = 100
#: Messages per batch. lz4 on a batch of 100 chat messages compresses to ~0.49 of
#: its size (docs/benchmarks.md, protocol section); larger batches gain little compression and
#: delay the whole batch on a slow link.
DEFAULT_MAX_BATCH = 100
#: Bytes per batch (sum of the message sizes given to offer). Half the protocol's
#: 64 KiB frame cap, leaving room for per-push fields and CBOR overhead.
DEFAULT_MAX_BATCH_BYTES = 32 * 1024
#: Messages queued per group before it switches to notify-and-pull: 10 full
#: batches. Past that, members fetching pages by sync is cheaper than pushing.
DEFAULT_MAX_QUEUED_PER_GROUP = 1_000
#: Messages queued over all groups: 100 groups at max_queued, ~10-30 MB with
#: chat-sized bodies. The group that would pass it switches to notify-and-pull.
DEFAULT_MAX_TOTAL = 100_000
#: Groups with pushes in flight or messages queued. A logic process serves far
#: fewer simultaneously hot groups; the limit catches a caller that never calls done().
DEFAULT_MAX_GROUPS = 100_000

#: Window of the signal aggregator: as for merging, below a perceptible delay.
DEFAULT_SIGNAL_WINDOW_MS = 100
#: Users with a signal pending: the online users of one logic process.
DEFAULT_MAX_SIGNAL_USERS = 100_000
#: Conversations per pending signal. An entry is ~27 bytes of CBOR (a 20-byte
#: conversation id and a seq), so 32 keep a Notify frame under the seed's
#: 1400-byte packet limit.
DEFAULT_MAX_CONVS = 32

_NEVER = -(2**63)
_NONE = -1  # "no notify pending" (seqs are >= 0)


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")


class ReleaseKind(enum.Enum):
    """What the caller must do with a :class:`Release`."""

    #: Push ``messages`` to the group's members: one message as a Push, several as
    #: one PushBatch (compressed by the protocol layer above its threshold).
    PUSH = "push"
    #: The group overflowed: send members a pull signal (``Notify(conv, last_seq)``)
    #: instead; they sync the messages from the store.
    NOTIFY = "notify"


_PUSH = ReleaseKind.PUSH  # module constants: an enum attribute lookup costs ~100 ns
_NOTIFY = ReleaseKind.NOTIFY


@attrs.frozen(kw_only=True)
class Release(Generic[M]):
    """One push (or pull signal) to send to a whole group; occupies one in-flight slot.

    ``first_seq``..``last_seq`` is the seq range it covers (for a PUSH, the seqs of
    its first and last message; for a NOTIFY, the seqs of the oldest and newest
    message it replaces). ``size`` is the sum of the messages' sizes (0 for NOTIFY).
    """

    group: str
    kind: ReleaseKind
    messages: tuple[M, ...]
    first_seq: int
    last_seq: int
    size: int


class _Group(Generic[M]):
    """Per-group state (internal)."""

    __slots__ = ("inflight", "last_seq", "notify_first", "notify_last", "qbytes", "queue", "ready")

    def __init__(self) -> None:
        self.inflight = 0
        self.queue: deque[tuple[int, M, int]] = deque()  # (seq, message, size)
        self.qbytes = 0
        self.ready = False  # the window of the queued messages has closed
        self.last_seq = _NONE
        self.notify_first = _NONE
        self.notify_last = _NONE


class MessageMerger(Generic[M]):
    """Per-group concurrency limit, window merging, and overflow to notify-and-pull.

    Drive it with :meth:`offer` for every new message of a huge group,
    :meth:`done` when a release has been fanned out, and :meth:`due` at
    :meth:`next_deadline_ms`. Each returns the releases to send now, in order;
    releases of one group come out in seq order.

    Rules, per group:

    1. Nothing queued and a slot free: the message is released at once, alone.
    2. Otherwise it is queued. The first queued message opens a window that closes
       ``window_ms`` later (:meth:`due`); messages arriving meanwhile join it.
    3. A queue is released, as batches of up to ``max_batch`` messages /
       ``max_batch_bytes`` (always at least one message), while a slot is free and
       either its window has closed or it holds a full batch. After its window has
       closed the queue drains at the pace of :meth:`done` until it is empty.
    4. A queue about to pass ``max_queued`` (or all queues ``max_total``) is
       dropped from memory and replaced by one NOTIFY covering it; messages
       offered while that NOTIFY waits for a slot extend it. The NOTIFY goes out
       as soon as a slot is free.

    Guarantee (tested): after ``due(now_ms)`` returns, no group with a free slot
    still holds a message queued at or before ``now_ms - window_ms``.

    Not thread-safe; one event loop owns it.
    """

    __slots__ = (
        "_groups",
        "_now",
        "_total",
        "_windows",
        "max_batch",
        "max_batch_bytes",
        "max_groups",
        "max_inflight",
        "max_queued",
        "max_total",
        "window_ms",
    )

    def __init__(
        self,
        *,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        window_ms: int = DEFAULT_MERGE_WINDOW_MS,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_queued: int = DEFAULT_MAX_QUEUED_PER_GROUP,
        max_total: int = DEFAULT_MAX_TOTAL,
        max_groups: int = DEFAULT_MAX_GROUPS,
    ) -> None:
        """Create an empty merger. O(1)."""
        _check_int("max_inflight", max_inflight, 1)
        _check_int("window_ms", window_ms, 0)
        _check_int("max_batch", max_batch, 1)
        _check_int("max_batch_bytes", max_batch_bytes, 1)
        _check_int("max_queued", max_queued, 1)
        _check_int("max_total", max_total, 1)
        _check_int("max_groups", max_groups, 1)
        self.max_inflight = max_inflight
        self.window_ms = window_ms
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.max_queued = max_queued
        self.max_total = max_total
        self.max_groups = max_groups
        self._groups: dict[str, _Group[M]] = {}
        # group -> window close time, for groups whose window is open. Windows
        # open at now_ms (monotonic) and all last window_ms, so insertion order is
        # deadline order: an exact FIFO, O(1) per operation.
        self._windows: OrderedDict[str, int] = OrderedDict()
        self._total = 0
        self._now = _NEVER

    def _tick(self, now_ms: int) -> None:
        if now_ms < self._now:
            raise TimeWentBackwards(now_ms, self._now)
        self._now = now_ms

    def offer(self, group: str, seq: int, message: M, size: int, now_ms: int) -> list[Release[M]]:
        """A new message (already stored, numbered ``seq``) for ``group``.

        Returns the releases to send now: the message itself if the group is idle
        enough, a full batch, a NOTIFY on overflow, or nothing (queued). Raises
        ``ConfigError`` if ``seq`` is not above the group's previous seq or
        ``size``/``seq`` is negative, ``CapacityError`` if a new group would pass
        ``max_groups``. Amortized O(1) (O(b) when a batch of b is released).
        """
        if now_ms < self._now:
            raise TimeWentBackwards(now_ms, self._now)
        self._now = now_ms
        if type(seq) is not int or seq < 0:
            raise ConfigError(f"seq must be an int >= 0, got {seq!r}")
        if type(size) is not int or size < 0:
            raise ConfigError(f"size must be an int >= 0, got {size!r}")
        g = self._groups.get(group)
        if g is None:
            if len(self._groups) >= self.max_groups:
                raise CapacityError("max_groups", self.max_groups)
            g = self._groups[group] = _Group()
        elif seq <= g.last_seq:
            raise ConfigError(f"seq {seq} is not above the group's last seq {g.last_seq}")
        g.last_seq = seq
        if g.notify_last != _NONE:  # a NOTIFY waits for a slot: it covers this one too
            g.notify_last = seq
            return []
        queue = g.queue
        if not queue:
            if g.inflight < self.max_inflight:
                g.inflight += 1
                return [Release(group=group, kind=_PUSH, messages=(message,),
                                first_seq=seq, last_seq=seq, size=size)]
            self._windows[group] = now_ms + self.window_ms
        elif not g.ready:
            deadline = self._windows[group]
            if deadline <= now_ms:  # closed, due() not called yet
                del self._windows[group]
                g.ready = True
        if len(queue) >= self.max_queued or self._total >= self.max_total:
            g.notify_first = queue[0][0] if queue else seq
            g.notify_last = seq
            self._total -= len(queue)
            queue.clear()
            g.qbytes = 0
            g.ready = False
            self._windows.pop(group, None)
        else:
            queue.append((seq, message, size))
            g.qbytes += size
            self._total += 1
        return self._release(group, g)

    def _release(self, group: str, g: _Group[M]) -> list[Release[M]]:
        """Release what group ``g`` may send now (rule 3 and 4)."""
        out: list[Release[M]] = []
        queue = g.queue
        max_batch = self.max_batch
        max_bytes = self.max_batch_bytes
        while g.inflight < self.max_inflight:
            if g.notify_last != _NONE:
                out.append(Release(group=group, kind=_NOTIFY, messages=(),
                                   first_seq=g.notify_first, last_seq=g.notify_last, size=0))
                g.notify_first = g.notify_last = _NONE
                g.inflight += 1
                continue
            if not queue or not (g.ready or len(queue) >= max_batch or g.qbytes >= max_bytes):
                break
            first_seq, msg, nbytes = queue.popleft()
            messages = [msg]
            last_seq = first_seq
            while queue and len(messages) < max_batch and nbytes + queue[0][2] <= max_bytes:
                last_seq, msg, size = queue.popleft()
                messages.append(msg)
                nbytes += size
            g.qbytes -= nbytes
            self._total -= len(messages)
            g.inflight += 1
            out.append(Release(group=group, kind=_PUSH, messages=tuple(messages),
                               first_seq=first_seq, last_seq=last_seq, size=nbytes))
        if not queue and (g.ready or group in self._windows):
            g.ready = False
            self._windows.pop(group, None)
        return out

    def done(self, group: str) -> list[Release[M]]:
        """One release of ``group`` has been sent (fanned out); free its slot.

        Returns what the freed slot lets out now (a NOTIFY, a ready or full batch).
        Raises ``ConfigError`` if ``group`` has no release in flight. O(1), or
        O(b) when a batch of b is released.
        """
        g = self._groups.get(group)
        if g is None or g.inflight == 0:
            raise ConfigError(f"done() for group {group!r} with no release in flight")
        g.inflight -= 1
        if g.queue or g.notify_last != _NONE:
            return self._release(group, g)
        if g.inflight == 0:
            del self._groups[group]
        return []

    def due(self, now_ms: int) -> list[Release[M]]:
        """Close the windows that end at or before ``now_ms`` and release what slots allow.

        A group whose window closed while all its slots are busy is released by
        later :meth:`done` calls. O(w + b) for w windows closed, b messages released.
        """
        self._tick(now_ms)
        out: list[Release[M]] = []
        windows = self._windows
        groups = self._groups
        while windows:
            group, deadline = next(iter(windows.items()))
            if deadline > now_ms:
                break
            windows.popitem(last=False)
            g = groups[group]
            g.ready = True
            out.extend(self._release(group, g))
        return out

    def next_deadline_ms(self) -> int | None:
        """When the next window closes (``None`` if no window is open). O(1)."""
        for deadline in self._windows.values():
            return deadline
        return None

    def inflight(self, group: str) -> int:
        """Releases of ``group`` in flight. O(1)."""
        g = self._groups.get(group)
        return 0 if g is None else g.inflight

    def queued(self, group: str) -> int:
        """Messages of ``group`` waiting in memory. O(1)."""
        g = self._groups.get(group)
        return 0 if g is None else len(g.queue)

    def __len__(self) -> int:
        """Messages queued over all groups (what ``max_total`` bounds). O(1)."""
        return self._total

    @property
    def group_count(self) -> int:
        """Groups with something in flight, queued or pending (what ``max_groups`` bounds)."""
        return len(self._groups)

    def __repr__(self) -> str:
        return (
            f"MessageMerger(groups={len(self._groups)}, queued={self._total}, "
            f"windows={len(self._windows)})"
        )

    def _check(self) -> None:
        """Assert every invariant (for tests). O(groups + queued)."""
        total = 0
        if len(self._groups) > self.max_groups:
            raise AssertionError("more groups than max_groups")
        for name, g in self._groups.items():
            q = g.queue
            total += len(q)
            if not 0 <= g.inflight <= self.max_inflight:
                raise AssertionError(f"{name}: inflight={g.inflight}")
            if len(q) > self.max_queued:
                raise AssertionError(f"{name}: {len(q)} queued > max_queued")
            if g.qbytes != sum(s for _, _, s in q):
                raise AssertionError(f"{name}: qbytes {g.qbytes} wrong")
            seqs = [s for s, _, _ in q]
            if seqs != sorted(set(seqs)) or (seqs and seqs[-1] > g.last_seq):
                raise AssertionError(f"{name}: queue seqs out of order {seqs}")
            if g.inflight == 0 and not q and g.notify_last == _NONE:
                raise AssertionError(f"{name}: idle group kept")
            if g.notify_last != _NONE:
                if q:
                    raise AssertionError(f"{name}: queue beside a pending notify")
                if g.inflight != self.max_inflight:
                    raise AssertionError(f"{name}: notify pending with a free slot")
                if not g.notify_first <= g.notify_last <= g.last_seq:
                    raise AssertionError(f"{name}: bad notify range")
            in_window = name in self._windows
            if q and not (g.ready ^ in_window):
                raise AssertionError(f"{name}: queued but ready={g.ready}, window={in_window}")
            if not q and (g.ready or in_window):
                raise AssertionError(f"{name}: empty queue with a window")
            full = len(q) >= self.max_batch or g.qbytes >= self.max_batch_bytes
            if q and g.inflight < self.max_inflight and (g.ready or full):
                raise AssertionError(f"{name}: releasable queue with a free slot")
        if total != self._total:
            raise AssertionError(f"total {self._total} != {total}")
        if total > self.max_total:
            raise AssertionError("more queued than max_total")
        last = _NEVER
        for deadline in self._windows.values():
            if deadline < last or deadline > self._now + self.window_ms:
                raise AssertionError("window deadlines out of order")
            last = deadline


#: One aggregated pull signal: (user, ((conversation, newest seq), ...)), ready to
#: become ``Notify(entries=...)``. Conversations in first-signalled order.
Signal: TypeAlias = tuple[str, tuple[tuple[str, int], ...]]


class _Pending:
    __slots__ = ("convs", "deadline")

    def __init__(self, deadline: int, convs: dict[str, int]) -> None:
        self.deadline = deadline
        self.convs = convs


class SignalAggregator:
    """Collapse per-user pull signals arriving within a window into one (信令聚合).

    The first signal for a user opens a window of ``window_ms``; signals for the
    same user within it merge, keeping the newest (largest) seq per conversation;
    :meth:`due` emits one signal per user whose window closed.

    Overflow never drops: a user whose pending signal would pass ``max_convs``
    conversations is flushed at once by :meth:`offer` (and a new window opens with
    the new conversation); a new user arriving when ``max_users`` users are
    pending flushes the oldest pending user early. So a signal from :meth:`due`
    always comes at least ``window_ms`` after the same user's previous signal;
    only those early flushes can come sooner.

    >>> a = SignalAggregator(window_ms=100)
    >>> a.offer("bob", "g1", 5, now_ms=0), a.offer("bob", "g1", 9, now_ms=40)
    ([], [])
    >>> a.offer("bob", "g2", 3, now_ms=50)
    []
    >>> a.due(100)
    [('bob', (('g1', 9), ('g2', 3)))]
    """

    __slots__ = ("_now", "_pending", "max_convs", "max_users", "window_ms")

    def __init__(
        self,
        *,
        window_ms: int = DEFAULT_SIGNAL_WINDOW_MS,
        max_users: int = DEFAULT_MAX_SIGNAL_USERS,
        max_convs: int = DEFAULT_MAX_CONVS,
    ) -> None:
        """Create an empty aggregator. O(1)."""
        _check_int("window_ms", window_ms, 0)
        _check_int("max_users", max_users, 1)
        _check_int("max_convs", max_convs, 1)
        self.window_ms = window_ms
        self.max_users = max_users
        self.max_convs = max_convs
        # user -> pending signal; insertion order == deadline order (monotonic now,
        # constant window), so the head is always the next one due.
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._now = _NEVER

    def offer(self, user: str, conv: str, seq: int, now_ms: int) -> list[Signal]:
        """``user`` should pull ``conv`` up to ``seq``. Returns early flushes (usually []).

        Raises ``ConfigError`` for a negative seq, ``TimeWentBackwards`` if time
        goes back. O(1) (O(c) for an early flush of c conversations).
        """
        return self.offer_many((user,), conv, seq, now_ms)

    def offer_many(
        self, users: Iterable[str], conv: str, seq: int, now_ms: int
    ) -> list[Signal]:
        """:meth:`offer` for each of ``users`` in turn: one message of ``conv`` to all
        its members. Returns the early flushes, in order. O(k) for k users (plus
        early flushes), without the per-user call of :meth:`offer`.
        """
        if now_ms < self._now:
            raise TimeWentBackwards(now_ms, self._now)
        self._now = now_ms
        if type(seq) is not int or seq < 0:
            raise ConfigError(f"seq must be an int >= 0, got {seq!r}")
        pending = self._pending
        get = pending.get
        deadline = now_ms + self.window_ms
        max_users = self.max_users
        max_convs = self.max_convs
        out: list[Signal] = []
        for user in users:
            p = get(user)
            if p is None:
                if len(pending) >= max_users:
                    old_user, old = pending.popitem(last=False)
                    out.append((old_user, tuple(old.convs.items())))
                pending[user] = _Pending(deadline, {conv: seq})
                continue
            convs = p.convs
            old_seq = convs.get(conv)
            if old_seq is not None:
                if seq > old_seq:
                    convs[conv] = seq
            elif len(convs) < max_convs:
                convs[conv] = seq
            else:
                del pending[user]
                pending[user] = _Pending(deadline, {conv: seq})
                out.append((user, tuple(convs.items())))
        return out

    def due(self, now_ms: int) -> list[Signal]:
        """The signals whose window closed at or before ``now_ms``, oldest first.

        O(s + c) for s signals of c conversations in all.
        """
        if now_ms < self._now:
            raise TimeWentBackwards(now_ms, self._now)
        self._now = now_ms
        out: list[Signal] = []
        pending = self._pending
        while pending:
            user, p = next(iter(pending.items()))
            if p.deadline > now_ms:
                break
            pending.popitem(last=False)
            out.append((user, tuple(p.convs.items())))
        return out

    def flush(self) -> list[Signal]:
        """Emit every pending signal now, regardless of windows (e.g. on shutdown). O(n)."""
        out = [(user, tuple(p.convs.items())) for user, p in self._pending.items()]
        self._pending.clear()
        return out

    def next_deadline_ms(self) -> int | None:
        """When the oldest pending window closes (``None`` if nothing is pending). O(1)."""
        for p in self._pending.values():
            return p.deadline
        return None

    def __len__(self) -> int:
        """Users with a pending signal (what ``max_users`` bounds). O(1)."""
        return len(self._pending)

    def __repr__(self) -> str:
        return f"SignalAggregator(pending={len(self._pending)}, window_ms={self.window_ms})"

    def _check(self) -> None:
        """Assert every invariant (for tests). O(pending entries)."""
        if len(self._pending) > self.max_users:
            raise AssertionError("more pending users than max_users")
        last = _NEVER
        for user, p in self._pending.items():
            if not p.convs:
                raise AssertionError(f"{user!r}: empty pending signal")
            if len(p.convs) > self.max_convs:
                raise AssertionError(f"{user!r}: {len(p.convs)} convs > max_convs")
            if p.deadline < last:
                raise AssertionError("pending signals out of deadline order")
            if p.deadline > self._now + self.window_ms:
                raise AssertionError(f"{user!r}: deadline beyond one window")
            last = p.deadline
