"""``sync`` to a local DEST that someone else can change (docs/security.md, "Offsite copies").

A sync runs as root. It opens DEST once, refuses one where another user can
rename or replace DEST or a directory above it, and then writes, renames and
deletes only relative to that open directory: DEST swapped for a symlink to
another root in the middle of a sync must leave that other root untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from .harness import CLI, NOBODY, history, one_line, squashfu

pytestmark = pytest.mark.mounts

NIGHTS = ["2026-11-02T02:00", "2026-11-03T02:00", "2026-11-04T02:00"]


def _root(scratch: Path, name: str, text: str) -> Path:
    """A root with a seed and one sealed bin, backing up a source of its own."""
    src, root = scratch / f"src-{name}", scratch / name
    src.mkdir()
    (src / "a.txt").write_text(f"{text}\n")
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now=NIGHTS[0])
    (src / "b.txt").write_text(f"{text} again\n")
    squashfu("-r", root, "backup", now=NIGHTS[1])
    return root


def _tree(top: Path) -> dict[str, tuple[int, int, str]]:
    """(inode, mode, SHA-256 or link target) of everything below ``top``: proves nothing there changed."""
    out: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if os.path.islink(path):
                what = os.readlink(path)
            elif os.path.isfile(path):
                what = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                what = ""
            out[os.path.relpath(path, top)] = (st.st_ino, st.st_mode, what)
    return out


def _stopped_sync(root: Path, dest: Path, checkpoint: str) -> subprocess.Popen[bytes]:
    """A sync that has stopped itself (SIGSTOP) at ``checkpoint``; the caller sends SIGCONT."""
    env = {**os.environ, "SQUASHFU_FAULT": checkpoint, "SQUASHFU_FAULT_ACTION": "stop"}
    proc = subprocess.Popen([*CLI, "-r", str(root), "sync", str(dest)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the sync ended before {checkpoint} (status {status})"
    return proc


def test_dest_swapped_for_a_symlink_mid_sync_leaves_the_other_root_untouched(scratch: Path) -> None:
    root = _root(scratch, "root", "mine")
    victim = _root(scratch, "victim", "theirs")
    before = _tree(victim)
    disk = scratch / "disk"
    disk.mkdir()
    dest = disk / "new"
    proc = _stopped_sync(root, dest, "sync-prepared")  # DEST made and locked; no layer copied yet
    try:
        assert (dest / ".lock").is_file() and not (dest / "seed.sfs").exists()
        dest.rename(disk / "moved")  # whoever could write disk/ would do this...
        dest.symlink_to(victim)  # ...and point the name at another root
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _tree(victim) == before
    assert proc.returncode == 0, err
    assert history(disk / "moved")["copy"]["of"] == str(root)  # the sync finished in the directory it opened
    assert history(disk / "moved")["bins"] == history(root)["bins"]


def test_dest_below_a_directory_another_user_can_write_is_refused(scratch: Path) -> None:
    root = _root(scratch, "root", "mine")
    media = scratch / "media"
    media.mkdir()
    disk = media / "disk"
    disk.mkdir()
    os.chown(disk, NOBODY, NOBODY)  # a user's own directory: its owner can rename what is in it
    proc = squashfu("-r", root, "sync", disk / "new", expect=2)
    assert "nobody" in one_line(proc) or str(NOBODY) in one_line(proc)
    assert not (disk / "new").exists()
    os.chown(disk, 0, 0)
    os.chmod(disk, 0o777)  # writable by every user, no sticky bit
    proc = squashfu("-r", root, "sync", disk / "new", expect=2)
    assert str(disk) in one_line(proc)
    assert not (disk / "new").exists()
    os.chmod(disk, 0o1777)  # /tmp's mode: others cannot rename root's entries in it
    squashfu("-r", root, "sync", disk / "new")
    assert history(disk / "new")["copy"]["of"] == str(root)


def test_dest_that_is_itself_a_symlink_is_refused_with_one_line(scratch: Path) -> None:
    root = _root(scratch, "root", "mine")
    victim = _root(scratch, "victim", "theirs")
    before = _tree(victim)
    (scratch / "link").symlink_to(victim)
    proc = squashfu("-r", root, "sync", scratch / "link", expect=2)
    assert "symlink" in one_line(proc)
    assert _tree(victim) == before
