"""Shared fixtures: prerequisites (fatal under CI=true), scratch roots, mount hygiene."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from squashfu_fs.engines import mounts

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


def force_unmount(path: str | os.PathLike[str]) -> None:
    """Last-resort teardown: FUSE first, then the kernel's lazy unmount."""
    for point in mounts.mounts_below(path):
        entry = next((e for e in mounts.mount_table() if e.mount_point == point), None)
        if entry is not None and entry.fstype.startswith("fuse"):
            subprocess.run(["fusermount3", "-u", "-z", point], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if mounts.is_mounted(os.fsdecode(point)):
            subprocess.run(["umount", "-l", point], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A temporary directory that is guaranteed to hold no mount afterwards."""
    try:
        yield tmp_path
    finally:
        force_unmount(tmp_path)
        leftover = mounts.mounts_below(tmp_path)
        assert not leftover, f"mounts left behind: {leftover}"
