"""Every command ends with one line and a documented status; ``--debug`` shows the traceback.

Each row of the table is bad input that once printed a Python traceback.
A backup whose bin is committed but whose retention then fails exits 3
("committed, with a warning"), never 1 ("nothing committed").
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from squashfu_fs.engines import mounts

from .harness import history, squashfu

pytestmark = pytest.mark.mounts

LONG = "x" * 300  # longer than NAME_MAX


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line; no traceback, no second line."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("squashfu: "), f"expected one line, got {proc.stderr!r}"
    return lines[0]


@pytest.fixture
def root(scratch: Path) -> Path:
    (scratch / "src").mkdir()
    (scratch / "src" / "f").write_text("x\n")
    (scratch / "a-file").write_text("not a directory\n")
    squashfu("init", scratch / "root", "--source", scratch / "src")
    squashfu("-r", scratch / "root", "backup", now="2026-11-02T02:00")
    return scratch / "root"


# (arguments, with {root} and {scratch} filled in; expected status; a word the line must hold)
BAD_INPUTS = [
    (["-r", "{root}", "restore", "latest", "--to", "{scratch}/" + LONG], 2, "File name too long"),
    (["-r", "{root}", "restore", "latest", "--to", "{scratch}/a-file"], 2, "Not a directory"),
    (["-r", "{root}", "restore", "latest", "--to", "{scratch}/a-file/below"], 2, "Not a directory"),
    (["-r", "{root}", "restore", "latest", "--to", "{scratch}/" + LONG + "/below"], 2, "File name too long"),
    (["-r", "{root}", "restore", "latest", "--to", "{scratch}/new/" + LONG], 2, "File name too long"),
    (["-r", "{scratch}/a-file", "list"], 1, "Not a directory"),
    (["-r", "{scratch}/" + LONG, "list"], 1, "File name too long"),
    (["init", "{scratch}/" + LONG, "--source", "{scratch}/src"], 1, "File name too long"),
]


@pytest.mark.parametrize(("args", "status", "word"), BAD_INPUTS,
                         ids=[f"{' '.join(a[2:4] if a[0] == '-r' else a[:1])}-{i}" for i, (a, _, _) in
                              enumerate(BAD_INPUTS)])
def test_bad_input_gets_one_line_and_its_status(root: Path, scratch: Path, args: list[str], status: int,
                                                word: str) -> None:
    filled = [a.format(root=root, scratch=scratch) for a in args]
    before = history(root)
    line = one_line(squashfu(*filled, expect=status))
    assert word in line, line
    assert history(root) == before and not mounts.mounts_below(scratch)
    assert not (scratch / "new").exists(), "a refused restore created part of its target"
    assert (scratch / "a-file").read_text() == "not a directory\n"


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback(root: Path, scratch: Path, how: str) -> None:
    args = ["-r", root, "restore", "latest", "--to", scratch / "a-file"]
    if how == "flag":
        proc = squashfu("--debug", *args, expect=2)
    else:
        proc = squashfu(*args, env={"SQUASHFU_DEBUG": "1"}, expect=2)
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("squashfu: "), proc.stderr


def test_a_failed_retention_after_a_committed_backup_exits_3(scratch: Path) -> None:
    """mksquashfs fails for real when retention compresses the new seed; the night's bin stays committed."""
    src, root, tools = scratch / "src", scratch / "root", scratch / "tools"
    src.mkdir()
    tools.mkdir()
    real = subprocess.run(["sh", "-c", "command -v mksquashfs"], capture_output=True, text=True,
                          check=True).stdout.strip()
    wrapper = tools / "mksquashfs"
    wrapper.write_text(  # the first seed is seed.sfs.tmp; a resquash writes seed.N.sfs.tmp with N >= 2
        "#!/bin/sh\n"
        'for a in "$@"; do case "$a" in */seed.[0-9]*.sfs.tmp) '
        'echo "mksquashfs: Write failed because No space left on device" >&2; exit 1;; esac; done\n'
        f'exec {real} "$@"\n')
    wrapper.chmod(0o755)
    broken = {"PATH": f"{tools}:{os.environ['PATH']}"}
    squashfu("init", root, "--source", src, "--max-bins", "2", "--min-bins", "1")
    for day in (2, 3, 4):
        (src / "f").write_text(f"day {day}\n")
        squashfu("-r", root, "backup", now=f"2026-11-0{day}T02:00", env=broken)
    (src / "f").write_text("day 5, the night retention fails\n")
    proc = squashfu("-r", root, "backup", now="2026-11-05T02:00", env=broken, expect=3)
    line = one_line(proc)
    assert "backup committed; retention failed" in line and "No space left on device" in line, line
    h = history(root)
    assert [b["number"] for b in h["bins"]] == [1, 2, 3] and h["bins"][-1]["time"].startswith("2026-11-05")
    assert h["seed"]["generation"] == 1
    assert not mounts.mounts_below(root)
    squashfu("-r", root, "backup", now="2026-11-06T02:00")  # with a working mksquashfs, retention catches up
    assert [b["number"] for b in history(root)["bins"]] == [4]
