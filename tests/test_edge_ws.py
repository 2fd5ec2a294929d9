"""The gateway's WebSocket edge under attack: non-reading peers, bad upgrades.

A real WebSocket client (a raw non-blocking socket with a tiny receive buffer, and
wsproto) logs in, fills its buffers with sync answers, stops reading and is kicked;
the gateway must release the link within its close deadline, as it does for TCP.
Malformed upgrade requests must get an HTTP answer (400 / 426) and cost one
rate-limited log line, not a traceback each.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from typing import Any

import pytest
from examples import websocket
from examples.cluster import Cluster
from examples.gateway import GatewayConfig
from examples.httpd import RateLimitedLog
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request

from imkit.aio import DEFAULT_CLOSE_TIMEOUT_MS
from imkit.policy import HeartbeatPolicy
from imkit.protocol import Login, LoginAck, Message, SyncRequest, decode, encode
from imkit.session import ServerConfig
from tests.test_e2e import FAST_SERVER, config, make_client, online, run, running

pytestmark = [pytest.mark.network, pytest.mark.timeout(90)]

#: How long a released link may take: the close deadline plus generous slack for a
#: loaded machine (the test fails only if the link is never released).
RELEASE_BOUND_S = DEFAULT_CLOSE_TIMEOUT_MS / 1000 + 10


def _web_port(cluster: Cluster) -> int:
    return int(cluster.gateways[0].web_url.rstrip("/").rsplit(":", 1)[1])


class RawWs:
    """A WebSocket client on a raw socket whose reading the test controls."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Any] = []

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int = 4096) -> RawWs:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        client = cls(sock)
        client.write(client.ws.send(Request(host=f"127.0.0.1:{port}", target="/ws")))
        event = await client.next_event()
        assert isinstance(event, AcceptConnection), event
        return client

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)  # small frames: the kernel takes them at once

    def send(self, message: Message) -> None:
        self.write(self.ws.send(BytesMessage(data=encode(message))))

    async def next_event(self) -> Any:
        loop = asyncio.get_running_loop()
        while not self.events:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), 5)
            self.ws.receive_data(data or None)
            self.events.extend(self.ws.events())
            if not data and not self.events:
                raise ConnectionError("closed")
        return self.events.pop(0)

    async def expect(self, kind: type[Any]) -> Any:
        while True:
            event = await self.next_event()
            if isinstance(event, BytesMessage):
                message = decode(event.data)
                if isinstance(message, kind):
                    return message

    def close(self) -> None:
        self.sock.close()


def _seed(cluster: Cluster) -> None:
    """100 messages of 4000 bytes in 'team': each sync answer is a ~64 KiB frame."""
    for i in range(100):
        cluster.store.append("team", "bob", 10_000 + i, b"x" * 4000, wall_ms=1)


async def _stalled_alice(cluster: Cluster) -> RawWs:
    """Alice on WebSocket, logged in, bytes queued for her in the gateway: she stopped reading."""
    _seed(cluster)
    ws = await RawWs.connect(_web_port(cluster))
    ws.send(Login(token=cluster.token("alice", "web"), device="web"))
    await ws.expect(LoginAck)
    gateway = cluster.gateways[0]
    (conn,) = [c for c in gateway.conns.values() if c.route is not None]
    for req_id in range(1, 400):
        ws.send(SyncRequest(req_id=req_id, after=(("team", 0),), limit=100))
        await asyncio.sleep(0.02)
        if conn.link.closed:
            pytest.fail("the link was cut before it was kicked (slow consumer?)")
        if conn.link.write_buffer_size() > 0:  # type: ignore[attr-defined]
            return ws
    pytest.fail("the gateway never had bytes queued for the stalled client")


