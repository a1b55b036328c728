"""Single commands against real mounts: init, backup (dry-run, the change manifest, ACLs), list.

Roll-back, restore and diff are in t3_rollback_restore.py, resquash in t3_resquash.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from squashfu_fs.engines import mounts

from .harness import acl_of, bin_entries, bin_opened, fuse_mounted, history, one_line, rolled_back, squashfu

pytestmark = pytest.mark.mounts


# ------------------------------------------------------------- init


def test_init_writes_config_and_layout(scratch: Path) -> None:
    (scratch / "src").mkdir()
    squashfu("init", scratch / "root", "--source", scratch / "src")
    root = scratch / "root"
    text = (root / "squashfu.toml").read_text()
    assert 'compression = "zstd"' in text and "max_bins = 14" in text and "min_bins = 7" in text
    assert history(root)["seed"] is None and history(root)["bins"] == []
    assert all((root / d).is_dir() for d in ("bins", "ro", "rw", ".work"))


def test_init_refuses_doubtful_roots(scratch: Path) -> None:
    src = scratch / "src"
    src.mkdir()
    (scratch / "busy").mkdir()
    (scratch / "busy" / "something").write_text("x")
    cases = {
        scratch / "busy": "already exists",
        src / "inside": "inside the source",
        scratch / "new": "is not a directory",  # with a missing source, below
    }
    for root, message in cases.items():
        source = scratch / "missing" if message == "is not a directory" else src
        proc = squashfu("init", root, "--source", source, expect=2)
        assert message in one_line(proc)
    assert not (src / "inside").exists() and not (scratch / "new").exists()
    assert os.listdir(scratch / "busy") == ["something"]


def test_init_refuses_a_filesystem_without_whiteouts_or_xattrs(scratch: Path) -> None:
    (scratch / "src").mkdir()
    ram = scratch / "ram"
    ram.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", ram], check=True)  # no xattrs on ramfs
    try:
        proc = squashfu("init", ram / "root", "--source", scratch / "src", expect=2)
        assert "cannot hold overlay layers" in one_line(proc)
        assert not (ram / "root").exists()
    finally:
        mounts.unmount(ram)


# ------------------------------------------------------------- backup


def test_first_incremental_of_an_unchanged_source_is_empty(tree: tuple[Path, Path]) -> None:
    _, root = tree
    quiet = squashfu("-r", root, "backup", now="2026-11-03T02:00")
    assert quiet.stdout == "" and quiet.stderr == "", "a successful cron run must be silent"
    h = history(root)
    assert h["bins"][0]["files"] == 0 and bin_entries(root, 1) == []
    assert not mounts.mounts_below(root)


def test_excluded_files_are_neither_in_the_seed_nor_in_bins(tree: tuple[Path, Path], scratch: Path) -> None:
    src, root = tree
    (src / "new.tmp").write_text("also excluded\n")
    (src / "docs" / "a.txt").write_text("changed\n")
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    assert sorted(bin_entries(root, 1)) == [b"docs", b"docs/a.txt"]
    with rolled_back(root, "latest", scratch / "mp") as mp:
        assert sorted(os.listdir(mp)) == ["docs"]


def test_dry_run_says_what_would_change_and_commits_nothing(tree: tuple[Path, Path]) -> None:
    src, root = tree
    (src / "docs" / "a.txt").write_text("changed\n")
    (src / "docs" / "b.txt").unlink()
    (src / "docs" / "c.txt").write_text("new\n")
    before = history(root)
    proc = squashfu("-r", root, "backup", "--dry-run", now="2026-11-03T02:00")
    lines = proc.stdout.splitlines()
    assert any(ln.startswith(">f") and ln.endswith(" docs/a.txt") for ln in lines), lines
    assert any(ln.startswith("*deleting") and ln.endswith(" docs/b.txt") for ln in lines), lines
    assert any(ln.startswith(">f+++++++++") and ln.endswith(" docs/c.txt") for ln in lines), lines
    assert history(root) == before and os.listdir(root / "bins") == []
    assert not mounts.mounts_below(root)


def test_progress_bar_on_request(tree: tuple[Path, Path]) -> None:
    src, root = tree
    (src / "big").write_bytes(os.urandom(4 << 20))
    proc = squashfu("-r", root, "backup", "--progress", now="2026-11-03T02:00")
    assert "backup:" in proc.stderr and "%" in proc.stderr


def test_unreadable_file_commits_and_exits_3(tree: tuple[Path, Path]) -> None:
    src, root = tree
    victim = src / "docs" / "unreadable"
    victim.write_text("")
    # A write-only sysfs attribute cannot be read even by root: a real read error.
    subprocess.run(["mount", "--bind", "/sys/bus/platform/drivers_probe", victim], check=True)
    try:
        (src / "docs" / "a.txt").write_text("changed\n")
        proc = squashfu("-r", root, "backup", now="2026-11-03T02:00", expect=3)
    finally:
        mounts.unmount(victim)
    line = one_line(proc)
    assert "backup committed" in line and "could not be backed up" in line
    h = history(root)
    assert h["bins"][-1]["rsync_status"] == 23
    log = Path(line.rsplit("see ", 1)[1])
    assert "unreadable" in log.read_text()
    # the file that could not be read is retried: tomorrow compares the whole tree
    squashfu("-r", root, "backup", now="2026-11-04T02:00")
    assert history(root)["bins"][-1]["compare"] == "full"
    assert b"docs/unreadable" in bin_entries(root, history(root)["bins"][-1]["number"])


def test_a_source_whiteout_device_is_named_and_exits_3(tree: tuple[Path, Path]) -> None:
    src, root = tree
    os.mknod(src / "docs" / "zero-zero", 0o020000 | 0o644, os.makedev(0, 0))
    proc = squashfu("-r", root, "backup", now="2026-11-03T02:00", expect=3)
    assert "could not be backed up" in one_line(proc)
    assert "zero-zero" in Path(one_line(proc).rsplit("see ", 1)[1]).read_text()


def test_clock_going_backwards_is_refused(tree: tuple[Path, Path]) -> None:
    _, root = tree
    before = history(root)
    assert "before the newest backup" in one_line(squashfu("-r", root, "backup", now="2026-11-01T02:00", expect=2))
    assert history(root) == before


# ------------------------------------------------------------- list


def test_list_shows_every_layer_with_totals(tree: tuple[Path, Path]) -> None:
    src, root = tree
    (src / "docs" / "a.txt").write_text("x" * 100_000)
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    squashfu("-r", root, "backup", now="2026-11-04T02:00")
    data = json.loads(squashfu("-r", root, "list", "--json").stdout)
    assert [layer["layer"] for layer in data["layers"]] == ["seed", 1, 2]
    assert [layer["weekday"] for layer in data["layers"]] == ["mon", "tue", "wed"]
    assert [layer["view"] for layer in data["layers"]] == ["2026-11-02", "2026-11-03", "2026-11-04"]
    assert data["layers"][0]["files"] == 3, "the seed holds docs, docs/a.txt and docs/b.txt"
    assert data["layers"][1]["files"] == 1 and data["layers"][2]["files"] == 0
    t = data["totals"]
    assert t["all"] == t["seed"] + t["incrementals"] and t["bins"] == 2
    first = data["layers"][1]  # 100 000 x's, sealed: the image on disk is what counts, and it is small
    assert first["format"] == "sealed" and first["data_bytes"] >= 100_000 and 0 < first["bytes"] < 20_000
    assert t["incrementals"] == first["bytes"] + data["layers"][2]["bytes"]
    text = squashfu("-r", root, "list").stdout
    assert "2026-11-03" in text and "total: seed" in text and "wed" in text


def test_opaque_directories_are_recorded_beside_their_bin(tree: tuple[Path, Path]) -> None:
    """bins/N.opaque names what overlay made opaque, lives as long as bin N, and not a moment longer."""
    src, root = tree
    (src / "flip").write_text("a file tonight\n")
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    (src / "flip").unlink()
    (src / "flip").mkdir()
    (src / "flip" / "inside").write_text("a directory now\n")
    squashfu("-r", root, "backup", now="2026-11-04T02:00")
    with bin_opened(root, 2) as bin2:  # sealed: the image keeps overlay's marker as it was written
        assert os.getxattr(bin2 / "flip", "trusted.overlay.opaque") == b"y"
    assert sorted(p.name for p in (root / "bins").iterdir()) == ["1.opaque", "1.sfs", "2.opaque", "2.sfs"]
    assert (root / "bins" / "1.opaque").read_bytes() == b"", "a record even when nothing is opaque"
    assert (root / "bins" / "2.opaque").read_bytes() == b"flip\0"
    squashfu("-r", root, "backup", now="2026-11-05T02:00")  # recovery keeps a committed bin's record
    assert (root / "bins" / "2.opaque").is_file()
    (root / "bins" / "9.opaque").write_bytes(b"debris\0")  # as if killed before bin 9 was committed
    text = (root / "squashfu.toml").read_text().replace("min_bins = 7", "min_bins = 1")
    (root / "squashfu.toml").write_text(text)
    squashfu("-r", root, "resquash")
    assert sorted(p.name for p in (root / "bins").iterdir()) == ["3.opaque", "3.sfs"]


# ------------------------------------------------------------- the change manifest


def test_manifest_is_used_and_falls_back_when_it_cannot_be_trusted(tree: tuple[Path, Path]) -> None:
    src, root = tree
    (src / "docs" / "a.txt").write_text("monday night\n")
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    assert history(root)["bins"][-1]["compare"] == "manifest"
    (root / ".manifest").unlink()  # lost cache: compare everything, then trust the new one
    (src / "docs" / "b.txt").write_text("tuesday night, longer\n")
    squashfu("-r", root, "backup", now="2026-11-04T02:00")
    assert history(root)["bins"][-1]["compare"] == "full"
    assert sorted(bin_entries(root, 2)) == [b"docs", b"docs/b.txt"]
    squashfu("-r", root, "backup", now="2026-11-05T02:00")
    assert history(root)["bins"][-1]["compare"] == "manifest" and bin_entries(root, 3) == []
    text = (root / "squashfu.toml").read_text().replace('excludes = ["*.tmp"]', 'excludes = ["*.tmp", "- odd"]')
    (root / "squashfu.toml").write_text(text)  # a pattern the scan does not model: rsync decides
    squashfu("-r", root, "backup", now="2026-11-06T02:00")
    assert history(root)["bins"][-1]["compare"] == "full"


def test_manifest_sees_metadata_only_changes(tree: tuple[Path, Path], scratch: Path) -> None:
    src, root = tree
    a = src / "docs" / "a.txt"
    before = a.stat()
    os.chmod(a, 0o600)
    os.setxattr(a, b"user.tag", b"1")
    os.utime(a, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    assert history(root)["bins"][-1]["compare"] == "manifest"
    with rolled_back(root, "latest", scratch / "mp") as mp:
        st = (mp / "docs" / "a.txt").stat()
        assert st.st_mode & 0o777 == 0o600 and os.getxattr(mp / "docs" / "a.txt", b"user.tag") == b"1"


def logging_mount(scratch: Path) -> tuple[dict[str, str], Path]:
    """A ``mount`` first on PATH that notes its arguments, then runs the real one."""
    bindir, log = scratch / "bin", scratch / "mounts.log"
    bindir.mkdir()
    wrapper = bindir / "mount"
    wrapper.write_text(f"#!/bin/sh\necho \"$*\" >> '{log}'\nexec {shutil.which('mount')} \"$@\"\n")
    wrapper.chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ['PATH']}"}, log


def test_a_manifest_night_writes_straight_into_its_bin_and_mounts_no_layer(tree: tuple[Path, Path],
                                                                          scratch: Path) -> None:
    """With the manifest, the committed layers are not stacked: rsync writes the bin, whiteouts included."""
    src, root = tree
    env, log = logging_mount(scratch)
    (src / "docs" / "a.txt").write_text("changed on tuesday\n")
    (src / "docs" / "b.txt").unlink()
    (src / "new" / "deep").mkdir(parents=True)
    (src / "new" / "deep" / "c.txt").write_text("new\n")
    proc = squashfu("-r", root, "backup", "-v", now="2026-11-03T02:00", env=env)
    assert "written straight into the bin" in proc.stderr, proc.stderr
    assert history(root)["bins"][-1]["compare"] == "manifest"
    mounted = log.read_text().splitlines()
    assert mounted and all("bins/1.sfs.tmp" in line for line in mounted), mounted  # only sealing's check
    assert sorted(bin_entries(root, 1)) == [b"docs", b"docs/a.txt", b"docs/b.txt", b"new", b"new/deep",
                                            b"new/deep/c.txt"]
    with bin_opened(root, 1) as bin1:
        st = os.lstat(bin1 / "docs" / "b.txt")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, "a whiteout, as overlayfs makes"
    with rolled_back(root, "latest", scratch / "mp") as mp:
        assert sorted(os.listdir(mp / "docs")) == ["a.txt"]
        assert (mp / "docs" / "a.txt").read_text() == "changed on tuesday\n"
        assert (mp / "new" / "deep" / "c.txt").read_text() == "new\n"
    squashfu("-r", root, "backup", "--full", now="2026-11-04T02:00", env=env)
    assert "-t overlay" in log.read_text(), "a full compare still goes through the union"


def test_a_deletion_below_an_unchanged_directory_gets_that_directory_from_the_source(
        tree: tuple[Path, Path], scratch: Path) -> None:
    """A whiteout needs its directory in the bin: it gets the source's owner, mode, times and xattrs."""
    src, root = tree
    deep = src / "docs" / "sub"
    deep.mkdir()
    (deep / "x").write_text("x\n")
    os.chown(deep, 1234, 5678)
    os.chmod(deep, 0o750)
    os.setxattr(deep, b"user.tag", b"kept")
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    before = deep.stat()
    (deep / "x").unlink()
    os.utime(deep, ns=(before.st_atime_ns, before.st_mtime_ns))
    squashfu("-r", root, "backup", now="2026-11-04T02:00")
    with rolled_back(root, "latest", scratch / "mp") as mp:
        st = (mp / "docs" / "sub").stat()
        assert os.listdir(mp / "docs" / "sub") == []
        seconds = before.st_mtime_ns // 10**9  # SquashFS keeps whole seconds
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777, st.st_mtime_ns // 10**9) == (1234, 5678, 0o750, seconds)
        assert os.getxattr(mp / "docs" / "sub", b"user.tag") == b"kept"


