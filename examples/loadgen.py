"""A load generator for the reference IM system: N clients, a fixed rate, the server's CPU.

What it does
    ``python -m examples.loadgen --spawn --clients 1000 --rate 2000 --duration 10``:

    1. **Target.** ``--spawn`` starts ``python -m examples.cluster`` as a separate
       process (so the generator's CPU is never counted as the server's) and stops
       it at the end; ``--ready-file F`` reads the ipconf URL and the server's
       processes from a launcher's ready file (the launcher's pid and, for a
       ``--processes`` launcher, every child it lists: gateways, logic, ipconf);
       ``--ipconf URL`` (with ``--pid`` for the CPU and memory figures, repeatable)
       targets any running cluster. ``--pid`` adds imkit processes to any target.
       ``--count-process NAME`` (repeatable) adds the CPU of every process whose
       ``/proc/<pid>/comm`` is NAME when measuring starts (``redis-server``,
       ``nats-server``, ``postgres``: PostgreSQL runs one backend per connection,
       so all of them) and ``--count-pid PID`` one process: the backends, counted
       apart from the imkit processes so both figures are reported.
    2. **Users.** Registers N fresh users ``lg<run>-00000``... through the
       launcher's ``POST /admin`` (and, with ``--mode group``, one group of all of
       them); login tokens come from ``/dev/token``, or are minted locally with
       ``--secret HEX`` (``--spawn`` passes its own secret to the launcher).
    3. **Connect.** Opens N :class:`imkit.aio.Client` connections (each asks ipconf
       for its gateways, or ``--direct`` skips ipconf) and waits until all are
       online, reading the server's CPU and VmRSS before and after.
    4. **Load.** An open-loop schedule: message *i* is due at ``t0 + i / rate``,
       whether or not earlier ones were answered, so a slow server shows up as
       latency (queueing included) rather than as a slower generator. Senders
       take turns; ``--mode 1:1`` sends each message to one random other client
       (or one of ``--contacts K`` fixed contacts), ``--mode group`` to the group
       (delivered to the N-1 others). A body is ``"<send ns> <sender>-<counter>
       <phase>"`` padded to ``--body-size`` bytes (``time.monotonic_ns`` when
       ``send_nowait`` was called; sends never wait for acks, so the session's
       in-flight queue, the sockets and the server's backlog all count as latency).
    5. **Drain.** After ``--warmup`` + ``--duration`` seconds of sending, waits up
       to ``--drain`` seconds for every acknowledgement and every delivery.
    6. **Report** (markdown, or ``--json``): sent / acked / failed, delivered and
       expected deliveries, lost (acked, not delivered by the end of the drain),
       app duplicates (a message handed to one recipient's application twice:
       must be 0), latency p50/p90/p99/max from the send to the recipient's
       application (and from the schedule's due time, which adds the generator's
       own lateness: its timers and a busy loop), ack latency p50/p99, the
       generator's send lag, **server CPU per delivered message**
       (user + system from ``/proc/<pid>/stat`` over the measured window, summed
       over the imkit processes, divided by its deliveries: the PEERS.md metric),
       the same for the counted backends and for both together, how many
       processes were counted (and how many exited meanwhile), server CPU per
       connect + login, server VmRSS growth per connection (summed over the imkit
       processes; the backends' memory is not theirs alone), and the generator's
       own CPU.

Policies
    Counts (sent ... duplicates) cover every message of the run, the warm-up's
    included; latencies and CPU cover the measured window only (from the first
    measured send until the last ack and delivery arrived, or the drain ran out).
    The connect cost covers what a real login costs the server: the ipconf
    lookup (unless ``--direct``), TCP accept, Login, route bind and first sync.
    The exit status is 1 when a message was lost or duplicated, 2 when the run
    could not start. The generator runs on uvloop when it is installed
    (:func:`imkit.aio.run`). Clients are connected at most
    ``--connect-concurrency`` at a time. Each client's share of the rate
    must stay under the gateway's flood limit (200 frames/s per connection) and
    the session's 64 sends in flight. The processes are fixed when measuring
    starts: one that exits before the end drops out of the sums (its CPU is lost,
    the report counts it), one started later (a restarted child, a new
    PostgreSQL backend) is not counted; the ready file is read once. The
    generator itself is never counted, even when its name matches.

What it leaves out
    Reconnect storms, slow readers and other faults (tests/test_e2e_faults.py
    covers those), WebSocket clients, several generator processes (one Python
    process tops out at a few tens of thousands of deliveries per second: watch
    its CPU line), and cleaning up: the users it registers stay in the cluster.
    CPU is read in clock ticks (10 ms at USER_HZ=100), so short runs are coarse.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from imkit.aio import Client, ClientStatus, Endpoint, uvloop_available
from imkit.errors import CapacityError, ConfigError, ConnectionClosed, ImkitError
from imkit.protocol import Push
from imkit.session import Kicked, SessionEvent
from imkit.store import direct_conv_id

from . import command
from .auth import Authenticator
from .chat import fetch_token
from .httpclient import endpoint_fetcher, fetch_endpoints
from .measure import percentile, proc_cpu_s, proc_rss_kib, summary_ms

__all__ = [
    "DEFAULT_BODY_SIZE",
    "DEFAULT_CONNECT_CONCURRENCY",
    "DEFAULT_DRAIN_S",
    "DEFAULT_READY_TIMEOUT_S",
    "LoadConfig",
    "LoadError",
    "LoadResult",
    "SpawnedCluster",
    "Target",
    "main",
    "parse_body",
    "percentile",
    "proc_cpu_s",
    "proc_rss_kib",
    "processes_named",
    "run_load",
    "target_from_ready_file",
]

ROOT = Path(__file__).resolve().parents[1]

#: Body bytes per message: PEERS.md's chat message is 40-200 bytes of UTF-8.
DEFAULT_BODY_SIZE = 100
#: Logins in flight at once: the gateway's listen backlog is far larger, but 100
#: parallel logins keep ipconf and /dev/token answering promptly on a small machine.
DEFAULT_CONNECT_CONCURRENCY = 100
#: How long to wait for the last acknowledgements and deliveries: ten times the
#: read fan-out's 100 ms merge window plus the session's 2 s first send retry.
DEFAULT_DRAIN_S = 5.0
#: A spawned launcher must write its ready file within this time (a cold Python
#: start plus imports take ~1 s; a loaded machine several).
DEFAULT_READY_TIMEOUT_S = 30.0
#: Users per ``POST /admin`` request: ~16 bytes of JSON each stays far below the
#: launcher's 64 KiB request-body limit.
ADMIN_CHUNK = 1000
#: Parallel ``/dev/token`` requests (each is one short HTTP connection).
TOKEN_CONCURRENCY = 32
#: How long one client may take to come online before the run is abandoned.
LOGIN_TIMEOUT_S = 30.0
#: Linux keeps 15 bytes of a process name in /proc/<pid>/comm (TASK_COMM_LEN 16
#: with the NUL): a longer ``--count-process`` name could never match.
COMM_MAX = 15

_MEASURED = b"m"
_WARMUP = b"w"


class LoadError(Exception):
    """The run could not be set up (target unreachable, login refused, bad options)."""


# --- configuration and results ----------------------------------------------------------


@attrs.frozen(kw_only=True)
class LoadConfig:
    """What to run. ``mode`` is ``"1:1"`` or ``"group"``; ``contacts`` 0 means everyone."""

    mode: str = "1:1"
    clients: int = 100
    rate: float = 1000.0
    duration_s: float = 10.0
    warmup_s: float = 2.0
    drain_s: float = DEFAULT_DRAIN_S
    body_size: int = DEFAULT_BODY_SIZE
    contacts: int = 0
    direct: bool = False
    connect_concurrency: int = DEFAULT_CONNECT_CONCURRENCY
    seed: int = 1

    def __attrs_post_init__(self) -> None:
        if self.mode not in ("1:1", "group"):
            raise ConfigError(f"mode must be '1:1' or 'group', got {self.mode!r}")
        if self.clients < 2:
            raise ConfigError("clients must be >= 2 (a message needs a recipient)")
        if self.rate <= 0 or self.duration_s <= 0:
            raise ConfigError("rate and duration_s must be > 0")
        if self.warmup_s < 0 or self.drain_s < 0:
            raise ConfigError("warmup_s and drain_s must be >= 0")
        if not 40 <= self.body_size <= 8192:
            raise ConfigError("body_size must be 40-8192 bytes (the logic server's max_body)")
        if self.contacts < 0 or self.connect_concurrency < 1:
            raise ConfigError("contacts must be >= 0 and connect_concurrency >= 1")


def _pid_tuple(pids: Iterable[int]) -> tuple[int, ...]:
    """Positive pids, first occurrence kept (a pid listed twice is counted once)."""
    out = tuple(dict.fromkeys(int(pid) for pid in pids))
    if any(pid <= 0 for pid in out):
        raise ConfigError(f"pids must be > 0, got {out}")
    return out


def _name_tuple(names: Iterable[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(names))
    for name in out:
        if not 0 < len(name) <= COMM_MAX or "/" in name:
            raise ConfigError(f"a process name is 1-{COMM_MAX} characters without '/': {name!r}")
    return out


@attrs.frozen(kw_only=True)
class Target:
    """A running cluster and the processes whose CPU (and memory) a run measures.

    ``pids`` are the imkit server processes (CPU and VmRSS, summed; none: no
    server figures); ``backend_pids`` and every process named in
    ``count_processes`` (its ``/proc/<pid>/comm``, looked up when measuring
    starts) are the backends: their CPU is summed apart, their memory is not
    read. A pid given twice counts once. Measuring costs one ``/proc`` read per
    process per reading, and one scan of ``/proc`` when names are given.
    """

    ipconf: str
    pids: tuple[int, ...] = attrs.field(default=(), converter=_pid_tuple)
    backend_pids: tuple[int, ...] = attrs.field(default=(), converter=_pid_tuple)
    count_processes: tuple[str, ...] = attrs.field(default=(), converter=_name_tuple)
    secret: bytes | None = None  # mint tokens locally instead of asking /dev/token


def target_from_ready_file(path: str | os.PathLike[str], *, secret: bytes | None = None) -> Target:
    """The :class:`Target` a launcher's ``--ready-file`` describes. O(processes listed).

    Its ``pids`` are the launcher's ``pid`` and, for a ``--processes`` launcher,
    the ``pid`` of every entry of ``processes`` (read once: a child restarted
    later is not followed). Raises :class:`LoadError` for a file that cannot be
    read or lacks ``ipconf`` or ``pid``.
    """
    try:
        info = json.loads(Path(path).read_text())
        pids = [int(info["pid"])] + [int(p["pid"]) for p in info.get("processes") or ()]
        ipconf = info["ipconf"]
        if not isinstance(ipconf, str):
            raise TypeError(f"ipconf is {ipconf!r}")
        return Target(ipconf=ipconf, pids=pids, secret=secret)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LoadError(f"cannot use the ready file {path}: {exc!r}") from exc


@attrs.define(kw_only=True)
class LoadResult:
    """What a run measured (see the module doc). Times in ms or µs as the names say."""

    mode: str
    clients: int
    rate: float
    duration_s: float
    warmup_s: float
    loop: str
    connect_via: str
    sent: int = 0
    acked: int = 0
    failed: int = 0
    pending: int = 0  # neither acked nor failed at the end of the drain
    delivered: int = 0  # deliveries of acked messages, each (message, recipient) once
    expected: int = 0  # recipients of acked messages
    lost: int = 0
    app_duplicates: int = 0
    unacked_deliveries: int = 0  # deliveries of messages never acked (not an error)
    session_duplicates: int = 0  # duplicate pushes the client sessions dropped
    foreign: int = 0  # messages that were not the generator's
    echoes: int = 0  # the sender's own copies (not counted as deliveries)
    kicks: int = 0
    reconnects: int = 0
    measured_sent: int = 0  # messages sent in the measured window (the warm-up's not)
    measured_deliveries: int = 0
    latency_ms: dict[str, float] = attrs.field(factory=dict)
    due_latency_ms: dict[str, float] = attrs.field(factory=dict)  # from the schedule's due time
    ack_ms: dict[str, float] = attrs.field(factory=dict)
    send_lag_ms: dict[str, float] = attrs.field(factory=dict)
    window_s: float = 0.0
    server_cpu_s: float | None = None
    server_cpu_ticks: int | None = None  # the same in clock ticks: its resolution
    server_cpu_per_delivery_us: float | None = None
    server_cpu_pct: float | None = None
    server_processes: int = 0  # imkit processes counted (alive when measuring started)
    backend_processes: dict[str, int] = attrs.field(factory=dict)  # comm name -> count
    processes_gone: int = 0  # counted processes that exited before the end (CPU lost)
    backend_cpu_s: float | None = None
    backend_cpu_ticks: int | None = None
    backend_cpu_per_delivery_us: float | None = None
    total_cpu_per_delivery_us: float | None = None  # imkit processes + backends
    process_cpu_s: dict[str, float] = attrs.field(factory=dict)  # "<name> <pid>" -> s
    connect_s: float = 0.0
    connect_cpu_us: float | None = None
    connect_cpu_ticks: int | None = None
    rss_before_kib: int | None = None
    rss_after_kib: int | None = None
    rss_per_conn_kib: float | None = None
    rss_peak_kib: int | None = None  # highest VmRSS sum while loaded (4 samples/s)
    send_window_s: float = 0.0  # from the first measured send to the last send
    goodput_per_s: float = 0.0  # deliveries that arrived while sending, per second
    generator_cpu_pct: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Every field, JSON-able. O(fields)."""
        return attrs.asdict(self)

    def ok(self) -> bool:
        """True when nothing acked was lost and nothing was delivered twice."""
        return self.lost == 0 and self.app_duplicates == 0

    def markdown(self) -> str:
        """The result as a two-column markdown table."""

        def num(value: float | None, fmt: str = "{:.1f}") -> str:
            return "n/a" if value is None else fmt.format(value)

        def coarse(ticks: int | None) -> str:
            return f" (coarse: {ticks} clock ticks)" if ticks is not None and ticks < 20 else ""

        def pct(d: dict[str, float], keys: Sequence[str]) -> str:
            if not d:
                return "n/a"
            return " / ".join(f"{d[k]:.2f}" for k in keys)

        scenario = f"{self.mode}, {self.clients} clients, {self.rate:g} msgs/s"
        rows = [
            ("scenario", f"{scenario}, {self.duration_s:g} s (+{self.warmup_s:g} s warm-up)"),
            ("generator", f"{self.loop}, connect via {self.connect_via}"),
            ("connect + login of all clients (s)", f"{self.connect_s:.2f}"),
            (
                "sent / acked / failed / pending",
                f"{self.sent} / {self.acked} / {self.failed} / {self.pending}",
            ),
            ("delivered / expected", f"{self.delivered} / {self.expected}"),
            ("lost", str(self.lost)),
            ("app duplicates", str(self.app_duplicates)),
            (
                "session-dropped duplicates / kicks / reconnects",
                f"{self.session_duplicates} / {self.kicks} / {self.reconnects}",
            ),
            (
                "latency p50 / p90 / p99 / max (ms)",
                pct(self.latency_ms, ("p50", "p90", "p99", "max")),
            ),
            (
                "latency from the due time p50 / p99 / max (ms)",
                pct(self.due_latency_ms, ("p50", "p99", "max")),
            ),
            ("ack latency p50 / p99 (ms)", pct(self.ack_ms, ("p50", "p99"))),
            ("generator send lag p99 / max (ms)", pct(self.send_lag_ms, ("p99", "max"))),
            (
                "deliveries in the measured window",
                f"{self.measured_deliveries} in {self.window_s:.2f} s",
            ),
            (
                "server CPU per delivered message (µs)",
                num(self.server_cpu_per_delivery_us) + coarse(self.server_cpu_ticks),
            ),
            ("server CPU (% of one core)", num(self.server_cpu_pct)),
            ("processes counted", self._processes_counted()),
        ]
        if self.backend_processes:
            rows += [
                (
                    "backend CPU per delivered message (µs)",
                    num(self.backend_cpu_per_delivery_us) + coarse(self.backend_cpu_ticks),
                ),
                (
                    "server + backends CPU per delivered message (µs)",
                    num(self.total_cpu_per_delivery_us),
                ),
            ]
        if self.process_cpu_s:
            rows.append(("CPU by process in the measured window (s)", self._cpu_by_name()))
        rows += [
            (
                "server CPU per connect + login (µs)",
                num(self.connect_cpu_us, "{:.0f}") + coarse(self.connect_cpu_ticks),
            ),
            ("server RSS growth per connection (KiB)", num(self.rss_per_conn_kib, "{:.2f}")),
            (
                "server peak RSS while loaded (MiB)",
                num(None if self.rss_peak_kib is None else self.rss_peak_kib / 1024),
            ),
            ("goodput: deliveries per second while sending", num(self.goodput_per_s)),
            ("generator CPU (% of one core)", num(self.generator_cpu_pct)),
        ]
        lines = ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows]
        return "\n".join(lines)

    def _processes_counted(self) -> str:
        text = f"{self.server_processes} imkit (CPU and RSS)"
        if self.backend_processes:
            names = ", ".join(f"{k} {v}" for k, v in sorted(self.backend_processes.items()))
            text += f" + {names} (CPU only)"
        if self.processes_gone:
            text += f"; {self.processes_gone} exited while measured (their CPU is missing)"
        return text

    def _cpu_by_name(self) -> str:
        """``name s`` per process name (``--id`` or comm), summed over its pids."""
        by_name: dict[str, float] = collections.defaultdict(float)
        count: collections.Counter[str] = collections.Counter()
        for key, used in self.process_cpu_s.items():
            name = key.rsplit(" ", 1)[0]
            by_name[name] += used
            count[name] += 1
        return ", ".join(
            f"{name}{f' ×{count[name]}' if count[name] > 1 else ''} {used:.2f}"
            for name, used in sorted(by_name.items(), key=lambda kv: -kv[1])
        )


