"""The official client never trips its own server's limits (issue 8 #3), end to end.

A client that queued 1,000 messages while offline ("a long subway ride of typing")
connects to a real in-process cluster with the server's default quotas
(``ServerConfig``: 200 frames/s, burst 400, 64 sends in flight) and flushes them:
zero kicks, zero RATE_LIMITED / QUOTA_EXCEEDED refusals, every message acked and
delivered to the other member exactly once, in order.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from examples.cluster import ClusterConfig, start_cluster
from examples.gateway import GatewayConfig

from imkit.aio import Client, ClientStatus
from imkit.policy import Backoff
from imkit.protocol import ErrorCode
from imkit.session import ClientConfig, Kicked, ServerConfig, ServerError, SessionEvent
from imkit.store import direct_conv_id

pytestmark = [pytest.mark.network, pytest.mark.timeout(90)]

#: Messages queued offline before the client connects.
N = 1000


def test_a_thousand_queued_messages_flush_without_a_kick_or_a_refusal() -> None:
    """1,000 offline sends: 0 kicks, 0 rate/quota refusals, all acked, delivered once in order."""

    async def main() -> dict[str, Any]:
        # default quotas: only the reconnect bounds are shortened for the test
        server = ServerConfig(reconnect_min_ms=10, reconnect_max_ms=50)
        cluster = await start_cluster(
            ClusterConfig(demo=True, web=False, gateway=GatewayConfig(server=server))
        )
        events: list[SessionEvent] = []
        fast = ClientConfig(reconnect=Backoff(base_ms=10, cap_ms=50))
        alice = Client(
            token=cluster.token("alice", "phone"),
            device="phone",
            endpoints=cluster.endpoints(),
            config=fast,
            on_event=events.append,
        )
        bob = Client(
            token=cluster.token("bob", "phone"),
            device="phone",
            endpoints=cluster.endpoints(),
            config=fast,
        )
        conv = direct_conv_id("alice", "bob")
        try:
            await bob.start()
            await bob.wait_for(ClientStatus.ONLINE, timeout=20)
            await alice.start()  # the connection starts on the next loop turn ...
            futures = [alice.send_nowait(conv, f"m{i}".encode())[1] for i in range(N)]
            assert alice.session.queued == N and not alice.session.connected  # ... offline
            started = time.monotonic()
            seqs = await asyncio.wait_for(asyncio.gather(*futures), 60)
            flush_s = time.monotonic() - started
            got: list[bytes] = []
            async with asyncio.timeout(30):
                async for push in bob.messages():
                    if push.conv == conv:
                        got.append(push.body)
                        if len(got) == N:
                            break
            stats = cluster.gateways[0].stats
            return {
                "seqs": seqs,
                "got": got,
                "flush_s": flush_s,
                "kicks": [e for e in events if isinstance(e, Kicked)],
                "refusals": [
                    e
                    for e in events
                    if isinstance(e, ServerError)
                    and e.code in (ErrorCode.RATE_LIMITED, ErrorCode.QUOTA_EXCEEDED)
                ],
                "refused_frames": stats.refused_frames,
                "logins": alice.logins,
            }
        finally:
            await alice.aclose()
            await bob.aclose()
            await cluster.stop()

    result = asyncio.run(main())
    print(f"flush of {N} queued messages: {result['flush_s']:.2f} s, logins {result['logins']}")
    assert result["kicks"] == []
    assert result["refusals"] == []
    assert result["refused_frames"] == 0
    assert result["logins"] == 1
    seqs = result["seqs"]
    assert len(set(seqs)) == N and seqs == sorted(seqs)  # acked once each, in send order
    assert result["got"] == [f"m{i}".encode() for i in range(N)]  # once each, in order
