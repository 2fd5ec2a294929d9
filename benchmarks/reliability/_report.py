"""The report: a scenario's result, the history check's rows, docs/reliability.md.

:class:`ScenarioResult` is what every scenario returns (a verdict, its setup,
figure rows and notes); :func:`check_rows` turns a :class:`tests.history.Check`
into rows; :func:`render` writes the whole page (the machine line comes from
``examples.measure``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from examples.measure import machine
from tests.history import Check


def ms(seconds: float) -> str:
    """``1.5`` -> ``"1500.0 ms"``."""
    return f"{seconds * 1000:.1f} ms"


def check_rows(c: Check) -> list[tuple[str, str]]:
    """A history check's figures as (name, value) rows for the report."""
    return [
        ("sends ok / failed / unknown", f"{c.sends_ok} / {c.sends_failed} / "
         f"{c.sends_unknown}"),
        ("messages stored", str(c.stored)),
        ("deliveries to applications", str(c.deliveries)),
        ("**lost** (acked, never delivered; message x member)", f"**{c.lost}**"),
        ("**unexpected**", f"**{c.unexpected}**"),
        ("**duplicates delivered to the app**", f"**{c.app_duplicates}**"),
        ("**order violations** (per conversation)", f"**{c.order_violations}**"),
        ("**seq reuse** / double stores", f"**{c.seq_reuse}** / {c.double_stored}"),
        ("stored but undelivered (any outcome)", str(c.undelivered)),
        ("failed sends that were stored (indeterminate)", str(c.failed_but_stored)),
        ("duplicates on the wire (dropped by SeqWindow)", str(c.wire_duplicates)),
        ("delivery latency p50 / p99 / max", f"{ms(c.latency_p50)} / "
         f"{ms(c.latency_p99)} / {ms(c.latency_max)} (n={c.latency_n})"),
    ]


@dataclass
class ScenarioResult:
    """What one scenario reports: a verdict, a setup text, figure rows, notes."""

    key: str
    title: str
    passed: bool
    setup: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    check: Check | None = None
    seconds: float = 0.0

    def markdown(self) -> str:
        """The scenario's section of docs/reliability.md."""
        verdict = "**pass**" if self.passed else "**FAIL**"
        out = [f"## {self.title}", "", self.setup, "", f"Verdict: {verdict} "
               f"(scenario ran {self.seconds:.1f} s).", "", "| figure | value |", "|---|---|"]
        out += [f"| {name} | {value} |" for name, value in self.rows]
        if self.notes:
            out.append("")
            out += [f"* {note}" for note in self.notes]
        return "\n".join(out) + "\n"


