"""A raw protocol client for probing a gateway: frames in, frames out, no session logic.

What it does
    :class:`RawClient` opens a TCP connection and speaks the imkit wire protocol
    through a sans-IO :class:`imkit.protocol.Connection` and asyncio streams, with
    nothing else: it never pings, never acks, never resends unless told to. Tests
    and curious people use it to play the misbehaving client the gateway must
    survive: one whose heartbeats stop, one that resends a cid, one that never
    reads (``rcvbuf`` shrinks its socket receive buffer, and it simply does not
    call :meth:`RawClient.recv`).

    ``python -m examples.probe --user alice --to bob --text hi`` sends one message
    the raw way and prints every frame it gets back for two seconds.

Policies
    Every wait has a timeout (``timeout_s``); a frame the peer sends that does not
    decode raises the protocol's ``RemoteProtocolError``.

What it leaves out
    Everything :class:`imkit.aio.Client` does (reconnects, heartbeats, ordering,
    dedup): use that for real clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import time
from typing import TypeVar

from imkit.errors import ConnectionClosed
from imkit.protocol import (
    CLOSED,
    NEED_DATA,
    Connection,
    Login,
    LoginAck,
    Message,
    Role,
    Send,
    Sentinel,
)
from imkit.session import initial_cid
from imkit.store import direct_conv_id

__all__ = ["RawClient"]

M = TypeVar("M")


class RawClient:
    """One raw imkit connection. ``send`` is O(frame); ``recv`` O(bytes read)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = Connection(Role.CLIENT)
        self.received: list[Message] = []  # every message recv() returned

    @classmethod
    async def connect(
        cls, host: str, port: int, *, rcvbuf: int | None = None, limit: int = 64 * 1024
    ) -> RawClient:
        """Connect; ``rcvbuf`` sets SO_RCVBUF before connecting (a small window)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        return cls(reader, writer)

    def send(self, message: Message) -> None:
        """Write one frame."""
        self.writer.write(self.conn.send(message))

    async def recv(self, timeout_s: float = 5.0) -> Message:
        """The next message; ConnectionClosed at EOF, TimeoutError after ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            while True:
                event = self.conn.next_event()
                if not isinstance(event, Sentinel):
                    self.received.append(event)
                    return event
                if event is CLOSED:
                    raise ConnectionClosed(0, "closed by the server")
                assert event is NEED_DATA
                data = await self.reader.read(65536)
                self.conn.receive_data(data)

    async def expect(self, kind: type[M], timeout_s: float = 5.0) -> M:
        """Read until a message of type ``kind`` arrives (others are kept in ``received``)."""
        async with asyncio.timeout(timeout_s):
            while True:
                message = await self.recv(timeout_s)
                if isinstance(message, kind):
                    return message

    async def login(self, token: str, device: str, *, resume: str = "") -> LoginAck:
        """Send Login and wait for the LoginAck."""
        self.send(Login(token=token, device=device, resume=resume))
        return await self.expect(LoginAck)

    async def wait_closed(self, timeout_s: float = 5.0) -> list[Message]:
        """Read until the server closes the connection; the messages read meanwhile."""
        got: list[Message] = []
        with contextlib.suppress(ConnectionClosed, ConnectionError):
            while True:
                got.append(await self.recv(timeout_s))
        return got

    def close(self) -> None:
        """Close the connection (a FIN)."""
        self.writer.close()

    def abort(self) -> None:
        """Drop the connection (a RST)."""
        self.writer.transport.abort()


async def _main(args: argparse.Namespace) -> int:
    from .chat import fetch_token

    device = "probe"
    token = await fetch_token(args.ipconf, args.user, device)
    host, _, port = args.gateway.rpartition(":")
    client = await RawClient.connect(host, int(port))
    ack = await client.login(token, device)
    print(ack)
    conv = args.group or direct_conv_id(args.user, args.to)
    cid = initial_cid(int(time.time() * 1000))  # cids never repeat for a user
    client.send(Send(cid=cid, conv=conv, body=args.text.encode()))
    with contextlib.suppress(TimeoutError, ConnectionClosed):
        while True:
            print(await client.recv(2.0))
    client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m examples.probe``: send one message the raw way, print the replies."""
    p = argparse.ArgumentParser(prog="python -m examples.probe", description=__doc__)
    p.add_argument("--user", required=True)
    p.add_argument("--to")
    p.add_argument("--group")
    p.add_argument("--text", default="hello")
    p.add_argument("--gateway", default="127.0.0.1:7710")
    p.add_argument("--ipconf", default="http://127.0.0.1:7700")
    return asyncio.run(_main(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
