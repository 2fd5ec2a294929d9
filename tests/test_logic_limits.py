"""Tests of the logic server's limits against hostile but logged-in clients (issue 8):
sync work is bounded by a per-device budget, repeated receipts cost nothing, and
per-device sync cursors survive a restart of an SQLite-backed cluster."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from examples.cluster import ClusterConfig, start_cluster
from examples.gateway import GatewayConfig
from examples.logic import Deliver, Logic, LogicConfig
from examples.probe import RawClient
from examples.routes import RouteService

from imkit.aio import Client, MemoryBus, async_store
from imkit.bus import Envelope
from imkit.policy import Backoff
from imkit.protocol import (
    ErrorCode,
    Kick,
    Ping,
    Pong,
    Push,
    PushAck,
    PushBatch,
    Send,
    SendAck,
    SyncRequest,
    SyncResponse,
)
from imkit.routetable import Route
from imkit.session import ClientConfig, ServerConfig
from imkit.store import (
    AsyncMessageStore,
    MemoryStore,
    MessageStore,
    SqliteStore,
    direct_conv_id,
)

T = TypeVar("T")

FAST_SERVER = ServerConfig(reconnect_min_ms=10, reconnect_max_ms=50)
FAST_CLIENT: dict[str, Any] = {"reconnect": Backoff(base_ms=10, cap_ms=50)}


def run(main: Callable[[], Coroutine[Any, Any, T]], timeout_s: float = 30.0) -> T:
    """Run ``main()`` on a fresh event loop, bounded by ``timeout_s``."""

    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout_s)

    return asyncio.run(bounded())


class CountingStore:
    """Wraps a store and counts every method call by name (the work the logic asks for)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.calls: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr
        calls = self.calls

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return attr(*args, **kwargs)

        return counted


def _seed(store: MessageStore, members: int = 3, messages: int = 3) -> list[str]:
    uids = [f"u{i}" for i in range(members)]
    for uid in uids:
        store.create_user(uid)
    store.create_group("g", uids)
    store.create_group("h", uids)
    for i in range(messages):
        store.append("g", uids[0], i, b"x", wall_ms=1)
        store.append("h", uids[0], i, b"y", wall_ms=1)
    return uids


def _logic(store: MessageStore, config: LogicConfig | None = None) -> tuple[Logic, CountingStore]:
    counting = CountingStore(async_store(store))  # SQLite on a worker thread, memory inline
    logic = Logic(
        store=cast(AsyncMessageStore, counting),
        routes=RouteService(grace_ms=1000),
        bus=MemoryBus(),
        config=config,
    )
    return logic, counting


