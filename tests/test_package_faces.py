"""The package faces: a small top level, complete subpackages, one meaning per DEFAULT_* name.

``imkit`` re-exports only what a newcomer needs (h11 exports about two dozen names);
each subpackage's ``__all__`` is complete for its block; and a ``DEFAULT_*`` name is
never defined twice with two different values.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import pytest

import imkit

ROOT = Path(__file__).resolve().parent.parent

#: The top level stays about h11's size: the blocks, the sessions, the Connection
#: with the README's two messages, and ten errors (35 names and __version__ today).
MAX_TOP_LEVEL = 40

#: The modules the top-level names come from.
BLOCKS = (
    "dedup",
    "errors",
    "hashring",
    "merger",
    "policy",
    "protocol",
    "routetable",
    "seq",
    "session",
    "timingwheel",
)

#: Public names of the subpackages' modules that are implementation, not API.
INTERNAL = {
    # header and codec internals: derived constants, the schema the codec is generated
    # from, the generated tables and their sources
    "imkit.protocol": {
        "BODY_DECODERS",
        "FRAME_ENCODERS",
        "FRAME_TYPE_NAMES",
        "FRAME_TYPE_OF",
        "KNOWN_FLAGS",
        "LZ4_SIZE_PREFIX",
        "MAGIC_VERSION",
        "SCHEMA",
        "SOURCES",
        "FieldSpec",
        "Kind",
    },
    "imkit.bus": set(),
    "imkit.discovery": set(),
    # the validation helpers MemoryStore and SqliteStore share; the schema version
    "imkit.store": {"MAX_INT", "SCHEMA_VERSION"},
}

#: DEFAULT_* names still defined twice with different values (none left: each
#: DEFAULT_* name means one thing, issue 9). Add a name only with a reason.
PENDING_RENAMES: set[str] = set()

_IMPORT = re.compile(r"^\s*(?:>>> )?from imkit import (\([^)]*\)|[^\n]*)", re.M)


def names_imported_from_top(text: str) -> set[str]:
    """Every name of every ``from imkit import ...`` statement in ``text``."""
    names = set()
    for match in _IMPORT.finditer(text):
        clause = re.sub(r"#[^\n]*", "", match.group(1)).strip("()")
        for part in clause.split(","):
            name = part.split(" as ")[0].strip().rstrip("\\").strip()
            if name:
                names.add(name)
    return names


def public_definitions(module: ModuleType) -> set[str]:
    """Classes, functions and UPPER_CASE constants a module defines at its top level."""
    tree = ast.parse(Path(module.__file__ or "").read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper())
    return {n for n in names if not n.startswith("_") and len(n) > 1}


def missing_from_face(package: str, exported: set[str]) -> dict[str, set[str]]:
    """Per module of ``package``: the public definitions its ``__all__`` leaves out.

    Functions are checked only in public modules: a private module's functions are
    the implementation the package face wraps (the codec's header and generator).
    """
    pkg = importlib.import_module(package)
    missing = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        names = public_definitions(module)
        if info.name.startswith("_"):
            names = {n for n in names if n.isupper() or isinstance(getattr(module, n), type)}
        left = names - exported - INTERNAL[package]
        if left:
            missing[module.__name__] = left
    return missing


def default_collisions() -> dict[str, dict[str, object]]:
    """DEFAULT_* names defined in two modules of imkit with different values."""
    seen: dict[str, dict[str, object]] = defaultdict(dict)
    for info in pkgutil.walk_packages(imkit.__path__, "imkit."):
        module = importlib.import_module(info.name)
        if info.ispkg:
            continue
        tree = ast.parse(Path(module.__file__ or "").read_text(encoding="utf-8"))
        for node in tree.body:
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            for t in targets:
                if isinstance(t, ast.Name) and t.id.startswith("DEFAULT_"):
                    seen[t.id][info.name] = getattr(module, t.id)
    return {
        name: where
        for name, where in seen.items()
        if len(where) > 1 and any(v != next(iter(where.values())) for v in where.values())
    }


class TestTopLevel:
    """``imkit`` exports a newcomer's names, each the object of its block."""

    def test_small(self) -> None:
        """The top level stays within MAX_TOP_LEVEL names."""
        assert len(imkit.__all__) <= MAX_TOP_LEVEL

    def test_reexports_only(self) -> None:
        """Every top-level name resolves and is the same object its block exports."""
        blocks = [importlib.import_module(f"imkit.{m}") for m in BLOCKS]
        for name in imkit.__all__:
            value = getattr(imkit, name)
            if name == "__version__":
                continue
            homes = [b for b in blocks if name in b.__all__]
            assert homes, f"{name} is in no block's __all__"
            assert all(getattr(b, name) is value for b in homes)

    def test_every_import_from_the_top_resolves(self) -> None:
        """Each ``from imkit import`` in the README, docs, sources, tests and examples works."""
        files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
        for folder in ("src", "tests", "examples", "benchmarks"):
            files += [p for p in sorted((ROOT / folder).rglob("*.py")) if "compat" not in p.parts]
        wrong = {}
        for path in files:
            names = names_imported_from_top(path.read_text(encoding="utf-8"))
            if names - set(imkit.__all__):
                wrong[str(path.relative_to(ROOT))] = names - set(imkit.__all__)
        assert not wrong

    def test_import_parser(self) -> None:
        """The scanner reads one-line, aliased and parenthesised imports."""
        text = (
            "from imkit import A, B as C  # x\n"
            ">>> from imkit import D\n"
            "from imkit import (\n    E,\n    F,\n)\n"
        )
        assert names_imported_from_top(text) == {"A", "B", "D", "E", "F"}


@pytest.mark.parametrize("package", sorted(INTERNAL))
def test_subpackage_face_is_complete(package: str) -> None:
    """Each public class and constant of a subpackage's modules is in its ``__all__``."""
    exported = set(importlib.import_module(package).__all__)
    assert missing_from_face(package, exported) == {}


def test_default_names_have_one_value() -> None:
    """No DEFAULT_* name is defined in two modules with two values (beyond pending renames)."""
    collisions = default_collisions()
    assert set(collisions) <= PENDING_RENAMES, {
        k: v for k, v in collisions.items() if k not in PENDING_RENAMES
    }
