"""The history oracle (tests/history.py) finds each fault it exists to find, and only those.

Two users in one conversation; alice sends, the store holds what it acknowledged,
and each test hands the applications a different sequence of pushes: every member
gets everything once and in order (passes); one message never reaches bob (lost);
bob gets one twice (app duplicate); bob gets two out of order (order violation);
bob gets a message nobody sent (unexpected); the store holds another body at an
acknowledged seq (seq reuse).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from imkit.errors import SendError
from imkit.protocol import Push
from tests.history import Check, History, check_history

CONV = "team"


@dataclass(frozen=True)
class Members:
    """The smallest layout: alice and bob in ``team``."""

    users: tuple[str, ...] = ("alice", "bob")
    convs: dict[str, tuple[str, ...]] = field(default_factory=lambda: {CONV: ("alice", "bob")})
    big: str | None = None


def push(seq: int, body: str, sender: str = "alice") -> Push:
    return Push(conv=CONV, seq=seq, sender=sender, body=body.encode())


async def _run(
    acked: int,
    deliveries: dict[str, Sequence[Push]],
    *,
    stored: Sequence[tuple[int, str, str]] | None = None,
    failed: int = 0,
    users: tuple[str, ...] = ("alice", "bob"),
) -> Check:
    """alice sends ``acked`` messages (acked with seqs 1..n) and ``failed`` more that fail."""
    history = History(Members(users=users), clock=itertools.count(1).__next__)
    loop = asyncio.get_running_loop()
    rows: list[tuple[int, str, str]] = []
    for seq in range(1, acked + failed + 1):
        body = history.next_body("alice")
        fut: asyncio.Future[int] = loop.create_future()
        history.sent("alice", CONV, body, fut)
        if seq <= acked:
            fut.set_result(seq)
            rows.append((seq, "alice", body))
        else:
            fut.set_exception(SendError(seq, 3))
    await asyncio.sleep(0)  # the futures' done callbacks settle the records
    for uid, pushes in deliveries.items():
        for p in pushes:
            history.deliver(uid, p)
    return check_history(history, {CONV: list(stored) if stored is not None else rows})


def check(
    acked: int,
    deliveries: dict[str, Sequence[Push]],
    *,
    stored: Sequence[tuple[int, str, str]] | None = None,
    failed: int = 0,
    users: tuple[str, ...] = ("alice", "bob"),
) -> Check:
    return asyncio.run(_run(acked, deliveries, stored=stored, failed=failed, users=users))


BOTH = [push(1, "alice-1"), push(2, "alice-2")]


class TestCleanHistory:
    def test_every_member_gets_everything_once_in_order(self) -> None:
        """A history with no fault passes with every count at 0."""
        c = check(2, {"alice": BOTH, "bob": BOTH}, failed=1)
        assert c.passed
        assert (c.sends_ok, c.sends_failed, c.sends_unknown) == (2, 1, 0)
        assert (c.stored, c.deliveries) == (2, 4)
        assert (c.lost, c.unexpected, c.app_duplicates, c.order_violations) == (0, 0, 0, 0)
        assert (c.seq_reuse, c.double_stored, c.undelivered, c.seq_holes) == (0, 0, 0, 0)
        assert c.latency_n == 2  # bob's deliveries; alice's own copies carry no latency


class TestFaultsFound:
    def test_a_lost_message(self) -> None:
        """An acknowledged message bob never got is lost (once per member missing it)."""
        c = check(2, {"alice": BOTH, "bob": BOTH[:1]})
        assert (c.lost, c.lost_messages, c.undelivered) == (1, 1, 1)
        assert (c.unexpected, c.app_duplicates, c.order_violations) == (0, 0, 0)
        assert not c.passed

    def test_a_duplicate_delivered_to_the_app(self) -> None:
        """The same message handed to bob's application twice is an app duplicate."""
        c = check(2, {"alice": BOTH, "bob": [*BOTH, BOTH[1]]})
        assert c.app_duplicates == 1
        assert (c.lost, c.unexpected) == (0, 0)
        assert not c.passed

    def test_an_order_violation(self) -> None:
        """Seq 2 before seq 1 for bob is one order violation, nothing lost or duplicated."""
        c = check(2, {"alice": BOTH, "bob": BOTH[::-1]})
        assert c.order_violations == 1
        assert (c.lost, c.unexpected, c.app_duplicates) == (0, 0, 0)
        assert not c.passed

    def test_an_unexpected_message(self) -> None:
        """A delivery nobody sent (and the store does not hold) is unexpected."""
        c = check(2, {"alice": BOTH, "bob": [*BOTH, push(3, "mallory-1", "mallory")]})
        assert c.unexpected == 1
        assert (c.lost, c.app_duplicates, c.order_violations) == (0, 0, 0)
        assert not c.passed

    def test_a_delivery_to_a_non_member_is_unexpected(self) -> None:
        """A message handed to carol, who is not in the conversation, is unexpected."""
        everyone = ("alice", "bob", "carol")
        c = check(2, {"alice": BOTH, "bob": BOTH, "carol": BOTH[:1]}, users=everyone)
        assert c.unexpected == 1
        assert (c.lost, c.app_duplicates, c.order_violations) == (0, 0, 0)
        assert not c.passed

    def test_seq_reuse_between_the_ack_and_the_store(self) -> None:
        """An ack for seq 1 while the store holds another body at seq 1 is seq reuse."""
        stored = [(1, "alice", "alice-9"), (2, "alice", "alice-2")]
        c = check(2, {"alice": BOTH[1:], "bob": BOTH[1:]}, stored=stored)
        assert c.seq_reuse == 1
        assert not c.passed
