"""Every command opens its root one way: restore and diff write roll-back records, so they recover first.

A restore or diff killed while it copies leaves its private view and seed
mount up; a crashed backup leaves its partial bin. Whichever command comes
next, restore and diff included, must take that debris down before it mounts
anything of its own (docs/crash-safety.md, "Recovery"). diff mounts only on a
root whose layers have no catalogues; from catalogues it is a reader.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from squashfu_fs.engines import mounts

from .harness import squashfu
from .t5_faults import crash, make_root

pytestmark = pytest.mark.mounts


@pytest.mark.parametrize("command", ["restore", "diff"])
def test_restore_and_diff_recover_what_a_killed_command_left(scratch: Path, command: str) -> None:
    _, root, _ = make_root(scratch, nights=3)
    crash(root, "rsync-running", "restore", "2026-11-03", "--to", str(scratch / "first"), now="2026-11-06T02:00")
    dead_view = [p for p in (root / ".rollbacks").iterdir()]
    assert mounts.mounts_below(root / ".rollbacks"), "the kill was meant to land while the view was mounted"
    (root / "bins" / ".partial-9").mkdir()  # what a backup killed before its commit leaves
    (root / "bins" / ".partial-9" / "half-copied").write_text("x\n")

    if command == "restore":
        squashfu("-r", root, "restore", "2026-11-04", "--to", scratch / "second")
    else:  # a root of older code: diff reads the layers through a private view, set up as a writer
        shutil.rmtree(root / "catalogs")
        squashfu("-r", root, "diff", "2026-11-02", "2026-11-04")

    assert not mounts.mounts_below(root), f"{command} left the dead restore's mounts up"
    assert not [p for p in (root / ".rollbacks").iterdir()], f"{command} left {dead_view} behind"
    assert not (root / "bins" / ".partial-9").exists(), f"{command} did not recover the partial bin"
