"""Event loop helpers: uvloop when installed, plain asyncio otherwise; the loop clock in ms."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

from imkit.errors import StateError

__all__ = ["loop_ms", "new_event_loop", "run", "running_loop", "uvloop_available"]

T = TypeVar("T")


def uvloop_available() -> bool:
    """True when uvloop can be imported (the ``imkit[uvloop]`` extra). O(1) after the first call."""
    return importlib.util.find_spec("uvloop") is not None


def new_event_loop(*, use_uvloop: bool | None = None) -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's if ``use_uvloop`` (default: when installed), else asyncio's.

    ``use_uvloop=True`` without uvloop installed raises ImportError; ``False``
    forces the standard loop (useful to compare the two).
    """
    if use_uvloop is None:
        use_uvloop = uvloop_available()
    if use_uvloop:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


def run(
    main: Coroutine[Any, Any, T], *, use_uvloop: bool | None = None, debug: bool | None = None
) -> T:
    """Run ``main`` to completion on a loop from :func:`new_event_loop`, like ``asyncio.run``."""
    def factory() -> asyncio.AbstractEventLoop:
        return new_event_loop(use_uvloop=use_uvloop)

    with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
        return runner.run(main)


def running_loop() -> asyncio.AbstractEventLoop:
    """The running event loop; StateError (a RuntimeError) when none runs. O(1)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise StateError("no running event loop: call from a coroutine, or pass loop=") from None


def loop_ms(loop: asyncio.AbstractEventLoop | None = None) -> int:
    """The loop's monotonic clock (``loop.time()``) in whole milliseconds. O(1).

    This is the ``now_ms`` every sans-IO structure driven from imkit.aio receives;
    its origin is arbitrary, only differences mean anything. StateError without
    ``loop`` when no loop is running.
    """
    if loop is None:
        loop = running_loop()
    return int(loop.time() * 1000)
