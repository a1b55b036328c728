"""The thin pyfuse3 adapter over :class:`squashfu_fs.read.vfs.Vfs` (Borg's vfs/fuse split).

It only translates: inode numbers and entries to ``EntryAttributes``, listings
to ``readdir_reply``, real file descriptors to reads, Python errors to
``FUSEError``. Everything in a view is immutable, so its entries, attributes
and pages are cached by the kernel for a day, and its listings for as long as
the kernel keeps them (:meth:`FuseOps.cache_listing`); the root's names live a
minute and are invalidated when the history changes.

Request handlers never mount, unmount or reload: :meth:`FuseOps.tick`
(housekeeping, twice a second) does, in worker threads, and publishes which
layers the live views still read.

No request waits on another's disk I/O: what may touch a cold disk (reading
a file, opening it, resolving a name or listing a directory the daemon does
not know yet, reading xattrs and symlinks) runs in a worker thread
(:data:`IO_THREADS` at once), unless every layer it reads is an image whose
metadata is in the page cache. What the daemon already knows (the root,
listings built before, kept across the kernel's FORGETs by
:class:`squashfu_fs.read.vfs.Memo`) is answered on the trio thread, with no
thread hop. Only the trio thread changes the tree; worker threads only read
layers and state that never changes once made (docs/filesystem.md).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Protocol, cast

import pyfuse3
import trio

from squashfu_fs.overlay import Entry
from squashfu_fs.read.vfs import NAME_DIRS, ROOT_INO, SNAPSHOTS_INO, RootChange, Usage, Vfs, View
from squashfu_fs.util.faults import checkpoint

log = logging.getLogger(__name__)

# The root's names change when a backup commits; every change is invalidated explicitly
# (Vfs.install -> _root_changed), so the timeout only bounds the damage of a lost notification.
ROOT_TIMEOUT = 60.0
VIEW_TIMEOUT = 86400.0  # committed bins never change
HOUSEKEEPING_INTERVAL = 0.5
IO_THREADS = 16  # requests doing disk I/O at once (a held one never stalls the others)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC

# Read-ahead for the images (the seed and sealed bins): squashfs reads its blocks
# synchronously in whichever thread asks, so the daemon's own pread would wait
# for the disk on every request while the reader waits for the daemon. A helper
# thread stays this far ahead of a sequential reader with POSIX_FADV_WILLNEED,
# so the daemon's preads find the pages cached (cold 1 GiB read from the seed:
# 0.7 -> 0.9 of the kernel's speed; docs/benchmarks.md).
PREFETCH_AHEAD = 8 << 20
PREFETCH_CHUNK = 2 << 20
PREFETCH_MIN_REQUEST = 128 << 10  # smaller requests are not the kernel's read-ahead

FUSEError = pyfuse3.FUSEError


class Notifier(Protocol):
    """Tells the kernel to drop cached root entries and attributes."""

    def invalidate_entry(self, parent: int, name: bytes) -> None: ...
    def invalidate_inode(self, ino: int) -> None: ...


class KernelNotifier:
    """The real thing: pyfuse3's notifications (only valid while mounted)."""

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)

    def invalidate_inode(self, ino: int) -> None:
        try:
            pyfuse3.invalidate_inode(ino)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("invalidating inode %d: %s", ino, exc)


@contextmanager
def _translate(what: str) -> Iterator[None]:
    """Every failure leaves a handler as FUSEError, the only exception pyfuse3 accepts."""
    try:
        yield
    except FUSEError:
        raise
    except KeyError:
        raise FUSEError(errno.ENOENT) from None
    except OSError as exc:
        raise FUSEError(exc.errno or errno.EIO) from None
    except Exception:
        log.exception("%s failed", what)
        raise FUSEError(errno.EIO) from None


def _erofs() -> FUSEError:
    return FUSEError(errno.EROFS)


def _pread(fd: int, size: int, off: int) -> bytes:
    """A file's read, in a worker thread: the one place a request waits for the data's disk."""
    checkpoint("fuse-read")
    return os.pread(fd, size, off)


