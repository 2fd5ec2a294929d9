"""Measuring helpers shared by the load generator and the benchmarks: percentiles, /proc, machine.

What it does
    * :func:`percentile` — the nearest-rank percentile of ascending values (the
      textbook definition: the smallest value with at least ``q`` % of the values
      at or below it); :func:`percentile_of` the same of unsorted values, with a
      default for none; :func:`summary_ms` a ``{"p50": ms, ..., "max": ms}`` summary
      of nanosecond samples, as ``examples.loadgen`` reports them.
    * :func:`proc_cpu_s` — user + system CPU seconds of a process (this one by
      default); :func:`proc_rss_kib` — its resident set size (``VmRSS``) in KiB.
    * :func:`machine` — one line naming the CPU, the cores and the interpreter,
      for the head of a results page.

    ``examples.loadgen``, ``benchmarks/_harness.py`` and the reliability harness
    (``python -m benchmarks.reliability``) all measure with these, so a p99 or a
    machine line means the same thing on every page.

Policies
    Standard library only (and :mod:`imkit.errors`): this is the lowest layer the
    examples and the benchmarks share, so it imports neither. Bad arguments raise
    :class:`~imkit.errors.ConfigError` (a ``ValueError``); a process that is gone
    (no ``/proc/<pid>``, or a zombie without ``VmRSS``) raises
    :class:`ProcessGone` (an ``OSError``, so ``except OSError`` still catches it).

What it leaves out
    Anything but Linux: the process readings come from ``/proc``, and their CPU
    time has the kernel's clock-tick resolution (10 ms at ``USER_HZ=100``).
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path

from imkit.errors import ConfigError, ImkitError

__all__ = [
    "ProcessGone",
    "machine",
    "percentile",
    "percentile_of",
    "proc_cpu_s",
    "proc_rss_kib",
    "summary_ms",
]


class ProcessGone(ImkitError, ProcessLookupError):
    """The process has exited: no ``/proc/<pid>`` entry, or no resident memory left."""


# --- percentiles ------------------------------------------------------------------------


def percentile(sorted_values: Sequence[int | float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ascending values. O(1).

    Raises :class:`~imkit.errors.ConfigError` for no values or ``q`` outside (0, 100].

    >>> percentile([1, 2, 3, 4], 50)
    2
    >>> percentile([1, 2, 3, 4], 99)
    4
    """
    if not sorted_values:
        raise ConfigError("percentile of no values")
    if not 0 < q <= 100:
        raise ConfigError(f"q must be in (0, 100], got {q!r}")
    rank = -(-len(sorted_values) * q // 100)  # ceil without floats drifting
    return sorted_values[max(0, int(rank) - 1)]


def percentile_of(values: Iterable[float], q: float, *, empty: float = 0.0) -> float:
    """:func:`percentile` of unsorted ``values``, or ``empty`` when there are none. O(n log n).

    >>> percentile_of([3.0, 1.0, 2.0], 50)
    2.0
    >>> percentile_of([], 99)
    0.0
    """
    ordered = sorted(values)
    return percentile(ordered, q) if ordered else empty


def summary_ms(values_ns: list[int], keys: Sequence[str]) -> dict[str, float]:
    """``{key: milliseconds}`` of nanosecond samples; keys are ``"p<q>"`` or ``"max"``.

    Values are rounded to the microsecond; no samples give ``{}``. Sorts
    ``values_ns`` in place (a run's samples can be millions: no copy).
    O(n log n) for the sort, then O(1) per key.

    >>> summary_ms([3_000_000, 1_000_000, 2_000_000], ("p50", "max"))
    {'p50': 2.0, 'max': 3.0}
    """
    if not values_ns:
        return {}
    values_ns.sort()
    out: dict[str, float] = {}
    for key in keys:
        v = values_ns[-1] if key == "max" else percentile(values_ns, float(key[1:]))
        out[key] = round(v / 1e6, 3)
    return out


# --- the process ------------------------------------------------------------------------


def proc_cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` so far (None: this process). O(1).

    Reads ``/proc/<pid>/stat`` (``os.times`` for this process). Raises
    :class:`ProcessGone` when the process does not exist.
    """
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError as exc:
        raise ProcessGone(f"no process {pid}") from exc
    rest = text[text.rindex(")") + 2 :].split()  # comm may contain spaces and parens
    ticks = int(rest[11]) + int(rest[12])  # fields 14 (utime) and 15 (stime)
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_rss_kib(pid: int | None = None) -> int:
    """Resident set size of process ``pid`` in KiB (None: this process). O(lines of status).

    Reads ``VmRSS`` of ``/proc/<pid>/status``. Raises :class:`ProcessGone` when the
    process does not exist or has no ``VmRSS`` (a zombie).
    """
    where = "self" if pid is None else str(pid)
    try:
        text = Path(f"/proc/{where}/status").read_text()
    except FileNotFoundError as exc:
        raise ProcessGone(f"no process {pid}") from exc
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ProcessGone(f"no VmRSS for pid {where}")


# --- the machine ------------------------------------------------------------------------


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what :mod:`platform` knows."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _ram_gib() -> str:
    """``", 24 GiB RAM"`` from /proc/meminfo, or ``""`` when it cannot be read."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        kib = int(f.readline().split()[1])  # the first line is MemTotal
        return f", {kib / 1024 / 1024:.0f} GiB RAM"
    return ""


def machine(*, detail: bool = False) -> str:
    """One line describing the machine and the interpreter, for a results page. O(cpuinfo).

    Short (the benchmarks' pages): ``AMD EPYC, 2 cores, Python 3.11.7 (CPython),
    Linux 6.1``. With ``detail`` (the reliability page) the RAM, the OS before
    Python, and the event loop: ``AMD EPYC, 2 cores, 24 GiB RAM, Linux 6.1, Python
    3.11.7 (CPython), default asyncio loop``.
    """
    head = f"{_cpu_name()}, {os.cpu_count()} cores"
    python = f"Python {platform.python_version()} ({platform.python_implementation()})"
    system = f"{platform.system()} {platform.release()}"
    if detail:
        return f"{head}{_ram_gib()}, {system}, {python}, default asyncio loop"
    return f"{head}, {python}, {system}"
