"""Tests of imkit.aio.Client against a small ServerSession gateway over loopback TCP."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest

from imkit.aio import (
    Client,
    ClientStatus,
    Endpoint,
    FramedConnection,
    Server,
    WheelDriver,
    loop_ms,
    parse_endpoints,
    serve,
    uvloop_available,
)
from imkit.aio import run as aio_run
from imkit.errors import (
    AuthError,
    ConfigError,
    ConnectionClosed,
    SendError,
)
from imkit.policy import Backoff, HeartbeatPolicy
from imkit.protocol import ErrorCode, Ping, Push, Receipt, SyncPage
from imkit.session import (
    ClientConfig,
    CloseConnection,
    Output,
    ReceiptPosted,
    SendFailed,
    SendRequested,
    ServerConfig,
    ServerSession,
    ServerTimer,
    SessionEvent,
    SessionStarted,
    SyncRequested,
)
from imkit.timingwheel import TimingWheel

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]

HOST = "127.0.0.1"
FAST = ServerConfig(reconnect_min_ms=10, reconnect_max_ms=40)
FAST_CLIENT: dict[str, Any] = {"reconnect": Backoff(base_ms=10, cap_ms=40)}


Runner = Callable[[Awaitable[Any]], Any]
LOOPS = [
    False,
    pytest.param(True, marks=pytest.mark.skipif(not uvloop_available(), reason="no uvloop")),
]


@pytest.fixture(params=LOOPS, ids=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Run a coroutine (with a hang guard) on the standard loop, then on uvloop."""
    use_uvloop: bool = request.param

    def runner(coro: Awaitable[Any]) -> Any:
        async def main() -> Any:
            return await asyncio.wait_for(coro, 30)

        return aio_run(main(), use_uvloop=use_uvloop)

    return runner


def authenticate(token: str, device: str) -> str:
    if token == "bad":
        raise AuthError("bad token")
    return token  # the token is the uid, for tests


class MiniGateway:
    """A gateway for tests: one ServerSession per connection, an in-memory store, fan-out."""

    def __init__(self, *, config: ServerConfig = FAST) -> None:
        self.config = config
        now = loop_ms()
        self.driver: WheelDriver[ServerTimer] = WheelDriver(
            self._on_timer, wheel=TimingWheel(start_ms=now)
        )
        self.ids = itertools.count(1)
        self.stored: dict[tuple[str, int], int] = {}  # (uid, cid) -> seq
        self.log: dict[str, list[Push]] = {}
        self.sessions: dict[ServerSession, FramedConnection] = {}
        self.logins = 0
        self.pings = 0
        self.receipts: list[Receipt] = []
        self.kick_logins: list[tuple[int, int]] = []  # (code, retry_after_ms) for next logins
        self.server: Server | None = None

    async def start(self) -> int:
        self.server = await serve(self.handle, HOST, 0)
        return self.server.port

    async def close(self) -> None:
        if self.server is not None:
            await self.server.aclose(kick=False)
        self.driver.close()

    def drop_all(self) -> None:
        """Abort every connection, as a crashed gateway would."""
        for conn in list(self.sessions.values()):
            conn.abort()

    async def handle(self, conn: FramedConnection) -> None:
        session = ServerSession(
            wheel=self.driver.wheel,
            authenticate=authenticate,
            session_id=f"s{next(self.ids)}",
            now_ms=self.driver.now_ms(),
            config=self.config,
            tag=conn,
        )
        self.sessions[session] = conn
        self.driver.rearm()
        try:
            async for message in conn:
                self.pings += isinstance(message, Ping)
                self.apply(session, session.receive(message, self.driver.now_ms()))
        finally:
            self.sessions.pop(session, None)
            session.connection_lost(self.driver.now_ms())
            self.driver.rearm()

    def _on_timer(self, item: ServerTimer) -> None:
        self.apply(item.session, item.session.on_timer(item, self.driver.now_ms()))

    def apply(self, session: ServerSession, outputs: list[Output]) -> None:
        conn: FramedConnection = session.tag
        for out in outputs:
            if not isinstance(out, SessionEvent):
                if not conn.closed:
                    conn.send(out)
            elif isinstance(out, CloseConnection):
                conn.close()
            elif isinstance(out, SessionStarted):
                conn.established()
                self.logins += 1
                if self.kick_logins:
                    code, retry = self.kick_logins.pop(0)
                    self.apply(session, session.kick(code, retry_after_ms=retry))
            elif isinstance(out, SendRequested):
                self.store(session, out)
            elif isinstance(out, SyncRequested):
                self.sync(session, out)
            elif isinstance(out, ReceiptPosted):
                self.receipts.append(out.receipt)
        self.driver.rearm()

    def store(self, session: ServerSession, req: SendRequested) -> None:
        if req.conv == "forbidden":
            self.apply(session, session.fail_send(req.cid, ErrorCode.NOT_MEMBER))
            return
        key = (req.uid, req.cid)
        seq = self.stored.get(key)
        fresh = seq is None
        if seq is None:
            log = self.log.setdefault(req.conv, [])
            seq = self.stored[key] = len(log) + 1
            log.append(Push(conv=req.conv, seq=seq, sender=req.uid, body=req.body))
        self.apply(session, session.ack_send(req.cid, seq))
        if fresh:
            push = self.log[req.conv][seq - 1]
            now = self.driver.now_ms()
            for other in list(self.sessions):
                if other is not session and other.uid:
                    self.apply(other, other.push(push, now))

    def sync(self, session: ServerSession, req: SyncRequested) -> None:
        after = dict(req.after) if req.after else dict.fromkeys(self.log, 0)
        pages = []
        for conv, seq in after.items():
            msgs = [p for p in self.log.get(conv, []) if p.seq > seq]
            pages.append(
                SyncPage(conv=conv, messages=tuple(msgs[: req.limit]), more=len(msgs) > req.limit)
            )
        self.apply(session, session.sync_response(req.req_id, pages))


