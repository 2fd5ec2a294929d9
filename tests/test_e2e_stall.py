"""A stalled server process (SIGSTOP) must not cut the clients that kept pinging.

Starts ``python -m examples.cluster --heartbeat-ms 3000`` (heartbeat deadline 9 s)
as a real process, logs in clients that ping every second, stops the process for
longer than the deadline, resumes it, and counts the connections cut: the pings
that arrived during the stall are read before silence is judged (issue 8 #4), and a
client that really went silent is still cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imkit.aio import FramedConnection, open_connection
from imkit.errors import ConnectionClosed
from imkit.protocol import ErrorCode, Kick, Login, LoginAck, Ping

pytestmark = [
    pytest.mark.network,
    pytest.mark.timeout(60),
    pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP"),
]

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 20
HEARTBEAT_MS = 3000  # server deadline: 3 missed intervals = 9 s
STALL_S = 11.0  # longer than the deadline: every deadline falls inside the stall
AFTER_S = 4.0  # watch this long after the resume


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[dict[str, Any], subprocess.Popen[bytes]]]:
    """A running cluster process with one gateway, no web page."""
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.cluster", "--dev", "--port-base", "0", "--no-web", "-q",
         "--heartbeat-ms", str(HEARTBEAT_MS), "--ready-file", str(ready)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the cluster did not become ready")
            time.sleep(0.05)
        yield json.loads(ready.read_text()), proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _token(ipconf: str, uid: str, device: str) -> str:
    url = f"{ipconf}/dev/token?uid={uid}&device={device}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        token: str = json.loads(resp.read())["token"]
    return token


async def _login(host: str, port: int, token: str, device: str) -> FramedConnection:
    conn = await open_connection(host, port, handshake_timeout_ms=None, frame_timeout_ms=None)
    conn.send(Login(token=token, device=device))
    ack = await asyncio.wait_for(conn.recv(), 10)
    assert isinstance(ack, LoginAck), ack
    return conn


async def _watch(conn: FramedConnection, kicks: list[int]) -> None:
    """Read until the connection closes; note the code of a Kick."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            msg = await conn.recv()
            if isinstance(msg, Kick):
                kicks.append(msg.code)


async def _ping_every_second(conn: FramedConnection) -> None:
    with contextlib.suppress(ConnectionClosed):
        while not conn.closed:
            conn.send(Ping())
            await asyncio.sleep(1.0)


async def _scenario(info: dict[str, Any], pid: int) -> tuple[int, list[int], bool, list[int]]:
    tcp = info["gateways"][0]["tcp"].removeprefix("tcp://")
    host, port = tcp.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    tokens = await loop.run_in_executor(
        None,
        lambda: [_token(info["ipconf"], f"user{i + 1:03d}", f"d{i}") for i in range(CLIENTS + 1)],
    )
    conns = [await _login(host, int(port), tokens[i], f"d{i}") for i in range(CLIENTS)]
    kicks: list[list[int]] = [[] for _ in conns]
    tasks = [asyncio.create_task(_watch(c, k)) for c, k in zip(conns, kicks, strict=True)]
    tasks += [asyncio.create_task(_ping_every_second(c)) for c in conns]
    await asyncio.sleep(1.5)  # everyone has pinged
    silent = await _login(host, int(port), tokens[CLIENTS], f"d{CLIENTS}")  # never pings
    silent_kicks: list[int] = []
    tasks.append(asyncio.create_task(_watch(silent, silent_kicks)))
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(STALL_S)
    finally:
        os.kill(pid, signal.SIGCONT)
    await asyncio.sleep(AFTER_S)
    cut = sum(1 for c in conns if c.closed)
    codes = [code for k in kicks for code in k]
    silent_closed = silent.closed
    for c in [*conns, silent]:
        c.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return cut, codes, silent_closed, silent_kicks


class TestServerStall:
    def test_sigstop_longer_than_the_deadline_cuts_only_the_silent(
        self, cluster: tuple[dict[str, Any], subprocess.Popen[bytes]]
    ) -> None:
        """After an 11 s SIGSTOP (deadline 9 s) no pinging client is cut; a silent one is."""
        info, proc = cluster
        cut, codes, silent_closed, silent_kicks = asyncio.run(_scenario(info, proc.pid))
        assert codes == [] and cut == 0, f"{cut} of {CLIENTS} pinging clients cut: {codes}"
        assert silent_closed and silent_kicks == [ErrorCode.HEARTBEAT_TIMEOUT]
