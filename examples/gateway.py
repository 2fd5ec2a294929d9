"""The gateway (接入层): long connections in, the bus out, sessions in between.

What it does
    * Accepts TCP long connections (:func:`imkit.aio.serve`, a
      :class:`~imkit.aio.FramedConnection` each) and, on its web port, serves the
      static chat page and WebSocket connections for browsers
      (:class:`~examples.websocket.WsLink`: one imkit frame per binary message).
    * Runs one :class:`~imkit.session.ServerSession` per connection: it checks the
      login token (:class:`~examples.auth.Authenticator`), fixes the identity of
      every later frame, drops resent cids (its ``CidWindow``), enforces the
      per-connection quotas, tracks pushes until acked, and cuts silent
      connections. All sessions share one :class:`~imkit.timingwheel.TimingWheel`
      driven by a :class:`~imkit.aio.WheelDriver` (one asyncio timer for every
      heartbeat and push-retry deadline of the gateway).
    * Forwards sends, syncs and receipts to the logic server (in-process calls)
      and answers the client with its results.
    * Subscribes to its own id on the bus and pushes what the logic server
      publishes to the connections named in each envelope.
    * Keeps the route table current: bind on login (kicking a connection it
      replaces, wherever it is), a fenced unbind on disconnect, then a grace
      period during which a reconnect of the same device resumes the session.
    * Registers in discovery with its endpoints and reports its load
      (connections, process CPU) every ``report_interval_ms``.

Policies
    Heartbeats 30 s x 3 missed (``ServerConfig``); a connection that says nothing
    is cut at the login deadline (10 s); a slow reader is cut at
    ``max_write_buffer`` bytes queued or ``max_tracked_pushes`` unacked pushes
    and resyncs when it comes back; at most ``max_connections`` clients (others
    get ``Kick(SERVER_BUSY, retry_after_ms)``), of which at most
    ``max_pending_logins`` not yet logged in (the oldest is evicted for a newcomer)
    and ``max_per_address`` from one address; a server stall does not expire
    heartbeats before the frames that arrived during it are read. Past what the
    process can carry (its loop running late, or envelopes piling up for it) new
    sends are refused with ``SendAck(SERVER_BUSY, retry_after_ms)``
    (:mod:`examples.overload`): the client resends them after the hint, the
    delivered rate stays at its maximum and memory stays bounded. On shutdown every client gets
    ``Kick(SHUTDOWN, retry_after_ms)`` so they reconnect elsewhere, spread out.
    If its bus subscription lags, it tells every client to resync. If discovery
    forgot it while it was alive (late load reports), it registers again and
    binds back the routes the cluster parked meanwhile. :meth:`Gateway.abort`
    simulates a crash for fault tests.

What it leaves out
    TLS, hot restart by file-descriptor handoff, a per-IP connection *rate* limit
    (there is a per-address cap), and an RPC to a remote logic server (here logic
    is an in-process object).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import attrs

from imkit.aio import (
    DEFAULT_FRAME_TIMEOUT_MS,
    DEFAULT_HANDSHAKE_TIMEOUT_MS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PENDING_LOGINS,
    DEFAULT_MAX_PER_ADDRESS,
    DEFAULT_MAX_WRITE_BUFFER,
    FramedConnection,
    Server,
    WheelDriver,
    loop_ms,
    serve,
)
from imkit.bus import Envelope, Lagged
from imkit.discovery import GatewayInfo, Registry
from imkit.errors import AuthError, CapacityError, ConnectionClosed, ImkitError
from imkit.protocol import ErrorCode, Login, Message, Notify, Push, PushBatch, SyncPage, encode
from imkit.routetable import BindResult, Route, UnbindResult
from imkit.session import (
    CloseConnection,
    Output,
    PushAcked,
    ReceiptPosted,
    SendRequested,
    ServerConfig,
    ServerSession,
    ServerState,
    ServerStats,
    ServerTimer,
    SessionEvent,
    SessionStarted,
    SyncRequested,
)
from imkit.store import AsyncMessageStore, ConvKind
from imkit.timingwheel import TimingWheel

from .auth import Authenticator
from .httpd import (
    HttpServer,
    Request,
    Response,
    is_direct_local,
    json_response,
    render_response,
    serve_http,
)
from .logic import BusPayload, Deliver, KickRoute, Logic, Signals
from .overload import (
    DEFAULT_MAX_BACKLOG,
    DEFAULT_MAX_LAG_MS,
    DEFAULT_SHED_RETRY_MS,
    LoadShedder,
)
from .routes import RouteService

__all__ = [
    "DEFAULT_BUS_PENDING",
    "DEFAULT_REPORT_INTERVAL_MS",
    "WEB_ROOT",
    "Gateway",
    "GatewayConfig",
    "LogicPort",
    "PayloadBus",
    "PayloadSubscription",
]

logger = logging.getLogger("examples.gateway")

#: Load reports to discovery: a third of discovery's 15 s TTL, so one lost report
#: does not make a healthy gateway vanish.
DEFAULT_REPORT_INTERVAL_MS = 5_000
#: Envelopes queued for this gateway on the bus before it counts as lagging (then
#: every client is told to resync). A saturated process takes in a frame or more per
#: connection in one loop turn before the consumer runs (1,000 clients queued 1,000+
#: envelopes per turn in benchmarks/bench_overload.py, so 1,024 overflowed and made
#: every client resync, the most expensive answer there is); 8,192 holds a turn of a
#: few thousand busy connections, at ~0.3 KB per envelope (2.5 MiB).
DEFAULT_BUS_PENDING = 8192
#: Busy-retry hint for a login the route table refuses (a full table): as long as
#: a server-busy kick from :func:`imkit.aio.serve`.
_BUSY_RETRY_MS = 5_000

#: Frames one connection's handler takes in before it lets the loop run the others
#: (and the bus consumer, which writes the pushes those frames made). A whole 64-frame
#: inbox per connection per turn let 1,000 busy connections queue more than 7,680
#: envelopes in one loop turn (78,000 sends shed in a 20,000/s run of
#: benchmarks/bench_overload.py); 16 (a typing burst and its acks) shed 10,750 and
#: delivered 39% more while loaded, 8 shed none but resent more pushes.
_FRAMES_PER_TURN = 16

#: The static files of the web chat page.
WEB_ROOT = Path(__file__).parent / "web"
_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/cbor.js": ("cbor.js", "text/javascript; charset=utf-8"),
}


@attrs.frozen(kw_only=True)
class GatewayConfig:
    """The gateway's limits (each documented on its DEFAULT_* constant)."""

    server: ServerConfig = attrs.field(factory=ServerConfig)
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_pending_logins: int = DEFAULT_MAX_PENDING_LOGINS  # TCP, not logged in yet
    max_per_address: int = DEFAULT_MAX_PER_ADDRESS  # TCP, per IPv4 address / IPv6 /64
    max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER
    frame_timeout_ms: int = DEFAULT_FRAME_TIMEOUT_MS
    handshake_timeout_ms: int = DEFAULT_HANDSHAKE_TIMEOUT_MS
    report_interval_ms: int = DEFAULT_REPORT_INTERVAL_MS
    bus_pending: int = DEFAULT_BUS_PENDING
    region: str = ""
    dev_tokens: bool = False  # serve /dev/token (development only: the launcher's --dev)
    # load shedding (examples.overload): refuse new sends past what the process carries
    shed: bool = True
    shed_max_lag_ms: int | None = DEFAULT_MAX_LAG_MS  # None: the lag signal is off
    shed_max_backlog: int = DEFAULT_MAX_BACKLOG
    shed_retry_ms: int = DEFAULT_SHED_RETRY_MS


