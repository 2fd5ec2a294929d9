"""Tests of imkit.aio's framed transport and server helpers, over loopback TCP."""

from __future__ import annotations

import asyncio
import os
import socket
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imkit.aio import FramedConnection, Server, open_connection, serve, uvloop_available
from imkit.aio import run as aio_run
from imkit.errors import ConfigError, ConnectionClosed, LocalProtocolError
from imkit.protocol import (
    CLOSED,
    NEED_DATA,
    SENDERS,
    Connection,
    Error,
    ErrorCode,
    Kick,
    Message,
    Ping,
    Pong,
    Push,
    PushBatch,
    Role,
    encode,
    encode_body,
    encode_push_batch,
)
from tests.strategies import server_messages

pytestmark = [pytest.mark.network, pytest.mark.timeout(30)]

HOST = "127.0.0.1"
GUARD_S = 10  # hang guard for waits on the network (not a timing assertion)
Runner = Callable[[Awaitable[Any]], Any]


LOOPS = [
    False,
    pytest.param(True, marks=pytest.mark.skipif(not uvloop_available(), reason="no uvloop")),
]


@pytest.fixture(params=LOOPS, ids=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[Any]], Any]:
    """Run a coroutine on the standard loop, then (when installed) on uvloop."""
    use_uvloop: bool = request.param

    def runner(coro: Awaitable[Any]) -> Any:
        async def main() -> Any:
            return await asyncio.wait_for(coro, 20)

        return aio_run(main(), use_uvloop=use_uvloop)

    return runner


async def pong_server(**kwargs: Any) -> Server:
    """A server answering each Ping with a Pong of the same nonce."""

    async def handler(conn: FramedConnection) -> None:
        async for msg in conn:
            if isinstance(msg, Ping):
                conn.send(Pong(nonce=msg.nonce))

    return await serve(handler, HOST, 0, **kwargs)


