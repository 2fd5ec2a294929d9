"""Faults of the reference system across processes: ``python -m benchmarks.process_faults``.

Each scenario starts ``python -m examples.cluster --processes --gateways 3 --logic 2``
on Redis, NATS JetStream and PostgreSQL (a fresh namespace; private servers where
the scenario restarts one), connects ``--clients`` clients spread over the
gateways, and sends ``--rate`` messages a second (1:1 pairs and groups of 10) for
``--duration`` seconds while the fault happens at ``--fault-at`` seconds. Every
send and delivery goes to the history checker (tests/history.py), which counts
lost, unexpected, duplicated and misordered messages and seq reuse against what
PostgreSQL holds. Reported per scenario: the check, p50/p99/max from send to
delivery (whole run, and the 10 s after the fault), how many clients lost their
connection, when they were back (the reconnect spread: first, median, last
after the fault) and the time to full recovery (every client online again).

Scenarios (``--scenario NAME``, repeatable; default: all):

=================  ==========================================================
kill-gateways      ``kill -9`` gw-1 at the fault time, gw-2 15 s later
kill-logic         ``kill -9`` logic-1
stop-logic         ``kill -STOP`` logic-1 for 10 s, then ``-CONT``
restart-nats       a private ``nats-server -js`` (file store) killed, started 2 s later
restart-redis      a private ``redis-server`` (keeps nothing) killed and started again
postgres-5s        PostgreSQL behind a proxy that swallows everything for 5 s
proxy-delay        clients -> gateways through a proxy adding 200 ms per chunk for 10 s
proxy-slice        the same proxy cutting the stream into 1-7 byte slices for 10 s
proxy-blackhole    the same proxy swallowing everything for 5 s, then resetting
drop-acks          30 % of the clients' push acks dropped by the proxy, whole run
=================  ==========================================================

``--write`` saves the section as benchmarks/reliability/processes.md (which
``python -m benchmarks.reliability`` stitches into docs/reliability.md) and
replaces it in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from examples.faultproxy import FaultProxy, LinkFaults
from examples.measure import machine, percentile_of
from tests.history import History, check_history
from tests.procs import Launched, backends, client, launched, pump, replace_flag, truth
from tests.services import postgres_dsn, private_nats, private_redis

from imkit.aio import Client, ClientStatus
from imkit.protocol import FrameType
from imkit.store import direct_conv_id

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = (
    "kill-gateways",
    "kill-logic",
    "stop-logic",
    "restart-nats",
    "restart-redis",
    "postgres-5s",
    "proxy-delay",
    "proxy-slice",
    "proxy-blackhole",
    "drop-acks",
)
GROUP_SIZE = 10
START = "<!-- process-faults -->"
END = "<!-- /process-faults -->"
LIMITS = "## Limits against hostile users and unlucky operators"
SECTION_HEAD = f"""{START}
## 6. The cluster across processes: kill -9, SIGSTOP, backend restarts, a bad network

Produced by `python -m benchmarks.process_faults` (see its module doc). The system
runs as real processes (`--processes --gateways 3 --logic 2`) on Redis, NATS
JetStream and PostgreSQL; the faults are real signals, real server restarts and a
TCP proxy. Counted by the same history checker, against what PostgreSQL holds.
"clients cut": clients that lost their connection after the fault; "back": seconds
from the fault until the first, the median and the last of them was online again
(the last is the time to full recovery). p99 is from send to delivery to the other
members; "10 s after" covers the deliveries in the 10 s after the fault began.
For kill-gateways the times count from the first kill; the second gateway dies
15 s later, so the clients of each kill form two groups (about 0.05-1 s after each
kill), and "all back" is about a second after the second kill.
"""
SECTION_TAIL = END


class Layout:
    """users user001..userN; 1:1 pairs (1,2), (3,4)...; groups of 10 of the first users."""

    def __init__(self, n: int, groups: int) -> None:
        self.users = tuple(f"user{i:03d}" for i in range(1, n + 1))
        self.convs: dict[str, tuple[str, ...]] = {}
        self.partner: dict[str, str] = {}
        for a, b in zip(self.users[0::2], self.users[1::2], strict=False):
            self.convs[direct_conv_id(a, b)] = (a, b)
            self.partner[a] = self.partner[b] = direct_conv_id(a, b)
        self.group_of: dict[str, str] = {}
        for g in range(groups):
            members = self.users[g * GROUP_SIZE : (g + 1) * GROUP_SIZE]
            if len(members) == GROUP_SIZE:
                self.convs[f"g{g}"] = members
                for uid in members:
                    self.group_of[uid] = f"g{g}"
        self.big = ""


def post_admin(ipconf: str, op: str, args: list[str]) -> Any:
    """``POST <ipconf>/admin`` (development mode)."""
    body = json.dumps({"op": op, "args": args}).encode()
    request = urllib.request.Request(
        ipconf + "/admin", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


class Watch:
    """Polls every client's status: who went offline after the fault, when each came back."""

    def __init__(self, clients: dict[str, Client]) -> None:
        self.clients = clients
        self.fault_t = 0.0
        self.down: dict[str, float] = {}  # uid -> first time seen offline after the fault
        self.back: dict[str, float] = {}  # uid -> first time online again after that

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            for uid, c in self.clients.items():
                online = c.state is ClientStatus.ONLINE
                if self.fault_t and now >= self.fault_t:
                    if not online and uid not in self.down:
                        self.down[uid] = now
                    elif online and uid in self.down and uid not in self.back:
                        self.back[uid] = now
            await asyncio.sleep(0.02)


