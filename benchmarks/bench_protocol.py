"""imkit.protocol against cbor2, msgpack, json and a bare struct baseline.

    python benchmarks/bench_protocol.py            # full run (< 3 min on an idle machine)
    python benchmarks/bench_protocol.py --quick    # smoke run (8 MiB stream, 3 repetitions)

Three questions, each answered side by side in one process:

1. A typical chat message (a Push with a 40-200 byte UTF-8 body): encode and decode
   rate and bytes on the wire. imkit's figures are for a whole validated frame in and
   a typed, validated message out; the peers' plain rows produce or consume a list
   and validate nothing, so the "+ validation" rows add to cbor2 / msgpack the same
   checks and the same typed ``Push`` imkit delivers.
2. A 100-message PushBatch, plain and LZ4-compressed (imkit compresses above its
   threshold when the result is smaller; peers + lz4.block the same way).
3. Framing: a 64 MiB stream (8 MiB with --quick) of Push frames arriving in random
   1-4096 byte chunks, through ``Connection.receive_data`` / ``next_event``, against
   PEERS.md's minimal length-prefixed framer (bytearray + memoryview) decoding each
   body with cbor2, msgpack's streaming Unpacker, and that framer alone.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from typing import Any

import cbor2
import lz4.block
import msgpack

from _harness import Report, fmt_rate, measure, quick
from imkit.protocol import (
    NEED_DATA,
    Connection,
    FrameType,
    Push,
    PushBatch,
    Role,
    decode,
    decode_body,
    encode,
    encode_body,
    encode_push_batch,
)

_SENTENCES = (
    "你好 今天 晚上 一起 吃饭 吗 好的 没问题 明天 见 会议 改到 三点 收到 谢谢 哈哈 "
    "hello ok sure see you at the meeting sounds good thanks lol on my way project "
    "deadline is friday can you review the doc 周末 去 爬山 出发 地铁 到了"
)
WORDS = _SENTENCES.split()
MAX_UINT = (1 << 63) - 1


def chat_body(rnd: random.Random) -> bytes:
    """40-200 bytes of UTF-8 chat text, mixed Chinese and English."""
    target = rnd.randint(40, 200)
    words: list[str] = []
    while len(" ".join(words).encode()) < target:
        words.append(rnd.choice(WORDS))
    return " ".join(words).encode()[:target].decode("utf-8", "ignore").encode()


def make_pushes(n: int, seed: int = 1) -> list[Push]:
    rnd = random.Random(seed)
    base_ms = 1_700_000_000_000
    return [
        Push(
            conv=f"group:{rnd.randint(1, 50_000)}",
            seq=rnd.randint(1, 2_000_000),
            sender=f"user:{rnd.randint(1, 10_000_000)}",
            body=chat_body(rnd),
            msg_id=(base_ms + i) << 22 | rnd.randint(0, 4095),
            server_ms=base_ms + i * 13,
        )
        for i in range(n)
    ]


def fields(p: Push) -> list[Any]:
    return [p.conv, p.seq, p.sender, p.body, p.msg_id, p.server_ms]


def validated_push(items: Any) -> Push:
    """The checks imkit's decoder makes, written plainly, then a typed Push."""
    if type(items) is not list or not 4 <= len(items) <= 6:
        raise ValueError("shape")
    conv, seq, sender, body = items[0], items[1], items[2], items[3]
    msg_id = items[4] if len(items) > 4 else 0
    server_ms = items[5] if len(items) > 5 else 0
    for text in (conv, sender):
        if type(text) is not str or not 0 < len(text.encode()) <= 128:
            raise ValueError("id")
    for number in (seq, msg_id, server_ms):
        if type(number) is not int or not 0 <= number <= MAX_UINT:
            raise ValueError("uint")
    if type(body) is not bytes:
        raise ValueError("body")
    return Push(conv=conv, seq=seq, sender=sender, body=body, msg_id=msg_id, server_ms=server_ms)


def validated_batch(items: Any) -> PushBatch:
    """A decoded batch body, checked and typed like imkit's decoder does."""
    if type(items) is not list or len(items) != 1 or type(items[0]) is not list:
        raise ValueError("shape")
    if not 1 <= len(items[0]) <= 1024:
        raise ValueError("count")
    return PushBatch(pushes=tuple(validated_push(x) for x in items[0]))


