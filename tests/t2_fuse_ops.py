"""The pyfuse3 Operations class called directly with trio: no kernel, plain-directory layers."""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from squashfu_fs.read.fuse_ops import ROOT_TIMEOUT, VIEW_TIMEOUT, FuseOps
from squashfu_fs.read.vfs import ROOT_INO, SNAPSHOTS_INO, Memo, Vfs
from squashfu_fs.store import history as history_mod
from squashfu_fs.store.history import SEALED_FORMAT, Bin, History, Seed
from squashfu_fs.store.layout import RootLayout

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts and trusted xattrs need root")

T0 = datetime(2026, 11, 2, 2, 0).astimezone()  # a Monday


def at(day: int) -> str:
    return T0.replace(day=2 + day).isoformat()


class PlainSeeds:
    """Stands in for the seed mounts: seeds that already are directories; records what was asked."""

    def __init__(self, directory_of: Callable[[str], bytes]) -> None:
        self.directory_of = directory_of
        self.acquired: list[str] = []
        self.released: list[str] = []

    def acquire(self, file_name: str) -> bytes:
        self.acquired.append(file_name)
        return self.directory_of(file_name)

    def release(self, file_name: str) -> None:
        self.released.append(file_name)


class Recorder:
    """Stands in for the kernel's invalidation calls."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, bytes]] = []
        self.inodes: list[int] = []

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        self.entries.append((parent, name))

    def invalidate_inode(self, ino: int) -> None:
        self.inodes.append(ino)


class World:
    """A backup root made by hand: a seed directory, bins as overlay upper layers."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        self.layout = RootLayout(self.root)
        self.seed_dir = tmp_path / "seed-unpacked"
        for d in (self.root, self.layout.bins, self.seed_dir):
            d.mkdir(parents=True)
        s = self.seed_dir
        (s / "home" / "alice").mkdir(parents=True)
        (s / "home" / "alice" / "a.txt").write_text("seed a\n")
        (s / "home" / "alice" / "gone.txt").write_text("deleted on night 1\n")
        (s / "hard1").write_text("linked\n")
        os.link(s / "hard1", s / "hard2")
        os.symlink(b"home/alice/a.txt", s / "link")
        (s / "dir").mkdir()
        (s / "dir" / "old").write_text("old\n")
        os.setxattr(s / "hard1", b"user.tag", b"v1")
        os.setxattr(s / "hard1", b"trusted.overlay.overlay.own", b"escaped")
        self.history = History(seed=Seed(file="seed.sfs", generation=1, time=at(0), created=at(0)),
                               generation=1)
        self.save()
        b1 = self.add_bin(1)  # night 1: a change, a deletion, an opaque directory
        (b1 / "home" / "alice").mkdir(parents=True)
        (b1 / "home" / "alice" / "a.txt").write_text("night 1 a\n")
        os.mknod(b1 / "home" / "alice" / "gone.txt", stat.S_IFCHR, os.makedev(0, 0))
        (b1 / "dir").mkdir()
        os.setxattr(b1 / "dir", b"trusted.overlay.opaque", b"y")
        (b1 / "dir" / "new").write_text("new\n")
        with open(os.path.join(os.fsencode(b1), b"caf\xe9\nname"), "wb") as f:
            f.write(b"awkward\n")
        self.commit(1, 1)

    def add_bin(self, number: int) -> Path:
        path = self.layout.bin(number)
        path.mkdir()
        return path

    def commit(self, number: int, day: int) -> None:
        self.history = self.history.with_bin(Bin(number, at(day), 1.0, 0, 0, 0))
        self.save()

    def save(self) -> None:
        history_mod.save(self.layout.history, self.history)

    def ops(self) -> tuple[FuseOps, Vfs, Recorder]:
        seeds = PlainSeeds(lambda name: os.fsencode(self.seed_dir))
        vfs = Vfs(self.layout, seeds)
        vfs.refresh()
        rec = Recorder()
        return FuseOps(vfs, rec), vfs, rec


def run(fn: Callable[..., Any], *args: Any) -> Any:
    return trio.run(fn, *args)