async def raw_exchange(port: int, payload: bytes) -> list[Message]:
    """Send raw bytes, read until the server closes, decode what it sent."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), GUARD_S)
    writer.close()
    conn = Connection(Role.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")
    out: list[Message] = []
    while True:
        event = conn.next_event()
        if event is CLOSED or event is NEED_DATA:
            return out
        out.append(event)


class TestFramesOverLoopback:
    def test_ping_pong_in_order(self, run: Runner) -> None:
        """Frames sent by a client come back answered, in order, over a real socket."""

        async def main() -> list[int]:
            async with await pong_server() as server:
                client = await open_connection(HOST, server.port)
                for i in range(200):
                    client.send(Ping(nonce=i))
                got = []
                for _ in range(200):
                    msg = await client.recv()
                    assert isinstance(msg, Pong)
                    got.append(msg.nonce)
                client.close()
                await client.wait_closed()
                return got

        assert run(main()) == list(range(200))

    def test_nodelay_is_set(self, run: Runner) -> None:
        """Both ends of a framed connection have TCP_NODELAY on."""

        async def main() -> tuple[int, int]:
            seen: list[FramedConnection] = []

            async def handler(conn: FramedConnection) -> None:
                seen.append(conn)
                await conn.recv()

            async with await serve(handler, HOST, 0) as server:
                client = await open_connection(HOST, server.port)
                client.send(Ping())
                while not seen:
                    await asyncio.sleep(0.01)
                opts = []
                for conn in (client, seen[0]):
                    assert conn.transport is not None
                    sock = conn.transport.get_extra_info("socket")
                    opts.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                client.close()
                return opts[0], opts[1]

        assert all(run(main()))

    def test_recv_after_close_raises(self, run: Runner) -> None:
        """recv() raises ConnectionClosed once the peer closed and nothing is left."""

        async def main() -> None:
            async def handler(conn: FramedConnection) -> None:
                conn.send(Pong(nonce=7))

            async with await serve(handler, HOST, 0) as server:
                client = await open_connection(HOST, server.port)
                assert await client.recv() == Pong(nonce=7)
                with pytest.raises(ConnectionClosed):
                    await client.recv()
                with pytest.raises(ConnectionClosed):
                    client.send(Ping())

        run(main())


class TestCoalescing:
    def test_sends_of_one_iteration_make_one_write(self, run: Runner) -> None:
        """100 sends in one loop iteration cost one transport.write; uncoalesced, 100."""

        async def main() -> tuple[int, int, int, int]:
            async with await pong_server() as server:
                a = await open_connection(HOST, server.port)
                b = await open_connection(HOST, server.port, coalesce=False)
                for conn in (a, b):
                    for i in range(100):
                        conn.send(Ping(nonce=i))
                for conn in (a, b):
                    for _ in range(100):
                        await conn.recv()
                served = list(server.connections)
                server_writes = sum(c.writes for c in served)
                server_reads = sum(c.reads for c in served)
                a.close()
                b.close()
                return a.writes, b.writes, server_writes, server_reads

        a_writes, b_writes, server_writes, server_reads = run(main())
        assert a_writes == 1
        assert b_writes == 100
        # the server answers what one data_received decoded with one write
        assert server_writes <= server_reads


class TestSlowConsumer:
    def test_a_reader_that_never_reads_is_cut(self, run: Runner) -> None:
        """Pushing to a client that never reads ends with a SLOW_CONSUMER cut, not growth."""

        async def main() -> tuple[int, int, int]:
            done = asyncio.get_running_loop().create_future()
            body = os.urandom(60_000)  # incompressible: LZ4 must not shrink it

            async def handler(conn: FramedConnection) -> None:
                pushed = 0
                biggest = 0
                while not conn.closed and pushed < 5000:
                    conn.send(Push(conv="c", seq=pushed + 1, sender="u", body=body))
                    pushed += 1
                    biggest = max(biggest, conn.write_buffer_size())
                    await asyncio.sleep(0)
                done.set_result((conn.close_code, pushed, biggest))

            async with await serve(handler, HOST, 0, max_write_buffer=256 * 1024) as server:
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect((HOST, server.port))  # and never read
                try:
                    result: tuple[int, int, int] = await asyncio.wait_for(done, GUARD_S)
                finally:
                    sock.close()
                return result

        code, pushed, biggest = run(main())
        assert code == ErrorCode.SLOW_CONSUMER
        assert pushed < 5000
        # the buffer never held more than the limit plus the one flush that crossed it
        assert biggest <= 256 * 1024 + 60_100


class TestClosing:
    def test_close_to_a_peer_that_never_reads_is_bounded(self, run: Runner) -> None:
        """close() with bytes still buffered for a non-reader aborts after close_timeout_ms."""

        async def main() -> bool:
            closed = asyncio.get_running_loop().create_future()
            body = os.urandom(60_000)

            async def handler(conn: FramedConnection) -> None:
                seq = 0
                while conn.write_buffer_size() == 0 and seq < 5000:  # fill the kernel first
                    seq += 1
                    conn.send(Push(conv="c", seq=seq, sender="u", body=body))
                    await asyncio.sleep(0)
                conn.close()
                await conn.wait_closed()
                closed.set_result(True)

            limits = {"max_write_buffer": 64 << 20, "close_timeout_ms": 100}
            async with await serve(handler, HOST, 0, **limits) as server:  # type: ignore[arg-type]
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect((HOST, server.port))  # and never read
                try:
                    result: bool = await asyncio.wait_for(closed, GUARD_S)
                finally:
                    sock.close()
                return result

        assert run(main())

    def test_aclose_sends_the_last_frame_and_waits_until_the_transport_is_gone(
        self, run: Runner
    ) -> None:
        """FramedConnection.aclose(kick) closes like close(kick) and returns once closed."""

        async def main() -> tuple[bool, bool, Message, int]:
            accepted: asyncio.Future[FramedConnection] = (
                asyncio.get_running_loop().create_future()
            )

            async def handler(conn: FramedConnection) -> None:
                accepted.set_result(conn)
                async for _ in conn:
                    pass

            async with await serve(handler, HOST, 0) as server:
                client = await open_connection(HOST, server.port)
                kick = Kick(code=ErrorCode.REPLACED, reason="bye")
                server_side = await asyncio.wait_for(accepted, GUARD_S)
                await asyncio.wait_for(server_side.aclose(kick), GUARD_S)
                gone = server_side.transport is None or server_side.transport.is_closing()
                told = await client.recv()
                await client.aclose()
                await client.aclose()  # idempotent
                return gone, client.closed, told, server_side.close_code

        gone, closed, told, code = run(main())
        assert gone and closed
        assert told == Kick(code=ErrorCode.REPLACED, reason="bye")
        assert code == ErrorCode.REPLACED


class TestDeadlinesAndBadInput:
    def test_garbage_gets_an_error_frame_and_a_close(self, run: Runner) -> None:
        """Bytes that are not frames get Error(PROTOCOL_ERROR) with a fixed reason, then EOF."""

        async def main() -> list[Message]:
            async with await pong_server() as server:
                return await raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

        assert run(main()) == [Error(code=ErrorCode.PROTOCOL_ERROR, reason="protocol error")]

    def test_slowloris_header_then_silence_is_cut(self, run: Runner) -> None:
        """A frame header followed by silence is cut at the whole-frame deadline."""

        async def main() -> list[Message]:
            frame = Connection(Role.CLIENT).send(Ping(nonce=123456))
            async with await pong_server(frame_timeout_ms=100, handshake_timeout_ms=None) as s:
                return await raw_exchange(s.port, frame[:9])

        assert run(main()) == [Error(code=ErrorCode.PROTOCOL_ERROR, reason="frame timeout")]

    def test_whole_frames_reset_the_frame_deadline(self, run: Runner) -> None:
        """A client sending whole frames slowly is not cut by the frame deadline."""

        async def main() -> int:
            async with await pong_server(frame_timeout_ms=50, handshake_timeout_ms=None) as s:
                client = await open_connection(HOST, s.port)
                for i in range(4):
                    client.send(Ping(nonce=i))
                    assert await client.recv() == Pong(nonce=i)
                    await asyncio.sleep(0.06)
                assert not client.closed
                client.close()
                return 0

        run(main())

    def test_no_login_is_kicked_at_the_handshake_deadline(self, run: Runner) -> None:
        """A connection never marked established is kicked with NOT_LOGGED_IN."""

        async def main() -> list[Message]:
            async with await pong_server(handshake_timeout_ms=100) as server:
                return await raw_exchange(server.port, b"")

        assert run(main()) == [
            Kick(code=ErrorCode.NOT_LOGGED_IN, reason="login timeout", retry_after_ms=0)
        ]


class TestBackPressure:
    def test_a_slow_application_pauses_reading_and_loses_nothing(self, run: Runner) -> None:
        """With the inbox full the server stops reading; once drained, every frame arrives."""

        async def main() -> tuple[list[int], bool]:
            go = asyncio.Event()
            got: list[int] = []
            paused: list[bool] = []

            async def handler(conn: FramedConnection) -> None:
                await go.wait()
                paused.append(conn._reading_paused)
                while len(got) < 2000:
                    msg = await conn.recv()
                    conn._check()
                    assert conn.pending() <= 4
                    assert isinstance(msg, Ping)
                    got.append(msg.nonce)

            async with await serve(handler, HOST, 0, max_pending=4) as server:
                client = await open_connection(HOST, server.port)
                for i in range(2000):
                    client.send(Ping(nonce=i))
                await client.drain()
                while not server.connections or not next(iter(server.connections))._reading_paused:
                    await asyncio.sleep(0.01)
                go.set()
                while len(got) < 2000:
                    await asyncio.sleep(0.01)
                client.close()
                return got, paused[0]

        got, was_paused = run(main())
        assert got == list(range(2000))
        assert was_paused


class TestServer:
    def test_connections_over_the_limit_are_told_to_come_back(self, run: Runner) -> None:
        """Past max_connections (all logged in) a client gets Kick(SERVER_BUSY), retry hint."""

        async def main() -> list[Message]:
            # handshake_timeout_ms=None: no login phase, every connection counts as logged in
            async with await pong_server(
                max_connections=1, busy_retry_after_ms=1234, handshake_timeout_ms=None
            ) as server:
                first = await open_connection(HOST, server.port)
                first.send(Ping(nonce=1))
                assert await first.recv() == Pong(nonce=1)
                out = await raw_exchange(server.port, b"")
                assert server.refused == 1
                first.close()
                return out

        assert run(main()) == [
            Kick(code=ErrorCode.SERVER_BUSY, reason="server busy", retry_after_ms=1234)
        ]

    def test_close_kicks_every_client_with_a_spread_shutdown_hint(self, run: Runner) -> None:
        """Server.aclose sends Kick(SHUTDOWN) to each client, each with its own retry
        hint in [0.5, 1.5) x shutdown_retry_after_ms, so they do not return in a wave."""

        async def main() -> list[Message]:
            server = await pong_server(shutdown_retry_after_ms=1000)
            clients = [await open_connection(HOST, server.port) for _ in range(20)]
            for i, client in enumerate(clients):
                client.send(Ping(nonce=i))
                assert await client.recv() == Pong(nonce=i)
            await server.aclose()
            return [await client.recv() for client in clients]

        kicks = run(main())
        assert all(type(k) is Kick and k.code == ErrorCode.SHUTDOWN for k in kicks)
        hints = [k.retry_after_ms for k in kicks if type(k) is Kick]
        assert all(500 <= h < 1500 for h in hints)
        assert len(set(hints)) >= 10  # spread, not one value

    def test_close_is_a_deprecated_alias_of_aclose(self, run: Runner) -> None:
        """Server.close() still closes (kick included) and warns DeprecationWarning."""

        async def main() -> tuple[Message, list[type[Warning]]]:
            server = await pong_server(shutdown_retry_after_ms=5)
            client = await open_connection(HOST, server.port)
            client.send(Ping(nonce=1))
            assert await client.recv() == Pong(nonce=1)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                await server.close(kick=True)
            return await client.recv(), [w.category for w in caught]

        told, caught = run(main())
        assert type(told) is Kick and told.code == ErrorCode.SHUTDOWN
        assert 2 <= told.retry_after_ms < 8
        assert caught == [DeprecationWarning]

    def test_a_failing_handler_leaks_no_detail(self, run: Runner) -> None:
        """A handler exception is answered with Error(INTERNAL, fixed reason)."""

        async def main() -> list[Message]:
            async def handler(conn: FramedConnection) -> None:
                await conn.recv()
                raise RuntimeError("secret database password")

            async with await serve(handler, HOST, 0) as server:
                return await raw_exchange(server.port, Connection(Role.CLIENT).send(Ping()))

        out = run(main())
        assert out == [Error(code=ErrorCode.INTERNAL, reason="internal error")]


class FakeTransport(asyncio.Transport):
    """Records writes and pause/resume calls; never blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.paused = False
        self.closing = False
        self.buffered = 0  # what get_write_buffer_size() reports (a peer that does not read)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        assert not self.paused
        self.paused = True

    def resume_reading(self) -> None:
        assert self.paused
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class TestChunkingAndPausing:
    @settings(max_examples=60)
    @given(
        cuts=st.lists(st.integers(1, 40), min_size=1, max_size=30),
        max_pending=st.integers(1, 5),
        reads=st.lists(st.integers(0, 6), min_size=1, max_size=30),
    )
    def test_any_chunking_and_reading_pace_delivers_everything(
        self, cuts: list[int], max_pending: int, reads: list[int]
    ) -> None:
        """Frames cut anywhere and read at any pace arrive whole, in order, inbox bounded."""
        sender = Connection(Role.CLIENT)
        stream = b"".join(sender.send(Ping(nonce=i)) for i in range(25))

        async def main() -> list[int]:
            conn = FramedConnection(Role.SERVER, max_pending=max_pending, handshake_timeout_ms=None)
            transport = FakeTransport()
            conn.connection_made(transport)
            got: list[int] = []
            pos = 0
            step = 0

            def take(n: int) -> None:
                for _ in range(n):
                    msg = conn.recv_nowait()
                    if msg is None:
                        return
                    assert isinstance(msg, Ping)
                    got.append(msg.nonce)

            while pos < len(stream):
                if not transport.paused:
                    n = cuts[step % len(cuts)]
                    conn.data_received(stream[pos : pos + n])
                    pos += n
                take(reads[step % len(reads)] or (1 if transport.paused else 0))
                conn._check()
                assert conn.pending() <= max_pending
                assert transport.paused == conn._reading_paused
                step += 1
            while conn.pending():
                take(1)
            conn.connection_lost(None)
            return got

        assert asyncio.run(main()) == list(range(25))



