"""Load shedding at the gateway (issue 8 #9): refuse new sends early, lose nothing.

The figures (offered vs delivered vs RSS up to 5x saturation) come from
``benchmarks/bench_overload.py``; these tests pin the behaviour: the shedder's
signals and hysteresis, and a gateway that refuses sends while overloaded, whose
client then resends them after the hint -- every message stored once, in the
order it was sent, delivered once, and nobody kicked.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from examples.cluster import ClusterConfig, start_cluster
from examples.gateway import GatewayConfig
from examples.overload import LoadShedder

from imkit.aio import Client, ClientStatus
from imkit.errors import ConfigError
from imkit.policy import Backoff
from imkit.session import ClientConfig, Kicked, SendFailed, ServerConfig, SessionEvent
from imkit.store import direct_conv_id

pytestmark = [pytest.mark.timeout(60)]


class TestLoadShedder:
    def test_backlog_starts_and_hysteresis_stops_shedding(self) -> None:
        """Shedding starts at max_backlog and stops only below half of it."""

        async def main() -> list[bool]:
            backlog = [0]
            shedder = LoadShedder(lambda: backlog[0], max_backlog=100, enabled=True)
            seen = []
            try:
                for level in (0, 99, 100, 70, 51, 49, 0):
                    backlog[0] = level
                    seen.append(shedder.admit())
            finally:
                shedder.close()
            assert shedder.shed == seen.count(False) and shedder.episodes == 1
            return seen

        assert asyncio.run(main()) == [True, True, False, False, False, True, True]

    def test_a_loop_running_late_sheds(self) -> None:
        """A loop blocked for 250 ms a turn makes the smoothed lag pass max_lag_ms."""

        async def main() -> tuple[bool, float, bool]:
            shedder = LoadShedder(max_lag_ms=100, sample_ms=20)
            try:
                before = shedder.admit()
                for _ in range(10):  # ten turns of a loop that runs 250 ms late
                    time.sleep(0.25)
                    await asyncio.sleep(0)
                return before, shedder.lag_ms, shedder.admit()
            finally:
                shedder.close()

        before, lag, after = asyncio.run(main())
        assert before is True
        assert lag >= 100
        assert after is False

    def test_disabled_admits_everything(self) -> None:
        """enabled=False: never sheds, whatever the signals say."""

        async def main() -> bool:
            shedder = LoadShedder(lambda: 10**9, max_backlog=1, enabled=False)
            try:
                return all(shedder.admit() for _ in range(10))
            finally:
                shedder.close()

        assert asyncio.run(main())

    @pytest.mark.parametrize("name", ["max_lag_ms", "max_backlog", "sample_ms", "retry_after_ms"])
    def test_bad_limits_are_refused(self, name: str) -> None:
        """A limit below 1 is a ConfigError naming it."""

        async def main() -> None:
            kwargs: dict[str, Any] = {name: 0}
            LoadShedder(**kwargs)

        with pytest.raises(ConfigError, match=name):
            asyncio.run(main())


@pytest.mark.network
def test_an_overloaded_gateway_refuses_sends_and_the_client_resends_them_in_order() -> None:
    """While overloaded, sends get SERVER_BUSY + a hint; after it, all are stored in order."""
    n = 40

    async def main() -> dict[str, Any]:
        server = ServerConfig(reconnect_min_ms=10, reconnect_max_ms=50)
        cluster = await start_cluster(
            ClusterConfig(
                demo=True,
                web=False,
                gateway=GatewayConfig(server=server, shed_retry_ms=200, shed_max_backlog=100),
            )
        )
        gateway = cluster.gateways[0]
        events: list[SessionEvent] = []
        fast: dict[str, Any] = {"reconnect": Backoff(base_ms=10, cap_ms=50)}
        alice = Client(token=cluster.token("alice", "phone"), device="phone",
                       endpoints=cluster.endpoints(), config=ClientConfig(**fast),
                       on_event=events.append)
        bob = Client(token=cluster.token("bob", "phone"), device="phone",
                     endpoints=cluster.endpoints(), config=ClientConfig(**fast))
        conv = direct_conv_id("alice", "bob")
        try:
            await bob.start()
            await alice.start()
            await bob.wait_for(ClientStatus.ONLINE, timeout=20)
            await alice.wait_for(ClientStatus.ONLINE, timeout=20)
            overloaded = [True]
            real_backlog = gateway.shedder.backlog
            gateway.shedder.backlog = lambda: 10**6 if overloaded[0] else real_backlog()
            sends_before = cluster.logic.stats.sends
            futures = [alice.send_nowait(conv, f"m{i}".encode())[1] for i in range(n)]
            await asyncio.sleep(0.6)  # several refusals and retries while overloaded
            shed_while_overloaded = gateway.shedder.shed
            stored_while_overloaded = cluster.logic.stats.sends - sends_before
            overloaded[0] = False
            seqs = await asyncio.wait_for(asyncio.gather(*futures), 30)
            got: list[bytes] = []
            async with asyncio.timeout(20):
                async for push in bob.messages():
                    if push.conv == conv:
                        got.append(push.body)
                        if len(got) == n:
                            break
            return {
                "shed": shed_while_overloaded,
                "stored_while_overloaded": stored_while_overloaded,
                "seqs": seqs,
                "got": got,
                "kicks": [e for e in events if isinstance(e, Kicked)],
                "failed": [e for e in events if isinstance(e, SendFailed)],
            }
        finally:
            await alice.aclose()
            await bob.aclose()
            await cluster.stop()

    r = asyncio.run(main())
    assert r["shed"] > 0  # the gateway refused while overloaded ...
    assert r["stored_while_overloaded"] == 0  # ... and stored nothing meanwhile
    assert r["kicks"] == [] and r["failed"] == []  # nobody kicked, no send given up
    seqs = r["seqs"]
    assert len(set(seqs)) == n and seqs == sorted(seqs)  # stored once each, in send order
    assert r["got"] == [f"m{i}".encode() for i in range(n)]  # delivered once, in order
