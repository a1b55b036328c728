"""Driving the real ``squashfu`` command in tests, and looking at what it committed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from squashfu_fs import mounts
from squashfu_fs.mountd import daemon_pid

from .conftest import force_unmount
from .treegen import snapshot

CLI = [sys.executable, "-m", "squashfu_fs.cli"]


def squashfu(*args: str | os.PathLike[str], now: str | None = None, env: dict[str, str] | None = None,
             expect: int | None = 0, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would; assert its exit status unless ``expect`` is None."""
    full_env = {**os.environ, **(env or {})}
    if now is not None:
        full_env["SQUASHFU_NOW"] = now
    proc = subprocess.run([*CLI, *map(os.fspath, args)], env=full_env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, start_new_session=True)
    if expect is not None:
        assert proc.returncode == expect, (
            f"squashfu {' '.join(map(str, args))} exited {proc.returncode}, expected {expect}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def history(root: Path) -> dict[str, Any]:
    return json.loads((root / "history.json").read_text())


@contextmanager
def rolled_back(root: Path, view: str, mountpoint: Path) -> Iterator[Path]:
    """``squashfu rollback`` for the length of a block, always taken down."""
    mountpoint.mkdir(exist_ok=True)
    squashfu("-r", root, "rollback", view, mountpoint)
    try:
        yield mountpoint
    finally:
        if mounts.is_mounted(mountpoint):
            squashfu("umount", mountpoint)


def rollback_snapshot(root: Path, view: str, mountpoint: Path) -> Any:
    with rolled_back(root, view, mountpoint) as mp:
        return snapshot(os.fsencode(mp))


def bin_entries(root: Path, number: int) -> list[bytes]:
    top = os.fsencode(root / "bins" / str(number))
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        out += [os.path.relpath(os.path.join(dirpath, n), top) for n in dirnames + filenames]
    return out


@contextmanager
def fuse_mounted(root: Path, mountpoint: Path) -> Iterator[Path]:
    """``squashfu mount`` for a block: always unmounted, and its daemon gone, afterwards."""
    mountpoint.mkdir(exist_ok=True)
    squashfu("-r", root, "mount", mountpoint, "--log", mountpoint.parent / "daemon.log")
    pid = daemon_pid(mountpoint)
    assert pid is not None, "the daemon's pid file is missing"
    try:
        yield mountpoint
    finally:
        if mounts.is_mounted(mountpoint):
            squashfu("umount", mountpoint, expect=None)
        force_unmount(mountpoint)
        for _ in range(250):
            if daemon_pid(mountpoint) is None:
                break
            time.sleep(0.02)
        else:
            os.kill(pid, signal.SIGKILL)
            squashfu("umount", mountpoint, expect=None)
