"""mksquashfs, the compression engine: one function makes every seed image, one checks it."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from squashfu_fs.engines import mounts
from squashfu_fs.engines.run import last_line, require, run
from squashfu_fs.errors import ExternalCommandError, SquashfuError
from squashfu_fs.util import faults
from squashfu_fs.util.durable import fsync_dir


class Compression(Protocol):
    """How to compress an image: a root's configuration (``store.config.Config``) is one."""

    @property
    def compression(self) -> str: ...

    @property
    def level(self) -> int | None: ...


def mksquashfs_args(source: Path, image: Path, config: Compression, *, progress: bool) -> list[str]:
    """Compress ``source`` into ``image`` exactly as it is: owners, xattrs, links, devices.

    ``-exit-on-error``: without it a file mksquashfs cannot read becomes an
    empty file and the exit status is still 0.
    """
    args = [require("mksquashfs"), os.fspath(source), os.fspath(image), "-noappend", "-exit-on-error",
            "-comp", config.compression]
    if config.level is not None:
        args += ["-Xcompression-level", str(config.level)]
    if not progress:
        args += ["-no-progress", "-quiet"]
    return args


def make_image(source: Path, image: Path, config: Compression, *, progress: bool = False) -> None:
    """Write ``image`` from ``source`` and make it durable (it is renamed into place later).

    A failed mksquashfs leaves no image behind.
    """
    args = mksquashfs_args(source, image, config, progress=progress)
    # mksquashfs would create the image 0644; it holds every backed-up file, so it is 0600 from the start.
    os.close(os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                            stdout=None if progress else subprocess.DEVNULL,
                            stderr=subprocess.PIPE if not progress else None)
    faults.checkpoint("mksquashfs-running")
    _, err = proc.communicate()
    if proc.returncode != 0:
        image.unlink(missing_ok=True)
        raise ExternalCommandError(f"mksquashfs failed (exit {proc.returncode}): {last_line(err or b'')}",
                                   proc.returncode)
    fd = os.open(image, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, 0o600)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(image.parent)


def inode_count(image: Path) -> int:
    """How many files, directories and links an image holds (its root included)."""
    out = run([require("unsquashfs"), "-s", image], what=f"reading {image}").stdout
    match = re.search(rb"Number of inodes (\d+)", out)
    return int(match.group(1)) if match else 0


def check_image(image: Path, tree: Path, mountpoint: Path, then: Callable[[Path], object] | None = None) -> None:
    """Refuse an image that does not hold what ``tree`` holds; the image is deleted then.

    Before a new seed replaces layers it is mounted on ``mountpoint`` and
    compared with the tree it was made from, entry by entry: the same names,
    types, permissions, owners, sizes and device numbers. Whatever slipped
    past mksquashfs (a read error, a vanished entry) stops the command before
    anything committed is changed. ``then`` is called with the mount point of
    an image that passed, while it is still mounted (the seed's catalogue).
    """
    with mounts.squashfs_mounted(image, mountpoint):
        problem = _first_difference(os.fsencode(tree), os.fsencode(mountpoint))
        if problem is None and then is not None:
            then(mountpoint)
    if problem is not None:
        image.unlink(missing_ok=True)
        raise SquashfuError(f"the new image does not hold what it was made from ({problem}); nothing was changed")


_FIELDS = ("type", "mode", "owner", "group", "size", "device number")


def _summary(st: os.stat_result) -> tuple[int, ...]:
    """What a copy must keep of an entry (directory sizes differ between filesystems)."""
    kind = stat.S_IFMT(st.st_mode)
    size = 0 if kind == stat.S_IFDIR else st.st_size
    rdev = st.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
    return kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, rdev


def _entries(directory: bytes) -> dict[bytes, os.stat_result]:
    with os.scandir(directory) as it:
        return {e.name: e.stat(follow_symlinks=False) for e in it}


def _first_difference(tree: bytes, copy: bytes) -> str | None:
    """The first entry (relative path) where ``copy`` differs from ``tree``; None when it does not.

    One directory at a time, so memory stays bounded by the largest directory.
    """
    pending = [b""]
    while pending:
        rel = pending.pop()
        want = _entries(os.path.join(tree, rel) if rel else tree)
        got = _entries(os.path.join(copy, rel) if rel else copy)
        for name in sorted(want.keys() ^ got.keys()):
            where = os.fsdecode(os.path.join(rel, name)) if rel else os.fsdecode(name)
            return f"{where!r} is {'missing' if name in want else 'unexpected'}"
        for name, st in sorted(want.items()):
            path = os.path.join(rel, name) if rel else name
            field = next((f for f, x, y in zip(_FIELDS, _summary(st), _summary(got[name]), strict=True) if x != y),
                         None)
            if field is not None:
                return f"{os.fsdecode(path)!r} has another {field} in the image"
            if stat.S_ISDIR(st.st_mode):
                pending.append(path)
    return None
