"""The repairs made through the union never act through a symlink the source put there.

The "union" here is a plain directory standing in for ``rw/``: the backup
copied the source's ``d`` into it as a symlink to a directory outside, while
the source and the new bin still name paths below ``d``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from squashfu_fs.util import beneath
from squashfu_fs.write import unionfix


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """source/d/sub/f, bin/d/sub/f, union/d -> outside, outside/sub/f."""
    source, upper, union, outside = (tmp_path / n for n in ("source", "bin", "union", "outside"))
    for directory in (source / "d" / "sub", upper / "d" / "sub", outside / "sub"):
        directory.mkdir(parents=True)
    (source / "d" / "sub" / "f").write_text("source")
    (upper / "d" / "sub" / "f").write_text("bin")
    (outside / "sub" / "f").write_text("outside")
    union.mkdir()
    (union / "d").symlink_to(outside)
    os.utime(source / "d" / "sub", (1_000_000, 1_000_000))
    return source, upper, union, outside


def test_directory_times_are_not_set_through_a_symlink(trees: tuple[Path, Path, Path, Path]) -> None:
    source, upper, union, outside = trees
    before = (outside / "sub").stat().st_mtime_ns
    with beneath.opened_root(source) as s, beneath.opened_root(union) as u:
        unionfix.restore_dir_times(s, u, os.fsencode(upper))
    assert (outside / "sub").stat().st_mtime_ns == before


def test_an_acl_is_not_set_through_a_symlink(trees: tuple[Path, Path, Path, Path]) -> None:
    source, _, union, outside = trees
    subprocess.run(["setfacl", "-m", "u:1234:rw", source / "d" / "sub" / "f"], check=True)
    with beneath.opened_root(source) as s, beneath.opened_root(union) as u:
        failed = unionfix.restore_acls(s, u, {b"d/sub/f"})
    assert failed == {b"d/sub/f"}
    with pytest.raises(OSError):
        os.getxattr(outside / "sub" / "f", "system.posix_acl_access")


def test_a_hard_link_is_not_made_through_a_symlink(tmp_path: Path) -> None:
    source, upper, union, outside = (tmp_path / n for n in ("source", "bin", "union", "outside"))
    for top in (source / "a", source / "b", upper / "a", union / "a", outside):
        top.mkdir(parents=True)
    (source / "a" / "x").write_text("linked")
    os.link(source / "a" / "x", source / "b" / "y")
    (upper / "a" / "x").write_text("linked")  # the copied-up name, split from its group
    (union / "a" / "x").write_text("linked")
    (union / "b").symlink_to(outside)
    (outside / "y").write_text("outside, must stay")
    with beneath.opened_root(source) as s, beneath.opened_root(union) as u:
        assert unionfix.repair(s, u, os.fsencode(upper)) == 0
    assert (outside / "y").read_text() == "outside, must stay" and os.listdir(outside) == ["y"]


def test_a_split_hard_link_is_still_rejoined(tmp_path: Path) -> None:
    source, upper, union = (tmp_path / n for n in ("source", "bin", "union"))
    for top in (source / "a", source / "b", upper / "a", union / "a", union / "b"):
        top.mkdir(parents=True)
    (source / "a" / "x").write_text("linked")
    os.link(source / "a" / "x", source / "b" / "y")
    (upper / "a" / "x").write_text("linked")
    (union / "a" / "x").write_text("linked")
    (union / "b" / "y").write_text("linked")
    with beneath.opened_root(source) as s, beneath.opened_root(union) as u:
        assert unionfix.repair(s, u, os.fsencode(upper)) == 1
    assert os.path.samefile(union / "a" / "x", union / "b" / "y")
    assert sorted(os.listdir(union / "b")) == ["y"]


def test_whiteouts_go_only_where_every_parent_is_a_directory_tonight(tmp_path: Path) -> None:
    """Below a path that is now a file nothing needs hiding; elsewhere the parents are made for the whiteout."""
    from squashfu_fs.write import into_bin

    deleted = [b"a/b/gone", b"top-gone", b"now-a-file/x"]
    dirs = frozenset({b".", b"a", b"a/b"})
    assert into_bin.needing_whiteouts(deleted, dirs) == [b"a/b/gone", b"top-gone"]
    with beneath.opened_root(tmp_path) as fd:
        made = into_bin.place_whiteouts(fd, [b"a/b/gone", b"top-gone"])
    assert made == {b"a", b"a/b"}
    for rel in ("a/b/gone", "top-gone"):
        st = os.lstat(tmp_path / rel)
        assert st.st_mode >> 12 == 0o02 and st.st_rdev == 0, rel  # a 0:0 character device


def test_nothing_is_written_into_the_bin_through_a_symlink_there(tmp_path: Path) -> None:
    """The bin is squashfu's own, but every write into it still resolves beneath its fd."""
    from squashfu_fs.write import into_bin

    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "d").symlink_to(outside)
    with beneath.opened_root(tmp_path / "bin") as fd:
        with pytest.raises(OSError):
            into_bin.place_whiteouts(fd, [b"d/x"])
        assert into_bin.mark_opaque(fd, [b"d"]) == 0
        assert not into_bin.withdraw(fd, b"d/x")
    assert os.listdir(outside) == []


def test_an_rsync_started_without_a_handle_is_found_and_stopped() -> None:
    """A signal landing inside Popen leaves rsync running with no handle: the cleanup finds it as our child."""
    import subprocess
    import time

    from squashfu_fs.engines import rsync
    from squashfu_fs.util import process

    stray = subprocess.Popen(["rsync", "--server", "--sender", "-r", ".", "/"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)  # waits on its stdin forever
    try:
        deadline = time.monotonic() + 10
        while process.command_name(stray.pid) != "rsync":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        rsync._stop_strays()
        assert stray.wait(timeout=5) == -9
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()
