"""A deployed version 1 client (the frozen tests/compat/v1 session and codec) through the
real gateway of this release, over loopback TCP, chatting with a new ``imkit.aio.Client``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from examples.cluster import ClusterConfig, start_cluster

import tests.compat.v1.protocol as v1p
import tests.compat.v1.session as v1s
from imkit.aio import Client, ClientStatus
from imkit.store import direct_conv_id

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]


class V1Client:
    """A version 1 ClientSession driven over a plain asyncio stream (no imkit.aio)."""

    def __init__(self, token: str, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.conn = v1p.Connection(v1p.Role.CLIENT)
        self.session = v1s.ClientSession(token=token, device="old-phone", now_ms=self.now())
        self.events: list[Any] = []
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter | None = None

    @staticmethod
    def now() -> int:
        return int(asyncio.get_running_loop().time() * 1000)

    def apply(self, outs: list[Any]) -> None:
        for o in outs:
            if isinstance(o, v1s.SessionEvent):
                self.events.append(o)
            elif self.writer is not None:
                self.writer.write(self.conn.send(o))

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.apply(self.session.connection_made(self.now()))

    async def pump(self, until: Any) -> None:
        """Read frames and fire timers until ``until(self)`` holds."""
        while not until(self):
            try:
                data = await asyncio.wait_for(self.reader.read(65536), 0.05)
            except TimeoutError:
                data = None
            if data is not None:
                self.conn.receive_data(data)
                while (m := self.conn.next_event()) is not v1p.NEED_DATA:
                    assert m is not v1p.CLOSED
                    self.apply(self.session.receive(m, self.now()))
            self.apply(self.session.tick(self.now()))

    def of(self, name: str) -> list[Any]:
        return [e for e in self.events if type(e).__name__ == name]


def test_a_v1_client_chats_through_the_new_gateway() -> None:
    """v1 client -> new gateway -> new client and back: acks, pushes and receipts work."""

    async def main() -> tuple[V1Client, list[bytes]]:
        cluster = await start_cluster(ClusterConfig(demo=True, web=False))
        host, port = cluster.endpoints()[0].rsplit(":", 1)
        conv = direct_conv_id("alice", "bob")
        bob = Client(token=cluster.token("bob", "phone"), device="phone",
                     endpoints=cluster.endpoints())
        old = V1Client(cluster.token("alice", "old-phone"), host, int(port))
        try:
            await bob.start()
            await bob.wait_for(ClientStatus.ONLINE, timeout=20)

            await old.connect()
            await old.pump(lambda c: bool(c.of("LoggedIn")))
            for i in range(3):
                old.apply(old.session.send(conv, f"old {i}".encode(), old.now())[1])
            got: list[bytes] = []

            async def receive() -> None:
                async for push in bob.messages():
                    if push.conv == conv:
                        got.append(push.body)
                        if len(got) == 3:
                            bob.mark_read(conv, push.seq)
                            return

            def done(c: V1Client) -> bool:
                return len(c.of("SendAcked")) == 3 and bool(c.of("ReceiptReceived"))

            await asyncio.wait_for(asyncio.gather(old.pump(done), receive()), 30)
            return old, got
        finally:
            if old.writer is not None:
                old.writer.close()
            await bob.aclose()
            await cluster.stop()

    old, got = asyncio.run(main())
    assert got == [b"old 0", b"old 1", b"old 2"]
    assert [e.seq for e in old.of("SendAcked")] == [1, 2, 3]
    assert old.of("ReceiptReceived")[0].receipt.reader == "bob"
    assert all(e.ack.uid == "alice" for e in old.of("LoggedIn"))
