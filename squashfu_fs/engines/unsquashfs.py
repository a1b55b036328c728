"""unsquashfs as a reader of images: is an image a readable SquashFS, and can every file in it be read?

``verify`` (docs/commands.md, "verify") asks three questions of an image it
holds open, each answered by one unsquashfs run that reads the image through
``/proc/self/fd/N``, so an image unlinked meanwhile is still the one checked:

- ``superblock``: ``unsquashfs -s`` finds a valid superblock;
- ``metadata``: ``unsquashfs -lln`` lists every directory and inode, so the
  directory and inode tables, the id table and the fragment table are all
  read and decompressed;
- ``data``: ``unsquashfs -pf /dev/null`` writes a pseudo file of the whole
  image, which reads and decompresses every data block and fragment.

unsquashfs exits non-zero on each kind of damage it notices (a bad
superblock, metadata that does not decompress or does not add up, a data
block that does not decompress). It cannot notice a block that still
decompresses, or one stored uncompressed: only the image's digest catches
those.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from typing import IO

from squashfu_fs.engines.run import last_line, require

CHECKS = ("superblock", "metadata", "data")


def check_args(image: str, check: str) -> list[str]:
    """The command line that answers ``check`` (one of :data:`CHECKS`) for ``image``."""
    tool = require("unsquashfs")
    if check == "superblock":
        return [tool, "-s", image]
    if check == "metadata":
        return [tool, "-lln", image]
    if check == "data":
        return [tool, "-no-progress", "-pf", os.devnull, image]
    raise ValueError(f"unknown check {check!r}")


class Check:
    """One unsquashfs run over an open image, started at once; :meth:`result` waits for it."""

    def __init__(self, fd: int, check: str, shown_as: str) -> None:
        self.check = check
        self._path = f"/proc/self/fd/{fd}"
        self._shown_as = shown_as
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the run; never a pipe, a chatty run must not block
        try:
            self._proc = subprocess.Popen(check_args(self._path, check), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=self._err, pass_fds=(fd,))
        except BaseException:
            self._err.close()
            raise

    def result(self) -> str | None:
        """None when unsquashfs found nothing wrong, else its last complaint, naming the image as shown."""
        try:
            status = self._proc.wait()
            self._err.seek(0)
            complaint = last_line(self._err.read())
        finally:
            self._err.close()
        if status == 0:
            return None
        return f"unsquashfs {self.check} check failed (exit {status}): " + complaint.replace(self._path,
                                                                                            self._shown_as)

    def stop(self) -> None:
        """Kill a run that is no longer wanted (the command was interrupted) and reap it."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._err.close()
