"""The lifecycle of a time-travel mount: checks, daemon, seed mount, clean exit (docs/filesystem.md).

``mount_history`` checks everything a user can get wrong first (one-line
errors), then forks *before* pyfuse3 and trio exist in the process (as S3QL
does): the child mounts the seed privately, mounts the FUSE filesystem, serves
it with trio, and tells the parent through a pipe once the filesystem answers
(or the one-line reason it could not). Everything the daemon sets up sits on
an ``AsyncExitStack``, so SIGTERM, SIGINT, an external ``fusermount3 -u`` or a
failure all take down the FUSE mount and the seed mount in reverse order.

The daemon's state lives in ``/run/squashfu/<id>/`` (``$XDG_RUNTIME_DIR`` when
not root), ``<id>`` derived from the mount point: ``pid`` (so ``umount`` can
wait for the daemon and tests can find it, see :func:`daemon_pid`) and
``seeds/`` (its private seed mounts, cleared by ``umount`` if it was killed).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import logging.handlers
import os
import resource
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from squashfu_fs.engines import mounts
from squashfu_fs.engines.run import last_line, require, run
from squashfu_fs.errors import SquashfuError, UsageError
from squashfu_fs.store import registry as readers
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.store.opening import opened_root
from squashfu_fs.store.registry import state_root
from squashfu_fs.util import beneath
from squashfu_fs.util.process import alive_pid, identity

if TYPE_CHECKING:
    from squashfu_fs.read.vfs import Usage

log = logging.getLogger(__name__)

READ_AHEAD_KB = 1024  # 1 MiB read requests instead of 128 KiB: about twice the throughput
DAEMON_UMASK = 0o077  # what the daemon creates (its state, its log) is private
FUSE_OPTIONS = ("fsname=squashfu", "subtype=squashfu", "ro", "default_permissions", "nosuid", "nodev")
_READY = b"ready"
# SquashFS 4 superblock: magic at 0, bytes_used at 40, inode_table_start at 64 (little-endian).
_SQUASHFS_MAGIC = 0x73717368
_SUPERBLOCK = struct.Struct("<I36xQ16xQ")
_CACHESTAT = 451  # cachestat(2), Linux 6.5; the same number on every architecture
_PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- state


def state_dir(mountpoint: Path) -> Path:
    """The private directory of the daemon serving ``mountpoint``."""
    key = hashlib.sha256(os.fsencode(os.path.abspath(mountpoint))).hexdigest()[:16]
    return state_root() / key


def daemon_pid(mountpoint: Path) -> int | None:
    """The PID of the live daemon serving ``mountpoint``, or None (tests use this)."""
    try:
        first = (state_dir(mountpoint) / "pid").read_text().split("\n", 1)[0]
    except (OSError, ValueError):
        return None
    return alive_pid(first)


def _write_pid(state: Path, mountpoint: Path) -> None:
    tmp = state / "pid.tmp"
    tmp.write_text(f"{identity()}\n{mountpoint}\n")
    os.replace(tmp, state / "pid")


class SeedMounts:
    """The images this daemon reads (seeds and sealed bins), each mounted once, privately: loop (root) or squashfuse."""

    def __init__(self, layout: RootLayout, directory: Path) -> None:
        self.layout = layout
        self.directory = directory
        self.loop = os.geteuid() == 0
        # Each mounted image's metadata region: (fd, start, length), to ask the page cache about it.
        self._metadata: dict[str, tuple[int, int, int]] = {}

    def acquire(self, file_name: str) -> bytes:
        target = self.directory / file_name.replace("/", "-")
        target.mkdir(parents=True, exist_ok=True)
        image = self.layout.root / file_name
        if not mounts.is_mounted(target):
            if self.loop:
                mounts.mount_squashfs(image, target)
            else:
                # The low-level daemon: it gives each file the image's own inode number, so hard links
                # share one and a number survives the kernel forgetting the file (the high-level
                # squashfuse numbers files as it meets them). Large numbers go to Vfs's fallback table.
                run(["squashfuse_ll", "-o", "ro,nosuid,nodev,noexec", image, target],
                    what=f"mounting {image} with squashfuse_ll")
        log.info("seed %s mounted on %s", file_name, target)
        region = metadata_region(image)
        if region is not None:
            old = self._metadata.pop(file_name, None)
            self._metadata[file_name] = region
            if old is not None:
                os.close(old[0])
        return os.fsencode(target)

    def metadata_cached(self, file_name: str) -> bool:
        """Whether an image's metadata is all in the page cache, so reading it waits for no disk (cachestat(2))."""
        region = self._metadata.get(file_name)
        return region is not None and _all_cached(*region)

    def release(self, file_name: str) -> None:
        target = self.directory / file_name.replace("/", "-")
        region = self._metadata.pop(file_name, None)
        if region is not None:
            os.close(region[0])
        try:
            mounts.unmount(target)
            target.rmdir()
            log.info("seed %s unmounted", file_name)
        except (SquashfuError, OSError) as exc:
            log.warning("could not take down the seed mount %s: %s", target, exc)

    def clear(self) -> None:
        """Remove seed mounts left by a daemon that was killed."""
        if not self.directory.is_dir():
            return
        for target in self.directory.iterdir():
            mounts.unmount(target)
            with contextlib.suppress(OSError):
                target.rmdir()


