"""Gateway endpoints: the :class:`Endpoint` value, ipconf answers, and the fetcher contract.

A :class:`~imkit.aio.Client` gets its gateways from a static list, from an
*endpoint fetcher*, or both. A fetcher is any ``async def fetch() -> Sequence[str
| Endpoint]`` (:data:`EndpointFetcher`): it asks wherever the deployment keeps its
gateway list (an ipconf HTTP API, DNS SRV records, a config service) and returns
the endpoints in the order the client should try them. imkit itself has no HTTP
client: the reference system builds its fetcher from h11
(``examples/httpclient.py``: ``endpoint_fetcher(url)``). The :class:`Client`
keeps what is IM logic: caching the answer, ranking (failed endpoints demoted),
racing the connects, and falling back to the cached list when a fetch fails.

A fetcher reports failure by raising :class:`~imkit.errors.BackendError`
(:class:`~imkit.errors.HttpError` for a non-2xx answer). An answer that is not a
sequence of endpoints, or holds none, is refused by the client as a
BackendError too, and the cached list stays in use.

:func:`parse_endpoints` reads the JSON shapes an ipconf server answers with, so
that a hand-written list, a ranked list of strings and a list of
:class:`~imkit.discovery.GatewayInfo`-like objects all work::

    ["10.0.0.5:7000", "tcp://10.0.0.6:7000"]
    {"endpoints": [...]}            or {"gateways": [...]}
    items: "host:port" | "tcp://host:port" | "[::1]:7000"
           | {"host": "10.0.0.5", "port": 7000}
           | {"endpoint": "tcp://..."} | {"endpoints": ["ws://...", "tcp://..."]}

Non-TCP endpoints (``ws://``, ``wss://``) are skipped: they are for browsers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs

from imkit.errors import BackendError, ConfigError

__all__ = [
    "DEFAULT_MAX_IPCONF_ENDPOINTS",
    "Endpoint",
    "EndpointFetcher",
    "parse_endpoints",
]

#: Endpoints kept from one answer; a client never needs to try more than a few.
DEFAULT_MAX_IPCONF_ENDPOINTS = 64


@attrs.frozen
class Endpoint:
    """A TCP address of a gateway."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``"host:port"``, ``"tcp://host:port"`` or ``"[v6addr]:port"``; ConfigError otherwise."""
        if not isinstance(text, str):
            raise ConfigError(f"an endpoint must be a string, not {type(text).__name__}")
        rest = text.strip()
        if "://" in rest:
            scheme, rest = rest.split("://", 1)
            if scheme.lower() != "tcp":
                raise ConfigError(f"not a TCP endpoint: {text!r}")
            rest = rest.split("/", 1)[0]
        host, sep, port_text = rest.rpartition(":")
        if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
            raise ConfigError(f"endpoint must be host:port, got {text!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return cls.make(host, int(port_text))

    @classmethod
    def make(cls, host: object, port: object) -> Endpoint:
        """Validate and build. ConfigError for an empty host or a port outside 1-65535."""
        if not isinstance(host, str) or not host or len(host) > 255:
            raise ConfigError(f"bad endpoint host {host!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ConfigError(f"bad endpoint port {port!r}")
        return cls(host, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _item_endpoints(item: object) -> list[Endpoint]:
    if isinstance(item, str):
        return [Endpoint.parse(item)]
    if isinstance(item, dict):
        if "host" in item and "port" in item:
            return [Endpoint.make(item["host"], item["port"])]
        if isinstance(item.get("endpoint"), str):
            return [Endpoint.parse(item["endpoint"])]
        if isinstance(item.get("endpoints"), list):
            out = []
            for e in item["endpoints"]:
                try:
                    out.append(Endpoint.parse(e))
                except ConfigError:
                    continue  # ws:// and friends
            return out[:1]  # one per gateway: the first TCP endpoint it prefers
    raise ConfigError("unrecognised endpoint entry")


def parse_endpoints(
    doc: Any, *, max_endpoints: int = DEFAULT_MAX_IPCONF_ENDPOINTS
) -> list[Endpoint]:
    """The TCP endpoints of an ipconf answer (see the module doc), in order. O(n).

    Unusable entries are skipped; duplicates are dropped. Raises ConfigError when
    the document has no recognisable list.
    """
    if isinstance(doc, dict):
        doc = doc.get("endpoints", doc.get("gateways"))
    if not isinstance(doc, list):
        raise ConfigError("ipconf answer is not a list of endpoints")
    seen: dict[Endpoint, None] = {}
    for item in doc:
        try:
            for endpoint in _item_endpoints(item):
                seen.setdefault(endpoint, None)
        except ConfigError:
            continue
        if len(seen) >= max_endpoints:
            break
    return list(seen)


#: What a :class:`~imkit.aio.Client` calls for its gateway list: no arguments, the
#: endpoints in the order to try them (``"host:port"`` strings or :class:`Endpoint`).
#: Raise :class:`~imkit.errors.BackendError` on failure.
EndpointFetcher = Callable[[], Awaitable[Sequence[str | Endpoint]]]


def _checked_endpoints(
    answer: object, *, max_endpoints: int = DEFAULT_MAX_IPCONF_ENDPOINTS
) -> list[Endpoint]:
    """A fetcher's answer as endpoints, in order, duplicates dropped, at most ``max_endpoints``.

    Raises :class:`~imkit.errors.BackendError` (never ConfigError or TypeError)
    when the answer is not a sequence of ``"host:port"`` strings and
    :class:`Endpoint` values, when an entry does not parse, or when it holds none:
    the whole answer is refused, so a client keeps its cached list rather than
    half of a bad one. O(n).
    """
    if isinstance(answer, str | bytes) or not isinstance(answer, Sequence):
        raise BackendError(
            f"endpoint fetcher answered {type(answer).__name__}, not a sequence of endpoints"
        )
    seen: dict[Endpoint, None] = {}
    for item in answer:
        if isinstance(item, Endpoint):
            endpoint = item
        else:
            try:
                endpoint = Endpoint.parse(item)
            except ConfigError as exc:
                raise BackendError(f"endpoint fetcher answered a bad entry: {exc}") from exc
        seen.setdefault(endpoint, None)
        if len(seen) >= max_endpoints:
            break
    if not seen:
        raise BackendError("endpoint fetcher answered no endpoint")
    return list(seen)
