"""A mounted view never shows another day's data across a resquash (docs/filesystem.md).

A directory held open in a view (a shell's cwd, a file manager's window)
keeps naming its day after a resquash merged that day into the seed: it
reads that day's files, or ESTALE, never the older seed's. A daemon that could
not load the new history keeps its bins too, and tries again.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from squashfu_fs.read.mountd import daemon_pid, state_dir
from squashfu_fs.store import registry as readers

from .harness import fuse_mounted, history, keep_bins_unsealed, rolled_back, squashfu

pytestmark = pytest.mark.mounts


def night_text(night: int) -> str:
    return f"night {night}\n" * (night + 1)  # a new size every night: no same-size, same-second change


def make_root(scratch: Path, nights: int, max_bins: int, min_bins: int, seal: bool = True) -> tuple[Path, Path]:
    src, root = scratch / "src", scratch / "root"
    (src / "d").mkdir(parents=True)
    squashfu("init", root, "--source", src, "--max-bins", str(max_bins), "--min-bins", str(min_bins))
    if not seal:
        keep_bins_unsealed(root)
    for night in range(nights):
        backup(src, root, night)
    return src, root


def backup(src: Path, root: Path, night: int) -> None:
    (src / "d" / "f").write_text(night_text(night))
    squashfu("-r", root, "backup", now=f"2026-11-{night + 2:02d}T02:00")


def eventually(condition: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def read_or_estale(dir_fd: int, name: str) -> str | None:
    """The file's text through a held directory, or None for ESTALE (an honest refusal)."""
    try:
        fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ESTALE:
            return None
        raise
    with os.fdopen(fd) as f:
        return f.read()


def bins(root: Path) -> set[str]:
    """The bins on disk, as directories or sealed images."""
    return {p.name.removesuffix(".sfs") for p in (root / "bins").iterdir() if p.name.removesuffix(".sfs").isdigit()}


# A sealed bin is read through the daemon's own mount of its image, which outlives the file: a writer
# may delete the image at once and the held view still reads its day. A directory bin must be kept.
@pytest.mark.parametrize("seal", [True, False], ids=["sealed", "directories"])
@pytest.mark.parametrize("holder", ["shell", "file-manager"])
def test_a_directory_held_open_across_the_resquash_of_its_day_reads_that_day(scratch: Path, holder: str,
                                                                             seal: bool) -> None:
    src, root = make_root(scratch, nights=3, max_bins=3, min_bins=1, seal=seal)  # seed 11-02, bins 1, 2
    mp = scratch / "view"
    with fuse_mounted(root, mp):
        if holder == "shell":  # a cwd in bin 1's day: O_PATH, like chdir, looks the directory up, never lists it
            held = os.open(mp / "2026-11-03" / "d", os.O_PATH | os.O_DIRECTORY)
        else:  # a window showing the directory: opened and listed
            held = os.open(mp / "2026-11-03" / "d", os.O_RDONLY | os.O_DIRECTORY)
            assert os.listdir(held) == ["f"]
        try:
            backup(src, root, 3)
            backup(src, root, 4)  # five nights, max_bins 3: bins 1..3 merge into a new seed
            h = history(root)
            assert h["seed"]["absorbed"] == [1, 2, 3], h["seed"]
            eventually(lambda: not readers.lagging(root, h["generation"]), "the daemon never loaded the resquash")
            got = read_or_estale(held, "f")
            assert got in ((night_text(1),) if seal else (night_text(1), None)), \
                f"the held 2026-11-03/d reads {got!r}, another day's data"
            assert bins(root) == ({"4"} if seal else {"1", "4"}), \
                "the held view's bin was deleted, or unused ones were kept"
        finally:
            os.close(held)
        # Once the kernel forgets the view, the next writer deletes what the resquash left.
        eventually(lambda: (squashfu("-r", root, "resquash", expect=None).returncode == 0
                            and bins(root) == {"4"}), "the left bins were never deleted")
        assert (mp / "latest" / "d" / "f").read_text() == night_text(4)


