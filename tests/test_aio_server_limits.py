"""imkit.aio.serve under a flood of idle connections: pre-login budget and per-address cap.

Idle, never-logged-in connections must not take the slots of real users (issue 8
#5): they have their own budget (``max_pending_logins``; when it is full the oldest
of them makes room for a newcomer) and one address holds at most
``max_per_address`` connections. Logged-in connections are never evicted.
The limits are scaled down through the keywords so that the tests stay small.
"""

from __future__ import annotations

import asyncio
import resource
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from imkit.aio import FramedConnection, Server, open_connection, serve
from imkit.aio import run as aio_run
from imkit.aio._server import address_key
from imkit.errors import ConfigError, ConnectionClosed
from imkit.protocol import ErrorCode, Kick, Login, Message, Ping, Pong, decode

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]

HOST = "127.0.0.1"
GUARD_S = 10  # hang guard for waits on the network (not a timing assertion)


def _want_fds(n: int) -> None:
    """Raise the soft file-descriptor limit to ``n`` if the hard limit allows; else skip."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= n:
        return
    if hard != resource.RLIM_INFINITY and hard < n:
        pytest.skip(f"needs {n} file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


async def login_server(**kwargs: Any) -> Server:
    """A server that accepts any Login (established + Pong(0)) and answers Pings."""

    async def handler(conn: FramedConnection) -> None:
        async for msg in conn:
            if isinstance(msg, Login):
                conn.established()
                conn.send(Pong(nonce=0))
            elif isinstance(msg, Ping):
                conn.send(Pong(nonce=msg.nonce))

    return await serve(handler, HOST, 0, **kwargs)


async def log_in(port: int, name: str) -> FramedConnection | Message | None:
    """Connect and log in: the connection, or what the server said instead (None: closed)."""
    try:
        conn = await open_connection(HOST, port, handshake_timeout_ms=None)
    except OSError:
        return None
    conn.send(Login(token="t", device=name))
    try:
        answer = await asyncio.wait_for(conn.recv(), GUARD_S)
    except ConnectionClosed:
        return None
    if answer == Pong(nonce=0):
        return conn
    conn.close()
    return answer


async def idle(port: int, source: str = HOST) -> socket.socket:
    """An idle TCP connection from ``source`` that never sends a byte."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind((source, 0))
    await loop.sock_connect(sock, (HOST, port))
    return sock


async def alive(conn: FramedConnection, nonce: int) -> bool:
    """True if the connection still answers a Ping."""
    try:
        conn.send(Ping(nonce=nonce))
        return await asyncio.wait_for(conn.recv(), GUARD_S) == Pong(nonce=nonce)
    except (ConnectionClosed, TimeoutError):
        return False


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await asyncio.wait_for(coro, 45)

    return aio_run(main())


async def _settle(server: Server, pred: Callable[[Server], bool]) -> None:
    for _ in range(500):
        if pred(server):
            return
        await asyncio.sleep(0.01)


class TestPendingLoginBudget:
    def test_logins_succeed_during_a_flood_of_idle_connections(self) -> None:
        """400 idle connections, budget 50 of 200 slots: 20 fresh logins all succeed."""
        _want_fds(4096)

        async def main() -> tuple[int, int, int, int]:
            socks: list[socket.socket] = []
            async with await login_server(
                max_connections=200, max_pending_logins=50, max_per_address=10_000
            ) as server:
                users = [await log_in(server.port, f"u{i}") for i in range(20)]
                assert all(isinstance(u, FramedConnection) for u in users)
                logged = [u for u in users if isinstance(u, FramedConnection)]
                socks += [await idle(server.port) for _ in range(400)]
                await _settle(server, lambda s: s.evicted >= 350)
                fresh = [await log_in(server.port, f"new{i}") for i in range(20)]
                ok = sum(isinstance(f, FramedConnection) for f in fresh)
                server._check()
                still = sum([await alive(u, i + 1) for i, u in enumerate(logged)])
                pending = server.pending_logins
                for c in [*logged, *fresh]:
                    if isinstance(c, FramedConnection):
                        c.close()
                for s in socks:
                    s.close()
                return ok, still, pending, len(server.connections)

        ok, still, pending, total = run(main())
        assert ok == 20, f"{ok}/20 logins succeeded during the flood"
        assert still == 20  # logged-in users are never evicted
        assert pending <= 50 and total <= 200

    def test_when_every_slot_is_logged_in_a_newcomer_is_told_to_come_back(self) -> None:
        """max_connections reached by logged-in users only: Kick(SERVER_BUSY, retry hint)."""

        async def main() -> tuple[Message | FramedConnection | None, int, bool]:
            async with await login_server(
                max_connections=3, max_pending_logins=2, busy_retry_after_ms=4321
            ) as server:
                users = [await log_in(server.port, f"u{i}") for i in range(3)]
                late = await log_in(server.port, "late")
                first = users[0]
                assert isinstance(first, FramedConnection)
                ok = await alive(first, 7)
                for u in users:
                    if isinstance(u, FramedConnection):
                        u.close()
                return late, server.evicted, ok

        late, evicted, ok = run(main())
        assert late == Kick(code=ErrorCode.SERVER_BUSY, reason="server busy", retry_after_ms=4321)
        assert evicted == 0 and ok

    def test_the_oldest_pending_connection_is_evicted_with_a_busy_kick(self) -> None:
        """Budget 2: the third idle connection evicts the first, which gets Kick(SERVER_BUSY)."""

        async def main() -> tuple[bytes, bytes, int]:
            async with await login_server(max_pending_logins=2, busy_retry_after_ms=99) as server:
                loop = asyncio.get_running_loop()
                first = await idle(server.port)
                await _settle(server, lambda s: s.pending_logins == 1)
                second = await idle(server.port)
                await _settle(server, lambda s: s.pending_logins == 2)
                third = await idle(server.port)
                await _settle(server, lambda s: s.evicted == 1)
                got = await asyncio.wait_for(loop.sock_recv(first, 1024), GUARD_S)
                second.setblocking(False)
                try:
                    other = second.recv(1024)
                except BlockingIOError:
                    other = b""
                for s in (first, second, third):
                    s.close()
                return got, other, server.pending_logins

        got, other, pending = run(main())
        busy = Kick(code=ErrorCode.SERVER_BUSY, reason="server busy", retry_after_ms=99)
        assert decode(got) == busy
        assert other == b"" and pending == 2


