"""Read-only kernel roll-back mounts, restore and diff: the past through overlayfs.

A roll-back is the day's layers stacked with no upper layer, so the kernel
itself refuses every write. Each live roll-back is recorded under
``ROOT/.rollbacks/ID/`` (its record and its private seed mount), so that
``umount`` can take both down and resquash can refuse to delete bins in use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from squashfu_fs.engines import mounts, rsync
from squashfu_fs.engines.run import require_root
from squashfu_fs.errors import ExternalCommandError, PartialError, SquashfuError, UsageError
from squashfu_fs.store import config as config_mod
from squashfu_fs.store import history as history_mod
from squashfu_fs.store import recovery
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.store.lock import writer_lock
from squashfu_fs.store.views import ViewSpec, ViewTable
from squashfu_fs.util import beneath, durable
from squashfu_fs.util.process import alive_pid, identity

RECORD = "record.json"


@dataclass(frozen=True)
class RollbackRecord:
    """One live roll-back mount of a backup root.

    It is identified by the devices of its overlay and seed mounts and by the
    exact seed layer name it was mounted with, never by the root's path as a
    later command spells it: a root reached through a symlink, a bind mount
    or a name mountinfo escapes is still the same root.
    """

    ident: str
    mountpoint: str
    view: str
    bins: tuple[int, ...]
    seed_file: str
    directory: Path  # ROOT/.rollbacks/ID
    owner: str = ""  # "PID STARTTIME" of the restore or diff that made a private view; "" for a user's
    seed_layer: str = ""  # the seed mount's path exactly as given in the overlay's lowerdir
    mount_dev: int = 0  # st_dev of the overlay (mountinfo's major:minor); 0 until it is mounted
    seed_dev: int = 0  # st_dev of the private seed mount

    @property
    def seed_mount(self) -> Path:
        return self.directory / "seed"

    def overlay(self) -> mounts.MountEntry | None:
        """The overlay this record made, if still mounted: its device, confirmed by its seed layer."""
        seed = os.fsencode(self.seed_layer or os.fspath(self.seed_mount))
        where = os.fsencode(os.path.realpath(self.mountpoint)) if self.mountpoint else None
        for entry in mounts.mount_table():
            if entry.fstype != "overlay":
                continue
            if self.mount_dev and entry.device != self.mount_dev:
                continue
            if not self.mount_dev and entry.mount_point != where:  # a record written before its mount
                continue
            if seed in mounts.overlay_layers(entry):
                return entry
        return None

    def is_live(self) -> bool:
        """Still mounted, and (for a private view) its owner still running."""
        if self.overlay() is None:
            return False
        return not self.owner or alive_pid(self.owner) is not None

    def seed_mounts(self) -> list[bytes]:
        """Where this record's seed is mounted, under whatever name the root was reached by."""
        if not self.seed_dev:  # recorded before the seed was mounted: only its own directory
            own = os.fsencode(os.path.realpath(self.seed_mount))
            return [own] if mounts.is_mounted(self.seed_mount) else []
        tail = b"/.rollbacks/" + self.ident.encode() + b"/seed"
        return [e.mount_point for e in mounts.mount_table()
                if e.fstype == "squashfs" and e.device == self.seed_dev and e.mount_point.endswith(tail)]

    def save(self) -> None:
        durable.atomic_write(self.directory / RECORD, json.dumps({
            "mountpoint": self.mountpoint, "view": self.view, "bins": list(self.bins),
            "seed_file": self.seed_file, "owner": self.owner, "seed_layer": self.seed_layer,
            "mount_dev": self.mount_dev, "seed_dev": self.seed_dev}).encode())


def records(layout: RootLayout) -> list[RollbackRecord]:
    """Every roll-back recorded in the root, live or stale."""
    out: list[RollbackRecord] = []
    if not layout.rollbacks.is_dir():
        return out
    for entry in sorted(p for p in layout.rollbacks.iterdir() if p.name.isdigit()):
        out.append(read_record(entry))
    return out


