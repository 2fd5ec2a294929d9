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
      earlier sync requests).
    * :meth:`Logic.receipt` moves the reader's read cursor (``store.set_read``)
      and tells the other members of a small conversation.

Policies
    * Nothing is published before it is stored; the bus carries notifications of
      stored messages, so a lost envelope costs a resync, never a message.
    * A message body is at most ``max_body`` bytes (``TOO_LARGE`` otherwise); a
      sender must be a member (``NOT_MEMBER``); a 1:1 conversation
      (:func:`imkit.store.direct_conv_id`) is created on its first message.
    * A sync answer stays below ``sync_budget`` bytes: what does not fit is
      announced with ``more=True`` and fetched by the client's follow-up sync.
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
from collections.abc import Callable, Iterable, Sequence
from typing import TypeAlias

import attrs

from examples.routes import RouteService
from imkit.aio import DeadlineTimer, MemoryBus
from imkit.errors import (
    CapacityError,
    ConfigError,
    ConversationNotFound,
    ImkitError,
    StoreError,
)
from imkit.merger import (
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_SIGNAL_WINDOW_MS,
    DEFAULT_WINDOW_MS,
    MessageMerger,
    Release,
    ReleaseKind,
    SignalAggregator,
)
from imkit.protocol import ErrorCode, Message, Notify, Push, Receipt, SyncPage
from imkit.routetable import Route
from imkit.seq import IdGenerator
from imkit.store import MessageStore, StoredMessage, direct_conv_id

__all__ = [
    "DEFAULT_FANOUT_TIMEOUT_MS",
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_DEVICES",
    "DEFAULT_MAX_SYNC_PAGES",
    "DEFAULT_PUSH_FANOUT_MAX",
    "DEFAULT_SYNC_BUDGET",
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
#: A merged fan-out that some gateway took but never confirmed (it died with the
#: envelope queued) frees its merger slot after this long. (An envelope nobody
#: took -- a gateway with no bus subscription -- frees its part at once.)
DEFAULT_FANOUT_TIMEOUT_MS = 5_000


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
    merge_window_ms: int = DEFAULT_WINDOW_MS
    merge_inflight: int = DEFAULT_MAX_INFLIGHT
    signal_window_ms: int = DEFAULT_SIGNAL_WINDOW_MS
    node: int = 0  # IdGenerator node of this logic process (0-1023)

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.write_fanout_max <= self.push_fanout_max:
            raise ConfigError("need 0 <= write_fanout_max <= push_fanout_max")
        for name in ("max_body", "sync_budget", "max_sync_pages", "max_devices"):
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
        "duplicates",
        "envelopes",
        "notifies",
        "pushes",
        "receipts",
        "refused",
        "sends",
        "syncs",
        "unrouted",
    )

    def __init__(self) -> None:
        self.sends = 0  # messages stored
        self.duplicates = 0  # resent cids answered from the store
        self.refused = 0  # sends refused (not a member, too large, store full)
        self.envelopes = 0  # bus publishes
        self.pushes = 0  # push deliveries addressed (message x route)
        self.notifies = 0  # pull signals addressed
        self.syncs = 0
        self.receipts = 0
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


def _push(m: StoredMessage) -> Push:
    return Push(
        conv=m.conv, seq=m.seq, sender=m.sender, body=m.body, msg_id=m.msg_id, server_ms=m.server_ms
    )


