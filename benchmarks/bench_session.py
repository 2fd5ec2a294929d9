"""Delivery sessions: messages/s through a ClientSession + ServerSession pair, bytes per session.

Two round trips are measured in memory, message objects in and out (no bytes: the
codec has its own benchmark):

* **send -> ack**: ``client.send`` -> ``server.receive(Send)`` -> ``SendRequested``
  -> ``server.ack_send`` -> ``client.receive(SendAck)`` -> ``SendAcked``;
* **push -> ack**: ``server.push(Push)`` -> ``client.receive(Push)`` ->
  ``MessageReceived`` + ``PushAck`` -> ``server.receive(PushAck)``.

The baseline is a minimal dict-based echo of the same frames: it builds the same
message objects and keeps one dict entry per unacknowledged message on each side,
with none of the state machines, dedup windows, timers, quotas or checks. The
ratio is the price of the delivery contract per message.

Memory: bytes per idle logged-in ServerSession (``tracemalloc`` over 20k sessions
sharing one wheel, as a gateway holds them), and after one send and one push
(when the lazily created dedup window and maps exist).

    python benchmarks/bench_session.py [--quick] [--write]
"""

from __future__ import annotations

import gc
import random
import tracemalloc
from functools import partial

from _harness import Report, measure, quick
from imkit.protocol import Login, LoginAck, Ping, Push, PushAck, Send, SendAck
from imkit.session import (
    ClientSession,
    MessageReceived,
    SendAcked,
    SendRequested,
    ServerConfig,
    ServerSession,
    ServerStats,
    ServerTimer,
    SessionEvent,
    SyncRequested,
)
from imkit.timingwheel import TimingWheel

N = 20_000 if quick() else 200_000
N_SESSIONS = 2_000 if quick() else 20_000
BODY = b"x" * 64


def authenticate(token: str, device: str) -> str:
    return token


#: One session carrying a whole benchmark's load: lift the per-connection frame rate
#: quota (it still runs: the token bucket is charged for every frame).
BENCH_CONFIG = ServerConfig(max_frames_per_s=10**9, frame_burst=10**9)


def make_pair() -> tuple[ClientSession, ServerSession, TimingWheel[ServerTimer]]:
    wheel: TimingWheel[ServerTimer] = TimingWheel()
    server = ServerSession(
        wheel=wheel, authenticate=authenticate, session_id="s", now_ms=0, config=BENCH_CONFIG
    )
    client = ClientSession(token="alice", device="d", now_ms=0, first_cid=1, rng=random.Random(1))
    for frame in client.connection_made(0):
        assert not isinstance(frame, SessionEvent)
        for out in server.receive(frame, 0):
            if isinstance(out, LoginAck):
                client.receive(out, 0)
            elif isinstance(out, SyncRequested):
                for f in server.sync_response(out.req_id, []):
                    assert not isinstance(f, SessionEvent)
                    client.receive(f, 0)
    return client, server, wheel


# --- the round trips through imkit's sessions ---------------------------------------


def imkit_send_ack(n: int) -> None:
    client, server, _ = make_pair()
    c_send, s_recv, s_ack, c_recv = client.send, server.receive, server.ack_send, client.receive
    acked = 0
    for i in range(n):
        now = i // 100  # many messages per ms, as under load
        _, frames = c_send("conv", BODY, now)
        for req in s_recv(frames[0], now):  # type: ignore[arg-type]
            assert isinstance(req, SendRequested)
            for ack in s_ack(req.cid, i + 1):
                for ev in c_recv(ack, now):  # type: ignore[arg-type]
                    acked += isinstance(ev, SendAcked)
    assert acked == n, acked


def imkit_push_ack(n: int) -> None:
    client, server, _ = make_pair()
    s_push, c_recv, s_recv = server.push, client.receive, server.receive
    got = 0
    for i in range(1, n + 1):
        now = i // 100
        for frame in s_push(Push(conv="conv", seq=i, sender="bob", body=BODY), now):
            for out in c_recv(frame, now):  # type: ignore[arg-type]
                if type(out) is MessageReceived:
                    got += 1
                else:
                    s_recv(out, now)  # type: ignore[arg-type]
    assert got == n and server.tracked_pushes == 0


# --- the baseline: a dict echo of the same frames -----------------------------------


