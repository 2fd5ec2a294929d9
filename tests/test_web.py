"""The web chat page (examples/web) and the gateway's WebSocket endpoint.

The browser test drives headless Chromium (``/usr/bin/chromium``, through the
``playwright`` package, never ``playwright install``) with a fresh profile: the page
logs in over WebSocket with its hand-written CBOR codec, sends a message to a Python
client and shows the reply. Without Chromium it is skipped, unless
``IMKIT_REQUIRE_SERVICES=1`` (CI), where it fails. The WebSocket tests use a wsproto
client and need no browser.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
from examples.cluster import Cluster
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Request,
    TextMessage,
)

from imkit.protocol import (
    Error,
    ErrorCode,
    Login,
    LoginAck,
    Message,
    Ping,
    Pong,
    Push,
    Send,
    SendAck,
    decode,
    encode,
)
from imkit.session import initial_cid
from imkit.store import direct_conv_id
from tests.test_e2e import config, make_client, online, run, running, take

pytestmark = [pytest.mark.network, pytest.mark.timeout(90)]

CHROMIUM = "/usr/bin/chromium"


def _need_chromium() -> None:
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(CHROMIUM)
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package")
    if missing:
        reason = f"headless browser test needs {' and '.join(missing)}"
        if os.environ.get("IMKIT_REQUIRE_SERVICES") == "1":
            pytest.fail(reason + " (IMKIT_REQUIRE_SERVICES=1)")
        pytest.skip(reason)


def _web_port(cluster: Cluster) -> int:
    return int(cluster.gateways[0].web_url.rstrip("/").rsplit(":", 1)[1])


class TestBrowser:
    def test_the_page_sends_and_receives_a_message_in_chromium(self, tmp_path: Path) -> None:
        """Alice in Chromium and Bob in Python: each receives the other's message."""
        _need_chromium()
        from playwright.async_api import async_playwright

        async def main() -> tuple[bytes, list[str], str]:
            async with running(config(dev=True)) as cluster:  # the page asks /dev/token
                bob = make_client(cluster, "bob")
                await online(bob)
                conv = direct_conv_id("alice", "bob")
                async with async_playwright() as pw:
                    context = await pw.chromium.launch_persistent_context(
                        str(tmp_path / "profile"),  # a fresh user-data-dir
                        executable_path=CHROMIUM,
                        headless=True,
                        args=[
                            "--headless",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-background-networking",
                        ],
                    )
                    try:
                        page = await context.new_page()
                        await page.goto(f"{cluster.gateways[0].web_url}?user=alice&to=bob")
                        await page.wait_for_selector('#status[data-state="online"]', timeout=15_000)
                        await page.fill("#text", "hello from the browser ✓")
                        await page.click("#send")
                        got = await take(bob, 1, conv)
                        await bob.send(conv, "hello, browser 你好".encode())
                        await page.wait_for_selector(
                            "#log li.them:has-text('hello, browser')", timeout=15_000
                        )
                        await page.wait_for_selector("#log li.me:not(.sending)", timeout=15_000)
                        lines = await page.locator("#log li").all_inner_texts()
                        status = await page.inner_text("#status")
                    finally:
                        await context.close()
                await bob.aclose()
                return got[0].body, lines, status

        body, lines, status = run(main)
        assert body == "hello from the browser ✓".encode()
        assert lines == ["alice: hello from the browser ✓", "bob: hello, browser 你好"]
        assert "online as alice" in status


    def test_the_page_shows_a_merged_burst_of_a_big_group_in_order(self, tmp_path: Path) -> None:
        """30 messages to 'lobby' (read fan-out, PushBatch frames) appear once each, in order."""
        _need_chromium()
        from playwright.async_api import async_playwright

        async def main() -> tuple[list[str], int]:
            async with running(config(dev=True)) as cluster:  # the page asks /dev/token
                bob = make_client(cluster, "bob")
                await online(bob)
                async with async_playwright() as pw:
                    context = await pw.chromium.launch_persistent_context(
                        str(tmp_path / "profile"),
                        executable_path=CHROMIUM,
                        headless=True,
                        args=["--headless", "--no-sandbox", "--disable-gpu",
                              "--disable-background-networking"],
                    )
                    try:
                        page = await context.new_page()
                        await page.goto(f"{cluster.gateways[0].web_url}?user=alice&group=lobby")
                        await page.wait_for_selector('#status[data-state="online"]', timeout=15_000)
                        sent = [bob.send_nowait("lobby", b"burst %d" % i)[1] for i in range(30)]
                        await asyncio.gather(*sent)
                        await page.wait_for_selector("#log li:has-text('burst 29')", timeout=15_000)
                        lines = await page.locator("#log li").all_inner_texts()
                    finally:
                        await context.close()
                await bob.aclose()
                return lines, cluster.logic.stats.envelopes

        lines, envelopes = run(main)
        assert lines == [f"bob: burst {i}" for i in range(30)]
        assert envelopes < 30  # merged: some frames were PushBatches


