"""rclone, the engine of offsite copies on object stores: every rclone command line lives here.

A copy at ``rclone:REMOTE:PATH`` is reached only through these functions
(docs/operations.md, "Offsite copies"). They take plain values: ``target``
is rclone's own ``REMOTE:PATH`` (a local path works too), names are relative
to it. rclone reads its remotes from its own config (``RCLONE_CONFIG`` or
``--config`` in ``RCLONE_*`` variables), never from squashfu's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from squashfu_fs.engines.run import last_line, require, run
from squashfu_fs.errors import ExternalCommandError

NOT_FOUND = 3  # rclone's exit status for a directory that does not exist


@dataclass(frozen=True)
class Entry:
    """One name at a copy: a file with its size and modification time, or a directory."""

    name: str
    size: int
    mtime: str
    is_dir: bool


def join(target: str, name: str) -> str:
    """``target/name`` as rclone spells it (``REMOTE:`` alone takes no slash)."""
    return target + name if target.endswith((":", "/")) else f"{target}/{name}"


def _base() -> list[str]:
    return [require("rclone"), "--quiet"]


_STAMP = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (?:[A-Z]+ +: +)?")


def complaint(stderr: bytes) -> str:
    """rclone's last complaint as one line, without its time stamp and level."""
    return _STAMP.sub("", last_line(stderr))


def _run(argv: list[str], what: str) -> bytes:
    proc = run(argv, what=what, check=False)
    if proc.returncode != 0:
        raise ExternalCommandError(f"{what} failed (exit {proc.returncode}): {complaint(proc.stderr)}",
                                   proc.returncode)
    return proc.stdout


def listing(target: str) -> dict[str, Entry] | None:
    """The entries directly below ``target`` by name; None when it does not exist."""
    proc = run([*_base(), "lsjson", "--max-depth", "1", target], what="rclone lsjson", check=False)
    if proc.returncode == NOT_FOUND:
        return None
    if proc.returncode != 0:
        raise ExternalCommandError(f"rclone lsjson {target} failed (exit {proc.returncode}): "
                                   f"{complaint(proc.stderr)}", proc.returncode)
    try:
        rows = json.loads(proc.stdout)
        return {row["Name"]: Entry(row["Name"], int(row.get("Size", 0)), str(row.get("ModTime", "")),
                                   bool(row.get("IsDir"))) for row in rows}
    except (ValueError, KeyError, TypeError) as exc:
        raise ExternalCommandError(f"rclone lsjson {target}: output not understood ({exc})") from None


def read(target: str, name: str) -> bytes:
    """The contents of the small file ``name`` (history, config), which a listing showed."""
    return _run([*_base(), "cat", join(target, name)], f"rclone cat {join(target, name)}")


def copy_to(source: str | Path, destination: str) -> None:
    """Copy one file (a local path or another rclone path) to exactly ``destination``, its mtime kept.

    ``--ignore-times``: the caller decided that this file must be copied.
    """
    _run([*_base(), "copyto", "--ignore-times", os.fspath(source), destination], f"rclone copyto {destination}")


def cat_into(source: str, fd: int) -> None:
    """Write the file ``source`` (an rclone path) into the open file ``fd``: rclone is given no local name at all."""
    proc = subprocess.run([*_base(), "cat", source], stdin=subprocess.DEVNULL, stdout=fd,
                          stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise ExternalCommandError(f"rclone cat {source} failed (exit {proc.returncode}): {complaint(proc.stderr)}",
                                   proc.returncode)


def move_to(source: str, destination: str) -> None:
    """Rename ``source`` to ``destination`` at the same remote (a server-side copy where rename is missing)."""
    _run([*_base(), "moveto", source, destination], f"rclone moveto {destination}")


def delete_file(path: str) -> None:
    """Delete one file that a listing showed."""
    _run([*_base(), "deletefile", path], f"rclone deletefile {path}")


def purge(path: str) -> None:
    """Delete a directory that a listing showed, and everything in it."""
    _run([*_base(), "purge", path], f"rclone purge {path}")


def sha256(target: str, name: str) -> str:
    """The SHA-256 (hex) of file ``name``: the backend's own where it keeps one, else by reading it.

    ``--download`` makes rclone read the file when the backend stores no
    SHA-256 (S3 keeps only MD5): every byte then crosses the network.
    """
    path = join(target, name)
    for extra in ([], ["--download"]):
        proc = subprocess.run([*_base(), "hashsum", "sha256", *extra, path], stdin=subprocess.DEVNULL,
                              capture_output=True, check=False)
        line = proc.stdout.split(b"\n", 1)[0].split()
        if proc.returncode == 0 and line and len(line[0]) == 64:
            return line[0].decode()
    raise ExternalCommandError(f"rclone hashsum sha256 {path} failed (exit {proc.returncode}): "
                               f"{complaint(proc.stderr)}", proc.returncode)