@pytest.mark.parametrize("seal", [True, False], ids=["sealed", "directories"])
def test_a_failed_reload_is_retried_and_its_views_keep_their_bins(scratch: Path, seal: bool) -> None:
    src, root = make_root(scratch, nights=3, max_bins=2, min_bins=1, seal=seal)  # seed 11-02, bins 1, 2
    mp = scratch / "view"
    with fuse_mounted(root, mp):
        pid = daemon_pid(mp)
        eventually(lambda: not readers.lagging(root, history(root)["generation"]), "the daemon never started")
        blocker = state_dir(mp) / "seeds" / "seed.2.sfs"
        blocker.write_text("")  # where the daemon would mount the next seed: that mount now fails
        try:
            backup(src, root, 3)  # three bins, max_bins 2: bins 1 and 2 merge into seed.2.sfs
            generation = history(root)["generation"]
            assert history(root)["seed"]["file"] == "seed.2.sfs"
            assert readers.lagging(root, generation) == [pid], "a daemon that failed to load said it had"
            if not seal:  # sealed: the daemon's own mounts of 1.sfs and 2.sfs keep them readable
                assert {"1", "2"} <= bins(root), "bins the lagging daemon's views use were deleted"
            assert (mp / "2026-11-03" / "d" / "f").read_text() == night_text(1)
            assert (mp / "2026-11-04" / "d" / "f").read_text() == night_text(2)
        finally:
            blocker.unlink()
        eventually(lambda: not readers.lagging(root, generation), "the failed reload was never tried again")
        assert os.readlink(mp / "latest") == "2026-11-05"
        assert (mp / "latest" / "d" / "f").read_text() == night_text(3)
        eventually(lambda: (squashfu("-r", root, "resquash", expect=None).returncode == 0
                            and bins(root) == {"3"}), "the left bins were never deleted")


def test_a_rollback_over_a_bins_directory_keeps_it_through_sealing(scratch: Path) -> None:
    """A kernel roll-back stacks bins/1 itself: sealing bin 1 must leave that directory until the roll-back is gone."""
    src, root = make_root(scratch, nights=2, max_bins=14, min_bins=7, seal=False)  # seed, bin 1 (11-03)
    with rolled_back(root, "2026-11-03", scratch / "rb") as rb:
        assert (rb / "d" / "f").read_text() == night_text(1)
        config = root / "squashfu.toml"
        config.write_text(config.read_text().replace("seal = false\n", ""))
        backup(src, root, 2)  # seals bin 1 (and the new bin 2)
        assert [b["format"] for b in history(root)["bins"]] == ["sealed", "sealed"]
        assert (root / "bins" / "1").is_dir(), "the directory a live roll-back stacks was deleted"
        assert (rb / "d" / "f").read_text() == night_text(1), "the roll-back lost its day"
        squashfu("-r", root, "backup", now="2026-11-05T02:00")  # recovery keeps it too while the roll-back lives
        assert (root / "bins" / "1").is_dir()
    squashfu("-r", root, "backup", now="2026-11-06T02:00")  # the roll-back is gone: recovery removes it
    assert not (root / "bins" / "1").exists()


def test_a_directory_held_open_while_its_bin_is_sealed_reads_that_day(scratch: Path) -> None:
    """A view built over bin 1's directory keeps it until the view is gone; sealing never pulls it away."""
    src, root = make_root(scratch, nights=2, max_bins=14, min_bins=7, seal=False)  # seed, bin 1 (11-03)
    mp = scratch / "view"
    with fuse_mounted(root, mp):
        held = os.open(mp / "2026-11-03" / "d", os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert os.listdir(held) == ["f"]
            config = root / "squashfu.toml"
            config.write_text(config.read_text().replace("seal = false\n", ""))
            backup(src, root, 2)  # seals bin 1 (and the new bin 2)
            h = history(root)
            assert [b["format"] for b in h["bins"]] == ["sealed", "sealed"]
            eventually(lambda: not readers.lagging(root, h["generation"]), "the daemon never loaded the seal")
            assert (root / "bins" / "1").is_dir(), "the directory a live view reads was deleted"
            assert read_or_estale(held, "f") == night_text(1), "the held view lost its day"
            assert (mp / "2026-11-03" / "d" / "f").read_text() == night_text(1)  # a fresh lookup: the image
        finally:
            os.close(held)
        # Once the kernel forgets the old view, the next writer's recovery deletes the directory.
        eventually(lambda: (squashfu("-r", root, "resquash", expect=None).returncode in (0, 2)
                            and not (root / "bins" / "1").exists()), "the sealed bin's directory was never deleted")
        assert (mp / "latest" / "d" / "f").read_text() == night_text(2)
