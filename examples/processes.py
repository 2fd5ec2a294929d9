"""The reference system as many processes on Redis, NATS JetStream and PostgreSQL.

What it does
    ``python -m examples.cluster --processes --gateways 3 --logic 2`` starts a
    launcher that runs every role in its own OS process and supervises them:

    * **logic** ``logic-1`` .. ``logic-M``: :class:`~examples.logic.Logic` on a
      :class:`~imkit.aio.postgres.PostgresStore`, serving the gateways' requests
      in one NATS queue group (:class:`~examples.remote.LogicServer`) and
      publishing pushes on JetStream; each also parks the routes of gateways that
      left discovery.
    * **gateway** ``gw-1`` .. ``gw-N``: :class:`~examples.gateway.Gateway` with a
      :class:`~examples.remote.RemoteLogic`, a durable JetStream consumer on its
      own subject, routes in Redis (:class:`~imkit.aio.redis.RedisRouteTable`)
      and its load reports in Redis (:class:`~imkit.aio.redis.RedisRegistry`).
    * **ipconf**: ranks the gateways from the Redis registry; with ``--dev`` it
      hands out tokens (users from PostgreSQL) and runs ``/admin`` commands.

    Redis, NATS and PostgreSQL default to the local servers (``--redis``,
    ``--nats``, ``--postgres``); ``--namespace NAME`` (default ``imkit``) names
    the Redis key prefix, the JetStream stream and the PostgreSQL schema, so
    several clusters share the servers without seeing each other.
    ``--ready-file F`` gets JSON with ``ipconf`` and, for every process, its
    ``role``, ``id``, ``pid`` and listening addresses (gateways: ``tcp``, ``ws``,
    ``web``); it is rewritten whenever a process is restarted.

Policies
    * The launcher starts logic first, then the gateways, then ipconf, each once
      the previous ones said they are ready (a line ``imkit-role ready {...}`` on
      their stdout).
    * A process that dies (a signal, a crash) is started again after
      ``DEFAULT_RESTART_DELAY_S``, at most ``DEFAULT_MAX_RESTARTS`` times a
      minute; one that exits cleanly (SIGTERM: a gateway drained) is not.
    * SIGTERM (or Ctrl-C) on the launcher drains the gateways (clients are told
      to reconnect elsewhere after a spread retry hint), then stops logic and
      ipconf; SIGTERM on one gateway drains only it.

What it leaves out
    Machines: every process runs here (the addresses are loopback unless
    ``--host``); process placement and supervision across hosts is an
    orchestrator's job (systemd, Kubernetes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import attrs

from imkit.discovery import DEFAULT_TTL_MS
from imkit.routetable import DEFAULT_GRACE_MS

from .auth import DEFAULT_TOKEN_TTL_S, Authenticator, new_secret
from .gateway import Gateway, GatewayConfig
from .ipconf import IpConf
from .logic import Logic, LogicConfig
from .routes import RouteService

__all__ = [
    "DEFAULT_MAX_RESTARTS",
    "DEFAULT_NAMESPACE",
    "DEFAULT_RESTART_DELAY_S",
    "Backends",
    "main_role",
    "run_processes",
]

logger = logging.getLogger("examples.processes")

DEFAULT_NAMESPACE = "imkit"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_NATS = "nats://127.0.0.1:4222"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
#: A dead process is started again after this long (its clients reconnect to the
#: others meanwhile; a crash loop does not spin).
DEFAULT_RESTART_DELAY_S = 1.0
#: At most this many restarts of one process in 60 s; past it the launcher gives
#: up on it (a process that cannot start is a configuration error, not a fault).
DEFAULT_MAX_RESTARTS = 5
#: How long a process has to say it is ready, and to stop after SIGTERM.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
READY = "imkit-role ready "


@attrs.frozen(kw_only=True)
class Backends:
    """Where the shared servers are, and the names this cluster uses on them."""

    redis: str = DEFAULT_REDIS
    nats: str = DEFAULT_NATS
    postgres: str = DEFAULT_POSTGRES
    namespace: str = DEFAULT_NAMESPACE

    @property
    def stream(self) -> str:
        """The JetStream stream of the bus."""
        return f"{self.namespace.upper()}_BUS"

    @property
    def bus_prefix(self) -> str:
        """The subject prefix of the bus (``<prefix>.<gateway id>``)."""
        return f"{self.namespace}.bus"

    @property
    def logic_subject(self) -> str:
        """The request subject the logic processes serve (``<namespace>.logic``)."""
        return f"{self.namespace}.logic"

    @property
    def schema(self) -> str:
        """The PostgreSQL schema of the store."""
        return self.namespace

    def args(self) -> list[str]:
        """The command-line flags that give a child process these backends."""
        return [
            "--redis", self.redis,
            "--nats", self.nats,
            "--postgres", self.postgres,
            "--namespace", self.namespace,
        ]  # fmt: skip


def add_backend_flags(p: argparse._ActionsContainer) -> None:
    """``--redis --nats --postgres --namespace`` (defaults: the local servers)."""
    p.add_argument("--redis", default=DEFAULT_REDIS, help="Redis URL (routes, registry)")
    p.add_argument("--nats", default=DEFAULT_NATS, help="NATS URL (bus, requests)")
    p.add_argument("--postgres", default=DEFAULT_POSTGRES, help="PostgreSQL DSN (messages)")
    p.add_argument(
        "--namespace",
        default=DEFAULT_NAMESPACE,
        help="Redis key prefix, JetStream stream and PostgreSQL schema of this cluster",
    )


def backends_from(args: argparse.Namespace) -> Backends:
    """The :class:`Backends` a command line names."""
    return Backends(
        redis=args.redis, nats=args.nats, postgres=args.postgres, namespace=args.namespace
    )


# --- connections to the backends ------------------------------------------------------------


async def open_store(b: Backends) -> Any:
    """The cluster's PostgreSQL store (created on first use)."""
    from imkit.aio.postgres import PostgresStore

    return await PostgresStore.open(b.postgres, schema=b.schema)