class TestSyncWork:
    def test_one_sync_makes_a_bounded_number_of_store_calls(self) -> None:
        """A sync listing one conversation 1000 times costs a few store calls, not thousands."""

        async def main() -> tuple[int, list[tuple[str, int, bool]]]:
            store = SqliteStore(":memory:")
            _seed(store)
            logic, counting = _logic(store)  # the SQLite store on its worker thread
            pages = await logic.sync("u1", "d", [("g", 3)] * 1000, 100)
            await logic.aclose()
            await logic.store.aclose()
            return counting.total, [(p.conv, len(p.messages), p.more) for p in pages]

        calls, pages = run(main)
        assert pages == [("g", 0, False)]  # one page per conversation listed
        assert calls <= 4

    def test_duplicates_start_at_the_lowest_cursor(self) -> None:
        """Listed twice with two cursors, a conversation's page starts after the lower one."""

        async def main() -> list[list[int]]:
            store = MemoryStore()
            logic, _counting = _logic(store)
            _seed(store)
            pages = await logic.sync("u1", "d", [("g", 2), ("h", 3), ("g", 0)], 100)
            await logic.aclose()
            return [[m.seq for m in p.messages] for p in pages]

        assert run(main) == [[1, 2, 3], []]

    def test_a_member_who_left_gets_nothing_even_with_a_known_cursor(self) -> None:
        """Membership is checked on every sync, not inferred from the device's cursors."""

        async def main() -> list[tuple[str, list[int], bool]]:
            store = MemoryStore()
            logic, _counting = _logic(store)
            _seed(store)
            await logic.sync("u1", "d", [("g", 1)], 100)  # learns the cursor of g
            store.leave("u1", "g")
            pages = await logic.sync("u1", "d", [("g", 0)], 100)
            await logic.aclose()
            return [(p.conv, [m.seq for m in p.messages], p.more) for p in pages]

        assert run(main) == [("g", [], False)]

    def test_entries_past_the_per_request_cap_cost_nothing(self) -> None:
        """Past max_sync_entries conversations, pages say more=True without a store call."""

        async def main() -> tuple[int, int, int]:
            store = MemoryStore()
            store.create_user("u")
            convs = [f"c{i}" for i in range(300)]
            for conv in convs:
                store.create_group(conv, ["u"])
            logic, counting = _logic(store, LogicConfig(max_sync_entries=100))
            pages = await logic.sync("u", "d", [(c, 0) for c in convs], 100)
            await logic.aclose()
            return counting.total, len(pages), sum(p.more for p in pages)

        calls, n_pages, n_more = run(main)
        assert n_pages == 300  # every listed conversation is answered
        assert n_more == 200  # the ones not examined: ask again
        assert calls <= 2 * 100 + 2

    def test_store_work_over_many_syncs_stays_within_the_budget(self) -> None:
        """A device's sync store calls over time stay below burst + rate x elapsed + one request."""
        cfg = LogicConfig(sync_work_rate=2000, sync_work_burst=1000, max_sync_entries=100)

        async def main() -> tuple[int, float, int]:
            store = MemoryStore()
            store.create_user("u")
            convs = [f"c{i}" for i in range(100)]
            for conv in convs:
                store.create_group(conv, ["u"])
            logic, counting = _logic(store, cfg)
            after = [(c, 0) for c in convs]
            done = 0
            start = time.monotonic()

            async def flood() -> None:
                nonlocal done
                while time.monotonic() - start < 1.0:
                    await logic.sync("u", "d", after, 100)
                    done += 1

            await asyncio.gather(flood(), flood())
            elapsed = time.monotonic() - start
            await logic.aclose()
            return counting.total, elapsed, done

        calls, elapsed, done = run(main)
        one_request = 2 * cfg.max_sync_entries + 2
        assert done >= 2
        assert calls <= cfg.sync_work_burst + cfg.sync_work_rate * elapsed + 2 * one_request

    def test_other_devices_have_their_own_budget(self) -> None:
        """A device that spent its budget waits; another device's sync does not."""
        cfg = LogicConfig(sync_work_rate=10, sync_work_burst=50, max_sync_entries=100)

        async def main() -> tuple[int, int, list[int]]:
            store = MemoryStore()
            _seed(store)
            logic, _counting = _logic(store, cfg)
            for _ in range(3):  # 3 x 40 membership checks: 120 units of a 50-unit burst
                await logic.sync_now("u1", "greedy", [(f"x{i}", 0) for i in range(40)], 100)
            greedy_wait = logic.sync_wait_ms("u1", "greedy")
            other_wait = logic.sync_wait_ms("u2", "phone")
            pages = await logic.sync("u2", "phone", [("g", 0)], 100)
            await logic.aclose()
            return greedy_wait, other_wait, [m.seq for m in pages[0].messages]

        greedy_wait, other_wait, seqs = run(main)
        assert greedy_wait >= 6000  # ~70 units of debt at 10 units/s
        assert other_wait == 0
        assert seqs == [1, 2, 3]


