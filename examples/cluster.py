"""The all-in-one launcher: ipconf, gateways and logic in one process, nothing to install.

What it does
    ``python -m examples.cluster`` (from the repository root) starts:

    * **ipconf** on port 7700: ``GET /gateways?uid=alice`` ranks the gateways;
      with ``--dev`` (development mode, off by default),
      ``GET /dev/token?uid=alice&device=cli`` hands out login tokens and
      ``POST /admin`` runs registry commands (see :func:`admin`);
    * ``--gateways N`` **gateways**, gateway *i* with TCP on 7710+i and its web page
      plus WebSocket on 7780+i;
    * one **logic** server, the **route table**, the in-memory **bus** and
      **discovery** registry, and the **store**: in memory by default, SQLite in
      ``--data-dir DIR`` (messages and users then survive a restart);

    seeds demo users (alice, bob, carol, dave, erin), a small group ``team`` and a
    200-member group ``lobby``, prints where to connect and how to chat, and runs
    until Ctrl-C. ``python -m examples.cluster admin create-user zoe`` (and
    ``create-group``, ``join``, ``leave``, ``members``, ``conversations``,
    ``inbox``) manages users and groups of a running cluster.

    Tests and scripts start the same system in-process with
    ``cluster = await start_cluster(ClusterConfig(...))`` (ephemeral ports by
    default) and ``await cluster.stop()``; ``--ready-file PATH`` (and the
    ``imkit-cluster ready {...}`` line on stdout) tell a script when it is up.

Policies
    A gateway that leaves discovery (no load report for ``discovery_ttl_ms``, or
    deregistered) has its routes parked (they expire after ``grace_ms``) and its
    part of open fan-outs released (:meth:`Cluster.reap_gateways`).
    One process, one event loop; every limit is the blocks' documented default
    unless a ``ClusterConfig`` field overrides it. Login tokens are signed with a
    random secret per run (``--secret`` or ``IMKIT_SECRET`` to fix it), valid for
    an hour; the secret is never printed. The development endpoints (``--dev``)
    answer only direct requests from the local machine: a request with a proxy's
    forwarding header (``X-Forwarded-For``, ``Forwarded``, ``Via``...) gets 403.

What it leaves out
    Several processes or machines (the same classes over Redis and NATS backends),
    TLS, real user accounts, and process supervision.
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
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import attrs

from imkit.aio import (
    DEFAULT_MAX_PENDING_LOGINS,
    DEFAULT_MAX_PER_ADDRESS,
    InlineStore,
    MemoryBus,
    MemoryRegistry,
    async_store,
)
from imkit.discovery import DEFAULT_TTL_MS
from imkit.errors import ConfigError
from imkit.policy import HeartbeatPolicy
from imkit.routetable import DEFAULT_GRACE_MS
from imkit.session import ServerConfig
from imkit.store import AsyncMessageStore, MessageStore, open_store

from . import command
from .auth import DEFAULT_TOKEN_TTL_S, Authenticator, new_secret
from .gateway import Gateway, GatewayConfig
from .ipconf import IpConf
from .logic import BusPayload, Logic, LogicConfig
from .overload import DEFAULT_MAX_BACKLOG, DEFAULT_MAX_LAG_MS, DEFAULT_SHED_RETRY_MS
from .processes import add_backend_flags, main_role, run_processes
from .routes import RouteService

__all__ = [
    "DEFAULT_LOBBY_SIZE",
    "DEFAULT_PORT_BASE",
    "DEMO_USERS",
    "Cluster",
    "ClusterConfig",
    "admin",
    "main",
    "seed_demo",
    "start_cluster",
]

logger = logging.getLogger("examples.cluster")

#: ipconf listens here; gateway i on PORT_BASE + 10 + i (TCP) and + 80 + i (web).
DEFAULT_PORT_BASE = 7700
#: Members of the demo group ``lobby``: large enough to take the read fan-out path
#: (above ``LogicConfig.write_fanout_max``), small enough to seed in a blink.
DEFAULT_LOBBY_SIZE = 200
#: Named demo users; ``lobby`` is filled up with user001, user002, ...
DEMO_USERS = ("alice", "bob", "carol", "dave", "erin")
#: Logged (and printed first in the banner) when development mode is on.
DEV_WARNING = (
    "WARNING: development mode (--dev): /dev/token gives any user's login token and "
    "/admin runs registry commands for any direct request from this machine; never "
    "use it on a shared machine or behind a proxy"
)


@attrs.frozen(kw_only=True)
class ClusterConfig:
    """Everything :func:`start_cluster` needs. Ports 0 are ephemeral (the default)."""

    gateways: int = 1
    host: str = "127.0.0.1"
    public_host: str | None = None  # advertised to clients; default: host
    ipconf_port: int = 0
    tcp_port_base: int = 0  # gateway i listens on tcp_port_base + i (0: ephemeral)
    web_port_base: int = 0  # gateway i serves its web page on web_port_base + i
    web: bool = True
    data_dir: str | None = None  # None: memory store; else SQLite in this directory
    secret: bytes | None = None  # token signing key; None: random
    token_ttl_s: int = DEFAULT_TOKEN_TTL_S
    # /dev/token and /admin for direct local requests: off unless asked for (--dev);
    # anyone who can reach them gets any user's token and runs admin commands
    dev: bool = False
    demo: bool = False  # seed the demo users and groups
    lobby_size: int = DEFAULT_LOBBY_SIZE
    grace_ms: int = DEFAULT_GRACE_MS
    discovery_ttl_ms: int = DEFAULT_TTL_MS
    gateway: GatewayConfig = attrs.field(factory=GatewayConfig)
    logic: LogicConfig = attrs.field(factory=LogicConfig)

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.gateways <= 64:
            raise ConfigError("gateways must be 1-64")
        if self.gateway.report_interval_ms >= self.discovery_ttl_ms:
            raise ConfigError("gateway.report_interval_ms must be below discovery_ttl_ms")


class Cluster:
    """A running reference system: every component, its ports, and :meth:`stop`."""

    def __init__(
        self,
        *,
        config: ClusterConfig,
        store: MessageStore,
        routes: RouteService,
        bus: MemoryBus[BusPayload],
        registry: MemoryRegistry,
        logic: Logic,
        auth: Authenticator,
        secret: bytes,
    ) -> None:
        self.config = config
        #: The synchronous store under ``logic.store`` (an ``imkit.aio.async_store``
        #: adapter). While the cluster runs, reach it through ``logic.store`` (or
        #: ``logic.store.run(fn)``): an SQLite store belongs to its worker thread.
        self.store = store
        self.routes = routes
        self.bus = bus
        self.registry = registry
        self.logic = logic
        self.auth = auth
        self.secret = secret
        self.gateways: list[Gateway] = []
        self.ipconf: IpConf | None = None
        self.ipconf_port = 0
        self.gateways_lost = 0  # gateways discovery lost (see reap_gateways)
        self._seen: set[str] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def public_host(self) -> str:
        """The host clients are told to connect to."""
        return self.config.public_host or self.config.host

    @property
    def ipconf_url(self) -> str:
        """Base URL of ipconf, e.g. ``http://127.0.0.1:7700``."""
        return f"http://{self.public_host}:{self.ipconf_port}"

    def endpoints(self) -> list[str]:
        """``host:port`` of every gateway's TCP listener, in gateway order."""
        return [g.tcp_endpoint.removeprefix("tcp://") for g in self.gateways]

    def token(self, uid: str, device: str) -> str:
        """A login token for ``uid`` on ``device`` (tests and tools)."""
        return self.auth.issue(uid, device)

    def describe(self) -> dict[str, Any]:
        """Where everything listens (what the ready line and ready file hold)."""
        return {
            "ipconf": self.ipconf_url,
            "gateways": [
                {"id": g.id, "tcp": g.tcp_endpoint, "ws": g.ws_endpoint, "web": g.web_url}
                for g in self.gateways
            ],
            "store": self.config.data_dir or "memory",
            "pid": os.getpid(),
        }

    async def reap_gateways(self) -> list[str]:
        """Gateways that left discovery since the last call: park their routes.

        A gateway that stops reporting (a crash) or deregisters leaves the
        registry's live set after its TTL (or at once). Its routes are then put
        into their grace period (``routes.unbind_gateway``: they receive no pushes
        and expire after ``grace_ms``; their devices sync when they log in again)
        and its part of every open merged fan-out is completed
        (``logic.gateway_gone``). Only the registry decides: a gateway that is
        merely slow keeps heartbeating within the TTL, and one that was forgotten
        anyway registers again and binds its live connections back
        (``Gateway._rebind``). O(gateways + routes of the dead ones).
        """
        live = {info.id for info in await self.registry.live()}
        dead = sorted(self._seen - live)
        self._seen = live
        for gateway in dead:
            parked = await self.routes.unbind_gateway(gateway)
            held = self.logic.gateway_gone(gateway)
            self.gateways_lost += 1
            logger.warning(
                "gateway %s left discovery: %d routes parked, %d fan-outs released",
                gateway,
                len(parked),
                held,
            )
        return dead

    async def _reap_loop(self) -> None:
        # a third of the TTL: a dead gateway's routes are parked within 4/3 TTL
        interval = max(self.config.discovery_ttl_ms // 3, 10) / 1000
        while not self._stopped:
            try:
                await self.reap_gateways()
            except Exception:
                logger.exception("reaping gateways failed")
            await asyncio.sleep(interval)

    def start_reaper(self) -> None:
        """Run :meth:`reap_gateways` every ``discovery_ttl_ms / 3`` until :meth:`stop`."""
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())

    async def stop(self) -> None:
        """Stop everything (clients are kicked with SHUTDOWN). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        for gateway in self.gateways:
            await gateway.stop()
        if self.ipconf is not None:
            await self.ipconf.stop()
        await self.logic.aclose()
        self.routes.close()
        await self.bus.aclose()
        await self.logic.store.aclose()  # the calls already made finish first


async def start_cluster(config: ClusterConfig | None = None) -> Cluster:
    """Start ipconf, the gateways and logic in this event loop; return the handles."""
    cfg = config or ClusterConfig()
    if cfg.dev:
        logger.warning("%s", DEV_WARNING.removeprefix("WARNING: "))
    store = open_store(cfg.data_dir)
    # SQLite on one worker thread (in call order), the memory store inline
    astore = async_store(store)
    if cfg.demo:
        await seed_demo(astore, lobby_size=cfg.lobby_size)
    routes = RouteService(grace_ms=cfg.grace_ms)
    bus: MemoryBus[BusPayload] = MemoryBus()
    registry = MemoryRegistry(ttl_ms=cfg.discovery_ttl_ms)
    logic = Logic(store=astore, routes=routes, bus=bus, config=cfg.logic)
    secret = cfg.secret or new_secret()
    auth = Authenticator(secret, ttl_s=cfg.token_ttl_s)
    cluster = Cluster(
        config=cfg,
        store=store,
        routes=routes,
        bus=bus,
        registry=registry,
        logic=logic,
        auth=auth,
        secret=secret,
    )
    gateway_cfg = attrs.evolve(cfg.gateway, dev_tokens=cfg.dev)
    try:
        for i in range(cfg.gateways):
            gateway = Gateway(
                f"gw-{i + 1}",
                logic=logic,
                routes=routes,
                bus=bus,
                registry=registry,
                auth=auth,
                config=gateway_cfg,
            )
            cluster.gateways.append(gateway)
            await gateway.start(
                cfg.host,
                cfg.tcp_port_base + i if cfg.tcp_port_base else 0,
                (cfg.web_port_base + i if cfg.web_port_base else 0) if cfg.web else None,
                public_host=cfg.public_host,
            )
        ipconf = IpConf(
            registry=registry,
            auth=auth,
            store=astore,
            admin=lambda op, args: admin(astore, op, args),
            dev=cfg.dev,
        )
        cluster.ipconf = ipconf
        cluster.ipconf_port = await ipconf.start(cfg.host, cfg.ipconf_port)
        cluster.start_reaper()
    except BaseException:
        await cluster.stop()
        raise
    return cluster


# --- users and groups -------------------------------------------------------------------


async def seed_demo(store: AsyncMessageStore, *, lobby_size: int = DEFAULT_LOBBY_SIZE) -> None:
    """Create the demo users, ``team`` (alice, bob, carol) and ``lobby``. Idempotent.

    Any store: wrap a synchronous one with :func:`imkit.aio.async_store`.
    """
    for uid in DEMO_USERS:
        await store.create_user(uid)
    lobby = list(DEMO_USERS)
    n = 1
    while len(lobby) < lobby_size:
        uid = f"user{n:03d}"
        await store.create_user(uid)
        lobby.append(uid)
        n += 1
    await store.create_group("team", ["alice", "bob", "carol"])
    if not await store.create_group("lobby", lobby):
        for uid in lobby:  # an older data directory: make sure everyone is in
            if not await store.is_member(uid, "lobby"):
                await store.join(uid, "lobby")


ADMIN_HELP = """\
create-user UID...            register users
create-group CONV [UID...]    create a group with these members
join CONV UID...              add users to a group
leave CONV UID...             remove users from a group
members CONV                  list the members of a conversation
conversations UID             list the conversations of a user
inbox UID                     the last entries of a user's inbox (write fan-out)"""


