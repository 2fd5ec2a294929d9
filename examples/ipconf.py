"""ipconf: tells a client which gateways to connect to, best first (the seed's IPConf).

What it does
    ``GET /gateways?uid=alice`` answers JSON::

        {"uid": "alice",
         "endpoints": ["tcp://127.0.0.1:7710", "tcp://127.0.0.1:7711"],   # try in order
         "ws": ["ws://127.0.0.1:7780/ws", ...],                             # for browsers
         "gateways": [{"id": "gw-1", "endpoints": [...], "connections": 12,
                       "cpu": 0.03, "load": 0.0012, "draining": false}, ...]}

    The list is computed from the gateways' own reports in the discovery registry
    (:class:`~imkit.discovery.Registry`: endpoints, connections, CPU, draining,
    TTL expiry). The first gateway is the user's **bounded-load consistent-hash
    placement**: :meth:`imkit.hashring.HashRing.get_bounded` over the live,
    non-draining gateways with their reported connection counts, so a user keeps
    landing on the same gateway (a quick reconnect finds its session to resume)
    unless that gateway is more than ``balance`` times the average load. The rest
    follow the registry's ranking (not draining, same region, lighter load band,
    then a per-user rendezvous order so reconnect storms spread out).

    The imkit client (:class:`imkit.aio.Client`) caches the answer, tries the
    endpoints in order (racing two), and falls back to its cached or static list
    when ipconf is down.

    Development endpoints (``dev=True``, off by default: the launcher's
    ``--dev``): ``GET /dev/token?uid=&device=`` issues a login token; ``POST
    /admin`` with ``{"op": ..., "args": [...]}`` runs a registry command (see
    :func:`examples.cluster.admin`). They answer only requests straight from the
    local machine (:func:`examples.httpd.is_direct_local`): a request carrying a
    proxy's forwarding header (``Forwarded``, ``X-Forwarded-For``, ``Via``, ...)
    gets 403, since a reverse proxy on the same host connects from loopback on
    behalf of anyone.

Policies
    Answers come from memory (no I/O per request); at most ``limit`` gateways are
    listed; an empty registry answers 503 so clients use their cached list.

    A gateway listening on a wildcard address (``0.0.0.0``, ``::``) without a
    public host registers endpoints nobody can connect to (``tcp://0.0.0.0:7710``).
    ipconf then puts in their place the host the client itself used to reach
    ipconf (its ``Host`` header; else the local address its connection arrived
    on), and logs a warning once per gateway suggesting ``--public-host``. That
    host is the one address known to work from where the client stands: the
    machine's "primary" address may be a private one behind NAT, or the wrong
    interface of a multi-homed host. It is right when the gateways run on
    ipconf's machine (the all-in-one launcher); across machines, give each
    gateway its public host.

What it leaves out
    Geo-IP region detection (the client may pass ``region=``), weighting by
    bandwidth or latency probes, and authentication of the request itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from imkit.discovery import GatewayInfo, Registry
from imkit.errors import ImkitError
from imkit.hashring import DEFAULT_BALANCE, HashRing
from imkit.store import AsyncMessageStore

from .auth import Authenticator
from .gateway import dev_token
from .httpd import (
    HttpServer,
    Request,
    Response,
    is_direct_local,
    json_response,
    serve_http,
)

__all__ = ["DEFAULT_RANK_LIMIT", "IpConf"]

logger = logging.getLogger("examples.ipconf")

#: Gateways listed per answer: a client races two and rarely needs a fourth; 8
#: keeps the answer small while surviving several dead gateways.
DEFAULT_RANK_LIMIT = 8

AdminFn = Callable[[str, list[str]], Awaitable[Any]]

#: Gateways remembered as already warned about (a wildcard endpoint): one line each.
_MAX_WARNED = 1024
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})
#: A host name or address as it may appear in a Host header (RFC 3986 reg-name,
#: IPv4, or a bracketed IPv6 literal), without the port.
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")


def _split_endpoint(endpoint: str) -> tuple[str, str, str]:
    """``"tcp://0.0.0.0:7710"`` -> ``("tcp://", "0.0.0.0", ":7710")``; the path stays in the rest.

    An unbracketed IPv6 host (``tcp://:::7710``, what ``f"{host}:{port}"`` makes of
    ``::``) is everything before the last colon. O(len).
    """
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return "", "", endpoint
    netloc, slash, path = rest.partition("/")
    host, colon, port = netloc.rpartition(":")
    if not colon or not port.isdigit():
        host, colon, port = netloc, "", ""
    return scheme + sep, host, f"{colon}{port}{slash}{path}"


def _is_wildcard(host: str) -> bool:
    return host in _WILDCARDS


def _host_of(request: Request) -> str:
    """The host part of the request's Host header if it is a plausible host, else the
    local address the connection arrived on (bracketed if IPv6); "" if neither. O(len)."""
    value = request.headers.get("host", "").strip()
    if value.startswith("["):
        literal, bracket, _ = value.partition("]")
        host = literal + bracket
        ok = bool(bracket) and all(c in "0123456789abcdefABCDEF:." for c in literal[1:])
    else:
        host = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
        ok = all(c in _HOST_CHARS for c in host)
    if host and ok and len(host) <= 255 and not _is_wildcard(host):
        return host
    local = request.local
    if not local or _is_wildcard(local):
        return ""
    return f"[{local}]" if ":" in local else local


class IpConf:
    """The ipconf HTTP service. ``rank`` is O(n log n) for n live gateways."""

    def __init__(
        self,
        *,
        registry: Registry,
        auth: Authenticator | None = None,
        store: AsyncMessageStore | None = None,
        admin: AdminFn | None = None,
        balance: float = DEFAULT_BALANCE,
        limit: int = DEFAULT_RANK_LIMIT,
        dev: bool = False,
    ) -> None:
        self.registry = registry
        self.auth = auth
        self.store = store
        self.admin = admin
        self.balance = balance
        self.limit = limit
        self.dev = dev
        self._ring: HashRing | None = None
        self._ring_nodes: frozenset[str] = frozenset()
        self.http: HttpServer | None = None
        self.requests = 0
        self._warned: set[str] = set()  # gateways warned about a wildcard endpoint

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port."""
        self.http = await serve_http(self.handle, host, port)
        return self.http.port

    async def stop(self) -> None:
        """Stop listening. Idempotent."""
        if self.http is not None:
            await self.http.aclose()
            self.http = None

    async def rank(self, uid: str, *, region: str = "") -> list[GatewayInfo]:
        """The gateways ``uid`` should try, best first (see the module doc)."""
        ranked = await self.registry.rank(region=region, client_key=uid, limit=None)
        serving = [g for g in ranked if not g.draining]
        if region and any(g.region == region for g in serving):
            serving = [g for g in serving if g.region == region]  # home in the client's region
        if not serving or not uid:
            return ranked[: self.limit]
        nodes = frozenset(g.id for g in serving)
        if self._ring is None or nodes != self._ring_nodes:
            ring = HashRing()
            for node in sorted(nodes):
                ring.add(node)
            self._ring, self._ring_nodes = ring, nodes
        loads = {g.id: g.connections for g in serving}
        home = self._ring.get_bounded(uid, loads, self.balance)
        ordered = [g for g in ranked if g.id == home] + [g for g in ranked if g.id != home]
        return ordered[: self.limit]

    async def handle(self, request: Request) -> Response:
        """Route one HTTP request."""
        self.requests += 1
        path = request.path
        if path == "/gateways" and request.method in ("GET", "HEAD"):
            uid = request.query.get("uid", "")
            gateways = await self.rank(uid, region=request.query.get("region", ""))
            if not gateways:
                return json_response({"error": "no gateway is up"}, 503)
            gateways = [self._reachable(g, request) for g in gateways]
            return json_response(
                {
                    "uid": uid,
                    "endpoints": [e for g in gateways for e in g.endpoints if e.startswith("tcp:")],
                    "ws": [e for g in gateways for e in g.endpoints if e.startswith("ws")],
                    "gateways": [
                        {
                            "id": g.id,
                            "endpoints": list(g.endpoints),
                            "region": g.region,
                            "connections": g.connections,
                            "cpu": round(g.cpu, 4),
                            "load": round(g.load, 4),
                            "draining": g.draining,
                        }
                        for g in gateways
                    ],
                }
            )
        if path == "/dev/token" and self.auth is not None and self.store is not None:
            return await dev_token(request, self.auth, self.store, enabled=self.dev)
        if path == "/admin" and request.method == "POST":
            return await self._admin(request)
        if path == "/healthz":
            return json_response({"ok": True, "gateways": len(await self.registry.live())})
        return Response(status=404)

    def _reachable(self, gateway: GatewayInfo, request: Request) -> GatewayInfo:
        """``gateway`` with wildcard endpoint hosts replaced by one the client can reach. O(e)."""
        if not any(_is_wildcard(_split_endpoint(e)[1]) for e in gateway.endpoints):
            return gateway
        host = _host_of(request)
        if gateway.id not in self._warned and len(self._warned) < _MAX_WARNED:
            self._warned.add(gateway.id)
            logger.warning(
                "gateway %s advertises a wildcard address (%s): answering clients with the "
                "host they used to reach ipconf (%s); give the gateways --public-host",
                gateway.id,
                ", ".join(gateway.endpoints),
                host or "none known",
            )
        if not host:
            return gateway
        endpoints = []
        for endpoint in gateway.endpoints:
            scheme, ep_host, rest = _split_endpoint(endpoint)
            endpoints.append(f"{scheme}{host}{rest}" if _is_wildcard(ep_host) else endpoint)
        return attrs.evolve(gateway, endpoints=tuple(endpoints))

    async def _admin(self, request: Request) -> Response:
        if self.admin is None or not self.dev:
            return json_response({"error": "admin is off (start the launcher with --dev)"}, 403)
        if not is_direct_local(request):
            return json_response({"error": "admin is for direct local requests only"}, 403)
        try:
            doc = request.json()
            op = doc["op"]
            args = doc.get("args", [])
            if not isinstance(op, str) or not isinstance(args, list):
                raise TypeError
            args = [str(a) for a in args]
        except (ValueError, KeyError, TypeError):
            return json_response({"error": 'body must be {"op": str, "args": [str, ...]}'}, 400)
        try:
            return json_response({"ok": True, "result": await self.admin(op, args)})
        except (ImkitError, ValueError, KeyError) as exc:
            return json_response({"ok": False, "error": str(exc)}, 400)
