"""The daemon's tree and layer kinds: a bin of a kind this squashfu cannot read is never stacked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from squashfu_fs.errors import CorruptRootError
from squashfu_fs.read.vfs import ROOT_INO
from squashfu_fs.store.history import Bin

from .t2_fuse_ops import World, at, listdir, lookup_path

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts and trusted xattrs need root")


def test_a_history_with_an_unknown_kind_of_bin_is_not_installed(tmp_path: Path) -> None:
    """The tree keeps serving the history it had (docs/crash-safety.md) and takes the next good one."""
    w = World(tmp_path)
    ops, vfs, _ = w.ops()
    served = vfs.history
    names = [name for name, _, _ in listdir(ops, ROOT_INO)]
    (w.add_bin(2) / "night2.txt").write_text("night 2\n")
    good = w.history.with_bin(Bin(2, at(2), 1.0, 0, 0, 0))
    w.history = w.history.with_bin(Bin(2, at(2), 1.0, 0, 0, 0, format="chunked"))
    w.save()
    with pytest.raises(CorruptRootError, match="'chunked'"):
        vfs.refresh()
    assert vfs.history == served, "a history with a bin of an unknown kind was installed"
    assert [name for name, _, _ in listdir(ops, ROOT_INO)] == names
    assert lookup_path(ops, b"2026-11-03/home/alice/a.txt").st_size == len("night 1 a\n")
    w.history = good
    w.save()
    vfs.refresh()  # tried again, and the good history goes in
    assert vfs.history == good
    assert lookup_path(ops, b"2026-11-04/night2.txt").st_size == len("night 2\n")
