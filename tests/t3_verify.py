"""``squashfu verify`` (docs/commands.md, "verify") on real roots made by the real CLI.

Damage is made by hand the way a disk or a careless admin makes it: a byte
flipped in an image, a file changed inside a directory bin, a layer renamed
away, a stray file dropped into ``bins/``. Each is named per layer with the
views that show it, exits 1, and verifies clean again once undone.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from squashfu_fs.read.verify import verify_history
from squashfu_fs.store import history as history_mod
from squashfu_fs.store.layout import RootLayout

from .harness import backup_paused_in_rsync, history, keep_bins_unsealed, one_line, sealed, squashfu

pytestmark = pytest.mark.mounts

NIGHTS = ("2026-11-02T02:00", "2026-11-03T02:00", "2026-11-04T02:00", "2026-11-05T02:00")  # mon..thu


def make_root(scratch: Path, *, unsealed: bool = False, compression: str = "zstd") -> tuple[Path, Path]:
    """A seed (Monday) and bins 1..3 (Tuesday..Thursday), each bin holding a changed and a new file."""
    src, root = scratch / "src", scratch / "root"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.txt").write_text("alpha\n" * 2000)
    (src / "b.bin").write_bytes(os.urandom(64 << 10))
    squashfu("init", root, "--source", src, "--compression", compression)
    if unsealed:
        keep_bins_unsealed(root)
    for night, when in enumerate(NIGHTS):
        if night:
            (src / "docs" / "a.txt").write_text(f"night {night}\n" * 3000)
            (src / f"new-{night}.txt").write_text(f"added on night {night}\n" * 500)
        squashfu("-r", root, "backup", now=when)
    assert sealed(root) != unsealed
    return src, root


def verify(root: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    return squashfu("-r", root, "verify", "--no-progress", *args, expect=expect)


def verify_json(root: Path, *args: str, expect: int = 0) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(verify(root, "--json", *args, expect=expect).stdout)
    return data


def layer(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in report["layers"] if r["layer"] == name)


def damaged(report: dict[str, Any]) -> list[str]:
    return [r["layer"] for r in report["layers"] if r["problems"] and r["skipped"] is None]


def flip(path: Path, offset: int) -> None:
    """Flip every bit of one byte, in place: flipping it again restores the file."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def squashfs_bytes_used(image: Path) -> int:
    """How much of an image is the filesystem (the rest is padding to 4 KiB)."""
    with open(image, "rb") as f:
        f.seek(40)
        return int.from_bytes(f.read(8), "little")


def first_data_block(head: bytes) -> int:
    """Where an image's first data block starts: after the superblock and the compressor options, if any."""
    flags = int.from_bytes(head[24:26], "little")
    if not flags & 0x400:  # SQUASHFS_COMP_OPT: a metadata block of compressor options follows the superblock
        return 96
    return 96 + 2 + (int.from_bytes(head[96:98], "little") & 0x7FFF)


# Views of the four nights: Monday's seed, bins 1..3 on Tuesday..Thursday.
BIN_2_VIEWS = ["2026-11-04", "2026-11-05", "wed", "thu", "latest"]
ALL_VIEWS = ["2026-11-02", "2026-11-03", "2026-11-04", "2026-11-05", "mon", "tue", "wed", "thu", "latest", "seed"]


