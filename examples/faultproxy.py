"""Fault injection for the reference system: a frame-aware TCP proxy and an in-process gateway kill.

What it does
    * :class:`FaultProxy` relays TCP connections from its own port to a gateway
      and applies :class:`LinkFaults` to each direction: drop imkit frames of
      chosen types at random (it splits the stream on the 8-byte frame header, so
      every frame it does not drop is relayed byte for byte), delay every chunk,
      cut the stream into small slices (each written separately), or swallow
      everything (a black hole). :meth:`FaultProxy.reset` drops every relayed
      connection at once; ``refuse`` turns new connections away. The faults are
      plain attributes, so a harness can switch them on and off mid-run.
    * :func:`kill_gateway` makes a running :class:`~examples.gateway.Gateway` vanish
      the way a ``kill -9`` of its process would, inside this process: its
      listener and every client socket close without a Kick, its connection
      handlers stop where they are, its bus subscription and load reports end,
      and the routes it holds stay bound (a dead process unbinds nothing; the
      clients rebind elsewhere when they reconnect; the cluster parks what is
      left once discovery's TTL runs out). It is :meth:`Gateway.abort`.

    ``python -m benchmarks.reliability`` drives both (``docs/reliability.md``).

Policies
    A frame whose header does not look like imkit (bad magic, or a declared body
    above ``max_frame_size``) switches that direction to raw relaying for the rest
    of the connection: the gateway then sees the bytes and rejects them itself.
    One direction ending (EOF or an error) closes both halves. The proxy reads
    with ``limit`` bytes at a time and waits for the writer to drain, so a peer
    that does not read stalls its direction instead of growing a buffer.

What it leaves out
    Faults below TCP (loss, reordering and retransmission inside one stream are
    the kernel's business; ``tc netem`` is not available here), TLS, and a real
    process kill (``kill -9`` / ``SIGSTOP``): everything runs in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field

from imkit.protocol import DEFAULT_MAX_FRAME_SIZE, HEADER_SIZE

from .gateway import Gateway

__all__ = [
    "DEFAULT_READ_SIZE",
    "FaultProxy",
    "LinkFaults",
    "ProxyStats",
    "kill_gateway",
]

#: Bytes read from a socket at a time: asyncio's own stream default (64 KiB), one
#: maximal frame body; the proxy holds at most one read plus one partial frame
#: per direction.
DEFAULT_READ_SIZE = 64 * 1024

_MAGIC = 0xC1  # the first header byte of every imkit frame (docs/protocol.md)


@dataclass
class LinkFaults:
    """What the proxy does to one direction of every connection (mutable: change it live)."""

    drop_types: frozenset[int] = frozenset()  # frame types (FrameType values) eligible to drop
    drop_rate: float = 0.0  # probability that an eligible frame is dropped
    delay_ms: int = 0  # added before relaying each chunk read
    slice_bytes: int = 0  # > 0: write in random slices of 1..slice_bytes bytes
    blackhole: bool = False  # read and discard everything

    def frame_aware(self) -> bool:
        """True when frames must be split out of the stream (something may be dropped)."""
        return bool(self.drop_types) and self.drop_rate > 0.0


@dataclass
class ProxyStats:
    """Counters of a :class:`FaultProxy` (both directions, all connections)."""

    connections: int = 0
    refused: int = 0
    frames_relayed: dict[int, int] = field(default_factory=dict)  # frame type -> count
    frames_dropped: dict[int, int] = field(default_factory=dict)  # frame type -> count
    bytes_blackholed: int = 0
    raw_fallbacks: int = 0  # directions that stopped splitting frames (not imkit)


class _FrameSplitter:
    """Cuts a byte stream into whole imkit frames. O(bytes) per feed.

    Holds at most one partial frame (``HEADER_SIZE + max_frame_size`` bytes);
    anything that is not an imkit header turns it raw (every later byte passes
    through as it is).
    """

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self.buffer = bytearray()
        self.raw = False

    def feed(self, data: bytes) -> list[bytes]:
        """Whole frames now complete (or raw chunks once raw), in order."""
        if self.raw:
            return [data]
        buf = self.buffer
        buf += data
        out: list[bytes] = []
        while len(buf) >= HEADER_SIZE:
            if buf[0] != _MAGIC:
                self.raw = True
                break
            size = int.from_bytes(buf[4:HEADER_SIZE], "big")
            if size > self.max_frame_size:
                self.raw = True
                break
            end = HEADER_SIZE + size
            if len(buf) < end:
                break
            out.append(bytes(buf[:end]))
            del buf[:end]
        if self.raw and buf:
            out.append(bytes(buf))
            buf.clear()
        return out


class FaultProxy:
    """A TCP relay to ``target_host:target_port`` with faults per direction.

    ``c2s`` applies to bytes from the client to the gateway, ``s2c`` to the other
    way. Costs: O(bytes) per chunk, plus O(frames) when frames are split out.
    ``rng`` makes the drops reproducible.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        c2s: LinkFaults | None = None,
        s2c: LinkFaults | None = None,
        rng: random.Random | None = None,
        read_size: int = DEFAULT_READ_SIZE,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.c2s = c2s or LinkFaults()
        self.s2c = s2c or LinkFaults()
        self.rng = rng or random.Random()
        self.read_size = read_size
        self.max_frame_size = max_frame_size
        self.refuse = False  # abort new connections at once
        self.stats = ProxyStats()
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        """``host:port`` clients connect to."""
        return f"127.0.0.1:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen; return the port."""
        self.server = await asyncio.start_server(self._accept, host, port)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port

    def reset(self) -> None:
        """Drop every relayed connection now (both halves, unsent bytes discarded)."""
        for writer in list(self._writers):
            writer.transport.abort()

    async def aclose(self) -> None:
        """Stop listening and drop every connection. Idempotent."""
        if self.server is not None:
            self.server.close()
        self.reset()  # the relays see their sockets die and end on their own
        if self._tasks:
            _, stuck = await asyncio.wait(set(self._tasks), timeout=1.0)
            for task in stuck:
                task.cancel()  # _accept swallows it (asyncio's callback dislikes a cancel)
            await asyncio.gather(*stuck, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._relay(reader, writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self.refuse:
            self.stats.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            self.stats.refused += 1
            writer.transport.abort()
            return
        self.stats.connections += 1
        pair = {writer, up_writer}
        self._writers |= pair
        if task is not None:
            self._tasks.add(task)
        try:
            pipes = [
                asyncio.ensure_future(self._pipe(reader, up_writer, self.c2s)),
                asyncio.ensure_future(self._pipe(up_reader, writer, self.s2c)),
            ]
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in pair:  # one side ended: close both (flushing what is queued)
                    w.close()
                await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._writers -= pair
            if task is not None:
                self._tasks.discard(task)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, faults: LinkFaults
    ) -> None:
        splitter = _FrameSplitter(self.max_frame_size)
        stats = self.stats
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(self.read_size):
                if faults.blackhole:
                    stats.bytes_blackholed += len(data)
                    continue
                if faults.delay_ms:
                    await asyncio.sleep(faults.delay_ms / 1000)
                if faults.frame_aware() or splitter.buffer:
                    was_raw = splitter.raw
                    chunks = []
                    for frame in splitter.feed(data):
                        if splitter.raw:
                            chunks.append(frame)
                            continue
                        kind = frame[2]
                        if kind in faults.drop_types and self.rng.random() < faults.drop_rate:
                            stats.frames_dropped[kind] = stats.frames_dropped.get(kind, 0) + 1
                            continue
                        stats.frames_relayed[kind] = stats.frames_relayed.get(kind, 0) + 1
                        chunks.append(frame)
                    if splitter.raw and not was_raw:
                        stats.raw_fallbacks += 1
                    data = b"".join(chunks)
                if not data:
                    continue
                if faults.slice_bytes > 0:
                    pos = 0
                    while pos < len(data):
                        n = self.rng.randint(1, faults.slice_bytes)
                        dst.write(data[pos : pos + n])
                        pos += n
                        await dst.drain()
                        await asyncio.sleep(0)  # let each slice leave as its own write
                else:
                    dst.write(data)
                    await dst.drain()


# --- killing a gateway in-process ---------------------------------------------------------


async def kill_gateway(gateway: Gateway) -> int:
    """Make ``gateway`` vanish like a killed process; return how many clients it dropped.

    :meth:`Gateway.abort`: its listener and every client socket close without a
    Kick, its handlers stop while they wait for the next frame, its bus
    subscription, load reports and timers end, and its routes stay bound (a dead
    process unbinds nothing) until discovery's TTL runs out and the cluster
    parks them, or their devices log in elsewhere. ``Cluster.stop()`` still works
    afterwards. O(connections).
    """
    return await gateway.abort()
