"""Huge groups: what MessageMerger and SignalAggregator save, on a virtual clock.

Scenario 1 (the seed's 超大群): one group of 10,000 members receives 100 messages/s
(Poisson arrivals) for 10 s. A push to the group is one fan-out of N member pushes;
the fan-out is modelled as finishing ``N x 15 us`` after it starts (PEERS.md:
Mosquitto spends 15-17 us of CPU per group delivery), i.e. 150 ms for 10k members.
Without the merger every message is its own fan-out, all concurrent; with it at most
``max_inflight`` fan-outs run per group and the rest is merged into batches.

Bytes are estimated as the protocol sends them: each message is a cbor2-encoded
tuple ``(conv, seq, sender, body, msg_id, server_ms)`` with a 40-200 byte chat body;
a batch is the cbor2 list of its messages, lz4.block-compressed (size-prefixed)
when at least 512 bytes (the protocol's compress threshold) and smaller that way;
every frame adds an 8-byte header.

Scenario 2 (信令聚合): users each in 3 of 10 big groups in push-pull mode; every
message of a group sends each member a pull signal. Signals per user per second with
and without SignalAggregator.

Also: the CPU cost of the merger per message beside a plain list append.
"""

from __future__ import annotations

import heapq
import random

import cbor2
import lz4.block

from _harness import Report, measure, quick
from imkit.merger import MessageMerger, Release, ReleaseKind, SignalAggregator

MEMBERS = 10_000
RATE = 100  # messages per second into the group
DURATION_MS = 10_000
PER_DELIVERY_US = 15  # PEERS.md: Mosquitto, group of 1000, 15-17 us per delivery
FANOUT_MS = MEMBERS * PER_DELIVERY_US // 1000  # one push to the whole group
HEADER = 8
COMPRESS_THRESHOLD = 512
CONV = "group-000042"

WORDS = [
    "ok", "yes", "no", "lol", "thanks", "see", "you", "tomorrow", "at", "the", "meeting",
    "where", "is", "it", "can", "someone", "send", "the", "link", "I", "think", "we", "should",
    "wait", "for", "the", "release", "build", "is", "green", "again", "nice", "好的", "收到",
    "明天", "见", "哈哈", "谢谢", "大家", "周末", "愉快",
]


def body(rnd: random.Random) -> bytes:
    target = rnd.randint(40, 200)
    out = ""
    while len(out.encode()) < target:
        out += rnd.choice(WORDS) + " "
    return out.encode()[:target]


def make_messages(n: int, seed: int = 3) -> list[tuple[object, ...]]:
    rnd = random.Random(seed)
    return [
        (CONV, seq, f"user-{rnd.randrange(MEMBERS):05d}", body(rnd), 10**12 + seq,
         1_700_000_000_000 + seq)
        for seq in range(1, n + 1)
    ]