def histogram(values: Sequence[float], bucket_s: float, buckets: int) -> str:
    """``"0.0-0.1s: 3, 0.1-0.2s: 0, ..., >1.2s: 1"``: counts per ``bucket_s`` bucket."""
    buckets = min(buckets, int(max(values, default=0.0) // bucket_s) + 1)
    counts = [0] * (buckets + 1)
    for v in values:
        counts[min(buckets, int(v // bucket_s))] += 1
    parts = []
    for i, n in enumerate(counts):
        label = f"{i * bucket_s:.1f}-{(i + 1) * bucket_s:.1f}s" if i < buckets else (
            f">{buckets * bucket_s:.1f}s"
        )
        if n or i < buckets:
            parts.append(f"{label}: {n}")
    return ", ".join(parts)



HEADER = """\
# Reliability figures

Produced by `python -m benchmarks.reliability`; do not edit by hand. The promise being
tested: a message the server acknowledged is never lost; every member that comes
back online gets every stored message once and in seq order per conversation
(duplicates may cross the wire; the client's SeqWindow drops them); the promise
holds through a killed gateway, a restarted server and lost acks once the fault
ends; and bad peers cost bounded resources that come back when they go.

**Machine:** {machine}. Figures from {when}; the machine may have been running
another light job, so latencies are indicative (the zero counts are not).

**Reproduce:** `{command}` (about {minutes:.0f} min; `--quick` for a scaled-down
run, `--help` for the scale flags).

**Method.** Each scenario starts the reference system (`examples/`) in one process on
loopback — ipconf, gateways, logic, route table, bus and store — and drives it with
real `imkit.aio.Client` connections. Every message body is `sender-counter`. The
harness logs each send as ok (acknowledged with a seq), failed (`SendError`) or
unknown (no answer by the end), and each message the client hands to its
application. After the fault ends, sending stops and the clients drain: first on
their own (pushes, the reconnect's inbox sync, gap syncs), then, if anyone is still
behind the store, through an explicit `client.sync()`. The check then counts, against
the store: **lost** (an acknowledged message some member never got), **unexpected**
(a delivery that was never sent, or differs from what the store holds at that seq),
**duplicates delivered to the application**, **order violations** (a delivery whose
seq is not above the previous one in that conversation), **seq reuse** (one (conv,
seq) seen with two bodies) and double stores. A scenario passes only if these are all
0 (plus its own resource criteria). Duplicates on the wire are allowed and counted.

| scenario | verdict | lost | unexpected | app dups | order | seq reuse | wire dups |
|---|---|---|---|---|---|---|---|
{summary}
"""

FOOTER = """\
## What these scenarios do not cover

* **Real processes.** Everything runs in one process and one event loop; the
  multi-process scale-out (Redis route table and registry, NATS bus, several logic
  servers) does not exist yet. A "killed" gateway is simulated in-process
  (`examples.faultproxy.kill_gateway`): its sockets are aborted and its tasks
  cancelled, which is what the clients see of a `kill -9`, but no process dies, the
  kernel is not involved in cleaning up, and the shared route table, bus and store
  are never on the far side of a network.
* **`SIGSTOP` / a hung process, half-open connections, packet loss.** A gateway that
  stops without closing its sockets is detected only by heartbeats; none of these
  runs freezes a peer (a real `SIGSTOP` of the launcher is tested on its own:
  `tests/test_e2e_stall.py`, and the limits above). `tc netem` is not available
  here, and loss inside a TCP stream
  is the kernel's business; the proxy only drops whole frames, delays and slices.
* **Several machines, clock skew, partitions between servers, disk failure** (the
  SQLite restart keeps the file; `synchronous=NORMAL` survives a process kill, not a
  power loss).
* **A dead gateway's routes.** Nothing unbinds the routes of a gateway that vanished
  (`RouteService.unbind_gateway` exists; no one calls it when the gateway disappears
  from discovery). Here every orphan logs in again and its new route replaces the
  stale one; a device that never comes back stays "online" on the dead gateway, and
  pushes to it are published to a subject nobody reads (its messages wait in the
  store for its next sync).
* **Load.** Rates are moderate and the machine is small; these are correctness runs
  under faults, not capacity figures (see [benchmarks](benchmarks.md)).
"""


def render(results: list[ScenarioResult], command: str, elapsed_s: float) -> str:
    """docs/reliability.md from the scenarios' results."""
    summary = []
    for r in results:
        c = r.check
        cells = (
            [str(c.lost), str(c.unexpected), str(c.app_duplicates), str(c.order_violations),
             str(c.seq_reuse), str(c.wire_duplicates)]
            if c is not None
            else ["—"] * 6
        )
        verdict = "pass" if r.passed else "**FAIL**"
        summary.append(f"| {r.title} | {verdict} | " + " | ".join(cells) + " |")
    head = HEADER.format(
        machine=machine(detail=True),
        when=time.strftime("%Y-%m-%d"),
        command=command,
        minutes=max(1.0, elapsed_s / 60),
        summary="\n".join(summary),
    )
    body = "\n".join(r.markdown() for r in results)
    # the limits table is kept as markdown beside this module (its rows are long)
    limits = (Path(__file__).with_name("limits.md")).read_text()
    # the cluster across processes: written by python -m benchmarks.process_faults
    processes = (Path(__file__).with_name("processes.md")).read_text()
    return f"{head}\n{body}\n{processes}\n{limits}\n{FOOTER}"
