"""The how-to guides' programs run as written and print what the pages show."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[1]
HOWTO = ROOT / "docs" / "howto"


def _blocks(page: str, kind: str) -> list[str]:
    text = (HOWTO / page).read_text(encoding="utf-8")
    return re.findall(rf"```{kind}\n(.*?)```", text, flags=re.DOTALL)


def _run(program: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "program.py"
    path.write_text(program, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(path)],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.network
class TestSansIoLoops:
    def test_the_threads_program_chats_and_prints_the_page_output(self, tmp_path: Path) -> None:
        """The python blocks, joined, are a threaded server and clients that deliver a message."""
        done = _run("\n".join(_blocks("sans-io-loops.md", "python")), tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout == _blocks("sans-io-loops.md", "text")[0]

    def test_the_trio_server_serves_the_asyncio_client(self) -> None:
        """The trio server (the py block) logs two asyncio clients in and relays a message."""
        trio = pytest.importorskip("trio")
        from imkit.aio import Client, ClientStatus

        namespace: dict[str, object] = {"__name__": "howto_trio"}
        exec(compile(_blocks("sans-io-loops.md", "py")[0], "howto_trio", "exec"), namespace)
        ready = threading.Event()
        ports: list[int] = []
        stop = threading.Event()

        async def serve() -> None:
            server = namespace["TrioServer"]()  # type: ignore[operator]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.run_timers)
                listeners = await nursery.start(trio.serve_tcp, server.handle, 0)
                ports.append(listeners[0].socket.getsockname()[1])
                ready.set()
                while not stop.is_set():
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()

        thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
        thread.start()
        assert ready.wait(10)

        async def chat() -> tuple[int, object]:
            endpoints = [f"127.0.0.1:{ports[0]}"]
            async with (
                Client(token="alice", device="d", endpoints=endpoints) as alice,
                Client(token="bob", device="d", endpoints=endpoints) as bob,
            ):
                await bob.wait_for(ClientStatus.ONLINE)
                seq = await alice.send("room", b"hi bob")
                async for push in bob.messages():
                    return seq, push
            raise AssertionError("no message")

        try:
            seq, push = asyncio.run(asyncio.wait_for(chat(), 20))
        finally:
            stop.set()
            thread.join(10)
        assert seq == 1
        assert (push.seq, push.sender, push.body) == (1, "alice", b"hi bob")  # type: ignore[attr-defined]


class TestRingMigration:
    def test_the_migration_program_moves_exactly_the_planned_keys(self, tmp_path: Path) -> None:
        """The program's own asserts hold and it prints the page's output."""
        done = _run(_blocks("ring-migration.md", "python")[0], tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout == _blocks("ring-migration.md", "text")[0]


class TestStoreBackend:
    def test_the_example_test_module_passes_the_conformance_suite(self, tmp_path: Path) -> None:
        """The page's test module, run by pytest, passes (memory store standing in)."""
        module = tmp_path / "test_store_mine.py"
        module.write_text(_blocks("store-backend.md", "python")[0], encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "--rootdir",
                str(tmp_path),
                str(module),
            ],
            check=False,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=80,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        assert re.search(r"\d+ passed", done.stdout)