def route_table(b: Backends, grace_ms: int) -> Any:
    """The cluster's route table in Redis."""
    from imkit.aio.redis import RedisRouteTable

    return RedisRouteTable(b.redis, prefix=f"{b.namespace}:routes", grace_ms=grace_ms)


def registry(b: Backends, ttl_ms: int) -> Any:
    """The cluster's gateway registry in Redis."""
    from imkit.aio.redis import RedisRegistry

    return RedisRegistry(b.redis, prefix=f"{b.namespace}:gateways", ttl_ms=ttl_ms)


async def connect_nats(b: Backends) -> tuple[Any, Any]:
    """(the JetStream bus, the request/reply service) on one NATS connection each."""
    from imkit.aio.nats import NatsBus, NatsBusConfig, NatsService

    bus = await NatsBus.connect(b.nats, NatsBusConfig(stream=b.stream, prefix=b.bus_prefix))
    service = await NatsService.connect(b.nats)
    return bus, service


# --- one role in this process -------------------------------------------------------------


def _role_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cluster role", description="Run one role (the launcher does)."
    )
    p.add_argument("role", choices=("logic", "gateway", "ipconf"))
    p.add_argument("--id", required=True)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--public-host", default=None)
    p.add_argument("--tcp-port", type=int, default=0)
    p.add_argument("--web-port", type=int, default=-1, help="-1: no web page / WebSocket")
    p.add_argument("--port", type=int, default=0, help="ipconf's port")
    p.add_argument("--dev", action="store_true")
    p.add_argument("--grace-ms", type=int, default=DEFAULT_GRACE_MS)
    p.add_argument("--discovery-ttl-ms", type=int, default=DEFAULT_TTL_MS)
    p.add_argument("--report-interval-ms", type=int, default=None)
    p.add_argument("--max-per-address", type=int, default=None)
    p.add_argument("--gateway-config", default=None, help="GatewayConfig fields as JSON")
    add_backend_flags(p)
    return p


