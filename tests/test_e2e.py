"""End-to-end tests of the reference system (examples/) over real loopback sockets.

Each test starts the whole cluster in-process (ipconf, gateways, logic, memory store
and bus) on ephemeral ports with ``start_cluster``, drives it with real clients
(:class:`imkit.aio.Client`, or the raw :class:`examples.probe.RawClient`), and is
bounded in time. Delivery is checked the way RELIABILITY.md asks: every message
once, in seq order per conversation, nothing acknowledged lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

import pytest
from examples.cluster import Cluster, ClusterConfig, seed_demo, start_cluster
from examples.gateway import GatewayConfig
from examples.httpclient import endpoint_fetcher, fetch_json
from examples.logic import LogicConfig
from examples.probe import RawClient

from imkit.aio import Client, ClientStatus, InlineStore
from imkit.policy import Backoff
from imkit.protocol import (
    ErrorCode,
    Kick,
    Login,
    Push,
    PushAck,
    PushBatch,
    Send,
    SendAck,
    SyncRequest,
    SyncResponse,
)
from imkit.session import (
    ClientConfig,
    LoggedIn,
    ReceiptReceived,
    ServerConfig,
    SessionEvent,
    initial_cid,
)
from imkit.store import direct_conv_id

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]

T = TypeVar("T")

#: Reconnect quickly in tests (the server's LoginAck bounds, and the client's own
#: before its first login).
FAST_SERVER = ServerConfig(reconnect_min_ms=10, reconnect_max_ms=50)
FAST_CLIENT: dict[str, Any] = {"reconnect": Backoff(base_ms=10, cap_ms=50)}


def run(main: Callable[[], Coroutine[Any, Any, T]], timeout_s: float = 60.0) -> T:
    """Run ``main()`` on a fresh event loop, bounded by ``timeout_s``."""

    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout_s)

    return asyncio.run(bounded())


def config(**overrides: Any) -> ClusterConfig:
    """A test cluster: demo users and groups, fast reconnects, ephemeral ports."""
    gateway = overrides.pop("gateway", GatewayConfig(server=FAST_SERVER))
    return ClusterConfig(demo=True, gateway=gateway, **overrides)


@asynccontextmanager
async def running(cfg: ClusterConfig | None = None) -> AsyncIterator[Cluster]:
    """The cluster, stopped on exit."""
    cluster = await start_cluster(cfg or config())
    try:
        yield cluster
    finally:
        await cluster.stop()


def make_client(
    cluster: Cluster,
    uid: str,
    *,
    device: str = "phone",
    endpoints: list[str] | None = None,
    ipconf: bool = False,
    on_event: Callable[[SessionEvent], object] | None = None,
) -> Client:
    """A client of ``uid``: through ipconf, or straight to ``endpoints`` (all gateways)."""
    return Client(
        token=cluster.token(uid, device),
        device=device,
        endpoints=() if ipconf else (endpoints or cluster.endpoints()),
        fetch_endpoints=(
            endpoint_fetcher(f"{cluster.ipconf_url}/gateways?uid={uid}") if ipconf else None
        ),
        config=ClientConfig(**FAST_CLIENT),
        on_event=on_event,
    )


async def take(client: Client, n: int, conv: str | None = None) -> list[Push]:
    """The next ``n`` messages ``client`` delivers (of ``conv`` only, if given)."""
    got: list[Push] = []
    if n == 0:
        return got
    async for push in client.messages():
        if conv is None or push.conv == conv:
            got.append(push)
            if len(got) >= n:
                break
    return got


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` every 10 ms until it holds (TimeoutError otherwise)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


class Proxy:
    """A TCP relay the test can cut (both ways) and block (new connections dropped)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.blocked = False
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    def cut(self) -> None:
        """Reset every relayed connection now."""
        for writer in list(self.writers):
            writer.transport.abort()

    async def aclose(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def online(*clients: Client) -> None:
    """Start the clients and wait until every one is logged in."""
    for c in clients:
        await c.start()
    await asyncio.gather(*(c.wait_for(ClientStatus.ONLINE, timeout=20) for c in clients))


class TestOneToOne:
    def test_two_users_chat_through_ipconf(self) -> None:
        """Alice and Bob find gateways through ipconf; each gets every message once, in order."""

        async def main() -> tuple[list[bytes], list[bytes], list[int]]:
            async with running(config(gateways=2)) as cluster:
                alice = make_client(cluster, "alice", ipconf=True)
                bob = make_client(cluster, "bob", ipconf=True)
                await online(alice, bob)
                conv = direct_conv_id("alice", "bob")
                seqs = [await alice.send(conv, b"hi bob"), await bob.send(conv, b"hi alice")]
                seqs.append(await alice.send(conv, b"how are you?"))
                at_bob = [p.body for p in await take(bob, 3, conv)]
                at_alice = [p.body for p in await take(alice, 3, conv)]
                await alice.aclose()
                await bob.aclose()
                return at_bob, at_alice, seqs

        at_bob, at_alice, seqs = run(main)
        expected = [b"hi bob", b"hi alice", b"how are you?"]
        assert seqs == [1, 2, 3]
        assert at_bob == expected  # the sender's own messages come back too, in seq order
        assert at_alice == expected

    def test_ipconf_ranks_every_gateway_with_the_home_first(self) -> None:
        """ipconf lists every live gateway, TCP and WebSocket endpoints, home gateway first."""

        async def main() -> tuple[Any, str]:
            async with running(config(gateways=3)) as cluster:
                doc = await fetch_json(f"{cluster.ipconf_url}/gateways?uid=alice")
                assert cluster.ipconf is not None
                home = (await cluster.ipconf.rank("alice"))[0].id
                return doc, home

        doc, home = run(main)
        assert len(doc["endpoints"]) == 3 and all(e.startswith("tcp://") for e in doc["endpoints"])
        assert len(doc["ws"]) == 3 and all(e.startswith("ws://") for e in doc["ws"])
        assert doc["gateways"][0]["id"] == home

    def test_a_non_member_cannot_send_to_a_group(self) -> None:
        """Dave is not in 'team': his send is refused with NOT_MEMBER and nothing is stored."""

        async def main() -> tuple[int, int]:
            async with running() as cluster:
                raw = await RawClient.connect(*_host_port(cluster))
                await raw.login(cluster.token("dave", "d"), "d")
                raw.send(Send(cid=initial_cid(_wall_ms()), conv="team", body=b"let me in"))
                ack = await raw.expect(SendAck)
                raw.close()
                return ack.error, cluster.store.last_seq("team")

        error, last = run(main)
        assert error == ErrorCode.NOT_MEMBER
        assert last == 0


class TestReceipts:
    def test_a_read_receipt_moves_the_cursor_and_reaches_the_sender(self) -> None:
        """Bob marks the conversation read up to #2: the store has it and Alice is told."""

        async def main() -> tuple[list[tuple[str, int, str]], int]:
            async with running() as cluster:
                receipts: list[tuple[str, int, str]] = []

                def on_event(event: SessionEvent) -> None:
                    if isinstance(event, ReceiptReceived):
                        r = event.receipt
                        receipts.append((r.conv, r.seq, r.reader))

                alice = make_client(cluster, "alice", on_event=on_event)
                bob = make_client(cluster, "bob")
                await online(alice, bob)
                conv = direct_conv_id("alice", "bob")
                for text in (b"one", b"two"):
                    await alice.send(conv, text)
                await take(bob, 2, conv)
                bob.mark_read(conv, 2)
                await wait_until(lambda: bool(receipts))
                cursor = cluster.store.get_read("bob", conv)
                await alice.aclose()
                await bob.aclose()
                return receipts, cursor

        receipts, cursor = run(main)
        assert receipts == [(direct_conv_id("alice", "bob"), 2, "bob")]
        assert cursor == 2


class TestDeviceCursors:
    def test_only_acks_the_session_accepted_move_the_inbox_cursor(self) -> None:
        """A forged far-ahead ack is ignored; a genuine one makes the inbox sync start after it."""

        async def main() -> list[int]:
            async with running() as cluster:
                alice = make_client(cluster, "alice")
                await online(alice)
                raw = await RawClient.connect(*_host_port(cluster))
                await raw.login(cluster.token("bob", "raw"), "raw")
                conv = direct_conv_id("alice", "bob")
                for text in (b"one", b"two", b"three"):
                    await alice.send(conv, text)
                pushed: set[int] = set()
                while len(pushed) < 3:
                    frame = await raw.recv()
                    if isinstance(frame, Push | PushBatch):
                        items = frame.pushes if isinstance(frame, PushBatch) else (frame,)
                        pushed.update(p.seq for p in items if p.conv == conv)
                raw.send(PushAck(conv=conv, seq=1000))  # forged: never pushed
                raw.send(PushAck(conv=conv, seq=1))  # genuine: bob holds #1
                raw.send(SyncRequest(req_id=1))  # the inbox: from this device's cursors
                answer = await raw.expect(SyncResponse)
                raw.close()
                await alice.aclose()
                return [m.seq for page in answer.pages if page.conv == conv for m in page.messages]

        assert run(main) == [2, 3]


class TestBigGroup:
    def test_200_members_get_every_message_once_in_order(self) -> None:
        """200 connected members of 'lobby' (read fan-out, merged pushes) all get 30 messages."""
        members = 200
        per_sender = 10
        senders = ["alice", "bob", "carol"]

        async def main() -> tuple[dict[str, list[tuple[int, str, bytes]]], dict[str, int]]:
            async with running(config(gateways=3, lobby_size=members)) as cluster:
                uids = sorted(cluster.store.members("lobby"))
                assert len(uids) == members
                gws = cluster.endpoints()  # spread the members over the gateways
                clients = {
                    uid: make_client(cluster, uid, endpoints=gws[i % 3 :] + gws[: i % 3])
                    for i, uid in enumerate(uids)
                }
                await online(*clients.values())
                assert all(g.connections > 0 for g in cluster.gateways)
                futures = [
                    clients[s].send_nowait("lobby", f"{s}-{i}".encode())[1]
                    for i in range(per_sender)
                    for s in senders
                ]
                await asyncio.gather(*futures)
                total = per_sender * len(senders)
                results = await asyncio.gather(*(take(c, total, "lobby") for c in clients.values()))
                await clients["alice"].send("lobby", b"end")  # nothing else may come before it
                ends = await asyncio.gather(*(take(c, 1, "lobby") for c in clients.values()))
                got = {
                    uid: [(p.seq, p.sender, p.body) for p in pushes + end]
                    for uid, pushes, end in zip(clients, results, ends, strict=True)
                }
                for c in clients.values():
                    await c.aclose()
                return got, cluster.logic.stats.as_dict()

        got, stats = run(main, timeout_s=90)
        total = per_sender * len(senders)
        reference = next(iter(got.values()))
        assert [seq for seq, _, _ in reference] == list(range(1, total + 2))
        assert reference[-1] == (total + 1, "alice", b"end")
        for sender in senders:  # each sender's messages in the order it sent them
            mine = [body for _, who, body in reference[:-1] if who == sender]
            assert mine == [f"{sender}-{i}".encode() for i in range(per_sender)]
        for uid, messages in got.items():
            assert messages == reference, uid  # once each, in seq order, same for everyone
        assert stats["sends"] == total + 1
        assert stats["pushes"] > 0  # pushed (merged), not only pulled


class TestFanoutTiers:
    @pytest.mark.parametrize(
        ("write_max", "push_max", "tier"),
        [(10, 20, "write"), (2, 20, "merged"), (2, 3, "notify")],
    )
    def test_every_tier_delivers_every_message_once_in_order(
        self, write_max: int, push_max: int, tier: str
    ) -> None:
        """'room' (5 members) by inbox + push, by merged pushes, or by Notify + pull."""
        logic = LogicConfig(write_fanout_max=write_max, push_fanout_max=push_max)

        async def main() -> tuple[dict[str, list[bytes]], dict[str, int], int]:
            async with running(config(logic=logic)) as cluster:
                members = ["alice", "bob", "carol", "dave", "erin"]
                cluster.store.create_group("room", members)
                clients = {uid: make_client(cluster, uid) for uid in members}
                await online(*clients.values())
                sent = [
                    clients[uid].send_nowait("room", f"{uid}{i}".encode())[1]
                    for i in range(20)
                    for uid in ("alice", "bob")
                ]
                await asyncio.gather(*sent)
                got = {
                    uid: [p.body for p in await take(c, 40, "room")] for uid, c in clients.items()
                }
                inbox = len(cluster.store.inbox_read("erin", 0, 1000).entries)
                for c in clients.values():
                    await c.aclose()
                return got, cluster.logic.stats.as_dict(), inbox

        got, stats, inbox = run(main)
        reference = got["alice"]
        assert len(reference) == 40 and len(set(reference)) == 40
        for uid in ("alice", "bob"):
            mine = [b for b in reference if b.startswith(uid.encode())]
            assert mine == [f"{uid}{i}".encode() for i in range(20)]
        for bodies in got.values():
            assert bodies == reference
        if tier == "write":
            assert inbox == 40 and stats["notifies"] == 0
        elif tier == "merged":
            assert inbox == 0 and stats["pushes"] > 0
        else:
            assert inbox == 0 and stats["pushes"] == 0 and stats["notifies"] > 0


class TestReconnect:
    def test_a_client_that_reconnects_resumes_and_syncs_what_it_missed(self) -> None:
        """Bob drops off; Alice sends 5 messages; Bob comes back, resumes, gets each once."""

        async def main() -> tuple[list[bytes], list[bool], int]:
            async with running() as cluster:
                proxy = Proxy(int(cluster.endpoints()[0].rsplit(":", 1)[1]))
                await proxy.start()
                logins: list[bool] = []

                def on_event(event: SessionEvent) -> None:
                    if isinstance(event, LoggedIn):
                        logins.append(event.ack.resumed)

                alice = make_client(cluster, "alice")
                bob = make_client(
                    cluster, "bob", endpoints=[f"127.0.0.1:{proxy.port}"], on_event=on_event
                )
                await online(alice, bob)
                conv = direct_conv_id("alice", "bob")
                await alice.send(conv, b"before")
                first = await take(bob, 1, conv)
                proxy.blocked = True
                proxy.cut()
                await wait_until(lambda: not cluster.routes.table.lookup("bob"))  # bob is in grace
                for i in range(5):
                    await alice.send(conv, f"missed-{i}".encode())
                proxy.blocked = False
                rest = await take(bob, 5, conv)
                await alice.send(conv, b"after")
                rest += await take(bob, 1, conv)
                connects = bob.connects
                await alice.aclose()
                await bob.aclose()
                await proxy.aclose()
                return [p.body for p in first + rest], logins, connects

        bodies, logins, connects = run(main)
        assert bodies == [b"before", *(f"missed-{i}".encode() for i in range(5)), b"after"]
        assert logins[0] is False and logins[-1] is True  # the second login resumed
        assert connects >= 2


class TestIdempotentSend:
    def test_a_resent_cid_is_stored_once(self) -> None:
        """The same cid sent twice, then again on a new connection: one message, one seq."""

        async def main() -> tuple[list[int], int, list[bytes], int]:
            async with running() as cluster:
                bob = make_client(cluster, "bob")
                await online(bob)
                conv = direct_conv_id("alice", "bob")
                host, port = _host_port(cluster)
                cid = initial_cid(_wall_ms())
                send = Send(cid=cid, conv=conv, body=b"only once")
                raw = await RawClient.connect(host, port)
                login = await raw.login(cluster.token("alice", "raw"), "raw")
                raw.send(send)
                seqs = [(await raw.expect(SendAck)).seq]
                raw.send(send)  # same connection: answered by the session's ack cache
                seqs.append((await raw.expect(SendAck)).seq)
                raw.abort()
                raw = await RawClient.connect(host, port)  # a new session: the store dedups
                await raw.login(cluster.token("alice", "raw2"), "raw2")
                raw.send(send)
                seqs.append((await raw.expect(SendAck)).seq)
                raw.abort()
                raw = await RawClient.connect(host, port)  # a resumed session: its CidWindow
                await raw.login(cluster.token("alice", "raw"), "raw", resume=login.session)
                raw.send(send)
                seqs.append((await raw.expect(SendAck)).seq)
                raw.send(Send(cid=cid + 1, conv=conv, body=b"next"))
                await raw.expect(SendAck)
                raw.close()
                bodies = [p.body for p in await take(bob, 2, conv)]
                stored = len(cluster.store.read(conv, 0, 100).messages)
                await bob.aclose()
                return seqs, stored, bodies, cluster.logic.stats.duplicates

        seqs, stored, bodies, duplicates = run(main)
        assert seqs == [1, 1, 1, 1]
        assert stored == 2  # "only once" and "next"
        assert bodies == [b"only once", b"next"]  # bob saw it once
        assert duplicates >= 1  # at least one resend reached the store and was deduplicated


class TestAuth:
    def test_forged_expired_and_foreign_tokens_are_refused(self) -> None:
        """A forged, an expired and another device's token each get Kick(AUTH_FAILED)."""

        async def main() -> list[int]:
            async with running() as cluster:
                good = cluster.token("alice", "phone")
                forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
                expired = cluster.auth.issue("alice", "phone", ttl_s=-1)
                codes = []
                for token, device in ((forged, "phone"), (expired, "phone"), (good, "laptop")):
                    raw = await RawClient.connect(*_host_port(cluster))
                    raw.send(Login(token=token, device=device))
                    kick = await raw.expect(Kick)
                    codes.append(kick.code)
                    await raw.wait_closed()
                raw = await RawClient.connect(*_host_port(cluster))
                ack = await raw.login(good, "phone")  # and the good one, replayed, works
                raw.close()
                ack2 = await _login_again(cluster, good)
                assert ack.uid == ack2 == "alice"
                return codes

        assert run(main) == [ErrorCode.AUTH_FAILED] * 3


class TestPersistence:
    def test_messages_survive_a_restart_with_a_data_dir(self, tmp_path: Any) -> None:
        """With --data-dir (SQLite), a message sent before a restart is synced after it."""
        data_dir = str(tmp_path / "data")
        conv = direct_conv_id("alice", "bob")

        async def first() -> int:
            async with running(config(data_dir=data_dir)) as cluster:
                alice = make_client(cluster, "alice")
                await online(alice)
                seq = await alice.send(conv, b"kept")
                await alice.aclose()
                return seq

        async def second() -> list[bytes]:
            async with running(config(data_dir=data_dir)) as cluster:
                bob = make_client(cluster, "bob")
                await online(bob)
                got = await take(bob, 1, conv)
                await bob.aclose()
                return [p.body for p in got]

        assert run(first) == 1
        assert run(second) == [b"kept"]


class TestSeed:
    def test_the_demo_seed_is_idempotent(self) -> None:
        """Seeding twice leaves the same users and groups (a reused data directory)."""
        from imkit.store import MemoryStore

        store = MemoryStore()
        asyncio.run(seed_demo(InlineStore(store), lobby_size=20))
        asyncio.run(seed_demo(InlineStore(store), lobby_size=20))
        assert len(store.members("lobby")) == 20
        assert store.members("team") == {"alice", "bob", "carol"}


# -- helpers ----------------------------------------------------------------------------------


def _wall_ms() -> int:
    return int(time.time() * 1000)


def _host_port(cluster: Cluster) -> tuple[str, int]:
    host, _, port = cluster.endpoints()[0].rpartition(":")
    return host, int(port)


async def _login_again(cluster: Cluster, token: str) -> str:
    raw = await RawClient.connect(*_host_port(cluster))
    ack = await raw.login(token, "phone")
    raw.close()
    return ack.uid
