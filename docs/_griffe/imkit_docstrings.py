"""Griffe extension for the API reference: imkit's reST-flavoured docstrings as Markdown.

imkit's docstrings are prose written for Sphinx-style readers: cross-references as
roles (``:class:`~imkit.x.Y```, ``:meth:`send```), doctests (``>>> ...``), literal
blocks introduced by ``::``, and limit constants documented by ``#:`` comments. Left
as they are, Markdown renders doctests as nested block quotes, prints the roles
verbatim, and the ``DEFAULT_*`` constants appear without their reasons. This
extension, loaded by mkdocstrings (``extensions:`` in mkdocs.yml), rewrites each
docstring once the package is loaded:

- a role whose target is an object the reference renders becomes an autorefs link
  (``[`Y`][imkit.x._mod.Y]``); any other target (private, external, unknown) becomes
  plain inline code, so the strict build never sees a dangling reference;
- a run of doctest lines becomes a fenced ``pycon`` block;
- a paragraph ending in ``::`` ends in ``:`` (its indented block is already code);
- a module-level or class-level assignment without a docstring takes the ``#:``
  comment lines right above it.

Nothing here changes the source files. Cost: O(size of the docstrings).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import griffe

#: The modules that have a page under docs/reference/ (keep in step with mkdocs.yml).
REFERENCE_MODULES = (
    "imkit",
    "imkit.hashring",
    "imkit.timingwheel",
    "imkit.dedup",
    "imkit.seq",
    "imkit.policy",
    "imkit.protocol",
    "imkit.routetable",
    "imkit.merger",
    "imkit.session",
    "imkit.store",
    "imkit.bus",
    "imkit.discovery",
    "imkit.aio",
    "imkit.errors",
)
#: The page of ``imkit`` renders no members (each is documented where it comes from).
MEMBERLESS = frozenset({"imkit"})

_ROLE = re.compile(r":(?:py:)?(class|meth|func|attr|data|mod|exc|obj|const):`([^`]+)`")
_TITLED = re.compile(r"^(.*?)\s*<([^<>]+)>$")
_DOCTEST = re.compile(r"^(\s*)>>> ")


def _target(obj: griffe.Object | griffe.Alias) -> griffe.Object | None:
    """The object an alias finally points to (None when it leaves the package)."""
    try:
        return obj.final_target if isinstance(obj, griffe.Alias) else obj
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _public(obj: griffe.Object, name: str) -> bool:
    if name.startswith("_"):
        return False
    exports = obj.exports if isinstance(obj, griffe.Module) else None
    return exports is None or name in exports


def _rendered(pkg: griffe.Module) -> set[str]:
    """Canonical paths of every object the reference pages render."""
    seen: set[str] = set()

    def walk(obj: griffe.Object) -> None:
        for name, member in obj.members.items():
            if not _public(obj, name):
                continue
            target = _target(member)
            if target is None or target.path in seen or not target.has_docstrings:
                continue  # show_if_no_docstring: false hides what has no docstring at all
            if isinstance(target, griffe.Module) and target.path not in REFERENCE_MODULES:
                continue  # a submodule: rendered only if it has a page of its own
            seen.add(target.path)
            if isinstance(target, griffe.Class):
                walk(target)

    for path in REFERENCE_MODULES:
        module = pkg if path == pkg.path else pkg.get_member(path.split(".", 1)[1])
        seen.add(module.path)
        if path not in MEMBERLESS:
            walk(module)
    return seen


def _lookup(collection: Any, path: str) -> griffe.Object | None:
    try:
        found = collection.get_member(path)
    except (KeyError, ValueError, IndexError, griffe.AliasResolutionError):
        return None
    return _target(found)


def _scopes(obj: griffe.Object) -> Iterator[str]:
    """Where a relative role target may live, innermost first."""
    node: griffe.Object | None = obj
    while node is not None:
        yield node.path
        node = node.parent
    # the public package of a private module: imkit.protocol._connection -> imkit.protocol
    parts = obj.path.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_"):
            yield ".".join(parts[:i])
            break
    yield "imkit"


def _resolve(obj: griffe.Object, target: str, rendered: set[str]) -> str | None:
    collection = obj.modules_collection
    candidates = [target] + [f"{scope}.{target}" for scope in _scopes(obj)]
    for candidate in candidates:
        found = _lookup(collection, candidate)
        if found is not None and found.path in rendered:
            return found.path
    return None


def _rewrite_roles(obj: griffe.Object, text: str, rendered: set[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        role, body = match.group(1), match.group(2)
        titled = _TITLED.match(body)
        if titled:
            title, target = titled.group(1), titled.group(2)
        else:
            target = body.lstrip("~").lstrip(".")
            title = target.rsplit(".", 1)[-1] if body.startswith("~") else target
        if role in ("meth", "func") and not title.endswith(")"):
            title += "()"
        path = _resolve(obj, target.removesuffix("()"), rendered)
        return f"[`{title}`][{path}]" if path else f"`{title}`"

    return _ROLE.sub(replace, text)


def _fence_doctests(text: str) -> str:
    """Wrap each run of doctest lines (up to the next blank line) in a pycon fence."""
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = _DOCTEST.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group(1)
        if out and out[-1].strip():
            out.append("")
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


def _literal_blocks(text: str) -> str:
    """``text::`` before an indented block reads ``text:`` (a lone ``::`` goes)."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.rstrip().endswith("::") and not line.lstrip().startswith(("```", ">>>")):
            stripped = line.rstrip()[:-2].rstrip()
            lines[i] = f"{stripped}:" if stripped else ""
    return "\n".join(lines)


def _comment_docstring(obj: griffe.Object) -> str | None:
    """The ``#:`` comment lines right above an assignment, joined."""
    if obj.lineno is None or obj.filepath is None or isinstance(obj.filepath, list):
        return None
    try:
        lines = obj.lines_collection[obj.filepath]
    except KeyError:
        return None
    found: list[str] = []
    i = obj.lineno - 2
    while i >= 0 and lines[i].lstrip().startswith("#:"):
        found.append(lines[i].lstrip()[2:].strip())
        i -= 1
    return " ".join(reversed(found)) or None


def _objects(obj: griffe.Object, seen: set[str]) -> Iterator[griffe.Object]:
    if obj.path in seen:
        return
    seen.add(obj.path)
    yield obj
    for member in obj.members.values():
        if not isinstance(member, griffe.Alias):
            yield from _objects(member, seen)


class ImkitDocstrings(griffe.Extension):
    """Rewrite imkit's docstrings for Markdown once the package is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path != "imkit":
            return
        objects = list(_objects(pkg, set()))
        for obj in objects:  # first the comments, so that _rendered sees them
            if obj.docstring is None and isinstance(obj, griffe.Attribute):
                comment = _comment_docstring(obj)
                if comment:
                    obj.docstring = griffe.Docstring(comment, lineno=obj.lineno, parent=obj)
        rendered = _rendered(pkg)
        for obj in objects:
            if obj.docstring is None:
                continue
            text = obj.docstring.value
            text = _fence_doctests(text)
            text = _literal_blocks(text)
            text = _rewrite_roles(obj, text, rendered)
            obj.docstring.value = text
