"""rsync, the copying engine: its options live here and nowhere else.

``-aHAX --numeric-ids --delete --delete-excluded`` keeps hard links, ACLs,
xattrs and owners, and never ``-u`` (a file whose mtime went backwards is
still a change). The exit status is classified as docs/commands.md
("Exit status") wants: vanished files are a warning, unreadable ones a
committed-but-partial backup.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from squashfu_fs.engines.run import require
from squashfu_fs.errors import ExternalCommandError
from squashfu_fs.util import faults, process
from squashfu_fs.util.units import human

# What every copy into or out of the history preserves.
PRESERVE = ("-aHAX", "--numeric-ids", "--sparse")
# What a backup adds: the union must end up equal to the source.
MIRROR = ("--delete", "--delete-excluded")

OK = 0
PARTIAL = 23  # some files could not be read or written: commit, exit 3
VANISHED = 24  # source files vanished while being copied: a warning only
ACCEPTABLE = (OK, PARTIAL, VANISHED)
SSH_FAILED = 255  # the remote shell could not connect, or the connection broke


@dataclass(frozen=True)
class RsyncResult:
    """What one rsync run did, from its exit status and ``--stats``."""

    status: int
    files_transferred: int
    bytes_transferred: int
    created: int
    deleted: int
    errors: tuple[str, ...]  # rsync's own complaints, one per line
    entries: int = 0  # "Number of files" of --stats: what the source holds below its top, as rsync listed it
    made_devices: tuple[bytes, ...] = ()  # devices rsync created (only with ``itemize``), relative to the target

    @property
    def partial(self) -> bool:
        return self.status == PARTIAL


def backup_args(source: Path | str, target: Path, excludes: Sequence[str], *, dry_run: bool = False,
                rsh: str | None = None, itemize: bool = False, selection: Sequence[bytes] = ()) -> list[str | bytes]:
    """The rsync command that mirrors ``source`` into the union at ``target``.

    ``source`` is a local directory, or with ``rsh`` (the command line rsync's
    ``-e`` runs) a remote ``[USER@]HOST:PATH``, whose rsync runs as the ssh user.
    ``itemize`` names every created item on stdout, so :func:`run` can tell which
    devices came from the source. With a ``selection`` (several local sources,
    relative to ``source``) only those subtrees are mirrored, each under its
    own path: ``--relative`` with ``SOURCE/./etc``, so excludes stay anchored
    at ``source`` and the directories above each one come with their
    attributes; ``--delete`` acts only inside the selected subtrees.
    """
    args: list[str | bytes] = [require("rsync"), *PRESERVE, *MIRROR, "--stats", *_rsh_args(rsh),
                               *_exclude_args(excludes)]
    if dry_run:
        args += ["--dry-run", "--itemize-changes", "--out-format=%i %n%L"]
    elif itemize:
        args += [ITEMIZE]
    if selection:
        top = os.fsencode(source).rstrip(b"/")
        return [*args, "--relative", *(top + b"/./" + rel for rel in selection), _dir(target)]
    return [*args, _dir(source), _dir(target)]


# One line per item rsync changes: its itemize code, then the name (rsync escapes odd bytes as \#ooo).
ITEMIZE = "--out-format=>item %i %n"
_MADE_DEVICE = re.compile(rb"^>item cD\S* (.*)$", re.MULTILINE)


def list_top_args(source: str, rsh: str | None) -> list[str]:
    """The rsync command that lists the source's top directory only: is it there, is it a directory, is it empty."""
    return [require("rsync"), "--list-only", "--dirs", "--numeric-ids", *_rsh_args(rsh), _dir(source)]


def top_entries(listing: bytes) -> int | None:
    """How many entries ``--list-only --dirs`` shows below the top, or None when the top is not a directory."""
    lines = [ln for ln in listing.splitlines() if ln.strip()]
    top = [ln for ln in lines if ln.split(None, 4)[4:] == [b"."]]
    if not top or not top[0].startswith(b"d"):
        return None
    return len(lines) - 1


