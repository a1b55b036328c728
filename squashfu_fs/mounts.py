"""Kernel mounts: the seed over a loop device, overlay stacks, and taking them down.

Overlay's options travel in one 4 KiB page, so layer lists are given as short
names relative to a working directory (the backup root) rather than absolute
paths. Every mount made here is taken down by :func:`unmount`, which falls
back to a lazy unmount so that no command leaves a mount behind.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import ExternalCommandError, SquashfuError, UsageError
from .system import run

# Every bin must stay a self-contained upper layer any reader can stack.
OVERLAY_OPTIONS = ("redirect_dir=off", "metacopy=off", "index=off", "uuid=off")
# Set-uid programs and device nodes in a backup are data, never privileges: every kernel mount
# made here is nosuid,nodev, and noexec unless something may run from it (a user's roll-back).
SAFE_OPTIONS = ("nosuid", "nodev")
OPTION_PAGE = 4096


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_point: bytes
    fstype: str
    device: int  # st_dev of the mounted filesystem
    source: bytes
    super_options: str


def _unescape(raw: bytes) -> bytes:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo`` octal."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), raw)


def mount_table() -> list[MountEntry]:
    """The current mounts, innermost last."""
    entries = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.rstrip(b"\n").partition(b" - ")
            fields = left.split(b" ")
            fstype, source, opts = [*right.split(b" "), b"", b"", b""][:3]
            major, minor = fields[2].split(b":")
            entries.append(MountEntry(
                mount_point=_unescape(fields[4]),
                fstype=fstype.decode(),
                device=os.makedev(int(major), int(minor)),
                source=_unescape(source),
                super_options=opts.decode(errors="replace"),
            ))
    return entries


def find_mount(path: str | os.PathLike[str]) -> MountEntry | None:
    """The mount whose mount point is exactly ``path``, if any (the topmost one)."""
    target = os.fsencode(os.path.realpath(path))
    found = None
    for entry in mount_table():
        if entry.mount_point == target:
            found = entry
    return found


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return find_mount(path) is not None


def mounts_below(path: str | os.PathLike[str]) -> list[bytes]:
    """Mount points at or below ``path``, deepest first (the order to unmount)."""
    prefix = os.fsencode(os.path.realpath(path))
    points = {e.mount_point for e in mount_table()
              if e.mount_point == prefix or e.mount_point.startswith(prefix + b"/")}
    return sorted(points, key=lambda p: p.count(b"/"), reverse=True)


def _safe(executable: bool) -> list[str]:
    return [*SAFE_OPTIONS] if executable else [*SAFE_OPTIONS, "noexec"]


def mount_squashfs(image: Path, target: Path) -> None:
    """Loop-mount a SquashFS image read-only, nosuid,nodev,noexec.

    Seed mounts are only ever read by squashfu or stacked under an overlay;
    a program in a roll-back still runs, as the overlay's own mount decides.
    """
    run(["mount", "-t", "squashfs", "-o", ",".join(["loop", "ro", *_safe(False)]), image, target],
        what=f"mounting {image}")


def mount_overlay(target: Path, lowers: Sequence[str], *, upper: str | None = None,
                  work: str | None = None, cwd: Path, executable: bool = False) -> None:
    """Mount overlayfs on ``target`` (nosuid,nodev; noexec unless ``executable``); layers relative to ``cwd``.

    Without ``upper`` the union is read-only and overlay needs two lowers.
    """
    opts = ["lowerdir=" + ":".join(_escape_layer(x) for x in lowers)]
    if upper is not None:
        if work is None:
            raise ValueError("an upper layer needs a workdir")
        opts += [f"upperdir={_escape_layer(upper)}", f"workdir={_escape_layer(work)}"]
    else:
        opts.insert(0, "ro")
    opts += [*_safe(executable), *OVERLAY_OPTIONS]
    option_string = ",".join(opts)
    if len(option_string) >= OPTION_PAGE:
        raise SquashfuError(f"{len(lowers)} layers do not fit overlay's one-page option string")
    run(["mount", "-t", "overlay", "overlay", "-o", option_string, os.path.abspath(target)],
        cwd=cwd, what=f"mounting the overlay on {target}")


@contextmanager
def squashfs_mounted(image: Path, target: Path) -> Iterator[Path]:
    """The image loop-mounted on ``target`` for the length of a block."""
    with _held(target, lambda: mount_squashfs(image, target)):
        yield target


@contextmanager
def overlay_mounted(target: Path, lowers: Sequence[str], *, upper: str | None = None,
                    work: str | None = None, cwd: Path) -> Iterator[Path]:
    """An overlay on ``target`` (see :func:`mount_overlay`) for the length of a block."""
    with _held(target, lambda: mount_overlay(target, lowers, upper=upper, work=work, cwd=cwd)):
        yield target


@contextmanager
def _held(target: Path, mount: Callable[[], None]) -> Iterator[None]:
    # The mount runs inside the try: a SIGTERM or Ctrl-C that lands while the
    # mount command is running (the mount may already exist) still takes it down.
    if is_mounted(target):
        raise SquashfuError(f"{target} is already a mount point; another squashfu may be using it")
    try:
        mount()
        yield
    finally:
        unmount(target)


def _escape_layer(name: str) -> str:
    # overlay splits lowerdir on ':' and the option string on ','; escape both.
    return name.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def unmount(target: str | os.PathLike[str], *, lazy_fallback: bool = True) -> None:
    """Unmount ``target`` if mounted; retry briefly on EBUSY, then detach lazily."""
    if not is_mounted(target):
        return
    last: ExternalCommandError | None = None
    for delay in (0.0, 0.1, 0.3, 1.0):
        time.sleep(delay)
        try:
            run(["umount", os.fspath(target)], what=f"unmounting {os.fsdecode(os.fspath(target))}")
            return
        except ExternalCommandError as exc:
            last = exc
            if not is_mounted(target):
                return
    if lazy_fallback:
        run(["umount", "-l", os.fspath(target)], what=f"lazily unmounting {os.fsdecode(os.fspath(target))}")
        return
    assert last is not None
    raise last


def unmount_all_below(path: str | os.PathLike[str]) -> list[bytes]:
    """Take down every mount at or below ``path``; returns what was unmounted."""
    done = []
    for point in mounts_below(path):
        unmount(os.fsdecode(point))
        done.append(point)
    return done


def check_mountpoint(root: Path, mountpoint: Path) -> None:
    """A mount point of the history must be an existing empty directory, outside the backup root."""
    mp = os.path.realpath(mountpoint)
    real_root = os.path.realpath(root)
    if mp == real_root or mp.startswith(real_root.rstrip("/") + "/"):
        raise UsageError(f"mountpoint {mountpoint} is inside the backup root {root}; choose another")
    if real_root.startswith(mp.rstrip("/") + "/"):
        raise UsageError(f"mountpoint {mountpoint} contains the backup root {root}; choose another")
    if is_mounted(mountpoint):
        raise UsageError(f"{mountpoint} is already a mount point (`squashfu umount {mountpoint}` first)")
    try:
        if not os.path.isdir(mountpoint):
            raise UsageError(f"mountpoint {mountpoint} is not an existing directory")
        if os.listdir(mountpoint):
            raise UsageError(f"mountpoint {mountpoint} is not empty")
    except OSError as exc:
        raise UsageError(f"mountpoint {mountpoint}: {exc.strerror}") from None