def metadata_region(image: Path) -> tuple[int, int, int] | None:
    """Open an image and ask the kernel to read its metadata ahead; (fd, start, length), or None.

    mksquashfs writes the inode, directory, fragment, id and xattr tables one
    after the other behind the data, from ``inode_table_start`` to
    ``bytes_used``: one contiguous read (``POSIX_FADV_WILLNEED``) instead of
    the scattered ones a first walk makes. The loop device reads the image
    through its page cache, and squashfuse reads the file itself, so either
    finds the pages there. The descriptor stays open to ask the page cache
    whether the region is still there (:func:`_all_cached`). Advisory: a
    failure only costs the speed-up.
    """
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        log.debug("cannot read the metadata of %s: %s", image, exc)
        return None
    try:
        head = os.pread(fd, _SUPERBLOCK.size, 0)
        if len(head) == _SUPERBLOCK.size:
            magic, used, start = _SUPERBLOCK.unpack(head)
            if magic == _SQUASHFS_MAGIC and 0 < start < used:
                os.posix_fadvise(fd, start, used - start, os.POSIX_FADV_WILLNEED)
                return fd, start, used - start
    except OSError as exc:
        log.debug("cannot read the metadata of %s: %s", image, exc)
    os.close(fd)
    return None


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]



def _all_cached(fd: int, start: int, length: int) -> bool:
    """Whether every page of ``fd``'s range is in the page cache; False where cachestat(2) is missing."""
    result = _Cachestat()
    call = beneath.libc.syscall(ctypes.c_long(_CACHESTAT), ctypes.c_long(fd),
                                ctypes.byref(_CachestatRange(start, length)), ctypes.byref(result), ctypes.c_long(0))
    if call != 0:
        return False
    pages = (start + length - 1) // _PAGE - start // _PAGE + 1
    return bool(result.nr_cache >= pages)


# --------------------------------------------------------------------------- checks


def check_mount(root: Path, mountpoint: Path) -> RootLayout:
    """Everything a user can get wrong, as one-line errors, before anything is mounted."""
    with opened_root(root, "mount", write=False) as opened:  # a reader: no lock, and no config needed
        layout = opened.layout
    mounts.check_mountpoint(layout.root, mountpoint)
    if not os.path.exists("/dev/fuse"):
        raise SquashfuError("/dev/fuse is missing: load the fuse module (modprobe fuse)")
    if os.geteuid() != 0:
        require("squashfuse_ll")
        require("fusermount3")
    return layout


# --------------------------------------------------------------------------- mount


