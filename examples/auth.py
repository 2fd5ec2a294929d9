"""Login tokens for the reference system: HMAC-SHA256, bound to a user and a device, expiring.

What it does
    :class:`Authenticator` issues and checks the token a client puts in its
    ``Login`` frame. A token is five dot-separated fields::

        v1.<base64url(uid)>.<base64url(device)>.<expiry, unix seconds>.<base64url(mac)>

    where ``mac = HMAC-SHA256(secret, "v1.<uid64>.<device64>.<expiry>")``. The
    gateway calls :meth:`Authenticator.verify` (an ``imkit.session.Authenticate``)
    with the token and the device named in the ``Login``; it returns the uid or
    raises :class:`~imkit.errors.AuthError`.

Policies
    * The MAC is compared in constant time (``hmac.compare_digest``).
    * A token is refused when forged (bad MAC), malformed, expired, or presented
      for another device than the one it was issued to. The uid comes only from
      the token: a client cannot log in as anyone else.
    * Replaying a token is allowed until it expires (a client reconnects with the
      same token many times); keep ``ttl_s`` short (default one hour).
    * The reason given in ``AuthError`` stays on the server; the client only sees
      ``Kick(AUTH_FAILED, "authentication failed")``.

What it leaves out
    Revocation before expiry (a deny list), key rotation (accept a list of
    secrets), and a real identity provider: in this reference system the launcher,
    started with ``--dev``, hands out tokens from a development endpoint
    (``/dev/token``) to any registered user, for direct requests from its own
    machine only (a request a proxy forwarded gets 403). Without ``--dev``, tokens
    are minted with the shared secret (``IMKIT_SECRET``; the launcher never
    prints it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

from imkit.errors import AuthError, ConfigError
from imkit.protocol import MAX_ID_BYTES, MAX_TOKEN_BYTES

__all__ = ["DEFAULT_TOKEN_TTL_S", "MIN_SECRET_BYTES", "Authenticator", "new_secret"]

#: Token lifetime. One hour bounds how long a leaked token can be replayed while
#: letting a client reconnect through a working day's network changes without a
#: new login (it asks for a new token when one is refused).
DEFAULT_TOKEN_TTL_S = 3600

#: Shortest secret accepted: 16 bytes (128 bits), the HMAC key length below which
#: RFC 2104 says security degrades; :func:`new_secret` makes 32.
MIN_SECRET_BYTES = 16

_VERSION = "v1"


def new_secret() -> bytes:
    """A fresh random 32-byte secret. O(1)."""
    return secrets.token_bytes(32)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text or not all(c.isalnum() or c in "-_" for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Authenticator:
    """Issue and verify login tokens signed with ``secret``.

    ``clock`` returns unix time in seconds (default ``time.time``); tests inject
    one. :meth:`issue` and :meth:`verify` are O(len(token)).

    >>> auth = Authenticator(b"0123456789abcdef0123456789abcdef", clock=lambda: 1000.0)
    >>> token = auth.issue("alice", "phone")
    >>> auth.verify(token, "phone")
    'alice'
    >>> auth.verify(token, "laptop")
    Traceback (most recent call last):
    ...
    imkit.errors.AuthError: authentication failed: token is for another device
    """

    def __init__(
        self,
        secret: bytes,
        *,
        ttl_s: int = DEFAULT_TOKEN_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"secret must be at least {MIN_SECRET_BYTES} bytes")
        if ttl_s < 1:
            raise ConfigError(f"ttl_s must be >= 1, got {ttl_s}")
        self._secret = secret
        self.ttl_s = ttl_s
        self._clock = clock

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._secret, payload.encode("ascii"), hashlib.sha256).digest()

    def issue(self, uid: str, device: str, *, ttl_s: int | None = None) -> str:
        """A token for ``uid`` on ``device``, valid for ``ttl_s`` seconds. O(1)."""
        for name, value in (("uid", uid), ("device", device)):
            if not isinstance(value, str) or not value or len(value.encode()) > MAX_ID_BYTES:
                raise ConfigError(f"{name} must be 1-{MAX_ID_BYTES} UTF-8 bytes")
        expiry = int(self._clock()) + (self.ttl_s if ttl_s is None else ttl_s)
        payload = f"{_VERSION}.{_b64(uid.encode())}.{_b64(device.encode())}.{expiry}"
        return f"{payload}.{_b64(self._mac(payload))}"

    def verify(self, token: str, device: str) -> str:
        """The uid the token was issued to; AuthError if it is forged, expired or foreign.

        Usable directly as ``ServerSession(authenticate=auth.verify)``. The MAC is
        checked before anything in the token is trusted. O(len(token)).
        """
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
            raise AuthError("malformed token")
        fields = token.split(".")
        if len(fields) != 5 or fields[0] != _VERSION:
            raise AuthError("malformed token")
        payload = token.rsplit(".", 1)[0]
        try:
            mac = _unb64(fields[4])
            uid = _unb64(fields[1]).decode("utf-8")
            bound_device = _unb64(fields[2]).decode("utf-8")
            expiry = int(fields[3]) if fields[3].isdigit() else -1
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise AuthError("malformed token") from None
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise AuthError("bad signature")
        if expiry < 0 or self._clock() >= expiry:
            raise AuthError("token expired")
        if not hmac.compare_digest(bound_device.encode(), device.encode()):
            raise AuthError("token is for another device")
        if not uid:
            raise AuthError("malformed token")
        return uid