class TestPerAddressCap:
    def test_one_address_gets_at_most_max_per_address(self) -> None:
        """From 127.0.0.2 only 5 of 8 connections stay; a login from 127.0.0.1 still works."""

        async def main() -> tuple[int, bool, int]:
            async with await login_server(max_per_address=5) as server:
                socks = [await idle(server.port, "127.0.0.2") for _ in range(8)]
                await _settle(server, lambda s: s.refused >= 3)
                refused = server.refused
                server._check()
                user = await log_in(server.port, "legit")
                ok = isinstance(user, FramedConnection)
                if isinstance(user, FramedConnection):
                    user.close()
                for s in socks:
                    s.close()
                return refused, ok, len(server.connections)

        refused, ok, _ = run(main())
        assert refused == 3 and ok

    def test_logged_in_connections_count_too_and_free_their_slot_on_close(self) -> None:
        """The cap counts logged-in connections; closing one lets the next in."""

        async def main() -> tuple[object, object]:
            async with await login_server(max_per_address=2) as server:
                a = await log_in(server.port, "a")
                b = await log_in(server.port, "b")
                third = await log_in(server.port, "c")
                assert isinstance(a, FramedConnection) and isinstance(b, FramedConnection)
                a.close()
                await a.wait_closed()
                await _settle(server, lambda s: len(s.connections) == 1)
                again = await log_in(server.port, "d")
                for c in (b, again):
                    if isinstance(c, FramedConnection):
                        c.close()
                return third, again

        third, again = run(main())
        assert isinstance(third, Kick) and third.code == ErrorCode.SERVER_BUSY
        assert isinstance(again, FramedConnection)


class TestAddressKey:
    def test_ipv4_ipv6_and_mapped_keys(self) -> None:
        """IPv4 by address, IPv6 by /64, IPv4-mapped IPv6 as its IPv4; unknown peers: None."""
        assert address_key(("10.0.0.1", 5)) == address_key(("::ffff:10.0.0.1", 5, 0, 0))
        assert address_key(("10.0.0.1", 5)) != address_key(("10.0.0.2", 5))
        assert address_key(("2001:db8::1", 1, 0, 0)) == address_key(("2001:db8::ffff:2", 1, 0, 0))
        assert address_key(("2001:db8:0:1::1", 1, 0, 0)) != address_key(("2001:db8::1", 1, 0, 0))
        assert address_key(("fe80::1%eth0", 1, 0, 2)) is not None
        assert address_key(None) is None and address_key("") is None
        assert address_key(("not an address", 1)) is None


class TestConfig:
    def test_bad_limits_are_refused(self) -> None:
        """Limits below 1, or not integers, raise ConfigError (never TypeError)."""

        async def main() -> None:
            for kwargs in (
                {"max_pending_logins": 0},
                {"max_per_address": 0},
                {"max_per_address": "2"},  # a TypeError before
                {"max_connections": None},
                {"busy_retry_after_ms": -1},
                {"shutdown_retry_after_ms": "1"},
            ):
                with pytest.raises(ConfigError):
                    await login_server(**kwargs)

        run(main())