class WsClient:
    """A minimal WebSocket client (wsproto) that sends imkit frames as binary messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Any] = []

    @classmethod
    async def connect(cls, port: int) -> WsClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        writer.write(client.ws.send(Request(host=f"127.0.0.1:{port}", target="/ws")))
        event = await client.next_event()
        assert isinstance(event, AcceptConnection), event
        return client

    async def next_event(self) -> Any:
        while not self.events:
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            self.ws.receive_data(data or None)
            self.events.extend(self.ws.events())
            if not data and not self.events:
                raise ConnectionError("closed")
        return self.events.pop(0)

    def send(self, message: Message) -> None:
        self.writer.write(self.ws.send(BytesMessage(data=encode(message))))

    async def recv(self) -> Message:
        event = await self.next_event()
        assert isinstance(event, BytesMessage), event
        return decode(event.data)

    async def expect(self, kind: type[Any]) -> Any:
        while True:
            message = await self.recv()
            if isinstance(message, kind):
                return message


class TestWebSocket:
    def test_one_frame_per_binary_message_login_send_and_push(self) -> None:
        """Over WebSocket: Login, Ping, Send; the Push of a Python client's message arrives."""

        async def main() -> tuple[str, int, int, bytes]:
            async with running() as cluster:
                ws = await WsClient.connect(_web_port(cluster))
                ws.send(Login(token=cluster.token("alice", "web"), device="web"))
                ack = await ws.expect(LoginAck)
                ws.send(Ping(nonce=7))
                pong = await ws.expect(Pong)
                conv = direct_conv_id("alice", "bob")
                ws.send(Send(cid=initial_cid(1_700_000_000_000), conv=conv, body=b"from ws"))
                sent = await ws.expect(SendAck)
                bob = make_client(cluster, "bob")
                await online(bob)
                await bob.send(conv, b"to ws")
                push = await ws.expect(Push)
                while push.body != b"to ws":
                    push = await ws.expect(Push)
                await bob.aclose()
                ws.writer.close()
                return ack.uid, pong.nonce, sent.seq, push.body

        assert run(main) == ("alice", 7, 1, b"to ws")

    @pytest.mark.parametrize("bad", ["text", "two frames", "half a frame", "garbage"])
    def test_a_bad_message_gets_a_protocol_error_and_a_close(self, bad: str) -> None:
        """Text, two frames in one message, half a frame, or garbage: Error + close."""

        async def main() -> list[Any]:
            async with running() as cluster:
                ws = await WsClient.connect(_web_port(cluster))
                login = encode(Login(token=cluster.token("alice", "web"), device="web"))
                payload = {
                    "two frames": login + login,
                    "half a frame": login[:-3],
                    "garbage": b"\x00" * 20,
                }
                if bad == "text":
                    ws.writer.write(ws.ws.send(TextMessage(data="hello")))
                else:
                    ws.writer.write(ws.ws.send(BytesMessage(data=payload[bad])))
                events = []
                while True:
                    try:
                        event = await ws.next_event()
                    except ConnectionError:
                        break
                    events.append(event)
                    if isinstance(event, CloseConnection):
                        break
                ws.writer.close()
                return events

        events = run(main)
        frames = [decode(e.data) for e in events if isinstance(e, BytesMessage)]
        assert frames == [Error(code=ErrorCode.PROTOCOL_ERROR, reason="protocol error")]
        assert isinstance(events[-1], CloseConnection)

    def test_the_page_and_its_scripts_are_served(self) -> None:
        """GET /, /app.js and /cbor.js answer with the right content types."""

        async def main() -> list[bytes]:
            async with running() as cluster:
                heads = []
                for path in ("/", "/app.js", "/cbor.js", "/nope"):
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", _web_port(cluster)
                    )
                    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    answer = await asyncio.wait_for(reader.read(), 5)
                    writer.close()
                    heads.append(answer.split(b"\r\n\r\n", 1)[0])
                return heads

        page, app, cbor, nope = run(main)
        assert page.startswith(b"HTTP/1.1 200") and b"text/html" in page
        assert b"text/javascript" in app and b"text/javascript" in cbor
        assert nope.startswith(b"HTTP/1.1 404")