def _ready(info: dict[str, Any]) -> None:
    print(READY + json.dumps(info), flush=True)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _reap(
    registry_: Any, routes: RouteService, logic: Logic, ttl_ms: int, stopping: asyncio.Event
) -> None:
    """Park the routes of gateways that left discovery (every logic process does it;
    unbind_gateway is idempotent)."""
    seen: set[str] = set()
    interval = max(ttl_ms // 3, 10) / 1000
    while not stopping.is_set():
        try:
            live = {info.id for info in await registry_.live()}
            for gateway in sorted(seen - live):
                parked = await routes.unbind_gateway(gateway)
                held = logic.gateway_gone(gateway)
                logger.warning(
                    "gateway %s left discovery: %d routes parked, %d fan-outs released",
                    gateway,
                    len(parked),
                    held,
                )
            seen = live
        except Exception:
            logger.exception("reaping gateways failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval)


async def _run_logic(args: argparse.Namespace, b: Backends) -> int:
    from .remote import EncodedBus, LogicServer  # the cluster extra (cbor2)

    store = await open_store(b)
    routes = RouteService(
        grace_ms=args.grace_ms, node=args.index + 1, backend=route_table(b, args.grace_ms)
    )
    nats_bus, service = await connect_nats(b)
    bus = EncodedBus(nats_bus)
    logic = Logic(store=store, routes=routes, bus=bus, config=LogicConfig(node=args.index + 1))  # type: ignore[arg-type]
    server = LogicServer(logic)
    await service.serve(b.logic_subject, "logic", server.handle)
    reg = registry(b, args.discovery_ttl_ms)
    stopping = asyncio.Event()
    reaper = asyncio.get_running_loop().create_task(
        _reap(reg, routes, logic, args.discovery_ttl_ms, stopping)
    )
    _ready({"role": "logic", "id": args.id, "pid": os.getpid()})
    try:
        await _until_signalled()
    finally:
        stopping.set()
        await reaper
        await service.aclose()  # no new requests; those in flight were answered
        await bus.flush()
        await logic.aclose()
        routes.close()
        await nats_bus.aclose()
        await reg.aclose()
        await store.aclose()
    return 0


async def _run_gateway(args: argparse.Namespace, b: Backends) -> int:
    from .remote import EncodedBus, RemoteLogic  # the cluster extra (cbor2)

    secret = bytes.fromhex(os.environ["IMKIT_SECRET"])
    auth = Authenticator(secret, ttl_s=DEFAULT_TOKEN_TTL_S)
    reg = registry(b, args.discovery_ttl_ms)
    routes = RouteService(
        grace_ms=args.grace_ms, node=100 + args.index, backend=route_table(b, args.grace_ms)
    )
    nats_bus, service = await connect_nats(b)
    bus = EncodedBus(nats_bus)
    logic = RemoteLogic(service, bus, subject=b.logic_subject)
    fields = json.loads(args.gateway_config) if args.gateway_config else {}
    config = GatewayConfig(**fields)
    if args.report_interval_ms is not None:
        config = attrs.evolve(config, report_interval_ms=args.report_interval_ms)
    if args.max_per_address is not None:
        config = attrs.evolve(config, max_per_address=args.max_per_address)
    gateway = Gateway(
        args.id, logic=logic, routes=routes, bus=bus, registry=reg, auth=auth, config=config
    )
    await gateway.start(
        args.host,
        args.tcp_port,
        None if args.web_port < 0 else args.web_port,
        public_host=args.public_host,
    )
    _ready(
        {
            "role": "gateway",
            "id": args.id,
            "pid": os.getpid(),
            "tcp": gateway.tcp_endpoint,
            "ws": gateway.ws_endpoint,
            "web": gateway.web_url,
        }
    )
    try:
        await _until_signalled()
    finally:
        await gateway.stop()  # deregister, kick every client with a spread retry hint
        await logic.aclose()  # the device cursors collected so far
        routes.close()
        await bus.flush()
        await service.aclose()
        await nats_bus.aclose()
        await reg.aclose()
    return 0


async def _run_ipconf(args: argparse.Namespace, b: Backends) -> int:
    from .cluster import admin

    secret = bytes.fromhex(os.environ["IMKIT_SECRET"])
    auth = Authenticator(secret, ttl_s=DEFAULT_TOKEN_TTL_S)
    reg = registry(b, args.discovery_ttl_ms)
    store = await open_store(b) if args.dev else None
    ipconf = IpConf(
        registry=reg,
        auth=auth,
        store=store,
        admin=(lambda op, a: admin(store, op, a)) if store is not None else None,
        dev=args.dev,
    )
    port = await ipconf.start(args.host, args.port)
    host = args.public_host or args.host
    _ready({"role": "ipconf", "id": args.id, "pid": os.getpid(), "url": f"http://{host}:{port}"})
    try:
        await _until_signalled()
    finally:
        await ipconf.stop()
        await reg.aclose()
        if store is not None:
            await store.aclose()
    return 0


def main_role(argv: list[str]) -> int:
    """``python -m examples.cluster role ROLE --id ID ...``: one process of the cluster."""
    args = _role_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s {args.id} %(name)s %(levelname)s %(message)s",
    )
    from imkit.aio import run

    b = backends_from(args)
    runner = {"logic": _run_logic, "gateway": _run_gateway, "ipconf": _run_ipconf}[args.role]
    try:
        return run(runner(args, b))
    except KeyboardInterrupt:
        return 0


# --- the launcher ---------------------------------------------------------------------------


class Child:
    """One supervised process: its command line, the process, what it said when ready."""

    def __init__(self, role: str, ident: str, argv: list[str]) -> None:
        self.role = role
        self.id = ident
        self.argv = argv
        self.proc: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}
        self.restarts: list[float] = []
        self.stopping = False
        self.gone = False  # exited cleanly or gave up: not restarted
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the process and wait for its ready line."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, start_new_session=True
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.id} did not get ready in {START_TIMEOUT_S} s")
            line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            if not line:
                raise RuntimeError(f"{self.id} exited with {await self.proc.wait()} while starting")
            text = line.decode(errors="replace").rstrip("\n")
            if text.startswith(READY):
                self.info = json.loads(text[len(READY) :])
                break
            print(text, flush=True)
        self._reader = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            sys.stdout.write(line.decode(errors="replace"))

    def signal(self, sig: int) -> None:
        """Send ``sig`` if the process runs."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S."""
        self.stopping = True
        if self.proc is None:
            return
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            await self.proc.wait()


