"""Where a backup root may live: not inside its source, not on a filesystem that forgets.

Both checks compare what the kernel says, not path text: a root reached
through a symlink or a bind mount of the source is still inside it, and a
directory's filesystem is the one whose device it reports.
"""

from __future__ import annotations

import os
from pathlib import Path

from squashfu_fs.engines import mounts
from squashfu_fs.errors import UsageError

# Filesystems whose contents are gone after a reboot (ramfs too, but it holds no xattrs,
# so init's layer probe already refuses it with that reason).
VOLATILE_FSTYPES = frozenset({"tmpfs", "devtmpfs"})


def _nearest_existing(path: Path) -> Path:
    """``path`` itself, or the closest ancestor that exists (where ``init`` would create it)."""
    here = Path(os.path.abspath(path))
    while not here.exists() and here != here.parent:
        here = here.parent
    return here


def refuse_root_inside_source(root: Path, source: Path) -> None:
    """Fail unless ``root`` lies outside ``source``, walking up the root's real parents by device and inode.

    The walk opens ``..`` from the root's own directory, so it follows the
    tree the kernel shows rsync: a bind mount of the source above the root
    counts as the source.
    """
    try:
        src = os.stat(source)
    except OSError as exc:
        raise UsageError(f"source {source}: {exc.strerror}") from None
    wanted = (src.st_dev, src.st_ino)
    fd = os.open(_nearest_existing(root), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while True:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == wanted:
                raise UsageError(f"the backup root {root} is inside the source {source}; it would back itself up")
            parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            up = os.fstat(parent)
            os.close(fd)
            fd = parent
            if (up.st_dev, up.st_ino) == (st.st_dev, st.st_ino):  # "/" is its own parent
                return
    finally:
        os.close(fd)


def refuse_volatile_root(root: Path) -> None:
    """Fail if ``root`` (or where it would be created) is on tmpfs: every backup would vanish at reboot."""
    st = os.stat(_nearest_existing(root))
    fstype = next((e.fstype for e in reversed(mounts.mount_table()) if e.device == st.st_dev), None)
    if fstype in VOLATILE_FSTYPES:
        raise UsageError(f"{root} is on {fstype}, which is emptied at every reboot with all its backups; "
                         "put the root on a disk")
