"""Driving the reference system as real processes: for tests and the fault benchmark.

:func:`backends` gives a fresh namespace (Redis prefix, JetStream stream,
PostgreSQL schema) and removes it after; :func:`launched` starts ``python -m
examples.cluster --processes`` as a user does and stops it with SIGTERM;
:func:`client` connects a client through the gateways; :func:`chat_under_faults`
runs a small chat with faults at chosen rounds and checks the history
(tests/history.py) against what PostgreSQL holds.
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

from examples.httpclient import fetch_json

from imkit.aio import Client
from imkit.policy import Backoff
from imkit.session import ClientConfig
from imkit.store import direct_conv_id
from tests.history import Check, History, check_history
from tests.services import nats_url, postgres_dsn, redis_url, unique_name

ROOT = Path(__file__).resolve().parent.parent
USERS = ("alice", "bob", "carol", "dave")


class Layout:
    """Who is in which conversation (the history checker's Membership); by default
    the demo users' two 1:1 conversations and the group ``team``."""

    def __init__(
        self,
        users: tuple[str, ...] = USERS,
        convs: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.users = users
        self.convs = convs or {
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
    tmp_path: Path,
    flags: list[str],
    *extra: str,
    gateways: int = 2,
    logic: int = 2,
    lobby_size: int = 10,
) -> AsyncIterator[Launched]:
    """``python -m examples.cluster --processes`` until it says it is ready; stopped after."""
    ready = tmp_path / "ready.json"
    argv = [
        sys.executable, "-m", "examples.cluster", "--processes",
        "--gateways", str(gateways), "--logic", str(logic),
        "--port-base", "0", "--dev", "-q", "--lobby-size", str(lobby_size),
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


async def client(
    launch: Launched, uid: str, first: int, *, gateways: list[str] | None = None
) -> Client:
    """A started client of ``uid`` that tries gateway ``first`` before the others
    (``gateways``: these endpoints instead of the ready file's, e.g. fault proxies)."""
    info = launch.info()
    doc = await fetch_json(f"{info['ipconf']}/dev/token?uid={uid}&device=phone")
    if gateways is None:
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


def alive(pid: int) -> bool:
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
            if set(after) >= set(before) and all(alive(pid) for pid in after.values()):
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