@pytest.mark.parametrize("full", [False, True], ids=["manifest", "full"])
def test_the_top_directory_keeps_its_owner_and_mode_on_a_night_it_did_not_change(scratch: Path,
                                                                                 full: bool) -> None:
    """A source whose top is private stays private in every view, even when only a deep file changed."""
    src, root = scratch / "src", scratch / "root"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f").write_text("monday\n")
    os.chown(src, 1234, 5678)
    os.chmod(src, 0o700)
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    top = src.stat()
    (src / "a" / "b" / "f").write_text("tuesday\n")
    assert src.stat().st_ctime_ns == top.st_ctime_ns, "the top itself did not change tonight"
    squashfu("-r", root, "backup", *(["--full"] if full else []), now="2026-11-03T02:00")
    with rolled_back(root, "latest", scratch / "mp") as mp, fuse_mounted(root, scratch / "fs") as fs:
        for how, view in (("rollback", mp), ("fuse", fs / "2026-11-03")):
            st = view.stat()
            assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 5678, 0o700), how
            assert (view / "a" / "b" / "f").read_text() == "tuesday\n", how


def test_an_acl_on_the_source_top_keeps_its_bin_a_directory(scratch: Path) -> None:
    """The top's ACL is every view's: a bin whose top carries one is not sealed into SquashFS, which would drop it."""
    src, root = scratch / "src", scratch / "root"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f").write_text("monday\n")
    os.chmod(src, 0o700)
    subprocess.run(["setfacl", "-m", "u:1234:rx", src], check=True)
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now="2026-11-02T02:00", expect=3)  # the seed cannot hold it: said, exit 3
    (src / "a" / "f").write_text("tuesday\n")
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    assert history(root)["bins"][-1]["format"] != "sealed" and history(root)["bins"][-1]["acls"]
    with rolled_back(root, "latest", scratch / "mp") as mp:
        assert acl_of(mp) == acl_of(src), "the view's top lost the source top's ACL"
        assert "user:1234:r-x" in subprocess.run(["getfacl", "-n", mp], capture_output=True, text=True).stdout


