"""The reference IM system built from imkit's blocks (installed as ``imkit_examples``).

In the repository these are run as ``python -m examples.cluster`` and friends; the
wheel installs the same package as ``imkit_examples`` with the commands
``imkit-cluster``, ``imkit-chat`` and ``imkit-loadgen`` (``pip install 'imkit[server]'``).
"""

from __future__ import annotations

__all__ = ["command"]


def command(tool: str) -> str:
    """How a user runs ``tool`` (``cluster``, ``chat``, ``loadgen``) from this installation.

    >>> command("chat") in ("python -m examples.chat", "imkit-chat")
    True
    """
    if __name__ == "examples":  # a checkout: the package is the examples/ folder
        return f"python -m examples.{tool}"
    return f"imkit-{tool}"
