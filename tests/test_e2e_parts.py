"""Tests of the reference system's parts on their own: tokens, ipconf placement, HTTP limits,
sync budgets, 1:1 conversation ids, admin commands."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from examples.auth import Authenticator
from examples.cluster import admin
from examples.httpd import Request, Response, json_response, serve_http
from examples.ipconf import IpConf
from examples.logic import FanoutTicket, Logic, LogicConfig, parse_direct
from examples.routes import RouteService
from hypothesis import given, settings
from hypothesis import strategies as st

from imkit.aio import InlineStore, MemoryBus, MemoryRegistry
from imkit.discovery import GatewayInfo
from imkit.errors import AuthError, ConfigError, UserNotFound
from imkit.hashring import HashRing
from imkit.protocol import DEFAULT_MAX_FRAME_SIZE, SyncResponse, encode
from imkit.store import MemoryStore, direct_conv_id

T = TypeVar("T")
SECRET = b"k" * 32

ids = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40).filter(
    lambda s: len(s.encode()) <= 128
)


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), 20)

    return asyncio.run(bounded())


class TestTokens:
    @given(uid=ids, device=ids)
    @settings(max_examples=100)
    def test_a_token_verifies_for_its_user_and_device(self, uid: str, device: str) -> None:
        """Any uid and device round-trip through issue and verify."""
        auth = Authenticator(SECRET, clock=lambda: 1000.0)
        assert auth.verify(auth.issue(uid, device), device) == uid

    @given(position=st.integers(min_value=0), char=st.sampled_from("AZaz09-_."))
    @settings(max_examples=200)
    def test_any_changed_character_is_refused(self, position: int, char: str) -> None:
        """Changing one character of a token anywhere makes it fail (forgery)."""
        auth = Authenticator(SECRET, clock=lambda: 1000.0)
        token = auth.issue("alice", "phone")
        i = position % len(token)
        forged = token[:i] + char + token[i + 1 :]
        if forged == token:
            return
        with pytest.raises(AuthError):
            auth.verify(forged, "phone")

    def test_expired_foreign_and_other_secret_tokens_are_refused(self) -> None:
        """Past its expiry, on another device, or signed with another key: AuthError."""
        now = [1000.0]
        auth = Authenticator(SECRET, ttl_s=60, clock=lambda: now[0])
        token = auth.issue("alice", "phone")
        assert auth.verify(token, "phone") == "alice"
        assert auth.verify(token, "phone") == "alice"  # a replay within expiry is fine
        with pytest.raises(AuthError, match="another device"):
            auth.verify(token, "laptop")
        with pytest.raises(AuthError, match="signature"):
            Authenticator(b"z" * 32, clock=lambda: 1000.0).verify(token, "phone")
        now[0] = 1060.0
        with pytest.raises(AuthError, match="expired"):
            auth.verify(token, "phone")

    @given(garbage=st.text(max_size=300))
    @settings(max_examples=100)
    def test_garbage_is_refused_with_auth_error_only(self, garbage: str) -> None:
        """Arbitrary strings raise AuthError, never anything else."""
        with pytest.raises(AuthError):
            Authenticator(SECRET).verify(garbage, "phone")

    def test_a_short_secret_is_a_config_error(self) -> None:
        """Secrets under 16 bytes are refused."""
        with pytest.raises(ConfigError):
            Authenticator(b"short")


class TestDirectIds:
    @given(a=ids, b=ids)
    @settings(max_examples=100)
    def test_parse_direct_inverts_direct_conv_id(self, a: str, b: str) -> None:
        """parse_direct(direct_conv_id(a, b)) gives the two users back, smaller first."""
        if a == b:
            return
        assert parse_direct(direct_conv_id(a, b)) == tuple(sorted((a, b)))

    @pytest.mark.parametrize("conv", ["lobby", "dm:", "dm:x:a:b", "dm:3:al:bob", "dm:1:b:a"])
    def test_other_ids_are_not_direct(self, conv: str) -> None:
        """Group names and malformed or non-canonical dm ids are not 1:1 conversations."""
        assert parse_direct(conv) is None


class TestIpConfPlacement:
    def _ipconf(self, loads: dict[str, int], draining: frozenset[str] = frozenset()) -> IpConf:
        registry = MemoryRegistry(clock=lambda: 0)
        for gid, connections in loads.items():
            info = GatewayInfo(
                id=gid, endpoints=(f"tcp://10.0.0.{len(gid)}:7000",), draining=gid in draining
            )
            registry.table.register(info, 0)
            registry.table.heartbeat(gid, 0, connections=connections)
        return IpConf(registry=registry)

    def test_an_overloaded_gateway_is_never_anyones_home(self) -> None:
        """With loads 300/0/0 and balance 1.25, the bounded placement never picks gw-a first."""
        ipconf = self._ipconf({"gw-a": 300, "gw-b": 0, "gw-c": 0})

        async def main() -> list[str]:
            return [(await ipconf.rank(f"user{i}"))[0].id for i in range(300)]

        homes = run(main)
        assert "gw-a" not in homes
        assert set(homes) == {"gw-b", "gw-c"}

    def test_with_even_loads_the_home_is_the_ring_owner(self) -> None:
        """Equal loads: each user's first gateway is its consistent-hash owner, every time."""
        ipconf = self._ipconf({"gw-a": 5, "gw-b": 5, "gw-c": 5})
        ring = HashRing()
        for gid in ("gw-a", "gw-b", "gw-c"):
            ring.add(gid)

        async def main() -> list[tuple[str, str]]:
            out = []
            for i in range(100):
                uid = f"user{i}"
                first = (await ipconf.rank(uid))[0].id
                again = (await ipconf.rank(uid))[0].id
                assert first == again
                out.append((first, ring.get(uid)))
            return out

        for home, owner in run(main):
            assert home == owner

    def test_a_draining_gateway_is_listed_last(self) -> None:
        """A draining gateway is never first and still listed (for clients with no choice)."""
        ipconf = self._ipconf({"gw-a": 0, "gw-b": 0}, draining=frozenset({"gw-a"}))

        async def main() -> list[list[str]]:
            return [[g.id for g in await ipconf.rank(f"u{i}")] for i in range(50)]

        for order in run(main):
            assert order == ["gw-b", "gw-a"]


