"""Overlay resolution over plain directories, without a kernel mount (docs/filesystem.md "How a view is made").

A *stack* is a list of layer directories, newest first: the bins of a day, then
the seed. Names resolve the way the kernel's overlayfs resolves them with
``redirect_dir=off,metacopy=off``: a whiteout (character device 0:0) hides the
name below it; a whiteout or a non-directory met under a directory ends that
directory's merge; an opaque directory stops the merge below it; the topmost
non-directory wins. Names are bytes throughout, and nothing here imports
pyfuse3, so the logic is tested on ordinary directories.

Only root can read ``trusted.overlay.opaque``. So that a normal user's daemon
(which reads the seed through squashfuse) still stops the merge where overlay
would, a backup also lists each bin's opaque directories in an *opaque record*
beside it (``bins/N.opaque``), and a stack consults both.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from squashfu_fs.util.durable import atomic_write

# Where a merged object lives: (layer position, 1 = newest; the real path).
Branch = tuple[int, bytes]

OVERLAY_PREFIX = b"trusted.overlay."
ESCAPED_PREFIX = b"trusted.overlay.overlay."
# Bins are written by overlayfs in trusted mode (never `userxattr`), so only trusted.overlay.*
# are overlay's markers; a source's own user.overlay.* xattrs are data, stored and shown as they are.
OPAQUE_XATTR = b"trusted.overlay.opaque"
OPAQUE_XATTRS = (OPAQUE_XATTR,)
_MISSING = (errno.ENOENT, errno.ENOTDIR)
_NO_XATTR = (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)


class Layer(Protocol):
    """One layer of a stack: anything that can yield a directory to read.

    Today a bin is a plain directory and the seed a mounted image; a bin sealed
    into an image would mount itself on demand in :meth:`directory`.
    """

    def directory(self) -> bytes:
        """The real directory holding this layer's tree."""
        ...


class DirLayer:
    """A layer that is already a directory (a committed bin, a mounted seed)."""

    __slots__ = ("path",)

    def __init__(self, path: bytes | str | os.PathLike[str]) -> None:
        self.path = os.fsencode(path)

    def directory(self) -> bytes:
        return self.path

    def __repr__(self) -> str:
        return f"DirLayer({self.path!r})"


class StatLike(Protocol):
    """The attributes an entry reports: ``os.stat_result``, or a synthetic stand-in."""

    @property
    def st_mode(self) -> int: ...
    @property
    def st_ino(self) -> int: ...
    @property
    def st_dev(self) -> int: ...
    @property
    def st_nlink(self) -> int: ...
    @property
    def st_uid(self) -> int: ...
    @property
    def st_gid(self) -> int: ...
    @property
    def st_size(self) -> int: ...
    @property
    def st_rdev(self) -> int: ...
    @property
    def st_blksize(self) -> int: ...
    @property
    def st_blocks(self) -> int: ...
    @property
    def st_atime_ns(self) -> int: ...
    @property
    def st_mtime_ns(self) -> int: ...
    @property
    def st_ctime_ns(self) -> int: ...


class Entry:
    """A resolved name: the topmost object's lstat and every branch that merges.

    A non-directory has exactly one branch; a directory lists, newest first,
    every real directory that contributes to its merged contents.
    """

    __slots__ = ("branches", "cache", "st")

    def __init__(self, st: StatLike, branches: tuple[Branch, ...]) -> None:
        self.st = st
        self.branches = branches
        self.cache: object = None  # free for the caller (the FUSE adapter's attributes)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def merged(self) -> bool:
        """More than one directory contributes (overlay reports nlink 1 for these)."""
        return len(self.branches) > 1

    @property
    def nlink(self) -> int:
        """The link count overlayfs reports: 1 for a merged directory, else the real one."""
        return 1 if len(self.branches) > 1 and stat.S_ISDIR(self.st.st_mode) else self.st.st_nlink

    @property
    def path(self) -> bytes:
        """The real path of the topmost object: what to stat, read, readlink."""
        return self.branches[0][1]

    @property
    def layer(self) -> int:
        return self.branches[0][0]

    def __repr__(self) -> str:
        return f"Entry({self.branches!r})"


def is_whiteout(st: os.stat_result) -> bool:
    """overlayfs's whiteout: a character device numbered 0:0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def opaque_marks(records: Iterable[tuple[bytes, Sequence[bytes]]]) -> frozenset[bytes]:
    """The real paths of the directories that opaque records name, from (layer directory, record) pairs."""
    return frozenset(join(directory, rel) for directory, record in records for rel in record)


def write_opaque_record(path: Path, relatives: Iterable[bytes]) -> None:
    """Record a layer's opaque directories: NUL-terminated paths relative to the layer, made durable."""
    atomic_write(path, b"".join(rel + b"\0" for rel in relatives))


def read_opaque_record(path: str | os.PathLike[str]) -> tuple[bytes, ...]:
    """A layer's recorded opaque directories; none when it has no record."""
    return opaque_record(path) or ()


