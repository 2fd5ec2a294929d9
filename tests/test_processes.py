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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from examples.httpclient import fetch_json

from imkit.aio import Client
from imkit.session import ClientConfig
from imkit.policy import Backoff
from imkit.store import direct_conv_id
from tests.history import History, check_history
from tests.services import nats_url, postgres_dsn, redis_url, unique_name

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
USERS = ("alice", "bob", "carol", "dave")


class Layout:
    """Who is in which conversation (the history checker's Membership)."""

    def __init__(self) -> None:
        self.users = USERS
        self.convs = {
            direct_conv_id("alice", "bob"): frozenset({"alice", "bob"}),
            direct_conv_id("carol", "dave"): frozenset({"carol", "dave"}),
            "team": frozenset({"alice", "bob", "carol"}),
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
        try:
            await js.delete_stream(f"{ns.upper()}_BUS")
        except Exception:  # noqa: BLE001 - absent already
            pass
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class TestProcesses:
    def test_chat_survives_kill_9_of_a_gateway_and_of_a_logic_process(
        self, tmp_path: Path
    ) -> None:
        """2 gateways + 2 logic processes; under steady 1:1 and group load, ``kill -9``
        the gateway half the clients are on, then a logic process: no acknowledged
        message is lost, duplicated or misordered (checked against PostgreSQL), and the
        launcher restarts both (new pids in the ready file)."""

        async def main() -> tuple[Any, dict[str, int], dict[str, int]]:
            async with backends() as (flags, ns):
                async with launched(tmp_path, flags) as launch:
                    layout = Layout()
                    history = History(layout)
                    clients = {
                        uid: await client(launch, uid, i % 2) for i, uid in enumerate(USERS)
                    }
                    pumps = [
                        asyncio.create_task(pump(c, uid, history))
                        for uid, c in clients.items()
                    ]
                    before = {p["id"]: p["pid"] for p in launch.info()["processes"]}
                    routes = {
                        "alice": [direct_conv_id("alice", "bob"), "team"],
                        "bob": [direct_conv_id("alice", "bob"), "team"],
                        "carol": [direct_conv_id("carol", "dave"), "team"],
                        "dave": [direct_conv_id("carol", "dave")],
                    }
                    for step in range(60):
                        for uid, c in clients.items():
                            conv = routes[uid][step % len(routes[uid])]
                            body = history.next_body(uid)
                            _, fut = c.send_nowait(conv, body.encode())
                            history.sent(uid, conv, body, fut)
                        if step == 15:
                            os.kill(launch.process("gw-1")["pid"], signal.SIGKILL)
                        if step == 35:
                            os.kill(launch.process("logic-1")["pid"], signal.SIGKILL)
                        await asyncio.sleep(0.05)
                    async with asyncio.timeout(60):
                        while history.pending():
                            await asyncio.sleep(0.1)
                    stored = await truth(ns, list(layout.convs))
                    # every acked message reaches every member: wait for the stragglers
                    want = sum(len(rows) * len(layout.convs[c]) for c, rows in stored.items())
                    deadline = time.monotonic() + 30  # then the check says what is missing
                    while time.monotonic() < deadline and (
                        sum(len(v) for d in history.delivered.values() for v in d.values())
                        < want
                    ):
                        await asyncio.sleep(0.1)
                    for task in pumps:
                        task.cancel()
                    await asyncio.gather(*pumps, return_exceptions=True)
                    for c in clients.values():
                        await c.aclose()
                    after = {p["id"]: p["pid"] for p in launch.info()["processes"]}
                    return check_history(history, stored), before, after

        check, before, after = asyncio.run(main())
        print(check)
        assert check.passed, check
        assert check.sends_ok >= 200, check
        assert check.lost == 0 and check.app_duplicates == 0 and check.order_violations == 0
        # the launcher restarted the killed processes
        assert after["gw-1"] != before["gw-1"] and after["logic-1"] != before["logic-1"]
        assert after["gw-2"] == before["gw-2"] and after["logic-2"] == before["logic-2"]

    def test_sigterm_drains_one_gateway_then_the_launcher_stops_everything(
        self, tmp_path: Path
    ) -> None:
        """SIGTERM on one gateway: its clients are moved to the other with a retry hint,
        it is not restarted; SIGTERM on the launcher stops every process and removes
        the ready file, exit status 0."""

        async def main() -> tuple[bool, list[str], list[int], int, bool]:
            async with backends() as (flags, _ns):
                async with launched(tmp_path, flags, gateways=2, logic=1) as launch:
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