def _host_port(cluster: Any) -> tuple[str, int]:
    host, port = cluster.endpoints()[0].rsplit(":", 1)
    return host, int(port)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class TestSyncFlood:
    @pytest.mark.timeout(60)
    def test_a_sync_flood_over_a_real_connection_is_held_to_the_budget(
        self, tmp_path: Path
    ) -> None:
        """An attacker's syncs (1000 entries, ~190/s) make store calls within its device budget.

        Other users' send->push latency during the flood is printed (not asserted).
        """
        logic_cfg = LogicConfig()

        async def main() -> tuple[int, int, float, list[float]]:
            cfg = ClusterConfig(
                demo=True,
                data_dir=str(tmp_path / "data"),
                gateway=GatewayConfig(server=FAST_SERVER),
                logic=logic_cfg,
            )
            cluster = await start_cluster(cfg)
            counting = CountingStore(cluster.logic.store)
            cluster.logic.store = cast(AsyncMessageStore, counting)
            try:
                conv = direct_conv_id("alice", "bob")
                alice = Client(
                    token=cluster.token("alice", "phone"),
                    device="phone",
                    endpoints=cluster.endpoints(),
                    config=ClientConfig(**FAST_CLIENT),
                )
                bob = Client(
                    token=cluster.token("bob", "phone"),
                    device="phone",
                    endpoints=cluster.endpoints(),
                    config=ClientConfig(**FAST_CLIENT),
                )
                await alice.start()
                await bob.start()
                await alice.send(conv, b"warm-up")
                sent_at: dict[bytes, float] = {}
                latencies: list[float] = []

                async def receive() -> None:
                    async for push in bob.messages():
                        t = sent_at.pop(push.body, None)
                        if t is not None:
                            latencies.append(time.monotonic() - t)

                receiver = asyncio.create_task(receive())
                raw = await RawClient.connect(*_host_port(cluster))
                await raw.login(cluster.token("carol", "evil"), "evil")
                last = await cluster.logic.store.last_seq("team")

                async def drain() -> None:
                    while True:
                        try:
                            frame = await raw.recv(10)
                        except Exception:
                            return
                        if isinstance(frame, Kick):
                            return

                drainer = asyncio.create_task(drain())
                frames = 0
                start = time.monotonic()
                i = 0
                same = (("team", last),) * 1000  # one conversation, again and again
                strangers = tuple((f"nowhere{j}", 0) for j in range(1000))  # not carol's
                while time.monotonic() - start < 3.0:
                    after = same if frames % 2 else strangers
                    raw.send(SyncRequest(req_id=frames + 1, after=after))
                    frames += 1
                    if frames % 10 == 0:  # an honest message every ~50 ms
                        i += 1
                        body = f"m{i}".encode()
                        sent_at[body] = time.monotonic()
                        alice.send_nowait(conv, body)
                    await asyncio.sleep(1 / 190)
                elapsed = time.monotonic() - start
                await asyncio.sleep(0.5)
                calls = counting.calls["is_member"] + counting.calls["read"]
                receiver.cancel()
                drainer.cancel()
                raw.abort()
                await alice.aclose()
                await bob.aclose()
                return frames, calls, elapsed, latencies
            finally:
                await cluster.stop()

        frames, calls, elapsed, latencies = run(main, 50)
        print(
            f"\nflood: {frames} sync frames in {elapsed:.1f} s, {calls} sync store calls; "
            f"others' send->push p50 {_percentile(latencies, 0.5) * 1000:.1f} ms, "
            f"p99 {_percentile(latencies, 0.99) * 1000:.1f} ms ({len(latencies)} messages)"
        )
        budget = logic_cfg.sync_work_burst + logic_cfg.sync_work_rate * (elapsed + 0.5)
        # alice's and bob's own syncs (a few each) are in the count too: + 2 requests
        assert calls <= budget + 4 * (2 * logic_cfg.max_sync_entries + 2)


class TestReceipts:
    def test_a_repeated_receipt_is_neither_written_nor_broadcast(self) -> None:
        """Only a receipt that moves the read cursor is stored and told to the others."""

        async def main() -> tuple[int, int, int]:
            store = MemoryStore()
            uids = _seed(store, members=20, messages=3)
            logic, _counting = _logic(store)
            for uid in uids:
                epoch = logic.routes.new_epoch()
                await logic.routes.bind(
                    Route(uid=uid, device="d", gateway="gw", conn_id=1, epoch=epoch)
                )
            sub = logic.bus.subscribe_nowait("gw", max_pending=1000)
            await logic.receipt("u1", "g", 2)
            first = logic.stats.envelopes
            for _ in range(10):
                await logic.receipt("u1", "g", 2)  # no move
                await logic.receipt("u1", "g", 1)  # backwards: no move
            repeats = logic.stats.envelopes - first
            await logic.receipt("u1", "g", 3)  # moves
            moved = logic.stats.envelopes - first - repeats
            sub.close_nowait()
            await logic.aclose()
            return first, repeats, moved

        first, repeats, moved = run(main)
        assert first == 1  # one envelope for the gateway holding the 19 others
        assert repeats == 0
        assert moved == 1


