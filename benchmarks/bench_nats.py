"""NatsBus beside MemoryBus: publish rate, publish -> receive latency; NatsService round trips.

1. **Publish rate.** 20k envelopes of 200 bytes to one subject with one subscriber
   reading them: ``NatsBus.publish`` awaited one at a time (one PubAck round trip
   each), awaited with 64 publishers in flight, ``publish_nowait`` then one
   ``flush`` (the pipeline holds up to ``max_publishes_in_flight``; past it the
   publisher yields and retries, as a caller honouring the bound would), and
   ``MemoryBus.publish_nowait`` (no server: the floor). A rate counts until every
   publish is confirmed (for NATS: stored in the file-backed stream).
2. **Publish -> receive latency.** One envelope every 0.5 ms (2k/s, far below
   saturation), the publish time carried in the payload; the subscriber's
   ``next()`` returns it: p50 / p99 / max. For NATS this is publish, store, push to
   the consumer, the callback, the reader's wake-up.
3. **Request/reply.** ``NatsService.request`` to an echo handler in a queue group of
   one server: one at a time (p50 / p99 round trip) and 32 callers at once
   (requests/s).

Each measurement runs 3 times (medians reported; the spread is in the notes).

    python benchmarks/bench_nats.py            # a private nats-server -js (< 1 min)
    python benchmarks/bench_nats.py --quick    # smoke test
    python benchmarks/bench_nats.py --url nats://host:4222   # another server

Caveats: client, server and both ends of every exchange share one machine and one
Python process (loopback, no network; on a LAN add ~0.1-0.3 ms per hop), so the
client's CPU is usually the limit, not the server. The stream is on whatever disk
the temp directory is (nats-server does not fsync each message by default).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from _harness import Report, fmt_rate, quick
from imkit.aio.bus import MemoryBus
from imkit.aio.nats import NatsBus, NatsBusConfig, NatsService
from imkit.bus import Envelope
from imkit.errors import CapacityError

N_PUBLISH = 2_000 if quick() else 20_000
N_LATENCY = 500 if quick() else 4_000
N_RPC = 500 if quick() else 5_000
REPEAT = 1 if quick() else 3
BODY = b"x" * 200
PACE_S = 0.0005
PUBLISHERS = 64
CALLERS = 32

Publish = Callable[[bytes], Awaitable[Any]]


async def drain(sub: Any, n: int) -> None:
    """Read ``n`` envelopes (Lagged markers count what they stand for)."""
    k = 0
    while k < n:
        item = await sub.next()
        k += 1 if isinstance(item, Envelope) else item.missed


async def rate_awaited(bus: Any, n: int) -> float:
    sub = await bus.subscribe("gw-1", max_pending=n + 1)
    reader = asyncio.create_task(drain(sub, n))
    t0 = time.perf_counter()
    for _ in range(n):
        await bus.publish("gw-1", BODY)
    elapsed = time.perf_counter() - t0
    await reader
    await sub.aclose()
    return n / elapsed


async def rate_concurrent(bus: Any, n: int) -> float:
    per = n // PUBLISHERS
    sub = await bus.subscribe("gw-1", max_pending=n + 1)
    reader = asyncio.create_task(drain(sub, per * PUBLISHERS))

    async def publisher() -> None:
        for _ in range(per):
            await bus.publish("gw-1", BODY)

    t0 = time.perf_counter()
    await asyncio.gather(*(publisher() for _ in range(PUBLISHERS)))
    elapsed = time.perf_counter() - t0
    await reader
    await sub.aclose()
    return per * PUBLISHERS / elapsed


async def rate_nowait(bus: Any, n: int) -> float:
    sub = await bus.subscribe("gw-1", max_pending=n + 1)
    reader = asyncio.create_task(drain(sub, n))
    t0 = time.perf_counter()
    i = 0
    while i < n:
        try:
            bus.publish_nowait("gw-1", BODY)
            i += 1
        except CapacityError:  # max_publishes_in_flight: let PubAcks in, then go on
            await asyncio.sleep(0)
        if i % 1024 == 1023:  # a real caller yields between bursts; so does this one
            await asyncio.sleep(0)
    if isinstance(bus, NatsBus):
        await bus.flush()
    elapsed = time.perf_counter() - t0
    await reader
    await sub.aclose()
    return n / elapsed


async def latency(bus: Any, n: int, nowait: bool) -> list[float]:
    """Publish -> next() latencies in ms, one envelope every PACE_S."""
    sub = await bus.subscribe("gw-1", max_pending=n + 1)
    samples: list[float] = []

    async def reader() -> None:
        for _ in range(n):
            item = await sub.next()
            assert isinstance(item, Envelope)
            samples.append((time.perf_counter_ns() - int(item.payload)) / 1e6)

    task = asyncio.create_task(reader())
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(n):
        delay = start + i * PACE_S - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        payload = str(time.perf_counter_ns()).encode()
        if nowait:
            bus.publish_nowait("gw-1", payload)
        else:
            await bus.publish("gw-1", payload)
    await task
    await sub.aclose()
    return samples


async def rpc_latency(svc: NatsService, subject: str, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await svc.request(subject, BODY, timeout_s=2)
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return samples


async def rpc_rate(svc: NatsService, subject: str, n: int) -> float:
    per = n // CALLERS

    async def caller() -> None:
        for _ in range(per):
            await svc.request(subject, BODY, timeout_s=5)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return per * CALLERS / (time.perf_counter() - t0)


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of ascending values (examples.measure.percentile's rule)."""
    rank = -(-len(ordered) * q // 100)
    return ordered[max(0, int(rank) - 1)]


def pcts(samples: list[float]) -> tuple[str, str, str]:
    ordered = sorted(samples)
    return (
        f"{percentile(ordered, 50):.3f}",
        f"{percentile(ordered, 99):.3f}",
        f"{ordered[-1]:.3f}",
    )


async def main(url: str) -> Report:
    stream = f"IMKIT_BENCH_{int(time.time())}"
    config = NatsBusConfig(stream=stream, prefix=stream.lower(), max_msgs_per_subject=0)

    async def nats_bus() -> NatsBus:
        return await NatsBus.connect(url, config)

    async def memory_bus() -> MemoryBus[bytes]:
        return MemoryBus()

    async def repeat(
        make: Callable[[], Awaitable[Any]], run: Callable[[Any], Awaitable[Any]]
    ) -> list[Any]:
        out = []
        for _ in range(REPEAT):
            bus = await make()
            try:
                out.append(await run(bus))
            finally:
                await bus.aclose()
        return out

    report = Report("NatsBus and NatsService (JetStream, request/reply)")
    rows = []
    spread = []
    awaited_1 = "NatsBus.publish, awaited, 1 at a time"
    awaited_n = f"NatsBus.publish, awaited, {PUBLISHERS} in flight"
    cases: list[tuple[str, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[float]]]] = [
        (awaited_1, nats_bus, lambda b: rate_awaited(b, N_PUBLISH // 4)),
        (awaited_n, nats_bus, lambda b: rate_concurrent(b, N_PUBLISH)),
        ("NatsBus.publish_nowait + flush", nats_bus, lambda b: rate_nowait(b, N_PUBLISH)),
        ("MemoryBus.publish_nowait (no server)", memory_bus, lambda b: rate_nowait(b, N_PUBLISH)),
    ]
    for name, make, run in cases:
        rates = await repeat(make, run)
        rows.append([name, fmt_rate(statistics.median(rates))])
        spread.append(f"{name}: {' / '.join(fmt_rate(r) for r in sorted(rates))}")
    report.table(
        ["publisher", "envelopes/s (until confirmed)"],
        rows,
        title="Publish rate, 200-byte envelopes, one subscriber reading",
    )
    report.note("Runs (min / ... / max): " + "; ".join(spread) + ".")

    rows = []
    lat_cases: list[tuple[str, Callable[[], Awaitable[Any]], bool]] = [
        ("NatsBus.publish (awaited)", nats_bus, False),
        ("NatsBus.publish_nowait", nats_bus, True),
        ("MemoryBus.publish_nowait", memory_bus, True),
    ]
    for name, make, nowait in lat_cases:

        async def measure_latency(bus: Any, nowait: bool = nowait) -> list[float]:
            return await latency(bus, N_LATENCY, nowait)

        runs = await repeat(make, measure_latency)
        merged = [s for run in runs for s in run]
        rows.append([name, *pcts(merged)])
    title = f"Publish -> receive latency, one envelope every {PACE_S * 1000:g} ms"
    report.table(
        ["publisher", "p50 ms", "p99 ms", "max ms"],
        rows,
        title=f"{title} ({N_LATENCY} x {REPEAT})",
    )

    subject = f"imkit.bench.rpc.{stream.lower()}"
    server = await NatsService.connect(url)
    caller = await NatsService.connect(url)

    async def echo(data: bytes) -> bytes:
        return data

    await server.serve(subject, "logic", echo)
    try:
        await rpc_latency(caller, subject, 200)  # warm-up
        lat = []
        rates = []
        for _ in range(REPEAT):
            lat.extend(await rpc_latency(caller, subject, N_RPC // 2))
            rates.append(await rpc_rate(caller, subject, N_RPC))
    finally:
        await caller.aclose()
        await server.aclose()
    p50, p99, worst = pcts(lat)
    report.table(
        ["request/reply (200 bytes, echo)", "p50 ms", "p99 ms", "max ms", "requests/s"],
        [
            ["1 at a time", p50, p99, worst, fmt_rate(len(lat) / sum(lat) * 1000)],
            [f"{CALLERS} callers at once", "-", "-", "-", fmt_rate(statistics.median(rates))],
        ],
        title="NatsService round trips (caller and server on separate connections)",
    )

    import nats

    nc = await nats.connect(url)
    try:
        await nc.jsm().delete_stream(stream)
    finally:
        await nc.close()
    report.note(
        "Caveats: one Python process plays publisher, server-side consumer and "
        "reader; the nats-server runs on the same 2 cores. A publish's latency "
        "includes the store's write (file storage, no fsync per message)."
    )
    return report


def run() -> None:
    with ExitStack() as stack:
        if "--url" in sys.argv:
            url = sys.argv[sys.argv.index("--url") + 1]
        else:
            from tests.services import private_nats

            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            server = stack.enter_context(private_nats(workdir))
            url = f"nats://127.0.0.1:{server.port}"
        t0 = time.perf_counter()
        report = asyncio.run(main(url))
        report.note(f"Whole run: {time.perf_counter() - t0:.0f} s.")
        report.emit(__file__)


if __name__ == "__main__":
    run()
