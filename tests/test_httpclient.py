"""Tests of examples/httpclient.py: the h11 JSON client and the ipconf endpoint fetcher."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from examples.httpclient import endpoint_fetcher, fetch_endpoints, fetch_json

from imkit.aio import Client, ClientStatus, Endpoint
from imkit.errors import BackendError, ConfigError, HttpError

pytestmark = [pytest.mark.network, pytest.mark.timeout(30)]

HOST = "127.0.0.1"


def run(coro: Awaitable[Any]) -> Any:
    """Run a coroutine with a hang guard."""

    async def main() -> Any:
        return await asyncio.wait_for(coro, 20)

    return asyncio.run(main())


async def http_server(respond: Callable[[], bytes]) -> tuple[asyncio.Server, str]:
    """A one-shot HTTP server: reads a request head, writes ``respond()``, closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(respond())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    return server, f"http://{HOST}:{server.sockets[0].getsockname()[1]}/gateways?uid=alice"


def http_response(
    body: bytes, *, status: str = "200 OK", chunked: bool = False, to_eof: bool = False
) -> bytes:
    if chunked:
        half = len(body) // 2
        parts = [body[:half], body[half:]]
        data = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"
        head = f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n"
        return head.encode() + data
    if to_eof:
        return f"HTTP/1.1 {status}\r\nConnection: close\r\n\r\n".encode() + body
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


async def get(response: bytes, **kwargs: Any) -> Any:
    server, url = await http_server(lambda: response)
    try:
        return await fetch_json(url, **kwargs)
    finally:
        server.close()


class TestFetchJson:
    def test_bodies_framed_every_way_decode(self) -> None:
        """Content-Length, chunked and read-to-EOF bodies all decode to the same JSON."""
        doc = {"endpoints": ["10.0.0.1:7000"]}
        body = json.dumps(doc).encode()

        async def main() -> list[Any]:
            return [
                await get(http_response(body)),
                await get(http_response(body, chunked=True)),
                await get(http_response(body, to_eof=True)),
            ]

        assert run(main()) == [doc, doc, doc]

    def test_failures_are_backend_errors(self) -> None:
        """Over-limit, bad JSON, deep JSON, garbage and refused connects raise BackendError."""

        async def main() -> list[str]:
            got = []
            for response in (
                http_response(b"x" * 300_000),
                http_response(b"x" * 300_000, chunked=True),
                http_response(b"{not json"),
                http_response(b"[" * 100_000),
                b"SMTP ready\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}",  # cut short
                b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 20_000 + b"\r\n\r\n",  # huge head
            ):
                with pytest.raises(BackendError) as info:
                    await get(response)
                assert not isinstance(info.value, HttpError)
                got.append(type(info.value.__cause__).__name__)
            server, url = await http_server(lambda: b"")
            server.close()
            await server.wait_closed()
            with pytest.raises(BackendError):  # refused
                await fetch_json(url)
            with pytest.raises(ConfigError):
                await fetch_json("ftp://example.com/")
            return got

        assert len(run(main())) == 7

    def test_a_silent_server_times_out_as_a_backend_error(self) -> None:
        """A server that never answers: BackendError after timeout_ms."""

        async def main() -> None:
            async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await reader.read()

            server = await asyncio.start_server(silent, HOST, 0)
            port = server.sockets[0].getsockname()[1]
            try:
                with pytest.raises(BackendError, match="no answer within 100 ms"):
                    await fetch_json(f"http://{HOST}:{port}/", timeout_ms=100)
            finally:
                server.close()

        run(main())

    def test_an_error_answer_carries_status_and_body(self) -> None:
        """A non-2xx answer raises HttpError with .status and the parsed .body (or None)."""
        error = {"error": "unknown user 'bob'"}
        encoded = json.dumps(error).encode()

        async def main() -> list[tuple[int, Any, str]]:
            got = []
            for response, kwargs in (
                (http_response(encoded, status="404 Not Found"), {}),
                (http_response(encoded, status="403 No", chunked=True), {}),
                (http_response(b"<html>oops</html>", status="500 Oops"), {}),  # not JSON
                (http_response(b"", status="503 Busy"), {}),  # no body
                (http_response(b"[" * 3000, status="400 Bad"), {}),  # nested too deep
                (http_response(encoded, status="404 Not Found"), {"max_error_body": 10}),
                (http_response(encoded, status="404 X", chunked=True), {"max_error_body": 10}),
                (http_response(b'{"error": "a\\u001b[2Jb"}', status="409 Conflict"), {}),
            ):
                server, url = await http_server(lambda r=response: r)  # type: ignore[misc]
                try:
                    with pytest.raises(HttpError) as info:
                        await fetch_json(url, **kwargs)
                finally:
                    server.close()
                assert isinstance(info.value, BackendError)
                assert info.value.url == url
                got.append((info.value.status, info.value.body, str(info.value)))
            return got

        got = run(main())
        assert [(status, body) for status, body, _ in got] == [
            (404, error),
            (403, error),
            (500, None),
            (503, None),
            (400, None),
            (404, None),
            (404, None),
            (409, {"error": "a\x1b[2Jb"}),
        ]
        assert got[0][2].endswith(": HTTP 404 (unknown user 'bob')")
        assert got[2][2].endswith(": HTTP 500")
        assert "\x1b" not in got[7][2] and got[7][2].endswith("(a?[2Jb)")


class TestEndpointFetcher:
    def test_an_ipconf_answer_becomes_ranked_endpoints(self) -> None:
        """The fetcher parses ipconf's JSON shapes into TCP endpoints, in order."""
        doc = {"gateways": [{"id": "g", "endpoints": ["ws://w:80/ws", "tcp://g:3"]}, "h:1"]}

        async def main() -> list[Endpoint]:
            server, url = await http_server(lambda: http_response(json.dumps(doc).encode()))
            try:
                return await endpoint_fetcher(url)()
            finally:
                server.close()

        assert run(main()) == [Endpoint("g", 3), Endpoint("h", 1)]

    def test_no_endpoint_or_no_list_is_a_backend_error(self) -> None:
        """An answer listing no TCP endpoint, or no list at all, raises BackendError."""

        async def main() -> None:
            for body in (b'{"endpoints": []}', b'{"nope": 1}', b'["ws://w:80"]'):
                server, url = await http_server(lambda b=body: http_response(b))  # type: ignore[misc]
                try:
                    with pytest.raises(BackendError):
                        await fetch_endpoints(url)
                finally:
                    server.close()
            with pytest.raises(ConfigError):
                endpoint_fetcher("tcp://h:1")

        run(main())

    def test_a_client_given_the_fetcher_connects_to_the_answer(self) -> None:
        """Client(fetch_endpoints=endpoint_fetcher(url)) connects to what ipconf lists."""

        async def main() -> tuple[Endpoint | None, int]:
            async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await reader.read()

            gateway = await asyncio.start_server(accept, HOST, 0)
            port = gateway.sockets[0].getsockname()[1]
            body = json.dumps({"endpoints": [f"tcp://{HOST}:{port}"]}).encode()
            server, url = await http_server(lambda: http_response(body, chunked=True))
            try:
                fetch = endpoint_fetcher(url)
                async with Client(token="alice", device="d", fetch_endpoints=fetch) as c:
                    await c.wait_for(ClientStatus.LOGGING_IN, timeout=10)
                    return c.endpoint, port
            finally:
                server.close()
                gateway.close()

        endpoint, port = run(main())
        assert endpoint == Endpoint(HOST, port)