def read_record(directory: Path) -> RollbackRecord:
    """The record in ``ROOT/.rollbacks/ID``; an unreadable one is an empty (stale) record."""
    try:
        data = json.loads((directory / RECORD).read_text())
        return RollbackRecord(directory.name, data["mountpoint"], data["view"], tuple(data["bins"]),
                              data["seed_file"], directory, data.get("owner", ""),
                              data.get("seed_layer", ""), int(data.get("mount_dev", 0)),
                              int(data.get("seed_dev", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return RollbackRecord(directory.name, "", "", (), "", directory)


def drop_record(record: RollbackRecord) -> None:
    """Take down a roll-back (its view, if its owner died, and its seed mount) and forget it."""
    if record.owner:
        entry = record.overlay()
        if entry is not None:
            mounts.unmount(os.fsdecode(entry.mount_point))
    for point in record.seed_mounts():
        mounts.unmount(os.fsdecode(point))
    shutil.rmtree(record.directory, ignore_errors=True)


def lowers_for(layout: RootLayout, spec: ViewSpec, seed_dir: str) -> list[str]:
    """A view's overlay lowerdir list, newest first; overlay wants two at least."""
    lowers = [layout.bin_rel(n) for n in spec.bins] + [seed_dir]
    if len(lowers) < 2:
        lowers.append(os.path.relpath(layout.empty, layout.root))
    return lowers


def mount_rollback(root: Path, view: str, mountpoint: Path) -> ViewSpec:
    """Mount VIEW's state read-only at ``mountpoint`` with the kernel's overlayfs."""
    require_root("rollback")
    layout = RootLayout(root)
    config_mod.load(root)
    with writer_lock(layout.lock, "rollback"):
        history = history_mod.load(layout.history)
        recovery.recover(layout, history)
        spec = ViewTable.from_history(history).resolve(view)
        mounts.check_mountpoint(layout.root, mountpoint)
        _mount_view(layout, history, spec, mountpoint)
    return spec


def _mount_view(layout: RootLayout, history: history_mod.History, spec: ViewSpec, target: Path, *,
                private: bool = False) -> None:
    """Record a roll-back, mount its seed privately and stack the view's layers on ``target``."""
    assert history.seed is not None
    layout.rollbacks.mkdir(exist_ok=True)
    ident = _next_ident(layout)
    owner = identity() if private else ""
    directory = layout.rollbacks / ident
    # The seed layer is named absolutely so `umount` can find this record from mountinfo.
    record = RollbackRecord(ident, os.path.realpath(target), spec.name, spec.bins,
                            history.seed.file, directory, owner, os.fspath(directory / "seed"))
    record.seed_mount.mkdir(parents=True)
    record.save()  # before mounting: a crash mid-mount leaves a record recovery can find
    try:
        mounts.mount_squashfs(layout.seed(history.seed.file), record.seed_mount)
        mounts.mount_overlay(target, lowers_for(layout, spec, record.seed_layer), cwd=layout.root,
                             executable=not private)  # a user's roll-back may run programs
        seed_entry, entry = mounts.find_mount(record.seed_mount), mounts.find_mount(target)
        if seed_entry is None or entry is None:
            raise SquashfuError(f"the roll-back on {target} vanished as it was mounted")
        dataclasses.replace(record, mount_dev=entry.device, seed_dev=seed_entry.device).save()
    except BaseException:
        mounts.unmount(target)
        drop_record(record)
        raise


def _next_ident(layout: RootLayout) -> str:
    used = {int(p.name) for p in layout.rollbacks.iterdir() if p.name.isdigit()}
    return str(max(used, default=0) + 1)


def unmount_rollback(mountpoint: Path) -> None:
    """Take down a roll-back and its seed mount; the root is found from mountinfo."""
    entry = mounts.find_mount(mountpoint)
    if entry is None:
        raise SquashfuError(f"{mountpoint} is not mounted")
    record = _record_from(entry)
    if record is None:
        raise SquashfuError(f"{mountpoint} is a {entry.fstype} mount that squashfu did not make")
    mounts.unmount(mountpoint)
    for point in record.seed_mounts():
        mounts.unmount(os.fsdecode(point))
    shutil.rmtree(record.directory, ignore_errors=True)


def _record_from(entry: mounts.MountEntry) -> RollbackRecord | None:
    """The record of the roll-back mounted as ``entry``: named by its seed layer, confirmed by device."""
    if entry.fstype != "overlay":
        return None
    for layer in mounts.overlay_layers(entry):
        path = Path(os.fsdecode(layer))
        if path.is_absolute() and path.name == "seed" and path.parent.parent.name == ".rollbacks":
            record = read_record(path.parent)
            if record.mount_dev in (0, entry.device):  # 0: recorded by an older squashfu
                return record
    return None


@contextmanager
def mounted_view(root: Path, view: str) -> Iterator[tuple[Path, ViewSpec]]:
    """A private read-only roll-back of VIEW (inside the root) for a ``with`` block."""
    layout = RootLayout(root)
    with writer_lock(layout.lock, "restore"):
        layout.rollbacks.mkdir(exist_ok=True)
        target = Path(tempfile.mkdtemp(prefix="view-", dir=layout.rollbacks))
    try:
        with writer_lock(layout.lock, "restore"):
            history = history_mod.load(layout.history)
            spec = ViewTable.from_history(history).resolve(view)
            _mount_view(layout, history, spec, target, private=True)
        try:
            yield target, spec
        finally:
            unmount_rollback(target)
    finally:
        target.rmdir()


def restore(root: Path, view: str, path: str | None, target: Path, *, delete: bool,
            progress: bool) -> None:
    """Copy VIEW (or PATH inside it) to ``target`` with all metadata.

    The target is opened once and judged by device and inode: it may not be,
    hold, or sit inside the backup root or the source (see docs/commands.md).
    PATH is resolved inside the view following no symlink. rsync gets both as
    ``/proc/self/fd/N`` names of the very directories checked, inherited
    through ``pass_fds``, so it cannot resolve either differently.
    """
    require_root("restore")
    config = config_mod.load(root)
    # rsync's convention: "docs" copies the directory itself, "docs/" its contents.
    relative = os.fsencode(path or "").lstrip(b"/")
    if b".." in relative.split(b"/"):
        raise UsageError(f"{path!r} must be a path inside the backup")
    target = Path(os.path.abspath(target))
    guard = _Guard([("the backup root", root), ("the source", Path(config.source))])
    with contextlib.ExitStack() as fds:
        top, missing = _nearest_directory(target)
        fds.callback(os.close, top)
        guard.check(top, target, whole=not missing)
        with mounted_view(root, view) as (mounted, _spec):
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
    current = os.open(".", beneath.PATH_FLAGS, dir_fd=top)
    try:
        for name in missing:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=current)
            below = beneath.open_beneath(current, name)
            os.close(current)
            current = below
    except OSError as exc:
        os.close(current)
        raise UsageError(f"restore target {target}: {exc.strerror}") from None
    return current


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


def diff_views(root: Path, view_a: str, view_b: str) -> None:
    """Print what changed between two days, as rsync's itemized list."""
    require_root("diff")
    layout = RootLayout(root)
    table = ViewTable.from_history(history_mod.load(layout.history))
    table.resolve(view_a)
    table.resolve(view_b)
    with mounted_view(root, view_a) as (a, _), mounted_view(root, view_b) as (b, _):
        args = rsync.backup_args(b, a, (), dry_run=True)
        rsync.run(args, echo_items=True)
