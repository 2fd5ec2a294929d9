"""The shared measuring helpers (examples/measure.py): percentiles, /proc readings, machine line."""

from __future__ import annotations

import os

import pytest
from examples.measure import (
    ProcessGone,
    machine,
    percentile,
    percentile_of,
    proc_cpu_s,
    proc_rss_kib,
    summary_ms,
)

from imkit.errors import ConfigError

#: Above Linux's largest pid_max (2**22), so no process can have it.
NO_SUCH_PID = 2**30


class TestPercentiles:
    def test_unsorted_values_and_the_empty_default(self) -> None:
        """percentile_of sorts first and answers ``empty`` for no values."""
        assert percentile_of([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
        assert percentile_of([5.0, 1.0], 100) == 5.0
        assert percentile_of([], 99) == 0.0
        assert percentile_of([], 99, empty=-1.0) == -1.0

    def test_bad_arguments_are_config_errors(self) -> None:
        """No values or q outside (0, 100] raise ConfigError, still a ValueError."""
        for values, q in (([], 50.0), ([1], 0.0), ([1], 100.5)):
            with pytest.raises(ConfigError):
                percentile(values, q)
        assert issubclass(ConfigError, ValueError)

    def test_summary_in_milliseconds(self) -> None:
        """Nanosecond samples summarise to ms per key; no samples give no keys."""
        samples = [4_000_000, 1_000_000, 3_000_000, 2_000_000]
        assert summary_ms(samples, ("p50", "p99", "max")) == {"p50": 2.0, "p99": 4.0, "max": 4.0}
        assert summary_ms([], ("p50",)) == {}


class TestProcess:
    def test_this_process_by_default(self) -> None:
        """Without a pid the readings are this process's own, and agree with the /proc ones."""
        tick = 1 / os.sysconf("SC_CLK_TCK")
        assert abs(proc_cpu_s() - proc_cpu_s(os.getpid())) <= 2 * tick
        assert proc_rss_kib() > 0
        assert proc_rss_kib(os.getpid()) > 0

    def test_a_process_that_is_gone(self) -> None:
        """A pid with no /proc entry raises ProcessGone, which is also an OSError."""
        with pytest.raises(ProcessGone):
            proc_cpu_s(NO_SUCH_PID)
        with pytest.raises(OSError):
            proc_rss_kib(NO_SUCH_PID)


class TestMachine:
    def test_short_and_detailed_lines(self) -> None:
        """The short line ends with the OS; the detailed one adds the loop and names the cores."""
        short, detail = machine(), machine(detail=True)
        cores = f", {os.cpu_count()} cores"
        assert cores in short and cores in detail
        assert short.index("Python") < short.index(os.uname().sysname)
        assert detail.index(os.uname().sysname) < detail.index("Python")
        assert detail.endswith(", default asyncio loop")