def mount_history(root: Path, mountpoint: Path, *, foreground: bool, allow_other: bool,
                  options: tuple[str, ...], log_file: Path | None, verbose: bool) -> None:
    """Serve ``root``'s history at ``mountpoint``; return once it answers (unless foreground)."""
    mountpoint = Path(os.path.abspath(mountpoint))
    root = Path(os.path.abspath(root))  # the daemon serves from "/"
    log_file = None if log_file is None else Path(os.path.abspath(log_file))
    layout = check_mount(root, mountpoint)
    fuse_options = set(FUSE_OPTIONS) | set(options)
    if allow_other:
        fuse_options.add("allow_other")
    if foreground:  # systemd's way: it needs the same cwd, umask and descriptor limit as a daemon
        _detach()
        _setup_logging(None, verbose, to_stderr=True)
        serve(layout, mountpoint, fuse_options, ready=None)
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        _daemon_child(layout, mountpoint, fuse_options, log_file, verbose, write_end)
    os.close(write_end)
    answer = b""
    while chunk := os.read(read_end, 4096):
        answer += chunk
    os.close(read_end)
    if answer == _READY:
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    if not answer:
        raise SquashfuError(f"the mount daemon died before {mountpoint} was ready; see its log")
    code, _, message = answer.decode(errors="replace").partition(" ")
    error = UsageError(message) if code == "2" else SquashfuError(message)
    raise error


def _daemon_child(layout: RootLayout, mountpoint: Path, fuse_options: set[str],
                  log_file: Path | None, verbose: bool, pipe: int) -> None:
    """Run in the forked child: detach, serve, report readiness or the error; never return."""
    status = 0
    open_pipe: list[int] = [pipe]
    # Until ready, stderr goes to a scratch file: libfuse explains a failed mount there.
    errors = tempfile.TemporaryFile()  # noqa: SIM115 - open until os._exit
    try:
        os.setsid()
        _detach()
        _setup_logging(log_file, verbose, to_stderr=False)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(null, fd)
        os.dup2(errors.fileno(), 2)

        def ready() -> None:
            os.dup2(null, 2)
            os.write(pipe, _READY)
            os.close(pipe)
            open_pipe.clear()

        serve(layout, mountpoint, fuse_options, ready=ready)
    except SquashfuError as exc:
        status = exc.exit_code
        log.error("%s", exc)
        _report(open_pipe, f"{exc.exit_code} {exc}")
    except BaseException as exc:
        status = 1
        log.exception("the mount daemon failed")
        errors.seek(0)
        detail = last_line(errors.read())
        reason = detail if detail != "no message" else f"{exc.__class__.__name__}: {exc}"
        _report(open_pipe, f"1 mounting {mountpoint} failed: {reason}")
    finally:
        logging.shutdown()
        os._exit(status)


