"""A small HTTP/1.1 client on h11, and the ipconf endpoint fetcher built from it.

What it does
    :func:`fetch_json` GETs a URL (http or https) and decodes its JSON body;
    :func:`endpoint_fetcher` turns an ipconf URL into the ``fetch_endpoints``
    callable :class:`imkit.aio.Client` takes (imkit has no HTTP client of its own:
    how a deployment lists its gateways is its business)::

        Client(token=..., device=..., fetch_endpoints=endpoint_fetcher(
            "http://127.0.0.1:7700/gateways?uid=alice"))

Policies
    h11 parses the answer (status line, headers, Content-Length, chunked or
    read-to-EOF bodies), as ``examples/httpd.py`` does on the server side. Every
    failure is typed: a non-2xx answer is :class:`~imkit.errors.HttpError` (its
    ``body`` the parsed JSON error, when small and JSON), anything else
    (refused, reset, timed out, malformed, too large, not JSON) a
    :class:`~imkit.errors.BackendError`; a URL that is not http(s) is a
    :class:`~imkit.errors.ConfigError`. Headers, body and time are bounded.

What it leaves out
    Keep-alive and connection reuse (one request per connection, ``Connection:
    close``), redirects, proxies, authentication, request bodies.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import h11

from imkit.aio import DEFAULT_MAX_IPCONF_ENDPOINTS, Endpoint, parse_endpoints
from imkit.errors import BackendError, ConfigError, HttpError

__all__ = [
    "DEFAULT_HTTP_TIMEOUT_MS",
    "DEFAULT_MAX_HTTP_BODY",
    "DEFAULT_MAX_HTTP_ERROR_BODY",
    "DEFAULT_MAX_HTTP_HEADER",
    "endpoint_fetcher",
    "fetch_endpoints",
    "fetch_json",
]

#: Whole request, connect to last byte. ipconf answers from memory; 5 s covers a
#: slow mobile link's connect and one round trip (the Client's own
#: ``fetch_timeout_ms`` bounds the call as well).
DEFAULT_HTTP_TIMEOUT_MS = 5_000

#: Response head bytes. A JSON API answer has a few hundred; 16 KiB is h11's
#: default limit (which cites node.js and tomcat).
DEFAULT_MAX_HTTP_HEADER = 16 * 1024

#: Response body bytes: a few hundred ranked endpoints of ~40 bytes; 256 KiB bounds
#: what a misconfigured or hostile server can make the client buffer.
DEFAULT_MAX_HTTP_BODY = 256 * 1024

#: Body bytes of a non-2xx answer kept (parsed) on the HttpError. An API's error
#: answer is a short JSON object (``{"error": "unknown user 'bob'"}``); 4 KiB keeps
#: an exception that is logged or held small. A larger error body is dropped:
#: ``HttpError.body`` is None.
DEFAULT_MAX_HTTP_ERROR_BODY = 4 * 1024

_READ_SIZE = 65_536


class _TooLarge(Exception):
    """A body over its limit (internal: becomes BackendError or a None error body)."""


async def fetch_json(
    url: str,
    *,
    timeout_ms: int = DEFAULT_HTTP_TIMEOUT_MS,
    max_header: int = DEFAULT_MAX_HTTP_HEADER,
    max_body: int = DEFAULT_MAX_HTTP_BODY,
    max_error_body: int = DEFAULT_MAX_HTTP_ERROR_BODY,
) -> Any:
    """GET ``url`` and decode its JSON body. O(body bytes).

    Raises HttpError (with ``.status`` and ``.body``, the parsed JSON of the
    answer or None) for a non-2xx answer, BackendError for every other failure,
    ConfigError for a URL that is not http(s).
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
    except (OSError, h11.ProtocolError, _TooLarge, ValueError, RecursionError) as exc:
        # ValueError: json (JSONDecodeError) or a bad port; RecursionError: deep JSON
        raise BackendError(f"GET {url}: {type(exc).__name__}") from exc


async def _get_json(url: str, *, max_header: int, max_body: int, max_error: int) -> Any:
    parts = urlsplit(url)
    assert parts.hostname is not None
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rsplit("@", 1)[-1]
    reader, writer = await asyncio.open_connection(
        parts.hostname, port, ssl=ssl.create_default_context() if tls else None
    )
    try:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header)
        request = h11.Request(
            method="GET",
            target=target,
            headers=[
                ("Host", host_header),
                ("Accept", "application/json"),
                ("User-Agent", "imkit-examples"),
                ("Connection", "close"),
            ],
        )
        writer.write((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
        await writer.drain()
        response = await _next_response(conn, reader)
        if not 200 <= response.status_code < 300:
            raise HttpError(url, response.status_code, await _error_body(conn, reader, max_error))
        return json.loads(await _read_body(conn, reader, max_body))
    finally:
        writer.close()


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    """The next h11 event, reading from the socket as needed."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(_READ_SIZE))  # b"" at EOF: h11 handles it


async def _next_response(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Response:
    while True:
        event = await _next_event(conn, reader)
        if isinstance(event, h11.Response):
            return event
        if not isinstance(event, h11.InformationalResponse):  # 1xx: wait for the real one
            raise h11.RemoteProtocolError(f"expected a response, got {type(event).__name__}")


async def _read_body(conn: h11.Connection, reader: asyncio.StreamReader, limit: int) -> bytes:
    """The body as h11 frames it; _TooLarge past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await _next_event(conn, reader)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                raise _TooLarge(f"body over {limit} bytes")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)
        else:  # ConnectionClosed before the end of the body
            raise h11.RemoteProtocolError("connection closed inside the body")


async def _error_body(conn: h11.Connection, reader: asyncio.StreamReader, limit: int) -> Any:
    """The parsed JSON of a non-2xx answer, or None (no body, not JSON, over ``limit``)."""
    try:
        body = await _read_body(conn, reader, limit)
        return json.loads(body) if body else None
    except (_TooLarge, h11.ProtocolError, OSError, ValueError, RecursionError):
        return None  # the status alone still tells what happened


async def fetch_endpoints(
    url: str,
    *,
    timeout_ms: int = DEFAULT_HTTP_TIMEOUT_MS,
    max_endpoints: int = DEFAULT_MAX_IPCONF_ENDPOINTS,
) -> list[Endpoint]:
    """Ask ipconf at ``url`` for its ranked TCP endpoints; BackendError if it fails or has none."""
    try:
        endpoints = parse_endpoints(
            await fetch_json(url, timeout_ms=timeout_ms), max_endpoints=max_endpoints
        )
    except ConfigError as exc:
        raise BackendError(f"GET {url}: {exc}") from exc
    if not endpoints:
        raise BackendError(f"GET {url}: no TCP endpoint in the answer")
    return endpoints


def endpoint_fetcher(
    url: str, *, timeout_ms: int = DEFAULT_HTTP_TIMEOUT_MS
) -> Callable[[], Awaitable[list[Endpoint]]]:
    """The ``fetch_endpoints`` callable of :class:`imkit.aio.Client` for an ipconf URL."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError(f"not an http(s) URL: {url!r}")

    async def fetch() -> list[Endpoint]:
        return await fetch_endpoints(url, timeout_ms=timeout_ms)

    return fetch
