"""A terminal chat client on :class:`imkit.aio.Client`.

What it does
    ``python -m examples.chat --user alice --to bob`` (or ``--group lobby``):

    1. gets a login token from the launcher's development endpoint
       (``GET <ipconf>/dev/token?uid=alice&device=...``), or mints one itself with
       ``--secret HEX`` (the secret the launcher printed);
    2. asks ipconf for the ranked gateway list (``<ipconf>/gateways?uid=alice``)
       and lets :class:`~imkit.aio.Client` connect (racing two, caching the list,
       falling back to it when ipconf is down), log in, and reconnect with backoff;
    3. prints every message of the conversation as it arrives (history first:
       the first sync brings what was said before), and sends each line you type.

    Lines starting with ``/``: ``/to USER`` or ``/group NAME`` switches the
    conversation, ``/quit`` leaves. ``--send TEXT`` (repeatable) sends and waits for
    each acknowledgement, ``--expect N`` waits until N messages from others have
    arrived; with either, the client exits when done (0 on success, 1 on timeout):
    that is the non-interactive mode scripts and CI use.

Policies
    Each run is a new device (``cli-<random>``) unless ``--device`` is given, so two
    terminals of one user do not replace each other. The session's delivery
    contract holds: each message is printed once, in order per conversation.

What it leaves out
    Local history storage (a restart fetches the history again), read receipts in
    the UI, and editing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys
import time
import urllib.parse
from collections.abc import Callable

from imkit.aio import Client, ClientStatus
from imkit.errors import BackendError, ConnectionClosed, HttpError, ImkitError, SendError
from imkit.protocol import Push
from imkit.session import Kicked, SessionEvent
from imkit.store import direct_conv_id

from . import command
from .auth import Authenticator
from .httpclient import endpoint_fetcher, fetch_json

__all__ = ["DEFAULT_IPCONF", "fetch_token", "main"]

#: The launcher's default ipconf address.
DEFAULT_IPCONF = "http://127.0.0.1:7700"


async def fetch_token(ipconf: str, uid: str, device: str) -> str:
    """A development login token from the launcher (BackendError if refused)."""
    query = urllib.parse.urlencode({"uid": uid, "device": device})
    doc = await fetch_json(f"{ipconf.rstrip('/')}/dev/token?{query}")
    token = doc.get("token") if isinstance(doc, dict) else None
    if not isinstance(token, str):
        raise BackendError(f"no token for {uid!r}: {doc}")
    return token


def _token_error(exc: HttpError) -> str:
    """Why ``/dev/token`` refused, from the answer's status and JSON error body."""
    reason = exc.body.get("error") if isinstance(exc.body, dict) else None
    if not isinstance(reason, str) or not reason:
        if exc.status == 404:  # no JSON: the path itself is not served there
            return f"{exc} (no /dev/token there: is --ipconf the launcher's ipconf?)"
        return str(exc)
    text = "".join(c if c.isprintable() else "?" for c in reason[:200])  # a peer's words
    if exc.status == 404:
        return f"{text} (add it: {command('cluster')} admin create-user NAME)"
    if exc.status == 403:
        return (
            f"{text} (start the launcher with --dev, "
            "or pass --secret HEX: the launcher's IMKIT_SECRET)"
        )
    return f"{text} (HTTP {exc.status})"


def conversation_of(user: str, to: str | None, group: str | None) -> str:
    """The conversation id: the group, or the 1:1 conversation with ``to``."""
    if group:
        return group
    if not to:
        raise SystemExit("give --to USER or --group NAME")
    return direct_conv_id(user, to)


def _format(push: Push, me: str) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(push.server_ms / 1000))
    text = push.body.decode("utf-8", "replace")
    who = "me" if push.sender == me else push.sender
    return f"[{when}] {push.conv}#{push.seq} {who}: {text}"