# --- bare struct baseline: fixed header of three u64 and three lengths, raw strings ----

_SHEAD = struct.Struct(">QQQBBH")


def struct_encode(p: Push) -> bytes:
    conv, sender = p.conv.encode(), p.sender.encode()
    head = _SHEAD.pack(p.seq, p.msg_id, p.server_ms, len(conv), len(sender), len(p.body))
    return b"".join((head, conv, sender, p.body))


def struct_decode(data: bytes) -> tuple[Any, ...]:
    seq, msg_id, server_ms, lc, ls, lb = _SHEAD.unpack_from(data)
    a = _SHEAD.size
    conv = data[a : a + lc].decode()
    sender = data[a + lc : a + lc + ls].decode()
    body = data[a + lc + ls : a + lc + ls + lb]
    return conv, seq, sender, body, msg_id, server_ms


def json_encode(p: Push) -> bytes:
    return json.dumps(
        [p.conv, p.seq, p.sender, p.body.decode(), p.msg_id, p.server_ms], separators=(",", ":")
    ).encode()


def per_message(report: Report, n: int) -> None:
    pushes = make_pushes(n)
    frames = [encode(p) for p in pushes]
    bodies = [encode_body(p) for p in pushes]
    lists = [fields(p) for p in pushes]
    cbor_bodies = [cbor2.dumps(x) for x in lists]
    packer = msgpack.Packer()
    mp_bodies = [packer.pack(x) for x in lists]
    json_bodies = [json_encode(p) for p in pushes]
    st_bodies = [struct_encode(p) for p in pushes]
    push_type = FrameType.PUSH

    def loop(fn: Callable[[Any], object], items: list[Any]) -> Callable[[], None]:
        def run() -> None:
            for item in items:
                fn(item)

        return run

    enc_rows = [
        ("imkit encode (frame, validated)", loop(encode, pushes)),
        ("imkit encode_body (validated)", loop(encode_body, pushes)),
        ("cbor2.dumps(list)", loop(cbor2.dumps, lists)),
        ("msgpack Packer.pack(list)", loop(packer.pack, lists)),
        ("json.dumps", loop(json_encode, pushes)),
        ("struct-packed baseline", loop(struct_encode, pushes)),
    ]
    dec_rows = [
        ("imkit decode (frame -> validated Push)", loop(decode, frames)),
        (
            "imkit decode_body (-> validated Push)",
            loop(lambda b: decode_body(push_type, b), bodies),
        ),
        ("cbor2.loads (-> list)", loop(cbor2.loads, cbor_bodies)),
        (
            "cbor2.loads + validation + Push",
            loop(lambda b: validated_push(cbor2.loads(b)), cbor_bodies),
        ),
        ("msgpack.unpackb (-> list)", loop(msgpack.unpackb, mp_bodies)),
        (
            "msgpack.unpackb + validation + Push",
            loop(lambda b: validated_push(msgpack.unpackb(b)), mp_bodies),
        ),
        ("json.loads (-> list)", loop(json.loads, json_bodies)),
        ("struct-packed baseline (-> tuple)", loop(struct_decode, st_bodies)),
    ]
    sizes = {
        "imkit": sum(map(len, frames)) / n,
        "cbor2": sum(map(len, cbor_bodies)) / n,
        "msgpack": sum(map(len, mp_bodies)) / n,
        "json": sum(map(len, json_bodies)) / n,
        "struct": sum(map(len, st_bodies)) / n,
    }
    enc = [(name, measure(fn, ops=n)) for name, fn in enc_rows]
    dec = [(name, measure(fn, ops=n)) for name, fn in dec_rows]
    for title, rows in (("encode", enc), ("decode", dec)):
        imkit_result = rows[0][1]
        report.table(
            ["codec", f"{title} msg/s", "ns/msg (min / median / max)", "imkit is x faster"],
            [
                [name, r.rate_str, r.spread(), f"{imkit_result.ratio(r):.2f}"]
                for name, r in rows
            ],
            title=f"A chat message (Push, 40-200 byte UTF-8 body): {title}",
        )
    report.table(
        ["codec", "bytes per message"],
        [
            ["imkit frame (8-byte header + CBOR body)", f"{sizes['imkit']:.1f}"],
            ["imkit body alone", f"{sum(map(len, bodies)) / n:.1f}"],
            ["cbor2 (list, no framing)", f"{sizes['cbor2']:.1f}"],
            ["msgpack (list, no framing)", f"{sizes['msgpack']:.1f}"],
            ["json (list, no framing)", f"{sizes['json']:.1f}"],
            ["struct-packed baseline (no framing)", f"{sizes['struct']:.1f}"],
        ],
        title="Bytes on the wire",
    )


