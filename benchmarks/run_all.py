"""Run every benchmark script one after another and rebuild docs/benchmarks.md.

    python benchmarks/run_all.py            # all scripts, full sizes (minutes)
    python benchmarks/run_all.py ring wheel # only scripts whose name contains these

Run it on an otherwise idle machine: two busy cores are easily shared into wrong
figures. Each script writes benchmarks/results/<script>.md; this file stitches the
results (including ones not re-run this time) under a header naming the machine.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

from _harness import RESULTS, machine

HERE = Path(__file__).parent
DOC = HERE.parent / "docs" / "benchmarks.md"

INTRO = """\
# Benchmarks

Measured with the scripts in `benchmarks/` (harness: `benchmarks/_harness.py`):
one warm-up run, then 7 repetitions with the garbage collector paused; rates are at
the median, and every table puts imkit beside its peers *in the same run*, so read the
ratios rather than the absolute rates (the machine is shared and noisy). Regenerate
everything with `python benchmarks/run_all.py` on an idle machine.

Machine: {machine}. Last full run: {date}.

"""


def main() -> None:
    wanted = sys.argv[1:]
    scripts = sorted(p for p in HERE.glob("bench_*.py"))
    for script in scripts:
        if wanted and not any(w in script.stem for w in wanted):
            continue
        print(f"== {script.name}", flush=True)
        subprocess.run([sys.executable, str(script), "--write"], check=True, cwd=HERE.parent)
    parts = [INTRO.format(machine=machine(), date=datetime.date.today().isoformat())]
    summary = HERE / "SUMMARY.md"
    if summary.exists():
        parts.append(summary.read_text())
    parts.extend(p.read_text() for p in sorted(RESULTS.glob("*.md")))
    DOC.write_text("\n".join(parts))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
