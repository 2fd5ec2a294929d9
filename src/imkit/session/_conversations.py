"""The client's way in: one SeqWindow per conversation, cursors, and the syncs that fill gaps.

Part of :class:`~imkit.session.ClientSession` (see ``_common.py``). Every push
and every sync page goes through the conversation's
:class:`~imkit.dedup.SeqWindow`, so the application sees each message once and in
seq order; what it releases becomes :class:`~imkit.session.MessageReceived`, and
each accepted push is acknowledged (cumulatively up to what is held without a
gap, singly beyond it). A gap left open for ``gap_delay_ms`` is synced; one
sync request is outstanding at a time, asked again after ``sync_timeout_ms``.

At most ``max_conversations`` windows: past it an idle window is evicted and its
cursor kept (at most ``max_cursors``, the oldest forgotten first) or restored by
the application's ``cursor_loader``.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable

from imkit.dedup import SeqWindow, Verdict
from imkit.errors import CapacityError
from imkit.protocol import Notify, Push, PushAck, PushBatch, SyncRequest, SyncResponse
from imkit.session._common import GAP, SYNC, ClientStats, TimerItem
from imkit.session._config import ClientConfig
from imkit.session._events import MessageReceived, Output
from imkit.timingwheel import TimerHandle, TimingWheel

__all__ = ["Conversations", "CursorLoader"]

#: ``cursor_loader(conv) -> seq``: the last seq of ``conv`` the application holds
#: (0 if none); called when the session starts tracking a conversation.
CursorLoader = Callable[[str], int]


class Conversations:
    """The windows, cursors and syncs of one :class:`~imkit.session.ClientSession`.

    Windows and cursors live across connections; gap timers and sync requests live
    only while connected. Costs: a push O(1) (O(log held) when out of order), a
    sync page O(messages), a sync request O(conversations listed).
    """

    def __init__(
        self,
        cfg: ClientConfig,
        *,
        wheel: TimingWheel[TimerItem],
        stats: ClientStats,
        cursor_loader: CursorLoader | None,
    ) -> None:
        self._wheel = wheel
        self._stats = stats
        self._cursor_loader = cursor_loader
        self._max_conversations = cfg.max_conversations
        self._max_cursors = cfg.max_cursors
        self._max_held = cfg.max_held
        self._gap_delay_ms = cfg.gap_delay_ms
        self._sync_limit = cfg.sync_limit
        self._sync_timeout_ms = cfg.sync_timeout_ms
        self._max_sync_convs = cfg.max_sync_convs
        self._live = False  # a transport is up: syncs may be sent
        self._cursors: dict[str, int] = {}  # evicted windows' contiguous seqs, oldest first
        self.windows: dict[str, SeqWindow[Push]] = {}
        self._gap: dict[str, TimerHandle[TimerItem]] = {}
        self._sync_inbox = False  # an inbox sync (after=()) is wanted
        self._sync_wanted: dict[str, None] = {}  # conversations to sync (ordered set)
        # conversations to sync that had no free window (bounded by max_conversations)
        self._deferred: dict[str, None] = {}
        self._inbox_after_deferred = False
        self._sync_req: int | None = None  # the outstanding request
        self._sync_after: dict[str, int] | None = None  # its listed cursors; None: inbox
        self._sync_handle: TimerHandle[TimerItem] | None = None
        self._next_req_id = 1

    # -- queries -----------------------------------------------------------------------

    def contiguous(self, conv: str) -> int | None:
        """The last seq of ``conv`` delivered with nothing missing, or None if untracked. O(1)."""
        w = self.windows.get(conv)
        return None if w is None else w.contiguous

    # -- connection --------------------------------------------------------------------

    def connect(self, now_ms: int, out: list[Output]) -> None:
        """A transport is up: ask for everything after our cursors (an inbox sync). O(1)."""
        self._live = True
        self._sync_inbox = True
        self.maybe_sync(now_ms, out)

    def drop(self) -> None:
        """The transport is gone: stop gap and sync timers; keep windows and cursors. O(gaps)."""
        self._live = False
        for h in self._gap.values():
            h.cancel()
        self._gap.clear()
        self._sync_wanted.clear()
        self._deferred.clear()  # the inbox sync of the next connection covers them
        self._inbox_after_deferred = False
        self._sync_inbox = False
        self._sync_req = None
        self._sync_after = None
        if self._sync_handle is not None:
            self._sync_handle.cancel()
            self._sync_handle = None

    # -- application -------------------------------------------------------------------

    def set_cursor(self, conv: str, seq: int) -> None:
        """Track ``conv`` after ``seq``; only moves forward. CapacityError when full. O(1)."""
        w = self.windows.get(conv)
        if w is None:
            w = self._new_window(conv, seq)
            if w is None:
                raise CapacityError("max_conversations", self._max_conversations)
        elif seq > w.contiguous:
            w.skip_to(seq)

    def sync(self, now_ms: int, convs: Iterable[str] | None, out: list[Output]) -> None:
        """Want a sync of ``convs`` (``None``: every conversation); send it if none is out."""
        if convs is None:
            self._sync_inbox = True
        else:
            for conv in convs:
                self._want(conv)
        self.maybe_sync(now_ms, out)

    # -- frames ------------------------------------------------------------------------

    def on_push(self, p: Push, now_ms: int, out: list[Output]) -> None:
        """One pushed message: deliver what it releases, acknowledge it. O(1) in order."""
        # the common case, kept apart from on_pushes for speed; same rules
        seq = p.seq
        conv = p.conv
        w = self.windows.get(conv)
        if w is None or seq < 1:
            self.on_pushes((p,), now_ms, out)
            return
        if not self._offer(w, p, out):
            return
        held = seq > w.contiguous
        out.append(PushAck(conv=conv, seq=seq, cumulative=not held))
        if held or conv in self._gap:
            self._watch_gap(conv, w, now_ms)

    def _offer(self, w: SeqWindow[Push], p: Push, out: list[Output]) -> bool:
        """Offer one message to its window and deliver what it releases. O(1) in order.

        Returns False if it was dropped (unacknowledged: the server retries, or a
        sync fetches it). The window has ``max_held + 1`` places and keeps its last
        one for the message that closes the gap, so early messages may fill
        ``max_held`` and the gap-closer is always accepted.
        """
        seq = p.seq
        try:
            verdict = w.offer(seq, p)
        except CapacityError:  # an early push past max_held
            self._stats.pushes_dropped += 1
            return False
        if verdict is not Verdict.NEW:
            self._stats.duplicate_pushes += 1
        elif seq <= w.contiguous:
            for _, push in w.pop_ready():
                out.append(MessageReceived(push=push))
        return True

    def on_push_batch(self, m: PushBatch, now_ms: int, out: list[Output]) -> None:
        """Several pushed messages in one frame. O(messages)."""
        self.on_pushes(m.pushes, now_ms, out)

    def on_pushes(self, pushes: Iterable[Push], now_ms: int, out: list[Output]) -> None:
        """Offer each push, then ack each conversation as few frames as possible. O(pushes)."""
        touched: dict[str, SeqWindow[Push]] = {}
        accepted: list[Push] = []
        stats = self._stats
        for p in pushes:
            if p.seq < 1:
                stats.unexpected_frames += 1  # seqs start at 1; 0 is a broken server
                continue
            conv = p.conv
            w = touched.get(conv)
            if w is None:
                w = self._window(conv)
                if w is None:
                    stats.pushes_dropped += 1  # unacked: the server retries, we sync later
                    self._want(conv)
                    continue
                touched[conv] = w
            if self._offer(w, p, out):
                accepted.append(p)
        # Ack: cumulatively up to the highest pushed seq we hold contiguously (never
        # above what this connection pushed), singly for pushes held beyond a gap.
        cumulative: dict[str, int] = {}
        for p in accepted:
            if p.seq <= touched[p.conv].contiguous:
                if p.seq > cumulative.get(p.conv, 0):
                    cumulative[p.conv] = p.seq
            else:
                out.append(PushAck(conv=p.conv, seq=p.seq, cumulative=False))
        for conv, seq in cumulative.items():
            out.append(PushAck(conv=conv, seq=seq))
        for conv, w in touched.items():
            self._watch_gap(conv, w, now_ms)

    def on_sync_response(self, m: SyncResponse, now_ms: int, out: list[Output]) -> None:
        """A sync page set: deliver, skip to a listed page's start, ask for more. O(messages)."""
        listed: dict[str, int] | None = None
        if m.req_id == self._sync_req:
            listed = self._sync_after if self._sync_after is not None else {}
            self._sync_req = None
            self._sync_after = None
            if self._sync_handle is not None:
                self._sync_handle.cancel()
                self._sync_handle = None
        else:
            self._stats.stale_sync_responses += 1  # still useful: offer without skipping
            listed = {}
        touched: dict[str, SeqWindow[Push]] = {}
        for page in m.pages:
            conv = page.conv
            w = self._window(conv)
            if w is None:
                self._stats.pushes_dropped += len(page.messages)
                self._want(conv)  # synced again once a window is free
                continue
            touched[conv] = w
            # skip_to is only sound for a conversation we listed: the page then holds
            # every message after our cursor at request time, in seq order.
            skip = conv in listed
            for p in page.messages:
                if p.conv != conv or p.seq < 1:
                    self._stats.unexpected_frames += 1
                    continue
                if skip and p.seq - 1 > w.contiguous:
                    w.skip_to(p.seq - 1)
                    for _, push in w.pop_ready():  # held messages the skip released
                        out.append(MessageReceived(push=push))
                if not self._offer(w, p, out):
                    skip = False  # the rest is no longer "right after" what we hold
            if page.more:
                self._sync_wanted[conv] = None
        for conv, w in touched.items():
            self._watch_gap(conv, w, now_ms)
        self.maybe_sync(now_ms, out)

    def on_notify(self, m: Notify, now_ms: int, out: list[Output]) -> None:
        """The server has news for these conversations: sync those we are behind in."""
        for conv, seq in m.entries:
            w = self.windows.get(conv)
            if w is None or seq > w.contiguous:
                self._want(conv)
        self.maybe_sync(now_ms, out)

    # -- windows -----------------------------------------------------------------------

    def _want(self, conv: str) -> None:
        """Sync ``conv`` soon: listed if it has (or gets) a window, else deferred."""
        if self._window(conv) is not None:
            self._sync_wanted[conv] = None
        elif conv not in self._deferred:
            if len(self._deferred) < self._max_conversations:
                self._deferred[conv] = None
            else:
                self._inbox_after_deferred = True  # too many to remember: ask for all later

    def _window(self, conv: str, keep: Container[str] = ()) -> SeqWindow[Push] | None:
        w = self.windows.get(conv)
        if w is not None:
            return w
        after = self._cursors.get(conv, 0)
        if self._cursor_loader is not None:
            after = max(after, self._cursor_loader(conv))
        w = self._new_window(conv, after, keep)
        if w is not None:
            self._cursors.pop(conv, None)
        return w

    def _new_window(
        self, conv: str, after: int, keep: Container[str] = ()
    ) -> SeqWindow[Push] | None:
        windows = self.windows
        if len(windows) >= self._max_conversations:
            victim = next(
                (
                    c
                    for c, w in windows.items()
                    if w.highest_seen == w.contiguous
                    and not w.pending
                    and c not in self._gap
                    and c not in self._sync_wanted
                    and (self._sync_after is None or c not in self._sync_after)
                    and c not in keep
                ),
                None,
            )
            if victim is None:
                return None
            self._remember(victim, windows.pop(victim).contiguous)
            self._stats.windows_evicted += 1
        # one slot above max_held: room for the message that closes a gap (see _offer)
        w: SeqWindow[Push] = SeqWindow(after, max_pending=self._max_held + 1)
        windows[conv] = w
        return w

    def _remember(self, conv: str, contiguous: int) -> None:
        """Keep an evicted window's cursor (bounded: the oldest is forgotten). O(1)."""
        cursors = self._cursors
        if contiguous <= 0:
            return
        if conv not in cursors and len(cursors) >= self._max_cursors:
            del cursors[next(iter(cursors))]
            self._stats.cursors_forgotten += 1
        cursors[conv] = contiguous

    def _watch_gap(self, conv: str, w: SeqWindow[Push], now_ms: int) -> None:
        h = self._gap.get(conv)
        if w.highest_seen > w.contiguous:
            if h is None and conv not in self._sync_wanted:
                self._gap[conv] = self._wheel.add(now_ms + self._gap_delay_ms, (GAP, conv))
        elif h is not None:
            h.cancel()
            del self._gap[conv]

    # -- sync requests -----------------------------------------------------------------

    def maybe_sync(self, now_ms: int, out: list[Output]) -> None:
        """Send the next sync request if none is outstanding. O(convs listed)."""
        if self._sync_req is not None or not self._live:
            return
        if self._sync_inbox:
            self._sync_inbox = False
            after: tuple[tuple[str, int], ...] = ()
            self._sync_after = None
        elif self._sync_wanted:
            wanted = self._sync_wanted
            take = []
            for conv in wanted:
                take.append(conv)
                if len(take) >= self._max_sync_convs:
                    break
            listed: dict[str, int] = {}
            for conv in take:
                del wanted[conv]
                w = self.windows.get(conv)
                if w is not None:
                    listed[conv] = w.contiguous
            if not listed:
                return
            after = tuple(listed.items())
            self._sync_after = listed
        elif self._deferred:
            # conversations the server has news for that had no free window
            listed = {}
            for conv in list(self._deferred):
                w = self._window(conv, keep=listed)
                if w is None:
                    break  # every window is busy: retried after the next answer
                del self._deferred[conv]
                listed[conv] = w.contiguous
                if len(listed) >= self._max_sync_convs:
                    break
            if not listed:
                return
            after = tuple(listed.items())
            self._sync_after = listed
        elif self._inbox_after_deferred:
            self._inbox_after_deferred = False
            after = ()
            self._sync_after = None
        else:
            return
        req_id = self._next_req_id
        self._next_req_id = req_id + 1
        self._sync_req = req_id
        self._sync_handle = self._wheel.add(now_ms + self._sync_timeout_ms, (SYNC, req_id))
        out.append(SyncRequest(req_id=req_id, after=after, limit=self._sync_limit))

    # -- timers ------------------------------------------------------------------------

    def on_timer(self, kind: int, key: object, now_ms: int, out: list[Output]) -> None:
        """A gap left open for ``gap_delay_ms``, or a sync left unanswered. O(1)."""
        if kind == GAP:
            assert isinstance(key, str)
            self._on_gap_timer(key, now_ms, out)
        elif kind == SYNC:
            assert isinstance(key, int)
            self._on_sync_timer(key, now_ms, out)

    def _on_gap_timer(self, conv: str, now_ms: int, out: list[Output]) -> None:
        self._gap.pop(conv, None)
        w = self.windows.get(conv)
        if w is not None and w.highest_seen > w.contiguous:
            self._sync_wanted[conv] = None
            self.maybe_sync(now_ms, out)

    def _on_sync_timer(self, req_id: int, now_ms: int, out: list[Output]) -> None:
        if req_id != self._sync_req:
            return
        self._stats.sync_timeouts += 1
        if self._sync_after is None:
            self._sync_inbox = True
        else:
            for conv in self._sync_after:
                self._sync_wanted[conv] = None
        self._sync_req = None
        self._sync_after = None
        self._sync_handle = None
        self.maybe_sync(now_ms, out)

    # -- invariants --------------------------------------------------------------------

    def _check(self, connected: bool) -> None:
        """Assert every invariant of the conversations (``connected``: the session's view)."""

        def fail(msg: str) -> None:
            raise AssertionError(f"Conversations: {msg}")

        if connected != self._live:
            fail(f"live={self._live} while connected={connected}")
        if len(self._cursors) > self._max_cursors:
            fail(f"{len(self._cursors)} cursors > max_cursors {self._max_cursors}")
        if any(c in self.windows for c in self._cursors):
            fail("a conversation has both a window and an evicted cursor")
        if len(self.windows) > self._max_conversations:
            fail("more windows than max_conversations")
        for w in self.windows.values():
            w._check()
            if w.pending and w.highest_seen == w.contiguous:
                fail("a window holds released messages nobody popped")
            if w.pending > self._max_held:
                fail("a window holds more than max_held messages")
        for conv, h in self._gap.items():
            if conv not in self.windows:
                fail(f"gap timer for untracked {conv!r}")
            if not h.pending:
                fail(f"gap timer for {conv!r} not pending")
        if not set(self._sync_wanted) <= set(self.windows):
            fail("sync wanted for an untracked conversation")
        if len(self._deferred) > self._max_conversations:
            fail("more deferred syncs than max_conversations")
        if (self._sync_req is None) != (self._sync_handle is None):
            fail("outstanding sync and its timer out of step")
        if self._sync_req is None and self._sync_after is not None:
            fail("listed cursors without an outstanding sync")
        if not connected and (
            self._gap or self._sync_req is not None or self._sync_wanted or self._deferred
        ):
            fail("sync work while disconnected")
