"""SHA-256 digests of images and files, as history.json and ``verify`` spell them (docs/layout.md, "Digests").

A digest is written ``sha256:HEX``. Files are read in large chunks through
``hashlib.file_digest``, which hashes at the speed of OpenSSL, as
``sha256sum`` does.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

ALGORITHM = "sha256"
CHUNK = 1 << 20


def of_bytes(data: bytes) -> str:
    """The digest of ``data``."""
    return f"{ALGORITHM}:{hashlib.sha256(data).hexdigest()}"


def of_fd(fd: int, progress: Callable[[int], None] | None = None) -> str:
    """The digest of what an open file holds from its start, read in 1 MiB chunks; ``progress`` gets byte counts."""
    h = hashlib.sha256()
    offset = 0
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    while True:
        n = os.preadv(fd, [buffer], offset)
        if n == 0:
            break
        h.update(view[:n])
        offset += n
        if progress is not None:
            progress(n)
    return f"{ALGORITHM}:{h.hexdigest()}"


def of_file(path: Path | bytes, *, dir_fd: int | None = None, progress: Callable[[int], None] | None = None) -> str:
    """The digest of a regular file, opened without following a symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return of_fd(fd, progress)
    finally:
        os.close(fd)
