"""The reliability harness (benchmarks/reliability/) at a small scale, so CI tests it.

Each test runs one scenario of ``docs/reliability.md`` scaled down (a dozen clients,
a couple of seconds of load) and asserts the Jepsen-style history check's zero
counts: nothing acknowledged lost, nothing unexpected, no duplicate and no
out-of-order delivery to an application, no seq reused. Timings are reported by the
script, never asserted here. The frame splitter of the fault proxy is checked
against the frames it was fed.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from benchmarks.reliability import (
    ScenarioResult,
    scenario_dropped_acks,
    scenario_gateway_kill,
    scenario_restart,
)
from examples.faultproxy import _FrameSplitter
from hypothesis import given, settings
from hypothesis import strategies as st

from imkit.protocol import DEFAULT_MAX_FRAME_SIZE, Ping, Push, PushAck, Send, encode
from tests.history import Check

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]


def clean(result: ScenarioResult) -> Check:
    """The scenario's history check, after asserting its zero counts."""
    check = result.check
    assert check is not None
    assert check.lost == 0
    assert check.unexpected == 0
    assert check.app_duplicates == 0
    assert check.order_violations == 0
    assert check.seq_reuse == 0
    assert check.double_stored == 0
    assert check.undelivered == 0  # every stored message reached every member
    assert check.sends_ok > 0
    return check


class TestHistoryUnderFaults:
    def test_a_killed_gateway_loses_nothing_and_its_clients_come_back(self) -> None:
        """One of 3 gateways killed under load: history clean, every orphan logged in again."""
        result = asyncio.run(
            scenario_gateway_kill(
                clients=12,
                rate=3.0,
                load_s=2.0,
                kill_at_s=0.7,
                reconnect_min_ms=200,
                reconnect_max_ms=500,
            )
        )
        clean(result)
        rows = dict(result.rows)
        back, orphans = rows["orphans reconnected"].split(" / ")
        assert int(orphans) > 0 and back == orphans
        assert result.passed

    def test_dropped_push_acks_make_only_wire_duplicates(self) -> None:
        """30% of push acks dropped by the proxy: app duplicates 0, resends counted on the wire."""
        result = asyncio.run(scenario_dropped_acks(clients=8, rate=4.0, load_s=1.5))
        check = clean(result)
        dropped = int(dict(result.rows)["push acks dropped by the proxy / relayed"].split()[0])
        assert dropped > 0
        assert check.wire_duplicates >= 0
        assert result.passed

    def test_a_restart_on_the_data_directory_reuses_no_seq(self, tmp_path: Path) -> None:
        """The server side crashes and restarts on its SQLite directory: no seq reused."""
        result = asyncio.run(
            scenario_restart(
                clients=6,
                rate=4.0,
                restarts=1,
                phase_s=0.8,
                downtime_s=0.2,
                data_dir=str(tmp_path / "data"),
            )
        )
        clean(result)
        assert result.passed


frames = st.lists(
    st.sampled_from(
        [
            encode(Ping(nonce=3)),
            encode(PushAck(conv="team", seq=5)),
            encode(Send(cid=7, conv="team", body=b"x" * 300)),
            encode(Push(conv="team", seq=9, sender="bob", body=b"hello")),
        ]
    ),
    max_size=20,
)


class TestFrameSplitter:
    @settings(max_examples=50)
    @given(frames, st.integers(0, 2**32 - 1))
    def test_whole_frames_come_out_in_order_whatever_the_chunks(
        self, sent: list[bytes], seed: int
    ) -> None:
        """Fed in random chunks, the splitter yields exactly the frames fed, byte for byte."""
        data = b"".join(sent)
        rng = random.Random(seed)
        splitter = _FrameSplitter(DEFAULT_MAX_FRAME_SIZE)
        out: list[bytes] = []
        pos = 0
        while pos < len(data):
            n = rng.randint(1, 64)
            out += splitter.feed(data[pos : pos + n])
            pos += n
        assert out == sent
        assert not splitter.raw and not splitter.buffer

    def test_bytes_that_are_not_imkit_pass_through_raw(self) -> None:
        """A stream that does not start with the magic byte is relayed unchanged."""
        splitter = _FrameSplitter(DEFAULT_MAX_FRAME_SIZE)
        got = splitter.feed(b"GET / HTTP/1.1\r\n") + splitter.feed(b"\r\n")
        assert b"".join(got) == b"GET / HTTP/1.1\r\n\r\n"
        assert splitter.raw