@asynccontextmanager
async def gateway(**kwargs: Any) -> AsyncIterator[tuple[MiniGateway, int]]:
    gw = MiniGateway(**kwargs)
    port = await gw.start()
    try:
        yield gw, port
    finally:
        await gw.close()


def client(port: int | list[str], token: str = "alice", **kwargs: Any) -> Client:
    endpoints = [f"{HOST}:{port}"] if isinstance(port, int) else port
    session_kwargs = {**FAST_CLIENT, **kwargs.pop("session_kwargs", {})}
    return Client(
        token=token,
        device="phone",
        endpoints=endpoints,
        config=ClientConfig(**session_kwargs),
        **kwargs,
    )


async def next_message(c: Client) -> Push:
    async for push in c.messages():
        return push
    raise AssertionError("message stream ended")


class TestSendAndReceive:
    def test_send_returns_the_seq_and_the_other_member_receives_it(self, run: Runner) -> None:
        """Alice's send resolves to its seq; Bob, online, receives the message once."""

        async def main() -> tuple[list[int], list[tuple[str, int, bytes]]]:
            async with (
                gateway() as (_gw, port),
                client(port) as alice,
                client(port, token="bob") as bob,
            ):
                await alice.wait_for(ClientStatus.ONLINE)
                await bob.wait_for(ClientStatus.ONLINE)
                seqs = [await alice.send("room", f"hi {i}".encode()) for i in range(3)]
                got = []
                for _ in range(3):
                    p = await next_message(bob)
                    got.append((p.sender, p.seq, p.body))
                return seqs, got

        seqs, got = run(main())
        assert seqs == [1, 2, 3]
        assert got == [("alice", i + 1, f"hi {i}".encode()) for i in range(3)]

    def test_wait_for_returns_at_once_when_already_there(self, run: Runner) -> None:
        """wait_for of the current state returns it without waiting."""

        async def main() -> ClientStatus:
            c = client(1)
            return await c.wait_for(ClientStatus.IDLE)

        assert run(main()) is ClientStatus.IDLE


class TestApplicationApi:
    def test_a_refused_send_raises_send_failed(self, run: Runner) -> None:
        """A send the server refuses (NOT_MEMBER) raises SendError; on_event sees why."""

        async def main() -> tuple[int, list[SessionEvent]]:
            events: list[SessionEvent] = []
            async with gateway() as (_gw, port), client(port, on_event=events.append) as c:
                with pytest.raises(SendError) as info:
                    await c.send("forbidden", b"x")
                return info.value.cid, events

        cid, events = run(main())
        failures = [e for e in events if isinstance(e, SendFailed)]
        assert [(f.cid, f.code) for f in failures] == [(cid, ErrorCode.NOT_MEMBER)]

    def test_mark_read_reaches_the_server(self, run: Runner) -> None:
        """mark_read sends a Receipt; the server attributes it to the session's user."""

        async def main() -> list[Receipt]:
            async with gateway() as (gw, port), client(port) as c:
                await c.wait_for(ClientStatus.ONLINE)
                c.mark_read("room", 7)
                c.sync()
                while not gw.receipts:
                    await asyncio.sleep(0.01)
                return gw.receipts

        assert run(main()) == [Receipt(conv="room", seq=7, reader="alice")]

    def test_a_slow_reader_app_loses_nothing(self, run: Runner) -> None:
        """With max_messages=2 and an app that reads late, every message still arrives once."""

        async def main() -> list[int]:
            async with (
                gateway() as (_gw, port),
                client(port) as alice,
                client(port, token="bob", max_messages=2) as bob,
            ):
                await bob.wait_for(ClientStatus.ONLINE)
                for i in range(20):
                    await alice.send("room", str(i).encode())
                got: list[int] = []
                async for push in bob.messages():
                    got.append(int(push.body))
                    if len(got) == 20:
                        break
                return got

        assert run(main()) == list(range(20))


