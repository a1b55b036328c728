"""Sealed bins (docs/layout.md, "Sealed bins"): what is sealed, what stays a directory, and older roots."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from squashfu_fs.store import digests
from squashfu_fs.util import digest

from .harness import acl_of, bin_opened, history, keep_bins_unsealed, rolled_back, sealed, squashfu
from .treegen import build_initial, differences, mutate, snapshot

pytestmark = pytest.mark.mounts


def nights(src: Path, root: Path, count: int, first: int = 0) -> dict[str, object]:
    """``count`` nights of the tree generator's changes; the expected snapshot of each day."""
    expected = {}
    for night in range(first, first + count):
        if night:
            mutate(os.fsencode(src), night)
        when = f"2026-11-{night + 2:02d}T02:00"
        squashfu("-r", root, "backup", now=when)
        expected[when[:10]] = snapshot(os.fsencode(src))
    return expected


def test_every_bin_is_sealed_with_its_digest_and_reads_back(scratch: Path) -> None:
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    build_initial(os.fsencode(src))
    squashfu("init", root, "--source", src)
    expected = nights(src, root, 4)
    h = history(root)
    assert sealed(root) and len(h["bins"]) == 3
    assert h["seed"]["digest"] == digest.of_file(root / h["seed"]["file"])
    for b in h["bins"]:
        image = root / "bins" / f"{b['number']}.sfs"
        assert b["digest"] == digest.of_file(image) and b["image_bytes"] == image.stat().st_size
        assert image.stat().st_mode & 0o777 == 0o600
    whiteouts = 0
    for b in h["bins"]:  # the images keep overlay's whiteouts (0:0 character devices) as written
        with bin_opened(root, b["number"]) as top:
            for d, _, names in os.walk(top):
                modes = [os.lstat(os.path.join(d, n)) for n in names]
                whiteouts += sum(stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 for st in modes)
    assert whiteouts, "three nights of the generator delete something: a whiteout must be in some image"
    for day, taken in expected.items():
        with rolled_back(root, day, scratch / "mp") as mp:
            got = snapshot(os.fsencode(mp))
        assert not differences(taken, got), f"{day}: {differences(taken, got)}"


def test_seal_false_keeps_directories_with_digest_lists(scratch: Path) -> None:
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    build_initial(os.fsencode(src))
    squashfu("init", root, "--source", src, "--no-seal")
    assert "seal = false" in (root / "squashfu.toml").read_text()
    nights(src, root, 3)
    for b in history(root)["bins"]:
        n = b["number"]
        assert b["format"] == "overlay" and (root / "bins" / str(n)).is_dir()
        assert not (root / "bins" / f"{n}.sfs").exists()
        listed, list_digest = digests.read_list(root / "bins" / f"{n}.sha256")
        assert list_digest == b["digest"]
        assert listed == digests.file_digests(root / "bins" / str(n))
    assert any(digests.read_list(root / "bins" / f"{b['number']}.sha256")[0] for b in history(root)["bins"])


def make_old_format_root(scratch: Path) -> tuple[Path, Path, dict[str, object]]:
    """A root as the code before sealing wrote it: directory bins, no digests anywhere, no seal setting.

    It is made with ``seal = false`` and then stripped of what that code never wrote: the digest
    lists, and the ``digest``, ``image_bytes`` and ``acls`` fields of history.
    """
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    build_initial(os.fsencode(src))
    (src / "shared.txt").write_text("for the group\n")
    squashfu("init", root, "--source", src)
    keep_bins_unsealed(root)
    expected = nights(src, root, 2)  # the seed, and bin 1 with nothing but the generator's changes
    subprocess.run(["setfacl", "-m", "u:1234:rw", src / "shared.txt"], check=True)
    expected |= nights(src, root, 1, first=2)  # bin 2 holds the ACL'd file
    data = json.loads((root / "history.json").read_text())
    data["seed"].pop("digest")
    for b in data["bins"]:
        for key in ("digest", "image_bytes", "acls"):
            b.pop(key)
    (root / "history.json").write_text(json.dumps(data, indent=2) + "\n")
    for listed in (root / "bins").glob("*.sha256"):
        listed.unlink()
    config = root / "squashfu.toml"
    config.write_text(config.read_text().replace("seal = false\n", ""))
    return src, root, expected


def test_an_older_root_is_sealed_by_its_next_backup(scratch: Path) -> None:
    src, root, expected = make_old_format_root(scratch)
    assert [b["format"] for b in history(root)["bins"]] == ["overlay", "overlay"]
    proc = squashfu("-r", root, "backup", "-v", now="2026-11-05T02:00")
    expected["2026-11-05"] = snapshot(os.fsencode(src))
    bins = history(root)["bins"]
    assert bins[0]["format"] == "sealed" and not (root / "bins" / "1").exists(), proc.stderr
    assert (root / "bins" / "1.sfs").is_file() and bins[0]["digest"] == digest.of_file(root / "bins" / "1.sfs")
    assert bins[1]["format"] == "overlay" and bins[1]["acls"] is True and "holds POSIX ACLs" in proc.stderr
    assert (root / "bins" / "2").is_dir() and digests.read_list(root / "bins" / "2.sha256")[1] == bins[1]["digest"]
    for b in bins:  # nothing is left in the old form: sealed, or a directory with its ACLs and a digest list
        assert b["format"] == "sealed" or (b["acls"] and b["digest"]), b
    assert history(root)["seed"].get("digest") is None, "an old seed keeps no digest until a resquash"
    for day, taken in expected.items():
        with rolled_back(root, day, scratch / "mp") as mp:
            got = snapshot(os.fsencode(mp))
            if day >= "2026-11-04":
                assert acl_of(mp / "shared.txt") == acl_of(src / "shared.txt") is not None
        assert not differences(taken, got), f"{day}: {differences(taken, got)}"
