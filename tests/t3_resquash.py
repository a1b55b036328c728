"""squashfu resquash against real mounts: what blocks it, and what a merged seed cannot hold."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .harness import acl_of, history, one_line, rolled_back, squashfu

pytestmark = pytest.mark.mounts


# ------------------------------------------------------------- resquash


def test_resquash_refuses_while_a_rollback_uses_its_bins(tree: tuple[Path, Path], scratch: Path) -> None:
    src, root = tree
    (root / "squashfu.toml").write_text((root / "squashfu.toml").read_text().replace("min_bins = 7", "min_bins = 1"))
    for day in (3, 4, 5):
        (src / "docs" / "a.txt").write_text(f"day {day}\n")
        os.utime(src / "docs" / "a.txt", (day * 86400, day * 86400))  # rsync's quick check: size + mtime
        squashfu("-r", root, "backup", now=f"2026-11-0{day}T02:00")
    with rolled_back(root, "tue", scratch / "mp"):
        proc = squashfu("-r", root, "resquash", expect=1)
        assert "uses bins" in one_line(proc) and "squashfu umount" in proc.stderr
        assert len(history(root)["bins"]) == 3
        # a nightly backup still commits, and says once why retention waits
        (root / "squashfu.toml").write_text((root / "squashfu.toml").read_text().replace("max_bins = 14",
                                                                                          "max_bins = 3"))
        proc = squashfu("-r", root, "backup", now="2026-11-06T02:00")
        assert "retention postponed" in one_line(proc) and len(history(root)["bins"]) == 4
    (root / "squashfu.toml").write_text((root / "squashfu.toml").read_text().replace("max_bins = 3",
                                                                                      "max_bins = 14"))
    squashfu("-r", root, "resquash")
    h = history(root)
    assert [b["number"] for b in h["bins"]] == [4] and h["seed"]["absorbed"] == [1, 2, 3]
    assert sorted(os.listdir(root / "bins")) == ["4.opaque", "4.sfs"]
    with rolled_back(root, "2026-11-05", scratch / "mp") as mp:
        assert (mp / "docs" / "a.txt").read_text() == "day 5\n"


def test_a_resquash_that_drops_acls_says_so_and_the_next_backup_restores_them(scratch: Path) -> None:
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    (src / "f").write_text("x\n")
    squashfu("init", root, "--source", src, "--max-bins", "2", "--min-bins", "1")
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    subprocess.run(["setfacl", "-m", "u:1234:r", src / "f"], check=True)
    for day in (3, 4):
        squashfu("-r", root, "backup", now=f"2026-11-0{day}T02:00")
    proc = squashfu("-r", root, "backup", now="2026-11-05T02:00")  # 3 bins > 2: resquash
    assert "cannot store the POSIX ACLs of 1 entries" in proc.stderr
    assert history(root)["seed"]["absorbed"] == [1, 2]
    squashfu("-r", root, "backup", now="2026-11-06T02:00")
    with rolled_back(root, "latest", scratch / "mp") as mp:
        assert acl_of(mp / "f") == acl_of(src / "f") is not None
