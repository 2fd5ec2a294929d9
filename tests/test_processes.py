"""The reference system as real processes on Redis, NATS JetStream and PostgreSQL.

``python -m examples.cluster --processes`` is started as a user starts it; clients
chat through its gateways while a test kills (``kill -9``) a gateway process and a
logic process, and the history checker (tests/history.py) counts what was lost,
duplicated or misordered against what PostgreSQL holds. Each test uses its own
namespace (Redis prefix, JetStream stream, PostgreSQL schema) and removes it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from examples.faultproxy import FaultProxy
from examples.httpclient import fetch_json

from imkit.aio import Client
from imkit.policy import Backoff
from imkit.session import ClientConfig
from imkit.store import direct_conv_id
from tests.history import Check, History, check_history
from tests.services import (
    nats_url,
    postgres_dsn,
    private_nats,
    private_redis,
    redis_url,
    unique_name,
)

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
USERS = ("alice", "bob", "carol", "dave")


class Layout:
    """Who is in which conversation (the history checker's Membership)."""

    def __init__(self) -> None:
        self.users = USERS
        self.convs = {
            direct_conv_id("alice", "bob"): ("alice", "bob"),
            direct_conv_id("carol", "dave"): ("carol", "dave"),
            "team": ("alice", "bob", "carol"),
        }
        self.big = ""


@asynccontextmanager
async def backends() -> AsyncIterator[tuple[list[str], str]]:
    """The backend flags for a fresh namespace; everything it made is removed after."""
    ns = unique_name("imkp")
    flags = ["--redis", redis_url(), "--nats", nats_url(), "--postgres", postgres_dsn()]
    try:
        yield [*flags, "--namespace", ns], ns
    finally:
        await _cleanup(ns)


async def _cleanup(ns: str) -> None:
    import asyncpg  # type: ignore[import-untyped]
    import nats
    import redis.asyncio as aioredis

    conn = await asyncpg.connect(postgres_dsn())
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{ns}" CASCADE')
    finally:
        await conn.close()
    r = aioredis.from_url(redis_url())
    try:
        keys = [k async for k in r.scan_iter(match=f"{ns}:*", count=1000)]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()
    nc = await nats.connect(nats_url())
    try:
        js = nc.jetstream()
        with suppress(Exception):  # absent already
            await js.delete_stream(f"{ns.upper()}_BUS")
    finally:
        await nc.close()


class Launched:
    """The launcher process and its ready file."""

    def __init__(self, proc: subprocess.Popen[bytes], ready: Path) -> None:
        self.proc = proc
        self.ready = ready

    def info(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.ready.read_text())
        return doc

    def process(self, ident: str) -> dict[str, Any]:
        return next(p for p in self.info()["processes"] if p["id"] == ident)


@asynccontextmanager
async def launched(
    tmp_path: Path, flags: list[str], *extra: str, gateways: int = 2, logic: int = 2
) -> AsyncIterator[Launched]:
    """``python -m examples.cluster --processes`` until it says it is ready; stopped after."""
    ready = tmp_path / "ready.json"
    argv = [
        sys.executable, "-m", "examples.cluster", "--processes",
        "--gateways", str(gateways), "--logic", str(logic),
        "--port-base", "0", "--dev", "-q", "--lobby-size", "10",
        "--ready-file", str(ready), *flags, *extra,
    ]  # fmt: skip
    log = open(tmp_path / "launcher.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise AssertionError(
                    "the launcher did not get ready:\n"
                    + (tmp_path / "launcher.log").read_text()[-3000:]
                )
            await asyncio.sleep(0.05)
        yield Launched(proc, ready)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


async def client(launch: Launched, uid: str, first: int) -> Client:
    """A started client of ``uid`` that tries gateway ``first`` before the others."""
    info = launch.info()
    doc = await fetch_json(f"{info['ipconf']}/dev/token?uid={uid}&device=phone")
    gateways = [p["tcp"] for p in info["processes"] if p["role"] == "gateway"]
    endpoints = gateways[first:] + gateways[:first]
    c = Client(
        token=doc["token"],
        device="phone",
        endpoints=endpoints,
        config=ClientConfig(reconnect=Backoff(base_ms=50, cap_ms=500)),
    )
    await c.start()
    return c


async def pump(c: Client, uid: str, history: History) -> None:
    """Hand every message ``c`` delivers to the history (until cancelled)."""
    async for push in c.messages():
        history.deliver(uid, push)


async def truth(ns: str, convs: list[str]) -> dict[str, list[tuple[int, str, str]]]:
    """What PostgreSQL holds: conv -> [(seq, sender, body)]."""
    from imkit.aio.postgres import PostgresStore

    store = await PostgresStore.open(postgres_dsn(), schema=ns)
    try:
        out: dict[str, list[tuple[int, str, str]]] = {}
        for conv in convs:
            rows: list[tuple[int, str, str]] = []
            after = 0
            while True:
                page = await store.read(conv, after, 500)
                rows += [(m.seq, m.sender, m.body.decode()) for m in page.messages]
                if not page.messages:
                    break
                after = page.messages[-1].seq
            out[conv] = rows
        return out
    finally:
        await store.aclose()


def replace_flag(flags: list[str], name: str, value: str) -> list[str]:
    """``flags`` with ``name``'s value replaced."""
    out = list(flags)
    out[out.index(name) + 1] = value
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


Fault = Callable[[Launched], Awaitable[None] | None]


async def chat_under_faults(
    tmp_path: Path,
    flags: list[str],
    ns: str,
    faults: dict[int, Fault],
    *,
    steps: int = 60,
    gateways: int = 2,
    logic: int = 2,
    settle_s: float = 60.0,
) -> tuple[Check, dict[str, int], dict[str, int], float]:
    """Four clients chat (1:1 and a group) for ``steps`` rounds of 20 ms; ``faults[i]``
    runs before round i. Then every send settles, and every stored message is
    waited for at every member (up to 30 s); the history is checked against
    PostgreSQL. Returns the check, the process ids before and after, and the slowest
    send's time to its acknowledgement (s): the fault was felt."""
    async with launched(tmp_path, flags, gateways=gateways, logic=logic) as launch:
        layout = Layout()
        history = History(layout)
        clients = {uid: await client(launch, uid, i % gateways) for i, uid in enumerate(USERS)}
        pumps = [asyncio.create_task(pump(c, uid, history)) for uid, c in clients.items()]
        before = {p["id"]: p["pid"] for p in launch.info()["processes"]}
        convs = {
            "alice": [direct_conv_id("alice", "bob"), "team"],
            "bob": [direct_conv_id("alice", "bob"), "team"],
            "carol": [direct_conv_id("carol", "dave"), "team"],
            "dave": [direct_conv_id("carol", "dave")],
        }
        for step in range(steps):
            fault = faults.get(step)
            if fault is not None:
                done = fault(launch)
                if done is not None:
                    await done
            for uid, c in clients.items():
                conv = convs[uid][step % len(convs[uid])]
                body = history.next_body(uid)
                _, fut = c.send_nowait(conv, body.encode())
                history.sent(uid, conv, body, fut)
            await asyncio.sleep(0.02)
        async with asyncio.timeout(settle_s):
            while history.pending():
                await asyncio.sleep(0.1)
        stored = await truth(ns, list(layout.convs))
        want = sum(len(rows) * len(layout.convs[c]) for c, rows in stored.items())
        deadline = time.monotonic() + 30  # then the check says what is missing
        while time.monotonic() < deadline and (
            sum(len(v) for d in history.delivered.values() for v in d.values()) < want
        ):
            await asyncio.sleep(0.1)
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for c in clients.values():
            await c.aclose()
        after: dict[str, int] = {}
        deadline = time.monotonic() + 20  # killed processes are started again
        while time.monotonic() < deadline:
            after = {p["id"]: p["pid"] for p in launch.info()["processes"]}
            if set(after) >= set(before) and all(_alive(pid) for pid in after.values()):
                break
            await asyncio.sleep(0.1)
        slowest = max(r.t_done - r.t_sent for r in history.sends.values())
        return check_history(history, stored), before, after, slowest


def kill(ident: str, sig: int = signal.SIGKILL) -> Fault:
    """A fault: send ``sig`` to process ``ident`` of the cluster."""

    def fault(launch: Launched) -> None:
        os.kill(launch.process(ident)["pid"], sig)

    return fault


def passed(check: Check) -> None:
    """Assert the history check passed, with enough traffic to mean something."""
    assert check.passed, check
    assert check.sends_ok >= 200, check
    assert check.sends_ok + check.sends_failed == check.stored + check.sends_failed, check


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
        assert slowest >= 2.5  # held by the stopped process until the 3 s send timeout

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
                    while _alive(gw1):
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
        assert not any(_alive(pid) for pid in pids)
