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

Single loop, single thread: call every method from the loop's thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from imkit.aio._loop import loop_ms
from imkit.timingwheel import DEFAULT_TICK_MS, DEFAULT_WHEEL_SIZE, TimerHandle, TimingWheel

__all__ = ["DeadlineTimer", "WheelDriver"]

T = TypeVar("T")


class WheelDriver(Generic[T]):
    """A timing wheel on the event loop: ``on_expire(item)`` runs when an item's deadline passes.

    ``add`` costs the wheel's insert (O(levels)) plus O(1) to move the single
    asyncio wake-up earlier when needed; ``cancel`` through the returned handle is
    the wheel's O(1) (a wake-up left armed for a cancelled timer is harmless: it
    finds nothing and re-arms for the next deadline). Each wake-up is O(expired +
    levels).

    ``on_expire`` runs synchronously from the loop; an exception it raises goes to
    the loop's exception handler and does not stop the other timers.

    Counters for tests and benchmarks: :attr:`wakeups` (times the driver ran),
    :attr:`idle_wakeups` (of those, the ones that expired nothing), :attr:`fired`.
    """

    def __init__(
        self,
        on_expire: Callable[[T], object],
        *,
        tick_ms: int = DEFAULT_TICK_MS,
        wheel_size: int = DEFAULT_WHEEL_SIZE,
        loop: asyncio.AbstractEventLoop | None = None,
        wheel: TimingWheel[T] | None = None,
    ) -> None:
        self._loop = loop if loop is not None else asyncio.get_running_loop()
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
            raise RuntimeError("the WheelDriver is closed")
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
        """Assert: while a timer is pending, a wake-up is armed (tests also check its time)."""
        if self._closed or not len(self.wheel):
            return
        if self._armed_ms is None or self._armed is None:
            raise AssertionError(f"{len(self.wheel)} timers pending but no wake-up is armed")


class DeadlineTimer:
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
    """

    def __init__(
        self,
        next_deadline_ms: Callable[[], int | None],
        on_due: Callable[[int], object],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._next = next_deadline_ms
        self._on_due = on_due
        self._loop = loop if loop is not None else asyncio.get_running_loop()
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
