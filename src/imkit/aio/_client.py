"""The IM client on asyncio: endpoints, racing connects, login, reconnect, heartbeats.

:class:`Client` drives a sans-IO :class:`~imkit.session.ClientSession` (which owns
the delivery contract: cids, resends, dedup, acks, sync, heartbeat decisions) over
a :class:`~imkit.aio.FramedConnection`, and adds what needs a clock or a socket:

* **endpoints**: a static list, or a pluggable fetcher
  (:data:`~imkit.aio.EndpointFetcher`, e.g. an ipconf HTTP lookup the application
  supplies) whose answer is cached for ``endpoint_ttl_ms``; a stale copy (or the
  static list) is used when a fetch fails or answers garbage;
* **racing** (RFC 8305 "happy eyeballs", applied to the ranked list): try the
  first endpoint; if it has not connected after ``race_delay_ms`` (or failed),
  start the next one too, up to ``max_racing`` at once; keep the first connection
  that succeeds, cancel or close the others. An endpoint that failed (refused,
  timed out, or accepted but never answered the login) is demoted to the end of
  the list for ``demote_ms``;
* **reconnect** with the session's full-jitter exponential backoff, which honours
  a server's ``retry_after_ms`` (Kick, Error SERVER_BUSY/SHUTDOWN) and its
  LoginAck bounds; a Kick that reconnecting cannot fix (AUTH_FAILED, REPLACED)
  closes the client;
* **timers**: the session's single next deadline (pings, resends, gap syncs,
  heartbeat death, frames the session's pacer releases) on one ``loop.call_at``
  (:class:`~imkit.aio.DeadlineTimer`). The session paces every frame against the
  rate the server announced in LoginAck, so a burst of queued sends never trips
  the server's quotas (docs/session.md, "Pacing").

Async API: ``await client.send(conv, body) -> seq``, ``async for push in
client.messages()``, ``client.state`` and ``await client.wait_for(ClientStatus.ONLINE)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import xxhash

from imkit.aio._checks import check_int
from imkit.aio._endpoints import (
    DEFAULT_MAX_IPCONF_ENDPOINTS,
    Endpoint,
    EndpointFetcher,
    _checked_endpoints,
)
from imkit.aio._loop import loop_ms
from imkit.aio._timers import DeadlineTimer
from imkit.aio._transport import FramedConnection
from imkit.errors import BackendError, ConfigError, ConnectionClosed, SendError, StateError
from imkit.protocol import ErrorCode, Message, Push, Role
from imkit.session import (
    ClientConfig,
    ClientSession,
    CloseConnection,
    Kicked,
    LoggedIn,
    MessageReceived,
    Output,
    SendAcked,
    SendFailed,
    SessionEvent,
    initial_cid,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_MS",
    "DEFAULT_DEMOTE_MS",
    "DEFAULT_ENDPOINT_TTL_MS",
    "DEFAULT_FETCH_TIMEOUT_MS",
    "DEFAULT_MAX_RACING",
    "DEFAULT_MAX_UNREAD_MESSAGES",
    "DEFAULT_RACE_DELAY_MS",
    "Client",
    "ClientStatus",
]

logger = logging.getLogger("imkit.aio.client")

#: RFC 8305 ("Happy Eyeballs v2") recommends 250 ms between connection attempts:
#: long enough that a healthy first endpoint almost always wins alone, short enough
#: that a black-holed one costs the user a quarter second, not a TCP timeout.
DEFAULT_RACE_DELAY_MS = 250

#: Connection attempts in flight at once. Two is the seed's "race two": enough to
#: route around one dead endpoint without multiplying load on the gateways.
DEFAULT_MAX_RACING = 2

#: One TCP connect attempt. The kernel's SYN retries take over a minute; a mobile
#: client should give up on an endpoint after 10 s and try the next.
DEFAULT_CONNECT_TIMEOUT_MS = 10_000

#: How long an ipconf answer is used before asking again: gateway lists change on
#: scale-out or failure, minutes apart; 5 min keeps ipconf load to one request per
#: client per 5 min even when clients reconnect often.
DEFAULT_ENDPOINT_TTL_MS = 5 * 60_000

#: One call of the endpoint fetcher, start to answer. An ipconf answers from memory;
#: 5 s covers a slow mobile link's connect and one round trip, after which the
#: client falls back to its cached (or static) list instead of hanging in CONNECTING.
DEFAULT_FETCH_TIMEOUT_MS = 5_000

#: How long a failed endpoint stays at the end of the list: about two ipconf TTLs'
#: worth of reconnect attempts would otherwise retry a dead gateway first each time.
DEFAULT_DEMOTE_MS = 60_000

#: Messages received and not yet taken by ``messages()``. When full, the client
#: stops reading from the socket (the transport then pauses reading), so a stalled
#: application makes the server cut or slow down rather than the client's memory
#: grow. 1024 is ten sync pages; the bound is soft by at most one frame's messages.
DEFAULT_MAX_UNREAD_MESSAGES = 1024


class ClientStatus(enum.Enum):
    """The connection state of a :class:`Client` (see ``client.state``)."""

    IDLE = "idle"  # created, start() not called
    CONNECTING = "connecting"  # fetching endpoints / connecting (racing)
    LOGGING_IN = "logging_in"  # connected, Login sent, no LoginAck yet
    ONLINE = "online"  # logged in
    BACKOFF = "backoff"  # waiting before the next attempt
    CLOSED = "closed"  # aclose() called or a final Kick; terminal


class _ClientConnection(FramedConnection):
    """The client's framed connection: the Client reads through :meth:`recv`."""

    lost: Callable[[], object] | None = None

    def on_close(self, code: int, exc: BaseException | None) -> None:
        if self.lost is not None:
            self.lost()  # wake a reader blocked on a full message queue


