"""Gateway endpoints: parsing, and fetching the ranked list from an ipconf server.

The ipconf server (examples/) answers an HTTP GET with JSON. Accepted shapes, so
that a hand-written list, a ranked list of strings and a list of
:class:`~imkit.discovery.GatewayInfo`-like objects all work::

    ["10.0.0.5:7000", "tcp://10.0.0.6:7000"]
    {"endpoints": [...]}            or {"gateways": [...]}
    items: "host:port" | "tcp://host:port" | "[::1]:7000"
           | {"host": "10.0.0.5", "port": 7000}
           | {"endpoint": "tcp://..."} | {"endpoints": ["ws://...", "tcp://..."]}

Non-TCP endpoints (``ws://``, ``wss://``) are skipped: they are for browsers.

The HTTP client is deliberately minimal (HTTP/1.1 GET, ``Connection: close``,
Content-Length, chunked or read-to-EOF bodies, optional TLS) and bounded: headers
and body have byte limits and the whole request a deadline.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any
from urllib.parse import urlsplit

import attrs

from imkit.errors import BackendError, ConfigError, HttpError

__all__ = [
    "DEFAULT_HTTP_TIMEOUT_MS",
    "DEFAULT_MAX_ENDPOINTS",
    "DEFAULT_MAX_HTTP_BODY",
    "DEFAULT_MAX_HTTP_ERROR_BODY",
    "DEFAULT_MAX_HTTP_HEADER",
    "Endpoint",
    "fetch_endpoints",
    "http_get_json",
    "parse_endpoints",
]

#: Whole ipconf request, connect to last byte. ipconf answers from memory; 5 s
#: covers a slow mobile link's connect and one round trip, after which the client
#: falls back to its cached list.
DEFAULT_HTTP_TIMEOUT_MS = 5_000

#: Response header bytes. A JSON API answer has a few hundred; 16 KiB is h11's
#: default limit (which cites node.js and tomcat).
DEFAULT_MAX_HTTP_HEADER = 16 * 1024

#: Response body bytes: a few hundred ranked endpoints of ~40 bytes; 256 KiB bounds
#: what a misconfigured or hostile server can make the client buffer.
DEFAULT_MAX_HTTP_BODY = 256 * 1024

#: Body bytes of a non-2xx answer kept (parsed) on the HttpError. An API's error
#: answer is a short JSON object (``{"error": "unknown user 'bob'"}``); 4 KiB keeps
#: an exception that is logged or held small. A larger error body is not read:
#: ``HttpError.body`` is None.
DEFAULT_MAX_HTTP_ERROR_BODY = 4 * 1024

#: Endpoints kept from one answer; a client never needs to try more than a few.
DEFAULT_MAX_ENDPOINTS = 64


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
        if not sep or not host or not port_text.isdigit():
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


def parse_endpoints(doc: Any, *, max_endpoints: int = DEFAULT_MAX_ENDPOINTS) -> list[Endpoint]:
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


async def http_get_json(
    url: str,
    *,
    timeout_ms: int = DEFAULT_HTTP_TIMEOUT_MS,
    max_header: int = DEFAULT_MAX_HTTP_HEADER,
    max_body: int = DEFAULT_MAX_HTTP_BODY,
    max_error_body: int = DEFAULT_MAX_HTTP_ERROR_BODY,
) -> Any:
    """GET ``url`` (http or https) and decode its JSON body; BackendError on any failure.

    A non-2xx answer raises :class:`~imkit.errors.HttpError` (a BackendError) with
    ``.status`` and ``.body``, the answer's parsed JSON (None when it has none, is
    not JSON, or is over ``max_error_body`` bytes): e.g. ``{"error": "unknown
    user 'bob'"}`` with a 404. ConfigError for a URL that is not http(s).
    O(body bytes).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"not an http(s) URL: {url!r}")
    try:
        return await asyncio.wait_for(
            _get_json(url, max_header=max_header, max_body=max_body, max_error=max_error_body),
            timeout_ms / 1000,
        )
    except TimeoutError:
        raise BackendError(f"GET {url}: no answer within {timeout_ms} ms") from None
    except (
        OSError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
        ValueError,
        RecursionError,  # json.loads of a deeply nested body
    ) as exc:
        raise BackendError(f"GET {url}: {type(exc).__name__}") from exc


async def _get_json(url: str, *, max_header: int, max_body: int, max_error: int) -> Any:
    parts = urlsplit(url)
    assert parts.hostname is not None
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rsplit("@", 1)[-1]
    reader, writer = await asyncio.open_connection(
        parts.hostname, port, ssl=ssl.create_default_context() if tls else None, limit=max_header
    )
    try:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nAccept: application/json\r\n"
            "User-Agent: imkit\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode("ascii"))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        fields = status_line.split(" ", 2)
        if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
            raise ValueError("bad status line")
        status = int(fields[1])
        headers: dict[str, str] = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if not 200 <= status < 300:
            raise HttpError(url, status, await _error_body(reader, headers, max_error))
        return json.loads(await _read_body(reader, headers, max_body))
    finally:
        writer.close()


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], limit: int) -> bytes:
    """The body as the headers frame it; ValueError past ``limit`` bytes."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader, limit)
    if "content-length" in headers:
        length = int(headers["content-length"])
        if not 0 <= length <= limit:
            raise ValueError("body too large")
        return await reader.readexactly(length)
    return await _read_to_eof(reader, limit)


async def _error_body(reader: asyncio.StreamReader, headers: dict[str, str], limit: int) -> Any:
    """The parsed JSON of a non-2xx answer, or None (no body, not JSON, over ``limit``)."""
    try:
        body = await _read_body(reader, headers, limit)
        return json.loads(body) if body else None
    except (ValueError, RecursionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None  # the status alone still tells what happened


async def _read_to_eof(reader: asyncio.StreamReader, max_body: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_body:
            raise ValueError("body too large")
        chunks.append(chunk)


async def _read_chunked(reader: asyncio.StreamReader, max_body: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        n = int(line.split(b";", 1)[0].strip(), 16)
        if n == 0:
            return b"".join(chunks)
        size += n
        if n < 0 or size > max_body:
            raise ValueError("body too large")
        chunks.append(await reader.readexactly(n))
        await reader.readexactly(2)


async def fetch_endpoints(
    url: str,
    *,
    timeout_ms: int = DEFAULT_HTTP_TIMEOUT_MS,
    max_endpoints: int = DEFAULT_MAX_ENDPOINTS,
) -> list[Endpoint]:
    """Ask ipconf at ``url`` for endpoints; BackendError if it fails or lists none."""
    try:
        endpoints = parse_endpoints(
            await http_get_json(url, timeout_ms=timeout_ms), max_endpoints=max_endpoints
        )
    except ConfigError as exc:
        raise BackendError(f"GET {url}: {exc}") from exc
    if not endpoints:
        raise BackendError(f"GET {url}: no TCP endpoint in the answer")
    return endpoints