def test_a_clean_root_verifies(scratch: Path) -> None:
    _, root = make_root(scratch)
    proc = verify(root)
    assert proc.stdout.startswith("verified 4 layer(s) (seed and 3 bin(s))"), proc.stdout
    assert proc.stdout.strip().endswith("no damage") and len(proc.stdout.splitlines()) == 1, proc.stdout
    assert proc.stderr == ""
    report = verify_json(root)
    assert report["status"] == "ok" and report["root_problems"] == []
    assert [r["layer"] for r in report["layers"]] == ["seed", "bin 1", "bin 2", "bin 3"]
    assert [r["file"] for r in report["layers"]] == ["seed.sfs", "bins/1.sfs", "bins/2.sfs", "bins/3.sfs"]
    for r in report["layers"]:
        assert r["digest_ok"] is True and r["readable"] is True and r["problems"] == [], r
    images = [root / "seed.sfs", *(root / "bins" / f"{n}.sfs" for n in (1, 2, 3))]
    assert report["bytes_hashed"] == sum(p.stat().st_size for p in images)
    assert layer(report, "seed")["views"] == ALL_VIEWS
    assert layer(report, "bin 2")["views"] == BIN_2_VIEWS
    assert verify_json(root, "--data")["status"] == "ok"


def test_a_flipped_byte_in_a_bin_image_names_the_bin_and_its_views(scratch: Path) -> None:
    _, root = make_root(scratch)
    image = root / "bins" / "2.sfs"
    offset = squashfs_bytes_used(image) // 2
    flip(image, offset)
    proc = verify(root, expect=1)
    assert "damaged: bin 2 (bins/2.sfs), in views: " + ", ".join(BIN_2_VIEWS) in proc.stdout, proc.stdout
    assert "bin 1" not in proc.stdout and "seed" not in proc.stdout.split("verified")[0], proc.stdout
    assert one_line(proc) == "squashfu: verify found damage in bin 2 (1 of 4 layers)"
    report = verify_json(root, expect=1)
    assert report["status"] == "damaged" and damaged(report) == ["bin 2"]
    assert layer(report, "bin 2")["digest_ok"] is False and layer(report, "bin 2")["views"] == BIN_2_VIEWS
    assert layer(report, "bin 1")["digest_ok"] is True
    flip(image, offset)
    verify(root)


def test_a_flipped_byte_in_the_seed_names_the_seed(scratch: Path) -> None:
    _, root = make_root(scratch)
    image = root / "seed.sfs"
    offset = squashfs_bytes_used(image) // 3
    flip(image, offset)
    proc = verify(root, expect=1)
    assert f"damaged: seed (seed.sfs), in views: {', '.join(ALL_VIEWS)}" in proc.stdout, proc.stdout
    assert one_line(proc) == "squashfu: verify found damage in seed (1 of 4 layers)"
    report = verify_json(root, expect=1)
    assert damaged(report) == ["seed"] and layer(report, "seed")["digest_ok"] is False
    flip(image, offset)
    assert verify_json(root)["status"] == "ok"


def test_damaged_metadata_makes_an_image_unreadable(scratch: Path) -> None:
    """unsquashfs -lln reads every inode: damage in the inode table is named as more than a digest."""
    _, root = make_root(scratch, compression="gzip")  # zlib's checksum makes the damage certain to show
    image = root / "bins" / "3.sfs"
    with open(image, "rb") as f:
        f.seek(64)
        inode_table = int.from_bytes(f.read(8), "little")
    flip(image, inode_table + 4)
    report = verify_json(root, expect=1)
    bin3 = layer(report, "bin 3")
    assert bin3["readable"] is False and bin3["digest_ok"] is False, bin3
    assert any(p.startswith("unsquashfs metadata check failed") for p in bin3["problems"]), bin3
    flip(image, inode_table + 4)
    verify(root)