def test_a_path_deleted_between_the_walk_and_rsync_is_not_an_error(scratch: Path) -> None:
    """The changed list can name a file that is gone by the time rsync looks: skip it quietly."""
    from squashfu_fs.engines import rsync

    src, dst = scratch / "src", scratch / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "here").write_text("x\n")
    listing = scratch / "changed"
    listing.write_bytes(b"here\0gone-since-the-walk\0")
    result = rsync.run(rsync.changed_args(src, dst, (), listing))
    assert result.status == rsync.OK and (dst / "here").read_text() == "x\n"


# ------------------------------------------------------------- POSIX ACLs


def test_acls_the_seed_cannot_hold_are_reported_and_stored_by_the_next_backup(scratch: Path) -> None:
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    (src / "shared.txt").write_text("for the group\n")
    (src / "plain.txt").write_text("no acl\n")
    subprocess.run(["setfacl", "-m", "u:1234:rw", src / "shared.txt"], check=True)
    squashfu("init", root, "--source", src)
    proc = squashfu("-r", root, "backup", now="2026-11-02T02:00", expect=3)
    assert "cannot store the POSIX ACLs of 1 entries" in one_line(proc)
    assert b"shared.txt" in Path(one_line(proc).rsplit("see ", 1)[1]).read_bytes()
    quiet = squashfu("-r", root, "backup", now="2026-11-03T02:00")  # repairs it: exit 0, silent
    assert quiet.stderr == ""
    assert b"shared.txt" in bin_entries(root, 1) and b"plain.txt" not in bin_entries(root, 1)
    first = history(root)["bins"][0]  # SquashFS cannot hold the ACL: the bin stays a directory, listed
    assert first["format"] == "overlay" and first["acls"] is True and first["digest"].startswith("sha256:")
    assert (root / "bins" / "1").is_dir() and (root / "bins" / "1.sha256").is_file()
    assert not (root / "bins" / "1.sfs").exists()
    with rolled_back(root, "latest", scratch / "mp") as mp:
        assert acl_of(mp / "shared.txt") == acl_of(src / "shared.txt") is not None
    squashfu("-r", root, "backup", now="2026-11-04T02:00")
    assert bin_entries(root, 2) == [], "a stored ACL must not be stored again"
    restored = scratch / "restored"
    squashfu("-r", root, "restore", "latest", "--to", restored)
    assert acl_of(restored / "shared.txt") == acl_of(src / "shared.txt")


# ------------------------------------------------------------- the history inside its source


def test_the_history_mounted_inside_the_source_is_not_backed_up(tree: tuple[Path, Path], scratch: Path) -> None:
    src, root = tree
    (src / "docs" / "a.txt").write_text("changed\n")
    with fuse_mounted(root, src / "backups"), rolled_back(root, "mon", src / "rb"):
        proc = squashfu("-r", root, "backup", "-v", now="2026-11-03T02:00")
        assert "leaving out squashfu's own mounts: /backups/, /rb/" in proc.stderr
    entries = bin_entries(root, 1)
    assert b"docs/a.txt" in entries
    assert not [e for e in entries if e.startswith((b"backups/", b"rb/"))], entries
