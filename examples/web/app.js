// The imkit web chat page: a small client session over WebSocket (one frame per message).
//
// What it keeps of the delivery contract: a login token from the dev endpoint, an inbox
// sync after login, per-conversation order (messages after a gap are held until a sync
// fills it), duplicates dropped, every push acknowledged, Notify answered by a sync,
// heartbeats at the server's interval. What it leaves out: resending unacknowledged
// sends after a reconnect (it shows them as failed), and local history.

import { FrameType as T, decodeFrame, directConvId, encodeFrame } from "./cbor.js";

const $ = (id) => document.getElementById(id);
const utf8 = new TextEncoder();
const utf8dec = new TextDecoder();

const state = {
  ws: null,
  uid: "",
  conv: "",
  contiguous: new Map(), // conv -> highest seq shown with nothing missing below
  held: new Map(), // conv -> Map(seq -> push) received after a gap
  rendered: new Set(), // "conv#seq" already on screen
  pending: new Map(), // cid (string) -> <li> of a message awaiting its SendAck
  wanted: new Set(), // conversations to sync
  listed: null, // Map conv -> cursor of the outstanding listed sync
  syncing: false,
  reqId: 0,
  cid: 0n,
  pinger: null,
};

function setStatus(text) {
  $("status").textContent = text;
}

function show(push) {
  const key = `${push.conv}#${push.seq}`;
  if (state.rendered.has(key)) return;
  state.rendered.add(key);
  const li = document.createElement("li");
  li.dataset.conv = push.conv;
  li.dataset.seq = String(push.seq);
  li.className = push.sender === state.uid ? "me" : "them";
  const who = document.createElement("b");
  who.textContent = push.sender + (push.conv === state.conv ? "" : ` @${push.conv}`);
  li.append(who, ": " + utf8dec.decode(push.body));
  $("log").append(li);
  li.scrollIntoView({ block: "end" });
}

function send(type, fields) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(encodeFrame(type, fields));
  }
}

function toPush(f) {
  return { conv: f[0], seq: Number(f[1]), sender: f[2], body: f[3] };
}

// Offer one push: show it in order, hold it after a gap (and ask for a sync).
function offer(push, skipTo) {
  const conv = push.conv;
  let cont = state.contiguous.get(conv) || 0;
  if (skipTo !== undefined && push.seq - 1 > cont) cont = push.seq - 1; // sync proved the gap
  if (push.seq <= cont) return;
  let held = state.held.get(conv);
  if (!held) state.held.set(conv, (held = new Map()));
  held.set(push.seq, push);
  while (held.has(cont + 1)) {
    cont += 1;
    show(held.get(cont));
    held.delete(cont);
  }
  state.contiguous.set(conv, cont);
  if (held.size) state.wanted.add(conv);
}

function maybeSync() {
  if (state.syncing || !state.wanted.size) return;
  const after = [];
  state.listed = new Map();
  for (const conv of state.wanted) {
    const cursor = state.contiguous.get(conv) || 0;
    after.push([conv, cursor]);
    state.listed.set(conv, cursor);
    if (after.length >= 100) break;
  }
  for (const [conv] of after) state.wanted.delete(conv);
  state.syncing = true;
  send(T.SYNC, [++state.reqId, after, 100]);
}

