"""Catalogues against the layers they describe: what a query answers from them must be what the mounts say.

Each case builds a real root through the CLI, asks ``diff``/``versions``/``deleted``
from the catalogues, then removes the catalogues (a root of older code: the
queries read the layers through a private view's mounts) and asks again.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .harness import sealed, squashfu

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
