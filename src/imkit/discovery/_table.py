"""The sans-IO core of gateway discovery: who is alive, where, how loaded.

Gateways :meth:`~GatewayTable.register` themselves with their endpoints and region,
then :meth:`~GatewayTable.heartbeat` (carrying their current load) more often than
``ttl_ms``. An entry whose last heartbeat is ``ttl_ms`` old is dead: it disappears
from :meth:`~GatewayTable.live` and :meth:`~GatewayTable.rank` at once, and
:meth:`~GatewayTable.expire` removes it. Time comes in as ``now_ms`` (any monotonic
millisecond clock); the table never reads a clock.

:meth:`~GatewayTable.rank` is what an ipconf server answers a client with: live,
not draining, same region first, lighter load first, and among gateways of similar
load a per-client order (rendezvous hashing on ``client_key``), so that thousands of
clients reconnecting at once do not all pick the one gateway that reported the
lowest load a second ago (the seed's "avalanche").

Worked example (ttl 100 ms)::

    t=0    register gw-a (region eu), register gw-b (region us)
    t=50   heartbeat gw-a, connections=10
    t=120  live() -> [gw-a]       gw-b's deadline was 0 + 100; gw-a's is 50 + 100
    t=120  expire() -> ["gw-b"]   removed; a heartbeat from gw-b now returns False
                                  and gw-b must register again
"""

from __future__ import annotations

import math

import attrs
import xxhash

from imkit.errors import CapacityError, ConfigError, TimeWentBackwards

__all__ = [
    "DEFAULT_LOAD_BAND",
    "DEFAULT_MAX_ENDPOINTS",
    "DEFAULT_MAX_GATEWAYS",
    "DEFAULT_TTL_MS",
    "GatewayInfo",
    "GatewayTable",
]

#: A gateway is dead this long after its last heartbeat. Gateways heartbeat every
#: ttl/3 (5 s), so one lost or late heartbeat does not evict a healthy gateway,
#: while clients stop being sent to a dead one within 15 s (the seed's keepalive
#: figures are of the same order).
DEFAULT_TTL_MS = 15_000

#: Registered gateways. The seed sizes 100M users at a few hundred gateways; 4096
#: bounds the map (and each O(n) ranking) while leaving an order of magnitude.
DEFAULT_MAX_GATEWAYS = 4096

#: Endpoints per gateway (TCP, WebSocket, per address family): 16 is plenty.
DEFAULT_MAX_ENDPOINTS = 16

#: Gateways whose load fractions differ by less than this are "equally loaded" for
#: ranking, and ordered per client instead. Load reports are seconds old, so finer
#: differences are noise; 0.1 = 10% of capacity.
DEFAULT_LOAD_BAND = 0.1


@attrs.frozen(kw_only=True)
class GatewayInfo:
    """What a gateway says about itself (and its last reported load).

    ``endpoints`` are addresses clients connect to, e.g. ``"tcp://10.0.0.5:7000"``
    or ``"ws://10.0.0.5:7001/ws"``, in the gateway's order of preference.
    ``max_connections`` (0 = not stated) turns ``connections`` into a load fraction;
    without it ``cpu`` (0.0-1.0) is the load.
    """

    id: str
    endpoints: tuple[str, ...]
    region: str = ""
    connections: int = 0
    max_connections: int = 0
    cpu: float = 0.0
    draining: bool = False

    @property
    def load(self) -> float:
        """Load fraction used for ranking: connections / max_connections, else cpu."""
        if self.max_connections > 0:
            return max(self.connections / self.max_connections, self.cpu)
        return self.cpu

    def validate(self, max_endpoints: int = DEFAULT_MAX_ENDPOINTS) -> None:
        """Raise :class:`~imkit.errors.ConfigError` if a field is out of range. O(e)."""
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError("gateway id must be a non-empty string")
        if not isinstance(self.endpoints, tuple) or not self.endpoints:
            raise ConfigError("a gateway needs at least one endpoint (a tuple of str)")
        if len(self.endpoints) > max_endpoints:
            raise ConfigError(f"{len(self.endpoints)} endpoints, max_endpoints={max_endpoints}")
        if not all(isinstance(e, str) and e for e in self.endpoints):
            raise ConfigError("endpoints must be non-empty strings")
        _check_load(self.connections, self.max_connections, self.cpu)