# --- the processes measured ---------------------------------------------------------------


def processes_named(names: Iterable[str]) -> dict[int, str]:
    """``{pid: name}`` of every process whose ``/proc/<pid>/comm`` is one of ``names``.

    This process is left out (the generator is never the server). One scan of
    ``/proc``: O(processes on the machine), about a millisecond per few hundred.
    Processes that exit during the scan, or cannot be read, are skipped.
    """
    wanted = set(names)
    me = os.getpid()
    found: dict[int, str] = {}
    if not wanted:
        return found
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                comm = Path(entry.path, "comm").read_text().rstrip("\n")
            except OSError:
                continue
            if comm in wanted:
                found[int(entry.name)] = comm
    return found


def _comm(pid: int) -> str:
    """``/proc/<pid>/comm``, or ``"?"`` when it cannot be read."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().rstrip("\n")
    except OSError:
        return "?"


def _label(pid: int) -> str:
    """``"<name> <pid>"``: the value of ``--id`` on its command line (an imkit role:
    ``gw-1``, ``logic-2``, ``ipconf``), ``cluster`` for a launcher, else its comm."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        argv = []
    if b"--id" in argv[:-1]:
        name = argv[argv.index(b"--id") + 1].decode(errors="replace")
    elif any(a.endswith(b".cluster") or a.endswith(b"/imkit-cluster") for a in argv):
        name = "cluster"
    else:
        name = _comm(pid)
    return f"{name} {pid}"