def listdir(ops: FuseOps, ino: int, start: int = 0, limit: int | None = None) -> list[tuple[bytes, Any, int]]:
    out: list[tuple[bytes, Any, int]] = []

    def reply(token: Any, name: bytes, attr: Any, next_id: int) -> bool:
        if limit is not None and len(out) >= limit:
            return False
        out.append((name, attr, next_id))
        return True

    ops.readdir_reply = reply
    fh = run(ops.opendir, ino, None)
    run(ops.readdir, fh, start, None)
    run(ops.releasedir, fh)
    return out


def lookup_path(ops: FuseOps, path: bytes) -> Any:
    ino = ROOT_INO
    attr = None
    for part in path.split(b"/"):
        attr = run(ops.lookup, ino, part, None)
        if attr.st_ino == 0:
            raise FileNotFoundError(path)
        ino = attr.st_ino
    return attr


def fuse_errno(fn: Callable[..., Any], *args: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        run(fn, *args)
    return info.value.errno


def test_root_lists_every_view_and_builds_nothing(tmp_path: Path) -> None:
    ops, vfs, _ = World(tmp_path).ops()
    entries = listdir(ops, ROOT_INO)
    names = [n for n, _, _ in entries]
    assert names == [b"2026-11-02", b"2026-11-03", b"mon", b"tue", b"latest", b"seed", b"versions", b"snapshots"]
    for name, attr, _ in entries:
        assert attr.entry_timeout == ROOT_TIMEOUT
        kind = stat.S_IFMT(attr.st_mode)
        assert kind == (stat.S_IFLNK if name in (b"mon", b"tue", b"latest") else stat.S_IFDIR)
        run(ops.getattr, attr.st_ino, None)
    assert run(ops.readlink, lookup_path(ops, b"latest").st_ino, None) == b"2026-11-03"
    assert run(ops.readlink, lookup_path(ops, b"mon").st_ino, None) == b"2026-11-02"
    run(ops.getattr, ROOT_INO, None)
    assert vfs.counters.stacks_built == 0 and vfs.counters.listings_built == 0
    assert run(ops.lookup, ROOT_INO, b"2026-11-04", None).st_ino == 0


def test_snapshots_holds_every_backup_as_a_view_of_its_own(tmp_path: Path) -> None:
    """Two backups on one day: the dated view shows the later, snapshots/ both; no directory has two names."""
    world = World(tmp_path)
    b2 = world.add_bin(2)
    (b2 / "home" / "alice").mkdir(parents=True)
    (b2 / "home" / "alice" / "a.txt").write_text("night 1, afternoon\n")
    world.history = world.history.with_bin(Bin(2, world.history.bins[0].time.replace("T02:", "T14:"), 1.0, 0, 0, 0))
    world.save()
    ops, vfs, rec = world.ops()
    snapshots = lookup_path(ops, b"snapshots")
    assert stat.S_ISDIR(snapshots.st_mode) and snapshots.entry_timeout == ROOT_TIMEOUT
    names = [n for n, _, _ in listdir(ops, snapshots.st_ino)]
    morning, afternoon = names[1:]
    assert names[0].endswith(b"T02:00:00") and morning[:10] == afternoon[:10] == b"2026-11-03", names
    assert vfs.counters.stacks_built == 0, "listing snapshots/ builds no view"

    def read(path: bytes) -> bytes:
        attr = lookup_path(ops, path)
        fh = run(ops.open, attr.st_ino, os.O_RDONLY, None).fh
        try:
            data: bytes = run(ops.read, fh, 0, 4096)
            return data
        finally:
            run(ops.release, fh)

    assert read(b"snapshots/" + morning + b"/home/alice/a.txt") == b"night 1 a\n"
    assert read(b"snapshots/" + afternoon + b"/home/alice/a.txt") == b"night 1, afternoon\n"
    assert read(b"2026-11-03/home/alice/a.txt") == b"night 1, afternoon\n"
    assert read(b"snapshots/" + names[0] + b"/home/alice/a.txt") == b"seed a\n"
    dated = {lookup_path(ops, b"2026-11-03").st_ino, lookup_path(ops, b"2026-11-03/home").st_ino}
    again = {lookup_path(ops, b"snapshots/" + afternoon + path).st_ino for path in (b"", b"/home")}
    assert not dated & again, "the same state under two names must not share directory inodes"
    world.add_bin(3)
    world.commit(3, 2)
    rec.entries.clear()
    vfs.refresh()
    ops.flush_invalidations()
    new = [n for n, _, _ in listdir(ops, snapshots.st_ino)][-1]
    assert new.startswith(b"2026-11-04") and (SNAPSHOTS_INO, new) in rec.entries, rec.entries
    assert SNAPSHOTS_INO in rec.inodes and (SNAPSHOTS_INO, afternoon) not in rec.entries, "the others stay"


def test_versions_lists_every_version_of_a_file_named_by_its_snapshot(tmp_path: Path) -> None:
    """versions/PATH/ holds one entry per backup that wrote PATH, deleted files and opaque directories included."""
    ops, _, _ = World(tmp_path).ops()
    seed, night1 = (n for n, _, _ in listdir(ops, lookup_path(ops, b"snapshots").st_ino))
    top = lookup_path(ops, b"versions")
    assert stat.S_ISDIR(top.st_mode) and top.entry_timeout == ROOT_TIMEOUT
    assert sorted(n for n, _, _ in listdir(ops, top.st_ino)) == sorted(
        [b"caf\xe9\nname", b"dir", b"hard1", b"hard2", b"home", b"link"])
    a = lookup_path(ops, b"versions/home/alice/a.txt")
    assert stat.S_ISDIR(a.st_mode) and stat.S_IMODE(a.st_mode) == 0o555, "a file's read bits, as r-x"
    versions = listdir(ops, a.st_ino)
    assert [n for n, _, _ in versions] == [seed + b".txt", night1 + b".txt"], "name order is time order"

    def read(attr: Any) -> bytes:
        fi = run(ops.open, attr.st_ino, os.O_RDONLY, None)
        try:
            data: bytes = run(ops.read, fi.fh, 0, 4096)
            return data
        finally:
            run(ops.release, fi.fh)

    assert [read(attr) for _, attr, _ in versions] == [b"seed a\n", b"night 1 a\n"]
    assert a.st_ino not in {attr.st_ino for _, attr, _ in versions}, "the directory is not its newest version"
    gone = lookup_path(ops, b"versions/home/alice/gone.txt")
    assert [n for n, _, _ in listdir(ops, gone.st_ino)] == [seed + b".txt"], "deleted on night 1: still there"
    assert sorted(n for n, _, _ in listdir(ops, lookup_path(ops, b"versions/dir").st_ino)) == [b"new", b"old"]
    link = listdir(ops, lookup_path(ops, b"versions/link").st_ino)
    assert [n for n, _, _ in link] == [seed] and run(ops.readlink, link[0][1].st_ino, None) == b"home/alice/a.txt"
    assert run(ops.listxattr, a.st_ino, None) == [], "a made-up directory has no xattrs of its own"


def test_a_directory_private_once_stays_private_in_versions(tmp_path: Path) -> None:
    """dir was 0700 in the seed and 0755 after night 1: the names it held then must not show to others now."""
    world = World(tmp_path)
    os.chmod(world.seed_dir / "dir", 0o700)
    os.chmod(world.layout.bin(1) / "dir", 0o755)
    ops, _, _ = world.ops()
    assert stat.S_IMODE(lookup_path(ops, b"2026-11-03/dir").st_mode) == 0o755
    assert stat.S_IMODE(lookup_path(ops, b"versions/dir").st_mode) == 0o700


def test_versions_of_a_directory_that_changed_hands_are_roots_alone(tmp_path: Path) -> None:
    """Bits cannot say who could enter when the owner changed: such a directory of versions/ is root's, 0500."""
    world = World(tmp_path)
    os.chown(world.layout.bin(1) / "dir", 1234, 1234)
    ops, _, _ = world.ops()
    st = lookup_path(ops, b"versions/dir")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o500)
    assert lookup_path(ops, b"2026-11-03/dir").st_uid == 1234


