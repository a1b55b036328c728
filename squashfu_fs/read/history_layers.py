"""The kept history as layer directories: every backup's state resolved in user space (docs/commands.md, "diff").

``diff``, ``deleted`` and ``versions`` answer from the layers themselves:
each bin is the list of what changed that night and its whiteouts and opaque
directories are the deletions. They open the layers through one private
roll-back of the newest state they need (:func:`squashfu_fs.read.rollback.private_view`:
its record keeps a resquash from merging those bins, recovery cleans up after
a kill), then resolve any older state over a subset of the same directories
with overlay.py's rules, the way the time-travel daemon does.
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

from squashfu_fs import overlay
from squashfu_fs.engines.run import require_root
from squashfu_fs.errors import UsageError
from squashfu_fs.read.rollback import private_view
from squashfu_fs.store import layers
from squashfu_fs.store.opening import opened_root
from squashfu_fs.store.views import ViewSpec, ViewTable

KINDS = ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"), (stat.S_ISCHR, "char"),
         (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"))
_CHUNK = 1 << 20


def kind(mode: int) -> str:
    """The type of an entry as the commands print it: file, dir, symlink, char, block, fifo, socket."""
    for test, name in KINDS:
        if test(mode):
            return name
    return "unknown"


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


def facts(entry: overlay.Entry) -> Facts:
    """An entry's type, mode, owner, mtime, size, symlink target, device numbers and visible xattrs."""
    st, path = entry.st, entry.path
    what = kind(st.st_mode)
    return Facts(what, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns // 1_000_000_000,
                 st.st_size if what == "file" else 0,
                 os.readlink(path) if what == "symlink" else b"",
                 st.st_rdev if what in ("char", "block") else 0,
                 () if what == "symlink" else tuple(sorted(overlay.read_xattrs(path).items())))


def changed_fields(a: overlay.Entry, b: overlay.Entry) -> list[str]:
    """The fields in which two versions differ ("kind", "mode"..., "content"); empty when identical."""
    if a.path == b.path:
        return []  # the same object in the same layer
    fa, fb = facts(a), facts(b)
    out = [name for name in Facts.__dataclass_fields__ if getattr(fa, name) != getattr(fb, name)]
    if fa.kind == fb.kind == "file" and fa.size == fb.size and not same_content(a.path, b.path):
        out.append("content")
    return out


def same_content(a: bytes, b: bytes) -> bool:
    """Whether two regular files in the layers hold the same bytes (read in chunks, never following a link)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fa = os.open(a, flags)
    try:
        fb = os.open(b, flags)
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
    """One kept backup's tree over its layer directories (newest first, the seed last), resolved on demand.

    Directories looked up are remembered, so the many lookups of one query
    below the same parents cost one ``lstat`` per layer per new name.
    """

    def __init__(self, spec: ViewSpec, snapshot: str, directories: list[bytes],
                 marks: frozenset[bytes]) -> None:
        self.spec = spec
        self.snapshot = snapshot
        self.marks = marks
        self._root = overlay.Entry(os.lstat(directories[0]), tuple(enumerate(directories, 1)))
        self._dirs: dict[bytes, overlay.Entry | None] = {b"": self._root}

    def lookup(self, rel: bytes) -> overlay.Entry | None:
        """The entry at ``rel`` (b"a/b", b"" the top) in this state, or None."""
        if rel in self._dirs:
            return self._dirs[rel]
        parent_rel, _, name = rel.rpartition(b"/")
        parent = self.lookup(parent_rel)
        entry = None
        if parent is not None and parent.is_dir:
            entry = overlay.lookup(parent.branches, name, self.marks)
        if entry is None or entry.is_dir:
            self._dirs[rel] = entry
        return entry

    def walk(self, rel: bytes, within: bytes = b"") -> Iterator[tuple[bytes, overlay.Entry]]:
        """Every entry below the directory ``rel`` (not ``rel`` itself), on or below ``within`` only."""
        top = self.lookup(rel)
        if top is None or not top.is_dir:
            return
        pending = [(rel, top)]
        while pending:
            here, entry = pending.pop()
            for name, child in overlay.listdir(entry.branches, self.marks):
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


@dataclass(frozen=True)
class BinLayer:
    """One kept bin as a directory to read: its number and the state it made."""

    number: int
    directory: bytes
    marks: frozenset[bytes]


class HistoryLayers:
    """Every kept state of a root, over the layers a private roll-back of the newest needed state holds open."""

    def __init__(self, table: ViewTable, directories: dict[int | None, bytes],
                 marks: frozenset[bytes], bin_marks: dict[int, frozenset[bytes]]) -> None:
        self.table = table
        self.directories = directories  # bin number -> its directory; None -> the seed
        self.marks = marks
        self.bin_marks = bin_marks
        self._states: dict[tuple[int, ...], State] = {}
        self.path = b""  # the PATH a query asked about, relative to the source's top
        self.names = {spec.bins: name for name, spec in table.snapshots.items()}  # the newest name of a state

    def state(self, spec: ViewSpec) -> State:
        """The state of ``spec``, resolved over its bins and the seed."""
        if spec.bins not in self._states:
            dirs = [self.directories[n] for n in spec.bins] + [self.directories[None]]
            self._states[spec.bins] = State(spec, self.names.get(spec.bins, spec.name), dirs, self.marks)
        return self._states[spec.bins]

    def snapshots(self) -> list[State]:
        """Every kept backup's state, the seed first, in commit order."""
        return [self.state(spec) for spec in self.table.snapshots.values()]

    def bin(self, number: int) -> BinLayer:
        return BinLayer(number, self.directories[number], self.bin_marks.get(number, frozenset()))


@contextmanager
def opened_history(root: Path, command: str, choose: Callable[[ViewTable], ViewSpec], *,
                   path: str | None = None, verbose: bool = False) -> Iterator[HistoryLayers]:
    """Every layer up to the state ``choose`` picks, open read-only for a ``with`` block, and the states over them.

    ``choose`` runs twice: first against the history read without the lock,
    so a wrong name (or a ``path`` outside the source) is refused before
    anything is mounted, then under the lock, where the private view is made
    from the history that is current. ``path`` comes back as ``hist.path``,
    relative to the source's top.
    """
    require_root(command)
    with opened_root(root, command, write=False) as opened:
        relative = b"" if path is None else source_path(path, opened.config.origin.path)
        choose(ViewTable.from_history(opened.history))
    with private_view(root, command, choose, verbose=verbose) as view:
        layout, history = view.layout, view.history
        assert history.seed is not None
        directories: dict[int | None, bytes] = {None: os.fsencode(view.record.seed_mount)}
        bin_marks: dict[int, frozenset[bytes]] = {}
        for number in view.spec.bins:
            entry = history.bin(number)
            where = view.record.layer_mounts / str(number) if layers.sealed(entry) else layout.bin(number)
            directory = os.fsencode(where)
            directories[number] = directory
            bin_marks[number] = overlay.opaque_marks(
                [(directory, overlay.read_opaque_record(layout.opaque_record(number)))])
        marks = frozenset().union(*bin_marks.values())
        table = ViewTable.from_history(history)
        table = _trimmed(table, view.spec)
        hist = HistoryLayers(table, directories, marks, bin_marks)
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
