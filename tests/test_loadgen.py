"""The load generator (examples/loadgen.py): its bookkeeping and short real runs.

Short runs against a cluster started in-process (1:1 over two gateways, a group on
the merged read fan-out path, a group on the notify-and-sync path) and one through
the command line with ``--spawn``: every acknowledged message is delivered to every
recipient exactly once. No timing is asserted: latencies and CPU figures depend on
the machine.

The CPU of several processes: real child processes that burn CPU under a name of
their own (``/proc/self/comm``) stand for a ``--processes`` launcher's children and
for the backends; the run's sum is checked against its per-process figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
import pytest
from examples.cluster import ClusterConfig, start_cluster
from examples.loadgen import (
    LoadConfig,
    LoadError,
    LoadResult,
    Target,
    make_body,
    parse_body,
    percentile,
    proc_cpu_s,
    proc_rss_kib,
    processes_named,
    run_load,
    target_from_ready_file,
)
from examples.logic import LogicConfig
from hypothesis import given
from hypothesis import strategies as st

from imkit.errors import ConfigError

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
    """Run ``main`` on a fresh event loop, bounded by ``timeout_s``."""

    async def bounded() -> T:
        return await asyncio.wait_for(main, timeout_s)

    return asyncio.run(bounded())


def assert_complete(result: LoadResult) -> None:
    """Everything sent was acknowledged and delivered once to each recipient."""
    assert result.sent > 0
    assert (result.acked, result.failed, result.pending) == (result.sent, 0, 0), result
    assert result.delivered == result.expected, result
    assert result.lost == 0, result
    assert result.app_duplicates == 0, result
    assert result.foreign == 0, result
    assert result.ok()


class TestBodies:
    @given(
        sent_ns=st.integers(min_value=0, max_value=2**63),
        sender=st.integers(min_value=0, max_value=10**6),
        counter=st.integers(min_value=0, max_value=10**9),
        measured=st.booleans(),
        size=st.integers(min_value=0, max_value=300),
    )
    def test_round_trip(
        self, sent_ns: int, sender: int, counter: int, measured: bool, size: int
    ) -> None:
        """A body parses back to its send time, key and phase, padded to at least ``size``."""
        key = b"%d-%d" % (sender, counter)
        phase = b"m" if measured else b"w"
        body = make_body(sent_ns, key, phase, size)
        assert len(body) >= size
        assert parse_body(body) == (sent_ns, key, phase)

    @given(st.binary(max_size=64))
    def test_garbage_never_raises(self, body: bytes) -> None:
        """Arbitrary bytes parse to None, or to the body's own first three fields."""
        parsed = parse_body(body)
        if parsed is not None:
            head = body.split(b" ", 3)
            assert parsed == (int(head[0]), head[1], head[2])
            assert parsed[2] in (b"m", b"w")

    def test_chat_text_is_foreign(self) -> None:
        """An ordinary chat message is not mistaken for a generator message."""
        assert parse_body(b"hello bob") is None
        assert parse_body(b"12 3-4 x") is None


class TestPercentile:
    @given(
        st.lists(st.integers(min_value=-(10**9), max_value=10**9), min_size=1, max_size=200),
        st.integers(min_value=1, max_value=100),
    )
    def test_nearest_rank(self, values: list[int], q: int) -> None:
        """The nearest-rank percentile matches the textbook definition."""
        ordered = sorted(values)
        expected = ordered[math.ceil(q * len(ordered) / 100) - 1]
        assert percentile(ordered, q) == expected

    def test_bad_arguments(self) -> None:
        """Empty input or q outside (0, 100] is refused."""
        with pytest.raises(ValueError):
            percentile([], 50)
        with pytest.raises(ValueError):
            percentile([1], 0)
        with pytest.raises(ValueError):
            percentile([1], 101)


class TestConfig:
    @pytest.mark.parametrize(
        "kwargs",
        [
            {"mode": "broadcast"},
            {"clients": 1},
            {"rate": 0},
            {"duration_s": 0},
            {"warmup_s": -1},
            {"body_size": 10},
            {"body_size": 9000},
            {"contacts": -1},
            {"connect_concurrency": 0},
        ],
    )
    def test_bad_config(self, kwargs: dict[str, Any]) -> None:
        """An impossible run is refused with ConfigError."""
        with pytest.raises(ConfigError):
            LoadConfig(**kwargs)