class TestHttp:
    async def _exchange(self, data: bytes, **kwargs: Any) -> bytes:
        async def handler(request: Request) -> Response:
            if request.path == "/boom":
                raise RuntimeError("secret detail")
            return json_response({"path": request.path, "q": request.query})

        server = await serve_http(handler, "127.0.0.1", 0, **kwargs)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(data)
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return answer
        finally:
            await server.aclose()

    def test_a_get_is_answered(self) -> None:
        """A plain GET gets its JSON answer."""
        answer = run(lambda: self._exchange(b"GET /x?a=1 HTTP/1.1\r\nHost: h\r\n\r\n"))
        assert answer.startswith(b"HTTP/1.1 200 OK")
        assert answer.endswith(b'{"path":"/x","q":{"a":"1"}}')

    @pytest.mark.parametrize(
        ("data", "status"),
        [
            (b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", b"431"),
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 999999\r\n\r\n", b"413"),
            (b"PUT / HTTP/1.1\r\nHost: h\r\n\r\n", b"405"),
            (b"GARBAGE\r\n\r\n", b"400"),
            (b"GET /boom HTTP/1.1\r\nHost: h\r\n\r\n", b"500"),
        ],
    )
    def test_bad_requests_get_a_bare_error(self, data: bytes, status: bytes) -> None:
        """Oversized heads and bodies, bad methods and failing handlers: a status, no details."""
        answer = run(lambda: self._exchange(data))
        assert answer.split(b" ")[1] == status
        assert b"secret detail" not in answer

    def test_a_slow_request_is_cut(self) -> None:
        """A request that does not arrive whole within the timeout gets 408."""
        answer = run(lambda: self._exchange(b"GET / HTTP/1.1\r\n", timeout_ms=100))
        assert answer.split(b" ")[1] == b"408"


class TestSyncBudget:
    def test_a_sync_answer_stays_under_the_frame_limit(self) -> None:
        """Big messages: the page is cut with more=True, other convs come empty with more=True."""

        async def main() -> SyncResponse:
            store = MemoryStore()
            for uid in ("alice", "bob"):
                store.create_user(uid)
            store.create_group("g1", ["alice", "bob"])
            store.create_group("g2", ["alice", "bob"])
            for i in range(100):
                store.append("g1", "bob", i + 1, b"x" * 4000, wall_ms=1)
            store.append("g2", "bob", 1, b"y" * 4000, wall_ms=1)
            routes = RouteService()
            logic = Logic(
                store=InlineStore(store), routes=routes, bus=MemoryBus(), config=LogicConfig()
            )
            pages = await logic.sync("alice", "phone", (("g1", 0), ("g2", 0)), 100)
            await logic.aclose()
            routes.close()
            return SyncResponse(req_id=1, pages=tuple(pages))

        response = run(main)
        g1, g2 = response.pages
        assert 0 < len(g1.messages) < 100 and g1.more
        assert g1.messages[0].seq == 1  # never skips: starts right after the cursor
        assert g2.messages == () and g2.more
        assert len(encode(response)) <= DEFAULT_MAX_FRAME_SIZE + 8


class TestFanoutTicket:
    def test_done_runs_once_when_every_gateway_finished_or_on_timeout(self) -> None:
        """on_done fires after the last finish, once; finish_all fires it early, once."""
        calls: list[int] = []
        ticket = FanoutTicket(2, lambda: calls.append(1))
        ticket.finish()
        assert calls == []
        ticket.finish()
        ticket.finish_all()
        assert calls == [1]
        early = FanoutTicket(3, lambda: calls.append(2))
        early.finish_all()
        early.finish()
        assert calls == [1, 2]


class TestAdmin:
    def test_admin_commands_manage_users_and_groups(self) -> None:
        """create-user, create-group, join, leave, members, conversations, inbox."""
        store = InlineStore(MemoryStore())
        assert asyncio.run(admin(store, "create-user", ["a", "b", "c"])) == {
            "a": True,
            "b": True,
            "c": True,
        }
        assert asyncio.run(admin(store, "create-group", ["g", "a", "b"])) == {"created": True}
        assert asyncio.run(admin(store, "join", ["g", "c"])) == {"c": True}
        assert asyncio.run(admin(store, "leave", ["g", "a"])) == {"a": True}
        assert asyncio.run(admin(store, "members", ["g"])) == ["b", "c"]
        assert asyncio.run(admin(store, "conversations", ["c"])) == ["g"]
        assert asyncio.run(admin(store, "inbox", ["c"])) == []
        with pytest.raises(ValueError, match="unknown command"):
            asyncio.run(admin(store, "drop-everything", []))
        with pytest.raises(UserNotFound):
            asyncio.run(admin(store, "join", ["g", "nobody"]))
