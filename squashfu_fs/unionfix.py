"""Repairs after rsync wrote through the union: split hard links, directory times.

Hard links.
With ``index=off`` (which keeps every bin self-contained), changing the
metadata of one name of a hard-linked file through the union copies up that
name alone. rsync ``-H`` then believes the other names are still linked to it,
because it compares them with the leader's inode from *before* the copy-up, so
they keep the old metadata in a lower layer. After rsync we look for such
splits in the new bin (small), find the group's other names in the source
(a walk, only on the rare nights that need one) and link them to the copy.
"""

from __future__ import annotations

import os
import re
import stat

Key = tuple[int, int]


def split_groups(source: bytes, upper: bytes) -> dict[Key, bytes]:
    """Files in the new bin whose source has more names than the bin holds."""
    found: dict[Key, bytes] = {}
    for dirpath, _dirnames, filenames in os.walk(upper):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            rel = os.path.relpath(path, upper)
            try:
                sst = os.lstat(os.path.join(source, rel))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(sst.st_mode) and sst.st_nlink > 1 and st.st_nlink < sst.st_nlink:
                found.setdefault((sst.st_dev, sst.st_ino), rel)
    return found


def names_in_source(source: bytes, keys: set[Key]) -> dict[Key, list[bytes]]:
    """Every name below ``source`` of the given inodes."""
    names: dict[Key, list[bytes]] = {key: [] for key in keys}
    for dirpath, _dirnames, filenames in os.walk(source):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            key = (st.st_dev, st.st_ino)
            if key in names:
                names[key].append(os.path.relpath(path, source))
    return names


def repair(source: bytes, union: bytes, upper: bytes) -> int:
    """Link every name of a split group in the union to its copied-up leader.

    Returns how many names were re-linked; :func:`restore_dir_times` then puts
    the parent directories' times back.
    """
    leaders = split_groups(source, upper)
    if not leaders:
        return 0
    relinked = 0
    for key, names in names_in_source(source, set(leaders)).items():
        leader = os.path.join(union, leaders[key])
        lst = os.lstat(leader)
        for rel in names:
            target = os.path.join(union, rel)
            try:
                if os.lstat(target).st_ino == lst.st_ino:
                    continue
            except FileNotFoundError:
                continue  # excluded from the backup, or gone since rsync ran
            tmp = os.path.join(os.path.dirname(target), b".squashfu-relink.tmp")
            os.link(leader, tmp)
            os.rename(tmp, target)
            relinked += 1
    return relinked


def restore_dir_times(source: bytes, union: bytes, upper: bytes) -> int:
    """Give every directory in the new bin its source's mtime again.

    rsync sets a directory's time once it is done with it, but hard links it
    creates at the end of the run (and :func:`repair`) land later and bump
    it. Only directories in the bin can have changed, so this walk is small.
    """
    fixed = 0
    for dirpath, _dirnames, _filenames in os.walk(upper):
        rel = os.path.relpath(dirpath, upper)
        try:
            sst = os.lstat(os.path.join(source, rel))
        except FileNotFoundError:
            continue
        there = os.path.join(union, rel)
        try:
            ust = os.lstat(there)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(sst.st_mode) and stat.S_ISDIR(ust.st_mode) and ust.st_mtime_ns != sst.st_mtime_ns:
            os.utime(there, ns=(sst.st_atime_ns, sst.st_mtime_ns), follow_symlinks=False)
            fixed += 1
    return fixed


ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
_SET_ACL_FAILED = re.compile(r"set_acl: \w+\((.*), ACL_TYPE_(?:ACCESS|DEFAULT)\): Operation not supported")


def is_acl_failure(line: str) -> bool:
    """Whether an rsync complaint is only that it could not set an ACL through the union."""
    return _SET_ACL_FAILED.search(line) is not None


def acl_failures(errors: tuple[str, ...]) -> set[bytes]:
    """Paths whose ACL rsync could not set through the union (it names them relative to the root)."""
    return {_rsync_unescape(m.group(1)) for line in errors if (m := _SET_ACL_FAILED.search(line))}


def restore_acls(source: bytes, union: bytes, paths: set[bytes]) -> set[bytes]:
    """Give each path its source's ACLs through the union; returns the paths that still failed.

    SquashFS cannot store POSIX ACLs, and overlayfs will not set one on a file
    whose current version lives in the seed. Copying the file up first (a
    chown to its own owner) puts it in the bin, where the ACL can be set.
    """
    failed = set()
    for rel in paths:
        src, dst = os.path.join(source, rel), os.path.join(union, rel)
        try:
            st = os.lstat(dst)
            os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)  # copy-up
            for name in ACL_XATTRS:
                try:
                    value = os.getxattr(src, name, follow_symlinks=False)
                except OSError:
                    continue  # no ACL of that kind in the source
                os.setxattr(dst, name, value, follow_symlinks=False)
            sst = os.lstat(src)
            os.utime(dst, ns=(sst.st_atime_ns, sst.st_mtime_ns), follow_symlinks=False)
        except OSError:
            failed.add(rel)
    return failed


def _rsync_unescape(name: str) -> bytes:
    """rsync prints bytes it cannot show as ``\\#ooo``."""
    raw = name.encode("utf-8", "surrogateescape")
    return re.sub(rb"\\#([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), raw)