class TestProc:
    def test_own_counters(self) -> None:
        """/proc readings of this process agree with os.times and are positive."""
        before = proc_cpu_s(os.getpid())
        t = os.times()
        after = proc_cpu_s(os.getpid())
        tick = 1 / os.sysconf("SC_CLK_TCK")
        assert before - tick <= t.user + t.system <= after + tick
        assert proc_rss_kib(os.getpid()) > 0


async def _in_process(
    config: LoadConfig,
    cluster_config: ClusterConfig,
    *,
    counted: Target | None = None,
    on_window: Any = None,
) -> LoadResult:
    """A run against a cluster in this process; ``counted`` gives the processes to measure."""
    cluster = await start_cluster(attrs.evolve(cluster_config, dev=True))
    try:
        target = Target(ipconf=cluster.ipconf_url, secret=cluster.secret)
        if counted is not None:
            target = attrs.evolve(counted, ipconf=cluster.ipconf_url, secret=cluster.secret)
        return await run_load(target, config, on_window=on_window)
    finally:
        await cluster.stop()


def small(mode: str) -> LoadConfig:
    """10 clients at 50 msgs/s for 1 s after 0.2 s of warm-up; a generous drain."""
    return LoadConfig(mode=mode, clients=10, rate=50.0, duration_s=1.0, warmup_s=0.2, drain_s=10.0)


class TestRun:
    def test_one_to_one_over_two_gateways(self) -> None:
        """1:1 with tokens minted locally: all delivered once, no CPU figures without a pid."""
        result = run(_in_process(small("1:1"), ClusterConfig(gateways=2)))
        assert_complete(result)
        assert result.expected == result.acked  # one recipient per message
        assert result.server_cpu_per_delivery_us is None
        assert len(result.latency_ms) == 4

    def test_group_merged_read_fanout(self) -> None:
        """A group past write_fanout_max (merged PushBatches): N-1 deliveries per message."""
        logic = LogicConfig(write_fanout_max=4)
        result = run(_in_process(small("group"), ClusterConfig(logic=logic)))
        assert_complete(result)
        assert result.expected == result.acked * 9
        assert result.echoes == result.acked  # the sender gets its own copy too

    def test_group_notify_and_sync(self) -> None:
        """A group past push_fanout_max (Notify, then sync): still all delivered once."""
        logic = LogicConfig(write_fanout_max=2, push_fanout_max=4)
        result = run(_in_process(small("group"), ClusterConfig(logic=logic)))
        assert_complete(result)
        assert result.expected == result.acked * 9


class TestCommandLine:
    def test_spawn_json(self) -> None:
        """--spawn --json starts and stops a launcher, measures its CPU, prints JSON, exits 0."""
        argv = [sys.executable, "-m", "examples.loadgen", "--spawn", "--json", "-q",
                "--mode", "group", "--clients", "10", "--rate", "50", "--duration", "0.5",
                "--warmup", "0", "--drain", "10", "--direct"]  # fmt: skip
        proc = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=50, check=False
        )
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        result = LoadResult(**doc)
        assert_complete(result)
        assert result.connect_via == "static endpoints"
        assert result.server_cpu_s is not None and result.server_cpu_s >= 0
        assert result.rss_before_kib is not None and result.rss_before_kib > 0

    def test_unreachable_target(self) -> None:
        """A target that does not answer ends with status 2 and a message, no traceback."""
        argv = [sys.executable, "-m", "examples.loadgen", "--ipconf", "http://127.0.0.1:9",
                "-q", "--clients", "2", "--duration", "0.1"]  # fmt: skip
        proc = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
        )
        assert proc.returncode == 2
        assert "error:" in proc.stderr and "Traceback" not in proc.stderr

    def test_spawn_counts_backends_by_name_and_pid(self) -> None:
        """--count-process NAME and --count-pid PID add those processes' CPU to a
        --spawn run as backends; the report counts them beside the launcher."""
        name, other = fresh_name(), fresh_name()
        with burners(name, other) as procs:
            argv = [sys.executable, "-m", "examples.loadgen", "--spawn", "--json", "-q",
                    "--clients", "4", "--rate", "20", "--duration", "0.5", "--warmup", "0",
                    "--drain", "10", "--direct", "--count-process", name,
                    "--count-pid", str(procs[1].pid)]  # fmt: skip
            proc = subprocess.run(
                argv, cwd=ROOT, capture_output=True, text=True, timeout=50, check=False
            )
        assert proc.returncode == 0, proc.stderr
        result = LoadResult(**json.loads(proc.stdout))
        assert_complete(result)
        assert result.server_processes == 1  # the embedded launcher
        assert result.backend_processes == {name: 1, other: 1}
        assert result.backend_cpu_s is not None and result.backend_cpu_s > 0

    @pytest.mark.parametrize(
        ("flags", "why"),
        [
            (["--pid", "0"], "pids must be > 0"),
            (["--count-pid", "-1"], "pids must be > 0"),
            (["--count-process", "a-name-longer-than-15"], "1-15 characters"),
        ],
    )
    def test_impossible_processes_are_refused(self, flags: list[str], why: str) -> None:
        """An impossible pid or process name ends with status 2 and says why."""
        argv = [sys.executable, "-m", "examples.loadgen", "--ipconf", "http://127.0.0.1:9",
                "-q", "--clients", "2", *flags]  # fmt: skip
        proc = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
        )
        assert proc.returncode == 2
        assert why in proc.stderr and "Traceback" not in proc.stderr