def fake_conn(role: Role = Role.SERVER, **kwargs: Any) -> tuple[FramedConnection, FakeTransport]:
    """A FramedConnection on a FakeTransport (call inside a running loop)."""
    conn = FramedConnection(role, handshake_timeout_ms=None, **kwargs)
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


def written_messages(transport: FakeTransport) -> list[Message]:
    """Decode everything written to the fake transport, as a client would."""
    reader = Connection(Role.CLIENT)
    data = b"".join(transport.written)
    if data:
        reader.receive_data(data)
    out: list[Message] = []
    while (event := reader.next_event()) is not NEED_DATA:
        assert event is not CLOSED
        out.append(event)
    return out


PUSHES = tuple(Push(conv="g", seq=i, sender="u", body=b"hi %d" % i) for i in range(1, 4))


class TestConfig:
    def test_bad_keyword_types_are_config_errors(self) -> None:
        """A limit of the wrong type (or None where None is not allowed) raises ConfigError."""
        for kwargs in (
            {"max_pending": "8"},
            {"max_write_buffer": None},
            {"write_high_water": 1.5},
            {"frame_timeout_ms": "1"},
            {"close_timeout_ms": None},
            {"max_frame_size": "big"},
        ):
            with pytest.raises(ConfigError):
                FramedConnection(Role.CLIENT, **kwargs)


