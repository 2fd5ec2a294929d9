"""imkit's wire protocol and sessions as released with protocol version 1 -- FROZEN.

A verbatim copy of ``src/imkit/protocol`` and ``src/imkit/session`` taken at commit
d86dbb6 (before version negotiation existed), with only the package names rewritten
(``imkit.protocol`` -> ``tests.compat.v1.protocol``, ``imkit.session`` ->
``tests.compat.v1.session``). It stands for the clients and servers already deployed.

Read-only: never edit these files, even to fix a bug or a lint -- the point is that
they behave exactly as the deployed release does. They still import the floor-1
building blocks (``imkit.errors``, ``imkit.dedup``, ``imkit.policy``,
``imkit.timingwheel``) live, which carry no wire format.
"""
