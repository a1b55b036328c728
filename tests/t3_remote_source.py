"""A remote source, ``[USER@]HOST:PATH`` pulled with rsync over a real ssh (issue 10, item 3).

Every test talks to a throw-away ``sshd`` on 127.0.0.1 (tests/sshd.py) that
lets ``root`` in: the "remote" tree is a directory of this machine reached
only through ssh, so what squashfu does with it is exactly what it does with
another host. Each day of a remote-sourced root is compared with a snapshot
of the tree taken right after that night, through a kernel roll-back, a
restore and the FUSE mount.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from .harness import fuse_mounted, history, one_line, rollback_snapshot, squashfu
from .sshd import Sshd, sshd  # noqa: F401  (the fixture)
from .treegen import build_initial, differences, mutate, snapshot

pytestmark = pytest.mark.mounts

START = datetime(2026, 11, 2, 2, 0)


def _when(night: int) -> str:
    return (START + timedelta(days=night)).isoformat()


def _init(root: Path, src: Path, sshd: Sshd, *extra: str) -> None:  # noqa: F811
    squashfu("init", root, "--source", sshd.remote(src), "--rsh", sshd.rsh, *extra)


def _debris(root: Path) -> list[str]:
    """What a failed night must not leave in the root: a partial bin, a staging tree, scratch."""
    found = [p.name for p in (root / "bins").iterdir() if p.name.startswith(".partial")]
    found += [p.name for p in root.iterdir() if p.name in (".staging",)]
    return found


def test_init_writes_the_remote_source_and_rsh(scratch: Path, sshd: Sshd) -> None:  # noqa: F811
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    _init(root, src, sshd)
    text = (root / "squashfu.toml").read_text()
    assert f'source = "root@127.0.0.1:{src}"' in text
    assert "rsh = " in text and str(sshd.key) in text


def test_a_remote_sources_days_restore_exactly(scratch: Path, sshd: Sshd) -> None:  # noqa: F811
    """Twelve nights of the scripted awkward history, every one a full compare through the union, two resquashes.

    The script changes one name of a hard-linked group in a later night
    (mode, owner, mtime, an xattr) while the group lives in the seed: the
    case where a compare through the union splits the group (write/unionfix.py).
    """
    src, root, mp = scratch / "src", scratch / "root", scratch / "mp"
    src.mkdir()
    build_initial(os.fsencode(src))
    os.chown(src / "home", 31337, 4242)  # owners travel as numbers, names unknown on either side
    _init(root, src, sshd, "--max-bins", "6", "--min-bins", "3")  # retention runs twice in twelve nights
    expected: dict[str, object] = {}
    for night in range(12):
        done = mutate(os.fsencode(src), night) if night else ["seed"]
        squashfu("-r", root, "backup", now=_when(night))
        taken = snapshot(os.fsencode(src))
        expected[_when(night)[:10]] = taken
        got = rollback_snapshot(root, "latest", mp)
        assert not differences(taken, got), f"night {night} ({done}): {differences(taken, got)}"
        if night:
            assert history(root)["bins"][-1]["compare"] == "full"
    # entries below the top, as a local walk counts them
    assert history(root)["bins"][-1]["source_entries"] == len(snapshot(os.fsencode(src))[0])
    assert not (root / ".manifest").exists(), "a remote source cannot be walked: no manifest may be trusted"
    assert history(root)["seed"]["absorbed"], "twelve nights with max_bins 6 must have resquashed"
    views = [layer["view"] for layer in json.loads(squashfu("-r", root, "list", "--json").stdout)["layers"]
             if layer["view"]]
    assert len(views) >= 4
    for day in views:  # the resquashed seed's day and every bin's, through the kernel
        got = rollback_snapshot(root, day, mp)
        assert not differences(expected[day], got), f"{day}: {differences(expected[day], got)}"
    target = scratch / "restored"
    squashfu("-r", root, "restore", views[1], "--to", target)
    got = snapshot(os.fsencode(target))
    assert not differences(expected[views[1]], got), differences(expected[views[1]], got)
    with fuse_mounted(root, scratch / "fuse") as view:
        for day in views:
            got = snapshot(os.fsencode(view / day))
            assert not differences(expected[day], got), f"FUSE {day}: {differences(expected[day], got)}"


def test_a_group_split_in_a_later_night_is_linked_again(scratch: Path, sshd: Sshd) -> None:  # noqa: F811
    """Metadata changes to groups spread over directories, whose version is in the seed, and a group that grows.

    write/unionfix.py describes how a compare through the union can split
    such a group; with rsync 3.5.0 on kernel 6.18 rsync itself re-links the
    other names (it stats the copied-up leader again), so this holds with or
    without the second pass there. It guards the case on other versions.
    """
    src, root, mp = scratch / "src", scratch / "root", scratch / "mp"
    for d in ("a", "b", "c"):
        (src / d).mkdir(parents=True)
    for n in range(5):
        (src / "a" / f"f{n}").write_text(f"group {n}\n")
        os.link(src / "a" / f"f{n}", src / "b" / f"f{n}")
        os.link(src / "a" / f"f{n}", src / "c" / f"f{n}")
    for d in ("a", "b", "c", ""):
        os.utime(src / d, (1_600_000_000, 1_600_000_000))
    _init(root, src, sshd)
    squashfu("-r", root, "backup", now=_when(0))
    for n in range(5):  # one name each, in turn the first, middle and last name rsync meets
        os.chmod(src / "abc"[n % 3] / f"f{n}", 0o600)
        os.chown(src / "abc"[(n + 1) % 3] / f"f{n}", 4000 + n, 4000 + n)
    os.link(src / "a" / "f3", src / "new-name-of-f3")  # the group grows
    for d in ("a", "b", "c", ""):
        os.utime(src / d, (1_600_000_000, 1_600_000_000))
    squashfu("-r", root, "backup", now=_when(1))
    taken = snapshot(os.fsencode(src))
    got = rollback_snapshot(root, "latest", mp)
    assert not differences(taken, got), differences(taken, got)


def test_xattrs_acls_and_a_zero_zero_device(scratch: Path, sshd: Sshd) -> None:  # noqa: F811
    """An ACL set in a later night on a file whose version is in the seed; a source's 0:0 device is reported."""
    if shutil.which("setfacl") is None:
        pytest.skip("setfacl is not installed (Debian acl)")
    src, root, mp = scratch / "src", scratch / "root", scratch / "mp"
    src.mkdir()
    (src / "plain").write_text("plain\n")
    os.setxattr(src / "plain", "user.colour", b"blue")
    _init(root, src, sshd)
    squashfu("-r", root, "backup", now=_when(0))
    import subprocess
    subprocess.run(["setfacl", "-m", "u:4242:r", str(src / "plain")], check=True)
    os.mknod(src / "zero-zero", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    proc = squashfu("-r", root, "backup", now=_when(1), expect=3)
    assert "could not be backed up" in one_line(proc)
    assert b"zero-zero" in Path(one_line(proc).rsplit("see ", 1)[1]).read_bytes()
    os.unlink(src / "zero-zero")
    squashfu("-r", root, "backup", now=_when(2))
    with fuse_mounted(root, scratch / "fuse") as view:
        day = view / _when(2)[:10]
        assert os.getxattr(day / "plain", "system.posix_acl_access") == os.getxattr(
            src / "plain", "system.posix_acl_access")
        assert os.getxattr(day / "plain", "user.colour") == b"blue"
    got = rollback_snapshot(root, "latest", mp)
    assert not differences(snapshot(os.fsencode(src)), got)


def test_an_unreachable_host_fails_in_one_line_and_commits_nothing(scratch: Path, sshd: Sshd) -> None:  # noqa: F811
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    (src / "f").write_text("f\n")
    _init(root, src, sshd)
    squashfu("-r", root, "backup", now=_when(0))
    before = (root / "history.json").read_bytes()
    config = root / "squashfu.toml"
    config.write_text(config.read_text().replace(f"-p {sshd.port}", "-p 1"))
    proc = squashfu("-r", root, "backup", now=_when(1), expect=1)
    assert "Connection refused" in one_line(proc)
    assert (root / "history.json").read_bytes() == before and not _debris(root)
    proc = squashfu("-r", root, "backup", "--dry-run", now=_when(1), expect=1)
    assert "Connection refused" in one_line(proc)


def test_a_missing_remote_path_fails_in_one_line_and_commits_nothing(scratch: Path, sshd: Sshd) -> None:  # noqa: F811
    src, root = scratch / "src", scratch / "root"
    proc = squashfu("init", root, "--source", sshd.remote(scratch / "nowhere"), "--rsh", sshd.rsh, expect=1)
    assert "No such file or directory" in one_line(proc) and not root.exists()
    src.mkdir()
    (src / "f").write_text("f\n")
    _init(root, src, sshd)
    squashfu("-r", root, "backup", now=_when(0))
    before = (root / "history.json").read_bytes()
    src.rename(scratch / "moved")
    proc = squashfu("-r", root, "backup", now=_when(1), expect=1)
    assert "No such file or directory" in one_line(proc) and str(src) in one_line(proc)
    assert (root / "history.json").read_bytes() == before and not _debris(root)
    (scratch / "moved").rename(src)
    src_file = src / "f"
    src_file.unlink()
    src_file.mkdir()  # the source is there again, and changed: the next night works
    squashfu("-r", root, "backup", now=_when(2))


def test_a_first_backup_of_a_missing_remote_path_commits_no_empty_seed(scratch: Path, sshd: Sshd) -> None:  # noqa: F811
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    _init(root, src, sshd)
    src.rmdir()
    proc = squashfu("-r", root, "backup", now=_when(0), expect=1)
    assert "No such file or directory" in one_line(proc)
    assert history(root)["seed"] is None and not _debris(root)


def test_an_empty_remote_tree_is_refused_unless_allowed(scratch: Path, sshd: Sshd) -> None:  # noqa: F811
    src, root = scratch / "src", scratch / "root"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("f\n")
    _init(root, src, sshd)
    squashfu("-r", root, "backup", now=_when(0))
    before = (root / "history.json").read_bytes()
    shutil.rmtree(src / "d")  # what an unmounted data disk on the remote host looks like
    proc = squashfu("-r", root, "backup", now=_when(1), expect=1)
    assert "is empty, but had 2 entries" in one_line(proc)
    assert (root / "history.json").read_bytes() == before and not _debris(root)
    squashfu("-r", root, "backup", "--allow-source-change", now=_when(1), expect=3)  # a mass deletion: exit 3
    assert history(root)["bins"][-1]["source_entries"] == 0


def test_an_all_excluded_remote_tree_is_refused_by_rsyncs_count(scratch: Path, sshd: Sshd) -> None:  # noqa: F811
    """The listing before the copy sees entries; rsync's own count after it (nothing but excluded names) decides."""
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    (src / "keep").write_text("k\n")
    _init(root, src, sshd, "--exclude", "*.tmp")
    squashfu("-r", root, "backup", now=_when(0))
    before = (root / "history.json").read_bytes()
    (src / "keep").unlink()
    (src / "scratch.tmp").write_text("t\n")
    proc = squashfu("-r", root, "backup", now=_when(1), expect=1)
    assert "is empty, but had 1 entries" in one_line(proc)
    assert (root / "history.json").read_bytes() == before and not _debris(root)


def test_a_dry_run_of_a_remote_source_lists_changes_and_commits_nothing(scratch: Path, sshd: Sshd) -> None:  # noqa: F811
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    (src / "old").write_text("o\n")
    _init(root, src, sshd)
    proc = squashfu("-r", root, "backup", "--dry-run", now=_when(0))
    assert "old" in proc.stdout and history(root)["seed"] is None
    squashfu("-r", root, "backup", now=_when(0))
    (src / "new").write_text("n\n")
    before = (root / "history.json").read_bytes()
    proc = squashfu("-r", root, "backup", "--dry-run", now=_when(1))
    assert "new" in proc.stdout and "old" not in proc.stdout
    assert (root / "history.json").read_bytes() == before


def test_json_summary_and_history_queries_of_a_remote_source(scratch: Path, sshd: Sshd) -> None:  # noqa: F811
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    (src / "f").write_text("f\n")
    _init(root, src, sshd)
    squashfu("-r", root, "backup", now=_when(0))
    (src / "g").write_text("g\n")
    summary = json.loads(squashfu("-r", root, "backup", "--json", now=_when(1)).stdout)
    assert summary["status"] == "ok" and summary["layer"] == "1" and summary["files_changed"] == 1
    # the remote path names files in the history queries, as a local source's path does
    versions = json.loads(squashfu("-r", root, "versions", str(src / "g"), "--json").stdout)
    assert len(versions) == 1
    proc = squashfu("-r", root, "versions", "/elsewhere/g", expect=2)
    assert "outside the source" in one_line(proc)


def test_a_key_restricted_with_rrsync_is_enough(scratch: Path, sshd: Sshd) -> None:  # noqa: F811
    """docs/operations.md's forced command: read-only rrsync below one directory; a path outside it is refused."""
    if shutil.which("rrsync") is None:
        pytest.skip("rrsync is not installed (Debian rsync >= 3.2.4)")
    allowed, src, root = scratch / "srv", scratch / "srv" / "www", scratch / "root"
    src.mkdir(parents=True)
    (src / "index.html").write_text("hello\n")
    keys = scratch / "sshd" / "authorized_keys"
    keys.write_text(f'command="{shutil.which("rrsync")} -ro -absolute {allowed}",restrict ' + keys.read_text())
    proc = squashfu("init", scratch / "elsewhere", "--source", sshd.remote(scratch), "--rsh", sshd.rsh, expect=1)
    assert "rrsync" in one_line(proc) and not (scratch / "elsewhere").exists()
    _init(root, src, sshd)
    squashfu("-r", root, "backup", now=_when(0))
    (src / "index.html").write_text("changed\n")
    squashfu("-r", root, "backup", now=_when(1))
    target = scratch / "restored"
    squashfu("-r", root, "restore", "latest", "--to", target)
    assert (target / "index.html").read_text() == "changed\n"


@pytest.mark.parametrize("fails_at", [1, 2])
def test_a_connection_lost_during_the_copy_commits_nothing(scratch: Path, sshd: Sshd, fails_at: int) -> None:  # noqa: F811
    """The listing works, then ssh fails in the first (1) or the second (2) rsync pass: ssh's line, exit 1, no bin."""
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    (src / "f").write_text("f\n")
    _init(root, src, sshd)
    squashfu("-r", root, "backup", now=_when(0))
    before = (root / "history.json").read_bytes()
    (src / "g").write_text("g\n")
    count, flaky = scratch / "count", scratch / "flaky-ssh"
    flaky.write_text(f"""#!/bin/sh
n=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}
if [ "$n" -gt {fails_at - 1} ]; then echo "ssh: connect to host 127.0.0.1: Connection timed out" >&2; exit 255; fi
exec {sshd.rsh} "$@"
""")
    flaky.chmod(0o700)
    config = root / "squashfu.toml"
    config.write_text(config.read_text().replace(f"rsh = {json.dumps(sshd.rsh)}", f"rsh = {json.dumps(str(flaky))}"))
    proc = squashfu("-r", root, "backup", now=_when(1), expect=1)
    assert "Connection timed out" in one_line(proc)
    assert count.read_text().strip() == str(fails_at + 1), "the copy did not get as far as it should"
    assert (root / "history.json").read_bytes() == before and not _debris(root)
