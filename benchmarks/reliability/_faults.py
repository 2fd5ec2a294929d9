"""Scenarios 1-3: a gateway killed, the server side restarted, push acks dropped.

Each starts the reference system in this process, drives a :class:`Population`
through the fault, drains, and checks the history against the store:
:func:`scenario_gateway_kill` (one of 3 gateways dies under load; its clients
must come back elsewhere), :func:`scenario_restart` (the whole server side
crashes and restarts on its SQLite data directory: no seq reused) and
:func:`scenario_dropped_acks` (a proxy drops 30% of the clients' PushAcks: only
wire duplicates).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import shutil
import socket
import tempfile

from benchmarks.reliability._fleet import DEVICE, Layout, Population, drain, now, rotated
from benchmarks.reliability._report import ScenarioResult, check_rows, histogram, ms
from examples.cluster import Cluster, ClusterConfig, start_cluster
from examples.faultproxy import FaultProxy, LinkFaults, kill_gateway
from examples.gateway import GatewayConfig
from examples.logic import LogicConfig
from examples.measure import percentile_of
from tests.history import History, check_history, store_truth

from imkit.policy import Backoff, ExponentialBackoff
from imkit.protocol import (
    FrameType,
)
from imkit.session import ServerConfig
from imkit.store import MessageStore

# --- scenario 1: kill one of 3 gateways ------------------------------------------------------


async def scenario_gateway_kill(
    *,
    clients: int = 120,
    gateways: int = 3,
    rate: float = 1.0,
    load_s: float = 12.0,
    kill_at_s: float = 4.0,
    reconnect_min_ms: int = 1000,
    reconnect_max_ms: int = 5000,
    seed: int = 1,
) -> ScenarioResult:
    """Kill one of ``gateways`` gateways under load (no Kick, its routes left bound)."""
    began = now()
    server = ServerConfig(reconnect_min_ms=reconnect_min_ms, reconnect_max_ms=reconnect_max_ms)
    layout = Layout.build(clients)
    cfg = ClusterConfig(
        gateways=gateways,
        web=False,
        gateway=GatewayConfig(server=server),
        logic=LogicConfig(write_fanout_max=20),
    )
    cluster = await start_cluster(cfg)
    try:
        layout.seed(cluster.store)
        history = History(layout)
        pop = Population(
            layout,
            history,
            token=lambda uid: cluster.token(uid, DEVICE),
            endpoints=rotated(cluster.endpoints()),
            rate=rate,
            reconnect=Backoff(base_ms=reconnect_min_ms, cap_ms=reconnect_max_ms),
            seed=seed,
        )
        await pop.start()
        pop.chatting.set()
        load_start = now()
        await asyncio.sleep(kill_at_s)
        victim = cluster.gateways[1 % gateways]
        victim_ep = victim.tcp_endpoint.removeprefix("tcp://")
        orphans = [
            uid
            for uid, c in pop.clients.items()
            if c.endpoint is not None and f"{c.endpoint.host}:{c.endpoint.port}" == victim_ep
        ]
        t_kill = now()
        dropped = await kill_gateway(victim)
        reconnect: dict[str, float] = {}
        async with asyncio.timeout(60):
            while len(reconnect) < len(orphans):
                for uid in orphans:
                    if uid not in reconnect:
                        after = [t for t in pop.logins[uid] if t > t_kill]
                        if after:
                            reconnect[uid] = after[0] - t_kill
                await asyncio.sleep(0.01)
        await asyncio.sleep(max(0.0, load_start + load_s - now()))
        load_end = now()
        drained = await drain(pop, lambda: cluster.store)
        truth = store_truth(cluster.store, layout.convs)
        check = check_history(history, truth, wire_duplicates=pop.wire_duplicates())
        stale = cluster.routes.table.group_by_gateway(layout.users).get(victim.id, [])
        survivors = {
            g.id: g.connections for g in cluster.gateways if g is not victim
        }
        lat_before = history.latency_between(load_start, t_kill)
        lat_after = history.latency_between(t_kill, load_end)
        by_kind = history.latency_by_kind(t_kill, load_end)
        await pop.aclose()
    finally:
        await cluster.stop()
    times = sorted(reconnect.values())
    all_back = len(times) == len(orphans) and len(orphans) > 0
    rows = [
        *check_rows(check),
        ("clients on the killed gateway (orphans)", f"{len(orphans)} (sockets dropped: {dropped})"),
        ("orphans reconnected", f"{len(times)} / {len(orphans)}"),
        ("reconnect time after the kill p50 / p90 / max",
         f"{ms(percentile_of(times, 50))} / {ms(percentile_of(times, 90))} / "
         f"{ms(max(times, default=0))}"),
        ("reconnect histogram (100 ms buckets)", histogram(times, 0.1, 12)),
        ("connections per surviving gateway afterwards",
         ", ".join(f"{k}: {v}" for k, v in survivors.items())),
        ("routes still bound to the dead gateway after the drain", str(len(stale))),
        ("latency p99 before / after the kill",
         f"{ms(percentile_of(lat_before, 99))} / {ms(percentile_of(lat_after, 99))}"),
        ("latency p50 / p99 after the kill by conversation",
         ", ".join(f"{k}: {ms(percentile_of(v, 50))} / {ms(percentile_of(v, 99))}"
                   for k, v in by_kind.items())),
        ("caught up without an explicit sync", "yes" if not drained.behind_before_sync else
         f"no ({drained.behind_before_sync} member x conv pairs behind)"),
        ("drain time (load end -> every member caught up)", ms(drained.drain_s)),
    ]
    setup = (
        f"{clients} clients on {gateways} gateways (client *i* tries gateway *i* mod "
        f"{gateways} first), each sending {rate:g} msg/s for {load_s:g} s: 45% to its 1:1 "
        f"partner, 45% to its group of 10 (write fan-out), 10% to the group of all "
        f"{clients} (merged read fan-out, `write_fanout_max=20`). At {kill_at_s:g} s gateway "
        f"`{victim.id}` is killed in-process (`examples.faultproxy.kill_gateway`: listener "
        f"and client sockets aborted without a Kick, handlers cancelled, bus subscription "
        f"closed, its routes left bound as a dead process leaves them). The server's "
        f"LoginAck reconnect bounds are {reconnect_min_ms}-{reconnect_max_ms} ms (full "
        f"jitter: the first reconnect waits uniform [0, {reconnect_min_ms}) ms)."
    )
    notes = [
        "Reconnect time = first LoginAck after the kill; it includes the jittered wait, a "
        "refused connect to the dead endpoint when the client tried it first, and the login.",
        "Latency counts from the send to the delivery to each other member, so messages sent "
        "to or by an orphan while it was reconnecting carry its reconnect time.",
    ]
    stall = percentile_of(by_kind["all"], 99)
    if stall > 2.0:
        notes.append(
            f"The group of all stalls for up to `fanout_timeout_ms` (5 s; p99 here "
            f"{ms(stall)}): its merged fan-outs addressed to the dead gateway (its routes "
            f"are still bound until each orphan logs in again) are never confirmed, so they "
            f"hold the group's in-flight slots (`merge_inflight`, 4) until the timeout frees "
            f"them. Nothing is lost, but every member waits. Unbinding a vanished gateway's "
            f"routes (`RouteService.unbind_gateway` when its registry entry expires), or "
            f"finishing a fan-out ticket at once when the bus has no subscriber for the "
            f"subject, would shorten it."
        )
    passed = check.passed and all_back and drained.caught_up
    return ScenarioResult(
        "kill", "1. A gateway killed under load", passed, setup, rows, notes, check,
        now() - began,
    )


# --- scenario 2: restart the server side on its SQLite data directory --------------------------


def _free_port_block(n: int) -> int:
    """A port p such that p .. p+n-1 are free now (best effort)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n >= 65535:
            continue
        ok = True
        for port in range(base, base + n):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise OSError(errno.EADDRINUSE, f"no block of {n} free ports on 127.0.0.1")