class Link(Protocol):
    """What the gateway needs from a client connection (TCP or WebSocket)."""

    @property
    def closed(self) -> bool:
        """True once closing has begun."""
        ...

    close_code: int

    def send(self, message: Message) -> None:
        """Encode and queue one message (ConnectionClosed once closed)."""
        ...

    def close(
        self, last: Message | None = None, *, code: int | None = None, reason: str = ""
    ) -> None:
        """Send ``last`` if given, then close."""
        ...

    def established(self) -> None:
        """The login succeeded."""
        ...

    def abort(self) -> None:
        """Drop the connection at once (no close handshake, buffered bytes discarded)."""
        ...


class LogicPort(Protocol):
    """What a gateway calls on the logic server: a local
    :class:`~examples.logic.Logic`, or ``examples.remote.RemoteLogic`` across processes."""

    async def has_user(self, uid: str) -> bool: ...

    async def send(
        self, uid: str, device: str, cid: int, conv: str, body: bytes
    ) -> SentMessage | ErrorCode: ...

    async def sync_later(
        self,
        request: SyncRequested,
        answer: Callable[[SyncRequested, list[SyncPage]], object],
        *,
        alive: Callable[[], bool] = ...,
    ) -> None: ...

    async def note_cursor(self, uid: str, device: str, conv: str, seq: int) -> None: ...

    async def receipt(self, uid: str, conv: str, seq: int) -> None: ...

    async def resync_entries(self, uid: str) -> list[tuple[str, int]]: ...

    def kick_route(self, route: Route, code: int, reason: str = "") -> None: ...

    def stats_dict(self) -> dict[str, int]: ...