def test_data_reads_a_damaged_data_block_that_the_digest_was_made_to_match(scratch: Path) -> None:
    """--data decompresses every block: it catches damage even where history's digest was rewritten to match."""
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    (src / "f").write_text("seed\n")
    squashfu("init", root, "--source", src, "--compression", "gzip")
    squashfu("-r", root, "backup", now=NIGHTS[0])
    (src / "big.bin").write_bytes(b"A" * (256 << 10))  # bin 1 holds only this: its first block follows the superblock
    squashfu("-r", root, "backup", now=NIGHTS[1])
    image = root / "bins" / "1.sfs"
    with open(image, "r+b") as f:
        start = first_data_block(f.read(128))
        f.seek(start)
        block = f.read(32)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in block))
    h = history(root)
    h["bins"][0]["digest"] = "sha256:" + hashlib.sha256(image.read_bytes()).hexdigest()
    (root / "history.json").write_text(json.dumps(h))
    assert verify_json(root)["status"] == "ok", "the digest and the metadata should not see this damage"
    proc = verify(root, "--data", expect=1)
    assert "damaged: bin 1 (bins/1.sfs)" in proc.stdout, proc.stdout
    assert "unsquashfs data check failed" in proc.stdout and "big.bin" in proc.stdout, proc.stdout
    report = verify_json(root, "--data", expect=1)
    bin1 = layer(report, "bin 1")
    assert bin1["digest_ok"] is True and bin1["readable"] is False and damaged(report) == ["bin 1"]


def test_directory_bins_are_checked_against_their_digest_lists(scratch: Path) -> None:
    _, root = make_root(scratch, unsealed=True)
    report = verify_json(root, "--data")
    assert report["status"] == "ok" and [r["kind"] for r in report["layers"]] == ["seed", *["directory"] * 3]
    assert layer(report, "bin 2")["file"] == "bins/2" and layer(report, "bin 2")["digest_ok"] is True
    changed = root / "bins" / "2" / "docs" / "a.txt"
    flip(changed, 5)
    verify(root)  # plain verify reads the list and the names, not the files (docs/commands.md)
    proc = verify(root, "--data", expect=1)
    assert "damaged: bin 2 (bins/2), in views: " + ", ".join(BIN_2_VIEWS) in proc.stdout, proc.stdout
    assert "docs/a.txt: its SHA-256 differs from the digest list" in proc.stdout, proc.stdout
    assert damaged(verify_json(root, "--data", expect=1)) == ["bin 2"]
    flip(changed, 5)
    verify(root, "--data")

    (root / "bins" / "2" / "new-2.txt").rename(scratch / "away")
    (root / "bins" / "2" / "docs" / "stray").write_text("not backed up\n")
    proc = verify(root, expect=1)
    assert "new-2.txt: is in the digest list but missing from the bin" in proc.stdout, proc.stdout
    assert "docs/stray: is in the bin but not in its digest list" in proc.stdout, proc.stdout
    (scratch / "away").rename(root / "bins" / "2" / "new-2.txt")
    (root / "bins" / "2" / "docs" / "stray").unlink()
    verify(root)

    digest_list = root / "bins" / "3.sha256"
    flip(digest_list, 0)
    report = verify_json(root, expect=1)
    assert damaged(report) == ["bin 3"] and layer(report, "bin 3")["digest_ok"] is False
    assert any("bins/3.sha256" in p for p in layer(report, "bin 3")["problems"])
    flip(digest_list, 0)
    verify(root)


def test_a_missing_layer_and_entries_history_does_not_name(scratch: Path) -> None:
    _, root = make_root(scratch)
    (root / "bins" / "3.sfs").rename(scratch / "3.sfs")
    proc = verify(root, expect=1)
    assert "damaged: bin 3 (bins/3.sfs), in views: 2026-11-05, thu, latest" in proc.stdout, proc.stdout
    assert "  bins/3.sfs is missing" in proc.stdout
    assert one_line(proc) == "squashfu: verify found damage in bin 3 (1 of 4 layers)"
    (scratch / "3.sfs").rename(root / "bins" / "3.sfs")
    verify(root)

    (root / "bins" / "notes.txt").write_text("mine\n")
    (root / "seed.sfs.orig").write_text("a copy\n")
    proc = verify(root, expect=1)
    assert "root: bins/notes.txt is not part of the root's history" in proc.stdout, proc.stdout
    assert "root: seed.sfs.orig is not part of the root's history" in proc.stdout, proc.stdout
    assert one_line(proc) == "squashfu: verify found damage in 2 stray entries in the root"
    report = verify_json(root, expect=1)
    assert damaged(report) == [] and len(report["root_problems"]) == 2
    (root / "bins" / "notes.txt").unlink()
    (root / "seed.sfs.orig").unlink()
    (root / "bins" / "9.sfs").symlink_to(root / "bins" / "3.sfs")  # named like debris, but squashfu makes no links
    assert verify_json(root, expect=1)["root_problems"] == ["bins/9.sfs is a symlink, which squashfu never makes"]
    (root / "bins" / "9.sfs").unlink()

    # What an interrupted command leaves is debris for the next writer, not damage.
    (root / "bins" / ".partial-4").mkdir()
    (root / "bins" / "4.sfs.tmp").write_bytes(b"")
    (root / "bins" / "1").mkdir()  # a sealed bin's directory, left by a crash after the seal committed
    (root / "seed.2.sfs.tmp").write_bytes(b"")
    report = verify_json(root)
    assert report["debris"] == ["bins/.partial-4", "bins/1", "bins/4.sfs.tmp", "seed.2.sfs.tmp"], report["debris"]


