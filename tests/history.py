"""A Jepsen-style history oracle: what was sent, what each application got, what went wrong.

RELIABILITY.md's check, as the reliability harness (``python -m benchmarks.reliability``)
and the tests run it. Every message body is ``sender-counter``. :class:`History`
logs each send (settled ok / failed / unknown by its future) and each message a
client hands to its application; :func:`store_truth` reads what the store holds;
:func:`check_history` compares the three and counts:

* **lost** — an acknowledged message some member of its conversation never got;
* **unexpected** — a delivery never sent, in another conversation than it was
  sent to, to a non-member, or different from what the store holds at that seq;
* **app duplicates** — one seq or one body handed to one application twice;
* **order violations** — a delivery whose seq is not above the previous one in
  that conversation (for that member);
* **seq reuse** — one (conv, seq) seen with two bodies by any observer (the acks,
  the deliveries, the store); **double stores** — one body stored at two places.

A history passes (:attr:`Check.passed`) only if all of these are 0. Undelivered
stored messages of any outcome, failed sends that were stored anyway (allowed:
indeterminate) and seq holes are counted for information.

    from tests.history import History, check_history, store_truth

    history = History(layout)           # layout: users, convs (conv -> members), big
    body = history.next_body("alice")   # "alice-1"
    history.sent("alice", conv, body, future)
    history.deliver("bob", push)        # from bob's client.messages()
    check = check_history(history, store_truth(store, layout.convs))
    assert check.passed

Nothing received is kept by reference (bodies decoded to new strings, seqs copied,
conversation ids mapped to the layout's own), so a harness measuring the heap with
tracemalloc can leave this file out. :func:`check_history` costs O(sends + stored x
members + deliveries).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from examples.measure import percentile_of

from imkit.errors import SendError
from imkit.protocol import Push
from imkit.store import MessageStore

__all__ = [
    "Check",
    "History",
    "Membership",
    "SendRecord",
    "check_history",
    "store_truth",
]


class Membership(Protocol):
    """Who is expected to receive what: the part of a layout the history needs."""

    @property
    def users(self) -> Sequence[str]:
        """Every user of the run."""

    @property
    def convs(self) -> Mapping[str, Sequence[str]]:
        """conversation -> its members (the ones the history expects to receive it)."""

    @property
    def big(self) -> str | None:
        """The group of everyone (reported as its own latency kind), if any."""


class SendRecord:
    """One send: who, where, when, and how it ended (ok / failed / unknown)."""

    __slots__ = ("body", "conv", "outcome", "sender", "seq", "t_done", "t_sent")

    def __init__(self, sender: str, conv: str, body: str, t_sent: float) -> None:
        self.sender = sender
        self.conv = conv
        self.body = body
        self.t_sent = t_sent
        self.outcome = "unknown"
        self.seq = 0
        self.t_done = 0.0


class History:
    """The log of a run: every send and every delivery to an application.

    ``clock`` gives the times of sends, outcomes and deliveries in seconds
    (monotonic by default; tests pass a fake one).
    """

    def __init__(
        self, layout: Membership, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.layout = layout
        self._clock = clock
        self._conv_names = {c: c for c in layout.convs}
        self.sends: dict[str, SendRecord] = {}
        self.delivered: dict[str, dict[str, list[tuple[int, str]]]] = {
            uid: {} for uid in layout.users
        }
        self.max_seq: dict[tuple[str, str], int] = {}
        # (t_delivered, seconds, conv) of deliveries to members other than the sender
        self.latencies: list[tuple[float, float, str]] = []
        self.not_sent = 0  # send_nowait refused (queue full / closed): never attempted
        self.foreign = 0  # deliveries in a conversation the layout does not know
        self._counters: dict[str, itertools.count[int]] = {}

    def next_body(self, sender: str) -> str:
        """``sender-counter``, counting from 1 per sender. O(1)."""
        counter = self._counters.get(sender)
        if counter is None:
            counter = self._counters[sender] = itertools.count(1)
        return f"{sender}-{next(counter)}"

    def sent(self, sender: str, conv: str, body: str, fut: asyncio.Future[int]) -> None:
        """Log a send and settle it when its future does. O(1)."""
        clock = self._clock
        rec = SendRecord(sender, conv, body, clock())
        self.sends[body] = rec

        def done(f: asyncio.Future[int]) -> None:
            rec.t_done = clock()
            if f.cancelled():
                return
            exc = f.exception()
            if exc is None:
                rec.outcome = "ok"
                rec.seq = f.result() + 0  # a new int: keep nothing the client decoded
            elif isinstance(exc, SendError):
                rec.outcome = "failed"
            # ConnectionClosed (the client closed first): stays unknown

        fut.add_done_callback(done)

    def pending(self) -> int:
        """Sends without an outcome yet. O(sends)."""
        return sum(1 for r in self.sends.values() if r.t_done == 0.0)

    def deliver(self, uid: str, push: Push) -> None:
        """Log one message handed to ``uid``'s application. O(1)."""
        now = self._clock()
        conv = self._conv_names.get(push.conv)
        if conv is None:
            self.foreign += 1
            return
        body = push.body.decode("utf-8", "replace")
        seq = push.seq + 0  # a new int: int(x) would return the decoded object itself
        self.delivered[uid].setdefault(conv, []).append((seq, body))
        key = (uid, conv)
        if seq > self.max_seq.get(key, 0):
            self.max_seq[key] = seq
        rec = self.sends.get(body)
        if rec is not None and rec.sender != uid:
            self.latencies.append((now, now - rec.t_sent, conv))

    def latency_between(self, start: float, end: float) -> list[float]:
        """Delivery latencies (to members other than the sender) seen in [start, end). O(n)."""
        return [lat for t, lat, _ in self.latencies if start <= t < end]

    def latency_by_kind(self, start: float, end: float) -> dict[str, list[float]]:
        """The same, split by conversation kind: "1:1", "group", "all". O(n)."""
        out: dict[str, list[float]] = {"1:1": [], "group": [], "all": []}
        big = self.layout.big
        for t, lat, conv in self.latencies:
            if start <= t < end:
                kind = "all" if conv == big else "1:1" if conv.startswith("dm:") else "group"
                out[kind].append(lat)
        return out