class SentMessage(Protocol):
    """The ids a send's acknowledgement carries."""

    @property
    def seq(self) -> int: ...

    @property
    def msg_id(self) -> int: ...

    @property
    def server_ms(self) -> int: ...


class PayloadSubscription(Protocol):
    """A gateway's bus subscription: envelopes of :data:`~examples.logic.BusPayload`."""

    def __len__(self) -> int: ...

    def __aiter__(self) -> AsyncIterator[Envelope[BusPayload] | Lagged]: ...

    def close_nowait(self) -> None: ...


class PayloadBus(Protocol):
    """The bus a gateway subscribes to: a ``MemoryBus`` or ``examples.remote.EncodedBus``."""

    async def subscribe(self, subject: str, *, max_pending: int) -> PayloadSubscription: ...


class _Conn:
    """One client connection on this gateway."""

    __slots__ = ("busy_until_ms", "conn_id", "link", "route", "session")

    def __init__(self, conn_id: int, link: Link) -> None:
        self.conn_id = conn_id
        self.link = link
        self.busy_until_ms = 0  # sends refused until then (load shedding)
        self.session: ServerSession | None = None
        self.route: Route | None = None


class Gateway:
    """One gateway of the reference system. ``start()`` listens; ``stop()`` drains.

    Per frame: the session's O(1) plus, for a send, the logic server's work. Per
    bus envelope: O(targets) session pushes, and one encode of its frame for all
    TCP targets (``FramedConnection.send_encoded``). Create it inside a running loop.
    """

    def __init__(
        self,
        gateway_id: str,
        *,
        logic: LogicPort,
        routes: RouteService,
        bus: PayloadBus,
        registry: Registry,
        auth: Authenticator,
        config: GatewayConfig | None = None,
    ) -> None:
        self.id = gateway_id
        self.logic = logic
        self.routes = routes
        self.bus = bus
        self.registry = registry
        self.auth = auth
        self.config = config or GatewayConfig()
        self.stats = ServerStats()  # shared by every session of this gateway
        self.driver: WheelDriver[ServerTimer] = WheelDriver(
            self._on_timer, wheel=TimingWheel(start_ms=loop_ms())
        )
        self.conns: dict[int, _Conn] = {}
        self.closes: collections.Counter[int] = collections.Counter()  # close code -> count
        self.lagged = 0
        self._ids = itertools.count(1)
        # (uid, device) -> the closed session kept for a resume during the route's grace
        # (the route table's on_expire drops it; so does its own deadline, grace_ms
        # after the unbind, when the table is shared and another process expired it)
        self._parked: dict[tuple[str, str], tuple[int, ServerSession, int]] = {}
        self.server: Server | None = None
        self.web: HttpServer | None = None
        self._sub: PayloadSubscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._dying: list[asyncio.Task[None]] = []  # cancelled by abort_nowait()
        self.tcp_endpoint = ""
        self.ws_endpoint = ""
        self.web_url = ""
        self.aborted = False  # abort() ran: this gateway plays dead
        cfg = self.config
        # refuses new sends while this process is past what it can carry
        self.shedder = LoadShedder(
            lambda: len(self._sub) if self._sub is not None else 0,
            max_lag_ms=cfg.shed_max_lag_ms,
            max_backlog=cfg.shed_max_backlog,
            retry_after_ms=cfg.shed_retry_ms,
            enabled=cfg.shed,
        )
        self.rebound = 0  # routes bound again after discovery had forgotten this gateway
        # (token, device, uid) of the Login about to be handed to its session: the
        # registry lookup is awaited before, so the session's authenticate callback
        # (synchronous) never waits for the store
        self._vetted: tuple[str, str, str] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(
        self, host: str, tcp_port: int, web_port: int | None, *, public_host: str | None = None
    ) -> None:
        """Listen (TCP, and HTTP + WebSocket unless ``web_port`` is None), subscribe, register."""
        cfg = self.config
        self.server = await serve(
            self._serve_tcp,
            host,
            tcp_port,
            max_connections=cfg.max_connections,
            max_pending_logins=cfg.max_pending_logins,
            max_per_address=cfg.max_per_address,
            max_write_buffer=cfg.max_write_buffer,
            frame_timeout_ms=cfg.frame_timeout_ms,
            handshake_timeout_ms=cfg.handshake_timeout_ms,
        )
        public = public_host or host
        self.tcp_endpoint = f"tcp://{public}:{self.server.port}"
        endpoints = [self.tcp_endpoint]
        if web_port is not None:
            self.web = await serve_http(self._http, host, web_port, upgrade=self._upgrade)
            self.ws_endpoint = f"ws://{public}:{self.web.port}/ws"
            self.web_url = f"http://{public}:{self.web.port}/"
            endpoints.append(self.ws_endpoint)
        self._sub = await self.bus.subscribe(self.id, max_pending=cfg.bus_pending)
        if cfg.shed and cfg.shed_max_backlog >= cfg.bus_pending:
            logger.warning("shed_max_backlog >= bus_pending: the bus overflows before shedding")
        self.routes.on_expire.append(self._route_expired)
        self.routes.on_bind.append(self._route_bound)
        self._info = GatewayInfo(
            id=self.id,
            endpoints=tuple(endpoints),
            region=cfg.region,
            max_connections=cfg.max_connections,
        )
        await self.registry.register(self._info)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._consume()), loop.create_task(self._report())]

    async def stop(self) -> None:
        """Deregister, kick every client with SHUTDOWN, stop listening. Idempotent."""
        with contextlib.suppress(ImkitError):
            await self.registry.deregister(self.id)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for conn in list(self.conns.values()):  # WebSocket links (TCP ones: server.close)
            if not isinstance(conn.link, FramedConnection) and conn.session is not None:
                # spread like the TCP server's kicks: [0.5, 1.5) s, not one wave
                hint = 500 + random.randrange(1000)
                self._emit(conn, conn.session.kick(ErrorCode.SHUTDOWN, retry_after_ms=hint))
        if self.server is not None:
            await self.server.aclose(kick=True)
        if self.web is not None:
            await self.web.aclose()
        if self._sub is not None:
            self._sub.close_nowait()
        with contextlib.suppress(ValueError):
            self.routes.on_expire.remove(self._route_expired)
        with contextlib.suppress(ValueError):
            self.routes.on_bind.remove(self._route_bound)
        self.driver.close()
        self.shedder.close()

    async def abort(self) -> int:
        """Die like a killed process (``kill -9``); return how many clients it dropped.

        For fault tests (:func:`examples.faultproxy.kill_gateway`). No Kick, no
        deregistration, no unbind: its listener and every client socket close
        abruptly (``abort``: the clients see a reset or an end of stream), its
        connection handlers stop while they wait for the next frame (a frame
        already read is not acted on), its bus subscription ends (envelopes for it
        now go nowhere), its load reports and session timers stop, and its routes
        stay bound as a dead process leaves them, until discovery's TTL runs out
        (the cluster then parks them) or their devices log in elsewhere.
        :meth:`stop` still works afterwards. Idempotent. O(connections).
        """
        dropped = self.abort_nowait()
        dying, self._dying = self._dying, []
        await asyncio.gather(*dying, return_exceptions=True)
        return dropped

    def abort_nowait(self) -> int:
        """:meth:`abort` without waiting for the cancelled tasks to finish unwinding.

        Usable from a synchronous callback (a test can kill the gateway between
        two bus publishes). O(connections).
        """
        if self.aborted:
            return 0
        self.aborted = True  # from here on, nothing this gateway does touches the routes
        with contextlib.suppress(ValueError):
            self.routes.on_expire.remove(self._route_expired)
        with contextlib.suppress(ValueError):
            self.routes.on_bind.remove(self._route_bound)
        dying, self._tasks = self._tasks, []
        server = self.server
        if server is not None:
            server.closing = True
            if server.listener is not None:
                server.listener.close()  # new connections: refused
            dying += server.tasks  # the connection handlers
        for task in dying:  # bus consumer, load reports, handlers
            task.cancel()
        self._dying = dying
        if self.web is not None:
            self.web.server.close()  # new web connections: refused
        if self._sub is not None:
            self._sub.close_nowait()  # envelopes queued for it are gone with it
        dropped = 0
        for conn in list(self.conns.values()):
            conn.link.abort()  # TCP and WebSocket links alike
            dropped += 1
        self.driver.close()  # heartbeats and push retries of the dead sessions: gone
        self.shedder.close()
        return dropped

    @property
    def connections(self) -> int:
        """Client connections open now (TCP and WebSocket)."""
        return len(self.conns)

    # -- connections ---------------------------------------------------------------------------

    async def _serve_tcp(self, conn: FramedConnection) -> None:
        await self._serve(conn, conn.__aiter__())

    async def _serve(self, link: Link, messages: AsyncIterator[Message]) -> None:
        """Run one connection: frames -> session -> outputs, until it closes."""
        conn_id = next(self._ids)
        conn = _Conn(conn_id, link)
        session = ServerSession(
            wheel=self.driver.wheel,
            authenticate=self._authenticate,
            session_id=f"{self.id}.{conn_id}",
            now_ms=self.driver.now_ms(),
            config=self.config.server,
            stats=self.stats,
            resume=self._resume,
            tag=conn,
        )
        conn.session = session
        self.conns[conn_id] = conn
        self.driver.rearm()
        turn = 0
        try:
            async for message in messages:
                turn += 1
                if turn >= _FRAMES_PER_TURN:
                    # let the other connections and the bus consumer run: a saturated
                    # loop otherwise takes in every queued frame of every connection in
                    # one turn, and the pushes those sends make pile up meanwhile
                    turn = 0
                    await asyncio.sleep(0)
                if type(message) is Login and session.state is ServerState.AWAIT_LOGIN:
                    vetted = await self._vet(message)
                    if link.closed:
                        break
                    self._vetted = vetted  # read by _authenticate inside receive()
                outputs = session.receive(message, self.driver.now_ms())
                self._vetted = None
                await self._act(conn, outputs)
                if link.closed:
                    break
        finally:
            del self.conns[conn_id]
            session.connection_lost(self.driver.now_ms())
            self.driver.rearm()
            self.closes[link.close_code] += 1
            route = conn.route
            if route is None or self.aborted:
                pass  # a dead process unbinds nothing
            else:
                try:
                    unbound = await self.routes.unbind(route)
                except ImkitError:  # unreachable: the route expires with its gateway
                    logger.warning("gateway %s could not unbind a route", self.id)
                else:
                    if unbound is UnbindResult.GRACE:
                        self._park(route, conn_id, session)

    async def _vet(self, login: Login) -> tuple[str, str, str] | None:
        """(token, device, uid) if the Login's token is valid for a registered user."""
        try:
            uid = self.auth.verify(login.token, login.device)
            if await self.logic.has_user(uid):
                return (login.token, login.device, uid)
        except AuthError:
            pass
        except ImkitError:  # the store failed or is busy: refuse; the client retries
            logger.warning("gateway %s could not look a user up", self.id)
        return None

    def _authenticate(self, token: str, device: str) -> str:
        """The session's callback: the uid :meth:`_vet` found for this very Login."""
        vetted = self._vetted
        if vetted is None or vetted[0] != token or vetted[1] != device:
            raise AuthError("unknown user")
        return vetted[2]

    def _park(self, route: Route, conn_id: int, session: ServerSession) -> None:
        """Keep a closed session for a resume during its route's grace. O(1) amortised."""
        now = self.driver.now_ms()
        key = (route.uid, route.device)
        self._parked.pop(key, None)  # re-insert at the end: the dict stays in deadline order
        self._parked[key] = (conn_id, session, now + self.routes.table.grace_ms)
        self._prune_parked(now)

    def _prune_parked(self, now_ms: int) -> None:
        parked = self._parked
        while parked:
            key, (_, _, until) = next(iter(parked.items()))
            if until > now_ms:
                break
            del parked[key]

    def _resume(self, uid: str, device: str, resume_id: str) -> ServerSession | None:
        self._prune_parked(self.driver.now_ms())
        parked = self._parked.get((uid, device))
        if parked is not None and parked[1].session_id == resume_id:
            return parked[1]
        return None

    def _route_expired(self, route: Route) -> None:
        if route.gateway != self.id:
            return
        parked = self._parked.get((route.uid, route.device))
        if parked is not None and parked[0] == route.conn_id:
            del self._parked[route.uid, route.device]

    def _route_bound(self, route: Route) -> None:
        if route.gateway != self.id:  # the device came back elsewhere: nothing to resume here
            self._parked.pop((route.uid, route.device), None)

    async def _act(self, conn: _Conn, outputs: list[Output]) -> None:
        """Act on a session's outputs in order; forward requests to the logic server."""
        session = conn.session
        assert session is not None
        for out in outputs:
            if isinstance(out, PushAcked):
                if out.cumulative:  # the device holds conv through seq: its sync cursor
                    await self.logic.note_cursor(session.uid, session.device, out.conv, out.seq)
            elif isinstance(out, SendRequested):
                hint = self._refusal(conn)
                if hint:
                    # overloaded: refuse early and cheaply; the client resends after
                    # the hint (same cid, so nothing is stored twice)
                    self._emit(
                        conn, session.fail_send(out.cid, ErrorCode.SERVER_BUSY, retry_after_ms=hint)
                    )
                    continue
                result = await self.logic.send(out.uid, out.device, out.cid, out.conv, out.body)
                if isinstance(result, int):
                    # transient refusals carry a retry hint (the client resends then)
                    busy = result == ErrorCode.SERVER_BUSY
                    hint = self.shedder.retry_hint_ms() if busy else 0
                    self._emit(conn, session.fail_send(out.cid, result, retry_after_ms=hint))
                else:
                    acked = session.ack_send(out.cid, result.seq, result.msg_id, result.server_ms)
                    self._emit(conn, acked)
            elif isinstance(out, SyncRequested):
                # Answered now (awaited: the next frame waits, so answers keep
                # their order), or (a device past its sync work budget) from a task
                # once its turn comes: this connection keeps reading frames
                # meanwhile, so the session's max_syncs_in_flight refuses more.
                # Pushes may go out before the answer; the client's SeqWindow
                # merges both (docs/session.md, sync semantics).
                await self.logic.sync_later(
                    out,
                    lambda req, pages: self._emit(conn, session.sync_response(req.req_id, pages)),
                    alive=lambda: not conn.link.closed,
                )
            elif isinstance(out, ReceiptPosted):
                r = out.receipt
                await self.logic.receipt(r.reader, r.conv, r.seq)
            elif isinstance(out, SessionStarted):
                await self._login(conn, out)
            else:
                self._emit(conn, [out])
        self.driver.rearm()

    def _refusal(self, conn: _Conn) -> int:
        """0: take a send of ``conn`` now; else refuse it with this retry hint (ms). O(1).

        See :mod:`examples.overload`. Once one of its sends is refused, the
        connection's next sends are refused until its hint has passed (each with
        what is left of it), so that its resent cids are stored in the order the
        client sent them.
        """
        shedder = self.shedder
        now = self.driver.now_ms()
        if now < conn.busy_until_ms:
            shedder.shed += 1
            return conn.busy_until_ms - now
        if shedder.admit():
            return 0
        hint = shedder.retry_hint_ms()
        conn.busy_until_ms = now + hint
        return hint

    def _emit(self, conn: _Conn, outputs: list[Output]) -> None:
        """Write frames; close on CloseConnection. (No logic calls: safe from timers.)"""
        link = conn.link
        for out in outputs:
            if not isinstance(out, SessionEvent):
                if not link.closed:
                    with contextlib.suppress(ConnectionClosed):
                        link.send(out)
            elif isinstance(out, CloseConnection):
                link.close(code=out.code, reason=out.reason)

    async def _login(self, conn: _Conn, started: SessionStarted) -> None:
        """Bind the route (fenced by a fresh epoch); kick the connection it replaces."""
        session = conn.session
        assert session is not None
        if self.aborted:
            return  # a login racing abort(): the dead process binds nothing
        route = Route(
            uid=started.uid,
            device=started.device,
            gateway=self.id,
            conn_id=conn.conn_id,
            epoch=self.routes.new_epoch(),
        )
        try:
            before = await self.routes.get(started.uid, started.device)
            result = await self.routes.bind(route)
        except CapacityError:
            kick = session.kick(ErrorCode.SERVER_BUSY, reason="busy", retry_after_ms=_BUSY_RETRY_MS)
            self._emit(conn, kick)
            return
        except ImkitError:  # the route table is unreachable: come back later
            logger.warning("gateway %s could not bind a route", self.id)
            kick = session.kick(ErrorCode.SERVER_BUSY, reason="busy", retry_after_ms=_BUSY_RETRY_MS)
            self._emit(conn, kick)
            return
        if self.aborted or conn.link.closed:
            return
        if result is BindResult.STALE:  # cannot happen with increasing epochs; be safe
            self._emit(conn, session.kick(ErrorCode.REPLACED, reason="replaced"))
            return
        if result is BindResult.REPLACED and before is not None:
            old = before.route
            if old.gateway == self.id:
                self._kick_local(old, ErrorCode.REPLACED, "replaced")
            else:
                self.logic.kick_route(old, ErrorCode.REPLACED, "replaced")
        self._parked.pop((started.uid, started.device), None)
        conn.route = route
        conn.link.established()

    def _kick_local(self, route: Route, code: int, reason: str) -> None:
        conn = self.conns.get(route.conn_id)
        if conn is not None and conn.route == route and conn.session is not None:
            self._emit(conn, conn.session.kick(code, reason=reason))

    def _on_timer(self, item: ServerTimer) -> None:
        session = item.session
        self._emit(session.tag, session.on_timer(item, self.driver.now_ms()))

    # -- the bus -------------------------------------------------------------------------------

    async def _consume(self) -> None:
        """Push what the logic server publishes for this gateway's connections."""
        assert self._sub is not None
        async for item in self._sub:
            try:
                if isinstance(item, Lagged):
                    await self._resync_all()
                elif isinstance(item, Envelope):
                    self._deliver(item.payload)
            except Exception:
                logger.exception("gateway %s failed to deliver an envelope", self.id)
            self.driver.rearm()

    def _deliver(self, payload: BusPayload) -> None:
        conns = self.conns
        now = self.driver.now_ms()
        if isinstance(payload, Deliver):
            pushes = payload.pushes
            batch = pushes[0] if len(pushes) == 1 else pushes
            frames = payload.frames
            # each frame encoded once for every TCP target (send_encoded), on first use
            shared_push: bytes | None = None
            shared_frames: list[bytes] | None = None
            for route in payload.targets:
                conn = conns.get(route.conn_id)
                if conn is None or conn.route != route or conn.session is None:
                    continue  # gone: the client syncs when it comes back
                link = conn.link
                tcp = link if isinstance(link, FramedConnection) else None
                if pushes:
                    # the session tracks the pushes (its retries are its own frames);
                    # when it sends them all in one frame, that frame is the shared one
                    outputs = conn.session.push(batch, now)
                    whole = _whole_frame(outputs, batch, pushes) if tcp is not None else None
                    if tcp is not None and whole is not None:
                        if shared_push is None:
                            shared_push = encode(whole, max_frame_size=tcp.conn.max_frame_size)
                        _send_shared(tcp, [shared_push])
                    else:
                        self._emit(conn, outputs)
                if frames:
                    if tcp is None:
                        self._emit(conn, list(frames))
                        continue
                    if shared_frames is None:
                        size = tcp.conn.max_frame_size
                        shared_frames = [encode(f, max_frame_size=size) for f in frames]
                    _send_shared(tcp, shared_frames)
            if payload.ticket is not None:
                payload.ticket.finish(self.id)
        elif isinstance(payload, Signals):
            for route, notify in payload.items:
                conn = conns.get(route.conn_id)
                if conn is not None and conn.route == route:
                    self._emit(conn, [notify])
        elif isinstance(payload, KickRoute):
            self._kick_local(payload.route, payload.code, payload.reason)

    async def _resync_all(self) -> None:
        """Envelopes were lost: tell every client what exists, so it syncs the rest."""
        self.lagged += 1
        for conn in list(self.conns.values()):
            await self._resync(conn)

    async def _resync(self, conn: _Conn) -> None:
        """Tell one client the last seq of each of its conversations (it syncs the gaps)."""
        session = conn.session
        if session is None or not session.uid or conn.link.closed:
            return
        try:
            entries = await self.logic.resync_entries(session.uid)
        except ImkitError:  # the store failed or is busy: the client resyncs on reconnect
            logger.warning("gateway %s could not resync a client", self.id)
            return
        for i in range(0, len(entries), 1000):
            self._emit(conn, [Notify(entries=tuple(entries[i : i + 1000]))])

    async def _rebind(self) -> int:
        """Bind again the routes parked while discovery had forgotten this live gateway.

        Its reports came late (a stalled process, a registry hiccup), so the
        cluster took it for dead and parked its routes; its connections are still
        up. Each route that is still this connection's (parked, or expired and not
        bound elsewhere since) is bound with a fresh epoch, and the client is told
        to resync what it missed meanwhile. A device that logged in elsewhere in
        between keeps its newer route. O(connections).
        """
        n = 0
        for conn in list(self.conns.values()):
            route = conn.route
            if route is None:
                continue
            try:
                binding = await self.routes.get(route.uid, route.device)
                if binding is not None and (binding.route != route or binding.live):
                    continue  # still live here, or the device moved on
                fresh = attrs.evolve(route, epoch=self.routes.new_epoch())
                if not (await self.routes.bind(fresh)).accepted:
                    continue
            except ImkitError:  # CapacityError, or the table is unreachable
                continue
            conn.route = fresh
            await self._resync(conn)
            n += 1
        self.rebound += n
        return n

    async def _report(self) -> None:
        """Heartbeat discovery with the load: connections and this process's CPU share."""
        interval = self.config.report_interval_ms / 1000
        last_cpu, last_wall = time.process_time(), time.monotonic()
        while True:
            await asyncio.sleep(interval)
            cpu_now, wall_now = time.process_time(), time.monotonic()
            cpu = min(1.0, max(0.0, (cpu_now - last_cpu) / max(wall_now - last_wall, 1e-6)))
            last_cpu, last_wall = cpu_now, wall_now
            try:
                alive = await self.registry.heartbeat(
                    self.id, connections=self.connections, cpu=cpu
                )
                if not alive:  # discovery took us for dead: come back, routes too
                    await self.registry.register(
                        attrs.evolve(self._info, connections=self.connections, cpu=cpu)
                    )
                    await self._rebind()
            except ImkitError:
                logger.warning("gateway %s could not report its load", self.id)

    # -- web: the static page, a dev token, the WebSocket ----------------------------------------

    async def _http(self, request: Request) -> Response:
        if request.path in _STATIC:
            name, content_type = _STATIC[request.path]
            try:
                body = (WEB_ROOT / name).read_bytes()
            except OSError:
                return Response(status=404)
            return Response(body=body, content_type=content_type)
        if request.path == "/dev/token":
            store = self.logic.store if isinstance(self.logic, Logic) else None
            return await dev_token(request, self.auth, store, enabled=self.config.dev_tokens)
        if request.path == "/healthz":
            return json_response(
                {
                    "gateway": self.id,
                    "connections": self.connections,
                    "lagged": self.lagged,
                    "shed": self.shedder.shed,
                    "sessions": self.stats.as_dict(),  # summed over every session here
                    "logic": self.logic.stats_dict(),
                }
            )
        return Response(status=404)

    async def _upgrade(
        self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        from .websocket import WsLink  # wsproto: the optional `ws` extra

        cfg = self.config
        if len(self.conns) >= cfg.max_connections:
            busy = Response(status=503, headers=(("Retry-After", str(_BUSY_RETRY_MS // 1000)),))
            writer.write(render_response(busy))
            writer.close()
            return
        link = WsLink(
            reader,
            writer,
            max_write_buffer=cfg.max_write_buffer,
            frame_timeout_ms=cfg.frame_timeout_ms,
        )
        if await link.accept(request):
            await self._serve(link, link.messages())
            if not link.closed:
                link.close()


def _whole_frame(
    outputs: list[Output], batch: object, pushes: tuple[Push, ...]
) -> Push | PushBatch | None:
    """The one frame of ``session.push(batch)`` if it holds every push of ``batch``, else None.

    Then it is the same frame for every connection of the envelope. Otherwise
    (some pushes already tracked, nothing new, or a slow-consumer Kick) the
    outputs are this connection's own.
    """
    if len(outputs) != 1:
        return None
    out = outputs[0]
    if out is batch and type(out) is Push:
        return out
    if type(out) is PushBatch and out.pushes == pushes:
        return out
    return None


def _send_shared(link: FramedConnection, frames: list[bytes]) -> None:
    """Queue frames encoded once for many connections (a closed link is skipped)."""
    if not link.closed:
        with contextlib.suppress(ConnectionClosed):
            for frame in frames:
                link.send_encoded(frame)


async def dev_token(
    request: Request, auth: Authenticator, store: AsyncMessageStore | None, *, enabled: bool
) -> Response:
    """``GET /dev/token?uid=U&device=D``: a token for a registered user. Development only.

    Answers only when ``enabled`` (the launcher's ``--dev``) and only a request
    straight from the local machine (:func:`examples.httpd.is_direct_local`: a
    loopback peer and no proxy's forwarding header); 403 otherwise, 404 for an
    unknown user.
    """
    if not enabled or store is None:
        return json_response({"error": "dev tokens are off (start the launcher with --dev)"}, 403)
    if not is_direct_local(request):
        return json_response({"error": "dev tokens are for direct local requests only"}, 403)
    uid = request.query.get("uid", "")
    device = request.query.get("device", "")
    if not uid or not device:
        return json_response({"error": "give uid and device"}, 400)
    try:
        if not await store.has_user(uid):
            return json_response({"error": f"unknown user {uid!r}"}, 404)
        token = auth.issue(uid, device)
        convs = sorted(await store.conversations_of(uid))
        groups = [c for c in convs if (await store.conversation(c)).kind is ConvKind.GROUP]
    except ImkitError:
        return json_response({"error": "bad uid or device"}, 400)
    return json_response({"uid": uid, "device": device, "token": token, "groups": groups})
