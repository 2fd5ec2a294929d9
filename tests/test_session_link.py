"""A ClientSession and a ServerSession joined by a faulty fake link, with a tiny logic.

The world is a discrete-event simulation on a virtual clock: every frame crosses a
link that may drop, duplicate, delay and reorder it; connections may be cut
silently (half-open) or closed; a few lines of "logic" assign seqs per
conversation (skipping some, as a restarted allocator does), store idempotently on
(uid, cid), fan out pushes (or Notify signals for a read-fan-out room) and answer
syncs. Hypothesis chooses the faults and the schedule. After the faults end and the
clients resync, a Jepsen-style history check counts lost, unexpected, duplicate
and out-of-order deliveries to each application: all must be 0.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imkit.errors import AuthError, CapacityError
from imkit.protocol import (
    SENDERS,
    ErrorCode,
    Message,
    Notify,
    Push,
    Role,
    SyncPage,
    decode,
    encode,
)
from imkit.session import (
    ClientConfig,
    ClientSession,
    CloseConnection,
    MessageReceived,
    Output,
    SendAcked,
    SendFailed,
    SendRequested,
    ServerConfig,
    ServerSession,
    ServerState,
    ServerTimer,
    SessionEvent,
    SessionStarted,
    SyncRequested,
)
from imkit.timingwheel import TimingWheel

LATENCY_MS = 5
FRAME_TYPE = {cls: ft for ft, (cls, _) in SENDERS.items()}
MEMBERS: dict[str, tuple[str, ...]] = {
    "ab": ("alice", "bob"),  # 1:1
    "g3": ("alice", "bob", "carol"),  # small group: write fan-out (pushes)
    "room": ("alice", "bob", "carol"),  # big-group style: read fan-out (Notify + sync)
}
NOTIFY_CONVS = frozenset({"room"})
USERS = ("alice", "bob", "carol")
#: Small limits so that paging, cache misses, quotas and window edges happen often.
SERVER_CONFIG = ServerConfig(
    max_sends_in_flight=4,
    ack_cache=2,
    cid_window=16,
    max_tracked_pushes=8,
    max_sync_limit=3,
)


def authenticate(token: str, device: str) -> str:
    """Tokens are "tok-<uid>"; anything else is refused."""
    if not token.startswith("tok-"):
        raise AuthError("bad token")
    return token[4:]


@dataclass
class Faults:
    """What the link does to frames while faults are on."""

    drop: float = 0.0
    dup: float = 0.0
    jitter_ms: int = 0  # extra random delay per frame; > 0 reorders frames
    skip_seq: float = 0.0  # probability the allocator skips a seq


@dataclass(eq=False)
class Conn:
    """One transport connection between a client and a server session."""

    id: int
    uid: str
    server: ServerSession | None = None
    client_open: bool = True
    server_open: bool = True
    cut: bool = False  # silently dead: every frame lost, no EOF (half-open)
    last: dict[str, int] = field(default_factory=lambda: {"c2s": 0, "s2c": 0})


class World:
    """Clients, their server sessions, the links between them and the logic."""

    def __init__(self, seed: int, faults: Faults) -> None:
        self.now = 0
        self.rng = random.Random(seed)
        self.faults = faults
        self.faults_on = True
        self.wheel: TimingWheel[ServerTimer] = TimingWheel(start_ms=0)
        self.events: list[tuple[int, int, str, Any]] = []
        self.order = itertools.count()
        self.conn_ids = itertools.count(1)
        self.clients: dict[str, ClientSession] = {}
        self.conn: dict[str, Conn | None] = {}
        self.current: dict[str, ServerSession] = {}  # uid -> the logged-in session
        self.all_sessions: list[ServerSession] = []
        self.live_sessions: list[ServerSession] = []
        # the store
        self.store: dict[str, dict[int, tuple[str, int, bytes]]] = {c: {} for c in MEMBERS}
        self.next_seq: dict[str, int] = dict.fromkeys(MEMBERS, 0)
        self.idem: dict[tuple[str, int], tuple[str, int]] = {}
        self.store_repeats = 0
        # the history
        self.sent: dict[tuple[str, int], tuple[str, bytes]] = {}
        self.outcomes: dict[tuple[str, int], list[tuple[str, int]]] = {}
        self.delivered: dict[str, dict[str, list[int]]] = {
            u: {c: [] for c in MEMBERS} for u in USERS
        }
        self.body_mismatches = 0
        self.counter = itertools.count(1)
        for i, uid in enumerate(USERS):
            self.clients[uid] = ClientSession(
                token=f"tok-{uid}",
                device="phone",
                now_ms=0,
                first_cid=1 + i * 1_000_000,
                rng=random.Random(seed + i),
                config=ClientConfig(
                    max_in_flight=6,  # above the server quota (4): QUOTA_EXCEEDED happens
                    max_cid_span=8,
                    max_queued=64,
                    sync_limit=3,
                    max_sync_convs=2,
                    max_held=4,  # pushes beyond it are left unacked and synced
                    max_conversations=2,  # 3 conversations: windows get evicted ...
                ),
                cursor_loader=self.app_cursor(uid),  # ... and restored from the app
            )
            self.conn[uid] = None
            self.connect(uid)

    def app_cursor(self, uid: str) -> Callable[[str], int]:
        """The application's own record: the last seq it was handed (in order)."""

        def load(conv: str) -> int:
            got = self.delivered[uid][conv]
            return got[-1] if got else 0

        return load

    # -- scheduling ----------------------------------------------------------------

    def at(self, t: int, kind: str, data: Any) -> None:
        heapq.heappush(self.events, (t, next(self.order), kind, data))

    def next_time(self) -> int | None:
        times = [self.events[0][0]] if self.events else []
        d = self.wheel.next_deadline_ms()
        if d is not None:
            times.append(d)
        for c in self.clients.values():
            d = c.next_deadline_ms()
            if d is not None:
                times.append(d)
        return min(times) if times else None

    def run_until(self, t_end: int) -> None:
        while True:
            t = self.next_time()
            if t is None or t > t_end:
                self.now = max(self.now, t_end)
                return
            self.now = max(self.now, t)
            while self.events and self.events[0][0] <= self.now:
                _, _, kind, data = heapq.heappop(self.events)
                getattr(self, "ev_" + kind)(*data)
            for item in self.wheel.advance(self.now):
                session = item.session
                self.server_outputs(session.tag, session.on_timer(item, self.now))
            for uid, c in self.clients.items():
                d = c.next_deadline_ms()
                if d is not None and d <= self.now:
                    self.client_outputs(uid, c.tick(self.now))
            self.check()

    def check(self, *, full: bool = False) -> None:
        """Invariants of every live session (closed ones once); ``full``: the wheel too."""
        for c in self.clients.values():
            c._check()
        for s in self.live_sessions:
            s._check()
        self.live_sessions = [s for s in self.live_sessions if s.state is not ServerState.CLOSED]
        if full:
            self.wheel._check()

    # -- the link ------------------------------------------------------------------

    def transmit(self, conn: Conn, direction: str, msg: Message) -> None:
        if conn.cut:
            return
        # every frame a session emits must survive the real codec, role check included
        sender = Role.CLIENT if direction == "c2s" else Role.SERVER
        assert sender in SENDERS[FRAME_TYPE[type(msg)]][1], f"{sender} may not send {msg}"
        msg = decode(encode(msg))
        f = self.faults
        on = self.faults_on
        if on and self.rng.random() < f.drop:
            return
        copies = 2 if on and self.rng.random() < f.dup else 1
        for _ in range(copies):
            t = self.now + LATENCY_MS
            if on and f.jitter_ms:
                t += self.rng.randint(0, f.jitter_ms)  # may overtake earlier frames
            else:
                t = max(t, conn.last[direction])  # in order, like one TCP stream
            conn.last[direction] = max(conn.last[direction], t)
            self.at(t, "deliver", (conn, direction, msg))

    def ev_deliver(self, conn: Conn, direction: str, msg: Message) -> None:
        if conn.cut:
            return
        if direction == "c2s":
            if conn.server_open and conn.server is not None:
                self.server_outputs(conn, conn.server.receive(msg, self.now))
        elif conn.client_open and self.conn[conn.uid] is conn:
            self.client_outputs(conn.uid, self.clients[conn.uid].receive(msg, self.now))

    def connect(self, uid: str) -> None:
        client = self.clients[uid]
        old = self.conn[uid]
        if client.connected or (old is not None and old.client_open):
            return
        conn = Conn(id=next(self.conn_ids), uid=uid)
        conn.server = ServerSession(
            wheel=self.wheel,
            authenticate=authenticate,
            session_id=f"s{conn.id}",
            now_ms=self.now,
            config=SERVER_CONFIG,
            tag=conn,
        )
        self.all_sessions.append(conn.server)
        self.live_sessions.append(conn.server)
        self.conn[uid] = conn
        self.client_outputs(uid, client.connection_made(self.now))

    def ev_reconnect(self, uid: str) -> None:
        self.connect(uid)

    def client_lost(self, conn: Conn) -> None:
        """The client side of ``conn`` ends; it will reconnect after its back-off."""
        if not conn.client_open:
            return
        conn.client_open = False
        client = self.clients[conn.uid]
        if self.conn[conn.uid] is conn:
            self.client_outputs(conn.uid, client.connection_lost(self.now))
            self.at(self.now + client.reconnect_delay_ms(), "reconnect", (conn.uid,))

    def server_lost(self, conn: Conn) -> None:
        if conn.server_open and conn.server is not None:
            conn.server_open = False
            self.server_outputs(conn, conn.server.connection_lost(self.now))

    def ev_eof_to_server(self, conn: Conn) -> None:
        if not conn.cut:
            self.server_lost(conn)

    def ev_eof_to_client(self, conn: Conn) -> None:
        if not conn.cut:
            self.client_lost(conn)

    # -- outputs -------------------------------------------------------------------

    def client_outputs(self, uid: str, outs: list[Output]) -> None:
        conn = self.conn[uid]
        for o in outs:
            if isinstance(o, SessionEvent):
                self.client_event(uid, o)
                if isinstance(o, CloseConnection) and conn is not None and conn.client_open:
                    conn.client_open = False
                    self.at(self.now + LATENCY_MS, "eof_to_server", (conn,))
                    client = self.clients[uid]
                    self.at(self.now + client.reconnect_delay_ms(), "reconnect", (uid,))
            else:
                assert conn is not None and conn.client_open, f"{uid} sent {o} without a link"
                self.transmit(conn, "c2s", o)

    def client_event(self, uid: str, ev: SessionEvent) -> None:
        if isinstance(ev, MessageReceived):
            p = ev.push
            self.delivered[uid][p.conv].append(p.seq)
            stored = self.store[p.conv].get(p.seq)
            if stored is None or stored[2] != p.body or stored[0] != p.sender:
                self.body_mismatches += 1
        elif isinstance(ev, SendAcked):
            self.outcomes.setdefault((uid, ev.cid), []).append(("ok", ev.seq))
        elif isinstance(ev, SendFailed):
            self.outcomes.setdefault((uid, ev.cid), []).append(("failed", ev.code))

    def server_outputs(self, conn: Conn, outs: list[Output]) -> None:
        session = conn.server
        assert session is not None
        for o in outs:
            if isinstance(o, SessionStarted):
                old = self.current.get(o.uid)
                self.current[o.uid] = session
                if old is not None and old is not session:
                    self.server_outputs(old.tag, old.kick(ErrorCode.REPLACED, reason="replaced"))
            elif isinstance(o, SendRequested):
                self.at(self.now + self.rng.randint(0, 20), "logic_send", (session, o))
            elif isinstance(o, SyncRequested):
                self.at(self.now + self.rng.randint(0, 20), "logic_sync", (session, o))
            elif isinstance(o, CloseConnection):
                if conn.server_open:
                    conn.server_open = False
                    self.at(self.now + LATENCY_MS, "eof_to_client", (conn,))
            elif isinstance(o, SessionEvent):
                pass
            elif conn.server_open:
                self.transmit(conn, "s2c", o)

    # -- the logic -----------------------------------------------------------------

    def ev_logic_send(self, session: ServerSession, ev: SendRequested) -> None:
        key = (ev.uid, ev.cid)
        if key in self.idem:
            self.store_repeats += 1
            conv, seq = self.idem[key]
        else:
            conv = ev.conv
            if ev.uid not in MEMBERS[conv]:
                self.server_outputs(session.tag, session.fail_send(ev.cid, ErrorCode.NOT_MEMBER))
                return
            seq = self.next_seq[conv] + 1
            if self.faults_on and self.rng.random() < self.faults.skip_seq:
                seq += 1  # the allocator skipped a seq (restart): seq - 1 never exists
            self.next_seq[conv] = seq
            self.store[conv][seq] = (ev.uid, ev.cid, ev.body)
            self.idem[key] = (conv, seq)
            self.fan_out(conv, seq)
        self.server_outputs(session.tag, session.ack_send(ev.cid, seq, wall_ms=self.now))

    def as_push(self, conv: str, seq: int) -> Push:
        sender, _, body = self.store[conv][seq]
        return Push(conv=conv, seq=seq, sender=sender, body=body)

    def fan_out(self, conv: str, seq: int) -> None:
        for uid in MEMBERS[conv]:
            s = self.current.get(uid)
            if s is None or s.state is not ServerState.ACTIVE:
                continue  # offline: it syncs when it comes back
            if conv in NOTIFY_CONVS:
                self.server_outputs(s.tag, [Notify(entries=((conv, seq),))])
            else:
                self.server_outputs(s.tag, s.push(self.as_push(conv, seq), self.now))

    def ev_logic_sync(self, session: ServerSession, ev: SyncRequested) -> None:
        after = dict(ev.after) if ev.after else dict.fromkeys(
            (c for c, m in MEMBERS.items() if ev.uid in m), 0
        )
        pages = []
        for conv, cursor in after.items():
            if ev.uid not in MEMBERS.get(conv, ()):
                continue
            seqs = sorted(s for s in self.store[conv] if s > cursor)
            page = tuple(self.as_push(conv, s) for s in seqs[: ev.limit])
            pages.append(SyncPage(conv=conv, messages=page, more=len(seqs) > ev.limit))
        self.server_outputs(session.tag, session.sync_response(ev.req_id, pages))

    # -- actions -------------------------------------------------------------------

    def send(self, uid: str, conv: str) -> None:
        body = f"{uid}-{next(self.counter)}".encode()
        try:
            cid, outs = self.clients[uid].send(conv, body, self.now)
        except CapacityError:
            return
        self.sent[(uid, cid)] = (conv, body)
        self.client_outputs(uid, outs)

    def cut(self, uid: str) -> None:
        conn = self.conn[uid]
        if conn is not None:
            conn.cut = True

    def close(self, uid: str) -> None:
        conn = self.conn[uid]
        if conn is not None and not conn.cut:
            self.at(self.now + LATENCY_MS, "eof_to_server", (conn,))
            self.at(self.now + LATENCY_MS, "eof_to_client", (conn,))

    def heal(self, *, reconnect: bool = True) -> None:
        """Faults end and every client resyncs.

        ``reconnect=True``: every connection is closed, so each client resyncs the
        way it does after any reconnect (connection_made). ``False``: connected
        clients call ``sync()``; the others resync when they reconnect.
        """
        self.faults_on = False
        for uid, c in self.clients.items():
            if c.connected and not reconnect:
                self.client_outputs(uid, c.sync(self.now))
            elif c.connected:
                self.close(uid)
            else:
                self.at(self.now, "reconnect", (uid,))

    # -- the verdict ---------------------------------------------------------------

    def history(self) -> dict[str, int]:
        self.check(full=True)
        lost = unexpected = app_dups = order = 0
        for conv, msgs in self.store.items():
            expected = set(msgs)
            for uid in MEMBERS[conv]:
                got = self.delivered[uid][conv]
                lost += len(expected - set(got))
                unexpected += len(set(got) - expected)
                app_dups += len(got) - len(set(got))
                order += sum(1 for a, b in itertools.pairwise(got) if b <= a)
        keys = [(u, cid) for msgs in self.store.values() for (u, cid, _) in msgs.values()]
        bodies = [body for msgs in self.store.values() for (_, _, body) in msgs.values()]
        stored_twice = len(keys) - len(set(keys)) + len(bodies) - len(set(bodies))
        bad_acks = multiple_outcomes = unsettled = 0
        for key in self.sent:
            outs = self.outcomes.get(key, [])
            if not outs:
                unsettled += 1
            if len(outs) > 1:
                multiple_outcomes += 1
            for kind, value in outs:
                if kind == "ok" and self.idem.get(key) != (self.sent[key][0], value):
                    bad_acks += 1  # acked with a seq the store does not hold for it
        return {
            "lost": lost,
            "unexpected": unexpected,
            "app_duplicates": app_dups,
            "order_violations": order,
            "body_mismatches": self.body_mismatches,
            "stored_twice": stored_twice,
            "bad_acks": bad_acks,
            "multiple_outcomes": multiple_outcomes,
            "unsettled_sends": unsettled,
        }