def _detach() -> None:
    """Become a daemon that borrows nothing from its caller.

    Its cwd would keep the caller's directory (maybe a disk to unmount)
    busy for as long as the mount lives; its umask would decide who reads
    its state and log; a caller's low soft limit on descriptors would cap
    how many files can be open in the mount.
    """
    os.chdir("/")
    os.umask(DAEMON_UMASK)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.debug("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)


def _report(open_pipe: list[int], message: str) -> None:
    """Tell the waiting parent why, in one line (only before readiness)."""
    for pipe in open_pipe:
        with contextlib.suppress(OSError):
            os.write(pipe, message.replace("\n", " ").encode())
            os.close(pipe)


def _setup_logging(log_file: Path | None, verbose: bool, *, to_stderr: bool) -> None:
    handler: logging.Handler
    if to_stderr:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("squashfu mount: %(levelname)s %(message)s"))
    elif log_file is not None:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s squashfu[%(process)d] %(levelname)s %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("squashfu[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.NullHandler()
    top = logging.getLogger("squashfu_fs")
    top.handlers[:] = [handler]
    top.setLevel(logging.DEBUG if verbose else logging.INFO)
    top.propagate = False
    pyfuse_log = logging.getLogger("pyfuse3")
    pyfuse_log.handlers[:] = [handler]
    pyfuse_log.setLevel(logging.WARNING)


def serve(layout: RootLayout, mountpoint: Path, fuse_options: set[str],
          ready: Callable[[], None] | None) -> None:
    """Mount and serve until unmounted or signalled; everything set up is taken down."""
    import trio

    trio.run(_serve, layout, mountpoint, fuse_options, ready)


async def _serve(layout: RootLayout, mountpoint: Path, fuse_options: set[str],
                 ready: Callable[[], None] | None) -> None:
    import pyfuse3
    import trio

    from squashfu_fs.read.fuse_ops import FuseOps
    from squashfu_fs.read.vfs import Vfs

    state = state_dir(mountpoint)
    async with contextlib.AsyncExitStack() as stack:
        readers.make_state_dir(state)
        stack.callback(_remove_state, state)
        seeds = SeedMounts(layout, state / "seeds")
        seeds.clear()
        _write_pid(state, mountpoint)
        # Published before history.json is first read: until this daemon says which layers it
        # reads, writers must assume every layer (a resquash now deletes nothing it may read).
        readers.acknowledge(state, layout.root, -1)
        vfs = Vfs(layout, seeds)
        vfs.on_loaded = functools.partial(_publish, state, layout.root)
        stack.callback(vfs.close)
        vfs.refresh()  # mounts the current seed
        _publish(state, layout.root, vfs.usage())
        ops = FuseOps(vfs)
        stack.callback(ops.close)
        pyfuse3.init(ops, os.fsdecode(mountpoint), fuse_options)
        stack.callback(pyfuse3.close, True)
        log.info("serving %s on %s", layout.root, mountpoint)
        async with trio.open_nursery() as nursery:

            async def run_fuse() -> None:
                await pyfuse3.main()
                nursery.cancel_scope.cancel()

            nursery.start_soon(run_fuse)
            nursery.start_soon(_watch_signals, pyfuse3.terminate)
            st = await trio.to_thread.run_sync(os.stat, mountpoint)  # answers: FUSE_INIT is done
            _raise_read_ahead(st.st_dev)
            nursery.start_soon(ops.housekeeping)
            if ready is not None:
                ready()
        log.info("unmounted %s", mountpoint)


def _remove_state(state: Path) -> None:
    """Remove the daemon's directory, through its descriptor, with the pid file last.

    A missing pid file then means everything else is gone (``umount`` and the
    tests wait for it). Nothing below is followed if it is a symlink.
    """
    try:
        fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        for name in sorted(os.listdir(fd), key=lambda n: n == "pid"):  # the pid file last
            with contextlib.suppress(OSError):
                beneath.remove_beneath(fd, os.fsencode(name))
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        state.rmdir()


def _publish(state: Path, root: Path, usage: Usage) -> None:
    """Tell writers the history this daemon serves and every layer its live views read."""
    readers.acknowledge(state, root, usage.generation, usage.bins, usage.seeds)


async def _watch_signals(terminate: Callable[[], None]) -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            terminate()
            return


def _raise_read_ahead(dev: int) -> None:
    """Larger read-ahead for the FUSE mount: 1 MiB requests read about twice as fast."""
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as exc:
        log.debug("cannot raise %s: %s", path, exc)


# --------------------------------------------------------------------------- umount


def unmount_history(mountpoint: Path, *, timeout: float = 10.0) -> None:
    """Take down a time-travel mount (also one whose daemon died) and wait for its daemon."""
    mountpoint = Path(os.path.abspath(mountpoint))
    pid = daemon_pid(mountpoint)
    entry = mounts.find_mount(mountpoint)
    if entry is not None:
        mounts.unmount(mountpoint, patience=mounts.PATIENCE if pid is not None else (0.0,))
    deadline = time.monotonic() + timeout
    while pid is not None and daemon_pid(mountpoint) == pid and time.monotonic() < deadline:
        time.sleep(0.02)
    if daemon_pid(mountpoint) is not None:
        log.warning("%s is detached; its daemon exits once the files still open in it are closed",
                    mountpoint)
        return
    state = state_dir(mountpoint)
    if state.is_dir():  # the daemon was killed: clear what it left
        SeedMounts(RootLayout(Path("/")), state / "seeds").clear()
        readers.remove_state_dir(state)


__all__: Sequence[str] = ("daemon_pid", "mount_history", "state_dir", "unmount_history")
