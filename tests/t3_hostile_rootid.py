"""A backup root is one directory however it is named: symlink, bind mount, or a name mountinfo escapes.

A roll-back made through one name must hold off a resquash run through
another, and a time-travel daemon started through one name must be waited
for by a resquash run through another; otherwise bins in use are deleted.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from squashfu_fs.engines import mounts
from squashfu_fs.read.mountd import daemon_pid
from squashfu_fs.store import registry as readers

from .harness import committed_bins, fuse_mounted, history, one_line, rolled_back, squashfu

pytestmark = pytest.mark.mounts



def four_nights(src: Path, root: Path) -> None:
    """A root with a seed and three bins, and min_bins 1: a resquash would merge bins 1 and 2."""
    (src / "docs").mkdir(parents=True)
    squashfu("init", root, "--source", src, "--min-bins", "1")
    for day in (2, 3, 4, 5):
        (src / "docs" / "a.txt").write_text(f"day {day}\n")
        os.utime(src / "docs" / "a.txt", (day * 86400, day * 86400))
        squashfu("-r", root, "backup", now=f"2026-11-0{day}T02:00")
    assert len(history(root)["bins"]) == 3


def refused_and_intact(root: Path) -> None:
    """A resquash by the root's real name is refused while the roll-back of tue is up; nothing is deleted."""
    proc = squashfu("-r", root, "resquash", expect=1)
    assert "uses bins" in one_line(proc)
    assert [b["number"] for b in history(root)["bins"]] == [1, 2, 3]
    assert committed_bins(root) == [1, 2, 3]


@pytest.fixture
def nights(scratch: Path) -> Iterator[tuple[Path, Path]]:
    src, root = scratch / "src", scratch / "root"
    four_nights(src, root)
    yield src, root


def test_a_rollback_through_a_symlink_holds_off_a_resquash_by_the_real_path(nights: tuple[Path, Path],
                                                                           scratch: Path) -> None:
    _, root = nights
    (scratch / "backup").symlink_to(root)
    with rolled_back(scratch / "backup", "tue", scratch / "mp") as mp:
        refused_and_intact(root)
        assert (mp / "docs" / "a.txt").read_text() == "day 3\n"
    assert not mounts.mounts_below(root)
    squashfu("-r", root, "resquash")
    assert [b["number"] for b in history(root)["bins"]] == [3]


def test_a_rollback_through_a_bind_mount_holds_off_a_resquash_by_the_real_path(nights: tuple[Path, Path],
                                                                              scratch: Path) -> None:
    _, root = nights
    alias = scratch / "alias"
    alias.mkdir()
    subprocess.run(["mount", "--bind", root, alias], check=True)
    try:
        with rolled_back(alias, "tue", scratch / "mp") as mp:
            refused_and_intact(root)
            assert (mp / "docs" / "a.txt").read_text() == "day 3\n"
        assert not [p for p in mounts.mounts_below(root) if b"/.rollbacks/" in p]
        assert not [p for p in mounts.mounts_below(alias) if b"/.rollbacks/" in p]
    finally:
        for point in mounts.mounts_below(alias):
            mounts.unmount(os.fsdecode(point))
    squashfu("-r", root, "resquash")
    assert [b["number"] for b in history(root)["bins"]] == [3]


@pytest.mark.parametrize("name", ["back up", "back\\slash", "new\nline", "co:lon,comma"])
def test_a_root_whose_name_mountinfo_escapes(scratch: Path, name: str) -> None:
    """backup, rollback, resquash's refusal and umount all work for a root named with a space etc."""
    src, root = scratch / "src", scratch / name / "root"
    four_nights(src, root)
    with rolled_back(root, "tue", scratch / "mp") as mp:
        refused_and_intact(root)
        assert (mp / "docs" / "a.txt").read_text() == "day 3\n"
    assert not mounts.mounts_below(scratch / name), "umount left the roll-back's seed mount behind"
    assert not os.listdir(root / ".rollbacks")
    squashfu("-r", root, "resquash")
    assert [b["number"] for b in history(root)["bins"]] == [3]


def test_a_daemon_started_through_a_symlink_is_waited_for(nights: tuple[Path, Path], scratch: Path) -> None:
    """``lagging`` names a daemon of the root whatever name either side used."""
    _, root = nights
    (scratch / "backup").symlink_to(root)
    with fuse_mounted(scratch / "backup", scratch / "view") as mp:
        pid = daemon_pid(mp)
        assert (mp / "latest" / "docs" / "a.txt").read_text() == "day 5\n"  # it has loaded the history
        generation = history(root)["generation"]
        assert readers.lagging(root, generation) == []
        assert readers.lagging(root, generation + 1) == [pid]
        assert readers.lagging(scratch / "backup", generation + 1) == [pid]
        assert readers.lagging(scratch / "src", generation + 1) == []
