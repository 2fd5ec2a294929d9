// imkit wire protocol for the browser: frame header + the strict CBOR subset imkit uses.
//
// A frame is an 8-byte header (0xC1 magic, version 1, frame type, flags, u32 big-endian
// body length) followed by one CBOR array of the message's fields in wire order
// (docs/protocol.md). Only these CBOR items exist on the wire: unsigned integers,
// byte strings, text strings, arrays, false and true, always in their shortest form.
// Integers above 2^53 - 1 (message ids, cids) are BigInt. LZ4 bodies (flag bit 0)
// are never sent on the WebSocket link, so this decoder refuses them.

export const FrameType = Object.freeze({
  LOGIN: 1, LOGIN_ACK: 2, PING: 3, PONG: 4, SEND: 5, SEND_ACK: 6, PUSH: 7,
  PUSH_BATCH: 8, PUSH_ACK: 9, SYNC: 10, SYNC_RESPONSE: 11, NOTIFY: 12, RECEIPT: 13,
  KICK: 14, ERROR: 15,
});

const MAGIC = 0xc1;
const VERSION = 1;
const MAX_UINT = (1n << 63n) - 1n;
const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

function pushHead(out, major, n) {
  const big = BigInt(n);
  if (big < 0n || big > MAX_UINT) throw new RangeError("integer out of range");
  const m = major << 5;
  if (big < 24n) {
    out.push(m | Number(big));
  } else if (big < 0x100n) {
    out.push(m | 24, Number(big));
  } else if (big < 0x10000n) {
    out.push(m | 25, Number(big >> 8n), Number(big & 0xffn));
  } else if (big < 0x100000000n) {
    out.push(m | 26);
    for (let s = 24n; s >= 0n; s -= 8n) out.push(Number((big >> s) & 0xffn));
  } else {
    out.push(m | 27);
    for (let s = 56n; s >= 0n; s -= 8n) out.push(Number((big >> s) & 0xffn));
  }
}

function encodeItem(out, value) {
  if (typeof value === "boolean") {
    out.push(value ? 0xf5 : 0xf4);
  } else if (typeof value === "number" || typeof value === "bigint") {
    if (typeof value === "number" && !Number.isSafeInteger(value)) {
      throw new RangeError("numbers must be safe integers; use BigInt");
    }
    pushHead(out, 0, value);
  } else if (typeof value === "string") {
    const bytes = encoder.encode(value);
    pushHead(out, 3, bytes.length);
    for (const b of bytes) out.push(b);
  } else if (value instanceof Uint8Array) {
    pushHead(out, 2, value.length);
    for (const b of value) out.push(b);
  } else if (Array.isArray(value)) {
    pushHead(out, 4, value.length);
    for (const item of value) encodeItem(out, item);
  } else {
    throw new TypeError("cannot encode " + typeof value);
  }
}

// One frame: `fields` is the message's field array in wire order.
export function encodeFrame(type, fields) {
  const body = [];
  encodeItem(body, fields);
  const frame = new Uint8Array(8 + body.length);
  const view = new DataView(frame.buffer);
  frame[0] = MAGIC;
  frame[1] = VERSION;
  frame[2] = type;
  frame[3] = 0;
  view.setUint32(4, body.length);
  frame.set(body, 8);
  return frame;
}

function readArg(bytes, pos, info) {
  if (info < 24) return [info, pos];
  const size = { 24: 1, 25: 2, 26: 4, 27: 8 }[info];
  if (size === undefined) throw new Error("unsupported CBOR length");
  if (pos + size > bytes.length) throw new Error("truncated body");
  let big = 0n;
  for (let k = 0; k < size; k++) big = (big << 8n) | BigInt(bytes[pos + k]);
  const value = big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
  return [value, pos + size];
}

function decodeItem(bytes, pos, depth) {
  // the deepest message (SyncResponse > pages > SyncPage > messages > Push) is 5
  // levels; a newer server's unknown trailing fields may nest 2 more (docs/protocol.md)
  if (depth > 8) throw new Error("nested too deeply");
  if (pos >= bytes.length) throw new Error("truncated body");
  const initial = bytes[pos];
  const major = initial >> 5;
  const info = initial & 31;
  if (initial === 0xf4) return [false, pos + 1];
  if (initial === 0xf5) return [true, pos + 1];
  const [arg, next] = readArg(bytes, pos + 1, info);
  if (major === 0) return [arg, next];
  if (major === 2 || major === 3) {
    const end = next + Number(arg);
    if (end > bytes.length) throw new Error("truncated body");
    const slice = bytes.slice(next, end);
    return [major === 2 ? slice : decoder.decode(slice), end];
  }
  if (major === 4) {
    const items = [];
    let p = next;
    for (let k = 0; k < Number(arg); k++) {
      const [item, after] = decodeItem(bytes, p, depth + 1);
      items.push(item);
      p = after;
    }
    return [items, p];
  }
  throw new Error("CBOR item not used by imkit: 0x" + initial.toString(16));
}

// Decode exactly one frame: {type, fields}.
export function decodeFrame(bytes) {
  if (bytes.length < 8 || bytes[0] !== MAGIC || bytes[1] !== VERSION) {
    throw new Error("bad frame header");
  }
  if (bytes[3] !== 0) throw new Error("compressed or flagged frames are not supported");
  const length = new DataView(bytes.buffer, bytes.byteOffset).getUint32(4);
  if (bytes.length !== 8 + length) throw new Error("not one whole frame");
  const [fields, end] = decodeItem(bytes, 8, 0);
  if (end !== bytes.length || !Array.isArray(fields)) throw new Error("malformed body");
  return { type: bytes[2], fields };
}

// The id of the 1:1 conversation of two users (imkit.store.direct_conv_id).
export function directConvId(a, b) {
  const [lo, hi] = a <= b ? [a, b] : [b, a];
  return `dm:${[...lo].length}:${lo}:${hi}`;
}
