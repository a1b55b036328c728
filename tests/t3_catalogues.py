"""Catalogues against the layers they describe: what a query answers from them must be what the mounts say.

Each case builds a real root through the CLI, asks ``diff``/``versions``/``deleted``
from the catalogues, then removes the catalogues (a root of older code: the
queries read the layers through a private view's mounts) and asks again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .harness import CLI, backup_paused_in_rsync, history, sealed, squashfu

pytestmark = pytest.mark.mounts

NEGATIVE = -315619200  # 1960-01-01: SquashFS keeps an mtime as 32 unsigned bits


def _answers(root: Path, queries: list[tuple[str, ...]]) -> list[str]:
    return [squashfu("-r", root, *q).stdout for q in queries]


def _without_catalogues(root: Path) -> None:
    shutil.rmtree(root / "catalogs")
    (root / "catalogs").mkdir(mode=0o700)


def test_an_mtime_a_sealed_image_cannot_keep_is_answered_as_the_image_keeps_it(scratch: Path) -> None:
    """A file dated before 1970 in a bin that is sealed: its catalogue was written from the directory."""
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    (src / "old.txt").write_text("one\n")
    os.utime(src / "old.txt", (NEGATIVE, NEGATIVE))
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    (src / "old.txt").write_text("two, longer\n")
    os.utime(src / "old.txt", (NEGATIVE, NEGATIVE))
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    assert sealed(root)
    queries = [("versions", "old.txt", "--json"), ("diff", "mon", "latest", "--json")]
    from_catalogues = _answers(root, queries)
    assert not (root / ".rollbacks").exists()
    _without_catalogues(root)
    from_mounts = _answers(root, queries)
    assert from_catalogues == from_mounts


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_a_query_that_read_history_before_a_resquash_answers_beside_the_next_backup(
        tree: tuple[Path, Path]) -> None:
    """docs/commands.md, "diff": they run beside a backup, and read the history again when a catalogue vanished.

    The query stops right after reading history; a resquash then merges a bin
    it named (deleting that bin's catalogue and the old seed's), and a backup
    takes the lock. The query must answer from the catalogues of the history
    now current, not fall back to mounting (refused while the backup holds
    the lock).
    """
    src, root = tree
    (src / "docs" / "a.txt").write_text("tuesday\n")
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    (src / "docs" / "b.txt").unlink()
    squashfu("-r", root, "backup", now="2026-11-04T02:00")
    query = ("diff", "tue", "wed", "--json")
    want = squashfu("-r", root, *query).stdout
    env = {**os.environ, "SQUASHFU_FAULT": "query-history-read", "SQUASHFU_FAULT_ACTION": "stop"}
    paused = subprocess.Popen([*CLI, "-r", str(root), *query], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    backup = None
    try:
        deadline = time.monotonic() + 30
        while not _stopped(paused.pid):
            assert time.monotonic() < deadline and paused.poll() is None, "the query never read history"
            time.sleep(0.05)
        config = root / "squashfu.toml"
        config.write_text(config.read_text().replace("min_bins = 7", "min_bins = 1"))
        squashfu("-r", root, "resquash")
        assert [b["number"] for b in history(root)["bins"]] == [2]
        backup = backup_paused_in_rsync(root, 60, now="2026-11-05T02:00")
        os.kill(paused.pid, signal.SIGCONT)
        out, err = paused.communicate(timeout=50)
        assert paused.returncode == 0, err
        assert out == want
    finally:
        if paused.poll() is None:
            os.killpg(paused.pid, signal.SIGKILL)
            paused.wait()
        if backup is not None and backup.poll() is None:
            os.killpg(backup.pid, signal.SIGKILL)
            backup.wait()


def test_a_catalogue_another_history_left_under_a_layers_name_is_not_trusted(scratch: Path) -> None:
    """catalogs/bin-1.db from another root (a directory reused for a copy, files moved by hand): not this bin's."""
    answers = []
    for name, words, day in (("a", ("one\n", "two\n"), "02"), ("b", ("uno\n", "dos, tres\n"), "12")):
        src, root = scratch / f"src-{name}", scratch / f"root-{name}"
        src.mkdir()
        (src / "f.txt").write_text(words[0])
        squashfu("init", root, "--source", src)
        squashfu("-r", root, "backup", now=f"2026-11-{day}T02:00")
        (src / "f.txt").write_text(words[1])
        (src / "g.txt").write_text("new\n")
        squashfu("-r", root, "backup", now=f"2026-11-{int(day) + 1:02d}T02:00")
    root = scratch / "root-a"
    queries = [("versions", "f.txt", "--json"), ("diff", "2026-11-02", "latest", "--json"), ("deleted", "--json")]
    answers = _answers(root, queries)
    shutil.copyfile(scratch / "root-b" / "catalogs" / "bin-1.db", root / "catalogs" / "bin-1.db")
    assert _answers(root, queries) == answers
    _without_catalogues(root)
    assert _answers(root, queries) == answers
