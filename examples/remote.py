"""The reference system across processes: the logic server behind NATS, bus payloads as bytes.

What it does
    In one process the gateway calls :class:`~examples.logic.Logic` directly and the
    bus carries Python objects. Across processes both become messages:

    * **gateway -> logic** (send, sync, cursors, receipts, user lookups) is a
      request/reply on the subject ``imkit.logic`` served by every logic process
      in one NATS queue group (:class:`LogicServer`): M logic processes share the
      load and any one can die; a request in flight to a dead one times out and
      the client resends (sends are idempotent on (sender, cid)).
      :class:`RemoteLogic` is the gateway's stub with the same methods the gateway
      calls on a local :class:`~examples.logic.Logic`.
    * **logic -> gateway** (pushes, pull signals, receipts, kicks) is published on
      the gateway's JetStream subject (its route key) by :class:`EncodedBus`, which
      encodes :data:`~examples.logic.BusPayload` objects to bytes (CBOR around
      protocol frames, :func:`encode_payload`) and decodes them on the gateway's
      side; the gateway code is the same in both modes.

Policies
    * A merged fan-out's part for a gateway completes when JetStream has stored the
      envelope (the MQ has it; the seed's "MQ absorbs bursts"), not when the
      gateway wrote it: confirmations do not cross processes.
    * Every request has a deadline (``DEFAULT_RPC_TIMEOUT_S``); a send whose logic
      call fails is refused with ``SERVER_BUSY`` and a retry hint, which the client
      resends after; nothing it was told was stored is lost.
    * Frames inside payloads are the protocol's own encoding (validated again on
      decode); a payload that does not decode is counted and dropped (the clients
      concerned resync on their next reconnect or Lagged marker).

What it leaves out
    Authentication between processes (run them on a private network), and a
    backpressure signal from JetStream to the senders other than a failed publish.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import attrs
import cbor2

from imkit.bus import Envelope, Lagged, PublishResult
from imkit.errors import ImkitError
from imkit.protocol import ErrorCode, Notify, Push, SyncPage, SyncResponse, decode, encode
from imkit.routetable import Route
from imkit.session import SyncRequested

from .logic import BusPayload, Deliver, KickRoute, Logic, Signals

__all__ = [
    "DEFAULT_CURSOR_BATCH_MAX",
    "DEFAULT_CURSOR_BATCH_MS",
    "DEFAULT_LOGIC_SUBJECT",
    "DEFAULT_MAX_PUBLISHING",
    "DEFAULT_PUBLISH_RETRY_S",
    "DEFAULT_RPC_TIMEOUT_S",
    "DEFAULT_SEND_TIMEOUT_S",
    "EncodedBus",
    "LogicServer",
    "RemoteLogic",
    "Sent",
    "decode_payload",
    "encode_payload",
]

logger = logging.getLogger("examples.remote")

#: The request/reply subject every logic process serves (in one queue group).
DEFAULT_LOGIC_SUBJECT = "imkit.logic"
#: A logic call not answered within this long is asked again once (every call is
#: idempotent), then fails: a stopped logic process (SIGSTOP, a long GC pause) holds
#: a connection's frames at most twice this long. Long enough for a sync that waits
#: its device's turn in the ordinary case and a busy store; a sync that waits longer
#: is answered on the second asking.
DEFAULT_RPC_TIMEOUT_S = 2.0
#: A send not answered within this long is asked again once (the queue group picks
#: a member at random, so a stopped logic process is avoided half the time), then
#: refused with SERVER_BUSY (the client resends the same cid later). A stopped or
#: dead logic process holds a connection's frames at most twice this long. A normal
#: send takes ~10 ms; one that is only slow (a busy store) and is asked again is
#: stored once (idempotent on the cid) and pushed twice at worst.
DEFAULT_SEND_TIMEOUT_S = 1.0
#: Attempts of one logic call (the queue group picks a member at random each time).
ATTEMPTS = 2
#: A publish JetStream refused (NATS down or restarting) is tried again for this
#: long, with a doubling pause from 50 ms up to 1 s, before it is given up (the
#: members then see the message at their next sync).
DEFAULT_PUBLISH_RETRY_S = 30.0
#: Envelopes being published (JetStream not yet acknowledged) per process; past it
#: a publish is refused like a full inbox (the clients resync): 4x a gateway's
#: default bus inbox, so a burst is absorbed, a dead NATS is not queued forever.
DEFAULT_MAX_PUBLISHING = 32_768
#: A gateway sends the device cursors it learnt (from cumulative push acks) in one
#: request this often, instead of one request per ack: 2 NATS messages per batch
#: instead of 2 per ack per device. A cursor only saves a device re-downloading.
DEFAULT_CURSOR_BATCH_MS = 200
#: ... or as soon as this many (device, conversation) cursors are waiting (~40 B
#: each in a request; a logic server takes no more from one batch).
DEFAULT_CURSOR_BATCH_MAX = 2_000
#: The hint a send refused because the logic server did not answer carries.
RETRY_AFTER_MS = 500


# --- payloads on the wire ------------------------------------------------------------------

#: Published to a gateway whose envelope could not be published (NATS refused it for
#: DEFAULT_PUBLISH_RETRY_S, or too many were in flight): its subscription reads it as
#: a Lagged marker, so the gateway resyncs its clients instead of missing a message.
RESYNC_MARKER = b"\xa1\x61r\xf5"  # CBOR {"r": true}: never an encoded payload (a list)


def _route(route: Route) -> list[Any]:
    return [route.uid, route.device, route.gateway, route.conn_id, route.epoch]


def _unroute(item: Sequence[Any]) -> Route:
    uid, device, gateway, conn_id, epoch = item
    return Route(uid=uid, device=device, gateway=gateway, conn_id=conn_id, epoch=epoch)


def encode_payload(payload: BusPayload) -> bytes:
    """``payload`` as bytes: CBOR of the routes and the protocol frames. O(size)."""
    if isinstance(payload, Deliver):
        doc: list[Any] = [
            "d",
            [_route(r) for r in payload.targets],
            [encode(p) for p in payload.pushes],
            [encode(f) for f in payload.frames],
        ]
    elif isinstance(payload, Signals):
        doc = ["s", [[_route(r), encode(n)] for r, n in payload.items]]
    else:
        doc = ["k", _route(payload.route), int(payload.code), payload.reason]
    return cbor2.dumps(doc)


def decode_payload(data: bytes) -> BusPayload:
    """The payload :func:`encode_payload` made; ValueError for anything else. O(size)."""
    try:
        doc = cbor2.loads(data)
        kind = doc[0]
        if kind == "d":
            pushes = tuple(decode(p) for p in doc[2])
            if not all(type(p) is Push for p in pushes):
                raise ValueError("not a push")
            return Deliver(
                targets=tuple(_unroute(r) for r in doc[1]),
                pushes=pushes,  # type: ignore[arg-type]
                frames=tuple(decode(f) for f in doc[3]),
            )
        if kind == "s":
            items = [(_unroute(r), decode(n)) for r, n in doc[1]]
            if not all(type(n) is Notify for _, n in items):
                raise ValueError("not a notify")
            return Signals(items=tuple(items))  # type: ignore[arg-type]
        if kind == "k":
            return KickRoute(route=_unroute(doc[1]), code=int(doc[2]), reason=str(doc[3]))
    except (ImkitError, ValueError, TypeError, IndexError, KeyError, cbor2.CBORDecodeError) as e:
        raise ValueError(f"not a bus payload: {e}") from e
    raise ValueError(f"not a bus payload: kind {kind!r}")


# --- the bus between processes ---------------------------------------------------------------


class BytesSubscription(Protocol):
    """What :class:`EncodedBus` needs of a byte bus subscription."""

    def __aiter__(self) -> AsyncIterator[Envelope[bytes] | Lagged]: ...

    async def aclose(self) -> None: ...


class BytesBus(Protocol):
    """What :class:`EncodedBus` needs of a byte bus (``imkit.aio.nats.NatsBus``)."""

    async def publish(self, subject: str, payload: bytes) -> PublishResult: ...

    async def subscribe(self, subject: str, *, durable: str | None = None) -> Any: ...


class DecodedSubscription:
    """A gateway's subscription: the byte bus's items, payloads decoded, queued here.

    ``len()`` is what is queued and not yet read (the load shedder's backlog);
    at most ``max_pending`` envelopes: past it they are dropped and one
    :class:`~imkit.bus.Lagged` marker takes their place (the gateway resyncs its
    clients). O(1) per item.
    """

    def __init__(self, inner: BytesSubscription, subject: str, max_pending: int) -> None:
        self.subject = subject
        self._inner = inner
        self._queue: collections.deque[Envelope[BusPayload] | Lagged] = collections.deque()
        self._max = max_pending
        self._missed = 0
        self._ready = asyncio.Event()
        self._closed = False
        self.undecodable = 0
        self._pump = asyncio.get_running_loop().create_task(self._run())

    def __len__(self) -> int:
        return len(self._queue)

    async def _run(self) -> None:
        try:
            async for item in self._inner:
                if isinstance(item, Lagged):
                    self._missed += item.missed
                elif item.payload == RESYNC_MARKER:  # a publisher lost envelopes for us
                    self._missed += 1
                else:
                    try:
                        payload = decode_payload(item.payload)
                    except ValueError:
                        self.undecodable += 1
                        logger.warning("undecodable envelope on %s", self.subject)
                        self._missed += 1
                        continue
                    if len(self._queue) >= self._max:
                        self._missed += 1
                        continue
                    if self._missed:
                        self._queue.append(Lagged(subject=self.subject, missed=self._missed))
                        self._missed = 0
                    self._queue.append(Envelope(subject=self.subject, payload=payload))
                self._ready.set()
        except ImkitError:
            logger.exception("bus subscription %s failed", self.subject)
        finally:
            self._closed = True
            self._ready.set()

    def __aiter__(self) -> DecodedSubscription:
        return self

    async def __anext__(self) -> Envelope[BusPayload] | Lagged:
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._missed:
                missed, self._missed = self._missed, 0
                return Lagged(subject=self.subject, missed=missed)
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()

    def close_nowait(self) -> None:
        """Stop receiving (the byte subscription is closed in the background)."""
        self._closed = True
        self._pump.cancel()
        self._ready.set()
        asyncio.get_running_loop().create_task(self._inner.aclose())

    async def aclose(self) -> None:
        """Stop receiving and close the byte subscription."""
        self._closed = True
        self._pump.cancel()
        self._ready.set()
        await self._inner.aclose()


class EncodedBus:
    """The bus of :class:`~examples.logic.Logic` and the gateways, over a byte bus.

    ``publish_nowait`` encodes and publishes in the background (ordered per
    subject: JetStream keeps the order of publishes from one connection), at
    most ``max_publishing`` at once (past it: ``delivered == 0``, the clients
    resync); a Deliver's ticket part is finished when JetStream has stored it.
    ``subscribe`` gives a :class:`DecodedSubscription` on a durable consumer
    named after the gateway, so a restarted gateway gets what was published while
    it was away. Costs: one encode per envelope, one JetStream publish.
    """

    def __init__(
        self,
        inner: BytesBus,
        *,
        max_publishing: int = DEFAULT_MAX_PUBLISHING,
        retry_s: float = DEFAULT_PUBLISH_RETRY_S,
    ) -> None:
        self.inner = inner
        self.max_publishing = max_publishing
        self.retry_s = retry_s
        self._publishing: set[asyncio.Task[None]] = set()
        self._resyncing: set[str] = set()  # gateways a resync marker is on its way to
        self.failed = 0
        self.retried = 0
        self.refused = 0
        self.resyncs = 0

    def publish_nowait(self, subject: str, payload: BusPayload) -> PublishResult:
        """Encode ``payload`` and publish it in the background. O(size)."""
        if len(self._publishing) >= self.max_publishing:
            self.refused += 1
            self._lost(subject)
            return PublishResult(delivered=0, lagged=1)
        data = encode_payload(payload)
        ticket = payload.ticket if isinstance(payload, Deliver) else None
        task = asyncio.get_running_loop().create_task(self._publish(subject, data, ticket))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)
        return PublishResult(delivered=1, lagged=0)

    async def _publish(self, subject: str, data: bytes, ticket: Any) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.retry_s
        pause = 0.05
        try:
            while True:
                try:
                    await self.inner.publish(subject, data)
                    return
                except ImkitError:
                    if loop.time() + pause > give_up:
                        self.failed += 1
                        logger.warning("gave up publishing an envelope for %s", subject)
                        self._lost(subject)
                        return
                    self.retried += 1
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 1.0)
        finally:
            if ticket is not None:
                ticket.finish(subject)

    def _lost(self, subject: str) -> None:
        """An envelope for ``subject`` will never arrive: make sure its gateway hears
        of the gap. A task publishes one resync marker (read there as a Lagged: the
        gateway tells each client what exists, and they sync), retrying every second
        until it is stored; one task per gateway at a time."""
        if subject in self._resyncing:
            return
        self._resyncing.add(subject)
        task = asyncio.get_running_loop().create_task(self._send_resync(subject))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _send_resync(self, subject: str) -> None:
        try:
            while True:
                try:
                    await self.inner.publish(subject, RESYNC_MARKER)
                    self.resyncs += 1
                    return
                except ImkitError:
                    await asyncio.sleep(1.0)
        finally:
            self._resyncing.discard(subject)

    async def publish(self, subject: str, payload: BusPayload) -> PublishResult:
        """Encode and publish, waiting for JetStream's acknowledgement."""
        await self.inner.publish(subject, encode_payload(payload))
        return PublishResult(delivered=1, lagged=0)

    async def subscribe(self, subject: str, *, max_pending: int) -> DecodedSubscription:
        """The gateway ``subject``'s durable subscription, decoded."""
        inner = await self.inner.subscribe(subject, durable=f"gw-{subject}")
        return DecodedSubscription(inner, subject, max_pending)

    async def flush(self) -> None:
        """Wait for every background publish to finish."""
        while self._publishing:
            await asyncio.gather(*list(self._publishing), return_exceptions=True)


# --- gateway -> logic ---------------------------------------------------------------------


class Requester(Protocol):
    """A request/reply client (``imkit.aio.nats.NatsService``)."""

    async def request(self, subject: str, payload: bytes, timeout_s: float) -> bytes: ...


@attrs.frozen
class Sent:
    """What the gateway needs of a stored message to acknowledge its send."""

    seq: int
    msg_id: int
    server_ms: int


def _sync_pages(pages: Sequence[SyncPage]) -> bytes:
    return encode(SyncResponse(req_id=1, pages=tuple(pages)))


class RemoteLogic:
    """The gateway's stub of the logic servers: the calls it makes, over request/reply.

    Each call is one round trip to whichever logic process the queue group picks;
    a failed call is a typed :class:`~imkit.errors.ImkitError` (or, for a send, a
    retryable refusal).
    """

    def __init__(
        self,
        requester: Requester,
        bus: EncodedBus,
        *,
        subject: str = DEFAULT_LOGIC_SUBJECT,
        timeout_s: float = DEFAULT_RPC_TIMEOUT_S,
        send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S,
    ) -> None:
        self._req = requester
        self._bus = bus
        self.subject = subject
        self.timeout_s = timeout_s
        self.send_timeout_s = send_timeout_s
        self.failures = 0
        self.retry_after_ms = RETRY_AFTER_MS
        # (uid, device, conv) -> seq, sent as one request per batch (note_cursor)
        self._cursors: dict[tuple[str, str, str], int] = {}
        self._cursor_timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def _call(self, *request: Any, timeout_s: float | None = None) -> Any:
        wait = self.timeout_s if timeout_s is None else timeout_s
        data = cbor2.dumps(list(request))
        for attempt in range(ATTEMPTS):
            try:
                raw = await self._req.request(self.subject, data, wait)
                break
            except ImkitError:
                self.failures += 1
                if attempt + 1 == ATTEMPTS:
                    raise
        reply = cbor2.loads(raw)
        if reply[0] != "ok":
            self.failures += 1
            raise ImkitError(f"logic server failed: {reply[1]}")
        return reply[1]

    async def has_user(self, uid: str) -> bool:
        """Whether ``uid`` is a registered user."""
        return bool(await self._call("has_user", uid))

    async def send(
        self, uid: str, device: str, cid: int, conv: str, body: bytes
    ) -> Sent | ErrorCode:
        """Store and fan out; the stored message's ids, or the refusal's code."""
        try:
            result = await self._call(
                "send", uid, device, cid, conv, body, timeout_s=self.send_timeout_s
            )
        except ImkitError:
            logger.warning("send of %s not answered by a logic server", uid)
            return ErrorCode.SERVER_BUSY  # the gateway adds retry_after_ms
        if isinstance(result, int):
            return ErrorCode(result)
        return Sent(*result)

    async def sync_later(
        self,
        request: SyncRequested,
        answer: Callable[[SyncRequested, list[SyncPage]], object],
        *,
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        """Answer the sync (in the device's turn: the logic server waits for it)."""
        try:
            raw = await self._call(
                "sync",
                request.uid,
                request.device,
                [list(entry) for entry in request.after],
                request.limit,
            )
        except ImkitError:
            return  # the client asks again after its sync timeout
        response = decode(raw)
        assert isinstance(response, SyncResponse)
        if alive():
            answer(request, list(response.pages))

    async def note_cursor(self, uid: str, device: str, conv: str, seq: int) -> None:
        """The device holds ``conv`` through ``seq`` (its sync cursor).

        Batched: cursors are collected and sent in one request every
        ``DEFAULT_CURSOR_BATCH_MS`` (or at ``DEFAULT_CURSOR_BATCH_MAX`` of them), not
        one request per push ack. A batch lost with a dead process costs its
        devices a few seconds of messages downloaded again, never a message.
        """
        key = (uid, device, conv)
        if seq > self._cursors.get(key, 0):
            self._cursors[key] = seq
        if len(self._cursors) >= DEFAULT_CURSOR_BATCH_MAX:
            self._flush_cursors()
        elif self._cursor_timer is None:
            loop = asyncio.get_running_loop()
            self._cursor_timer = loop.call_later(
                DEFAULT_CURSOR_BATCH_MS / 1000, self._flush_cursors
            )

    def _flush_cursors(self) -> None:
        if self._cursor_timer is not None:
            self._cursor_timer.cancel()
            self._cursor_timer = None
        if not self._cursors:
            return
        batch = [[u, d, c, s] for (u, d, c), s in self._cursors.items()]
        self._cursors = {}
        task = asyncio.get_running_loop().create_task(self._send_cursors(batch))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_cursors(self, batch: list[list[Any]]) -> None:
        try:
            await self._call("cursors", batch)
        except ImkitError:
            logger.warning("%d device cursors not delivered to a logic server", len(batch))

    async def aclose(self) -> None:
        """Send the cursors collected so far and wait for them."""
        self._flush_cursors()
        await asyncio.gather(*list(self._background), return_exceptions=True)

    async def receipt(self, uid: str, conv: str, seq: int) -> None:
        """``uid`` read ``conv`` up to ``seq``."""
        await self._call("receipt", uid, conv, seq)

    async def resync_entries(self, uid: str) -> list[tuple[str, int]]:
        """(conv, last seq) of every conversation of ``uid``."""
        return [(c, s) for c, s in await self._call("resync", uid)]

    def kick_route(self, route: Route, code: int, reason: str = "") -> None:
        """Ask the gateway holding ``route`` to close it (straight on the bus)."""
        self._bus.publish_nowait(route.gateway, KickRoute(route=route, code=code, reason=reason))

    def stats_dict(self) -> dict[str, int]:
        """This stub's counters (the logic servers report their own)."""
        return {"rpc_failures": self.failures}


class LogicServer:
    """Serves :class:`RemoteLogic`'s requests with a local :class:`~examples.logic.Logic`.

    :meth:`handle` is the request handler to register with the queue group;
    every answer is CBOR ``["ok", result]`` or ``["error", text]``.
    """

    def __init__(self, logic: Logic) -> None:
        self.logic = logic
        self.requests = 0
        self.errors = 0
        self._ops: dict[str, Callable[..., Awaitable[Any]]] = {
            "has_user": self._has_user,
            "send": self._send,
            "sync": self._sync,
            "cursors": self._batch_cursors,
            "receipt": self._receipt,
            "resync": self._resync,
        }

    async def handle(self, data: bytes) -> bytes:
        """Decode one request, run it, encode the answer. Never raises."""
        self.requests += 1
        try:
            op, *args = cbor2.loads(data)
            result = await self._ops[op](*args)
        except Exception as e:  # an answer, not a hang: the caller gets a typed error
            self.errors += 1
            logger.exception("logic request failed")
            return cbor2.dumps(["error", f"{type(e).__name__}: {e}"])
        return cbor2.dumps(["ok", result])

    async def _has_user(self, uid: str) -> bool:
        return await self.logic.store.has_user(uid)

    async def _send(self, uid: str, device: str, cid: int, conv: str, body: bytes) -> Any:
        result = await self.logic.send(uid, device, cid, conv, body)
        if isinstance(result, int):
            return int(result)
        return [result.seq, result.msg_id, result.server_ms]

    async def _sync(self, uid: str, device: str, after: list[list[Any]], limit: int) -> bytes:
        entries = tuple((str(c), int(s)) for c, s in after)
        try:
            pages = await self.logic.sync(uid, device, entries, limit)
        except ImkitError:  # as in one process: no pages, the client asks again
            logger.exception("sync of %s failed", uid)
            pages = []
        return _sync_pages(pages)

    async def _batch_cursors(self, batch: list[list[Any]]) -> None:
        for uid, device, conv, seq in batch[:DEFAULT_CURSOR_BATCH_MAX]:
            await self.logic.note_cursor(str(uid), str(device), str(conv), int(seq))

    async def _receipt(self, uid: str, conv: str, seq: int) -> None:
        await self.logic.receipt(uid, conv, seq)

    async def _resync(self, uid: str) -> list[list[Any]]:
        return [[c, s] for c, s in await self.logic.resync_entries(uid)]
