"""Coverage-guided fuzzing of imkit's wire decoder with atheris (not collected by pytest).

    .venv/bin/python tests/fuzz/fuzz_decoder.py -atheris_runs=100000
    .venv/bin/python tests/fuzz/fuzz_decoder.py -max_total_time=600 corpus/   # keep a corpus

Each input is routed by its first byte:

- 0: the rest is one frame for ``decode()``, compared with the reference decoder
  of ``tests/test_protocol_oracle.py`` (accepted by one iff by the other, equal);
- 1, 2: the rest is a byte stream fed to a client / server ``Connection`` in chunks
  whose sizes come from the input, then EOF;
- 3: byte 1 picks a frame type, the rest is a body behind a valid header (so that
  the CBOR decoder, not the header check, does the work), compared with the oracle;
- 4: the same body LZ4-compressed, with its real or a forged size prefix.

The promise checked: only messages, NEED_DATA / CLOSED or RemoteProtocolError
come out, and the fast decoder agrees with the oracle. Any other exception is a
crash atheris reports with the input that caused it. At exit the harness prints
the inputs tried, the slowest input in CPU ms (whole, and imkit's share without the
oracle, with the start of that input) and the peak RSS.
"""

from __future__ import annotations

import atexit
import gc
import resource
import sys
import time
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    import lz4.block

    import imkit.protocol._codec
    from imkit.protocol import (
        CLOSED,
        NEED_DATA,
        Connection,
        FrameType,
        RemoteProtocolError,
        Role,
        decode,
        decode_body,
    )

from tests.test_protocol_oracle import Reject, reference_decode_body, reference_decode_frame

# the generated decoders and encoders are compiled from strings at import time, so
# the import hook does not see them: patch their code objects in place
_codec = imkit.protocol._codec
for _function in [*_codec._DECODERS.values(), *_codec._ENCODERS.values()]:
    atheris.instrument_func(_function)

FRAME_TYPES = sorted(int(t) for t in FrameType)
STATS = {"inputs": 0, "slowest_ms": 0.0, "slowest_imkit_ms": 0.0, "accepted": 0}
SLOWEST: dict[str, bytes] = {"input": b""}
_clock = time.process_time  # CPU time: a shared machine's scheduling does not count
_current = {"input": b""}


def _timed(fn: object) -> object:
    """Run an imkit call, keeping the slowest CPU time of imkit alone (the oracle is slow)."""
    start = _clock()
    try:
        return fn()  # type: ignore[operator]
    finally:
        elapsed = (_clock() - start) * 1000
        if elapsed > STATS["slowest_imkit_ms"]:
            STATS["slowest_imkit_ms"] = elapsed
            SLOWEST["input"] = _current["input"]


def _outcome_fast(fn: object) -> object:
    try:
        return _timed(fn)
    except RemoteProtocolError:
        return "refused"


def _outcome_slow(fn: object) -> object:
    try:
        return fn()  # type: ignore[operator]
    except Reject:
        return "refused"


def _compare(fast: object, slow: object, data: bytes) -> None:
    if fast != slow:
        raise AssertionError(f"decoder {fast!r} != oracle {slow!r} for {data.hex()}")
    if fast != "refused":
        STATS["accepted"] += 1


def _feed(role: Role, data: bytes) -> None:
    conn = Connection(role)
    pos = 0
    step = 1
    while True:
        chunk = data[pos : pos + step]
        pos += len(chunk)
        conn.receive_data(chunk)  # b"" at the end: EOF
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError:
                conn._check()
                return
            if event is NEED_DATA or event is CLOSED:
                break
        if not chunk:
            conn._check()  # O(pending chunks): once, not per chunk
            return
        step = (chunk[-1] % 64) + 1


def test_one_input(data: bytes) -> None:
    if STATS["inputs"] % 10_000 == 0:
        gc.collect()  # outside the timed part: a full pass costs ~10 ms here
    start = _clock()
    _current["input"] = data
    STATS["inputs"] += 1
    if not data:
        return
    mode, rest = data[0] % 5, data[1:]
    if mode == 0:
        fast = _outcome_fast(lambda: decode(rest))
        _compare(fast, _outcome_slow(lambda: reference_decode_frame(rest)), data)
    elif mode in (1, 2):
        _timed(lambda: _feed(Role.CLIENT if mode == 1 else Role.SERVER, rest))
    elif rest:
        frame_type = FRAME_TYPES[rest[0] % len(FRAME_TYPES)]
        body = rest[1:]
        if mode == 3:
            fast = _outcome_fast(lambda: decode_body(frame_type, body))
            slow = _outcome_slow(lambda: reference_decode_body(frame_type, body))
            _compare(fast, slow, data)
        else:
            packed = lz4.block.compress(body, store_size=True)
            if body and body[0] & 1:  # forge the size prefix from the body itself
                packed = body[:4] + packed[4:]
            frame = bytes([0xC1, 1, frame_type, 1]) + len(packed).to_bytes(4, "big") + packed
            _compare(
                _outcome_fast(lambda: decode(frame)),
                _outcome_slow(lambda: reference_decode_frame(frame)),
                frame,
            )
    elapsed = (_clock() - start) * 1000
    STATS["slowest_ms"] = max(STATS["slowest_ms"], elapsed)


def _report() -> None:
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\nfuzz_decoder: {STATS['inputs']} inputs, {STATS['accepted']} accepted by both decoders, "
        f"slowest input {STATS['slowest_ms']:.2f} ms "
        f"(imkit's part {STATS['slowest_imkit_ms']:.2f} ms), "
        f"peak RSS {peak_mb:.0f} MiB; slowest for imkit: {len(SLOWEST['input'])} bytes "
        f"{SLOWEST['input'][:48].hex()}",
        file=sys.stderr,
    )


def main() -> None:
    atexit.register(_report)
    gc.disable()  # collected every 10k inputs instead, so that "slowest" is not a GC pass
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
