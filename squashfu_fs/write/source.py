"""The source as a backup sees it: opened once by fd, walked, and refused when its disk is missing.

Every look at the source after the walk is relative to the fd opened here,
following no symlink (docs/security.md). A source that is suddenly empty or
on another filesystem than at the last backup is refused rather than
committed as "everything deleted" (docs/commands.md "backup"), and
squashfu's own mounts inside the source are left out of it. A remote
source cannot be walked: it is listed over ssh before a backup
(:func:`probe_remote`) and counted by rsync's own stats after it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from squashfu_fs.engines import mounts, rsync
from squashfu_fs.errors import SourceChangedError, SquashfuError
from squashfu_fs.store.history import History
from squashfu_fs.util import beneath
from squashfu_fs.util.say import say
from squashfu_fs.write import changes
from squashfu_fs.write.excludes import Excludes


def own_mounts_below(source: Path) -> list[str]:
    """Exclude patterns for the time-travel views and roll-backs mounted inside ``source``.

    With ``/`` as the source and the history mounted on ``/backups``, rsync
    would otherwise copy every day of the history into tonight's bin.
    """
    top = os.fsencode(os.path.realpath(source)).rstrip(b"/") + b"/"
    patterns = []
    for entry in mounts.mount_table():
        ours = entry.fstype == "fuse.squashfu" or (
            entry.fstype == "overlay" and "/.rollbacks/" in entry.super_options)
        if ours and entry.mount_point.startswith(top):
            rel = os.fsdecode(entry.mount_point[len(top):])
            patterns.append("/" + re.sub(r"([*?\[\\])", r"\\\1", rel) + "/")
    return patterns


@contextmanager
def source_opened(source: str) -> Iterator[int]:
    """The source's top directory as an fd: every later look at the source is relative to it."""
    with contextlib.ExitStack() as stack:
        try:
            fd = stack.enter_context(beneath.opened_root(source, follow=True))
        except OSError as exc:
            raise SquashfuError(f"cannot open the source {source}: {exc.strerror}; nothing was backed up") from None
        yield fd


def walk_source(source_fd: int, excludes: Excludes, log_file: Path, verbose: bool) -> changes.Scan:
    """Walk the source; what vanished or could not be read is named in the log, never raised."""
    walked = changes.walk_fd(source_fd, excludes)
    if walked.vanished or walked.unreadable:
        with open(log_file, "ab") as log:
            log.writelines(b"squashfu: vanished or replaced while the source was walked: " + rel + b"\n"
                           for rel in walked.vanished)
            log.writelines(b"squashfu: cannot read (rsync compares the whole tree tonight): " + rel + b"\n"
                           for rel in walked.unreadable)
    if walked.vanished:
        say(verbose, f"{len(walked.vanished)} path(s) vanished while the source was walked; see {log_file}")
    return walked


def check_source(history: History, source: str, walked: changes.Scan, allow: bool) -> bool:
    """Refuse a source that is empty or on another filesystem than at the last backup.

    That is what a data disk that did not come up looks like: committed, it
    would read as "everything deleted", and retention would later merge that
    into the seed. Returns whether the filesystem changed (then rsync compares
    the whole tree: the manifest's inode numbers belong to the old one).
    """
    last = history.bins[-1] if history.bins else history.seed
    if last is None or last.source_device is None:
        return False  # a history written before squashfu recorded this
    moved = walked.device != last.source_device and not (walked.fsid and walked.fsid == last.source_fsid)
    if allow:
        return moved
    refuse_empty(history, source, walked.count, allow)
    if moved:
        raise SourceChangedError(
            f"the source {source} is on another filesystem (device {os.major(walked.device)}:"
            f"{os.minor(walked.device)}) than at the last backup ({os.major(last.source_device)}:"
            f"{os.minor(last.source_device)}; is its disk mounted?); nothing was backed up; {OVERRIDE}")
    return False


OVERRIDE = "if that is intended, run `squashfu backup --allow-source-change` once"


def refuse_empty(history: History, source: str, count: int, allow: bool) -> None:
    """Refuse a source with no entries when the last backup had some: a disk that did not come up.

    ``count`` is what the source holds below its top: the walk's for a local
    source, the top directory's listing or rsync's "Number of files" for a
    remote one, which squashfu cannot walk.
    """
    last = history.bins[-1] if history.bins else history.seed
    if allow or last is None or count != 0 or not last.source_entries:
        return
    raise SourceChangedError(f"the source {source} is empty, but had {last.source_entries} entries at the last "
                             f"backup (is its disk mounted?); nothing was backed up; {OVERRIDE}")


def probe_remote(history: History | None, source: str, rsh: str, allow: bool) -> None:
    """Before anything is written: is the remote source reachable, a directory, and not suddenly empty?

    One listing of its top directory over ssh; an unreachable host or a
    missing path is one line and exit status 1 (docs/operations.md, "Remote sources").
    """
    entries = rsync.list_top(source, rsh)
    if entries is None:
        raise SquashfuError(f"the source {source} is not a directory; nothing was backed up")
    if history is not None:
        refuse_empty(history, source, entries, allow)