def store_truth(store: MessageStore, convs: Iterable[str]) -> dict[str, list[tuple[int, str, str]]]:
    """Every stored message of ``convs``: conv -> [(seq, sender, body)] in seq order. O(stored)."""
    truth: dict[str, list[tuple[int, str, str]]] = {}
    for conv in convs:
        rows: list[tuple[int, str, str]] = []
        after = 0
        while True:
            page = store.read(conv, after, 1000)
            rows.extend((m.seq, m.sender, m.body.decode("utf-8", "replace")) for m in page.messages)
            if not page.messages or not page.more:
                break
            after = page.last_seq
        truth[conv] = rows
    return truth


@dataclass
class Check:
    """The verdict of one history against the store."""

    sends_ok: int = 0
    sends_failed: int = 0
    sends_unknown: int = 0
    not_sent: int = 0
    stored: int = 0
    deliveries: int = 0
    lost: int = 0  # (acked message, member) pairs never delivered
    lost_messages: int = 0  # distinct acked messages missing somewhere
    undelivered: int = 0  # (stored message, member) pairs never delivered (any outcome)
    unexpected: int = 0  # delivered but never sent, or not what the store holds at that seq
    app_duplicates: int = 0
    order_violations: int = 0
    seq_reuse: int = 0  # (conv, seq) seen with two different bodies
    double_stored: int = 0  # one body stored at two seqs (idempotency broken)
    seq_holes: int = 0  # seqs missing inside a conversation's stored range
    failed_but_stored: int = 0  # reported failed, yet stored (indeterminate, allowed)
    wire_duplicates: int = 0
    latency_p50: float = 0.0
    latency_p99: float = 0.0
    latency_max: float = 0.0
    latency_n: int = 0

    @property
    def passed(self) -> bool:
        """Lost, unexpected, app duplicates, order violations and seq reuse all 0."""
        return not (
            self.lost
            or self.unexpected
            or self.app_duplicates
            or self.order_violations
            or self.seq_reuse
            or self.double_stored
        )


