"""The reference system as real processes on Redis, NATS JetStream and PostgreSQL.

``python -m examples.cluster --processes`` is started as a user starts it; clients
chat through its gateways while a test kills (``kill -9``) a gateway process and a
logic process, stops a logic process, restarts NATS and Redis or cuts PostgreSQL
off, and the history checker (tests/history.py) counts what was lost, duplicated
or misordered against what PostgreSQL holds. Each test uses its own namespace
(Redis prefix, JetStream stream, PostgreSQL schema) and removes it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from examples.faultproxy import FaultProxy

from imkit.store import direct_conv_id
from tests.history import Check
from tests.procs import (
    Fault,
    Launched,
    alive,
    backends,
    chat_under_faults,
    client,
    kill,
    launched,
    passed,
    replace_flag,
)
from tests.services import postgres_dsn, private_nats, private_redis

pytestmark = pytest.mark.timeout(180)


class TestProcesses:
    def test_chat_survives_kill_9_of_a_gateway_and_of_a_logic_process(self, tmp_path: Path) -> None:
        """2 gateways + 2 logic processes; under steady 1:1 and group load, ``kill -9``
        the gateway half the clients are on, then a logic process: no acknowledged
        message is lost, duplicated or misordered (checked against PostgreSQL), and the
        launcher restarts both (new pids in the ready file)."""

        async def main() -> tuple[Check, dict[str, int], dict[str, int], float]:
            async with backends() as (flags, ns):
                faults = {15: kill("gw-1"), 35: kill("logic-1")}
                return await chat_under_faults(tmp_path, flags, ns, faults)

        check, before, after, _ = asyncio.run(main())
        passed(check)
        assert after["gw-1"] != before["gw-1"] and after["logic-1"] != before["logic-1"]
        assert after["gw-2"] == before["gw-2"] and after["logic-2"] == before["logic-2"]

    def test_a_stopped_logic_process_costs_retries_not_messages(self, tmp_path: Path) -> None:
        """``kill -STOP`` one of two logic processes for 5 s, then ``-CONT``: requests it
        held time out and are resent to the other (same cid: stored once)."""

        async def main() -> tuple[Check, float]:
            async with backends() as (flags, ns):

                async def stop_then_continue(launch: Launched) -> None:
                    pid = launch.process("logic-1")["pid"]
                    os.kill(pid, signal.SIGSTOP)
                    loop = asyncio.get_running_loop()
                    loop.call_later(5.0, os.kill, pid, signal.SIGCONT)

                faults: dict[int, Fault] = {10: stop_then_continue}
                check, _, _, slowest = await chat_under_faults(
                    tmp_path, flags, ns, faults, steps=300
                )
                return check, slowest

        check, slowest = asyncio.run(main())
        passed(check)
        assert slowest >= 0.9  # held by the stopped process for a send timeout (1 s)

    def test_nats_restarted_under_load(self, tmp_path: Path) -> None:
        """A private ``nats-server -js`` (file store) killed and started again mid-run:
        sends are refused while it is down (the clients resend), envelopes published
        meanwhile are published again once it is back; nothing acked is lost."""

        async def main() -> tuple[Check, float]:
            with private_nats(tmp_path) as nats_server:
                async with backends() as (shared, ns):
                    flags = replace_flag(shared, "--nats", f"nats://127.0.0.1:{nats_server.port}")

                    async def restart(_launch: Launched) -> None:
                        nats_server.kill()
                        await asyncio.sleep(2.0)
                        await asyncio.to_thread(nats_server.start)

                    check, _, _, slowest = await chat_under_faults(
                        tmp_path, flags, ns, {15: restart}, steps=120
                    )
                    return check, slowest

        check, slowest = asyncio.run(main())
        passed(check)
        assert slowest >= 1.0  # sends waited for NATS to come back

    def test_redis_restarted_empty_under_load(self, tmp_path: Path) -> None:
        """A private ``redis-server`` that keeps nothing is killed and started again:
        every route and registration is gone; gateways register again and bind their
        live connections back (telling the clients to resync); nothing acked is lost."""

        async def main() -> tuple[Check, float]:
            with private_redis(tmp_path) as redis_server:
                async with backends() as (shared, ns):
                    url = f"redis://127.0.0.1:{redis_server.port}/0"
                    flags = replace_flag(shared, "--redis", url)

                    async def restart(_launch: Launched) -> None:
                        await asyncio.to_thread(redis_server.restart)

                    check, _, _, slowest = await chat_under_faults(
                        tmp_path, flags, ns, {15: restart}, steps=300
                    )
                    return check, slowest

        check, _ = asyncio.run(main())
        passed(check)

    def test_postgres_unreachable_for_5_s(self, tmp_path: Path) -> None:
        """PostgreSQL behind a proxy that swallows everything for 5 s: sends fail with
        a retryable error and are resent; nothing acked is lost."""

        async def main() -> tuple[Check, float]:
            dsn = urlsplit(postgres_dsn())
            proxy = FaultProxy(dsn.hostname or "127.0.0.1", dsn.port or 5432)
            await proxy.start()
            try:
                async with backends() as (shared, ns):
                    via = dsn._replace(netloc=f"{dsn.username}@127.0.0.1:{proxy.port}").geturl()
                    flags = replace_flag(shared, "--postgres", via)

                    def cut(_launch: Launched) -> None:
                        proxy.refuse = True
                        proxy.c2s.blackhole = proxy.s2c.blackhole = True

                        def restore() -> None:
                            proxy.reset()
                            proxy.refuse = False
                            proxy.c2s.blackhole = proxy.s2c.blackhole = False

                        asyncio.get_running_loop().call_later(5.0, restore)

                    check, _, _, slowest = await chat_under_faults(
                        tmp_path, flags, ns, {15: cut}, steps=300
                    )
                    return check, slowest
            finally:
                await proxy.aclose()

        check, slowest = asyncio.run(main())
        passed(check)
        assert slowest >= 3.0  # sends waited while PostgreSQL was unreachable


class TestLauncher:
    def test_sigterm_drains_one_gateway_then_the_launcher_stops_everything(
        self, tmp_path: Path
    ) -> None:
        """SIGTERM on one gateway: its clients are moved to the other with a retry hint,
        it is not restarted; SIGTERM on the launcher stops every process and removes
        the ready file, exit status 0."""

        async def main() -> tuple[bool, list[str], list[int], int, bool]:
            async with (
                backends() as (flags, _ns),
                launched(tmp_path, flags, gateways=2, logic=1) as launch,
            ):
                alice = await client(launch, "alice", 0)
                bob = await client(launch, "bob", 0)
                conv = direct_conv_id("alice", "bob")
                await alice.send(conv, b"before")
                gw1 = launch.process("gw-1")["pid"]
                os.kill(gw1, signal.SIGTERM)
                async with asyncio.timeout(20):
                    while alive(gw1):
                        await asyncio.sleep(0.05)
                await alice.send(conv, b"after")  # through gw-2 now
                got = []
                async for push in bob.messages():
                    got.append(push.body)
                    if push.body == b"after":
                        break
                await alice.aclose()
                await bob.aclose()
                ids = [p["id"] for p in launch.info()["processes"]]
                pids = [p["pid"] for p in launch.info()["processes"]]
                launch.proc.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(launch.proc.wait, 40)
                return b"after" in got, ids, pids, code, launch.ready.exists()

        delivered, ids, pids, code, ready_left = asyncio.run(main())
        assert delivered
        assert "gw-1" not in ids and "gw-2" in ids  # drained, not restarted
        assert code == 0 and not ready_left
        assert not any(alive(pid) for pid in pids)
