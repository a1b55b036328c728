"""Crash recovery (docs/crash-safety.md): remove the debris an interrupted command left.

Every writer recovers right after taking the lock
(:func:`squashfu_fs.store.opening.opened_root` does both). It trusts only
``history.json``: mounts on ``ro/`` and ``rw/`` are taken down, and bins,
images and staging areas that history does not name are deleted, except the
bins and seed images a live time-travel daemon still reads (a view the
kernel holds in a day a resquash absorbed): those wait for a later writer.
If history names something that is missing, it stops instead of guessing.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from squashfu_fs.engines import mounts
from squashfu_fs.store import layers, rollbacks
from squashfu_fs.store import registry as readers
from squashfu_fs.store.history import History
from squashfu_fs.store.layout import RootLayout

log = logging.getLogger(__name__)


def recover(layout: RootLayout, history: History) -> list[str]:
    """Bring the root back to exactly its committed state; returns what was removed."""
    _check_committed(layout, history)
    removed: list[str] = []
    for point in (layout.rw, layout.merged, layout.layer_mounts, layout.ro):  # uppermost first
        for mounted in reversed(mounts.mounts_below(point)):
            mounts.unmount(os.fsdecode(mounted))
            removed.append(f"stale mount {os.fsdecode(mounted)}")
    committed = {path.name for b in history.bins for path in layers.bin_files(layout, b)}
    numbers = {b.number for b in history.bins}
    names = [entry.name for entry in os.scandir(layout.bins)] if layout.bins.is_dir() else []
    # Bins a resquash absorbed (numbers history handed out) that a live view may still read.
    absorbed = {int(n) for n in (name.removesuffix(".sfs") for name in names)
                if n.isdigit() and int(n) not in numbers and int(n) < history.next_bin}
    # Bins committed sealed whose directory is still here: a live view may read that directory.
    outlived = {int(n) for n in names if n.isdigit() and int(n) in numbers and n not in committed}
    read_bins, read_seeds = readers.in_use(layout.root, history.generation, absorbed | outlived)
    read_bins |= outlived & rollbacks.bins_read(layout)  # a roll-back made before the seal stacks the directory
    kept = {name for n in read_bins - outlived for name in layers.bin_names(layout, n)}
    for name in names:
        if name in committed or name in kept:
            continue
        if name.isdigit() and int(name) in outlived:
            if int(name) not in read_bins:
                remove(layout.bins / name)
                removed.append(f"bin {name}'s directory, committed as {name}.sfs")
            continue
        if name.isdigit():
            remove_bin(layout, int(name))
        else:
            remove(layout.bins / name)
        removed.append(f"uncommitted bin {name}")
    seed_file = history.seed.file if history.seed else None
    for entry in os.scandir(layout.root):
        name = entry.name
        stale_image = RootLayout.is_seed_name(name.removesuffix(".tmp")) and name not in (seed_file, *read_seeds)
        if stale_image or name in (layout.history.name + ".tmp", layout.manifest.name + ".tmp"):
            remove(Path(entry.path))
            removed.append(f"stale file {name}")
    removed += _stale_catalogs(layout, history)
    for scratch in (layout.work, layout.staging):
        if scratch.exists() and any(scratch.iterdir()):
            remove(scratch)
            removed.append(f"scratch {scratch.name}")
    removed += _stale_rollbacks(layout)
    for path in layout.skeleton():
        path.mkdir(mode=0o700, exist_ok=True)  # the root is private (docs/layout.md)
    for line in removed:
        log.info("recovered: %s", line)
    return removed


def _check_committed(layout: RootLayout, history: History) -> None:
    if history.seed is not None:
        layers.check_present(layout, history.seed)
    for b in history.bins:
        layers.check_present(layout, b)


def _stale_rollbacks(layout: RootLayout) -> list[str]:
    removed = []
    for record in rollbacks.records(layout):
        if not record.is_live():
            rollbacks.drop_record(record)
            removed.append(f"stale roll-back record {record.ident}")
    if layout.rollbacks.is_dir():
        for entry in layout.rollbacks.iterdir():
            if entry.name.startswith("view-") and not mounts.is_mounted(entry):
                shutil.rmtree(entry, ignore_errors=True)
    return removed


def _stale_catalogs(layout: RootLayout, history: History) -> list[str]:
    """Remove every catalogue whose layer history does not name (only queries read them, each an open file)."""
    if not layout.catalogs.is_dir():
        return []
    keep = {layout.bin_catalog(b.number).name for b in history.bins}
    if history.seed is not None:
        keep.add(layout.seed_catalog(history.seed.generation).name)
    removed = []
    for entry in os.scandir(layout.catalogs):
        if entry.name not in keep:
            remove(Path(entry.path))
            removed.append(f"stale catalogue {entry.name}")
    return removed


def remove_bin(layout: RootLayout, number: int) -> None:
    """Delete bin ``number`` in any form (directory, image) and its records; a directory is renamed away first.

    A daemon checks after each lookup in an old view that its bins are still
    in place (ESTALE otherwise); the rename makes the bin vanish whole before
    any entry in it goes, so such a lookup can never fall through to an
    older layer because half the bin was deleted.
    """
    path = layout.bin(number)
    gone = layout.bins / f".gone-{number}"
    remove(gone)  # what a crash left of an earlier try
    try:
        os.rename(path, gone)
    except FileNotFoundError:
        pass
    else:
        remove(gone)
    for record in (layout.sealed_bin(number), layout.opaque_record(number), layout.digest_list(number),
                   layout.bin_catalog(number)):
        record.unlink(missing_ok=True)


def remove(path: Path) -> None:
    """Delete a file or a whole tree (bins hold whiteout devices, which rmtree handles)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
