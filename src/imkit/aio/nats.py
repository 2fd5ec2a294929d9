"""NATS backends: the bus on JetStream (:class:`NatsBus`) and request/reply (:class:`NatsService`).

Needs the ``nats`` extra (``pip install imkit[nats]``, nats-py 2.x) and a
``nats-server -js`` >= 2.9 (tested on 2.9.10). ``imkit.aio`` does not import this
module: import it as ``imkit.aio.nats``.

Two jobs, one per direction between logic servers and gateways:

* logic -> gateways: :class:`NatsBus`, an :class:`imkit.bus.Bus` of ``bytes`` on
  JetStream. The stream is the seed's MQ: it stores every envelope (file storage,
  bounded by age, per-gateway count and bytes), so a burst waits on the server's
  disk, not in a process, and a gateway that restarts under the same **durable**
  name receives what was published while it was away.
* gateways -> logic: :class:`NatsService`, request/reply over core NATS with a queue
  group (send, sync, receipts): every logic process serves the same subject in one
  queue group, NATS hands each request to one of them, and any one can die (its
  in-flight requests time out at the caller; the next ones go to the others).

::

    # a gateway
    bus = await NatsBus.connect(url, NatsBusConfig(stream="CHAT_BUS", prefix="chat.bus"))
    sub = await bus.subscribe("gw-7", durable="gw-7")    # resumes after a restart
    async for item in sub:
        if isinstance(item, Lagged):
            resync_every_client()                         # missed item.missed envelopes
        else:
            push(item.payload)
    answer = await svc.request("chat.logic.send", frame, timeout_s=1.0)

    # a logic process (several of them)
    bus.publish_nowait("gw-7", batch)                     # ordered; failures counted
    await svc.serve("chat.logic.send", "logic", handle_send, max_concurrency=256)

Terms
    *subject* (bus): a route key, the gateway id (``"gw-1"``); on the wire it is
    ``{prefix}.{subject}`` (``imkit.bus.gw-1``), one NATS subject per gateway, all
    in one stream bound to ``{prefix}.>``. *sseq*: the stream's sequence number of
    a message. *consumer*: the server-side cursor of one subscription (JetStream
    push consumer, explicit acks, filtered on one subject). *position*: the highest
    sseq this subscription has accounted for (queued, read, dropped or reported
    missed).

The bus contract, as this backend keeps it
    Order: publishes to one subject are stored in the order this process made them
    (awaited and ``publish_nowait`` alike share one ordered pipeline) and every
    subscription reads them in sseq order. A subscription reads each stored
    envelope at most once (redeliveries are recognised by sseq and dropped), and
    never misses one silently: where it misses envelopes it reads one
    :class:`~imkit.bus.Lagged` at the place of the gap, either

    * **local overflow** (exact): the subscription's queue holds ``max_pending``
      envelopes; a delivery that finds it full is dropped, acknowledged at once and
      counted, as :class:`~imkit.bus.Overflow.RESYNC` does in the memory bus, so
      ``read + sum(Lagged.missed) + queued == delivered`` holds exactly; or
    * **stream limits** (an estimate): when a subscription binds (a new subscriber
      of a durable, a consumer re-created, a reconnect) and the stream has already
      removed messages past its position (``first_seq > position + 1``), it reads
      a ``Lagged`` whose ``missed`` is ``first_seq - 1 - position``: an upper
      bound, since the removed messages may have belonged to other subjects. A
      durable that finds its subject holding ``max_msgs_per_subject`` messages
      it has not finished (so the oldest were being discarded: per-subject
      removals leave ``first_seq`` in place) reads ``Lagged(missed=1)``, "at
      least one". Over-reporting costs one resync; under-reporting would lose
      notifications, so the checks err that way. While a subscription is bound
      and connected its consumer is never far behind (it acknowledges what it
      drops), so the stream does not remove what it has not seen.

When an envelope is acknowledged
    When :meth:`NatsSubscription.next` hands it to the reader: the ack is queued
    before ``next`` returns and sent by the bus's ack task in the same loop
    iteration (an ack is a fire-and-forget core NATS publish). A process that dies
    with envelopes still queued has not acknowledged them, and the next subscriber
    of the same durable receives them again (at least once across processes,
    at most once within one subscription). A dropped envelope (overflow) is
    acknowledged at once: it is reported as missed, not redelivered.

Recovery
    A subscription watches its consumer. A gap in the consumer's delivery
    sequence (a delivery lost in flight, e.g. across a reconnect), a heartbeat
    announcing deliveries that never arrived, or a consumer that vanished (an
    ephemeral consumer after a server restart) makes it re-create the consumer at
    its own position, so delivery resumes in order at once instead of after
    ``ack_wait``. An idle consumer sends a heartbeat every ``idle_heartbeat_s``;
    two silent intervals while connected make the subscription ask the server
    about its consumer. Re-creating a durable is a delete then a create: if the
    server fails between the two, the subscription retries with backoff from the
    position it holds in memory (a process that also dies in that window loses
    the durable's position: its successor starts from new messages).

What ``PublishResult`` means here
    ``publish`` returns ``PublishResult(delivered=1, lagged=0)`` once the stream
    stored the envelope (JetStream's PubAck): **delivered counts the stream, not
    subscribers** (JetStream does not know who will read it; a gateway that is
    down reads it when it comes back, within the limits). ``publish_nowait``
    returns the same as soon as the publish is *scheduled*; its outcome comes
    later (failures are counted, logged, and reported by :meth:`NatsBus.flush`).
    After :meth:`NatsBus.aclose` both return ``delivered=0`` (nobody took it), as
    :class:`~imkit.aio.bus.MemoryBus` does. So ``delivered == 0`` means "refused
    by a closed bus", never "no gateway subscribed".

Costs
    ``publish``: one PUB, one PubAck (a round trip to the server; ~0.3 ms on
    loopback), no task per call. ``publish_nowait``: O(1), a deque append; one
    sender task drains the deque while it is non-empty, so the PUB leaves one
    loop iteration later. A delivery: one callback (parse the ack subject, one
    dict insert), O(1); ``next``: O(1) plus one ack PUB. ``subscribe``: 2
    JetStream API round trips (stream info, consumer create); resuming a durable
    3 (consumer info, then an update) or 4 (a delete and a create, when the
    previous subscriber left unacknowledged envelopes). One watchdog task per
    subscription wakes every ``2 * idle_heartbeat_s``.
    :class:`NatsService.request`: one round trip; a server runs at most
    ``max_concurrency`` handlers at once and holds ``max_queued`` more.
    Figures: benchmarks/bench_nats.py.

Failures
    Client and connection errors are raised as :class:`~imkit.errors.BackendError`
    with the cause chained: :class:`RequestTimeout` (also a ``TimeoutError``) when
    no answer came in time (for a publish: the outcome is unknown, the envelope
    may still be stored), :class:`NoResponders` when nothing listens (no stream on
    the subject, no server in the queue group), :class:`ServiceError` when a
    service answered with an error (its handler raised: ``code="failed"``; it was
    full: :class:`ServiceBusy`). A closed bus or service raises
    :class:`~imkit.errors.StateError` on ``subscribe`` / ``serve``.

Left out: wildcard subscriptions, queue (shared) consumers on the bus, clustered
streams beyond passing ``replicas``, message deduplication ids (``Nats-Msg-Id``),
and retries: a failed publish is the caller's to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final

import attrs

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription as CoreSubscription
    from nats.js import api
    from nats.js.manager import JetStreamManager
except ImportError as exc:  # pragma: no cover - the extra is installed in the dev venv
    raise ImportError("imkit.aio.nats needs nats-py: pip install 'imkit[nats]'") from exc

from imkit.bus import DEFAULT_MAX_PENDING, Envelope, Lagged, Overflow, PublishResult
from imkit.errors import BackendError, CapacityError, ConfigError, StateError
from imkit.policy import _int_field
from imkit.session._common import Counters

__all__ = [
    "DEFAULT_NATS_ACK_WAIT_S",
    "DEFAULT_NATS_API_TIMEOUT_S",
    "DEFAULT_NATS_CONNECT_TIMEOUT_S",
    "DEFAULT_NATS_DRAIN_TIMEOUT_S",
    "DEFAULT_NATS_EPHEMERAL_INACTIVE_S",
    "DEFAULT_NATS_IDLE_HEARTBEAT_S",
    "DEFAULT_NATS_MAX_AGE_S",
    "DEFAULT_NATS_MAX_BYTES",
    "DEFAULT_NATS_MAX_CONCURRENCY",
    "DEFAULT_NATS_MAX_MSGS_PER_SUBJECT",
    "DEFAULT_NATS_MAX_MSG_SIZE",
    "DEFAULT_NATS_MAX_PUBLISHES_IN_FLIGHT",
    "DEFAULT_NATS_MAX_QUEUED_REQUESTS",
    "DEFAULT_NATS_PREFIX",
    "DEFAULT_NATS_PUBLISH_TIMEOUT_S",
    "DEFAULT_NATS_RECONNECT_WAIT_S",
    "DEFAULT_NATS_REQUEST_TIMEOUT_S",
    "DEFAULT_NATS_STREAM",
    "NatsBus",
    "NatsBusConfig",
    "NatsBusStats",
    "NatsService",
    "NatsSubscription",
    "NoResponders",
    "PublishError",
    "RequestTimeout",
    "ServiceBusy",
    "ServiceError",
    "ServiceServer",
    "ServiceStats",
    "SubscriptionStats",
]

logger = logging.getLogger("imkit.aio.nats")

# -- limits ------------------------------------------------------------------------

#: The stream every bus subject lives in.
DEFAULT_NATS_STREAM: Final = "IMKIT_BUS"
#: Bus subject ``gw-1`` is NATS subject ``imkit.bus.gw-1``; the stream binds ``imkit.bus.>``.
DEFAULT_NATS_PREFIX: Final = "imkit.bus"
#: Envelopes older than 10 minutes are removed. The bus carries notifications of
#: messages already stored; a gateway restart (seconds) or a rolling deploy
#: (minutes) fits in 10 minutes, and a gateway away longer has lost its clients,
#: who sync on reconnect anyway. Durable consumers idle this long go too.
DEFAULT_NATS_MAX_AGE_S: Final = 600.0
#: Envelopes kept per gateway. At the seed's ~10k pushes/s per busy gateway,
#: batched ~10 to an envelope, 100k envelopes are ~100 s of backlog: more than a
#: restart needs, and past it a resync from the store is cheaper than a replay.
DEFAULT_NATS_MAX_MSGS_PER_SUBJECT: Final = 100_000
#: Disk for the whole stream: 1 GiB is ~1M envelopes of 1 KiB, a few minutes of a
#: large cluster's traffic, and bounded whatever the number of gateways.
DEFAULT_NATS_MAX_BYTES: Final = 1 << 30
#: Largest envelope: NATS's own default max_payload (1 MiB).
DEFAULT_NATS_MAX_MSG_SIZE: Final = 1 << 20
#: A PubAck (or any answer) not back in 5 s means the server is gone or stuck:
#: nats.go's and nats-py's default JetStream timeout.
DEFAULT_NATS_PUBLISH_TIMEOUT_S: Final = 5.0
#: Publishes scheduled or awaiting their PubAck, per bus: nats-py's own
#: publish_async bound (4000), rounded. At ~0.2 ms per PubAck a healthy server
#: keeps a few dozen in flight; 4096 x 1 KiB bounds what an outage holds in memory.
DEFAULT_NATS_MAX_PUBLISHES_IN_FLIGHT: Final = 4096
#: JetStream API calls (stream and consumer info, create, delete).
DEFAULT_NATS_API_TIMEOUT_S: Final = 5.0
#: JetStream's default ack wait. Recovery does not wait for it (a subscription
#: re-creates its consumer on a gap); it only re-sends an ack that was lost.
DEFAULT_NATS_ACK_WAIT_S: Final = 30.0
#: An idle consumer sends a ~100-byte heartbeat every 2 s; two silent intervals
#: (4 s) make the subscription check its consumer, under the clients' own sync
#: retry (10 s).
DEFAULT_NATS_IDLE_HEARTBEAT_S: Final = 2.0
#: An ephemeral consumer with no subscriber is removed by the server after 30 s:
#: long enough to ride out a reconnect, short enough not to pile up.
DEFAULT_NATS_EPHEMERAL_INACTIVE_S: Final = 30.0
#: Connection attempts while the server is away, one per second (nats.go waits 2 s;
#: a restarted server on a LAN is back in about a second).
DEFAULT_NATS_RECONNECT_WAIT_S: Final = 1.0
#: First connection attempt.
DEFAULT_NATS_CONNECT_TIMEOUT_S: Final = 2.0
#: A gateway's request to logic (a send, a sync): half the client's first send
#: retry (2 s), so the gateway can answer the client before the client resends.
DEFAULT_NATS_REQUEST_TIMEOUT_S: Final = 1.0
#: Handlers one service server runs at once. A handler mostly awaits the store; 256
#: concurrent store calls already fill a ThreadedStore worker for tens of ms.
DEFAULT_NATS_MAX_CONCURRENCY: Final = 256
#: Requests a server holds while all its handlers are busy; past them it answers
#: ``busy`` at once (the caller may retry: the queue group may pick another server).
#: 1024 waiting behind 256 running is a few store-latencies of backlog.
DEFAULT_NATS_MAX_QUEUED_REQUESTS: Final = 1024
#: ``ServiceServer.aclose`` waits this long for running and queued handlers.
DEFAULT_NATS_DRAIN_TIMEOUT_S: Final = 5.0

_ACK: Final = b"+ACK"
_STATUS: Final = "Status"
_NO_RESPONDERS: Final = "503"
_CONTROL: Final = "100"
_LAST_CONSUMER: Final = "Nats-Last-Consumer"
_ERROR_HEADER: Final = "Imkit-Error"
_TIMEOUT_HEADER: Final = "Imkit-Timeout-Ms"
#: an error reply's codes (the caller learns what went wrong, never how)
_FAILED: Final = "failed"
_BUSY: Final = "busy"
#: a SUB reaches the server within this (one PING/PONG), or serve fails
_SUBSCRIBE_FLUSH_S: Final = 5
#: JetStream's default duplicate window (capped at max_age)
_DUPLICATE_WINDOW_S: Final = 120.0
#: backoff between attempts to re-create a consumer, doubling up to this
_MAX_RETRY_S: Final = 30.0
#: at most one "background publish failed" log line per this many seconds
_LOG_INTERVAL_S: Final = 1.0

_TOKEN = r"[^\s.*>]+"
_SUBJECT_RE: Final = re.compile(rf"{_TOKEN}(?:\.{_TOKEN})*")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,200}")

# -- errors ------------------------------------------------------------------------


class NoResponders(BackendError):
    """Nothing listens on ``subject``: no stream binds it, or no server serves it."""

    def __init__(self, subject: str) -> None:
        super().__init__(subject)
        self.subject = subject

    def __str__(self) -> str:
        return f"no responders on {self.subject!r}"


class RequestTimeout(BackendError, TimeoutError):
    """No answer on ``subject`` within ``timeout_s``; what the other side did is unknown."""

    def __init__(self, subject: str, timeout_s: float) -> None:
        super().__init__(subject, timeout_s)
        self.subject = subject
        self.timeout_s = timeout_s

    def __str__(self) -> str:
        return f"no answer on {self.subject!r} within {self.timeout_s:g} s"


class ServiceError(BackendError):
    """The service on ``subject`` answered with an error ``code`` (``"failed"``: its handler
    raised; the details stay in the server's log)."""

    def __init__(self, subject: str, code: str) -> None:
        super().__init__(subject, code)
        self.subject = subject
        self.code = code

    def __str__(self) -> str:
        return f"the service on {self.subject!r} answered {self.code!r}"


class ServiceBusy(ServiceError):
    """The server that got the request was running and holding all it may; retry later."""

    def __init__(self, subject: str) -> None:
        super().__init__(subject, _BUSY)


class PublishError(BackendError):
    """``failed`` background publishes (``publish_nowait``) failed since the last flush."""

    def __init__(self, failed: int) -> None:
        super().__init__(failed)
        self.failed = failed

    def __str__(self) -> str:
        return f"{self.failed} background publishes failed since the last flush"


def _wrap(what: str, exc: BaseException) -> BackendError:
    """A client or connection error as a BackendError (the caller chains ``exc``)."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, nats.errors.NoRespondersError | nats.js.errors.ServiceUnavailableError):
        return NoResponders(what)
    return BackendError(f"nats {what} failed: {exc!r}")


# -- config ------------------------------------------------------------------------


def _seconds(*, zero: bool = False) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """An attrs validator: a finite number of seconds > 0 (or >= 0 with ``zero``)."""

    def check(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        ok = type(value) in (int, float) and math.isfinite(value)
        if not ok or value < 0 or (value == 0 and not zero):
            bound = ">= 0" if zero else "> 0"
            raise ConfigError(
                f"{attribute.name} must be a number of seconds {bound}, got {value!r}"
            )

    return check


def _optional_seconds(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _seconds(zero=True)(instance, attribute, value)


def _matches(
    pattern: re.Pattern[str], what: str
) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise ConfigError(f"{attribute.name} must be {what}, got {value!r}")

    return check


_name = _matches(_NAME_RE, "1-200 letters, digits, '-' or '_'")
_at_least_0 = _int_field(0)
_at_least_1 = _int_field(1)


@attrs.frozen(kw_only=True)
class NatsBusConfig:
    """The stream a :class:`NatsBus` creates or updates, and the bus's own limits.

    Each field defaults to the ``DEFAULT_NATS_*`` constant of the same meaning; a
    wrong type or range raises :class:`~imkit.errors.ConfigError` naming the field.
    Stream limits of 0 mean "no limit". O(1) to build.

    >>> NatsBusConfig(stream="CHAT", max_age_s=60).max_age_s
    60
    >>> NatsBusConfig(prefix="a.*")
    Traceback (most recent call last):
    ...
    imkit.errors.ConfigError: prefix must be dot-separated tokens without wildcards, got 'a.*'
    """

    stream: str = attrs.field(default=DEFAULT_NATS_STREAM, validator=_name)
    prefix: str = attrs.field(
        default=DEFAULT_NATS_PREFIX,
        validator=_matches(_SUBJECT_RE, "dot-separated tokens without wildcards"),
    )
    #: stream limits (0: none): age, envelopes per subject, bytes, one envelope
    max_age_s: float = attrs.field(default=DEFAULT_NATS_MAX_AGE_S, validator=_seconds(zero=True))
    max_msgs_per_subject: int = attrs.field(
        default=DEFAULT_NATS_MAX_MSGS_PER_SUBJECT, validator=_at_least_0
    )
    max_bytes: int = attrs.field(default=DEFAULT_NATS_MAX_BYTES, validator=_at_least_0)
    max_msg_size: int = attrs.field(default=DEFAULT_NATS_MAX_MSG_SIZE, validator=_at_least_1)
    #: stream replicas (a clustered server; 1 on a single server)
    replicas: int = attrs.field(default=1, validator=_int_field(1, 5))
    publish_timeout_s: float = attrs.field(
        default=DEFAULT_NATS_PUBLISH_TIMEOUT_S, validator=_seconds()
    )
    #: publishes scheduled or awaiting a PubAck; past it a publish raises CapacityError
    max_publishes_in_flight: int = attrs.field(
        default=DEFAULT_NATS_MAX_PUBLISHES_IN_FLIGHT, validator=_at_least_1
    )
    api_timeout_s: float = attrs.field(default=DEFAULT_NATS_API_TIMEOUT_S, validator=_seconds())
    ack_wait_s: float = attrs.field(default=DEFAULT_NATS_ACK_WAIT_S, validator=_seconds())
    idle_heartbeat_s: float = attrs.field(
        default=DEFAULT_NATS_IDLE_HEARTBEAT_S, validator=_seconds()
    )
    ephemeral_inactive_s: float = attrs.field(
        default=DEFAULT_NATS_EPHEMERAL_INACTIVE_S, validator=_seconds()
    )
    #: a durable with no subscriber for this long is removed by the server; None:
    #: ``max_age_s`` (by then everything it would resume has aged out), 0: never
    durable_inactive_s: float | None = attrs.field(default=None, validator=_optional_seconds)

    @property
    def durable_expiry_s(self) -> float | None:
        """The inactive threshold given to durable consumers (None: kept until deleted)."""
        value = self.max_age_s if self.durable_inactive_s is None else self.durable_inactive_s
        return value or None


def _limit(value: int) -> int:
    return value if value > 0 else -1


def _stream_config(config: NatsBusConfig) -> api.StreamConfig:
    return api.StreamConfig(
        name=config.stream,
        subjects=[f"{config.prefix}.>"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        discard=api.DiscardPolicy.OLD,
        max_age=config.max_age_s,
        max_msgs_per_subject=_limit(config.max_msgs_per_subject),
        max_bytes=_limit(config.max_bytes),
        max_msg_size=config.max_msg_size,
        num_replicas=config.replicas,
        # no Nats-Msg-Id is sent; the server's 2-minute default must not exceed max_age
        duplicate_window=min(_DUPLICATE_WINDOW_S, config.max_age_s or _DUPLICATE_WINDOW_S),
    )


def _differs(have: api.StreamConfig, want: api.StreamConfig) -> bool:
    """True when the stream's limits are not the ones this bus asks for."""
    fields = ("subjects", "max_msgs_per_subject", "max_bytes", "max_msg_size", "num_replicas")
    if any(getattr(have, f) != getattr(want, f) for f in fields):
        return True
    return not math.isclose(have.max_age or 0.0, want.max_age or 0.0, abs_tol=1e-6)


async def _connect(
    servers: str | Sequence[str],
    name: str | None,
    connect_timeout_s: float,
    reconnect_wait_s: float,
) -> Client:
    async def on_error(exc: Exception) -> None:
        logger.debug("nats client error: %r", exc)

    try:
        nc = await nats.connect(
            servers if isinstance(servers, str) else list(servers),
            name=name,
            connect_timeout=connect_timeout_s,
            reconnect_time_wait=reconnect_wait_s,
            max_reconnect_attempts=1,  # the first connect gives up (two tries per server)
            error_cb=on_error,
        )
    except (nats.errors.Error, OSError) as exc:
        raise BackendError(f"cannot connect to NATS at {servers!r}: {exc!r}") from exc
    nc.options["max_reconnect_attempts"] = -1  # once connected, outlive server restarts
    return nc


# -- stats -------------------------------------------------------------------------


class NatsBusStats(Counters):
    """Counters of a :class:`NatsBus` (publishing side)."""

    __slots__ = ("ack_errors", "nowait_failed", "publish_failed", "published")

    #: envelopes the stream confirmed (PubAck)
    published: int
    #: publishes that failed (timeout, refused, connection), awaited or not
    publish_failed: int
    #: of those, scheduled by publish_nowait (also logged)
    nowait_failed: int
    #: acknowledgements that could not be sent (the server redelivers; dropped by sseq)
    ack_errors: int


class SubscriptionStats(Counters):
    """Counters of a :class:`NatsSubscription`."""

    __slots__ = ("dropped", "duplicates", "limit_gaps", "read", "received", "resets")

    #: new deliveries (each sseq once)
    received: int
    #: envelopes handed to the reader
    read: int
    #: deliveries dropped because the queue was full (reported as Lagged)
    dropped: int
    #: redeliveries of an sseq already accounted for (not read twice)
    duplicates: int
    #: Lagged markers for messages the stream's limits removed unseen
    limit_gaps: int
    #: consumers re-created after a gap, a lost consumer, or a reconnect
    resets: int


class ServiceStats(Counters):
    """Counters of a :class:`ServiceServer`."""

    __slots__ = ("busy", "expired", "failed", "handled", "no_reply")

    #: requests answered by the handler
    handled: int
    #: requests whose handler raised (answered ``failed``)
    failed: int
    #: requests refused because running and queued were full (answered ``busy``)
    busy: int
    #: queued requests dropped unanswered because their caller had given up
    expired: int
    #: messages without a reply subject (ignored)
    no_reply: int


# -- the bus: publishing -----------------------------------------------------------


class _Publish:
    """One publish in the ordered pipeline: scheduled, then sent and awaiting its PubAck."""

    __slots__ = ("deadline", "future", "payload", "subject", "token")

    def __init__(
        self, token: int, subject: str, payload: bytes, future: asyncio.Future[None] | None
    ) -> None:
        self.token = token
        self.subject = subject
        self.payload = payload
        self.future = future  # None: publish_nowait (nobody awaits it)
        self.deadline = 0.0


class NatsBus:
    """An :class:`imkit.bus.Bus` of ``bytes`` on a JetStream stream (see the module doc).

    Build it with :meth:`connect` (a connection of its own) or :meth:`from_client`
    (share a nats-py client; the bus never closes it). Both create the stream
    ``config.stream`` on ``{config.prefix}.>`` or update its limits.

    ``publish`` awaits the PubAck: one round trip, O(1) here. ``publish_nowait``
    O(1). ``subscribe`` 2-4 JetStream API round trips. Memory: at most
    ``max_publishes_in_flight`` payloads held for publishing, and ``max_pending``
    envelopes per subscription. One event loop: use the bus from the loop it was
    built on.

    >>> import asyncio
    >>> async def demo() -> bytes:  # doctest: +SKIP
    ...     bus = await NatsBus.connect("nats://127.0.0.1:4222")
    ...     sub = await bus.subscribe("gw-1", durable="gw-1")
    ...     await bus.publish("gw-1", b"hello")
    ...     item = await sub.next()
    ...     await bus.aclose()
    ...     return item.payload  # type: ignore[union-attr]
    """

    def __init__(self, nc: Client, config: NatsBusConfig, *, owns_client: bool) -> None:
        """Use :meth:`connect` or :meth:`from_client` (they also prepare the stream)."""
        self._nc = nc
        self.config = config
        self._owns_client = owns_client
        self._jsm: JetStreamManager = nc.jsm(timeout=config.api_timeout_s)
        self.stats = NatsBusStats()
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._subs: set[NatsSubscription] = set()
        # the ordered publish pipeline
        self._tokens = itertools.count(1)
        self._last_token = 0
        self._outbox: deque[_Publish] = deque()  # scheduled, not yet given to the client
        self._inflight: dict[int, _Publish] = {}  # sent, awaiting a PubAck (send order)
        self._sender: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._flushers: list[tuple[int, asyncio.Future[None]]] = []
        self._failed_since_flush = 0
        self._last_failure: BaseException | None = None
        self._suppressed = 0
        self._last_log = -math.inf
        self._reply_prefix = nc.new_inbox() + "."
        self._reply_sub: CoreSubscription | None = None
        # acknowledgements of deliveries, sent by one task in the loop iteration
        self._acks: list[str] = []
        self._acker: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        config: NatsBusConfig | None = None,
        *,
        name: str | None = None,
        connect_timeout_s: float = DEFAULT_NATS_CONNECT_TIMEOUT_S,
        reconnect_wait_s: float = DEFAULT_NATS_RECONNECT_WAIT_S,
    ) -> NatsBus:
        """Connect to ``servers`` (reconnecting forever), prepare the stream, return the bus.

        Raises :class:`~imkit.errors.BackendError` if no server answers or the
        stream cannot be created, :class:`~imkit.errors.ConfigError` for bad limits.
        """
        config = config if config is not None else NatsBusConfig()
        nc = await _connect(servers, name, connect_timeout_s, reconnect_wait_s)
        try:
            bus = cls(nc, config, owns_client=True)
            await bus._start()
        except BaseException:
            await nc.close()
            raise
        return bus

    @classmethod
    async def from_client(cls, nc: Client, config: NatsBusConfig | None = None) -> NatsBus:
        """A bus on an existing connected nats-py client (left open by :meth:`aclose`)."""
        bus = cls(nc, config if config is not None else NatsBusConfig(), owns_client=False)
        await bus._start()
        return bus

    async def _start(self) -> None:
        want = _stream_config(self.config)
        name = self.config.stream
        try:
            try:
                info = await self._jsm.stream_info(name)
            except nats.js.errors.NotFoundError:
                try:
                    await self._jsm.add_stream(want)
                    info = None
                except nats.js.errors.BadRequestError:  # created meanwhile by another process
                    info = await self._jsm.stream_info(name)
            if info is not None and _differs(info.config, want):
                await self._jsm.update_stream(
                    info.config.evolve(
                        subjects=want.subjects,
                        max_age=want.max_age,
                        max_msgs_per_subject=want.max_msgs_per_subject,
                        max_bytes=want.max_bytes,
                        max_msg_size=want.max_msg_size,
                        num_replicas=want.num_replicas,
                        duplicate_window=want.duplicate_window,
                    )
                )
            self._reply_sub = await self._nc.subscribe(
                self._reply_prefix + "*", cb=self._on_puback, pending_msgs_limit=-1
            )
        except (nats.errors.Error, OSError) as exc:
            raise _wrap(f"stream setup of {name!r}", exc) from exc

    @property
    def client(self) -> Client:
        """The nats-py client this bus uses."""
        return self._nc

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called."""
        return self._closed

    @property
    def in_flight(self) -> int:
        """Publishes scheduled or awaiting their PubAck. O(1)."""
        return len(self._outbox) + len(self._inflight)

    def nats_subject(self, subject: str) -> str:
        """The NATS subject of bus subject ``subject`` (``{prefix}.{subject}``). O(len).

        Raises :class:`~imkit.errors.ConfigError` unless ``subject`` is one or more
        dot-separated tokens without spaces or wildcards.
        """
        if not isinstance(subject, str) or not _SUBJECT_RE.fullmatch(subject):
            raise ConfigError(
                f"subject must be dot-separated tokens without spaces or wildcards, got {subject!r}"
            )
        return f"{self.config.prefix}.{subject}"

    # -- publish -------------------------------------------------------------------

    def _schedule(self, subject: str, payload: bytes, awaited: bool) -> _Publish:
        nsubject = self.nats_subject(subject)
        size = len(payload)
        if size > self.config.max_msg_size:
            raise CapacityError("max_msg_size", self.config.max_msg_size, f"{size} bytes")
        if size > self._nc.max_payload:
            raise CapacityError("max_payload", self._nc.max_payload, f"{size} bytes")
        limit = self.config.max_publishes_in_flight
        if len(self._outbox) + len(self._inflight) >= limit:
            raise CapacityError("max_publishes_in_flight", limit)
        future = self._loop.create_future() if awaited else None
        token = self._last_token = next(self._tokens)
        return _Publish(token, nsubject, payload, future)

    async def publish(self, subject: str, payload: bytes) -> PublishResult:
        """Store ``payload`` in the stream under ``subject``; wait for the PubAck.

        Returns ``PublishResult(delivered=1, lagged=0)`` once stored (delivered
        counts the stream, not subscribers) and ``delivered=0`` on a closed bus.
        Raises :class:`RequestTimeout` after ``publish_timeout_s`` without a PubAck
        (outcome unknown), :class:`NoResponders` if no stream binds the subject,
        :class:`~imkit.errors.BackendError` on any other failure,
        :class:`~imkit.errors.CapacityError` for an envelope over ``max_msg_size``
        or past ``max_publishes_in_flight``, ConfigError for a bad subject.
        Ordered with every earlier ``publish`` and ``publish_nowait`` of this bus.
        One round trip.
        """
        if self._closed:
            return PublishResult(delivered=0, lagged=0)
        p = self._schedule(subject, payload, True)
        assert p.future is not None
        if self._outbox:  # behind earlier publish_nowait calls: keep the order
            self._outbox.append(p)
            self._kick_sender()
        else:
            await self._send(p)
        await p.future
        return PublishResult(delivered=1, lagged=0)

    def publish_nowait(self, subject: str, payload: bytes) -> PublishResult:
        """Schedule a publish and return at once (for synchronous callers). O(1).

        Publishes go out in call order, interleaved in order with awaited ones. At
        most ``max_publishes_in_flight`` may be scheduled or awaiting a PubAck: past
        it this raises :class:`~imkit.errors.CapacityError` (nothing scheduled).
        A failure later is counted (``stats.nowait_failed``), logged (at most once
        a second) and reported by the next :meth:`flush`. Returns
        ``PublishResult(delivered=1, lagged=0)`` once scheduled, ``delivered=0``
        on a closed bus.
        """
        if self._closed:
            return PublishResult(delivered=0, lagged=0)
        self._outbox.append(self._schedule(subject, payload, False))
        self._kick_sender()
        return PublishResult(delivered=1, lagged=0)

    async def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every publish scheduled before this call is stored or has failed.

        Then raises :class:`PublishError` (cause: the last failure) if background
        publishes failed since the previous flush, so no failure goes unreported.
        Raises :class:`RequestTimeout` if they are not all settled within
        ``timeout_s`` (None: ``publish_timeout_s`` plus a second, by when every one
        has either its PubAck or its timeout).
        """
        target = self._last_token
        if self._oldest_open() <= target:
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._flushers.append((target, waiter))
            wait_s = self.config.publish_timeout_s + 1.0 if timeout_s is None else timeout_s
            try:
                await asyncio.wait_for(waiter, wait_s)
            except TimeoutError as exc:
                raise RequestTimeout("flush", wait_s) from exc
        failed, self._failed_since_flush = self._failed_since_flush, 0
        if failed:
            raise PublishError(failed) from self._last_failure

    def _kick_sender(self) -> None:
        if self._sender is None:
            self._sender = self._loop.create_task(self._drain_outbox())

    async def _drain_outbox(self) -> None:
        try:
            outbox = self._outbox
            while outbox:
                await self._send(outbox.popleft())
        finally:
            self._sender = None

    async def _send(self, p: _Publish) -> None:
        """Hand ``p`` to the client (its PUB is queued before this first yields)."""
        p.deadline = self._loop.time() + self.config.publish_timeout_s
        self._inflight[p.token] = p
        if self._timer is None:
            self._timer = self._loop.call_at(p.deadline, self._expire)
        try:
            await self._nc.publish(p.subject, p.payload, reply=self._reply_prefix + str(p.token))
        except (nats.errors.Error, OSError) as exc:
            if self._inflight.pop(p.token, None) is not None:
                error = _wrap(f"publish to {p.subject!r}", exc)
                error.__cause__ = exc
                self._settle(p, error)

    async def _on_puback(self, msg: Msg) -> None:
        try:
            token = int(msg.subject[len(self._reply_prefix) :])
        except ValueError:
            return
        p = self._inflight.pop(token, None)
        if p is None:  # late: it timed out already
            return
        error: BackendError | None = None
        headers = msg.headers
        if headers is not None and headers.get(_STATUS) == _NO_RESPONDERS:
            error = NoResponders(p.subject)
        elif b'"error"' in msg.data:
            try:
                detail = json.loads(msg.data)["error"]
                text = f"{detail.get('description')} (err_code {detail.get('err_code')})"
            except (ValueError, KeyError, TypeError, AttributeError):
                text = repr(msg.data[:200])
            error = BackendError(f"JetStream refused the publish to {p.subject!r}: {text}")
        self._settle(p, error)

    def _expire(self) -> None:
        """Fail the publishes whose PubAck is overdue (the oldest first); re-arm."""
        self._timer = None
        now = self._loop.time()
        inflight = self._inflight
        while inflight:
            p = next(iter(inflight.values()))
            if p.deadline > now:
                self._timer = self._loop.call_at(p.deadline, self._expire)
                break
            del inflight[p.token]
            self._settle(p, RequestTimeout(p.subject, self.config.publish_timeout_s))

    def _settle(self, p: _Publish, error: BackendError | None) -> None:
        future = p.future
        if error is None:
            self.stats.published += 1
            if future is not None and not future.done():
                future.set_result(None)
        else:
            self.stats.publish_failed += 1
            if future is not None:
                if not future.done():
                    future.set_exception(error)
            else:
                self.stats.nowait_failed += 1
                self._failed_since_flush += 1
                self._last_failure = error
                self._log_failure(error)
        if self._flushers:
            oldest = self._oldest_open()
            if any(target < oldest for target, _ in self._flushers):
                keep = []
                for target, waiter in self._flushers:
                    if target < oldest:
                        if not waiter.done():
                            waiter.set_result(None)
                    else:
                        keep.append((target, waiter))
                self._flushers = keep

    def _oldest_open(self) -> int:
        """The token of the oldest publish not settled yet (infinite-ish when none)."""
        oldest = self._last_token + 1
        if self._inflight:
            oldest = min(oldest, next(iter(self._inflight)))
        if self._outbox:
            oldest = min(oldest, self._outbox[0].token)
        return oldest

    def _log_failure(self, error: BackendError) -> None:
        now = self._loop.time()
        if now - self._last_log < _LOG_INTERVAL_S:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
        logger.warning("background publish failed: %s%s", error, more)
        self._last_log = now
        self._suppressed = 0

    # -- acknowledgements -------------------------------------------------------------

    def _schedule_ack(self, reply: str) -> None:
        self._acks.append(reply)
        if self._acker is None:
            self._acker = self._loop.create_task(self._send_acks())

    async def _flush_acks(self) -> None:
        """Wait until the acks scheduled so far are sent and the server has read them."""
        acker = self._acker
        with contextlib.suppress(TimeoutError, nats.errors.Error, OSError):
            if acker is not None:
                await asyncio.wait_for(asyncio.shield(acker), self.config.api_timeout_s)
            await self._nc.flush(max(1, int(self.config.api_timeout_s)))

    async def _send_acks(self) -> None:
        try:
            while self._acks:
                acks, self._acks = self._acks, []
                for reply in acks:
                    try:
                        await self._nc.publish(reply, _ACK)
                    except (nats.errors.Error, OSError):
                        self.stats.ack_errors += 1
        finally:
            self._acker = None

    # -- subscribe -----------------------------------------------------------------

    async def subscribe(
        self,
        subject: str,
        *,
        durable: str | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        overflow: Overflow = Overflow.RESYNC,
    ) -> NatsSubscription:
        """A subscription to ``subject``: envelopes published from now on, in order.

        With ``durable`` (a name: letters, digits, ``-``, ``_``) the consumer
        outlives the subscription: a later subscriber with the same name starts
        where this one stopped (envelopes it had queued but not read come again),
        within the stream's limits (a gap is read as Lagged). Without, an
        ephemeral consumer from new messages, deleted by :meth:`NatsSubscription.aclose`.

        ``max_pending`` bounds the local queue; a delivery that finds it full is
        dropped and acknowledged, and read as Lagged (RESYNC).
        :attr:`~imkit.bus.Overflow.REJECT` is refused with ConfigError: a
        JetStream publisher cannot see a subscriber's queue.

        Raises :class:`~imkit.errors.StateError` on a closed bus, or when a
        subscriber is already bound to ``durable``; ConfigError for a bad subject,
        name or limit, or a durable filtered on another subject;
        :class:`~imkit.errors.BackendError` if the server cannot be reached.
        2 JetStream API round trips (3 or 4 to resume a durable).
        """
        if self._closed:
            raise StateError("the bus is closed")
        nsubject = self.nats_subject(subject)
        if type(max_pending) is not int or max_pending < 1:
            raise ConfigError(f"max_pending must be an int >= 1, got {max_pending!r}")
        if overflow is not Overflow.RESYNC:
            raise ConfigError(
                f"NatsBus supports Overflow.RESYNC only, got {overflow!r}: a JetStream "
                "publisher cannot see a subscriber's queue"
            )
        if durable is not None and (
            not isinstance(durable, str) or not _NAME_RE.fullmatch(durable)
        ):
            raise ConfigError(f"durable must be 1-200 letters, digits, '-' or '_', got {durable!r}")
        sub = NatsSubscription(self, subject, nsubject, durable, max_pending)
        try:
            await sub._open()
        except BaseException:
            await sub.aclose()
            raise
        if self._closed:  # closed while subscribing
            await sub.aclose()
            raise StateError("the bus is closed")
        self._subs.add(sub)
        return sub

    async def delete_durable(self, durable: str) -> bool:
        """Remove the durable consumer ``durable`` for good; True if it existed.

        A subscription of this bus bound to it is closed first. One round trip.
        Raises :class:`~imkit.errors.BackendError` if the server cannot be reached.
        """
        if not isinstance(durable, str) or not _NAME_RE.fullmatch(durable):
            raise ConfigError(f"durable must be 1-200 letters, digits, '-' or '_', got {durable!r}")
        for sub in [s for s in self._subs if s.durable == durable]:
            await sub.aclose()
        try:
            return bool(await self._jsm.delete_consumer(self.config.stream, durable))
        except nats.js.errors.NotFoundError:
            return False
        except (nats.errors.Error, OSError) as exc:
            raise _wrap(f"delete of durable {durable!r}", exc) from exc

    async def aclose(self) -> None:
        """Close every subscription, settle what is in flight, release the connection.

        Publishes still in flight get up to ``publish_timeout_s`` to be confirmed
        (failures are counted and logged as usual); later publishes return
        ``delivered=0``, and ``subscribe`` raises StateError. A connection made by
        :meth:`connect` is closed; one given to :meth:`from_client` is left open.
        Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            await sub.aclose()
        self._subs.clear()
        with contextlib.suppress(BackendError):
            await self.flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._nc.is_connected:
            await self._flush_acks()  # acks of what was read go out before closing
        for task in (self._sender, self._acker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        left = [*self._inflight.values(), *self._outbox]  # the flush timed out: failed
        self._inflight.clear()
        self._outbox.clear()
        for p in left:
            self._settle(p, RequestTimeout(p.subject, self.config.publish_timeout_s))
        if self._reply_sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._reply_sub.unsubscribe()
        if self._owns_client:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._nc.close()


# -- the bus: subscriptions ----------------------------------------------------------


class _Delivery:
    """A queued envelope: its sseq, payload and the reply subject that acknowledges it."""

    __slots__ = ("payload", "reply", "sseq")

    def __init__(self, sseq: int, payload: bytes, reply: str) -> None:
        self.sseq = sseq
        self.payload = payload
        self.reply = reply


class _Queue:
    """A bounded FIFO of deliveries with in-band gap markers (like :class:`imkit.bus.Inbox`).

    ``offer`` O(1): queue the delivery, or count it as missed when ``max_pending``
    are queued. ``miss(n)`` counts n more missed at the tail. ``pop`` O(1): the
    next delivery, or a :class:`~imkit.bus.Lagged` marker standing where envelopes
    were missed (a marker is queued right before the next delivery that fits, or
    returned from the counter when nothing else is left).
    """

    __slots__ = ("_items", "_missed", "envelopes", "max_pending", "subject")

    def __init__(self, subject: str, max_pending: int) -> None:
        self.subject = subject
        self.max_pending = max_pending
        self._items: deque[_Delivery | Lagged] = deque()
        self.envelopes = 0
        self._missed = 0

    def offer(self, delivery: _Delivery) -> bool:
        if self.envelopes >= self.max_pending:
            self._missed += 1
            return False
        if self._missed:
            self._items.append(Lagged(subject=self.subject, missed=self._missed))
            self._missed = 0
        self._items.append(delivery)
        self.envelopes += 1
        return True

    def miss(self, n: int) -> None:
        self._missed += n

    def pop(self) -> _Delivery | Lagged | None:
        items = self._items
        if items:
            item = items.popleft()
            if type(item) is _Delivery:
                self.envelopes -= 1
            return item
        if self._missed:
            missed, self._missed = self._missed, 0
            return Lagged(subject=self.subject, missed=missed)
        return None

    def clear(self) -> None:
        self._items.clear()
        self.envelopes = 0
        self._missed = 0

    def _check(self) -> None:
        """Assert the invariants: counts match, limit held, no marker without a follower."""
        envelopes = sum(1 for item in self._items if type(item) is _Delivery)
        if envelopes != self.envelopes or envelopes > self.max_pending:
            raise AssertionError(f"envelope count {self.envelopes} vs {envelopes} queued")
        previous: object = None
        for item in self._items:
            if type(item) is Lagged and (item.missed <= 0 or type(previous) is Lagged):
                raise AssertionError("an empty marker or two markers in a row")
            previous = item
        if self._items and type(self._items[-1]) is Lagged:
            raise AssertionError("a queued marker must be followed by an envelope")
        if self._missed < 0:
            raise AssertionError("negative missed count")


def _ack_info(reply: str) -> tuple[int, int] | None:
    """(stream seq, consumer seq) from a JetStream ack subject, or None if it is not one.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` (9
    tokens), or the 2.10+ form with domain and account hash first (11-12 tokens).
    """
    tokens = reply.split(".")
    n = len(tokens)
    if n < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        return None
    i = 5 if n == 9 else 7
    try:
        return int(tokens[i]), int(tokens[i + 1])
    except (ValueError, IndexError):
        return None


class NatsSubscription:
    """One subscriber of a :class:`NatsBus`: an async iterator of envelopes and markers.

    Made by :meth:`NatsBus.subscribe`. Holds at most ``max_pending`` envelopes
    (see the module doc for acks, gaps and recovery). ``next`` O(1) when something
    is queued; a delivery O(1); one watchdog task per subscription wakes every
    ``2 * idle_heartbeat_s``.
    """

    def __init__(
        self, bus: NatsBus, subject: str, nsubject: str, durable: str | None, max_pending: int
    ) -> None:
        self._bus = bus
        self._nc = bus._nc
        self._subject = subject
        self._nsubject = nsubject
        self.durable = durable
        self.max_pending = max_pending
        self.stats = SubscriptionStats()
        self._queue = _Queue(subject, max_pending)
        self._queued: dict[int, _Delivery] = {}  # sseq -> delivery still in the queue
        self._pos = 0  # highest sseq accounted for
        self._cseq = 0  # last consumer sequence seen from the current consumer
        self._gen = 0  # consumer generation: deliveries of older ones are ignored
        self._consumer = ""
        self._core: CoreSubscription | None = None
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._activity = False
        self._reset_reason: str | None = None
        self._nudge = asyncio.Event()
        self._watchdog: asyncio.Task[None] | None = None
        self._reconnects = 0

    @property
    def subject(self) -> str:
        """The bus subject (route key) this subscription receives."""
        return self._subject

    @property
    def consumer(self) -> str:
        """The JetStream consumer's name (the durable name, or a generated one)."""
        return self._consumer

    @property
    def closed(self) -> bool:
        """True once closed (by :meth:`aclose` or the bus)."""
        return self._closed

    def __len__(self) -> int:
        """Envelopes queued and not yet read. O(1)."""
        return self._queue.envelopes

    # -- reading -------------------------------------------------------------------

    def get_nowait(self) -> Envelope[bytes] | Lagged | None:
        """The next item if one is queued, else None (also once closed). O(1).

        An envelope returned here is acknowledged (the ack is sent within this loop
        iteration).
        """
        item = self._queue.pop()
        if item is None or type(item) is Lagged:
            return item
        assert type(item) is _Delivery
        self._queued.pop(item.sseq, None)
        self._bus._schedule_ack(item.reply)
        self.stats.read += 1
        return Envelope(subject=self._subject, payload=item.payload)

    async def next(self) -> Envelope[bytes] | Lagged:
        """The next item, waiting for one. Raises StopAsyncIteration once closed. O(1)."""
        while True:
            item = self.get_nowait()
            if item is not None:
                return item
            if self._closed:
                raise StopAsyncIteration
            self._waiter = self._bus._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def __aiter__(self) -> AsyncIterator[Envelope[bytes] | Lagged]:
        """Iterate until closed."""
        return self

    async def __anext__(self) -> Envelope[bytes] | Lagged:
        """Same as :meth:`next`."""
        return await self.next()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- binding a consumer ------------------------------------------------------------

    async def _open(self) -> None:
        """Bind the first consumer: a new one from now, or resume the durable."""
        bus = self._bus
        jsm = bus._jsm
        stream = bus.config.stream
        try:
            info = await jsm.stream_info(stream)
            ci: api.ConsumerInfo | None = None
            if self.durable is not None:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    ci = await jsm.consumer_info(stream, self.durable)
            if ci is None:
                self._pos = info.state.last_seq
                await self._create(self._pos + 1)
            else:
                await self._resume(ci, info.state.first_seq)
        except (nats.errors.Error, OSError) as exc:
            raise _wrap(f"subscribe to {self._nsubject!r}", exc) from exc
        self._reconnects = self._nc.stats["reconnects"]
        self._watchdog = bus._loop.create_task(self._watch())

    async def _resume(self, ci: api.ConsumerInfo, first_seq: int) -> None:
        """Take over an existing durable where its previous subscribers stopped.

        With nothing awaiting an ack, the consumer is kept and only pointed at this
        subscription's inbox (one update; nothing to lose). Otherwise it is deleted
        and created again at its ack floor, so the unacknowledged envelopes come
        first and in order instead of after ``ack_wait``.
        """
        if ci.push_bound:
            raise StateError(f"durable {self.durable!r} already has a subscriber")
        if ci.config.filter_subject != self._nsubject:
            raise ConfigError(
                f"durable {self.durable!r} receives {ci.config.filter_subject!r}, "
                f"not {self._nsubject!r}"
            )
        self._pos = _resume_floor(ci)
        gaps = self.stats.limit_gaps
        self._count_removed(first_seq)
        if self.stats.limit_gaps == gaps and self._saturated(ci):
            self._queue.miss(1)  # before any delivery of the consumer can be queued
            self.stats.limit_gaps += 1
        same_heartbeat = math.isclose(
            ci.config.idle_heartbeat or 0.0, self._bus.config.idle_heartbeat_s, abs_tol=1e-6
        )
        if not ci.num_ack_pending and same_heartbeat and not ci.config.flow_control:
            cseq = ci.delivered.consumer_seq if ci.delivered is not None else 0
            await self._create(self._pos + 1, keep=ci.config, cseq=cseq)
        else:
            assert self.durable is not None
            await self._delete_consumer(self.durable)
            await self._create(self._pos + 1)

    async def _create(
        self, start: int, *, keep: api.ConsumerConfig | None = None, cseq: int = 0
    ) -> api.ConsumerInfo:
        """Subscribe a fresh inbox, then create the consumer delivering to it from ``start``.

        With ``keep`` (an existing durable's config), update that consumer instead:
        new inbox and limits, same position (its start cannot change), and its
        delivery sequence goes on from ``cseq``.
        """
        bus = self._bus
        config = bus.config
        self._gen += 1
        gen = self._gen
        deliver = self._nc.new_inbox()

        async def on_msg(msg: Msg) -> None:
            if self._gen == gen and self._reset_reason is None:
                await self._on_msg(msg)

        name = self.durable or f"imkit_{deliver.rsplit('.', 1)[-1]}"
        core = await self._nc.subscribe(
            deliver, cb=on_msg, pending_msgs_limit=4 * self.max_pending + 64
        )
        self._core = core
        self._consumer = name
        self._cseq = cseq
        limits: dict[str, Any] = {
            "deliver_subject": deliver,
            "ack_wait": config.ack_wait_s,
            # the queue's unacked envelopes plus as many arriving: a delivery past
            # the queue is acked at once, so the server never stalls on this limit
            "max_ack_pending": 2 * self.max_pending,
            "inactive_threshold": (
                config.durable_expiry_s if self.durable else config.ephemeral_inactive_s
            ),
        }
        if keep is not None:
            ccfg = keep.evolve(**limits)
        else:
            ccfg = api.ConsumerConfig(
                name=name,
                durable_name=self.durable,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=max(start, 1),
                ack_policy=api.AckPolicy.EXPLICIT,
                filter_subject=self._nsubject,
                idle_heartbeat=config.idle_heartbeat_s,
                flow_control=False,
                **limits,
            )
        try:
            ci: api.ConsumerInfo = await bus._jsm.add_consumer(config.stream, ccfg)
        except BaseException:
            with contextlib.suppress(nats.errors.Error, OSError):
                await core.unsubscribe()
            raise
        return ci

    async def _delete_consumer(self, name: str) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._bus._jsm.delete_consumer(self._bus.config.stream, name)

    def _count_removed(self, first_seq: int, floor: int | None = None) -> None:
        """Report as missed what the stream removed past ``floor`` (default: the position).

        ``first_seq - 1 - floor`` messages: an upper bound (some may have been
        another subject's). Everything before ``first_seq`` is accounted for after.
        """
        floor = self._pos if floor is None else max(floor, self._pos)
        if first_seq > floor + 1:
            self._queue.miss(first_seq - 1 - floor)
            self.stats.limit_gaps += 1
            self._pos = first_seq - 1
            self._wake()

    def _saturated(self, ci: api.ConsumerInfo) -> bool:
        """True when the subject holds as many messages the durable has not finished as
        the stream keeps per subject: the oldest of them were being discarded."""
        cap = self._bus.config.max_msgs_per_subject
        return cap > 0 and (ci.num_pending or 0) + (ci.num_ack_pending or 0) >= cap

    async def _rebind(self) -> None:
        """Replace the consumer by a new one delivering from this subscription's position."""
        bus = self._bus
        jsm = bus._jsm
        self._gen += 1  # deliveries of the old consumer are ignored from here on
        old, self._core = self._core, None
        if old is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await old.unsubscribe()
        if self._consumer:
            await self._delete_consumer(self._consumer)
        info = await jsm.stream_info(bus.config.stream)
        self._count_removed(info.state.first_seq)
        # a durable starts again at its first unread envelope, so that the server
        # keeps it unacked until it is read (the redelivery refreshes its ack subject)
        start = next(iter(self._queued), self._pos + 1) if self.durable else self._pos + 1
        self._reset_reason = None  # deliveries of the new consumer count from here
        await self._create(start)
        self.stats.resets += 1

    def _request_reset(self, reason: str) -> None:
        if self._reset_reason is None:
            self._reset_reason = reason
            self._nudge.set()

    # -- deliveries ------------------------------------------------------------------

    async def _on_msg(self, msg: Msg) -> None:
        self._activity = True
        headers = msg.headers
        if headers is not None and headers.get(_STATUS) == _CONTROL:
            if msg.reply:  # a flow control request (not enabled here, but answered)
                with contextlib.suppress(nats.errors.Error, OSError):
                    await self._nc.publish(msg.reply, b"")
                return
            last = headers.get(_LAST_CONSUMER)
            if last is not None and last.isdigit() and int(last) > self._cseq:
                self._request_reset(f"heartbeat: consumer delivered {last}, got {self._cseq}")
            return
        info = _ack_info(msg.reply)
        if info is None:
            return
        sseq, cseq = info
        if cseq > self._cseq + 1:
            self._request_reset(f"delivery {cseq} after {self._cseq}: some never arrived")
            return
        self._cseq = cseq
        if sseq <= self._pos:  # a redelivery: never read twice
            self.stats.duplicates += 1
            queued = self._queued.get(sseq)
            if queued is not None:
                queued.reply = msg.reply  # ack the live delivery when it is read
            else:
                self._bus._schedule_ack(msg.reply)
            return
        self._pos = sseq
        self.stats.received += 1
        delivery = _Delivery(sseq, msg.data, msg.reply)
        if self._queue.offer(delivery):
            self._queued[sseq] = delivery
        else:
            self.stats.dropped += 1
            self._bus._schedule_ack(msg.reply)
        self._wake()

    # -- watching ----------------------------------------------------------------------

    async def _watch(self) -> None:
        """Re-create the consumer when asked, and check on it when it falls silent."""
        config = self._bus.config
        window = 2 * config.idle_heartbeat_s
        retry = config.idle_heartbeat_s
        while not self._closed:
            reason = self._reset_reason
            if reason is not None:
                try:
                    await self._rebind()
                except (nats.errors.Error, OSError) as exc:
                    if self._reset_reason is None:
                        self._reset_reason = reason
                    logger.warning(
                        "subscription to %r cannot re-create its consumer (%s): %r; retry in %g s",
                        self._subject,
                        reason,
                        exc,
                        retry,
                    )
                    await asyncio.sleep(retry)
                    retry = min(2 * retry, _MAX_RETRY_S)
                    continue
                retry = config.idle_heartbeat_s
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudge.wait(), window)
            self._nudge.clear()
            if self._reset_reason is not None or self._closed:
                continue
            if not self._nc.is_connected:
                continue
            reconnects = self._nc.stats["reconnects"]
            if reconnects != self._reconnects:
                self._reconnects = reconnects
                await self._probe(after_reconnect=True)
            elif not self._activity:
                await self._probe(after_reconnect=False)
            self._activity = False

    async def _probe(self, *, after_reconnect: bool) -> None:
        """Ask the server about the consumer: gone, or ahead of what arrived -> re-create.

        After a reconnect, also report what the stream removed past the consumer's
        position while this subscription was away.
        """
        bus = self._bus
        try:
            ci: api.ConsumerInfo = await bus._jsm.consumer_info(bus.config.stream, self._consumer)
        except nats.js.errors.NotFoundError:
            self._request_reset("the consumer is gone")
            return
        except (nats.errors.Error, OSError):
            return  # not reachable now: the next round asks again
        delivered = ci.delivered.consumer_seq if ci.delivered is not None else 0
        if delivered > self._cseq:  # deliveries in flight, or lost
            if not self._activity:
                self._request_reset(f"the consumer delivered {delivered}, got {self._cseq}")
            return
        if after_reconnect:
            # everything the consumer delivered arrived, so nothing of this subject
            # lies between this subscription's position and the consumer's
            position = ci.delivered.stream_seq if ci.delivered is not None else 0
            with contextlib.suppress(nats.errors.Error, OSError):
                info = await bus._jsm.stream_info(bus.config.stream)
                self._count_removed(info.state.first_seq, position)

    # -- closing -----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop receiving and drop what is queued; a waiting ``next`` ends. Idempotent.

        An ephemeral consumer is deleted (one round trip; if that fails the server
        removes it after ``ephemeral_inactive_s``). A durable consumer stays, with
        the queued envelopes unacknowledged: the next subscriber of the same
        durable receives them. The acks of what was read are sent first (and a
        PING/PONG waited for), so that a next subscriber does not get those again.
        """
        if self._closed:
            return
        self._closed = True
        self._gen += 1
        self._queue.clear()
        self._queued.clear()
        self._wake()
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        core, self._core = self._core, None
        if core is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await core.unsubscribe()
        if self.durable is None and self._consumer and self._nc.is_connected:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._delete_consumer(self._consumer)
        elif self.durable is not None and self._nc.is_connected:
            await self._bus._flush_acks()
        self._bus._subs.discard(self)

    def _check(self) -> None:
        """Assert the invariants of the queue and of the queued-by-sseq index."""
        self._queue._check()
        if len(self._queued) != self._queue.envelopes:
            raise AssertionError(f"{len(self._queued)} indexed vs {self._queue.envelopes} queued")
        if self._queued and max(self._queued) > self._pos:
            raise AssertionError("a queued sseq beyond the position")


def _resume_floor(ci: api.ConsumerInfo) -> int:
    """The last stream seq a durable's previous subscribers are done with.

    Everything delivered when nothing is awaiting an ack; otherwise the ack floor
    (what was delivered above it and never acked is delivered again); before any
    ack, the consumer's start.
    """
    delivered = ci.delivered.stream_seq if ci.delivered is not None else 0
    if not ci.num_ack_pending:
        return delivered
    if ci.ack_floor is not None and ci.ack_floor.consumer_seq > 0:
        return ci.ack_floor.stream_seq
    return max((ci.config.opt_start_seq or 1) - 1, 0)


# -- request / reply -----------------------------------------------------------------


Handler = Callable[[bytes], Awaitable[bytes]]


class ServiceServer:
    """One server of a queue group: runs ``handler`` on requests to ``subject``.

    Made by :meth:`NatsService.serve`. At most ``max_concurrency`` handlers run at
    once (one task each); up to ``max_queued`` more requests wait in arrival order;
    past that a request is answered ``busy`` at once. A request that waited longer
    than its caller's timeout (sent in a header) is dropped unanswered. A handler
    that raises is answered ``failed`` (the exception is logged here, never sent).
    O(1) per request besides the handler.
    """

    def __init__(
        self,
        nc: Client,
        *,
        subject: str,
        queue: str,
        handler: Handler,
        max_concurrency: int,
        max_queued: int,
    ) -> None:
        """Use :meth:`NatsService.serve`."""
        self._nc = nc
        self.subject = subject
        self.queue = queue
        self._handler = handler
        self.max_concurrency = max_concurrency
        self.max_queued = max_queued
        self.stats = ServiceStats()
        self._loop = asyncio.get_running_loop()
        self._running = 0
        self._waiting: deque[tuple[Msg, float]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sub: CoreSubscription | None = None
        self._closed = False

    @property
    def running(self) -> int:
        """Handlers running now."""
        return self._running

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called."""
        return self._closed

    async def _start(self) -> None:
        self._sub = await self._nc.subscribe(
            self.subject, queue=self.queue, cb=self._on_request, pending_msgs_limit=-1
        )
        # one round trip: once serve returns, the server routes requests here
        await self._nc.flush(_SUBSCRIBE_FLUSH_S)

    async def _on_request(self, msg: Msg) -> None:
        if not msg.reply:
            self.stats.no_reply += 1
            return
        deadline = math.inf
        headers = msg.headers
        if headers is not None:
            timeout_ms = headers.get(_TIMEOUT_HEADER, "")
            if timeout_ms.isdigit():
                deadline = self._loop.time() + int(timeout_ms) / 1000
        if self._running < self.max_concurrency:
            self._run(msg)
        elif len(self._waiting) < self.max_queued:
            self._waiting.append((msg, deadline))
            self._idle.clear()
        else:
            self.stats.busy += 1
            await self._answer_error(msg.reply, _BUSY)

    def _run(self, msg: Msg) -> None:
        self._running += 1
        self._idle.clear()
        task = self._loop.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Msg) -> None:
        try:
            try:
                answer = await self._handler(msg.data)
                if not isinstance(answer, bytes | bytearray | memoryview):
                    raise TypeError(f"the handler returned {type(answer).__name__}, not bytes")
                await self._nc.publish(msg.reply, bytes(answer))
                self.stats.handled += 1
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("handler for %r failed", self.subject)
                self.stats.failed += 1
                await self._answer_error(msg.reply, _FAILED)
        finally:
            self._running -= 1
            self._next()

    def _next(self) -> None:
        now = self._loop.time()
        waiting = self._waiting
        while waiting and self._running < self.max_concurrency:
            msg, deadline = waiting.popleft()
            if deadline < now:
                self.stats.expired += 1
                continue
            self._run(msg)
        if not self._running and not waiting:
            self._idle.set()

    async def _answer_error(self, reply: str, code: str) -> None:
        with contextlib.suppress(nats.errors.Error, OSError):
            await self._nc.publish(reply, b"", headers={_ERROR_HEADER: code})

    async def aclose(self, timeout_s: float = DEFAULT_NATS_DRAIN_TIMEOUT_S) -> None:
        """Leave the queue group, then finish what it accepted (drain). Idempotent.

        No new request reaches this server once it returns from unsubscribing;
        running and queued requests are answered for up to ``timeout_s``, then
        cancelled (their callers time out).
        """
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        deadline = loop.time() + timeout_s
        sub, self._sub = self._sub, None
        if sub is not None:
            # unsubscribe, then take in what the server had already routed here
            with contextlib.suppress(nats.errors.Error, OSError):
                await asyncio.wait_for(sub.drain(), timeout_s)  # type: ignore[no-untyped-call]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(deadline - loop.time(), 0.0))
        self._waiting.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class NatsService:
    """Request/reply over core NATS: :meth:`serve` in a queue group, :meth:`request`.

    Build it with :meth:`connect` (its own connection, closed by :meth:`aclose`) or
    ``NatsService(nc)`` on a connected nats-py client. Every process that calls
    ``serve(subject, queue, handler)`` with the same subject and queue joins one
    queue group: NATS gives each request to one member at random, so M logic
    processes share the load and any one can die. ``request`` is one round trip.

    >>> async def demo() -> bytes:  # doctest: +SKIP
    ...     svc = await NatsService.connect("nats://127.0.0.1:4222")
    ...     async def echo(data: bytes) -> bytes:
    ...         return data
    ...     await svc.serve("imkit.logic.send", "logic", echo)
    ...     return await svc.request("imkit.logic.send", b"hi", timeout_s=1.0)
    """

    def __init__(self, nc: Client, *, owns_client: bool = False) -> None:
        self._nc = nc
        self._owns_client = owns_client
        self._servers: set[ServiceServer] = set()
        self._closed = False

    @classmethod
    async def connect(
        cls,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        name: str | None = None,
        connect_timeout_s: float = DEFAULT_NATS_CONNECT_TIMEOUT_S,
        reconnect_wait_s: float = DEFAULT_NATS_RECONNECT_WAIT_S,
    ) -> NatsService:
        """Connect to ``servers`` (reconnecting forever). Raises BackendError if none answers."""
        nc = await _connect(servers, name, connect_timeout_s, reconnect_wait_s)
        return cls(nc, owns_client=True)

    @property
    def client(self) -> Client:
        """The nats-py client."""
        return self._nc

    async def serve(
        self,
        subject: str,
        queue: str,
        handler: Handler,
        *,
        max_concurrency: int = DEFAULT_NATS_MAX_CONCURRENCY,
        max_queued: int = DEFAULT_NATS_MAX_QUEUED_REQUESTS,
    ) -> ServiceServer:
        """Answer requests to ``subject`` with ``handler``, as a member of queue group ``queue``.

        ``handler(request_bytes) -> reply_bytes``; see :class:`ServiceServer` for
        the bounds. Raises ConfigError for a bad subject, queue or bound,
        StateError once closed, BackendError if the connection is closed.
        """
        if self._closed:
            raise StateError("the service is closed")
        if not isinstance(subject, str) or not _SUBJECT_RE.fullmatch(subject):
            raise ConfigError(f"subject must be dot-separated tokens, got {subject!r}")
        if not isinstance(queue, str) or not _NAME_RE.fullmatch(queue):
            raise ConfigError(f"queue must be 1-200 letters, digits, '-' or '_', got {queue!r}")
        for what, value, lo in (
            ("max_concurrency", max_concurrency, 1),
            ("max_queued", max_queued, 0),
        ):
            if type(value) is not int or value < lo:
                raise ConfigError(f"{what} must be an int >= {lo}, got {value!r}")
        server = ServiceServer(
            self._nc,
            subject=subject,
            queue=queue,
            handler=handler,
            max_concurrency=max_concurrency,
            max_queued=max_queued,
        )
        try:
            await server._start()
        except (nats.errors.Error, OSError) as exc:
            await server.aclose(0.1)
            raise _wrap(f"serve {subject!r}", exc) from exc
        self._servers.add(server)
        return server

    async def request(
        self, subject: str, payload: bytes, timeout_s: float = DEFAULT_NATS_REQUEST_TIMEOUT_S
    ) -> bytes:
        """Send ``payload`` to one server of ``subject``'s queue group; return its answer.

        Raises :class:`RequestTimeout` (also a TimeoutError) with no answer within
        ``timeout_s``, :class:`NoResponders` at once when no server serves the
        subject, :class:`ServiceBusy` / :class:`ServiceError` when the server
        answered with an error, BackendError on a closed connection. The timeout
        travels with the request, so a server drops it unanswered if it only gets
        to it after the caller gave up. One round trip.
        """
        if not (type(timeout_s) in (int, float) and 0 < timeout_s < math.inf):
            raise ConfigError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
        headers = {_TIMEOUT_HEADER: str(max(1, int(timeout_s * 1000)))}
        try:
            msg = await self._nc.request(subject, payload, timeout=timeout_s, headers=headers)
        except nats.errors.NoRespondersError as exc:
            raise NoResponders(subject) from exc
        except nats.errors.TimeoutError as exc:
            raise RequestTimeout(subject, timeout_s) from exc
        except (nats.errors.Error, OSError) as exc:
            raise _wrap(f"request to {subject!r}", exc) from exc
        answer_headers = msg.headers
        if answer_headers is not None:
            code = answer_headers.get(_ERROR_HEADER)
            if code is not None:
                raise ServiceBusy(subject) if code == _BUSY else ServiceError(subject, code[:32])
        return msg.data

    async def aclose(self) -> None:
        """Drain every server of this service, then close an owned connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for server in list(self._servers):
            await server.aclose()
        self._servers.clear()
        if self._owns_client:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._nc.close()
