"""A manifest night written straight into its new bin, as overlayfs would have written it.

When the change manifest says exactly which paths changed and which are gone,
the committed layers need not be stacked under a union for rsync: every
lookup through a union falls through every layer below it, and with sealed
bins each of those is a freshly mounted image (docs/design.md, "A night
written straight into its bin"). So rsync copies the listed paths into the
empty bin directory itself, and this module adds what overlayfs would have
added on the way: a whiteout for each deletion, the opaque marker on a
directory that replaced a non-directory, and a source's own
``trusted.overlay.*`` xattrs stored escaped. The bin is squashfu's own
(inside the private root); the source is only read, beneath its fd,
following no symlink (docs/security.md).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable

from squashfu_fs.overlay import ESCAPED_PREFIX, OPAQUE_XATTR, OVERLAY_PREFIX
from squashfu_fs.util import beneath

_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV)


def needing_whiteouts(deleted: Iterable[bytes], dirs: frozenset[bytes]) -> list[bytes]:
    """The deleted paths that need a whiteout: those whose every parent is a directory tonight.

    Below a path that is now a file or a symlink nothing needs hiding: the
    non-directory in the bin ends the merge there.
    """
    return [rel for rel in deleted if all(parent in dirs for parent in parents(rel))]


def parents(rel: bytes) -> list[bytes]:
    """The directories above ``rel``, outermost first, without the top (``b"."``)."""
    parts = beneath.components(rel)
    return [b"/".join(parts[:i]) for i in range(1, len(parts))]


def place_whiteouts(bin_fd: int, paths: Iterable[bytes]) -> set[bytes]:
    """Put a whiteout at each path in the bin open on ``bin_fd``; returns the directories made for them.

    The caller lists those directories for rsync, which then gives each its
    source's owner, mode, times, xattrs and ACLs, as a copy-up would have.
    """
    made: set[bytes] = set()
    for rel in paths:
        for directory in parents(rel):
            with beneath.parent_of(bin_fd, directory) as (pfd, name):
                try:
                    os.mkdir(name, 0o700, dir_fd=pfd)
                except FileExistsError:
                    continue
            made.add(directory)
        whiteout(bin_fd, rel)
    return made


def whiteout(bin_fd: int, rel: bytes) -> None:
    """Make ``rel`` a whiteout (a 0:0 character device), as overlayfs does when a name is deleted."""
    with beneath.parent_of(bin_fd, rel) as (pfd, name):
        os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=pfd)


def withdraw(bin_fd: int, rel: bytes) -> bool:
    """Take ``rel`` out of the night's backup: remove what rsync wrote there and hide what lies below.

    A path below a symlink or a file in the bin is not in the backup already.
    """
    try:
        beneath.remove_beneath(bin_fd, rel)
        whiteout(bin_fd, rel)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENOENT):
            return False
        raise
    return True


def mark_opaque(bin_fd: int, directories: Iterable[bytes]) -> int:
    """Mark each directory that replaced a non-directory opaque, as overlayfs marks a directory made over a whiteout."""
    marked = 0
    for rel in directories:
        try:
            with beneath.opened(bin_fd, rel) as fd:
                os.setxattr(fd, OPAQUE_XATTR, b"y")
        except OSError as exc:
            if exc.errno in _GONE:
                continue  # rsync did not copy it as a directory (it changed again): nothing below to hide
            raise
        marked += 1
    return marked


def copy_top(source_fd: int, bin_fd: int) -> list[str]:
    """Give the bin's top directory the source top's owner, mode, xattrs (ACLs included) and times.

    A view's top directory is its newest bin's, so a night on which the top
    itself did not change (rsync was not given it) must not leave it as
    squashfu made it: a private source would read as ``root 0755``. An xattr
    that cannot be copied is skipped and returned (name: reason), as rsync
    skips it and says so, rather than failing every night.
    """
    st = os.fstat(source_fd)
    os.chown(bin_fd, st.st_uid, st.st_gid)
    os.chmod(bin_fd, stat.S_IMODE(st.st_mode))
    failed = []
    for name in os.listxattr(source_fd):
        raw = os.fsencode(name)
        target = ESCAPED_PREFIX + raw[len(OVERLAY_PREFIX):] if raw.startswith(OVERLAY_PREFIX) else raw
        try:
            os.setxattr(bin_fd, target, os.getxattr(source_fd, name))
        except OSError as exc:  # gone meanwhile, or one the backup's filesystem cannot hold: as rsync, go on
            if exc.errno != errno.ENODATA:
                failed.append(f"{name}: {exc.strerror}")
    os.utime(bin_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    return failed


def escape_overlay_xattrs(source_fd: int, bin_fd: int, paths: Iterable[bytes]) -> int:
    """Store each listed source path's own ``trusted.overlay.*`` xattrs escaped, as overlayfs stores them.

    rsync was told not to copy them (they would read as overlay's own markers);
    here each is set as ``trusted.overlay.overlay.*`` on the bin's copy.
    Returns how many entries carried one.
    """
    escaped = 0
    for rel in paths:
        try:
            found = _overlay_xattrs(source_fd, rel)
            if not found:
                continue
            with _parent(bin_fd, rel) as target:
                for name, value in found:
                    os.setxattr(target, ESCAPED_PREFIX + name[len(OVERLAY_PREFIX):], value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in _GONE:
                continue  # gone from the source or from the bin since: the manifest re-checks it
            raise
        escaped += 1
    return escaped


def _overlay_xattrs(source_fd: int, rel: bytes) -> list[tuple[bytes, bytes]]:
    with _parent(source_fd, rel) as path:
        names = [os.fsencode(n) for n in os.listxattr(path, follow_symlinks=False)]
        return [(n, os.getxattr(path, n, follow_symlinks=False)) for n in names if n.startswith(OVERLAY_PREFIX)]


class _parent:
    """A path naming ``rel`` through its parent's fd (``/proc/self/fd/N/name``), for the xattr calls without ``dir_fd``.

    The parent is resolved beneath the top following no symlink, and the
    callers never follow the last name either.
    """

    def __init__(self, top: int, rel: bytes) -> None:
        self.top, self.rel, self.fd = top, rel, -1

    def __enter__(self) -> bytes:
        if not beneath.components(self.rel):
            return b"/proc/self/fd/%d" % self.top
        parent, name = beneath.parent_and_name(self.rel)
        self.fd = beneath.open_beneath(self.top, parent, beneath.PATH_FLAGS)
        return b"/proc/self/fd/%d/%s" % (self.fd, name)

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