class TestCloseCode:
    def test_close_after_a_kick_records_its_code(self) -> None:
        """send(Kick) then a bare close(): close_code and close_reason are the kick's."""

        async def main() -> tuple[int, str, int]:
            conn, _ = fake_conn()
            conn.send(Kick(code=ErrorCode.REPLACED, reason="replaced"))
            conn.close()
            with pytest.raises(ConnectionClosed) as info:
                conn.send(Ping())
            return conn.close_code, conn.close_reason, info.value.code

        assert asyncio.run(main()) == (ErrorCode.REPLACED, "replaced", ErrorCode.REPLACED)

    def test_explicit_code_and_last_frame_win(self) -> None:
        """close(code=...) and close(last) override an earlier Kick; no Kick at all is 0."""

        async def main() -> list[tuple[int, str]]:
            got = []
            for explicit in (True, False):
                conn, _ = fake_conn()
                conn.send(Kick(code=ErrorCode.REPLACED, reason="replaced"))
                if explicit:
                    conn.close(code=ErrorCode.SHUTDOWN)
                else:
                    conn.close(Error(code=ErrorCode.INTERNAL, reason="x"))
                got.append((conn.close_code, conn.close_reason))
            plain, _ = fake_conn()
            plain.send(Push(conv="c", seq=1, sender="u", body=b"x"))
            plain.close()
            got.append((plain.close_code, plain.close_reason))
            return got

        assert asyncio.run(main()) == [
            (ErrorCode.SHUTDOWN, ""),
            (ErrorCode.INTERNAL, "x"),
            (0, ""),
        ]

    def test_a_kick_sent_pre_encoded_counts_too(self) -> None:
        """send_encoded(encode(Kick)) then close(): the kick's code is recorded."""

        async def main() -> int:
            conn, transport = fake_conn()
            conn.send_encoded(encode(Kick(code=ErrorCode.SLOW_CONSUMER, reason="slow")))
            conn.close()
            assert written_messages(transport) == [
                Kick(code=ErrorCode.SLOW_CONSUMER, reason="slow")
            ]
            return conn.close_code

        assert asyncio.run(main()) == ErrorCode.SLOW_CONSUMER

    def test_a_handler_that_kicks_and_returns_closes_with_the_kick_code(
        self, run: Runner
    ) -> None:
        """Over loopback: serve() closes after the handler returns; the kick's code is kept."""

        async def main() -> tuple[Message, int]:
            served: list[FramedConnection] = []

            async def handler(conn: FramedConnection) -> None:
                served.append(conn)
                await conn.recv()
                conn.send(Kick(code=ErrorCode.AUTH_FAILED, reason="no"))
                # returns without close(): serve() closes the connection with no code

            async with await serve(handler, HOST, 0) as server:
                client = await open_connection(HOST, server.port)
                client.send(Ping())
                got = await client.recv()
                await asyncio.wait_for(served[0].wait_closed(), GUARD_S)
                client.close()
                return got, served[0].close_code

        assert run(main()) == (Kick(code=ErrorCode.AUTH_FAILED, reason="no"), ErrorCode.AUTH_FAILED)


