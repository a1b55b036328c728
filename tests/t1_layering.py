"""The package's layers (docs/architecture.md): imports point down, no circles, a short top level.

Every module under ``squashfu_fs/`` is parsed with :mod:`ast`, and every
import counts: at module level, inside functions and under ``TYPE_CHECKING``,
absolute (``import squashfu_fs.x``, ``from squashfu_fs.pkg import mod``) and
relative (``from . import x``). A lazy import is still a dependency, so it may
neither point upward nor close a circle (S3QL checks its imports the same way).
"""

from __future__ import annotations

import ast
import itertools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import squashfu_fs

PACKAGE = Path(squashfu_fs.__file__).resolve().parent

# Bottom to top, as in docs/architecture.md ("Direction of imports"). Keyed by the name at the top
# level of squashfu_fs/ (``__init__`` is the package's own __init__.py). A module may import its own
# top-level package and any name on a lower level; read and write share a level and never import
# each other.
LEVELS: dict[str, int] = {
    "__init__": 0, "errors": 0, "util": 0,
    "engines": 1,
    "overlay": 2,
    "store": 3,
    "write": 4, "read": 4,
    "cli": 5, "__main__": 5,
}
# The only imports between two names on one level: util raises the errors of errors.py, and
# ``python -m squashfu_fs`` is the command line of cli.py.
WITHIN_LEVEL: frozenset[tuple[str, str]] = frozenset({("util", "errors"), ("__main__", "cli")})
MAX_TOP_LEVEL = 12


@dataclass(frozen=True)
class Import:
    """One import statement's edge: who imports what, and where."""

    importer: str  # dotted module name
    target: str  # dotted module name it resolves to
    file: str  # path relative to the package's parent
    line: int
    scope: str  # "" at module level, else the enclosing function

    def where(self) -> str:
        return f"{self.file}:{self.line}" + (f" (inside {self.scope})" if self.scope else "")


def modules(package: Path) -> dict[str, Path]:
    """Every module and package of ``package`` by dotted name (a package by its __init__.py)."""
    out: dict[str, Path] = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def top_name(module: str) -> str:
    """The name at the package's top level a dotted module belongs to (``__init__`` for the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.is_package = is_package
        self.root = module.split(".")[0]
        self.scope: list[str] = []
        self.found: list[tuple[str, list[str], int, str]] = []  # (base, names, line, scope)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == self.root or alias.name.startswith(self.root + "."):
                self.found.append((alias.name, [], node.lineno, ".".join(self.scope)))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            package = self.module.split(".")
            if not self.is_package:
                package.pop()
            if node.level > 1:
                package = package[:len(package) - (node.level - 1)]
            base = ".".join([*package, *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        if base == self.root or base.startswith(self.root + "."):
            self.found.append((base, [a.name for a in node.names], node.lineno, ".".join(self.scope)))


def imports(package: Path) -> tuple[list[Import], list[str]]:
    """Every import of one of the package's own modules, and those that name no module of it."""
    known = modules(package)
    edges: list[Import] = []
    unresolved: list[str] = []
    for name, path in known.items():
        collector = _Collector(name, path.name == "__init__.py")
        collector.visit(ast.parse(path.read_bytes(), filename=os.fspath(path)))
        file = os.fspath(path.relative_to(package.parent))
        for base, names, line, scope in collector.found:
            # ``from pkg import mod`` imports the module pkg.mod; ``from pkg import name`` imports pkg.
            targets = [f"{base}.{n}" if f"{base}.{n}" in known else base for n in names] or [base]
            for target in dict.fromkeys(targets):
                if target in known:
                    edges.append(Import(name, target, file, line, scope))
                else:
                    unresolved.append(f"{file}:{line} imports {target}, which is not a module of the package")
    return edges, unresolved


def layering_violations(edges: list[Import]) -> list[str]:
    """Imports that point upward or sideways in :data:`LEVELS`."""
    out = []
    for edge in edges:
        mine, theirs = top_name(edge.importer), top_name(edge.target)
        if mine == theirs or (mine, theirs) in WITHIN_LEVEL:
            continue
        if mine not in LEVELS or theirs not in LEVELS:
            continue  # reported by unlevelled()
        if LEVELS[theirs] < LEVELS[mine]:
            continue
        how = "upward" if LEVELS[theirs] > LEVELS[mine] else "sideways"
        out.append(f"{edge.where()} imports {edge.target}: {how}, {mine} (level {LEVELS[mine]}) may not "
                   f"import {theirs} (level {LEVELS[theirs]})")
    return out


def unlevelled(package: Path) -> list[str]:
    """Top-level names that :data:`LEVELS` does not place."""
    return sorted({top_name(m) for m in modules(package)} - set(LEVELS))


def cycles(edges: list[Import]) -> list[list[str]]:
    """One circle through each strongly connected group of modules (Tarjan), as a closed path."""
    graph: dict[str, list[str]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, []).append(edge.target)
        graph.setdefault(edge.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_circle(graph, group) for group in groups]


def _circle(graph: dict[str, list[str]], group: set[str]) -> list[str]:
    """A shortest closed path inside a strongly connected group, from its smallest name."""
    start = min(group)
    paths = [[start]]
    while paths:
        path = paths.pop(0)
        for nxt in graph[path[-1]]:
            if nxt == start:
                return [*path, start]
            if nxt in group and nxt not in path:
                paths.append([*path, nxt])
    raise AssertionError(f"{group} is not a circle")