async def _lines(on_line: Callable[[str], object]) -> None:
    """Feed stdin lines to ``on_line`` until EOF (a pipe reader; no thread)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        on_line(line.decode("utf-8", "replace").rstrip("\n"))


async def run_chat(args: argparse.Namespace) -> int:
    """Run the client until /quit, EOF, or (non-interactive) the goal or the timeout."""
    device = args.device or f"cli-{secrets.token_hex(3)}"
    ipconf = args.ipconf.rstrip("/")
    try:
        if args.secret:
            token = Authenticator(bytes.fromhex(args.secret)).issue(args.user, device)
        else:
            token = await fetch_token(ipconf, args.user, device)
    except HttpError as exc:  # the launcher answered, and said no
        print(f"cannot get a login token: {_token_error(exc)}", file=sys.stderr)
        return 1
    except (ImkitError, ValueError) as exc:
        print(f"cannot get a login token: {exc}", file=sys.stderr)
        return 1
    conv = conversation_of(args.user, args.to, args.group)
    scripted = bool(args.send) or args.expect is not None
    done = asyncio.Event()
    failed: list[str] = []

    def on_event(event: SessionEvent) -> None:
        if isinstance(event, Kicked):
            print(f"* kicked: {event.reason or event.code}", file=sys.stderr)
            if not event.reconnect:
                failed.append("kicked")
                done.set()

    client = Client(
        token=token,
        device=device,
        fetch_endpoints=endpoint_fetcher(
            f"{ipconf}/gateways?{urllib.parse.urlencode({'uid': args.user})}"
        ),
        endpoints=args.endpoint or (),
        on_event=on_event,
    )
    received = 0
    sends_done = asyncio.Event()

    async def show() -> None:
        nonlocal received
        async for push in client.messages():
            if args.all or push.conv == conv:
                print(_format(push, args.user), flush=True)
            if push.sender != args.user and (args.all or push.conv == conv):
                received += 1
                if args.expect is not None and received >= args.expect and sends_done.is_set():
                    done.set()

    async def send_all() -> None:
        try:
            for text in args.send:
                seq = await client.send(conv, text.encode())
                print(f"* sent to {conv} as #{seq}", flush=True)
        except (SendError, ConnectionClosed) as exc:
            print(f"* not sent: {exc}", file=sys.stderr)
            failed.append(str(exc))
            done.set()
            return
        sends_done.set()
        if args.expect is None or received >= args.expect:
            done.set()

    async with client:
        try:
            await client.wait_for(ClientStatus.ONLINE, timeout=args.timeout)
        except (TimeoutError, ConnectionClosed):
            print(f"could not log in: {client.last_error or client.kicked}", file=sys.stderr)
            return 1
        if not scripted:
            print(f"* {args.user} on {client.endpoint}, chatting in {conv}. /quit leaves.")
        tasks = [asyncio.create_task(show())]
        if scripted:
            tasks.append(asyncio.create_task(send_all()))
            try:
                await asyncio.wait_for(done.wait(), args.timeout)
            except TimeoutError:
                failed.append("timeout")
                print(f"timed out: {received} of {args.expect} received", file=sys.stderr)
        else:

            def on_line(line: str) -> None:
                nonlocal conv
                if line in ("/quit", "/exit"):
                    done.set()
                elif line.startswith("/to "):
                    conv = direct_conv_id(args.user, line[4:].strip())
                    print(f"* now chatting in {conv}")
                elif line.startswith("/group "):
                    conv = line[7:].strip()
                    print(f"* now chatting in {conv}")
                elif line.strip():
                    _, fut = client.send_nowait(conv, line.encode())
                    fut.add_done_callback(_report_failure)
                    unsent.add(fut)
                    fut.add_done_callback(unsent.discard)

            unsent: set[asyncio.Future[int]] = set()
            reader = asyncio.create_task(_lines(on_line))
            reader.add_done_callback(lambda _: done.set())
            tasks.append(reader)
            await done.wait()
            if unsent:  # input ended (or /quit): let what was typed reach the server
                await asyncio.wait(unsent, timeout=args.timeout)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return 1 if failed else 0


def _report_failure(fut: asyncio.Future[int]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        print(f"* not sent: {fut.exception()}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m examples.chat``."""
    p = argparse.ArgumentParser(
        prog=command("chat"),
        description="Chat through the imkit reference system (start it with "
        f"`{command('cluster')} --dev`).",
    )
    p.add_argument("--user", required=True, help="who you are (e.g. alice)")
    p.add_argument("--to", help="chat 1:1 with this user")
    p.add_argument("--group", help="chat in this group (e.g. lobby, team)")
    p.add_argument("--ipconf", default=DEFAULT_IPCONF, help=f"ipconf URL ({DEFAULT_IPCONF})")
    p.add_argument("--endpoint", action="append", help="fallback gateway host:port (repeatable)")
    p.add_argument("--secret", help="mint the token with this hex secret instead of /dev/token")
    p.add_argument("--device", help="device id (default: a new one per run)")
    p.add_argument("--send", action="append", default=[], help="send TEXT and wait for its ack")
    p.add_argument("--expect", type=int, help="wait for N messages from others, then exit")
    p.add_argument("--all", action="store_true", help="show every conversation")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (login, scripted mode)")
    args = p.parse_args(argv)
    from imkit.aio import run

    try:
        return run(run_chat(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