def test_a_layer_written_before_digests_is_a_warning(scratch: Path) -> None:
    _, root = make_root(scratch)
    h = history(root)
    h["seed"]["digest"] = None
    (root / "history.json").write_text(json.dumps(h))
    proc = verify(root)
    assert "warning: seed (seed.sfs): no digest recorded (written before digests)" in proc.stdout, proc.stdout
    assert layer(verify_json(root), "seed")["digest_ok"] is None


def test_verify_runs_beside_a_backup_that_holds_the_lock(scratch: Path) -> None:
    src, root = make_root(scratch)
    (src / "tonight.txt").write_text("friday\n")
    backup = backup_paused_in_rsync(root, pause=60, now="2026-11-06T02:00")
    try:
        report = verify_json(root)
        assert backup.poll() is None, "verify returned only after the backup ended: it waited for the lock"
        assert report["status"] == "ok" and report["debris"] == ["bins/.partial-4"], report
        assert "squashfu backup" in (root / ".lock").read_text()
    finally:
        os.killpg(backup.pid, signal.SIGTERM)
        backup.wait(timeout=30)
    squashfu("-r", root, "backup", now="2026-11-06T03:00")
    assert verify_json(root)["layers"][-1]["layer"] == "bin 4"


def test_a_layer_that_history_moved_on_from_is_skipped_not_damaged(scratch: Path) -> None:
    """A resquash or a seal beside verify removes what the history verify read names: skipped."""
    src, root = make_root(scratch, unsealed=True)
    layout = RootLayout(root)
    before = history_mod.load(layout.history)
    (root / "squashfu.toml").write_text((root / "squashfu.toml").read_text().replace("seal = false\n", ""))
    (src / "friday.txt").write_text("friday\n")
    squashfu("-r", root, "backup", now="2026-11-06T02:00")  # seals bins 1..3: their directories go
    report = verify_history(layout, before)
    assert [r.skipped for r in report.layers[1:]] == ["this bin became sealed while verify ran"] * 3
    assert report.ok and report.layers[0].digest_ok is True

    sealed_history = history_mod.load(layout.history)
    toml = root / "squashfu.toml"
    toml.write_text(toml.read_text().replace("min_bins = 7", "min_bins = 1"))
    squashfu("-r", root, "resquash")  # a new seed absorbs bins 1..3; seed.sfs and their images go
    report = verify_history(layout, sealed_history)
    assert [r.layer for r in report.layers if r.skipped] == ["seed", "bin 1", "bin 2", "bin 3"], report.layers
    assert report.ok, report.as_text()
    verify(root)


def test_usage_errors(scratch: Path) -> None:
    (scratch / "plain").mkdir()
    proc = verify(scratch / "plain", expect=2)
    assert "is not a squashfu backup root" in one_line(proc)
    _, root = make_root(scratch)
    assert squashfu("-r", root, "verify", "extra", expect=2).stdout == ""
