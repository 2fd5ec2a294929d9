"""The logic server: seq, store, ack, fan-out, sync and receipts.

What it does
    A gateway hands it what a client asked for (in-process calls here; over an RPC
    or the bus past one process):

    * :meth:`Logic.send` checks membership and size, stores the message with the
      next seq of its conversation (``store.append``: idempotent on (sender, cid),
      so a resent cid returns the first seq and stores nothing), and fans it out.
      The gateway acknowledges the sender with the returned seq.
    * Fan-out depends on the conversation's size (the seed's 写扩散 / 读扩散):

      ========================  ==================================================
      members                   what happens
      ========================  ==================================================
      <= ``write_fanout_max``   write fan-out: one inbox entry per member
                                (``store.inbox_add``) and one ``Push`` to every
                                online member
      <= ``push_fanout_max``    read fan-out: the timeline only; pushes go through
                                a :class:`~imkit.merger.MessageMerger` (at most
                                ``max_inflight`` fan-outs per group, a window of
                                messages merged into one ``PushBatch``); when a
                                group's queue overflows it turns into a pull signal
      above                     read fan-out, notify only: each online member gets
                                a ``Notify(conv, seq)`` through the
                                :class:`~imkit.merger.SignalAggregator` (one signal
                                per user per window) and pulls with a sync
      ========================  ==================================================

      Either way the logic server looks the members up in the route table and
      publishes **one envelope per gateway** on the bus (subject = gateway id).
    * :meth:`Logic.sync` answers a client's ``SyncRequest`` from the store (range
      reads of each conversation's timeline). An inbox sync (``after=()``) pages
      every conversation of the user that has something newer than what this
      device is known to hold (its cursors, learnt from cumulative push acks and
      earlier sync requests; with a durable store they are saved every
      ``cursor_flush_ms`` and on close, and loaded back after a restart).
      :meth:`Logic.sync_later` is the gateway's entry: it answers at once, or in
      a task once the device's sync budget allows.
    * :meth:`Logic.receipt` moves the reader's read cursor (``store.set_read``)
      and, only if it moved, tells the other members of a small conversation.

Policies
    * Nothing is published before it is stored; the bus carries notifications of
      stored messages, so a lost envelope costs a resync, never a message.
    * The event loop never waits for storage: every store call is awaited on an
      :class:`~imkit.store.AsyncMessageStore` (``imkit.aio.ThreadedStore`` runs
      SQLite on one worker thread in call order; ``imkit.aio.InlineStore`` calls
      the memory store inline). A connection's requests are still answered in
      order: the gateway awaits each before reading the next frame.
    * A message body is at most ``max_body`` bytes (``TOO_LARGE`` otherwise); a
      sender must be a member (``NOT_MEMBER``); a 1:1 conversation
      (:func:`imkit.store.direct_conv_id`) is created on its first message.
    * A sync answer stays below ``sync_budget`` bytes: what does not fit is
      announced with ``more=True`` and fetched by the client's follow-up sync.
    * Sync **work** is bounded by a per-device budget, not by bytes returned (an
      empty read costs the store as much as a full one). A request lists each
      conversation once (duplicates collapse to the lowest cursor, so the page
      holds every message after any cursor the client listed); at most
      ``max_sync_entries`` are examined, the rest are answered ``more=True``
      without a store call. Every store call a sync makes is one unit charged to
      the device's token bucket (``sync_work_rate`` units/s, ``sync_work_burst``
      saved up); a device in debt waits for its turn before its next sync is
      answered (the gateway keeps reading its frames, so the session's syncs in
      flight quota refuses the rest). So a device's sync store calls over ``t``
      seconds stay below ``burst + rate * t + one request``.
    * Merged fan-outs complete when every gateway has written them (a ticket) or
      after ``fanout_timeout_ms``, so a lost envelope never wedges a group. A
      gateway's part completes at once when the bus says nobody took the envelope
      (no subscriber on its route key: the gateway died; or its inbox overflowed:
      it resyncs), so a dead gateway does not hold a big group's merger slots.

What it leaves out
    Several logic processes (they would share the store, the route table and a
    seq allocator; see ``docs/reference-system.md``), offline push notifications
    (APNs/FCM) from the inbox, message recall and edits, and history for members
    who join a group later (they get it only through sync).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeAlias

import attrs

from imkit.aio import DeadlineTimer, MemoryBus, loop_ms
from imkit.errors import (
    CapacityError,
    ConfigError,
    ConversationNotFound,
    ImkitError,
    StoreError,
)
from imkit.merger import (
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_MERGE_WINDOW_MS,
    DEFAULT_SIGNAL_WINDOW_MS,
    MessageMerger,
    Release,
    ReleaseKind,
    SignalAggregator,
)
from imkit.protocol import ErrorCode, Message, Notify, Push, Receipt, SyncPage
from imkit.routetable import Route
from imkit.seq import IdGenerator
from imkit.session import SyncRequested
from imkit.store import AsyncMessageStore, ConvKind, StoredMessage, direct_conv_id

from .routes import RouteService

__all__ = [
    "DEFAULT_CURSOR_FLUSH_DEVICES",
    "DEFAULT_CURSOR_FLUSH_MS",
    "DEFAULT_FANOUT_TIMEOUT_MS",
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_DEVICES",
    "DEFAULT_MAX_SYNC_ENTRIES",
    "DEFAULT_MAX_SYNC_PAGES",
    "DEFAULT_PUSH_FANOUT_MAX",
    "DEFAULT_SYNC_BUDGET",
    "DEFAULT_SYNC_WORK_BURST",
    "DEFAULT_SYNC_WORK_RATE",
    "DEFAULT_WRITE_FANOUT_MAX",
    "BusPayload",
    "Deliver",
    "FanoutTicket",
    "KickRoute",
    "Logic",
    "LogicConfig",
    "LogicStats",
    "Signals",
    "parse_direct",
]

logger = logging.getLogger("examples.logic")

#: Conversations up to this many members use write fan-out (inbox + a push per
#: message). The seed puts the switch to read fan-out at "groups of a few hundred";
#: 100 keeps per-message work (one inbox write and one push per member) small.
DEFAULT_WRITE_FANOUT_MAX = 100
#: Above this many members a group is notify-only: members pull. 2000 members x a
#: merged batch is still a cheap push; beyond, pull signals cost less than pushes
#: that most members (idle in the background) never look at.
DEFAULT_PUSH_FANOUT_MAX = 2000
#: Longest message body. 8 KiB is a long chat message; files go elsewhere (an upload
#: service), and it keeps a 100-message sync page far below the 64 KiB frame limit.
DEFAULT_MAX_BODY = 8 * 1024
#: Bytes (estimated, before compression) in one sync answer. The protocol's frame
#: cap is 64 KiB uncompressed; 48 KiB leaves room for CBOR overhead and ids.
DEFAULT_SYNC_BUDGET = 48 * 1024
#: Pages in one sync answer: the protocol allows 1024 entries per array.
DEFAULT_MAX_SYNC_PAGES = 1000
#: Devices whose per-conversation cursors are remembered (LRU); a forgotten device
#: just syncs from 0 (correct, more bytes). ~100 bytes per cursor.
DEFAULT_MAX_DEVICES = 100_000
#: Conversations one sync request may make the store look at (a membership check
#: and a read each); the others listed get an empty ``more=True`` page, so the
#: client asks again. The client lists at most 200 (``DEFAULT_MAX_SYNC_CONVS``);
#: 256 never cuts an honest request, while the protocol lets a request list 1024.
DEFAULT_MAX_SYNC_ENTRIES = 256
#: Sync work units (one per store call a sync makes) a device earns per second.
#: A device in 50 busy notify-only groups syncs ~50 conversations a second (two
#: units each): 500 leaves 5x room. An attacker is held to 500 store calls a second
#: (a few percent of a core with SQLite) instead of the ~100k it got before.
DEFAULT_SYNC_WORK_RATE = 500
#: Sync work units a device may spend at once: the reconnect of a user with
#: ``DEFAULT_MAX_CONVERSATIONS_PER_USER`` (10k) conversations costs about 10k
#: (their last seqs) plus a read per conversation with news that fits the byte
#: budget (~1k) plus the follow-ups; 20k covers it with room to spare.
DEFAULT_SYNC_WORK_BURST = 20_000
#: How often the device cursors learnt since the last flush are written to a
#: durable store: a push-ack storm becomes at most one write per device per
#: interval, and a crash loses at most this much of the cursors (those devices
#: re-download a few seconds of messages; nothing is lost).
DEFAULT_CURSOR_FLUSH_MS = 2_000
#: Devices written per flush (one store transaction each): at most 250 writes a
#: second at the default interval; the rest wait for the next flush. Close writes
#: them all.
DEFAULT_CURSOR_FLUSH_DEVICES = 500
#: A merged fan-out that some gateway took but never confirmed (it died with the
#: envelope queued) frees its merger slot after this long. (An envelope nobody
#: took -- a gateway with no bus subscription -- frees its part at once.)
DEFAULT_FANOUT_TIMEOUT_MS = 5_000
#: 1:1 conversations whose members this logic server remembers (LRU): their two
#: members never change, so a send to a remembered one skips the store's
#: membership calls (two round trips to PostgreSQL in a cluster). ~200 bytes each:
#: 20 MB at most.
DEFAULT_MAX_DIRECTS = 100_000
#: A resent cid whose message was stored less than this long ago is pushed again to
#: the members of a small conversation: the logic process that stored it may have
#: died or stalled between the append and the publish (in a cluster the resend
#: reaches another one), and without this its members would learn of it only at
#: their next sync. The cost is a duplicate push after a lost ack (the clients drop
#: it). Longer than a client's send retries take to give up on one logic process.
DEFAULT_REPUSH_WINDOW_MS = 60_000


@attrs.frozen(kw_only=True)
class LogicConfig:
    """The logic server's limits and thresholds (each documented on its DEFAULT_*)."""

    write_fanout_max: int = DEFAULT_WRITE_FANOUT_MAX
    push_fanout_max: int = DEFAULT_PUSH_FANOUT_MAX
    max_body: int = DEFAULT_MAX_BODY
    sync_budget: int = DEFAULT_SYNC_BUDGET
    max_sync_pages: int = DEFAULT_MAX_SYNC_PAGES
    max_devices: int = DEFAULT_MAX_DEVICES
    fanout_timeout_ms: int = DEFAULT_FANOUT_TIMEOUT_MS
    merge_window_ms: int = DEFAULT_MERGE_WINDOW_MS
    merge_inflight: int = DEFAULT_MAX_INFLIGHT
    signal_window_ms: int = DEFAULT_SIGNAL_WINDOW_MS
    max_sync_entries: int = DEFAULT_MAX_SYNC_ENTRIES
    sync_work_rate: int = DEFAULT_SYNC_WORK_RATE
    sync_work_burst: int = DEFAULT_SYNC_WORK_BURST
    cursor_flush_ms: int = DEFAULT_CURSOR_FLUSH_MS
    cursor_flush_devices: int = DEFAULT_CURSOR_FLUSH_DEVICES
    node: int = 0  # IdGenerator node of this logic process (0-1023)

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.write_fanout_max <= self.push_fanout_max:
            raise ConfigError("need 0 <= write_fanout_max <= push_fanout_max")
        for name in (
            "max_body",
            "sync_budget",
            "max_sync_pages",
            "max_devices",
            "max_sync_entries",
            "sync_work_rate",
            "sync_work_burst",
            "cursor_flush_ms",
            "cursor_flush_devices",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if not 1 <= self.max_sync_pages <= 1024:
            raise ConfigError("max_sync_pages must be 1-1024 (the protocol's MAX_ITEMS)")


# --- what travels on the bus -------------------------------------------------------


class FanoutTicket:
    """Completion of one fan-out published to several gateways: ``on_done`` once all finish.

    Each gateway calls :meth:`finish` after writing the envelope to its clients;
    :meth:`finish_all` (a timeout) completes it regardless. Built with
    ``gateways``, the ticket counts each named gateway once and ignores others
    (so a gateway confirming and the logic server giving up on it never count
    twice); built without, every :meth:`finish` counts. O(1) each.
    """

    __slots__ = ("_on_done", "pending", "remaining")

    def __init__(
        self, remaining: int, on_done: Callable[[], object], gateways: Iterable[str] = ()
    ) -> None:
        self.remaining = remaining
        self.pending: set[str] | None = set(gateways) or None  # None: not tracked by id
        self._on_done: Callable[[], object] | None = on_done

    def finish(self, gateway: str | None = None) -> None:
        """One gateway is done (``gateway``: which one, for a ticket built with ids)."""
        pending = self.pending
        if pending is not None and gateway is not None:
            if gateway not in pending:
                return  # already counted, or not one of this ticket's gateways
            pending.discard(gateway)
        self.remaining -= 1
        if self.remaining <= 0:
            self.finish_all()

    def finish_all(self) -> None:
        """Complete now (idempotent)."""
        done, self._on_done = self._on_done, None
        if done is not None:
            done()


@attrs.frozen(kw_only=True)
class Deliver:
    """To one gateway: send ``pushes`` (tracked until acked) and ``frames`` to ``targets``."""

    targets: tuple[Route, ...]
    pushes: tuple[Push, ...] = ()
    frames: tuple[Message, ...] = ()
    ticket: FanoutTicket | None = attrs.field(default=None, eq=False)


@attrs.frozen(kw_only=True)
class Signals:
    """To one gateway: one ``Notify`` per route (aggregated pull signals)."""

    items: tuple[tuple[Route, Notify], ...]


@attrs.frozen(kw_only=True)
class KickRoute:
    """To one gateway: close the connection of ``route`` (e.g. REPLACED by a newer login)."""

    route: Route
    code: int
    reason: str = ""


BusPayload: TypeAlias = Deliver | Signals | KickRoute


class LogicStats:
    """Counters of the logic server (plain ints)."""

    __slots__ = (
        "cursor_writes",
        "cursors_dropped",
        "duplicates",
        "envelopes",
        "notifies",
        "pushes",
        "receipts",
        "receipts_unmoved",
        "refused",
        "repushes",
        "sends",
        "sync_cut",
        "sync_waits",
        "sync_work",
        "syncs",
        "unrouted",
    )

    def __init__(self) -> None:
        self.sends = 0  # messages stored
        self.duplicates = 0  # resent cids answered from the store
        self.repushes = 0  # recent resent messages pushed again (see _repush)
        self.refused = 0  # sends refused (not a member, too large, store full)
        self.envelopes = 0  # bus publishes
        self.pushes = 0  # push deliveries addressed (message x route)
        self.notifies = 0  # pull signals addressed
        self.syncs = 0
        self.sync_work = 0  # store calls made for syncs (the units charged to devices)
        self.sync_waits = 0  # syncs that waited for their device's budget
        self.sync_cut = 0  # listed entries answered more=True unexamined (per-request cap)
        self.receipts = 0  # receipts that moved a read cursor
        self.receipts_unmoved = 0  # receipts at or below the cursor: not written, not told
        self.cursor_writes = 0  # devices whose cursors were written to the store
        self.cursors_dropped = 0  # cursor updates not kept for writing (too many dirty devices)
        self.unrouted = 0  # envelopes no gateway took (not subscribed, or its inbox full)

    def as_dict(self) -> dict[str, int]:
        """Every counter by name."""
        return {name: getattr(self, name) for name in self.__slots__}


def parse_direct(conv: str) -> tuple[str, str] | None:
    """The two uids of a 1:1 conversation id (``direct_conv_id``), or None. O(len).

    >>> parse_direct("dm:5:alice:bob")
    ('alice', 'bob')
    """
    if not conv.startswith("dm:"):
        return None
    length_text, sep, rest = conv[3:].partition(":")
    if not sep or not length_text.isdigit():
        return None
    n = int(length_text)
    a, b = rest[:n], rest[n + 1 :]
    if len(a) != n or rest[n : n + 1] != ":" or not a or not b:
        return None
    try:
        return (a, b) if direct_conv_id(a, b) == conv else None
    except ConfigError:
        return None


def _wall_ms() -> int:
    return int(time.time() * 1000)


def _size(push: Push) -> int:
    # CBOR of a Push: 1 array head + ~5 heads + the strings/bytes + 3 ints (<= 9 B each)
    return len(push.body) + len(push.conv) + len(push.sender) + 40


class _WorkBucket:
    """A device's sync work budget: milli-units, refilled at the rate, may go into debt."""

    __slots__ = ("last_ms", "milli")

    def __init__(self, milli: int, now_ms: int) -> None:
        self.milli = milli
        self.last_ms = now_ms


def _push(m: StoredMessage) -> Push:
    return Push(
        conv=m.conv, seq=m.seq, sender=m.sender, body=m.body, msg_id=m.msg_id, server_ms=m.server_ms
    )


class Logic:
    """The logic server of the reference system (one per process here).

    ``store`` is any :class:`~imkit.store.AsyncMessageStore` (wrap a synchronous
    store with ``imkit.aio.async_store``); ``routes`` the shared
    :class:`~examples.routes.RouteService`; ``bus`` the bus the gateways subscribe
    to (subject = gateway id). Create it inside a running loop. Costs:
    :meth:`send` O(1) for the store plus O(members) for a fan-out; :meth:`sync`
    O(entries listed + messages returned), with at most ``max_sync_entries``
    conversations examined per listed request (an inbox sync: every conversation
    of the user).
    """

    def __init__(
        self,
        *,
        store: AsyncMessageStore,
        routes: RouteService,
        bus: MemoryBus[BusPayload],
        config: LogicConfig | None = None,
    ) -> None:
        self.store = store
        self.routes = routes
        self.bus = bus
        self.config = cfg = config or LogicConfig()
        self.stats = LogicStats()
        self._ids = IdGenerator(cfg.node)
        self._loop = asyncio.get_running_loop()
        self.merger: MessageMerger[Push] = MessageMerger(
            max_inflight=cfg.merge_inflight, window_ms=cfg.merge_window_ms
        )
        self.signals = SignalAggregator(window_ms=cfg.signal_window_ms)
        self._merge_timer = DeadlineTimer(self.merger.next_deadline_ms, self._merge_due)
        self._signal_timer = DeadlineTimer(self.signals.next_deadline_ms, self._signals_due)
        # (uid, device) -> {conv: seq the device holds contiguously}, LRU
        self._cursors: collections.OrderedDict[tuple[str, str], dict[str, int]] = (
            collections.OrderedDict()
        )
        # (uid, device) -> sync work budget, LRU (max_devices; a forgotten device
        # starts again with a full burst)
        self._work: collections.OrderedDict[tuple[str, str], _WorkBucket] = (
            collections.OrderedDict()
        )
        # (uid, device) -> {conv: seq} learnt since the last flush (durable stores only;
        # at most max_devices devices, each at most its user's conversations)
        self._dirty: dict[tuple[str, str], dict[str, int]] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flush_task: asyncio.Task[int] | None = None
        # members of each group the merger holds something for (taken when a message
        # is offered, used when its batch is released): bounded by the merger's
        # max_groups, dropped when the merger forgets the group
        self._group_members: dict[str, frozenset[str]] = {}
        # syncs waiting for their device's budget: at most the sessions' syncs in flight
        self._sync_tasks: set[asyncio.Task[None]] = set()
        # merged fan-outs not yet completed (insertion-ordered set); one per merger
        # slot in flight, so bounded by the merger (groups x merge_inflight)
        self._open: dict[FanoutTicket, None] = {}
        # 1:1 conversation -> its two members (fixed for good), LRU
        self._directs: collections.OrderedDict[str, frozenset[str]] = collections.OrderedDict()
        # publishes started from timer callbacks (see _spawn)
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    def close(self) -> None:
        """Stop now, as a crash would: timers stopped, waiting syncs dropped, and the
        device cursors learnt since the last flush are **not** written (those devices
        re-download a few seconds of messages). :meth:`aclose` writes them. O(tasks).
        """
        self._closed = True
        self._merge_timer.close()
        self._signal_timer.close()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for task in self._sync_tasks:
            task.cancel()
        self._sync_tasks.clear()
        for bg in self._background:
            bg.cancel()
        self._background.clear()
        self._group_members.clear()

    async def aclose(self) -> None:
        """Stop the timers, drop waiting syncs, write every pending device cursor.

        Pending signals are dropped (clients resync on reconnect). Await it before
        closing the store. O(pending cursors).
        """
        self.close()
        if self._flush_task is not None:
            await asyncio.gather(self._flush_task, return_exceptions=True)
        await self.flush_cursors(limit=None)

    async def has_user(self, uid: str) -> bool:
        """Whether ``uid`` is a registered user (one store call)."""
        return await self.store.has_user(uid)

    def stats_dict(self) -> dict[str, int]:
        """The counters, for ``/healthz``."""
        return self.stats.as_dict()

    # -- send ---------------------------------------------------------------------------

    async def send(
        self, uid: str, device: str, cid: int, conv: str, body: bytes
    ) -> StoredMessage | ErrorCode:
        """Store the message (idempotent on (uid, cid)) and fan it out; or an error code.

        Returns the stored message (for a resent cid: the first one, without a new
        fan-out) or the :class:`~imkit.protocol.ErrorCode` to refuse it with.
        """
        store = self.store
        if len(body) > self.config.max_body:
            self.stats.refused += 1
            return ErrorCode.TOO_LARGE
        try:
            direct = self._directs.get(conv)
            if direct is not None:
                self._directs.move_to_end(conv)
                if uid not in direct:
                    self.stats.refused += 1
                    return ErrorCode.NOT_MEMBER
            elif await store.is_member(uid, conv) or await self._open_direct(uid, conv):
                await self._remember_direct(conv)
            else:
                self.stats.refused += 1
                return ErrorCode.NOT_MEMBER
            msg_id = self._ids.next_id(_wall_ms())
            msg = await store.append(conv, uid, cid, body, wall_ms=_wall_ms(), msg_id=msg_id)
        except CapacityError:
            self.stats.refused += 1
            logger.warning("store full: refusing a send to %s", conv)
            return ErrorCode.SERVER_BUSY
        except ConversationNotFound:
            self.stats.refused += 1
            return ErrorCode.NOT_MEMBER
        except ConfigError:
            self.stats.refused += 1
            return ErrorCode.BAD_REQUEST
        except StoreError:  # the backend failed: nothing stored, the client retries
            self.stats.refused += 1
            logger.exception("store failed: refusing a send to %s", conv)
            return ErrorCode.INTERNAL
        if msg.msg_id != msg_id:
            self.stats.duplicates += 1  # a resend: stored before
            if _wall_ms() - msg.server_ms < DEFAULT_REPUSH_WINDOW_MS:
                await self._repush(msg)
            return msg
        self.stats.sends += 1
        try:
            await self._fan_out(msg)
        except ImkitError:  # stored and acked; the members get it with their next sync
            logger.exception("fan-out of a message of %s failed", conv)
        return msg

    async def _repush(self, msg: StoredMessage) -> None:
        """Push a recently stored message again (write fan-out sizes only): its first
        fan-out may never have happened. Groups above ``write_fanout_max`` are left to
        their merger and pull signals (their members sync on a gap)."""
        try:
            members = self._directs.get(msg.conv) or await self.store.members(msg.conv)
            if len(members) <= self.config.write_fanout_max and not self._closed:
                self.stats.repushes += 1
                await self._publish_pushes(members, (_push(msg),), None)
        except ImkitError:
            logger.warning("could not push a resent message of %s again", msg.conv)

    async def _remember_direct(self, conv: str) -> None:
        """If ``conv`` is a 1:1 conversation, remember its (fixed) members. One store
        call, once per conversation (LRU of ``DEFAULT_MAX_DIRECTS``)."""
        pair = parse_direct(conv)
        if pair is None or (await self.store.conversation(conv)).kind is not ConvKind.DIRECT:
            return  # a group (even one named like a 1:1 id): ask the store every time
        self._directs[conv] = frozenset(pair)
        if len(self._directs) > DEFAULT_MAX_DIRECTS:
            self._directs.popitem(last=False)

    async def _open_direct(self, uid: str, conv: str) -> bool:
        """Create the 1:1 conversation ``conv`` if ``uid`` is one of its two users."""
        pair = parse_direct(conv)
        if pair is None or uid not in pair:
            return False
        store = self.store
        if not (await store.has_user(pair[0]) and await store.has_user(pair[1])):
            return False
        await store.create_direct(*pair)
        return True

    async def _fan_out(self, msg: StoredMessage) -> None:
        store = self.store
        members = self._directs.get(msg.conv) or await store.members(msg.conv)
        if self._closed:
            return
        cfg = self.config
        push = _push(msg)
        if len(members) <= cfg.write_fanout_max:
            try:
                await store.inbox_add(members, msg.conv, msg.seq)
            except ImkitError:
                logger.exception("inbox write failed for %s", msg.conv)  # push anyway
            await self._publish_pushes(members, (push,), None)
        elif len(members) <= cfg.push_fanout_max:
            now = self._merge_timer.now_ms()
            try:
                releases = self.merger.offer(msg.conv, msg.seq, push, _size(push), now)
            except CapacityError:  # max_groups: tell the members to pull instead
                await self._signal(members, msg.conv, msg.seq)
            else:
                # the members its batch goes to when released (the latest list)
                self._group_members[msg.conv] = members
                self._release(releases)
            self._merge_timer.rearm()
        else:
            await self._signal(members, msg.conv, msg.seq)

    async def _publish_pushes(
        self, uids: Iterable[str], pushes: tuple[Push, ...], on_done: Callable[[], object] | None
    ) -> None:
        try:
            by_gateway = await self.routes.group_by_gateway(uids)
        except ImkitError:  # the route table is unreachable: the members sync later
            logger.warning("route lookup failed: %d pushes not sent", len(pushes))
            by_gateway = {}
        ticket: FanoutTicket | None = None
        if on_done is not None:
            if not by_gateway:
                on_done()
                return
            finished = on_done

            def completed() -> None:
                self._open.pop(opened, None)
                finished()

            ticket = opened = FanoutTicket(len(by_gateway), completed, by_gateway)
            self._open[opened] = None
            self._loop.call_later(self.config.fanout_timeout_ms / 1000, opened.finish_all)
        for gateway, routes in by_gateway.items():
            self.stats.pushes += len(routes) * len(pushes)
            self._publish(gateway, Deliver(targets=tuple(routes), pushes=pushes, ticket=ticket))

    def _publish(self, gateway: str, payload: BusPayload) -> None:
        self.stats.envelopes += 1
        ticket = payload.ticket if isinstance(payload, Deliver) else None
        try:
            result = self.bus.publish_nowait(gateway, payload)
        except ImkitError:  # a REJECT subscriber is full: its clients resync on reconnect
            logger.warning("bus refused an envelope for %s", gateway)
            if ticket is not None:
                ticket.finish(gateway)
            return
        if result.delivered == 0:
            # Nobody will write (and so confirm) this envelope: the gateway is gone (no
            # subscriber on its route key) or its inbox overflowed (it gets a Lagged
            # marker and resyncs its clients). The messages are stored, so its devices
            # sync when they reconnect; free this gateway's part of the ticket now
            # rather than at fanout_timeout_ms. A slow gateway is still subscribed and
            # queues the envelope (delivered == 1), so it is waited for as before.
            # call_soon: never complete a ticket (and release the next batch) from
            # inside the publish loop that is still using it.
            self.stats.unrouted += 1
            if ticket is not None:
                self._loop.call_soon(ticket.finish, gateway)

    # -- merged pushes and pull signals ----------------------------------------------------

    def _release(self, releases: list[Release[Push]]) -> None:
        for r in releases:
            group = r.group
            if self._closed:
                return
            # taken when the message was offered (a release never waits for the store)
            members = self._group_members.get(group, frozenset())
            if r.kind is ReleaseKind.PUSH:
                done = functools.partial(self._merge_done, group)
                self._spawn(self._publish_pushes(members, r.messages, done))
            else:  # the queue overflowed: members pull up to last_seq
                self._spawn(self._signal(members, group, r.last_seq))
                self._merge_done(group)

    def gateway_gone(self, gateway: str) -> int:
        """``gateway`` died (discovery lost it): complete its part of every open fan-out.

        Envelopes that were queued for it when it died will never be confirmed;
        without this its groups would wait ``fanout_timeout_ms``. Its devices sync
        from the store when they reconnect. Returns the tickets it was holding.
        O(open fan-outs), at most ``merge_inflight`` per group.
        """
        held = [t for t in self._open if t.pending is not None and gateway in t.pending]
        for ticket in held:
            ticket.finish(gateway)
        return len(held)

    def _merge_done(self, group: str) -> None:
        if not self._closed:
            merger = self.merger
            self._release(merger.done(group))
            if not merger.inflight(group) and not merger.queued(group):
                self._group_members.pop(group, None)  # the merger forgot the group
            self._merge_timer.rearm()

    def _merge_due(self, now_ms: int) -> None:
        self._release(self.merger.due(now_ms))

    async def _signal(self, members: Iterable[str], conv: str, seq: int) -> None:
        try:
            by_gateway = await self.routes.group_by_gateway(members)
        except ImkitError:  # the route table is unreachable: the members sync later
            logger.warning("route lookup failed: pull signals for %s not sent", conv)
            return
        online = {route.uid for routes in by_gateway.values() for route in routes}
        now = self._signal_timer.now_ms()
        signals = self.signals.offer_many(online, conv, seq, now)
        self._signal_timer.rearm()
        await self._send_signals(signals)

    def _signals_due(self, now_ms: int) -> None:
        signals = self.signals.due(now_ms)
        if signals:
            self._spawn(self._send_signals(signals))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (a publish that looks routes up) from a synchronous callback.

        With the in-process route table it runs to its end in its first step, so
        tasks publish in the order they were spawned. Bounded by what spawns them:
        merger releases (groups x ``merge_inflight``) and signal windows.
        """
        if self._closed:
            work.close()
            return
        task = self._loop.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("fan-out task failed", exc_info=task.exception())

    async def _send_signals(self, signals: list[tuple[str, tuple[tuple[str, int], ...]]]) -> None:
        if not signals:
            return
        by_gateway: dict[str, list[tuple[Route, Notify]]] = {}
        notifies = {user: Notify(entries=entries) for user, entries in signals}
        try:
            grouped = await self.routes.group_by_gateway(notifies)
        except ImkitError:  # the route table is unreachable: the members sync later
            logger.warning("route lookup failed: %d pull signals not sent", len(signals))
            return
        for gateway, routes in grouped.items():
            by_gateway[gateway] = [(route, notifies[route.uid]) for route in routes]
        for gateway, items in by_gateway.items():
            self.stats.notifies += len(items)
            self._publish(gateway, Signals(items=tuple(items)))

    # -- device cursors -----------------------------------------------------------------------

    async def _device_cursors(self, key: tuple[str, str]) -> dict[str, int]:
        """The cursors of device ``key`` (LRU), loaded from a durable store on a miss."""
        cursors = self._cursors.get(key)
        if cursors is not None:
            self._cursors.move_to_end(key)
            return cursors
        cursors = {}
        store = self.store
        if store.durable:
            try:
                cursors = await store.device_cursors(*key)
            except ImkitError:
                logger.warning("could not load the cursors of a device of %s", key[0])
            # what was learnt while the load waited (another load of the same
            # device, a note that is not written yet) is not older than the store
            for newer in (self._cursors.get(key), self._dirty.get(key)):
                if newer:
                    for conv, seq in newer.items():
                        if seq > cursors.get(conv, 0):
                            cursors[conv] = seq
        self._cursors[key] = cursors
        self._cursors.move_to_end(key)
        if len(self._cursors) > self.config.max_devices:
            self._cursors.popitem(last=False)
        return cursors

    async def note_cursor(self, uid: str, device: str, conv: str, seq: int) -> None:
        """``device`` of ``uid`` holds ``conv`` contiguously up to ``seq`` (its own claim).

        Claims come from cumulative push acks and sync requests; they only make an
        inbox sync start later (a claim that is too high only hurts its claimant).
        O(1) (a membership check the first time a conversation is seen; a load
        from a durable store the first time a device is seen).
        """
        key = (uid, device)
        known = self._cursors.get(key)
        if known is not None and seq <= known.get(conv, 0):
            return  # nothing new (the common case: no store call)
        try:
            if (known is None or conv not in known) and not await self.store.is_member(uid, conv):
                return
        except ImkitError:  # a store failure, a full worker queue: the claim is only a hint
            return
        await self._note_member(key, conv, seq)

    async def _note_member(self, key: tuple[str, str], conv: str, seq: int) -> None:
        """:meth:`note_cursor` for a conversation already known to be the user's."""
        cursors = await self._device_cursors(key)
        if seq <= cursors.get(conv, 0):
            return
        cursors[conv] = seq
        if not self.store.durable or self._closed:
            return
        dirty = self._dirty
        pending = dirty.get(key)
        if pending is None:
            if len(dirty) >= self.config.max_devices:
                self.stats.cursors_dropped += 1  # the device re-downloads a little after a restart
                return
            pending = dirty[key] = {}
        pending[conv] = seq
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_later(
                self.config.cursor_flush_ms / 1000, self._flush_due
            )

    def _flush_due(self) -> None:
        self._flush_handle = None
        if self._flush_task is None and not self._closed:
            self._flush_task = task = self._loop.create_task(self.flush_cursors())
            task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[int]) -> None:
        self._flush_task = None
        if not task.cancelled() and task.exception() is not None:
            logger.error("flushing device cursors failed", exc_info=task.exception())

    async def flush_cursors(self, limit: int | None = -1) -> int:
        """Write pending device cursors to the store; return how many devices were written.

        ``limit``: devices to write (-1: ``cursor_flush_devices``; None: all of them).
        What is left is written at the next flush. One store transaction per
        device. O(cursors written).
        """
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        dirty = self._dirty
        if limit is None:
            n = len(dirty)
        else:
            n = self.config.cursor_flush_devices if limit < 0 else limit
        written = 0
        store = self.store
        while dirty and written < n:
            key = next(iter(dirty))
            cursors = dirty.pop(key)
            written += 1
            try:
                await store.set_device_cursors(key[0], key[1], cursors)
            except ImkitError:  # a user gone, a store failure: the device syncs a bit more
                logger.warning("could not write the cursors of a device of %s", key[0])
        self.stats.cursor_writes += written
        if dirty and not self._closed and self._flush_handle is None:
            self._flush_handle = self._loop.call_later(
                self.config.cursor_flush_ms / 1000, self._flush_due
            )
        return written

    # -- sync ---------------------------------------------------------------------------------

    def sync_wait_ms(self, uid: str, device: str) -> int:
        """How long ``device`` of ``uid`` must wait before its next sync (0: now). O(1)."""
        bucket = self._bucket((uid, device))
        # milli-units below 0 / (rate milli-units per ms), rounded up
        return 0 if bucket.milli >= 0 else -(bucket.milli // self.config.sync_work_rate)

    def _bucket(self, key: tuple[str, str]) -> _WorkBucket:
        cfg = self.config
        now = loop_ms(self._loop)
        buckets = self._work
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _WorkBucket(cfg.sync_work_burst * 1000, now)
            if len(buckets) > cfg.max_devices:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
            elapsed = now - bucket.last_ms
            if elapsed > 0:
                # rate units per 1000 ms == rate milli-units per ms
                bucket.milli = min(
                    cfg.sync_work_burst * 1000, bucket.milli + elapsed * cfg.sync_work_rate
                )
                bucket.last_ms = now
        return bucket

    async def sync_turn(self, uid: str, device: str) -> None:
        """Wait until ``device`` of ``uid`` is out of sync-work debt (at once if it is)."""
        while (wait_ms := self.sync_wait_ms(uid, device)) > 0:
            self.stats.sync_waits += 1
            await asyncio.sleep(wait_ms / 1000)

    async def sync(
        self, uid: str, device: str, after: Sequence[tuple[str, int]], limit: int
    ) -> list[SyncPage]:
        """The pages answering a SyncRequest, in the device's turn (see the module doc).

        Waits while the device's sync budget is in debt, then :meth:`sync_now`.
        """
        await self.sync_turn(uid, device)
        return await self.sync_now(uid, device, after, limit)

    async def sync_later(
        self,
        request: SyncRequested,
        answer: Callable[[SyncRequested, list[SyncPage]], object],
        *,
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        """Call ``answer(request, pages)`` now, or from a task once the device may sync.

        The gateway's entry: a device within its budget is answered before this
        returns (the gateway awaits it, so a connection's answers keep their order);
        one in debt waits in a task (the connection keeps reading frames, so the
        session's syncs-in-flight quota refuses further ones), and is answered only
        if ``alive()`` still holds then. A store failure answers with no pages (the
        client asks again after its sync timeout). O(1) plus :meth:`sync_now`.
        """
        if self._closed:
            return
        if self.sync_wait_ms(request.uid, request.device) == 0:
            await self._answer(request, answer)
            return
        task = self._loop.create_task(self._sync_in_turn(request, answer, alive))
        self._sync_tasks.add(task)
        task.add_done_callback(self._sync_tasks.discard)

    async def _sync_in_turn(
        self,
        request: SyncRequested,
        answer: Callable[[SyncRequested, list[SyncPage]], object],
        alive: Callable[[], bool],
    ) -> None:
        await self.sync_turn(request.uid, request.device)
        if alive() and not self._closed:
            await self._answer(request, answer)

    async def _answer(
        self, request: SyncRequested, answer: Callable[[SyncRequested, list[SyncPage]], object]
    ) -> None:
        try:
            pages = await self.sync_now(request.uid, request.device, request.after, request.limit)
        except ImkitError:
            logger.exception("sync of %s failed", request.uid)
            pages = []
        answer(request, pages)

    async def sync_now(
        self, uid: str, device: str, after: Sequence[tuple[str, int]], limit: int
    ) -> list[SyncPage]:
        """The pages answering a SyncRequest now, charged to the device's budget.

        Each store call is one unit (the budget may go into debt: the device's next
        sync waits). O(entries listed + messages returned); store calls at most
        2 x ``max_sync_entries`` for a listed request, 2 + the user's conversations
        + pages read for an inbox sync.
        """
        self.stats.syncs += 1
        store = self.store
        cfg = self.config
        key = (uid, device)
        work = 0
        wanted: dict[str, int] = {}  # conv -> where its page starts (in request order)
        cut: set[str] = set()  # listed past max_sync_entries: answered more=True unexamined
        strangers: set[str] = set()  # listed, but not the user's: an empty final page
        if after:
            for conv, seq in after:
                start = wanted.get(conv)
                if start is None:
                    if len(wanted) >= cfg.max_sync_pages:
                        continue
                    wanted[conv] = seq
                elif seq < start:
                    wanted[conv] = seq  # the lowest cursor: a page from there holds them all
            if key not in self._cursors and store.durable:
                work += 1  # the device's cursors are loaded when it is first noted
            for i, (conv, seq) in enumerate(wanted.items()):
                if i >= cfg.max_sync_entries:
                    cut.add(conv)
                    continue
                # checked every time (never from the cursors: the user may have left)
                work += 1
                if await store.is_member(uid, conv):
                    await self._note_member(key, conv, seq)
                else:
                    strangers.add(conv)
        else:
            loaded = key in self._cursors
            known = await self._device_cursors(key)
            work += 1 + (not loaded and store.durable)  # conversations_of (+ the load)
            convs = sorted(await store.conversations_of(uid))
            for conv in convs:
                start = known.get(conv, 0)
                work += 1
                if await store.last_seq(conv) > start:
                    wanted[conv] = start
                    if len(wanted) >= cfg.max_sync_pages:
                        break  # the rest come with the next inbox sync
        budget = cfg.sync_budget
        pages: list[SyncPage] = []
        for conv, seq in wanted.items():
            if budget <= 0 or conv in cut or conv in strangers:
                # out of budget, or past the per-request cap: an empty page with
                # more=True makes the client ask again; not a member: an empty final
                # page (nothing there for this user)
                more = conv not in strangers
                pages.append(SyncPage(conv=conv, messages=(), more=more))
                continue
            work += 1
            page = await store.read(conv, seq, limit)
            messages: list[Push] = []
            for m in page.messages:
                push = _push(m)
                cost = _size(push)
                if cost > budget and budget < cfg.sync_budget:
                    break  # (a single message larger than the budget still goes out alone)
                budget -= cost
                messages.append(push)
            more = page.more or len(messages) < len(page.messages)
            pages.append(SyncPage(conv=conv, messages=tuple(messages), more=more))
        self.stats.sync_cut += len(cut)
        self.stats.sync_work += work
        self._bucket(key).milli -= work * 1000
        return pages

    async def resync_entries(self, uid: str) -> list[tuple[str, int]]:
        """(conv, last seq) of every conversation of ``uid`` with messages: a catch-all Notify.

        O(conversations of ``uid``) store calls."""
        store = self.store
        out = []
        for conv in await store.conversations_of(uid):
            last = await store.last_seq(conv)
            if last:
                out.append((conv, last))
        return out

    # -- receipts -------------------------------------------------------------------------------

    async def receipt(self, uid: str, conv: str, seq: int) -> None:
        """``uid`` read ``conv`` up to ``seq``: move its cursor; if it moved, tell the
        others (small convs). O(1) store calls plus O(members) when it moved."""
        store = self.store
        try:
            if seq <= await store.get_read(uid, conv):
                # the cursor stays: nothing is written and nobody is told (a repeated
                # receipt in a 100-member group would otherwise cost 99 pushes)
                self.stats.receipts_unmoved += 1
                return
            cursor = await store.set_read(uid, conv, seq)
            members = await store.members(conv)
        except (StoreError, ConfigError, CapacityError):
            return  # not a member, a seq that does not exist, the store busy: ignored
        self.stats.receipts += 1
        if len(members) > self.config.write_fanout_max:
            return  # big groups: read cursors are kept, not broadcast
        frame = Receipt(conv=conv, seq=cursor, reader=uid)
        others = [u for u in members if u != uid]
        try:
            grouped = await self.routes.group_by_gateway(others)
        except ImkitError:  # the route table is unreachable: receipts are stored anyway
            return
        for gateway, routes in grouped.items():
            self._publish(gateway, Deliver(targets=tuple(routes), frames=(frame,)))

    def kick_route(self, route: Route, code: int, reason: str = "") -> None:
        """Ask the gateway holding ``route`` to close that connection."""
        self._publish(route.gateway, KickRoute(route=route, code=code, reason=reason))
