"""The client's way out: sends (queued, in flight, retried) and the pacer every frame passes.

Part of :class:`~imkit.session.ClientSession` (see ``_common.py``). The outbox
numbers sends with increasing cids and keeps each until it is answered: at most
``max_in_flight`` transmitted (lowered to the quota a server announces), the
newest less than ``max_cid_span`` above the oldest, the rest queued (at most
``max_queued``). A transmitted send is retried from the wheel on
``send_retry``'s schedule while connected, and resent on every new connection.

Every frame after Login then takes a token of the connection's pacer (the
server's announced rate and burst, scaled down by the pace margins); a frame
without a token waits in order. Push acks and read receipts wait coalesced per
conversation. The outbox is "connected" exactly while it has a pacer.
"""

from __future__ import annotations

import random
from collections import deque

from imkit.errors import CapacityError
from imkit.policy import ExponentialBackoff, TokenBucket, rto_update
from imkit.protocol import ErrorCode, Login, LoginAck, Message, PushAck, Receipt, Send, SendAck
from imkit.session._common import (
    HOLD,
    MAX_RETRY_HINT_MS,
    PACE,
    SEND,
    ClientStats,
    TimerItem,
)
from imkit.session._config import ClientConfig
from imkit.session._events import Output, SendAcked, SendFailed, SessionEvent
from imkit.session._limits import DEFAULT_FRAME_BURST, DEFAULT_MAX_FRAMES_PER_S, pace_limits
from imkit.timingwheel import TimerHandle, TimingWheel

__all__ = ["Outbox"]

# SendAck error codes after which the send is retried rather than failed
_RETRYABLE = frozenset(
    {ErrorCode.INTERNAL, ErrorCode.SERVER_BUSY, ErrorCode.RATE_LIMITED, ErrorCode.QUOTA_EXCEEDED}
)
# Error codes whose retry_after_ms holds new sends and due retries
_HOLD_CODES = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.QUOTA_EXCEEDED, ErrorCode.SERVER_BUSY})


class _Outgoing:
    """A transmitted, unacknowledged send."""

    __slots__ = ("handle", "msg", "retries", "rto_ms", "sent", "sent_ms")

    def __init__(self, msg: Send, sent_ms: int, rto_ms: int | None) -> None:
        self.msg = msg
        self.retries = 0  # timer-driven retransmissions on a live connection
        self.sent = 0  # transmissions in all (first, retries, reconnect resends)
        self.sent_ms = sent_ms  # the first transmission
        self.rto_ms = rto_ms  # its first timeout (None: a jittered policy)
        self.handle: TimerHandle[TimerItem] | None = None


