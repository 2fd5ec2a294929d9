"""imkit.aio: frames/s through a loopback client-server pair, and timer-driver wake-ups.

1. **send -> ack over loopback TCP.** A client keeps a window of ``Send`` frames in
   flight; the server answers each with a ``SendAck`` (no session, no store: the
   transport alone). Measured with write coalescing (one ``transport.write`` per loop
   iteration) and without (one write per frame), on the standard loop and on
   uvloop, beside two peers doing the same exchange: websockets' asyncio
   implementation (a sans-IO core wired to asyncio, like imkit.aio) and a bare
   asyncio Protocol with a 4-byte length prefix and no codec (the floor).
2. **Timers while idle.** 10k pending timers 30-60 s away and nothing else for a
   while: how often the loop wakes with :class:`~imkit.aio.WheelDriver` (it sleeps
   until the next deadline) versus a naive ticker that advances the wheel every
   tick, and the CPU each uses.
3. **Timer lateness.** 500 timers spread over 0.5 s: how late each fires with the
   WheelDriver (10 ms ticks) versus ``loop.call_at`` (exact heap timers).
4. **Arming and cancelling** 100k timers: WheelDriver versus ``loop.call_later``.

    python benchmarks/bench_aio.py [--quick] [--write]

Caveats: both ends run on one event loop in one process, so a send -> ack pair costs
both ends' work (two encodes, two decodes, two transport writes at most); absolute
rates swing with machine load, ratios much less. The floor decodes nothing.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _harness import Report, fmt_rate, measure, quick
from imkit.aio import (
    FramedConnection,
    Server,
    WheelDriver,
    loop_ms,
    new_event_loop,
    serve,
    uvloop_available,
)
from imkit.protocol import Message, Role, Send, SendAck

N_FRAMES = 20_000 if quick() else 50_000  # full run: about a minute in all
WINDOW = 64  # sends in flight, the ClientSession's default max_in_flight
REPEAT = 3 if quick() else 5
IDLE_S = 0.5 if quick() else 3.0
BODY = b"x" * 120  # a typical short chat message


# --- 1. send -> ack ------------------------------------------------------------------


class AckServer(FramedConnection):
    """Answers every Send inline (no queue, no task): the transport's own cost."""

    def message_received(self, message: Message) -> None:
        assert isinstance(message, Send)
        self.send(SendAck(cid=message.cid, conv=message.conv, seq=message.cid))


class WindowClient(FramedConnection):
    """Keeps WINDOW sends in flight until `total` acks came back."""

    def start(self, total: int) -> asyncio.Future[None]:
        assert self._loop is not None
        self.total = total
        self.sent = 0
        self.acked = 0
        self.done: asyncio.Future[None] = self._loop.create_future()
        for _ in range(min(WINDOW, total)):
            self._next()
        return self.done

    def _next(self) -> None:
        self.sent += 1
        self.send(Send(cid=self.sent, conv="room", body=BODY))

    def message_received(self, message: Message) -> None:
        self.acked += 1
        if self.sent < self.total:
            self._next()
        elif self.acked == self.total:
            self.done.set_result(None)


async def task_handler(conn: FramedConnection) -> None:
    """The usual gateway shape: a task per connection reading with ``async for``."""
    async for message in conn:
        assert isinstance(message, Send)
        conn.send(SendAck(cid=message.cid, conv=message.conv, seq=message.cid))


Pair = tuple[Callable[[int], Awaitable[None]], Callable[[], Any], Callable[[], int]]


async def imkit_pair(coalesce: bool, inline: bool) -> Pair:
    loop = asyncio.get_running_loop()
    kwargs: dict[str, Any] = {"coalesce": coalesce, "handshake_timeout_ms": None}
    served: list[FramedConnection] = []
    server: Server | asyncio.Server
    if inline:

        def server_factory() -> FramedConnection:
            conn = AckServer(Role.SERVER, **kwargs)
            served.append(conn)
            return conn

        server = await loop.create_server(server_factory, "127.0.0.1", 0)
    else:
        server = await serve(task_handler, "127.0.0.1", 0, **kwargs)
    port = server.sockets[0].getsockname()[1]

    def client_factory() -> FramedConnection:
        return WindowClient(Role.CLIENT, coalesce=coalesce, handshake_timeout_ms=None)

    _, client = await loop.create_connection(client_factory, "127.0.0.1", port)
    assert isinstance(client, WindowClient)

    async def round_trip(n: int) -> None:
        await client.start(n)

    closing: list[asyncio.Task[None]] = []

    def close() -> None:
        client.close()
        if isinstance(server, Server):
            closing.append(loop.create_task(server.aclose()))
        else:
            server.close()

    def writes() -> int:
        conns = served if inline else list(server.connections)  # type: ignore[union-attr]
        return client.writes + sum(c.writes for c in conns)

    return round_trip, close, writes


