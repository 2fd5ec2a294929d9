"""The client fleet: who talks to whom, the clients and their chatter, the drain.

:class:`Layout` builds the users and conversations (1:1 pairs, groups of ten, one
group of everyone) and seeds a store with them; :class:`Population` runs one
:class:`imkit.aio.Client` per user, logs every send and delivery in a
:class:`tests.history.History`, and chats at a given rate while ``chatting`` is
set; :func:`drain` stops the chatter and waits until every member has caught up
with the store (on its own first, then through an explicit sync).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tests.history import History

from imkit.aio import Client, ClientStatus
from imkit.errors import CapacityError, ConnectionClosed
from imkit.policy import Backoff
from imkit.session import ClientConfig, LoggedIn, SessionEvent
from imkit.store import MessageStore, direct_conv_id

#: The device every fleet client logs in with (one device per user).
DEVICE = "d"


def now() -> float:
    """The harness's clock: monotonic seconds."""
    return time.monotonic()


@dataclass
class Layout:
    """Users and conversations: pairs chat 1:1, groups of ``group_size``, one group of all."""

    users: list[str]
    convs: dict[str, tuple[str, ...]]  # conv -> members (the ones the history expects)
    dm: dict[str, str]  # uid -> its 1:1 conversation
    group: dict[str, str]  # uid -> its small group
    big: str | None  # the group of everyone (merged read fan-out), if any

    @classmethod
    def build(cls, n: int, *, group_size: int = 10, big: bool = True) -> Layout:
        """``n`` users u000...; user i chats 1:1 with i^1 (the last odd one out with u000)."""
        users = [f"u{i:03d}" for i in range(n)]
        convs: dict[str, tuple[str, ...]] = {}
        dm: dict[str, str] = {}
        for i, uid in enumerate(users):
            j = i ^ 1 if (i ^ 1) < n else 0
            if j == i:
                continue
            conv = direct_conv_id(uid, users[j])
            convs.setdefault(conv, tuple(sorted((uid, users[j]))))
            dm.setdefault(uid, conv)
        group: dict[str, str] = {}
        for k in range(0, n, group_size):
            name = f"g{k // group_size:02d}"
            members = tuple(users[k : k + group_size])
            if len(members) < 2:
                continue
            convs[name] = members
            for uid in members:
                group[uid] = name
        big_conv = "all" if big and n > 2 else None
        if big_conv is not None:
            convs[big_conv] = tuple(users)
        return cls(users=users, convs=convs, dm=dm, group=group, big=big_conv)

    def seed(self, store: MessageStore) -> None:
        """Create the users and conversations (idempotent: a reused data directory)."""
        for uid in self.users:
            store.create_user(uid)
        for conv, members in self.convs.items():
            if conv.startswith("dm:"):
                store.create_direct(*members)
            else:
                store.create_group(conv, members)

    def convs_of(self, uid: str) -> list[str]:
        """The conversations ``uid`` is expected to receive."""
        return [c for c, m in self.convs.items() if uid in m]



