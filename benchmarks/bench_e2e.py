"""End to end: the reference IM system under load, server CPU per delivered message.

Runs ``python -m examples.loadgen --spawn --json`` (the generator in its own process,
the launcher ``python -m examples.cluster`` in another, both on uvloop when it is
installed) over a small matrix:

1. **1:1, 1000 clients, 2000 msgs/s, 10 s** (after 2 s of warm-up): each message to
   a random other client, so nearly every message opens a new 1:1 conversation
   (24k messages over ~500k pairs);
2. the same with **10 fixed contacts per client**: conversations mostly exist
   already, the steady state of a chat app;
3. **a group of 1000, 20 msgs/s, 10 s**: 20k deliveries/s through the merged read
   fan-out (PushBatches of a 100 ms window).

``--quick`` shrinks it to 50 clients for 2 s (the group of 50 then takes the write
fan-out path: at most 100 members). The full run takes about a minute.

    python benchmarks/bench_e2e.py [--quick] [--write]

The metric is PEERS.md's: server CPU (user + system from ``/proc/<pid>/stat``)
over the measured window divided by the deliveries in it. Caveats: the generator
and the server share the machine (two cores here), so the generator's CPU is
shown; above ~80% of a core it, not the server, bounds the latency figures. Ticks
are 10 ms, so the quick run's CPU figures are coarse. The peers' figures are
**quoted from /work/shared/PEERS.md** (measured by the peers file on this kind of
machine with one Python asyncio generator), **not measured in this run**: compare
orders of magnitude, not percentages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from _harness import Report, quick

ROOT = Path(__file__).resolve().parents[1]

if quick():
    SCENARIOS: list[tuple[str, list[str]]] = [
        ("1:1, 50 clients, random recipient", ["--mode", "1:1", "--clients", "50",
                                              "--rate", "100"]),
        ("1:1, 50 clients, 10 contacts each", ["--mode", "1:1", "--clients", "50",
                                              "--rate", "100", "--contacts", "10"]),
        ("group of 50 (write fan-out)", ["--mode", "group", "--clients", "50",
                                         "--rate", "10"]),
    ]
    TIMING = ["--duration", "2", "--warmup", "0.5"]
else:
    SCENARIOS = [
        ("1:1, 1000 clients, random recipient", ["--mode", "1:1", "--clients", "1000",
                                                "--rate", "2000"]),
        ("1:1, 1000 clients, 10 contacts each", ["--mode", "1:1", "--clients", "1000",
                                                "--rate", "2000", "--contacts", "10"]),
        ("group of 1000 (merged read fan-out)", ["--mode", "group", "--clients", "1000",
                                                 "--rate", "20"]),
    ]
    TIMING = ["--duration", "10", "--warmup", "2"]

METHOD = """\
Each row is one `python -m examples.loadgen --spawn --json` run: the launcher in its
own process, the generator (N `imkit.aio.Client`s, open-loop schedule) in another.
Server CPU per delivered message = user + system CPU of the server process
(`/proc/<pid>/stat`) over the measured window / deliveries in it (PEERS.md's
metric); latency from the send to the recipient's application; RSS per connection
= VmRSS growth while connecting / N. The generator shares the machine: when its CPU
nears 100% of a core, the latencies are its own, not the server's.
"""

#: PEERS.md, "End-to-end references on loopback": quoted, not measured here.
PEERS = [
    ["Mosquitto 2.0.11 (C, MQTT QoS 0)", "1:1, 1k and 5k conns, 2k msgs/s", "38–44 µs",
     "0.2 / 0.5–1.8", "1.0 KiB", "~85 µs (connect + subscribe)"],
    ["Mosquitto, QoS 1 (acked)", "1:1, 2k → 20k msgs/s", "67 → 42–46 µs", "", "", ""],
    ["Mosquitto", "group of 1000, 20–50 msgs/s in", "15–17 µs per delivery", "7–10 / 18–86",
     "", ""],
    ["Prosody 0.12 (Lua, XMPP)", "1:1, 300 and 2000 conns, 250–2000 msgs/s", "350–580 µs",
     "0.3–0.9 / 10–85", "~36 KiB", "~3 ms (register + login)"],
]


def run_loadgen(args: list[str]) -> dict[str, Any]:
    """One ``examples.loadgen --spawn --json`` run; its JSON result."""
    cmd = [sys.executable, "-m", "examples.loadgen", "--spawn", "--json", "-q", *args, *TIMING]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170,
                          check=False)
    if proc.returncode not in (0, 1):  # 1: ran, but lost or duplicated (shown in the table)
        raise SystemExit(f"loadgen failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr}")
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def fmt(value: float | None, spec: str, unit: str = "", ticks: int | None = None) -> str:
    """A figure and its unit, marked when it rests on fewer than 20 clock ticks of CPU."""
    if value is None:
        return "n/a"
    coarse = f" (coarse: {ticks} ticks)" if ticks is not None and ticks < 20 else ""
    return format(value, spec) + unit + coarse


def main() -> None:
    report = Report("End to end: the reference system under load (examples/loadgen.py)")
    report.note(METHOD)
    rows = []
    for name, args in SCENARIOS:
        r = run_loadgen(args)
        lat = r["latency_ms"]
        ack = r["ack_ms"]
        rows.append([
            name,
            f"{r['rate']:g} msgs/s, {r['measured_deliveries'] / r['window_s']:.0f} deliveries/s",
            fmt(r["server_cpu_per_delivery_us"], ".1f", " µs", r["server_cpu_ticks"]),
            f"{lat.get('p50', 0):.2f} / {lat.get('p99', 0):.2f} / {lat.get('max', 0):.1f}",
            f"{ack.get('p50', 0):.2f} / {ack.get('p99', 0):.2f}",
            fmt(r["rss_per_conn_kib"], ".1f", " KiB"),
            fmt(r["connect_cpu_us"], ".0f", " µs", r["connect_cpu_ticks"]),
            f"{r['lost']} / {r['app_duplicates']}",
            fmt(r["server_cpu_pct"], ".0f") + "% / " + fmt(r["generator_cpu_pct"], ".0f") + "%",
        ])
    report.table(
        ["scenario", "load", "server CPU per delivered msg", "latency p50 / p99 / max (ms)",
         "ack p50 / p99 (ms)", "server RSS per connection", "server CPU per connect + login",
         "lost / duplicated", "CPU server / generator"],
        rows,
        title="imkit reference system (measured in this run)",
    )
    report.table(
        ["server", "scenario", "CPU per delivered msg", "p50 / p99 (ms)",
         "memory per connection", "connect cost"],
        PEERS,
        title="Peers: measured by the peers file (PEERS.md) on this kind of machine, "
        "NOT in this run and not side by side",
    )
    report.note(
        "The peer rows come from a separate measurement with a different run of the same "
        "kind of generator; only the imkit rows above were measured by this script. "
        "imkit does more per message than Mosquitto (a seq, a store append, an ack, "
        "per-device cursors), and its connect cost includes the ipconf lookup."
    )
    report.emit(__file__)


if __name__ == "__main__":
    main()
