"""imkit.store: appends/s, range reads/s, inbox fan-out and bytes per message.

Each imkit store is measured beside a baseline doing the same work the plainest way:

* **MemoryStore** beside a dict of lists (``convs[conv].append((sender, cid, body,
  wall_ms))``: no idempotency, no limits, no checks — the floor) and beside the same
  dict of lists plus a ``(conv, sender, cid)`` dedup dict (the fair baseline: what an
  idempotent append costs at minimum);
* **SqliteStore** beside raw ``sqlite3``: one ``INSERT`` into a table of the same shape
  (primary key (conv, seq), no dedup index, seq counted in Python), on a file in a
  temp directory (WAL, ``synchronous=NORMAL``) and on ``:memory:`` for reference;
  batches (``append_many`` of 100 in one transaction) beside ``executemany`` in one
  transaction; and ``synchronous=FULL`` (one fsync per commit) to show what power-loss
  durability costs per message and how batching pays it back.

Messages: 100 conversations, 10 senders each, unique cids, 100-byte bodies. Range
reads walk one 10k-message conversation in pages of 100. Inbox fan-out adds each
message to the inboxes of 100 members (write fan-out). Memory per message comes from
tracemalloc (bodies allocated beforehand, so the figure is the store's own overhead;
a body adds ``len(body) + 33`` bytes on top); SQLite's from the file size after close.

    python benchmarks/bench_store.py [--quick] [--write]

Caveats: the disk is whatever the temp directory sits on (fsync costs vary by 100x
between tmpfs, an SSD and a network disk); the machine is shared, so read the ratios.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from _harness import Report, measure, quick
from imkit.store import MemoryStore, MessageStore, NewMessage, SqliteStore

N_MEM = 20_000 if quick() else 200_000
N_SQL = 2_000 if quick() else 20_000
N_FULL = 50 if quick() else 300
N_READ = 2_000 if quick() else 10_000
N_FOOT = 20_000 if quick() else 100_000
FANOUT = 100
N_FANOUT = 200 if quick() else 2_000
PAGE = 100
BATCH = 100
CONVS = [f"group-{i}" for i in range(100)]
BODY_SIZE = 100


def messages(n: int) -> list[NewMessage]:
    """n messages over CONVS, 10 senders per conversation, unique (sender, cid)."""
    out = []
    for i in range(n):
        conv = CONVS[i % len(CONVS)]
        sender = f"user-{(i // len(CONVS)) % 10}"
        body = (f"{i:08d}".encode() * 13)[:BODY_SIZE]
        out.append(NewMessage(conv, sender, i, body))
    return out


def fresh(store: MessageStore) -> MessageStore:
    """Register the users and CONVS in ``store``."""
    for u in range(10):
        store.create_user(f"user-{u}")
    for conv in CONVS:
        store.create_group(conv, [f"user-{u}" for u in range(10)])
    return store


class Holder:
    """The object under test, rebuilt by ``setup`` before every timed repetition."""

    def __init__(self) -> None:
        self.store: MessageStore | None = None
        self.raw: sqlite3.Connection | None = None
        self.dir: tempfile.TemporaryDirectory[str] | None = None

    def path(self) -> Path:
        self.cleanup()
        self.dir = tempfile.TemporaryDirectory(prefix="bench-store-")
        return Path(self.dir.name) / "store.sqlite3"

    def cleanup(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.raw is not None:
            self.raw.close()
            self.raw = None
        if self.dir is not None:
            self.dir.cleanup()
            self.dir = None


RAW_SCHEMA = (
    "CREATE TABLE messages (conv TEXT, seq INTEGER, sender TEXT, cid INTEGER, body BLOB, "
    "server_ms INTEGER, PRIMARY KEY (conv, seq))"
)


def raw_db(path: str, synchronous: str = "NORMAL") -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {synchronous}")
    db.execute(RAW_SCHEMA)
    return db


# --- 1. appends ------------------------------------------------------------------------


def bench_memory_appends(report: Report) -> None:
    msgs = messages(N_MEM)
    h = Holder()

    def imkit() -> None:
        append = h.store.append  # type: ignore[union-attr]
        for conv, sender, cid, body, _ in msgs:
            append(conv, sender, cid, body, wall_ms=1)

    convs: dict[str, list[tuple[str, int, bytes, int]]] = {}
    keys: dict[tuple[str, str, int], int] = {}

    def reset_plain() -> None:
        convs.clear()
        keys.clear()
        for c in CONVS:
            convs[c] = []

    def plain() -> None:
        for conv, sender, cid, body, _ in msgs:
            convs[conv].append((sender, cid, body, 1))

    def dedup() -> None:
        for conv, sender, cid, body, _ in msgs:
            key = (conv, sender, cid)
            if key in keys:
                continue
            lst = convs[conv]
            lst.append((sender, cid, body, 1))
            keys[key] = len(lst)

    def setup_imkit() -> None:
        h.store = fresh(MemoryStore(max_messages=N_MEM))

    r_imkit = measure(imkit, ops=N_MEM, setup=setup_imkit)
    r_plain = measure(plain, ops=N_MEM, setup=reset_plain)
    r_dedup = measure(dedup, ops=N_MEM, setup=reset_plain)
    report.table(
        ["impl", "appends/s", "ns per append (min / median / max)", "imkit speed vs this"],
        [
            ["MemoryStore.append", r_imkit.rate_str, r_imkit.spread(), "1.00"],
            ["dict of lists + dedup dict", r_dedup.rate_str, r_dedup.spread(),
             f"{r_imkit.ratio(r_dedup):.2f}"],
            ["dict of lists (floor)", r_plain.rate_str, r_plain.spread(),
             f"{r_imkit.ratio(r_plain):.2f}"],
        ],
        title=f"MemoryStore appends ({N_MEM:,} messages, {len(CONVS)} conversations)",
    )


def sqlite_rows(n: int, where: str, synchronous: str = "NORMAL") -> list[list[str]]:
    """Rows of the SQLite append table for one database kind (file or ':memory:')."""
    msgs = messages(n)
    # Mixed batches: 100 consecutive messages touch 100 conversations (a logic server
    # flushing one loop tick); grouped batches: 100 messages of one conversation (a
    # merger window of one group).
    mixed = [msgs[i : i + BATCH] for i in range(0, n, BATCH)]
    by_conv = sorted(msgs, key=lambda m: CONVS.index(m.conv))
    grouped = [by_conv[i : i + BATCH] for i in range(0, n, BATCH)]
    h = Holder()
    repeat = 3 if synchronous == "FULL" or quick() else 5

    def location() -> str:
        return ":memory:" if where == "memory" else str(h.path())

    def setup_imkit() -> None:
        loc = location()
        h.store = fresh(SqliteStore(loc, synchronous=synchronous))

    def setup_raw() -> None:
        h.raw = raw_db(location(), synchronous)

    def imkit_single() -> None:
        append = h.store.append  # type: ignore[union-attr]
        for conv, sender, cid, body, _ in msgs:
            append(conv, sender, cid, body, wall_ms=1)

    def imkit_batches(batches: list[list[NewMessage]]) -> Callable[[], None]:
        def run() -> None:
            append_many = h.store.append_many  # type: ignore[union-attr]
            for batch in batches:
                append_many(batch, wall_ms=1)

        return run

    sql = "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)"

    def raw_single() -> None:
        db = h.raw
        assert db is not None
        seqs = dict.fromkeys(CONVS, 0)
        for conv, sender, cid, body, _ in msgs:
            seq = seqs[conv] = seqs[conv] + 1
            db.execute(sql, (conv, seq, sender, cid, body, 1))

    def raw_batches(batches: list[list[NewMessage]]) -> Callable[[], None]:
        def run() -> None:
            db = h.raw
            assert db is not None
            seqs = dict.fromkeys(CONVS, 0)
            for batch in batches:
                rows = []
                for conv, sender, cid, body, _ in batch:
                    seq = seqs[conv] = seqs[conv] + 1
                    rows.append((conv, seq, sender, cid, body, 1))
                db.execute("BEGIN")
                db.executemany(sql, rows)
                db.execute("COMMIT")

        return run

    label = f"{'temp file' if where == 'file' else ':memory:'}, {synchronous}"
    out = []
    try:
        for mode, mine, theirs, raw_mode in (
            ("append (1 tx each)", imkit_single, raw_single, "INSERT (autocommit)"),
            (f"append_many({BATCH}), mixed", imkit_batches(mixed), raw_batches(mixed),
             "executemany, 1 tx per batch"),
            (f"append_many({BATCH}), one conv", imkit_batches(grouped), raw_batches(grouped),
             "executemany, 1 tx per batch"),
        ):
            r_mine = measure(mine, ops=n, setup=setup_imkit, repeat=repeat)
            r_raw = measure(theirs, ops=n, setup=setup_raw, repeat=repeat)
            out.append([label, mode, r_mine.rate_str, raw_mode, r_raw.rate_str,
                        f"{r_mine.ratio(r_raw):.2f}"])
    finally:
        h.cleanup()
    return out


def bench_sqlite_appends(report: Report) -> None:
    rows = []
    for where, sync, n in (
        ("file", "NORMAL", N_SQL),
        ("memory", "NORMAL", N_SQL),
        ("file", "FULL", N_FULL),
    ):
        rows.extend(sqlite_rows(n, where, sync))
    report.table(
        ["database, synchronous", "imkit", "messages/s", "raw sqlite3", "messages/s", "ratio"],
        rows,
        title=f"SqliteStore appends ({N_SQL:,} messages; {N_FULL} with FULL)",
    )


# --- 2. range reads --------------------------------------------------------------------


def bench_reads(report: Report) -> None:
    conv = CONVS[0]
    msgs = [NewMessage(conv, f"user-{i % 10}", i, b"x" * BODY_SIZE) for i in range(N_READ)]
    pages = N_READ // PAGE
    rows = []

    mem = fresh(MemoryStore())
    mem.append_many(msgs, wall_ms=1)
    flat = [(m.sender, m.cid, m.body, 1) for m in msgs]

    def walk(store: MessageStore) -> Callable[[], None]:
        def run() -> None:
            after = 0
            for _ in range(pages):
                page = store.read(conv, after, PAGE)
                after = page.messages[-1].seq

        return run

    def slices() -> None:
        for p in range(pages):
            flat[p * PAGE : (p + 1) * PAGE]

    r_mem = measure(walk(mem), ops=N_READ)
    r_slice = measure(slices, ops=N_READ)
    rows.append(["MemoryStore.read", r_mem.rate_str, "list slices", r_slice.rate_str,
                 f"{r_mem.ratio(r_slice):.2f}"])
    mem.close()

    with tempfile.TemporaryDirectory(prefix="bench-store-") as d:
        sql = fresh(SqliteStore(Path(d) / "s.sqlite3"))
        sql.append_many(msgs, wall_ms=1)
        raw = raw_db(str(Path(d) / "raw.sqlite3"))
        raw.execute("BEGIN")
        raw.executemany(
            "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
            [(conv, i + 1, m.sender, m.cid, m.body, 1) for i, m in enumerate(msgs)],
        )
        raw.execute("COMMIT")

        def raw_walk() -> None:
            after = 0
            for _ in range(pages):
                rows_ = raw.execute(
                    "SELECT seq, sender, cid, body, server_ms FROM messages "
                    "WHERE conv = ? AND seq > ? ORDER BY seq LIMIT ?",
                    (conv, after, PAGE),
                ).fetchall()
                after = rows_[-1][0]

        r_sql = measure(walk(sql), ops=N_READ)
        r_raw = measure(raw_walk, ops=N_READ)
        rows.append(["SqliteStore.read (file)", r_sql.rate_str, "raw SELECT ... LIMIT",
                     r_raw.rate_str, f"{r_sql.ratio(r_raw):.2f}"])
        sql.close()
        raw.close()
    report.table(
        ["imkit", "messages/s", "baseline", "messages/s", "ratio"],
        rows,
        title=f"Range reads: one {N_READ:,}-message conversation in pages of {PAGE}",
    )


# --- 3. inbox fan-out --------------------------------------------------------------------


def bench_inbox(report: Report) -> None:
    members = [f"member-{i}" for i in range(FANOUT)]
    conv = "fanout"
    h = Holder()

    def prepare(store: MessageStore) -> MessageStore:
        for uid in members:
            store.create_user(uid)
        store.create_group(conv, members)
        store.append_many(
            [NewMessage(conv, members[0], i, b"x") for i in range(N_FANOUT)], wall_ms=1
        )
        return store

    def adds() -> None:
        inbox_add = h.store.inbox_add  # type: ignore[union-attr]
        for seq in range(1, N_FANOUT + 1):
            inbox_add(members, conv, seq)

    def setup_mem() -> None:
        h.cleanup()
        h.store = prepare(MemoryStore())

    def setup_sql() -> None:
        h.store = prepare(SqliteStore(h.path()))

    boxes: dict[str, list[tuple[str, int]]] = {}

    def setup_plain() -> None:
        boxes.clear()
        for uid in members:
            boxes[uid] = []

    def plain() -> None:
        for seq in range(1, N_FANOUT + 1):
            entry = (conv, seq)
            for uid in members:
                boxes[uid].append(entry)

    def setup_raw() -> None:
        h.raw = sqlite3.connect(str(h.path()), isolation_level=None)
        h.raw.execute("PRAGMA journal_mode = WAL")
        h.raw.execute("PRAGMA synchronous = NORMAL")
        h.raw.execute(
            "CREATE TABLE inbox (uid TEXT, cursor INTEGER, conv TEXT, seq INTEGER, "
            "PRIMARY KEY (uid, cursor)) WITHOUT ROWID"
        )

    def raw() -> None:
        db = h.raw
        assert db is not None
        for seq in range(1, N_FANOUT + 1):
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO inbox VALUES (?, ?, ?, ?)", [(u, seq, conv, seq) for u in members]
            )
            db.execute("COMMIT")

    entries = N_FANOUT * FANOUT
    try:
        r_mem = measure(adds, ops=entries, setup=setup_mem, repeat=3)
        r_plain = measure(plain, ops=entries, setup=setup_plain, repeat=3)
        r_sql = measure(adds, ops=entries, setup=setup_sql, repeat=3)
        r_raw = measure(raw, ops=entries, setup=setup_raw, repeat=3)
    finally:
        h.cleanup()
    report.table(
        ["imkit", "entries/s", "baseline", "entries/s", "ratio"],
        [
            ["MemoryStore.inbox_add", r_mem.rate_str, "dict of lists", r_plain.rate_str,
             f"{r_mem.ratio(r_plain):.2f}"],
            ["SqliteStore.inbox_add (file)", r_sql.rate_str,
             "raw executemany, 1 tx per message", r_raw.rate_str, f"{r_sql.ratio(r_raw):.2f}"],
        ],
        title=f"Inbox write fan-out: each message to {FANOUT} members' inboxes",
    )


# --- 4. bytes per message ------------------------------------------------------------


def bench_footprint(report: Report) -> None:
    msgs = messages(N_FOOT)  # bodies exist before tracing: the figures are overhead only

    def traced(build: Callable[[], object]) -> float:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        keep = build()
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        del keep
        return used / N_FOOT

    def build_mem() -> object:
        store = fresh(MemoryStore())
        for conv, sender, cid, body, _ in msgs:
            store.append(conv, sender, cid, body, wall_ms=1_700_000_000_000 + cid)
        return store

    def build_plain() -> object:
        convs: dict[str, list[tuple[str, int, bytes, int]]] = {c: [] for c in CONVS}
        for conv, sender, cid, body, _ in msgs:
            convs[conv].append((sender, cid, body, 1_700_000_000_000 + cid))
        return convs

    def build_dedup() -> object:
        convs: dict[str, list[tuple[str, int, bytes, int]]] = {c: [] for c in CONVS}
        keys: dict[tuple[str, str, int], int] = {}
        for conv, sender, cid, body, _ in msgs:
            lst = convs[conv]
            lst.append((sender, cid, body, 1_700_000_000_000 + cid))
            keys[(conv, sender, cid)] = len(lst)
        return convs, keys

    mem = traced(build_mem)
    plain = traced(build_plain)
    dedup = traced(build_dedup)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as d:
        path = Path(d) / "s.sqlite3"
        store = fresh(SqliteStore(path))
        for i in range(0, N_FOOT, BATCH):
            store.append_many(msgs[i : i + BATCH], wall_ms=1_700_000_000_000)
        store.close()
        sql_bytes = os.path.getsize(path) / N_FOOT
        raw = raw_db(str(Path(d) / "raw.sqlite3"))
        raw.execute("BEGIN")
        seqs = dict.fromkeys(CONVS, 0)
        for conv, sender, cid, body, _ in msgs:
            seq = seqs[conv] = seqs[conv] + 1
            raw.execute(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                (conv, seq, sender, cid, body, 1_700_000_000_000),
            )
        raw.execute("COMMIT")
        raw.close()
        raw_bytes = os.path.getsize(Path(d) / "raw.sqlite3") / N_FOOT
    report.table(
        ["store", "bytes per message", "note"],
        [
            ["MemoryStore", f"{mem:.0f}", "overhead beyond the body (+ len + 33 per body)"],
            ["dict of lists + dedup dict", f"{dedup:.0f}", "same, tuples instead of objects"],
            ["dict of lists (floor)", f"{plain:.0f}", "same, no idempotency"],
            ["SqliteStore file", f"{sql_bytes:.0f}", f"includes the {BODY_SIZE}-byte body"],
            ["raw sqlite3 file", f"{raw_bytes:.0f}", "same shape, no dedup index"],
        ],
        title=f"Bytes per stored message ({N_FOOT:,} messages, {BODY_SIZE}-byte bodies)",
    )


def main() -> None:
    report = Report("Message store")
    report.note(
        f"Messages: {len(CONVS)} conversations, 10 senders each, unique cids, "
        f"{BODY_SIZE}-byte bodies. SQLite files live in a temp directory (WAL); "
        "fsync costs depend on that disk. Baselines: a dict of lists (+ a dedup dict) "
        "for MemoryStore, raw sqlite3 INSERT / executemany into a table of the same "
        "shape without the dedup index for SqliteStore."
    )
    bench_memory_appends(report)
    bench_sqlite_appends(report)
    bench_reads(report)
    bench_inbox(report)
    bench_footprint(report)
    report.note(
        "Ratios are imkit's rate over the baseline's (above 1: imkit is faster). "
        "MemoryStore pays for argument checks, limits, the frozen StoredMessage it "
        "returns and the idempotency window; SqliteStore pays for a transaction per "
        "append (BEGIN IMMEDIATE, seq read, insert with the dedup index, seq update)."
    )
    report.emit(__file__)


if __name__ == "__main__":
    main()