class TestCursorsAfterRestart:
    @pytest.mark.timeout(60)
    def test_an_inbox_sync_after_a_restart_returns_only_what_is_new(self, tmp_path: Path) -> None:
        """A device that acked everything re-downloads nothing after the cluster restarts."""
        data_dir = str(tmp_path / "data")
        conv = direct_conv_id("alice", "bob")

        def config() -> ClusterConfig:
            return ClusterConfig(
                demo=True, data_dir=data_dir, gateway=GatewayConfig(server=FAST_SERVER)
            )

        async def first() -> None:
            cluster = await start_cluster(config())
            try:
                alice = Client(
                    token=cluster.token("alice", "phone"),
                    device="phone",
                    endpoints=cluster.endpoints(),
                    config=ClientConfig(**FAST_CLIENT),
                )
                await alice.start()
                raw = await RawClient.connect(*_host_port(cluster))
                await raw.login(cluster.token("bob", "raw"), "raw")
                for text in (b"one", b"two", b"three"):
                    await alice.send(conv, text)
                pushed: set[int] = set()
                while len(pushed) < 3:
                    frame = await raw.recv()
                    if isinstance(frame, Push | PushBatch):
                        items = frame.pushes if isinstance(frame, PushBatch) else (frame,)
                        pushed.update(p.seq for p in items if p.conv == conv)
                raw.send(PushAck(conv=conv, seq=3))  # bob's device holds 1..3
                raw.send(SyncRequest(req_id=1))  # a round trip: the ack was handled
                await raw.expect(SyncResponse)
                raw.close()
                await alice.aclose()
            finally:
                await cluster.stop()

        async def second() -> list[tuple[str, list[int]]]:
            cluster = await start_cluster(config())
            try:
                alice = Client(
                    token=cluster.token("alice", "phone"),
                    device="phone",
                    endpoints=cluster.endpoints(),
                    config=ClientConfig(**FAST_CLIENT),
                )
                await alice.start()
                await alice.send(conv, b"four")  # new since the restart
                raw = await RawClient.connect(*_host_port(cluster))
                await raw.login(cluster.token("bob", "raw"), "raw")
                raw.send(SyncRequest(req_id=1))  # the inbox sync of a reconnect
                answer = await raw.expect(SyncResponse)
                raw.close()
                await alice.aclose()
                return [(p.conv, [m.seq for m in p.messages]) for p in answer.pages]
            finally:
                await cluster.stop()

        run(first)
        pages = dict(run(second))
        assert pages.get(conv) == [4]


class TestStoreOffTheLoop:
    @pytest.mark.timeout(60)
    def test_a_slow_store_write_does_not_delay_another_connections_pong(
        self, tmp_path: Path
    ) -> None:
        """With an SQLite store whose append sleeps 500 ms, another connection's ping is
        answered while that append still runs (storage runs off the event loop)."""

        async def main() -> tuple[float, float, float, Any]:
            cfg = ClusterConfig(
                demo=True,
                data_dir=str(tmp_path / "data"),
                gateway=GatewayConfig(server=FAST_SERVER),
            )
            cluster = await start_cluster(cfg)
            inner = cluster.store
            original = inner.append
            times: dict[str, float] = {}

            def slow_append(*args: Any, **kwargs: Any) -> Any:
                times["started"] = time.monotonic()
                time.sleep(0.5)  # an fsync on a busy disk, a long range read
                times["finished"] = time.monotonic()
                return original(*args, **kwargs)

            try:
                sender = await RawClient.connect(*_host_port(cluster))
                await sender.login(cluster.token("alice", "phone"), "phone")
                pinger = await RawClient.connect(*_host_port(cluster))
                await pinger.login(cluster.token("bob", "phone"), "phone")
                inner.append = slow_append  # type: ignore[method-assign]
                sender.send(Send(cid=1, conv="team", body=b"slow"))
                while "started" not in times:  # a loop blocked by the append waits here
                    await asyncio.sleep(0.002)
                pinged = time.monotonic()
                pinger.send(Ping(nonce=7))
                pong = await pinger.expect(Pong)
                ponged = time.monotonic()
                ack = await sender.expect(SendAck)
                sender.close()
                pinger.close()
                return pinged, ponged, times["finished"], (pong.nonce, ack.error, ack.seq > 0)
            finally:
                inner.append = original  # type: ignore[method-assign]
                await cluster.stop()

        pinged, ponged, finished, (nonce, error, stored) = run(main)
        print(f"ping -> pong {(ponged - pinged) * 1000:.1f} ms during a 500 ms append")
        assert (nonce, error, stored) == (7, 0, True)
        assert ponged < finished  # answered while the append was still running


