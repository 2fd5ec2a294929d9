"""The sans-IO core of an in-process bus: subjects -> subscribers -> bounded inboxes.

:class:`Fanout` holds, for every subject, the subscribers' :class:`Inbox` queues.
``publish`` copies a reference to the payload into every inbox of the subject, in
O(s) for s subscribers; nothing here blocks, sleeps or reads a clock. The asyncio
:class:`imkit.aio.bus.MemoryBus` wraps it and turns the inbox's ``on_ready``
callback into a wake-up of the waiting consumer.

Overflow (the one place a bus could silently lose messages) is explicit. Every inbox
holds at most ``max_pending`` envelopes, and its subscriber chose what happens when
a publish finds it full:

* :attr:`Overflow.RESYNC` (default): the envelope is not queued for this subscriber
  and counted; the subscriber later reads one :class:`Lagged` marker, in order, at
  the place of the gap, saying how many envelopes it missed. Other subscribers are
  not affected and the publisher is not slowed down. The subscriber resyncs what it
  missed from the store (on a gateway: every client of it syncs).
* :attr:`Overflow.REJECT`: the whole publish raises :class:`~imkit.errors.CapacityError`
  before any inbox is touched, so the publisher knows and falls back (e.g. to
  notify-and-pull, or to retrying later).

Either way nothing acknowledged is lost: in imkit a message is stored before it is
published, so a missed envelope is a missed *notification*, and the subscriber
knows it missed one. The invariant the tests check: for every inbox, envelopes
read + the sum of ``Lagged.missed`` read + what is still queued == envelopes
published to it.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import attrs

from imkit.errors import CapacityError, ConfigError

__all__ = [
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_SUBJECTS",
    "DEFAULT_MAX_SUBSCRIBERS",
    "Envelope",
    "Fanout",
    "Inbox",
    "Lagged",
    "Overflow",
    "PublishResult",
]

T = TypeVar("T")

#: Envelopes one subscriber may have queued. A gateway takes a batch off its inbox in
#: tens of microseconds; 1024 queued batches means it has stalled for a long while
#: (at the seed's ~10k pushes/s per gateway, about 100 ms of traffic), and past that
#: a resync from the store costs less than buffering without bound.
DEFAULT_MAX_PENDING = 1024

#: Distinct subjects with at least one subscriber. Subjects are route keys (gateway
#: ids): a few hundred in the seed's 100M-user sizing; 65536 leaves room for
#: per-service subjects while bounding the map a buggy caller could grow.
DEFAULT_MAX_SUBJECTS = 65_536

#: Subscribers on one subject. A route key normally has one (its gateway); a
#: broadcast subject has one per process. 1024 processes is beyond one bus cluster.
DEFAULT_MAX_SUBSCRIBERS = 1024


class Overflow(enum.Enum):
    """What a publish does to a subscriber whose inbox is full."""

    RESYNC = "resync"  #: skip this subscriber, count the miss, report it as :class:`Lagged`
    REJECT = "reject"  #: refuse the whole publish with CapacityError; nothing is delivered


@attrs.frozen(kw_only=True, slots=True)
class Envelope(Generic[T]):
    """One published payload as a subscriber reads it."""

    subject: str
    payload: T


@attrs.frozen(kw_only=True, slots=True)
class Lagged:
    """In-band marker: this subscriber missed ``missed`` envelopes here and must resync."""

    subject: str
    missed: int


@attrs.frozen(kw_only=True, slots=True)
class PublishResult:
    """What one publish did: inboxes that queued it, and inboxes that lagged instead."""

    delivered: int
    lagged: int


class Inbox(Generic[T]):
    """One subscriber's bounded queue of envelopes (and :class:`Lagged` markers).

    Created by :meth:`Fanout.subscribe`. ``on_ready`` is called (synchronously, from
    ``publish``) when the inbox goes from having nothing to read to having
    something, so an adapter can wake its consumer once rather than per envelope.

    Memory: at most ``max_pending`` envelopes, plus at most one marker per envelope
    (a marker is only queued right before an envelope) and one trailing marker held
    as a counter.
    """

    __slots__ = (
        "_closed",
        "_envelopes",
        "_items",
        "_missed",
        "id",
        "max_pending",
        "on_ready",
        "overflow",
        "subject",
    )

    def __init__(
        self,
        inbox_id: int,
        subject: str,
        max_pending: int,
        overflow: Overflow,
        on_ready: Callable[[], None] | None,
    ) -> None:
        self.id = inbox_id
        self.subject = subject
        self.max_pending = max_pending
        self.overflow = overflow
        self.on_ready = on_ready
        self._items: deque[Envelope[T] | Lagged] = deque()
        self._envelopes = 0  # envelopes in _items (markers are not counted)
        self._missed = 0  # envelopes dropped since the last marker was placed
        self._closed = False

    @property
    def closed(self) -> bool:
        """True after :meth:`Fanout.unsubscribe`; a closed inbox receives nothing."""
        return self._closed

    @property
    def full(self) -> bool:
        """True when a publish would overflow. O(1)."""
        return self._envelopes >= self.max_pending

    def __len__(self) -> int:
        """Envelopes queued (markers excluded). O(1)."""
        return self._envelopes

    def ready(self) -> bool:
        """True when :meth:`pop` would return something. O(1)."""
        return bool(self._items) or self._missed > 0

    def pop(self) -> Envelope[T] | Lagged | None:
        """The next envelope or marker in publish order, or None when there is none. O(1).

        When the queue is empty but envelopes were missed since the last marker, the
        marker for them is returned (so a gap at the end is reported too).
        """
        items = self._items
        if items:
            item = items.popleft()
            if type(item) is Envelope:
                self._envelopes -= 1
            return item
        if self._missed:
            missed, self._missed = self._missed, 0
            return Lagged(subject=self.subject, missed=missed)
        return None

    def miss(self, n: int = 1) -> None:
        """Count ``n`` envelopes lost before they reached this inbox. O(1).

        For networked backends: a subscriber that lost its connection to the server
        missed an unknown number of envelopes; the reader gets a :class:`Lagged`
        marker for them at this place in the stream (and resyncs). ``n >= 1``. Only
        for RESYNC inboxes: a REJECT subscriber never reads a marker (ConfigError).
        """
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        if self.overflow is Overflow.REJECT:
            raise ConfigError("a REJECT inbox reads no Lagged markers")
        if self._closed:
            return
        was_ready = self._items or self._missed
        self._missed += n
        if not was_ready and self.on_ready is not None:
            self.on_ready()

    def _offer(self, envelope: Envelope[T]) -> bool:
        """Queue ``envelope`` or count it as missed; True if it was queued. O(1)."""
        if self._envelopes >= self.max_pending:
            self._missed += 1
            return False
        was_ready = self._items or self._missed
        if self._missed:
            self._items.append(Lagged(subject=self.subject, missed=self._missed))
            self._missed = 0
        self._items.append(envelope)
        self._envelopes += 1
        if not was_ready and self.on_ready is not None:
            self.on_ready()
        return True

    def _close(self) -> None:
        self._closed = True
        self._items.clear()
        self._envelopes = 0
        self._missed = 0

    def _check(self) -> None:
        """Assert the invariants: counts match, limit held, markers never adjacent."""
        envelopes = sum(1 for item in self._items if type(item) is Envelope)
        if envelopes != self._envelopes:
            raise AssertionError(f"envelope count {self._envelopes} != {envelopes} queued")
        if self._envelopes > self.max_pending:
            raise AssertionError(f"{self._envelopes} envelopes over max_pending")
        previous: object = None
        for item in self._items:
            if type(item) is Lagged:
                if item.missed <= 0:
                    raise AssertionError("a marker with nothing missed")
                if type(previous) is Lagged:
                    raise AssertionError("two markers in a row")
            previous = item
        if self._items and type(self._items[-1]) is Lagged:
            raise AssertionError("a queued marker must be followed by an envelope")
        if self._missed < 0:
            raise AssertionError("negative missed count")
        if self.overflow is Overflow.REJECT and (self._missed or previous is Lagged):
            raise AssertionError("a REJECT inbox never lags")
        if self._closed and (self._items or self._missed):
            raise AssertionError("a closed inbox holds items")


class Fanout(Generic[T]):
    """Subjects to subscriber inboxes, with bounded queues and explicit overflow.

    ``subscribe`` O(1), ``unsubscribe`` O(1), ``publish`` O(s) for the s
    subscribers of the subject (plus O(s) for the REJECT pre-check), ``pop`` on an
    inbox O(1).

    >>> fan: Fanout[str] = Fanout()
    >>> inbox = fan.subscribe("gw-1", max_pending=1)
    >>> fan.publish("gw-1", "a"), fan.publish("gw-1", "b")
    (PublishResult(delivered=1, lagged=0), PublishResult(delivered=0, lagged=1))
    >>> inbox.pop(), inbox.pop(), inbox.pop()
    (Envelope(subject='gw-1', payload='a'), Lagged(subject='gw-1', missed=1), None)
    """

    def __init__(
        self,
        *,
        max_subjects: int = DEFAULT_MAX_SUBJECTS,
        max_subscribers: int = DEFAULT_MAX_SUBSCRIBERS,
    ) -> None:
        if max_subjects < 1:
            raise ConfigError(f"max_subjects must be >= 1, got {max_subjects}")
        if max_subscribers < 1:
            raise ConfigError(f"max_subscribers must be >= 1, got {max_subscribers}")
        self.max_subjects = max_subjects
        self.max_subscribers = max_subscribers
        self._subjects: dict[str, dict[int, Inbox[T]]] = {}
        self._ids = itertools.count(1)

    def subscribe(
        self,
        subject: str,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        overflow: Overflow = Overflow.RESYNC,
        on_ready: Callable[[], None] | None = None,
    ) -> Inbox[T]:
        """A new inbox receiving every later publish to ``subject``. O(1).

        Raises :class:`~imkit.errors.ConfigError` for an empty subject or
        ``max_pending < 1``, :class:`~imkit.errors.CapacityError` past
        ``max_subjects`` or ``max_subscribers``.
        """
        if not isinstance(subject, str) or not subject:
            raise ConfigError("subject must be a non-empty string")
        if max_pending < 1:
            raise ConfigError(f"max_pending must be >= 1, got {max_pending}")
        if not isinstance(overflow, Overflow):
            raise ConfigError(f"overflow must be an Overflow, got {overflow!r}")
        inboxes = self._subjects.get(subject)
        if inboxes is None:
            if len(self._subjects) >= self.max_subjects:
                raise CapacityError("max_subjects", self.max_subjects)
            inboxes = self._subjects[subject] = {}
        elif len(inboxes) >= self.max_subscribers:
            raise CapacityError("max_subscribers", self.max_subscribers, subject)
        inbox: Inbox[T] = Inbox(next(self._ids), subject, max_pending, overflow, on_ready)
        inboxes[inbox.id] = inbox
        return inbox

    def unsubscribe(self, inbox: Inbox[T]) -> None:
        """Detach ``inbox`` and drop what it holds; idempotent. O(1)."""
        inboxes = self._subjects.get(inbox.subject)
        if inboxes is not None and inboxes.pop(inbox.id, None) is not None and not inboxes:
            del self._subjects[inbox.subject]
        inbox._close()

    def publish(self, subject: str, payload: T) -> PublishResult:
        """Queue ``payload`` for every subscriber of ``subject``. O(s).

        Raises :class:`~imkit.errors.CapacityError` (and delivers to nobody) when a
        subscriber with :attr:`Overflow.REJECT` is full. A subject with no
        subscriber yields ``PublishResult(delivered=0, lagged=0)``.
        """
        inboxes = self._subjects.get(subject)
        if not inboxes:
            return PublishResult(delivered=0, lagged=0)
        for inbox in inboxes.values():
            if inbox.overflow is Overflow.REJECT and inbox.full:
                detail = f"a subscriber of {subject!r} is full"
                raise CapacityError("max_pending", inbox.max_pending, detail)
        envelope = Envelope(subject=subject, payload=payload)
        delivered = 0
        lagged = 0
        # on_ready may unsubscribe: iterate over a snapshot
        for inbox in list(inboxes.values()):
            if inbox._offer(envelope):
                delivered += 1
            else:
                lagged += 1
        return PublishResult(delivered=delivered, lagged=lagged)

    def miss_all(self, n: int = 1) -> int:
        """Count ``n`` lost envelopes in every open RESYNC inbox (:meth:`Inbox.miss`);
        return how many inboxes. O(inboxes)."""
        inboxes = [
            i
            for by_id in self._subjects.values()
            for i in by_id.values()
            if i.overflow is Overflow.RESYNC
        ]
        for inbox in inboxes:
            inbox.miss(n)
        return len(inboxes)

    def subscribers(self, subject: str) -> int:
        """How many inboxes receive ``subject``. O(1)."""
        inboxes = self._subjects.get(subject)
        return len(inboxes) if inboxes else 0

    def subjects(self) -> list[str]:
        """Subjects with at least one subscriber. O(n)."""
        return list(self._subjects)

    def _check(self) -> None:
        """Assert the invariants of the map and of every inbox."""
        if len(self._subjects) > self.max_subjects:
            raise AssertionError("more subjects than max_subjects")
        for subject, inboxes in self._subjects.items():
            if not inboxes:
                raise AssertionError(f"subject {subject!r} kept with no subscriber")
            if len(inboxes) > self.max_subscribers:
                raise AssertionError(f"subject {subject!r} over max_subscribers")
            for inbox_id, inbox in inboxes.items():
                if inbox.id != inbox_id or inbox.subject != subject or inbox.closed:
                    raise AssertionError(f"inbox {inbox_id} misfiled under {subject!r}")
                inbox._check()
