"""Reading the past through the kernel: rollback mounts, restore and diff against real mounts."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from squashfu_fs.engines import mounts

from .harness import one_line, rolled_back, squashfu

pytestmark = pytest.mark.mounts


# ------------------------------------------------------------- rollback


def test_rollback_is_read_only_and_umount_leaves_nothing(tree: tuple[Path, Path], scratch: Path) -> None:
    src, root = tree
    (src / "docs" / "a.txt").write_text("tuesday\n")
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    mp = scratch / "mp"
    with rolled_back(root, "mon", mp):
        assert (mp / "docs" / "a.txt").read_text() == "alpha\n"
        for attempt in (lambda: (mp / "new").write_text("x"), lambda: (mp / "docs" / "a.txt").unlink(),
                        lambda: os.chmod(mp / "docs", 0o700), lambda: (mp / "d").mkdir()):
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EROFS
        assert len(mounts.mounts_below(root / ".rollbacks")) == 1  # its private seed mount
    assert not mounts.mounts_below(root) and not mounts.is_mounted(mp)
    assert not [p for p in (root / ".rollbacks").iterdir()]


def test_rollback_refusals(tree: tuple[Path, Path], scratch: Path) -> None:
    _, root = tree
    (scratch / "full").mkdir()
    (scratch / "full" / "x").write_text("x")
    assert "valid views: 2026-11-02, mon, latest, seed" in one_line(
        squashfu("-r", root, "rollback", "wed", scratch / "full", expect=2))
    assert "not empty" in one_line(squashfu("-r", root, "rollback", "mon", scratch / "full", expect=2))
    assert "inside the backup root" in one_line(squashfu("-r", root, "rollback", "mon", root / "rw", expect=2))
    assert not mounts.mounts_below(root)


# ------------------------------------------------------------- restore and diff


def test_restore_a_path_never_deletes_without_delete(tree: tuple[Path, Path], scratch: Path) -> None:
    _, root = tree
    target = scratch / "target"
    (target / "docs").mkdir(parents=True)
    (target / "docs" / "mine.txt").write_text("not in the backup\n")
    squashfu("-r", root, "restore", "mon", "docs", "--to", target)
    assert (target / "docs" / "a.txt").read_text() == "alpha\n"
    assert (target / "docs" / "mine.txt").exists()
    squashfu("-r", root, "restore", "latest", "docs/", "--to", target / "docs", "--delete")
    assert sorted(os.listdir(target / "docs")) == ["a.txt", "b.txt"]
    assert not mounts.mounts_below(root)


def test_restore_onto_a_filesystem_without_xattrs_exits_3(tree: tuple[Path, Path], scratch: Path) -> None:
    src, root = tree
    os.setxattr(src / "docs" / "a.txt", b"user.tag", b"1")
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    ram = scratch / "ram"
    ram.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", ram], check=True)
    try:
        proc = squashfu("-r", root, "restore", "latest", "docs", "--to", ram, expect=3)
        assert "some files could not be copied" in one_line(proc)
        assert (ram / "docs" / "a.txt").read_text() == "alpha\n"
    finally:
        mounts.unmount(ram)
    assert not mounts.mounts_below(root)


def test_restore_refusals(tree: tuple[Path, Path], scratch: Path) -> None:
    _, root = tree
    assert "inside the backup root" in one_line(
        squashfu("-r", root, "restore", "mon", "--to", root / "out", expect=2))
    assert "does not exist" in one_line(squashfu("-r", root, "restore", "mon", "nope", "--to", scratch / "t",
                                                 expect=2))
    assert not mounts.mounts_below(root)


def test_diff_lists_what_changed_between_two_days(tree: tuple[Path, Path]) -> None:
    src, root = tree
    (src / "docs" / "a.txt").write_text("tuesday\n")
    (src / "docs" / "b.txt").unlink()
    os.utime(src / "docs", (1_700_000_000, 1_700_000_000))  # a new mtime even within the same second
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    lines = squashfu("-r", root, "diff", "mon", "tue").stdout.splitlines()
    assert lines == ["M docs/", "M docs/a.txt", "- docs/b.txt"], lines  # more in t3_history_queries.py
    assert not mounts.mounts_below(root)


def test_every_writer_says_what_recovery_removed_with_verbose(tree: tuple[Path, Path], scratch: Path) -> None:
    """Debris an interrupted command left is named by whichever command cleans it up, not only backup."""
    _, root = tree
    target = scratch / "target"
    target.mkdir()
    (root / "bins" / ".partial-7").mkdir()
    proc = squashfu("-r", root, "diff", "-v", "mon", "latest")  # from the catalogues: a reader, which leaves it
    assert "recovered" not in proc.stderr and (root / "bins" / ".partial-7").is_dir(), proc.stderr
    shutil.rmtree(root / "catalogs")  # a root of older code: diff sets up a private view, as a writer
    for argv in (("restore", "-v", "mon", "docs", "--to", target), ("diff", "-v", "mon", "latest")):
        (root / "bins" / ".partial-7").mkdir(exist_ok=True)
        proc = squashfu("-r", root, *argv)
        assert "squashfu: recovered: uncommitted bin .partial-7" in proc.stderr, (argv, proc.stderr)
        assert not (root / "bins" / ".partial-7").exists()
    mp = scratch / "mp"
    mp.mkdir()
    (root / "bins" / ".partial-7").mkdir()
    proc = squashfu("-r", root, "rollback", "-v", "mon", mp)
    try:
        assert "squashfu: recovered: uncommitted bin .partial-7" in proc.stderr
    finally:
        squashfu("umount", mp)
    assert not mounts.mounts_below(root)
