"""A retired view whose bin vanished answers ESTALE; it never reads the layer below instead.

Writers leave the bins a live daemon publishes; this is the guard for a bin
deleted all the same (a writer that cannot see the daemon, a hand-made rm).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pyfuse3
import pytest

from squashfu_fs.store.history import Seed

from .t2_fuse_ops import World, at, lookup_path, run


def test_a_retired_view_whose_bin_vanished_answers_estale(tmp_path: Path) -> None:
    w = World(tmp_path)
    ops, vfs, _ = w.ops()
    alice = lookup_path(ops, b"2026-11-03/home/alice").st_ino  # held, like a shell's cwd in bin 1's day
    w.history = w.history.with_seed(  # bin 1 merged into a new seed: the view retires
        Seed(file="seed.2.sfs", generation=2, time=at(1), created=at(3), absorbed=(1,)),
        remaining=w.history.bins[1:])
    w.save()
    run(ops.tick)
    assert 1 in vfs.usage().bins, "the retired view's bin is not published as in use"
    os.rename(w.layout.bin(1), w.layout.bins / ".gone-1")  # deleted anyway, the way writers delete
    shutil.rmtree(w.layout.bins / ".gone-1")
    with pytest.raises(pyfuse3.FUSEError) as err:
        run(ops.lookup, alice, b"a.txt", None)  # the seed's "seed a" lies below: never that
    assert err.value.errno == errno.ESTALE


def test_only_a_current_view_lets_the_kernel_keep_its_listings(tmp_path: Path) -> None:
    """The root and snapshots/ change with the history and a retired view's days moved: never cached."""
    w = World(tmp_path)
    ops, _, _ = w.ops()
    alice = lookup_path(ops, b"2026-11-03/home/alice").st_ino
    snapshots = lookup_path(ops, b"snapshots").st_ino
    assert ops.cache_listing(alice) and ops.cache_listing(lookup_path(ops, b"2026-11-03").st_ino)
    assert not ops.cache_listing(pyfuse3.ROOT_INODE) and not ops.cache_listing(snapshots)
    w.history = w.history.with_seed(  # bin 1 merged into a new seed: the view retires
        Seed(file="seed.2.sfs", generation=2, time=at(1), created=at(3), absorbed=(1,)),
        remaining=w.history.bins[1:])
    w.save()
    run(ops.tick)
    assert not ops.cache_listing(alice), "a retired view's listing may be cached"
