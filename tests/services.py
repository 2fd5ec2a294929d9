"""Real backend servers for the tests: the machine's shared ones, or private ones.

Shared servers (the machine runs them on their standard ports; override with
``IMKIT_REDIS_URL``, ``IMKIT_NATS_URL``, ``IMKIT_POSTGRES_DSN``):

* :func:`redis_url`, :func:`nats_url`, :func:`postgres_dsn` return the address after
  checking that something answers there. When nothing does, the test is skipped -
  unless ``IMKIT_REQUIRE_SERVICES=1`` (CI), where it fails: a missing server is never
  a silent pass.
* :func:`unique_name` gives a fresh key prefix / stream / schema name per test, so
  tests never see each other's data (and clean up what they made).

Private servers (for tests that kill, stop or restart one): :func:`private_redis` and
:func:`private_nats` start ``redis-server`` / ``nats-server -js`` on a free loopback
port in a temporary directory and stop them after; :class:`ServerProcess` restarts
one on the same port and data directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

__all__ = [
    "ServerProcess",
    "free_port",
    "nats_url",
    "postgres_dsn",
    "private_nats",
    "private_redis",
    "redis_url",
    "require_services",
    "unique_name",
]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def require_services() -> bool:
    """True when a missing server must fail the test (CI sets IMKIT_REQUIRE_SERVICES=1)."""
    return os.environ.get("IMKIT_REQUIRE_SERVICES", "") not in ("", "0")


def _missing(what: str, address: str, error: BaseException) -> None:
    message = f"{what} not reachable at {address}: {error}"
    if require_services():
        pytest.fail(message + " (IMKIT_REQUIRE_SERVICES=1)")
    pytest.skip(message)


def _reachable(url: str, default_port: int) -> None:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or default_port
    with socket.create_connection((host, port), timeout=2.0):
        pass


def redis_url() -> str:
    """The shared Redis server's URL (skips, or fails in CI, if it does not answer)."""
    url = os.environ.get("IMKIT_REDIS_URL", DEFAULT_REDIS_URL)
    try:
        _reachable(url, 6379)
    except OSError as error:
        _missing("Redis", url, error)
    return url


def nats_url() -> str:
    """The shared NATS (JetStream) server's URL (skips, or fails in CI, if it does not answer)."""
    url = os.environ.get("IMKIT_NATS_URL", DEFAULT_NATS_URL)
    try:
        _reachable(url, 4222)
    except OSError as error:
        _missing("NATS", url, error)
    return url


def postgres_dsn() -> str:
    """The shared PostgreSQL server's DSN (skips, or fails in CI, if it does not answer)."""
    dsn = os.environ.get("IMKIT_POSTGRES_DSN", DEFAULT_POSTGRES_DSN)
    try:
        _reachable(dsn, 5432)
    except OSError as error:
        _missing("PostgreSQL", dsn, error)
    return dsn


def unique_name(prefix: str = "imkit_test") -> str:
    """A name no other test uses: letters, digits and underscores (valid for keys,
    JetStream streams and SQL schemas alike)."""
    return f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s} s")


class ServerProcess:
    """A private server process on a fixed loopback port: start, kill, stop, restart.

    ``argv`` is the command line; ``port`` where it listens. Restarting reuses the
    port and the data directory (the command line decides what persists).
    """

    def __init__(self, name: str, argv: list[str], port: int, workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start it and wait until its port accepts connections."""
        log = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            self.argv, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        _wait_port("127.0.0.1", self.port, timeout_s, self.proc)

    def kill(self) -> None:
        """SIGKILL it (nothing is flushed) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM it and reap it (SIGKILL after 10 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, *, kill: bool = True) -> None:
        """Kill (or stop) it, then start it again on the same port and directory."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()

    @property
    def pid(self) -> int:
        """The running process's pid."""
        assert self.proc is not None
        return self.proc.pid


def _binary(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.path.exists(candidate):
            return candidate
    if require_services():
        pytest.fail(f"{name} is not installed (IMKIT_REQUIRE_SERVICES=1)")
    pytest.skip(f"{name} is not installed")


@contextlib.contextmanager
def private_redis(workdir: Path, *, appendonly: bool = False) -> Iterator[ServerProcess]:
    """A private ``redis-server`` on a free loopback port; URL: ``redis://127.0.0.1:PORT/0``."""
    port = free_port()
    argv = [
        _binary("redis-server"),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--dir", str(workdir),
    ]  # fmt: skip
    server = ServerProcess("redis", argv, port, workdir)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@contextlib.contextmanager
def private_nats(workdir: Path) -> Iterator[ServerProcess]:
    """A private ``nats-server -js`` (file store in ``workdir``) on a free loopback port."""
    port = free_port()
    store = workdir / "jetstream"
    store.mkdir(exist_ok=True)
    argv = [_binary("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)]
    server = ServerProcess("nats", argv, port, workdir)
    server.start()
    try:
        yield server
    finally:
        server.kill()
