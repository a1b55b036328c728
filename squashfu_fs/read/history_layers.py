"""The kept history as layers: every backup's state resolved in user space (docs/commands.md, "diff").

``diff``, ``deleted`` and ``versions`` answer from the layers themselves:
each bin is the list of what changed that night and its whiteouts and opaque
directories are the deletions. A layer is read as a :class:`Tree`: its
catalogue (store/catalog.py, written when the layer was committed; nothing
is mounted), or, for a root without catalogues, its directory in one
private roll-back of the newest state needed (:func:`squashfu_fs.read.rollback.private_view`:
its record keeps a resquash from merging those bins, recovery cleans up
after a kill). Any kept state is resolved over a subset of the same trees
with overlayfs's rules, as overlay.py resolves them over directories.
"""

from __future__ import annotations

import json
import os
import stat
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from squashfu_fs import overlay
from squashfu_fs.errors import UsageError
from squashfu_fs.store import catalog
from squashfu_fs.store.catalog import Record
from squashfu_fs.store.opening import opened_root
from squashfu_fs.store.views import ViewSpec, ViewTable
from squashfu_fs.util import faults
from squashfu_fs.util.process import require_root
from squashfu_fs.util.say import say

KINDS = ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"), (stat.S_ISCHR, "char"),
         (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"))
_CHUNK = 1 << 20
T = TypeVar("T")


def kind(mode: int) -> str:
    """The type of an entry as the commands print it: file, dir, symlink, char, block, fifo, socket."""
    for test, name in KINDS:
        if test(mode):
            return name
    return "unknown"


class Undecided(Exception):
    """Two versions' contents must be compared and a catalogue holds no digest for one: read the layers."""


class Tree(Protocol):
    """One layer, read by relative path (b"" its top): a catalogue, or a directory."""

    number: int | None  # the bin number; None for the seed

    def get(self, rel: bytes) -> Record | None: ...

    def children(self, rel: bytes) -> list[tuple[bytes, Record]]: ...

    def real_path(self, rel: bytes) -> bytes | None:
        """Where the entry's bytes can be read; None for a catalogue."""
        ...


WHOLE_LAYER_ENTRIES = 4096  # a layer with at most this many entries is read in one statement,
ASKED_BEFORE_WHOLE = 32  # once it has been asked this many names one by one (measured: docs/benchmarks.md)


class CatalogTree:
    """A layer read from its catalogue: nothing mounted, one indexed query per name.

    Every state above the layer asks it the same names (``versions`` resolves
    one path in each of 61 states), so each answer is kept for the query. A
    small layer (a night's bin) asked for many names is read whole and then
    answers every name from memory, what it does not hold included.
    """

    def __init__(self, number: int | None, source: catalog.Catalog) -> None:
        self.number = number
        self._catalog = source
        self._known: dict[bytes, Record | None] = {}
        self._whole: dict[bytes, list[tuple[bytes, Record]]] | None = None  # parent -> entries, once read whole
        self._tried_whole = False
        self._asked = 0  # names asked of the catalogue one by one

    def _read_whole_if_due(self) -> None:
        """Read the layer whole once it has been asked enough names one by one (and only ever try once)."""
        if self._tried_whole or self._asked < ASKED_BEFORE_WHOLE:
            return
        self._tried_whole = True
        everything = self._catalog.everything(WHOLE_LAYER_ENTRIES)
        if everything is None:
            return
        self._whole = {}
        for parent, name, record in everything:
            self._known[parent + b"/" + name if parent else name] = record
            if name:
                self._whole.setdefault(parent, []).append((name, record))
        if b"" not in self._known:
            raise catalog.CatalogError(f"{self._catalog.path.name} is damaged: the layer's top is not listed")

    def get(self, rel: bytes) -> Record | None:
        try:
            return self._known[rel]
        except KeyError:
            pass
        self._read_whole_if_due()
        if rel in self._known:
            return self._known[rel]
        parent, slash, _ = rel.rpartition(b"/")
        above = self.get(parent) if slash else None
        if self._whole is not None or (slash and (above is None or not above.is_dir)):
            found = None  # a layer is a tree: nothing is under what it does not hold as a directory
        else:
            self._asked += 1
            found = self._catalog.get(rel)
        self._known[rel] = found
        return found

    def children(self, rel: bytes) -> list[tuple[bytes, Record]]:
        self._read_whole_if_due()
        if self._whole is not None:
            return sorted(self._whole.get(rel, ()), key=lambda entry: entry[0])
        self._asked += 1
        return self._catalog.children(rel)

    def real_path(self, rel: bytes) -> bytes | None:
        return None


class DirTree:
    """A layer read from its directory (a bin kept open, a mounted image); ``opaque``: its recorded opaque dirs."""

    def __init__(self, number: int | None, directory: bytes, opaque: frozenset[bytes] = frozenset()) -> None:
        self.number = number
        self.directory = directory
        self._opaque = opaque  # relative paths; the bottom layer's never matter

    def real_path(self, rel: bytes) -> bytes:
        return self.directory + b"/" + rel if rel else self.directory

    def _record(self, rel: bytes, path: bytes, st: os.stat_result) -> Record:
        opaque = stat.S_ISDIR(st.st_mode) and (rel in self._opaque or overlay.is_opaque(path))
        return catalog.describe(path, st, opaque=opaque)

    def get(self, rel: bytes) -> Record | None:
        path = self.real_path(rel)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return self._record(rel, path, st)

    def children(self, rel: bytes) -> list[tuple[bytes, Record]]:
        with os.scandir(self.real_path(rel)) as scan:
            return [(item.name, self._record(rel + b"/" + item.name if rel else item.name, item.path,
                                             item.stat(follow_symlinks=False))) for item in scan]


def walk_tree(tree: Tree, within: bytes = b"") -> Iterator[tuple[bytes, Record]]:
    """Every entry a layer holds (whiteouts included), on the way to or below ``within``; directories first."""
    pending = [b""]
    while pending:
        here = pending.pop()
        for name, record in tree.children(here):
            path = here + b"/" + name if here else name
            if not related(path, within):
                continue
            yield path, record
            if record.is_dir:
                pending.append(path)


class Found:
    """A path resolved in one state: the topmost record and every layer whose directory merges there."""

    __slots__ = ("record", "trees")

    def __init__(self, record: Record, trees: tuple[Tree, ...]) -> None:
        self.record = record
        self.trees = trees

    @property
    def is_dir(self) -> bool:
        return self.record.is_dir

    @property
    def mode(self) -> int:
        return self.record.mode

    @property
    def tree(self) -> Tree:
        """The layer the topmost record lives in."""
        return self.trees[0]


def resolve(trees: tuple[Tree, ...], rel: bytes) -> Found | None:
    """``rel`` in the merged directory whose layers are ``trees`` (newest first), as overlay.lookup resolves it."""
    found: list[Tree] = []
    top: Record | None = None
    for position, tree in enumerate(trees):
        record = tree.get(rel)
        if record is None:
            continue
        if record.is_dir:
            top = top or record
            found.append(tree)
            if position != len(trees) - 1 and record.opaque:
                break
            continue
        if top is not None or record.is_whiteout:
            break  # a whiteout hides; a non-directory under a directory ends the merge
        return Found(record, (tree,))
    return None if top is None else Found(top, tuple(found))


def merged_children(trees: tuple[Tree, ...], rel: bytes) -> list[tuple[bytes, Found]]:
    """The merged listing of the directory ``rel`` over ``trees``, as overlay.listdir merges it."""
    tops: dict[bytes, list[tuple[Tree, Record]]] = {}
    done: set[bytes] = set()
    for tree in trees:
        for name, record in tree.children(rel):
            if name in done:
                continue
            if name not in tops:
                if record.is_whiteout:
                    done.add(name)
                    continue
                tops[name] = [(tree, record)]
                if not record.is_dir:
                    done.add(name)
            elif record.is_dir:
                tops[name].append((tree, record))
            else:
                done.add(name)  # whiteout or non-directory: the merge ends here
    out = []
    for name, found in tops.items():
        cut = len(found)
        for i, (_, record) in enumerate(found[:-1]):
            if record.opaque:  # an opaque directory ends the merge below it
                cut = i + 1
                break
        out.append((name, Found(found[0][1], tuple(tree for tree, _ in found[:cut]))))
    return out


@dataclass(frozen=True)
class Facts:
    """What makes two versions of a path differ (besides content): the tree generator's snapshot fields."""

    kind: str
    mode: int
    uid: int
    gid: int
    mtime: int  # whole seconds: SquashFS stores no sub-second times
    size: int
    target: bytes
    rdev: int
    xattrs: tuple[tuple[bytes, bytes], ...]


def facts(entry: Found) -> Facts:
    """An entry's type, mode, owner, mtime, size, symlink target, device numbers and visible xattrs."""
    r = entry.record
    return Facts(kind(r.mode), stat.S_IMODE(r.mode), r.uid, r.gid, r.mtime, r.size, r.target, r.rdev, r.xattrs)


def changed_fields(path: bytes, a: Found, b: Found) -> list[str]:
    """The fields in which two versions differ ("kind", "mode"..., "content"); empty when identical."""
    if a.tree is b.tree:
        return []  # the same object in the same layer
    fa, fb = facts(a), facts(b)
    out = [name for name in Facts.__dataclass_fields__ if getattr(fa, name) != getattr(fb, name)]
    if fa.kind == fb.kind == "file" and fa.size == fb.size and not same_content(path, a, b):
        out.append("content")
    return out


def differs(path: bytes, a: Found, b: Found) -> bool:
    """Whether two versions differ at all: their facts first, their bytes only when those are equal."""
    if a.tree is b.tree:
        return False
    fa, fb = facts(a), facts(b)
    return fa != fb or (fa.kind == "file" and not same_content(path, a, b))


def same_content(path: bytes, a: Found, b: Found) -> bool:
    """Whether two versions of a regular file hold the same bytes: by digest, else read from the layers."""
    da, db = a.record.digest, b.record.digest
    if da is not None and db is not None:
        return da == db
    pa, pb = a.tree.real_path(path), b.tree.real_path(path)
    if pa is None or pb is None:
        raise Undecided(path)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fa = os.open(pa, flags)
    try:
        fb = os.open(pb, flags)
        try:
            while True:
                ca, cb = os.read(fa, _CHUNK), os.read(fb, _CHUNK)
                if ca != cb:
                    return False
                if not ca:
                    return True
        finally:
            os.close(fb)
    finally:
        os.close(fa)


class State:
    """One kept backup's tree over its layers (newest first, the seed last), resolved on demand.

    Directories looked up are remembered, so the many lookups of one query
    below the same parents cost one query per layer per new name.
    """

    def __init__(self, spec: ViewSpec, snapshot: str, trees: list[Tree]) -> None:
        self.spec = spec
        self.snapshot = snapshot
        top = trees[0].get(b"")
        assert top is not None
        self._dirs: dict[bytes, Found | None] = {b"": Found(top, tuple(trees))}

    def lookup(self, rel: bytes) -> Found | None:
        """The entry at ``rel`` (b"a/b", b"" the top) in this state, or None."""
        if rel in self._dirs:
            return self._dirs[rel]
        parent_rel, _, _ = rel.rpartition(b"/")
        parent = self.lookup(parent_rel)
        entry = None
        if parent is not None and parent.is_dir:
            entry = resolve(parent.trees, rel)
        if entry is None or entry.is_dir:
            self._dirs[rel] = entry
        return entry

    def walk(self, rel: bytes, within: bytes = b"") -> Iterator[tuple[bytes, Found]]:
        """Every entry below the directory ``rel`` (not ``rel`` itself), on or below ``within`` only."""
        top = self.lookup(rel)
        if top is None or not top.is_dir:
            return
        pending = [(rel, top)]
        while pending:
            here, entry = pending.pop()
            for name, child in merged_children(entry.trees, here):
                path = here + b"/" + name if here else name
                if not related(path, within):
                    continue
                yield path, child
                if child.is_dir:
                    self._dirs[path] = child
                    pending.append((path, child))

    @property
    def time(self) -> str:
        return self.spec.time.isoformat()


def related(path: bytes, within: bytes) -> bool:
    """Whether ``path`` is ``within``, below it, or one of its ancestors (all lead to what is asked about)."""
    if not within or path == within:
        return True
    return path.startswith(within + b"/") or within.startswith(path + b"/")


def below(path: bytes, within: bytes) -> bool:
    """Whether ``path`` is ``within`` or below it."""
    return not within or path == within or path.startswith(within + b"/")


class HistoryLayers:
    """Every kept state of a root up to the one a query chose, over one tree per layer."""

    def __init__(self, table: ViewTable, trees: dict[int | None, Tree]) -> None:
        self.table = table
        self.trees = trees  # bin number -> its tree; None -> the seed
        self._states: dict[tuple[int, ...], State] = {}
        self.path = b""  # the PATH a query asked about, relative to the source's top
        self.names = {spec.bins: name for name, spec in table.snapshots.items()}  # the newest name of a state

    def state(self, spec: ViewSpec) -> State:
        """The state of ``spec``, resolved over its bins and the seed."""
        if spec.bins not in self._states:
            trees = [self.trees[n] for n in spec.bins] + [self.trees[None]]
            self._states[spec.bins] = State(spec, self.names.get(spec.bins, spec.name), trees)
        return self._states[spec.bins]

    def snapshots(self) -> list[State]:
        """Every kept backup's state, the seed first, in commit order."""
        return [self.state(spec) for spec in self.table.snapshots.values()]

    def bin(self, number: int) -> Tree:
        return self.trees[number]


def answer(root: Path, command: str, choose: Callable[[ViewTable], ViewSpec], query: Callable[[HistoryLayers], T],
           *, path: str | None = None, verbose: bool = False) -> T:
    """``query`` over every kept state up to the one ``choose`` picks: from the catalogues when every layer
    has one and they decide it, else over the layers mounted in a private view."""
    require_root(command)
    seen = None  # the history generation whose catalogues were found missing
    for attempt in range(3):  # a resquash may delete a catalogue between reading history and opening it
        with opened_root(root, command, write=False) as opened:
            relative = b"" if path is None else source_path(path, opened.config.origin.path)
            history = opened.history
            table = ViewTable.from_history(history)
            spec = choose(table)  # a wrong name is refused before anything is read
            layout = opened.layout
        if not attempt:
            faults.checkpoint("query-history-read")
        if history.seed is None:
            break
        wanted: list[int | None] = [None, *spec.bins]
        paths = [layout.seed_catalog(history.seed.generation) if n is None else layout.bin_catalog(n)
                 for n in wanted]
        labels = [catalog.label_of(history.seed if n is None else history.bin(n)) for n in wanted]
        with catalog.opened(paths, labels) as opened_catalogs:
            if opened_catalogs is None:  # missing, damaged or another layer's
                if seen == history.generation:
                    break  # so under this history too: a root of older code (or a copy), read through the mounts
                seen = history.generation  # or a resquash deleted one meanwhile: read history again
                continue
            trees: dict[int | None, Tree] = {n: CatalogTree(n, c) for n, c in zip(wanted, opened_catalogs,
                                                                                  strict=True)}
            hist = HistoryLayers(_trimmed(table, spec), trees)
            hist.path = relative
            try:
                return query(hist)
            except Undecided:
                break
            except catalog.CatalogError as exc:  # derived data: read the layers themselves instead
                say(verbose, f"{exc}; reading the layers through their mounts")
                break
    with opened_history(root, command, choose, path=path, verbose=verbose) as hist:
        return query(hist)


@contextmanager
def opened_history(root: Path, command: str, choose: Callable[[ViewTable], ViewSpec], *,
                   path: str | None = None, verbose: bool = False) -> Iterator[HistoryLayers]:
    """Every layer up to the state ``choose`` picks, mounted read-only for a ``with`` block, and the states over them.

    ``choose`` runs twice: first against the history read without the lock,
    so a wrong name (or a ``path`` outside the source) is refused before
    anything is mounted, then under the lock, where the private view is made
    from the history that is current. ``path`` comes back as ``hist.path``,
    relative to the source's top.
    """
    from squashfu_fs.read.rollback import private_view  # only a root without catalogues mounts: a lighter start
    from squashfu_fs.store import layers

    require_root(command)
    with opened_root(root, command, write=False) as opened:
        relative = b"" if path is None else source_path(path, opened.config.origin.path)
        choose(ViewTable.from_history(opened.history))
    with private_view(root, command, choose, verbose=verbose) as view:
        layout, history = view.layout, view.history
        assert history.seed is not None
        trees: dict[int | None, Tree] = {None: DirTree(None, os.fsencode(view.record.seed_mount))}
        for number in view.spec.bins:
            entry = history.bin(number)
            where = view.record.layer_mounts / str(number) if layers.sealed(entry) else layout.bin(number)
            trees[number] = DirTree(number, os.fsencode(where),
                                    frozenset(overlay.read_opaque_record(layout.opaque_record(number))))
        hist = HistoryLayers(_trimmed(ViewTable.from_history(history), view.spec), trees)
        hist.path = relative
        yield hist


def _trimmed(table: ViewTable, newest: ViewSpec) -> ViewTable:
    """The table's snapshots up to the state that was mounted (a later one was committed after the choice)."""
    keep = set(newest.bins)
    snaps = {name: spec for name, spec in table.snapshots.items() if set(spec.bins) <= keep}
    return ViewTable(table.dated, table.links, table.seed, snaps)


def source_path(path: str, source: str) -> bytes:
    """PATH as the layers name it: relative to the source's top, no ``.`` or empty components.

    An absolute PATH must lie inside the source; ``..`` is refused, not resolved.
    """
    raw = os.fsencode(path)
    top = os.fsencode(source).rstrip(b"/")
    if raw.startswith(b"/"):
        if raw == top or raw.startswith(top + b"/"):
            raw = raw[len(top):]
        elif top:
            raise UsageError(f"{path!r} is outside the source {source}; give a path inside it, "
                             "or one relative to it")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise UsageError(f"{path!r} must be a path inside the backup, without '..'")
    return b"/".join(parts)


def shown(path: bytes) -> str:
    """A name for a line of text: UTF-8 as is; backslash doubled; control characters and bytes that are not
    UTF-8 as ``\\xHH`` (docs/commands.md, "Names in output")."""
    out = []
    for char in path.decode("utf-8", "surrogateescape"):
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char == "\\":
            out.append("\\\\")
        elif unicodedata.category(char)[0] == "C":
            out.extend(f"\\x{b:02x}" for b in char.encode("utf-8"))
        else:
            out.append(char)
    return "".join(out)


def json_name(path: bytes) -> str:
    """A name for JSON: its bytes decoded as UTF-8, each byte that is not valid UTF-8 as the lone surrogate
    U+DC80+byte (Python's ``surrogateescape``; ``os.fsencode`` gives the bytes back)."""
    return path.decode("utf-8", "surrogateescape")


def json_list(items: list[dict[str, object]]) -> str:
    """A JSON list with one object a line: valid JSON, and still a line per path for ``grep``."""
    if not items:
        return "[]\n"
    return "[\n" + ",\n".join(" " + json.dumps(item) for item in items) + "\n]\n"
