"""``restore``: copying a day through a private read-only roll-back.

It reads the day through a view :func:`squashfu_fs.read.rollback.mounted_view`
mounts inside the root for the length of the command, and hands it to rsync
(docs/commands.md, "restore"). ``diff`` answers from the layers instead
(read/layerdiff.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from squashfu_fs.engines import mounts, rsync
from squashfu_fs.errors import ExternalCommandError, PartialError, UsageError
from squashfu_fs.read.rollback import mounted_view
from squashfu_fs.store.opening import opened_root
from squashfu_fs.util import beneath
from squashfu_fs.util.process import require_root


def restore(root: Path, view: str, path: str | None, target: Path, *, delete: bool,
            progress: bool, verbose: bool = False) -> None:
    """Copy VIEW (or PATH inside it) to ``target`` with all metadata.

    The target is opened once and judged by device and inode: it may not be,
    hold, or sit inside the backup root or the source (see docs/commands.md).
    PATH is resolved inside the view following no symlink. rsync gets both as
    ``/proc/self/fd/N`` names of the very directories checked, inherited
    through ``pass_fds``, so it cannot resolve either differently.
    """
    require_root("restore")
    with opened_root(root, "restore", write=False) as opened:
        config = opened.config
    # rsync's convention: "docs" copies the directory itself, "docs/" its contents.
    relative = os.fsencode(path or "").lstrip(b"/")
    if b".." in relative.split(b"/"):
        raise UsageError(f"{path!r} must be a path inside the backup")
    target = Path(os.path.abspath(target))
    # a remote source is another machine's: nothing here to protect from the restore
    local = [] if config.origin.remote else [("the source", Path(p)) for p in config.source_paths]
    guard = _Guard([("the backup root", root), *local])
    with contextlib.ExitStack() as fds:
        top, missing = _nearest_directory(target)
        fds.callback(os.close, top)
        guard.check(top, target, whole=not missing)
        with mounted_view(root, view, "restore", verbose=verbose) as (mounted, _spec):
            view_fd = os.open(mounted, beneath.DIR_FLAGS | os.O_NOFOLLOW)
            fds.callback(os.close, view_fd)
            source, source_fd, shown = _resolve_in_view(view_fd, relative, path, view)
            if source_fd != view_fd:
                fds.callback(os.close, source_fd)
            target_fd = _make_directories(top, missing, target)
            fds.callback(os.close, target_fd)
            guard.check(target_fd, target, whole=True)
            names = {beneath.fd_path(target_fd): os.fspath(target), beneath.fd_path(source_fd): shown}
            try:
                result = rsync.run(rsync.copy_args(source, os.fsencode(beneath.fd_path(target_fd)) + b"/",
                                                   delete=delete),
                                   progress=progress, label="restore", pass_fds=(source_fd, target_fd))
            except ExternalCommandError as exc:
                raise ExternalCommandError(_named(str(exc), names), exc.returncode) from None
        if result.status != rsync.OK:
            detail = _named(result.errors[0], names) if result.errors else f"rsync exit {result.status}"
            raise PartialError(f"restore finished, but some files could not be copied: {detail}")


def _named(message: str, names: dict[str, str]) -> str:
    """rsync's message with our ``/proc/self/fd/N`` names put back as the user knows them."""
    for fd_name, shown in sorted(names.items(), key=lambda item: -len(item[0])):  # fd 50 before fd 5
        message = message.replace(fd_name, shown)
    return message


class _Guard:
    """The directories a restore must not touch, by device and inode.

    A target is refused if it is one of them, sits inside one (the protected
    directory is among the target's ancestors), or holds one (the target is
    among the protected directory's ancestors). Both climbs use ``..`` from a file descriptor and
    also start from every bind-mount alias, so neither a symlink nor a bind
    mount nor a path spelled differently hides the relation.
    """

    def __init__(self, protected: list[tuple[str, Path]]) -> None:
        self.protected: list[tuple[str, Path, tuple[int, int], set[tuple[int, int]]]] = []
        for what, path in protected:
            try:
                fd = os.open(path, beneath.PATH_FLAGS)
            except OSError:
                continue  # a source that is not there now cannot be overwritten
            try:
                st = os.fstat(fd)
                self.protected.append((what, path, (st.st_dev, st.st_ino), mounts.above(fd)))
            finally:
                os.close(fd)

    def check(self, fd: int, target: Path, *, whole: bool) -> None:
        """Refuse ``target`` (open on ``fd``); ``whole`` is False while part of it does not exist yet."""
        st = os.fstat(fd)
        here = (st.st_dev, st.st_ino)
        above = mounts.above(fd)
        for what, path, ident, holders in self.protected:
            if ident == here and whole:
                relation = "is"
            elif ident in above:  # a missing target below the protected directory itself is inside it too
                relation = "is inside"
            elif whole and here in holders:
                relation = "holds"
            else:
                continue
            raise UsageError(f"restore target {target} {relation} {what} {path}; restore somewhere else")