CLEAN = dict.fromkeys(
    (
        "lost",
        "unexpected",
        "app_duplicates",
        "order_violations",
        "body_mismatches",
        "stored_twice",
        "bad_acks",
        "multiple_outcomes",
        "unsettled_sends",
    ),
    0,
)
#: After the faults: long enough for a half-open link to be declared dead by both
#: heartbeats (90 s), a reconnect back-off (<= 30 s), every retry and sync timeout.
DRAIN_MS = 400_000

faults_st = st.builds(
    Faults,
    drop=st.sampled_from([0.0, 0.05, 0.3]),
    dup=st.sampled_from([0.0, 0.1, 0.5]),
    jitter_ms=st.sampled_from([0, 30, 400]),
    skip_seq=st.sampled_from([0.0, 0.3]),
)
actions_st = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.sampled_from(USERS), st.sampled_from(sorted(MEMBERS))),
        st.tuples(st.just("wait"), st.sampled_from([1, 20, 300, 3_000, 40_000])),
        st.tuples(st.just("cut"), st.sampled_from(USERS)),
        st.tuples(st.just("close"), st.sampled_from(USERS)),
    ),
    max_size=40,
)


def play(world: World, actions: list[tuple[Any, ...]]) -> None:
    for action in actions:
        kind = action[0]
        if kind == "send":
            world.send(action[1], action[2])
        elif kind == "wait":
            world.run_until(world.now + action[1])
        elif kind == "cut":
            world.cut(action[1])
        else:
            world.close(action[1])
        world.check()


