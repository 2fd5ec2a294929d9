"""Past saturation: offered vs delivered vs server memory, up to 5x what one process carries.

Runs ``python -m examples.loadgen --spawn --json`` (the launcher in its own process,
the generator in another) with 1000 clients, 1:1, 10 fixed contacts each, at rising
offered rates. For each rate it reports what the server accepted (acked sends per
second), what it delivered **while the load lasted** (pushes that reached a
recipient's application during the sending window, per second: the goodput), the
latency of those deliveries, the server's peak VmRSS while loaded, kicks and
reconnects, and lost / duplicated (must be 0 / 0 at every rate: "lost" is an acked
message not delivered by the end of a drain of up to 120 s after the load stops).

An overloaded server must level off, not collapse: goodput stays near its maximum
and memory stays bounded whatever the offered rate; what it cannot take is refused
at the edge (``SendAck(SERVER_BUSY, retry_after_ms)``) and the clients slow down
(their bounded queues then refuse the application's extra sends: "failed" here).

    python benchmarks/bench_overload.py [--quick] [--write] [--rates 2000,4000,...]

Caveats: two cores; the generator shares them with the server, and one Python
generator process tops out at roughly 20-30k events/s, so at the highest rates the
generator's own CPU (shown) limits what is offered: the "offered" column is what it
actually sent per second.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from _harness import Report, quick

ROOT = Path(__file__).resolve().parents[1]


def rates() -> list[int]:
    for i, arg in enumerate(sys.argv):
        if arg == "--rates" and i + 1 < len(sys.argv):
            return [int(x) for x in sys.argv[i + 1].split(",")]
    return [200, 1000] if quick() else [2000, 4000, 8000, 12000, 20000]


CLIENTS = "100" if quick() else "1000"
TIMING = (["--duration", "2", "--warmup", "0.5"] if quick()
          else ["--duration", "10", "--warmup", "2"])


def run(rate: int, *, shed: bool) -> dict[str, Any]:
    """One loadgen run at ``rate`` offered msgs/s (shedding on or off); its JSON result."""
    extra = [] if shed else ["--cluster-arg=--no-shed"]
    cmd = [sys.executable, "-m", "examples.loadgen", "--spawn", "--json", "-q", *extra,
           "--mode", "1:1", "--clients", CLIENTS, "--contacts", "10",
           "--rate", str(rate), "--drain", "120", *TIMING]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"loadgen failed ({proc.returncode}) at {rate}/s\n{proc.stderr}")
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def main() -> None:
    report = Report("Overload: offered vs delivered vs memory (examples/loadgen.py)")
    report.note(__doc__.split("\n\n")[1])
    # side by side: each rate with shedding on, then off
    rows = [row(rate, shed, run(rate, shed=shed)) for rate in rates() for shed in (True, False)]
    report.table(
        ["offered (msgs/s)", "shedding", "sent/s", "acked/s",
         "goodput (deliveries/s while loaded)", "latency p50 / p99 (ms)",
         "server peak RSS (MiB)", "refused to the app", "kicks / reconnects",
         "lost / duplicated", "CPU server / generator"],
        rows,
        title=f"1:1, {CLIENTS} clients, 10 contacts each",
    )
    report.emit(__file__)


def row(rate: int, shed: bool, r: dict[str, Any]) -> list[str]:
    """One table row of a run."""
    window = max(r["send_window_s"], 1e-9)
    lat = r["latency_ms"]
    return [
        f"{rate:,}",
        "on" if shed else "off",
        f"{r['sent'] / (window + r['warmup_s']):,.0f}",
        f"{r['acked'] / (window + r['warmup_s']):,.0f}",
        f"{r['goodput_per_s']:,.0f}",
        f"{lat.get('p50', 0):.1f} / {lat.get('p99', 0):.0f}",
        "n/a" if r["rss_peak_kib"] is None else f"{r['rss_peak_kib'] / 1024:.0f}",
        f"{r['failed']:,}",
        f"{r['kicks']} / {r['reconnects']}",
        f"{r['lost']} / {r['app_duplicates']}",
        f"{r['server_cpu_pct']:.0f}% / {r['generator_cpu_pct']:.0f}%"
        if r["server_cpu_pct"] is not None else "n/a",
    ]


if __name__ == "__main__":
    main()