def arrivals(rate: int, duration_ms: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    t = 0.0
    out = []
    while True:
        t += rnd.expovariate(rate / 1000)
        if t >= duration_ms:
            return out
        out.append(int(t))


def frame_size(messages: tuple[tuple[object, ...], ...]) -> tuple[int, int]:
    """(bytes on the wire, uncompressed body bytes) for one push of ``messages``."""
    if len(messages) == 1:
        raw = cbor2.dumps(messages[0])
        return HEADER + len(raw), len(raw)
    raw = cbor2.dumps(list(messages))
    size = len(raw)
    if size >= COMPRESS_THRESHOLD:
        size = min(size, len(lz4.block.compress(raw, store_size=True)))
    return HEADER + size, len(raw)


class Outcome:
    """Counters of one simulated run."""

    def __init__(self) -> None:
        self.fanouts = 0
        self.notifies = 0
        self.bytes_per_member = 0
        self.raw_bytes = 0
        self.messages_pushed = 0
        self.pulled = 0
        self.latency: list[int] = []
        self.peak_inflight = 0


def simulate_plain(times: list[int], msgs: list[tuple[object, ...]]) -> Outcome:
    """No merger: every message is its own fan-out, started at once."""
    out = Outcome()
    ends: list[int] = []
    for t, m in zip(times, msgs, strict=False):
        while ends and ends[0] <= t:
            heapq.heappop(ends)
        heapq.heappush(ends, t + FANOUT_MS)
        out.peak_inflight = max(out.peak_inflight, len(ends))
        wire, raw = frame_size((m,))
        out.fanouts += 1
        out.messages_pushed += 1
        out.bytes_per_member += wire
        out.raw_bytes += raw
        out.latency.append(0)
    return out


def simulate_merger(
    times: list[int], msgs: list[tuple[object, ...]], **limits: int
) -> Outcome:
    """The merger, driven by arrivals, fan-out completions and window deadlines."""
    merger: MessageMerger[tuple[object, ...]] = MessageMerger(**limits)
    out = Outcome()
    offered_at: dict[int, int] = {}
    by_seq = {m[1]: m for m in msgs}
    ends: list[int] = []  # completion times of fan-outs in flight
    inflight = 0

    def send(releases: list[Release[tuple[object, ...]]], now: int) -> None:
        nonlocal inflight
        for rel in releases:
            inflight += 1
            out.peak_inflight = max(out.peak_inflight, inflight)
            heapq.heappush(ends, now + FANOUT_MS)
            out.fanouts += 1
            if rel.kind is ReleaseKind.NOTIFY:
                # the signal, then each member pulls the covered messages in one sync page
                out.notifies += 1
                out.bytes_per_member += HEADER + len(cbor2.dumps([[CONV, rel.last_seq]]))
                covered = tuple(by_seq[s] for s in range(rel.first_seq, rel.last_seq + 1))
                wire, raw = frame_size(covered)
                out.bytes_per_member += wire
                out.raw_bytes += raw
                out.pulled += len(covered)
                for seq in range(rel.first_seq, rel.last_seq + 1):
                    out.latency.append(now - offered_at.pop(seq))
                continue
            wire, raw = frame_size(rel.messages)
            out.bytes_per_member += wire
            out.raw_bytes += raw
            out.messages_pushed += len(rel.messages)
            for m in rel.messages:
                out.latency.append(now - offered_at.pop(m[1]))  # type: ignore[call-overload]

    i = 0
    while True:
        t_arrival = times[i] if i < len(times) else None
        t_end = ends[0] if ends else None
        t_due = merger.next_deadline_ms()
        candidates = [t for t in (t_arrival, t_end, t_due) if t is not None]
        if not candidates:
            break
        now = min(candidates)
        if t_end == now:
            heapq.heappop(ends)
            inflight -= 1
            send(merger.done(CONV), now)
        elif t_due == now:
            send(merger.due(now), now)
        else:
            m = msgs[i]
            seq = m[1]
            assert isinstance(seq, int)
            offered_at[seq] = now
            send(merger.offer(CONV, seq, m, len(cbor2.dumps(m)), now), now)
            i += 1
    assert not offered_at, "a message was never released"
    return out


def pct(values: list[int], q: float) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return str(values[min(len(values) - 1, int(q * len(values)))])


def merger_section(report: Report) -> None:
    times = arrivals(RATE, DURATION_MS, seed=11)
    msgs = make_messages(len(times))
    seconds = DURATION_MS / 1000
    runs: list[tuple[str, Outcome]] = [("no merger (every message fanned out)",
                                        simulate_plain(times, msgs))]
    configs: list[tuple[str, dict[str, int]]] = [
        ("merger, defaults (inflight 4, window 100 ms, batch 100)", {}),
        ("merger, inflight 1", {"max_inflight": 1}),
        ("merger, window 50 ms", {"window_ms": 50}),
        ("merger, window 200 ms", {"window_ms": 200}),
        ("concurrency cap only (inflight 4, batch 1)", {"max_batch": 1}),
        ("concurrency cap only, max_queued 100", {"max_batch": 1, "max_queued": 100}),
    ]
    for name, limits in configs:
        runs.append((name, simulate_merger(times, msgs, **limits)))
    base = runs[0][1]
    rows = []
    for name, o in runs:
        member_pushes = o.fanouts * MEMBERS / seconds
        mbytes = o.bytes_per_member * MEMBERS / seconds / 1e6
        per_push = o.messages_pushed / max(1, o.fanouts - o.notifies)
        ratio = o.bytes_per_member / base.bytes_per_member
        compression = (o.bytes_per_member - HEADER * (o.fanouts + o.notifies)) / max(
            1, o.raw_bytes
        )
        rows.append([
            name,
            f"{o.fanouts / seconds:.1f}",
            f"{member_pushes / 1e3:,.0f} k",
            f"{mbytes:.1f}",
            f"{ratio:.2f}",
            f"{per_push:.1f}",
            f"{compression:.2f}",
            f"{o.notifies} ({o.pulled} msgs)",
            f"{pct(o.latency, 0.5)} / {pct(o.latency, 0.99)} / {max(o.latency)}",
            str(o.peak_inflight),
        ])
    report.table(
        ["scheme", "fan-outs/s", "member pushes/s", "MB/s to members", "bytes vs none",
         "msgs per push", "wire/raw", "notifies (pulled)", "delay ms p50/p99/max",
         "peak fan-outs"],
        rows,
        title=f"One group of {MEMBERS:,} members, {RATE} msgs/s (Poisson) for "
        f"{DURATION_MS // 1000} s; a fan-out takes {FANOUT_MS} ms",
    )
    report.note(
        "Without the merger each message is its own fan-out: about 15 run at once (26 at peak) "
        "for this group alone and every member receives 100 frames a second. With the merger "
        "the group never has more than max_inflight fan-outs running; the messages that arrive "
        "meanwhile leave as one lz4-compressed batch, so members get fewer, larger frames. "
        "Delay is from offer to release on the virtual clock (the fan-out itself is not "
        "included). The concurrency cap alone (batch of 1) cannot keep up with 100 msgs/s at 4 "
        "x 150 ms fan-outs (27 fan-outs/s): its queue grows for as long as the burst lasts and "
        "delays reach seconds; with a smaller max_queued the group falls back to notify-and-"
        "pull instead (its bytes count the signal plus one sync page per member holding the "
        "covered messages, lz4-compressed; the sync request is not counted). Rates are per "
        "second of traffic (10 s); a row whose queue drains later still counts every fan-out."
    )


def aggregator_section(report: Report) -> None:
    users = 300 if quick() else 1_000
    groups = 10
    per_user = 3
    duration_ms = 2_000 if quick() else DURATION_MS
    rnd = random.Random(5)
    members: list[list[str]] = [[] for _ in range(groups)]
    for u in range(users):
        for g in rnd.sample(range(groups), per_user):
            members[g].append(f"user-{u:05d}")
    events: list[tuple[int, int]] = []
    for g in range(groups):
        events.extend((t, g) for t in arrivals(RATE, duration_ms, seed=100 + g))
    events.sort()
    seconds = duration_ms / 1000

    def run(window_ms: int) -> tuple[int, int, int]:
        """(signals sent, frame bytes, offers) with aggregation over ``window_ms``."""
        agg = SignalAggregator(window_ms=window_ms)
        seqs = [0] * groups
        sent = nbytes = offers = 0

        def emit(signals: list[tuple[str, tuple[tuple[str, int], ...]]]) -> None:
            nonlocal sent, nbytes
            for _user, entries in signals:
                sent += 1
                nbytes += HEADER + len(cbor2.dumps([list(e) for e in entries]))

        for t, g in events:
            emit(agg.due(t))
            seqs[g] += 1
            conv = f"group-{g:03d}"
            emit(agg.offer_many(members[g], conv, seqs[g], t))
            offers += len(members[g])
        emit(agg.flush())
        return sent, nbytes, offers

    plain_signals = sum(len(members[g]) for _, g in events)
    plain_bytes = plain_signals * (HEADER + len(cbor2.dumps([["group-000", 12345]])))
    rows = [["no aggregation", f"{plain_signals / users / seconds:.1f}",
             f"{plain_bytes / users / seconds:,.0f}", "1.00"]]
    for window in (50, 100, 200):
        sent, nbytes, _ = run(window)
        rows.append([f"SignalAggregator, window {window} ms",
                     f"{sent / users / seconds:.1f}", f"{nbytes / users / seconds:,.0f}",
                     f"{sent / plain_signals:.3f}"])
    report.table(
        ["scheme", "signals per user per s", "signal bytes per user per s", "signals vs none"],
        rows,
        title=f"Pull signals: {users:,} users, each in {per_user} of {groups} groups of "
        f"{RATE} msgs/s, {duration_ms // 1000} s",
    )
    report.note(
        "Each message of a big group in push-pull mode sends every member a pull signal; "
        "aggregation caps a user at one signal per window (carrying the newest seq of each "
        "conversation), whatever the number of groups and their rates."
    )
    # CPU: aggregator offers per second
    sample = [(t, g) for t, g in events if t < 1000]
    n_offers = sum(len(members[g]) for _, g in sample)

    def agg_run() -> None:
        agg = SignalAggregator()
        for seq, (t, g) in enumerate(sample, 1):
            agg.due(t)
            agg.offer_many(members[g], f"group-{g:03d}", seq, t)

    def agg_run_single() -> None:
        agg = SignalAggregator()
        for seq, (t, g) in enumerate(sample, 1):
            agg.due(t)
            conv = f"group-{g:03d}"
            for user in members[g]:
                agg.offer(user, conv, seq, t)

    def dict_run() -> None:
        pending: dict[str, dict[str, int]] = {}
        for seq, (_t, g) in enumerate(sample, 1):
            conv = f"group-{g:03d}"
            for user in members[g]:
                p = pending.get(user)
                if p is None:
                    pending[user] = {conv: seq}
                else:
                    p[conv] = seq
    r_agg = measure(agg_run, ops=n_offers, repeat=3 if quick() else 5)
    r_single = measure(agg_run_single, ops=n_offers, repeat=3 if quick() else 5)
    r_dict = measure(dict_run, ops=n_offers, repeat=3 if quick() else 5)
    report.table(
        ["impl", "offers/s", "ns per offer (min/med/max)", "ratio"],
        [["SignalAggregator.offer_many (+ due per message)", r_agg.rate_str, r_agg.spread(),
          f"{r_agg.ratio(r_dict):.2f}"],
         ["SignalAggregator.offer, one call per member", r_single.rate_str, r_single.spread(),
          f"{r_single.ratio(r_dict):.2f}"],
         ["dict of dicts, no windows or limits", r_dict.rate_str, r_dict.spread(), "1.00"]],
        title="Aggregator CPU",
    )


def cpu_section(report: Report) -> None:
    n = 20_000 if quick() else 200_000
    groups = [f"group-{i:04d}" for i in range(1000)]
    rnd = random.Random(9)
    picks = [rnd.choice(groups) for _ in range(n)]
    msg = ("x",)

    def merger_congested() -> None:
        # one in flight per group and done() never called: every offer queues, windows
        # close through due(); max_queued keeps queues short (overflow -> notify)
        m: MessageMerger[tuple[str]] = MessageMerger(max_inflight=1, window_ms=10)
        seqs = dict.fromkeys(groups, 0)
        for i, g in enumerate(picks):
            seqs[g] += 1
            m.offer(g, seqs[g], msg, 100, i // 100)
            if i % 100 == 0:
                m.due(i // 100)

    def merger_idle() -> None:
        m: MessageMerger[tuple[str]] = MessageMerger(max_inflight=1)
        seqs = dict.fromkeys(groups, 0)
        for g in picks:
            seqs[g] += 1
            m.offer(g, seqs[g], msg, 100, 0)
            m.done(g)

    def plain() -> None:
        queues: dict[str, list[tuple[int, tuple[str], int]]] = {g: [] for g in groups}
        seqs = dict.fromkeys(groups, 0)
        for g in picks:
            seqs[g] += 1
            queues[g].append((seqs[g], msg, 100))

    reps = 3 if quick() else 5
    r_c = measure(merger_congested, ops=n, repeat=reps)
    r_i = measure(merger_idle, ops=n, repeat=reps)
    r_p = measure(plain, ops=n, repeat=reps)
    report.table(
        ["path", "messages/s", "ns per message (min/med/max)", "ratio"],
        [
            ["offer + done (idle group: immediate push)", r_i.rate_str, r_i.spread(),
             f"{r_i.ratio(r_p):.2f}"],
            ["offer + due (congested: queue, batch, overflow)", r_c.rate_str, r_c.spread(),
             f"{r_c.ratio(r_p):.2f}"],
            ["baseline: append to a per-group list", r_p.rate_str, r_p.spread(), "1.00"],
        ],
        title="Merger CPU (1000 groups)",
    )


def main() -> None:
    report = Report("Huge groups: merging and signal aggregation")
    merger_section(report)
    aggregator_section(report)
    cpu_section(report)
    report.note(
        "Delays and rates in the simulations are on the virtual clock (exact counts, no "
        "sampling); only the CPU tables are wall-clock."
    )
    report.emit(__file__)


if __name__ == "__main__":
    main()
