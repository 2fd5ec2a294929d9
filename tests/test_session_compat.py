"""Deployed clients and servers keep working across the upgrade to protocol version 2.

``tests/compat/v1`` is a frozen copy of the protocol and sessions as released with
protocol version 1. Here a client of one release and a server of the other run
the whole exchange over real bytes (each side's own sans-IO ``Connection``
encodes and decodes): login, send and its ack, push and push ack, the inbox sync
and a Notify-triggered sync, read receipts both ways, and a kick. A small "logic"
stores messages with seqs, fans them out and answers syncs, and a decoding error on
the server is handled as the real transport does (``Error(PROTOCOL_ERROR)``, then
close).

- a version 1 client against the new server: the server treats its Login as
  version 1 and never sends it a field it cannot decode;
- a new client against a version 1 server: the v1 server refuses the version
  offer in Login (it refuses longer arrays), the client falls back to version 1's
  Login on its next connection and everything works.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

import imkit.protocol as new_protocol
import imkit.session as new_session
import tests.compat.v1.protocol as v1_protocol
import tests.compat.v1.session as v1_session
from imkit.errors import AuthError, RemoteProtocolError
from imkit.timingwheel import TimingWheel

NEW = ("new", new_protocol, new_session)
V1 = ("v1", v1_protocol, v1_session)

USERS = ("alice", "bob")
CONVS = {"ab": USERS, "room": USERS}  # room: read fan-out (Notify, then sync)


def authenticate(token: str, device: str) -> str:
    """Tokens are "tok-<uid>"."""
    if not token.startswith("tok-"):
        raise AuthError("bad token")
    return token[4:]


class Link:
    """One TCP connection: a client Connection and a server Connection, bytes between."""

    def __init__(self, world: World, uid: str) -> None:
        self.world = world
        self.uid = uid
        cp, sp = world.client_mod[1], world.server_mod[1]
        self.client_conn = cp.Connection(cp.Role.CLIENT)
        self.server_conn = sp.Connection(sp.Role.SERVER)
        self.session: Any = world.server_mod[2].ServerSession(
            wheel=world.wheel,
            authenticate=authenticate,
            session_id=f"s{next(world.ids)}",
            now_ms=world.now,
        )
        self.open = True
        self.failed = False  # the server's Connection refused bytes


class World:
    """Two users on clients of one release, one server of the other, and a tiny logic."""

    def __init__(self, client_mod: tuple[str, Any, Any], server_mod: tuple[str, Any, Any]):
        self.client_mod = client_mod
        self.server_mod = server_mod
        self.now = 0
        self.ids = iter(range(1, 10_000))
        self.wheel: TimingWheel[Any] = TimingWheel(tick_ms=1)
        self.store: dict[str, list[tuple[str, bytes]]] = {c: [] for c in CONVS}
        self.idem: dict[tuple[str, int], int] = {}
        self.clients: dict[str, Any] = {
            uid: client_mod[2].ClientSession(
                token=f"tok-{uid}", device="phone", now_ms=0, first_cid=1 + i * 1000
            )
            for i, uid in enumerate(USERS)
        }
        self.links: dict[str, Link | None] = dict.fromkeys(USERS)
        self.bytes: deque[tuple[Link, str, bytes]] = deque()
        self.events: dict[str, list[Any]] = {uid: [] for uid in USERS}
        self.server_events: list[Any] = []
        self.protocol_errors = 0

    # -- transport -------------------------------------------------------------------

    def connect(self, uid: str) -> Link:
        link = Link(self, uid)
        self.links[uid] = link
        self.client_out(link, self.clients[uid].connection_made(self.now))
        return link

    def close(self, link: Link) -> None:
        if not link.open:
            return
        link.open = False
        if self.links[link.uid] is link:
            self.links[link.uid] = None
        self.client_out(link, self.clients[link.uid].connection_lost(self.now))
        self.server_out(link, link.session.connection_lost(self.now))

    def client_out(self, link: Link, outs: list[Any]) -> None:
        for o in outs:
            if isinstance(o, self.client_mod[2].SessionEvent):
                self.events[link.uid].append(o)
            elif isinstance(o, self.client_mod[2].CloseConnection):
                self.close(link)
            elif link.open:
                self.bytes.append((link, "c2s", link.client_conn.send(o)))

    def server_out(self, link: Link, outs: list[Any]) -> None:
        s = self.server_mod[2]
        for o in outs:
            if isinstance(o, s.CloseConnection):
                self.bytes.append((link, "close", b""))  # after what was written
            elif isinstance(o, s.SessionEvent):
                self.server_events.append(o)
                self.logic(link, o)
            elif link.open:
                self.bytes.append((link, "s2c", link.server_conn.send(o)))

    def deliver(self, link: Link, direction: str, data: bytes) -> None:
        if not link.open:
            return
        if direction == "c2s":
            if link.failed:
                return  # the server stopped reading: it closes after its Error
            conn, sp = link.server_conn, self.server_mod[1]
            conn.receive_data(data)
            try:
                while (m := conn.next_event()) is not sp.NEED_DATA:
                    self.server_out(link, link.session.receive(m, self.now))
            except RemoteProtocolError:
                # what imkit.aio's transport does with bad bytes
                self.protocol_errors += 1
                link.failed = True
                code = sp.ErrorCode.PROTOCOL_ERROR
                self.bytes.append(
                    (link, "s2c", conn.send(sp.Error(code=code, reason="protocol error")))
                )
                self.bytes.append((link, "close", b""))
        elif direction == "s2c":
            conn, cp = link.client_conn, self.client_mod[1]
            conn.receive_data(data)
            while (m := conn.next_event()) is not cp.NEED_DATA:
                self.client_out(link, self.clients[link.uid].receive(m, self.now))
        else:
            self.close(link)

    def run(self, ms: int = 0) -> None:
        """Deliver every frame and fire timers up to ``now + ms``."""
        until = self.now + ms
        while True:
            while self.bytes:
                self.deliver(*self.bytes.popleft())
            deadlines = [
                d for c in self.clients.values() if (d := c.next_deadline_ms()) is not None
            ]
            nxt = min(deadlines, default=None)
            if nxt is None or nxt > until:
                break
            self.now = max(self.now, nxt)
            for uid, c in self.clients.items():
                link = self.links[uid]
                out = c.tick(self.now)
                if link is not None:
                    self.client_out(link, out)
            for item in self.wheel.advance(self.now):
                session = item.session
                link = next(
                    (lk for lk in self.links.values() if lk and lk.session is session), None
                )
                outs = session.on_timer(item, self.now)
                if link is not None:
                    self.server_out(link, outs)
        self.now = max(self.now, until)

    # -- the logic behind the server -------------------------------------------------------

    def logic(self, link: Link, event: Any) -> None:
        s, p = self.server_mod[2], self.server_mod[1]
        if isinstance(event, s.SendRequested):
            key = (event.uid, event.cid)
            if key not in self.idem:
                self.store[event.conv].append((event.uid, event.body))
                self.idem[key] = len(self.store[event.conv])
                seq = self.idem[key]
                push = p.Push(conv=event.conv, seq=seq, sender=event.uid, body=event.body)
                for member in CONVS[event.conv]:
                    other = self.links[member]
                    if member == event.uid or other is None:
                        continue
                    if event.conv == "room":  # read fan-out: a signal, then a sync
                        signal = p.Notify(entries=((event.conv, seq),))
                        self.bytes.append((other, "s2c", other.server_conn.send(signal)))
                    else:
                        self.server_out(other, other.session.push(push, self.now))
            self.server_out(link, link.session.ack_send(event.cid, self.idem[key]))
        elif isinstance(event, s.SyncRequested):
            after = dict(event.after) if event.after else dict.fromkeys(CONVS, 0)
            pages = []
            for conv, cursor in after.items():
                if event.uid not in CONVS.get(conv, ()):
                    continue
                msgs = tuple(
                    p.Push(conv=conv, seq=i, sender=sender, body=body)
                    for i, (sender, body) in enumerate(self.store[conv], 1)
                    if i > cursor
                )
                pages.append(p.SyncPage(conv=conv, messages=msgs))
            self.server_out(link, link.session.sync_response(event.req_id, pages))
        elif isinstance(event, s.ReceiptPosted):
            r = event.receipt
            for member in CONVS[r.conv]:
                other = self.links[member]
                if member != r.reader and other is not None:
                    self.bytes.append((other, "s2c", other.server_conn.send(r)))

    # -- what the applications saw ---------------------------------------------------------

    def of(self, uid: str, name: str) -> list[Any]:
        return [e for e in self.events[uid] if type(e).__name__ == name]


def exchange(client_mod: tuple[str, Any, Any], server_mod: tuple[str, Any, Any]) -> World:
    """Both users log in, then the whole exchange; returns the world for the assertions."""
    w = World(client_mod, server_mod)
    for uid in USERS:
        w.connect(uid)
        w.run(10)
    return exchange_from(w)


def check(w: World) -> None:
    """Everything arrived once, in order, with the right acks, receipts and kicks."""
    acks = [(e.seq, e.conv) for e in w.of("alice", "SendAcked")]
    assert acks == [(1, "ab"), (2, "ab"), (3, "ab")]
    assert [(e.seq, e.conv) for e in w.of("bob", "SendAcked")] == [(1, "room")]
    got = {uid: [(e.push.conv, e.push.seq, e.push.body) for e in w.of(uid, "MessageReceived")]
           for uid in USERS}
    assert got["bob"] == [("ab", 1, b"hi 0"), ("ab", 2, b"hi 1"), ("ab", 3, b"hi 2")]
    assert got["alice"] == [("room", 1, b"to the room")]  # by Notify, then sync
    acked = [(e.conv, e.seq) for e in w.server_events if type(e).__name__ == "PushAcked"]
    assert acked and max(acked) == ("ab", 3)  # bob's acks released every push
    receipts = [e.receipt for e in w.of("alice", "ReceiptReceived")]
    assert [(r.conv, r.seq, r.reader) for r in receipts] == [("ab", 3, "bob")]
    for uid in USERS:
        kicks = w.of(uid, "Kicked")
        assert [(k.code, k.reason, k.retry_after_ms) for k in kicks][-1] == (13, "bye", 5)
        assert w.clients[uid].unacknowledged() == []


class TestCompatibility:
    @pytest.mark.parametrize(
        ("client", "server"), [(NEW, NEW), (V1, V1)], ids=["new-new", "v1-v1"]
    )
    def test_same_release(self, client: tuple[str, Any, Any], server: tuple[str, Any, Any]) -> None:
        """The harness itself: each release against itself, at its own version."""
        w = exchange(client, server)
        check(w)
        assert w.protocol_errors == 0

    def test_a_v1_client_against_the_new_server(self) -> None:
        """A deployed v1 client logs in as version 1 and the whole exchange works."""
        w = exchange(V1, NEW)
        check(w)
        assert w.protocol_errors == 0
        assert next(e.ack for e in w.of("alice", "LoggedIn")).uid == "alice"
        for e in w.server_events:
            if type(e).__name__ == "SessionStarted":
                assert e.resumed is False

    def test_the_new_server_negotiates_version_1_for_a_v1_login(self) -> None:
        """A Login without an offer is version 1: the LoginAck carries no v2 field."""
        w = World(V1, NEW)
        link = w.connect("alice")
        w.run(10)
        assert link.session.version == 1
        # the exact bytes a v1 LoginAck has: 7 fields at most, and the v1 decoder took them
        assert w.of("alice", "LoggedIn")

    def test_a_new_client_against_a_v1_server(self) -> None:
        """The v1 server refuses the offer once; the client falls back to v1 and all works."""
        w = World(NEW, V1)
        for uid in USERS:
            w.connect(uid)
            w.run(10)
        assert w.protocol_errors == 2  # each client's first Login (the offer)
        assert all(c.stats.version_fallbacks == 1 for c in w.clients.values())
        for uid in USERS:  # reconnect: version 1's Login this time
            assert w.links[uid] is None
            w.connect(uid)
            w.run(10)
        assert all(c.version == 1 and c.connected for c in w.clients.values())
        w2 = exchange_from(w)
        check(w2)
        assert w2.protocol_errors == 2

    def test_the_new_pair_negotiates_version_2(self) -> None:
        """New client and new server: version 2, and the server's limits reach the client."""
        w = World(NEW, NEW)
        link = w.connect("alice")
        w.run(10)
        assert link.session.version == 2 == w.clients["alice"].version
        ack = w.of("alice", "LoggedIn")[0].ack
        cfg = new_session.ServerConfig()
        assert (ack.max_frames_per_s, ack.frame_burst, ack.max_sends_in_flight) == (
            cfg.max_frames_per_s,
            cfg.frame_burst,
            cfg.max_sends_in_flight,
        )


def exchange_from(w: World) -> World:
    """The exchange of :func:`exchange` on a world whose clients are already logged in."""
    alice, bob = w.clients["alice"], w.clients["bob"]
    for i in range(3):
        _, out = alice.send("ab", f"hi {i}".encode(), w.now)
        link = w.links["alice"]
        assert link is not None
        w.client_out(link, out)
    w.run(10)
    _, out = bob.send("room", b"to the room", w.now)
    link = w.links["bob"]
    assert link is not None
    w.client_out(link, out)
    w.run(10)
    link = w.links["bob"]
    assert link is not None
    w.client_out(link, bob.mark_read("ab", 3, w.now))
    w.run(10)
    for uid in USERS:
        link = w.links[uid]
        assert link is not None
        w.server_out(link, link.session.kick(13, reason="bye", retry_after_ms=5))
    w.run(10)
    return w

