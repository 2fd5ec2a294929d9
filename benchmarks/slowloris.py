"""How long a legitimate ipconf request takes while slowloris connections flood it.

Starts ipconf (:class:`examples.ipconf.IpConf`, default HTTP limits, one registered
gateway) in a child process, then from this process opens ``--sockets`` slowloris
connections from 127.0.0.1: each sends the start of a request head, then one more
byte per second, and reopens (on its next tick) when the server cuts it, like the
classic slowloris tool. Once the flood is up, a legitimate client asks
``GET /gateways?uid=alice`` every half second; each measurement is the time from
its first attempt until a complete 200 answer (a refused or reset attempt is
retried at once). Prints min / median / max and how many attempts were refused.

Run: ``.venv/bin/python benchmarks/slowloris.py [--sockets 1100] [--seconds 15]``.
Caveats: one machine plays both sides (loopback, no network latency), the flood and
the measuring client share this process's event loop, and the figures depend on
the machine's load; compare runs made the same way, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


async def _serve() -> None:
    from examples.ipconf import IpConf

    from imkit.aio import MemoryRegistry
    from imkit.discovery import GatewayInfo

    registry = MemoryRegistry(ttl_ms=10**9)
    await registry.register(GatewayInfo(id="gw-1", endpoints=("tcp://127.0.0.1:7710",)))
    ipconf = IpConf(registry=registry)
    port = await ipconf.start("127.0.0.1", 0)
    print(port, flush=True)
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def stdin_closed() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(sys.stdin.fileno(), stdin_closed)
    await done  # the parent closed our stdin
    await ipconf.stop()


class _Flood:
    def __init__(self, port: int, sockets: int) -> None:
        self.port = port
        self.sockets = sockets
        self.held = 0  # open right now
        self.reopened = 0
        self._stop = False

    async def _one(self) -> None:
        writer: asyncio.StreamWriter | None = None
        reader: asyncio.StreamReader | None = None
        while not self._stop:
            if writer is None or reader is None or reader.at_eof() or writer.is_closing():
                if writer is not None:
                    writer.close()
                    self.held -= 1
                    self.reopened += 1
                    writer = None
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(1)
                    continue
                self.held += 1
                writer.write(b"GET /gateways?uid=mallory HTTP/1.1\r\nHost: x\r\nX-a: ")
            else:
                with contextlib.suppress(OSError):
                    writer.write(b"a")  # one byte a second, never the end of the head
            await asyncio.sleep(1)
        if writer is not None:
            writer.transport.abort()

    def start(self) -> list[asyncio.Task[None]]:
        return [asyncio.get_running_loop().create_task(self._one()) for _ in range(self.sockets)]

    def stop(self) -> None:
        self._stop = True


async def _legit(port: int, give_up_s: float) -> tuple[float, int]:
    """Seconds until one GET /gateways is answered 200, and the attempts it took."""
    start = time.monotonic()
    attempts = 0
    while time.monotonic() - start < give_up_s:
        attempts += 1
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /gateways?uid=alice HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), give_up_s)
            writer.close()
        except (OSError, TimeoutError):
            answer = b""
        if answer.startswith(b"HTTP/1.1 200"):
            return time.monotonic() - start, attempts
        await asyncio.sleep(0.01)
    return float("inf"), attempts


async def _main(sockets: int, seconds: float) -> None:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'src'}"),
    )
    assert server.stdout is not None and server.stdin is not None
    port = int(server.stdout.readline())
    flood = _Flood(port, sockets)
    tasks = flood.start()
    t0 = time.monotonic()
    while flood.held < sockets and time.monotonic() - t0 < 5:
        await asyncio.sleep(0.1)
    print(f"flood: {flood.held} of {sockets} slowloris connections open after "
          f"{time.monotonic() - t0:.1f} s")
    results: list[tuple[float, int]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        results.append(await _legit(port, give_up_s=max(1.0, end - time.monotonic() + 5)))
        await asyncio.sleep(0.5)
    flood.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    server.stdin.close()
    server.wait(10)
    latencies = [r[0] for r in results]
    answered = [x for x in latencies if x != float("inf")]
    print(f"legitimate GET /gateways during the flood: {len(answered)}/{len(results)} answered")
    if answered:
        print(
            f"  seconds to answer: min {min(answered):.3f}  median "
            f"{statistics.median(answered):.3f}  max {max(answered):.3f}"
        )
    print("  each (s):", " ".join(f"{x:.2f}" for x in latencies))
    print(f"  attempts per answer: max {max(r[1] for r in results)}; "
          f"flood reconnects {flood.reopened}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sockets", type=int, default=1100)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(_serve())
    else:
        asyncio.run(_main(args.sockets, args.seconds))


if __name__ == "__main__":
    main()
