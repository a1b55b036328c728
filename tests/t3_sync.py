"""``squashfu sync``: offsite copies at a local path, over ssh and through rclone (docs/operations.md).

Real components only: rsync, a throw-away sshd (tests/sshd.py), rclone's
local backend with a config file written here, kernel and FUSE mounts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import CLI, fuse_mounted, history, one_line, rollback_snapshot, rolled_back, squashfu
from .sshd import Sshd
from .treegen import snapshot

NIGHTS = ["2026-11-02T02:00", "2026-11-03T02:00", "2026-11-04T02:00", "2026-11-05T02:00", "2026-11-06T02:00"]


def _night(src: Path, root: Path, n: int) -> None:
    """Night ``n``: change the source a little and back it up."""
    (src / "docs" / f"night{n}.txt").write_text(f"night {n}\n")
    (src / "docs" / "a.txt").write_text(f"alpha {n}\n")
    if n == 1:
        (src / "docs" / "b.txt").unlink()  # a whiteout in bin 1
    squashfu("-r", root, "backup", now=NIGHTS[n])


@pytest.fixture
def nights(scratch: Path) -> Iterator[tuple[Path, Path]]:
    """A root with a seed and two sealed bins (bin 1 holds a deletion)."""
    src, root = scratch / "src", scratch / "root"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.txt").write_text("alpha\n")
    (src / "docs" / "b.txt").write_text("beta\n")
    os.link(src / "docs" / "a.txt", src / "docs" / "a-link")
    squashfu("init", root, "--source", src, "--min-bins", "1")
    squashfu("-r", root, "backup", now=NIGHTS[0])
    for n in (1, 2):
        _night(src, root, n)
    yield src, root


def _layers(root: Path | str) -> list[dict[str, Any]]:
    """``list --json``'s rows without sizes (a copy's sizes are its own filesystem's)."""
    rows = json.loads(squashfu("-r", root, "list", "--json").stdout)["layers"]
    return [{k: v for k, v in row.items() if k != "bytes"} for row in rows]