def echo_send_ack(n: int) -> None:
    pending: dict[int, Send] = {}  # client side
    seen: dict[int, int] = {}  # server side: cid -> seq
    acked = 0
    for i in range(n):
        cid = i + 1
        msg = Send(cid=cid, conv="conv", body=BODY, client_ms=i // 100)
        pending[cid] = msg
        seen[msg.cid] = i + 1  # "store"
        ack = SendAck(cid=msg.cid, conv=msg.conv, seq=i + 1)
        if pending.pop(ack.cid, None) is not None:
            acked += 1
    assert acked == n


def echo_push_ack(n: int) -> None:
    tracked: dict[tuple[str, int], Push] = {}  # server side
    last: dict[str, int] = {}  # client side: conv -> last seq
    got = 0
    for i in range(1, n + 1):
        p = Push(conv="conv", seq=i, sender="bob", body=BODY)
        tracked[(p.conv, p.seq)] = p
        if p.seq > last.get(p.conv, 0):
            last[p.conv] = p.seq
            got += 1
        ack = PushAck(conv=p.conv, seq=p.seq)
        tracked.pop((ack.conv, ack.seq), None)
    assert got == n and not tracked


# --- memory ------------------------------------------------------------------------


def bytes_per_session(active: bool) -> float:
    """tracemalloc bytes per logged-in ServerSession (idle, or after a send and a push)."""
    wheel: TimingWheel[ServerTimer] = TimingWheel()
    stats = ServerStats()  # one set of counters per gateway, as the docs recommend
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    sessions = []
    for i in range(N_SESSIONS):
        s = ServerSession(
            wheel=wheel, authenticate=authenticate, session_id=f"s{i}", now_ms=0, stats=stats
        )
        s.receive(Login(token=f"user{i}", device="phone"), 0)
        if active:
            s.receive(Send(cid=1, conv="conv", body=BODY), 1)
            s.ack_send(1, 1)
            s.push(Push(conv="conv", seq=1, sender="bob", body=BODY), 1)
            s.receive(PushAck(conv="conv", seq=1), 2)
        s.receive(Ping(), 3)
        sessions.append(s)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    total = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    # the uid / session id strings belong to the gateway's tables too; count them anyway
    return total / N_SESSIONS


def main() -> None:
    report = Report("Delivery sessions (ClientSession + ServerSession in memory)")
    rows = []
    for name, mine, base in (
        ("send -> SendAck", imkit_send_ack, echo_send_ack),
        ("push -> PushAck", imkit_push_ack, echo_push_ack),
    ):
        r_imkit = measure(partial(mine, N), ops=N)
        r_base = measure(partial(base, N), ops=N)
        rows.append(
            [
                name,
                r_imkit.rate_str,
                f"{r_imkit.ns_per_op / 1000:.2f}",
                r_base.rate_str,
                f"{r_base.ns_per_op / 1000:.2f}",
                f"{r_base.rate / r_imkit.rate:.1f}x",
            ]
        )
    report.table(
        [
            "round trip",
            "imkit msgs/s",
            "imkit µs/msg",
            "dict echo msgs/s",
            "echo µs/msg",
            "echo faster by",
        ],
        rows,
        title=f"{N:,} messages per run, one client + one server session",
    )
    idle = bytes_per_session(active=False)
    active = bytes_per_session(active=True)
    report.table(
        ["ServerSession", "bytes per session"],
        [["logged in, idle", f"{idle:.0f}"], ["after one send + one push, acked", f"{active:.0f}"]],
        title=f"Memory over {N_SESSIONS:,} sessions sharing one TimingWheel (tracemalloc)",
    )
    report.note(
        """
The dict echo builds the same frame objects and keeps one dict entry per
unacknowledged message on each side; everything else a session does (login state,
CidWindow and ack cache, SeqWindow ordering, retry timers on the wheel, quotas,
heartbeat bookkeeping, typed events) is the difference. Memory includes the
session id and uid strings, the liveness timer and the frame token bucket (the
sessions share one ServerStats, as a gateway's do); the dedup window (a 512-byte
ring at the default cid_window=256) and the ack cache appear only once the
client sends, and stay: they are what makes a resend idempotent.
"""
    )
    report.emit(__file__)


if __name__ == "__main__":
    main()