# --- the CPU of several processes ---------------------------------------------------------

BURN = "import sys\nopen('/proc/self/comm', 'w').write(sys.argv[1])\nwhile True: pass"


@contextlib.contextmanager
def burners(*names: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    """One child process per name, burning CPU under that comm; killed (by pid) after."""
    procs = [subprocess.Popen([sys.executable, "-c", BURN, name]) for name in names]
    try:
        deadline = time.monotonic() + 10
        for proc, name in zip(procs, names, strict=True):
            while Path(f"/proc/{proc.pid}/comm").read_text().strip() != name:
                assert time.monotonic() < deadline, "a burner did not take its name"
                time.sleep(0.01)
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def fresh_name() -> str:
    """A comm no other process on the machine has (15 characters at most)."""
    return "lg" + secrets.token_hex(5)


def cpu_of(result: LoadResult, pid: int) -> float:
    """The run's CPU figure of one process (its key is ``"<name> <pid>"``)."""
    (used,) = [v for k, v in result.process_cpu_s.items() if k.endswith(f" {pid}")]
    return used


class TestTargets:
    def test_embedded_ready_file(self, tmp_path: Path) -> None:
        """An embedded launcher's ready file gives its one pid."""
        ready = tmp_path / "ready.json"
        ready.write_text(json.dumps({"ipconf": "http://h:1", "pid": 42, "gateways": []}))
        target = target_from_ready_file(ready, secret=b"k" * 16)
        assert target == Target(ipconf="http://h:1", pids=(42,), secret=b"k" * 16)

    def test_processes_ready_file(self, tmp_path: Path) -> None:
        """A --processes launcher's ready file gives the launcher and every child listed."""
        ready = tmp_path / "ready.json"
        children = [
            {"role": "logic", "id": "logic-1", "pid": 11},
            {"role": "gateway", "id": "gw-1", "pid": 12, "tcp": "tcp://h:2"},
            {"role": "ipconf", "id": "ipconf", "pid": 13, "url": "http://h:1"},
        ]
        ready.write_text(json.dumps({"ipconf": "http://h:1", "pid": 10, "processes": children}))
        assert target_from_ready_file(ready).pids == (10, 11, 12, 13)

    @pytest.mark.parametrize(
        "text",
        [
            "",
            "[]",
            '{"pid": 1}',
            '{"ipconf": "u"}',
            '{"ipconf": "u", "pid": 1, "processes": [{"id": "x"}]}',
            '{"ipconf": 3, "pid": 1}',
        ],
    )
    def test_bad_ready_file(self, tmp_path: Path, text: str) -> None:
        """A ready file without ipconf or pids is refused with LoadError."""
        ready = tmp_path / "ready.json"
        ready.write_text(text)
        with pytest.raises(LoadError):
            target_from_ready_file(ready)
        with pytest.raises(LoadError):
            target_from_ready_file(tmp_path / "missing.json")

    def test_pids_and_names(self) -> None:
        """Pids are kept once each, in order; impossible pids and names are refused."""
        target = Target(ipconf="u", pids=[3, 1, 3], count_processes=["postgres", "postgres"])
        assert target.pids == (3, 1) and target.count_processes == ("postgres",)
        with pytest.raises(ConfigError):
            Target(ipconf="u", pids=[0])
        with pytest.raises(ConfigError):
            Target(ipconf="u", backend_pids=[-5])
        with pytest.raises(ConfigError):
            Target(ipconf="u", count_processes=["a-name-longer-than-15"])
        with pytest.raises(ConfigError):
            Target(ipconf="u", count_processes=[""])

    def test_processes_named(self) -> None:
        """Every process with the name is found, never this one."""
        name = fresh_name()
        with burners(name, name, fresh_name()) as procs:
            assert processes_named([name]) == {procs[0].pid: name, procs[1].pid: name}
        mine = Path("/proc/self/comm").read_text().strip()
        assert os.getpid() not in processes_named([mine])
        assert processes_named([]) == {}


class TestSeveralProcesses:
    def test_sum_over_a_ready_files_processes(self, tmp_path: Path) -> None:
        """A ready file listing a launcher and a child: the CPU is their sum (larger
        than either), the RSS too, and the report counts two processes."""
        with burners(fresh_name(), fresh_name()) as procs:
            launcher, child = (proc.pid for proc in procs)
            ready = tmp_path / "ready.json"
            ready.write_text(json.dumps({
                "ipconf": "http://unused", "pid": launcher,
                "processes": [{"role": "gateway", "id": "gw-1", "pid": child}],
            }))  # fmt: skip
            rss_each = [proc_rss_kib(launcher), proc_rss_kib(child)]
            counted = target_from_ready_file(ready)
            result = run(_in_process(small("1:1"), ClusterConfig(), counted=counted))
        assert_complete(result)
        assert result.server_processes == 2 and result.processes_gone == 0
        assert result.backend_processes == {} and result.total_cpu_per_delivery_us is None
        each = [cpu_of(result, launcher), cpu_of(result, child)]
        assert min(each) > 0
        assert result.server_cpu_s is not None
        assert result.server_cpu_s == pytest.approx(sum(each), abs=0.002)
        assert result.server_cpu_s > max(each)
        assert result.server_cpu_per_delivery_us == pytest.approx(
            result.server_cpu_s / result.measured_deliveries * 1e6, rel=0.01
        )
        assert result.rss_before_kib is not None and result.rss_before_kib > max(rss_each)
        assert "2 imkit" in result.markdown()

    def test_count_process_adds_backends_cpu_only(self) -> None:
        """--count-process NAME counts every process named so, apart from the imkit
        processes: their CPU in the backend and total figures, not in the RSS."""
        name = fresh_name()
        with burners(fresh_name(), name, name) as procs:
            server, b1, b2 = (proc.pid for proc in procs)
            rss_server = proc_rss_kib(server)
            counted = Target(ipconf="u", pids=(server,), count_processes=(name,))
            result = run(_in_process(small("1:1"), ClusterConfig(), counted=counted))
        assert_complete(result)
        assert result.server_processes == 1
        assert result.backend_processes == {name: 2}
        assert result.server_cpu_s == pytest.approx(cpu_of(result, server), abs=0.002)
        backend = cpu_of(result, b1) + cpu_of(result, b2)
        assert result.backend_cpu_s is not None and result.backend_cpu_s > 0
        assert result.backend_cpu_s == pytest.approx(backend, abs=0.002)
        assert result.server_cpu_per_delivery_us is not None
        assert result.backend_cpu_per_delivery_us is not None
        assert result.total_cpu_per_delivery_us == pytest.approx(
            result.server_cpu_per_delivery_us + result.backend_cpu_per_delivery_us, abs=0.02
        )
        # the RSS is the server's alone (each burner has about the same)
        assert result.rss_before_kib is not None
        assert result.rss_before_kib < 1.5 * rss_server
        assert f"{name} 2 (CPU only)" in result.markdown()

    def test_a_process_that_exits_is_reported_not_summed(self) -> None:
        """A counted process that exits (killed and reaped) while measured drops out
        of the sum and is reported; on_window sees "start", then "end"."""
        calls: list[str] = []
        with burners(fresh_name(), fresh_name()) as procs:
            stays, goes = (proc.pid for proc in procs)

            async def on_window(phase: str) -> None:
                calls.append(phase)
                if phase == "start":
                    procs[1].send_signal(signal.SIGKILL)
                    await asyncio.to_thread(procs[1].wait, 10)  # reaped: no /proc entry

            counted = Target(ipconf="u", pids=(stays, goes))
            result = run(
                _in_process(small("1:1"), ClusterConfig(), counted=counted, on_window=on_window)
            )
        assert calls == ["start", "end"]
        assert_complete(result)
        assert result.server_processes == 2 and result.processes_gone == 1
        assert len(result.process_cpu_s) == 1
        assert result.server_cpu_s == pytest.approx(cpu_of(result, stays), abs=0.002)
        assert "1 exited" in result.markdown()

    def test_missing_pid_is_refused(self) -> None:
        """A pid that does not exist stops the run before anything is registered."""
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait(10)
        counted = Target(ipconf="u", backend_pids=(proc.pid,))
        with pytest.raises(LoadError, match=str(proc.pid)):
            run(_in_process(small("1:1"), ClusterConfig(), counted=counted))


class TestBenchProcesses:
    @pytest.mark.timeout(150)
    def test_quick_mode_end_to_end(self) -> None:
        """``benchmarks/bench_processes.py --quick --json`` runs the four configurations
        (~35 s): nothing lost or duplicated, every imkit process and backend counted,
        each backend's counters moved, and its private servers and database are gone."""
        from tests.services import nats_url, postgres_dsn, redis_url

        dsn = postgres_dsn()  # each skips the test when its server does not answer
        redis_url()
        nats_url()
        for binary in ("redis-server", "nats-server", "ss"):
            if not any(Path(d, binary).exists() for d in ("/usr/bin", "/usr/sbin", "/bin")):
                pytest.skip(f"{binary} is not installed")
        argv = [sys.executable, "benchmarks/bench_processes.py", "--quick", "--json", "-q"]
        proc = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=140, check=False
        )
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        configs = {c["key"]: c for c in doc["configurations"]}
        assert list(configs) == [
            "embedded-memory", "embedded-sqlite", "processes-1x1", "processes-2x2"
        ]  # fmt: skip
        imkit = {"embedded-memory": 1, "embedded-sqlite": 1, "processes-1x1": 4,
                 "processes-2x2": 6}  # fmt: skip
        for key, config in configs.items():
            assert 1 <= config["throughput"]["steps"] <= doc["settings"]["max_steps"]
            scenarios = [r["scenario"] for r in config["runs"]]
            assert scenarios[-1] == "group" and set(scenarios[:-1]) == {"1:1"}
            for run_ in config["runs"]:
                result = LoadResult(**run_["result"])
                assert result.ok() and result.sent > 0, (key, result)
                assert result.server_processes == imkit[key]
                assert result.server_cpu_s is not None and result.rss_before_kib is not None
                if not config["processes"]:
                    assert run_["backend"] is None and result.backend_processes == {}
                    continue
                counted = result.backend_processes
                assert counted["redis-server"] == 1 and counted["nats-server"] == 1
                assert counted["postgres"] >= 1
                backend = run_["backend"]
                figures = ["redis_commands", "nats_msgs", "nats_bytes", "postgres_client_bytes",
                           "redis_writes", "nats_writes", "postgres_writes"]  # fmt: skip
                if run_["scenario"] == "1:1":  # PostgreSQL flushes its counters once a
                    figures += ["pg_commits", "pg_inserted"]  # second: 1 s of group may show 0
                for figure in figures:
                    assert backend[figure] > 0, (key, figure, backend)
        # the private servers are stopped, the private database dropped
        used = doc["backends"]
        for url in (used["redis"], used["nats"]):
            with pytest.raises(OSError):
                socket_probe(url)
        import asyncpg  # type: ignore[import-untyped]

        async def databases() -> list[str]:
            conn = await asyncpg.connect(dsn)
            try:
                rows = await conn.fetch("SELECT datname FROM pg_database")
                return [r["datname"] for r in rows]
            finally:
                await conn.close()

        assert used["database"] not in asyncio.run(databases())


def socket_probe(url: str) -> None:
    """Connect to the host and port of ``url`` (OSError when nothing listens)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=2):
        pass
