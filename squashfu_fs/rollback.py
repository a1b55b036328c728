"""Read-only kernel roll-back mounts, restore and diff: the past through overlayfs.

A roll-back is the day's layers stacked with no upper layer, so the kernel
itself refuses every write. Each live roll-back is recorded under
``ROOT/.rollbacks/ID/`` (its record and its private seed mount), so that
``umount`` can take both down and resquash can refuse to delete bins in use.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import config as config_mod
from . import history as history_mod
from . import mounts, recovery, rsync
from .errors import PartialError, SquashfuError, UsageError
from .layout import RootLayout
from .lock import writer_lock
from .system import process_start_time, require_root
from .views import ViewSpec, ViewTable

RECORD = "record.json"


@dataclass(frozen=True)
class RollbackRecord:
    """One live roll-back mount of a backup root."""

    ident: str
    mountpoint: str
    view: str
    bins: tuple[int, ...]
    seed_file: str
    directory: Path  # ROOT/.rollbacks/ID
    owner: str = ""  # "PID STARTTIME" of the restore or diff that made a private view; "" for a user's

    @property
    def seed_mount(self) -> Path:
        return self.directory / "seed"

    def is_live(self) -> bool:
        """Still mounted, and (for a private view) its owner still running."""
        entry = mounts.find_mount(self.mountpoint)
        if entry is None or entry.fstype != "overlay" or \
                os.fsencode(self.seed_mount) not in os.fsencode(entry.super_options):
            return False
        if self.owner:
            pid, started = self.owner.split()
            return process_start_time(int(pid)) == started
        return True


def records(layout: RootLayout) -> list[RollbackRecord]:
    """Every roll-back recorded in the root, live or stale."""
    out: list[RollbackRecord] = []
    if not layout.rollbacks.is_dir():
        return out
    for entry in sorted(p for p in layout.rollbacks.iterdir() if p.name.isdigit()):
        try:
            data = json.loads((entry / RECORD).read_text())
            out.append(RollbackRecord(entry.name, data["mountpoint"], data["view"],
                                      tuple(data["bins"]), data["seed_file"], entry, data.get("owner", "")))
        except (OSError, ValueError, KeyError):
            out.append(RollbackRecord(entry.name, "", "", (), "", entry))
    return out


def drop_record(record: RollbackRecord) -> None:
    """Take down a roll-back (its view, if its owner died, and its seed mount) and forget it."""
    if record.owner and record.mountpoint:
        mounts.unmount(record.mountpoint)
    mounts.unmount(record.seed_mount)
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
    owner = f"{os.getpid()} {process_start_time(os.getpid())}" if private else ""
    record = RollbackRecord(ident, os.path.realpath(target), spec.name, spec.bins,
                            history.seed.file, layout.rollbacks / ident, owner)
    record.seed_mount.mkdir(parents=True)
    (record.directory / RECORD).write_text(json.dumps({
        "mountpoint": record.mountpoint, "view": spec.name, "bins": list(spec.bins),
        "seed_file": record.seed_file, "owner": owner}))
    try:
        mounts.mount_squashfs(layout.seed(history.seed.file), record.seed_mount)
        # The seed layer is named absolutely so `umount` can find this record from mountinfo.
        mounts.mount_overlay(target, lowers_for(layout, spec, os.fspath(record.seed_mount)),
                             cwd=layout.root, executable=not private)  # a user's roll-back may run programs
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
    record_dir = _record_dir_from(entry)
    if record_dir is None:
        raise SquashfuError(f"{mountpoint} is a {entry.fstype} mount that squashfu did not make")
    mounts.unmount(mountpoint)
    mounts.unmount(record_dir / "seed")
    shutil.rmtree(record_dir, ignore_errors=True)


def _record_dir_from(entry: mounts.MountEntry) -> Path | None:
    if entry.fstype != "overlay":
        return None
    for option in entry.super_options.split(","):
        if option.startswith("lowerdir="):
            for layer in option[len("lowerdir="):].split(":"):
                path = Path(layer)
                if path.is_absolute() and path.name == "seed" and path.parent.parent.name == ".rollbacks":
                    return path.parent
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
    """Copy VIEW (or PATH inside it) to ``target`` with all metadata."""
    require_root("restore")
    config_mod.load(root)
    real_target = os.path.realpath(target)
    real_root = os.path.realpath(root)
    if real_target == real_root or real_target.startswith(real_root + os.sep):
        raise UsageError(f"{target} is inside the backup root {root}; restore somewhere else")
    with mounted_view(root, view) as (mounted, _spec):
        # rsync's convention: "docs" copies the directory itself, "docs/" its contents.
        relative = os.fsencode(path or "").lstrip(b"/")
        if b".." in relative.split(b"/"):
            raise UsageError(f"{path!r} must be a path inside the backup")
        source = os.path.join(os.fsencode(mounted), relative) if relative else os.fsencode(mounted) + b"/"
        if not os.path.lexists(source.rstrip(b"/")):
            raise UsageError(f"{path!r} does not exist in {view}")
        target.mkdir(parents=True, exist_ok=True)
        result = rsync.run(rsync.copy_args(source, target, delete=delete),
                           progress=progress, label="restore")
        if result.status != rsync.OK:
            detail = result.errors[0] if result.errors else f"rsync exit {result.status}"
            raise PartialError(f"restore finished, but some files could not be copied: {detail}")


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