def _check_load(connections: int, max_connections: int, cpu: float) -> None:
    if connections < 0 or max_connections < 0:
        raise ConfigError("connections and max_connections must be >= 0")
    if not (isinstance(cpu, int | float) and math.isfinite(cpu) and cpu >= 0.0):
        raise ConfigError(f"cpu must be a finite fraction >= 0, got {cpu!r}")


@attrs.define
class _Entry:
    info: GatewayInfo
    deadline_ms: int
    ttl_ms: int


class GatewayTable:
    """Live gateways with TTL expiry by ``now_ms``, and ranking for ipconf.

    ``register``/``heartbeat``/``deregister``/``get`` O(1); ``live`` O(n);
    ``rank`` O(n log n); ``expire`` O(n) for n registered gateways (n is small: see
    :data:`DEFAULT_MAX_GATEWAYS`).

    ``now_ms`` must never decrease (:class:`~imkit.errors.TimeWentBackwards`).

    >>> table = GatewayTable(ttl_ms=100)
    >>> table.register(GatewayInfo(id="gw-a", endpoints=("tcp://h:1",)), now_ms=0)
    >>> table.heartbeat("gw-a", now_ms=50, connections=3)
    True
    >>> [g.id for g in table.live(now_ms=149)], [g.id for g in table.live(now_ms=150)]
    (['gw-a'], [])
    """

    def __init__(
        self,
        *,
        ttl_ms: int = DEFAULT_TTL_MS,
        max_gateways: int = DEFAULT_MAX_GATEWAYS,
        max_endpoints: int = DEFAULT_MAX_ENDPOINTS,
        load_band: float = DEFAULT_LOAD_BAND,
    ) -> None:
        if ttl_ms < 1:
            raise ConfigError(f"ttl_ms must be >= 1, got {ttl_ms}")
        if max_gateways < 1 or max_endpoints < 1:
            raise ConfigError("max_gateways and max_endpoints must be >= 1")
        if not (0.0 < load_band <= 1.0):
            raise ConfigError(f"load_band must be in (0, 1], got {load_band}")
        self.ttl_ms = ttl_ms
        self.max_gateways = max_gateways
        self.max_endpoints = max_endpoints
        self.load_band = load_band
        self._entries: dict[str, _Entry] = {}
        self._last_ms = -(2**63)

    def _clock(self, now_ms: int) -> None:
        if now_ms < self._last_ms:
            raise TimeWentBackwards(now_ms, self._last_ms)
        self._last_ms = now_ms

    def __len__(self) -> int:
        """Registered gateways, including expired ones not yet removed. O(1)."""
        return len(self._entries)

    def register(self, info: GatewayInfo, now_ms: int, *, ttl_ms: int | None = None) -> None:
        """Add or replace ``info.id``; it is live until ``now_ms + ttl_ms``. O(e).

        Raises ConfigError for an invalid ``info``, CapacityError past
        ``max_gateways`` (expired entries are removed first to make room).
        """
        info.validate(self.max_endpoints)
        ttl = self.ttl_ms if ttl_ms is None else ttl_ms
        if ttl < 1:
            raise ConfigError(f"ttl_ms must be >= 1, got {ttl}")
        self._clock(now_ms)
        if info.id not in self._entries and len(self._entries) >= self.max_gateways:
            self.expire(now_ms)
            if len(self._entries) >= self.max_gateways:
                raise CapacityError("max_gateways", self.max_gateways)
        self._entries[info.id] = _Entry(info, now_ms + ttl, ttl)

    def heartbeat(
        self,
        gateway_id: str,
        now_ms: int,
        *,
        connections: int | None = None,
        cpu: float | None = None,
    ) -> bool:
        """Extend ``gateway_id``'s deadline and update its load; O(1).

        Returns False (and changes nothing) when the gateway is unknown or already
        expired: it must :meth:`register` again (its endpoints may have changed).
        """
        self._clock(now_ms)
        entry = self._entries.get(gateway_id)
        if entry is None or entry.deadline_ms <= now_ms:
            return False
        info = entry.info
        if connections is not None or cpu is not None:
            conns = info.connections if connections is None else connections
            load = info.cpu if cpu is None else cpu
            _check_load(conns, info.max_connections, load)
            entry.info = attrs.evolve(info, connections=conns, cpu=load)
        entry.deadline_ms = now_ms + entry.ttl_ms
        return True

    def set_draining(self, gateway_id: str, now_ms: int, draining: bool = True) -> bool:
        """Mark a gateway as draining (ranked last: no new clients); O(1). False if unknown."""
        self._clock(now_ms)
        entry = self._entries.get(gateway_id)
        if entry is None or entry.deadline_ms <= now_ms:
            return False
        entry.info = attrs.evolve(entry.info, draining=draining)
        return True

    def deregister(self, gateway_id: str) -> bool:
        """Remove ``gateway_id`` at once (a clean shutdown); True if it was there. O(1)."""
        return self._entries.pop(gateway_id, None) is not None

    def get(self, gateway_id: str, now_ms: int) -> GatewayInfo | None:
        """The live gateway's info, or None if unknown or expired. O(1)."""
        self._clock(now_ms)
        entry = self._entries.get(gateway_id)
        if entry is None or entry.deadline_ms <= now_ms:
            return None
        return entry.info

    def live(self, now_ms: int) -> list[GatewayInfo]:
        """Every gateway not expired at ``now_ms``, by id. O(n log n)."""
        self._clock(now_ms)
        return sorted(
            (e.info for e in self._entries.values() if e.deadline_ms > now_ms),
            key=lambda info: info.id,
        )

    def expire(self, now_ms: int) -> list[str]:
        """Remove and return the ids of gateways whose deadline is <= ``now_ms``. O(n)."""
        self._clock(now_ms)
        dead = [gid for gid, e in self._entries.items() if e.deadline_ms <= now_ms]
        for gid in dead:
            del self._entries[gid]
        return dead

    def rank(
        self,
        now_ms: int,
        *,
        region: str = "",
        client_key: str = "",
        limit: int | None = None,
    ) -> list[GatewayInfo]:
        """Live gateways in the order a client should try them. O(n log n).

        Order: not draining before draining; ``region`` (when given) before other
        regions; lighter load band (``load // load_band``) first; within a band, a
        stable per-client order from ``xxh64(client_key, gateway id)``, so clients
        spread over equally loaded gateways and one client retries in the same order.
        """
        band = self.load_band
        key = client_key.encode()

        def order(info: GatewayInfo) -> tuple[bool, bool, int, int, str]:
            mix = xxhash.xxh64_intdigest(info.id.encode(), seed=xxhash.xxh64_intdigest(key))
            other_region = bool(region) and info.region != region
            return (info.draining, other_region, int(info.load / band), mix, info.id)

        ranked = sorted(self.live(now_ms), key=order)
        return ranked if limit is None else ranked[: max(limit, 0)]

    def _check(self) -> None:
        """Assert the invariants: bounded, ids match, infos valid, deadlines sane."""
        if len(self._entries) > self.max_gateways:
            raise AssertionError("more gateways than max_gateways")
        for gid, entry in self._entries.items():
            if entry.info.id != gid:
                raise AssertionError(f"entry {gid!r} holds info for {entry.info.id!r}")
            if entry.ttl_ms < 1:
                raise AssertionError(f"entry {gid!r} has ttl {entry.ttl_ms}")
            if entry.deadline_ms > self._last_ms + entry.ttl_ms:
                raise AssertionError(f"entry {gid!r} deadline beyond now + ttl")
            entry.info.validate(self.max_endpoints)