class Launcher:
    """Starts, supervises and stops the children; keeps the ready file up to date."""

    def __init__(self, ready_file: str | None, quiet: bool) -> None:
        self.children: list[Child] = []
        self.ready_file = ready_file
        self.quiet = quiet
        self.stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    def describe(self) -> dict[str, Any]:
        """The ready-file document."""
        ipconf = next((c.info.get("url") for c in self.children if c.role == "ipconf"), None)
        return {
            "ipconf": ipconf,
            "pid": os.getpid(),
            "processes": [
                c.info for c in self.children if c.info and not c.gone and c.proc is not None
            ],
        }

    def write_ready(self) -> None:
        """Write (atomically) the ready file, if one was asked for."""
        if self.ready_file:
            path = Path(self.ready_file)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(self.describe()))
            tmp.replace(path)

    async def add(self, child: Child) -> None:
        """Start ``child`` and supervise it."""
        await child.start()
        self.children.append(child)
        self._watchers.append(asyncio.get_running_loop().create_task(self._watch(child)))

    async def _watch(self, child: Child) -> None:
        while True:
            assert child.proc is not None
            code = await child.proc.wait()
            if self.stopping or child.stopping:
                return
            if code == 0:
                logger.warning("%s exited cleanly: not restarted", child.id)
                child.gone = True
                self.write_ready()
                return
            now = time.monotonic()
            child.restarts = [t for t in child.restarts if now - t < 60] + [now]
            if len(child.restarts) > DEFAULT_MAX_RESTARTS:
                logger.error(
                    "%s died %d times in a minute: giving up", child.id, len(child.restarts)
                )
                child.gone = True
                self.write_ready()
                return
            logger.warning(
                "%s died (%s): restarting in %.1f s", child.id, code, DEFAULT_RESTART_DELAY_S
            )
            await asyncio.sleep(DEFAULT_RESTART_DELAY_S)
            if self.stopping:
                return
            try:
                await child.start()
            except (OSError, RuntimeError, TimeoutError, ValueError):
                logger.exception("%s could not be restarted", child.id)
                continue
            self.write_ready()

    async def stop(self) -> None:
        """Gateways first (they drain), then logic, then ipconf."""
        self.stopping = True
        for role in ("gateway", "logic", "ipconf"):
            await asyncio.gather(*(c.stop() for c in self.children if c.role == role))
        for w in self._watchers:
            w.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        if self.ready_file:
            with contextlib.suppress(OSError):
                Path(self.ready_file).unlink()