async def _until(predicate: Any, bound_s: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + bound_s
    while loop.time() < end:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


class TestStalledWebSocketIsReleased:
    def test_a_replaced_link_that_does_not_read_is_released(self) -> None:
        """REPLACED kick of a WebSocket peer that stopped reading: the link leaves conns."""

        async def main() -> tuple[int, bool, int]:
            async with running() as cluster:
                gateway = cluster.gateways[0]
                ws = await _stalled_alice(cluster)
                before = gateway.connections
                phone = make_client(cluster, "alice", device="web")  # same device: REPLACED
                await online(phone)
                released = await _until(lambda: gateway.connections == 1, RELEASE_BOUND_S)
                after = gateway.connections
                await phone.aclose()
                ws.close()
                return before, released, after

        before, released, after = run(main)
        assert before == 1
        assert released, f"the kicked WebSocket link is still held ({after} connections)"

    def test_a_silent_link_kicked_by_heartbeat_is_released(self) -> None:
        """Heartbeat timeout of a WebSocket peer that stopped reading: the link leaves conns."""
        server = ServerConfig(
            reconnect_min_ms=FAST_SERVER.reconnect_min_ms,
            reconnect_max_ms=FAST_SERVER.reconnect_max_ms,
            heartbeat=HeartbeatPolicy(interval_ms=500, missed=3),
        )

        async def main() -> tuple[bool, int]:
            async with running(config(gateway=GatewayConfig(server=server))) as cluster:
                gateway = cluster.gateways[0]
                ws = await _stalled_alice(cluster)
                released = await _until(lambda: gateway.connections == 0, RELEASE_BOUND_S + 2)
                after = gateway.connections
                ws.close()
                return released, after

        released, after = run(main)
        assert released, f"the silent WebSocket link is still held ({after} connections)"

    def test_abort_drops_a_stalled_websocket_at_once(self) -> None:
        """Gateway.abort (a simulated kill -9) drops a stalled WebSocket link like a TCP one."""

        async def main() -> tuple[int, bool]:
            async with running() as cluster:
                gateway = cluster.gateways[0]
                ws = await _stalled_alice(cluster)
                dropped = await gateway.abort()
                # no close deadline to wait for: abort discards the queued bytes
                released = await _until(lambda: gateway.connections == 0, 3.0)
                ws.close()
                return dropped, released

        dropped, released = run(main)
        assert dropped == 1
        assert released


# -- bad upgrades -----------------------------------------------------------------------------

_KEY = base64.b64encode(b"0123456789abcdef").decode()
_KEY_15 = base64.b64encode(b"x" * 15).decode()


def _upgrade(**overrides: str | None) -> bytes:
    headers = {
        "Host": "127.0.0.1",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": _KEY,
        "Sec-WebSocket-Version": "13",
    }
    headers.update(overrides)  # type: ignore[arg-type]
    lines = [f"{k}: {v}" for k, v in headers.items() if v is not None]
    return ("GET /ws HTTP/1.1\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode()


BAD_UPGRADES = {
    "no key": (_upgrade(**{"Sec-WebSocket-Key": None}), 400),
    "key not base64": (_upgrade(**{"Sec-WebSocket-Key": "!!not*base64!!"}), 400),
    "key of 15 bytes": (_upgrade(**{"Sec-WebSocket-Key": _KEY_15}), 400),
    "two keys": (_upgrade(**{"Sec-WebSocket-Key": f"{_KEY}, {_KEY}"}), 400),
    "no Connection: upgrade": (_upgrade(Connection="keep-alive"), 400),
    "version 8": (_upgrade(**{"Sec-WebSocket-Version": "8"}), 426),
    "no version": (_upgrade(**{"Sec-WebSocket-Version": None}), 426),
    "HTTP/1.0": (_upgrade().replace(b"HTTP/1.1", b"HTTP/1.0", 1), 400),
}


async def _exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        answer = await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()
    return answer


class TestBadUpgrades:
    @pytest.mark.parametrize("case", sorted(BAD_UPGRADES))
    def test_a_bad_upgrade_gets_an_http_answer(self, case: str) -> None:
        """Each malformed upgrade is answered 400, or 426 naming version 13; never 101."""
        data, status = BAD_UPGRADES[case]

        async def main() -> bytes:
            async with running() as cluster:
                return await _exchange(_web_port(cluster), data)

        answer = run(main)
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 %d" % status), answer[:200]
        if status == 426:
            assert b"\r\nsec-websocket-version: 13" in head

    def test_a_good_upgrade_is_still_accepted(self) -> None:
        """The control case: the same request with a valid key and version 13 gets 101."""

        async def main() -> bytes:
            async with running() as cluster:
                return await _exchange(_web_port(cluster), _upgrade())

        assert run(main).startswith(b"HTTP/1.1 101")

    def test_many_bad_upgrades_cost_a_few_log_lines(
        self, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """500 bad upgrades (2 causes) are all answered and log a few lines, no traceback."""
        # a fresh limiter: earlier tests' lines must not hide this test's first ones
        monkeypatch.setattr(websocket, "_refused_log", RateLimitedLog(websocket.logger))
        names = ("no key", "key not base64", "version 8", "no version")
        kinds = [BAD_UPGRADES[name][0] for name in names]

        async def main() -> list[bytes]:
            async with running() as cluster:
                port = _web_port(cluster)
                return [await _exchange(port, kinds[i % len(kinds)]) for i in range(500)]

        with caplog.at_level(logging.INFO):
            answers = run(main)
        assert all(a.startswith((b"HTTP/1.1 400", b"HTTP/1.1 426")) for a in answers)
        records = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert not [r for r in records if r.exc_info], "a bad upgrade logged a traceback"
        assert 2 <= len(records) <= 40, [r.getMessage() for r in records[:5]]
        assert sum(len(r.getMessage()) for r in records) < 8_000