class TestSendEncoded:
    def test_same_bytes_as_send_and_coalesced(self) -> None:
        """send_encoded writes exactly the encoded bytes, in order, in the same single write."""

        async def main() -> tuple[list[bytes], list[Message], int]:
            conn, transport = fake_conn()
            frame = encode(PushBatch(pushes=PUSHES))
            conn.send(Pong(nonce=1))
            conn.send_encoded(frame)
            conn.send(Pong(nonce=2))
            await asyncio.sleep(0)  # the scheduled flush
            conn._check()
            return transport.written, written_messages(transport), conn.frames_sent

        written, messages, frames_sent = asyncio.run(main())
        assert len(written) == 1
        assert messages == [Pong(nonce=1), PushBatch(pushes=PUSHES), Pong(nonce=2)]
        assert frames_sent == 3

    def test_one_encoding_fans_out_to_many_connections(self, run: Runner) -> None:
        """One encode_push_batch, written to three clients over loopback: each decodes it."""

        async def main() -> list[Message]:
            ready: list[FramedConnection] = []
            enough = asyncio.Event()

            async def handler(conn: FramedConnection) -> None:
                await conn.recv()  # a Ping says hello
                ready.append(conn)
                if len(ready) == 3:
                    enough.set()
                await conn.wait_closed()

            async with await serve(handler, HOST, 0) as server:
                clients = [await open_connection(HOST, server.port) for _ in range(3)]
                for c in clients:
                    c.send(Ping())
                await asyncio.wait_for(enough.wait(), GUARD_S)
                frame = encode_push_batch([encode_body(p) for p in PUSHES])
                for conn in ready:
                    conn.send_encoded(frame)
                got = [await c.recv() for c in clients]
                for c in clients:
                    c.close()
                return got

        assert run(main()) == [PushBatch(pushes=PUSHES)] * 3

    def test_bad_frames_are_refused(self) -> None:
        """Not bytes, truncated, trailing bytes, bad magic or flag, over the size, wrong role."""
        good = encode(Push(conv="c", seq=1, sender="u", body=b"x" * 40))

        async def main() -> None:
            conn, transport = fake_conn(max_frame_size=32)
            small = encode(Pong(nonce=1))
            bad_flag = small[:3] + b"\x02" + small[4:]
            for frame in (
                bytearray(small),
                small[:-1],
                small + b"\x00",
                b"\x00" + small[1:],
                small[:1] + b"\x09" + small[2:],  # another version
                bad_flag,
                good,  # a 40+ byte body over max_frame_size=32
                small[:8],
                b"",
            ):
                with pytest.raises(LocalProtocolError):
                    conn.send_encoded(frame)  # type: ignore[arg-type]
            client, _ = fake_conn(Role.CLIENT)
            with pytest.raises(LocalProtocolError):
                client.send_encoded(small)  # a Pong: only a server sends it
            client.send_encoded(encode(Ping(nonce=3)))
            await asyncio.sleep(0)
            assert transport.written == [] and conn.frames_sent == 0
            conn._check()

        asyncio.run(main())

    def test_closed_and_slow_consumer_rules_apply(self) -> None:
        """After close: ConnectionClosed. Past max_write_buffer: cut with SLOW_CONSUMER."""
        frame = encode(PushBatch(pushes=PUSHES))

        async def main() -> tuple[int, bool]:
            conn, _ = fake_conn()
            conn.close()
            with pytest.raises(ConnectionClosed):
                conn.send_encoded(frame)
            slow, transport = fake_conn(max_write_buffer=1024, write_high_water=512)
            transport.buffered = 2048  # the peer stopped reading
            slow.send_encoded(frame)
            await asyncio.sleep(0)
            with pytest.raises(ConnectionClosed):
                slow.send_encoded(frame)
            return slow.close_code, transport.closing

        assert asyncio.run(main()) == (ErrorCode.SLOW_CONSUMER, True)

    @settings(max_examples=100)
    @given(message=server_messages, coalesce=st.booleans())
    def test_any_server_message_pre_encoded_matches_send(
        self, message: Message, coalesce: bool
    ) -> None:
        """For any server message, send_encoded(encode(m)) writes what send(m) writes."""

        async def main() -> tuple[bytes, bytes]:
            outs = []
            for pre in (False, True):
                conn, transport = fake_conn(coalesce=coalesce)
                if pre:
                    conn.send_encoded(encode(message))
                else:
                    conn.send(message)
                await asyncio.sleep(0)
                conn._check()
                outs.append(b"".join(transport.written))
            return outs[0], outs[1]

        sent, pre_encoded = asyncio.run(main())
        assert sent == pre_encoded

    @settings(max_examples=100)
    @given(pos=st.integers(0, 7), byte=st.integers(0, 255))
    def test_header_check_against_its_specification(self, pos: int, byte: int) -> None:
        """A changed header byte is accepted only where the wire format allows that byte."""
        frame = encode(PushBatch(pushes=PUSHES))
        damaged = frame[:pos] + bytes([byte]) + frame[pos + 1 :]
        server_types = {int(t) for t, (_, senders) in SENDERS.items() if Role.SERVER in senders}
        allowed = (
            damaged == frame
            or (pos == 2 and byte in server_types)  # another frame type a server may send
            or (pos == 3 and byte in (0, 1))  # flags: only bit 0 (LZ4) is defined
        )

        async def main() -> bool:
            conn, transport = fake_conn()
            try:
                conn.send_encoded(damaged)
            except LocalProtocolError:
                assert conn.frames_sent == 0
                return False
            await asyncio.sleep(0)
            assert b"".join(transport.written) == damaged
            return True

        assert asyncio.run(main()) == allowed