def test_hard_links_have_a_directory_of_versions_each(tmp_path: Path) -> None:
    """hard1 and hard2 share an inode in the seed; their histories are two directories, two numbers."""
    ops, _, _ = World(tmp_path).ops()
    one, two = lookup_path(ops, b"versions/hard1"), lookup_path(ops, b"versions/hard2")
    assert one.st_ino != two.st_ino
    assert lookup_path(ops, b"versions/hard1").st_ino == one.st_ino, "and each keeps its number"


def test_lookup_inside_a_view_builds_its_stack_once(tmp_path: Path) -> None:
    ops, vfs, _ = World(tmp_path).ops()
    a = lookup_path(ops, b"2026-11-03/home/alice/a.txt")
    assert vfs.counters.stacks_built == 1
    lookup_path(ops, b"2026-11-03/link")
    assert vfs.counters.stacks_built == 1
    assert a.entry_timeout == VIEW_TIMEOUT and a.attr_timeout == VIEW_TIMEOUT
    fi = run(ops.open, a.st_ino, os.O_RDONLY, None)
    assert fi.keep_cache and not fi.direct_io
    assert run(ops.read, fi.fh, 0, 4096) == b"night 1 a\n"
    assert run(ops.read, fi.fh, 6, 3) == b"1 a"
    run(ops.release, fi.fh)
    old = lookup_path(ops, b"2026-11-02/home/alice/a.txt")
    fi = run(ops.open, old.st_ino, os.O_RDONLY, None)
    assert run(ops.read, fi.fh, 0, 4096) == b"seed a\n"
    run(ops.release, fi.fh)
    assert old.st_ino != a.st_ino and vfs.counters.stacks_built == 2


