"""Every constant of the wire format and every limit, each with where its number comes from.

The header layout and the per-field limits are protocol constants: both ends must
agree on them, so they are module constants. The sizes a deployment may want to
tune (frame size, buffer size, compression threshold) are ``Connection`` keywords
whose defaults are the ``DEFAULT_*`` constants below.
"""

from __future__ import annotations

from typing import Final

# --- the frame header (8 bytes, big-endian; see docs/protocol.md) -----------------

#: Byte 0 of every frame. 0xC1 never occurs in UTF-8 text (it would encode an
#: overlong 2-byte sequence), is not ASCII (an HTTP request, "GET ", fails on the
#: first byte) and is not 0x16 (a TLS ClientHello), 0x00 or 0xFF (zeroed or erased
#: memory): a misdirected or desynchronised stream is refused at its first byte.
MAGIC: Final = 0xC1

#: Byte 1: the *framing* version (this header and "a body is one strict CBOR
#: array"). It changes only if the framing itself changes, and a decoder refuses
#: every framing version it does not know (no silent best effort). Message fields
#: evolve without it: see PROTOCOL_VERSION.
FRAMING_VERSION: Final = 1

#: Magic and version read as one big-endian u16, compared in one step.
MAGIC_VERSION: Final = (MAGIC << 8) | FRAMING_VERSION

#: Bytes 0-7: magic u8, version u8, frame type u8, flags u8, body length u32.
#: A u32 length keeps the layout fixed whatever max_frame_size is set to; 8 bytes
#: is 3-5% of a typical 150-250 byte chat frame.
HEADER_SIZE: Final = 8

#: Flag bit 0: the body is LZ4-compressed (block format, size-prefixed).
FLAG_LZ4: Final = 0x01

#: Every flag bit this version defines. Any other bit set is a bad header: a future
#: flag must not be silently ignored by an old peer.
KNOWN_FLAGS: Final = FLAG_LZ4

#: Bytes of the little-endian uncompressed-size prefix of an LZ4 body (the LZ4
#: block "stored size" layout of ``lz4.block.compress(store_size=True)``).
LZ4_SIZE_PREFIX: Final = 4

# --- protocol versions (negotiated at login; see docs/protocol.md) ------------------

#: The highest protocol version this release speaks. 1: the original messages
#: (a Login without a version offer means 1). 2: Login offers a version range,
#: LoginAck says the chosen ``version`` and announces the server's frame rate,
#: burst and sends in flight; decoders skip unknown trailing fields.
PROTOCOL_VERSION: Final = 2

#: The lowest protocol version this release still speaks: clients installed years
#: ago must keep working against an upgraded cluster.
MIN_PROTOCOL_VERSION: Final = 1

#: Unknown trailing fields a decoder skips per message (or nested struct). A
#: version adds a few fields to a message; 16 is more than any message has today
#: (LoginAck: 11), and it bounds the items one struct can make a decoder walk
#: beyond its schema (each extra item is also bounded by MAX_ITEMS and
#: MAX_EXTRA_DEPTH).
MAX_EXTRA_FIELDS: Final = 16

#: Array nesting inside one unknown field: 2 holds a list of pairs or of small
#: structs (the deepest shape any field has today, ``Notify.entries``); deeper
#: unknown data is refused, so the whole body stays within MAX_DEPTH + 2 levels.
MAX_EXTRA_DEPTH: Final = 2

# --- connection defaults ------------------------------------------------------------

#: Largest body accepted, compressed or not, and largest decompressed body.
#: RELIABILITY.md: "cap frame size (64 KiB is plenty for chat)": a SyncResponse
#: page of 100 messages of 200 bytes is ~25 KiB; the worst frame a peer can craft
#: (many tiny items) then costs a few ms of CPU, not the ~300 ms of 1 MB of empty
#: arrays; and a connection never holds more than one such frame of its own.
DEFAULT_MAX_FRAME_SIZE: Final = 64 * 1024

#: Upper bound for ``max_frame_size``: the u32 length field.
MAX_FRAME_SIZE_LIMIT: Final = 0xFFFF_FFFF

#: Bodies at least this long are LZ4-compressed (and sent compressed only if the
#: result is smaller). PEERS.md: a single message does not compress (0.98), a
#: 100-message batch does (0.53); measured here, a batch of 3 chat messages (~600
#: bytes) already compresses to ~0.65 for ~1 us of CPU. Below 512 bytes a frame is a
#: single message and fits one 1400-byte segment anyway (seed: 1400-byte packets).
DEFAULT_COMPRESS_THRESHOLD: Final = 512

#: Room for one read on top of one incomplete frame in a Connection's buffer: asyncio
#: hands a protocol at most 256 KiB per data_received() (the selector transport's
#: max_size), and after the caller drained every event at most one incomplete frame
#: is left.
READ_ALLOWANCE: Final = 256 * 1024

#: Bytes a Connection buffers between receive_data() and next_event() by default:
#: one incomplete frame of the default size plus one read (320 KiB: 327,688 bytes). With
#: ``max_buffer_size=None`` a Connection uses HEADER_SIZE + max_frame_size +
#: READ_ALLOWANCE, i.e. this figure for the default frame size.
DEFAULT_MAX_BUFFER_SIZE: Final = HEADER_SIZE + DEFAULT_MAX_FRAME_SIZE + READ_ALLOWANCE

# --- per-field limits (protocol constants, checked on decode and on encode) ------------

#: Largest integer on the wire: 2**63 - 1, so that every seq, id and timestamp
#: fits a signed 64-bit column (SQLite INTEGER, Redis, Java long). No negatives.
MAX_UINT: Final = (1 << 63) - 1

#: Ids (conv, sender, uid, device, session, resume, reader), UTF-8 bytes. 128 bytes
#: holds a UUID, a "group:" prefix plus a 64-bit number, or a JID-style user@host
#: with room to spare; two maximal ids still leave a Push >1 KiB of body within
#: one 1400-byte segment.
MAX_ID_BYTES: Final = 128

#: Login token, UTF-8 bytes. A signed token (uid, device, expiry, HMAC) is ~100
#: bytes; 1024 admits a JWT with a few claims and keeps Login within one segment.
MAX_TOKEN_BYTES: Final = 1024

#: ``reason`` of Kick / Error, UTF-8 bytes: short, fixed strings, never internal
#: details (STYLE.md); 256 bytes is a sentence.
MAX_REASON_BYTES: Final = 256

#: Entries in any tuple field (pushes of a batch, messages of a page, pages of a
#: response, (conv, seq) pairs of SyncRequest.after and Notify.entries). A merge
#: window is ~100 messages and a sync page 100; 1024 bounds the objects one frame
#: can make a receiver allocate (a 64 KiB frame of minimal pushes would otherwise
#: be ~9000 objects).
MAX_ITEMS: Final = 1024

#: Deepest CBOR nesting any message has: SyncResponse > pages > SyncPage >
#: messages > Push. The decoder is driven by the schema, so it cannot go deeper,
#: except inside an unknown trailing field (at most MAX_EXTRA_DEPTH more).
MAX_DEPTH: Final = 5
