"""Load shedding at the gateway: take what the process can carry, refuse the rest early.

What it does
    :class:`LoadShedder` tells the gateway, for each new ``Send``, whether to take it
    now or refuse it with ``SERVER_BUSY`` and a retry hint that the client honours
    (:class:`imkit.aio.Client` waits that long, then resends the same cids, in order).
    It watches two signals, both cheap to read:

    * **event-loop lag** (off unless ``max_lag_ms`` is set): a timer every
      ``sample_ms`` measures how late the loop runs it. A loop that is late by
      ``max_lag_ms`` is past what it can serve: every frame already waits that long
      before it is read. The lag is smoothed (an
      exponentially weighted mean over ~4 samples) so one slow callback does not
      shed, a sustained backlog does;
    * **bus backlog**: envelopes queued for this gateway and not yet written
      (``backlog()``, the length of its bus subscription). Past ``max_backlog`` the
      gateway is behind on its pushes; every send taken now adds to that queue, and
      a queue that overflows costs every client a resync (far more work than the
      refused sends).

    Shedding has hysteresis: it starts when either signal passes its limit and stops
    when both are below half of it, so the gateway does not flap between the two
    states on every sample.

The first line is upstream of it
    Each connection has at most ``max_sends_in_flight`` (64) sends waiting for the
    logic server and 200 frames/s (``ServerConfig``), the transport stops reading a
    connection whose 64 decoded frames are not taken yet, and the official client
    paces itself to the limits the server announces. So a process past saturation
    *delays* its clients (their outboxes fill, and refuse the application at their
    limit) rather than queueing for them: its memory stays bounded by connections x
    those windows. The shedder is the second line, for the two states that cost more
    than a refusal: a loop so far behind that every frame waits half a second, and a
    bus subscription about to overflow (which would make every client resync).

Why refuse rather than queue
    Past saturation, work taken in is work the process cannot finish in time: its
    queues grow, memory with them, latency for everyone, and pushes time out and are
    resent (more work). Refusing at the edge costs one small answer per refused send,
    keeps the queues short, and keeps the delivered rate at the process's maximum.
    The client keeps the message in its bounded outbox and resends it after the hint;
    an application that offers more than that outbox holds is told at once
    (``CapacityError``), the only honest answer to sustained overload.

What it leaves out
    A shared view across gateways (each process sheds on its own signals), priority
    classes (acks, pings and syncs are never shed: they finish work already taken in;
    logins are bounded by the connection limits), and CPU-based signals (the loop lag
    already measures what matters: the time a frame waits).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from imkit.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_BACKLOG",
    "DEFAULT_MAX_LAG_MS",
    "DEFAULT_SAMPLE_MS",
    "DEFAULT_SHED_RETRY_MS",
    "LoadShedder",
]

#: How often the loop's lag is sampled. 50 ms: cheap (20 wake-ups a second) and
#: fine-grained enough that shedding starts within ~200 ms of the overload.
DEFAULT_SAMPLE_MS = 50
#: Smoothed loop lag at which new sends are refused, or None (the default): off. A
#: saturated gateway runs its loop hundreds of ms late simply because each turn
#: handles a large batch, while the clients' windows already bound what it holds;
#: refusing on lag then only idles it: with 1,000 paced clients at 2-3x saturation,
#: 100 ms cut the delivered rate by 6-47% and 500 ms by 8-23%
#: (benchmarks/bench_overload.py). Set it for clients that do not pace themselves.
DEFAULT_MAX_LAG_MS: int | None = None
#: Envelopes queued for this gateway at which new sends are refused: 15/16 of the
#: bus subscription's limit (``DEFAULT_BUS_PENDING`` = 8192). A saturated gateway
#: routinely queues a thousand in one loop turn (a limit of 768 shed a third of the
#: delivered rate away), so this only stops the overflow itself: past it every
#: client of the gateway would be told to resync, far more work than the refusals.
DEFAULT_MAX_BACKLOG = 7680
#: Retry hint sent with a shed send, spread by a random factor of 0.5-1.5 per
#: connection so the refused clients do not come back as one wave. 250 ms: a few
#: sampling periods; long enough for the queues to drain, short enough that the
#: process does not sit idle waiting for its clients.
DEFAULT_SHED_RETRY_MS = 250

_EWMA = 0.25  # weight of a new lag sample (~4 samples of memory)


class LoadShedder:
    """Whether a gateway takes new sends now. O(1) per question; one timer per process.

    ``backlog`` returns the envelopes queued for the gateway (0 when unknown).
    Create it inside a running loop; :meth:`close` stops the sampling timer.
    Counters: :attr:`shed` (sends refused), :attr:`episodes` (times shedding began).
    """

    def __init__(
        self,
        backlog: Callable[[], int] = lambda: 0,
        *,
        max_lag_ms: int | None = DEFAULT_MAX_LAG_MS,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        sample_ms: int = DEFAULT_SAMPLE_MS,
        retry_after_ms: int = DEFAULT_SHED_RETRY_MS,
        enabled: bool = True,
    ) -> None:
        for name, value in (
            ("max_lag_ms", 1 if max_lag_ms is None else max_lag_ms),
            ("max_backlog", max_backlog),
            ("sample_ms", sample_ms),
            ("retry_after_ms", retry_after_ms),
        ):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        self.backlog = backlog
        self.max_lag_ms = max_lag_ms
        self.max_backlog = max_backlog
        self.sample_ms = sample_ms
        self.retry_after_ms = retry_after_ms
        self.enabled = enabled
        self.lag_ms = 0.0  # smoothed loop lag
        self.shedding = False
        self.shed = 0
        self.episodes = 0
        self._random = random.Random()
        self._loop = asyncio.get_running_loop()
        self._due = time.monotonic() + sample_ms / 1000
        self._timer: asyncio.TimerHandle | None = None
        if enabled and max_lag_ms is not None:  # the lag is sampled only when it is used
            self._timer = self._loop.call_later(sample_ms / 1000, self._sample)

    def close(self) -> None:
        """Stop sampling (the shedder then only looks at the backlog). Idempotent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sample(self) -> None:
        now = time.monotonic()
        lag = max(0.0, (now - self._due) * 1000)
        self.lag_ms += _EWMA * (lag - self.lag_ms)
        self._due = now + self.sample_ms / 1000
        self._timer = self._loop.call_later(self.sample_ms / 1000, self._sample)
        self._update()

    def _update(self) -> bool:
        backlog = self.backlog()
        max_lag = self.max_lag_ms
        lagging = max_lag is not None and self.lag_ms >= max_lag
        if self.shedding:
            if (max_lag is None or self.lag_ms < max_lag / 2) and backlog < self.max_backlog / 2:
                self.shedding = False
        elif lagging or backlog >= self.max_backlog:
            self.shedding = True
            self.episodes += 1
        return self.shedding

    def retry_hint_ms(self) -> int:
        """A retry hint for a refused send: ``retry_after_ms`` x a random 0.5-1.5. O(1).

        The spread keeps the refused clients from coming back as one wave (which
        would refill the queue at once and leave the process idle in between).
        """
        return max(1, round(self.retry_after_ms * (0.5 + self._random.random())))

    def admit(self) -> bool:
        """True: take this send. False: refuse it (counted in :attr:`shed`). O(1)."""
        if not self.enabled:
            return True
        if self._update():
            self.shed += 1
            return False
        return True