def test_listing_follows_overlay_rules_and_stat_is_real(tmp_path: Path) -> None:
    w = World(tmp_path)
    ops, _, _ = w.ops()
    alice = lookup_path(ops, b"2026-11-03/home/alice")
    assert [n for n, _, _ in listdir(ops, alice.st_ino)] == [b"a.txt"]  # whiteout hidden
    d = lookup_path(ops, b"2026-11-03/dir")
    assert [n for n, _, _ in listdir(ops, d.st_ino)] == [b"new"]  # opaque
    view = lookup_path(ops, b"2026-11-03")
    names = {n for n, _, _ in listdir(ops, view.st_ino)}
    assert names == {b"home", b"hard1", b"hard2", b"link", b"dir", b"caf\xe9\nname"}
    assert run(ops.lookup, alice.st_ino, b"gone.txt", None).st_ino == 0
    assert {n for n, _, _ in listdir(ops, lookup_path(ops, b"seed/home/alice").st_ino)} == {
        b"a.txt", b"gone.txt"}
    real = os.lstat(w.layout.bin(1) / "home" / "alice" / "a.txt")
    a = lookup_path(ops, b"2026-11-03/home/alice/a.txt")
    assert (a.st_mode, a.st_size, a.st_mtime_ns, a.st_uid, a.st_blocks, a.st_nlink) == (
        real.st_mode, real.st_size, real.st_mtime_ns, real.st_uid, real.st_blocks, real.st_nlink)
    assert lookup_path(ops, b"2026-11-03/home").st_nlink == 1  # merged directory, like overlayfs


def test_hard_links_share_an_inode_and_inodes_are_stable(tmp_path: Path) -> None:
    ops, vfs, _ = World(tmp_path).ops()
    h1 = lookup_path(ops, b"2026-11-03/hard1")
    h2 = lookup_path(ops, b"2026-11-03/hard2")
    assert h1.st_ino == h2.st_ino and h1.st_nlink == 2
    run(ops.forget, [(h1.st_ino, 2)])
    assert h1.st_ino not in vfs.nodes
    assert lookup_path(ops, b"2026-11-03/hard2").st_ino == h1.st_ino
    listed = {n: a.st_ino for n, a, _ in listdir(ops, lookup_path(ops, b"2026-11-03").st_ino)}
    assert listed[b"hard1"] == h1.st_ino
    assert lookup_path(ops, b"2026-11-02/hard1").st_ino != h1.st_ino  # another view


