"""The source as a backup sees it: opened once by fd, walked, and refused when its disk is missing.

Every look at the source after the walk is relative to the fd opened here,
following no symlink (docs/security.md). A source that is suddenly empty or
on another filesystem than at the last backup is refused rather than
committed as "everything deleted" (docs/commands.md "backup"), and
squashfu's own mounts inside the source are left out of it. A remote
source cannot be walked: it is listed over ssh before a backup
(:func:`probe_remote`) and counted by rsync's own stats after it.

A root with several sources opens "/" and walks only the sources and the
directories above them; each source is checked on its own, so one disk that
did not come up is refused like a single source's (docs/operations.md,
"Several sources").
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import re
import stat
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from squashfu_fs.engines import mounts, rsync
from squashfu_fs.errors import SourceChangedError, SquashfuError, UsageError
from squashfu_fs.store.config import Config
from squashfu_fs.store.history import History, SourceState
from squashfu_fs.util import beneath
from squashfu_fs.util.say import say
from squashfu_fs.write import changes
from squashfu_fs.write.excludes import Excludes


def own_mounts_below(source: Path, selection: tuple[bytes, ...] = ()) -> list[str]:
    """Exclude patterns for the time-travel views and roll-backs mounted inside ``source``.

    With ``/`` as the source and the history mounted on ``/backups``, rsync
    would otherwise copy every day of the history into tonight's bin. With a
    ``selection`` (several sources below ``source``) only mounts inside one
    of them matter; the patterns are anchored at ``source`` all the same.
    """
    top = os.fsencode(os.path.realpath(source)).rstrip(b"/") + b"/"
    inside = [top + rel + b"/" for rel in selection] or [top]
    patterns = []
    for entry in mounts.mount_table():
        ours = entry.fstype == "fuse.squashfu" or (
            entry.fstype == "overlay" and "/.rollbacks/" in entry.super_options)
        if ours and entry.mount_point.startswith(tuple(inside)):
            rel = os.fsdecode(entry.mount_point[len(top):])
            patterns.append("/" + re.sub(r"([*?\[\\])", r"\\\1", rel) + "/")
    return patterns


def source_excludes(config: Config) -> Excludes:
    """The config's exclude patterns, and with several sources the subtrees to walk."""
    return Excludes(config.excludes, config.selection)


def refuse_missing_sources(config: Config, then: str) -> None:
    """A source that is not a directory now is refused with one line ending in ``then`` (``init``, a dry run).

    Several sources are each looked up from "/" without following a symlink,
    as the walk and rsync ``--relative`` will reach them: one reached through
    a symlink would be stored as that symlink. A backup leaves such a source
    out instead (:func:`unavailable_sources`).
    """
    if not config.several:
        if not Path(config.source).is_dir():
            raise UsageError(f"source {config.source} is missing or not a directory; {then}")
        return
    refuse_bad_excludes(config, then)
    for path, why in unavailable_sources(config).items():
        raise UsageError(f"source {path} {why}; {then}")


def refuse_bad_excludes(config: Config, then: str) -> None:
    """With several sources, an exclude pattern that leaves out a source, or that squashfu cannot read.

    One squashfu cannot read could leave out a source (or a directory above
    one) without squashfu seeing it (docs/operations.md, "Several sources").
    """
    for path in config.sources:
        parts = _rel(path).split(b"/")
        for pattern in config.excludes:
            if not Excludes((pattern,)).understood:
                raise UsageError(f"the exclude pattern {pattern!r} uses rsync syntax squashfu does not read "
                                 f"(a rule prefix, a backslash, a character class), so with several sources it "
                                 f"could leave out a source unseen; write it with *, ?, [...] and / only; {then}")
            if any(Excludes((pattern,)).excluded(b"/".join(parts[:i]), True) for i in range(1, len(parts) + 1)):
                raise UsageError(f"the exclude pattern {pattern!r} leaves out the source {path} (or a directory "
                                 f"above it); remove the pattern or the source; {then}")


def unavailable_sources(config: Config) -> dict[str, str]:
    """Each of several sources that is not a directory reached from "/" without a symlink now, and why.

    A backup leaves those out and keeps their last state, so a user who owns
    ``/srv`` cannot stop the backup of ``/etc`` by replacing ``/srv/www``
    (docs/operations.md, "Several sources").
    """
    why: dict[str, str] = {}
    with beneath.opened_root(config.source) as top:
        for path in config.sources:
            try:
                os.close(beneath.open_beneath(top, _rel(path)))
            except OSError as exc:
                why[path] = _UNAVAILABLE.get(exc.errno or 0, f"cannot be opened ({exc.strerror})")
    return why


_UNAVAILABLE = {
    errno.ENOENT: "is missing",
    errno.ELOOP: "is reached through a symlink (or is one)",
    errno.ENOTDIR: "is not a directory (or a directory above it is not)",
}


def _rel(path: str) -> bytes:
    """One of several sources relative to the top "/", as rsync ``-R`` names it."""
    return os.fsencode(path).lstrip(b"/")


def source_states(top: int, config: Config, walked: changes.Scan) -> tuple[SourceState, ...] | None:
    """Each of several sources backed up tonight as the walk saw it (None for one source: ``walked`` says it all)."""
    if not config.several:
        return None
    keys = sorted(walked.entries)
    states = []
    for path, rel in config.selected:
        try:
            fd = beneath.open_beneath(top, rel)
        except OSError as exc:  # gone since it was checked: refused as a missing source
            raise UsageError(f"source {path} is missing, not a directory or reached through a symlink "
                             f"({exc.strerror}); nothing was backed up") from None
        try:
            device, fsid = os.fstat(fd).st_dev, os.fstatvfs(fd).f_fsid
        finally:
            os.close(fd)
        below = bisect.bisect_left(keys, rel + b"0") - bisect.bisect_left(keys, rel + b"/")  # b"0" follows b"/"
        states.append(SourceState(path=path, device=device, fsid=fsid, entries=below))
    return tuple(states)


