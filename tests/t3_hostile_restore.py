"""restore as an attacker or an unlucky administrator would use it: no history deleted, no live file copied.

A restore runs as root. Its target is judged by device and inode (a symlink
or a bind mount does not hide the backup root or the source), and PATH is
resolved inside the day's view following no symlink, so it can never reach
the live system's files.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from squashfu_fs.engines import mounts

from .harness import history, one_line, squashfu

pytestmark = pytest.mark.mounts



@pytest.fixture
def backed_up(scratch: Path) -> Iterator[tuple[Path, Path]]:
    """``parent/root`` backing up ``src`` (which holds ``link -> outside``); one backup made."""
    src, parent, outside = scratch / "src", scratch / "parent", scratch / "outside"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.txt").write_text("alpha\n")
    outside.mkdir()
    (outside / "live-secret").write_text("the live system's file\n")
    (src / "link").symlink_to(outside)  # absolute: in the view it points at the live /outside
    (src / "docs" / "up").symlink_to("..")  # relative: in the view it stays inside the day
    parent.mkdir()
    squashfu("init", parent / "root", "--source", src)
    squashfu("-r", parent / "root", "backup", now="2026-11-02T02:00")
    yield src, parent / "root"


def intact(root: Path) -> None:
    """The root still holds its committed history and every layer it names."""
    h = history(root)
    assert h["seed"] is not None and (root / h["seed"]["file"]).is_file()
    assert not mounts.mounts_below(root)


def test_restore_delete_into_the_parent_of_the_root_is_refused(backed_up: tuple[Path, Path]) -> None:
    _, root = backed_up
    proc = squashfu("-r", root, "restore", "latest", "--to", root.parent, "--delete", expect=2)
    assert "backup root" in one_line(proc)
    intact(root)


def test_restore_refuses_targets_that_are_hold_or_sit_in_the_root_or_the_source(
        backed_up: tuple[Path, Path], scratch: Path) -> None:
    src, root = backed_up
    (scratch / "to-root").symlink_to(root)
    (scratch / "to-parent").symlink_to(root.parent)
    (scratch / "to-src").symlink_to(src)
    cases = {
        scratch / "to-root": "backup root",  # a symlink to the root is the root
        scratch / "to-parent": "backup root",  # ... and one to its parent holds it
        scratch / "to-root" / "new" / "deeper": "backup root",  # missing: its nearest existing ancestor counts
        src: "source",
        src / "docs": "source",
        scratch / "to-src" / "new": "source",
        scratch: "backup root",  # holds both
    }
    before = sorted(os.listdir(src))
    for target, what in cases.items():
        proc = squashfu("-r", root, "restore", "latest", "--to", target, "--delete", expect=2)
        assert what in one_line(proc), (target, proc.stderr)
    assert not (root / "new").exists() and not (src / "new").exists()
    assert sorted(os.listdir(src)) == before and (src / "docs" / "a.txt").read_text() == "alpha\n"
    intact(root)


def test_a_bind_mount_of_the_root_does_not_hide_it(backed_up: tuple[Path, Path], scratch: Path) -> None:
    """Text comparison misses an alias; device and inode do not."""
    _, root = backed_up
    holder = scratch / "holder"
    (holder / "alias").mkdir(parents=True)
    subprocess.run(["mount", "--bind", root, holder / "alias"], check=True)
    try:
        for target in (holder, holder / "alias", holder / "alias" / "bins"):
            proc = squashfu("-r", root, "restore", "latest", "--to", target, "--delete", expect=2)
            assert "backup root" in one_line(proc), (target, proc.stderr)
    finally:
        mounts.unmount(holder / "alias")
    intact(root)


def test_a_path_through_a_symlink_never_copies_the_live_system(backed_up: tuple[Path, Path],
                                                                  scratch: Path) -> None:
    _, root = backed_up
    for path in ("link/", "link/live-secret", "docs/up/link/"):
        target = scratch / "out"
        proc = squashfu("-r", root, "restore", "latest", path, "--to", target, expect=2)
        assert "symlink" in one_line(proc), (path, proc.stderr)
        if target.exists():
            assert not list(target.rglob("live-secret")), f"{path} copied the live /outside"
    intact(root)


def test_a_symlink_named_without_a_slash_is_restored_as_the_link(backed_up: tuple[Path, Path],
                                                                    scratch: Path) -> None:
    src, root = backed_up
    target = scratch / "out"
    squashfu("-r", root, "restore", "latest", "link", "--to", target)
    assert (target / "link").is_symlink() and os.readlink(target / "link") == os.readlink(src / "link")
    assert not list(target.rglob("live-secret"))
    squashfu("-r", root, "restore", "latest", "docs/", "--to", scratch / "docs")
    assert (scratch / "docs" / "a.txt").read_text() == "alpha\n" and (scratch / "docs" / "up").is_symlink()
    intact(root)