def test_readlink_and_xattrs(tmp_path: Path) -> None:
    ops, _, _ = World(tmp_path).ops()
    link = lookup_path(ops, b"2026-11-03/link")
    assert run(ops.readlink, link.st_ino, None) == b"home/alice/a.txt"
    h = lookup_path(ops, b"2026-11-03/hard1")
    assert sorted(run(ops.listxattr, h.st_ino, None)) == [b"trusted.overlay.own", b"user.tag"]
    assert run(ops.getxattr, h.st_ino, b"trusted.overlay.own", None) == b"escaped"
    assert fuse_errno(ops.getxattr, h.st_ino, b"system.posix_acl_access", None) == pyfuse3.ENOATTR
    d = lookup_path(ops, b"2026-11-03/dir")
    assert run(ops.listxattr, d.st_ino, None) == []  # the opaque marker is overlay's own
    assert fuse_errno(ops.getxattr, d.st_ino, b"trusted.overlay.opaque", None) == pyfuse3.ENOATTR


def test_every_write_is_erofs(tmp_path: Path) -> None:
    ops, _, _ = World(tmp_path).ops()
    a = lookup_path(ops, b"2026-11-03/home/alice/a.txt")
    d = lookup_path(ops, b"2026-11-03/home").st_ino
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        assert fuse_errno(ops.open, a.st_ino, flags, None) == errno.EROFS
    calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
        (ops.setattr, (a.st_ino, a, None, None, None)),
        (ops.mknod, (d, b"n", stat.S_IFREG | 0o644, 0, None)),
        (ops.mkdir, (d, b"n", 0o755, None)),
        (ops.unlink, (d, b"alice", None)),
        (ops.rmdir, (d, b"alice", None)),
        (ops.symlink, (d, b"n", b"t", None)),
        (ops.rename, (d, b"alice", d, b"bob", 0, None)),
        (ops.link, (a.st_ino, d, b"n", None)),
        (ops.write, (3, 0, b"x")),
        (ops.create, (d, b"n", 0o644, os.O_WRONLY, None)),
        (ops.setxattr, (a.st_ino, b"user.x", b"1", None)),
        (ops.removexattr, (a.st_ino, b"user.x", None)),
        (ops.mkdir, (ROOT_INO, b"2030-01-01", 0o755, None)),
    ]
    for fn, args in calls:
        assert fuse_errno(fn, *args) == errno.EROFS, fn.__name__
    assert fuse_errno(ops.access, a.st_ino, os.W_OK, None) == errno.EROFS
    assert run(ops.access, a.st_ino, os.R_OK, None) is True


def world_with_many(tmp_path: Path, files: int) -> tuple[FuseOps, Vfs]:
    """The World, with a seed directory ``many`` of ``files`` files."""
    w = World(tmp_path)
    many = w.seed_dir / "many"
    many.mkdir()
    for i in range(files):
        (many / f"f{i:03}").write_text(str(i))
    ops, vfs, _ = w.ops()
    return ops, vfs


def test_forget_releases_nodes_and_listings(tmp_path: Path) -> None:
    ops, vfs = world_with_many(tmp_path, 500)
    baseline = len(vfs.nodes)
    counts: dict[int, int] = {}
    for view in (b"2026-11-02", b"2026-11-03", b"seed"):
        v = run(ops.lookup, ROOT_INO, view, None).st_ino
        m = run(ops.lookup, v, b"many", None).st_ino
        entries = listdir(ops, m)
        assert len(entries) == 500
        for _, attr, _ in entries:
            counts[attr.st_ino] = counts.get(attr.st_ino, 0) + 1
        for ino in (v, m):
            counts[ino] = counts.get(ino, 0) + 1
    assert len(vfs.nodes) == baseline + 3 * 502
    run(ops.forget, list(counts.items()))
    assert len(vfs.nodes) == baseline


