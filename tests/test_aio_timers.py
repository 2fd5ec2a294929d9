"""Tests of imkit.aio.WheelDriver: a timing wheel driven from an event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from imkit.aio import DeadlineTimer, WheelDriver, loop_ms
from imkit.timingwheel import TimerHandle


class _FakeHandle:
    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The three loop methods WheelDriver uses, on a virtual clock that tests move."""

    def __init__(self) -> None:
        self.now = 1000.0  # seconds
        self.scheduled: list[_FakeHandle] = []
        self.errors: list[dict[str, Any]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], object]) -> _FakeHandle:
        handle = _FakeHandle(when, callback)
        self.scheduled.append(handle)
        return handle

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)

    def armed(self) -> list[_FakeHandle]:
        return [h for h in self.scheduled if not h.cancelled]

    def run_until(self, t: float) -> None:
        """Run due callbacks in time order, each at exactly its time, like an ideal loop."""
        while True:
            due = [h for h in self.armed() if h.when <= t]
            if not due:
                break
            first = min(due, key=lambda h: h.when)
            self.scheduled.remove(first)
            self.now = max(self.now, first.when)
            first.callback()
        self.scheduled = self.armed()
        self.now = max(self.now, t)


def fake_driver(
    fired: list[tuple[int, str]], tick_ms: int = 10
) -> tuple[FakeLoop, WheelDriver[str]]:
    loop = FakeLoop()
    driver_box: list[WheelDriver[str]] = []

    def on_expire(item: str) -> None:
        fired.append((driver_box[0].now_ms(), item))

    driver = WheelDriver(
        on_expire, tick_ms=tick_ms, wheel_size=4, loop=cast(asyncio.AbstractEventLoop, loop)
    )
    driver_box.append(driver)
    return loop, driver


class TestWheelDriverOnAFakeClock:
    def test_idle_driver_arms_nothing(self) -> None:
        """With no timer pending, nothing is armed and moving time causes no wake-up."""
        fired: list[tuple[int, str]] = []
        loop, driver = fake_driver(fired)
        loop.run_until(loop.now + 3600)
        assert loop.armed() == [] and driver.wakeups == 0

    def test_fires_at_the_tick_boundary(self) -> None:
        """A timer fires at its deadline rounded up to a tick, never earlier."""
        fired: list[tuple[int, str]] = []
        loop, driver = fake_driver(fired)
        start = driver.now_ms()
        driver.add(start + 25, "a")
        loop.run_until(loop.now + 1)
        assert fired == [(start + 30, "a")]
        assert loop.armed() == []

    def test_earlier_timer_moves_the_wakeup(self) -> None:
        """Adding a timer before the armed one re-arms earlier and cancels the old wake-up."""
        fired: list[tuple[int, str]] = []
        loop, driver = fake_driver(fired)
        start = driver.now_ms()
        driver.add(start + 5000, "late")
        first = driver.armed_ms
        driver.add(start + 20, "soon")
        assert driver.armed_ms is not None and first is not None and driver.armed_ms < first
        assert len(loop.armed()) == 1
        loop.run_until(loop.now + 0.02)
        assert fired == [(start + 20, "soon")]

    def test_callback_errors_go_to_the_loop(self) -> None:
        """An exception in on_expire reaches the loop's handler; other timers still fire."""
        loop = FakeLoop()
        seen: list[str] = []

        def on_expire(item: str) -> None:
            if item == "bad":
                raise ValueError(item)
            seen.append(item)

        driver = WheelDriver(on_expire, loop=cast(asyncio.AbstractEventLoop, loop))
        now = driver.now_ms()
        driver.add(now + 10, "bad")
        driver.add(now + 10, "good")
        loop.run_until(loop.now + 1)
        assert seen == ["good"] and len(loop.errors) == 1

    def test_close_disarms(self) -> None:
        """After close nothing is armed, nothing fires, and add is refused."""
        fired: list[tuple[int, str]] = []
        loop, driver = fake_driver(fired)
        driver.add_later(10, "x")
        driver.close()
        loop.run_until(loop.now + 1)
        assert fired == [] and loop.armed() == []
        with pytest.raises(RuntimeError):
            driver.add_later(10, "y")