class TestReconnect:
    def test_reconnects_after_the_server_drops_the_connection(self, run: Runner) -> None:
        """A dropped connection is re-established; a send made meanwhile is delivered."""

        async def main() -> tuple[int, int, int]:
            async with gateway() as (gw, port), client(port) as alice:
                await alice.wait_for(ClientStatus.ONLINE)
                first = await alice.send("room", b"before")
                gw.drop_all()
                await alice.wait_for(ClientStatus.BACKOFF, ClientStatus.CONNECTING)
                second = await alice.send("room", b"during")  # queued, sent after login
                await alice.wait_for(ClientStatus.ONLINE)
                return first, second, alice.connects

        first, second, connects = run(main())
        assert (first, second) == (1, 2)
        assert connects == 2

    def test_missed_messages_arrive_by_sync_after_reconnect(self, run: Runner) -> None:
        """Messages sent while Bob was offline reach him, once each, after he reconnects."""

        async def main() -> list[int]:
            async with (
                gateway() as (gw, port),
                client(port) as alice,
                client(port, token="bob") as bob,
            ):
                await bob.wait_for(ClientStatus.ONLINE)
                await alice.wait_for(ClientStatus.ONLINE)
                await alice.send("room", b"1")
                assert (await next_message(bob)).seq == 1
                for conn in [c for s, c in gw.sessions.items() if s.uid == "bob"]:
                    conn.abort()
                for i in (2, 3):
                    await alice.send("room", str(i).encode())
                seqs = [(await next_message(bob)).seq for _ in range(2)]
                await bob.wait_for(ClientStatus.ONLINE)
                return seqs

        assert run(main()) == [2, 3]

    def test_backoff_honours_the_servers_retry_after(self, run: Runner) -> None:
        """After Kick(SERVER_BUSY, retry_after_ms) the client waits at least that long."""

        async def main() -> tuple[int | None, int, ErrorCode | int | None]:
            async with gateway() as (gw, port):
                gw.kick_logins.append((ErrorCode.SERVER_BUSY, 300))
                async with client(port) as alice:
                    await alice.wait_for(ClientStatus.BACKOFF)
                    backoff = alice.last_backoff_ms
                    kicked = alice.kicked.code if alice.kicked is not None else None
                    await alice.wait_for(ClientStatus.ONLINE)
                    return backoff, gw.logins, kicked

        backoff, logins, kicked = run(main())
        assert kicked == ErrorCode.SERVER_BUSY
        assert backoff is not None and backoff >= 300  # the client's own backoff is < 40 ms
        assert logins == 2

    def test_a_final_kick_closes_the_client(self, run: Runner) -> None:
        """A refused token (AUTH_FAILED) closes the client instead of retrying forever."""

        async def main() -> tuple[ClientStatus, int]:
            async with gateway() as (_gw, port), client(port, token="bad") as c:
                with pytest.raises(ConnectionClosed):
                    await c.wait_for(ClientStatus.ONLINE)
                return c.state, c.connects

        state, connects = run(main())
        assert state is ClientStatus.CLOSED
        assert connects == 1

    def test_close_fails_pending_sends_and_ends_messages(self, run: Runner) -> None:
        """aclose() while a send waits raises ConnectionClosed in the sender."""

        async def main() -> None:
            c = client(1)  # nothing listens on port 1: the send can only wait
            await c.start()
            _, fut = c.send_nowait("room", b"x")
            await c.aclose()
            with pytest.raises(ConnectionClosed):
                await fut
            assert [p async for p in c.messages()] == []
            with pytest.raises(ConnectionClosed):
                c.send_nowait("room", b"y")

        run(main())