def test_what_the_kernel_forgot_is_answered_from_memory(tmp_path: Path) -> None:
    """After the kernel forgets a view's inodes (drop_caches), its listings and xattrs come from the memo."""
    ops, vfs = world_with_many(tmp_path, 50)

    def walk() -> tuple[list[Any], dict[bytes, bytes], dict[int, int]]:
        counts: dict[int, int] = {}
        view = run(ops.lookup, ROOT_INO, b"2026-11-03", None).st_ino
        top = listdir(ops, view)
        m = run(ops.lookup, view, b"many", None).st_ino
        hard = run(ops.lookup, view, b"hard1", None).st_ino
        tag = run(ops.getxattr, hard, b"user.tag", None)
        entries = listdir(ops, m)
        for ino in [view, m, hard] + [a.st_ino for _, a, _ in top + entries]:
            counts[ino] = counts.get(ino, 0) + 1
        return [(n, a.st_ino, a.st_size, a.st_mtime_ns) for n, a, _ in top + entries], {b"user.tag": tag}, counts

    first, xattrs, counts = walk()
    built = vfs.counters.listings_built
    assert built == 2 and vfs.counters.memo_hits == 0
    run(ops.forget, list(counts.items()))
    assert all(node.view is None for node in vfs.nodes.values()), "the kernel forgot every inode of the view"
    again, xattrs_again, _ = walk()
    assert (again, xattrs_again) == (first, xattrs)
    assert vfs.counters.listings_built == built, "a forgotten listing was read from the disk again"
    assert vfs.counters.memo_hits == 3  # two listings and one inode's xattrs


def test_the_memo_is_bounded_and_forgets_retired_views(tmp_path: Path) -> None:
    memo = Memo(cap=10)
    memo.put((1, 1, 0), "a", 4)
    memo.put((1, 2, 0), "b", 4)
    assert memo.get((1, 1, 0)) == "a"  # now the most recently used
    memo.put((2, 3, 0), "c", 4)
    assert (memo.get((1, 2, 0)), memo.get((1, 1, 0)), memo.get((2, 3, 0))) == (None, "a", "c")
    assert memo.size == 8
    memo.drop_view(1)
    assert (len(memo), memo.size) == (1, 4)
    # In a mount: a resquash retires every view, and their memo goes with them; the new views read anew.
    w = World(tmp_path)
    ops, vfs, _ = w.ops()
    old = lookup_path(ops, b"2026-11-03/home/alice").st_ino
    assert [n for n, _, _ in listdir(ops, old)] == [b"a.txt"]
    old_view = vfs.nodes[old].view
    assert old_view is not None and len(vfs.memo) > 0
    (w.seed_dir / "home" / "alice" / "b.txt").write_text("only in the new seed\n")
    w.history = w.history.with_seed(
        Seed(file="seed.2.sfs", generation=2, time=at(1), created=at(3), absorbed=(1,)), remaining=())
    w.save()
    run(ops.tick)
    assert old_view.retired and len(vfs.memo) == 0
    new = lookup_path(ops, b"2026-11-03/home/alice").st_ino
    assert new != old
    assert b"b.txt" in [n for n, _, _ in listdir(ops, new)]  # read from the new layers, not remembered


def test_only_what_may_wait_for_the_disk_goes_to_a_worker_thread(tmp_path: Path) -> None:
    """Listings go to a worker thread unless every layer they span is an image whose metadata is cached."""
    ops, vfs, _ = World(tmp_path).ops()
    cached = {"seed.sfs": False}
    vfs.seeds.metadata_cached = cached.__getitem__  # type: ignore[attr-defined]
    where: list[bool] = []
    read_listing = vfs.read_listing

    def spy(ino: int) -> Any:
        where.append(threading.current_thread() is threading.main_thread())
        return read_listing(ino)

    vfs.read_listing = spy  # type: ignore[method-assign]
    listdir(ops, lookup_path(ops, b"seed/home").st_ino)  # the seed's metadata is not cached: a thread
    cached["seed.sfs"] = True
    listdir(ops, lookup_path(ops, b"seed/dir").st_ino)  # now it is: answered on the request thread
    listdir(ops, lookup_path(ops, b"2026-11-03/home").st_ino)  # spans bin 1, a directory: a thread
    assert where == [False, True, False]
    assert ops.inline >= 1