def list_top(source: str, rsh: str | None) -> int | None:
    """List the source's top directory: how many entries it holds, or None when it is not a directory.

    Cheap (one directory, no data): a remote source is looked at this way
    before anything is written, so an unreachable host or a missing path fails
    with rsync's or ssh's own reason in one line.
    """
    proc = subprocess.run(list_top_args(source, rsh), stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if proc.returncode != 0:
        raise ExternalCommandError(f"cannot read the source {source}: {_reason(proc.stderr)}", proc.returncode)
    return top_entries(proc.stdout)


def _reason(stderr: bytes) -> str:
    """The line of rsync's stderr that says why: ssh's own complaint first, then rsync's first one."""
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    for line in lines:
        if not line.startswith("rsync"):
            return line  # ssh's: "connect to host ...", "Permission denied", "Could not resolve hostname"
    for line in lines:
        if line.startswith("rsync:") and "connection unexpectedly closed" not in line:
            return line.removeprefix("rsync: ").removeprefix("[sender] ")
    return lines[-1] if lines else "no message"


def _rsh_args(rsh: str | None) -> list[str]:
    return ["-e", rsh] if rsh is not None else []


def changed_args(source: Path, target: Path, excludes: Sequence[str], files_from: Path, *,
                 into_bin: bool = False) -> list[str]:
    """The rsync command that copies just the listed paths (NUL-separated) into the union.

    A listed path deleted since the walk is skipped quietly, as a full rsync
    would never have seen it; the next night's walk records the deletion.
    ``--ignore-times``: every listed path changed (its ctime moved), so rsync's
    quick check (same size and mtime means unchanged) must not skip it; a
    rewrite within the same second, or with its mtime put back, is copied.
    ``into_bin``: ``target`` is a bin directory, not a union, so a source's
    own ``trusted.overlay.*`` xattrs are left for squashfu to store escaped.
    """
    args = [require("rsync"), *PRESERVE, "--ignore-times", "--stats", f"--files-from={files_from}", "--from0",
            "--ignore-missing-args", *(["--filter=-x trusted.overlay.*"] if into_bin else []),
            *_exclude_args(excludes)]
    return [*args, _dir(source), _dir(target)]


def copy_args(source: bytes, target: bytes | Path, *, delete: bool = False) -> list[str | bytes]:
    """The rsync command that copies out of the history with all metadata.

    ``source`` is passed verbatim: with a trailing slash rsync copies a
    directory's contents, without one the directory itself. Restore passes
    both as ``/proc/self/fd/N`` names of directories it has checked.
    """
    args: list[str | bytes] = [require("rsync"), *PRESERVE, "--stats"]
    if delete:
        args.append("--delete")
    return [*args, source, os.fspath(target)]


def _shell(rsh: str | None) -> list[str]:
    """``-e RSH`` for a far side reached over ssh (rsync splits the command line itself)."""
    return ["-e", rsh] if rsh else []


def sync_args(source: Path, dest: str, files_from: Path, *, rsh: str | None = None) -> list[str]:
    """The rsync command that copies the listed layer files of a root to a copy (docs/operations.md).

    Each file is written under a temporary name in the copy's ``.work/`` and
    renamed into place once whole and fsynced, so a killed sync leaves only
    scratch there. ``-r``: a directory bin listed is copied whole, with its
    whiteouts, ``trusted.overlay`` xattrs, owners and hard links.
    """
    return [require("rsync"), *PRESERVE, "-r", "--fsync", "--temp-dir=.work", f"--files-from={files_from}",
            "--from0", *_shell(rsh), _dir(source), dest.rstrip("/") + "/"]


def put_args(files: Sequence[str], dest: str, *, rsh: str | None = None, mkpath: bool = False) -> list[str]:
    """The rsync command that puts local files (a copy's skeleton, config, history) into ``dest``.

    Each file is renamed into place once whole; ``mkpath`` (the skeleton)
    makes ``dest`` and its parents first.
    """
    return [require("rsync"), "-a", "--fsync", *(["--mkpath"] if mkpath else ["--temp-dir=.work"]),
            *_shell(rsh), *files, dest.rstrip("/") + "/"]


def list_args(dest: str, *, rsh: str | None = None) -> list[str]:
    """The rsync command that lists one directory of a copy (``--list-only``)."""
    return [require("rsync"), "--list-only", *_shell(rsh), dest.rstrip("/") + "/"]


def fetch_args(source: str, target: Path, *, rsh: str | None = None) -> list[str]:
    """The rsync command that fetches one small file of a copy."""
    return [require("rsync"), "--times", *_shell(rsh), source, os.fspath(target)]


def delete_args(empty: Path, dest: str, names: Sequence[str], *, rsh: str | None = None) -> list[str]:
    """The rsync command that deletes exactly ``names`` (files or whole directories) directly in ``dest``.

    An empty directory is mirrored with ``--delete``, and every name but
    those is excluded (excluded names are never deleted).
    """
    rules = [rule for name in names for rule in (f"--include=/{name}", f"--include=/{name}/***")]
    return [require("rsync"), "-r", "--delete", *rules, "--exclude=*", *_shell(rsh), _dir(empty),
            dest.rstrip("/") + "/"]


def _exclude_args(excludes: Sequence[str]) -> list[str]:
    return [f"--exclude={pattern}" for pattern in excludes]


def _dir(path: Path | str) -> str:
    return os.fspath(path).rstrip("/") + "/"


def run(args: Sequence[str | bytes], *, log: Path | None = None, progress: bool = False,
        echo_items: bool = False, label: str = "rsync", pass_fds: Sequence[int] = ()) -> RsyncResult:
    """Run rsync, feed a progress bar from ``--info=progress2``, parse its stats.

    rsync's stderr (the names of files it could not read) is appended to
    ``log``, or kept in a temporary file; its complaints come back in
    :attr:`RsyncResult.errors`. A status outside :data:`ACCEPTABLE` raises
    :class:`ExternalCommandError`. ``pass_fds`` stay open in rsync (and the
    receiver it forks), for arguments that name them as ``/proc/self/fd/N``.
    """
    # --no-inc-recursive: the bar's percentage is of the whole tree, not of what was found so far
    args = [args[0], "--info=progress2", "--no-inc-recursive", *args[1:]] if progress else list(args)
    with open(log, "a+b", opener=_private) if log is not None else tempfile.TemporaryFile() as err:
        start = err.tell()
        proc: subprocess.Popen[bytes] | None = None
        try:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                    pass_fds=tuple(pass_fds))
            faults.checkpoint("rsync-running")
            assert proc.stdout is not None
            out = _pump(proc.stdout, progress=progress, echo_items=echo_items, label=label)
            status = proc.wait()
        except BaseException:
            # Interrupted (SIGTERM, Ctrl-C): rsync must not write on while the caller cleans up. A signal
            # that lands inside Popen, after the fork, leaves no handle: find that rsync as our child.
            if proc is not None:
                _stop(proc)
            else:
                _stop_strays()
            raise
        err.seek(start)
        complaints = err.read().decode(errors="replace")
    errors = tuple(ln for ln in complaints.splitlines() if ln.startswith("rsync"))
    if status not in ACCEPTABLE:
        detail = errors[-1] if errors else f"see {log}" if log else "no message"
        if status == SSH_FAILED:  # ssh (or the -e command) failed: its own line says why, rsync's does not
            detail = _reason(complaints.encode())
        raise ExternalCommandError(f"rsync failed (exit {status}): {detail}", status)
    return RsyncResult(
        status=status,
        files_transferred=_stat(out, rb"Number of regular files transferred: ([\d,]+)"),
        bytes_transferred=_stat(out, rb"Total transferred file size: ([\d,]+)"),
        created=_stat(out, rb"Number of created files: ([\d,]+)"),
        deleted=_stat(out, rb"Number of deleted files: ([\d,]+)"),
        errors=errors,
        entries=max(_stat(out, rb"Number of files: ([\d,]+)") - 1, 0),  # rsync counts the top directory too
        made_devices=tuple(_unescape(m.group(1)) for m in _MADE_DEVICE.finditer(out)),
    )