def _verify(root: Path | str, expect: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(squashfu("-r", root, "verify", "--json", expect=expect).stdout)
    return out


def _files(top: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file at the top of a copy and in its bins/: proves what a sync rewrote."""
    out = {}
    for d in (top, top / "bins"):
        for entry in os.scandir(d):
            if entry.is_file(follow_symlinks=False) and entry.name not in (".lock",):
                st = entry.stat(follow_symlinks=False)
                out[os.path.relpath(entry.path, top)] = (st.st_ino, st.st_mtime_ns)
    return out


def _flip(path: Path, offset: int = 600) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _rclone_env(scratch: Path) -> dict[str, str]:
    """An rclone config with one remote, ``offsite``, on rclone's local backend."""
    config = scratch / "rclone.conf"
    config.write_text("[offsite]\ntype = local\n")
    return {"RCLONE_CONFIG": str(config)}


# --------------------------------------------------------------------------- a local copy


def test_local_copy_is_a_root_that_list_verify_and_mount_accept(nights: tuple[Path, Path], scratch: Path) -> None:
    _, root = nights
    copy = scratch / "offsite" / "copy"  # the parent is made too
    out = squashfu("-r", root, "sync", copy).stdout
    assert "copied 5 layer file(s)" in out  # seed, bins/1.sfs+opaque, bins/2.sfs+opaque
    assert stat.S_IMODE(os.stat(copy).st_mode) == 0o700
    assert all(stat.S_IMODE(os.stat(p).st_mode) & 0o077 == 0 for p in (copy / "bins").iterdir())
    assert _layers(copy) == _layers(root)
    report = _verify(copy)
    assert report["status"] == "ok" and report["debris"] == [] and report["root_problems"] == []
    mark = history(copy)["copy"]
    assert mark["of"] == str(root) and mark["synced"]
    with fuse_mounted(root, scratch / "m-orig") as orig, fuse_mounted(copy, scratch / "m-copy") as mirrored:
        days = sorted(os.listdir(orig))
        assert days == sorted(os.listdir(mirrored))
        for day in ("2026-11-02", "2026-11-03", "2026-11-04"):
            assert snapshot(os.fsencode(orig / day)) == snapshot(os.fsencode(mirrored / day))
        assert not (mirrored / "2026-11-03" / "docs" / "b.txt").exists()  # the whiteout came along


def test_a_copy_refuses_backup_and_resquash_and_sync_still_updates_it(nights: tuple[Path, Path],
                                                                      scratch: Path) -> None:
    src, root = nights
    copy = scratch / "copy"
    squashfu("-r", root, "sync", copy)
    before = (copy / "history.json").read_bytes()
    for command in ("backup", "resquash"):
        proc = squashfu("-r", copy, command, expect=2, now=NIGHTS[3])
        assert "is a copy of" in one_line(proc) and command in one_line(proc)
    assert (copy / "history.json").read_bytes() == before
    _night(src, root, 3)
    squashfu("-r", root, "sync", copy)
    assert _layers(copy) == _layers(root)


def test_second_sync_copies_only_the_new_image(nights: tuple[Path, Path], scratch: Path) -> None:
    src, root = nights
    copy = scratch / "copy"
    squashfu("-r", root, "sync", copy)
    old = _files(copy)
    _night(src, root, 3)
    out = squashfu("-r", root, "sync", copy).stdout
    assert "copied 2 layer file(s)" in out and "5 already there" in out
    new = _files(copy)
    layer_files = {k: v for k, v in old.items() if k not in ("history.json", "squashfu.toml")}
    assert {k: new[k] for k in layer_files} == layer_files  # not one old layer file rewritten
    assert {"bins/3.sfs", "bins/3.opaque"} <= new.keys()
    assert _layers(copy) == _layers(root)


def test_resquash_then_sync_deletes_absorbed_layers_at_the_copy_after_the_history(
        nights: tuple[Path, Path], scratch: Path) -> None:
    _, root = nights
    copy = scratch / "copy"
    squashfu("-r", root, "sync", copy)
    squashfu("-r", root, "resquash")  # min_bins 1: bin 1 and the first seed go into seed.2.sfs
    squashfu("-r", root, "sync", copy)
    names = sorted(p.name for p in (copy / "bins").iterdir())
    assert names == ["2.opaque", "2.sfs"]
    assert not (copy / "seed.sfs").exists() and (copy / "seed.2.sfs").is_file()
    report = _verify(copy)
    assert report["status"] == "ok" and report["debris"] == []


@pytest.mark.parametrize("fault", ["sync-layer-copied", "sync-history-written"])
def test_a_killed_sync_leaves_the_copy_valid_and_the_next_completes_it(nights: tuple[Path, Path], scratch: Path,
                                                                       fault: str) -> None:
    src, root = nights
    copy = scratch / "copy"
    squashfu("-r", root, "sync", copy)
    old_layers = _layers(copy)
    _night(src, root, 3)
    squashfu("-r", root, "resquash")  # a new seed and bin 3 to copy; seed.sfs and bins 1, 2 to delete
    proc = squashfu("-r", root, "sync", copy, env={"SQUASHFU_FAULT": fault}, expect=None)
    assert proc.returncode == -signal.SIGKILL
    between = _layers(copy)
    if fault == "sync-layer-copied":
        assert between == old_layers  # the old history, every file it names whole
    else:
        assert between == _layers(root)  # committed: old layers are debris until the next sync
    assert _verify(copy)["status"] == "ok"
    squashfu("-r", root, "sync", copy)
    assert _layers(copy) == _layers(root)
    report = _verify(copy)
    assert report["status"] == "ok" and report["debris"] == []
    assert not any((copy / ".work").iterdir())


def test_verify_of_a_copy_catches_a_flipped_byte(nights: tuple[Path, Path], scratch: Path) -> None:
    _, root = nights
    copy = scratch / "copy"
    squashfu("-r", root, "sync", copy)
    _flip(copy / "bins" / "1.sfs")
    report = _verify(copy, expect=1)
    damaged = [layer["layer"] for layer in report["layers"] if layer["problems"]]
    assert damaged == ["bin 1"]
    squashfu("-r", root, "sync", copy)  # same size and mtime: a sync trusts the image, as rsync's quick check does
    assert _verify(copy, expect=1)["status"] == "damaged"


def test_sync_refuses_what_is_no_copy(nights: tuple[Path, Path], scratch: Path) -> None:
    src, root = nights
    other = scratch / "other"
    squashfu("init", other, "--source", src)
    busy = scratch / "busy"
    busy.mkdir()
    (busy / "photos").mkdir()
    for dest, words in ((other, "backup root of its own"), (busy, "not empty"), (root / "inside", "inside"),
                        (root, "the root itself")):
        before = sorted(os.listdir(dest)) if dest.exists() else None
        proc = squashfu("-r", root, "sync", dest, expect=2)
        assert words in one_line(proc)
        assert (sorted(os.listdir(dest)) if dest.exists() else None) == before
    squashfu("-r", other, "backup", now=NIGHTS[0])
    for n in (1, 2, 3):
        squashfu("-r", other, "backup", now=NIGHTS[n])  # bins 1..3 of another history
    squashfu("-r", other, "sync", scratch / "theirs")
    before = (scratch / "theirs" / "history.json").read_bytes()
    assert "copy of another history" in one_line(squashfu("-r", root, "sync", scratch / "theirs", expect=2))
    assert (scratch / "theirs" / "history.json").read_bytes() == before
    proc = squashfu("-r", root, "sync", scratch / "c", "--writable", expect=None)
    assert proc.returncode == 0  # a local --writable copy is a root of its own...
    squashfu("-r", scratch / "c", "backup", now=NIGHTS[3])  # ...that backups continue
    assert "backup root of its own" in one_line(squashfu("-r", root, "sync", scratch / "c", expect=2))


# --------------------------------------------------------------------------- over ssh


def test_sync_over_ssh_keeps_directory_bins_whole(scratch: Path, sshd: Sshd) -> None:
    src, root = scratch / "src", scratch / "root"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.txt").write_text("alpha\n")
    (src / "docs" / "gone.txt").write_text("soon deleted\n")
    squashfu("init", root, "--source", src, "--no-seal")
    squashfu("-r", root, "backup", now=NIGHTS[0])
    (src / "docs" / "gone.txt").unlink()
    os.setxattr(src / "docs" / "a.txt", "trusted.note", b"kept")
    os.link(src / "docs" / "a.txt", src / "docs" / "a-link")
    squashfu("-r", root, "backup", now=NIGHTS[1])
    with open(root / "squashfu.toml", "a") as f:
        f.write(f"rsh = {json.dumps(sshd.rsh)}\n")
    far = scratch / "far"
    squashfu("-r", root, "sync", sshd.remote(far))
    whiteout = os.lstat(far / "bins" / "1" / "docs" / "gone.txt")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert os.getxattr(far / "bins" / "1" / "docs" / "a.txt", "trusted.note") == b"kept"
    assert os.stat(far / "bins" / "1" / "docs" / "a-link").st_ino == os.stat(far / "bins" / "1" / "docs" /
                                                                              "a.txt").st_ino
    assert _verify(far)["status"] == "ok"
    assert _layers(far) == _layers(root)
    assert rollback_snapshot(far, "2026-11-03", scratch / "rb-far") == rollback_snapshot(root, "2026-11-03",
                                                                                         scratch / "rb-root")
    old = _files(far)
    (src / "docs" / "c.txt").write_text("gamma\n")
    squashfu("-r", root, "backup", now=NIGHTS[2])
    out = squashfu("-r", root, "sync", sshd.remote(far)).stdout
    assert "copied 3 layer file(s)" in out  # bins/2, its opaque record and its digest list
    new = _files(far)
    assert all(new[k] == v for k, v in old.items() if k not in ("history.json", "squashfu.toml"))


# --------------------------------------------------------------------------- through rclone


def test_rclone_round_trip(nights: tuple[Path, Path], scratch: Path) -> None:
    src, root = nights
    env = _rclone_env(scratch)
    remote = f"rclone:offsite:{scratch / 'bucket'}"
    squashfu("-r", root, "sync", remote, env=env)
    assert _layers_env(remote, env) == _layers(root)
    report = json.loads(squashfu("-r", remote, "verify", "--json", env=env).stdout)
    assert report["status"] == "ok" and all(layer["digest_ok"] for layer in report["layers"])
    _night(src, root, 3)
    out = squashfu("-r", root, "sync", remote, env=env).stdout
    assert "copied 2 layer file(s)" in out
    back = scratch / "back"
    squashfu("-r", remote, "sync", back, env=env)
    assert _verify(back)["status"] == "ok"
    assert _layers(back) == _layers(root)
    assert history(back)["copy"]["of"] == remote
    with fuse_mounted(root, scratch / "m-orig") as orig, fuse_mounted(back, scratch / "m-back") as restored:
        assert snapshot(os.fsencode(orig / "2026-11-05")) == snapshot(os.fsencode(restored / "2026-11-05"))
    _flip(scratch / "bucket" / "bins" / "2.sfs")
    proc = squashfu("-r", remote, "verify", env=env, expect=1)
    assert "bin 2" in one_line(proc)
    proc = squashfu("-r", remote, "verify", "--data", env=env, expect=1)
    assert "bin 2" in one_line(proc)


def _layers_env(root: str, env: dict[str, str]) -> list[dict[str, Any]]:
    rows = json.loads(squashfu("-r", root, "list", "--json", env=env).stdout)["layers"]
    return [{k: v for k, v in row.items() if k != "bytes"} for row in rows]


def test_rclone_refuses_a_directory_bin_with_one_line(scratch: Path) -> None:
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    (src / "a").write_text("a\n")
    squashfu("init", root, "--source", src, "--no-seal")
    squashfu("-r", root, "backup", now=NIGHTS[0])
    squashfu("-r", root, "backup", now=NIGHTS[1])
    env = _rclone_env(scratch)
    proc = squashfu("-r", root, "sync", f"rclone:offsite:{scratch / 'bucket'}", env=env, expect=2)
    assert "bin 1 is kept as a directory" in one_line(proc)
    assert not (scratch / "bucket").exists()
    proc = squashfu("-r", f"rclone:offsite:{scratch / 'bucket'}", "backup", env=env, expect=2)
    assert "rclone copy" in one_line(proc)


def test_rclone_sync_killed_mid_upload_then_repeated(nights: tuple[Path, Path], scratch: Path) -> None:
    src, root = nights
    env = _rclone_env(scratch)
    bucket = scratch / "bucket"
    remote = f"rclone:offsite:{bucket}"
    squashfu("-r", root, "sync", remote, env=env)
    old_layers = _layers_env(remote, env)
    (src / "big").write_bytes(os.urandom(6 << 20))  # incompressible: a 6 MiB image
    squashfu("-r", root, "backup", now=NIGHTS[3])
    slow = {**os.environ, **env, "RCLONE_BWLIMIT": "512k"}
    proc = subprocess.Popen([*CLI, "-r", str(root), "sync", remote], env=slow, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = bucket / "bins" / "3.sfs.tmp"
    try:
        while not (partial.exists() and partial.stat().st_size > 0):
            assert proc.poll() is None, "the sync ended before it was caught mid-upload"
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (bucket / "bins" / "3.sfs").exists()
    assert _layers_env(remote, env) == old_layers
    report = json.loads(squashfu("-r", remote, "verify", "--json", env=env).stdout)
    assert report["status"] == "ok" and report["debris"] == ["bins/3.sfs.tmp"]
    squashfu("-r", root, "sync", remote, env=env)
    assert _layers_env(remote, env) == _layers(root)
    report = json.loads(squashfu("-r", remote, "verify", "--json", env=env).stdout)
    assert report["status"] == "ok" and report["debris"] == []


# --------------------------------------------------------------------------- the reader's claim


def test_resquash_beside_a_sync_keeps_what_the_sync_copies(nights: tuple[Path, Path], scratch: Path) -> None:
    _, root = nights
    copy = scratch / "copy"
    env = {**os.environ, "SQUASHFU_FAULT": "sync-claimed", "SQUASHFU_FAULT_DELAY": "60"}
    proc = subprocess.Popen([*CLI, "-r", str(root), "sync", str(copy)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    claim = Path("/run/squashfu") / f"sync-{proc.pid}" / "seen.json"
    try:
        while not (claim.exists() and json.loads(claim.read_text())["generation"] >= 0):
            assert proc.poll() is None, "the sync ended before it claimed its layers"
            time.sleep(0.02)
        assert json.loads(claim.read_text())["bins"] == [1, 2]
        squashfu("-r", root, "resquash")  # absorbs bin 1 and replaces seed.sfs
        assert [b["number"] for b in history(root)["bins"]] == [2]
        assert (root / "bins" / "1.sfs").is_file() and (root / "seed.sfs").is_file()  # the sync still copies them
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    squashfu("-r", root, "resquash")  # the claim died with the sync: the next writer's recovery deletes them
    assert not (root / "bins" / "1.sfs").exists() and not (root / "seed.sfs").exists()


def test_sync_failures_are_one_line_and_leave_the_copy_as_it_was(nights: tuple[Path, Path], scratch: Path) -> None:
    _, root = nights
    copy = scratch / "copy"
    squashfu("-r", root, "sync", copy)
    before = history(copy)
    with open(root / "squashfu.toml", "a") as f:  # an ssh that reaches nothing
        f.write('rsh = "ssh -p 1 -o BatchMode=yes -o ConnectTimeout=5"\n')
    proc = squashfu("-r", root, "sync", "root@127.0.0.1:/srv/none", expect=1)
    assert "Connection refused" in one_line(proc)
    env = _rclone_env(scratch)
    proc = squashfu("-r", root, "sync", "rclone:nosuchremote:x", env=env, expect=1)
    assert "nosuchremote" in one_line(proc) and not re.search(r"\d{4}/\d\d/\d\d \d\d:", one_line(proc))
    for bad, words in (("rclone:", "rclone:REMOTE:PATH"), (":x", "[USER@]HOST:PATH")):
        assert words in one_line(squashfu("-r", root, "sync", bad, expect=2))
    proc = squashfu("-r", root, "sync", "rclone:offsite:" + str(scratch / "b"), "--writable", env=env, expect=2)
    assert "--writable" in one_line(proc)
    same = "rclone:offsite:" + str(scratch / "b")
    assert "the root itself" in one_line(squashfu("-r", same, "sync", same + "/", env=env, expect=2))
    for command in (("backup",), ("mount", scratch / "m"), ("resquash",)):
        proc = squashfu("-r", "rclone:offsite:" + str(scratch / "b"), *command, env=env, expect=2)
        assert "rclone copy" in one_line(proc)
    assert history(copy) == before


def test_a_mount_of_a_local_copy_keeps_the_directory_bin_its_view_reads(scratch: Path) -> None:
    src, root = scratch / "src", scratch / "root"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.txt").write_text("alpha\n")
    squashfu("init", root, "--source", src, "--no-seal", "--min-bins", "1")
    squashfu("-r", root, "backup", now=NIGHTS[0])
    for n in (1, 2):
        (src / "docs" / "a.txt").write_text(f"alpha {n}\n")
        squashfu("-r", root, "backup", now=NIGHTS[n])
    copy = scratch / "copy"
    squashfu("-r", root, "sync", copy)
    with fuse_mounted(copy, scratch / "m") as mp:
        held = os.open(mp / "2026-11-03" / "docs", os.O_PATH | os.O_DIRECTORY)  # a shell's cwd in bin 1's day
        try:
            squashfu("-r", root, "resquash")  # bin 1 goes into the seed at the original
            out = squashfu("-r", root, "sync", copy).stdout
            assert "left 4 a mount of the copy still reads" in out, out  # bins/1, its records, seed.sfs
            assert (copy / "bins" / "1").is_dir() and (copy / "seed.sfs").is_file()
            fd = os.open("a.txt", os.O_RDONLY, dir_fd=held)
            with os.fdopen(fd) as f:
                assert f.read() == "alpha 1\n"
        finally:
            os.close(held)
        for _ in range(200):  # the kernel forgets the view in its own time; then the next sync deletes the bin
            if "removed 4" in squashfu("-r", root, "sync", copy).stdout:
                break
            time.sleep(0.05)
        assert not (copy / "bins" / "1").exists() and not (copy / "seed.sfs").exists()
        assert (mp / "latest" / "docs" / "a.txt").read_text() == "alpha 2\n"
    assert _verify(copy)["status"] == "ok"


def test_verify_of_a_copy_leaves_the_originals_metrics_file_alone(nights: tuple[Path, Path], scratch: Path) -> None:
    src, root = nights
    prom = scratch / "metrics" / "squashfu.prom"
    prom.parent.mkdir()
    with open(root / "squashfu.toml", "a") as f:
        f.write(f"metrics_file = {json.dumps(str(prom))}\n")
    _night(src, root, 3)
    before = prom.read_bytes()
    assert b"squashfu_backup_last_success_timestamp_seconds" in before
    copy = scratch / "copy"
    squashfu("-r", root, "sync", copy)
    assert _verify(copy)["status"] == "ok"
    assert prom.read_bytes() == before


def _stopped_sync(root: Path | str, dest: str, checkpoint: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A sync that has stopped itself (SIGSTOP) at ``checkpoint``; the caller sends SIGCONT."""
    full = {**os.environ, **env, "SQUASHFU_FAULT": checkpoint, "SQUASHFU_FAULT_ACTION": "stop"}
    proc = subprocess.Popen([*CLI, "-r", str(root), "sync", dest], env=full, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the sync ended before {checkpoint} (status {status})"
    return proc


def test_two_syncs_to_one_rclone_copy_never_commit_a_stale_history(nights: tuple[Path, Path],
                                                                    scratch: Path) -> None:
    src, root = nights
    config = scratch / "rclone.conf"
    config.write_text("[offsite]\ntype = local\n\n[again]\ntype = local\n")  # one bucket, two names
    env = {"RCLONE_CONFIG": str(config)}
    bucket = scratch / "bucket"
    remote = f"rclone:offsite:{bucket}"
    squashfu("-r", root, "sync", remote, env=env)
    _night(src, root, 3)
    first = _stopped_sync(root, remote, "sync-prepared", env)  # it has read the copy's history
    try:
        proc = squashfu("-r", root, "sync", remote, env=env, expect=1)
        assert "busy" in one_line(proc)
        squashfu("-r", root, "resquash")  # seed.sfs and bin 1 absorbed into a new seed
        squashfu("-r", root, "sync", f"rclone:again:{bucket}", env=env)  # deletes them at the copy
        committed = (bucket / "history.json").read_bytes()
        os.kill(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert first.returncode == 1, err
    assert "changed while this sync ran" in err.decode() and len(err.decode().strip().splitlines()) == 1
    assert (bucket / "history.json").read_bytes() == committed
    assert _layers_env(remote, env) == _layers(root)
    report = json.loads(squashfu("-r", remote, "verify", "--json", env=env).stdout)
    assert report["status"] == "ok"


def test_an_rclone_copy_missing_or_damaged_is_not_brought_back(nights: tuple[Path, Path], scratch: Path) -> None:
    _, root = nights
    env = _rclone_env(scratch)
    bucket = scratch / "bucket"
    remote = f"rclone:offsite:{bucket}"
    squashfu("-r", root, "sync", remote, env=env)
    aside = scratch / "1.sfs"
    (bucket / "bins" / "1.sfs").rename(aside)
    back = scratch / "back"
    proc = squashfu("-r", remote, "sync", back, env=env, expect=1)
    assert "bins/1.sfs" in one_line(proc) and "missing" in one_line(proc)
    assert not back.exists()  # refused before anything was written
    aside.rename(bucket / "bins" / "1.sfs")
    image = bucket / "bins" / "2.sfs"
    st = image.stat()
    _flip(image)  # same size, same mtime: only the digest tells
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    proc = squashfu("-r", remote, "sync", back, env=env, expect=1)
    assert "bins/2.sfs" in one_line(proc) and "digest" in one_line(proc)
    assert not (back / "history.json").exists() and not (back / "bins" / "2.sfs").exists()
    assert not any((back / ".work").iterdir())


def test_a_rollback_of_a_local_copy_keeps_the_directory_bin_it_stacks(scratch: Path) -> None:
    src, root = scratch / "src", scratch / "root"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.txt").write_text("alpha\n")
    squashfu("init", root, "--no-seal", "--min-bins", "1", "--source", src)
    squashfu("-r", root, "backup", now=NIGHTS[0])
    for n in (1, 2):
        (src / "docs" / "a.txt").write_text(f"alpha {n}\n")
        squashfu("-r", root, "backup", now=NIGHTS[n])
    copy = scratch / "copy"
    squashfu("-r", root, "sync", copy)
    with rolled_back(copy, "2026-11-03", scratch / "rb") as mp:  # stacks the directory bins/1 of the copy
        squashfu("-r", root, "resquash")  # bin 1 goes into the seed at the original
        out = squashfu("-r", root, "sync", copy).stdout
        assert "a mount of the copy still reads" in out, out
        assert (copy / "bins" / "1").is_dir()
        assert (mp / "docs" / "a.txt").read_text() == "alpha 1\n"
    out = squashfu("-r", root, "sync", copy).stdout  # unmounted: the next sync removes it
    assert not (copy / "bins" / "1").exists(), out
    assert _verify(copy)["status"] == "ok"


def test_a_copy_brought_back_writable_names_the_commands_its_config_runs_as_root(nights: tuple[Path, Path],
                                                                                  scratch: Path) -> None:
    _, root = nights
    with open(root / "squashfu.toml", "a") as f:
        f.write('before_backup = "/usr/local/sbin/dump-db"\nrsh = "ssh -p 2222"\n')
    env = _rclone_env(scratch)
    remote = f"rclone:offsite:{scratch / 'bucket'}"
    squashfu("-r", root, "sync", remote, env=env)
    back = scratch / "back"
    proc = squashfu("-r", remote, "sync", back, "--writable", env=env, expect=3)
    line = one_line(proc)
    assert "before_backup" in line and "rsh" in line and str(back / "squashfu.toml") in line
    assert "synced to" in proc.stdout  # committed: a root of its own, the warning is about what runs next
    assert "copy" not in history(back)
    assert (back / "squashfu.toml").read_bytes() == (root / "squashfu.toml").read_bytes()
    squashfu("-r", remote, "sync", scratch / "marked", env=env)  # a marked copy refuses backup: no warning
