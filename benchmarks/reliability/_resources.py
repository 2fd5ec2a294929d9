"""Scenario 4: a silent client, a slow reader and a connect flood against one gateway.

:func:`scenario_resources` runs rounds of bad peers beside a chatting fleet and
checks that the process lets go of all of them: file descriptors, gateway-side
sockets, connections, routes, parked sessions and (with tracemalloc) the Python
heap return to the baseline, and the others' latency is reported. Linux only: the
sockets and descriptors are read from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import tempfile
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.reliability._fleet import DEVICE, Layout, Population, drain, now
from benchmarks.reliability._report import ScenarioResult, ms
from examples.cluster import Cluster, ClusterConfig, start_cluster
from examples.gateway import GatewayConfig
from examples.logic import LogicConfig
from examples.measure import percentile_of, proc_rss_kib
from examples.probe import RawClient
from tests import history as _history
from tests.history import History, check_history, store_truth

from imkit.aio import Client, ClientStatus
from imkit.errors import CapacityError, ConnectionClosed
from imkit.policy import Backoff, HeartbeatPolicy
from imkit.protocol import (
    ErrorCode,
    Ping,
    encode,
)
from imkit.session import ClientConfig, ServerConfig

#: Where the harness allocates its own log (the history, the fleet, the scenarios):
#: left out of the heap figures, which are about what the servers hold.
_HARNESS_FILES = (os.path.join(os.path.dirname(__file__), "*"), _history.__file__)


def _socket_inodes_by_local_port(ports: set[int]) -> int:
    """Sockets of this process whose local port is one of ``ports`` (not listening)."""
    mine: set[str] = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                mine.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                local, state, inode = parts[1], parts[3], parts[9]
                port = int(local.rsplit(":", 1)[1], 16)
                if port in ports and state != "0A" and inode in mine:
                    count += 1
    return count


@dataclass
class Resources:
    """A snapshot of what the process holds."""

    fds: int
    server_sockets: int
    rss_kib: int
    traced_kib: float
    connections: int
    routes: int
    parked: int
    timers: int
    pause_s: float = 0.0  # how long taking this snapshot blocked the event loop


def _traced(snapshot: tracemalloc.Snapshot | None) -> float:
    if snapshot is None:
        return 0.0
    return sum(s.size for s in snapshot.statistics("filename")) / 1024


def _snapshot() -> tracemalloc.Snapshot | None:
    if not tracemalloc.is_tracing():
        return None
    return tracemalloc.take_snapshot().filter_traces(
        [
            *(tracemalloc.Filter(False, f) for f in _HARNESS_FILES),  # the harness's own log
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<unknown>"),
        ]
    )


def _measure(cluster: Cluster, ports: set[int]) -> tuple[Resources, tracemalloc.Snapshot | None]:
    start = now()
    gc.collect()
    snap = _snapshot()
    gws = cluster.gateways
    return (
        Resources(
            fds=len(os.listdir("/proc/self/fd")),
            server_sockets=_socket_inodes_by_local_port(ports),
            rss_kib=proc_rss_kib(),
            traced_kib=_traced(snap),
            connections=sum(g.connections for g in gws),
            routes=len(cluster.routes.table),
            parked=sum(len(g._parked) for g in gws),
            timers=sum(len(g.driver) for g in gws),
            pause_s=now() - start,
        ),
        snap,
    )


async def _flood(host: str, port: int, n: int, batch: int = 50) -> int:
    """Open and close ``n`` connections quickly (``batch`` at a time); return how many opened."""
    opened = 0

    async def one() -> bool:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()
        return True

    for start in range(0, n, batch):
        results = await asyncio.gather(*(one() for _ in range(min(batch, n - start))))
        opened += sum(results)
    return opened


@dataclass
class _Round:
    """One round of bad peers: what the process held while they stayed, and after."""

    start: float = 0.0
    end: float = 0.0
    injected: float = 0.0  # when the last bad peer arrived
    recovered_s: float | None = None  # from then until the gateway held none of them
    peers_open: Resources | None = None
    after: Resources | None = None
    snapshot: tracemalloc.Snapshot | None = None
    flooded: int = 0


async def _slow_reader(raw: RawClient, interval_s: float) -> None:
    """Keep a connection alive with pings and never read a byte."""
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        while not raw.writer.is_closing():
            raw.send(Ping())
            await asyncio.sleep(interval_s)


async def _feed(
    client: Client, conv: str, rate: float, done: Callable[[], bool], max_s: float
) -> None:
    """Send 1 KiB messages to ``conv`` at ``rate`` per second until ``done()`` (or ``max_s``)."""
    end = now() + max_s
    padding = b"x" * 1024
    while now() < end and not done():
        with contextlib.suppress(CapacityError, ConnectionClosed):
            client.send_nowait(conv, padding)[1].add_done_callback(_ignore)
        await asyncio.sleep(1 / rate)


def _ignore(fut: asyncio.Future[int]) -> None:
    if not fut.cancelled():
        fut.exception()


async def _discard(client: Client) -> None:
    async for _ in client.messages():
        pass


async def _bad_peers_round(
    cluster: Cluster,
    pop: Population,
    baseline: Resources,
    *,
    tag: str,
    phase_s: float,
    flood: int,
    idle: int,
    slowloris: int,
    feed_rate: float,
) -> _Round:
    """Chatter plus bad peers for ``phase_s``; wait for the gateway to drop them; measure."""
    gw = cluster.gateways[0]
    host, _, port_text = cluster.endpoints()[0].rpartition(":")
    port = int(port_text)
    r = _Round(start=now())
    pop.chatting.set()
    raws: list[RawClient] = []
    held: list[asyncio.StreamWriter] = []
    pinger: asyncio.Task[None] | None = None
    feeder = Client(
        token=cluster.token("feeder", tag),
        device=tag,
        endpoints=cluster.endpoints(),
        config=ClientConfig(reconnect=Backoff(base_ms=200, cap_ms=1000)),
    )
    feeding: list[asyncio.Task[None]] = []
    stats = gw.stats
    kicks = stats.slow_consumer_kicks
    try:
        await feeder.start()
        await feeder.wait_for(ClientStatus.ONLINE, timeout=10)
        feeding = [
            asyncio.get_running_loop().create_task(
                _feed(feeder, "slowroom", feed_rate, lambda: stats.slow_consumer_kicks > kicks, 20)
            ),
            asyncio.get_running_loop().create_task(_discard(feeder)),
        ]
        silent = await RawClient.connect(host, port)
        raws.append(silent)
        await silent.login(cluster.token("silent", tag), tag)  # then never a byte more
        slow = await RawClient.connect(host, port, rcvbuf=4096, limit=4096)
        raws.append(slow)
        await slow.login(cluster.token("slow", tag), tag)  # then pings, never reads
        pinger = asyncio.get_running_loop().create_task(_slow_reader(slow, 0.2))
        for _ in range(idle):  # connect, say nothing: the login deadline cuts them
            _, writer = await asyncio.open_connection(host, port)
            held.append(writer)
        header = encode(Ping())[:6]  # part of a header: the frame deadline cuts them
        for _ in range(slowloris):
            _, writer = await asyncio.open_connection(host, port)
            writer.write(header)
            held.append(writer)
        r.flooded = await _flood(host, port, flood)
        r.injected = now()
        await asyncio.sleep(max(0.0, r.start + phase_s - now()))
        r.end = now()
        pop.chatting.clear()
        await asyncio.gather(feeding[0], return_exceptions=True)  # until the slow one is cut
        await feeder.aclose()
        # the gateway must let go of every bad peer on its own, while they keep their sockets
        deadline = now() + 30.0
        while now() < deadline:
            if (
                gw.connections <= baseline.connections
                and len(cluster.routes.table) <= baseline.routes
                and len(gw._parked) <= baseline.parked
                and _socket_inodes_by_local_port({port}) <= baseline.server_sockets
            ):
                r.recovered_s = now() - r.injected
                break
            await asyncio.sleep(0.05)
        r.peers_open, _ = _measure(cluster, {port})
    finally:
        await feeder.aclose()
        if pinger is not None:
            feeding.append(pinger)
        for task in feeding:
            task.cancel()
        await asyncio.gather(*feeding, return_exceptions=True)
        for raw in raws:  # then they go away too, as their processes would exit
            raw.abort()
        for writer in held:
            writer.transport.abort()
        raws.clear()
        held.clear()
    await asyncio.sleep(0.5)
    r.after, r.snapshot = _measure(cluster, {port})
    return r


async def scenario_resources(
    *,
    clients: int = 40,
    rate: float = 2.0,
    phase_s: float = 6.0,
    flood: int = 500,
    idle: int = 50,
    slowloris: int = 20,
    grace_ms: int = 1000,
    feed_rate: float = 100.0,
    warmup: int = 70,
    n_rounds: int = 3,
    trace: bool = True,
    seed: int = 4,
) -> ScenarioResult:
    """Bad peers against one gateway, twice: memory and file handles return; others' p99."""
    began = now()
    started_tracing = False
    if trace and not tracemalloc.is_tracing():
        tracemalloc.start()
        started_tracing = True
    directory = tempfile.mkdtemp(prefix="imkit-rel-")
    server = ServerConfig(
        # 4 s of silence: longer than a measurement blocks the loop (gc + snapshot, ~1-2 s)
        heartbeat=HeartbeatPolicy(interval_ms=2000, missed=2),
        login_timeout_ms=1000,
        max_tracked_pushes=256,
        reconnect_min_ms=200,
        reconnect_max_ms=1000,
    )
    gateway_cfg = GatewayConfig(
        server=server,
        handshake_timeout_ms=1000,
        frame_timeout_ms=500,
        max_write_buffer=64 * 1024,
    )
    cfg = ClusterConfig(
        gateways=1,
        web=False,
        data_dir=directory,
        grace_ms=grace_ms,
        gateway=gateway_cfg,
        logic=LogicConfig(write_fanout_max=20),
    )
    layout = Layout.build(clients)
    cluster = await start_cluster(cfg)
    try:
        store = cluster.store
        layout.seed(store)
        for uid in ("silent", "slow", "feeder"):
            store.create_user(uid)
        store.create_group("slowroom", ["feeder", "slow"])
        for conv in layout.convs:  # the slow reader is in every group too
            if not conv.startswith("dm:"):
                store.join("slow", conv)
        gw = cluster.gateways[0]
        port = int(cluster.endpoints()[0].rpartition(":")[2])
        history = History(layout)
        pop = Population(
            layout,
            history,
            token=lambda uid: cluster.token(uid, DEVICE),
            endpoints=lambda i: cluster.endpoints(),
            rate=rate,
            reconnect=Backoff(base_ms=200, cap_ms=1000),
            seed=seed,
        )
        await pop.start()
        warmed = await pop.burst(warmup, lambda: cluster.store)  # bounded caches fill up
        pop.chatting.set()
        before_start = now()
        await asyncio.sleep(phase_s)
        before_end = now()
        pop.chatting.clear()
        await asyncio.sleep(1.5)  # acks and pings settle
        baseline, base_snap = _measure(cluster, {port})
        rounds = [
            await _bad_peers_round(
                cluster, pop, baseline, tag=tag, phase_s=phase_s, flood=flood, idle=idle,
                slowloris=slowloris, feed_rate=feed_rate,
            )
            for tag in (f"r{i + 1}" for i in range(max(2, n_rounds)))
        ]
        first, previous, second = rounds[0], rounds[-2], rounds[-1]
        drained = await drain(pop, lambda: cluster.store)
        truth = store_truth(cluster.store, layout.convs)
        lat_before = history.latency_between(before_start, before_end)
        lat_during = history.latency_between(first.start, first.end) + history.latency_between(
            second.start, second.end
        )
        check = check_history(
            history, truth, wire_duplicates=pop.wire_duplicates(), latencies=lat_during
        )
        closes = dict(gw.closes)
        stats = gw.stats.as_dict()
        cut = sum(max(0, c.logins - 1) for c in pop.clients.values())
        await pop.aclose()
    finally:
        await cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
        if started_tracing:
            tracemalloc.stop()
    assert first.after is not None and second.after is not None
    assert first.peers_open is not None and second.peers_open is not None
    growth = ""
    if previous.snapshot is not None and second.snapshot is not None:
        top = second.snapshot.compare_to(previous.snapshot, "lineno")[:3]
        growth = "; ".join(
            f"{s.traceback[0].filename.rsplit('/', 1)[-1]}:{s.traceback[0].lineno} "
            f"{s.size_diff / 1024:+.1f} KiB"
            for s in top
        )
    first_growth = ""
    if base_snap is not None and first.snapshot is not None:
        top = first.snapshot.compare_to(base_snap, "lineno")[:3]
        first_growth = "; ".join(
            f"{s.traceback[0].filename.rsplit('/', 1)[-1]}:{s.traceback[0].lineno} "
            f"{s.size_diff / 1024:+.1f} KiB"
            for s in top
        )
    per_round = 2 + idle + slowloris + flood
    delta1 = first.after.traced_kib - baseline.traced_kib
    assert previous.after is not None
    delta2 = second.after.traced_kib - previous.after.traced_kib
    heap_rounds = " / ".join(f"{r.after.traced_kib:.0f}" for r in rounds if r.after)
    recovered = [r.recovered_s for r in rounds]

    afters = [r.after for r in rounds if r.after is not None]
    opens = [r.peers_open for r in rounds if r.peers_open is not None]

    def each(get: Callable[[Resources], int], of: list[Resources]) -> str:
        return ", ".join(str(get(x)) for x in of)

    rows = [
        ("file descriptors: baseline / after each round",
         f"{baseline.fds} / {each(lambda x: x.fds, afters)}"),
        ("... while the bad peers still held their sockets (each round)",
         each(lambda x: x.fds, opens)),
        ("gateway-side sockets: baseline / while the bad peers held theirs (each round)",
         f"{baseline.server_sockets} / {each(lambda x: x.server_sockets, opens)}"),
        ("gateway connections: baseline / after each round",
         f"{baseline.connections} / {each(lambda x: x.connections, afters)}"),
        ("routes (live + grace): baseline / after each round",
         f"{baseline.routes} / {each(lambda x: x.routes, afters)}"),
        ("parked sessions, gateway timers after the last round",
         f"{second.after.parked}, {second.after.timers} (baseline {baseline.parked}, "
         f"{baseline.timers})"),
        ("Python heap (tracemalloc, harness excluded): baseline / after each round",
         f"{baseline.traced_kib:.0f} / {heap_rounds} KiB" if trace else "not traced"),
        ("heap growth: first round / last round (a leak grows every round)",
         f"{delta1:+.0f} KiB / {delta2:+.0f} KiB ({delta2 * 1024 / per_round:+.0f} bytes per "
         f"bad connection)" if trace else "not traced"),
        ("RSS: baseline / after each round",
         f"{baseline.rss_kib / 1024:.1f} / "
         + ", ".join(f"{x.rss_kib / 1024:.1f}" for x in afters) + " MiB"),
        ("last bad peer in -> gateway holds none of them (each round)",
         ", ".join(ms(x) if x is not None else "never" for x in recovered)),
        ("bad peers per round", f"1 silent, 1 slow reader, {idle} idle, {slowloris} slowloris, "
         f"{first.flooded}/{flood} flood connections"),
        ("closes by code (all rounds and the clients)", ", ".join(
            f"{ErrorCode(k).name if k in ErrorCode._value2member_map_ else k}: {v}"
            for k, v in sorted(closes.items()))),
        ("heartbeat timeouts / slow-consumer kicks / login timeouts",
         f"{stats['heartbeat_timeouts']} / {stats['slow_consumer_kicks']} / "
         f"{stats['login_timeouts']}"),
        ("others' delivery latency p50 / p99 before",
         f"{ms(percentile_of(lat_before, 50))} / {ms(percentile_of(lat_before, 99))} "
         f"(n={len(lat_before)})"),
        ("others' delivery latency p50 / p99 during the bad peers",
         f"{ms(percentile_of(lat_during, 50))} / {ms(percentile_of(lat_during, 99))} "
         f"(n={len(lat_during)})"),
        ("history: lost / unexpected / app duplicates / order violations",
         f"{check.lost} / {check.unexpected} / {check.app_duplicates} / "
         f"{check.order_violations}"),
        ("well-behaved clients cut (reconnects)", str(cut)),
        ("drain time", ms(drained.drain_s)),
        ("longest event-loop pause of a measurement (gc + tracemalloc snapshot)",
         ms(max([baseline.pause_s, *(x.pause_s for x in afters + opens)]))),
        ("warm-up", f"{warmed} messages in {ms(pop.burst_s)}"),
    ]
    if first_growth:
        rows.append(("largest heap growth in round 1 (file:line)", first_growth))
    if growth:
        rows.append(("largest heap growth in the last round (file:line)", growth))
    setup = (
        f"{clients} clients on one gateway (SQLite store, so stored messages are not on the "
        f"Python heap), chatting at {rate:g} msg/s each. Heartbeat 2 s x 2 missed, login "
        f"deadline 1 s, frame deadline 500 ms, grace {grace_ms} ms, `max_tracked_pushes=256`, "
        f"`max_write_buffer=64 KiB`. Warm-up: every client sends {warmup} messages, ten at a "
        f"time (so that the bounded per-session caches, e.g. the 64-entry ack cache, are full "
        f"before the baseline). Phase 1 ({phase_s:g} s): chatter only; the baseline is "
        f"taken with the chatter paused. Then {len(rounds)} identical rounds of {phase_s:g} "
        f"s, each chatter plus: a silent client (logs in, then never reads or writes), a "
        f"slow reader (logs in with a 4 KiB receive buffer, pings every 200 ms, never "
        f"reads; a feeder client sends it {feed_rate:g} msg/s of 1 KiB in a room of two "
        f"until it is cut), "
        f"{idle} connections that never log in, {slowloris} that send 6 bytes of a header, "
        f"and a flood of {flood} connections opened and closed 50 at a time. "
        f"The bad peers keep their sockets open until the gateway has let go of all of them; "
        f"only then do they close (as their processes would exit) and the round's figures "
        f"are taken (after `gc.collect()`)."
    )
    notes = [
        "File descriptors count both ends of every loopback connection (the clients live in "
        "this process too); the gateway-side count is the sockets whose local port is the "
        "gateway's, read from /proc/net/tcp.",
        "Round 1 may grow the heap once: hash tables and free lists sized for the flood's "
        "peak (asyncio's task WeakSet, the loop's selector map, the timing wheel's overflow "
        "level, dicts with deletions) do not shrink. A leak grows again in every later "
        "round (a connection with its session costs a few KiB); the verdict uses the last "
        "round's growth (under 256 bytes per bad connection), the file descriptors, the "
        "gateway-side sockets and the gateway's tables. RSS is shown for information "
        "(CPython keeps freed arenas). The harness keeps no object a client decoded, so "
        "its own log is left out of the heap figures by file.",
        "A round's bad peers are all gone about 4 s (heartbeat deadline) + 1 s (grace) "
        "after the silent client logged in, and 5 s (`close_timeout_ms`: the Kick a slow "
        "reader is sent never drains) after the slow reader was cut.",
        "The slow reader is cut by `max_tracked_pushes` (256 unacknowledged pushes) or by "
        "`max_write_buffer`, whichever comes first. Both only count what the gateway holds: "
        "the kernel's send buffer (loopback autotunes it to megabytes) fills first. A "
        "client that pings but never reads, with little traffic for it, therefore stays "
        "connected for a long time (an earlier run of this scenario with fewer pushes kept "
        "it for 30 s): its pushes are resent 3 times and given up with a Notify, and "
        "nothing cuts it until one of those limits is crossed.",
    ]
    heap_ok = not trace or delta2 < 0.25 * per_round
    passed = (
        check.passed
        and all(x.fds <= baseline.fds for x in afters)
        and all(x.server_sockets <= baseline.server_sockets for x in opens)
        and all(x.connections <= baseline.connections for x in afters)
        and all(x.routes <= baseline.routes for x in afters)
        and second.after.parked <= baseline.parked
        and heap_ok
        and all(x is not None for x in recovered)
        and stats["slow_consumer_kicks"] >= len(rounds)
        and stats["heartbeat_timeouts"] >= len(rounds)
        and cut == 0
    )
    return ScenarioResult(
        "resources", "4. A silent client, a slow reader and a connect flood", passed, setup,
        rows, notes, check, now() - began,
    )
