"""Tests of imkit.aio.WheelDriver: a timing wheel driven from an event loop."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from imkit.aio import (
    DeadlineTimer,
    FramedConnection,
    WheelDriver,
    loop_ms,
    serve,
    uvloop_available,
)
from imkit.aio import run as aio_run
from imkit.errors import ConfigError, StateError
from imkit.protocol import Connection, Login, Ping, Role
from imkit.timingwheel import TimerHandle

LOOPS = [
    False,
    pytest.param(True, marks=pytest.mark.skipif(not uvloop_available(), reason="no uvloop")),
]


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


class TestStalledLoop:
    """A loop that did not run for a while reads what arrived before timers judge silence."""

    def test_a_late_wakeup_waits_for_a_catch_up_then_fires(self) -> None:
        """Woken later than stall_ms: nothing fires until catch_up_ms later; stalls counts it."""
        loop = FakeLoop()
        fired: list[tuple[int, str]] = []
        driver: WheelDriver[str] = WheelDriver(
            lambda item: fired.append((driver.now_ms(), item)),
            stall_ms=1000,
            catch_up_ms=100,
            loop=cast(asyncio.AbstractEventLoop, loop),
        )
        start = driver.now_ms()
        driver.add(start + 500, "silent")
        driver.add(start + 500, "pinger")
        loop.now += 5.0  # the process was stopped for 5 s; the wake-up runs only now
        loop.run_until(loop.now)
        assert fired == [] and driver.stalls == 1
        assert driver.armed_ms == start + 5000 + 100
        loop.run_until(loop.now + 0.1)
        assert sorted(item for _, item in fired) == ["pinger", "silent"]
        assert all(t >= start + 5100 for t, _ in fired)

    def test_a_deadline_moved_during_the_catch_up_does_not_fire(self) -> None:
        """A timer rescheduled during the catch-up (a frame read) survives the stall."""
        loop = FakeLoop()
        fired: list[str] = []
        driver: WheelDriver[str] = WheelDriver(
            fired.append, stall_ms=1000, catch_up_ms=100, loop=cast(asyncio.AbstractEventLoop, loop)
        )
        start = driver.now_ms()
        driver.add(start + 500, "silent")
        pinger = driver.add(start + 500, "pinger")
        loop.now += 5.0
        loop.run_until(loop.now)
        assert fired == []
        driver.reschedule(pinger, driver.now_ms() + 500)  # its ping, read during the catch-up
        loop.run_until(loop.now + 0.1)
        assert fired == ["silent"]
        loop.run_until(loop.now + 1.0)
        assert fired == ["silent", "pinger"]

    def test_sustained_lateness_postpones_only_once(self) -> None:
        """A loop late on every wake-up (overload) gets one catch-up, then timers fire."""
        loop = FakeLoop()
        fired: list[str] = []
        driver: WheelDriver[str] = WheelDriver(
            fired.append, stall_ms=1000, catch_up_ms=100, loop=cast(asyncio.AbstractEventLoop, loop)
        )
        start = driver.now_ms()
        driver.add(start + 500, "a")
        loop.now += 5.0
        loop.run_until(loop.now)  # late: catch-up
        assert fired == [] and driver.stalls == 1
        loop.now += 3.0  # the catch-up wake-up is itself 3 s late: fire, do not postpone again
        loop.run_until(loop.now)
        assert fired == ["a"] and driver.stalls == 1

    def test_a_new_stall_after_an_on_time_wakeup_gets_its_own_catch_up(self) -> None:
        """Once a wake-up came on time, the next stall is caught up again (counted twice)."""
        loop = FakeLoop()
        fired: list[str] = []
        driver: WheelDriver[str] = WheelDriver(
            fired.append, stall_ms=1000, catch_up_ms=100, loop=cast(asyncio.AbstractEventLoop, loop)
        )
        start = driver.now_ms()
        driver.add(start + 500, "a")
        loop.now += 5.0
        loop.run_until(loop.now + 0.1)
        assert fired == ["a"]
        driver.add_later(50, "on time")
        loop.run_until(loop.now + 0.05)
        assert fired == ["a", "on time"]
        driver.add_later(500, "b")
        loop.now += 5.0
        loop.run_until(loop.now)
        assert fired == ["a", "on time"] and driver.stalls == 2
        loop.run_until(loop.now + 0.1)
        assert fired == ["a", "on time", "b"]

    def test_bad_keywords_are_refused(self) -> None:
        """stall_ms and catch_up_ms must be positive (or stall_ms None: no catch-up)."""
        loop = cast(asyncio.AbstractEventLoop, FakeLoop())
        with pytest.raises(ConfigError):
            WheelDriver(print, stall_ms=0, loop=loop)
        with pytest.raises(ConfigError):
            WheelDriver(print, catch_up_ms=0, loop=loop)
        fired: list[str] = []
        fake = FakeLoop()
        driver: WheelDriver[str] = WheelDriver(
            fired.append, stall_ms=None, loop=cast(asyncio.AbstractEventLoop, fake)
        )
        driver.add_later(10, "x")
        fake.now += 5.0
        fake.run_until(fake.now)
        assert fired == ["x"] and driver.stalls == 0

    def test_bad_keyword_types_are_config_errors(self) -> None:
        """stall_ms, catch_up_ms, tick_ms of the wrong type raise ConfigError, not TypeError."""
        loop = cast(asyncio.AbstractEventLoop, FakeLoop())
        for kwargs in ({"stall_ms": "1"}, {"catch_up_ms": None}, {"stall_ms": 1.5}):
            with pytest.raises(ConfigError):
                WheelDriver(print, loop=loop, **kwargs)
            with pytest.raises(ConfigError):
                DeadlineTimer(lambda: None, print, loop=loop, **kwargs)

    def test_no_running_loop_is_a_state_error(self) -> None:
        """Without a running loop (and no loop=), the timers and loop_ms raise StateError."""
        with pytest.raises(StateError):
            WheelDriver(print)
        with pytest.raises(StateError):
            DeadlineTimer(lambda: None, print)
        with pytest.raises(StateError):
            loop_ms()

    @pytest.mark.parametrize("use_uvloop", LOOPS, ids=["asyncio", "uvloop"])
    def test_a_blocked_loop_does_not_cut_a_client_that_kept_pinging(self, use_uvloop: bool) -> None:
        """Loop blocked 2.5 s (deadline 0.4 s): the pinging peer survives, the silent one is cut."""
        deadline_ms = 400
        cut: list[str] = []
        stop = threading.Event()
        quiet = threading.Event()

        def peer(port: int, name: str, silent_after: threading.Event | None) -> None:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                codec = Connection(Role.CLIENT)
                sock.sendall(codec.send(Login(token="t", device=name)))
                while not stop.is_set():
                    if silent_after is None or not silent_after.is_set():
                        sock.sendall(codec.send(Ping()))
                    time.sleep(0.05)

        async def main() -> tuple[list[str], int]:
            driver: WheelDriver[str] = WheelDriver(cut.append)  # default stall_ms / catch_up_ms
            handles: dict[str, TimerHandle[str]] = {}

            async def handler(conn: FramedConnection) -> None:
                name = ""
                async for msg in conn:
                    if isinstance(msg, Login):
                        name = msg.device
                        handles[name] = driver.add_later(deadline_ms, name)
                    elif isinstance(msg, Ping) and name in handles:
                        driver.reschedule(handles[name], driver.now_ms() + deadline_ms)

            async with await serve(handler, "127.0.0.1", 0) as server:
                threads = [
                    threading.Thread(target=peer, args=(server.port, "pinger", None)),
                    threading.Thread(target=peer, args=(server.port, "silent", quiet)),
                ]
                for t in threads:
                    t.start()
                try:
                    for _ in range(200):
                        if len(handles) == 2:
                            break
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(0.5)
                    assert cut == []
                    quiet.set()
                    time.sleep(2.5)  # the loop is blocked; "pinger" keeps sending
                    await asyncio.sleep(1.0)
                    return list(cut), driver.stalls
                finally:
                    stop.set()
                    for t in threads:
                        await asyncio.get_running_loop().run_in_executor(None, t.join, 5)
                    driver.close()

        out, stalls = aio_run(main(), use_uvloop=use_uvloop)
        assert out == ["silent"] and stalls >= 1

    def test_deadline_timer_catches_up_after_a_stall(self) -> None:
        """DeadlineTimer woken 5 s late calls on_due only catch_up_ms later, once per stall."""
        loop = FakeLoop()
        deadlines: list[int] = []
        calls: list[int] = []

        def on_due(now_ms: int) -> None:
            calls.append(now_ms)
            deadlines.clear()

        timer = DeadlineTimer(
            lambda: deadlines[0] if deadlines else None,
            on_due,
            stall_ms=1000,
            catch_up_ms=100,
            loop=cast(asyncio.AbstractEventLoop, loop),
        )
        start = timer.now_ms()
        deadlines.append(start + 500)
        timer.rearm()
        loop.now += 5.0
        loop.run_until(loop.now)
        assert calls == [] and timer.stalls == 1 and timer.armed_ms == start + 5100
        timer.rearm()  # a call into the object during the catch-up keeps the catch-up
        assert timer.armed_ms == start + 5100
        loop.run_until(loop.now + 0.1)
        assert calls == [start + 5100]