def _cpu_readings(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds of each pid still running. O(pids) /proc reads."""
    out: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(OSError):  # ProcessGone: exited
            out[pid] = proc_cpu_s(pid)
    return out


def _cpu_used(before: dict[int, float], after: dict[int, float], pids: Iterable[int]) -> float:
    """CPU seconds used between two readings by those of ``pids`` in both. O(pids)."""
    return sum((after[p] - before[p] for p in pids if p in before and p in after), 0.0)


def _rss_sum(pids: Sequence[int]) -> int | None:
    """VmRSS summed over the pids still running (KiB); None when none is. O(pids)."""
    total: int | None = None
    for pid in pids:
        with contextlib.suppress(OSError):
            total = (total or 0) + proc_rss_kib(pid)
    return total


# --- small helpers ----------------------------------------------------------------------


def make_body(due_ns: int, key: bytes, phase: bytes, size: int) -> bytes:
    """A message body: ``b"<due ns> <key> <phase>"`` padded with dots to ``size``. O(size)."""
    head = b"%d %s %s " % (due_ns, key, phase)
    return head + b"." * max(0, size - len(head))


def parse_body(body: bytes) -> tuple[int, bytes, bytes] | None:
    """``(due ns, key, phase)`` of a generator body, or None for anything else. O(len)."""
    parts = body.split(b" ", 3)
    if len(parts) < 3 or not parts[0].isdigit() or parts[2] not in (_MEASURED, _WARMUP):
        return None
    return int(parts[0]), parts[1], parts[2]


async def _post_admin(ipconf: str, op: str, args: list[str]) -> Any:
    """``POST <ipconf>/admin`` (the launcher's registry commands); LoadError if refused."""
    body = json.dumps({"op": op, "args": args}).encode()
    request = urllib.request.Request(
        ipconf.rstrip("/") + "/admin",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )

    def call() -> Any:
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return json.loads(raw) if raw.startswith(b"{") else {"error": f"HTTP {exc.code}"}

    try:
        doc = await asyncio.to_thread(call)
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot reach {ipconf}/admin: {exc}") from exc
    if not isinstance(doc, dict) or not doc.get("ok"):
        error = doc.get("error") if isinstance(doc, dict) else doc
        raise LoadError(f"admin {op} refused: {error}")
    return doc["result"]


# --- bookkeeping ------------------------------------------------------------------------


class _Msg:
    """One sent message: when it was due, its phase, recipients, ack state, deliveries."""

    __slots__ = ("acked", "due_ns", "expected", "measured", "received", "resolved", "sent_ns")

    def __init__(self, due_ns: int, sent_ns: int, measured: bool, expected: int) -> None:
        self.due_ns = due_ns
        self.sent_ns = sent_ns
        self.measured = measured
        self.expected = expected
        self.acked = False
        self.resolved = False
        self.received = 0


class _Tracker:
    """Counts of the whole run, kept incrementally so the drain check is O(1)."""

    def __init__(self) -> None:
        self.msgs: dict[bytes, _Msg] = {}
        self.sent = 0
        self.acked = 0
        self.failed = 0
        self.unresolved = 0
        self.expected = 0  # recipients of acked messages
        self.delivered = 0  # deliveries of acked messages
        self.duplicates = 0
        self.foreign = 0
        self.echoes = 0
        self.kicks = 0
        self.measured_deliveries = 0
        self.sending = False  # True from the first measured send to the last send
        self.window_deliveries = 0  # deliveries that arrived while sending (goodput)
        self.latencies_ns: list[int] = []
        self.due_latencies_ns: list[int] = []
        self.ack_ns: list[int] = []
        self.lag_ns: list[int] = []
        self.progress: asyncio.Event | None = None

    def sent_one(self, key: bytes, msg: _Msg) -> None:
        self.msgs[key] = msg
        self.sent += 1
        self.unresolved += 1

    def resolve(self, msg: _Msg, ok: bool) -> None:
        if msg.resolved:
            return
        msg.resolved = True
        self.unresolved -= 1
        if ok:
            msg.acked = True
            self.acked += 1
            self.expected += msg.expected
            self.delivered += msg.received
            if msg.measured:
                self.ack_ns.append(time.monotonic_ns() - msg.sent_ns)
        else:
            self.failed += 1
        self._poke()

    def on_ack(self, msg: _Msg, fut: asyncio.Future[int]) -> None:
        self.resolve(msg, not fut.cancelled() and fut.exception() is None)

    def on_push(self, seen: set[bytes], me: str, push: Push) -> None:
        now = time.monotonic_ns()
        if push.sender == me:
            self.echoes += 1  # the sender's own copy (other devices of the user)
            return
        parsed = parse_body(push.body)
        msg = self.msgs.get(parsed[1]) if parsed is not None else None
        if parsed is None or msg is None:
            self.foreign += 1
            return
        sent_ns, key, _ = parsed
        if key in seen:
            self.duplicates += 1
            return
        seen.add(key)
        msg.received += 1
        if msg.acked:
            self.delivered += 1
        if self.sending:
            self.window_deliveries += 1
        if msg.measured:
            self.measured_deliveries += 1
            self.latencies_ns.append(now - sent_ns)
            self.due_latencies_ns.append(now - msg.due_ns)
        self._poke()

    def done(self) -> bool:
        return self.unresolved == 0 and self.delivered >= self.expected

    def _poke(self) -> None:
        if self.progress is not None and self.done():
            self.progress.set()


# --- the run ----------------------------------------------------------------------------


async def _tokens(target: Target, uids: list[str], device: str) -> list[str]:
    if target.secret is not None:
        auth = Authenticator(target.secret)
        return [auth.issue(uid, device) for uid in uids]
    gate = asyncio.Semaphore(TOKEN_CONCURRENCY)

    async def one(uid: str) -> str:
        async with gate:
            return await fetch_token(target.ipconf, uid, device)

    try:
        return list(await asyncio.gather(*(one(uid) for uid in uids)))
    except ImkitError as exc:
        raise LoadError(f"cannot get login tokens from {target.ipconf}/dev/token: {exc}") from exc


async def _register(target: Target, uids: list[str], group: str | None) -> None:
    for i in range(0, len(uids), ADMIN_CHUNK):
        await _post_admin(target.ipconf, "create-user", uids[i : i + ADMIN_CHUNK])
    if group is not None:
        await _post_admin(target.ipconf, "create-group", [group, *uids[:ADMIN_CHUNK]])
        for i in range(ADMIN_CHUNK, len(uids), ADMIN_CHUNK):
            await _post_admin(target.ipconf, "join", [group, *uids[i : i + ADMIN_CHUNK]])


async def run_load(
    target: Target,
    config: LoadConfig,
    *,
    log: Callable[[str], object] | None = None,
    on_window: Callable[[str], Awaitable[object]] | None = None,
) -> LoadResult:
    """Register users, connect, send on schedule, drain, and measure (see the module doc).

    Runs in the caller's event loop. Costs O(messages + deliveries) memory for the
    bookkeeping (a dict entry per message, a set entry and a latency per delivery),
    and O(processes) ``/proc`` reads per CPU reading (four in a run) and per
    memory sample (4 a second).

    ``on_window`` (for a benchmark reading other counters over the same window)
    is called with ``"start"`` right after the CPU readings that open the
    measured window (in a task of its own: the sends go on meanwhile) and with
    ``"end"`` right after those that close it (awaited, after the start call
    finished); what it raises comes out of this call.

    Raises :class:`LoadError` when a process to measure does not exist, users
    cannot be created or clients cannot log in.
    """
    say = log or (lambda _: None)
    cfg = config
    n = cfg.clients
    run_id = secrets.token_hex(3)
    uids = [f"lg{run_id}-{i:05d}" for i in range(n)]
    group = f"lg{run_id}-all" if cfg.mode == "group" else None
    device = "loadgen"
    tracker = _Tracker()
    rng = random.Random(cfg.seed)
    pids = target.pids
    result = LoadResult(
        mode=cfg.mode,
        clients=n,
        rate=cfg.rate,
        duration_s=cfg.duration_s,
        warmup_s=cfg.warmup_s,
        loop=_loop_name(),
        connect_via="static endpoints" if cfg.direct else "ipconf",
    )

    for pid in (*pids, *target.backend_pids):
        if not Path(f"/proc/{pid}/stat").exists():
            raise LoadError(f"no process {pid} on this machine to read the CPU of")
    say(f"registering {n} users" + (f" and group {group}" if group else ""))
    await _register(target, uids, group)
    tokens = await _tokens(target, uids, device)
    static: list[Endpoint] = []
    if cfg.direct:
        try:
            static = await fetch_endpoints(f"{target.ipconf.rstrip('/')}/gateways")
        except ImkitError as exc:
            raise LoadError(f"cannot list the gateways at {target.ipconf}: {exc}") from exc

    def on_event(event: SessionEvent) -> None:
        if isinstance(event, Kicked):
            tracker.kicks += 1

    clients: list[Client] = []
    for i, (uid, token) in enumerate(zip(uids, tokens, strict=True)):
        if static:
            k = i % len(static)
            clients.append(
                Client(
                    token=token, device=device, endpoints=static[k:] + static[:k], on_event=on_event
                )
            )
        else:
            query = urllib.parse.urlencode({"uid": uid})
            clients.append(
                Client(
                    token=token,
                    device=device,
                    on_event=on_event,
                    fetch_endpoints=endpoint_fetcher(
                        f"{target.ipconf.rstrip('/')}/gateways?{query}"
                    ),
                )
            )

    async def read(client: Client, uid: str) -> None:
        seen: set[bytes] = set()
        on_push = tracker.on_push
        async for push in client.messages():
            on_push(seen, uid, push)

    readers: list[asyncio.Task[None]] = []
    try:
        # -- connect ------------------------------------------------------------------
        say(f"connecting {n} clients")
        cpu0 = _cpu_readings(pids) if pids else None
        rss0 = _rss_sum(pids) if pids else None
        t0 = time.monotonic()
        gate = asyncio.Semaphore(cfg.connect_concurrency)

        async def connect(client: Client) -> None:
            async with gate:
                await client.start()
                try:
                    await client.wait_for(ClientStatus.ONLINE, timeout=LOGIN_TIMEOUT_S)
                except (TimeoutError, ConnectionClosed) as exc:
                    why = client.last_error or client.kicked or exc
                    raise LoadError(f"a client could not log in: {why}") from exc

        readers = [asyncio.create_task(read(c, u)) for c, u in zip(clients, uids, strict=True)]
        await asyncio.gather(*(connect(c) for c in clients))
        result.connect_s = time.monotonic() - t0
        if pids and cpu0 is not None and rss0 is not None:
            used = _cpu_used(cpu0, _cpu_readings(pids), pids)
            result.connect_cpu_us = used / n * 1e6
            result.connect_cpu_ticks = round(used * os.sysconf("SC_CLK_TCK"))
            result.rss_before_kib = rss0
            result.rss_after_kib = _rss_sum(pids)
            if result.rss_after_kib is not None:
                result.rss_per_conn_kib = (result.rss_after_kib - rss0) / n

        # -- send on schedule -----------------------------------------------------------
        contacts: list[list[int]] = []
        if cfg.mode == "1:1" and cfg.contacts:
            k = min(cfg.contacts, n - 1)
            contacts = [[(i + 1 + j) % n for j in rng.sample(range(n - 1), k)] for i in range(n)]
        counters = [0] * n
        recipients = 1 if cfg.mode == "1:1" else n - 1
        interval_ns = 1e9 / cfg.rate
        n_warm = round(cfg.rate * cfg.warmup_s)
        total = n_warm + max(1, round(cfg.rate * cfg.duration_s))
        result.measured_sent = total - n_warm
        marks: dict[str, float] = {}
        say(f"sending {total} messages ({n_warm} warm-up) at {cfg.rate:g}/s")

        def send(i: int, due_ns: int) -> None:
            s = i % n
            if group is not None:
                conv = group
            else:
                r = rng.choice(contacts[s]) if contacts else (s + 1 + rng.randrange(n - 1)) % n
                conv = direct_conv_id(uids[s], uids[r])
            key = b"%d-%d" % (s, counters[s])
            counters[s] += 1
            measured = i >= n_warm
            sent_ns = time.monotonic_ns()
            msg = _Msg(due_ns, sent_ns, measured, recipients)
            tracker.sent_one(key, msg)
            try:
                _, fut = clients[s].send_nowait(
                    conv, make_body(sent_ns, key, _MEASURED if measured else _WARMUP, cfg.body_size)
                )
            except (CapacityError, ConnectionClosed):
                tracker.resolve(msg, False)
                return
            fut.add_done_callback(functools.partial(tracker.on_ack, msg))

        async def sample_rss() -> None:
            while pids:
                rss = _rss_sum(pids)
                if rss is not None:
                    result.rss_peak_kib = max(result.rss_peak_kib or 0, rss)
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample_rss())
        readers.append(sampler)

        backends: dict[int, str] = {}  # pid -> comm, fixed when measuring starts
        cpu_start: dict[int, float] = {}
        probes: list[asyncio.Future[object]] = []

        def mark() -> None:
            tracker.sending = True
            backends.update(processes_named(target.count_processes))
            backends.update((p, _comm(p)) for p in target.backend_pids)
            for p in pids:
                backends.pop(p, None)  # an imkit process is counted as one
            marks["t"] = time.monotonic()
            marks["gen"] = proc_cpu_s()
            cpu_start.update(_cpu_readings((*pids, *backends)))
            if on_window is not None:
                probes.append(asyncio.ensure_future(on_window("start")))

        start_ns = time.monotonic_ns()
        i = 0
        while i < total:
            now = time.monotonic_ns()
            due = start_ns + int(i * interval_ns)
            if due > now:
                await asyncio.sleep((due - now) / 1e9)
                continue
            while i < total and due <= now:
                if i == n_warm:
                    mark()
                if i >= n_warm:
                    tracker.lag_ns.append(now - due)
                send(i, due)
                i += 1
                due = start_ns + int(i * interval_ns)
            await asyncio.sleep(0)
        tracker.sending = False
        if "t" in marks:
            result.send_window_s = round(time.monotonic() - marks["t"], 3)
            result.goodput_per_s = round(
                tracker.window_deliveries / max(result.send_window_s, 1e-9), 1
            )

        # -- drain --------------------------------------------------------------------------
        tracker.progress = asyncio.Event()
        if not tracker.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tracker.progress.wait(), cfg.drain_s)
        t_end = time.monotonic()
        gen_end = proc_cpu_s()
        cpu_end = _cpu_readings(cpu_start)
        if on_window is not None:
            await asyncio.gather(*probes)
            await on_window("end")
    finally:
        for probe in probes:
            probe.cancel()
        for task in readers:
            task.cancel()
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)
        await asyncio.gather(*readers, return_exceptions=True)

    # -- results ------------------------------------------------------------------------
    t = tracker
    result.sent, result.acked, result.failed, result.pending = (
        t.sent,
        t.acked,
        t.failed,
        t.unresolved,
    )
    result.delivered, result.expected = t.delivered, t.expected
    result.lost = t.expected - t.delivered
    result.app_duplicates = t.duplicates
    result.unacked_deliveries = sum(m.received for m in t.msgs.values() if not m.acked)
    result.session_duplicates = sum(c.session.stats.duplicate_pushes for c in clients)
    result.foreign = t.foreign
    result.echoes = t.echoes
    result.kicks = t.kicks
    result.reconnects = sum(max(0, c.connects - 1) for c in clients)
    result.measured_deliveries = t.measured_deliveries
    result.latency_ms = summary_ms(t.latencies_ns, ("p50", "p90", "p99", "max"))
    result.due_latency_ms = summary_ms(t.due_latencies_ns, ("p50", "p99", "max"))
    result.ack_ms = summary_ms(t.ack_ns, ("p50", "p99"))
    result.send_lag_ms = summary_ms(t.lag_ns, ("p50", "p99", "max"))
    window = max(1e-9, t_end - marks["t"])
    result.window_s = round(window, 3)
    result.generator_cpu_pct = round((gen_end - marks["gen"]) / window * 100, 1)
    clk = os.sysconf("SC_CLK_TCK")
    counted = [p for p in pids if p in cpu_start]
    result.server_processes = len(counted)
    result.backend_processes = dict(
        collections.Counter(backends[p] for p in backends if p in cpu_start)
    )
    result.processes_gone = sum(1 for p in cpu_start if p not in cpu_end)
    result.process_cpu_s = {
        _label(p): round(cpu_end[p] - cpu_start[p], 3) for p in cpu_start if p in cpu_end
    }
    deliveries = t.measured_deliveries
    used = _cpu_used(cpu_start, cpu_end, counted)
    if counted:
        result.server_cpu_s = round(used, 3)
        result.server_cpu_ticks = round(used * clk)
        result.server_cpu_pct = round(used / window * 100, 1)
        if deliveries:
            result.server_cpu_per_delivery_us = round(used / deliveries * 1e6, 2)
    if result.backend_processes:
        used_b = _cpu_used(cpu_start, cpu_end, backends)
        result.backend_cpu_s = round(used_b, 3)
        result.backend_cpu_ticks = round(used_b * clk)
        if deliveries:
            result.backend_cpu_per_delivery_us = round(used_b / deliveries * 1e6, 2)
            result.total_cpu_per_delivery_us = round((used + used_b) / deliveries * 1e6, 2)
    if result.connect_cpu_us is not None:
        result.connect_cpu_us = round(result.connect_cpu_us, 1)
    if result.rss_per_conn_kib is not None:
        result.rss_per_conn_kib = round(result.rss_per_conn_kib, 3)
    result.connect_s = round(result.connect_s, 3)
    return result