class DriverMachine(RuleBasedStateMachine):
    """WheelDriver on a fake loop against a heap of (due tick time, order, item)."""

    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.fired: list[tuple[int, str]] = []
        self.loop, self.driver = fake_driver(self.fired, tick_ms=10)
        self.model: dict[str, int] = {}  # item -> when it must fire
        self.counter = 0

    def due(self, deadline: int) -> int:
        """When a timer set now fires: its deadline rounded up to a tick, or now if past."""
        return max(-(-deadline // 10) * 10, self.driver.now_ms())

    @rule(target=handles, delay=st.integers(-20, 3000))
    def add(self, delay: int) -> tuple[str, TimerHandle[str]]:
        self.counter += 1
        item = f"t{self.counter}"
        deadline = self.driver.now_ms() + delay
        self.model[item] = self.due(deadline)
        return item, self.driver.add(deadline, item)

    @rule(entry=handles)
    def cancel(self, entry: tuple[str, TimerHandle[str]]) -> None:
        item, handle = entry
        handle.cancel()
        self.model.pop(item, None)

    @rule(entry=handles, delay=st.integers(0, 3000))
    def reschedule(self, entry: tuple[str, TimerHandle[str]], delay: int) -> None:
        item, handle = entry
        deadline = self.driver.now_ms() + delay
        self.driver.reschedule(handle, deadline)
        self.model[item] = self.due(deadline)

    @rule(dt=st.integers(0, 4000))
    def run(self, dt: int) -> None:
        start = self.driver.now_ms()
        self.fired.clear()
        self.loop.run_until(self.loop.now + dt / 1000)
        end = self.driver.now_ms()
        expected = [(due, item) for item, due in self.model.items() if due <= end]
        assert all(due >= start for due, _ in expected)
        assert sorted(self.fired) == sorted(expected)
        for _, item in self.fired:
            del self.model[item]

    @invariant()
    def check(self) -> None:
        self.driver._check()
        self.driver.wheel._check()
        assert len(self.driver) == len(self.model)
        armed = self.loop.armed()
        assert len(armed) <= 1  # one asyncio timer, whatever the number of pending timers
        if self.model:
            earliest = min(self.model.values())
            assert self.driver.armed_ms is not None and self.driver.armed_ms <= earliest


DriverMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=30)
TestDriverMachine = DriverMachine.TestCase


class TestWheelDriverOnARealLoop:
    def test_no_wakeups_while_idle(self) -> None:
        """After its timers fire, an idle driver does not wake again."""

        async def main() -> tuple[int, int, int]:
            done = asyncio.Event()
            driver: WheelDriver[str] = WheelDriver(lambda _: done.set(), tick_ms=10)
            await asyncio.sleep(0.05)
            before = driver.wakeups
            driver.add_later(20, "x")
            await done.wait()
            after_fire = driver.wakeups
            await asyncio.sleep(0.2)
            return before, after_fire, driver.wakeups

        before, after_fire, end = asyncio.run(main())
        assert before == 0
        assert 1 <= after_fire <= 2
        assert end == after_fire

    def test_timers_fire_in_order_never_early(self) -> None:
        """Timers fire in deadline order and never before their deadline on the loop clock."""

        async def main() -> list[tuple[int, int]]:
            out: list[tuple[int, int]] = []
            done = asyncio.Event()

            def on_expire(deadline: int) -> None:
                out.append((deadline, loop_ms()))
                if len(out) == 5:
                    done.set()

            driver: WheelDriver[int] = WheelDriver(on_expire, tick_ms=5)
            now = driver.now_ms()
            for delay in (40, 10, 30, 20, 50):
                driver.add(now + delay, now + delay)
            await done.wait()
            driver.close()
            return out

        out = asyncio.run(main())
        assert [d for d, _ in out] == sorted(d for d, _ in out)
        assert all(fired >= deadline for deadline, fired in out)


class TestRearmAndDeadlineTimer:
    def test_rearm_sees_timers_added_behind_the_drivers_back(self) -> None:
        """A timer added straight to the wheel is picked up by rearm() and fires."""
        fired: list[tuple[int, str]] = []
        loop, driver = fake_driver(fired)
        now = driver.now_ms()
        driver.wheel.add(now + 20, "direct")
        assert driver.armed_ms is None
        driver.rearm()
        assert driver.armed_ms == now + 20
        loop.run_until(loop.now + 0.02)
        assert fired == [(now + 20, "direct")]

    def test_deadline_timer_follows_the_objects_next_deadline(self) -> None:
        """DeadlineTimer arms for next_deadline_ms(), calls on_due at it, disarms on None."""
        loop = FakeLoop()
        deadlines: list[int] = []
        calls: list[int] = []

        def next_deadline() -> int | None:
            return deadlines[0] if deadlines else None

        def on_due(now_ms: int) -> None:
            calls.append(now_ms)
            deadlines.pop(0)

        timer = DeadlineTimer(next_deadline, on_due, loop=cast(asyncio.AbstractEventLoop, loop))
        start = timer.now_ms()
        timer.rearm()
        assert timer.armed_ms is None and loop.armed() == []
        deadlines.extend([start + 50, start + 80])
        timer.rearm()
        timer.rearm()  # same deadline: nothing re-armed
        assert timer.armed_ms == start + 50 and len(loop.armed()) == 1
        loop.run_until(loop.now + 1)
        assert calls == [start + 50, start + 80]
        assert timer.armed_ms is None and timer.wakeups == 2
        timer.close()
        deadlines.append(start + 2000)
        timer.rearm()
        assert loop.armed() == []