def batches(report: Report, rounds: int) -> None:
    batch = PushBatch(pushes=tuple(make_pushes(100, seed=7)))
    conv = batch.pushes[0].conv
    # a merged window is one conversation: give the batch one conv, as the merger does
    batch = PushBatch(
        pushes=tuple(
            Push(
                conv=conv,
                seq=i + 1,
                sender=p.sender,
                body=p.body,
                msg_id=p.msg_id,
                server_ms=p.server_ms,
            )
            for i, p in enumerate(batch.pushes)
        )
    )
    plain = encode(batch, compress_threshold=None)
    packed = encode(batch)
    pre = [encode_body(p) for p in batch.pushes]
    lists = [[fields(p) for p in batch.pushes]]
    cbor_plain = cbor2.dumps(lists)
    cbor_lz4 = lz4.block.compress(cbor_plain, store_size=True)
    mp_plain = msgpack.packb(lists)
    mp_lz4 = lz4.block.compress(mp_plain, store_size=True)
    assert packed[3] == 1 and decode(packed) == batch == decode(plain)

    def rep(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(rounds):
                fn()

        return run

    rows = [
        ("imkit encode, plain", rep(lambda: encode(batch, compress_threshold=None)), len(plain)),
        ("imkit encode, lz4", rep(lambda: encode(batch)), len(packed)),
        (
            "imkit encode_push_batch (pre-encoded), lz4",
            rep(lambda: encode_push_batch(pre)),
            len(packed),
        ),
        ("cbor2.dumps, plain", rep(lambda: cbor2.dumps(lists)), len(cbor_plain)),
        (
            "cbor2.dumps + lz4",
            rep(lambda: lz4.block.compress(cbor2.dumps(lists), store_size=True)),
            len(cbor_lz4),
        ),
        ("msgpack.packb, plain", rep(lambda: msgpack.packb(lists)), len(mp_plain)),
        (
            "msgpack.packb + lz4",
            rep(lambda: lz4.block.compress(msgpack.packb(lists), store_size=True)),
            len(mp_lz4),
        ),
        ("imkit decode, plain", rep(lambda: decode(plain)), len(plain)),
        ("imkit decode, lz4", rep(lambda: decode(packed)), len(packed)),
        ("cbor2.loads, plain (-> lists)", rep(lambda: cbor2.loads(cbor_plain)), len(cbor_plain)),
        (
            "cbor2 lz4 + loads + validation",
            rep(lambda: validated_batch(cbor2.loads(lz4.block.decompress(cbor_lz4)))),
            len(cbor_lz4),
        ),
        (
            "msgpack.unpackb, plain (-> lists)",
            rep(lambda: msgpack.unpackb(mp_plain)),
            len(mp_plain),
        ),
        (
            "msgpack lz4 + unpackb + validation",
            rep(lambda: validated_batch(msgpack.unpackb(lz4.block.decompress(mp_lz4)))),
            len(mp_lz4),
        ),
    ]
    results = [(name, measure(fn, ops=rounds), size) for name, fn, size in rows]
    report.table(
        ["codec", "batches/s", "messages/s", "bytes per batch", "vs plain imkit frame"],
        [
            [name, r.rate_str, fmt_rate(r.rate * 100), size, f"{size / len(plain):.2f}"]
            for name, r, size in results
        ],
        title="A 100-message PushBatch (one conversation), plain and LZ4",
    )


def make_chunks(stream: bytes, rnd: random.Random) -> list[bytes]:
    chunks = []
    pos = 0
    while pos < len(stream):
        n = rnd.randint(1, 4096)
        chunks.append(stream[pos : pos + n])
        pos += n
    return chunks


def framing(report: Report, total_bytes: int) -> None:
    pushes = make_pushes(20_000, seed=3)
    frames = [encode(p) for p in pushes]
    cbor_bodies = [cbor2.dumps(fields(p)) for p in pushes]
    cbor_frames = [struct.pack(">I", len(b)) + b for b in cbor_bodies]
    mp_frames = [msgpack.packb(fields(p)) for p in pushes]

    def build(units: list[bytes]) -> tuple[list[bytes], int]:
        out: list[bytes] = []
        size = count = 0
        while size < total_bytes:
            for unit in units:
                out.append(unit)
                size += len(unit)
                count += 1
                if size >= total_bytes:
                    break
        return make_chunks(b"".join(out), random.Random(5)), count

    imkit_chunks, imkit_count = build(frames)
    cbor_chunks, cbor_count = build(cbor_frames)
    mp_chunks, mp_count = build(mp_frames)

    def imkit_run() -> None:
        conn = Connection(Role.CLIENT)
        receive, next_event = conn.receive_data, conn.next_event
        n = 0
        for chunk in imkit_chunks:
            receive(chunk)
            while next_event() is not NEED_DATA:
                n += 1
        assert n == imkit_count, n

    def minimal_framer(decode_body: Callable[[Any], object] | None) -> Callable[[], None]:
        unpack = struct.Struct(">I").unpack_from

        def run() -> None:
            buf = bytearray()
            n = 0
            for chunk in cbor_chunks:
                buf += chunk
                pos = 0
                end = len(buf)
                with memoryview(buf) as view:
                    while end - pos >= 4:
                        size = unpack(buf, pos)[0]
                        if end - pos - 4 < size:
                            break
                        if decode_body is not None:
                            decode_body(view[pos + 4 : pos + 4 + size])
                        pos += 4 + size
                        n += 1
                del buf[:pos]
            assert n == cbor_count, n

        return run

    def msgpack_run() -> None:
        unpacker = msgpack.Unpacker()
        n = 0
        for chunk in mp_chunks:
            unpacker.feed(chunk)
            for _ in unpacker:
                n += 1
        assert n == mp_count, n

    repeat = 3 if quick() else 5
    rows = [
        ("imkit Connection (header checks + strict decode + typed Push)", imkit_run, imkit_count),
        ("minimal framer + cbor2.loads (-> list)", minimal_framer(cbor2.loads), cbor_count),
        (
            "minimal framer + cbor2.loads + validation + Push",
            minimal_framer(lambda v: validated_push(cbor2.loads(v))),
            cbor_count,
        ),
        ("msgpack streaming Unpacker (-> list)", msgpack_run, mp_count),
        ("minimal framer alone (no decoding)", minimal_framer(None), cbor_count),
    ]
    results = [(name, measure(fn, ops=count, repeat=repeat, warmup=0)) for name, fn, count in rows]
    first = results[0][1]
    mib = total_bytes / (1 << 20)
    report.table(
        ["decoder", "frames/s", "MiB/s", "imkit is x faster"],
        [
            [
                name,
                r.rate_str,
                f"{mib / r.median:.0f}",
                f"{first.ratio(r):.2f}",
            ]
            for name, r in results
        ],
        title=f"A {mib:.0f} MiB stream of Push frames in random 1-4096 byte chunks",
    )


def main() -> None:
    report = Report("Wire protocol: codec and framing")
    small = quick()
    per_message(report, n=2_000 if small else 20_000)
    batches(report, rounds=50 if small else 400)
    framing(report, total_bytes=(8 if small else 64) << 20)
    report.note(
        "imkit rows include what the plain peer rows leave out: the frame header and its "
        "checks, strict CBOR (shortest heads, no tags/maps/floats, nothing trailing), every "
        "field's type and limit, and a typed frozen `Push`; the `+ validation` rows add the "
        "same checks and the same `Push` to the C decoders. Rates are medians; run on an idle "
        "machine and read the ratios."
    )
    report.emit(__file__)


if __name__ == "__main__":
    main()