class TestFaultyLink:
    @settings(max_examples=150, deadline=None)
    @given(st.integers(0, 2**32), faults_st, actions_st, st.booleans())
    def test_history_is_clean_after_heal(
        self, seed: int, faults: Faults, actions: list[tuple[Any, ...]], reconnect: bool
    ) -> None:
        """Lost, unexpected, app duplicates, order violations and double stores are all 0."""
        world = World(seed, faults)
        play(world, actions)
        world.heal(reconnect=reconnect)
        world.run_until(world.now + DRAIN_MS)
        assert world.history() == CLEAN

    @settings(max_examples=15, deadline=None)
    @given(st.integers(0, 2**32))
    def test_heavy_traffic_through_faults(self, seed: int) -> None:
        """Hundreds of messages through drops, duplicates, reordering and cuts still check out."""
        world = World(seed, Faults(drop=0.1, dup=0.2, jitter_ms=50, skip_seq=0.1))
        rng = random.Random(seed)
        for step in range(300):
            uid = rng.choice(USERS)
            conv = rng.choice([c for c, m in MEMBERS.items() if uid in m])
            world.send(uid, conv)
            world.run_until(world.now + rng.choice([0, 1, 5, 50]))
            if step % 97 == 96:
                world.cut(rng.choice(USERS))
        world.heal()
        world.run_until(world.now + DRAIN_MS)
        assert world.history() == CLEAN
        assert sum(len(m) for m in world.store.values()) > 100


