"""A new seed must hold what it replaces: a read error never becomes an empty file (docs/crash-safety.md).

mksquashfs, left to itself, turns a file it cannot read into an empty file
and exits 0. The read error here is a real one: a committed bin is replaced
by a SquashFS image of itself whose one compressed data block is damaged, so
the kernel answers EIO to every read of that file (as a failing disk would).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from squashfu_fs.engines import mksquashfs as squash
from squashfu_fs.engines import mounts
from squashfu_fs.errors import SquashfuError
from squashfu_fs.store.config import Config

from .harness import bin_opened, history, keep_bins_unsealed, squashfu

pytestmark = pytest.mark.mounts

BIG = b"A" * (256 << 10)  # compresses to a few hundred bytes: its first block starts the image


def damaged_image(tree: Path, image: Path) -> None:
    """SquashFS of ``tree`` with its first data block damaged: reading that file fails with EIO."""
    subprocess.run(["mksquashfs", tree, image, "-noappend", "-comp", "gzip", "-no-fragments",
                    "-quiet", "-no-progress"], check=True, stdout=subprocess.DEVNULL)
    with open(image, "r+b") as f:
        f.seek(96)  # right after the superblock: the first file's first compressed block
        block = f.read(32)
        f.seek(96)
        f.write(bytes(b ^ 0xFF for b in block))


def three_nights(scratch: Path, *, seal: bool) -> tuple[Path, Path]:
    """A seed, bin 1 holding only big.bin, bin 2; min_bins 1, so a resquash absorbs bin 1."""
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    (src / "f").write_text("seed\n")
    squashfu("init", root, "--source", src, "--min-bins", "1")
    if not seal:
        keep_bins_unsealed(root)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    (src / "big.bin").write_bytes(BIG)  # night 1: bin 1 holds only this file's data
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    (src / "f").write_text("night 2\n")
    squashfu("-r", root, "backup", now="2026-11-04T02:00")
    return src, root


def refused_untouched(root: Path, before: bytes) -> None:
    proc = squashfu("-r", root, "resquash", expect=None)
    assert (root / "history.json").read_bytes() == before, (
        f"a seed built over a read error was committed: {history(root)['seed']}")
    assert proc.returncode == 1, f"exit {proc.returncode}: {proc.stderr}"
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert sorted(p.name for p in root.glob("seed*")) == ["seed.sfs"], "the temporary image was left"


def resquashed_once_readable(root: Path) -> None:
    squashfu("-r", root, "resquash")  # the disk is back: the same resquash now goes through
    h = history(root)
    assert h["seed"]["absorbed"] == [1] and [b["number"] for b in h["bins"]] == [2]
    assert not (root / "bins" / "1").exists() and not (root / "bins" / "1.sfs").exists()


def test_a_bin_file_that_cannot_be_read_stops_the_resquash(scratch: Path) -> None:
    """Exit 1, history and every layer untouched, no temporary image: never a seed with an empty file."""
    _, root = three_nights(scratch, seal=False)
    bin1 = root / "bins" / "1"
    assert (bin1 / "big.bin").read_bytes() == BIG
    image = scratch / "bin1.sfs"
    damaged_image(bin1, image)
    before = (root / "history.json").read_bytes()
    subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro,nosuid,nodev", image, bin1], check=True)
    try:
        with pytest.raises(OSError):
            (bin1 / "big.bin").read_bytes()  # the failing disk, seen by anyone
        refused_untouched(root, before)
        assert mounts.is_mounted(bin1) and (root / "bins" / "2").is_dir() and (root / "seed.sfs").is_file()
        assert [m for m in mounts.mounts_below(root) if m != os.fsencode(bin1)] == []
    finally:
        mounts.unmount(bin1)
    assert (bin1 / "big.bin").read_bytes() == BIG
    resquashed_once_readable(root)


def test_a_sealed_bin_that_cannot_be_read_stops_the_resquash(scratch: Path) -> None:
    """The same read error inside a sealed bin's image: refused, nothing changed, and fine once repaired."""
    _, root = three_nights(scratch, seal=True)
    tree = scratch / "bin1-tree"
    with bin_opened(root, 1) as bin1:
        shutil.copytree(bin1, tree, symlinks=True)
    damaged_image(tree, scratch / "damaged.sfs")
    good = scratch / "good.sfs"
    os.rename(root / "bins" / "1.sfs", good)
    shutil.copyfile(scratch / "damaged.sfs", root / "bins" / "1.sfs")
    before = (root / "history.json").read_bytes()
    refused_untouched(root, before)
    assert (root / "bins" / "2.sfs").is_file() and not mounts.mounts_below(root)
    os.replace(good, root / "bins" / "1.sfs")
    resquashed_once_readable(root)


def test_an_image_that_lost_an_entry_or_bytes_is_refused(scratch: Path) -> None:
    """The check itself: an image that differs from its tree by one entry or one file's size."""
    tree, image = scratch / "tree", scratch / "img.sfs"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(b"x" * 5000)
    os.symlink("d/f", tree / "link")
    (tree / b"caf\xe9\nname".decode("utf-8", "surrogateescape")).write_bytes(b"awkward\n")
    config = Config(source=str(scratch), compression="gzip")
    squash.make_image(tree, image, config)
    point = scratch / "check"
    point.mkdir()
    squash.check_image(image, tree, point)  # the same tree: accepted
    (tree / "d" / "f").write_bytes(b"x" * 4999)
    with pytest.raises(SquashfuError, match="d/f"):
        squash.check_image(image, tree, point)
    assert not image.exists(), "a refused image must not be left behind"
    (tree / "d" / "f").write_bytes(b"x" * 5000)
    squash.make_image(tree, image, config)
    (tree / "d" / "extra").write_text("")
    with pytest.raises(SquashfuError, match="d/extra"):
        squash.check_image(image, tree, point)
    assert not mounts.mounts_below(scratch)
