"""Acting on trees other people control: every path is resolved beneath a directory fd.

squashfu runs as root over sources (and unions of them) that users write to
while the backup runs. A user who swaps a directory for a symlink between our
walk and our write must not steer a delete, chown or xattr outside the tree.
So every write below names its target as (directory fd, relative bytes path)
and resolves it with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``: a
symlink in any component, or a ``..`` that climbs out, fails with ``ELOOP`` or
``EXDEV`` instead of being followed. Kernels without ``openat2`` (before 5.6)
get the same guarantee from a component-by-component ``O_NOFOLLOW`` walk.
See docs/security.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import itertools
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SYS_OPENAT2 = 437  # the same number on every architecture Linux added it to
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
STRICT = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC  # names a directory; needs no read permission on it


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


libc = ctypes.CDLL(None, use_errno=True)  # the C library, for the system calls Python does not wrap
_have_openat2 = True


def _openat2(dirfd: int, rel: bytes, flags: int, mode: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, STRICT)
    fd = libc.syscall(SYS_OPENAT2, ctypes.c_int(dirfd), ctypes.c_char_p(rel), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), rel)
    return int(fd)


def components(rel: bytes) -> list[bytes]:
    """The names of a relative path; refuses absolute paths and ``..``."""
    parts = [p for p in rel.split(b"/") if p not in (b"", b".")]
    if rel.startswith(b"/") or b".." in parts:
        raise OSError(errno.EXDEV, "path leaves its directory", rel)
    return parts


def open_beneath(dirfd: int, rel: bytes, flags: int = DIR_FLAGS, mode: int = 0) -> int:
    """Open ``rel`` below ``dirfd`` following no symlink anywhere; the caller closes the fd.

    The last component is opened with ``flags`` (``O_NOFOLLOW`` is implied:
    a symlink there fails with ``ELOOP``, unless ``flags`` has ``O_PATH``,
    which then names the link itself).
    """
    global _have_openat2
    parts = components(rel)
    if not parts:
        return os.open(".", flags | os.O_CLOEXEC, dir_fd=dirfd)
    if _have_openat2:
        try:
            return _openat2(dirfd, b"/".join(parts), flags | os.O_NOFOLLOW, mode)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            _have_openat2 = False  # a kernel before 5.6, or a seccomp filter that hides it
    return _walk_nofollow(dirfd, parts, flags, mode)


def _walk_nofollow(dirfd: int, parts: list[bytes], flags: int, mode: int) -> int:
    """The fallback: one ``openat(O_NOFOLLOW)`` per component."""
    current = dirfd
    try:
        for name in parts[:-1]:
            nxt = os.open(name, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=current)
            if current != dirfd:
                os.close(current)
            current = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=current)
    finally:
        if current != dirfd:
            os.close(current)


@contextmanager
def opened(dirfd: int, rel: bytes, flags: int = DIR_FLAGS) -> Iterator[int]:
    """:func:`open_beneath` for the length of a block."""
    fd = open_beneath(dirfd, rel, flags)
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def opened_root(path: str | bytes | os.PathLike[str] | os.PathLike[bytes], *, follow: bool = False) -> Iterator[int]:
    """The top of a tree squashfu acts on, opened as a directory.

    It must not itself be a symlink, unless ``follow``: the configured source
    path is the administrator's, and rsync follows it too (``SRC/``).
    """
    fd = os.open(path, DIR_FLAGS if follow else DIR_FLAGS | os.O_NOFOLLOW)
    try:
        yield fd
    finally:
        os.close(fd)


def parent_and_name(rel: bytes) -> tuple[bytes, bytes]:
    """Split a relative path into the directory to open and the name inside it."""
    parts = components(rel)
    if not parts:
        raise OSError(errno.EINVAL, "the top directory has no parent", rel)
    return b"/".join(parts[:-1]), parts[-1]


@contextmanager
def parent_of(dirfd: int, rel: bytes) -> Iterator[tuple[int, bytes]]:
    """The directory holding ``rel`` (opened beneath ``dirfd``) and the last name, for ``*at`` calls."""
    parent, name = parent_and_name(rel)
    with opened(dirfd, parent) as pfd:
        yield pfd, name


def lstat_beneath(dirfd: int, rel: bytes) -> os.stat_result:
    """The ``lstat`` of ``rel`` below ``dirfd``, resolving no symlink on the way."""
    if not components(rel):
        return os.stat(dirfd)
    with parent_of(dirfd, rel) as (pfd, name):
        return os.stat(name, dir_fd=pfd, follow_symlinks=False)


def remove_beneath(dirfd: int, rel: bytes) -> bool:
    """Delete ``rel`` (a file, or a whole tree) below ``dirfd``; False if it was not there.

    A directory is removed with ``shutil.rmtree(dir_fd=...)``, which walks by
    file descriptor and never follows a symlink. A parent that is now a symlink
    raises ``ELOOP``: the caller decides whether that is an error.
    """
    try:
        with parent_of(dirfd, rel) as (pfd, name):
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(name, dir_fd=pfd)
            else:
                os.unlink(name, dir_fd=pfd)
            return True
    except FileNotFoundError:
        return False


def make_below(top: int, names: list[bytes]) -> int:
    """Create each missing name of ``names`` as a 0700 directory below the last, from ``top``, following no symlink.

    Returns an fd of the last one (or of ``top`` itself when ``names`` is
    empty): the restore target or copy that a command then works in.
    """
    current = os.open(".", PATH_FLAGS, dir_fd=top)
    try:
        for name in names:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=current)
            below = open_beneath(current, name)
            os.close(current)
            current = below
    except BaseException:
        os.close(current)
        raise
    return current


def fd_path(fd: int) -> str:
    """A path that names exactly the object ``fd`` is open on (for calls that take no fd)."""
    return f"/proc/self/fd/{fd}"


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two stats are of one object: device and inode, never the path text."""
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


