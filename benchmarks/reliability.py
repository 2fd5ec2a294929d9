"""Reliability figures of the reference system: Jepsen-style history checks under faults.

    .venv/bin/python benchmarks/reliability.py          # all; writes docs/reliability.md
    .venv/bin/python benchmarks/reliability.py --quick  # scaled down, prints only
    .venv/bin/python benchmarks/reliability.py --only kill,acks --clients 150

Every scenario starts the reference system (``examples/``) in this process on
loopback, drives it with real :class:`imkit.aio.Client` connections chatting 1:1, in
small groups (write fan-out) and in one group of everyone (merged read fan-out),
injects a fault, and checks the history the way RELIABILITY.md asks: every body is
``sender-counter``; each send is logged ok / failed / unknown and each delivery to
the application; after the faults end the clients drain (first on their own, then
through an explicit sync); then **lost** (acknowledged, never delivered to a member),
**unexpected**, **duplicates delivered to the application**, **order violations per
conversation** and **seq reuse** are counted against the store. A run passes only if
they are all 0. Duplicates on the wire (allowed), latency and drain time are reported.

Scenarios: ``kill`` (one of 3 gateways dies under load), ``restart`` (the whole
server side crashes and restarts on its SQLite data directory, twice), ``acks`` (30%
of the clients' push acks dropped by a proxy), ``resources`` (a silent client, a slow
reader and a connect flood: memory, file handles, others' latency), ``fuzz`` (the
atheris decoder harness in a subprocess). Linux only: file handles and sockets are
read from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import os
import platform
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `examples` importable
    sys.path.insert(0, str(ROOT))

import attrs  # noqa: E402
from examples.cluster import Cluster, ClusterConfig, start_cluster  # noqa: E402
from examples.faultproxy import FaultProxy, LinkFaults, kill_gateway  # noqa: E402
from examples.gateway import GatewayConfig  # noqa: E402
from examples.logic import LogicConfig  # noqa: E402
from examples.probe import RawClient  # noqa: E402

from imkit.aio import Client, ClientStatus  # noqa: E402
from imkit.errors import CapacityError, ConnectionClosed, SendFailed  # noqa: E402
from imkit.policy import Backoff, ExponentialBackoff, HeartbeatPolicy  # noqa: E402
from imkit.protocol import Error as ErrorFrame  # noqa: E402
from imkit.protocol import (  # noqa: E402
    ErrorCode,
    FrameType,
    Kick,
    Login,
    LoginAck,
    Message,
    Notify,
    Ping,
    Pong,
    Push,
    PushAck,
    PushBatch,
    Receipt,
    Send,
    SendAck,
    SyncPage,
    SyncRequest,
    SyncResponse,
    encode,
)
from imkit.session import LoggedIn, ServerConfig, SessionEvent  # noqa: E402
from imkit.store import MessageStore, direct_conv_id  # noqa: E402

__all__ = [
    "Check",
    "History",
    "Layout",
    "ScenarioResult",
    "main",
    "scenario_dropped_acks",
    "scenario_fuzz",
    "scenario_gateway_kill",
    "scenario_resources",
    "scenario_restart",
]

DOC = ROOT / "docs" / "reliability.md"
DEVICE = "d"
_THIS_FILE = str(Path(__file__).resolve())


def _now() -> float:
    return time.monotonic()


def _pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of ``values`` by nearest rank; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# --- who talks to whom --------------------------------------------------------------------


@dataclass
class Layout:
    """Users and conversations: pairs chat 1:1, groups of ``group_size``, one group of all."""

    users: list[str]
    convs: dict[str, tuple[str, ...]]  # conv -> members (the ones the history expects)
    dm: dict[str, str]  # uid -> its 1:1 conversation
    group: dict[str, str]  # uid -> its small group
    big: str | None  # the group of everyone (merged read fan-out), if any

    @classmethod
    def build(cls, n: int, *, group_size: int = 10, big: bool = True) -> Layout:
        """``n`` users u000...; user i chats 1:1 with i^1 (the last odd one out with u000)."""
        users = [f"u{i:03d}" for i in range(n)]
        convs: dict[str, tuple[str, ...]] = {}
        dm: dict[str, str] = {}
        for i, uid in enumerate(users):
            j = i ^ 1 if (i ^ 1) < n else 0
            if j == i:
                continue
            conv = direct_conv_id(uid, users[j])
            convs.setdefault(conv, tuple(sorted((uid, users[j]))))
            dm.setdefault(uid, conv)
        group: dict[str, str] = {}
        for k in range(0, n, group_size):
            name = f"g{k // group_size:02d}"
            members = tuple(users[k : k + group_size])
            if len(members) < 2:
                continue
            convs[name] = members
            for uid in members:
                group[uid] = name
        big_conv = "all" if big and n > 2 else None
        if big_conv is not None:
            convs[big_conv] = tuple(users)
        return cls(users=users, convs=convs, dm=dm, group=group, big=big_conv)

    def seed(self, store: MessageStore) -> None:
        """Create the users and conversations (idempotent: a reused data directory)."""
        for uid in self.users:
            store.create_user(uid)
        for conv, members in self.convs.items():
            if conv.startswith("dm:"):
                store.create_direct(*members)
            else:
                store.create_group(conv, members)

    def convs_of(self, uid: str) -> list[str]:
        """The conversations ``uid`` is expected to receive."""
        return [c for c, m in self.convs.items() if uid in m]


# --- the history ----------------------------------------------------------------------------


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

    Nothing received is kept by reference (bodies are decoded to new strings,
    conversation ids mapped to the layout's own), so the harness's memory is its
    own and tracemalloc can leave it out.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
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
        """``sender-counter``, counting from 1 per sender."""
        counter = self._counters.get(sender)
        if counter is None:
            counter = self._counters[sender] = itertools.count(1)
        return f"{sender}-{next(counter)}"

    def sent(self, sender: str, conv: str, body: str, fut: asyncio.Future[int]) -> None:
        """Log a send and settle it when its future does."""
        rec = SendRecord(sender, conv, body, _now())
        self.sends[body] = rec

        def done(f: asyncio.Future[int]) -> None:
            rec.t_done = _now()
            if f.cancelled():
                return
            exc = f.exception()
            if exc is None:
                rec.outcome = "ok"
                rec.seq = f.result() + 0  # a new int: keep nothing the client decoded
            elif isinstance(exc, SendFailed):
                rec.outcome = "failed"
            # ConnectionClosed (the client closed first): stays unknown

        fut.add_done_callback(done)

    def pending(self) -> int:
        """Sends without an outcome yet. O(sends)."""
        return sum(1 for r in self.sends.values() if r.t_done == 0.0)

    def deliver(self, uid: str, push: Push) -> None:
        """Log one message handed to ``uid``'s application."""
        now = _now()
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
        """Delivery latencies (to members other than the sender) observed in [start, end)."""
        return [lat for t, lat, _ in self.latencies if start <= t < end]

    def latency_by_kind(self, start: float, end: float) -> dict[str, list[float]]:
        """The same, split by conversation kind: "1:1", "group", "all"."""
        out: dict[str, list[float]] = {"1:1": [], "group": [], "all": []}
        big = self.layout.big
        for t, lat, conv in self.latencies:
            if start <= t < end:
                kind = "all" if conv == big else "1:1" if conv.startswith("dm:") else "group"
                out[kind].append(lat)
        return out


def store_truth(store: MessageStore, convs: Iterable[str]) -> dict[str, list[tuple[int, str, str]]]:
    """Every stored message of ``convs``: conv -> [(seq, sender, body)] in seq order."""
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

    def rows(self) -> list[tuple[str, str]]:
        """The figures as (name, value) rows for the report."""
        return [
            ("sends ok / failed / unknown", f"{self.sends_ok} / {self.sends_failed} / "
             f"{self.sends_unknown}"),
            ("messages stored", str(self.stored)),
            ("deliveries to applications", str(self.deliveries)),
            ("**lost** (acked, never delivered; message x member)", f"**{self.lost}**"),
            ("**unexpected**", f"**{self.unexpected}**"),
            ("**duplicates delivered to the app**", f"**{self.app_duplicates}**"),
            ("**order violations** (per conversation)", f"**{self.order_violations}**"),
            ("**seq reuse** / double stores", f"**{self.seq_reuse}** / {self.double_stored}"),
            ("stored but undelivered (any outcome)", str(self.undelivered)),
            ("failed sends that were stored (indeterminate)", str(self.failed_but_stored)),
            ("duplicates on the wire (dropped by SeqWindow)", str(self.wire_duplicates)),
            ("delivery latency p50 / p99 / max", f"{_ms(self.latency_p50)} / "
             f"{_ms(self.latency_p99)} / {_ms(self.latency_max)} (n={self.latency_n})"),
        ]


