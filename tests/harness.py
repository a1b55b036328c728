"""Driving the real ``squashfu`` command in tests, and looking at what it committed."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from squashfu_fs.engines import mounts
from squashfu_fs.read.mountd import daemon_pid

from .treegen import snapshot

CLI = [sys.executable, "-m", "squashfu_fs.cli"]
NOBODY = 65534


def force_unmount(path: str | os.PathLike[str]) -> None:
    """Last-resort teardown: FUSE first, then the kernel's lazy unmount."""
    for point in mounts.mounts_below(path):
        entry = next((e for e in mounts.mount_table() if e.mount_point == point), None)
        if entry is not None and entry.fstype.startswith("fuse"):
            subprocess.run(["fusermount3", "-u", "-z", point], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if mounts.is_mounted(os.fsdecode(point)):
            subprocess.run(["umount", "-l", point], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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


def holds_a_file(top: Path) -> bool:
    """Whether a regular file lies anywhere below ``top``."""
    for dirpath, _dirs, files in os.walk(top):
        if any(stat.S_ISREG(os.lstat(os.path.join(dirpath, name)).st_mode) for name in files):
            return True
    return False


def backup_paused_in_rsync(root: Path, pause: float, now: str = "2026-11-03T02:00", *,
                           full: bool = True) -> subprocess.Popen[bytes]:
    """A backup that holds the lock (and with ``full`` its union) for ``pause`` seconds once rsync started, then dies.

    Without ``full`` it is a manifest night, which writes straight into its
    bin and mounts nothing: it is caught once rsync has written the bin.
    """
    env = {**os.environ, "SQUASHFU_FAULT": "rsync-running", "SQUASHFU_FAULT_DELAY": str(pause),
           "SQUASHFU_NOW": now}
    proc = subprocess.Popen([*CLI, "-r", str(root), "backup", *(["--full"] if full else [])], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20

    def ready() -> bool:
        if full:
            return mounts.is_mounted(root / "rw")
        # a regular file rsync wrote: a manifest night puts its whiteouts in before rsync starts
        return any(p.name.startswith(".partial-") and holds_a_file(p) for p in (root / "bins").iterdir())

    while not ready():
        assert time.monotonic() < deadline and proc.poll() is None, "the backup never got to rsync"
        time.sleep(0.05)
    return proc


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line a command printed on stderr; more lines, or a traceback, fail the test."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {proc.stderr!r}"
    return lines[0]


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
    """Every path in bin ``number``, relative to it, whether it is a directory or sealed into an image."""
    with bin_opened(root, number) as top:
        top_b = os.fsencode(top)
        out = []
        for dirpath, dirnames, filenames in os.walk(top_b):
            out += [os.path.relpath(os.path.join(dirpath, n), top_b) for n in dirnames + filenames]
        return out


@contextmanager
def bin_opened(root: Path, number: int) -> Iterator[Path]:
    """Bin ``number`` as a directory for a block: ``bins/N`` itself, or its sealed image mounted read-only."""
    image = root / "bins" / f"{number}.sfs"
    if not image.exists():
        yield root / "bins" / str(number)
        return
    where = Path(tempfile.mkdtemp(prefix=f"bin{number}-", dir=root.parent))
    subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro,nosuid,nodev", image, where], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", where], check=True)
        where.rmdir()


def sealed(root: Path) -> bool:
    """Whether every committed bin of ``root`` is sealed into an image, and no bin directory is left."""
    h = history(root)
    return all(b["format"] == "sealed" and (root / "bins" / f"{b['number']}.sfs").is_file()
               and not (root / "bins" / str(b["number"])).exists() for b in h["bins"])


def keep_bins_unsealed(root: Path) -> None:
    """``seal = false`` in an existing root's config: bins stay directories (docs/layout.md, "Sealed bins")."""
    config = root / "squashfu.toml"
    config.write_text(config.read_text() + "seal = false\n")


def committed_bins(root: Path) -> list[int]:
    """The bin numbers that have a layer on disk (a directory or an image), sorted."""
    return sorted({int(p.name.removesuffix(".sfs")) for p in (root / "bins").iterdir()
                   if p.name.removesuffix(".sfs").isdigit()})


@contextmanager
def fuse_mounted(root: Path, mountpoint: Path, *extra: str,
                 env: dict[str, str] | None = None) -> Iterator[Path]:
    """``squashfu mount [EXTRA]`` for a block: always unmounted, and its daemon gone, afterwards."""
    mountpoint.mkdir(exist_ok=True)
    squashfu("-r", root, "mount", mountpoint, "--log", mountpoint.parent / "daemon.log", *extra, env=env)
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


@contextmanager
def reachable_by_others(*paths: Path) -> Iterator[None]:
    """Grant o+x on ``paths`` and every directory above them for a block, then put the modes back.

    A fresh clone may sit in a private directory (mktemp -d makes 0700), and
    pytest's own temporary directories are 0700 too.
    """
    saved: dict[Path, int] = {}
    try:
        for target in paths:
            for directory in [target, *target.parents]:
                mode = directory.stat().st_mode
                if directory not in saved and not mode & stat.S_IXOTH:
                    saved[directory] = stat.S_IMODE(mode)
                    os.chmod(directory, stat.S_IMODE(mode) | stat.S_IXOTH)
        yield
    finally:
        for directory, mode in saved.items():
            os.chmod(directory, mode)


def run_as_nobody(argv: list[str | os.PathLike[str]], *, text: bool = True) -> subprocess.CompletedProcess[Any]:
    """Run a command as user nobody, with no runtime directory (the daemon then uses /tmp)."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           *map(os.fspath, argv)], capture_output=True, text=text, stdin=subprocess.DEVNULL,
                          env={**env, "HOME": "/tmp"}, timeout=120)


def code_paths() -> list[Path]:
    """What another user must reach to run the CLI: the package, the venv and the interpreter."""
    import squashfu_fs

    return [Path(squashfu_fs.__file__).resolve().parent, Path(sys.prefix).resolve(),
            Path(sys.executable).resolve().parent]


def as_nobody(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """The CLI run as user nobody, able to reach the interpreter and the code."""
    with reachable_by_others(*code_paths()):
        return run_as_nobody([*CLI, *args])


def acl_of(path: Path) -> bytes | None:
    """A path's POSIX access ACL as stored, or None when it has none."""
    try:
        return os.getxattr(path, b"system.posix_acl_access")
    except OSError:
        return None
