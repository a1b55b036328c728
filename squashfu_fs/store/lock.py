"""One writer at a time (docs/crash-safety.md, "The lock"): an ``flock`` on ``ROOT/.lock``.

The holder writes who it is into the lock file, so a second writer can fail
at once with a message naming it. The kernel drops the lock when the holder
dies, even by kill -9, so a stale lock never blocks the next night.

Taking the lock is also where an existing root is made private (0700, files
0600; see :mod:`squashfu_fs.store.privacy`): every command that changes a root
passes here first. The lock file is opened relative to the root's directory
descriptor without following a symlink, so a link planted as ``.lock`` cannot
make root truncate another file.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from squashfu_fs.errors import LockedError, UsageError
from squashfu_fs.store import privacy
from squashfu_fs.util import clock


@contextmanager
def writer_lock(lock_path: Path, command: str) -> Iterator[None]:
    """Hold the root's writer lock for the duration of ``command``; the root is private from then on."""
    root_fd = privacy.open_root(lock_path.parent)
    try:
        with writer_lock_at(root_fd, lock_path, command):
            yield
    finally:
        os.close(root_fd)


@contextmanager
def writer_lock_at(root_fd: int, lock_path: Path, command: str) -> Iterator[None]:
    """:func:`writer_lock` in the root open on ``root_fd`` (a sync's local copy); ``lock_path`` only names it.

    The root must be owned by the user that runs squashfu, as
    :func:`squashfu_fs.store.privacy.open_root` demands of a root opened by path.
    """
    owner = os.fstat(root_fd).st_uid
    if owner != os.geteuid():
        raise UsageError(f"{lock_path.parent} is owned by uid {owner}, not by uid {os.geteuid()} that runs squashfu; "
                         f"its owner could steer what is written there (chown {os.geteuid()} {lock_path.parent})")
    try:
        fd = os.open(lock_path.name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o600, dir_fd=root_fd)
    except OSError as exc:
        raise UsageError(f"{lock_path} cannot be the lock ({exc.strerror}); "
                         "refusing to touch the root") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{lock_path} is not a regular file; refusing to touch the root")
        holder = take(fd, command, before_naming=lambda: privacy.tighten(root_fd))
        if holder is not None:
            raise LockedError(f"{lock_path.parent} is busy: {holder or 'an unknown process'} holds {lock_path}")
        yield
    finally:
        os.close(fd)  # closing drops the flock


def take(fd: int, command: str, *, before_naming: Callable[[], None] | None = None) -> str | None:
    """Take an exclusive ``flock`` on the open lock file ``fd`` and write who holds it.

    Returns None when the lock is ours, or the holder's line (maybe empty)
    when another process holds it; ``before_naming`` runs once the lock is
    ours, before the file names us.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 512, 0).decode(errors="replace").strip()
    if before_naming is not None:
        before_naming()
    os.ftruncate(fd, 0)
    since = clock.now().isoformat(timespec="seconds")
    os.pwrite(fd, f"squashfu {command} (pid {os.getpid()}, since {since})\n".encode(), 0)
    return None
