"""The metrics file: Prometheus's textfile-collector format, replaced atomically, never through a symlink.

``metrics_file`` names a path the administrator chose, but its directory is
often writable by someone else (node_exporter's user). So the directory is
opened once and everything happens relative to that fd: the old file is read
with ``O_NOFOLLOW`` (only regular files), the new one is created under a
fresh name with ``O_EXCL`` (a planted symlink or file makes that fail
instead of being written through), written, fsynced, made readable (0644:
the collector is not root) and renamed over the old name, which replaces a
symlink there rather than following it (docs/operations.md, "Metrics").
"""

from __future__ import annotations

import math
import os
import re
import secrets
import stat

from squashfu_fs.errors import MetricsError

# name -> help text; one file holds a root's backup and verify metrics, each run rewriting its own
HELP = {
    "squashfu_backup_last_run_timestamp_seconds": "When the last backup ended (Unix time).",
    "squashfu_backup_last_success_timestamp_seconds":
        "When the last backup that committed a layer ended (exit status 0 or 3).",
    "squashfu_backup_last_status":
        "Exit status of the last backup: 0 ok, 1 failed, 2 usage, 3 committed with a warning.",
    "squashfu_backup_last_duration_seconds": "How long the last backup took.",
    "squashfu_backup_last_files_changed": "Entries the last committed backup wrote into its layer.",
    "squashfu_backup_last_bytes_changed": "Bytes the last committed backup wrote into its layer.",
    "squashfu_verify_last_run_timestamp_seconds": "When the last verify ended (Unix time).",
    "squashfu_verify_last_success_timestamp_seconds": "When the last verify that found no damage ended.",
    "squashfu_verify_last_status": "Exit status of the last verify: 0 no damage, 1 damage or failure.",
    "squashfu_verify_last_duration_seconds": "How long the last verify took.",
    "squashfu_repository_bytes": "Bytes the committed layers take on disk (seed and bins).",
    "squashfu_layers": "Committed layers: the seed and every bin.",
}
MAX_OLD_FILE = 1 << 20  # a metrics file squashfu wrote is a few KiB; anything bigger is not read
_SAMPLE = re.compile(r'^(squashfu_[a-z_]+)\{root="((?:[^"\\]|\\.)*)"\} (\S+)$')


def label(value: str) -> str:
    """A label value escaped as the text format wants (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(root: str, samples: dict[str, float]) -> str:
    """The text format: HELP, TYPE (all gauges) and one sample a metric, in ``HELP``'s order."""
    lines = []
    for name in HELP:
        if name in samples:
            lines += [f"# HELP {name} {HELP[name]}", f"# TYPE {name} gauge",
                      f'{name}{{root="{label(root)}"}} {_number(samples[name])}']
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse(text: str, root: str) -> dict[str, float]:
    """The samples of ``root`` in a file :func:`render` wrote; other lines are ignored."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) in HELP and match.group(2) == label(root):
            try:
                value = float(match.group(3))
            except ValueError:
                continue
            if math.isfinite(value):
                found[match.group(1)] = value
    return found


def update(path: str, root: str, samples: dict[str, float]) -> None:
    """Replace ``path`` with the old file's samples of ``root`` updated by ``samples``; atomic and durable."""
    directory, name = os.path.split(path)
    try:
        dirfd = os.open(directory or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise MetricsError(f"metrics_file {path}: {exc.strerror}") from None
    try:
        merged = {**_read_old(dirfd, name, root), **samples}
        _replace(dirfd, name, render(root, merged).encode())
    except OSError as exc:
        raise MetricsError(f"metrics_file {path}: {exc.strerror}") from None
    finally:
        os.close(dirfd)


def _read_old(dirfd: int, name: str, root: str) -> dict[str, float]:
    """The samples the file holds now; a missing, odd or unreadable file holds none."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_OLD_FILE:
            return {}
        return parse(os.read(fd, MAX_OLD_FILE).decode("utf-8", "replace"), root)
    except OSError:
        return {}
    finally:
        os.close(fd)


def _replace(dirfd: int, name: str, data: bytes) -> None:
    """Write ``data`` under a new name beside ``name`` (O_EXCL), fsync it, rename it over ``name``, fsync the dir."""
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"  # no .prom suffix: the collector skips it while it is written
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, 0o644)  # node_exporter reads it as its own user; it holds no file names
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=dirfd)
        raise
    os.close(fd)
    try:
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        os.unlink(tmp, dir_fd=dirfd)
        raise
    os.fsync(dirfd)
