"""A real time-travel mount in a subprocess, driven by ordinary file calls.

The history is built by hand, the way the backup builds it: the seed through a
staging overlay upper squashed with mksquashfs, every night a kernel overlay
mount with the older layers as lowers and a fresh bin as upper, changed with
the backup tests' own generator. Every view of the FUSE mount must equal,
entry by entry, what the kernel's overlayfs shows for the same layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from squashfu_fs.engines import mounts
from squashfu_fs.read.mountd import daemon_pid, state_dir
from squashfu_fs.store import history as history_mod
from squashfu_fs.store import layers
from squashfu_fs.store.history import Bin, History, Seed
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.store.views import ViewTable
from squashfu_fs.write.layerscan import record_opaque_dirs, scan_layer

from .conftest import force_unmount
from .harness import NOBODY, as_nobody, code_paths, reachable_by_others, run_as_nobody, squashfu
from .harness import fuse_mounted as mounted
from .treegen import build_initial, differences, mutate, snapshot

pytestmark = pytest.mark.mounts

CLI = [sys.executable, "-m", "squashfu_fs.cli"]
START = datetime(2026, 11, 2, 2, 0).astimezone()  # a Monday


def night_times(count: int) -> list[datetime]:
    """Daily backups at 02:00, with a second backup on the third day at 14:00."""
    out = []
    day = START
    for n in range(count):
        out.append(day)
        day = day.replace(hour=14) if n == 2 else (day + timedelta(days=1)).replace(hour=2)
    return out


class HandMade:
    """A backup root built with the kernel's own overlayfs, one night at a time."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.layout = RootLayout(self.root)
        for d in self.layout.skeleton():
            d.mkdir(parents=True, exist_ok=True)
        self.history = History()
        self.expected: dict[str, Any] = {}  # dated view -> snapshot taken through overlay that night

    def make_seed(self, when: datetime) -> None:
        staging, rw = self.layout.staging, self.layout.rw
        staging.mkdir()
        (self.layout.work / "seed").mkdir()
        mounts.mount_overlay(rw, [".empty"], upper=".staging", work=".work/seed", cwd=self.root)
        try:
            build_initial(os.fsencode(rw))
            self.expected[when.strftime("%Y-%m-%d")] = snapshot(os.fsencode(rw))
        finally:
            mounts.unmount(rw)
        subprocess.run(["mksquashfs", staging, self.layout.seed("seed.sfs"), "-noappend", "-quiet",
                        "-comp", "zstd", "-Xcompression-level", "3"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["rm", "-rf", staging, self.layout.work / "seed"], check=True)
        self.history = History(seed=Seed(file="seed.sfs", generation=1, time=when.isoformat(),
                                         created=when.isoformat()), generation=1)
        history_mod.save(self.layout.history, self.history)

    def add_night(self, night: int, when: datetime) -> None:
        number = self.history.next_bin
        upper = self.layout.bin(number)
        upper.mkdir()
        work = self.layout.work / str(number)
        work.mkdir()
        assert self.history.seed is not None
        mounts.mount_squashfs(self.layout.seed(self.history.seed.file), self.layout.ro)
        try:
            lowers = [self.layout.bin_rel(b.number) for b in reversed(self.history.bins)] + ["ro"]
            mounts.mount_overlay(self.layout.rw, lowers, upper=self.layout.bin_rel(number),
                                 work=f".work/{number}", cwd=self.root)
            try:
                mutate(os.fsencode(self.layout.rw), night)
                self.expected[when.strftime("%Y-%m-%d")] = snapshot(os.fsencode(self.layout.rw))
            finally:
                mounts.unmount(self.layout.rw)
        finally:
            mounts.unmount(self.layout.ro)
        subprocess.run(["rm", "-rf", work], check=True)
        record_opaque_dirs(self.layout, number, scan_layer(upper, source=self.base / "no-source"))
        self.history = self.history.with_bin(Bin(number, when.isoformat(), 1.0, 0, 0, 0))
        history_mod.save(self.layout.history, self.history)

    def seal(self) -> None:
        """Compress every bin into ``bins/N.sfs`` with plain mksquashfs, as sealing does, and drop the directory."""
        for b in self.history.bins:
            subprocess.run(["mksquashfs", self.layout.bin(b.number), self.layout.sealed_bin(b.number), "-noappend",
                            "-quiet", "-comp", "zstd"], check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["rm", "-rf", self.layout.bin(b.number)], check=True)
            self.history = self.history.with_bin_replaced(dataclasses.replace(b, format="sealed"))
        history_mod.save(self.layout.history, self.history)

    @contextmanager
    def kernel_view(self, name: str) -> Iterator[Path]:
        """The same state through the kernel: a read-only overlay of the same layers (images mounted first)."""
        spec = ViewTable.from_history(self.history).resolve(name)
        assert self.history.seed is not None
        seed_mp = self.base / "kseed"
        view_mp = self.base / "kview"
        seed_mp.mkdir(exist_ok=True)
        view_mp.mkdir(exist_ok=True)
        bins = [self.history.bin(n) for n in spec.bins]
        with mounts.squashfs_mounted(self.layout.seed(self.history.seed.file), seed_mp), \
                layers.images_mounted(self.layout, bins, self.base / "kbins") as images:
            # The seed alone goes over an empty layer too: a read-only overlay needs two
            # lowers, and only overlay unescapes the seed's trusted.overlay.overlay.* xattrs.
            lowers = layers.lowerdirs(self.layout, bins, os.path.relpath(seed_mp, self.root), images=images)
            mounts.mount_overlay(view_mp, [*lowers, ".empty"], cwd=self.root)
            try:
                yield view_mp
            finally:
                mounts.unmount(view_mp)


# Every test on this history runs twice: over bins kept as directories, and over the same bins
# sealed into images, which the daemon mounts itself (loop as root, squashfuse as a normal user).
@pytest.fixture(scope="module", params=["directories", "sealed"])
def made(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[HandMade]:
    base = tmp_path_factory.mktemp("history")
    h = HandMade(base)
    try:
        times = night_times(9)
        h.make_seed(times[0])
        for night, when in enumerate(times[1:], start=1):
            h.add_night(night, when)
        if request.param == "sealed":
            h.seal()
        yield h
    finally:
        force_unmount(base)
        assert not mounts.mounts_below(base)


def fullstat(top: bytes) -> dict[bytes, tuple[Any, ...]]:
    """What ``ls -l``, ``du`` and ``find`` see, beyond the snapshot: blocks, links, ns times."""
    out: dict[bytes, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            out[os.path.relpath(path, top)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_blocks,
                                               st.st_nlink, st.st_mtime_ns, st.st_rdev)
    return out


def test_every_view_equals_the_kernel_overlay(made: HandMade, scratch: Path) -> None:
    table = ViewTable.from_history(made.history)
    with mounted(made.root, scratch / "mp") as mp:
        names = sorted(os.listdir(mp))
        assert names == sorted([*table.names(), "versions", "snapshots"])
        assert sorted(os.listdir(mp / "snapshots")) == list(table.snapshots)
        assert len(table.dated) == 8 and set(table.links) >= {"mon", "tue", "wed", "thu", "fri", "sat", "sun"}
        for link, target in table.links.items():
            assert os.readlink(mp / link) == target
            assert stat.S_ISLNK(os.lstat(mp / link).st_mode)
        for name in [*table.dated, "seed"]:
            fuse_view = os.fsencode(mp / name)
            got = snapshot(fuse_view)
            if name in made.expected:
                diff = differences(made.expected[name], got)
                assert not diff, (name, diff)
            with made.kernel_view(name) as kernel:
                want = snapshot(os.fsencode(kernel))
                assert not differences(want, got), (name, differences(want, got))
                k_full, f_full = fullstat(os.fsencode(kernel)), fullstat(fuse_view)
                assert k_full.keys() == f_full.keys()
                bad = {p: (k_full[p], f_full[p]) for p in k_full if k_full[p] != f_full[p]}
                assert not bad, (name, list(bad.items())[:5])
                top_k, top_f = os.stat(kernel), os.stat(fuse_view)
                assert (top_k.st_mode, top_k.st_uid, top_k.st_mtime_ns) == (
                    top_f.st_mode, top_f.st_uid, top_f.st_mtime_ns)
            same = [n for n, spec in table.snapshots.items() if spec.bins == table.resolve(name).bins]
            assert same, f"{name} is no backup's state"
            for snap in same:  # snapshots/ shows the same state, attribute for attribute
                assert fullstat(os.fsencode(mp / "snapshots" / snap)) == fullstat(fuse_view), snap
                assert not differences(snapshot(os.fsencode(mp / "snapshots" / snap)), got), snap
            assert len(got[0]) > 100
        # weekday links and latest lead into the same trees as the dated names
        assert snapshot(os.fsencode(mp / "latest")) == snapshot(os.fsencode(mp / table.links["latest"]))
        # hard links share an inode number within a view (and du counts them once)
        bob = mp / next(iter(table.dated)) / "home" / "bob"
        assert os.stat(bob / "linked").st_ino == os.stat(bob / "linked-2").st_ino
        # statfs answers; xattrs absent on a name cost nothing but ENODATA
        assert os.statvfs(mp).f_namemax == 255
        with pytest.raises(OSError) as info:
            os.getxattr(bob / "linked", "user.absent")
        assert info.value.errno == errno.ENODATA


def test_every_write_fails_with_erofs(made: HandMade, scratch: Path) -> None:
    with mounted(made.root, scratch / "mp") as mp:
        view = mp / "latest"
        f = view / "home" / "bob" / "linked"
        attempts = {
            "open for writing": lambda: os.open(f, os.O_WRONLY),
            "open O_RDWR": lambda: os.open(f, os.O_RDWR),
            "truncate": lambda: os.truncate(f, 0),
            "create": lambda: os.open(view / "new", os.O_CREAT | os.O_WRONLY, 0o644),
            "mkdir": lambda: os.mkdir(view / "newdir"),
            "mkdir in root": lambda: os.mkdir(mp / "2030-01-01"),
            "unlink": lambda: os.unlink(f),
            "rmdir": lambda: os.rmdir(view / "home" / "alice" / "docs"),
            "rename": lambda: os.rename(f, view / "moved"),
            "chmod": lambda: os.chmod(f, 0o777),
            "chown": lambda: os.chown(f, 1, 1),
            "utime": lambda: os.utime(f, (0, 0)),
            "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
            "removexattr": lambda: os.removexattr(view / "home" / "bob" / "xattrs", "user.colour"),
            "symlink": lambda: os.symlink("x", view / "sl"),
            "link": lambda: os.link(f, view / "hl"),
            "mknod": lambda: os.mkfifo(view / "fifo2"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EROFS, f"{what}: {info.value}"


def test_eight_parallel_readers_agree(made: HandMade, scratch: Path) -> None:
    table = ViewTable.from_history(made.history)
    with mounted(made.root, scratch / "mp") as mp:
        views = [*table.dated, "seed"][:8]
        results: dict[int, Any] = {}
        errors: list[BaseException] = []

        def read(i: int) -> None:
            try:
                snap = snapshot(os.fsencode(mp / views[i]))
                results[i] = snap
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(len(views))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        for i, name in enumerate(views):
            want = made.expected.get(name) or snapshot(os.fsencode(mp / name))
            assert not differences(want, results[i]), (name, differences(want, results[i]))


def test_a_read_held_in_its_disk_io_does_not_hold_other_requests(made: HandMade, scratch: Path) -> None:
    """A read waiting for the disk must not stall a listing or a lookup of another client (issue 9, item 6).

    The daemon's read path holds at checkpoint ``fuse-read`` (docs/crash-safety.md) until the test
    lets it go; meanwhile another thread lists and stats paths of another view the kernel has never
    seen, so each needs the daemon. They must be answered while the read is still held.
    """
    table = ViewTable.from_history(made.history)
    first, other = next(iter(table.dated)), "seed"
    hold = scratch / "hold"
    hold.mkdir()
    env = {"SQUASHFU_FAULT": "fuse-read", "SQUASHFU_FAULT_ACTION": "hold", "SQUASHFU_FAULT_HOLD": str(hold)}
    with mounted(made.root, scratch / "mp", env=env) as mp:
        victim = next(Path(d) / n for d, _, files in os.walk(mp / first) for n in files
                      if stat.S_ISREG(os.lstat(Path(d) / n).st_mode) and os.lstat(Path(d) / n).st_size)
        read_back: list[bytes] = []
        reader = threading.Thread(target=lambda: read_back.append(victim.read_bytes()))
        answered: list[object] = []
        errors: list[BaseException] = []

        def other_client() -> None:
            try:
                answered.append(sorted(os.listdir(mp / other)))
                answered.append(os.stat(mp / other / "home" / "bob").st_ino)
                answered.append(sorted(os.listdir(mp / other / "home")))
            except BaseException as exc:
                errors.append(exc)

        lister = threading.Thread(target=other_client)
        try:
            reader.start()
            deadline = time.monotonic() + 30
            while not (hold / "reached").exists():
                assert time.monotonic() < deadline and reader.is_alive(), "the read never reached the daemon"
                time.sleep(0.01)
            lister.start()
            lister.join(20)
            done_while_held = not lister.is_alive() and not (hold / "release").exists()
        finally:
            (hold / "release").touch()
        reader.join(30)
        lister.join(30)
        assert not errors, errors
        assert done_while_held, "listing another view waited for a read held in its disk I/O"
        assert len(answered) == 3 and "home" in answered[0] and "bob" in answered[2]
        assert len(read_back) == 1, "the held read never finished"
        with made.kernel_view(first) as kernel:
            assert read_back[0] == (kernel / victim.relative_to(mp / first)).read_bytes()


def _two_days_for_patched_pyfuse3(base: Path, feature: str) -> tuple[HandMade, list[datetime]]:
    """A seed and one night (night_times' third time left for a later commit); fails without ``feature``.

    ``feature``: the marker contrib/pyfuse3's patches add to pyfuse3 (``make install`` builds it).
    """
    import pyfuse3._pyfuse3

    assert getattr(pyfuse3._pyfuse3, feature, False), f"pyfuse3 without {feature}: run make install"
    h = HandMade(base)
    times = night_times(3)
    h.make_seed(times[0])
    h.add_night(2, times[1])
    return h, times


def test_the_kernel_keeps_latest_target_instead_of_asking_the_daemon(tmp_path: Path, scratch: Path) -> None:
    """A path through `latest` must not cost a readlink round trip each time: the daemon is stopped, it still resolves.

    Needs pyfuse3 built with contrib/pyfuse3/cache-symlinks.patch (``make install`` does it).
    """
    h, _ = _two_days_for_patched_pyfuse3(tmp_path, "symlink_caching")
    with mounted(h.root, scratch / "mp") as mp:
        assert os.readlink(mp / "latest") == "2026-11-03"
        os.stat(mp / "latest" / "home")  # every name on the way is now in the kernel's caches
        answer = _answered_while_daemon_stopped(mp, lambda: (os.readlink(mp / "latest"),
                                                             os.stat(mp / "latest" / "home").st_ino))
        assert answer is not None, "resolving latest/ waited for the daemon: its target is not cached"
        assert answer == ("2026-11-03", os.stat(mp / "2026-11-03" / "home").st_ino)


def _answered_while_daemon_stopped(mp: Path, probe: Callable[[], object]) -> object | None:
    """What ``probe`` returns with the mount's daemon stopped (SIGSTOP), or None if it waited for the daemon."""
    pid = daemon_pid(mp)
    assert pid is not None
    answers: list[object] = []
    os.kill(pid, signal.SIGSTOP)
    try:
        thread = threading.Thread(target=lambda: answers.append(probe()))
        thread.start()
        thread.join(10)
        blocked = thread.is_alive()
    finally:
        os.kill(pid, signal.SIGCONT)
    thread.join(30)
    assert blocked or answers, "the probe failed"
    return None if blocked else answers[0]


def test_the_kernel_keeps_day_listings_and_the_root_follows_new_backups(tmp_path: Path, scratch: Path) -> None:
    """A day's listing is served from the kernel's cache; the root and snapshots/ still show a new backup.

    Needs pyfuse3 built with contrib/pyfuse3/cache-listings.patch (``make install`` does it).
    """
    h, times = _two_days_for_patched_pyfuse3(tmp_path, "listing_caching")
    with mounted(h.root, scratch / "mp") as mp:
        day = mp / "2026-11-03"
        home = sorted(os.listdir(day / "home"))
        fd = os.open(day / "home", os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert sorted(os.listdir(fd)) == home  # read to the end: the kernel now holds it
            listed = _answered_while_daemon_stopped(mp, lambda: sorted(os.listdir(fd)))  # rewound, read again
            assert listed == home, "a day's listing was asked of the daemon again"
        finally:
            os.close(fd)
        root_before = sorted(os.listdir(mp))
        snapshots_before = sorted(os.listdir(mp / "snapshots"))
        assert sorted(os.listdir(mp)) == root_before and "2026-11-04" not in root_before
        h.add_night(4, times[2])  # a commit while the listings above are in the kernel's caches
        new_day = times[2].strftime("%Y-%m-%d")
        snapshot_name = times[2].strftime("%Y-%m-%dT%H:%M:%S")
        deadline = time.monotonic() + 30
        while new_day not in os.listdir(mp):
            assert time.monotonic() < deadline, f"the root listing never showed {new_day}"
            time.sleep(0.05)
        table = ViewTable.from_history(h.history)
        assert sorted(os.listdir(mp)) == sorted([*table.names(), "versions", "snapshots"])
        assert os.readlink(mp / "latest") == new_day
        assert sorted(os.listdir(mp / "snapshots")) == sorted([*snapshots_before, snapshot_name])
        assert sorted(os.listdir(day / "home")) == home, "the cached listing of an older day changed"
        for name in ("2026-11-03", new_day):
            want = h.expected[name]
            got = snapshot(os.fsencode(mp / name))
            assert not differences(want, got), (name, differences(want, got))
        in_snapshots = snapshot(os.fsencode(mp / "snapshots" / snapshot_name))
        assert not differences(h.expected[new_day], in_snapshots)


def test_a_new_commit_appears_within_two_seconds(tmp_path: Path, scratch: Path) -> None:
    h = HandMade(tmp_path)
    times = night_times(3)
    h.make_seed(times[0])
    h.add_night(2, times[1])
    with mounted(h.root, scratch / "mp") as mp:
        names = os.listdir(mp)
        assert "2026-11-03" in names and "2026-11-04" not in names
        opened = open(mp / "latest" / "big.bin", "rb")  # noqa: SIM115 - kept open across the commit
        try:
            head = opened.read(1000)
            os.stat(mp / "2026-11-03" / "home")
            h.add_night(4, times[2])  # a commit while mounted and being read
            t0 = time.monotonic()
            while "2026-11-04" not in os.listdir(mp):
                assert time.monotonic() - t0 < 2.0, "the new day did not appear within 2 s"
                time.sleep(0.05)
            while os.readlink(mp / "latest") != "2026-11-04":
                assert time.monotonic() - t0 < 2.0, "latest did not move within 2 s"
                time.sleep(0.05)
            assert os.readlink(mp / "wed") == "2026-11-04"
            assert not os.path.exists(mp / "2026-11-04" / "doomed-dir")  # night 4 deleted it
            rest = opened.read()
            with open(mp / "2026-11-03" / "big.bin", "rb") as again:
                assert head + rest == again.read()
        finally:
            opened.close()


def test_umount_clears_a_mount_whose_daemon_was_killed(made: HandMade, scratch: Path) -> None:
    mp = scratch / "mp"
    with mounted(made.root, mp):
        pid = daemon_pid(mp)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if daemon_pid(mp) is None:
                break
            time.sleep(0.02)
        with pytest.raises(OSError) as info:
            os.listdir(mp)
        assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # the kernel says either
        assert mounts.mounts_below(state_dir(mp)), "the killed daemon's seed mount should still be there"
        squashfu("umount", mp)
        assert not mounts.is_mounted(mp)
        assert not mounts.mounts_below(state_dir(mp)), "the dead daemon's seed mount is left"
        assert os.listdir(mp) == []


def test_sigterm_unmounts_cleanly(made: HandMade, scratch: Path) -> None:
    mp = scratch / "mp"
    with mounted(made.root, mp):
        pid = daemon_pid(mp)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        for _ in range(250):
            if daemon_pid(mp) is None and not mounts.is_mounted(mp):
                break
            time.sleep(0.02)
        assert not mounts.is_mounted(mp)
        assert not mounts.mounts_below(state_dir(mp)) and not state_dir(mp).exists()


def test_bad_mountpoints_are_refused_with_one_line(made: HandMade, scratch: Path) -> None:
    inside = made.root / "inside"
    inside.mkdir(exist_ok=True)
    try:
        full = scratch / "full"
        full.mkdir()
        (full / "x").write_text("")
        for mp, words in ((inside, "inside the backup root"), (full, "not empty"),
                          (scratch / "missing", "not an existing directory")):
            proc = squashfu("-r", made.root, "mount", mp, expect=2)
            assert words in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
            assert not mounts.is_mounted(mp)
        proc = squashfu("-r", scratch, "mount", scratch / "full", expect=None)
        assert proc.returncode in (1, 2) and proc.stderr.count("\n") == 1
    finally:
        inside.rmdir()


@pytest.fixture
def fuse_for_users() -> Iterator[None]:
    """/dev/fuse as Debian's udev rule leaves it (0666); containers often make it 0600."""
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    try:
        os.chmod("/dev/fuse", mode | 0o666)
    except OSError as exc:  # a read-only /dev: say so rather than fail for the machine's sake
        pytest.skip(f"/dev/fuse is {oct(mode)} and cannot be opened to users here: {exc.strerror}")
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


@contextmanager
def owned_by(uid: int, root: Path) -> Iterator[None]:
    """A root that belongs to ``uid`` for a block: squashfu's own files (0600), not what the bins hold.

    squashfu keeps a root private to its owner (docs/layout.md); a normal user
    mounts a root of their own, while the bins' contents keep their recorded owners.
    """
    paths = [root, root / "history.json", *root.glob("seed*.sfs"), root / "bins", *(root / "bins").glob("*.opaque")]
    saved = {path: (path.lstat().st_uid, path.lstat().st_gid) for path in paths}
    try:
        for path in paths:
            os.chown(path, uid, uid, follow_symlinks=False)
        yield
    finally:
        for path, (old_uid, old_gid) in saved.items():
            os.chown(path, old_uid, old_gid, follow_symlinks=False)


def listing_as_nobody(view: Path) -> tuple[list[bytes], bytes, bytes]:
    """What user nobody sees below ``view``: every entry's metadata, and the checksums of what it may read."""
    found = run_as_nobody(["find", view, "-mindepth", "1", "-printf", r"%P\0%y %m %U %G %s %T@ %l\0"], text=False)
    fields = found.stdout.split(b"\0")
    # squashfuse gives directories size 0 where the kernel's squashfs gives their index size:
    # a directory's st_size means nothing to tools, so it is left out.
    entries = sorted(a + b"\0" + (re.sub(rb"^(d \d+ \d+ \d+) \d+", rb"\1 -", b))
                     for a, b in zip(fields[0::2], fields[1::2], strict=False))
    sums = run_as_nobody(["bash", "-c", 'cd "$1" && find . -type f -readable -print0 | sort -z | xargs -0r md5sum',
                          "_", view], text=False)
    return entries, sums.stdout, found.stderr.replace(os.fsencode(view), b"VIEW")


def test_a_normal_user_reaches_the_seed_through_squashfuse(made: HandMade, scratch: Path,
                                                            fuse_for_users: None) -> None:
    """Not root: the seed through squashfuse, opaque directories from the opaque records.

    User nobody cannot read ``trusted.overlay.opaque``; without the records
    beside the bins, a directory deleted and recreated in one night shows its
    old contents too. Every day must look to nobody through the daemon exactly
    as it looks to nobody through the kernel's overlay of the same layers.
    """
    mp = scratch / "mp"
    mp.mkdir()
    os.chown(mp, NOBODY, NOBODY)
    (made.base / "kview").mkdir(exist_ok=True)
    private = Path(f"/tmp/squashfu-{NOBODY}")
    with reachable_by_others(*code_paths(), made.root, mp, made.base / "kview"), owned_by(NOBODY, made.root):
        proc = as_nobody("-r", made.root, "mount", mp)
        assert proc.returncode == 0, proc.stderr
        try:
            seeds = [e.mount_point for e in mounts.mount_table() if e.fstype == "fuse.squashfuse_ll"]
            images = 1 + sum(layers.sealed(b) for b in made.history.bins)  # each image mounted once
            assert len(seeds) == images and all(m.startswith(os.fsencode(private)) for m in seeds), seeds
            table = ViewTable.from_history(made.history)
            assert sorted(run_as_nobody(["ls", mp]).stdout.split()) == sorted([*table.names(), "versions", "snapshots"])
            for name in ["seed", *table.dated]:
                with made.kernel_view(name) as kernel:
                    want, got = listing_as_nobody(kernel), listing_as_nobody(mp / name)
                assert len(got[0]) > 100 and got[1]
                assert got == want, (name, sorted(set(got[0]) ^ set(want[0]))[:6], got[2], want[2])
            # Hard links of the seed share one number, and a number outlives the kernel forgetting the file.
            with made.kernel_view("seed") as kernel:
                groups = snapshot(os.fsencode(kernel))[1]
            assert groups, "the tree generator makes hard links"
            for group in groups:
                paths = [os.fsdecode(mp / "seed" / os.fsdecode(p)) for p in sorted(group)]
                first = run_as_nobody(["stat", "-c", "%i", *paths]).stdout.split()
                Path("/proc/sys/vm/drop_caches").write_text("2\n")  # the kernel forgets: FUSE forget to both daemons
                again = run_as_nobody(["stat", "-c", "%i", *paths]).stdout.split()
                assert len(set(first)) == 1 and first == again, (sorted(group), first, again)
            done = as_nobody("umount", mp)
            assert done.returncode == 0, done.stderr
            for _ in range(250):
                if not mounts.mounts_below(private):
                    break
                time.sleep(0.02)
            assert not mounts.is_mounted(mp) and not mounts.mounts_below(private), "squashfuse left behind"
        finally:
            for pid_file in private.glob(f"{state_dir(mp).name}/pid"):
                with contextlib.suppress(ValueError, ProcessLookupError):
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            force_unmount(mp)
            force_unmount(private)