def check_history(
    history: History,
    truth: dict[str, list[tuple[int, str, str]]],
    *,
    wire_duplicates: int = 0,
    latencies: Sequence[float] | None = None,
) -> Check:
    """Count lost, unexpected, duplicate and out-of-order deliveries and seq reuse."""
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
    c.latency_p50 = _pct(lat, 0.50)
    c.latency_p99 = _pct(lat, 0.99)
    c.latency_max = max(lat, default=0.0)
    return c


# --- clients and load -----------------------------------------------------------------------


class Population:
    """One :class:`Client` per user of a layout, a consumer per client, and chatter.

    Each client sends at ``rate`` messages/s (exponential gaps) while ``chatting``
    is set: 45% to its 1:1 partner, 45% to its small group, 10% to the group of all.
    """

    def __init__(
        self,
        layout: Layout,
        history: History,
        *,
        token: Callable[[str], str],
        endpoints: Callable[[int], list[str]],
        rate: float,
        reconnect: Backoff,
        seed: int = 1,
    ) -> None:
        self.layout = layout
        self.history = history
        self.rate = rate
        self.rng = random.Random(seed)
        self.chatting = asyncio.Event()
        self.logins: dict[str, list[float]] = {uid: [] for uid in layout.users}
        self.clients: dict[str, Client] = {}
        for i, uid in enumerate(layout.users):
            self.clients[uid] = Client(
                token=token(uid),
                device=DEVICE,
                endpoints=endpoints(i),
                session_kwargs={"reconnect": reconnect},
                on_event=self._on_event(uid),
                rng=random.Random(seed * 100_003 + i),
            )
        self._consumers: list[asyncio.Task[None]] = []
        self.burst_s = 0.0
        self._chatters: list[asyncio.Task[None]] = []

    def _on_event(self, uid: str) -> Callable[[SessionEvent], object]:
        def on_event(event: SessionEvent) -> None:
            if isinstance(event, LoggedIn):
                self.logins[uid].append(_now())

        return on_event

    async def start(self, timeout_s: float = 60.0) -> None:
        """Connect every client, wait until all are online, start consumers and chatter."""
        for client in self.clients.values():
            await client.start()
        await asyncio.gather(
            *(c.wait_for(ClientStatus.ONLINE, timeout=timeout_s) for c in self.clients.values())
        )
        loop = asyncio.get_running_loop()
        for uid, client in self.clients.items():
            self._consumers.append(loop.create_task(self._consume(uid, client)))
            self._chatters.append(loop.create_task(self._chatter(uid, client)))

    async def _consume(self, uid: str, client: Client) -> None:
        deliver = self.history.deliver
        async for push in client.messages():
            deliver(uid, push)

    async def _chatter(self, uid: str, client: Client) -> None:
        rng = random.Random(self.rng.random())
        layout = self.layout
        choices: list[str] = []
        weights: list[float] = []
        for conv, weight in (
            (layout.dm.get(uid), 0.45),
            (layout.group.get(uid), 0.45),
            (layout.big, 0.10),
        ):
            if conv is not None:
                choices.append(conv)
                weights.append(weight)
        if not choices:
            return
        while True:
            await self.chatting.wait()
            await asyncio.sleep(rng.expovariate(self.rate))
            if not self.chatting.is_set():
                continue
            conv = rng.choices(choices, weights)[0]
            body = self.history.next_body(uid)
            try:
                _, fut = client.send_nowait(conv, body.encode())
            except (CapacityError, ConnectionClosed):
                self.history.not_sent += 1
                continue
            self.history.sent(uid, conv, body, fut)

    async def burst(self, per_client: int, store: Callable[[], MessageStore]) -> int:
        """Every client sends ``per_client`` messages at once; wait until all are delivered."""
        start = _now()
        sent = 0
        for chunk in range(0, per_client, 10):  # ten at a time: a burst, not a flood
            futures: list[asyncio.Future[int]] = []
            for uid, client in self.clients.items():
                convs = [c for c in (self.layout.dm.get(uid), self.layout.group.get(uid)) if c]
                for k in range(chunk, min(per_client, chunk + 10)):
                    conv = convs[k % len(convs)]
                    body = self.history.next_body(uid)
                    _, fut = client.send_nowait(conv, body.encode())
                    self.history.sent(uid, conv, body, fut)
                    futures.append(fut)
            await asyncio.gather(*futures, return_exceptions=True)
            sent += len(futures)
            async with asyncio.timeout(60):
                while self.caught_up(store()):
                    await asyncio.sleep(0.02)
        self.burst_s = _now() - start
        return sent

    def online(self) -> int:
        """Clients online now."""
        return sum(1 for c in self.clients.values() if c.state is ClientStatus.ONLINE)

    def wire_duplicates(self) -> int:
        """Pushes the clients' SeqWindows dropped as already delivered."""
        return sum(c.session.stats.duplicate_pushes for c in self.clients.values())

    def caught_up(self, store: MessageStore) -> int:
        """(member, conversation) pairs still behind the store's last seq (0: caught up)."""
        behind = 0
        max_seq = self.history.max_seq
        for conv, members in self.layout.convs.items():
            last = store.last_seq(conv)
            behind += sum(1 for uid in members if max_seq.get((uid, conv), 0) < last)
        return behind

    async def close(self) -> None:
        """Stop chatter, close every client, end the consumers."""
        self.chatting.clear()
        for task in self._chatters:
            task.cancel()
        await asyncio.gather(*self._chatters, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self.clients.values()), return_exceptions=True)
        for task in self._consumers:  # ended by the close; cancel any straggler
            task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        self._chatters, self._consumers = [], []


@dataclass
class Drain:
    """How the clients caught up after the faults."""

    settle_s: float = 0.0  # until every send had an outcome
    behind_before_sync: int = 0  # (member, conv) pairs still behind after the natural wait
    drain_s: float = 0.0  # from the end of the load until every member caught up
    caught_up: bool = False


async def drain(
    pop: Population,
    store: Callable[[], MessageStore],
    *,
    natural_s: float = 3.0,
    timeout_s: float = 30.0,
) -> Drain:
    """Stop chatter; wait for outcomes, then for the clients to catch up, then sync them."""
    pop.chatting.clear()
    start = _now()
    result = Drain()
    deadline = start + timeout_s
    while pop.history.pending() and _now() < deadline:
        await asyncio.sleep(0.05)
    result.settle_s = _now() - start
    natural_end = _now() + natural_s
    while pop.caught_up(store()) and _now() < natural_end:
        await asyncio.sleep(0.05)
    result.behind_before_sync = pop.caught_up(store())
    if result.behind_before_sync:
        for client in pop.clients.values():
            client.sync()
    while pop.caught_up(store()) and _now() < deadline:
        await asyncio.sleep(0.05)
    result.caught_up = pop.caught_up(store()) == 0
    result.drain_s = _now() - start
    await asyncio.sleep(0.2)  # anything that would arrive twice arrives now
    return result


def rotated(endpoints: Sequence[str]) -> Callable[[int], list[str]]:
    """Client i tries endpoint i mod n first, then the others in order."""

    def pick(i: int) -> list[str]:
        k = i % len(endpoints)
        return [*endpoints[k:], *endpoints[:k]]

    return pick


@dataclass
class ScenarioResult:
    """What one scenario reports: a verdict, a setup text, figure rows, notes."""

    key: str
    title: str
    passed: bool
    setup: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    check: Check | None = None
    seconds: float = 0.0

    def markdown(self) -> str:
        """The scenario's section of docs/reliability.md."""
        verdict = "**pass**" if self.passed else "**FAIL**"
        out = [f"## {self.title}", "", self.setup, "", f"Verdict: {verdict} "
               f"(scenario ran {self.seconds:.1f} s).", "", "| figure | value |", "|---|---|"]
        out += [f"| {name} | {value} |" for name, value in self.rows]
        if self.notes:
            out.append("")
            out += [f"* {note}" for note in self.notes]
        return "\n".join(out) + "\n"


