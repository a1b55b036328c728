"""Kernel mounts: the seed over a loop device, overlay stacks, and taking them down.

Overlay's options travel in one 4 KiB page, so layer lists are given as short
names relative to a working directory (the backup root) rather than absolute
paths. Every mount squashfu makes, kernel or FUSE, is taken down by
:func:`unmount`, which falls back to a lazy unmount so that no command
leaves a mount behind.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from squashfu_fs.engines.run import last_line, run
from squashfu_fs.errors import ExternalCommandError, SquashfuError, UsageError
from squashfu_fs.util import beneath

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
    super_options: str  # as mountinfo shows them: values still octal-escaped (see option_values)
    fs_root: bytes = b"/"  # the directory of the filesystem mounted here (not "/" for a bind mount)


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
                super_options=opts.decode(errors="surrogateescape"),
                fs_root=_unescape(fields[3]),
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


def option_values(entry: MountEntry, name: str) -> list[bytes]:
    """The values of option ``name`` in a mount's super options, exactly as they were given to mount.

    mountinfo separates options with commas and octal-escapes the comma,
    space, tab, newline and backslash inside a value, so split first, then
    unescape.
    """
    prefix = name.encode() + b"="
    raw = os.fsencode(entry.super_options)
    return [_unescape(o)[len(prefix):] for o in raw.split(b",") if _unescape(o).startswith(prefix)]


def split_layers(lowerdir: bytes) -> list[bytes]:
    """An overlay ``lowerdir`` value as the paths it names: ``:`` separates, ``\\`` escapes (see _escape_layer)."""
    layers, current, escaped = [], bytearray(), False
    for byte in lowerdir:
        if escaped:
            current.append(byte)
            escaped = False
        elif byte == ord("\\"):
            escaped = True
        elif byte == ord(":"):
            layers.append(bytes(current))
            current = bytearray()
        else:
            current.append(byte)
    layers.append(bytes(current))
    return layers


def overlay_layers(entry: MountEntry) -> list[bytes]:
    """Every layer path an overlay mount was given, whether as one ``lowerdir`` list or one by one."""
    layers = [layer for value in option_values(entry, "lowerdir") for layer in split_layers(value)]
    return layers + option_values(entry, "lowerdir+") + option_values(entry, "datadir+")


def aliases(fd: int) -> list[bytes]:
    """Every path at which the directory open on ``fd`` is visible: bind mounts included.

    Text from mountinfo only proposes candidates; each one is kept only if it
    is the same directory by device and inode.
    """
    st = os.fstat(fd)
    here = os.fsencode(os.readlink(f"/proc/self/fd/{fd}"))
    table = [e for e in mount_table() if e.device == st.st_dev]
    through = [e for e in table if _below(here, e.mount_point)]
    if not through:  # e.g. a btrfs subvolume, whose files report another device than its mount
        return [here]
    entry = max(through, key=lambda e: len(e.mount_point))
    inner = entry.fs_root.rstrip(b"/") + here[len(entry.mount_point.rstrip(b"/")):]
    found = [here]
    for other in table:
        if not _below(inner, other.fs_root):
            continue
        candidate = other.mount_point.rstrip(b"/") + inner[len(other.fs_root.rstrip(b"/")):]
        try:
            cst = os.stat(candidate or b"/")
        except OSError:
            continue
        if (cst.st_dev, cst.st_ino) == (st.st_dev, st.st_ino) and candidate not in found:
            found.append(candidate or b"/")
    return found


def above(fd: int) -> set[tuple[int, int]]:
    """(device, inode) of ``fd``'s directory and of every directory above it, through every alias.

    ``X in above(fd)`` means the directory open on ``fd`` is X or sits inside
    it, however either is named: ``..`` is climbed from file descriptors
    (:func:`beneath.lineage`), starting again from every bind mount of it.
    """
    ids = {(s.st_dev, s.st_ino) for s in beneath.lineage(fd)}
    for alias in aliases(fd)[1:]:
        try:
            alias_fd = os.open(alias, beneath.PATH_FLAGS)
        except OSError:
            continue
        try:
            ids.update((s.st_dev, s.st_ino) for s in beneath.lineage(alias_fd))
        finally:
            os.close(alias_fd)
    return ids


def _below(path: bytes, top: bytes) -> bool:
    return top == b"/" or path == top or path.startswith(top.rstrip(b"/") + b"/")


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


# How long to wait for a busy mount before detaching it: at once, then after each delay.
PATIENCE = (0.0, 0.1, 0.3, 1.0)


def unmount(target: str | os.PathLike[str], *, patience: Sequence[float] = PATIENCE) -> None:
    """Unmount ``target`` if mounted: try again after each delay in ``patience`` while busy, then detach lazily.

    The one way squashfu takes a mount down. A FUSE mount is taken down with
    ``fusermount3`` when not root (a user may unmount only that way); an
    empty ``patience`` detaches at once.
    """
    entry = find_mount(target)
    if entry is None:
        return
    name = os.fsdecode(os.fspath(target))
    fusermount = entry.fstype.startswith("fuse") and os.geteuid() != 0
    for delay in patience:
        time.sleep(delay)
        proc = run(["fusermount3", "-u", target] if fusermount else ["umount", target], check=False)
        if proc.returncode == 0 or not is_mounted(target):
            return
        if "busy" not in proc.stderr.decode(errors="replace").lower():
            break
    proc = run(["fusermount3", "-u", "-z", target] if fusermount else ["umount", "-l", target], check=False)
    if proc.returncode != 0 and is_mounted(target):
        raise ExternalCommandError(f"lazily unmounting {name} failed (exit {proc.returncode}): "
                                   f"{last_line(proc.stderr)}", proc.returncode)


def check_mountpoint(root: Path, mountpoint: Path) -> None:
    """A mount point of the history must be an existing empty directory, outside the backup root.

    Inside and around are judged by device and inode (:func:`above`), so a
    symlink or a bind mount of the root is seen through.
    """
    try:
        fd = os.open(mountpoint, beneath.DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"mountpoint {mountpoint} is not an existing directory") from None
    except OSError as exc:  # e.g. a FUSE mount whose daemon died: "Transport endpoint is not connected"
        if is_mounted(mountpoint):
            raise UsageError(f"{mountpoint} is already a mount point (`squashfu umount {mountpoint}` first)") from None
        raise UsageError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    try:
        root_fd = os.open(root, beneath.PATH_FLAGS)
        try:
            st, root_st = os.fstat(fd), os.fstat(root_fd)
            if (root_st.st_dev, root_st.st_ino) in above(fd):
                raise UsageError(f"mountpoint {mountpoint} is inside the backup root {root}; choose another")
            if (st.st_dev, st.st_ino) in above(root_fd):
                raise UsageError(f"mountpoint {mountpoint} contains the backup root {root}; choose another")
        finally:
            os.close(root_fd)
        if is_mounted(mountpoint):
            raise UsageError(f"{mountpoint} is already a mount point (`squashfu umount {mountpoint}` first)")
        if os.listdir(fd):
            raise UsageError(f"mountpoint {mountpoint} is not empty")
    except OSError as exc:
        raise UsageError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    finally:
        os.close(fd)
