"""A sync flood by one logged-in user: what it does to everybody else (issue 8 #1).

Starts the reference cluster in this process with the SQLite store (a temporary
data directory), connects two honest clients (alice sends to bob every 20 ms) and
measures bob's send->push latency, first quietly, then while carol floods the
gateway with ``SyncRequest`` frames of 1000 entries at ~190 frames/s (under the
session's 200 frames/s): odd frames list one conversation 1000 times, even frames
1000 conversations she is not in. A kicked attacker reconnects at once.

Usage::

    python -m benchmarks.attack_sync [--quiet-s 2] [--flood-s 5] [--rate 190]

Prints p50/p99/max latency and the messages delivered per phase, the attacker's
frames, kicks and the logic server's sync counters. Caveats: one run, one process
(the attacker's client and the server share the loop and the CPU, as in the
issue's reproduction on one machine), loopback only; compare runs on the same
machine, not across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time

from examples.cluster import ClusterConfig, start_cluster
from examples.probe import RawClient

from imkit.aio import Client
from imkit.protocol import Kick, SyncRequest
from imkit.store import direct_conv_id


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _attack(host: str, port: int, token: str, last: int, stop: asyncio.Event,
                  rate: float, counts: dict[str, int]) -> None:
    same = (("team", last),) * 1000
    strangers = tuple((f"nowhere{j}", 0) for j in range(1000))
    while not stop.is_set():
        raw = await RawClient.connect(host, port)
        await raw.login(token, "evil")
        kicked = asyncio.Event()

        async def drain(raw: RawClient = raw, kicked: asyncio.Event = kicked) -> None:
            with contextlib.suppress(Exception):
                while True:
                    if isinstance(await raw.recv(30), Kick):
                        break
            kicked.set()

        drainer = asyncio.create_task(drain())
        while not stop.is_set() and not kicked.is_set():
            counts["frames"] += 1
            after = same if counts["frames"] % 2 else strangers
            raw.send(SyncRequest(req_id=counts["frames"], after=after))
            await asyncio.sleep(1 / rate)
        if kicked.is_set():
            counts["kicks"] += 1
        drainer.cancel()
        raw.abort()


async def main(quiet_s: float, flood_s: float, rate: float) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        cluster = await start_cluster(ClusterConfig(demo=True, data_dir=data_dir, web=False))
        try:
            conv = direct_conv_id("alice", "bob")
            alice = Client(token=cluster.token("alice", "phone"), device="phone",
                           endpoints=cluster.endpoints())
            bob = Client(token=cluster.token("bob", "phone"), device="phone",
                         endpoints=cluster.endpoints())
            await alice.start()
            await bob.start()
            await alice.send(conv, b"warm-up")
            sent: dict[bytes, tuple[str, float]] = {}
            got: dict[str, list[float]] = {"quiet": [], "flood": []}

            async def receive() -> None:
                async for push in bob.messages():
                    entry = sent.pop(push.body, None)
                    if entry is not None:
                        got[entry[0]].append(time.monotonic() - entry[1])

            async def talk(phase: str, seconds: float) -> int:
                n = 0
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    body = f"{phase}-{n}".encode()
                    sent[body] = (phase, time.monotonic())
                    alice.send_nowait(conv, body)
                    n += 1
                    await asyncio.sleep(0.02)
                return n

            receiver = asyncio.create_task(receive())
            quiet_sent = await talk("quiet", quiet_s)
            host, port = cluster.endpoints()[0].rsplit(":", 1)
            stop = asyncio.Event()
            counts = {"frames": 0, "kicks": 0}
            team_seq = await cluster.logic.store.last_seq("team")
            attacker = asyncio.create_task(_attack(
                host, int(port), cluster.token("carol", "evil"), team_seq, stop, rate, counts))
            flood_sent = await talk("flood", flood_s)
            stop.set()
            await asyncio.sleep(2.0)  # late deliveries still count (their latency shows it)
            receiver.cancel()
            attacker.cancel()
            await asyncio.gather(attacker, receiver, return_exceptions=True)
            for phase, n in (("quiet", quiet_sent), ("flood", flood_sent)):
                lat = got[phase]
                print(f"{phase:5}: {len(lat)}/{n} delivered, send->push p50 {_pct(lat, 0.5):.1f} ms"
                      f", p99 {_pct(lat, 0.99):.1f} ms, max {_pct(lat, 1.0):.1f} ms")
            stats = cluster.logic.stats.as_dict()
            keys = ("syncs", "sync_work", "sync_waits", "sync_cut")
            print(f"attacker: {counts['frames']} sync frames in {flood_s:.0f} s, "
                  f"{counts['kicks']} kicks; logic: "
                  + ", ".join(f"{k}={stats[k]}" for k in keys if k in stats))
            await alice.aclose()
            await bob.aclose()
        finally:
            await cluster.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quiet-s", type=float, default=2.0)
    parser.add_argument("--flood-s", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=190.0)
    args = parser.parse_args()
    asyncio.run(main(args.quiet_s, args.flood_s, args.rate))
