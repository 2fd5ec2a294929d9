"""Load shedding at the gateway: take what the process can carry, refuse the rest early.

What it does
    :class:`LoadShedder` tells the gateway, for each new ``Send``, whether to take it
    now or refuse it with ``SERVER_BUSY`` and a retry hint that the client honours
    (:class:`imkit.aio.Client` waits that long, then resends the same cids, in order).
    It watches two signals, both cheap to read:

    * **event-loop lag**: a timer every ``sample_ms`` measures how late the loop runs
      it. A loop that is late by ``max_lag_ms`` is past what it can serve: every
      frame already waits that long before it is read. The lag is smoothed (an
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
#: Smoothed loop lag at which new sends are refused. A chat message pushed within
#: ~100 ms feels instant; a loop 100 ms late on every turn is queueing work it
#: cannot keep up with (a healthy gateway's loop is late by well under 5 ms).
DEFAULT_MAX_LAG_MS = 100
#: Envelopes queued for this gateway at which new sends are refused: half the bus
#: subscription's limit (``DEFAULT_BUS_PENDING`` = 1024), so the refusal starts well
#: before an overflow would make every client resync.
DEFAULT_MAX_BACKLOG = 512
#: Retry hint sent with a shed send. 1 s: a few sampling periods, so the overload has
#: passed or the clients' next attempt is shed again at little cost; clients add
#: their own jitter so the retries do not return as one wave.
DEFAULT_SHED_RETRY_MS = 1_000

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
        max_lag_ms: int = DEFAULT_MAX_LAG_MS,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        sample_ms: int = DEFAULT_SAMPLE_MS,
        retry_after_ms: int = DEFAULT_SHED_RETRY_MS,
        enabled: bool = True,
    ) -> None:
        for name, value in (("max_lag_ms", max_lag_ms), ("max_backlog", max_backlog),
                            ("sample_ms", sample_ms), ("retry_after_ms", retry_after_ms)):
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
        self._loop = asyncio.get_running_loop()
        self._due = time.monotonic() + sample_ms / 1000
        self._timer: asyncio.TimerHandle | None = None
        if enabled:
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
        if self.shedding:
            if self.lag_ms < self.max_lag_ms / 2 and backlog < self.max_backlog / 2:
                self.shedding = False
        elif self.lag_ms >= self.max_lag_ms or backlog >= self.max_backlog:
            self.shedding = True
            self.episodes += 1
        return self.shedding

    def admit(self) -> bool:
        """True: take this send. False: refuse it (counted in :attr:`shed`). O(1)."""
        if not self.enabled:
            return True
        if self._update():
            self.shed += 1
            return False
        return True
