"""The command lines, as a user (and CI) runs them: launcher, terminal chat client, admin.

Starts ``python -m examples.cluster`` as a real process on ephemeral ports, waits for
its ready file, chats with ``python -m examples.chat`` in scripted mode, manages a
user with ``python -m examples.cluster admin``, and stops it with SIGINT.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.network, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[1]


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[tuple[dict[str, Any], subprocess.Popen[str], Path]]:
    """A running ``python -m examples.cluster`` and what its ready file says."""
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        _python("examples.cluster", "--dev", "--port-base", "0", "--gateways", "2",
                "--ready-file", str(ready), "-q"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read() if proc.stdout else ""
                pytest.fail(f"the launcher did not become ready: {out}")
            time.sleep(0.05)
        yield json.loads(ready.read_text()), proc, ready
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class TestCommandLine:
    def test_launch_chat_admin_and_stop(
        self, launcher: tuple[dict[str, Any], subprocess.Popen[str], Path]
    ) -> None:
        """Bob waits for a message, Alice sends it, an admin adds a user, SIGINT stops cleanly."""
        info, proc, ready = launcher
        ipconf = info["ipconf"]
        assert len(info["gateways"]) == 2
        bob = subprocess.Popen(
            _python("examples.chat", "--user", "bob", "--to", "alice", "--ipconf", ipconf,
                    "--expect", "1", "--timeout", "20"),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        time.sleep(0.5)  # bob logs in first (he would also get the message by sync)
        alice = subprocess.run(
            _python("examples.chat", "--user", "alice", "--to", "bob", "--ipconf", ipconf,
                    "--send", "hello from the command line", "--timeout", "20"),
            check=False, cwd=ROOT, capture_output=True, text=True, timeout=40,
        )
        assert alice.returncode == 0, alice.stdout + alice.stderr
        assert "sent to dm:5:alice:bob as #1" in alice.stdout
        bob_out, _ = bob.communicate(timeout=40)
        assert bob.returncode == 0, bob_out
        assert "alice: hello from the command line" in bob_out

        dave = subprocess.Popen(
            _python("examples.chat", "--user", "dave", "--group", "lobby", "--ipconf", ipconf,
                    "--expect", "1", "--timeout", "20"),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        carol = subprocess.run(  # interactive mode, typing through a pipe
            _python("examples.chat", "--user", "carol", "--group", "lobby", "--ipconf", ipconf),
            input="hello lobby\n/quit\n",
            check=False, cwd=ROOT, capture_output=True, text=True, timeout=40,
        )
        assert carol.returncode == 0, carol.stdout + carol.stderr
        assert "chatting in lobby" in carol.stdout
        dave_out, _ = dave.communicate(timeout=40)
        assert dave.returncode == 0, dave_out
        assert "carol: hello lobby" in dave_out

        created = subprocess.run(
            _python("examples.cluster", "admin", "--url", ipconf, "create-user", "zoe"),
            check=False, cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout) == {"zoe": True}
        joined = subprocess.run(
            _python("examples.cluster", "admin", "--url", ipconf, "join", "team", "zoe"),
            check=False, cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
        assert json.loads(joined.stdout) == {"zoe": True}
        unknown = subprocess.run(
            _python("examples.chat", "--user", "nobody", "--to", "alice", "--ipconf", ipconf,
                    "--send", "x", "--timeout", "5"),
            check=False, cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
        assert unknown.returncode == 1
        assert "unknown user" in unknown.stderr

        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert not ready.exists()  # removed on a clean stop
