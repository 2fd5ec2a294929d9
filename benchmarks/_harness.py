"""A small benchmark harness: warm-up, repetitions, min/median/max, baselines side by side.

Every benchmark script in this folder measures imkit and its peers in the same run,
so that the ratios hold even on a noisy machine. Use it like this::

    from _harness import Report, measure

    report = Report("Hash ring lookups")
    r_imkit = measure(lambda: ring.get_many(keys), ops=len(keys))
    r_peer = measure(lambda: [peer.get_node(k) for k in keys], ops=len(keys))
    report.table(["impl", "lookups/s", "ratio"], [
        ["imkit", r_imkit.rate_str, "1.00"],
        ["uhashring", r_peer.rate_str, f"{r_imkit.ratio(r_peer):.2f}"],
    ])
    report.emit(__file__)

``emit`` prints the markdown and, with ``--write``, stores it in
``benchmarks/results/<script>.md``; ``run_all.py`` gathers those files into
``docs/benchmarks.md`` with the machine noted. ``--quick`` (or ``IMKIT_BENCH_QUICK=1``)
shrinks sizes and repetitions so that a script can be smoke-tested in seconds;
quick figures are never committed.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py`: make `examples` importable
    sys.path.insert(0, str(ROOT))

from examples.measure import machine  # noqa: E402

__all__ = ["RESULTS", "Report", "Result", "fmt_rate", "machine", "measure", "quick"]

RESULTS = Path(__file__).parent / "results"


def quick() -> bool:
    """True when sizes and repetitions should be shrunk (smoke runs, CI)."""
    return "--quick" in sys.argv or os.environ.get("IMKIT_BENCH_QUICK") == "1"


@dataclass(frozen=True)
class Result:
    """Timings of one measured callable: seconds per call over the repetitions."""

    ops: int
    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    @property
    def rate(self) -> float:
        """Operations per second at the median time."""
        return self.ops / self.median

    @property
    def ns_per_op(self) -> float:
        return self.median / self.ops * 1e9

    @property
    def rate_str(self) -> str:
        return fmt_rate(self.rate)

    def ratio(self, baseline: Result) -> float:
        """How many times faster this is than ``baseline`` (median over median)."""
        return baseline.median / baseline.ops / (self.median / self.ops)

    def spread(self) -> str:
        """min / median / max per operation, in ns."""
        k = 1e9 / self.ops
        return f"{self.min * k:.0f} / {self.median * k:.0f} / {self.max * k:.0f}"


def measure(
    fn: Callable[[], object],
    *,
    ops: int,
    repeat: int | None = None,
    warmup: int = 1,
    setup: Callable[[], object] | None = None,
) -> Result:
    """Time ``fn`` (which performs ``ops`` operations) ``repeat`` times after ``warmup`` runs.

    ``setup`` runs untimed before every call (to rebuild state that ``fn`` consumes).
    The garbage collector is paused while timing, as ``timeit`` does.
    """
    if repeat is None:
        repeat = 3 if quick() else 7
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        gc_was = gc.isenabled()
        gc.disable()
        try:
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
        finally:
            if gc_was:
                gc.enable()
        times.append(t1 - t0)
    return Result(ops=ops, times=tuple(times))


def fmt_rate(rate: float) -> str:
    if rate >= 1e6:
        return f"{rate / 1e6:.2f} M"
    if rate >= 1e3:
        return f"{rate / 1e3:.0f} k"
    return f"{rate:.0f}"


class Report:
    """Markdown tables and notes of one benchmark script."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []

    def note(self, text: str) -> None:
        self.parts.append(text.strip() + "\n")

    def table(
        self, headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = ""
    ) -> None:
        lines = []
        if title:
            lines.append(f"**{title}**\n")
        lines.append("| " + " | ".join(headers) + " |")
        lines.append("|" + "|".join("---" for _ in headers) + "|")
        lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
        self.parts.append("\n".join(lines) + "\n")

    def render(self) -> str:
        head = f"## {self.title}\n\n"
        cmd = f"`python benchmarks/{Path(sys.argv[0]).name}`"
        return head + f"Reproduce: {cmd}\n\n" + "\n".join(self.parts)

    def emit(self, script: str) -> None:
        text = self.render()
        print(text)
        if "--write" in sys.argv and not quick():
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / (Path(script).stem + ".md")).write_text(text)
