"""Drive a :class:`~imkit.timingwheel.TimingWheel` from the event loop.

The wheel is pure (time comes in as ``now_ms``); :class:`WheelDriver` owns the
clock (``loop.time()``, in ms) and the single asyncio timer that wakes it. It sleeps
until the wheel's :meth:`next_deadline_ms`, never ticks while idle, and moves its
wake-up earlier when a timer is added (or rescheduled) before it. A gateway with
100k connections therefore has one asyncio timer, not 100k, and an idle one has
none armed at all.

The timer is approximate by one tick (``tick_ms``) plus the loop's scheduling
slack, like Netty's HashedWheelTimer: a timer never fires early, and fires at most
about a tick late on an idle loop.

Stalls. When the loop did not run for a while (a GC pause, ``SIGSTOP``, a paused
VM, one long blocking call), deadlines fall due during the stall while the frames
that would have moved them (a client's pings) wait unread in the socket buffers.
Firing at once would judge those clients silent: asyncio runs due timers in the
same iteration as the I/O callbacks but before the handler tasks those callbacks
wake, and uvloop (libuv) runs timers even before it polls the sockets. So a
wake-up later than ``stall_ms`` past its time fires nothing: the driver counts
the stall (:attr:`WheelDriver.stalls`) and sleeps ``catch_up_ms`` more, during
which the loop reads the sockets and the handlers feed the frames to their
sessions (which push their deadlines back); then it advances the wheel. This
does not depend on the loop's order of timers and I/O. At most one catch-up per
stall: the catch-up wake-up itself always fires, and a new catch-up needs a
wake-up that came on time first, so a loop that is late on every wake-up
(sustained overload) is never postponed twice in a row.
:class:`DeadlineTimer` does the same for a client's single timer.

Single loop, single thread: call every method from the loop's thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from imkit.aio._checks import check_int
from imkit.aio._loop import loop_ms, running_loop
from imkit.errors import StateError
from imkit.timingwheel import DEFAULT_TICK_MS, DEFAULT_WHEEL_SIZE, TimerHandle, TimingWheel

__all__ = ["DEFAULT_CATCH_UP_MS", "DEFAULT_STALL_MS", "DeadlineTimer", "WheelDriver"]

#: A wake-up this late (ms past the time it was armed for) means the loop did not
#: run for that long: a GC pause, SIGSTOP, a paused VM, a long blocking call. A
#: healthy loop is late by a few ms and heartbeat deadlines are tens of seconds (9 s
#: at the shortest the examples use), so 1 s is far above scheduling jitter and far
#: below any deadline a stall could wrongly expire.
DEFAULT_STALL_MS = 1_000

#: After a stall, how long timers wait while the loop reads what arrived meanwhile.
#: Reading takes one iteration (uvloop polls after its timers) and feeding the frames
#: to the sessions one more (the handler tasks run on the next iteration), a few
#: more if a handler awaits its store; 250 ms covers that on a loaded loop and is
#: short next to the stall (>= stall_ms) it follows.
DEFAULT_CATCH_UP_MS = 250


class _StallCatchUp:
    """The stall rule both drivers share (module docstring): state and one check. O(1)."""

    def __init__(self, stall_ms: int | None, catch_up_ms: int) -> None:
        check_int("stall_ms", stall_ms, none_ok=True)
        check_int("catch_up_ms", catch_up_ms)
        self.stall_ms = stall_ms
        self.catch_up_ms = catch_up_ms
        self._catch_up_until: int | None = None  # during a catch-up: wake no earlier
        self._on_time = True  # the last wake-up was not late: a new stall may catch up
        self.stalls = 0

    def _stalled(self, armed: int | None, now: int) -> bool:
        """True: a stall began; fire nothing, wake again at ``_catch_up_until``."""
        if self._catch_up_until is not None:
            self._catch_up_until = None  # the catch-up is over: fire, whatever the time
            self._on_time = armed is None or now - armed <= (self.stall_ms or 0)
        elif self.stall_ms is not None and armed is not None and now - armed > self.stall_ms:
            if self._on_time:  # a stall: read what arrived before judging silence
                self._on_time = False
                self.stalls += 1
                self._catch_up_until = now + self.catch_up_ms
                return True
        else:
            self._on_time = True
        return False

T = TypeVar("T")


class WheelDriver(_StallCatchUp, Generic[T]):
    """A timing wheel on the event loop: ``on_expire(item)`` runs when an item's deadline passes.

    ``add`` costs the wheel's insert (O(levels)) plus O(1) to move the single
    asyncio wake-up earlier when needed; ``cancel`` through the returned handle is
    the wheel's O(1) (a wake-up left armed for a cancelled timer is harmless: it
    finds nothing and re-arms for the next deadline). Each wake-up is O(expired +
    levels).

    ``on_expire`` runs synchronously from the loop; an exception it raises goes to
    the loop's exception handler and does not stop the other timers.

    A wake-up later than ``stall_ms`` past its time (None: never) waits
    ``catch_up_ms`` before firing anything, once per stall (module docstring).

    Counters for tests and benchmarks: :attr:`wakeups` (times the driver ran),
    :attr:`idle_wakeups` (of those, the ones that expired nothing), :attr:`fired`,
    :attr:`stalls` (late wake-ups that got a catch-up).
    """

    def __init__(
        self,
        on_expire: Callable[[T], object],
        *,
        tick_ms: int = DEFAULT_TICK_MS,
        wheel_size: int = DEFAULT_WHEEL_SIZE,
        stall_ms: int | None = DEFAULT_STALL_MS,
        catch_up_ms: int = DEFAULT_CATCH_UP_MS,
        loop: asyncio.AbstractEventLoop | None = None,
        wheel: TimingWheel[T] | None = None,
    ) -> None:
        super().__init__(stall_ms, catch_up_ms)
        self._loop = loop if loop is not None else running_loop()
        self._last_ms = loop_ms(self._loop)
        if wheel is None:
            wheel = TimingWheel(tick_ms=tick_ms, wheel_size=wheel_size, start_ms=self._last_ms)
        self.wheel: TimingWheel[T] = wheel
        self.on_expire = on_expire
        self._armed_ms: int | None = None  # deadline the asyncio timer is set for
        self._armed: asyncio.TimerHandle | None = None
        self._closed = False
        self.wakeups = 0
        self.idle_wakeups = 0
        self.fired = 0

    def now_ms(self) -> int:
        """The driver's clock: the loop's, in ms, never going backwards. O(1)."""
        now = loop_ms(self._loop)
        self._last_ms = max(self._last_ms, now)
        return self._last_ms

    def __len__(self) -> int:
        """Pending timers (the wheel's count). O(1)."""
        return len(self.wheel)

    @property
    def armed_ms(self) -> int | None:
        """When the driver will next wake (loop ms), or None when nothing is armed."""
        return self._armed_ms

    def add(self, deadline_ms: int, item: T) -> TimerHandle[T]:
        """Fire ``item`` at ``deadline_ms`` (loop ms; a past deadline fires on the next wake-up).

        Returns the wheel's handle (``cancel()``; reschedule through
        :meth:`reschedule` so the wake-up can move earlier). O(levels).
        """
        if self._closed:
            raise StateError("the WheelDriver is closed")
        handle = self.wheel.add(deadline_ms, item)
        self._arm_for(deadline_ms)
        return handle

    def add_later(self, delay_ms: int, item: T) -> TimerHandle[T]:
        """Fire ``item`` ``delay_ms`` from now. O(levels)."""
        return self.add(self.now_ms() + delay_ms, item)

    def reschedule(self, handle: TimerHandle[T], deadline_ms: int) -> None:
        """Move a pending timer to ``deadline_ms`` and re-arm the wake-up if it is earlier."""
        handle.reschedule(deadline_ms)
        self._arm_for(deadline_ms)

    def rearm(self) -> None:
        """Re-arm after the wheel was changed behind the driver's back. O(levels).

        Sans-IO sessions (:class:`~imkit.session.ServerSession`) add and reschedule
        timers on a wheel they were given, without going through the driver; call
        this once after each batch of calls into them (e.g. at the end of a
        ``data_received``) so the wake-up moves earlier if a new timer needs it.
        """
        if self._closed:
            return
        nxt = self.wheel.next_deadline_ms()
        if nxt is not None:
            self._arm(nxt)

    def close(self) -> None:
        """Disarm the wake-up; pending timers never fire. Idempotent."""
        self._closed = True
        if self._armed is not None:
            self._armed.cancel()
        self._armed = None
        self._armed_ms = None

    def _arm_for(self, deadline_ms: int) -> None:
        # the wheel fires a timer at its deadline rounded up to a tick: wake then, not before
        tick = self.wheel.tick_ms
        self._arm(-(-deadline_ms // tick) * tick)

    def _arm(self, deadline_ms: int) -> None:
        until = self._catch_up_until
        if until is not None and deadline_ms < until:
            deadline_ms = until  # catching up: let the loop read before anything fires
        armed = self._armed_ms
        if armed is not None and armed <= deadline_ms:
            return
        if self._armed is not None:
            self._armed.cancel()
        self._armed_ms = deadline_ms
        # loop.time() is in seconds; wake exactly at the deadline, _wake trusts it
        self._armed = self._loop.call_at(deadline_ms / 1000, self._wake)

    def _wake(self) -> None:
        armed = self._armed_ms
        self._armed = None
        self._armed_ms = None
        if self._closed:
            return
        # The loop runs a timer up to its clock resolution early and ms truncation can
        # read one ms short: we were woken for `armed`, so it is at least that late.
        now = self.now_ms()
        if armed is not None and armed > now:
            now = self._last_ms = armed
        self.wakeups += 1
        if self._stalled(armed, now):
            assert self._catch_up_until is not None
            self.idle_wakeups += 1
            self._arm(self._catch_up_until)
            return
        expired = self.wheel.advance(now)
        if not expired:
            self.idle_wakeups += 1
        on_expire = self.on_expire
        for item in expired:
            try:
                on_expire(item)
            except Exception as exc:  # a timer callback's bug must not stop the others
                self._loop.call_exception_handler(
                    {"message": "WheelDriver on_expire raised", "exception": exc}
                )
        self.fired += len(expired)
        nxt = self.wheel.next_deadline_ms()
        if nxt is not None and not self._closed:
            self._arm(nxt)

    def _check(self) -> None:
        """Assert: while a timer is pending, a wake-up is armed; a catch-up keeps it armed."""
        if self._closed:
            return
        if self._catch_up_until is not None and self._armed_ms != self._catch_up_until:
            raise AssertionError("catching up, but not armed for the end of the catch-up")
        if not len(self.wheel):
            return
        if self._armed_ms is None or self._armed is None:
            raise AssertionError(f"{len(self.wheel)} timers pending but no wake-up is armed")


class DeadlineTimer(_StallCatchUp):
    """One asyncio timer for a sans-IO object that keeps its own timers.

    :class:`~imkit.session.ClientSession` keeps its own wheel and says when it next
    needs time (``next_deadline_ms()``); this arms a single ``loop.call_at`` for
    that moment and calls ``on_due(now_ms)`` then. Call :meth:`rearm` after every
    call into the object (it may have added an earlier timer); re-arming to the
    same deadline is free. ``rearm`` O(1) plus ``next_deadline_ms``.

    ``now_ms`` passed to ``on_due`` is the loop clock in ms, never below the
    deadline it was armed for (the loop may run a timer a hair early) and never
    going backwards.
    It may therefore run up to a millisecond ahead of :func:`loop_ms`: feed every
    other call into the same object from :meth:`now_ms` too, never from
    ``loop_ms()`` directly, or the object may see time go backwards.

    Like :class:`WheelDriver`, a wake-up later than ``stall_ms`` past its time
    waits ``catch_up_ms`` once (counted in :attr:`stalls`), so that a stalled
    client reads the server's frames before it judges the link dead.
    """

    def __init__(
        self,
        next_deadline_ms: Callable[[], int | None],
        on_due: Callable[[int], object],
        *,
        stall_ms: int | None = DEFAULT_STALL_MS,
        catch_up_ms: int = DEFAULT_CATCH_UP_MS,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(stall_ms, catch_up_ms)
        self._next = next_deadline_ms
        self._on_due = on_due
        self._loop = loop if loop is not None else running_loop()
        self._armed_ms: int | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._last_ms = loop_ms(self._loop)
        self._closed = False
        self.wakeups = 0

    def now_ms(self) -> int:
        """The loop clock in ms, never going backwards. O(1)."""
        self._last_ms = max(self._last_ms, loop_ms(self._loop))
        return self._last_ms

    @property
    def armed_ms(self) -> int | None:
        """The deadline the timer is armed for, or None."""
        return self._armed_ms

    def rearm(self) -> None:
        """Arm for the object's next deadline (or disarm when it has none)."""
        if self._closed:
            return
        deadline = self._next()
        until = self._catch_up_until
        if until is not None and deadline is not None and deadline < until:
            deadline = until  # catching up after a stall: read before anything is due
        if deadline == self._armed_ms:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_ms = deadline
        if deadline is not None:
            self._handle = self._loop.call_at(deadline / 1000, self._fire)

    def _fire(self) -> None:
        armed = self._armed_ms
        self._handle = None
        self._armed_ms = None
        if self._closed:
            return
        now = self.now_ms()
        if armed is not None and armed > now:
            now = self._last_ms = armed
        self.wakeups += 1
        if self._stalled(armed, now):
            self.rearm()
            return
        try:
            self._on_due(now)
        finally:
            self.rearm()

    def close(self) -> None:
        """Disarm for good. Idempotent."""
        self._closed = True
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._armed_ms = None
