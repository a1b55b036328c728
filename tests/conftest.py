"""Shared fixtures: prerequisites (fatal under CI=true), scratch roots, mount hygiene, a backed-up tree."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from squashfu_fs.engines import mounts

from .harness import force_unmount, squashfu
from .sshd import sshd  # noqa: F401  (a fixture: a throw-away sshd on 127.0.0.1)

REQUIRED_TOOLS = ("mksquashfs", "unsquashfs", "rsync", "fusermount3", "mount", "umount")


def missing_prerequisites() -> list[str]:
    """What stops the mounting tests from running on this machine."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    missing += [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    return missing


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = missing_prerequisites()
    if not missing:
        return
    reason = "missing prerequisites: " + ", ".join(missing)
    if os.environ.get("CI") == "true":
        raise pytest.UsageError(f"CI=true and {reason}; the mounting tests must not be skipped")
    for item in items:
        if "mounts" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A temporary directory that is guaranteed to hold no mount afterwards."""
    try:
        yield tmp_path
    finally:
        force_unmount(tmp_path)
        leftover = mounts.mounts_below(tmp_path)
        assert not leftover, f"mounts left behind: {leftover}"


# Used by t3_backup.py, t3_rollback_restore.py and t3_resquash.py (t1 files have a ``tree`` of their own).
@pytest.fixture
def tree(scratch: Path) -> Iterator[tuple[Path, Path]]:
    """A small source and a root with one backup of it."""
    src, root = scratch / "src", scratch / "root"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.txt").write_text("alpha\n")
    (src / "docs" / "b.txt").write_text("beta\n")
    (src / "keep.tmp").write_text("excluded\n")
    squashfu("init", root, "--source", src, "--exclude", "*.tmp")
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    yield src, root