class TestDirectMembers:
    def test_a_known_1to1_conversation_costs_no_membership_calls(self) -> None:
        """The members of a 1:1 conversation never change: after the first send the logic
        server asks the store only to append (and for the inbox), and a stranger is
        still refused; a group is asked every time (its members change)."""

        async def main() -> tuple[list[int], list[int], int | ErrorCode, int]:
            store = MemoryStore()
            for uid in ("a", "b", "c"):
                store.create_user(uid)
            store.create_group("g", ["a", "b"])
            logic, counting = _logic(store)
            conv = direct_conv_id("a", "b")
            direct_calls = []
            for cid in (1, 2, 3):
                before = counting.calls["is_member"] + counting.calls["members"]
                assert not isinstance(await logic.send("a", "d", cid, conv, b"x"), ErrorCode)
                direct_calls.append(
                    counting.calls["is_member"] + counting.calls["members"] - before
                )
            group_calls = []
            for cid in (4, 5):
                before = counting.calls["is_member"] + counting.calls["members"]
                await logic.send("a", "d", cid, "g", b"x")
                group_calls.append(counting.calls["is_member"] + counting.calls["members"] - before)
            stranger = await logic.send("c", "d", 1, conv, b"x")
            await logic.aclose()
            refused = stranger if isinstance(stranger, ErrorCode) else stranger.seq
            return direct_calls, group_calls, refused, store.last_seq(conv)

        direct_calls, group_calls, refused, last = run(main)
        assert direct_calls[0] >= 1 and direct_calls[1:] == [0, 0]
        assert group_calls == [2, 2]
        assert refused == ErrorCode.NOT_MEMBER and last == 3


class TestResentMessages:
    def test_a_message_stored_but_never_pushed_is_pushed_on_its_resend(self) -> None:
        """A logic process died between the append and the publish; the client resends
        the cid (to another logic process): the message is not stored again, and the
        recipient's gateway gets the push now rather than at the recipient's next sync."""

        async def main() -> tuple[list[int], int, int]:
            store = MemoryStore()
            for uid in ("a", "b"):
                store.create_user(uid)
            conv = direct_conv_id("a", "b")
            store.create_direct("a", "b")
            now = int(time.time() * 1000)
            store.append(conv, "a", 7, b"hi", wall_ms=now, msg_id=1)  # the dead process's
            logic, _counting = _logic(store)
            epoch = logic.routes.new_epoch()
            await logic.routes.bind(
                Route(uid="b", device="d", gateway="gw", conn_id=1, epoch=epoch)
            )
            sub = await logic.bus.subscribe("gw", max_pending=10)
            result = await logic.send("a", "d", 7, conv, b"hi")
            got = []
            while (item := sub.get_nowait()) is not None:
                assert isinstance(item, Envelope) and isinstance(item.payload, Deliver)
                got += [p.seq for p in item.payload.pushes]
            await logic.aclose()
            assert not isinstance(result, ErrorCode)
            return got, store.last_seq(conv), logic.stats.repushes

        pushed, last, repushes = run(main)
        assert pushed == [1] and last == 1 and repushes == 1

    def test_an_old_resend_is_answered_without_a_push(self) -> None:
        """A resend of a message stored long ago (past the repush window) is only
        answered: its members have long had it."""

        async def main() -> tuple[int, int]:
            store = MemoryStore()
            for uid in ("a", "b"):
                store.create_user(uid)
            conv = direct_conv_id("a", "b")
            store.create_direct("a", "b")
            store.append(conv, "a", 7, b"hi", wall_ms=1, msg_id=1)  # 1970
            logic, _counting = _logic(store)
            envelopes = logic.stats.envelopes
            await logic.send("a", "d", 7, conv, b"hi")
            await logic.aclose()
            return logic.stats.envelopes - envelopes, logic.stats.duplicates

        assert run(main) == (0, 1)