async def admin(store: AsyncMessageStore, op: str, args: list[str]) -> Any:
    """Run one registry command on ``store`` (see ``ADMIN_HELP``); the result is JSON-able.

    Raises ValueError for an unknown command or missing arguments, and the store's
    own errors (UserNotFound, ConfigError, ...) for bad ones.
    """
    if op == "create-user" and args:
        return {uid: await store.create_user(uid) for uid in args}
    if op == "create-group" and args:
        return {"created": await store.create_group(args[0], args[1:])}
    if op == "join" and len(args) >= 2:
        return {uid: await store.join(uid, args[0]) for uid in args[1:]}
    if op == "leave" and len(args) >= 2:
        return {uid: await store.leave(uid, args[0]) for uid in args[1:]}
    if op == "members" and len(args) == 1:
        return sorted(await store.members(args[0]))
    if op == "conversations" and len(args) == 1:
        return sorted(await store.conversations_of(args[0]))
    if op == "inbox" and len(args) == 1:
        page = await store.inbox_read(args[0], 0, 1000)
        return [[e.conv, e.seq] for e in page.entries[-50:]]
    raise ValueError(f"unknown command or missing arguments: {op} {' '.join(args)}")


# --- command line -----------------------------------------------------------------------


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=command("cluster"),
        description="Run the imkit reference IM system (ipconf + gateways + logic) in one process.",
        epilog=f"Manage users and groups: {command('cluster')} admin --help",
    )
    p.add_argument("--gateways", type=int, default=1, help="number of gateways (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--public-host", default=None, help="address told to clients (default: --host)")
    p.add_argument(
        "--port-base",
        type=int,
        default=DEFAULT_PORT_BASE,
        help="ipconf on this port, gateway i on +10+i (TCP) and +80+i (web); 0: ephemeral",
    )
    p.add_argument("--data-dir", default=None, help="keep messages in SQLite in this directory")
    p.add_argument("--secret", default=os.environ.get("IMKIT_SECRET"), help="token key (hex)")
    p.add_argument("--no-demo", action="store_true", help="do not create the demo users/groups")
    p.add_argument("--lobby-size", type=int, default=DEFAULT_LOBBY_SIZE)
    p.add_argument("--no-web", action="store_true", help="no web page / WebSocket")
    dev = p.add_mutually_exclusive_group()
    dev.add_argument(
        "--dev",
        action="store_true",
        help="development mode: serve /dev/token and /admin to direct local requests "
        "(never behind a proxy or on a shared machine)",
    )
    dev.add_argument("--no-dev", action="store_true", help="no /dev/token and /admin (the default)")
    p.add_argument("--heartbeat-ms", type=int, default=None, help="client heartbeat interval")
    p.add_argument("--grace-ms", type=int, default=DEFAULT_GRACE_MS, help="route grace period")
    p.add_argument(
        "--max-per-address",
        type=int,
        default=DEFAULT_MAX_PER_ADDRESS,
        help="TCP connections from one address (raise it for load tests)",
    )
    p.add_argument(
        "--no-shed",
        action="store_true",
        help="never refuse sends when overloaded (for comparisons)",
    )
    p.add_argument(
        "--shed-max-lag-ms",
        type=int,
        default=DEFAULT_MAX_LAG_MS,
        help="refuse new sends while the event loop runs this late (default: off)",
    )
    p.add_argument(
        "--shed-max-backlog",
        type=int,
        default=DEFAULT_MAX_BACKLOG,
        help="refuse new sends while this many envelopes wait for a gateway",
    )
    p.add_argument(
        "--shed-retry-ms",
        type=int,
        default=DEFAULT_SHED_RETRY_MS,
        help="retry hint sent with a refused send",
    )
    p.add_argument(
        "--max-pending-logins",
        type=int,
        default=DEFAULT_MAX_PENDING_LOGINS,
        help="TCP connections not yet logged in (the oldest is evicted past it)",
    )
    p.add_argument("--ready-file", default=None, help="write where things listen (JSON) here")
    many = p.add_argument_group(
        "several processes", "each role in its own process on Redis, NATS JetStream and PostgreSQL"
    )
    many.add_argument(
        "--processes", action="store_true", help="run each role in its own supervised process"
    )
    many.add_argument("--logic", type=int, default=1, help="logic processes (default 1)")
    add_backend_flags(many)
    p.add_argument("-q", "--quiet", action="store_true", help="print only the ready line")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return p