class Logic:
    """The logic server of the reference system (one per process here).

    ``store`` is any :class:`~imkit.store.MessageStore`; ``routes`` the shared
    :class:`~examples.routes.RouteService`; ``bus`` the bus the gateways subscribe
    to (subject = gateway id). Create it inside a running loop. Costs:
    :meth:`send` O(1) for the store plus O(members) for a fan-out; :meth:`sync`
    O(conversations listed + messages returned).
    """

    def __init__(
        self,
        *,
        store: MessageStore,
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
        # merged fan-outs not yet completed (insertion-ordered set); one per merger
        # slot in flight, so bounded by the merger (groups x merge_inflight)
        self._open: dict[FanoutTicket, None] = {}
        self._closed = False

    def close(self) -> None:
        """Stop the timers; pending signals are dropped (clients resync on reconnect)."""
        self._closed = True
        self._merge_timer.close()
        self._signal_timer.close()

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
            if not store.is_member(uid, conv) and not self._open_direct(uid, conv):
                self.stats.refused += 1
                return ErrorCode.NOT_MEMBER
            msg_id = self._ids.next_id(_wall_ms())
            msg = store.append(conv, uid, cid, body, now_ms=_wall_ms(), msg_id=msg_id)
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
            self.stats.duplicates += 1  # a resend: stored before, fanned out before
            return msg
        self.stats.sends += 1
        self._fan_out(msg)
        return msg

    def _open_direct(self, uid: str, conv: str) -> bool:
        """Create the 1:1 conversation ``conv`` if ``uid`` is one of its two users."""
        pair = parse_direct(conv)
        if pair is None or uid not in pair:
            return False
        if not all(self.store.has_user(u) for u in pair):
            return False
        self.store.create_direct(*pair)
        return True

    def _fan_out(self, msg: StoredMessage) -> None:
        store = self.store
        members = store.members(msg.conv)
        cfg = self.config
        push = _push(msg)
        if len(members) <= cfg.write_fanout_max:
            try:
                store.inbox_add(members, msg.conv, msg.seq)
            except ImkitError:
                logger.exception("inbox write failed for %s", msg.conv)  # push anyway
            self._publish_pushes(members, (push,), None)
        elif len(members) <= cfg.push_fanout_max:
            now = self._merge_timer.now_ms()
            try:
                releases = self.merger.offer(msg.conv, msg.seq, push, _size(push), now)
            except CapacityError:  # max_groups: tell the members to pull instead
                self._signal(members, msg.conv, msg.seq)
            else:
                self._release(releases)
            self._merge_timer.rearm()
        else:
            self._signal(members, msg.conv, msg.seq)

    def _publish_pushes(
        self, uids: Iterable[str], pushes: tuple[Push, ...], on_done: Callable[[], object] | None
    ) -> None:
        by_gateway = self.routes.group_by_gateway(uids)
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
            members = self.store.members(group)
            if r.kind is ReleaseKind.PUSH:
                done = functools.partial(self._merge_done, group)
                self._publish_pushes(members, r.messages, done)
            else:  # the queue overflowed: members pull up to last_seq
                self._signal(members, group, r.last_seq)
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
            self._release(self.merger.done(group))
            self._merge_timer.rearm()

    def _merge_due(self, now_ms: int) -> None:
        self._release(self.merger.due(now_ms))

    def _signal(self, members: Iterable[str], conv: str, seq: int) -> None:
        routes = self.routes
        online = [u for u in members if routes.lookup(u)]
        now = self._signal_timer.now_ms()
        self._send_signals(self.signals.offer_many(online, conv, seq, now))
        self._signal_timer.rearm()

    def _signals_due(self, now_ms: int) -> None:
        self._send_signals(self.signals.due(now_ms))

    def _send_signals(self, signals: list[tuple[str, tuple[tuple[str, int], ...]]]) -> None:
        if not signals:
            return
        by_gateway: dict[str, list[tuple[Route, Notify]]] = {}
        for user, entries in signals:
            notify = Notify(entries=entries)
            for route in self.routes.lookup(user):
                by_gateway.setdefault(route.gateway, []).append((route, notify))
        for gateway, items in by_gateway.items():
            self.stats.notifies += len(items)
            self._publish(gateway, Signals(items=tuple(items)))

    # -- sync ---------------------------------------------------------------------------------

    def note_cursor(self, uid: str, device: str, conv: str, seq: int) -> None:
        """``device`` of ``uid`` holds ``conv`` contiguously up to ``seq`` (its own claim). O(1).

        Claims come from cumulative push acks and sync requests; they only make an
        inbox sync start later (a claim that is too high only hurts its claimant).
        """
        key = (uid, device)
        cursors = self._cursors.get(key)
        if cursors is None:
            if not self.store.is_member(uid, conv):
                return
            cursors = self._cursors[key] = {}
            if len(self._cursors) > self.config.max_devices:
                self._cursors.popitem(last=False)
        else:
            self._cursors.move_to_end(key)
            if conv not in cursors and not self.store.is_member(uid, conv):
                return
        if seq > cursors.get(conv, 0):
            cursors[conv] = seq

    async def sync(
        self, uid: str, device: str, after: Sequence[tuple[str, int]], limit: int
    ) -> list[SyncPage]:
        """The pages answering a SyncRequest (see the module doc). O(convs + messages)."""
        self.stats.syncs += 1
        store = self.store
        cfg = self.config
        wanted: list[tuple[str, int]] = []
        if after:
            for conv, seq in after[: cfg.max_sync_pages]:
                self.note_cursor(uid, device, conv, seq)
                wanted.append((conv, seq))
        else:
            known = self._cursors.get((uid, device), {})
            for conv in sorted(store.conversations_of(uid)):
                start = known.get(conv, 0)
                if store.last_seq(conv) > start:
                    wanted.append((conv, start))
                    if len(wanted) >= cfg.max_sync_pages:
                        break  # the rest come with the next inbox sync
        budget = cfg.sync_budget
        pages: list[SyncPage] = []
        for conv, seq in wanted:
            if budget <= 0 or not store.is_member(uid, conv):
                # out of budget: an empty page with more=True makes the client ask again;
                # not a member: an empty final page (nothing there for this user)
                pages.append(SyncPage(conv=conv, messages=(), more=budget <= 0))
                continue
            page = store.read(conv, seq, limit)
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
        return pages

    def resync_entries(self, uid: str) -> list[tuple[str, int]]:
        """(conv, last seq) of every conversation of ``uid`` with messages: a catch-all Notify."""
        store = self.store
        out = []
        for conv in store.conversations_of(uid):
            last = store.last_seq(conv)
            if last:
                out.append((conv, last))
        return out

    # -- receipts -------------------------------------------------------------------------------

    async def receipt(self, uid: str, conv: str, seq: int) -> None:
        """``uid`` read ``conv`` up to ``seq``: move its cursor, tell the others (small convs)."""
        store = self.store
        try:
            cursor = store.set_read(uid, conv, seq)
        except (StoreError, ConfigError):
            return  # not a member, or a seq that does not exist: ignored
        self.stats.receipts += 1
        members = store.members(conv)
        if len(members) > self.config.write_fanout_max:
            return  # big groups: read cursors are kept, not broadcast
        frame = Receipt(conv=conv, seq=cursor, reader=uid)
        others = [u for u in members if u != uid]
        for gateway, routes in self.routes.group_by_gateway(others).items():
            self._publish(gateway, Deliver(targets=tuple(routes), frames=(frame,)))

    def kick_route(self, route: Route, code: int, reason: str = "") -> None:
        """Ask the gateway holding ``route`` to close that connection."""
        self._publish(route.gateway, KickRoute(route=route, code=code, reason=reason))
