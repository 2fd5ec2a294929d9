"""Tests of imkit.aio.Client's endpoint fetcher: called, cached, ranked, raced, failures typed."""

from __future__ import annotations

import asyncio
import socket
import warnings
from collections.abc import Awaitable, Sequence
from typing import Any

import pytest

from imkit.aio import Client, ClientStatus, Endpoint, EndpointFetcher
from imkit.errors import BackendError, ConfigError, HttpError

pytestmark = [pytest.mark.network, pytest.mark.timeout(30)]

HOST = "127.0.0.1"
GUARD_S = 10  # hang guard for waits on loopback (not a timing assertion)
A = Endpoint(HOST, 1001)
B = Endpoint(HOST, 1002)


def run(coro: Awaitable[Any]) -> Any:
    """Run a coroutine with a hang guard."""

    async def main() -> Any:
        return await asyncio.wait_for(coro, 20)

    return asyncio.run(main())


def refused_port() -> int:
    """A loopback port with no listener (connects are refused)."""
    s = socket.socket()
    s.bind((HOST, 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


class Fetcher:
    """A scripted fetcher: each call pops the next step (an answer, or an exception to raise)."""

    def __init__(self, *steps: object) -> None:
        self.steps = list(steps)
        self.calls = 0

    async def __call__(self) -> Sequence[str | Endpoint]:
        self.calls += 1
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if step == "hang":
            await asyncio.sleep(3600)
        if isinstance(step, BaseException):
            raise step
        return step  # type: ignore[return-value]  # garbage on purpose in some tests


def client(fetch: EndpointFetcher, **kwargs: Any) -> Client:
    return Client(token="alice", device="d", fetch_endpoints=fetch, **kwargs)


class TestFetching:
    def test_the_fetcher_is_called_and_its_answer_cached_for_the_ttl(self) -> None:
        """Strings and Endpoints are accepted in order; a fresh answer is not fetched again."""

        async def main() -> tuple[list[Endpoint], list[Endpoint], int]:
            fetch = Fetcher([f"{HOST}:1001", B, f"tcp://{HOST}:1001"])
            c = client(fetch, endpoint_ttl_ms=60_000)
            first = await c.endpoints()
            second = await c.endpoints()
            return first, second, fetch.calls

        first, second, calls = run(main())
        assert first == second == [A, B]  # the duplicate is dropped
        assert calls == 1

    def test_a_stale_answer_is_fetched_again(self) -> None:
        """With a TTL of 0 every lookup asks the fetcher, and its new ranking is used."""

        async def main() -> tuple[list[Endpoint], list[Endpoint], int]:
            fetch = Fetcher([A, B], [B, A])
            c = client(fetch, endpoint_ttl_ms=0)
            return await c.endpoints(), await c.endpoints(), fetch.calls

        assert run(main()) == ([A, B], [B, A], 2)

    def test_max_endpoints_caps_the_answer(self) -> None:
        """At most max_endpoints of an answer are kept, the first ones."""

        async def main() -> list[Endpoint]:
            fetch = Fetcher([f"{HOST}:{p}" for p in range(1000, 1100)])
            return await client(fetch, max_endpoints=5).endpoints()

        assert [e.port for e in run(main())] == [1000, 1001, 1002, 1003, 1004]


FAILURES: list[tuple[str, object]] = [
    ("backend error", BackendError("ipconf down")),
    ("http error", HttpError("http://ipconf/gateways", 503, None)),
    ("os error", ConnectionRefusedError("refused")),
    ("a fetcher's bug", ValueError("bug in the fetcher")),
    ("hang", "hang"),
    ("a string, not a list", f"{HOST}:1001"),
    ("empty list", []),
    ("unparsable entry", [f"{HOST}:1001", "garbage"]),
    ("browser endpoint", ["ws://gw:80/ws"]),
    ("wrong type of entry", [1001]),
    ("not a sequence", {"endpoints": [f"{HOST}:1001"]}),
    ("None", None),
]


class TestFailures:
    @pytest.mark.parametrize(("name", "failure"), FAILURES, ids=[n for n, _ in FAILURES])
    def test_a_failed_fetch_falls_back_to_the_cached_list(self, name: str, failure: object) -> None:
        """Any failure or bad answer is a BackendError in last_error; the cached list is used."""

        async def main() -> tuple[list[Endpoint], BaseException | None, int]:
            fetch = Fetcher([A, B], failure)
            c = client(fetch, endpoint_ttl_ms=0, fetch_timeout_ms=50)
            assert await c.endpoints() == [A, B]
            got = await c.endpoints()
            return got, c.last_error, c.fetch_failures

        got, error, failures = run(main())
        assert got == [A, B]
        assert isinstance(error, BackendError), error
        assert failures == 1

    @pytest.mark.parametrize(("name", "failure"), FAILURES, ids=[n for n, _ in FAILURES])
    def test_without_a_cache_the_failure_is_a_backend_error(
        self, name: str, failure: object
    ) -> None:
        """With no cached answer and no static list, endpoints() raises BackendError."""

        async def main() -> None:
            c = client(Fetcher(failure), fetch_timeout_ms=50)
            with pytest.raises(BackendError):
                await c.endpoints()

        run(main())

    def test_the_static_list_is_the_fallback_before_any_answer(self) -> None:
        """A fetcher that never answered leaves the static list in use."""

        async def main() -> list[Endpoint]:
            c = client(Fetcher(BackendError("down")), endpoints=[B])
            return await c.endpoints()

        assert run(main()) == [B]

    def test_a_client_whose_fetch_fails_keeps_retrying(self) -> None:
        """The connection loop survives a failing fetcher: BACKOFF, then another fetch."""

        async def main() -> tuple[BaseException | None, int]:
            fetch = Fetcher(ValueError("bug"))
            async with client(fetch) as c:
                await c.wait_for(ClientStatus.BACKOFF, timeout=GUARD_S)
                c.reconnect_now()
                await c.wait_for(ClientStatus.CONNECTING, timeout=GUARD_S)
                await c.wait_for(ClientStatus.BACKOFF, timeout=GUARD_S)
                return c.last_error, fetch.calls

        error, calls = run(main())
        assert isinstance(error, BackendError) and isinstance(error.__cause__, ValueError)
        assert calls >= 2


class TestRacing:
    def test_the_fetched_list_is_raced_and_failures_demoted(self) -> None:
        """A refused first endpoint loses to the second; it is then ranked last."""

        async def main() -> tuple[Endpoint | None, list[Endpoint], Endpoint, Endpoint]:
            async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await reader.read()  # accept the Login, never answer

            listener = await asyncio.start_server(accept, HOST, 0)
            live = Endpoint(HOST, listener.sockets[0].getsockname()[1])
            dead = Endpoint(HOST, refused_port())
            try:
                fetch = Fetcher([str(dead), live])
                async with client(fetch, race_delay_ms=5_000) as c:
                    await c.wait_for(ClientStatus.LOGGING_IN, timeout=GUARD_S)
                    return c.endpoint, await c.endpoints(), live, dead
            finally:
                listener.close()

        endpoint, order, live, dead = run(main())
        assert endpoint == live  # reached without waiting out the race delay
        assert order == [live, dead]


class TestConfig:
    def test_bad_keywords_are_config_errors(self) -> None:
        """Wrong types and values of the Client's keywords raise ConfigError, never TypeError."""
        fetch = Fetcher([A])
        for kwargs in (
            {"race_delay_ms": "250"},
            {"max_racing": None},
            {"fetch_timeout_ms": 0},
            {"max_endpoints": 0},
            {"endpoint_ttl_ms": -1},
            {"demote_ms": "1"},
        ):
            with pytest.raises(ConfigError):
                client(fetch, **kwargs)
        with pytest.raises(ConfigError):  # the old ipconf_url habit: a URL is not a fetcher
            Client(token="a", device="d", fetch_endpoints="http://ipconf/gateways")  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            Client(token="a", device="d", endpoints=f"{HOST}:1001")
        with pytest.raises(ConfigError):
            Client(token="a", device="d")

    def test_an_endpoint_with_non_ascii_digits_is_a_config_error(self) -> None:
        """Endpoint.parse refuses a port of non-ASCII digits with ConfigError (not ValueError)."""
        for text in ("h:²", "h:١٢", "h:1_000"):
            with pytest.raises(ConfigError):
                Endpoint.parse(text)


class TestAclose:
    def test_aclose_closes_and_close_is_a_deprecated_alias(self) -> None:
        """aclose() ends the client; close() still works but warns DeprecationWarning."""

        async def main() -> tuple[ClientStatus, ClientStatus, list[str]]:
            first = client(Fetcher([A]))
            await first.start()
            await first.aclose()
            second = client(Fetcher([A]))
            await second.start()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                await second.close()
            return first.state, second.state, [str(w.category.__name__) for w in caught]

        first, second, caught = run(main())
        assert first is second is ClientStatus.CLOSED
        assert caught == ["DeprecationWarning"]

