"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
# Blocks that need a running server are exercised by the end-to-end tests instead.
RUNNABLE = [b for b in BLOCKS if "run(main())" not in b]


def test_the_readme_has_examples() -> None:
    """The README shows at least one runnable example per floor-1 block."""
    assert len(RUNNABLE) >= 7


@pytest.mark.parametrize("source", RUNNABLE, ids=[f"block{i}" for i in range(len(RUNNABLE))])
def test_readme_block_runs(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each runnable README block executes without error (asserts inside it hold)."""
    monkeypatch.chdir(tmp_path)
    exec(compile(source, str(README), "exec"), {"__name__": "readme"})
