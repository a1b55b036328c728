"""Read-only kernel roll-back mounts: the past through overlayfs.

A roll-back is the day's layers stacked with no upper layer, so the kernel
itself refuses every write. Each live roll-back is recorded under
``ROOT/.rollbacks/ID/`` (its record and its private seed mount; see
:mod:`squashfu_fs.store.rollbacks`), so that ``umount`` can take both down and
resquash can refuse to delete bins in use. ``restore`` and ``diff`` read
through private views made the same way (:func:`mounted_view`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from squashfu_fs.engines import mounts
from squashfu_fs.errors import SquashfuError
from squashfu_fs.store import layers, rollbacks
from squashfu_fs.store.history import History
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.store.opening import opened_root
from squashfu_fs.store.rollbacks import RollbackRecord
from squashfu_fs.store.views import ViewSpec, ViewTable
from squashfu_fs.util.process import identity, require_root


def mount_rollback(root: Path, view: str, mountpoint: Path, *, verbose: bool = False) -> ViewSpec:
    """Mount VIEW's state read-only at ``mountpoint`` with the kernel's overlayfs."""
    require_root("rollback")
    with opened_root(root, "rollback", write=True, verbose=verbose) as opened:
        spec = ViewTable.from_history(opened.history).resolve(view)
        mounts.check_mountpoint(opened.layout.root, mountpoint)
        _mount_view(opened.layout, opened.history, spec, mountpoint)
    return spec


def _mount_view(layout: RootLayout, history: History, spec: ViewSpec, target: Path, *,
                private: bool = False) -> None:
    """Record a roll-back, mount its seed privately and stack the view's layers on ``target``."""
    assert history.seed is not None
    layout.rollbacks.mkdir(exist_ok=True)
    ident = rollbacks.next_ident(layout)
    owner = identity() if private else ""
    directory = layout.rollbacks / ident
    # The seed layer is named absolutely so `umount` can find this record from mountinfo.
    record = RollbackRecord(ident, os.path.realpath(target), spec.name, spec.bins,
                            history.seed.file, directory, owner, os.fspath(directory / "seed"))
    record.seed_mount.mkdir(parents=True)
    record.save()  # before mounting: a crash mid-mount leaves a record recovery can find
    try:
        mounts.mount_squashfs(layout.seed(history.seed.file), record.seed_mount)
        bins = [history.bin(n) for n in spec.bins]
        images = layers.mount_images(layout, bins, record.layer_mounts)
        lowers = layers.lowerdirs(layout, bins, record.seed_layer, read_only=True, images=images)
        mounts.mount_overlay(target, lowers, cwd=layout.root,
                             executable=not private)  # a user's roll-back may run programs
        seed_entry, entry = mounts.find_mount(record.seed_mount), mounts.find_mount(target)
        if seed_entry is None or entry is None:
            raise SquashfuError(f"the roll-back on {target} vanished as it was mounted")
        dataclasses.replace(record, mount_dev=entry.device, seed_dev=seed_entry.device).save()
    except BaseException:
        mounts.unmount(target)
        rollbacks.drop_record(record)
        raise


def unmount_rollback(mountpoint: Path) -> None:
    """Take down a roll-back and its seed mount; the root is found from mountinfo."""
    entry = mounts.find_mount(mountpoint)
    if entry is None:
        raise SquashfuError(f"{mountpoint} is not mounted")
    record = rollbacks.record_of(entry)
    if record is None:
        raise SquashfuError(f"{mountpoint} is a {entry.fstype} mount that squashfu did not make")
    mounts.unmount(mountpoint)
    rollbacks.drop_record(record)


@dataclasses.dataclass(frozen=True)
class PrivateView:
    """A private roll-back made for one command: where it is mounted, its record, and the history it was made from."""

    target: Path
    spec: ViewSpec
    layout: RootLayout
    history: History
    record: RollbackRecord


@contextmanager
def mounted_view(root: Path, view: str, command: str, *,
                 verbose: bool = False) -> Iterator[tuple[Path, ViewSpec]]:
    """A private read-only roll-back of VIEW (inside the root) for a ``with`` block."""
    with private_view(root, command, lambda table: table.resolve(view), verbose=verbose) as made:
        yield made.target, made.spec


@contextmanager
def private_view(root: Path, command: str, choose: Callable[[ViewTable], ViewSpec], *,
                 verbose: bool = False) -> Iterator[PrivateView]:
    """A private read-only roll-back of the state ``choose`` picks from the history, for a ``with`` block.

    It is set up as a writer (lock, recovery), since it writes a roll-back
    record, and used without the lock: a long restore does not hold off the
    night's backup. The record keeps a resquash from merging the bins it
    stacks, so the layers under ``record`` stay readable until the block ends
    (the history queries read them directly: read/history_layers.py).
    """
    with opened_root(root, command, write=True, verbose=verbose) as opened:
        layout = opened.layout
        layout.rollbacks.mkdir(exist_ok=True)
        target = Path(tempfile.mkdtemp(prefix="view-", dir=layout.rollbacks))
        try:
            spec = choose(ViewTable.from_history(opened.history))
            _mount_view(layout, opened.history, spec, target, private=True)
            entry = mounts.find_mount(target)
            record = None if entry is None else rollbacks.record_of(entry)
            if record is None:
                unmount_rollback(target)
                raise SquashfuError(f"the private view on {target} vanished as it was mounted")
        except BaseException:
            with contextlib.suppress(OSError):
                target.rmdir()
            raise
    try:
        yield PrivateView(target, spec, layout, opened.history, record)
    finally:
        try:
            unmount_rollback(target)
        finally:
            with contextlib.suppress(FileNotFoundError):  # a writer's recovery may have removed it already
                target.rmdir()