def _unescape(name: bytes) -> bytes:
    """rsync prints bytes it cannot show as ``\\#ooo``."""
    return re.sub(rb"\\#([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), name)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill an rsync that is still running, and the receiver and generator it forked; wait until all are gone.

    They would otherwise write on into the bin the caller is about to remove
    (a terminated rsync leaves its children running). Whatever they were
    writing is thrown away with the partial bin, so SIGKILL is fine.
    """
    if proc.poll() is not None:
        return
    forked: list[tuple[int, str | None]] = []
    for _ in range(5):  # the children first, while rsync lives to be their parent; again for a late fork
        found = [(pid, start) for pid in process.descendants(proc.pid)
                 if (pid, start := process.process_start_time(pid)) not in forked and start is not None]
        for pid, _ in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        forked += found
        if not found:
            break
    proc.kill()
    proc.wait()
    process.wait_gone(forked, timeout=10)


def _stop_strays() -> None:
    """Kill the rsync processes this process started but holds no handle of, and wait until they are gone."""
    strays = [(pid, process.process_start_time(pid)) for pid in process.descendants(os.getpid())
              if process.command_name(pid) == "rsync"]
    for pid, _ in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid, _ in strays:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    process.wait_gone(strays, timeout=10)


def _private(path: str, flags: int) -> int:
    """Logs name backed-up files: 0600, and never through a symlink."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _stat(out: bytes, pattern: bytes) -> int:
    match = re.search(pattern, out)
    return int(match.group(1).replace(b",", b"")) if match else 0


_PROGRESS = re.compile(rb"^\s*([\d,]+)\s+(\d+)%\s+(\S+)\s+(\S+)")


def _pump(stream: object, *, progress: bool, echo_items: bool, label: str) -> bytes:
    """Read rsync's stdout; draw progress lines on stderr, keep the rest."""
    kept = bytearray()
    pending = b""
    last_draw = 0.0
    read = stream.read1 if hasattr(stream, "read1") else stream.read  # type: ignore[attr-defined]
    while True:
        chunk = read(65536)
        if not chunk:
            break
        pending += chunk
        *pieces, pending = re.split(rb"[\r\n]", pending)
        for piece in pieces:
            match = _PROGRESS.match(piece) if progress else None
            if match:
                now = time.monotonic()
                if now - last_draw >= 0.2:
                    last_draw = now
                    done = int(match.group(1).replace(b",", b""))
                    sys.stderr.write(f"\r{label}: {int(match.group(2)):3d}%  {human(done)}  "
                                     f"{match.group(3).decode()}  {match.group(4).decode()}   ")
                    sys.stderr.flush()
                continue
            kept += piece + b"\n"
            if echo_items and piece and not piece.startswith((b"Number of", b"Total", b"Literal",
                                                                b"Matched", b"File list", b"sent ",
                                                                b"total size")):
                sys.stdout.buffer.write(piece + b"\n")
    kept += pending
    if progress:
        sys.stderr.write("\r" + " " * 72 + "\r")
        sys.stderr.flush()
    return bytes(kept)