def withdraw_replaced_sources(layer: Path, config: Config, *, new: Collection[str]) -> dict[str, str]:
    """Each of several sources that rsync did not leave a directory in ``layer``: taken out, and described.

    The walk saw every source as a directory, but one swapped for a symlink (or
    a file) before rsync reached it is copied as that, and would be committed
    as that. Its entry (or the one of the directory above it that changed) is
    removed from ``layer``, a bin or the staging tree, not mounted now: the
    union then shows the source as the last night stored it. Below a source
    in ``new`` (every one in the seed, one added tonight in a bin) no
    committed layer lies: there it is simply missing, and a source rsync did
    not copy at all is named too (docs/operations.md, "Several sources").
    Returns why, by source path.
    """
    if not config.several:
        return {}
    why: dict[str, str] = {}
    removed: list[bytes] = []
    with beneath.opened_root(layer) as fd:
        for path, rel in config.selected:
            parts = beneath.components(rel)
            for depth in range(1, len(parts) + 1):
                here = b"/".join(parts[:depth])
                if here in removed:
                    why[path] = "a directory above it was not a directory when rsync reached it"
                    break
                try:
                    st = beneath.lstat_beneath(fd, here)
                except FileNotFoundError:
                    if path in new:
                        why[path] = "was not copied by rsync"
                    break  # not in tonight's bin: the layers below still hold it
                if stat.S_ISDIR(st.st_mode):
                    continue
                beneath.remove_beneath(fd, here)
                removed.append(here)
                what = ("a symlink" if stat.S_ISLNK(st.st_mode) else "a file" if stat.S_ISREG(st.st_mode)
                        else "gone" if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 else "not a directory")
                above = "" if here == rel else f"the directory {os.fsdecode(b'/' + here)} above it "
                why[path] = f"{above}was {what} when rsync reached it"
                break
    return why


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


def check_source(history: History, source: str, walked: changes.Scan, allow: bool,
                 states: tuple[SourceState, ...] | None = None) -> tuple[bool, dict[str, str]]:
    """Refuse a source that is empty or on another filesystem than at the last backup.

    That is what a data disk that did not come up looks like: committed, it
    would read as "everything deleted", and retention would later merge that
    into the seed. Returns whether the filesystem changed (then rsync compares
    the whole tree: the manifest's inode numbers belong to the old one), and,
    with several sources, why each such source is to be left out tonight
    rather than refusing them all (docs/operations.md, "Several sources").
    """
    last = history.bins[-1] if history.bins else history.seed
    if last is None:
        return False, {}
    _refuse_another_layout(last.sources, states, last.source_device is not None)
    if states is not None:  # several sources: each one on its own, "/" above them says nothing
        before = {state.path: state for state in last.sources or ()}
        moved_any, problems = False, {}
        for state in states:
            if state.path in before and state != before[state.path]:
                old = before[state.path]
                moved, problem = _problem(state.device, state.fsid, state.entries,
                                          old.device, old.fsid, old.entries, allow)
                moved_any |= moved
                if problem:
                    problems[state.path] = problem
        return moved_any, problems
    if last.source_device is None:
        return False, {}  # a history written before squashfu recorded this
    moved, problem = _problem(walked.device, walked.fsid, walked.count, last.source_device, last.source_fsid,
                              last.source_entries, allow)
    if problem:
        raise SourceChangedError(f"the source {source} {problem}; nothing was backed up; {OVERRIDE}")
    return moved, {}


def _refuse_another_layout(before: tuple[SourceState, ...] | None, now: tuple[SourceState, ...] | None,
                           known: bool) -> None:
    """A config edited from one source to several (or back), or with a source taken out, is refused.

    Each would leave the old layout's paths in every later day: rsync
    ``--relative`` deletes only inside the sources it is given. Adding a
    source is fine: it appears from tonight. See docs/operations.md, "Several sources".
    """
    fresh = "start a new root for the new list of sources (docs/operations.md, \"Several sources\")"
    if now is None and before is not None:
        raise UsageError(f"this root was made for several sources, and the config now names one; {fresh}")
    if now is not None and before is None and known:
        raise UsageError(f"this root was made for one source, and the config now names several; {fresh}")
    removed = sorted({state.path for state in before or ()} - {state.path for state in now or ()})
    if removed:
        raise UsageError(f"source {removed[0]} was taken out of the config; its last state would stay in "
                         f"every later day; {fresh}")


def _problem(device: int, fsid: int, count: int, last_device: int, last_fsid: int | None,
             last_entries: int | None, allow: bool) -> tuple[bool, str | None]:
    """One source against the last backup: whether it moved, and why it is refused (None unless empty or moved).

    ``allow`` (``--allow-source-change``) refuses nothing.
    """
    moved = device != last_device and not (fsid and fsid == last_fsid)
    if allow:
        return moved, None
    if count == 0 and (last_entries or 0) > 0:
        return moved, f"is empty, but had {last_entries} entries at the last backup (is its disk mounted?)"
    if moved:
        return moved, (f"is on another filesystem (device {os.major(device)}:{os.minor(device)}) than at the last "
                       f"backup ({os.major(last_device)}:{os.minor(last_device)}; is its disk mounted?)")
    return False, None


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