def config_from_args(args: argparse.Namespace) -> ClusterConfig:
    """The :class:`ClusterConfig` a command line asks for."""
    server = ServerConfig()
    if args.heartbeat_ms:
        server = attrs.evolve(server, heartbeat=HeartbeatPolicy(interval_ms=args.heartbeat_ms))
    base = args.port_base
    try:
        secret = bytes.fromhex(args.secret) if args.secret else None
    except ValueError:
        secret = b""
    if secret is not None and len(secret) < 16:
        raise SystemExit("--secret / IMKIT_SECRET must be at least 32 hex digits (16 bytes)")
    return ClusterConfig(
        gateways=args.gateways,
        host=args.host,
        public_host=args.public_host,
        ipconf_port=base,
        tcp_port_base=base + 10 if base else 0,
        web_port_base=base + 80 if base else 0,
        web=not args.no_web,
        data_dir=args.data_dir,
        secret=secret,
        dev=args.dev,
        demo=not args.no_demo,
        lobby_size=args.lobby_size,
        grace_ms=args.grace_ms,
        gateway=GatewayConfig(
            server=server,
            max_per_address=args.max_per_address,
            max_pending_logins=args.max_pending_logins,
            shed=not args.no_shed,
            shed_max_lag_ms=args.shed_max_lag_ms,
            shed_max_backlog=args.shed_max_backlog,
            shed_retry_ms=args.shed_retry_ms,
        ),
    )


