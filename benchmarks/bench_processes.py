"""One process or many: the reference system embedded and as processes on Redis, NATS, PostgreSQL.

Runs the same load (``examples/loadgen.py``, in this process) against, one after
another:

1. **embedded, memory**: ``python -m examples.cluster`` (everything in one process);
2. **embedded, SQLite**: the same with ``--data-dir`` (messages in SQLite);
3. **processes 1+1**: ``--processes --gateways 1 --logic 1`` (a launcher, a gateway,
   a logic process and ipconf, on Redis, NATS JetStream and PostgreSQL);
4. **processes 2+2**: ``--processes --gateways 2 --logic 2``.

Scenarios: **1:1**, 200 clients, each message to one of the sender's 2 fixed
contacts (``--contacts``; 0: a random other client), at 100,
200 and 400 msgs/s offered (10 s each after 2 s of warm-up); then, while the last
rate still passed, 1.5 times more, up to 8 steps in all. A step **passes** when
nothing is lost, duplicated, refused or left pending and the p99 latency (send to
the recipient's application) is at most 50 ms; the **throughput** of a
configuration is the delivered rate of its fastest passing step. Then a short
**group** run: 100 members at 10 msgs/s for 5 s (99 deliveries per message, 990 a
second).

Per run: offered vs delivered rate, p50/p99, lost / duplicated / refused (lost and
duplicated must be 0: the exit status is 1 otherwise), **server CPU per delivered
message** summed over every imkit process (``/proc/<pid>/stat``: the launcher and,
in process mode, every child its ready file lists), the same **with the backends**
(the private ``redis-server`` and ``nats-server`` by pid, and every ``postgres``
process on the machine: PostgreSQL runs one backend per connection), and in process
mode what each backend did per message sent, read from the servers' own counters
just before and after the measured window:

* Redis ``INFO stats``: ``total_commands_processed``, ``total_net_input_bytes`` +
  ``total_net_output_bytes``;
* NATS ``/varz`` of the monitoring port: ``in_msgs`` + ``out_msgs``, ``in_bytes`` +
  ``out_bytes`` (JetStream's own acks and API calls included);
* PostgreSQL ``pg_stat_database`` of the benchmark's database: ``xact_commit``,
  ``tup_inserted``, ``tup_fetched``. PostgreSQL counts no network bytes; the bytes
  come from the kernel instead: ``ss -ti`` (``bytes_sent`` + ``bytes_received`` of
  the TCP connections the imkit processes hold to port 5432, client side);
* **client writes**, the round-trip figure: TCP segments carrying data that the
  imkit processes sent to each server (``data_segs_out`` of ``ss -ti``). A request,
  a pipeline or a script call is one write; a reply needs none.

Run (about 10 minutes; ``--quick`` under a minute)::

    python benchmarks/bench_processes.py [--quick] [--json] [--write]
        [--configs embedded-memory,embedded-sqlite,processes-1x1,processes-2x2]
        [--rates 100,200,400] [--contacts 2] [--clients 200] [--duration 10] [--max-steps 8]

It starts a private ``redis-server`` and ``nats-server -js -m PORT`` (so their
counters and CPU are this run's alone) and creates a private database on the
PostgreSQL server at ``IMKIT_POSTGRES_DSN`` (default ``postgresql://postgres@
127.0.0.1:5432/postgres``), dropped at the end with everything in it.

Caveats: two cores shared by the generator (one Python process: its CPU is shown;
near 100% it, not the server, bounds the rate), every server process and the three
backends: the process mode's parallelism has little room here, and its hops
(NATS, Redis, PostgreSQL on loopback) all cost CPU on the same two cores. Run it on
an otherwise idle machine (``postgres`` counts
every PostgreSQL process, other users' included). PostgreSQL flushes its counters
at most once a second per backend, so both readings lag by up to a second of work
(at a steady rate the lags cancel; a one-second ``--quick`` run may show none).
CPU is read in 10 ms ticks. ``--quick`` figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/bench_processes.py`
    sys.path.insert(0, str(ROOT))

from examples.loadgen import (  # noqa: E402
    LoadConfig,
    LoadError,
    LoadResult,
    SpawnedCluster,
    run_load,
)

from _harness import Report, machine, quick  # noqa: E402
from imkit.aio import run  # noqa: E402
from imkit.errors import BackendError, ConfigError  # noqa: E402

#: Offered rates every configuration runs (msgs/s), then x1.5 while the last passes:
#: low enough that the process mode (every hop a real server on the same two
#: cores) passes its first steps, so each configuration's ceiling is found.
DEFAULT_RATES = (100, 200, 400)
#: Clients of the 1:1 runs: each sends rate/200 msgs/s, far below the gateway's
#: flood limit (200 frames/s per connection) at every step.
DEFAULT_CLIENTS = 200
#: Each 1:1 sender writes to this many fixed contacts (a steady conversation, as a
#: chat app has): with "anyone", nearly every message would open a new 1:1
#: conversation (7 rows in PostgreSQL), which measures conversation creation.
DEFAULT_CONTACTS = 2
DEFAULT_DURATION_S = 10.0
DEFAULT_WARMUP_S = 2.0
#: The latency bound of the throughput figure (the issue's: p99 under 50 ms).
DEFAULT_P99_LIMIT_MS = 50.0
#: Steps of the rate search in all (the fixed rates included): 500 .. 2000 then
#: x1.5 five times reaches ~15k msgs/s, past what one Python generator offers.
DEFAULT_MAX_STEPS = 8
STEP_FACTOR = 1.5
#: Drain after each run, at most: a passing run drains in milliseconds; an
#: overloaded one holds up to 64 sends per client in flight (12,800 at 200
#: clients: ~40 s at 300 msgs/s), and "lost" must mean lost, not late.
DEFAULT_DRAIN_S = 60.0
#: The group run: 100 members at 10 msgs/s = 990 deliveries/s for 5 s.
GROUP_CLIENTS = 100
GROUP_RATE = 10.0
GROUP_DURATION_S = 5.0
#: A --processes launcher starts its processes one after another (~1 s each).
READY_TIMEOUT_S = 90.0
DEFAULT_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

Say = Callable[[str], None]


# --- what to run ----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Setup:
    """One configuration of the reference system."""

    key: str
    title: str
    processes: bool = False
    gateways: int = 1
    logic: int = 1
    sqlite: bool = False


SETUPS = (
    Setup(key="embedded-memory", title="embedded, memory"),
    Setup(key="embedded-sqlite", title="embedded, SQLite", sqlite=True),
    Setup(key="processes-1x1", title="processes 1 gw + 1 logic", processes=True),
    Setup(key="processes-2x2", title="processes 2 gw + 2 logic", processes=True, gateways=2,
          logic=2),
)  # fmt: skip


@attrs.frozen(kw_only=True)
class Settings:
    """The load every configuration gets."""

    rates: tuple[int, ...] = DEFAULT_RATES
    clients: int = DEFAULT_CLIENTS
    contacts: int = DEFAULT_CONTACTS
    duration_s: float = DEFAULT_DURATION_S
    warmup_s: float = DEFAULT_WARMUP_S
    drain_s: float = DEFAULT_DRAIN_S
    max_steps: int = DEFAULT_MAX_STEPS
    p99_limit_ms: float = DEFAULT_P99_LIMIT_MS
    group_clients: int = GROUP_CLIENTS
    group_rate: float = GROUP_RATE
    group_duration_s: float = GROUP_DURATION_S

    def one_to_one(self, rate: float) -> LoadConfig:
        return LoadConfig(mode="1:1", clients=self.clients, rate=rate,
                          contacts=self.contacts, duration_s=self.duration_s,
                          warmup_s=self.warmup_s, drain_s=self.drain_s)  # fmt: skip

    def group(self) -> LoadConfig:
        return LoadConfig(mode="group", clients=self.group_clients, rate=self.group_rate,
                          duration_s=self.group_duration_s, warmup_s=self.warmup_s,
                          drain_s=self.drain_s)  # fmt: skip


QUICK = Settings(rates=(200, 400), clients=40, duration_s=1.5, warmup_s=0.3, drain_s=5.0,
                 max_steps=3, group_clients=20, group_rate=5.0, group_duration_s=1.0)  # fmt: skip


def passes(result: LoadResult, limit_ms: float) -> bool:
    """Nothing lost, duplicated, refused or pending, and p99 within ``limit_ms``."""
    return (
        result.ok()
        and result.failed == 0
        and result.pending == 0
        and result.latency_ms.get("p99", float("inf")) <= limit_ms
    )


def next_rate(rate: int) -> int:
    """The next step of the search: ``STEP_FACTOR`` times, rounded to 100 msgs/s."""
    return max(rate + 100, round(rate * STEP_FACTOR / 100) * 100)


# --- the backends and their counters ----------------------------------------------------------


class Backends:
    """A private redis-server and nats-server (with its monitoring port) and a private
    database on the shared PostgreSQL server; the counters of all three.

    :meth:`counters` costs one round trip to each server and one ``ss`` run.
    """

    def __init__(self, stack: ExitStack, workdir: Path) -> None:
        """Start the two private servers (``stack`` stops them); :meth:`open` next."""
        from tests.services import ServerProcess, free_port

        port, monitor, redis_port = free_port(), free_port(), free_port()
        argv = [_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(redis_port),
                "--save", "", "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
        self.redis = ServerProcess("redis", argv, redis_port, workdir)
        self.redis.start()
        stack.callback(self.redis.stop)
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        store = workdir / "jetstream"
        store.mkdir()
        argv = [_binary("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js",
                "-sd", str(store), "-m", str(monitor)]  # fmt: skip
        self.nats = ServerProcess("nats", argv, port, workdir)
        self.nats.start()
        stack.callback(self.nats.stop)
        self.nats_url = f"nats://127.0.0.1:{port}"
        self.varz_url = f"http://127.0.0.1:{monitor}/varz"
        shared = os.environ.get("IMKIT_POSTGRES_DSN", DEFAULT_POSTGRES_DSN)
        self.database = f"imkit_bench_{secrets.token_hex(4)}"
        parts = urlsplit(shared)
        self.shared_dsn = shared
        self.postgres_dsn = urlunsplit(parts._replace(path=f"/{self.database}"))
        self.ports = {"redis": self.redis.port, "nats": port, "postgres": parts.port or 5432}
        self._pg: Any = None
        self._redis: Any = None

    @property
    def pids(self) -> tuple[int, int]:
        """The private redis-server and nats-server."""
        return self.redis.pid, self.nats.pid

    async def open(self) -> None:
        """Create the database; connect the counter readers."""
        import asyncpg  # type: ignore[import-untyped]
        import redis.asyncio as aioredis

        try:
            admin = await asyncpg.connect(self.shared_dsn)
        except (OSError, asyncpg.PostgresError) as exc:
            raise BackendError(f"PostgreSQL at {self.shared_dsn}: {exc}") from exc
        try:
            await admin.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            await admin.close()
        self._pg = await asyncpg.connect(self.postgres_dsn)
        self._redis = aioredis.from_url(self.redis_url)

    async def aclose(self) -> None:
        """Drop the database (and every schema in it); close the readers."""
        import asyncpg

        if self._redis is not None:
            await self._redis.aclose()
        if self._pg is not None:
            await self._pg.close()
        try:
            admin = await asyncpg.connect(self.shared_dsn)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            finally:
                await admin.close()
        except (OSError, asyncpg.PostgresError) as exc:
            raise BackendError(f"cannot drop the database {self.database}: {exc}") from exc

    async def counters(self, imkit_pids: tuple[int, ...]) -> dict[str, Any]:
        """Every counter now: Redis, NATS, PostgreSQL, and the imkit processes' sockets."""
        import asyncpg
        from redis.exceptions import RedisError

        try:
            stats = await self._redis.info("stats")
            varz = await asyncio.to_thread(_get_json, self.varz_url)
            row = await self._pg.fetchrow(
                "SELECT xact_commit, tup_inserted, tup_fetched FROM pg_stat_database "
                "WHERE datname = $1",
                self.database,
            )
        except (OSError, ValueError, RedisError, asyncpg.PostgresError) as exc:
            raise BackendError(f"cannot read the backends' counters: {exc}") from exc
        return {
            "redis_commands": stats["total_commands_processed"],
            "redis_bytes": stats["total_net_input_bytes"] + stats["total_net_output_bytes"],
            "nats_msgs": varz["in_msgs"] + varz["out_msgs"],
            "nats_bytes": varz["in_bytes"] + varz["out_bytes"],
            "pg_commits": row["xact_commit"],
            "pg_inserted": row["tup_inserted"],
            "pg_fetched": row["tup_fetched"],
            "sockets": await tcp_sockets(self.ports, set(imkit_pids)),
        }