MAX_DEPTH = 4096  # PATH_MAX / 1: no real tree is deeper


def lineage(fd: int) -> list[os.stat_result]:
    """The directory open on ``fd`` and every directory above it, up to ``/``, found by ``..``.

    Climbing by ``..`` from a file descriptor reads the kernel's own idea of
    the parent: no path text, no symlink, so a renamed or symlinked path
    cannot make a directory look as if it sat somewhere else. ``O_PATH``
    opens need no read permission, so a normal user can climb too.
    """
    chain = [os.fstat(fd)]
    current = os.open(".", PATH_FLAGS, dir_fd=fd)
    try:
        for _ in range(MAX_DEPTH):
            parent = os.open("..", PATH_FLAGS, dir_fd=current)
            os.close(current)
            current = parent
            st = os.fstat(current)
            if same_file(st, chain[-1]):  # ".." of "/" is "/"
                break
            chain.append(st)
    finally:
        os.close(current)
    return chain


def changeable_by_others(chain: list[os.stat_result]) -> os.stat_result | None:
    """The first directory of a :func:`lineage` above its start that another user could change, or None.

    Another user than root (and the caller) can rename or replace what is in
    a directory they own, or one that their group or everyone may write: they
    could swap the directory below it for a symlink. A sticky directory
    (``/tmp``) lets others rename only their own entries, so one whose entry
    below is root's (or the caller's) is safe.
    """
    trusted = {0, os.geteuid()}
    for below, st in itertools.pairwise(chain):
        if st.st_uid not in trusted:
            return st
        mode = st.st_mode
        others_write = mode & stat.S_IWOTH or (mode & stat.S_IWGRP and st.st_gid != 0)
        if others_write and not (mode & stat.S_ISVTX and below.st_uid in trusted):
            return st
    return None


REPLACED = errno.ESTALE  # the errno :func:`walk` reports for a directory swapped while it walked


