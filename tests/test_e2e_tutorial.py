"""docs/tutorial.md is runnable: its Python blocks, joined in order, print what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial.md"


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", TUTORIAL.read_text(), flags=re.DOTALL)


class TestTutorial:
    def test_the_tutorial_program_runs_and_prints_what_the_page_shows(
        self, tmp_path: Path
    ) -> None:
        """Paste the blocks into tiny_chat.py, run it: the output is the page's output block."""
        program = tmp_path / "tiny_chat.py"
        program.write_text("\n".join(_blocks("python")))
        done = subprocess.run(
            [sys.executable, str(program)],
            check=False,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        expected = _blocks("text")[0]  # the printed output the page shows
        assert done.stdout == expected

    def test_the_tutorial_program_is_short(self) -> None:
        """The point of the tutorial: a chat server in well under 150 lines."""
        lines = [ln for ln in "\n".join(_blocks("python")).splitlines() if ln.strip()]
        assert len(lines) < 150