class TestGarbage:
    @settings(max_examples=100)
    @given(
        prefix=st.sampled_from([b"", Connection(Role.CLIENT).send(Ping(nonce=5))]),
        junk=st.binary(max_size=200),
        cut=st.integers(1, 64),
    )
    def test_any_bytes_yield_messages_or_a_clean_protocol_error(
        self, prefix: bytes, junk: bytes, cut: int
    ) -> None:
        """Random bytes after valid frames: messages, or an Error frame and a close; no raise."""

        async def main() -> tuple[list[Message], list[Message], bool]:
            conn = FramedConnection(Role.SERVER, handshake_timeout_ms=None)
            transport = FakeTransport()
            conn.connection_made(transport)
            data = prefix + junk
            for i in range(0, len(data), cut):
                conn.data_received(data[i : i + cut])
            got = []
            while (msg := conn.recv_nowait()) is not None:
                got.append(msg)
            reader = Connection(Role.CLIENT)
            written = b"".join(transport.written)
            if written:  # b"" would mean EOF
                reader.receive_data(written)
            sent: list[Message] = []
            while (event := reader.next_event()) is not NEED_DATA:
                assert event is not CLOSED
                sent.append(event)
            closed = transport.closing
            conn.connection_lost(None)
            return got, sent, closed

        got, sent, closed = asyncio.run(main())
        if prefix:
            assert got[:1] == [Ping(nonce=5)]
        if closed:
            assert sent == [Error(code=ErrorCode.PROTOCOL_ERROR, reason="protocol error")]
        else:
            assert sent == []