def test_readdir_offsets_resume_where_they_stopped(tmp_path: Path) -> None:
    w = World(tmp_path)
    for i in range(100):
        (w.seed_dir / "dir" / f"x{i:03}").write_text("")
    ops, _, _ = w.ops()
    seed_dir = lookup_path(ops, b"seed/dir").st_ino
    whole = [n for n, _, _ in listdir(ops, seed_dir)]
    first = listdir(ops, seed_dir, limit=30)
    rest = listdir(ops, seed_dir, start=first[-1][2])
    assert [n for n, _, _ in first] + [n for n, _, _ in rest] == whole and len(whole) == 101


def test_a_new_commit_appears_and_the_root_is_invalidated(tmp_path: Path) -> None:
    w = World(tmp_path)
    ops, vfs, rec = w.ops()
    old_view = lookup_path(ops, b"2026-11-03").st_ino
    a = lookup_path(ops, b"2026-11-03/home/alice/a.txt")
    fi = run(ops.open, a.st_ino, os.O_RDONLY, None)
    b2 = w.add_bin(2)
    (b2 / "added.txt").write_text("night 2\n")
    w.commit(2, 2)
    run(ops.tick)  # housekeeping notices the commit
    names = [n for n, _, _ in listdir(ops, ROOT_INO)]
    assert b"2026-11-04" in names and b"wed" in names
    assert run(ops.readlink, lookup_path(ops, b"latest").st_ino, None) == b"2026-11-04"
    assert (ROOT_INO, b"2026-11-04") in rec.entries and (ROOT_INO, b"latest") in rec.entries
    ops.flush_invalidations()
    assert ROOT_INO in rec.inodes
    assert lookup_path(ops, b"2026-11-03").st_ino == old_view  # unchanged views keep their inodes
    assert lookup_path(ops, b"2026-11-04/added.txt").st_size == 8
    assert run(ops.read, fi.fh, 0, 100) == b"night 1 a\n"  # an open file keeps reading
    run(ops.release, fi.fh)
    # A resquash-like commit: a new seed, bin 1 absorbed. Old views retire, new ones appear.
    w.history = w.history.with_seed(
        Seed(file="seed.2.sfs", generation=2, time=at(1), created=at(3), absorbed=(1,)),
        remaining=w.history.bins[1:])
    w.save()
    run(ops.tick)
    names = [n for n, _, _ in listdir(ops, ROOT_INO)]
    assert b"2026-11-02" not in names and b"2026-11-03" in names
    assert lookup_path(ops, b"2026-11-03").st_ino != old_view
    assert vfs.seeds.acquired == ["seed.sfs", "seed.2.sfs"]  # type: ignore[attr-defined]
    # the old seed is let go once the kernel forgets the last inode of an old view
    for ino, node in list(vfs.nodes.items()):
        if node.view is not None and node.view.seed_file == "seed.sfs":
            run(ops.forget, [(ino, node.nlookup)])
    run(ops.tick)  # housekeeping unmounts it
    assert vfs.seeds.released == ["seed.sfs"]  # type: ignore[attr-defined]


