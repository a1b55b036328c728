"""The command line's errors: one clear line, the right exit status, nothing changed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .harness import as_nobody, history, squashfu

pytestmark = pytest.mark.mounts


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 or lines[0].startswith("Usage:"), proc.stderr
    return proc.stderr


@pytest.fixture
def root(scratch: Path) -> Path:
    (scratch / "src").mkdir()
    (scratch / "src" / "f").write_text("x\n")
    squashfu("init", scratch / "root", "--source", scratch / "src")
    squashfu("-r", scratch / "root", "backup", now="2026-11-02T02:00")
    return scratch / "root"


def test_no_root_given_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SQUASHFU_ROOT", raising=False)
    assert "no backup root" in one_line(squashfu("backup", expect=2))


def test_root_from_the_environment(root: Path) -> None:
    assert "2026-11-02" in squashfu("list", env={"SQUASHFU_ROOT": str(root)}).stdout


def test_not_a_backup_root(scratch: Path) -> None:
    assert "squashfu init" in one_line(squashfu("-r", scratch, "backup", expect=2))


def test_damaged_history_changes_nothing(root: Path) -> None:
    (root / "history.json").write_text("{ not json")
    before = sorted(os.listdir(root))
    assert "damaged" in one_line(squashfu("-r", root, "backup", now="2026-11-03T02:00", expect=1))
    assert sorted(os.listdir(root)) == before


def test_history_naming_a_missing_bin_refuses_to_clean_up(root: Path) -> None:
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    os.rename(root / "bins" / "1.sfs", root / "bins" / "moved-away")
    assert "bins/1.sfs is missing" in one_line(squashfu("-r", root, "backup", now="2026-11-04T02:00", expect=1))
    assert (root / "bins" / "moved-away").is_file(), "recovery deleted data it could not account for"


def test_bad_config_value(root: Path) -> None:
    text = (root / "squashfu.toml").read_text().replace('compression = "zstd"', 'compression = "rar"')
    (root / "squashfu.toml").write_text(text)
    assert "compression 'rar'" in one_line(squashfu("-r", root, "backup", expect=2))


def test_bad_options_are_usage_errors(root: Path, scratch: Path) -> None:
    squashfu("init", scratch / "r2", "--source", scratch / "src", "--min-bins", "9", "--max-bins", "3", expect=2)
    squashfu("init", scratch / "r3", "--source", scratch / "src", "--compression", "rar", expect=2)
    squashfu("-r", root, "backup", "--frobnicate", expect=2)
    assert not (scratch / "r2").exists() and not (scratch / "r3").exists()


def test_umount_of_something_not_mounted(scratch: Path) -> None:
    assert "not mounted" in one_line(squashfu("umount", scratch, expect=1))


def test_unknown_view_in_restore_changes_nothing(root: Path, scratch: Path) -> None:
    proc = squashfu("-r", root, "restore", "friday", "--to", scratch / "out", expect=2)
    assert "valid views" in one_line(proc) and not (scratch / "out").exists()


def test_not_root_without_rootless_tools_is_one_line(root: Path) -> None:
    proc = as_nobody("-r", str(root), "backup")
    assert proc.returncode == 1 and "needs root" in one_line(proc)
    assert history(root)["bins"] == []


def test_init_as_a_normal_user_says_it_needs_root(scratch: Path) -> None:
    proc = as_nobody("init", str(scratch / "r"), "--source", str(scratch))
    assert proc.returncode == 1 and "needs root" in one_line(proc)
    assert not (scratch / "r").exists()