def _banner(cluster: Cluster) -> str:
    cfg = cluster.config
    lines = [
        "imkit reference IM system is up "
        + (
            f"(SQLite store in {cfg.data_dir})"
            if cfg.data_dir
            else "(memory store: nothing is kept; --data-dir DIR keeps it)"
        ),
        f"  ipconf    {cluster.ipconf_url}/gateways?uid=alice",
    ]
    for g in cluster.gateways:
        web = f"   web {g.web_url}" if g.web_url else ""
        lines.append(f"  gateway   {g.id}  {g.tcp_endpoint}{web}")
    if cfg.demo:
        lines.append(
            f"  users     {' '.join(DEMO_USERS)}; groups 'team' (alice bob carol), "
            f"'lobby' ({cfg.lobby_size} members)"
        )
    if cfg.host in ("0.0.0.0", "::", "") and not cfg.public_host:
        lines.append(
            "  note      listening on every interface without --public-host: clients are "
            "given the host they used to reach ipconf"
        )
    if cfg.dev:
        # the secret itself is never printed: a token is one request away
        lines.insert(0, DEV_WARNING)
        lines.append(f"  tokens    {cluster.ipconf_url}/dev/token?uid=alice&device=cli")
    else:
        lines.append(
            "  tokens    development endpoints off: --dev serves /dev/token and /admin "
            "to this machine; or set IMKIT_SECRET and give chat the same --secret"
            + ("" if cfg.secret else " (this run's secret is random: nobody can log in)")
        )
    default = cluster.ipconf_port == DEFAULT_PORT_BASE
    ipconf_flag = "" if default else f" --ipconf {cluster.ipconf_url}"
    secret_flag = "" if cfg.dev else ' --secret "$IMKIT_SECRET"'
    lines += [
        "",
        "Chat in two terminals:",
        f"  {command('chat')} --user alice --to bob{ipconf_flag}{secret_flag}",
        f"  {command('chat')} --user bob --to alice{ipconf_flag}{secret_flag}",
        "Group chat: --group lobby (read fan-out) or --group team (write fan-out).",
    ]
    if cfg.dev and cluster.gateways and cluster.gateways[0].web_url:
        lines.append(f"In a browser: {cluster.gateways[0].web_url}?user=alice&to=bob")
    if cfg.dev:
        lines.append(
            f"Add users:  {command('cluster')} admin create-user zoe"
            + ("" if default else f" --url {cluster.ipconf_url}")
        )
    lines.append("Ctrl-C stops.")
    return "\n".join(lines)


