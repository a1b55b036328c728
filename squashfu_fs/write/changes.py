"""Which source paths changed since the last backup, without walking the history.

rsync decides what changed by stat-ing every path in the union too, and the
union is a freshly mounted, cold squashfs + overlay stack every night: for
100k files that walk cost twice the whole of a plain rsync. Instead, each
backup records a manifest of (inode, ctime, size) per source path, the
"files cache" borg and restic use: any change to a file's content, mode,
owner, times, xattrs, ACLs or link count moves its ctime, which userspace
cannot set. The next night walks only the source, compares, and hands rsync
just the changed paths; deletions are made through the union directly.

The manifest is a cache, never history: it is trusted only for the exact
committed state, source and excludes it was written for, only on local
filesystems that keep ctime honestly, and otherwise the backup compares the
whole tree with rsync as before.

It describes what was copied, not what was walked: users change the source
between the walk and rsync. Every path whose signature moved while rsync ran
is recorded as :data:`UNKNOWN` (compared again next night), and so is
everything below a directory that the backup did not end up holding as a
directory (a directory swapped for a symlink, say), so that no later night
acts on paths below it. See docs/commands.md ("the change manifest").
"""

from __future__ import annotations

import errno
import json
import marshal
import os
import stat
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from squashfu_fs.engines.mounts import mount_table
from squashfu_fs.util import beneath
from squashfu_fs.util.durable import atomic_write
from squashfu_fs.write.excludes import Excludes

MANIFEST_VERSION = 2  # 2: a signature carries the entry's file type
# Filesystems whose ctime moves on every change (NFS, FUSE and others may not).
TRUSTED_FSTYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs", "bcachefs", "jfs",
                             "reiserfs", "nilfs2"})

Entries = dict[bytes, int]
UNKNOWN = -1  # no path's signature: "the backup cannot vouch for this path; compare it again"
_REPLACED = (errno.ENOTDIR, errno.ELOOP, beneath.REPLACED)  # a directory swapped while walked


@dataclass(frozen=True)
class Scan:
    """A walk of the source: every path rsync would see, with its change signature."""

    entries: Entries  # relative path (b"." for the root) -> signature
    trusted: bool  # every directory walked is on a filesystem with honest ctimes, and all was readable
    dirs: frozenset[bytes] = frozenset()  # the paths that were directories
    unreadable: tuple[bytes, ...] = ()  # could not be listed or stat-ed (rsync will say so too)
    vanished: tuple[bytes, ...] = ()  # deleted, or swapped for something else, while walked
    device: int = 0  # st_dev of the source's top directory
    fsid: int = 0  # statfs f_fsid of the source's filesystem (stable across reboots for most)

    @property
    def count(self) -> int:
        """Entries below the top directory."""
        return len(self.entries) - 1


@dataclass(frozen=True)
class Changes:
    """What to hand rsync, and what to delete through the union."""

    changed: list[bytes]  # new or changed paths, parents before children
    deleted: list[bytes]  # topmost paths that are gone (a deleted directory, not its contents)
    gone: int = 0  # every path that is gone, contents included
    recheck: list[bytes] = field(default_factory=list)  # directories to list in the union (see compare)
    replaced: list[bytes] = field(default_factory=list)  # directories where the committed state has a non-directory


def signature(st: os.stat_result) -> int:
    """One int per path that changes whenever anything rsync copies changes.

    It also carries the entry's file type, so that a night writing straight
    into its bin knows what the committed state held at a path.
    """
    return ((((st.st_ino << 4) | stat.S_IFMT(st.st_mode) >> 12) << 128) | ((st.st_size & (2**64 - 1)) << 64)
            | (st.st_ctime_ns & (2**64 - 1)))


def was_directory(sig: int | None) -> bool | None:
    """Whether the entry a signature describes was a directory; None when it is not known."""
    if sig is None or sig == UNKNOWN:
        return None
    return (sig >> 128) & 0xF == stat.S_IFDIR >> 12


def walk(source: bytes, excludes: Excludes) -> Scan:
    """Walk ``source`` as rsync would, pruning excluded paths."""
    with beneath.opened_root(source, follow=True) as fd:
        return walk_fd(fd, excludes)


def walk_fd(top: int, excludes: Excludes) -> Scan:
    """Walk the source open on ``top`` without following any symlink, pruning excluded paths.

    With several sources ``top`` is "/" and only ``excludes.selection`` (and
    the directories above it) is walked.

    Nothing raises for the tree's sake: a path deleted while walked is left
    out (a deletion, like rsync's "vanished"), a directory swapped while
    walked is recorded as :data:`UNKNOWN`, and what cannot be read (another
    user's FUSE mount) makes the scan untrusted, so rsync compares the whole
    tree and reports it.
    """
    fstypes = _fstypes_by_device()
    root_st = os.fstat(top)
    entries: Entries = {b".": signature(root_st)}
    dirs = {b"."}
    trusted = fstypes.get(root_st.st_dev) in TRUSTED_FSTYPES
    seen_devs = {root_st.st_dev}
    errors: list[tuple[bytes, OSError]] = []

    def keep(rel: bytes, st: os.stat_result) -> bool:
        return not excludes.excluded(rel, stat.S_ISDIR(st.st_mode))

    for rel, st in beneath.walk_within(top, excludes.selection, keep=keep, errors=errors):
        entries[rel] = signature(st)
        if stat.S_ISDIR(st.st_mode):
            dirs.add(rel)
            if st.st_dev not in seen_devs:
                seen_devs.add(st.st_dev)
                trusted = trusted and fstypes.get(st.st_dev) in TRUSTED_FSTYPES
    vanished, unreadable = [], []
    for rel, exc in errors:
        rel = rel or b"."
        if exc.errno == errno.ENOENT:
            vanished.append(rel)
            entries.pop(rel, None)
            dirs.discard(rel)
        elif exc.errno in _REPLACED:
            vanished.append(rel)
            if rel in entries:
                entries[rel] = UNKNOWN
        else:
            unreadable.append(rel)
    return Scan(entries, trusted and not unreadable, frozenset(dirs), tuple(sorted(unreadable)),
                tuple(sorted(vanished)), root_st.st_dev, os.statvfs(top).f_fsid)


