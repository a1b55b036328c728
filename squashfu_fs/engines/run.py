"""Running the engines: argument lists only, a missing tool named with its package (docs/commands.md)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from squashfu_fs.errors import ExternalCommandError, MissingToolError

# tool -> Debian package that provides it
PACKAGES = {
    "mksquashfs": "squashfs-tools",
    "unsquashfs": "squashfs-tools",
    "rsync": "rsync",
    "mount": "mount",
    "umount": "mount",
    "fusermount3": "fuse3",
    "squashfuse_ll": "squashfuse",
    "rclone": "rclone",
}

Arg = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def require(tool: str) -> str:
    """The absolute path of ``tool``, or a clear error naming its package."""
    path = shutil.which(tool)
    if path is None:
        package = PACKAGES.get(tool, tool)
        raise MissingToolError(f"{tool} is not installed (apt-get install {package})")
    return path


def run(argv: Sequence[Arg], *, what: str | None = None, cwd: Arg | None = None,
        check: bool = True, pass_fds: Sequence[int] = ()) -> subprocess.CompletedProcess[bytes]:
    """Run a command, capturing output; raise a one-line error when it fails.

    ``pass_fds`` stay open in the command, for arguments that name them as ``/proc/self/fd/N``.
    """
    args = [os.fsdecode(a) if not isinstance(a, bytes) else a for a in argv]
    require(os.fsdecode(args[0]))
    proc = subprocess.run(args, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, check=False,
                          pass_fds=tuple(pass_fds))
    if check and proc.returncode != 0:
        raise ExternalCommandError(
            f"{what or os.fsdecode(args[0])} failed (exit {proc.returncode}): {last_line(proc.stderr)}",
            proc.returncode,
        )
    return proc


def last_line(output: bytes) -> str:
    """The last non-empty line of a tool's output, for a one-line error."""
    lines = [ln.strip() for ln in output.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


SHELL = "/bin/sh"


@dataclass(frozen=True)
class ShellResult:
    """How a shell command line ended: its exit status, or that it was killed at its timeout."""

    returncode: int
    timed_out: bool


def run_shell(command: str, *, env: dict[str, str], timeout: float, output: int) -> ShellResult:
    """``/bin/sh -c COMMAND`` in its own process group, its output on the fd ``output``; killed at ``timeout``.

    The one place squashfu runs a shell: an administrator's hook
    (docs/operations.md, "Hooks"). At the timeout, and if squashfu itself is
    interrupted meanwhile, the whole process group gets SIGKILL, so a
    pipeline or a child the hook forked does not outlive it.
    """
    proc = subprocess.Popen([SHELL, "-c", command], stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                            env=env, cwd="/", start_new_session=True)
    timed_out = False
    try:
        deadline = time.monotonic() + timeout
        # Wait for the shell without reaping it: while it is unreaped its PID cannot name another group.
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                timed_out = True
                break
            time.sleep(0.05)
    finally:
        _kill_group(proc.pid)  # at the timeout, on Ctrl-C, and whatever the hook left running in its group
        proc.wait()
    return ShellResult(proc.returncode, timed_out=timed_out)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
