"""mksquashfs, the compression engine: one function makes every seed image."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from . import faults
from .config import Config
from .errors import ExternalCommandError
from .history import fsync_dir
from .system import last_line, require, run


def mksquashfs_args(source: Path, image: Path, config: Config, *, progress: bool) -> list[str]:
    """Compress ``source`` into ``image`` exactly as it is: owners, xattrs, links, devices."""
    args = [require("mksquashfs"), os.fspath(source), os.fspath(image), "-noappend",
            "-comp", config.compression]
    if config.level is not None:
        args += ["-Xcompression-level", str(config.level)]
    if not progress:
        args += ["-no-progress", "-quiet"]
    return args


def make_image(source: Path, image: Path, config: Config, *, progress: bool = False) -> None:
    """Write ``image`` from ``source`` and make it durable (it is renamed into place later)."""
    args = mksquashfs_args(source, image, config, progress=progress)
    # mksquashfs would create the image 0644; it holds every backed-up file, so it is 0600 from the start.
    os.close(os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                            stdout=None if progress else subprocess.DEVNULL,
                            stderr=subprocess.PIPE if not progress else None)
    faults.checkpoint("mksquashfs-running")
    _, err = proc.communicate()
    if proc.returncode != 0:
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