class Outbox:
    """Sends and pacing of one :class:`~imkit.session.ClientSession`, across connections.

    Costs: a send O(1); an answer O(1); a flush O(frames in it + frames released).
    """

    def __init__(
        self,
        cfg: ClientConfig,
        *,
        first_cid: int,
        wheel: TimingWheel[TimerItem],
        stats: ClientStats,
        rng: random.Random,
        now_ms: int,
    ) -> None:
        self.next_cid = first_cid
        self._wheel = wheel
        self._stats = stats
        self._rng = rng
        self._send_retry = send_retry = cfg.send_retry
        # without jitter the first delay is a constant: skip the policy call per send
        self._first_retry_ms = (
            send_retry.delay_ms(0) if isinstance(send_retry, ExponentialBackoff) else None
        )
        # the server's answer time (RFC 6298; 0 = no sample): the first send timeout
        self._srtt_ms = 0
        self._rttvar_ms = 0
        self._rto_ms = self._first_retry_ms
        self._max_rto_ms = cfg.max_send_rto_ms
        self._max_in_flight = cfg.max_in_flight
        self._max_queued = cfg.max_queued
        self._max_cid_span = cfg.max_cid_span
        # lowered to the quota a server announced (kept across reconnects: the
        # resends pipelined after the next Login must fit it too)
        self.flight_cap = cfg.max_in_flight
        self.hold_until_ms = now_ms
        self._hold_handle: TimerHandle[TimerItem] | None = None
        self.queue: deque[Send] = deque()
        self.in_flight: dict[int, _Outgoing] = {}
        # pacing: every frame after Login takes a token of this connection's bucket
        self._pace_rate_percent = cfg.pace_rate_percent
        self._pace_burst_percent = cfg.pace_burst_percent
        self._ack_delay_ms = cfg.ack_delay_ms
        self.pacer: TokenBucket | None = None
        # (max_frames_per_s, frame_burst) the last server announced
        self._announced = (DEFAULT_MAX_FRAMES_PER_S, DEFAULT_FRAME_BURST)
        self._paced = 0  # frames paid for on this connection
        self._held: deque[Message] = deque()  # frames waiting for a token, in order
        self._acks_due: dict[str, int] = {}  # conv -> cumulative ack waiting
        self._singles_due: dict[tuple[str, int], None] = {}  # single acks waiting
        self._acks_since_ms = now_ms  # when the oldest waiting ack became due
        self._receipts_due: dict[str, int] = {}  # conv -> read receipt waiting
        self._pump_blocked = False  # the queue waits for tokens, not for the window
        self._pace_handle: TimerHandle[TimerItem] | None = None

    # -- queries -----------------------------------------------------------------------

    def unacknowledged(self) -> list[Send]:
        """Every send without an answer yet (in flight, then queued), in cid order. O(n)."""
        return [e.msg for e in self.in_flight.values()] + list(self.queue)

    # -- connection --------------------------------------------------------------------

    def connect(self, now_ms: int, out: list[Output]) -> None:
        """A transport is up (Login is in ``out``): resend every send in flight, then pump.

        Until the server announces its limits, pace for what the last one announced
        (the servers of a cluster share a config), or for the defaults. Resends
        after a reconnect do not count as retries. O(in flight).
        """
        self.hold_until_ms = now_ms
        rate, burst = self._pace_rate(*self._announced)
        self.pacer = TokenBucket(rate_per_s=rate, burst=burst, now_ms=now_ms)
        self._paced = 0
        wheel = self._wheel
        for cid, e in self.in_flight.items():
            e.sent += 1
            self._stats.resends += 1
            e.handle = wheel.add(now_ms + self._retry_ms(e.retries), (SEND, cid))
            out.append(e.msg)
        self.pump(now_ms, out)

    def logged_in(self, m: LoginAck, now_ms: int) -> None:
        """A version 2 LoginAck: pace for the announced rate, cap sends at its quota. O(1)."""
        if m.max_frames_per_s > 0 and m.frame_burst > 0:
            self._announced = (m.max_frames_per_s, m.frame_burst)
            rate, burst = self._pace_rate(m.max_frames_per_s, m.frame_burst)
            pacer = TokenBucket(rate_per_s=rate, burst=burst, now_ms=now_ms)
            # the frames sent since Login count against the server's bucket too
            pacer.take(now_ms, min(self._paced, burst))
            self.pacer = pacer
        if m.max_sends_in_flight > 0:
            self.flight_cap = min(self._max_in_flight, m.max_sends_in_flight)

    def _pace_rate(self, max_frames_per_s: int, frame_burst: int) -> tuple[int, int]:
        return pace_limits(
            max_frames_per_s,
            frame_burst,
            rate_percent=self._pace_rate_percent,
            burst_percent=self._pace_burst_percent,
        )

    def drop(self) -> None:
        """The transport is gone: stop every timer, forget waiting acks; keep sends. O(n)."""
        for e in self.in_flight.values():
            if e.handle is not None:
                e.handle.cancel()
                e.handle = None
        if self._hold_handle is not None:
            self._hold_handle.cancel()
        self.pacer = None
        self._held.clear()
        self._acks_due.clear()
        self._singles_due.clear()
        self._receipts_due.clear()
        self._pump_blocked = False
        if self._pace_handle is not None:
            self._pace_handle.cancel()

    def close(self) -> None:
        """Put in-flight sends back in the queue so that unacknowledged() stays whole. O(n)."""
        if self.in_flight:
            self.queue.extendleft(reversed([e.msg for e in self.in_flight.values()]))
            self.in_flight.clear()

    # -- sends -------------------------------------------------------------------------

    def send(self, conv: str, body: bytes, now_ms: int, wall_ms: int, out: list[Output]) -> int:
        """Queue a message; transmit what the window allows if connected. O(1).

        CapacityError when ``max_queued`` sends wait already.
        """
        if len(self.queue) >= self._max_queued:
            raise CapacityError("max_queued", self._max_queued, "too many unsent messages")
        cid = self.next_cid
        self.next_cid = cid + 1
        self.queue.append(Send(cid=cid, conv=conv, body=body, client_ms=wall_ms))
        if self.pacer is not None:
            self.pump(now_ms, out)
        return cid

    def pump(self, now_ms: int, out: list[Output]) -> None:
        """Move queued sends into flight while the window allows. O(moved)."""
        queue = self.queue
        if not queue or self.pacer is None or now_ms < self.hold_until_ms:
            return
        in_flight = self.in_flight
        wheel = self._wheel
        first = self._retry_ms(0)
        # no more sends than tokens: a send waiting for a token waits in the queue,
        # where its retry timer does not run
        pacer = self.pacer
        pacer.retry_after_ms(now_ms)  # refill
        budget = int(pacer.tokens) - len(self._held)
        self._pump_blocked = False
        cap = self.flight_cap
        while queue and len(in_flight) < cap:
            msg = queue[0]
            if in_flight and msg.cid - next(iter(in_flight)) >= self._max_cid_span:
                break  # wait for the oldest send to settle
            if budget <= 0:
                self._pump_blocked = True  # the pace timer pumps again
                break
            budget -= 1
            queue.popleft()
            e = _Outgoing(msg, now_ms, self._rto_ms)
            e.sent = 1
            e.handle = wheel.add(now_ms + first, (SEND, msg.cid))
            in_flight[msg.cid] = e
            out.append(msg)

    def _retry_ms(self, retries: int, rto: int | None = None) -> int:
        """The wait before retry ``retries`` of a send whose first timeout was ``rto``."""
        first = self._first_retry_ms
        if rto is None:
            rto = self._rto_ms
        if first is None or rto is None:  # a jittered policy: used as it is
            return self._send_retry.delay_ms(retries, self._rng.random())
        if retries == 0:
            return rto
        # later retries keep the schedule's shape, scaled to the send's first timeout
        return self._send_retry.delay_ms(retries, self._rng.random()) * rto // first

    @property
    def send_timeout_ms(self) -> int | None:
        """The first send timeout now (None: a jittered ``send_retry``, not adapted). O(1)."""
        return self._rto_ms

    def _sample(self, e: _Outgoing, now_ms: int) -> None:
        """Send ``e`` was answered: update the timeout if it went out once (Karn). O(1)."""
        first = self._first_retry_ms
        if e.sent != 1 or first is None:
            return
        self._srtt_ms, self._rttvar_ms, rto = rto_update(
            self._srtt_ms, self._rttvar_ms, now_ms - e.sent_ms
        )
        self._rto_ms = min(max(rto, first), self._max_rto_ms)

    def on_send_ack(self, m: SendAck, now_ms: int, out: list[Output]) -> None:
        """The server's answer to a send: SendAcked, a retry, or SendFailed. O(1)."""
        e = self.in_flight.get(m.cid)
        if e is None or e.msg.conv != m.conv:
            self._stats.unknown_acks += 1  # not (an answer to) a send of ours
            return
        if not m.error:
            del self.in_flight[m.cid]
            if e.handle is not None:
                e.handle.cancel()
            self._sample(e, now_ms)
            out.append(
                SendAcked(
                    cid=m.cid, conv=e.msg.conv, seq=m.seq, msg_id=m.msg_id, server_ms=m.server_ms
                )
            )
            if self.queue:
                self.pump(now_ms, out)
            return
        elif m.error in _RETRYABLE and not self._send_retry.exhausted(e.retries):
            # the server did not take it: resend after the back-off (a retry), or
            # after the server's hint if that is later
            assert e.handle is not None
            hint = min(m.retry_after_ms, MAX_RETRY_HINT_MS)
            e.handle.reschedule(now_ms + max(self._retry_ms(e.retries, e.rto_ms), hint))
            return
        else:
            self._settle(e)
            out.append(SendFailed(cid=m.cid, conv=e.msg.conv, code=m.error, attempts=e.sent))
        self.pump(now_ms, out)

    def _settle(self, e: _Outgoing) -> None:
        del self.in_flight[e.msg.cid]
        if e.handle is not None:
            e.handle.cancel()

    def hold(self, code: int, retry_after_ms: int, now_ms: int) -> None:
        """An Error frame: a quota code with a hint holds new sends and due retries. O(1)."""
        if code in _HOLD_CODES and retry_after_ms > 0:
            until = now_ms + min(retry_after_ms, MAX_RETRY_HINT_MS)
            if until > self.hold_until_ms:
                self.hold_until_ms = until
                if self._hold_handle is None:
                    self._hold_handle = self._wheel.add(until, (HOLD, 0))
                else:
                    self._hold_handle.reschedule(until)

    # -- timers ------------------------------------------------------------------------

    def on_timer(self, kind: int, key: int, now_ms: int, out: list[Output]) -> None:
        """A send retry, the end of a hold, or the pace timer (the flush releases). O(1)."""
        if kind == SEND:
            self._on_send_timer(key, now_ms, out)
        elif kind == HOLD:
            self.pump(now_ms, out)
        # PACE: flush() releases what waits for tokens

    def _on_send_timer(self, cid: int, now_ms: int, out: list[Output]) -> None:
        e = self.in_flight.get(cid)
        if e is None or e.handle is None:
            return
        if now_ms < self.hold_until_ms:
            e.handle.reschedule(self.hold_until_ms)
            return
        retry = self._send_retry
        if retry.exhausted(e.retries):
            self._settle(e)
            out.append(SendFailed(cid=cid, conv=e.msg.conv, code=0, attempts=e.sent))
            self.pump(now_ms, out)
            return
        e.retries += 1
        e.sent += 1
        self._stats.resends += 1
        e.handle.reschedule(now_ms + self._retry_ms(e.retries, e.rto_ms))
        out.append(e.msg)
        first, rto = self._first_retry_ms, self._rto_ms
        if first is not None and rto is not None:
            # a timeout doubles the first timeout of later sends (RFC 6298 5.5) until
            # an answer to a send sent once gives a new estimate
            self._rto_ms = min(max(rto * 2, first), self._max_rto_ms)

    # -- pacing: the one way out for frames ---------------------------------------------

    def flush(self, now_ms: int, out: list[Output]) -> list[Output]:
        """Pass the frames of ``out`` through the pacer; return what to act on now.

        Every frame after Login takes a token of this connection's bucket (the
        server's announced rate and burst, scaled down by the pace margins). A frame
        without a token waits in order (``_held``) and the pace timer says when to
        call ``tick`` again. Push acks and read receipts are coalesced per
        conversation while they wait. Events pass unchanged; without a connection
        ``out`` is returned as it is. O(len(out)) plus the frames released.
        """
        if self.pacer is None:
            return out
        result: list[Output] = []
        for o in out:
            if isinstance(o, SessionEvent):  # CloseConnection included
                result.append(o)
            else:
                self._pace_one(o, now_ms, result)
        self._drain(now_ms, result)
        return result

    def _pace_one(self, m: Message, now_ms: int, result: list[Output]) -> None:
        """Send ``m`` now if it has a token and nothing waits before it; else hold it."""
        t = type(m)
        if t is PushAck:
            assert isinstance(m, PushAck)
            if not self._acks_due and not self._singles_due:
                self._acks_since_ms = now_ms
            if m.cumulative:
                if m.seq > self._acks_due.get(m.conv, 0):
                    self._acks_due[m.conv] = m.seq
            else:
                self._singles_due[m.conv, m.seq] = None
            return
        if t is Receipt:
            assert isinstance(m, Receipt)
            if m.seq > self._receipts_due.get(m.conv, -1):
                self._receipts_due[m.conv] = m.seq
            return
        if t is Login:
            result.append(m)  # before login: the server's bucket does not count it
            return
        pacer = self.pacer
        assert pacer is not None
        if not self._held and pacer.take(now_ms):
            self._paced += 1
            result.append(m)
        else:
            self._held.append(m)

    def _drain(self, now_ms: int, result: list[Output]) -> None:
        """Release waiting frames while tokens last: acks, receipts, held frames, queue.

        Acks go first (they let the server stop tracking pushes), at once while the
        budget holds more than half its burst, else once they waited
        ``ack_delay_ms`` (coalescing meanwhile). Then re-arm the pace timer for
        whatever still waits. O(frames released + conversations waiting).
        """
        pacer = self.pacer
        assert pacer is not None
        if self._acks_due or self._singles_due:
            half = pacer.burst // 2 + 1
            if (
                now_ms >= self._acks_since_ms + self._ack_delay_ms
                or pacer.retry_after_ms(now_ms, half) == 0
            ):
                self._release_acks(now_ms, result)
        if self._receipts_due:
            receipts = self._receipts_due
            while receipts and pacer.take(now_ms):
                conv = next(iter(receipts))
                self._paced += 1
                result.append(Receipt(conv=conv, seq=receipts.pop(conv)))
        held = self._held
        while held and pacer.take(now_ms):
            self._paced += 1
            result.append(held.popleft())
        if self._pump_blocked and not held and self.queue:
            more: list[Output] = []
            self.pump(now_ms, more)
            for m in more:
                assert not isinstance(m, SessionEvent)
                self._pace_one(m, now_ms, result)
        self._arm_pace(now_ms)

    def _release_acks(self, now_ms: int, result: list[Output]) -> None:
        """Write the waiting acks, each conversation's as few frames as possible."""
        pacer = self.pacer
        assert pacer is not None
        cumulative = self._acks_due
        singles = self._singles_due
        for key in list(singles):
            conv, seq = key
            if cumulative.get(conv, 0) >= seq:
                del singles[key]  # a cumulative ack covers it
                self._stats.acks_coalesced += 1
                continue
            if not pacer.take(now_ms):
                return
            del singles[key]
            self._paced += 1
            result.append(PushAck(conv=conv, seq=seq, cumulative=False))
        while cumulative and pacer.take(now_ms):
            conv = next(iter(cumulative))
            self._paced += 1
            result.append(PushAck(conv=conv, seq=cumulative.pop(conv)))
        if not cumulative and not singles:
            self._acks_since_ms = now_ms

    def _arm_pace(self, now_ms: int) -> None:
        """Arm the pace timer for the earliest moment something waiting may go. O(1)."""
        pacer = self.pacer
        assert pacer is not None
        due: int | None = None
        if self._held or self._receipts_due or (self._pump_blocked and self.queue):
            due = now_ms + max(1, pacer.retry_after_ms(now_ms))
        if self._acks_due or self._singles_due:
            ack_due = max(
                self._acks_since_ms + self._ack_delay_ms,
                now_ms + max(1, pacer.retry_after_ms(now_ms)),
            )
            due = ack_due if due is None else min(due, ack_due)
        if due is None:
            if self._pace_handle is not None:
                self._pace_handle.cancel()
        elif self._pace_handle is None:
            self._pace_handle = self._wheel.add(due, (PACE, 0))
        else:
            self._pace_handle.reschedule(due)

    # -- invariants --------------------------------------------------------------------

    def _check(self, connected: bool) -> None:
        """Assert every invariant of the outbox (``connected``: the session's view). O(n)."""

        def fail(msg: str) -> None:
            raise AssertionError(f"Outbox: {msg}")

        if connected != (self.pacer is not None):
            fail(f"pacer present={self.pacer is not None} while connected={connected}")
        first, rto = self._first_retry_ms, self._rto_ms
        if first is not None and rto is not None and not (
            min(first, self._max_rto_ms) <= rto <= max(first, self._max_rto_ms)
        ):
            fail(f"send timeout {rto} ms outside its bounds")
        cids = list(self.in_flight)
        if cids != sorted(cids):
            fail("in-flight sends out of cid order")
        queued = [m.cid for m in self.queue]
        if queued != sorted(queued):
            fail("queued sends out of cid order")
        if cids and queued and cids[-1] >= queued[0]:
            fail("a queued send is older than one in flight")
        if (cids + queued) and max(cids + queued) >= self.next_cid:
            fail("a send has a cid not below next_cid")
        # (a server's LoginAck may lower the cap below what already flies)
        if len(cids) > self._max_in_flight or not 1 <= self.flight_cap <= self._max_in_flight:
            fail("more sends in flight than max_in_flight, or a cap above it")
        waiting = bool(self._held or self._acks_due or self._singles_due or self._receipts_due)
        if self.pacer is None:
            if waiting:
                fail("frames wait for tokens while disconnected")
            if self._pace_handle is not None and self._pace_handle.pending:
                fail("pace timer pending while disconnected")
        else:
            self.pacer._check()
            if waiting and (self._pace_handle is None or not self._pace_handle.pending):
                fail("frames wait for tokens without a pace timer")
        if any(type(m) is PushAck or type(m) is Receipt or type(m) is Login for m in self._held):
            fail("an ack, receipt or Login among the held frames")
        if len(queued) > self._max_queued:
            fail("more sends queued than max_queued")
        if cids and cids[-1] - cids[0] >= self._max_cid_span:
            fail("in-flight cid span over max_cid_span")
        for cid, e in self.in_flight.items():
            if e.msg.cid != cid:
                fail("in-flight entry under the wrong cid")
            pending = e.handle is not None and e.handle.pending
            if pending != connected:
                fail(f"send {cid}: retry timer pending={pending} while connected={connected}")
            if e.sent < e.retries + 1:
                fail(f"send {cid}: fewer transmissions than retries")