def check_history(
    history: History,
    truth: Mapping[str, Sequence[tuple[int, str, str]]],
    *,
    wire_duplicates: int = 0,
    latencies: Sequence[float] | None = None,
) -> Check:
    """Count lost, unexpected, duplicate and out-of-order deliveries and seq reuse.

    ``truth`` is :func:`store_truth`'s answer; ``wire_duplicates`` (counted by the
    clients) is passed through; ``latencies`` replaces the whole run's delivery
    latencies in the p50 / p99 / max figures. O(sends + stored x members + deliveries).
    """
    layout = history.layout
    c = Check(not_sent=history.not_sent, wire_duplicates=wire_duplicates)
    for rec in history.sends.values():
        if rec.outcome == "ok":
            c.sends_ok += 1
        elif rec.outcome == "failed":
            c.sends_failed += 1
        else:
            c.sends_unknown += 1
    # what the store holds, and seq reuse as every observer saw it
    at_seq: dict[tuple[str, int], set[str]] = {}
    where: dict[str, set[tuple[str, int]]] = {}
    for conv, rows in truth.items():
        c.stored += len(rows)
        seqs = [seq for seq, _, _ in rows]
        if seqs:
            c.seq_holes += seqs[-1] - len(set(seqs))
        for seq, _, body in rows:
            at_seq.setdefault((conv, seq), set()).add(body)
            where.setdefault(body, set()).add((conv, seq))
    for rec in history.sends.values():
        if rec.outcome == "ok":
            at_seq.setdefault((rec.conv, rec.seq), set()).add(rec.body)
            where.setdefault(rec.body, set()).add((rec.conv, rec.seq))
        elif rec.outcome == "failed" and rec.body in where:
            c.failed_but_stored += 1
    store_at = {(conv, seq): body for conv, rows in truth.items() for seq, _, body in rows}
    for uid, per_conv in history.delivered.items():
        for conv, got in per_conv.items():
            c.deliveries += len(got)
            seen_seq: set[int] = set()
            seen_body: set[str] = set()
            last = 0
            for seq, body in got:
                if seq in seen_seq or body in seen_body:
                    c.app_duplicates += 1
                if seq <= last:
                    c.order_violations += 1
                last = max(last, seq)
                seen_seq.add(seq)
                seen_body.add(body)
                at_seq.setdefault((conv, seq), set()).add(body)
                origin = history.sends.get(body)
                if (
                    origin is None
                    or origin.conv != conv
                    or uid not in layout.convs.get(conv, ())
                    or store_at.get((conv, seq)) != body
                ):
                    c.unexpected += 1
    c.seq_reuse = sum(1 for bodies in at_seq.values() if len(bodies) > 1)
    c.double_stored = sum(1 for places in where.values() if len(places) > 1)
    # lost: an acked message some member never got; undelivered: any stored one
    got_bodies = {
        (uid, conv): {body for _, body in got}
        for uid, per_conv in history.delivered.items()
        for conv, got in per_conv.items()
    }
    lost_messages: set[str] = set()
    for conv, rows in truth.items():
        members = layout.convs.get(conv, ())
        for _, _, body in rows:
            for uid in members:
                if body not in got_bodies.get((uid, conv), ()):
                    c.undelivered += 1
    for rec in history.sends.values():
        if rec.outcome != "ok":
            continue
        for uid in layout.convs.get(rec.conv, ()):
            if rec.body not in got_bodies.get((uid, rec.conv), ()):
                c.lost += 1
                lost_messages.add(rec.body)
    c.lost_messages = len(lost_messages)
    lat = list(latencies) if latencies is not None else [x for _, x, _ in history.latencies]
    c.latency_n = len(lat)
    c.latency_p50 = percentile_of(lat, 50)
    c.latency_p99 = percentile_of(lat, 99)
    c.latency_max = max(lat, default=0.0)
    return c
