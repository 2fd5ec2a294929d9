"""Scenario 5: the atheris decoder harness (tests/fuzz/fuzz_decoder.py) in a subprocess.

:func:`scenario_fuzz` seeds a corpus with valid frames of every type in each of
the harness's input modes, runs it for a number of inputs, and reports inputs
tried, crashes, the slowest input and the peak memory.
"""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import attrs
from benchmarks.reliability._fleet import now
from benchmarks.reliability._report import ScenarioResult

from imkit.protocol import Error as ErrorFrame
from imkit.protocol import (
    FrameType,
    Kick,
    Login,
    LoginAck,
    Message,
    Notify,
    Ping,
    Pong,
    Push,
    PushAck,
    PushBatch,
    Receipt,
    Send,
    SendAck,
    SyncPage,
    SyncRequest,
    SyncResponse,
    encode,
)

ROOT = Path(__file__).resolve().parents[2]  # the repository


# --- scenario 5: fuzzing the decoder ----------------------------------------------------------


def _seed_messages() -> list[Message]:
    push = Push(conv="dm:5:alice:bob", seq=7, sender="alice", body=b"hi bob", msg_id=9,
                server_ms=1_700_000_000_000)
    return [
        Login(token="v1.alice.phone.1.abc", device="phone"),
        LoginAck(uid="alice", session="gw-1.1", heartbeat_ms=30_000),
        Ping(nonce=1),
        Pong(nonce=1, server_ms=5),
        Send(cid=65537, conv="team", body=b"hello" * 20),
        SendAck(cid=65537, conv="team", seq=3, msg_id=11),
        push,
        PushBatch(pushes=(push, attrs.evolve(push, seq=8, body=b"x" * 300))),
        PushAck(conv="team", seq=8),
        SyncRequest(req_id=1, after=(("team", 3),), limit=100),
        SyncResponse(req_id=1, pages=(SyncPage(conv="team", messages=(push,), more=True),)),
        Notify(entries=(("team", 9), ("lobby", 120))),
        Receipt(conv="team", seq=8, reader="bob"),
        Kick(code=2, reason="auth failed"),
        ErrorFrame(code=5, reason="rate limited", retry_after_ms=1000),
    ]


def _write_corpus(directory: Path) -> int:
    """Valid frames in every input mode of the harness (so it starts from real traffic)."""
    types = sorted(int(t) for t in FrameType)
    n = 0
    for i, msg in enumerate(_seed_messages()):
        frame = encode(msg)
        body = frame[8:]
        type_index = types.index(frame[2])
        for data in (
            b"\x00" + frame,
            b"\x01" + frame + frame,
            b"\x02" + frame,
            b"\x03" + bytes([type_index]) + body,
            b"\x04" + bytes([type_index]) + body,
        ):
            (directory / f"seed-{i:02d}-{data[0]}").write_bytes(data)
            n += 1
    return n


_REPORT_RE = re.compile(
    r"fuzz_decoder: (\d+) inputs, (\d+) accepted by both decoders, slowest input ([\d.]+) ms "
    r"\(imkit's part ([\d.]+) ms\), peak RSS (\d+) MiB"
)


def scenario_fuzz(*, runs: int = 200_000, max_time_s: int = 240) -> ScenarioResult:
    """Run tests/fuzz/fuzz_decoder.py under atheris for ``runs`` inputs in a subprocess."""
    began = now()
    harness = ROOT / "tests" / "fuzz" / "fuzz_decoder.py"
    with tempfile.TemporaryDirectory(prefix="imkit-fuzz-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus"
        corpus.mkdir()
        seeds = _write_corpus(corpus)
        artifacts = work / "artifacts"
        artifacts.mkdir()
        cmd = [
            sys.executable,
            str(harness),
            f"-atheris_runs={runs}",
            f"-max_total_time={max_time_s}",
            f"-artifact_prefix={artifacts}/",
            "-print_final_stats=1",
            str(corpus),
        ]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = now()
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=work, timeout=max_time_s + 120,
            check=False,
        )
        wall = now() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        crashes = sorted(p.name for p in artifacts.iterdir())
        corpus_size = sum(1 for _ in corpus.iterdir())
    output = proc.stdout + proc.stderr
    match = _REPORT_RE.search(output)
    executed = re.search(r"stat::number_of_executed_units: (\d+)", output)
    inputs = int(match.group(1)) if match else int(executed.group(1)) if executed else 0
    accepted = int(match.group(2)) if match else 0
    slowest = float(match.group(3)) if match else float("nan")
    slowest_imkit = float(match.group(4)) if match else float("nan")
    peak_inside = int(match.group(5)) if match else 0
    peak_outside = after.ru_maxrss / 1024  # max over the children so far (this one dominates)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    crashed = proc.returncode != 0 or bool(crashes) or "Uncaught Python exception" in output
    rows = [
        ("inputs tried", f"{inputs} (asked for {runs}; seed corpus {seeds} valid frames)"),
        ("inputs both decoders accepted (valid frames)", str(accepted)),
        ("**crashes**", f"**{len(crashes) if crashes else int(crashed)}**"
         + (f" ({', '.join(crashes)})" if crashes else "")),
        ("slowest input, CPU (whole / imkit's part without the oracle)",
         f"{slowest:.2f} ms / {slowest_imkit:.2f} ms"),
        ("peak RSS of the fuzzing process (its own report / getrusage)",
         f"{peak_inside} MiB / {peak_outside:.0f} MiB"),
        ("corpus after the run", f"{corpus_size} inputs"),
        ("wall time / CPU time", f"{wall:.1f} s / {cpu:.1f} s "
         f"({inputs / max(wall, 1e-9):.0f} inputs/s)"),
        ("exit code", str(proc.returncode)),
    ]
    setup = (
        f"`{Path(sys.executable).name} tests/fuzz/fuzz_decoder.py -atheris_runs={runs} "
        f"-max_total_time={max_time_s}` in a subprocess (the harness is used as it is), "
        f"started from a seed corpus of valid frames of every type in each of its five input "
        f"modes (whole frame vs the reference decoder; byte stream into a client and a "
        f"server Connection; body behind a valid header vs the reference decoder; LZ4 body "
        f"with real or forged size). A crash is any exception other than the protocol's "
        f"own `RemoteProtocolError`, or a disagreement with the oracle."
    )
    notes = [
        "The slowest time per input is CPU time measured by the harness (whole input "
        "including the slow reference decoder, and imkit's part alone); atheris adds "
        "coverage instrumentation, so real decoding is faster.",
    ]
    if crashed and not crashes:
        notes.append("The fuzzer exited with an error; last lines: "
                     + " | ".join(output.strip().splitlines()[-5:]))
    return ScenarioResult(
        "fuzz", "5. Fuzzing the decoder", not crashed and inputs > 0, setup, rows, notes, None,
        now() - began,
    )