def _histogram(values: Sequence[float], bucket_s: float, buckets: int) -> str:
    buckets = min(buckets, int(max(values, default=0.0) // bucket_s) + 1)
    counts = [0] * (buckets + 1)
    for v in values:
        counts[min(buckets, int(v // bucket_s))] += 1
    parts = []
    for i, n in enumerate(counts):
        label = f"{i * bucket_s:.1f}-{(i + 1) * bucket_s:.1f}s" if i < buckets else (
            f">{buckets * bucket_s:.1f}s"
        )
        if n or i < buckets:
            parts.append(f"{label}: {n}")
    return ", ".join(parts)


# --- scenario 1: kill one of 3 gateways ------------------------------------------------------


async def scenario_gateway_kill(
    *,
    clients: int = 120,
    gateways: int = 3,
    rate: float = 1.0,
    load_s: float = 12.0,
    kill_at_s: float = 4.0,
    reconnect_min_ms: int = 1000,
    reconnect_max_ms: int = 5000,
    seed: int = 1,
) -> ScenarioResult:
    """Kill one of ``gateways`` gateways under load (no Kick, its routes left bound)."""
    began = _now()
    server = ServerConfig(reconnect_min_ms=reconnect_min_ms, reconnect_max_ms=reconnect_max_ms)
    layout = Layout.build(clients)
    cfg = ClusterConfig(
        gateways=gateways,
        web=False,
        gateway=GatewayConfig(server=server),
        logic=LogicConfig(write_fanout_max=20),
    )
    cluster = await start_cluster(cfg)
    try:
        layout.seed(cluster.store)
        history = History(layout)
        pop = Population(
            layout,
            history,
            token=lambda uid: cluster.token(uid, DEVICE),
            endpoints=rotated(cluster.endpoints()),
            rate=rate,
            reconnect=Backoff(base_ms=reconnect_min_ms, cap_ms=reconnect_max_ms),
            seed=seed,
        )
        await pop.start()
        pop.chatting.set()
        load_start = _now()
        await asyncio.sleep(kill_at_s)
        victim = cluster.gateways[1 % gateways]
        victim_ep = victim.tcp_endpoint.removeprefix("tcp://")
        orphans = [
            uid
            for uid, c in pop.clients.items()
            if c.endpoint is not None and f"{c.endpoint.host}:{c.endpoint.port}" == victim_ep
        ]
        t_kill = _now()
        dropped = await kill_gateway(victim)
        reconnect: dict[str, float] = {}
        async with asyncio.timeout(60):
            while len(reconnect) < len(orphans):
                for uid in orphans:
                    if uid not in reconnect:
                        after = [t for t in pop.logins[uid] if t > t_kill]
                        if after:
                            reconnect[uid] = after[0] - t_kill
                await asyncio.sleep(0.01)
        await asyncio.sleep(max(0.0, load_start + load_s - _now()))
        load_end = _now()
        drained = await drain(pop, lambda: cluster.store)
        truth = store_truth(cluster.store, layout.convs)
        check = check_history(history, truth, wire_duplicates=pop.wire_duplicates())
        stale = cluster.routes.group_by_gateway(layout.users).get(victim.id, [])
        survivors = {
            g.id: g.connections for g in cluster.gateways if g is not victim
        }
        lat_before = history.latency_between(load_start, t_kill)
        lat_after = history.latency_between(t_kill, load_end)
        by_kind = history.latency_by_kind(t_kill, load_end)
        await pop.close()
    finally:
        await cluster.stop()
    times = sorted(reconnect.values())
    all_back = len(times) == len(orphans) and len(orphans) > 0
    rows = [
        *check.rows(),
        ("clients on the killed gateway (orphans)", f"{len(orphans)} (sockets dropped: {dropped})"),
        ("orphans reconnected", f"{len(times)} / {len(orphans)}"),
        ("reconnect time after the kill p50 / p90 / max",
         f"{_ms(_pct(times, 0.5))} / {_ms(_pct(times, 0.9))} / {_ms(max(times, default=0))}"),
        ("reconnect histogram (100 ms buckets)", _histogram(times, 0.1, 12)),
        ("connections per surviving gateway afterwards",
         ", ".join(f"{k}: {v}" for k, v in survivors.items())),
        ("routes still bound to the dead gateway after the drain", str(len(stale))),
        ("latency p99 before / after the kill",
         f"{_ms(_pct(lat_before, 0.99))} / {_ms(_pct(lat_after, 0.99))}"),
        ("latency p50 / p99 after the kill by conversation",
         ", ".join(f"{k}: {_ms(_pct(v, 0.5))} / {_ms(_pct(v, 0.99))}"
                   for k, v in by_kind.items())),
        ("caught up without an explicit sync", "yes" if not drained.behind_before_sync else
         f"no ({drained.behind_before_sync} member x conv pairs behind)"),
        ("drain time (load end -> every member caught up)", _ms(drained.drain_s)),
    ]
    setup = (
        f"{clients} clients on {gateways} gateways (client *i* tries gateway *i* mod "
        f"{gateways} first), each sending {rate:g} msg/s for {load_s:g} s: 45% to its 1:1 "
        f"partner, 45% to its group of 10 (write fan-out), 10% to the group of all "
        f"{clients} (merged read fan-out, `write_fanout_max=20`). At {kill_at_s:g} s gateway "
        f"`{victim.id}` is killed in-process (`examples.faultproxy.kill_gateway`: listener "
        f"and client sockets aborted without a Kick, handlers cancelled, bus subscription "
        f"closed, its routes left bound as a dead process leaves them). The server's "
        f"LoginAck reconnect bounds are {reconnect_min_ms}-{reconnect_max_ms} ms (full "
        f"jitter: the first reconnect waits uniform [0, {reconnect_min_ms}) ms)."
    )
    notes = [
        "Reconnect time = first LoginAck after the kill; it includes the jittered wait, a "
        "refused connect to the dead endpoint when the client tried it first, and the login.",
        "Latency counts from the send to the delivery to each other member, so messages sent "
        "to or by an orphan while it was reconnecting carry its reconnect time.",
    ]
    stall = _pct(by_kind["all"], 0.99)
    if stall > 2.0:
        notes.append(
            f"The group of all stalls for up to `fanout_timeout_ms` (5 s; p99 here "
            f"{_ms(stall)}): its merged fan-outs addressed to the dead gateway (its routes "
            f"are still bound until each orphan logs in again) are never confirmed, so they "
            f"hold the group's in-flight slots (`merge_inflight`, 4) until the timeout frees "
            f"them. Nothing is lost, but every member waits. Unbinding a vanished gateway's "
            f"routes (`RouteService.unbind_gateway` when its registry entry expires), or "
            f"finishing a fan-out ticket at once when the bus has no subscriber for the "
            f"subject, would shorten it."
        )
    passed = check.passed and all_back and drained.caught_up
    return ScenarioResult(
        "kill", "1. A gateway killed under load", passed, setup, rows, notes, check,
        _now() - began,
    )


# --- scenario 2: restart the server side on its SQLite data directory --------------------------


def _free_port_block(n: int) -> int:
    """A port p such that p .. p+n-1 are free now (best effort)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n >= 65535:
            continue
        ok = True
        for port in range(base, base + n):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free block of ports")


async def crash(cluster: Cluster) -> None:
    """Stop a cluster the way a killed process stops: no Kick, no clean store close."""
    for gateway in cluster.gateways:
        await kill_gateway(gateway)
    cluster.logic.close()
    cluster.routes.close()
    await cluster.bus.close()
    if cluster.ipconf is not None:
        await cluster.ipconf.stop()
    cluster._stopped = True  # the store stays open, uncommitted nothing: see SqliteStore


async def scenario_restart(
    *,
    clients: int = 40,
    gateways: int = 2,
    rate: float = 2.0,
    restarts: int = 2,
    phase_s: float = 4.0,
    downtime_s: float = 1.0,
    ack_drop: float = 0.1,
    data_dir: str | None = None,
    seed: int = 2,
) -> ScenarioResult:
    """Crash the whole server side and start it again on the same SQLite data directory."""
    began = _now()
    own_dir = data_dir is None
    directory = data_dir or tempfile.mkdtemp(prefix="imkit-rel-")
    base = _free_port_block(gateways)
    server = ServerConfig(reconnect_min_ms=200, reconnect_max_ms=1000)
    cfg = ClusterConfig(
        gateways=gateways,
        web=False,
        tcp_port_base=base,
        data_dir=directory,
        secret=os.urandom(32),
        gateway=GatewayConfig(server=server),
        logic=LogicConfig(write_fanout_max=20),
    )
    layout = Layout.build(clients)
    stores: list[MessageStore] = []
    cluster = await start_cluster(cfg)
    stores.append(cluster.store)
    current = [cluster]
    back_online: list[float] = []
    first_ack: list[float] = []
    proxies: list[FaultProxy] = []
    try:
        layout.seed(cluster.store)
        history = History(layout)
        rng = random.Random(seed)
        for i in range(gateways):  # lost SendAcks: the clients resend, the store dedups
            faults = LinkFaults(drop_types=frozenset({FrameType.SEND_ACK}), drop_rate=ack_drop)
            proxy = FaultProxy("127.0.0.1", base + i, s2c=faults, rng=random.Random(rng.random()))
            await proxy.start()
            proxies.append(proxy)
        pop = Population(
            layout,
            history,
            token=lambda uid: cluster.token(uid, DEVICE),
            endpoints=rotated([p.endpoint for p in proxies]),
            rate=rate,
            reconnect=Backoff(base_ms=200, cap_ms=1000),
            seed=seed,
        )
        await pop.start()
        pop.chatting.set()
        await asyncio.sleep(phase_s)
        for _ in range(restarts):
            await crash(current[-1])
            await asyncio.sleep(downtime_s)
            restarted = _now()
            fresh = await start_cluster(cfg)
            current.append(fresh)
            stores.append(fresh.store)
            async with asyncio.timeout(60):
                while pop.online() < len(pop.clients):
                    await asyncio.sleep(0.01)
            back_online.append(_now() - restarted)
            acked = [r.t_done for r in history.sends.values()
                     if r.outcome == "ok" and r.t_done >= restarted]
            first_ack.append(min(acked) - restarted if acked else float("nan"))
            await asyncio.sleep(phase_s)
        for proxy in proxies:  # the faults end; the drain runs clean
            proxy.s2c.drop_rate = 0.0
        final = current[-1]
        drained = await drain(pop, lambda: final.store)
        truth = store_truth(final.store, layout.convs)
        check = check_history(history, truth, wire_duplicates=pop.wire_duplicates())
        duplicates_answered = sum(c.logic.stats.duplicates for c in current)
        acks_dropped = sum(p.stats.frames_dropped.get(FrameType.SEND_ACK, 0) for p in proxies)
        await pop.close()
    finally:
        for proxy in proxies:
            await proxy.close()
        await current[-1].stop()
        for store in stores:
            with contextlib.suppress(Exception):
                store.close()
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
    rows = [
        *check.rows(),
        ("restarts", str(restarts)),
        ("all clients back online after each restart",
         ", ".join(_ms(t) for t in back_online)),
        ("first acknowledged send after each restart",
         ", ".join(_ms(t) for t in first_ack)),
        ("send acks dropped by the proxies", str(acks_dropped)),
        ("resent cids answered from the store (idempotency)", str(duplicates_answered)),
        ("seq holes in the store", str(check.seq_holes)),
        ("caught up without an explicit sync", "yes" if not drained.behind_before_sync else
         f"no ({drained.behind_before_sync} member x conv pairs behind)"),
        ("drain time", _ms(drained.drain_s)),
    ]
    setup = (
        f"{clients} clients on {gateways} gateways with the SQLite store (`--data-dir`), "
        f"each sending {rate:g} msg/s in the same mix as scenario 1. Every {phase_s:g} s "
        f"the whole server side crashes ({restarts} times): gateways killed as in scenario "
        f"1, the logic server's timers, the route table and the bus dropped, the store "
        f"connection *not* closed; {downtime_s:g} s later a new cluster starts on the same "
        f"data directory and ports. Clients keep sending throughout (offline sends queue, "
        f"unacknowledged ones are resent with the same cid), through proxies that drop "
        f"{ack_drop:.0%} of the `SendAck` frames, so that resends of stored messages reach "
        f"the restarted server, whose sessions have forgotten every cid: only the store's "
        f"(sender, cid) key can answer them. Seq reuse counts (conv, seq) "
        f"pairs seen with two different bodies by any observer: the acks, the deliveries "
        f"and the final store."
    )
    notes = [
        "Seqs come from the store (`last_seq` committed with the message in one SQLite "
        "transaction), so the restart of the logic server and of the store is the same event.",
        "The wire duplicates come from the inbox sync after each restart: the logic server "
        "keeps what each device holds (its cursors) in memory, so a restarted one pages "
        "every conversation from seq 0 and the clients' SeqWindows drop what they had. "
        "Correct, but the bytes grow with history; persisting the device cursors would "
        "avoid it.",
        "The drain includes waiting for the sends whose SendAck was dropped: the client "
        "resends them after its 2 s retry timer.",
    ]
    passed = check.passed and drained.caught_up
    return ScenarioResult(
        "restart", "2. The server side restarted on its data directory", passed, setup, rows,
        notes, check, _now() - began,
    )


# --- scenario 3: 30% of the clients' push acks dropped ------------------------------------------


async def scenario_dropped_acks(
    *,
    clients: int = 40,
    gateways: int = 2,
    rate: float = 2.0,
    load_s: float = 8.0,
    drop_rate: float = 0.3,
    seed: int = 3,
) -> ScenarioResult:
    """Drop ``drop_rate`` of the PushAck frames between the clients and the gateways."""
    began = _now()
    retry = ExponentialBackoff(base_ms=300, cap_ms=1200, max_attempts=3)
    server = ServerConfig(reconnect_min_ms=200, reconnect_max_ms=1000, push_retry=retry)
    layout = Layout.build(clients)
    cfg = ClusterConfig(
        gateways=gateways,
        web=False,
        gateway=GatewayConfig(server=server),
        logic=LogicConfig(write_fanout_max=20),
    )
    cluster = await start_cluster(cfg)
    proxies: list[FaultProxy] = []
    try:
        layout.seed(cluster.store)
        rng = random.Random(seed)
        for ep in cluster.endpoints():
            host, _, port = ep.rpartition(":")
            faults = LinkFaults(drop_types=frozenset({FrameType.PUSH_ACK}), drop_rate=drop_rate)
            proxy = FaultProxy(host, int(port), c2s=faults, rng=random.Random(rng.random()))
            await proxy.start()
            proxies.append(proxy)
        history = History(layout)
        pop = Population(
            layout,
            history,
            token=lambda uid: cluster.token(uid, DEVICE),
            endpoints=rotated([p.endpoint for p in proxies]),
            rate=rate,
            reconnect=Backoff(base_ms=200, cap_ms=1000),
            seed=seed,
        )
        await pop.start()
        pop.chatting.set()
        await asyncio.sleep(load_s)
        for proxy in proxies:  # the fault ends with the load; the drain runs clean
            proxy.c2s.drop_rate = 0.0
        drained = await drain(pop, lambda: cluster.store)
        await asyncio.sleep(retry.delay_ms(0) / 1000 * 2)  # retries in flight land
        truth = store_truth(cluster.store, layout.convs)
        check = check_history(history, truth, wire_duplicates=pop.wire_duplicates())
        dropped = sum(p.stats.frames_dropped.get(FrameType.PUSH_ACK, 0) for p in proxies)
        relayed = sum(p.stats.frames_relayed.get(FrameType.PUSH_ACK, 0) for p in proxies)
        gw_stats = [g.stats for g in cluster.gateways]
        retried = sum(s.pushes_retried for s in gw_stats)
        abandoned = sum(s.pushes_abandoned for s in gw_stats)
        reconnects = sum(max(0, c.logins - 1) for c in pop.clients.values())
        await pop.close()
    finally:
        for proxy in proxies:
            await proxy.close()
        await cluster.stop()
    rows = [
        *check.rows(),
        ("push acks dropped by the proxy / relayed",
         f"{dropped} / {relayed} ({dropped / max(1, dropped + relayed):.0%} dropped)"),
        ("pushes resent by the gateways / given up (then Notify + sync)",
         f"{retried} / {abandoned}"),
        ("client reconnects", str(reconnects)),
        ("drain time", _ms(drained.drain_s)),
    ]
    setup = (
        f"{clients} clients on {gateways} gateways, each behind an "
        f"`examples.faultproxy.FaultProxy` that drops {drop_rate:.0%} of the `PushAck` frames "
        f"from the clients (it splits the stream on frame headers; every other frame passes "
        f"byte for byte), {rate:g} msg/s per client for {load_s:g} s in the same mix as "
        f"scenario 1. Push retries shortened to 300 ms, 600 ms, 1.2 s (default 3, 6, 12 s) so "
        f"that they happen within the run. The drops stop when the load stops."
    )
    notes = [
        "Acks are cumulative: a dropped ack is usually covered by the next one, so only the "
        "pushes at the end of a burst are resent. Every resend reaches the client as a "
        "duplicate on the wire, and its SeqWindow drops it.",
    ]
    passed = check.passed and drained.caught_up and dropped > 0
    return ScenarioResult(
        "acks", f"3. {drop_rate:.0%} of the clients' push acks dropped", passed, setup, rows,
        notes, check, _now() - began,
    )


# --- scenario 4: a silent client, a slow reader, a connect flood -------------------------------


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _socket_inodes_by_local_port(ports: set[int]) -> int:
    """Sockets of this process whose local port is one of ``ports`` (not listening)."""
    mine: set[str] = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                mine.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                local, state, inode = parts[1], parts[3], parts[9]
                port = int(local.rsplit(":", 1)[1], 16)
                if port in ports and state != "0A" and inode in mine:
                    count += 1
    return count


@dataclass
class Resources:
    """A snapshot of what the process holds."""

    fds: int
    server_sockets: int
    rss_kib: int
    traced_kib: float
    connections: int
    routes: int
    parked: int
    timers: int
    pause_s: float = 0.0  # how long taking this snapshot blocked the event loop


def _traced(snapshot: tracemalloc.Snapshot | None) -> float:
    if snapshot is None:
        return 0.0
    return sum(s.size for s in snapshot.statistics("filename")) / 1024


def _snapshot() -> tracemalloc.Snapshot | None:
    if not tracemalloc.is_tracing():
        return None
    return tracemalloc.take_snapshot().filter_traces(
        [
            tracemalloc.Filter(False, _THIS_FILE),  # the harness's own history
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<unknown>"),
        ]
    )


def _measure(cluster: Cluster, ports: set[int]) -> tuple[Resources, tracemalloc.Snapshot | None]:
    start = _now()
    gc.collect()
    snap = _snapshot()
    gws = cluster.gateways
    return (
        Resources(
            fds=len(os.listdir("/proc/self/fd")),
            server_sockets=_socket_inodes_by_local_port(ports),
            rss_kib=_rss_kib(),
            traced_kib=_traced(snap),
            connections=sum(g.connections for g in gws),
            routes=len(cluster.routes.table),
            parked=sum(len(g._parked) for g in gws),
            timers=sum(len(g.driver) for g in gws),
            pause_s=_now() - start,
        ),
        snap,
    )


async def _flood(host: str, port: int, n: int, batch: int = 50) -> int:
    """Open and close ``n`` connections quickly (``batch`` at a time); return how many opened."""
    opened = 0

    async def one() -> bool:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()
        return True

    for start in range(0, n, batch):
        results = await asyncio.gather(*(one() for _ in range(min(batch, n - start))))
        opened += sum(results)
    return opened


@dataclass
class _Round:
    """One round of bad peers: what the process held while they stayed, and after."""

    start: float = 0.0
    end: float = 0.0
    injected: float = 0.0  # when the last bad peer arrived
    recovered_s: float | None = None  # from then until the gateway held none of them
    peers_open: Resources | None = None
    after: Resources | None = None
    snapshot: tracemalloc.Snapshot | None = None
    flooded: int = 0


async def _slow_reader(raw: RawClient, interval_s: float) -> None:
    """Keep a connection alive with pings and never read a byte."""
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        while not raw.writer.is_closing():
            raw.send(Ping())
            await asyncio.sleep(interval_s)


async def _feed(
    client: Client, conv: str, rate: float, done: Callable[[], bool], max_s: float
) -> None:
    """Send 1 KiB messages to ``conv`` at ``rate`` per second until ``done()`` (or ``max_s``)."""
    end = _now() + max_s
    padding = b"x" * 1024
    while _now() < end and not done():
        with contextlib.suppress(CapacityError, ConnectionClosed):
            client.send_nowait(conv, padding)[1].add_done_callback(_ignore)
        await asyncio.sleep(1 / rate)


def _ignore(fut: asyncio.Future[int]) -> None:
    if not fut.cancelled():
        fut.exception()


async def _discard(client: Client) -> None:
    async for _ in client.messages():
        pass


async def _bad_peers_round(
    cluster: Cluster,
    pop: Population,
    baseline: Resources,
    *,
    tag: str,
    phase_s: float,
    flood: int,
    idle: int,
    slowloris: int,
    feed_rate: float,
) -> _Round:
    """Chatter plus bad peers for ``phase_s``; wait for the gateway to drop them; measure."""
    gw = cluster.gateways[0]
    host, _, port_text = cluster.endpoints()[0].rpartition(":")
    port = int(port_text)
    r = _Round(start=_now())
    pop.chatting.set()
    raws: list[RawClient] = []
    held: list[asyncio.StreamWriter] = []
    pinger: asyncio.Task[None] | None = None
    feeder = Client(
        token=cluster.token("feeder", tag),
        device=tag,
        endpoints=cluster.endpoints(),
        session_kwargs={"reconnect": Backoff(base_ms=200, cap_ms=1000)},
    )
    feeding: list[asyncio.Task[None]] = []
    stats = gw.stats
    kicks = stats.slow_consumer_kicks
    try:
        await feeder.start()
        await feeder.wait_for(ClientStatus.ONLINE, timeout=10)
        feeding = [
            asyncio.get_running_loop().create_task(
                _feed(feeder, "slowroom", feed_rate, lambda: stats.slow_consumer_kicks > kicks, 20)
            ),
            asyncio.get_running_loop().create_task(_discard(feeder)),
        ]
        silent = await RawClient.connect(host, port)
        raws.append(silent)
        await silent.login(cluster.token("silent", tag), tag)  # then never a byte more
        slow = await RawClient.connect(host, port, rcvbuf=4096, limit=4096)
        raws.append(slow)
        await slow.login(cluster.token("slow", tag), tag)  # then pings, never reads
        pinger = asyncio.get_running_loop().create_task(_slow_reader(slow, 0.2))
        for _ in range(idle):  # connect, say nothing: the login deadline cuts them
            _, writer = await asyncio.open_connection(host, port)
            held.append(writer)
        header = encode(Ping())[:6]  # part of a header: the frame deadline cuts them
        for _ in range(slowloris):
            _, writer = await asyncio.open_connection(host, port)
            writer.write(header)
            held.append(writer)
        r.flooded = await _flood(host, port, flood)
        r.injected = _now()
        await asyncio.sleep(max(0.0, r.start + phase_s - _now()))
        r.end = _now()
        pop.chatting.clear()
        await asyncio.gather(feeding[0], return_exceptions=True)  # until the slow one is cut
        await feeder.close()
        # the gateway must let go of every bad peer on its own, while they keep their sockets
        deadline = _now() + 30.0
        while _now() < deadline:
            if (
                gw.connections <= baseline.connections
                and len(cluster.routes.table) <= baseline.routes
                and len(gw._parked) <= baseline.parked
                and _socket_inodes_by_local_port({port}) <= baseline.server_sockets
            ):
                r.recovered_s = _now() - r.injected
                break
            await asyncio.sleep(0.05)
        r.peers_open, _ = _measure(cluster, {port})
    finally:
        await feeder.close()
        if pinger is not None:
            feeding.append(pinger)
        for task in feeding:
            task.cancel()
        await asyncio.gather(*feeding, return_exceptions=True)
        for raw in raws:  # then they go away too, as their processes would exit
            raw.abort()
        for writer in held:
            writer.transport.abort()
        raws.clear()
        held.clear()
    await asyncio.sleep(0.5)
    r.after, r.snapshot = _measure(cluster, {port})
    return r


async def scenario_resources(
    *,
    clients: int = 40,
    rate: float = 2.0,
    phase_s: float = 6.0,
    flood: int = 500,
    idle: int = 50,
    slowloris: int = 20,
    grace_ms: int = 1000,
    feed_rate: float = 100.0,
    warmup: int = 70,
    n_rounds: int = 3,
    trace: bool = True,
    seed: int = 4,
) -> ScenarioResult:
    """Bad peers against one gateway, twice: memory and file handles return; others' p99."""
    began = _now()
    started_tracing = False
    if trace and not tracemalloc.is_tracing():
        tracemalloc.start()
        started_tracing = True
    directory = tempfile.mkdtemp(prefix="imkit-rel-")
    server = ServerConfig(
        # 4 s of silence: longer than a measurement blocks the loop (gc + snapshot, ~1-2 s)
        heartbeat=HeartbeatPolicy(interval_ms=2000, missed=2),
        login_timeout_ms=1000,
        max_tracked_pushes=256,
        reconnect_min_ms=200,
        reconnect_max_ms=1000,
    )
    gateway_cfg = GatewayConfig(
        server=server,
        handshake_timeout_ms=1000,
        frame_timeout_ms=500,
        max_write_buffer=64 * 1024,
    )
    cfg = ClusterConfig(
        gateways=1,
        web=False,
        data_dir=directory,
        grace_ms=grace_ms,
        gateway=gateway_cfg,
        logic=LogicConfig(write_fanout_max=20),
    )
    layout = Layout.build(clients)
    cluster = await start_cluster(cfg)
    try:
        store = cluster.store
        layout.seed(store)
        for uid in ("silent", "slow", "feeder"):
            store.create_user(uid)
        store.create_group("slowroom", ["feeder", "slow"])
        for conv in layout.convs:  # the slow reader is in every group too
            if not conv.startswith("dm:"):
                store.join("slow", conv)
        gw = cluster.gateways[0]
        port = int(cluster.endpoints()[0].rpartition(":")[2])
        history = History(layout)
        pop = Population(
            layout,
            history,
            token=lambda uid: cluster.token(uid, DEVICE),
            endpoints=lambda i: cluster.endpoints(),
            rate=rate,
            reconnect=Backoff(base_ms=200, cap_ms=1000),
            seed=seed,
        )
        await pop.start()
        warmed = await pop.burst(warmup, lambda: cluster.store)  # bounded caches fill up
        pop.chatting.set()
        before_start = _now()
        await asyncio.sleep(phase_s)
        before_end = _now()
        pop.chatting.clear()
        await asyncio.sleep(1.5)  # acks and pings settle
        baseline, base_snap = _measure(cluster, {port})
        rounds = [
            await _bad_peers_round(
                cluster, pop, baseline, tag=tag, phase_s=phase_s, flood=flood, idle=idle,
                slowloris=slowloris, feed_rate=feed_rate,
            )
            for tag in (f"r{i + 1}" for i in range(max(2, n_rounds)))
        ]
        first, previous, second = rounds[0], rounds[-2], rounds[-1]
        drained = await drain(pop, lambda: cluster.store)
        truth = store_truth(cluster.store, layout.convs)
        lat_before = history.latency_between(before_start, before_end)
        lat_during = history.latency_between(first.start, first.end) + history.latency_between(
            second.start, second.end
        )
        check = check_history(
            history, truth, wire_duplicates=pop.wire_duplicates(), latencies=lat_during
        )
        closes = dict(gw.closes)
        stats = gw.stats.as_dict()
        cut = sum(max(0, c.logins - 1) for c in pop.clients.values())
        await pop.close()
    finally:
        await cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
        if started_tracing:
            tracemalloc.stop()
    assert first.after is not None and second.after is not None
    assert first.peers_open is not None and second.peers_open is not None
    growth = ""
    if previous.snapshot is not None and second.snapshot is not None:
        top = second.snapshot.compare_to(previous.snapshot, "lineno")[:3]
        growth = "; ".join(
            f"{s.traceback[0].filename.rsplit('/', 1)[-1]}:{s.traceback[0].lineno} "
            f"{s.size_diff / 1024:+.1f} KiB"
            for s in top
        )
    first_growth = ""
    if base_snap is not None and first.snapshot is not None:
        top = first.snapshot.compare_to(base_snap, "lineno")[:3]
        first_growth = "; ".join(
            f"{s.traceback[0].filename.rsplit('/', 1)[-1]}:{s.traceback[0].lineno} "
            f"{s.size_diff / 1024:+.1f} KiB"
            for s in top
        )
    per_round = 2 + idle + slowloris + flood
    delta1 = first.after.traced_kib - baseline.traced_kib
    assert previous.after is not None
    delta2 = second.after.traced_kib - previous.after.traced_kib
    heap_rounds = " / ".join(f"{r.after.traced_kib:.0f}" for r in rounds if r.after)
    recovered = [r.recovered_s for r in rounds]

    afters = [r.after for r in rounds if r.after is not None]
    opens = [r.peers_open for r in rounds if r.peers_open is not None]

    def each(get: Callable[[Resources], int], of: list[Resources]) -> str:
        return ", ".join(str(get(x)) for x in of)

    rows = [
        ("file descriptors: baseline / after each round",
         f"{baseline.fds} / {each(lambda x: x.fds, afters)}"),
        ("... while the bad peers still held their sockets (each round)",
         each(lambda x: x.fds, opens)),
        ("gateway-side sockets: baseline / while the bad peers held theirs (each round)",
         f"{baseline.server_sockets} / {each(lambda x: x.server_sockets, opens)}"),
        ("gateway connections: baseline / after each round",
         f"{baseline.connections} / {each(lambda x: x.connections, afters)}"),
        ("routes (live + grace): baseline / after each round",
         f"{baseline.routes} / {each(lambda x: x.routes, afters)}"),
        ("parked sessions, gateway timers after the last round",
         f"{second.after.parked}, {second.after.timers} (baseline {baseline.parked}, "
         f"{baseline.timers})"),
        ("Python heap (tracemalloc, harness excluded): baseline / after each round",
         f"{baseline.traced_kib:.0f} / {heap_rounds} KiB" if trace else "not traced"),
        ("heap growth: first round / last round (a leak grows every round)",
         f"{delta1:+.0f} KiB / {delta2:+.0f} KiB ({delta2 * 1024 / per_round:+.0f} bytes per "
         f"bad connection)" if trace else "not traced"),
        ("RSS: baseline / after each round",
         f"{baseline.rss_kib / 1024:.1f} / "
         + ", ".join(f"{x.rss_kib / 1024:.1f}" for x in afters) + " MiB"),
        ("last bad peer in -> gateway holds none of them (each round)",
         ", ".join(_ms(x) if x is not None else "never" for x in recovered)),
        ("bad peers per round", f"1 silent, 1 slow reader, {idle} idle, {slowloris} slowloris, "
         f"{first.flooded}/{flood} flood connections"),
        ("closes by code (all rounds and the clients)", ", ".join(
            f"{ErrorCode(k).name if k in ErrorCode._value2member_map_ else k}: {v}"
            for k, v in sorted(closes.items()))),
        ("heartbeat timeouts / slow-consumer kicks / login timeouts",
         f"{stats['heartbeat_timeouts']} / {stats['slow_consumer_kicks']} / "
         f"{stats['login_timeouts']}"),
        ("others' delivery latency p50 / p99 before",
         f"{_ms(_pct(lat_before, 0.5))} / {_ms(_pct(lat_before, 0.99))} (n={len(lat_before)})"),
        ("others' delivery latency p50 / p99 during the bad peers",
         f"{_ms(_pct(lat_during, 0.5))} / {_ms(_pct(lat_during, 0.99))} (n={len(lat_during)})"),
        ("history: lost / unexpected / app duplicates / order violations",
         f"{check.lost} / {check.unexpected} / {check.app_duplicates} / "
         f"{check.order_violations}"),
        ("well-behaved clients cut (reconnects)", str(cut)),
        ("drain time", _ms(drained.drain_s)),
        ("longest event-loop pause of a measurement (gc + tracemalloc snapshot)",
         _ms(max([baseline.pause_s, *(x.pause_s for x in afters + opens)]))),
        ("warm-up", f"{warmed} messages in {_ms(pop.burst_s)}"),
    ]
    if first_growth:
        rows.append(("largest heap growth in round 1 (file:line)", first_growth))
    if growth:
        rows.append(("largest heap growth in the last round (file:line)", growth))
    setup = (
        f"{clients} clients on one gateway (SQLite store, so stored messages are not on the "
        f"Python heap), chatting at {rate:g} msg/s each. Heartbeat 2 s x 2 missed, login "
        f"deadline 1 s, frame deadline 500 ms, grace {grace_ms} ms, `max_tracked_pushes=256`, "
        f"`max_write_buffer=64 KiB`. Warm-up: every client sends {warmup} messages, ten at a "
        f"time (so that the bounded per-session caches, e.g. the 64-entry ack cache, are full "
        f"before the baseline). Phase 1 ({phase_s:g} s): chatter only; the baseline is "
        f"taken with the chatter paused. Then {len(rounds)} identical rounds of {phase_s:g} "
        f"s, each chatter plus: a silent client (logs in, then never reads or writes), a "
        f"slow reader (logs in with a 4 KiB receive buffer, pings every 200 ms, never "
        f"reads; a feeder client sends it {feed_rate:g} msg/s of 1 KiB in a room of two "
        f"until it is cut), "
        f"{idle} connections that never log in, {slowloris} that send 6 bytes of a header, "
        f"and a flood of {flood} connections opened and closed 50 at a time. "
        f"The bad peers keep their sockets open until the gateway has let go of all of them; "
        f"only then do they close (as their processes would exit) and the round's figures "
        f"are taken (after `gc.collect()`)."
    )
    notes = [
        "File descriptors count both ends of every loopback connection (the clients live in "
        "this process too); the gateway-side count is the sockets whose local port is the "
        "gateway's, read from /proc/net/tcp.",
        "Round 1 may grow the heap once: hash tables and free lists sized for the flood's "
        "peak (asyncio's task WeakSet, the loop's selector map, the timing wheel's overflow "
        "level, dicts with deletions) do not shrink. A leak grows again in every later "
        "round (a connection with its session costs a few KiB); the verdict uses the last "
        "round's growth (under 256 bytes per bad connection), the file descriptors, the "
        "gateway-side sockets and the gateway's tables. RSS is shown for information "
        "(CPython keeps freed arenas). The harness keeps no object a client decoded, so "
        "its own log is left out of the heap figures by file.",
        "A round's bad peers are all gone about 4 s (heartbeat deadline) + 1 s (grace) "
        "after the silent client logged in, and 5 s (`close_timeout_ms`: the Kick a slow "
        "reader is sent never drains) after the slow reader was cut.",
        "The slow reader is cut by `max_tracked_pushes` (256 unacknowledged pushes) or by "
        "`max_write_buffer`, whichever comes first. Both only count what the gateway holds: "
        "the kernel's send buffer (loopback autotunes it to megabytes) fills first. A "
        "client that pings but never reads, with little traffic for it, therefore stays "
        "connected for a long time (an earlier run of this scenario with fewer pushes kept "
        "it for 30 s): its pushes are resent 3 times and given up with a Notify, and "
        "nothing cuts it until one of those limits is crossed.",
    ]
    heap_ok = not trace or delta2 < 0.25 * per_round
    passed = (
        check.passed
        and all(x.fds <= baseline.fds for x in afters)
        and all(x.server_sockets <= baseline.server_sockets for x in opens)
        and all(x.connections <= baseline.connections for x in afters)
        and all(x.routes <= baseline.routes for x in afters)
        and second.after.parked <= baseline.parked
        and heap_ok
        and all(x is not None for x in recovered)
        and stats["slow_consumer_kicks"] >= len(rounds)
        and stats["heartbeat_timeouts"] >= len(rounds)
        and cut == 0
    )
    return ScenarioResult(
        "resources", "4. A silent client, a slow reader and a connect flood", passed, setup,
        rows, notes, check, _now() - began,
    )


# --- scenario 5: fuzzing the decoder ----------------------------------------------------------


def _seed_messages() -> list[Message]:
    push = Push(conv="dm:5:alice:bob", seq=7, sender="alice", body=b"hi bob", msg_id=9,
                server_ms=1_700_000_000_000)
    return [
        Login(token="v1.alice.phone.1.abc", device="phone"),
        LoginAck(uid="alice", session="gw-1.1", heartbeat_ms=30_000),
        Ping(nonce=1),
        Pong(nonce=1, server_ms=5),
        Send(cid=65537, conv="team", body=b"hello" * 20),
        SendAck(cid=65537, conv="team", seq=3, msg_id=11),
        push,
        PushBatch(pushes=(push, attrs.evolve(push, seq=8, body=b"x" * 300))),
        PushAck(conv="team", seq=8),
        SyncRequest(req_id=1, after=(("team", 3),), limit=100),
        SyncResponse(req_id=1, pages=(SyncPage(conv="team", messages=(push,), more=True),)),
        Notify(entries=(("team", 9), ("lobby", 120))),
        Receipt(conv="team", seq=8, reader="bob"),
        Kick(code=2, reason="auth failed"),
        ErrorFrame(code=5, reason="rate limited", retry_after_ms=1000),
    ]


def _write_corpus(directory: Path) -> int:
    """Valid frames in every input mode of the harness (so it starts from real traffic)."""
    types = sorted(int(t) for t in FrameType)
    n = 0
    for i, msg in enumerate(_seed_messages()):
        frame = encode(msg)
        body = frame[8:]
        type_index = types.index(frame[2])
        for data in (
            b"\x00" + frame,
            b"\x01" + frame + frame,
            b"\x02" + frame,
            b"\x03" + bytes([type_index]) + body,
            b"\x04" + bytes([type_index]) + body,
        ):
            (directory / f"seed-{i:02d}-{data[0]}").write_bytes(data)
            n += 1
    return n


_REPORT_RE = re.compile(
    r"fuzz_decoder: (\d+) inputs, (\d+) accepted by both decoders, slowest input ([\d.]+) ms "
    r"\(imkit's part ([\d.]+) ms\), peak RSS (\d+) MiB"
)


def scenario_fuzz(*, runs: int = 200_000, max_time_s: int = 240) -> ScenarioResult:
    """Run tests/fuzz/fuzz_decoder.py under atheris for ``runs`` inputs in a subprocess."""
    began = _now()
    harness = ROOT / "tests" / "fuzz" / "fuzz_decoder.py"
    with tempfile.TemporaryDirectory(prefix="imkit-fuzz-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus"
        corpus.mkdir()
        seeds = _write_corpus(corpus)
        artifacts = work / "artifacts"
        artifacts.mkdir()
        cmd = [
            sys.executable,
            str(harness),
            f"-atheris_runs={runs}",
            f"-max_total_time={max_time_s}",
            f"-artifact_prefix={artifacts}/",
            "-print_final_stats=1",
            str(corpus),
        ]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = _now()
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=work, timeout=max_time_s + 120,
            check=False,
        )
        wall = _now() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        crashes = sorted(p.name for p in artifacts.iterdir())
        corpus_size = sum(1 for _ in corpus.iterdir())
    output = proc.stdout + proc.stderr
    match = _REPORT_RE.search(output)
    executed = re.search(r"stat::number_of_executed_units: (\d+)", output)
    inputs = int(match.group(1)) if match else int(executed.group(1)) if executed else 0
    accepted = int(match.group(2)) if match else 0
    slowest = float(match.group(3)) if match else float("nan")
    slowest_imkit = float(match.group(4)) if match else float("nan")
    peak_inside = int(match.group(5)) if match else 0
    peak_outside = after.ru_maxrss / 1024  # max over the children so far (this one dominates)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    crashed = proc.returncode != 0 or bool(crashes) or "Uncaught Python exception" in output
    rows = [
        ("inputs tried", f"{inputs} (asked for {runs}; seed corpus {seeds} valid frames)"),
        ("inputs both decoders accepted (valid frames)", str(accepted)),
        ("**crashes**", f"**{len(crashes) if crashes else int(crashed)}**"
         + (f" ({', '.join(crashes)})" if crashes else "")),
        ("slowest input, CPU (whole / imkit's part without the oracle)",
         f"{slowest:.2f} ms / {slowest_imkit:.2f} ms"),
        ("peak RSS of the fuzzing process (its own report / getrusage)",
         f"{peak_inside} MiB / {peak_outside:.0f} MiB"),
        ("corpus after the run", f"{corpus_size} inputs"),
        ("wall time / CPU time", f"{wall:.1f} s / {cpu:.1f} s "
         f"({inputs / max(wall, 1e-9):.0f} inputs/s)"),
        ("exit code", str(proc.returncode)),
    ]
    setup = (
        f"`{Path(sys.executable).name} tests/fuzz/fuzz_decoder.py -atheris_runs={runs} "
        f"-max_total_time={max_time_s}` in a subprocess (the harness is used as it is), "
        f"started from a seed corpus of valid frames of every type in each of its five input "
        f"modes (whole frame vs the reference decoder; byte stream into a client and a "
        f"server Connection; body behind a valid header vs the reference decoder; LZ4 body "
        f"with real or forged size). A crash is any exception other than the protocol's "
        f"own `RemoteProtocolError`, or a disagreement with the oracle."
    )
    notes = [
        "The slowest time per input is CPU time measured by the harness (whole input "
        "including the slow reference decoder, and imkit's part alone); atheris adds "
        "coverage instrumentation, so real decoding is faster.",
    ]
    if crashed and not crashes:
        notes.append("The fuzzer exited with an error; last lines: "
                     + " | ".join(output.strip().splitlines()[-5:]))
    return ScenarioResult(
        "fuzz", "5. Fuzzing the decoder", not crashed and inputs > 0, setup, rows, notes, None,
        _now() - began,
    )


# --- the report --------------------------------------------------------------------------------


def machine() -> str:
    """One line about the machine and the interpreter."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        kib = int(f.readline().split()[1])
        mem = f", {kib / 1024 / 1024:.0f} GiB RAM"
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"default asyncio loop"
    )


HEADER = """\
# Reliability figures

Produced by `benchmarks/reliability.py`; do not edit by hand. The promise being
tested: a message the server acknowledged is never lost; every member that comes
back online gets every stored message once and in seq order per conversation
(duplicates may cross the wire; the client's SeqWindow drops them); the promise
holds through a killed gateway, a restarted server and lost acks once the fault
ends; and bad peers cost bounded resources that come back when they go.

**Machine:** {machine}. Figures from {when}; the machine may have been running
another light job, so latencies are indicative (the zero counts are not).

**Reproduce:** `{command}` (about {minutes:.0f} min; `--quick` for a scaled-down
run, `--help` for the scale flags).

**Method.** Each scenario starts the reference system (`examples/`) in one process on
loopback — ipconf, gateways, logic, route table, bus and store — and drives it with
real `imkit.aio.Client` connections. Every message body is `sender-counter`. The
harness logs each send as ok (acknowledged with a seq), failed (`SendFailed`) or
unknown (no answer by the end), and each message the client hands to its
application. After the fault ends, sending stops and the clients drain: first on
their own (pushes, the reconnect's inbox sync, gap syncs), then, if anyone is still
behind the store, through an explicit `client.sync()`. The check then counts, against
the store: **lost** (an acknowledged message some member never got), **unexpected**
(a delivery that was never sent, or differs from what the store holds at that seq),
**duplicates delivered to the application**, **order violations** (a delivery whose
seq is not above the previous one in that conversation), **seq reuse** (one (conv,
seq) seen with two bodies) and double stores. A scenario passes only if these are all
0 (plus its own resource criteria). Duplicates on the wire are allowed and counted.

| scenario | verdict | lost | unexpected | app dups | order | seq reuse | wire dups |
|---|---|---|---|---|---|---|---|
{summary}
"""

FOOTER = """\
## What these scenarios do not cover

* **Real processes.** Everything runs in one process and one event loop; the
  multi-process scale-out (Redis route table and registry, NATS bus, several logic
  servers) does not exist yet. A "killed" gateway is simulated in-process
  (`examples.faultproxy.kill_gateway`): its sockets are aborted and its tasks
  cancelled, which is what the clients see of a `kill -9`, but no process dies, the
  kernel is not involved in cleaning up, and the shared route table, bus and store
  are never on the far side of a network.
* **`SIGSTOP` / a hung process, half-open connections, packet loss.** A gateway that
  stops without closing its sockets is detected only by heartbeats; none of these
  runs freezes a peer. `tc netem` is not available here, and loss inside a TCP stream
  is the kernel's business; the proxy only drops whole frames, delays and slices.
* **Several machines, clock skew, partitions between servers, disk failure** (the
  SQLite restart keeps the file; `synchronous=NORMAL` survives a process kill, not a
  power loss).
* **A dead gateway's routes.** Nothing unbinds the routes of a gateway that vanished
  (`RouteService.unbind_gateway` exists; no one calls it when the gateway disappears
  from discovery). Here every orphan logs in again and its new route replaces the
  stale one; a device that never comes back stays "online" on the dead gateway, and
  pushes to it are published to a subject nobody reads (its messages wait in the
  store for its next sync).
* **Load.** Rates are moderate and the machine is small; these are correctness runs
  under faults, not capacity figures (see [benchmarks](benchmarks.md)).
"""


def render(results: list[ScenarioResult], command: str, elapsed_s: float) -> str:
    """docs/reliability.md from the scenarios' results."""
    summary = []
    for r in results:
        c = r.check
        cells = (
            [str(c.lost), str(c.unexpected), str(c.app_duplicates), str(c.order_violations),
             str(c.seq_reuse), str(c.wire_duplicates)]
            if c is not None
            else ["—"] * 6
        )
        verdict = "pass" if r.passed else "**FAIL**"
        summary.append(f"| {r.title} | {verdict} | " + " | ".join(cells) + " |")
    head = HEADER.format(
        machine=machine(),
        when=time.strftime("%Y-%m-%d"),
        command=command,
        minutes=max(1.0, elapsed_s / 60),
        summary="\n".join(summary),
    )
    body = "\n".join(r.markdown() for r in results)
    return f"{head}\n{body}\n{FOOTER}"


SCENARIOS = ("kill", "restart", "acks", "resources", "fuzz")


async def run_scenarios(args: argparse.Namespace) -> list[ScenarioResult]:
    """Run the chosen scenarios one after the other (each on its own cluster)."""
    quick = args.quick
    scale = 0.34 if quick else 1.0
    n = args.clients or (30 if quick else 120)
    small = max(8, int((args.clients or 40) * (0.5 if quick else 1.0)))
    only = set(args.only.split(",")) if args.only else set(SCENARIOS)
    results: list[ScenarioResult] = []
    runners: list[tuple[str, Callable[[], Awaitable[ScenarioResult]]]] = [
        ("kill", lambda: scenario_gateway_kill(
            clients=n, rate=args.rate, load_s=12.0 * scale * args.duration,
            kill_at_s=4.0 * scale * args.duration)),
        ("restart", lambda: scenario_restart(
            clients=small, rate=2.0 * args.rate, restarts=args.restarts,
            phase_s=4.0 * scale * args.duration)),
        ("acks", lambda: scenario_dropped_acks(
            clients=small, rate=2.0 * args.rate, load_s=8.0 * scale * args.duration)),
        ("resources", lambda: scenario_resources(
            clients=small, rate=2.0 * args.rate, phase_s=6.0 * scale * args.duration,
            flood=args.flood, trace=not args.no_tracemalloc)),
    ]
    for key, runner in runners:
        if key not in only:
            continue
        print(f"-- {key} ...", file=sys.stderr, flush=True)
        result = await runner()
        print(f"   {'pass' if result.passed else 'FAIL'} in {result.seconds:.1f} s",
              file=sys.stderr, flush=True)
        results.append(result)
    if "fuzz" in only:
        print("-- fuzz ...", file=sys.stderr, flush=True)
        runs = args.fuzz_runs if args.fuzz_runs is not None else (20_000 if quick else 500_000)
        result = await asyncio.to_thread(scenario_fuzz, runs=runs)
        print(f"   {'pass' if result.passed else 'FAIL'} in {result.seconds:.1f} s",
              file=sys.stderr, flush=True)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios, print the report, write docs/reliability.md (full runs)."""
    p = argparse.ArgumentParser(prog="benchmarks/reliability.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="scaled down; prints, writes nothing")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--clients", type=int, default=0,
                   help="clients in the kill scenario (default 120; the others use 40)")
    p.add_argument("--rate", type=float, default=1.0, help="multiplier of the send rates")
    p.add_argument("--duration", type=float, default=1.0, help="multiplier of the phase lengths")
    p.add_argument("--restarts", type=int, default=2, help="crash-restarts in scenario 2")
    p.add_argument("--flood", type=int, default=500, help="connections in the connect flood")
    p.add_argument("--fuzz-runs", type=int, default=None, help="atheris inputs (default 500k)")
    p.add_argument("--no-tracemalloc", action="store_true", help="skip the heap figures")
    p.add_argument("--out", default=None, help=f"write the report here (default {DOC} "
                   "for full runs)")
    args = p.parse_args(argv)
    began = _now()
    results = asyncio.run(run_scenarios(args))
    elapsed = _now() - began
    command = ".venv/bin/python benchmarks/reliability.py" + (
        " " + " ".join(argv if argv is not None else sys.argv[1:])
        if (argv if argv is not None else sys.argv[1:]) else ""
    )
    text = render(results, command, elapsed)
    print(text)
    out = args.out or (None if args.quick or args.only else str(DOC))
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
