"""The load generator (examples/loadgen.py): its bookkeeping and short real runs.

Short runs against a cluster started in-process (1:1 over two gateways, a group on
the merged read fan-out path, a group on the notify-and-sync path) and one through
the command line with ``--spawn``: every acknowledged message is delivered to every
recipient exactly once. No timing is asserted: latencies and CPU figures depend on
the machine.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
from examples.cluster import ClusterConfig, start_cluster
from examples.loadgen import (
    LoadConfig,
    LoadResult,
    Target,
    make_body,
    parse_body,
    percentile,
    proc_cpu_s,
    proc_rss_kib,
    run_load,
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


async def _in_process(config: LoadConfig, cluster_config: ClusterConfig) -> LoadResult:
    cluster = await start_cluster(attrs.evolve(cluster_config, dev=True))
    try:
        target = Target(ipconf=cluster.ipconf_url, secret=cluster.secret)
        return await run_load(target, config)
    finally:
        await cluster.stop()


def small(mode: str) -> LoadConfig:
    """10 clients at 50 msgs/s for 1 s after 0.2 s of warm-up; a generous drain."""
    return LoadConfig(
        mode=mode, clients=10, rate=50.0, duration_s=1.0, warmup_s=0.2, drain_s=10.0
    )


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
        proc = subprocess.run(
            [sys.executable, "-m", "examples.loadgen", "--spawn", "--json", "-q",
             "--mode", "group", "--clients", "10", "--rate", "50", "--duration", "0.5",
             "--warmup", "0", "--drain", "10", "--direct"],
            cwd=ROOT, capture_output=True, text=True, timeout=50, check=False,
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
        proc = subprocess.run(
            [sys.executable, "-m", "examples.loadgen", "--ipconf", "http://127.0.0.1:9", "-q",
             "--clients", "2", "--duration", "0.1"],
            cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
        )
        assert proc.returncode == 2
        assert "error:" in proc.stderr and "Traceback" not in proc.stderr