class Population:
    """One :class:`Client` per user of a layout, a consumer per client, and chatter.

    Each client sends at ``rate`` messages/s (exponential gaps) while ``chatting``
    is set: 45% to its 1:1 partner, 45% to its small group, 10% to the group of all.
    """

    def __init__(
        self,
        layout: Layout,
        history: History,
        *,
        token: Callable[[str], str],
        endpoints: Callable[[int], list[str]],
        rate: float,
        reconnect: Backoff,
        seed: int = 1,
    ) -> None:
        self.layout = layout
        self.history = history
        self.rate = rate
        self.rng = random.Random(seed)
        self.chatting = asyncio.Event()
        self.logins: dict[str, list[float]] = {uid: [] for uid in layout.users}
        self.clients: dict[str, Client] = {}
        for i, uid in enumerate(layout.users):
            self.clients[uid] = Client(
                token=token(uid),
                device=DEVICE,
                endpoints=endpoints(i),
                config=ClientConfig(reconnect=reconnect),
                on_event=self._on_event(uid),
                rng=random.Random(seed * 100_003 + i),
            )
        self._consumers: list[asyncio.Task[None]] = []
        self.burst_s = 0.0
        self._chatters: list[asyncio.Task[None]] = []

    def _on_event(self, uid: str) -> Callable[[SessionEvent], object]:
        def on_event(event: SessionEvent) -> None:
            if isinstance(event, LoggedIn):
                self.logins[uid].append(now())

        return on_event

    async def start(self, timeout_s: float = 60.0) -> None:
        """Connect every client, wait until all are online, start consumers and chatter."""
        for client in self.clients.values():
            await client.start()
        await asyncio.gather(
            *(c.wait_for(ClientStatus.ONLINE, timeout=timeout_s) for c in self.clients.values())
        )
        loop = asyncio.get_running_loop()
        for uid, client in self.clients.items():
            self._consumers.append(loop.create_task(self._consume(uid, client)))
            self._chatters.append(loop.create_task(self._chatter(uid, client)))

    async def _consume(self, uid: str, client: Client) -> None:
        deliver = self.history.deliver
        async for push in client.messages():
            deliver(uid, push)

    async def _chatter(self, uid: str, client: Client) -> None:
        rng = random.Random(self.rng.random())
        layout = self.layout
        choices: list[str] = []
        weights: list[float] = []
        for conv, weight in (
            (layout.dm.get(uid), 0.45),
            (layout.group.get(uid), 0.45),
            (layout.big, 0.10),
        ):
            if conv is not None:
                choices.append(conv)
                weights.append(weight)
        if not choices:
            return
        while True:
            await self.chatting.wait()
            await asyncio.sleep(rng.expovariate(self.rate))
            if not self.chatting.is_set():
                continue
            conv = rng.choices(choices, weights)[0]
            body = self.history.next_body(uid)
            try:
                _, fut = client.send_nowait(conv, body.encode())
            except (CapacityError, ConnectionClosed):
                self.history.not_sent += 1
                continue
            self.history.sent(uid, conv, body, fut)

    async def burst(self, per_client: int, store: Callable[[], MessageStore]) -> int:
        """Every client sends ``per_client`` messages at once; wait until all are delivered."""
        start = now()
        sent = 0
        for chunk in range(0, per_client, 10):  # ten at a time: a burst, not a flood
            futures: list[asyncio.Future[int]] = []
            for uid, client in self.clients.items():
                convs = [c for c in (self.layout.dm.get(uid), self.layout.group.get(uid)) if c]
                for k in range(chunk, min(per_client, chunk + 10)):
                    conv = convs[k % len(convs)]
                    body = self.history.next_body(uid)
                    _, fut = client.send_nowait(conv, body.encode())
                    self.history.sent(uid, conv, body, fut)
                    futures.append(fut)
            await asyncio.gather(*futures, return_exceptions=True)
            sent += len(futures)
            async with asyncio.timeout(60):
                while self.caught_up(store()):
                    await asyncio.sleep(0.02)
        self.burst_s = now() - start
        return sent

    def online(self) -> int:
        """Clients online now."""
        return sum(1 for c in self.clients.values() if c.state is ClientStatus.ONLINE)

    def wire_duplicates(self) -> int:
        """Pushes the clients' SeqWindows dropped as already delivered."""
        return sum(c.session.stats.duplicate_pushes for c in self.clients.values())

    def caught_up(self, store: MessageStore) -> int:
        """(member, conversation) pairs still behind the store's last seq (0: caught up)."""
        behind = 0
        max_seq = self.history.max_seq
        for conv, members in self.layout.convs.items():
            last = store.last_seq(conv)
            behind += sum(1 for uid in members if max_seq.get((uid, conv), 0) < last)
        return behind

    async def aclose(self) -> None:
        """Stop chatter, close every client, end the consumers."""
        self.chatting.clear()
        for task in self._chatters:
            task.cancel()
        await asyncio.gather(*self._chatters, return_exceptions=True)
        await asyncio.gather(*(c.aclose() for c in self.clients.values()), return_exceptions=True)
        for task in self._consumers:  # ended by the close; cancel any straggler
            task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        self._chatters, self._consumers = [], []


@dataclass
class Drain:
    """How the clients caught up after the faults."""

    settle_s: float = 0.0  # until every send had an outcome
    behind_before_sync: int = 0  # (member, conv) pairs still behind after the natural wait
    drain_s: float = 0.0  # from the end of the load until every member caught up
    caught_up: bool = False


async def drain(
    pop: Population,
    store: Callable[[], MessageStore],
    *,
    natural_s: float = 3.0,
    timeout_s: float = 30.0,
) -> Drain:
    """Stop chatter; wait for outcomes, then for the clients to catch up, then sync them."""
    pop.chatting.clear()
    start = now()
    result = Drain()
    deadline = start + timeout_s
    while pop.history.pending() and now() < deadline:
        await asyncio.sleep(0.05)
    result.settle_s = now() - start
    natural_end = now() + natural_s
    while pop.caught_up(store()) and now() < natural_end:
        await asyncio.sleep(0.05)
    result.behind_before_sync = pop.caught_up(store())
    if result.behind_before_sync:
        for client in pop.clients.values():
            client.sync()
    while pop.caught_up(store()) and now() < deadline:
        await asyncio.sleep(0.05)
    result.caught_up = pop.caught_up(store()) == 0
    result.drain_s = now() - start
    await asyncio.sleep(0.2)  # anything that would arrive twice arrives now
    return result


def rotated(endpoints: Sequence[str]) -> Callable[[int], list[str]]:
    """Client i tries endpoint i mod n first, then the others in order."""

    def pick(i: int) -> list[str]:
        k = i % len(endpoints)
        return [*endpoints[k:], *endpoints[:k]]

    return pick
