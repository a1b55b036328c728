"""Every overlay the write side mounts inside the root: the seed on ``ro/``, unions on ``rw/`` and ``.merged/``.

A backup writes through a union of the committed layers under a fresh upper
directory; the first backup and a resquash that must re-escape xattrs write
through a union over an empty layer (staging); a resquash reads a read-only
merge of the layers it absorbs. Each is a context manager that always takes
its mounts down (docs/layout.md, "A bin: an overlayfs upper layer").
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from squashfu_fs.engines import mounts, rsync
from squashfu_fs.store import layers, recovery
from squashfu_fs.store.history import Bin, History, Seed
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.util import beneath
from squashfu_fs.util.say import say
from squashfu_fs.write import unionfix


@contextmanager
def seed_mounted(layout: RootLayout, seed: Seed) -> Iterator[Path]:
    """The seed image loop-mounted read-only on ``ro/`` for the length of a block."""
    with mounts.squashfs_mounted(layout.seed(seed.file), layout.ro):
        yield layout.ro


@contextmanager
def layers_mounted(layout: RootLayout, seed: Seed, bins: Sequence[Bin], *,
                   read_only: bool = False) -> Iterator[list[str]]:
    """The seed on ``ro/`` and the sealed ones of ``bins`` (oldest first) on ``.layers/N``, for a block.

    Yields the overlay ``lowerdir`` list, newest layer first.
    """
    with seed_mounted(layout, seed), layers.images_mounted(layout, bins) as images:
        yield layers.lowerdirs(layout, reversed(bins), "ro", read_only=read_only, images=images)


@contextmanager
def overlay_union(layout: RootLayout, lowers: list[str], *, upper: str, work: Path) -> Iterator[Path]:
    """The writable union on ``rw/``, always unmounted and its workdir removed afterwards."""
    work.mkdir(parents=True, exist_ok=True)
    try:
        with mounts.overlay_mounted(layout.rw, lowers, upper=upper,
                                    work=os.path.relpath(work, layout.root), cwd=layout.root):
            yield layout.rw
    finally:
        recovery.remove(work)


@contextmanager
def committed_view(layout: RootLayout, history: History) -> Iterator[Path]:
    """The committed state read-only on ``rw/`` (a dry run compares the source with it)."""
    assert history.seed is not None
    with layers_mounted(layout, history.seed, history.bins, read_only=True) as lowers, \
            mounts.overlay_mounted(layout.rw, lowers, cwd=layout.root):
        yield layout.rw


def stage_tree(layout: RootLayout, source: Path | str, excludes: tuple[str, ...] | list[str], *,
               progress: bool, log: Path | None, rsh: str | None = None,
               selection: tuple[bytes, ...] = ()) -> rsync.RsyncResult:
    """rsync ``source`` into ``.staging`` through an overlay with an empty lower layer.

    Going through overlayfs makes the staging tree a proper upper layer: a
    source's own ``trusted.overlay.*`` xattrs are stored escaped, as in bins.
    With ``rsh``, ``source`` is remote (``[USER@]HOST:PATH``): there is no
    source to read directory times from, so a second pass puts them back.
    With a ``selection`` (several sources) only those subtrees of ``source``
    are copied, each under its own path (``engines/rsync.backup_args``).
    """
    recovery.remove(layout.staging)
    layout.staging.mkdir()
    with overlay_union(layout, [os.path.relpath(layout.empty, layout.root)],
                       upper=os.path.relpath(layout.staging, layout.root), work=layout.work / "staging"):
        args = rsync.backup_args(source, layout.rw, excludes, rsh=rsh, itemize=rsh is not None, selection=selection)
        result = rsync.run(args, log=log, progress=progress, label="backup")
        if rsh is not None:
            return second_pass(args, result, log=log)
        with beneath.opened_root(source, follow=True) as source_fd, beneath.opened_root(layout.rw) as union_fd:
            unionfix.restore_dir_times(source_fd, union_fd, os.fsencode(layout.staging))
        return result


def second_pass(args: Sequence[str | bytes], first: rsync.RsyncResult, *, log: Path | None,
                verbose: bool = False) -> rsync.RsyncResult:
    """rsync a remote source into the same union again: what the local repairs do by reading the source.

    A full compare through the union can split a hard-link group whose
    version lives in a lower layer, and hard links made at the end of a run
    bump their directories' times (write/unionfix.py). A second run sees the
    copied-up name as the group's inode, links the other names to it and sets
    every directory's time again; it transfers no data that the first did
    not (docs/benchmarks.md, "Remote sources"). What it could not read is
    what the layer misses, so its status and complaints are the night's.
    """
    say(verbose, "second rsync pass over the union: hard links, directory times and ACLs as the source has them")
    again = rsync.run(args, log=log, label="backup")
    return dataclasses.replace(first, status=again.status, errors=again.errors,
                               deleted=first.deleted + again.deleted,
                               made_devices=first.made_devices + again.made_devices)


@contextmanager
def merged_tree(layout: RootLayout, seed: Seed, bins: Sequence[Bin], *, restage: bool,
                progress: bool) -> Iterator[Path]:
    """``seed`` and ``bins`` merged read-only on ``.merged/``: the tree a resquash squashes.

    A read-only union shows escaped xattrs unescaped; with ``restage`` the
    merge is copied through a staging upper layer first (as the first seed
    was made), which re-escapes them, and that copy is the tree.
    """
    with layers_mounted(layout, seed, bins, read_only=True) as lowers:
        try:
            with mounts.overlay_mounted(layout.merged, lowers, cwd=layout.root):
                if restage:
                    stage_tree(layout, layout.merged, (), progress=progress, log=None)
                    yield layout.staging
                else:
                    yield layout.merged
        finally:
            recovery.remove(layout.staging)