def describe_circle(circle: list[str], edges: list[Import]) -> str:
    where = {(e.importer, e.target): e.where() for e in edges}
    steps = [f"{a} -> {b} [{where[(a, b)]}]" for a, b in itertools.pairwise(circle)]
    return "circle: " + "; ".join(steps)


def top_level_entries(package: Path) -> list[str]:
    """The modules and packages at the top level of ``package``."""
    return sorted(p.name for p in package.iterdir()
                  if (p.suffix == ".py" and p.is_file()) or (p.is_dir() and (p / "__init__.py").is_file()))


# ----------------------------------------------------------------------------- the package


def test_every_top_level_name_has_a_level() -> None:
    missing = unlevelled(PACKAGE)
    assert not missing, (f"squashfu_fs/ has {missing} with no level: add it to LEVELS here and to the level "
                         "table in docs/architecture.md")


def test_every_import_points_down_the_layers() -> None:
    edges, unresolved = imports(PACKAGE)
    problems = unresolved + layering_violations(edges)
    assert not problems, ("imports that break the layers (docs/architecture.md, \"Direction of imports\"):\n  "
                          + "\n  ".join(problems))


def test_no_import_circles() -> None:
    edges, _ = imports(PACKAGE)
    found = [describe_circle(c, edges) for c in cycles(edges)]
    assert not found, "import circles (imports inside functions count):\n  " + "\n  ".join(found)


def test_at_most_twelve_modules_at_the_top_level() -> None:
    entries = top_level_entries(PACKAGE)
    assert len(entries) <= MAX_TOP_LEVEL, (f"{len(entries)} modules and packages at the top of squashfu_fs/ "
                                           f"(at most {MAX_TOP_LEVEL}): {entries}")


def test_python_m_squashfu_fs_runs_the_command_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "squashfu_fs", "--help"], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: ") and "backup" in proc.stdout and "restore" in proc.stdout, proc.stdout


# ----------------------------------------------------------------------------- the checker itself


def _write(package: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = package / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


def _fake(tmp_path: Path, files: dict[str, str]) -> Path:
    """A package named squashfu_fs under ``tmp_path`` made of ``files``."""
    return _write(tmp_path / "squashfu_fs", {"__init__.py": "", **files})


def test_the_checker_sees_lazy_relative_and_dotted_imports(tmp_path: Path) -> None:
    """Each way of writing an import that breaks the layers is found, with its file and line."""
    package = _fake(tmp_path, {
        "store/__init__.py": "",
        "store/a.py": "def f():\n    from squashfu_fs.read import r  # lazy\n",
        "store/b.py": "import squashfu_fs.write.w\n",
        "engines/__init__.py": "",
        "engines/e.py": "from ..store import a\n",
        "read/__init__.py": "",
        "read/r.py": "from squashfu_fs.write import w\n",
        "write/__init__.py": "",
        "write/w.py": "from . import v\nfrom squashfu_fs import errors\n",
        "write/v.py": "",
        "errors.py": "from squashfu_fs.util import clock\n",
        "util/__init__.py": "",
        "util/clock.py": "from squashfu_fs.errors import UsageError\n",
    })
    edges, unresolved = imports(package)
    found = layering_violations(edges)
    assert unresolved == []
    assert any(v.startswith("squashfu_fs/store/a.py:2 (inside f) imports squashfu_fs.read.r: upward") for v in found)
    assert any(v.startswith("squashfu_fs/store/b.py:1 imports squashfu_fs.write.w: upward") for v in found)
    assert any(v.startswith("squashfu_fs/engines/e.py:1 imports squashfu_fs.store.a: upward") for v in found)
    assert any(v.startswith("squashfu_fs/read/r.py:1 imports squashfu_fs.write.w: sideways") for v in found)
    assert any(v.startswith("squashfu_fs/errors.py:1 imports squashfu_fs.util.clock: sideways") for v in found)
    assert len(found) == 5, found  # write/w.py's own-package and errors imports, util -> errors are allowed
    assert ("squashfu_fs.write.w", "squashfu_fs.write.v") in {(e.importer, e.target) for e in edges}


def test_the_checker_finds_a_circle_closed_by_a_lazy_import(tmp_path: Path) -> None:
    package = _fake(tmp_path, {
        "write/__init__.py": "",
        "write/backup.py": "def run():\n    from squashfu_fs.write.retention import resquash\n",
        "write/retention.py": "from squashfu_fs.write.backup import scan_layer\n",
        "write/other.py": "from squashfu_fs.write import backup\n",
    })
    edges, _ = imports(package)
    assert layering_violations(edges) == []
    assert [describe_circle(c, edges) for c in cycles(edges)] == [
        "circle: squashfu_fs.write.backup -> squashfu_fs.write.retention [squashfu_fs/write/backup.py:2 (inside run)]; "
        "squashfu_fs.write.retention -> squashfu_fs.write.backup [squashfu_fs/write/retention.py:1]"]


def test_the_checker_counts_the_top_level_and_names_unplaced_modules(tmp_path: Path) -> None:
    package = _fake(tmp_path, {f"m{i}.py": "" for i in range(12)} | {"store/__init__.py": ""})
    (package / "__pycache__").mkdir()
    (package / "notes").mkdir()  # not a package: no __init__.py
    assert len(top_level_entries(package)) == 14
    assert unlevelled(package) == sorted(f"m{i}" for i in range(12))