def _nearest_directory(target: Path) -> tuple[int, list[bytes]]:
    """The nearest existing directory at or above ``target``, opened, and the names missing below it.

    Symlinks in ``target`` are followed, as the administrator named it; what
    they lead to is judged by the guard.
    """
    path, missing = os.fsencode(target), list[bytes]()
    try:
        while True:
            try:
                return os.open(path, beneath.PATH_FLAGS), missing
            except FileNotFoundError:
                parent, name = os.path.split(path)
                if not name:
                    raise
                missing.insert(0, name)
                path = parent
    except OSError as exc:
        raise UsageError(f"restore target {target}: {exc.strerror}") from None


def _make_directories(top: int, missing: list[bytes], target: Path) -> int:
    """Create the missing names below ``top`` (0700, following no symlink); the target's fd."""
    too_long = [n for n in missing if len(n) > os.fpathconf(top, "PC_NAME_MAX")]
    if too_long:  # say so before creating the names in front of it
        raise UsageError(f"restore target {target}: {os.strerror(errno.ENAMETOOLONG)}")
    try:
        return beneath.make_below(top, missing)
    except OSError as exc:
        raise UsageError(f"restore target {target}: {exc.strerror}") from None


def _resolve_in_view(view_fd: int, relative: bytes, path: str | None, view: str) -> tuple[bytes, int, str]:
    """PATH inside the view, following no symlink: (rsync's source argument, the fd it names, a name to show).

    "docs/" (or no PATH) names a directory's contents; "docs" the entry
    itself, which may be a symlink: rsync then copies the link, never what it
    points to.
    """
    parts = beneath.components(relative)
    if not parts:
        return os.fsencode(beneath.fd_path(view_fd)) + b"/", view_fd, view
    try:
        if relative.endswith(b"/"):
            fd = beneath.open_beneath(view_fd, relative)
            return os.fsencode(beneath.fd_path(fd)) + b"/", fd, f"{view}/{os.fsdecode(relative)}"
        parent, name = beneath.parent_and_name(relative)
        fd = beneath.open_beneath(view_fd, parent)
        try:
            os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            os.close(fd)
            raise
        return os.fsencode(beneath.fd_path(fd)) + b"/" + name, fd, f"{view}/{os.fsdecode(parent)}"
    except OSError as exc:
        raise UsageError(_why_not(view_fd, parts, path, view, exc)) from None


def _why_not(view_fd: int, parts: list[bytes], path: str | None, view: str, exc: OSError) -> str:
    """Say which name of PATH stopped the resolution: missing, a symlink, or not a directory."""
    for depth in range(1, len(parts) + 1):
        prefix = b"/".join(parts[:depth])
        shown = os.fsdecode(prefix)
        try:
            st = beneath.lstat_beneath(view_fd, prefix)
        except FileNotFoundError:
            return f"{path!r} does not exist in {view}"
        except OSError:
            break
        if stat.S_ISLNK(st.st_mode):
            with beneath.parent_of(view_fd, prefix) as (pfd, name):
                points_to = os.fsdecode(os.readlink(name, dir_fd=pfd))
            return (f"{path!r}: {shown} is a symlink in {view} (to {points_to}), which restore never follows; "
                    f"restore {shown!r} without a trailing slash to get the link itself")
        if not stat.S_ISDIR(st.st_mode) and depth < len(parts):
            return f"{path!r}: {shown} is not a directory in {view}"
    return f"{path!r} in {view}: {exc.strerror}"