class TestCleanLink:
    def test_every_message_delivered_to_every_member(self) -> None:
        """Without faults every send is acked and delivered once, in order, with no resync."""
        world = World(1, Faults())
        for i in range(30):
            world.send(USERS[i % 3], ["ab", "g3", "room"][i % 3] if i % 3 != 2 else "g3")
            world.run_until(world.now + 7)
        world.run_until(world.now + 5_000)
        assert world.history() == CLEAN
        assert world.store_repeats == 0
        for s in world.all_sessions:
            assert s.stats.duplicate_sends == 0
            assert s.stats.pushes_retried == 0

    def test_offline_receiver_catches_up_by_sync(self) -> None:
        """Messages stored while bob is cut off reach him after his heartbeat notices."""
        world = World(2, Faults())
        world.run_until(100)
        world.cut("bob")
        for _ in range(10):
            world.send("alice", "ab")
            world.run_until(world.now + 10)
        assert world.delivered["bob"]["ab"] == []
        world.run_until(world.now + DRAIN_MS)
        assert world.delivered["bob"]["ab"] == sorted(world.store["ab"])
        assert world.history() == CLEAN

    def test_dropped_acks_make_wire_duplicates_only(self) -> None:
        """With 30% of all frames dropped, duplicates stay on the wire, never in the app."""
        world = World(3, Faults(drop=0.3))
        for i in range(40):
            world.send(USERS[i % 2], "ab")
            world.run_until(world.now + 50)
        world.heal()
        world.run_until(world.now + DRAIN_MS)
        assert world.history() == CLEAN
        wire_dups = sum(c.stats.duplicate_pushes for c in world.clients.values())
        resent = sum(s.stats.duplicate_sends for s in world.all_sessions)
        assert wire_dups + resent > 0


@pytest.mark.parametrize("seed", range(3))
def test_group_of_three_with_notify_room(seed: int) -> None:
    """Group pushes and the Notify-driven room both reach all three members exactly once."""
    world = World(seed, Faults(jitter_ms=30, dup=0.2))
    for i in range(30):
        world.send(USERS[i % 3], "room" if i % 2 else "g3")
        world.run_until(world.now + 3)
    world.heal()
    world.run_until(world.now + DRAIN_MS)
    assert world.history() == CLEAN
    for uid in USERS:
        assert world.delivered[uid]["room"] == sorted(world.store["room"])