async def crash(cluster: Cluster) -> None:
    """Stop a cluster the way a killed process stops: no Kick, no clean store close."""
    for gateway in cluster.gateways:
        await kill_gateway(gateway)
    cluster.logic.close()
    cluster.routes.close()
    await cluster.bus.aclose()
    if cluster.ipconf is not None:
        await cluster.ipconf.stop()
    cluster._stopped = True  # the store stays open, uncommitted nothing: see SqliteStore


async def scenario_restart(
    *,
    clients: int = 40,
    gateways: int = 2,
    rate: float = 2.0,
    restarts: int = 2,
    phase_s: float = 4.0,
    downtime_s: float = 1.0,
    ack_drop: float = 0.1,
    data_dir: str | None = None,
    seed: int = 2,
) -> ScenarioResult:
    """Crash the whole server side and start it again on the same SQLite data directory."""
    began = now()
    own_dir = data_dir is None
    directory = data_dir or tempfile.mkdtemp(prefix="imkit-rel-")
    base = _free_port_block(gateways)
    server = ServerConfig(reconnect_min_ms=200, reconnect_max_ms=1000)
    cfg = ClusterConfig(
        gateways=gateways,
        web=False,
        tcp_port_base=base,
        data_dir=directory,
        secret=os.urandom(32),
        gateway=GatewayConfig(server=server),
        logic=LogicConfig(write_fanout_max=20),
    )
    layout = Layout.build(clients)
    stores: list[MessageStore] = []
    cluster = await start_cluster(cfg)
    stores.append(cluster.store)
    current = [cluster]
    back_online: list[float] = []
    first_ack: list[float] = []
    proxies: list[FaultProxy] = []
    try:
        layout.seed(cluster.store)
        history = History(layout)
        rng = random.Random(seed)
        for i in range(gateways):  # lost SendAcks: the clients resend, the store dedups
            faults = LinkFaults(drop_types=frozenset({FrameType.SEND_ACK}), drop_rate=ack_drop)
            proxy = FaultProxy("127.0.0.1", base + i, s2c=faults, rng=random.Random(rng.random()))
            await proxy.start()
            proxies.append(proxy)
        pop = Population(
            layout,
            history,
            token=lambda uid: cluster.token(uid, DEVICE),
            endpoints=rotated([p.endpoint for p in proxies]),
            rate=rate,
            reconnect=Backoff(base_ms=200, cap_ms=1000),
            seed=seed,
        )
        await pop.start()
        pop.chatting.set()
        await asyncio.sleep(phase_s)
        for _ in range(restarts):
            await crash(current[-1])
            await asyncio.sleep(downtime_s)
            restarted = now()
            fresh = await start_cluster(cfg)
            current.append(fresh)
            stores.append(fresh.store)
            async with asyncio.timeout(60):
                while pop.online() < len(pop.clients):
                    await asyncio.sleep(0.01)
            back_online.append(now() - restarted)
            acked = [r.t_done for r in history.sends.values()
                     if r.outcome == "ok" and r.t_done >= restarted]
            first_ack.append(min(acked) - restarted if acked else float("nan"))
            await asyncio.sleep(phase_s)
        for proxy in proxies:  # the faults end; the drain runs clean
            proxy.s2c.drop_rate = 0.0
        final = current[-1]
        drained = await drain(pop, lambda: final.store)
        truth = store_truth(final.store, layout.convs)
        check = check_history(history, truth, wire_duplicates=pop.wire_duplicates())
        duplicates_answered = sum(c.logic.stats.duplicates for c in current)
        acks_dropped = sum(p.stats.frames_dropped.get(FrameType.SEND_ACK, 0) for p in proxies)
        await pop.aclose()
    finally:
        for proxy in proxies:
            await proxy.aclose()
        await current[-1].stop()
        for store in stores:
            with contextlib.suppress(Exception):
                store.close()
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
    rows = [
        *check_rows(check),
        ("restarts", str(restarts)),
        ("all clients back online after each restart",
         ", ".join(ms(t) for t in back_online)),
        ("first acknowledged send after each restart",
         ", ".join(ms(t) for t in first_ack)),
        ("send acks dropped by the proxies", str(acks_dropped)),
        ("resent cids answered from the store (idempotency)", str(duplicates_answered)),
        ("seq holes in the store", str(check.seq_holes)),
        ("caught up without an explicit sync", "yes" if not drained.behind_before_sync else
         f"no ({drained.behind_before_sync} member x conv pairs behind)"),
        ("drain time", ms(drained.drain_s)),
    ]
    setup = (
        f"{clients} clients on {gateways} gateways with the SQLite store (`--data-dir`), "
        f"each sending {rate:g} msg/s in the same mix as scenario 1. Every {phase_s:g} s "
        f"the whole server side crashes ({restarts} times): gateways killed as in scenario "
        f"1, the logic server's timers, the route table and the bus dropped, the store "
        f"connection *not* closed; {downtime_s:g} s later a new cluster starts on the same "
        f"data directory and ports. Clients keep sending throughout (offline sends queue, "
        f"unacknowledged ones are resent with the same cid), through proxies that drop "
        f"{ack_drop:.0%} of the `SendAck` frames, so that resends of stored messages reach "
        f"the restarted server, whose sessions have forgotten every cid: only the store's "
        f"(sender, cid) key can answer them. Seq reuse counts (conv, seq) "
        f"pairs seen with two different bodies by any observer: the acks, the deliveries "
        f"and the final store."
    )
    notes = [
        "Seqs come from the store (`last_seq` committed with the message in one SQLite "
        "transaction), so the restart of the logic server and of the store is the same event.",
        "The wire duplicates come from the inbox sync after each restart: the logic server "
        "keeps what each device holds (its cursors) in memory, so a restarted one pages "
        "every conversation from seq 0 and the clients' SeqWindows drop what they had. "
        "Correct, but the bytes grow with history; persisting the device cursors would "
        "avoid it.",
        "The drain includes waiting for the sends whose SendAck was dropped: the client "
        "resends them after its 2 s retry timer.",
    ]
    passed = check.passed and drained.caught_up
    return ScenarioResult(
        "restart", "2. The server side restarted on its data directory", passed, setup, rows,
        notes, check, now() - began,
    )


