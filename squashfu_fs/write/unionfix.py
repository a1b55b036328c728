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

import contextlib
import errno
import os
import re
import stat

from squashfu_fs.util import beneath

Key = tuple[int, int]
# A name below the union that is not there as a real path: a component is a symlink or a file there.
_NOT_BELOW = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def split_groups(source: int, upper: bytes) -> dict[Key, bytes]:
    """Files in the new bin whose source (open on ``source``) has more names than the bin holds."""
    found: dict[Key, bytes] = {}
    with beneath.opened_root(upper) as top:
        for rel, st in beneath.walk(top):
            if not stat.S_ISREG(st.st_mode):
                continue
            try:
                sst = beneath.lstat_beneath(source, rel)
            except OSError:
                continue  # gone since rsync ran, or no longer reachable without a symlink
            if stat.S_ISREG(sst.st_mode) and sst.st_nlink > 1 and st.st_nlink < sst.st_nlink:
                found.setdefault((sst.st_dev, sst.st_ino), rel)
    return found


def names_in_source(source: int, keys: set[Key], selection: tuple[bytes, ...] = ()) -> dict[Key, list[bytes]]:
    """Every name below the source open on ``source`` of the given inodes (only inside ``selection``, if any)."""
    names: dict[Key, list[bytes]] = {key: [] for key in keys}
    for rel, st in beneath.walk_within(source, selection):
        key = (st.st_dev, st.st_ino)
        if key in names and not stat.S_ISDIR(st.st_mode):
            names[key].append(rel)
    return names


def repair(source: int, union: int, upper: bytes, selection: tuple[bytes, ...] = ()) -> int:
    """Link every name of a split group in the union (open on ``union``) to its copied-up leader.

    Every name is resolved beneath the union without following a symlink, and
    the new link replaces only a regular file. Returns how many names were
    re-linked; :func:`restore_dir_times` then puts the parent directories'
    times back.
    """
    leaders = split_groups(source, upper)
    if not leaders:
        return 0
    relinked = 0
    for key, names in names_in_source(source, set(leaders), selection).items():
        try:
            with beneath.parent_of(union, leaders[key]) as (lparent, lname):
                lst = os.stat(lname, dir_fd=lparent, follow_symlinks=False)
                if stat.S_ISREG(lst.st_mode):
                    relinked += sum(_relink(union, lparent, lname, lst, rel) for rel in names)
        except OSError as exc:
            if exc.errno not in _NOT_BELOW:
                raise
    return relinked


def _relink(union: int, lparent: int, lname: bytes, lst: os.stat_result, rel: bytes) -> bool:
    """Make ``rel`` another name of the leader, atomically; False if there is nothing to do."""
    try:
        with beneath.parent_of(union, rel) as (parent, name):
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                return False  # excluded from the backup, or gone since rsync ran
            if beneath.same_file(st, lst) or not stat.S_ISREG(st.st_mode):
                return False
            for n in range(1000):
                tmp = b".squashfu-relink.%d.tmp" % n
                try:
                    os.link(lname, tmp, src_dir_fd=lparent, dst_dir_fd=parent, follow_symlinks=False)
                    break
                except FileExistsError:
                    continue
            else:
                raise OSError(errno.EEXIST, "no free temporary name", rel)
            try:
                os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=parent)
                raise
            return True
    except OSError as exc:
        if exc.errno in _NOT_BELOW:
            return False
        raise


def restore_dir_times(source: int, union: int, upper: bytes) -> int:
    """Give every directory in the new bin its source's mtime again.

    rsync sets a directory's time once it is done with it, but hard links it
    creates at the end of the run (and :func:`repair`) land later and bump
    it. Only directories in the bin can have changed, so this walk is small.
    Source and union are both resolved beneath their fds, following no symlink.
    """
    with beneath.opened_root(upper) as top:
        dirs = [b""] + [rel for rel, st in beneath.walk(top) if stat.S_ISDIR(st.st_mode)]
    fixed = 0
    for rel in dirs:
        try:
            sst = beneath.lstat_beneath(source, rel)
            if not stat.S_ISDIR(sst.st_mode):
                continue
            with beneath.opened(union, rel) as fd:
                if os.fstat(fd).st_mtime_ns != sst.st_mtime_ns:
                    os.utime(fd, ns=(sst.st_atime_ns, sst.st_mtime_ns))
                    fixed += 1
        except OSError as exc:
            if exc.errno not in _NOT_BELOW:
                raise
    return fixed


ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
_SET_ACL_FAILED = re.compile(r"set_acl: \w+\((.*), ACL_TYPE_(?:ACCESS|DEFAULT)\): Operation not supported")


def is_acl_failure(line: str) -> bool:
    """Whether an rsync complaint is only that it could not set an ACL through the union."""
    return _SET_ACL_FAILED.search(line) is not None


def acl_failures(errors: tuple[str, ...]) -> set[bytes]:
    """Paths whose ACL rsync could not set through the union (it names them relative to the root)."""
    return {_rsync_unescape(m.group(1)) for line in errors if (m := _SET_ACL_FAILED.search(line))}


def restore_acls(source: int, union: int, paths: set[bytes]) -> set[bytes]:
    """Give each path its source's ACLs through the union; returns the paths that still failed.

    SquashFS cannot store POSIX ACLs, and overlayfs will not set one on a file
    whose current version lives in the seed. Copying the file up first (a
    chown to its own owner) puts it in the bin, where the ACL can be set.
    Both sides are opened beneath their fds without following a symlink, and
    the source's ACL is read from that fd: a path swapped meanwhile can
    neither receive an ACL outside the union nor give away another file's.
    """
    failed = set()
    for rel in paths:
        try:
            with beneath.parent_of(union, rel) as (parent, name):
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise OSError(errno.ELOOP, "a symlink has no ACL", rel)
                os.chown(name, st.st_uid, st.st_gid, dir_fd=parent, follow_symlinks=False)  # copy-up
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)  # the copy, in the bin now
                with beneath.opened(source, rel, os.O_PATH) as sfd, beneath.opened(parent, name, os.O_PATH) as dfd:
                    sst, dst = os.fstat(sfd), os.fstat(dfd)
                    if stat.S_ISLNK(sst.st_mode) or not beneath.same_file(dst, st):
                        raise OSError(errno.ESTALE, "changed while its ACL was repaired", rel)
                    for xattr in ACL_XATTRS:
                        try:
                            value = os.getxattr(beneath.fd_path(sfd), xattr)
                        except OSError:
                            continue  # no ACL of that kind in the source
                        os.setxattr(beneath.fd_path(dfd), xattr, value)
                os.utime(name, ns=(sst.st_atime_ns, sst.st_mtime_ns), dir_fd=parent, follow_symlinks=False)
        except OSError:
            failed.add(rel)
    return failed


def copy_up(union: int, paths: set[bytes]) -> None:
    """Copy each path's current version up into the new bin (a chown to its own owner), beneath the union's fd.

    For a remote source, whose ACLs squashfu cannot read: once the file is in
    the bin, the second rsync pass can set its ACL (see :func:`restore_acls`).
    A symlink, or a path that is not there without following one, is left alone.
    """
    for rel in paths:
        try:
            with beneath.parent_of(union, rel) as (parent, name):
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    os.chown(name, st.st_uid, st.st_gid, dir_fd=parent, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _NOT_BELOW:
                raise


def _rsync_unescape(name: str) -> bytes:
    """rsync prints bytes it cannot show as ``\\#ooo``."""
    raw = name.encode("utf-8", "surrogateescape")
    return re.sub(rb"\\#([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), raw)
