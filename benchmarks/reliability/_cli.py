"""The command line: ``python -m benchmarks.reliability [--quick] [--only ...]``.

:func:`main` parses the scale flags, runs the chosen scenarios one after the
other (each on its own cluster), prints the report and, for a full run, writes
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from benchmarks.reliability._faults import (
    scenario_dropped_acks,
    scenario_gateway_kill,
    scenario_restart,
)
from benchmarks.reliability._fleet import now
from benchmarks.reliability._fuzz import scenario_fuzz
from benchmarks.reliability._report import ScenarioResult, render
from benchmarks.reliability._resources import scenario_resources

ROOT = Path(__file__).resolve().parents[2]  # the repository
DOC = ROOT / "docs" / "reliability.md"
#: The scenarios' keys, in the order they run (``--only`` takes a subset).
SCENARIOS = ("kill", "restart", "acks", "resources", "fuzz")


async def run_scenarios(args: argparse.Namespace) -> list[ScenarioResult]:
    """Run the chosen scenarios one after the other (each on its own cluster)."""
    quick = args.quick
    scale = 0.34 if quick else 1.0
    n = args.clients or (30 if quick else 120)
    small = max(8, int((args.clients or 40) * (0.5 if quick else 1.0)))
    only = set(args.only.split(",")) if args.only else set(SCENARIOS)
    results: list[ScenarioResult] = []
    runners: list[tuple[str, Callable[[], Awaitable[ScenarioResult]]]] = [
        ("kill", lambda: scenario_gateway_kill(
            clients=n, rate=args.rate, load_s=12.0 * scale * args.duration,
            kill_at_s=4.0 * scale * args.duration)),
        ("restart", lambda: scenario_restart(
            clients=small, rate=2.0 * args.rate, restarts=args.restarts,
            phase_s=4.0 * scale * args.duration)),
        ("acks", lambda: scenario_dropped_acks(
            clients=small, rate=2.0 * args.rate, load_s=8.0 * scale * args.duration)),
        ("resources", lambda: scenario_resources(
            clients=small, rate=2.0 * args.rate, phase_s=6.0 * scale * args.duration,
            flood=args.flood, trace=not args.no_tracemalloc)),
    ]
    for key, runner in runners:
        if key not in only:
            continue
        print(f"-- {key} ...", file=sys.stderr, flush=True)
        result = await runner()
        print(f"   {'pass' if result.passed else 'FAIL'} in {result.seconds:.1f} s",
              file=sys.stderr, flush=True)
        results.append(result)
    if "fuzz" in only:
        print("-- fuzz ...", file=sys.stderr, flush=True)
        runs = args.fuzz_runs if args.fuzz_runs is not None else (20_000 if quick else 500_000)
        result = await asyncio.to_thread(scenario_fuzz, runs=runs)
        print(f"   {'pass' if result.passed else 'FAIL'} in {result.seconds:.1f} s",
              file=sys.stderr, flush=True)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios, print the report, write docs/reliability.md (full runs)."""
    from benchmarks import reliability  # the package's docstring is the help text

    p = argparse.ArgumentParser(prog="python -m benchmarks.reliability",
                                description=reliability.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="scaled down; prints, writes nothing")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--clients", type=int, default=0,
                   help="clients in the kill scenario (default 120; the others use 40)")
    p.add_argument("--rate", type=float, default=1.0, help="multiplier of the send rates")
    p.add_argument("--duration", type=float, default=1.0, help="multiplier of the phase lengths")
    p.add_argument("--restarts", type=int, default=2, help="crash-restarts in scenario 2")
    p.add_argument("--flood", type=int, default=500, help="connections in the connect flood")
    p.add_argument("--fuzz-runs", type=int, default=None, help="atheris inputs (default 500k)")
    p.add_argument("--no-tracemalloc", action="store_true", help="skip the heap figures")
    p.add_argument("--out", default=None, help=f"write the report here (default {DOC} "
                   "for full runs)")
    args = p.parse_args(argv)
    began = now()
    results = asyncio.run(run_scenarios(args))
    elapsed = now() - began
    command = ".venv/bin/python -m benchmarks.reliability" + (
        " " + " ".join(argv if argv is not None else sys.argv[1:])
        if (argv if argv is not None else sys.argv[1:]) else ""
    )
    text = render(results, command, elapsed)
    print(text)
    out = args.out or (None if args.quick or args.only else str(DOC))
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    return 0 if all(r.passed for r in results) else 1