async def seed(b: Backends, lobby_size: int) -> None:
    """The demo users and groups in the cluster's PostgreSQL store (idempotent)."""
    from .cluster import seed_demo

    store = await open_store(b)
    try:
        await seed_demo(store, lobby_size=lobby_size)
    finally:
        await store.aclose()


async def run_processes(args: argparse.Namespace) -> int:
    """The launcher of ``--processes`` (see the module doc)."""
    b = backends_from(args)
    secret_hex = args.secret or new_secret().hex()
    env_secret = {"IMKIT_SECRET": secret_hex}
    os.environ.update(env_secret)  # inherited by the children, never printed
    if not args.no_demo:
        await seed(b, args.lobby_size)
    module = f"{__package__}.cluster"
    base = args.port_base
    common = [
        "--host", args.host,
        "--grace-ms", str(args.grace_ms),
        *b.args(),
    ]  # fmt: skip
    if args.public_host:
        common += ["--public-host", args.public_host]
    launcher = Launcher(args.ready_file, args.quiet)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    def argv(role: str, ident: str, index: int, *extra: str) -> list[str]:
        return [sys.executable, "-m", module, "role", role, "--id", ident,
                "--index", str(index), *common, *extra]  # fmt: skip

    try:
        for i in range(args.logic):
            await launcher.add(Child("logic", f"logic-{i + 1}", argv("logic", f"logic-{i + 1}", i)))
        gateway_fields = {"shed": not args.no_shed, "max_pending_logins": args.max_pending_logins}
        for i in range(args.gateways):
            extra = [
                "--tcp-port", str(base + 10 + i if base else 0),
                "--max-per-address", str(args.max_per_address),
                "--gateway-config", json.dumps(gateway_fields),
            ]  # fmt: skip
            if not args.no_web:
                extra += ["--web-port", str(base + 80 + i if base else 0)]
            gid = f"gw-{i + 1}"
            await launcher.add(Child("gateway", gid, argv("gateway", gid, i, *extra)))
        extra = ["--port", str(base)] + (["--dev"] if args.dev else [])
        await launcher.add(Child("ipconf", "ipconf", argv("ipconf", "ipconf", 0, *extra)))
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        await launcher.stop()
        return 1
    info = launcher.describe()
    launcher.write_ready()
    if not args.quiet:
        print(
            f"imkit reference IM system is up as {len(launcher.children)} processes "
            f"(PostgreSQL schema, Redis prefix and JetStream stream '{b.namespace}')"
        )
        for c in launcher.children:
            where = " ".join(str(c.info[k]) for k in ("url", "tcp", "web") if c.info.get(k))
            print(f"  {c.role:8} {c.id:9} pid {c.info.get('pid')}  {where}")
    print("imkit-cluster ready " + json.dumps(info), flush=True)
    try:
        await stop.wait()
    finally:
        await launcher.stop()
    return 0