def test_the_fallback_numbers_of_a_view_go_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Numbers for files the computed scheme cannot hold are kept per live view, never for every view ever seen."""
    from squashfu_fs.read import vfs as vfs_module

    monkeypatch.setattr(vfs_module, "_INO_LIMIT", 1)  # every real inode number is now "too large"
    w = World(tmp_path)
    ops, vfs, _ = w.ops()
    a = lookup_path(ops, b"2026-11-03/home/alice/a.txt")
    again = lookup_path(ops, b"2026-11-03/home/alice/a.txt")
    old = lookup_path(ops, b"2026-11-02/home/alice/a.txt")
    assert a.st_ino == again.st_ino != old.st_ino and a.st_ino < 1 << vfs_module.VIEW_SHIFT
    views = set(vfs._fallback)
    assert len(views) == 2
    w.history = w.history.with_seed(  # a resquash: both views retire
        Seed(file="seed.2.sfs", generation=2, time=at(1), created=at(3), absorbed=(1,)), remaining=())
    w.save()
    run(ops.tick)
    for ino, node in list(vfs.nodes.items()):
        if node.view is not None and node.view.id in views:
            run(ops.forget, [(ino, node.nlookup)])
    assert not views & set(vfs._fallback), "a dead view's numbers were kept"
    fresh = lookup_path(ops, b"2026-11-03/home/alice/a.txt")
    assert fresh.st_ino not in (a.st_ino, old.st_ino), "numbers are never handed out twice"


def test_history_is_looked_at_only_by_housekeeping(tmp_path: Path) -> None:
    ops, vfs, _ = World(tmp_path).ops()
    checks = vfs.counters.history_checks
    for _ in range(50):
        run(ops.getattr, ROOT_INO, None)
        run(ops.lookup, ROOT_INO, b"latest", None)
    assert vfs.counters.history_checks == checks
    run(ops.tick)
    assert vfs.counters.history_checks == checks + 1


def test_sequential_reads_from_the_seed_are_prefetched(tmp_path: Path) -> None:
    world = World(tmp_path)
    data = os.urandom(3 << 20)
    (world.seed_dir / "big").write_bytes(data)
    ops, _, _ = world.ops()
    big = lookup_path(ops, b"2026-11-03/big")
    info = run(ops.open, big.st_ino, os.O_RDONLY, None)
    fd = info.fh
    step = 256 << 10
    got = b"".join(run(ops.read, fd, off, step) for off in range(0, len(data) + step, step))
    assert got == data
    assert ops.prefetcher._streams[fd].ahead > len(data)  # advice stayed ahead of the reader
    in_bin = lookup_path(ops, b"2026-11-03/home/alice/a.txt")  # changed on night 1: lives in a bin
    bin_fd = run(ops.open, in_bin.st_ino, os.O_RDONLY, None).fh
    assert bin_fd not in ops.prefetcher._streams
    assert run(ops.read, bin_fd, 0, step) == b"night 1 a\n"
    run(ops.release, fd)
    run(ops.release, bin_fd)
    ops.close()  # waits for the helper thread: every descriptor is closed by now
    for closed in (fd, bin_fd):
        with pytest.raises(OSError) as err:
            os.fstat(closed)
        assert err.value.errno == errno.EBADF


def test_sequential_reads_from_a_sealed_bin_are_prefetched(tmp_path: Path) -> None:
    """A sealed bin is a SquashFS image like the seed: its files get the same read-ahead help."""
    world = World(tmp_path)
    sealed_dir = tmp_path / "bin2-unpacked"  # stands in for bins/2.sfs mounted by the daemon
    sealed_dir.mkdir()
    data = os.urandom(3 << 20)
    (sealed_dir / "big2").write_bytes(data)
    world.history = world.history.with_bin(Bin(2, at(2), 1.0, 0, 0, 0, format=SEALED_FORMAT))
    world.save()
    seeds = PlainSeeds(lambda name: os.fsencode(sealed_dir if name == "bins/2.sfs" else world.seed_dir))
    vfs = Vfs(world.layout, seeds)
    vfs.refresh()
    ops = FuseOps(vfs, Recorder())
    assert "bins/2.sfs" in seeds.acquired
    big = lookup_path(ops, b"2026-11-04/big2")
    fd = run(ops.open, big.st_ino, os.O_RDONLY, None).fh
    step = 256 << 10
    got = b"".join(run(ops.read, fd, off, step) for off in range(0, len(data) + step, step))
    assert got == data
    assert ops.prefetcher._streams[fd].ahead > len(data)  # advice stayed ahead of the reader
    in_dir_bin = lookup_path(ops, b"2026-11-04/home/alice/a.txt")  # bin 1 is still a directory
    dir_fd = run(ops.open, in_dir_bin.st_ino, os.O_RDONLY, None).fh
    assert dir_fd not in ops.prefetcher._streams
    run(ops.release, fd)
    run(ops.release, dir_fd)
    ops.close()