def opaque_record(path: str | os.PathLike[str]) -> tuple[bytes, ...] | None:
    """A layer's recorded opaque directories, or None when the layer has no record (a bin of older code)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return tuple(data.split(b"\0")[:-1])


class TrustedMarks(frozenset[bytes]):
    """Opaque marks that name every opaque directory of the stack: nothing else needs an xattr probe.

    Every bin written since records its opaque directories (``bins/N.opaque``,
    empty when there are none); a stack whose bins all have one is resolved
    from the records alone, saving a ``getxattr`` per merged directory.
    """


def is_opaque(path: bytes, marks: frozenset[bytes] = frozenset()) -> bool:
    """Whether a directory hides everything below it in the stack."""
    if path in marks:
        return True
    if isinstance(marks, TrustedMarks):
        return False
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError as exc:
            if exc.errno not in (*_NO_XATTR, *_MISSING, errno.EPERM, errno.EACCES):
                raise
    return False


def root_branches(layers: Sequence[Layer]) -> tuple[Branch, ...]:
    """The branches of a stack's root: every layer, newest first (positions from 1)."""
    return tuple((pos, layer.directory()) for pos, layer in enumerate(layers, 1))


def join(directory: bytes, name: bytes) -> bytes:
    return directory + b"/" + name if directory != b"/" else b"/" + name


def lookup(branches: Sequence[Branch], name: bytes, marks: frozenset[bytes] = frozenset()) -> Entry | None:
    """Resolve ``name`` in the merged directory made of ``branches``; None if absent.

    ``marks``: the stack's recorded opaque directories (:func:`opaque_marks`).
    """
    found: list[Branch] = []
    top: os.stat_result | None = None
    for pos, directory in branches:
        path = join(directory, name)
        try:
            st = os.lstat(path)
        except OSError as exc:
            if exc.errno in _MISSING:
                continue
            raise
        if stat.S_ISDIR(st.st_mode):
            if top is None:
                top = st
            found.append((pos, path))
            if pos != branches[-1][0] and is_opaque(path, marks):
                break
            continue
        if top is not None or is_whiteout(st):
            break  # a whiteout hides; a non-directory under a directory ends the merge
        return Entry(st, ((pos, path),))
    if top is None:
        return None
    return Entry(top, tuple(found))


def listdir(branches: Sequence[Branch], marks: frozenset[bytes] = frozenset()) -> list[tuple[bytes, Entry]]:
    """The merged listing of a directory: each visible name with its resolved entry.

    One ``scandir`` per branch; an ``lstat`` per visible name (its attributes)
    and per device node (whiteout test); the opaque test only for directories
    that actually have something below them.
    """
    order: list[bytes] = []
    tops: dict[bytes, tuple[os.stat_result | None, Branch]] = {}
    lower_dirs: dict[bytes, list[Branch]] = {}
    done: set[bytes] = set()
    for pos, directory in branches:
        try:
            scan = os.scandir(directory)
        except OSError as exc:
            if exc.errno in _MISSING:
                continue
            raise
        with scan:
            for item in scan:
                name = item.name
                if name in done:
                    continue
                path = item.path
                is_dir = item.is_dir(follow_symlinks=False)
                if name not in tops:
                    if is_dir:
                        tops[name] = (None, (pos, path))
                        order.append(name)
                        continue
                    st = None
                    if not (item.is_file(follow_symlinks=False) or item.is_symlink()):
                        st = item.stat(follow_symlinks=False)
                        if is_whiteout(st):
                            done.add(name)
                            continue
                    tops[name] = (st, (pos, path))
                    order.append(name)
                    done.add(name)
                elif is_dir:
                    lower_dirs.setdefault(name, []).append((pos, path))
                else:
                    done.add(name)  # whiteout or non-directory: the merge ends here
    out: list[tuple[bytes, Entry]] = []
    for name in order:
        st, top = tops[name]
        try:
            if st is None:
                st = os.lstat(top[1])
        except OSError as exc:
            if exc.errno in _MISSING:
                continue
            raise
        below = lower_dirs.get(name)
        if below and stat.S_ISDIR(st.st_mode):
            out.append((name, Entry(st, _cut_at_opaque([top, *below], marks))))
        else:
            out.append((name, Entry(st, (top,))))
    return out


def _cut_at_opaque(found: list[Branch], marks: frozenset[bytes]) -> tuple[Branch, ...]:
    for i, (_, path) in enumerate(found[:-1]):
        if is_opaque(path, marks):
            return tuple(found[: i + 1])
    return tuple(found)


def visible_xattr_name(name: bytes) -> bytes | None:
    """The name a reader sees for a stored xattr, or None for overlay's own (trusted.overlay.*)."""
    if name.startswith(OVERLAY_PREFIX):
        if name.startswith(ESCAPED_PREFIX):
            return OVERLAY_PREFIX + name[len(ESCAPED_PREFIX):]
        return None
    return name


def read_xattrs(path: bytes) -> dict[bytes, bytes]:
    """Every xattr a reader may see on ``path`` (not following symlinks), unescaped."""
    try:
        names: Iterable[str] = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _NO_XATTR:
            return {}
        raise
    out: dict[bytes, bytes] = {}
    for raw in names:
        stored = os.fsencode(raw)
        shown = visible_xattr_name(stored)
        if shown is None:
            continue
        try:
            out[shown] = os.getxattr(path, stored, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _NO_XATTR:
                raise
    return out
