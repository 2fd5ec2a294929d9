"""examples.remote without servers: the payload codec (a Hypothesis round trip) and the
encoded bus's promise that a gateway hears of every envelope it will never get.

The byte bus under :class:`EncodedBus` here is imkit's own ``MemoryBus`` with a
switch that makes publishing fail (as a NATS outage does); the real NATS path is
tests/test_processes.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from examples.logic import Deliver, KickRoute, Signals
from examples.remote import RESYNC_MARKER, EncodedBus, decode_payload, encode_payload
from hypothesis import given
from hypothesis import strategies as st

from imkit.aio import MemoryBus
from imkit.bus import Envelope, Lagged, PublishResult
from imkit.errors import BackendError
from imkit.protocol import Notify, Push, Receipt
from imkit.routetable import Route

ids = st.text(alphabet="abcdefgh0123456789-", min_size=1, max_size=12)
routes = st.builds(
    Route,
    uid=ids,
    device=ids,
    gateway=ids,
    conn_id=st.integers(1, 2**31),
    epoch=st.integers(1, 2**63 - 1),
)
pushes = st.builds(
    Push,
    conv=ids,
    seq=st.integers(1, 2**40),
    sender=ids,
    body=st.binary(max_size=64),
    msg_id=st.integers(1, 2**62),
    server_ms=st.integers(0, 2**42),
)
payloads = st.one_of(
    st.builds(
        Deliver,
        targets=st.lists(routes, max_size=4).map(tuple),
        pushes=st.lists(pushes, max_size=3).map(tuple),
        frames=st.lists(
            st.builds(Receipt, conv=ids, seq=st.integers(1, 2**40), reader=ids), max_size=2
        ).map(tuple),
    ),
    st.builds(
        Signals,
        items=st.lists(
            st.tuples(
                routes,
                st.builds(
                    Notify,
                    entries=st.lists(
                        st.tuples(ids, st.integers(1, 2**40)), min_size=1, max_size=3
                    ).map(tuple),
                ),
            ),
            max_size=3,
        ).map(tuple),
    ),
    st.builds(KickRoute, route=routes, code=st.integers(1, 60), reason=ids),
)


@given(payloads)
def test_payloads_survive_the_wire(payload: Deliver | Signals | KickRoute) -> None:
    """Every bus payload decodes to what was encoded (the ticket does not travel)."""
    assert decode_payload(encode_payload(payload)) == payload


@pytest.mark.parametrize("data", [b"", b"\x80", b"\x81\x61x", RESYNC_MARKER, b"\x83\x61d\x80"])
def test_anything_else_is_refused(data: bytes) -> None:
    """Bytes that are not a payload are a ValueError, never a half-built object."""
    with pytest.raises(ValueError):
        decode_payload(data)


class FlakyBus(MemoryBus[bytes]):
    """MemoryBus whose publishes fail while ``down`` (a NATS outage, seen from a publisher)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def publish(self, subject: str, payload: bytes) -> PublishResult:
        if self.down:
            raise BackendError("down")
        return await super().publish(subject, payload)

    async def subscribe(self, subject: str, *, durable: str | None = None, **kw: Any) -> Any:
        return await super().subscribe(subject, **kw)


def test_an_envelope_given_up_on_reaches_its_gateway_as_a_gap() -> None:
    """A publish that keeps failing past retry_s is given up; once the bus is back the
    gateway's subscription reads a Lagged marker (it resyncs its clients), not nothing."""

    async def main() -> tuple[list[Envelope[Any] | Lagged], int, int]:
        inner = FlakyBus()
        bus = EncodedBus(inner, retry_s=0.2)
        sub = await bus.subscribe("gw-1", max_pending=16)
        route = Route(uid="u", device="d", gateway="gw-1", conn_id=1, epoch=1)
        inner.down = True
        bus.publish_nowait("gw-1", KickRoute(route=route, code=1))
        await asyncio.sleep(0.6)  # given up, the resync marker waits for the bus
        inner.down = False
        got = [await asyncio.wait_for(sub.__anext__(), 5)]
        bus.publish_nowait("gw-1", KickRoute(route=route, code=2))
        got.append(await asyncio.wait_for(sub.__anext__(), 5))
        await bus.flush()
        await sub.aclose()
        return got, bus.failed, bus.resyncs

    got, failed, resyncs = asyncio.run(main())
    assert got[0] == Lagged(subject="gw-1", missed=1)
    assert isinstance(got[1], Envelope) and got[1].payload.code == 2
    assert failed == 1 and resyncs == 1
