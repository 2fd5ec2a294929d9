"""The HTTP edge: h11 parsing and limits, slowloris budgets, dev-mode gates, wildcard hosts.

Real sockets on loopback against :func:`examples.httpd.serve_http`, ipconf and the
launcher's gateways. Limits are scaled down through their keywords so that a
flood of a few hundred sockets shows what 1,100 would against the defaults.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest
from examples.cluster import ClusterConfig, _banner, _run_parser, config_from_args, start_cluster
from examples.httpd import (
    FORWARDING_HEADERS,
    HttpServer,
    RateLimitedLog,
    Request,
    Response,
    is_direct_local,
    json_response,
    serve_http,
)
from examples.ipconf import IpConf
from hypothesis import given, settings
from hypothesis import strategies as st

from imkit.aio import MemoryRegistry
from imkit.discovery import GatewayInfo
from imkit.errors import ConfigError
from tests.test_e2e import run

pytestmark = [pytest.mark.network, pytest.mark.timeout(90)]


async def _echo(request: Request) -> Response:
    if request.path == "/boom":
        raise RuntimeError("secret detail")
    return json_response({"path": request.path, "q": request.query, "body": request.body.decode()})


async def _exchange(
    port: int, data: bytes, *, pause_s: float = 0.0, per_byte: bool = False
) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if per_byte:
            for i in range(len(data)):
                writer.write(data[i : i + 1])
                await writer.drain()
        else:
            writer.write(data)
        if pause_s:
            await asyncio.sleep(pause_s)
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        return b""
    finally:
        writer.close()


def _with_server(
    body: Callable[[HttpServer], Awaitable[Any]], handler: Any = _echo, **kwargs: Any
) -> Any:
    async def main() -> Any:
        server = await serve_http(handler, "127.0.0.1", 0, **kwargs)
        try:
            return await body(server)
        finally:
            await server.aclose()

    return run(main)


def _status(answer: bytes) -> int:
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


GET = b"GET /x?a=1 HTTP/1.1\r\nHost: h\r\n\r\n"


class _Collect(logging.Handler):
    """Keeps the ERROR records it sees."""

    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


class TestParsing:
    @pytest.mark.parametrize("mode", ["whole", "byte by byte", "with trailing bytes"])
    def test_a_get_is_answered_however_it_is_sliced(self, mode: str) -> None:
        """A GET whole, one byte at a time, or followed by garbage gets the same answer."""
        data = GET + (b"\x00garbage" if mode == "with trailing bytes" else b"")
        answer = _with_server(lambda s: _exchange(s.port, data, per_byte=mode == "byte by byte"))
        assert answer.startswith(b"HTTP/1.1 200 OK")
        assert answer.endswith(b'{"path":"/x","q":{"a":"1"},"body":""}')

    @pytest.mark.parametrize(
        ("data", "status"),
        [
            (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", 431),
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 999999\r\n\r\n", 413),
            (b"PUT / HTTP/1.1\r\nHost: h\r\n\r\n", 405),
            (b"GARBAGE\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host (RFC 9112, 3.2)
            (b"GET /boom HTTP/1.1\r\nHost: h\r\n\r\n", 500),
            # request smuggling: two lengths, or a length and chunked
            (
                b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                400,
            ),
            (b"GET / HTTP/1.1\r\nHost: h\r\nBad Header: x\r\n\r\n", 400),
        ],
    )
    def test_bad_requests_get_a_bare_status(self, data: bytes, status: int) -> None:
        """Oversized, malformed, smuggling and failing requests: a status, no details."""
        answer = _with_server(lambda s: _exchange(s.port, data))
        assert _status(answer) == status, answer[:100]
        assert b"secret detail" not in answer

    def test_a_chunked_body_is_read_within_the_body_limit(self) -> None:
        """A chunked POST body is reassembled; one past max_body gets 413."""
        chunked = b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        ok = chunked + b"3\r\nabc\r\n0\r\n\r\n"
        big = (
            b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"20\r\n" + b"x" * 32 + b"\r\n0\r\n\r\n"
        )

        async def body(server: HttpServer) -> tuple[bytes, bytes]:
            return await _exchange(server.port, ok), await _exchange(server.port, big)

        small, large = _with_server(body, max_body=16)
        assert small.endswith(b'"body":"abc"}')
        assert _status(large) == 413

    def test_expect_100_continue_gets_a_100_then_the_answer(self) -> None:
        """A client waiting for 100 Continue is told to go on (curl waits 1 s otherwise)."""

        async def body(server: HttpServer) -> tuple[bytes, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                b"POST /p HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
            )
            first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(b"hi")
            rest = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return first, rest

        first, rest = _with_server(body)
        assert first.startswith(b"HTTP/1.1 100")
        assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b'"body":"hi"}')

    def test_head_gets_the_headers_only(self) -> None:
        """HEAD: the GET's Content-Length, no body."""
        answer = _with_server(lambda s: _exchange(s.port, b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\n"))
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: " in head
        assert rest == b""

    def test_repeated_headers_are_joined(self) -> None:
        """A header sent twice reaches the handler joined with ', ' (RFC 9110, 5.3)."""
        seen: list[Request] = []

        async def handler(request: Request) -> Response:
            seen.append(request)
            return Response(status=204)

        data = b"GET / HTTP/1.1\r\nHost: h\r\nConnection: a\r\nConnection: Upgrade\r\n\r\n"
        _with_server(lambda s: _exchange(s.port, data), handler=handler)
        assert seen[0].headers["connection"] == "a, Upgrade"
        assert seen[0].header_tokens("connection") == ["a", "upgrade"]

    @settings(max_examples=40, deadline=None)
    @given(st.binary(max_size=300))
    def test_garbage_gets_a_status_or_a_close_and_logs_no_traceback(self, data: bytes) -> None:
        """Any bytes: an HTTP status line or nothing; the server never fails."""
        failures: list[logging.LogRecord] = []
        handler = _Collect(failures)
        logging.getLogger().addHandler(handler)
        try:
            answer = _with_server(
                lambda s: _exchange(s.port, b"GET / HTTP/1.1\r\nHost: h\r\n" + data), timeout_ms=300
            )
        finally:
            logging.getLogger().removeHandler(handler)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 ")
        assert not failures


class TestDeadlines:
    def test_a_slow_head_is_cut_at_the_head_deadline(self) -> None:
        """An incomplete head gets 408 at head_timeout_ms, long before timeout_ms."""
        answer = _with_server(
            lambda s: _exchange(s.port, b"GET / HTTP/1.1\r\n"), head_timeout_ms=200
        )
        assert _status(answer) == 408

    def test_a_body_may_take_longer_than_the_head_deadline(self) -> None:
        """Once the head is complete, the body has until timeout_ms."""

        async def body(server: HttpServer) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n")
            await asyncio.sleep(0.5)
            writer.write(b"ok")
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return answer

        answer = _with_server(body, head_timeout_ms=200, timeout_ms=5_000)
        assert answer.endswith(b'"body":"ok"}')

    def test_limits_are_checked(self) -> None:
        """A zero budget or deadline is a ConfigError."""
        with pytest.raises(ConfigError):
            HttpServer(_echo, max_pending=0)
        with pytest.raises(ConfigError):
            HttpServer(_echo, max_per_peer=0)
        with pytest.raises(ConfigError):
            HttpServer(_echo, head_timeout_ms=0)


class _Slowloris:
    """``n`` connections that send a head's start, then one byte every ``drip_s``."""

    def __init__(self, port: int, n: int, drip_s: float = 0.5) -> None:
        self.port = port
        self.n = n
        self.drip_s = drip_s
        self.writers: list[asyncio.StreamWriter] = []
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        for _ in range(self.n):
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.write(b"GET /slow HTTP/1.1\r\nHost: h\r\nX-a: ")
            self.writers.append(writer)
        self._task = asyncio.get_running_loop().create_task(self._drip())

    async def _drip(self) -> None:
        while True:
            await asyncio.sleep(self.drip_s)
            for writer in self.writers:
                if not writer.is_closing():
                    writer.write(b"a")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for writer in self.writers:
            writer.transport.abort()


async def _prompt_get(port: int, bound_s: float) -> tuple[float, int]:
    """Seconds until GET /healthz is answered 200 (retrying refusals), and the attempts."""
    start = time.monotonic()
    attempts = 0
    while time.monotonic() - start < bound_s:
        attempts += 1
        answer = await _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
        if answer.startswith(b"HTTP/1.1 200"):
            return time.monotonic() - start, attempts
        await asyncio.sleep(0.01)
    return float("inf"), attempts


class TestSlowloris:
    #: Deadlines far beyond the test: only the budgets can make room.
    LONG: ClassVar[dict[str, int]] = {"timeout_ms": 60_000, "head_timeout_ms": 60_000}

    def test_a_prompt_request_is_answered_during_a_flood(self) -> None:
        """300 slowloris sockets from one address; a prompt GET from it is still answered."""

        async def body(server: HttpServer) -> tuple[float, int, int, int]:
            flood = _Slowloris(server.port, 300)
            await flood.open()
            try:
                await asyncio.sleep(0.3)
                server._check()
                took, attempts = await _prompt_get(server.port, bound_s=10)
                held = server.connections_of("127.0.0.1")
                server._check()
            finally:
                flood.close()
            print(f"\nprompt GET during 300 slowloris: {took:.3f} s, {attempts} attempt(s)")
            return took, held, server.pending, server.evicted

        took, held, pending, evicted = _with_server(
            body, max_connections=100, max_pending=40, max_per_peer=60, **self.LONG
        )
        assert took < 10, "the prompt request was never answered"
        assert held <= 60 and pending <= 40
        assert evicted >= 240  # 300 - 60 slow connections had to go

    def test_one_address_holds_at_most_its_cap(self) -> None:
        """30 slow connections from one address: it keeps at most max_per_peer of them."""

        async def body(server: HttpServer) -> tuple[int, int]:
            flood = _Slowloris(server.port, 30)
            await flood.open()
            await asyncio.sleep(0.3)
            held = server.connections_of("127.0.0.1")
            server._check()
            flood.close()
            return held, server.evicted

        held, evicted = _with_server(body, max_per_peer=10, **self.LONG)
        assert held == 10 and evicted == 20

    def test_loopback_can_be_exempted_from_the_per_address_cap(self) -> None:
        """exempt_loopback=True (a local reverse proxy): the per-address cap does not apply."""

        async def body(server: HttpServer) -> int:
            flood = _Slowloris(server.port, 30)
            await flood.open()
            await asyncio.sleep(0.3)
            held = server.connections_of("127.0.0.1")
            flood.close()
            return held

        assert _with_server(body, max_per_peer=10, exempt_loopback=True, **self.LONG) == 30

    def test_when_every_slot_is_answering_a_new_connection_is_refused(self) -> None:
        """No pending connection to evict: the new one is closed at once, then served later."""
        gate = asyncio.Event()

        async def slow(request: Request) -> Response:
            await gate.wait()
            return Response(status=204)

        async def body(server: HttpServer) -> tuple[bytes, int, bytes]:
            busy = [
                asyncio.ensure_future(_exchange(server.port, GET)) for _ in range(3)
            ]
            while server.active < 3 or server.pending:
                await asyncio.sleep(0.01)
            refused = await _exchange(server.port, GET)
            gate.set()
            await asyncio.gather(*busy)
            later = await _exchange(server.port, GET)
            return refused, server.refused, later

        refused, count, later = _with_server(body, handler=slow, max_connections=3)
        assert refused == b"" and count == 1
        assert later.startswith(b"HTTP/1.1 204")


# -- development endpoints ---------------------------------------------------------------------


async def _get(url_port: int, path: str, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return await _exchange(url_port, f"GET {path} HTTP/1.1\r\nHost: h\r\n{extra}\r\n".encode())


async def _post_admin(port: int, headers: dict[str, str] | None = None) -> bytes:
    body = b'{"op": "members", "args": ["team"]}'
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = f"POST /admin HTTP/1.1\r\nHost: h\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return await _exchange(port, head.encode() + body)


def _dev_answers(dev: bool, headers: dict[str, str] | None = None) -> tuple[int, int, int]:
    """Statuses of ipconf's /dev/token, the gateway's /dev/token, and /admin."""

    async def main() -> tuple[int, int, int]:
        cluster = await start_cluster(ClusterConfig(demo=True, dev=dev))
        try:
            web = int(cluster.gateways[0].web_url.rstrip("/").rsplit(":", 1)[1])
            token = "/dev/token?uid=alice&device=cli"
            return (
                _status(await _get(cluster.ipconf_port, token, headers)),
                _status(await _get(web, token, headers)),
                _status(await _post_admin(cluster.ipconf_port, headers)),
            )
        finally:
            await cluster.stop()

    return run(main)


FORWARDED = {
    "forwarded": "for=203.0.113.9",
    "via": "1.1 proxy",
    "x-forwarded-for": "203.0.113.9",
    "x-forwarded-host": "chat.example.com",
    "x-forwarded-proto": "https",
    "x-real-ip": "203.0.113.9",
}


class TestDevMode:
    def test_dev_endpoints_are_off_by_default(self) -> None:
        """ClusterConfig() serves no /dev/token and no /admin, even to loopback."""
        assert ClusterConfig().dev is False
        assert _dev_answers(dev=False) == (403, 403, 403)

    def test_dev_mode_answers_a_direct_local_request(self) -> None:
        """dev=True: a direct request from loopback gets its token and its admin answer."""
        assert _dev_answers(dev=True) == (200, 200, 200)

    @pytest.mark.parametrize("header", sorted(FORWARDED))
    def test_a_forwarded_request_is_refused_even_in_dev_mode(self, header: str) -> None:
        """Through a proxy on the same host (a forwarding header): 403 everywhere."""
        assert header in FORWARDING_HEADERS
        assert _dev_answers(True, {header: FORWARDED[header]}) == (403, 403, 403)

    def test_is_direct_local(self) -> None:
        """Loopback without forwarding headers only."""

        def req(peer: str, **headers: str) -> Request:
            return Request(method="GET", path="/", query={}, headers=headers, peer=peer)

        assert is_direct_local(req("127.0.0.1")) and is_direct_local(req("::1"))
        assert not is_direct_local(req("10.0.0.1"))
        assert not is_direct_local(req("127.0.0.1", via="1.1 nginx"))

    def test_the_command_line_asks_for_dev_mode_explicitly(self) -> None:
        """No flag: dev off; --dev: on; --no-dev still accepted; both: an error."""
        parse = _run_parser().parse_args
        assert config_from_args(parse([])).dev is False
        assert config_from_args(parse(["--no-dev"])).dev is False
        assert config_from_args(parse(["--dev"])).dev is True
        with pytest.raises(SystemExit):
            parse(["--dev", "--no-dev"])

    @pytest.mark.parametrize("dev", [False, True])
    def test_the_banner_never_prints_the_secret_and_warns_in_dev_mode(
        self, dev: bool, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The secret stays out of the banner; dev mode logs and prints a WARNING first."""

        async def main() -> tuple[str, str]:
            cluster = await start_cluster(ClusterConfig(demo=True, dev=dev))
            try:
                return _banner(cluster), cluster.secret.hex()
            finally:
                await cluster.stop()

        with caplog.at_level(logging.WARNING, logger="examples.cluster"):
            banner, secret = run(main)
        assert secret not in banner
        warned = [r for r in caplog.records if "development mode" in r.getMessage()]
        assert bool(warned) is dev
        assert banner.startswith("WARNING: development mode") is dev
        assert ("/dev/token?uid=alice" in banner) is dev


# -- a wildcard listen address -------------------------------------------------------------------


def _gateways_answer(
    endpoints: tuple[str, ...], host_header: str, local: str = "10.0.0.2"
) -> tuple[dict[str, Any], list[str]]:
    async def main() -> tuple[dict[str, Any], list[str]]:
        registry = MemoryRegistry()
        await registry.register(GatewayInfo(id="gw-1", endpoints=endpoints))
        ipconf = IpConf(registry=registry)
        answers = []
        for _ in range(2):
            request = Request(
                method="GET",
                path="/gateways",
                query={"uid": "alice"},
                headers={"host": host_header} if host_header else {},
                peer="198.51.100.1",
                local=local,
            )
            answers.append((await ipconf.handle(request)).body)
        import json

        doc = json.loads(answers[0])
        assert answers[1] == answers[0]
        return doc, sorted(ipconf._warned)

    return run(main)


WILDCARD = ("tcp://0.0.0.0:7710", "ws://0.0.0.0:7780/ws")


class TestWildcardHost:
    def test_a_wildcard_endpoint_gets_the_host_the_client_used(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """tcp://0.0.0.0 becomes the client's Host; one warning names --public-host."""
        with caplog.at_level(logging.WARNING, logger="examples.ipconf"):
            doc, warned = _gateways_answer(WILDCARD, "chat.example.com:7700")
        assert doc["endpoints"] == ["tcp://chat.example.com:7710"]
        assert doc["ws"] == ["ws://chat.example.com:7780/ws"]
        lines = [r.getMessage() for r in caplog.records if "--public-host" in r.getMessage()]
        assert len(lines) == 1 and warned == ["gw-1"]

    @pytest.mark.parametrize(
        ("endpoints", "host", "expected"),
        [
            (("tcp://:::7710",), "[2001:db8::1]:7700", "tcp://[2001:db8::1]:7710"),
            (("tcp://[::]:7710",), "203.0.113.7", "tcp://203.0.113.7:7710"),
            (("tcp://0.0.0.0:7710",), "bad/host:7700", "tcp://10.0.0.2:7710"),  # local address
            (("tcp://0.0.0.0:7710",), "", "tcp://10.0.0.2:7710"),
            (("tcp://0.0.0.0:7710",), "0.0.0.0:7700", "tcp://10.0.0.2:7710"),
            (("tcp://10.1.1.1:7710",), "other:7700", "tcp://10.1.1.1:7710"),  # not a wildcard
        ],
    )
    def test_which_host_is_advertised(
        self, endpoints: tuple[str, ...], host: str, expected: str
    ) -> None:
        """IPv6 hosts keep their brackets; a bad or missing Host falls back to the local address."""
        doc, _ = _gateways_answer(endpoints, host)
        assert doc["endpoints"] == [expected]


class TestRateLimitedLog:
    def test_one_line_per_cause_per_interval_then_a_count(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Within the interval a cause is held back; the next line counts what was held."""
        now = [0.0]
        log = RateLimitedLog(logging.getLogger("t"), interval_ms=1000, clock=lambda: now[0])
        with caplog.at_level(logging.WARNING, logger="t"):
            assert log.note("a", "first")
            assert not log.note("a", "again")
            assert not log.note("a", "again")
            assert log.note("b", "other cause")
            now[0] = 1.5
            assert log.note("a", "later")
        assert [r.getMessage() for r in caplog.records] == [
            "first",
            "other cause",
            "later (2 more like it since the last line)",
        ]
