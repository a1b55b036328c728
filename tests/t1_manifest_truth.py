"""The source walk under a user who acts while it runs, and the manifest that records only what was copied."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from squashfu_fs.util import beneath
from squashfu_fs.write import changes
from squashfu_fs.write.excludes import Excludes


class Meddling(Excludes):
    """Excludes nothing; when the walk asks about ``name``, first runs ``act`` (a user acting mid-walk).

    The walk asks right after it stat-ed the entry and before it enters it, so
    the action really happens between the two, on the real filesystem.
    """

    def __init__(self, name: bytes, act: Callable[[], None]) -> None:
        super().__init__([])
        self.name, self.act = name, act

    def excluded(self, rel: bytes, is_dir: bool) -> bool:
        if rel == self.name:
            self.act()
        return False


def source(tmp_path: Path) -> tuple[Path, Path]:
    top, outside = tmp_path / "src", tmp_path / "outside"
    (top / "d" / "sub").mkdir(parents=True)
    (top / "d" / "sub" / "f").write_text("x")
    (top / "e").mkdir()
    (top / "e" / "g").write_text("x")
    outside.mkdir()
    (outside / "precious").write_text("not the source's")
    return top, outside


def test_a_directory_removed_mid_walk_is_a_deletion_not_a_traceback(tmp_path: Path) -> None:
    top, _ = source(tmp_path)
    scan = changes.walk(os.fsencode(top), Meddling(b"d", lambda: shutil.rmtree(top / "d")))
    assert scan.vanished == (b"d",) and scan.unreadable == () and scan.trusted
    assert sorted(scan.entries) == [b".", b"e", b"e/g"]


def test_a_directory_swapped_for_a_symlink_mid_walk_is_not_followed(tmp_path: Path) -> None:
    top, outside = source(tmp_path)

    def swap() -> None:
        os.rename(top / "d", tmp_path / "d.moved")
        (top / "d").symlink_to(outside)

    scan = changes.walk(os.fsencode(top), Meddling(b"d", swap))
    assert b"d/precious" not in scan.entries, "the walk listed a directory outside the source"
    assert scan.entries[b"d"] == changes.UNKNOWN and scan.vanished == (b"d",)


def test_the_manifest_holds_nothing_below_what_the_copy_has_as_a_symlink() -> None:
    before = {b".": 1, b"d": 2, b"d/sub": 3, b"d/sub/f": 4, b"e": 5, b"e/g": 6}
    after = {b".": 1, b"d": 7, b"e": 8, b"e/g": 6}  # d is a symlink now; e gained and lost a file
    merged, moved = changes.merge_walks(before, after)
    assert moved == {b"d", b"d/sub", b"d/sub/f", b"e"}
    kept = changes.vouch(merged, moved, is_directory=lambda rel: rel == b"e")
    assert {p for p, sig in kept.items() if sig != changes.UNKNOWN} == {b".", b"e/g"}
    # e is still a directory in the copy: its unchanged contents stay vouched for
    kept = changes.vouch({b".": 1, b"e": 8, b"e/g": 6}, {b"e"}, is_directory=lambda rel: True)
    assert kept == {b".": 1, b"e": changes.UNKNOWN, b"e/g": 6}


def test_directories_the_last_night_could_not_vouch_for_are_listed_again() -> None:
    old = {b".": changes.UNKNOWN, b"e": changes.UNKNOWN, b"e/g": 6, b"f": changes.UNKNOWN}
    new = {b".": 1, b"e": 8, b"e/g": 6, b"f": 9}
    plan = changes.compare(old, new, frozenset({b".", b"e"}))
    assert plan.changed == [b".", b"e", b"f"] and plan.recheck == [b".", b"e"] and plan.deleted == []


def test_moved_since_looks_again_without_following_symlinks(tmp_path: Path) -> None:
    top, outside = source(tmp_path)
    scan = changes.walk(os.fsencode(top), Excludes([]))
    shutil.rmtree(top / "d")
    (top / "d").symlink_to(outside)
    (top / "e" / "g").write_text("changed")
    with beneath.opened_root(top) as fd:
        moved = changes.moved_since(scan.entries, fd, [b"d", b"d/sub/f", b"e", b"e/g"])
    assert moved == {b"d", b"d/sub/f", b"e/g"}
