"""Keyword checks of the imkit.aio adapters: a bad limit is a ConfigError, never a TypeError."""

from __future__ import annotations

from imkit.errors import ConfigError

__all__ = ["check_int"]


def check_int(name: str, value: object, *, minimum: int = 1, none_ok: bool = False) -> None:
    """ConfigError unless ``value`` is an int (not bool) >= ``minimum`` (or an allowed None)."""
    if value is None and none_ok:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        allowed = f">= {minimum}" + (" or None" if none_ok else "")
        raise ConfigError(f"{name} must be an int {allowed}, got {value!r}")