def _binary(name: str) -> str:
    """The path of a server program; ConfigError when it is not installed."""
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.path.exists(candidate):
            return candidate
    raise ConfigError(f"{name} is not installed (process mode needs it)")


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        doc: dict[str, Any] = json.loads(response.read())
        return doc


_SS_FIELD = re.compile(r"\b(bytes_sent|bytes_received|data_segs_out):(\d+)")


async def tcp_sockets(ports: dict[str, int], pids: set[int]) -> dict[str, list[int]]:
    """``{"<server> <local address> <pid>": [bytes sent, bytes received, data segments
    sent]}`` of the TCP connections ``pids`` hold to ``ports`` (``ss -tinp``: the
    kernel's per-connection counters). O(connections on the machine)."""
    by_port = {str(port): name for name, port in ports.items()}
    where = " or ".join(f"dport = :{port}" for port in ports.values())
    proc = await asyncio.create_subprocess_exec(
        "ss", "-tinpH", "state", "established", f"( {where} )",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await proc.communicate()
    sockets: dict[str, list[int]] = {}
    key: str | None = None
    for line in out.decode(errors="replace").splitlines():
        if not line[:1].isspace():  # a connection: recv-q send-q local peer users:((...))
            key = None
            tokens = line.split()
            pid = re.search(r"pid=(\d+)", line)
            users = next((i for i, t in enumerate(tokens) if t.startswith("users:")), None)
            if pid and users is not None and int(pid.group(1)) in pids:
                server = by_port.get(tokens[users - 1].rsplit(":", 1)[-1])
                if server:
                    key = f"{server} {tokens[users - 2]} {pid.group(1)}"
        elif key is not None:
            fields = dict(_SS_FIELD.findall(line))
            sockets[key] = [int(fields.get(k, 0)) for k in
                            ("bytes_sent", "bytes_received", "data_segs_out")]  # fmt: skip
    return sockets


def per_message(before: dict[str, Any], after: dict[str, Any], messages: int) -> dict[str, float]:
    """What each backend did per message sent between two :meth:`Backends.counters`."""
    n = max(1, messages)
    out = {k: (after[k] - before[k]) / n for k in after if k != "sockets"}
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for key, values in after["sockets"].items():
        start = before["sockets"].get(key, [0, 0, 0])  # opened in the window: from 0
        server = key.split(" ", 1)[0]
        for i in range(3):
            totals[server][i] += values[i] - start[i]
    for server in ("redis", "nats", "postgres"):
        sent, received, writes = totals[server]
        out[f"{server}_client_bytes"] = (sent + received) / n
        out[f"{server}_writes"] = writes / n
    return out


# --- running -----------------------------------------------------------------------------------


@attrs.define
class Run:
    """One loadgen run and what the backends did meanwhile."""

    setup: str
    scenario: str
    result: LoadResult
    backend: dict[str, float] | None = None
    passed: bool = False


async def run_setup(
    setup: Setup, settings: Settings, backends: Backends | None, say: Say
) -> list[Run]:
    """Start one configuration, run the rate steps and the group run, stop it."""
    extra: list[str] = []
    tmp = tempfile.TemporaryDirectory(prefix="imkit-bench-")
    namespace = f"bench_{secrets.token_hex(3)}"
    if setup.sqlite:
        extra += ["--data-dir", tmp.name]
    if setup.processes:
        assert backends is not None
        extra += ["--processes", "--logic", str(setup.logic),
                  "--redis", backends.redis_url, "--nats", backends.nats_url,
                  "--postgres", backends.postgres_dsn, "--namespace", namespace]  # fmt: skip
    cluster = SpawnedCluster(gateways=setup.gateways, extra_args=extra)
    runs: list[Run] = []
    try:
        say(f"{setup.title}: starting")
        target = await cluster.start(timeout_s=READY_TIMEOUT_S)
        if setup.processes:
            assert backends is not None
            target = attrs.evolve(target, backend_pids=backends.pids,
                                  count_processes=("postgres",))  # fmt: skip

        async def one(scenario: str, config: LoadConfig) -> Run:
            readings: dict[str, dict[str, Any]] = {}

            async def on_window(phase: str) -> None:
                assert backends is not None
                readings[phase] = await backends.counters(target.pids)

            probe = on_window if setup.processes else None
            result = await run_load(target, config, on_window=probe)
            r = Run(setup.key, scenario, result, passed=passes(result, settings.p99_limit_ms))
            if readings:
                r.backend = per_message(readings["start"], readings["end"], result.measured_sent)
            lat = result.latency_ms
            say(f"{setup.title}: {scenario} at {config.rate:g}/s: "
                f"{result.goodput_per_s:.0f} delivered/s, p99 {lat.get('p99', 0):.1f} ms, "
                f"lost {result.lost}, refused {result.failed}"
                + ("" if r.passed else " (does not pass)"))  # fmt: skip
            return r

        rates = list(settings.rates)
        i = 0
        while i < len(rates) and i < settings.max_steps:
            r = await one("1:1", settings.one_to_one(rates[i]))
            runs.append(r)
            if i == len(rates) - 1 and r.passed:
                rates.append(next_rate(rates[i]))
            i += 1
        runs.append(await one("group", settings.group()))
    finally:
        await cluster.stop(timeout_s=60)
        for pid in cluster.pids:  # children a killed launcher would leave behind
            if _is_cluster_process(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        tmp.cleanup()
    return runs


def _is_cluster_process(pid: int) -> bool:
    """True while ``pid`` still runs ``examples.cluster`` (not a reused pid)."""
    try:
        return b"examples.cluster" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


async def run_all(
    setups: list[Setup], settings: Settings, say: Say, used: dict[str, str]
) -> list[Run]:
    """Every configuration, one after another; the backends only when one needs them
    (what they were is put in ``used``: the database's name, the servers' URLs)."""
    runs: list[Run] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="imkit-bench-") as work:
        backends: Backends | None = None
        if any(s.processes for s in setups):
            backends = Backends(stack, Path(work))
            used.update(database=backends.database, redis=backends.redis_url,
                        nats=backends.nats_url, varz=backends.varz_url)  # fmt: skip
            say(f"private redis-server and nats-server; database {backends.database}")
            await backends.open()
        try:
            for setup in setups:
                runs += await run_setup(setup, settings, backends, say)
        finally:
            if backends is not None:
                await backends.aclose()
    return runs


# --- the report ------------------------------------------------------------------------------


def _num(value: float | None, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


def _cpu(r: LoadResult) -> str:
    coarse = " (coarse)" if (r.server_cpu_ticks or 0) < 20 else ""
    return f"{_num(r.server_cpu_per_delivery_us)}{coarse} ({r.server_processes} proc.)"


def _with_backends(r: LoadResult) -> str:
    if not r.backend_processes:
        return "—"
    n = sum(r.backend_processes.values())
    return f"{_num(r.total_cpu_per_delivery_us)} (+{n} proc.)"


def _delivered_per_s(r: LoadResult) -> float:
    """Deliveries per second while sending (the goodput): what the system carried."""
    return r.goodput_per_s


def throughput(runs: list[Run]) -> tuple[float | None, float | None, int]:
    """(delivered/s, offered/s) of the fastest passing 1:1 step, and the steps run."""
    steps = [r for r in runs if r.scenario == "1:1"]
    ok = [r for r in steps if r.passed]
    if not ok:
        return None, None, len(steps)
    best = max(ok, key=lambda r: _delivered_per_s(r.result))
    return _delivered_per_s(best.result), best.result.rate, len(steps)


def role_of(label: str) -> str:
    """``"gw-2 4242"`` -> ``"gw"``; ``"postgres 99"`` -> ``"postgres"``."""
    return re.sub(r"-\d+$", "", label.rsplit(" ", 1)[0])


ROLES = ("cluster", "gw", "logic", "ipconf", "redis-server", "nats-server", "postgres")


def report(setups: list[Setup], settings: Settings, runs: list[Run]) -> Report:
    """The markdown page."""
    rep = Report("One process or many: embedded vs --processes on Redis, NATS, PostgreSQL")
    rep.note(
        f"Machine: {machine()}. 1:1: {settings.clients} clients, each message to "
        + (f"one of the sender's {settings.contacts} fixed contacts, " if settings.contacts
           else "a random other client, ")
        + f"{settings.duration_s:g} s per rate after {settings.warmup_s:g} s of "
        f"warm-up; group: {settings.group_clients} members at {settings.group_rate:g} msgs/s "
        f"for {settings.group_duration_s:g} s. A step passes with nothing lost, duplicated, "
        f"refused or pending and p99 <= {settings.p99_limit_ms:g} ms. CPU per delivered "
        "message: user + system over the measured window, summed over the imkit processes "
        "(and, in the next column, the backends too) / deliveries. Backend figures are per "
        "message sent, from the servers' own counters (PostgreSQL bytes and every 'writes' "
        "figure from the kernel's TCP counters of the imkit processes' connections)."
    )
    by_setup = {s.key: [r for r in runs if r.setup == s.key] for s in setups}
    rows = []
    for s in setups:
        best, offered, steps = throughput(by_setup[s.key])
        at = [r for r in by_setup[s.key] if r.scenario == "1:1" and r.result.rate == offered]
        rows.append([
            s.title,
            "none passed" if best is None else f"{best:,.0f} (offered {offered:,.0f})",
            str(steps),
            _cpu(at[0].result) if at else "n/a",
            _with_backends(at[0].result) if at else "n/a",
        ])  # fmt: skip
    rep.table(
        ["configuration", f"delivered msgs/s at p99 < {settings.p99_limit_ms:g} ms",
         "steps run", "server CPU per delivered msg (µs)", "with the backends (µs)"],
        rows, title="Throughput (1:1)",
    )  # fmt: skip
    rows = []
    for r in runs:
        x = r.result
        lat = x.latency_ms
        rows.append([
            next(s.title for s in setups if s.key == r.setup),
            f"{r.scenario}{'' if r.passed or r.scenario != '1:1' else ' ✗'}",
            f"{x.rate:,.0f} / {_delivered_per_s(x):,.0f}",
            f"{lat.get('p50', 0):.1f} / {lat.get('p99', 0):.1f}",
            f"{x.lost} / {x.app_duplicates} / {x.failed}",
            _cpu(x),
            _with_backends(x),
            f"{_num(x.server_cpu_pct)}% / {x.generator_cpu_pct:.0f}%",
        ])  # fmt: skip
    rep.table(
        ["configuration", "scenario", "offered / delivered (msgs/s)", "p50 / p99 (ms)",
         "lost / dup / refused", "server CPU per delivered msg (µs)",
         "with the backends (µs)", "CPU server / generator"],
        rows, title="Every run (✗: the step does not pass)",
    )  # fmt: skip
    rows = []
    for r in runs:
        if r.backend is None:
            continue
        b = r.backend
        rows.append([
            next(s.title for s in setups if s.key == r.setup),
            f"{r.scenario} {r.result.rate:,.0f}/s",
            f"{b['redis_commands']:.1f} / {b['redis_bytes']:,.0f}",
            f"{b['nats_msgs']:.1f} / {b['nats_bytes']:,.0f}",
            f"{b['pg_commits']:.2f} / {b['pg_inserted']:.2f} / {b['pg_fetched']:.2f}",
            f"{b['postgres_client_bytes']:,.0f}",
            f"{b['redis_writes']:.1f} / {b['nats_writes']:.1f} / {b['postgres_writes']:.1f}",
        ])  # fmt: skip
    if rows:
        rep.table(
            ["configuration", "scenario", "Redis commands / bytes", "NATS msgs / bytes",
             "PostgreSQL commits / rows inserted / rows fetched", "PostgreSQL bytes",
             "client writes Redis / NATS / PostgreSQL"],
            rows, title="The backends per message sent (process mode)",
        )  # fmt: skip
    rows = []
    for r in runs:
        if r.scenario != "1:1" or r.result.rate != settings.rates[len(settings.rates) // 2]:
            continue
        per_role: dict[str, float] = defaultdict(float)
        for label, used in r.result.process_cpu_s.items():
            per_role[role_of(label)] += used
        d = max(1, r.result.measured_deliveries)
        rows.append([next(s.title for s in setups if s.key == r.setup)]
                    + [_num(per_role[k] / d * 1e6) if k in per_role else "—"
                       for k in ROLES])  # fmt: skip
    if rows:
        rate = settings.rates[len(settings.rates) // 2]
        rep.table(
            ["configuration", "launcher (embedded: all)", "gateways", "logic", "ipconf",
             "redis-server",
             "nats-server", "postgres"],
            rows, title=f"Where the CPU goes at {rate:,} msgs/s (µs per delivered message)",
        )  # fmt: skip
    return rep


def as_json(
    setups: list[Setup], settings: Settings, runs: list[Run], used: dict[str, str]
) -> dict[str, Any]:
    """Everything measured, JSON-able (``used``: the backends, gone by now)."""
    out: dict[str, Any] = {"machine": machine(), "settings": attrs.asdict(settings),
                           "backends": used, "configurations": []}  # fmt: skip
    for s in setups:
        mine = [r for r in runs if r.setup == s.key]
        best, offered, steps = throughput(mine)
        out["configurations"].append({
            **attrs.asdict(s),
            "throughput": {"delivered_per_s": best, "offered_per_s": offered, "steps": steps,
                           "p99_limit_ms": settings.p99_limit_ms},
            "runs": [{"scenario": r.scenario, "passed": r.passed, "backend": r.backend,
                      "result": r.result.as_dict()} for r in mine],
        })  # fmt: skip
    return out


# --- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds each")
    p.add_argument("--write", action="store_true", help="store the markdown in results/")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    p.add_argument("--configs", default=",".join(s.key for s in SETUPS),
                   help="comma-separated: " + ", ".join(s.key for s in SETUPS))  # fmt: skip
    p.add_argument("--rates", help="fixed offered rates, comma-separated (msgs/s)")
    p.add_argument("--clients", type=int, help="clients of the 1:1 runs")
    p.add_argument("--contacts", type=int, help="fixed contacts per 1:1 sender (0: anyone)")
    p.add_argument("--duration", type=float, help="measured seconds per run")
    p.add_argument("--max-steps", type=int, help="1:1 runs per configuration at most")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings a command line asks for (``--quick`` first, then the overrides)."""
    base = QUICK if args.quick or quick() else Settings()
    changes: dict[str, Any] = {}
    if args.rates:
        changes["rates"] = tuple(int(x) for x in args.rates.split(","))
    if args.clients:
        changes["clients"] = args.clients
    if args.contacts is not None:
        changes["contacts"] = args.contacts
    if args.duration:
        changes["duration_s"] = args.duration
    if args.max_steps:
        changes["max_steps"] = args.max_steps
    settings = attrs.evolve(base, **changes)
    if not settings.rates or min(settings.rates) <= 0 or settings.max_steps < 1:
        raise ConfigError("rates must be > 0 and max_steps >= 1")
    return settings


def _setups(keys: str) -> list[Setup]:
    known = {s.key: s for s in SETUPS}
    wanted = [k.strip() for k in keys.split(",") if k.strip()]
    if not wanted or any(k not in known for k in wanted):
        raise ConfigError(f"--configs takes {', '.join(known)}; got {keys!r}")
    return [known[k] for k in wanted]


@contextlib.contextmanager
def _timer(say: Say) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    say(f"done in {time.monotonic() - t0:.0f} s")


def main(argv: list[str] | None = None) -> int:
    """Run the configurations; print markdown (or JSON). 1 when a run lost or duplicated."""
    args = _parser().parse_args(argv)
    try:
        setups, settings = _setups(args.configs), settings_from(args)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        if not args.quiet:
            print(f"bench_processes: {text}", file=sys.stderr, flush=True)

    used: dict[str, str] = {}
    try:
        with _timer(say):
            runs = run(run_all(setups, settings, say, used))
    except (LoadError, BackendError, ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(as_json(setups, settings, runs, used), indent=2))
    else:
        report(setups, settings, runs).emit(__file__)
    bad = [r for r in runs if not r.result.ok()]
    for r in bad:
        say(f"{r.setup} {r.scenario} {r.result.rate:g}/s: {r.result.lost} lost, "
            f"{r.result.app_duplicates} duplicated")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
