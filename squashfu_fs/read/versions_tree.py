"""The ``versions/`` tree of the mount: every version of every file, found in the layers themselves.

Each layer of a root is the list of what changed at one backup: a non-directory
in bin N *is* the version of that path written by backup N (the seed holds the
version of everything it absorbed). So ``versions/`` is not resolved like a
day. A directory of it merges the same directory of every layer, newest
first, whiteouts skipped and opaque markers ignored (the whole history counts,
deleted paths included); a name that is a directory in any layer is a
directory here, browsable like a day; any other name becomes a directory of
its versions, one entry per layer that holds it, named by that backup's
snapshot name plus the file's extension (``report.odt`` ->
``2026-11-03T02:00:00.odt``), so a name sort is time order and a file manager
opens each with the right program. docs/filesystem.md, "versions/".

Like :mod:`squashfu_fs.overlay`, nothing here imports pyfuse3.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence

from squashfu_fs.overlay import Branch, Entry, StatLike, is_whiteout

TREE, VERSIONS, VERSION = "tree", "versions", "version"


class VersionsEntry(Entry):
    """An entry of ``versions/``: a directory to browse, a file's versions, or one version."""

    __slots__ = ("kind", "synthetic")

    def __init__(self, st: StatLike, branches: tuple[Branch, ...], kind: str, *, synthetic: bool = False) -> None:
        super().__init__(st, branches)
        self.kind = kind
        self.synthetic = synthetic  # its attributes are made up: it needs an inode number of its own


class DirStat:
    """The attributes of a file's directory of versions: the newest version's owner, its read bits as r-x."""

    def __init__(self, st: os.stat_result) -> None:
        read = st.st_mode & 0o444
        self.st_mode = stat.S_IFDIR | read | (read >> 2)
        self.st_ino, self.st_dev, self.st_nlink = st.st_ino, st.st_dev, 2
        self.st_uid, self.st_gid = st.st_uid, st.st_gid
        self.st_size, self.st_rdev, self.st_blksize, self.st_blocks = 0, 0, st.st_blksize, 0
        self.st_atime_ns = self.st_mtime_ns = self.st_ctime_ns = st.st_mtime_ns


ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")


class Restricted:
    """A directory of ``versions/``: no one gets in who could not get into every backup of it.

    It shows names that lived in the directory at any time, so it grants only
    the permission bits every backup of it granted (a directory 0700 once
    keeps the names it held then hidden). If its owner or group ever changed,
    or any backup of it carried a POSIX ACL, bits cannot say who could get in
    when: it is root's alone (0500, its ACLs not shown).
    """

    def __init__(self, versions: Sequence[tuple[bytes, os.stat_result]]) -> None:
        st = versions[0][1]
        self._st = st
        owners = {(older.st_uid, older.st_gid) for _, older in versions}
        self.root_only = len(owners) > 1 or any(_has_acl(path) for path, _ in versions)
        if self.root_only:
            self.st_uid = self.st_gid = 0
            self.st_mode = stat.S_IFDIR | 0o500
        else:
            allowed = 0o7777
            for _, older in versions:
                allowed &= older.st_mode
            self.st_mode = stat.S_IFMT(st.st_mode) | (stat.S_IMODE(st.st_mode) & allowed)

    def __getattr__(self, name: str) -> int:
        value: int = getattr(self._st, name)
        return value


def _has_acl(path: bytes) -> bool:
    try:
        return any(os.fsencode(x) in ACL_XATTRS for x in os.listxattr(path, follow_symlinks=False))
    except OSError:
        return False


def version_name(snapshot: str, name: bytes) -> bytes:
    """The name of one version: the snapshot that wrote it, then the file's own extension."""
    ext = os.path.splitext(name)[1]
    return snapshot.encode() + (ext if ext and b"/" not in ext else b"")


def listdir(entry: VersionsEntry, snapshots: Mapping[int, str]) -> list[tuple[bytes, VersionsEntry]]:
    """A directory of ``versions/``, in name order; ``snapshots`` names each layer position's backup."""
    if entry.kind == VERSIONS:
        out = []
        for pos, path in entry.branches:
            name = version_name(snapshots[pos], os.path.basename(path))
            out.append((name, VersionsEntry(os.lstat(path), ((pos, path),), VERSION)))
        return sorted(out, key=lambda item: item[0])
    found: dict[bytes, list[tuple[int, bytes, os.stat_result]]] = {}
    for pos, directory in entry.branches:
        try:
            scan = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with scan:
            for item in scan:
                st = item.stat(follow_symlinks=False)
                if not is_whiteout(st):
                    found.setdefault(os.fsencode(item.name), []).append((pos, os.fsencode(item.path), st))
    return [(name, _entry(found[name])) for name in sorted(found)]


def lookup(entry: VersionsEntry, name: bytes, snapshots: Mapping[int, str]) -> VersionsEntry | None:
    """One name in a directory of ``versions/``; None if no layer has it."""
    return next((e for n, e in listdir(entry, snapshots) if n == name), None) if entry.kind == VERSIONS else \
        _lookup_tree(entry.branches, name)


def _lookup_tree(branches: Sequence[Branch], name: bytes) -> VersionsEntry | None:
    hits = []
    for pos, directory in branches:
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not is_whiteout(st):
            hits.append((pos, path, st))
    return _entry(hits) if hits else None


def _entry(hits: list[tuple[int, bytes, os.stat_result]]) -> VersionsEntry:
    """What one name is across the layers (newest first): a directory if any layer has one, else versions."""
    dirs = [(pos, path, st) for pos, path, st in hits if stat.S_ISDIR(st.st_mode)]
    if dirs:
        return VersionsEntry(Restricted([(path, st) for _, path, st in dirs]),
                             tuple((pos, path) for pos, path, _ in dirs), TREE)
    return VersionsEntry(DirStat(hits[0][2]), tuple((pos, path) for pos, path, _ in hits), VERSIONS, synthetic=True)


def root(layers: Sequence[bytes]) -> VersionsEntry:
    """The top of ``versions/``: every layer's top directory, newest first (positions from 1), restricted alike."""
    branches = tuple((pos, directory) for pos, directory in enumerate(layers, 1))
    return VersionsEntry(Restricted([(d, os.lstat(d)) for d in layers]), branches, TREE)
