"""One writer at a time (DESIGN §5.4): an ``flock`` on ``ROOT/.lock``.

The holder writes who it is into the lock file, so a second writer can fail
at once with a message naming it. The kernel drops the lock when the holder
dies, even by kill -9, so a stale lock never blocks the next night.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import clock
from .errors import LockedError


@contextmanager
def writer_lock(lock_path: Path, command: str) -> Iterator[None]:
    """Hold the root's writer lock for the duration of ``command``."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "an unknown process"
            raise LockedError(f"{lock_path.parent} is busy: {holder} holds {lock_path}") from None
        os.ftruncate(fd, 0)
        since = clock.now().isoformat(timespec="seconds")
        os.pwrite(fd, f"squashfu {command} (pid {os.getpid()}, since {since})\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the flock