def black_hole() -> tuple[socket.socket, list[socket.socket], int]:
    """A listener whose accept queue is full: new SYNs are dropped, connects hang."""
    lsock = socket.socket()
    lsock.bind((HOST, 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    for _ in range(8):  # fill the accept queue (its size is backlog + 1 on Linux)
        s = socket.socket()
        s.setblocking(False)
        with suppress(BlockingIOError):
            s.connect((HOST, port))
        fillers.append(s)
    return lsock, fillers, port


class TestRacing:
    def test_racing_picks_the_live_endpoint_behind_a_black_hole(self, run: Runner) -> None:
        """With a black-holed first endpoint, the staggered second attempt wins."""
        lsock, fillers, dead_port = black_hole()

        async def main() -> tuple[Endpoint | None, int]:
            async with gateway() as (_gw, port):
                endpoints = [f"{HOST}:{dead_port}", f"{HOST}:{port}"]
                async with client(endpoints, race_delay_ms=50) as c:
                    await c.wait_for(ClientStatus.ONLINE)
                    assert await c.send("room", b"x") == 1
                    return c.endpoint, port

        try:
            endpoint, port = run(main())
        finally:
            for s in [lsock, *fillers]:
                s.close()
        assert endpoint == Endpoint(HOST, port)

    def test_an_endpoint_that_never_answers_the_login_is_demoted(self, run: Runner) -> None:
        """A listener that accepts but never answers times out the login and goes last."""

        async def main() -> tuple[Endpoint | None, int, list[Endpoint]]:
            async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await reader.read()  # accept, read, never answer

            mute = await asyncio.start_server(silent, HOST, 0)
            mute_port = mute.sockets[0].getsockname()[1]
            try:
                async with gateway() as (_gw, port):
                    endpoints = [f"{HOST}:{mute_port}", f"{HOST}:{port}"]
                    fast_login = {"login_timeout_ms": 200}
                    async with client(endpoints, session_kwargs=fast_login) as c:
                        await c.wait_for(ClientStatus.ONLINE)
                        order = await c.endpoints()
                        return c.endpoint, port, order
            finally:
                mute.close()

        endpoint, port, order = run(main())
        assert endpoint == Endpoint(HOST, port)
        assert order[-1].port != port  # the mute endpoint is now tried last

    def test_all_endpoints_down_keeps_retrying_with_backoff(self, run: Runner) -> None:
        """With nothing listening the client cycles CONNECTING -> BACKOFF and records why."""
        lsock = socket.socket()
        lsock.bind((HOST, 0))
        port = lsock.getsockname()[1]
        lsock.close()  # a port with no listener: connection refused

        async def main() -> tuple[bool, int | None]:
            async with client(port) as c:
                await c.wait_for(ClientStatus.BACKOFF)
                await c.wait_for(ClientStatus.CONNECTING)
                await c.wait_for(ClientStatus.BACKOFF)
                return isinstance(c.last_error, OSError), c.last_backoff_ms

        refused, backoff = run(main())
        assert refused and backoff is not None


class TestEndpointParsing:
    def test_shapes(self) -> None:
        """Strings, tcp:// URLs, IPv6, host/port objects and GatewayInfo-like objects parse."""
        doc = {
            "gateways": [
                "10.0.0.1:7000",
                "tcp://10.0.0.2:7000",
                "[::1]:7001",
                {"host": "h", "port": 1},
                {"endpoint": "tcp://e:2"},
                {"id": "gw", "endpoints": ["ws://w:80/ws", "tcp://g:3"]},
                "ws://browser:80",
                "garbage",
                {"port": "x"},
                "10.0.0.1:7000",
            ]
        }
        assert [str(e) for e in parse_endpoints(doc)] == [
            "10.0.0.1:7000",
            "10.0.0.2:7000",
            "[::1]:7001",
            "h:1",
            "e:2",
            "g:3",
        ]

    def test_bad_documents_and_limits(self) -> None:
        """A document without a list is a ConfigError; max_endpoints caps the result."""
        with pytest.raises(ConfigError):
            parse_endpoints({"nope": 1})
        assert len(parse_endpoints([f"h:{i}" for i in range(1, 100)], max_endpoints=5)) == 5
        with pytest.raises(ConfigError):
            Endpoint.parse("h:0")
        with pytest.raises(ConfigError):
            Client(token="t", device="d")


class TestHeartbeat:
    def test_idle_client_pings(self, run: Runner) -> None:
        """An idle client sends Pings on the server's heartbeat interval (LoginAck.heartbeat_ms)."""

        async def main() -> tuple[int, ClientStatus]:
            cfg = ServerConfig(
                reconnect_min_ms=10,
                reconnect_max_ms=40,
                heartbeat=HeartbeatPolicy(interval_ms=50, missed=20, jitter=0.0),
            )
            async with gateway(config=cfg) as (gw, port), client(port) as c:
                await c.wait_for(ClientStatus.ONLINE)
                while gw.pings < 3:  # the client's default interval is 30 s: these follow the ack
                    await asyncio.sleep(0.01)
                return gw.pings, await c.wait_for(ClientStatus.ONLINE)

        pings, state = run(main())
        assert pings >= 3
        assert state is ClientStatus.ONLINE