def _loop_name() -> str:
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


# --- a launcher in a subprocess ---------------------------------------------------------


class SpawnedCluster:
    """``python -m examples.cluster`` in a child process, on ephemeral ports.

    :meth:`start` waits for its ready file and returns a :class:`Target` (with the
    launcher's pid, the pids of the children a ``--processes`` launcher lists, and
    a secret the generator mints tokens with); :meth:`stop` sends SIGINT and
    waits, killing it after ``timeout_s`` (a ``--processes`` launcher's children
    run in sessions of their own: :attr:`pids` names them for a caller that must
    make sure they are gone).
    """

    def __init__(self, *, gateways: int = 1, extra_args: Sequence[str] = ()) -> None:
        self.gateways = gateways
        self.extra_args = list(extra_args)
        self.secret = secrets.token_bytes(16)
        self._dir = tempfile.TemporaryDirectory(prefix="imkit-loadgen-")
        self.ready = Path(self._dir.name) / "ready.json"
        self._log = Path(self._dir.name) / "cluster.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: tuple[int, ...] = ()  # what the ready file listed
        self._tail = ""

    async def start(self, timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> Target:
        """Start the launcher and wait until it is ready."""
        cmd = [
            sys.executable,
            "-m",
            f"{__package__}.cluster",
            "--dev",
            "--port-base",
            "0",
            "--no-demo",
            "--no-web",
            "-q",
            "--gateways",
            str(self.gateways),
            # every generated client comes from this machine: one address by design
            "--max-per-address",
            "1000000",
            "--ready-file",
            str(self.ready),
            *self.extra_args,
        ]
        env = dict(os.environ, IMKIT_SECRET=self.secret.hex())  # not on the command line
        with self._log.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + timeout_s
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                await self.stop()
                raise LoadError(f"the launcher did not become ready:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        target = target_from_ready_file(self.ready, secret=self.secret)
        self.pids = target.pids
        return target

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the launcher wrote to stderr."""
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:  # removed by stop(): what it read last
            return self._tail

    async def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGINT, wait, then kill; returns the exit status. Idempotent."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + timeout_s
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        self._tail = self.log_tail()
        self._dir.cleanup()
        return proc.returncode


# --- command line -----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=command("loadgen"),
        description="Drive the imkit reference system with N clients at a fixed rate and "
        "report delivery, latency and the server's CPU per delivered message.",
        epilog="Example: python -m examples.loadgen --spawn --clients 1000 --rate 2000 "
        "--duration 10   |   python -m examples.loadgen --ready-file /tmp/ready.json "
        "--mode group --clients 1000 --rate 20",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--spawn",
        action="store_true",
        help="start python -m examples.cluster as a subprocess, stop it at the end",
    )
    where.add_argument(
        "--ready-file", help="a launcher's --ready-file (ipconf URL, its pid and its children's)"
    )
    where.add_argument("--ipconf", help="ipconf URL of a running cluster")
    p.add_argument(
        "--pid",
        type=int,
        action="append",
        default=[],
        help="an imkit server process for the CPU/RSS figures (repeatable)",
    )
    p.add_argument(
        "--count-process",
        action="append",
        default=[],
        metavar="NAME",
        help="add the CPU of every process named NAME (/proc/PID/comm) when measuring starts, "
        "e.g. redis-server, nats-server, postgres (repeatable; reported apart as backends)",
    )
    p.add_argument(
        "--count-pid",
        type=int,
        action="append",
        default=[],
        metavar="PID",
        help="add the CPU of this process as a backend (repeatable)",
    )
    p.add_argument("--secret", help="mint tokens with this hex secret instead of /dev/token")
    p.add_argument("--gateways", type=int, default=1, help="gateways of a --spawn cluster")
    p.add_argument(
        "--cluster-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="pass ARG to a --spawn cluster's command line (repeatable)",
    )
    p.add_argument("--mode", choices=("1:1", "group"), default="1:1")
    p.add_argument("--clients", type=int, default=100, help="connections (and users)")
    p.add_argument("--rate", type=float, default=1000.0, help="messages per second in total")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument(
        "--drain",
        type=float,
        default=DEFAULT_DRAIN_S,
        help="seconds to wait for the last acks and deliveries",
    )
    p.add_argument("--body-size", type=int, default=DEFAULT_BODY_SIZE, help="bytes per message")
    p.add_argument(
        "--contacts",
        type=int,
        default=0,
        help="1:1: each sender writes to K fixed contacts (default: anyone)",
    )
    p.add_argument(
        "--direct",
        action="store_true",
        help="connect to the gateways ipconf lists once, not per client",
    )
    p.add_argument("--connect-concurrency", type=int, default=DEFAULT_CONNECT_CONCURRENCY)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


async def _main(args: argparse.Namespace) -> int:
    try:
        config = LoadConfig(
            mode=args.mode,
            clients=args.clients,
            rate=args.rate,
            duration_s=args.duration,
            warmup_s=args.warmup,
            drain_s=args.drain,
            body_size=args.body_size,
            contacts=args.contacts,
            direct=args.direct,
            connect_concurrency=args.connect_concurrency,
            seed=args.seed,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def log(text: str) -> None:
        if not args.quiet:
            print(f"loadgen: {text}", file=sys.stderr, flush=True)

    secret = None
    if args.secret:
        try:
            secret = bytes.fromhex(args.secret)
        except ValueError:
            print("error: --secret must be hex", file=sys.stderr)
            return 2
    spawned: SpawnedCluster | None = None
    try:
        if args.spawn:
            spawned = SpawnedCluster(gateways=args.gateways, extra_args=args.cluster_arg)
            log("starting python -m examples.cluster")
            target = await spawned.start()
        elif args.ready_file:
            target = target_from_ready_file(args.ready_file, secret=secret)
        else:
            target = Target(ipconf=args.ipconf, secret=secret)
        target = attrs.evolve(
            target,
            pids=(*target.pids, *args.pid),
            backend_pids=args.count_pid,
            count_processes=args.count_process,
        )
        result = await run_load(target, config, log=log)
    except (LoadError, OSError, ValueError, KeyError, ImkitError) as exc:
        extra = f"\n{spawned.log_tail()}" if spawned is not None else ""
        print(f"error: {exc}{extra}", file=sys.stderr)
        return 2
    finally:
        if spawned is not None:
            await spawned.stop()
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.markdown(), flush=True)
    if not result.ok():
        print(f"loadgen: {result.lost} lost, {result.app_duplicates} duplicated", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m examples.loadgen``."""
    args = _parser().parse_args(argv)
    if not uvloop_available() and not args.quiet:
        print("loadgen: uvloop is not installed; using asyncio's loop", file=sys.stderr)
    from imkit.aio import run

    try:
        return run(_main(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
