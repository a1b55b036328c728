"""Retention: merge the oldest bins into a new seed image (docs/commands.md "resquash").

The new image is written beside the old one, checked against the union it
was made from, and committed in history first; only then are the absorbed
bins and the old image deleted, except those a live time-travel view still
reads (see :mod:`squashfu_fs.store.registry`). A crash at any point leaves either
the old history (the new image is debris) or the new one (the old bins and
image are debris), and recovery removes the debris nobody reads.
"""

from __future__ import annotations

import time
from pathlib import Path

from squashfu_fs.engines.run import require
from squashfu_fs.errors import InUseError, UsageError
from squashfu_fs.store import catalog, layers, recovery
from squashfu_fs.store import registry as readers
from squashfu_fs.store.config import Config
from squashfu_fs.store.history import History
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.store.opening import opened_root
from squashfu_fs.store.rollbacks import records
from squashfu_fs.util.durable import fsync_dir
from squashfu_fs.util.process import require_root
from squashfu_fs.util.say import say
from squashfu_fs.write.layerscan import scan_layer
from squashfu_fs.write.seed import SeedContents, commit_seed
from squashfu_fs.write.union import merged_tree


def plan(history: History, keep: int) -> tuple[int, ...]:
    """The bin numbers a resquash that leaves ``keep`` bins would absorb, oldest first."""
    surplus = len(history.bins) - max(keep, 0)
    return tuple(b.number for b in history.bins[:surplus]) if surplus > 0 else ()


def resquash_now(root: Path, *, progress: bool = False, verbose: bool = False) -> None:
    """``squashfu resquash``: merge down to ``min_bins`` bins now."""
    require_root("resquash")
    require("mksquashfs")
    with opened_root(root, "resquash", write=True, verbose=verbose) as opened:
        layout, config, history = opened.layout, opened.config, opened.history
        if history.seed is None:
            raise UsageError("nothing to resquash: the root has no backup yet")
        if not plan(history, config.min_bins):
            say(True, f"nothing to resquash: {len(history.bins)} bin(s), min_bins is {config.min_bins}")
            return
        resquash(layout, history, config, keep=config.min_bins, progress=progress, verbose=verbose)


def resquash(layout: RootLayout, history: History, config: Config, *, keep: int,
             progress: bool = False, verbose: bool = False) -> History:
    """Merge all but the newest ``keep`` bins into a new seed; the caller holds the lock."""
    absorb = plan(history, keep)
    if not absorb or history.seed is None:
        return history
    old_seed = history.seed
    _refuse_if_in_use(layout, set(absorb))
    start = time.monotonic()
    say(verbose, f"resquashing bins {absorb[0]}..{absorb[-1]} into a new seed")
    absorbed_bins = [history.bin(n) for n in absorb]
    escaped = old_seed.escaped_xattrs or any(b.escaped_xattrs for b in absorbed_bins)
    acl_paths = sorted({p for b in absorbed_bins if not layers.sealed(b)  # a sealed bin holds no ACL
                        for p in scan_layer(layout.bin(b.number), source=None).acl_paths})
    newest = absorbed_bins[-1]
    contents = SeedContents(time=newest.time, rsync_status=old_seed.rsync_status, escaped_xattrs=escaped,
                            source_device=newest.source_device, source_fsid=newest.source_fsid,
                            source_entries=newest.source_entries, absorbed=old_seed.absorbed + absorb,
                            sources=newest.sources)
    merged_catalogs = [layout.bin_catalog(n) for n in reversed(absorb)] + [layout.seed_catalog(old_seed.generation)]
    labels = [catalog.label_of(b) for b in reversed(absorbed_bins)] + [catalog.label_of(old_seed)]
    with catalog.opened(merged_catalogs, labels) as known:
        history = commit_seed(layout, history, config,
                              merged_tree(layout, old_seed, absorbed_bins, restage=escaped, progress=progress),
                              contents=contents, started=start, progress=progress,
                              checkpoint="after-resquash-commit",
                              remaining=tuple(b for b in history.bins if b.number not in absorb),
                              carry=None if known is None else catalog.carry_from(known))
    # A mounted view must never read another day's data: give readers a moment to load the new
    # history, then leave what a live view still reads (a cwd in an absorbed day) for a later
    # writer's recovery to delete once nobody reads it.
    late = readers.wait_for(layout.root, history.generation, unused=absorb)
    kept, held_seeds = readers.in_use(layout.root, history.generation, absorb)
    if late:
        say(verbose, f"time-travel daemon(s) {late} did not catch up; leaving bins {sorted(kept)} "
            "for a later command to delete")
    elif kept:
        say(verbose, f"bins {sorted(kept)} are still read through a mounted view; a later command deletes them")
    if acl_paths:
        # Those entries now read without their ACLs; make the next backup compare them again.
        layout.manifest.unlink(missing_ok=True)
        say(True, f"the new seed cannot store the POSIX ACLs of {len(acl_paths)} entries: the days "
            "in the history show them without ACLs until the next backup stores them again")
    for number in absorb:
        if number not in kept:
            recovery.remove_bin(layout, number)
    layout.seed_catalog(old_seed.generation).unlink(missing_ok=True)  # only queries read it, through an open file
    if old_seed.file not in held_seeds:
        layout.seed(old_seed.file).unlink(missing_ok=True)
    fsync_dir(layout.bins)
    fsync_dir(layout.root)
    return history


def _refuse_if_in_use(layout: RootLayout, absorb: set[int]) -> None:
    for record in records(layout):
        if record.is_live() and absorb.intersection(record.bins):
            raise InUseError(
                f"the roll-back of {record.view} on {record.mountpoint} uses bins this resquash would "
                f"merge; `squashfu umount {record.mountpoint}` first")