async def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        cluster = await start_cluster(cfg)
    except OSError as exc:
        print(f"cannot start: {exc} (another cluster running? try --port-base 0)", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    info = cluster.describe()
    if not args.quiet:
        print(_banner(cluster), flush=True)
    if args.ready_file:
        path = Path(args.ready_file)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(path)
    print("imkit-cluster ready " + json.dumps(info), flush=True)
    try:
        await stop.wait()
    finally:
        await cluster.stop()
        if args.ready_file:
            with contextlib.suppress(OSError):
                Path(args.ready_file).unlink()
    return 0


def _admin_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog=f"{command('cluster')} admin",
        description="Manage users and groups of a running cluster (or of a --data-dir).",
        epilog=ADMIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_PORT_BASE}", help="ipconf URL")
    p.add_argument("--data-dir", default=None, help="edit this SQLite store directly (offline)")
    p.add_argument("op")
    p.add_argument("args", nargs="*")
    args = p.parse_args(argv)
    if args.data_dir:
        store = open_store(args.data_dir)
        try:
            result = asyncio.run(admin(InlineStore(store), args.op, args.args))
        except (ValueError, KeyError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            store.close()
        print(json.dumps(result))
        return 0
    body = json.dumps({"op": args.op, "args": args.args}).encode()
    request = urllib.request.Request(
        args.url.rstrip("/") + "/admin",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            doc = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        doc = json.loads(exc.read() or b"{}")
    except OSError as exc:
        print(f"cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if not doc.get("ok"):
        print(f"error: {doc.get('error')}", file=sys.stderr)
        return 2
    print(json.dumps(doc["result"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m examples.cluster`` (and the ``imkit-cluster`` script)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "admin":
        return _admin_main(argv[1:])
    if argv and argv[0] == "role":
        return main_role(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    args = _run_parser().parse_args(argv)
    if args.processes and not (1 <= args.gateways <= 64 and 1 <= args.logic <= 64):
        raise SystemExit("--gateways and --logic must be 1-64")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from imkit.aio import run

    try:
        return run(run_processes(args) if args.processes else _run(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