# --- scenario 3: 30% of the clients' push acks dropped ------------------------------------------


async def scenario_dropped_acks(
    *,
    clients: int = 40,
    gateways: int = 2,
    rate: float = 2.0,
    load_s: float = 8.0,
    drop_rate: float = 0.3,
    seed: int = 3,
) -> ScenarioResult:
    """Drop ``drop_rate`` of the PushAck frames between the clients and the gateways."""
    began = now()
    retry = ExponentialBackoff(base_ms=300, cap_ms=1200, max_attempts=3)
    server = ServerConfig(reconnect_min_ms=200, reconnect_max_ms=1000, push_retry=retry)
    layout = Layout.build(clients)
    cfg = ClusterConfig(
        gateways=gateways,
        web=False,
        gateway=GatewayConfig(server=server),
        logic=LogicConfig(write_fanout_max=20),
    )
    cluster = await start_cluster(cfg)
    proxies: list[FaultProxy] = []
    try:
        layout.seed(cluster.store)
        rng = random.Random(seed)
        for ep in cluster.endpoints():
            host, _, port = ep.rpartition(":")
            faults = LinkFaults(drop_types=frozenset({FrameType.PUSH_ACK}), drop_rate=drop_rate)
            proxy = FaultProxy(host, int(port), c2s=faults, rng=random.Random(rng.random()))
            await proxy.start()
            proxies.append(proxy)
        history = History(layout)
        pop = Population(
            layout,
            history,
            token=lambda uid: cluster.token(uid, DEVICE),
            endpoints=rotated([p.endpoint for p in proxies]),
            rate=rate,
            reconnect=Backoff(base_ms=200, cap_ms=1000),
            seed=seed,
        )
        await pop.start()
        pop.chatting.set()
        await asyncio.sleep(load_s)
        for proxy in proxies:  # the fault ends with the load; the drain runs clean
            proxy.c2s.drop_rate = 0.0
        drained = await drain(pop, lambda: cluster.store)
        await asyncio.sleep(retry.delay_ms(0) / 1000 * 2)  # retries in flight land
        truth = store_truth(cluster.store, layout.convs)
        check = check_history(history, truth, wire_duplicates=pop.wire_duplicates())
        dropped = sum(p.stats.frames_dropped.get(FrameType.PUSH_ACK, 0) for p in proxies)
        relayed = sum(p.stats.frames_relayed.get(FrameType.PUSH_ACK, 0) for p in proxies)
        gw_stats = [g.stats for g in cluster.gateways]
        retried = sum(s.pushes_retried for s in gw_stats)
        abandoned = sum(s.pushes_abandoned for s in gw_stats)
        reconnects = sum(max(0, c.logins - 1) for c in pop.clients.values())
        await pop.aclose()
    finally:
        for proxy in proxies:
            await proxy.aclose()
        await cluster.stop()
    rows = [
        *check_rows(check),
        ("push acks dropped by the proxy / relayed",
         f"{dropped} / {relayed} ({dropped / max(1, dropped + relayed):.0%} dropped)"),
        ("pushes resent by the gateways / given up (then Notify + sync)",
         f"{retried} / {abandoned}"),
        ("client reconnects", str(reconnects)),
        ("drain time", ms(drained.drain_s)),
    ]
    setup = (
        f"{clients} clients on {gateways} gateways, each behind an "
        f"`examples.faultproxy.FaultProxy` that drops {drop_rate:.0%} of the `PushAck` frames "
        f"from the clients (it splits the stream on frame headers; every other frame passes "
        f"byte for byte), {rate:g} msg/s per client for {load_s:g} s in the same mix as "
        f"scenario 1. Push retries shortened to 300 ms, 600 ms, 1.2 s (default 3, 6, 12 s) so "
        f"that they happen within the run. The drops stop when the load stops."
    )
    notes = [
        "Acks are cumulative: a dropped ack is usually covered by the next one, so only the "
        "pushes at the end of a burst are resent. Every resend reaches the client as a "
        "duplicate on the wire, and its SeqWindow drops it.",
    ]
    passed = check.passed and drained.caught_up and dropped > 0
    return ScenarioResult(
        "acks", f"3. {drop_rate:.0%} of the clients' push acks dropped", passed, setup, rows,
        notes, check, now() - began,
    )