class RawServer(asyncio.Protocol):
    """The floor: 4-byte length prefix, echo a fixed 16-byte ack per frame, no codec."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: Any = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        pos = 0
        out = []
        while len(buf) - pos >= 4:
            (n,) = struct.unpack_from(">I", buf, pos)
            if len(buf) - pos - 4 < n:
                break
            pos += 4 + n
            out.append(b"\x00\x00\x00\x0cACK-ACK-ACK!")
        self.buf = buf[pos:]
        if out:
            self.t.write(b"".join(out))


class RawClient(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: Any = transport
        self.buf = b""
        self.frame = struct.pack(">I", len(BODY) + 20) + BODY + b"\x00" * 20

    def start(self, total: int) -> asyncio.Future[None]:
        self.total, self.sent, self.acked = total, 0, 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        k = min(WINDOW, total)
        self.sent = k
        self.t.write(self.frame * k)
        return self.done

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        n = len(buf) // 16
        self.buf = buf[n * 16 :]
        self.acked += n
        more = min(n, self.total - self.sent)
        if more > 0:
            self.sent += more
            self.t.write(self.frame * more)
        if self.acked >= self.total and not self.done.done():
            self.done.set_result(None)


async def raw_pair() -> Pair:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RawServer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(RawClient, "127.0.0.1", port)

    async def round_trip(n: int) -> None:
        await client.start(n)

    def close() -> None:
        client.t.close()
        server.close()

    return round_trip, close, lambda: 0


async def websockets_pair() -> Pair:
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import ServerConnection, serve

    async def handler(ws: ServerConnection) -> None:
        async for msg in ws:
            await ws.send(msg[:16])

    server = await serve(handler, "127.0.0.1", 0, compression=None)
    port = server.sockets[0].getsockname()[1]
    ws = await connect(f"ws://127.0.0.1:{port}", compression=None)

    async def round_trip(n: int) -> None:
        async def reader() -> None:
            for _ in range(n):
                await ws.recv()

        task = asyncio.create_task(reader())
        sent = 0
        # keep about WINDOW in flight: websockets has no window; send in steps
        while sent < n:
            k = min(WINDOW, n - sent)
            for _ in range(k):
                await ws.send(BODY)
            sent += k
            await asyncio.sleep(0)
        await task

    def close() -> None:
        server.close()

    return round_trip, close, lambda: 0


def pair(make: Callable[[], Awaitable[Pair]], use_uvloop: bool) -> tuple[float, str]:
    """Send -> ack pairs per second (median), and transport writes per 100 frames."""
    loop = new_event_loop(use_uvloop=use_uvloop)
    try:
        round_trip, close, writes = loop.run_until_complete(make())
        n = N_FRAMES
        r = measure(lambda: loop.run_until_complete(round_trip(n)), ops=n, repeat=REPEAT)
        frames = 2 * n * (REPEAT + 1)  # sends and acks, warm-up included
        per_100 = f"{writes() / frames * 100:.1f}" if writes() else "-"
        close()
        loop.run_until_complete(asyncio.sleep(0.05))
        return r.rate, per_100
    finally:
        loop.close()


def section_frames(report: Report) -> None:
    import websockets

    loops = [False, True] if uvloop_available() else [False]
    rows = []
    for use_uvloop in loops:
        name = "uvloop" if use_uvloop else "asyncio"
        rates = {
            "imkit, inline handler, coalesced": pair(lambda: imkit_pair(True, True), use_uvloop),
            "imkit, inline handler, write per frame": pair(
                lambda: imkit_pair(False, True), use_uvloop
            ),
            "imkit, recv() task, coalesced": pair(lambda: imkit_pair(True, False), use_uvloop),
            "imkit, recv() task, write per frame": pair(
                lambda: imkit_pair(False, False), use_uvloop
            ),
            f"websockets {websockets.__version__} (asyncio)": pair(websockets_pair, use_uvloop),
            "bare Protocol, no codec (floor)": pair(raw_pair, use_uvloop),
        }
        base = rates["imkit, recv() task, coalesced"][0]
        for impl, (rate, per_100) in rates.items():
            rows.append([name, impl, fmt_rate(rate), f"{rate / base:.2f}", per_100])
    report.table(
        ["loop", "implementation", "send->ack pairs/s", "vs recv() task coalesced",
         "writes per 100 frames"],
        rows,
        title=f"Send -> SendAck over loopback, {WINDOW} in flight, {len(BODY)}-byte bodies",
    )


# --- 2. idle wake-ups ----------------------------------------------------------------


async def idle_driver(seconds: float) -> tuple[int, float]:
    driver: WheelDriver[int] = WheelDriver(lambda _: None)
    now = driver.now_ms()
    for i in range(10_000):
        driver.add(now + 30_000 + i * 3, i)
    cpu0 = time.process_time()
    await asyncio.sleep(seconds)
    cpu = time.process_time() - cpu0
    driver.close()
    return driver.wakeups, cpu


async def idle_ticker(seconds: float, tick_ms: int = 10) -> tuple[int, float]:
    from imkit.timingwheel import TimingWheel

    loop = asyncio.get_running_loop()
    wheel: TimingWheel[int] = TimingWheel(tick_ms=tick_ms, start_ms=loop_ms(loop))
    now = loop_ms(loop)
    for i in range(10_000):
        wheel.add(now + 30_000 + i * 3, i)
    wakeups = 0
    stop = False

    def tick() -> None:
        nonlocal wakeups
        wakeups += 1
        wheel.advance(loop_ms(loop))
        if not stop:
            loop.call_later(tick_ms / 1000, tick)

    loop.call_later(tick_ms / 1000, tick)
    cpu0 = time.process_time()
    await asyncio.sleep(seconds)
    cpu = time.process_time() - cpu0
    stop = True
    return wakeups, cpu


def section_idle(report: Report) -> None:
    loop = new_event_loop(use_uvloop=False)
    try:
        w_driver, cpu_driver = loop.run_until_complete(idle_driver(IDLE_S))
        w_ticker, cpu_ticker = loop.run_until_complete(idle_ticker(IDLE_S))
    finally:
        loop.close()
    report.table(
        ["driver", "wake-ups", "wake-ups/s", "CPU ms"],
        [
            ["WheelDriver (sleeps to next deadline)", w_driver, f"{w_driver / IDLE_S:.1f}",
             f"{cpu_driver * 1000:.1f}"],
            ["naive ticker (every 10 ms tick)", w_ticker, f"{w_ticker / IDLE_S:.1f}",
             f"{cpu_ticker * 1000:.1f}"],
        ],
        title=f"Idle for {IDLE_S:g} s with 10k timers pending 30-60 s ahead",
    )


# --- 3. lateness ---------------------------------------------------------------------


async def lateness_driver(n: int, span_ms: int) -> list[float]:
    loop = asyncio.get_running_loop()
    late: list[float] = []
    done = loop.create_future()

    def fire(deadline_s: float) -> None:
        late.append((loop.time() - deadline_s) * 1000)
        if len(late) == n and not done.done():
            done.set_result(None)

    driver: WheelDriver[float] = WheelDriver(fire, tick_ms=10)
    now = driver.now_ms()
    for i in range(n):
        deadline = now + 20 + (i * span_ms) // n
        driver.add(deadline, deadline / 1000)
    await done
    driver.close()
    return late


async def lateness_call_at(n: int, span_ms: int) -> list[float]:
    loop = asyncio.get_running_loop()
    late: list[float] = []
    done = loop.create_future()

    def fire(deadline_s: float) -> None:
        late.append((loop.time() - deadline_s) * 1000)
        if len(late) == n and not done.done():
            done.set_result(None)

    now = loop.time()
    for i in range(n):
        when = now + 0.02 + (i * span_ms) / n / 1000
        loop.call_at(when, fire, when)
    await done
    return late


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def section_lateness(report: Report) -> None:
    loop = new_event_loop(use_uvloop=False)
    try:
        rows = []
        for name, fn in (
            ("WheelDriver, 10 ms ticks", lateness_driver),
            ("loop.call_at (heap)", lateness_call_at),
        ):
            late = loop.run_until_complete(fn(500, 500))
            rows.append(
                [name, f"{min(late):.2f}", f"{statistics.median(late):.2f}",
                 f"{pct(late, 0.99):.2f}", f"{max(late):.2f}"]
            )
    finally:
        loop.close()
    report.table(
        ["timers", "min ms", "median ms", "p99 ms", "max ms"],
        rows,
        title="Lateness of 500 timers spread over 0.5 s (negative = early)",
    )


# --- 4. arming and cancelling --------------------------------------------------------


def section_arming(report: Report) -> None:
    loop = new_event_loop(use_uvloop=False)
    n = 100_000
    try:

        async def make_driver() -> WheelDriver[int]:
            return WheelDriver(lambda _: None)

        driver = loop.run_until_complete(make_driver())
        now = driver.now_ms()
        deadlines = [now + 1_000 + (i * 7919) % 60_000 for i in range(n)]

        def wheel_arm_cancel() -> None:
            add = driver.add
            for i, d in enumerate(deadlines):
                add(d, i).cancel()

        def call_later_arm_cancel() -> None:
            later = loop.call_later
            for d in deadlines:
                later((d - now) / 1000, int).cancel()

        r_wheel = measure(wheel_arm_cancel, ops=n, repeat=REPEAT)
        gc.collect()
        r_heap = measure(call_later_arm_cancel, ops=n, repeat=REPEAT)
        driver.close()
    finally:
        loop.close()
    report.table(
        ["timers", "arm + cancel /s", "ratio"],
        [
            ["WheelDriver.add + handle.cancel", r_wheel.rate_str, f"{r_wheel.ratio(r_heap):.2f}"],
            ["loop.call_later + cancel", r_heap.rate_str, "1.00"],
        ],
        title=f"Arm then cancel {n // 1000}k timers 1-61 s ahead",
    )


def main() -> None:
    report = Report("imkit.aio: transport and timers")
    report.note(__doc__.split("\n\n", 1)[1].split("    python", 1)[0])
    section_frames(report)
    section_idle(report)
    section_lateness(report)
    section_arming(report)
    report.emit(__file__)


if __name__ == "__main__":
    main()