async def scenario(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Run one scenario; its figures."""
    async with AsyncExitStack() as stack:
        flags, ns = await stack.enter_async_context(backends())
        fault: Callable[[Launched], Awaitable[None]]
        proxies: list[FaultProxy] = []
        loop = asyncio.get_running_loop()

        if name == "restart-nats":
            server = stack.enter_context(private_nats(tmp))
            flags = replace_flag(flags, "--nats", f"nats://127.0.0.1:{server.port}")

            async def fault(_: Launched) -> None:
                server.kill()
                await asyncio.sleep(2.0)
                await asyncio.to_thread(server.start)

        elif name == "restart-redis":
            rserver = stack.enter_context(private_redis(tmp))
            flags = replace_flag(flags, "--redis", f"redis://127.0.0.1:{rserver.port}/0")

            async def fault(_: Launched) -> None:
                await asyncio.to_thread(rserver.restart)

        elif name == "postgres-5s":
            dsn = urlsplit(postgres_dsn())
            pg = FaultProxy(dsn.hostname or "127.0.0.1", dsn.port or 5432)
            await pg.start()
            stack.push_async_callback(pg.aclose)
            via = dsn._replace(netloc=f"{dsn.username}@127.0.0.1:{pg.port}").geturl()
            flags = replace_flag(flags, "--postgres", via)

            async def fault(_: Launched) -> None:
                pg.refuse = True
                pg.c2s.blackhole = pg.s2c.blackhole = True
                await asyncio.sleep(5.0)
                pg.reset()
                pg.refuse = False
                pg.c2s.blackhole = pg.s2c.blackhole = False

        elif name == "kill-gateways":

            async def fault(launch: Launched) -> None:
                os.kill(launch.process("gw-1")["pid"], signal.SIGKILL)
                await asyncio.sleep(15.0)
                os.kill(launch.process("gw-2")["pid"], signal.SIGKILL)

        elif name == "kill-logic":

            async def fault(launch: Launched) -> None:
                os.kill(launch.process("logic-1")["pid"], signal.SIGKILL)

        elif name == "stop-logic":

            async def fault(launch: Launched) -> None:
                pid = launch.process("logic-1")["pid"]
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(10.0)
                os.kill(pid, signal.SIGCONT)

        else:  # proxy faults between clients and gateways

            async def fault(_: Launched) -> None:
                if name == "proxy-delay":
                    for p in proxies:
                        p.c2s.delay_ms = p.s2c.delay_ms = 200
                    await asyncio.sleep(10.0)
                    for p in proxies:
                        p.c2s.delay_ms = p.s2c.delay_ms = 0
                elif name == "proxy-slice":
                    for p in proxies:
                        p.c2s.slice_bytes = p.s2c.slice_bytes = 7
                    await asyncio.sleep(10.0)
                    for p in proxies:
                        p.c2s.slice_bytes = p.s2c.slice_bytes = 0
                elif name == "proxy-blackhole":
                    for p in proxies:
                        p.c2s.blackhole = p.s2c.blackhole = True
                    await asyncio.sleep(5.0)
                    for p in proxies:
                        p.reset()
                        p.c2s.blackhole = p.s2c.blackhole = False

        layout = Layout(args.clients, args.clients // GROUP_SIZE // 3)
        launch = await stack.enter_async_context(
            launched(tmp, flags, gateways=3, logic=2, lobby_size=args.clients + 5)
        )
        info = launch.info()
        for conv, members in layout.convs.items():
            if not conv.startswith("dm"):
                await asyncio.to_thread(
                    post_admin, info["ipconf"], "create-group", [conv, *members]
                )
        gateways = [p["tcp"] for p in info["processes"] if p["role"] == "gateway"]
        if name.startswith("proxy") or name == "drop-acks":
            for endpoint in gateways:
                host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
                c2s = LinkFaults()
                if name == "drop-acks":
                    c2s = LinkFaults(drop_types=frozenset({FrameType.PUSH_ACK}), drop_rate=0.3)
                p = FaultProxy(host, int(port), c2s=c2s, rng=random.Random(7))
                await p.start()
                stack.push_async_callback(p.aclose)
                proxies.append(p)
            gateways = [f"tcp://{p.endpoint}" for p in proxies]
        history = History(layout)
        clients: dict[str, Client] = {}
        for i, uid in enumerate(layout.users):
            clients[uid] = await client(launch, uid, i % 3, gateways=gateways)
        pumps = [asyncio.create_task(pump(c, uid, history)) for uid, c in clients.items()]
        watch = Watch(clients)
        watcher = asyncio.create_task(watch.run())
        rng = random.Random(1)
        t0 = time.monotonic()
        fault_task: asyncio.Task[None] | None = None
        n = 0
        while (now := time.monotonic()) < t0 + args.duration:
            if fault_task is None and now >= t0 + args.fault_at:
                watch.fault_t = now
                fault_task = loop.create_task(fault(launch))
            due = int((now - t0) * args.rate)
            while n < due:
                uid = layout.users[n % len(layout.users)]
                group = layout.group_of.get(uid) if rng.random() < 0.3 else None
                conv = group or layout.partner[uid]
                body = history.next_body(uid)
                _, fut = clients[uid].send_nowait(conv, body.encode())
                history.sent(uid, conv, body, fut)
                n += 1
            await asyncio.sleep(0.005)
        if fault_task is not None:
            await fault_task
        settle = time.monotonic() + 90
        while history.pending() and time.monotonic() < settle:
            await asyncio.sleep(0.1)
        stored = await truth(ns, list(layout.convs))
        want = sum(len(rows) * len(layout.convs[c]) for c, rows in stored.items())
        settle = time.monotonic() + 60
        while time.monotonic() < settle and (
            sum(len(v) for d in history.delivered.values() for v in d.values()) < want
        ):
            await asyncio.sleep(0.2)
        watcher.cancel()
        for task in pumps:
            task.cancel()
        await asyncio.gather(watcher, *pumps, return_exceptions=True)
        for c in clients.values():
            await c.aclose()
        check = check_history(history, stored)
        ft = watch.fault_t
        after = history.latency_between(ft, ft + 10)
        backs = sorted(t - ft for t in watch.back.values())
        return {
            "scenario": name,
            "sends_ok": check.sends_ok,
            "failed": check.sends_failed,
            "unknown": check.sends_unknown,
            "stored": check.stored,
            "lost": check.lost,
            "unexpected": check.unexpected,
            "dups": check.app_duplicates,
            "order": check.order_violations,
            "seq_reuse": check.seq_reuse,
            "p50_ms": check.latency_p50 * 1000,
            "p99_ms": check.latency_p99 * 1000,
            "max_ms": check.latency_max * 1000,
            "after_p99_ms": percentile_of(after, 99) * 1000,
            "dropped": len(watch.down),
            "back_first_s": backs[0] if backs else None,
            "back_p50_s": percentile_of(backs, 50) if backs else None,
            "back_last_s": backs[-1] if backs else None,
            "never_back": len(watch.down) - len(watch.back),
            "passed": check.passed,
        }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if v < 10 else f"{v:.0f}"
    return str(v)


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The markdown report."""
    cols = [
        ("scenario", "scenario"), ("sends_ok", "acked"), ("failed", "failed"),
        ("lost", "lost"), ("dups", "dup"), ("order", "order"), ("seq_reuse", "seq reuse"),
        ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("after_p99_ms", "p99 ms, 10 s after"),
        ("max_ms", "max ms"), ("dropped", "clients cut"), ("back_first_s", "back: first s"),
        ("back_p50_s", "median s"), ("back_last_s", "all back s"),
    ]  # fmt: skip
    out = [
        f"3 gateways + 2 logic processes, {args.clients} clients, {args.rate:.0f} msg/s "
        f"(70% 1:1, 30% groups of {GROUP_SIZE}) for {args.duration:.0f} s, fault at "
        f"{args.fault_at:.0f} s. Machine: {machine()}. "
        f"Command: `python -m benchmarks.process_faults --clients {args.clients} "
        f"--rate {args.rate:.0f} --duration {args.duration:.0f}`.",
        "",
        "| " + " | ".join(h for _, h in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    out += ["| " + " | ".join(_fmt(r[k]) for k, _ in cols) + " |" for r in rows]
    return "\n".join(out)


def write(report: str) -> None:
    """Save the section beside the reliability harness (which stitches it into
    docs/reliability.md) and replace it in docs/reliability.md now."""
    section = f"{SECTION_HEAD}\n{report}\n{SECTION_TAIL}"
    (ROOT / "benchmarks" / "reliability" / "processes.md").write_text(section)
    path = ROOT / "docs" / "reliability.md"
    text = path.read_text()
    if START in text:
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        text = f"{head}{section}{tail}"
    else:  # before the limits section
        head, mark, tail = text.partition(LIMITS)
        text = f"{head}{section}\n{mark}{tail}"
    path.write_text(text)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name in args.scenario or SCENARIOS:
        with tempfile.TemporaryDirectory() as d:
            print(f"-- {name}", file=sys.stderr, flush=True)
            row = await scenario(name, args, Path(d))
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.process_faults")
    p.add_argument("--scenario", action="append", choices=SCENARIOS)
    p.add_argument("--clients", type=int, default=300)
    p.add_argument("--rate", type=float, default=300.0, help="messages per second")
    p.add_argument("--duration", type=float, default=40.0)
    p.add_argument("--fault-at", type=float, default=10.0)
    p.add_argument("--write", action="store_true", help="update docs/reliability.md")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from imkit.aio import run

    rows = run(main_async(args))
    report = table(rows, args)
    print(json.dumps(rows) if args.json else report)
    if args.write:
        write(report)
    return 0 if all(r["passed"] and r["lost"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
