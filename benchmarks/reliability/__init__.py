"""Reliability figures of the reference system: Jepsen-style history checks under faults.

    .venv/bin/python -m benchmarks.reliability          # all; writes docs/reliability.md
    .venv/bin/python -m benchmarks.reliability --quick  # scaled down, prints only
    .venv/bin/python -m benchmarks.reliability --only kill,acks --clients 150

(from the repository root: the package imports ``examples`` and ``tests.history``).

Every scenario starts the reference system (``examples/``) in this process on
loopback, drives it with real :class:`imkit.aio.Client` connections chatting 1:1, in
small groups (write fan-out) and in one group of everyone (merged read fan-out),
injects a fault, and checks the history the way RELIABILITY.md asks: every body is
``sender-counter``; each send is logged ok / failed / unknown and each delivery to
the application; after the faults end the clients drain (first on their own, then
through an explicit sync); then **lost** (acknowledged, never delivered to a member),
**unexpected**, **duplicates delivered to the application**, **order violations per
conversation** and **seq reuse** are counted against the store. A run passes only if
they are all 0. Duplicates on the wire (allowed), latency and drain time are reported.

Scenarios: ``kill`` (one of 3 gateways dies under load), ``restart`` (the whole
server side crashes and restarts on its SQLite data directory, twice), ``acks`` (30%
of the clients' push acks dropped by a proxy), ``resources`` (a silent client, a slow
reader and a connect flood: memory, file handles, others' latency), ``fuzz`` (the
atheris decoder harness in a subprocess). Linux only: file handles and sockets are
read from /proc.

Layout: ``_fleet`` (the layout, the client fleet, the drain), ``_faults`` (gateway
kill, restart, dropped acks), ``_resources`` (bad peers), ``_fuzz``, ``_report``
(results and docs/reliability.md), ``_cli`` (the command line). The history
checker is the tests' oracle, ``tests/history.py``; the percentiles, /proc
readings and machine line come from ``examples/measure.py``.
"""

from __future__ import annotations

from benchmarks.reliability._cli import SCENARIOS, main, run_scenarios
from benchmarks.reliability._faults import (
    scenario_dropped_acks,
    scenario_gateway_kill,
    scenario_restart,
)
from benchmarks.reliability._fleet import Drain, Layout, Population, drain, rotated
from benchmarks.reliability._fuzz import scenario_fuzz
from benchmarks.reliability._report import ScenarioResult, check_rows, render
from benchmarks.reliability._resources import scenario_resources
from tests.history import Check, History, SendRecord, check_history, store_truth

__all__ = [
    "SCENARIOS",
    "Check",
    "Drain",
    "History",
    "Layout",
    "Population",
    "ScenarioResult",
    "SendRecord",
    "check_history",
    "check_rows",
    "drain",
    "main",
    "render",
    "rotated",
    "run_scenarios",
    "scenario_dropped_acks",
    "scenario_fuzz",
    "scenario_gateway_kill",
    "scenario_resources",
    "scenario_restart",
    "store_truth",
]
