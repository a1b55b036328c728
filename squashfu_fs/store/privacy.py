"""The backup root is root's alone: 0700, and nothing in it readable by group or others.

The seed image, the bins, the change manifest and the logs hold every backed-up
file and every file name, ``/etc/shadow`` and ``/home/*`` included; the kernel's
per-file permissions protect them only inside a mount (docs/filesystem.md).
``init`` makes a new root private, and every writer tightens an existing one
right after it takes the lock (docs/layout.md). Everything here works on file
descriptors opened without following symlinks, so a planted link cannot steer
a chmod outside the root.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from squashfu_fs.errors import SquashfuError, UsageError

# Directories whose regular files are squashfu's own (bins/N.opaque, logs/*.log, catalogs/*.db).
# bins/N/ themselves are not touched: a bin's top directory carries the source root's mode.
_FILES_INSIDE = ("bins", "logs", "catalogs")
# The staging upper's top directory also carries the source root's mode, into the next seed.
_LEAVE = (".staging",)


def open_root(root: Path) -> int:
    """A directory fd of the root (its real path, the last step not followed); refuse one another user owns.

    Root works only in a root it owns: the owner of the directory could
    otherwise swap what root is about to write or delete for a link.
    """
    real = os.path.realpath(root)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"backup root {root}: {exc.strerror}") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise UsageError(f"{root} is owned by uid {st.st_uid}, not by uid {os.geteuid()} that runs squashfu; "
                         f"its owner could steer what is written there (chown {os.geteuid()} {root})")
    return fd


def tighten(root_fd: int) -> None:
    """Take group and other permissions off the root, its own files and directories, and the files in bins/, logs/."""
    try:
        root_st = os.fstat(root_fd)
        _strip(root_fd, root_st)
        for name in os.listdir(root_fd):
            if name in _LEAVE:
                continue
            fd = _open_own(root_fd, name, root_st.st_dev, files_only=False)
            if fd is None:
                continue
            try:
                st = os.fstat(fd)
                _strip(fd, st)
                if stat.S_ISDIR(st.st_mode) and name in _FILES_INSIDE:
                    for child in os.listdir(fd):
                        child_fd = _open_own(fd, child, root_st.st_dev, files_only=True)
                        if child_fd is not None:
                            try:
                                _strip(child_fd, os.fstat(child_fd))
                            finally:
                                os.close(child_fd)
            finally:
                os.close(fd)
    except OSError as exc:
        raise SquashfuError(f"cannot make the backup root private: {exc.strerror} "
                            f"({os.fsdecode(exc.filename or '')})") from None


def make_private(root: Path) -> None:
    """``init``: the new (or empty) root directory becomes 0700 and root's."""
    fd = open_root(root)
    try:
        tighten(fd)
    finally:
        os.close(fd)


def _open_own(dir_fd: int, name: str, device: int, *, files_only: bool) -> int | None:
    """``name`` in ``dir_fd`` opened without following links, if it is a file (or directory) on ``device``."""
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    is_dir = stat.S_ISDIR(before.st_mode)
    if not (stat.S_ISREG(before.st_mode) or (is_dir and not files_only)) or before.st_dev != device:
        return None  # links, devices, fifos, and mount points (another device) are left alone
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(name, flags | (os.O_DIRECTORY if is_dir else 0), dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a symlink since the stat
            return None
        raise
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):  # replaced since the stat
        os.close(fd)
        return None
    return fd


def _strip(fd: int, st: os.stat_result) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        os.fchmod(fd, mode & ~0o077)
