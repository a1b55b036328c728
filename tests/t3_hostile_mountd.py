"""The mount daemon as a well-behaved daemon: no borrowed cwd, its own umask, room for descriptors."""

from __future__ import annotations

import os
import re
import resource
import subprocess
from pathlib import Path

import pytest

from squashfu_fs.engines import mounts
from squashfu_fs.read.mountd import daemon_pid

from .harness import fuse_mounted, squashfu

pytestmark = pytest.mark.mounts


def proc_status_umask(pid: int) -> int:
    match = re.search(r"^Umask:\s+([0-7]+)$", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert match, "no Umask line in /proc/PID/status"
    return int(match.group(1), 8)


def soft_nofile(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line in /proc/PID/limits")


def test_the_daemon_lets_go_of_the_callers_cwd_umask_and_fd_limit(scratch: Path) -> None:
    src, root, mp, cwd = scratch / "src", scratch / "root", scratch / "view", scratch / "cwd"
    src.mkdir()
    (src / "f").write_text("hello\n")
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    cwd.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nosuid,nodev", "tmpfs", cwd], check=True)
    here, umask = os.getcwd(), os.umask(0)
    os.umask(umask)
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, limits[1])
    try:
        # The caller: a shell in a directory on a disk it will unmount, umask 000, few descriptors.
        os.chdir(cwd)
        os.umask(0)
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, limits[1]))
        with fuse_mounted(root, mp):
            os.chdir(here)
            os.umask(umask)
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            pid = daemon_pid(mp)
            assert pid is not None
            assert os.readlink(f"/proc/{pid}/cwd") == "/"
            assert proc_status_umask(pid) == 0o077
            soft, hard = soft_nofile(pid)
            assert soft == hard and soft > low, (soft, hard)
            done = subprocess.run(["umount", cwd], capture_output=True, text=True)
            assert done.returncode == 0, f"the caller's cwd is held busy: {done.stderr.strip()}"
            assert (mp / "latest" / "f").read_text() == "hello\n"
    finally:
        os.chdir(here)
        os.umask(umask)
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        if mounts.is_mounted(cwd):
            mounts.unmount(cwd)
