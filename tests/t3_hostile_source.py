"""A source that fights back: swapped symlinks, a disk that did not come up, unreadable mounts, quick-check misses.

Each test reproduces a real night with the real CLI, real rsync and real
mounts; see docs/commands.md (backup) for the behaviour they pin down.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from squashfu_fs.engines import mounts

from .harness import NOBODY, bin_entries, history, one_line, reachable_by_others, rolled_back, run_as_nobody, squashfu
from .t3_fuse_mount import fuse_for_users  # noqa: F401  (a fixture)

pytestmark = pytest.mark.mounts



def debris(root: Path) -> list[str]:
    """What a failed or refused night must not leave: uncommitted bins, staging, scratch."""
    left = [f"bins/{e.name}" for e in os.scandir(root / "bins") if e.name.startswith(".partial")]
    left += [n for n in (".staging",) if (root / n).exists()]
    return left


# ------------------------------------------------------------- 1. a directory swapped for a symlink


def swapping_rsync(scratch: Path, victim: Path, outside: Path) -> tuple[dict[str, str], Path]:
    """An ``rsync`` first on PATH that, once armed, swaps ``victim`` for a symlink to ``outside``.

    That is what any user (or program) who replaces a directory by a symlink
    between squashfu's source walk and rsync does; the real rsync then runs.
    """
    bindir = scratch / "bin"
    bindir.mkdir()
    armed = scratch / "armed"
    wrapper = bindir / "rsync"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"if [ -e '{armed}' ]; then rm -f '{armed}'; rm -rf '{victim}'; ln -s '{outside}' '{victim}'; fi\n"
        f"exec {shutil.which('rsync')} \"$@\"\n")
    wrapper.chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ['PATH']}"}, armed


@pytest.mark.parametrize("swapped_on", ["seed", "full"])
def test_a_directory_swapped_for_a_symlink_before_rsync_never_steers_a_deletion_outside(
        scratch: Path, swapped_on: str) -> None:
    """The night after the swap must delete d/* inside the backup only, never through the symlink."""
    src, root, outside = scratch / "src", scratch / "root", scratch / "outside"
    (src / "d" / "sub").mkdir(parents=True)
    (src / "d" / "sub" / "f").write_text("in the source\n")
    (src / "d" / "file").write_text("in the source\n")
    (src / "other").write_text("x\n")
    fill(src)  # so that losing d/ is not most of the source (that would rightly warn)
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "precious").write_text("root must never delete this\n")
    (outside / "file").write_text("nor this\n")
    env, armed = swapping_rsync(scratch, src / "d", outside)
    squashfu("init", root, "--source", src)
    if swapped_on == "seed":
        armed.touch()
        squashfu("-r", root, "backup", now="2026-11-02T02:00", env=env)
    else:
        squashfu("-r", root, "backup", now="2026-11-02T02:00", env=env)
        armed.touch()
        squashfu("-r", root, "backup", "--full", now="2026-11-03T02:00", env=env)
    assert not armed.exists() and (src / "d").is_symlink()
    proc = squashfu("-r", root, "backup", now="2026-11-04T02:00", env=env, expect=None)
    assert sorted(os.listdir(outside)) == ["file", "sub"], "root deleted files outside the source"
    assert (outside / "sub" / "precious").read_text() == "root must never delete this\n"
    assert proc.returncode == 0, proc.stderr
    with rolled_back(root, "latest", scratch / "mp") as mp:
        assert os.readlink(mp / "d") == os.fspath(outside)
        assert (mp / "other").read_text() == "x\n"


def test_files_read_through_a_swapped_symlink_are_not_kept(scratch: Path) -> None:
    """rsync opens listed files by name: after a swap it reads them through the symlink. Drop what it read so."""
    src, root, outside = scratch / "src", scratch / "root", scratch / "outside"
    (src / "d").mkdir(parents=True)
    fill(src)
    outside.mkdir()
    (outside / "secret").write_text("root's secret\n")
    env, armed = swapping_rsync(scratch, src / "d", outside)
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now="2026-11-02T02:00", env=env)
    (src / "d" / "secret").write_text("the user's own file, walked tonight\n")
    armed.touch()
    squashfu("-r", root, "backup", now="2026-11-03T02:00", env=env)
    assert history(root)["bins"][-1]["compare"] == "manifest"
    with rolled_back(root, "latest", scratch / "mp") as mp:
        assert not (mp / "d").is_symlink()  # rsync kept d as the directory the list implied
        assert not (mp / "d" / "secret").exists(), (mp / "d" / "secret").read_text()
    squashfu("-r", root, "backup", now="2026-11-04T02:00", env=env)
    with rolled_back(root, "latest", scratch / "mp") as mp:
        assert os.readlink(mp / "d") == os.fspath(outside)


def test_the_manifest_lists_nothing_below_a_directory_that_rsync_copied_as_a_symlink(scratch: Path) -> None:
    """The manifest describes what was copied: d is not a directory there, so nothing below d is listed."""
    from squashfu_fs.write import changes

    src, root, outside = scratch / "src", scratch / "root", scratch / "outside"
    (src / "d" / "sub").mkdir(parents=True)
    (src / "d" / "sub" / "f").write_text("x\n")
    outside.mkdir()
    env, armed = swapping_rsync(scratch, src / "d", outside)
    squashfu("init", root, "--source", src)
    armed.touch()
    squashfu("-r", root, "backup", now="2026-11-02T02:00", env=env)
    manifest = changes.load(root / ".manifest")
    assert manifest is not None
    unknown = getattr(changes, "UNKNOWN", None)  # entries the night could not vouch for
    listed = {p for p, sig in manifest.entries.items() if sig != unknown}
    assert not [p for p in listed if p.startswith(b"d/") or p == b"d"], sorted(manifest.entries)


# ------------------------------------------------------------- 3. a source that is not what it was


@pytest.fixture
def tmpfs_source(scratch: Path) -> Iterator[Path]:
    """A source that is a tmpfs mount point, as a data disk's mount point is; unmounted in teardown."""
    src = scratch / "src"
    src.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", src], check=True)
    try:
        yield src
    finally:
        if mounts.is_mounted(src):
            subprocess.run(["umount", src], check=True)


def fill(src: Path, count: int = 10) -> None:
    for i in range(count):
        (src / f"f{i}").write_text(f"file {i}\n")


def test_an_xattr_on_the_source_top_the_root_cannot_hold_commits_with_exit_3(tmpfs_source: Path,
                                                                              scratch: Path) -> None:
    """tmpfs holds a user xattr bigger than ext4 can: each night commits, says so with exit 3, never fails."""
    src, root = tmpfs_source, scratch / "root"
    fill(src)
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    os.setxattr(src, "user.big", b"x" * 16000)  # ext4 keeps at most one block of xattrs per inode
    (src / "f1").write_text("changed\n")
    for night in ("2026-11-03T02:00", "2026-11-04T02:00"):
        proc = squashfu("-r", root, "backup", now=night, expect=3)
        assert "could not be backed up" in one_line(proc), proc.stderr
    assert history(root)["bins"][0]["compare"] == "manifest"  # then, like any partial night, a full compare
    with rolled_back(root, "latest", scratch / "mp") as mp:
        assert (mp / "f1").read_text() == "changed\n"


def test_a_source_disk_that_did_not_come_up_is_refused(tmpfs_source: Path, scratch: Path) -> None:
    src, root = tmpfs_source, scratch / "root"
    fill(src)
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    before = (root / "history.json").read_bytes()
    manifest = (root / ".manifest").read_bytes()
    subprocess.run(["umount", src], check=True)  # the disk did not come up tonight: an empty directory
    proc = squashfu("-r", root, "backup", now="2026-11-03T02:00", expect=1)
    line = one_line(proc)
    assert "empty" in line and "--allow-source-change" in line, line
    assert (root / "history.json").read_bytes() == before and (root / ".manifest").read_bytes() == manifest
    assert os.listdir(root / "bins") == [] and debris(root) == []
    (src / "stray").write_text("written into the bare mount point\n")  # not empty, but another filesystem
    proc = squashfu("-r", root, "backup", now="2026-11-03T02:00", expect=1)
    line = one_line(proc)
    assert "another filesystem" in line and "--allow-source-change" in line, line
    assert (root / "history.json").read_bytes() == before and os.listdir(root / "bins") == []
    # The administrator says this is intended: it commits, and says how much it deletes.
    proc = squashfu("-r", root, "backup", "--allow-source-change", now="2026-11-03T02:00", expect=3)
    assert "deletes 10 of 10 entries" in one_line(proc)
    assert [b["number"] for b in history(root)["bins"]] == [1]
    squashfu("-r", root, "backup", now="2026-11-04T02:00")  # the new state is the reference from now on


def test_a_night_that_deletes_more_than_half_commits_and_says_so(scratch: Path) -> None:
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    fill(src, 10)
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    for i in range(4):
        (src / f"f{i}").unlink()
    quiet = squashfu("-r", root, "backup", now="2026-11-03T02:00")  # 4 of 10: an ordinary night
    assert quiet.stderr == ""
    for i in range(4, 9):
        (src / f"f{i}").unlink()
    proc = squashfu("-r", root, "backup", now="2026-11-04T02:00", expect=3)
    assert "deletes 5 of 6 entries" in one_line(proc)
    assert history(root)["bins"][-1]["compare"] == "manifest" and len(history(root)["bins"]) == 2
    for i in range(4, 9):
        (src / f"f{i}").write_text("back\n")
    squashfu("-r", root, "backup", now="2026-11-05T02:00")
    for i in range(4, 9):
        (src / f"f{i}").unlink()
    proc = squashfu("-r", root, "backup", "--full", now="2026-11-06T02:00", expect=3)  # rsync counts
    assert "deletes 5 of 6 entries" in one_line(proc)
    assert history(root)["bins"][-1]["compare"] == "full"


# ------------------------------------------------------------- 5. a directory root cannot read


@contextmanager
def foreign_fuse_mount(scratch: Path, where: Path) -> Iterator[None]:
    """``where``: another user's squashfuse mount without allow_other, which root gets EACCES on."""
    image = scratch / "small.sfs"
    if not image.exists():
        (scratch / "img").mkdir()
        (scratch / "img" / "x").write_text("nobody's\n")
        subprocess.run(["mksquashfs", scratch / "img", image, "-quiet", "-noappend"], check=True,
                       stdout=subprocess.DEVNULL)
        image.chmod(0o644)
    where.mkdir(parents=True, exist_ok=True)
    os.chown(where, NOBODY, NOBODY)
    with reachable_by_others(where, image):
        done = run_as_nobody(["squashfuse", image, where])
        assert done.returncode == 0, done.stderr
        try:
            with pytest.raises(PermissionError):
                os.lstat(where)  # the premise: root really cannot read it
            yield
        finally:
            subprocess.run(["fusermount3", "-u", where], check=False)
            if mounts.is_mounted(where):
                subprocess.run(["umount", "-l", where], check=True)


def test_an_unreadable_mount_in_the_source_is_named_with_exit_3_and_no_debris(
        scratch: Path, fuse_for_users: None) -> None:  # noqa: F811
    src, root = scratch / "src", scratch / "root"
    (src / "m").mkdir(parents=True)
    (src / "m" / "inner").write_text("backed up before the mount hid it\n")
    (src / "kept").write_text("night 1\n")
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    with foreign_fuse_mount(scratch, src / "m"):
        for night, now in ((2, "2026-11-03T02:00"), (3, "2026-11-04T02:00")):
            (src / "kept").write_text(f"night {night}\n" * night)  # a new size: these nights are full compares
            proc = squashfu("-r", root, "backup", now=now, expect=3)
            line = one_line(proc)
            assert "could not be backed up" in line, line
            assert b"/m" in Path(line.rsplit("see ", 1)[1]).read_bytes()
            assert debris(root) == []
        assert [b["number"] for b in history(root)["bins"]] == [1, 2]
        with rolled_back(root, "latest", scratch / "mp") as mp:
            assert (mp / "kept").read_text() == "night 3\n" * 3
            assert (mp / "m" / "inner").exists(), "an unreadable directory is kept as it was, not deleted"
    squashfu("-r", root, "backup", now="2026-11-05T02:00")  # readable again: an ordinary night


def test_an_unreadable_mount_on_the_first_night_still_makes_the_seed(scratch: Path, fuse_for_users: None) -> None:  # noqa: F811
    src, root = scratch / "src", scratch / "root"
    (src / "kept").parent.mkdir(parents=True)
    (src / "kept").write_text("seed\n")
    squashfu("init", root, "--source", src)
    with foreign_fuse_mount(scratch, src / "m"):
        proc = squashfu("-r", root, "backup", now="2026-11-02T02:00", expect=3)
        assert "could not be backed up" in one_line(proc)
        assert history(root)["seed"] is not None and debris(root) == []


# ------------------------------------------------------------- 13. rsync's quick check


def test_a_same_size_same_mtime_rewrite_is_copied(scratch: Path) -> None:
    """The manifest sees the new ctime; rsync must compare that file by content, not size and mtime."""
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    f = src / "f"
    f.write_text("aaaa")
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    before = f.stat()
    f.write_text("bbbb")
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert stat.S_ISREG(f.stat().st_mode) and f.stat().st_mtime_ns == before.st_mtime_ns
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    assert history(root)["bins"][-1]["compare"] == "manifest"
    assert b"f" in bin_entries(root, 1)
    with rolled_back(root, "latest", scratch / "mp") as mp:
        assert (mp / "f").read_text() == "bbbb"
