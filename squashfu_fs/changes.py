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
"""

from __future__ import annotations

import json
import marshal
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .excludes import Excludes
from .history import atomic_write
from .mounts import mount_table

MANIFEST_VERSION = 1
# Filesystems whose ctime moves on every change (NFS, FUSE and others may not).
TRUSTED_FSTYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs", "bcachefs", "jfs",
                             "reiserfs", "nilfs2"})

Entries = dict[bytes, int]


@dataclass(frozen=True)
class Scan:
    """A walk of the source: every path rsync would see, with its change signature."""

    entries: Entries  # relative path (b"." for the root) -> signature
    trusted: bool  # every directory walked is on a filesystem with honest ctimes


@dataclass(frozen=True)
class Changes:
    """What to hand rsync, and what to delete through the union."""

    changed: list[bytes]  # new or changed paths, parents before children
    deleted: list[bytes]  # topmost paths that are gone (a deleted directory, not its contents)


def signature(st: os.stat_result) -> int:
    """One int per path that changes whenever anything rsync copies changes."""
    return (st.st_ino << 128) | ((st.st_size & (2**64 - 1)) << 64) | (st.st_ctime_ns & (2**64 - 1))


def walk(source: bytes, excludes: Excludes) -> Scan:
    """Walk ``source`` as rsync would, pruning excluded paths."""
    fstypes = _fstypes_by_device()
    root_st = os.lstat(source)
    entries: Entries = {b".": signature(root_st)}
    trusted = fstypes.get(root_st.st_dev) in TRUSTED_FSTYPES
    seen_devs = {root_st.st_dev}
    stack = [(source, b"")]
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as it:
            for entry in it:
                rel = prefix + entry.name
                st = entry.stat(follow_symlinks=False)
                is_dir = stat.S_ISDIR(st.st_mode)
                if excludes.excluded(rel, is_dir):
                    continue
                entries[rel] = signature(st)
                if is_dir:
                    if st.st_dev not in seen_devs:
                        seen_devs.add(st.st_dev)
                        trusted = trusted and fstypes.get(st.st_dev) in TRUSTED_FSTYPES
                    stack.append((entry.path, rel + b"/"))
    return Scan(entries, trusted)


def _fstypes_by_device() -> dict[int, str]:
    return {entry.device: entry.fstype for entry in mount_table()}


def compare(old: Entries, new: Entries) -> Changes:
    """Paths new or changed in ``new``, and the topmost paths gone from it."""
    changed = sorted(path for path, sig in new.items() if old.get(path) != sig)
    gone = sorted(path for path in old if path not in new)
    deleted: list[bytes] = []
    for path in gone:  # sorted, so a directory comes right before its contents
        if deleted and path.startswith(deleted[-1] + b"/"):
            continue
        deleted.append(path)
    return Changes(changed, deleted)


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