def walk(rootfd: int, *, keep: Callable[[bytes, os.stat_result], bool] | None = None,
         errors: list[tuple[bytes, OSError]] | None = None) -> Iterator[tuple[bytes, os.stat_result]]:
    """Every entry below ``rootfd`` as (relative path, lstat), each directory before its contents.

    Each directory is opened with :func:`open_beneath` and must be the very
    directory its parent listed (device and inode): one swapped for a symlink
    or for another directory meanwhile is not entered, so the walk never lists
    anything outside the tree. An entry ``keep`` refuses is neither yielded
    nor entered. What cannot be opened, listed or stat-ed is appended to
    ``errors`` as (path, OSError) (``REPLACED`` for a swapped directory, the
    root being ``b""``) and the walk goes on.
    """
    failed = functools.partial(_report, errors)
    pending: list[tuple[bytes, os.stat_result | None]] = [(b"", None)]
    while pending:
        rel, listed = pending.pop()
        try:
            fd = open_beneath(rootfd, rel)
        except OSError as exc:
            failed(rel, exc)
            continue
        try:
            if listed is not None and not same_file(os.fstat(fd), listed):
                failed(rel, OSError(REPLACED, "replaced while being walked", rel))
                continue
            prefix = rel + b"/" if rel else b""
            try:
                with os.scandir(fd) as it:
                    for entry in it:
                        child = prefix + os.fsencode(entry.name)
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError as exc:
                            failed(child, exc)
                            continue
                        if keep is not None and not keep(child, st):
                            continue
                        yield child, st
                        if stat.S_ISDIR(st.st_mode):
                            pending.append((child, st))
            except OSError as exc:  # reading the directory itself failed (EIO, a FUSE error)
                failed(rel, exc)
        finally:
            os.close(fd)


def _report(errors: list[tuple[bytes, OSError]] | None, rel: bytes, exc: OSError) -> None:
    """Note what a walk could not open, list or stat, when the caller asked to know."""
    if errors is not None:
        errors.append((rel, exc))


def walk_within(rootfd: int, selection: tuple[bytes, ...], *,
                keep: Callable[[bytes, os.stat_result], bool] | None = None,
                errors: list[tuple[bytes, OSError]] | None = None) -> Iterator[tuple[bytes, os.stat_result]]:
    """Like :func:`walk`, but only the ``selection`` subtrees and the directories above them.

    That is what ``rsync --relative`` sends for several sources below one top
    (``srv`` and ``srv/www`` for ``srv/www``): the directories above a
    selected one are yielded but never listed, so nothing else below the top
    is even looked at. Every path is resolved without following a symlink; a
    selected directory is entered only if it is the very one just
    ``lstat``-ed. An empty selection walks everything, as :func:`walk`.
    """
    if not selection:
        yield from walk(rootfd, keep=keep, errors=errors)
        return

    failed = functools.partial(_report, errors)
    seen: set[bytes] = set()
    for top in sorted(selection):
        parts = components(top)
        chain: list[tuple[bytes, os.stat_result]] = []
        for depth in range(1, len(parts) + 1):
            rel = b"/".join(parts[:depth])
            try:
                st = lstat_beneath(rootfd, rel)
            except OSError as exc:
                failed(rel, exc)
                break
            if keep is not None and not keep(rel, st):
                # Not as rsync 3.5.0, which sends a selected path below an excluded directory all the same
                # (only an exclude of the path itself sends nothing of it); a backup never gets here, since an
                # exclude matching a source or a directory above one is refused (write/source.refuse_bad_excludes).
                break
            chain.append((rel, st))
            if not stat.S_ISDIR(st.st_mode):
                break
        whole = len(chain) == len(parts) and stat.S_ISDIR(chain[-1][1].st_mode)
        for rel, st in chain if whole else ():
            if rel not in seen:
                seen.add(rel)
                yield rel, st
        if not whole:
            continue
        st = chain[-1][1]
        try:
            fd = open_beneath(rootfd, top)
        except OSError as exc:
            failed(top, exc)
            continue
        try:
            if not same_file(os.fstat(fd), st):
                failed(top, OSError(REPLACED, "replaced while being walked", top))
                continue
            below: list[tuple[bytes, OSError]] = []
            inner = None if keep is None else (lambda rel, st, top=top: keep(top + b"/" + rel, st))
            for rel, child in walk(fd, keep=inner, errors=below):
                yield top + b"/" + rel, child
            for rel, problem in below:
                failed(top + b"/" + rel if rel else top, problem)
        finally:
            os.close(fd)