function onFrame({ type, fields }) {
  switch (type) {
    case T.LOGIN_ACK: {
      state.uid = fields[0];
      const heartbeat = Number(fields[3] ?? 30000);
      setStatus(`online as ${state.uid}`);
      $("status").dataset.state = "online";
      clearInterval(state.pinger);
      state.pinger = setInterval(() => send(T.PING, [0]), heartbeat * 0.8);
      break;
    }
    case T.SEND_ACK: {
      const [cid, conv, seq = 0, , , error = 0] = fields;
      const li = state.pending.get(String(cid));
      state.pending.delete(String(cid));
      if (!li) break;
      if (error) {
        li.classList.add("failed");
        li.title = `refused (code ${error})`;
      } else if (state.rendered.has(`${conv}#${seq}`)) {
        li.remove(); // its push arrived first and is already shown
      } else {
        state.rendered.add(`${conv}#${seq}`);
        li.classList.remove("sending");
        li.dataset.seq = String(seq);
      }
      break;
    }
    case T.PUSH:
    case T.PUSH_BATCH: {
      const pushes = type === T.PUSH ? [toPush(fields)] : fields[0].map(toPush);
      for (const p of pushes) offer(p);
      for (const p of pushes) send(T.PUSH_ACK, [p.conv, p.seq, false]);
      maybeSync();
      break;
    }
    case T.SYNC_RESPONSE: {
      const listed = state.listed || new Map();
      state.listed = null;
      state.syncing = false;
      for (const [conv, messages, more = false] of fields[1] || []) {
        let first = true;
        for (const m of messages) {
          offer(toPush(m), first && listed.has(conv) ? true : undefined);
          first = false;
        }
        if (more) state.wanted.add(conv);
      }
      maybeSync();
      break;
    }
    case T.NOTIFY:
      for (const [conv, seq] of fields[0]) {
        if (Number(seq) > (state.contiguous.get(conv) || 0)) state.wanted.add(conv);
      }
      maybeSync();
      break;
    case T.RECEIPT: {
      const [conv, seq, reader] = fields;
      if (reader !== state.uid) setStatus(`${reader} read ${conv} up to #${seq}`);
      break;
    }
    case T.KICK:
    case T.ERROR:
      setStatus(`${type === T.KICK ? "kicked" : "error"}: ${fields[1] || "code " + fields[0]}`);
      break;
    default:
      break; // PONG
  }
}

async function connect() {
  const user = $("user").value.trim();
  const to = $("to").value.trim();
  const group = $("group").value.trim();
  if (!user || (!to && !group)) {
    setStatus("enter your name and someone to talk to (or a group)");
    return;
  }
  state.conv = group || directConvId(user, to);
  const device = "web-" + Math.random().toString(16).slice(2, 8);
  setStatus("getting a token...");
  const answer = await fetch(`/dev/token?uid=${encodeURIComponent(user)}&device=${device}`);
  const doc = await answer.json();
  if (!doc.token) {
    setStatus(`no token: ${doc.error}`);
    return;
  }
  const slot = BigInt(Math.floor(Math.random() * 16));
  state.cid = ((BigInt(Date.now()) << 4n) | slot) << 16n; // imkit.session.initial_cid
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onopen = () => {
    setStatus("logging in...");
    // token, device, resume, min_version, max_version: this page speaks protocol
    // version 2 (it reads fields by position and ignores trailing ones it does not
    // use, e.g. LoginAck's rate hints; a person typing never nears the rate limit)
    send(T.LOGIN, [doc.token, device, "", 1, 2]);
    state.syncing = true;
    state.listed = new Map();
    send(T.SYNC, [++state.reqId, [], 100]); // the inbox sync (pipelined after Login)
  };
  ws.onmessage = (event) => {
    try {
      onFrame(decodeFrame(new Uint8Array(event.data)));
    } catch (err) {
      setStatus(`bad frame: ${err.message}`);
      ws.close();
    }
  };
  ws.onclose = () => {
    clearInterval(state.pinger);
    $("status").dataset.state = "closed";
    setStatus("disconnected (reload to reconnect)");
    for (const li of state.pending.values()) li.classList.add("failed");
  };
  $("chat").hidden = false;
  $("title").textContent = group ? `#${group}` : `${user} & ${to}`;
}

function sendText() {
  const text = $("text").value;
  if (!text.trim() || !state.ws) return;
  state.cid += 1n;
  const li = document.createElement("li");
  li.className = "me sending";
  const who = document.createElement("b");
  who.textContent = state.uid || $("user").value;
  li.append(who, ": " + text);
  $("log").append(li);
  state.pending.set(String(state.cid), li);
  send(T.SEND, [state.cid, state.conv, utf8.encode(text), Date.now()]);
  $("text").value = "";
}

$("connect").addEventListener("click", connect);
$("send").addEventListener("click", sendText);
$("text").addEventListener("keydown", (e) => {
  if (e.key === "Enter") sendText();
});
const params = new URLSearchParams(location.search);
for (const name of ["user", "to", "group"]) {
  if (params.get(name)) $(name).value = params.get(name);
}
if (params.get("user")) connect();