class Client:
    """An IM client connection with reconnect; drives a :class:`~imkit.session.ClientSession`.

    ``token`` and ``device`` go into every Login (the session resumes across
    reconnects). Give ``endpoints`` ("host:port" strings or
    :class:`~imkit.aio.Endpoint`), a ``fetch_endpoints`` callable
    (:data:`~imkit.aio.EndpointFetcher`: ``async () -> Sequence[str | Endpoint]``,
    raising BackendError on failure), or both: the static list is the fallback
    while the fetcher has never answered. The fetcher is called when the cached
    answer is missing or older than ``endpoint_ttl_ms``, each call bounded by
    ``fetch_timeout_ms``; at most ``max_endpoints`` of its answer are kept. A fetch
    that fails, times out or answers something that is not a non-empty sequence of
    endpoints is recorded in :attr:`last_error` as a BackendError and the cached
    list is used. ``session`` replaces the
    session built from ``token``/``device``/``config`` (a
    :class:`~imkit.session.ClientConfig`: the session's limits and timings);
    ``connection_kwargs`` go to each :class:`FramedConnection`. ``on_event``
    receives every session event the async API does not consume (receipts, server
    errors, kicks, dead connections). ``rng`` seeds the session's jitter.

    Costs: a send O(1) plus the frame's encoding; a received push O(1) in the
    session plus a queue append. Use as ``async with Client(...) as client:`` or
    call :meth:`start` and :meth:`aclose`.
    """

    def __init__(
        self,
        *,
        token: str = "",
        device: str = "",
        endpoints: Sequence[str | Endpoint] = (),
        fetch_endpoints: EndpointFetcher | None = None,
        race_delay_ms: int = DEFAULT_RACE_DELAY_MS,
        max_racing: int = DEFAULT_MAX_RACING,
        connect_timeout_ms: int = DEFAULT_CONNECT_TIMEOUT_MS,
        endpoint_ttl_ms: int = DEFAULT_ENDPOINT_TTL_MS,
        fetch_timeout_ms: int = DEFAULT_FETCH_TIMEOUT_MS,
        max_endpoints: int = DEFAULT_MAX_IPCONF_ENDPOINTS,
        demote_ms: int = DEFAULT_DEMOTE_MS,
        max_messages: int = DEFAULT_MAX_UNREAD_MESSAGES,
        session: ClientSession | None = None,
        config: ClientConfig | None = None,
        connection_kwargs: dict[str, Any] | None = None,
        on_event: Callable[[SessionEvent], object] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        check_int("race_delay_ms", race_delay_ms)
        check_int("max_racing", max_racing)
        check_int("connect_timeout_ms", connect_timeout_ms)
        check_int("max_messages", max_messages)
        check_int("fetch_timeout_ms", fetch_timeout_ms)
        check_int("max_endpoints", max_endpoints)
        check_int("endpoint_ttl_ms", endpoint_ttl_ms, minimum=0)
        check_int("demote_ms", demote_ms, minimum=0)
        if isinstance(endpoints, str):
            raise ConfigError("endpoints is a sequence of endpoints, not one string")
        self._static = [e if isinstance(e, Endpoint) else Endpoint.parse(e) for e in endpoints]
        if fetch_endpoints is not None and not callable(fetch_endpoints):
            raise ConfigError("fetch_endpoints must be an async callable")
        if not self._static and fetch_endpoints is None:
            raise ConfigError("give endpoints, fetch_endpoints, or both")
        self.fetch_endpoints = fetch_endpoints
        self.race_delay_ms = race_delay_ms
        self.max_racing = max_racing
        self.connect_timeout_ms = connect_timeout_ms
        self.endpoint_ttl_ms = endpoint_ttl_ms
        self.fetch_timeout_ms = fetch_timeout_ms
        self.max_endpoints = max_endpoints
        self.demote_ms = demote_ms
        self.max_messages = max_messages
        self._connection_kwargs = dict(connection_kwargs or {})
        self._on_event = on_event
        self._session_arg = session
        if config is not None and not isinstance(config, ClientConfig):
            raise ConfigError(f"config must be a ClientConfig, got {config!r}")
        self._config = config
        self._token = token
        self._device = device
        self._rng = rng
        self._session: ClientSession | None = session
        if session is None and (not token or not device):
            raise ConfigError("token and device are required without a session")
        # state
        self._state = ClientStatus.IDLE
        self._state_waiters: list[tuple[frozenset[ClientStatus], asyncio.Future[ClientStatus]]] = []
        self._task: asyncio.Task[None] | None = None
        self._conn: FramedConnection | None = None
        self._timer: DeadlineTimer | None = None
        self._acks: dict[int, asyncio.Future[int]] = {}
        self._messages: deque[Push] = deque()
        self._messages_waiter: asyncio.Future[None] | None = None
        self._space_waiter: asyncio.Future[None] | None = None
        self._wake_backoff: asyncio.Future[None] | None = None
        self._cache: list[Endpoint] = []
        self._cache_until_ms = 0
        self._demoted: dict[Endpoint, int] = {}
        self._logged_in = False
        # observable results
        self.endpoint: Endpoint | None = None  # the endpoint of the current (or last) connection
        self.kicked: Kicked | None = None  # the last Kick received
        self.last_error: BaseException | None = None  # why the last attempt (or fetch) failed
        self.fetches = 0  # calls of the endpoint fetcher
        self.fetch_failures = 0  # of which failed (the cached or static list was used)
        self.last_backoff_ms: int | None = None  # the last reconnect delay chosen
        self.connects = 0  # connections established (TCP)
        self.logins = 0  # LoginAcks received

    # -- state ----------------------------------------------------------------------------

    @property
    def state(self) -> ClientStatus:
        """Where the client is now."""
        return self._state

    @property
    def session(self) -> ClientSession:
        """The sans-IO session (created by :meth:`start` unless one was given)."""
        if self._session is None:
            raise StateError("the client has not started")
        return self._session

    def _is_closed(self) -> bool:
        # a method, not an inline test: the state changes across awaits
        return self._state is ClientStatus.CLOSED

    def _set_state(self, state: ClientStatus) -> None:
        if self._state is ClientStatus.CLOSED or state is self._state:
            return
        self._state = state
        keep = []
        for states, fut in self._state_waiters:
            if state in states:
                if not fut.done():
                    fut.set_result(state)
            elif not fut.done():
                keep.append((states, fut))
        self._state_waiters = keep

    async def wait_for(self, *states: ClientStatus, timeout: float | None = None) -> ClientStatus:
        """Wait until the state is one of ``states`` (returns it at once if it is already).

        Waiting for anything but CLOSED ends with ConnectionClosed if the client closes.
        """
        wanted = frozenset(states) | {ClientStatus.CLOSED}
        if self._state in wanted:
            reached = self._state
        else:
            fut: asyncio.Future[ClientStatus] = asyncio.get_running_loop().create_future()
            entry = (wanted, fut)
            self._state_waiters.append(entry)
            try:
                reached = await asyncio.wait_for(fut, timeout)
            finally:
                if entry in self._state_waiters:  # timed out or cancelled: forget it
                    self._state_waiters.remove(entry)
        if reached is ClientStatus.CLOSED and ClientStatus.CLOSED not in states:
            raise ConnectionClosed(0, "client closed")
        return reached

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the session and start connecting in the background. Idempotent."""
        if self._task is not None:
            return
        if self._state is ClientStatus.CLOSED:
            raise ConnectionClosed(0, "client closed")
        loop = asyncio.get_running_loop()
        if self._session is None:
            # cids must not repeat across sessions of a user: seed them from wall time
            wall_ms = int(time.time() * 1000)
            slot = xxhash.xxh32_intdigest(self._device.encode()) % 16
            self._session = ClientSession(
                token=self._token,
                device=self._device,
                now_ms=loop_ms(loop),
                first_cid=initial_cid(wall_ms, slot),
                config=self._config,
                rng=self._rng,
            )
        self._timer = DeadlineTimer(self._session.next_deadline_ms, self._on_tick, loop=loop)
        self._task = loop.create_task(self._run())

    async def aclose(self) -> None:
        """Log out, close the connection, end :meth:`messages`; pending sends fail. Idempotent."""
        if self._state is ClientStatus.CLOSED and self._task is None:
            return
        if self._session is not None and self._timer is not None:
            self._apply(self._session.close(self._timer.now_ms()))
        self._finish()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._conn is not None:
            await self._conn.aclose()

    async def close(self) -> None:
        """Deprecated alias of :meth:`aclose` (async closers are ``aclose``, as in trio).

        Kept for one release; emits DeprecationWarning.
        """
        warnings.warn(
            "Client.close() is deprecated, use aclose()", DeprecationWarning, stacklevel=2
        )
        await self.aclose()

    def _finish(self) -> None:
        """Enter CLOSED: stop timers, fail waiters, end the message stream."""
        self._set_state(ClientStatus.CLOSED)
        if self._timer is not None:
            self._timer.close()
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(ConnectionClosed(0, "client closed"))
        self._acks.clear()
        for waiter in (self._messages_waiter, self._space_waiter, self._wake_backoff):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- application API ------------------------------------------------------------------

    def send_nowait(self, conv: str, body: bytes) -> tuple[int, asyncio.Future[int]]:
        """Queue a message; return its cid and a future of its seq (SendError on failure).

        Raises CapacityError when the session's send queue is full, ConnectionClosed
        after close. O(1) plus the encoding of what goes out now.
        """
        if self._state is ClientStatus.CLOSED or self._timer is None:
            raise ConnectionClosed(0, "client closed")
        cid, out = self.session.send(
            conv, body, self._timer.now_ms(), wall_ms=int(time.time() * 1000)
        )
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._acks[cid] = fut
        self._apply(out)
        return cid, fut

    async def send(self, conv: str, body: bytes) -> int:
        """Send ``body`` to ``conv`` and wait until it is stored; return its seq.

        Survives reconnects (the session resends with the same cid). Raises
        :class:`~imkit.errors.SendError` if the send was given up (refused by the
        server, or unanswered after the session's retries).
        """
        _, fut = self.send_nowait(conv, body)
        return await fut

    async def messages(self) -> AsyncIterator[Push]:
        """Every message delivered by the session, once each, in seq order per conversation.

        Ends when the client closes.
        """
        while True:
            if self._messages:
                push = self._messages.popleft()
                if len(self._messages) <= self.max_messages // 2:
                    self._wake_space()
                yield push
                continue
            if self._state is ClientStatus.CLOSED:
                return
            self._messages_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._messages_waiter
            finally:
                self._messages_waiter = None

    def mark_read(self, conv: str, seq: int) -> None:
        """Send a read receipt for ``conv`` up to ``seq`` (dropped while offline)."""
        if self._timer is not None:
            self._apply(self.session.mark_read(conv, seq, self._timer.now_ms()))

    def sync(self, convs: Iterable[str] | None = None) -> None:
        """Ask the server for what came after the session's cursors."""
        if self._timer is not None:
            self._apply(self.session.sync(self._timer.now_ms(), convs))

    def reconnect_now(self) -> None:
        """Skip the current backoff wait (e.g. the OS says the network is back)."""
        waiter = self._wake_backoff
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- outputs of the session -------------------------------------------------------

    def _apply(self, outputs: list[Output]) -> None:
        """Act on session outputs in order: frames out, events to their consumers."""
        conn = self._conn
        for out in outputs:
            if not isinstance(out, SessionEvent):
                if conn is not None and not conn.closed:
                    # a closed connection: the session learns of it through connection_lost
                    with contextlib.suppress(ConnectionClosed):
                        conn.send(out)
                continue
            if isinstance(out, MessageReceived):
                self._messages.append(out.push)
                waiter = self._messages_waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif isinstance(out, SendAcked):
                fut = self._acks.pop(out.cid, None)
                if fut is not None and not fut.done():
                    fut.set_result(out.seq)
            elif isinstance(out, SendFailed):
                fut = self._acks.pop(out.cid, None)
                if fut is not None and not fut.done():
                    fut.set_exception(SendError(out.cid, out.attempts, out.code))
                self._emit(out)
            elif isinstance(out, LoggedIn):
                self._logged_in = True
                self.logins += 1
                if conn is not None:
                    conn.established()
                    if self.endpoint is not None:
                        self._demoted.pop(self.endpoint, None)
                self._set_state(ClientStatus.ONLINE)
                self._emit(out)
            elif isinstance(out, CloseConnection):
                if conn is not None:
                    conn.close()
            else:
                if isinstance(out, Kicked):
                    self.kicked = out
                self._emit(out)
        if self._timer is not None:
            self._timer.rearm()

    def _emit(self, event: SessionEvent) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                logger.exception("on_event callback failed")

    def _on_tick(self, now_ms: int) -> None:
        if self._session is not None and self._state is not ClientStatus.CLOSED:
            self._apply(self._session.tick(now_ms))

    def _wake_space(self) -> None:
        waiter = self._space_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the connection loop --------------------------------------------------------------

    async def _run(self) -> None:
        session = self.session
        assert self._timer is not None
        timer = self._timer
        while self._state is not ClientStatus.CLOSED:
            self._set_state(ClientStatus.CONNECTING)
            try:
                conn = await self._connect()
            except (OSError, BackendError, TimeoutError) as exc:
                self.last_error = exc
                logger.info("connect failed: %s", exc)
            else:
                await self._serve(conn)
            if self._is_closed():
                return
            if self.kicked is not None and not self.kicked.reconnect:
                self._finish()  # AUTH_FAILED / REPLACED: reconnecting cannot help
                return
            delay = session.reconnect_delay_ms()
            self.last_backoff_ms = delay
            self._set_state(ClientStatus.BACKOFF)
            self._wake_backoff = wake = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait({wake}, timeout=delay / 1000)
            finally:
                self._wake_backoff = None
            timer.rearm()

    async def _serve(self, conn: FramedConnection) -> None:
        """Log in on ``conn`` and feed its frames to the session until it closes."""
        session = self.session
        assert self._timer is not None
        timer = self._timer
        self._conn = conn
        self._logged_in = False
        self.kicked = None
        self.connects += 1
        self._set_state(ClientStatus.LOGGING_IN)
        try:
            self._apply(session.connection_made(timer.now_ms()))
            while True:
                try:
                    message: Message = await conn.recv()
                except ConnectionClosed:
                    break
                self._apply(session.receive(message, timer.now_ms()))
                while len(self._messages) >= self.max_messages and not conn.closed:
                    self._space_waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self._space_waiter
                    finally:
                        self._space_waiter = None
                    if self._is_closed():
                        return
        finally:
            self._conn = None
            if session.connected:
                self._apply(session.connection_lost(timer.now_ms()))
            conn.close()
            if not self._logged_in and self.endpoint is not None:
                self._demote(self.endpoint)
            if self.kicked is None and conn.close_code == ErrorCode.SLOW_CONSUMER:
                self.last_error = ConnectionClosed(conn.close_code, conn.close_reason)

    # -- endpoints and racing -------------------------------------------------------------

    def _demote(self, endpoint: Endpoint) -> None:
        if self._timer is not None and self.demote_ms:
            self._demoted[endpoint] = self._timer.now_ms() + self.demote_ms

    async def endpoints(self) -> list[Endpoint]:
        """The endpoints the next attempt will try, in order (demoted ones last).

        Calls the fetcher when its cached answer is missing or stale (also before
        :meth:`start`). BackendError only when there is nothing to try: no static
        list, no cached answer, and the fetch failed. O(n) for n endpoints.
        """
        now = self._timer.now_ms() if self._timer is not None else loop_ms()
        base = self._static
        if self.fetch_endpoints is not None:
            if not self._cache or now >= self._cache_until_ms:
                try:
                    self._cache = await self._fetch()
                    self._cache_until_ms = now + self.endpoint_ttl_ms
                except BackendError as exc:
                    self.last_error = exc
                    self.fetch_failures += 1
                    if not self._cache and not self._static:
                        raise
                    logger.info("endpoint fetch failed, using the cached list: %s", exc)
            base = self._cache or self._static
        self._demoted = {e: t for e, t in self._demoted.items() if t > now}
        return sorted(base, key=lambda e: e in self._demoted)  # stable: ranks kept

    async def _fetch(self) -> list[Endpoint]:
        """One bounded call of the fetcher; any failure becomes a BackendError."""
        fetch = self.fetch_endpoints
        assert fetch is not None
        self.fetches += 1
        try:
            answer = await asyncio.wait_for(fetch(), self.fetch_timeout_ms / 1000)
        except BackendError:
            raise
        except TimeoutError:
            raise BackendError(
                f"endpoint fetch: no answer within {self.fetch_timeout_ms} ms"
            ) from None
        except Exception as exc:  # a fetcher's bug or OSError must not end the client
            raise BackendError(f"endpoint fetch failed: {type(exc).__name__}: {exc}") from exc
        return _checked_endpoints(answer, max_endpoints=self.max_endpoints)

    async def _connect(self) -> FramedConnection:
        """Race connects over the endpoints (staggered); the first to connect wins."""
        endpoints = await self.endpoints()
        loop = asyncio.get_running_loop()
        attempts: dict[asyncio.Task[FramedConnection], Endpoint] = {}
        pending: set[asyncio.Task[FramedConnection]] = set()
        queue = deque(endpoints)
        winner: asyncio.Task[FramedConnection] | None = None
        errors: list[BaseException] = []

        def start_next() -> None:
            if queue and len(pending) < self.max_racing:
                endpoint = queue.popleft()
                task = loop.create_task(self._attempt(endpoint))
                attempts[task] = endpoint
                pending.add(task)

        start_next()
        try:
            while pending and winner is None:
                stagger = bool(queue) and len(pending) < self.max_racing
                done, _ = await asyncio.wait(
                    pending,
                    timeout=self.race_delay_ms / 1000 if stagger else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not done:
                    start_next()  # the race delay passed with nobody connected
                    continue
                for task in done:
                    pending.discard(task)
                    exc = task.exception()
                    if exc is None:
                        if winner is None:
                            winner = task
                        else:
                            task.result().abort()
                    else:
                        errors.append(exc)
                        self._demote(attempts[task])
                if winner is None:
                    start_next()  # a failure starts the next attempt at once
        finally:
            for task in pending:
                task.cancel()
            for result in await asyncio.gather(*pending, return_exceptions=True):
                if isinstance(result, FramedConnection):
                    result.abort()
        if winner is None:
            if errors:
                raise errors[-1] if isinstance(errors[-1], OSError) else OSError(str(errors[-1]))
            raise OSError("no endpoint to connect to")
        self.endpoint = attempts[winner]
        return winner.result()

    async def _attempt(self, endpoint: Endpoint) -> FramedConnection:
        loop = asyncio.get_running_loop()
        kwargs = self._connection_kwargs

        def factory() -> FramedConnection:
            conn = _ClientConnection(Role.CLIENT, **kwargs)
            conn.lost = self._wake_space
            return conn

        connect = loop.create_connection(factory, endpoint.host, endpoint.port)
        _, conn = await asyncio.wait_for(connect, self.connect_timeout_ms / 1000)
        return conn