def _fstypes_by_device() -> dict[int, str]:
    return {entry.device: entry.fstype for entry in mount_table()}


def compare(old: Entries, new: Entries, dirs: frozenset[bytes] = frozenset()) -> Changes:
    """Paths new or changed in ``new``, and the topmost paths gone from it.

    ``recheck`` lists the directories of ``new`` (``dirs``) that ``old`` could
    not vouch for: while the last backup's rsync ran they changed, so the
    backup's copy may hold names neither walk saw. Their listing in the union
    is compared with tonight's walk. ``replaced`` lists the directories of
    ``new`` that were something else in the committed state.
    """
    changed = sorted(path for path, sig in new.items() if old.get(path) != sig)
    gone = sorted(path for path in old if path not in new)
    deleted: list[bytes] = []
    for path in gone:  # sorted, so a directory comes right before its contents
        if deleted and path.startswith(deleted[-1] + b"/"):
            continue
        deleted.append(path)
    recheck = sorted(path for path, sig in old.items() if sig == UNKNOWN and path in dirs)
    replaced = [path for path in changed if path in dirs and was_directory(old.get(path)) is False]
    return Changes(changed, deleted, len(gone), recheck, replaced)


def moved_since(entries: Entries, top: int, paths: Iterable[bytes]) -> set[bytes]:
    """Which of ``paths`` no longer have their walked signature (looked up beneath ``top``, no symlinks)."""
    moved = set()
    for path in paths:
        try:
            st = beneath.lstat_beneath(top, b"" if path == b"." else path)
        except OSError:
            moved.add(path)
            continue
        if signature(st) != entries.get(path):
            moved.add(path)
    return moved


def merge_walks(before: Entries, after: Entries) -> tuple[Entries, set[bytes]]:
    """Two walks around one rsync: each path with its signature if it held still, and those that moved."""
    merged: Entries = {}
    moved = set()
    for path in before.keys() | after.keys():
        sig = before.get(path)
        if sig is not None and sig != UNKNOWN and after.get(path) == sig:
            merged[path] = sig
        else:
            merged[path] = UNKNOWN
            moved.add(path)
    return merged, moved


def vouch(entries: Entries, moved: Iterable[bytes], is_directory: Callable[[bytes], bool]) -> Entries:
    """The entries to record: ``moved`` paths :data:`UNKNOWN`, and everything below one that is not a directory.

    ``is_directory`` says whether the backup's copy of a path is a real
    directory. If it is not (rsync copied a symlink or a file there), the
    walked paths below it are not in the backup under that name, and must
    neither be trusted as copied nor be acted on through it.
    """
    out = dict(entries)
    keys = sorted(out)
    for path in moved:
        out[path] = UNKNOWN
        if path == b".":
            continue
        lo, hi = bisect_left(keys, path + b"/"), bisect_left(keys, path + b"0")  # b"0" sorts right after b"/"
        if lo < hi and not is_directory(path):
            for below in keys[lo:hi]:
                out[below] = UNKNOWN
    return out


@dataclass(frozen=True)
class Manifest:
    """The source as it was when the state ``state`` was committed."""

    state: int  # the number of the backup it describes (history.next_bin - 1)
    source: str
    excludes: tuple[str, ...]
    entries: Entries

    def valid_for(self, state: int, source: str, excludes: tuple[str, ...]) -> bool:
        return (self.state, self.source, self.excludes) == (state, source, excludes)


def save(path: Path, manifest: Manifest) -> None:
    """Write the manifest atomically: a JSON header line, then the marshalled entries."""
    header = json.dumps({"version": MANIFEST_VERSION, "state": manifest.state, "source": manifest.source,
                         "excludes": list(manifest.excludes)}).encode()
    atomic_write(path, header + b"\n" + marshal.dumps(manifest.entries))


def load(path: Path) -> Manifest | None:
    """The manifest, or None when it is missing, damaged or from another version."""
    try:
        data = path.read_bytes()
        header, _, body = data.partition(b"\n")
        meta = json.loads(header)
        if meta.get("version") != MANIFEST_VERSION:
            return None
        entries = marshal.loads(body)
        if not isinstance(entries, dict):
            return None
        return Manifest(int(meta["state"]), str(meta["source"]), tuple(meta["excludes"]), entries)
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None