def _willneed(fd: int, off: int, length: int) -> None:
    os.posix_fadvise(fd, off, length, os.POSIX_FADV_WILLNEED)


class _Stream:
    """One open file whose reads come from an image: where it reads and what is prefetched."""

    __slots__ = ("ahead", "end", "pending")

    def __init__(self) -> None:
        self.end = 0  # where the next sequential read starts
        self.ahead = 0  # prefetched (asked for) up to here
        self.pending: Future[None] | None = None


class Prefetcher:
    """Keeps an image's pages ahead of sequential readers, from one helper thread.

    Only the trio thread touches the streams; the helper thread only runs
    ``posix_fadvise``. A file is closed once its last prefetch is done, so the
    helper never advises a reused descriptor.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._streams: dict[int, _Stream] = {}

    def track(self, fd: int) -> None:
        self._streams[fd] = _Stream()

    def read(self, fd: int, off: int, size: int) -> None:
        """Called before serving a read: ask for the next chunk if the reader streams."""
        stream = self._streams.get(fd)
        if stream is None or size < PREFETCH_MIN_REQUEST:
            return
        if off == stream.end:
            start = max(stream.ahead, off + size)
            if start < off + size + PREFETCH_AHEAD and (stream.pending is None or stream.pending.done()):
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="squashfu-prefetch")
                stream.pending = self._pool.submit(_willneed, fd, start, PREFETCH_CHUNK)
                stream.ahead = start + PREFETCH_CHUNK
        stream.end = off + size

    def close(self, fd: int) -> None:
        """Close ``fd`` now, or once the prefetch still running on it is done."""
        stream = self._streams.pop(fd, None)
        if stream is not None and stream.pending is not None and not stream.pending.done():
            stream.pending.add_done_callback(lambda _: os.close(fd))
            return
        os.close(fd)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class FuseOps(pyfuse3.Operations):
    """pyfuse3 request handlers for one mounted history."""

    supports_dot_lookup = False
    enable_acl = True  # the kernel caches POSIX ACLs and enforces them
    # Asks for FUSE_CAP_CACHE_SYMLINKS, so the kernel keeps `latest`'s target instead of asking
    # on every path through it (docs/filesystem.md). Read by pyfuse3 built with
    # contrib/pyfuse3/cache-symlinks.patch (`make install`); plain pyfuse3 ignores it. Root
    # links that move are invalidated, which drops the cached target.
    enable_symlink_caching = True

    def __init__(self, vfs: Vfs, notifier: Notifier | None = None) -> None:
        super().__init__()
        self.vfs = vfs
        self.notifier: Notifier = notifier or KernelNotifier()
        self.readdir_reply: Callable[[Any, bytes, Any, int], bool] = pyfuse3.readdir_reply
        self._dirs: dict[int, tuple[int, list[tuple[bytes, int, Entry]], list[View | None]]] = {}
        self._next_dir = 1
        self._pending: list[RootChange] = []
        self._published: Usage | None = None
        self._noatime = os.O_NOATIME
        self.prefetcher = Prefetcher()
        vfs.on_change = self._root_changed
        self._negative = {t: self._negative_attr(t) for t in (ROOT_TIMEOUT, VIEW_TIMEOUT)}
        self._limiter: trio.CapacityLimiter | None = None
        self.inline = 0  # requests that could have read the disk, answered here: their metadata was cached

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` (disk I/O that changes no shared state) in a worker thread."""
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(IO_THREADS)
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _disk(self, ino: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` about ``ino`` here when what it reads is in memory (:meth:`Vfs.in_memory`), else in a thread.

        A thread hop costs about 230 µs per request on the 2-vCPU benchmark
        machine (docs/benchmarks.md): a first walk makes one or two per
        directory, so it is only paid when the disk may really be read.
        """
        if self.vfs.in_memory(ino):
            self.inline += 1
            return fn(*args)
        return await self._io(fn, *args)

    # --------------------------------------------------------------- plumbing

    @staticmethod
    def _negative_attr(timeout: float) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = 0
        attr.entry_timeout = timeout
        return attr

    def _attr(self, ino: int, entry: Entry) -> pyfuse3.EntryAttributes:
        cached = entry.cache
        if cached is not None:
            return cast(pyfuse3.EntryAttributes, cached)
        st = entry.st
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        timeout = ROOT_TIMEOUT if self.vfs.is_root_space(ino) else VIEW_TIMEOUT
        attr.entry_timeout = timeout
        attr.attr_timeout = timeout
        attr.st_mode = st.st_mode
        attr.st_nlink = entry.nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_size = st.st_size
        attr.st_rdev = st.st_rdev
        attr.st_blksize = st.st_blksize
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        entry.cache = attr
        return attr

    def _root_changed(self, change: RootChange) -> None:
        """A new history: drop the kernel's root entries now, attributes from housekeeping."""
        for name in change.names:
            self.notifier.invalidate_entry(ROOT_INO, name)
        for name in change.snapshots:
            self.notifier.invalidate_entry(SNAPSHOTS_INO, name)
        self._pending.append(change)

    def flush_invalidations(self) -> None:
        """Invalidate changed root inodes (blocking: call it outside request handlers)."""
        pending, self._pending = self._pending, []
        for ino in sorted({i for change in pending for i in change.inodes}):
            self.notifier.invalidate_inode(ino)

    async def housekeeping(self) -> None:
        """Notice a new history within a second; unmount unused seeds; publish what is in use."""
        while True:
            await trio.sleep(HOUSEKEEPING_INTERVAL)
            await self.tick()

    async def tick(self) -> None:
        """One round of housekeeping; every blocking step runs in a worker thread.

        A reload that fails (the new seed cannot be mounted, history.json is
        unreadable) is tried again on the next tick, and the old history is
        served (and published) meanwhile: never acknowledged as seen.
        """
        vfs = self.vfs
        try:
            reload = await trio.to_thread.run_sync(vfs.prepare_reload)
            if reload is not None:
                vfs.install(reload)
        except Exception as exc:
            log.warning("reloading the history failed (trying again): %s", exc)
        idle = vfs.take_idle_seeds()
        if idle:
            await trio.to_thread.run_sync(vfs.release_seeds, idle)
        usage = vfs.usage()
        if usage != self._published and vfs.on_loaded is not None:
            try:
                await trio.to_thread.run_sync(vfs.on_loaded, usage)
                self._published = usage
            except OSError as exc:
                log.warning("cannot publish the layers in use: %s", exc)
        for parent, name in vfs.take_entries_to_drop():  # queued, not waited for
            self.notifier.invalidate_entry(parent, name)
        if self._pending:
            await trio.to_thread.run_sync(self.flush_invalidations)

    # --------------------------------------------------------------- metadata

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        with _translate("lookup"):
            vfs = self.vfs
            known, found = vfs.lookup_known(parent_inode, name)
            if not known:
                built, entry = await self._disk(parent_inode, vfs.read_lookup, parent_inode, name)
                found = vfs.finish_lookup(parent_inode, name, built, entry)
            if found is None:
                return self._negative[ROOT_TIMEOUT if parent_inode in NAME_DIRS else VIEW_TIMEOUT]
            return self._attr(*found)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        with _translate("getattr"):
            return self._attr(inode, self.vfs.attributes(inode))

    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        with _translate("readlink"):
            vfs = self.vfs
            target = vfs.target_known(inode)
            if target is None:
                target = vfs.finish_target(inode, await self._disk(inode, os.readlink, vfs.link_path(inode)))
            return target

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            for inode, count in inode_list:
                self.vfs.forget(inode, count)
        except Exception:
            log.exception("forget failed")

    async def _xattrs(self, inode: int) -> dict[bytes, bytes]:
        vfs = self.vfs
        xattrs = vfs.xattrs_known(inode)
        if xattrs is None:
            xattrs = vfs.finish_xattrs(inode, await self._disk(inode, vfs.read_xattrs, inode))
        return xattrs

    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        with _translate("getxattr"):
            value = (await self._xattrs(inode)).get(name)
            if value is None:
                raise FUSEError(pyfuse3.ENOATTR)
            return value

    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        with _translate("listxattr"):
            return list(await self._xattrs(inode))

    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        with _translate("statfs"):
            real = os.statvfs(self.vfs.statfs_path())
            data = pyfuse3.StatvfsData()
            for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                         "f_files", "f_ffree", "f_favail"):
                setattr(data, name, getattr(real, name))
            data.f_namemax = 255
            return data

    async def access(self, inode: int, mode: int, ctx: Any = None) -> bool:
        with _translate("access"):
            self.vfs.attributes(inode)
            if mode & os.W_OK:
                raise _erofs()
            return True

    # --------------------------------------------------------------- directories

    async def opendir(self, inode: int, ctx: Any = None) -> int:
        with _translate("opendir"):
            vfs = self.vfs
            items = vfs.listing_known(inode)
            if items is None:
                built, merged = await self._disk(inode, vfs.read_listing, inode)
                items = vfs.finish_listing(inode, built, merged)
            views: list[View | None] = []
            if inode in NAME_DIRS:
                views = [self.vfs.view_of_root(ino) for _, ino, _ in items]
            fh = self._next_dir
            self._next_dir += 1
            self._dirs[fh] = (inode, items, views)
            return fh

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        with _translate("readdir"):
            parent, items, views = self._dirs[fh]
            vfs = self.vfs
            view = None if parent in NAME_DIRS else vfs.node(parent).view
            reply = self.readdir_reply
            for i in range(start_id, len(items)):
                name, ino, entry = items[i]
                if not reply(token, name, self._attr(ino, entry), i + 1):
                    break
                vfs.remember(ino, views[i] if views else view, entry, parent, name)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    def cache_listing(self, inode: int) -> bool:
        """Whether the kernel may keep the listing of ``inode``, just opened, in its page cache.

        Asked by pyfuse3 built with contrib/pyfuse3/cache-listings.patch after
        each successful opendir (plain pyfuse3 never asks): a directory of a
        current view never changes, so a warm walk costs no readdir. The root
        and ``snapshots/`` list the history and are never cached, nor is a
        retired view; answering False also drops any listing the kernel kept
        (docs/filesystem.md, "Caching").
        """
        if inode in NAME_DIRS:
            return False
        node = self.vfs.nodes.get(inode)
        return node is not None and node.view is not None and not node.view.retired

    # --------------------------------------------------------------- files

    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        with _translate("open"):
            if flags & _WRITE_FLAGS:
                raise _erofs()
            fd = await self._disk(inode, self._open_real, self.vfs.real_path(inode))
            if self.vfs.in_image(inode):
                self.prefetcher.track(fd)
            return pyfuse3.FileInfo(fh=fd, keep_cache=True, direct_io=False)

    def _open_real(self, path: bytes) -> int:
        """Open the real file (a worker thread: the path walk may read the disk)."""
        try:
            return os.open(path, _OPEN_FLAGS | self._noatime)
        except PermissionError:
            if not self._noatime:
                raise
            self._noatime = 0  # O_NOATIME needs ownership or CAP_FOWNER
            return os.open(path, _OPEN_FLAGS)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        with _translate("read"):
            self.prefetcher.read(fh, off, size)
            return cast(bytes, await self._io(_pread, fh, size, off))

    async def release(self, fh: int) -> None:
        with _translate("release"):
            self.prefetcher.close(fh)

    def close(self) -> None:
        """At unmount: wait for the helper thread."""
        self.prefetcher.shutdown()

    # --------------------------------------------------------------- writes: never

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any = None) -> Any:
        raise _erofs()

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any = None) -> Any:
        raise _erofs()

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any = None) -> Any:
        raise _erofs()

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any = None) -> None:
        raise _erofs()

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any = None) -> None:
        raise _erofs()

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any = None) -> Any:
        raise _erofs()

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any = None) -> None:
        raise _erofs()

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any = None) -> Any:
        raise _erofs()

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise _erofs()

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any = None) -> Any:
        raise _erofs()

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any = None) -> None:
        raise _erofs()

    async def removexattr(self, inode: int, name: bytes, ctx: Any = None) -> None:
        raise _erofs()
