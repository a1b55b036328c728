"""Extended attributes a source may carry, through a real backup and every way back out.

Bins are written by overlayfs in trusted mode, so only ``trusted.overlay.*``
are overlay's markers; a source's own ``user.overlay.*`` are data and must
neither hide files nor vanish. File capabilities (``security.capability``)
must survive the backup, every view, roll-back and restore: from a bin, from
the seed, and after a resquash.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .harness import bin_opened, fuse_mounted, history, reachable_by_others, rolled_back, run_as_nobody, squashfu

pytestmark = pytest.mark.mounts

CAP = "security.capability"


@contextmanager
def every_view(root: Path, scratch: Path, day: str, tag: str) -> Iterator[dict[str, Path]]:
    """The day through FUSE, through a kernel roll-back, and restored into a directory."""
    restored = scratch / f"restored-{tag}"
    squashfu("-r", root, "restore", day, "--to", restored)
    with fuse_mounted(root, scratch / f"fs-{tag}") as fs, rolled_back(root, day, scratch / f"rb-{tag}") as rb:
        yield {"fuse": fs / day, "rollback": rb, "restore": restored}


def test_a_sources_user_overlay_xattrs_are_data(scratch: Path) -> None:
    """A directory with its own user.overlay.opaque hides nothing, and its user.overlay.* xattrs show."""
    src, root = scratch / "src", scratch / "root"
    (src / "d").mkdir(parents=True)
    (src / "d" / "old").write_text("from the seed\n")
    (src / "s").mkdir()
    os.setxattr(src / "s", "user.overlay.origin", b"the source's own")
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    (src / "d" / "new").write_text("from bin 1\n")
    os.setxattr(src / "d", "user.overlay.opaque", b"y")
    os.setxattr(src / "d", "user.overlay.redirect", b"/elsewhere")
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    with bin_opened(root, 1) as bin1:
        assert os.getxattr(bin1 / "d", "user.overlay.opaque") == b"y", "stored as data in the bin"
    assert (root / "bins" / "1.opaque").read_bytes() == b"", "not an opaque directory for overlay"
    with every_view(root, scratch, "2026-11-03", "tue") as views:
        for how, top in views.items():
            assert sorted(os.listdir(top / "d")) == ["new", "old"], how
            assert (top / "d" / "old").read_text() == "from the seed\n", how
            assert os.getxattr(top / "d", "user.overlay.opaque") == b"y", how
            assert os.getxattr(top / "d", "user.overlay.redirect") == b"/elsewhere", how
            assert os.getxattr(top / "s", "user.overlay.origin") == b"the source's own", how
            assert {"user.overlay.opaque", "user.overlay.redirect"} <= set(os.listxattr(top / "d")), how


def test_a_sources_trusted_overlay_xattrs_set_on_a_manifest_night_hide_nothing(scratch: Path) -> None:
    """A night written straight into its bin stores a source's own trusted.overlay.* escaped, as overlayfs does."""
    src, root = scratch / "src", scratch / "root"
    (src / "d").mkdir(parents=True)
    (src / "d" / "old").write_text("from the seed\n")
    (src / "f").write_text("a file\n")
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    os.setxattr(src / "d", "trusted.overlay.opaque", b"y")  # would hide d/old if stored as overlay's own
    os.setxattr(src / "f", "trusted.overlay.redirect", b"/d")
    (src / "d" / "new").write_text("from bin 1\n")
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    assert history(root)["bins"][-1]["compare"] == "manifest"
    with bin_opened(root, 1) as bin1:
        assert os.getxattr(bin1 / "d", "trusted.overlay.overlay.opaque") == b"y", "stored escaped"
        assert "trusted.overlay.opaque" not in os.listxattr(bin1 / "d")
    assert (root / "bins" / "1.opaque").read_bytes() == b""
    with every_view(root, scratch, "2026-11-03", "tue") as views:
        for how, top in views.items():
            assert sorted(os.listdir(top / "d")) == ["new", "old"], how
            assert os.getxattr(top / "d", "trusted.overlay.opaque") == b"y", how
            assert os.getxattr(top / "f", "trusted.overlay.redirect") == b"/d", how


def test_a_sources_trusted_overlay_xattr_survives_on_a_parent_that_did_not_change(scratch: Path) -> None:
    """rsync -R makes the parents of a changed file in the bin: they keep the source's own trusted.overlay.*."""
    src, root = scratch / "src", scratch / "root"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("monday\n")
    (src / "d" / "g").write_text("stays\n")
    os.setxattr(src / "d", "trusted.overlay.opaque", b"y")
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    before = (src / "d").stat().st_ctime_ns
    (src / "d" / "f").write_text("tuesday\n")  # d itself does not change
    assert (src / "d").stat().st_ctime_ns == before
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    assert history(root)["bins"][-1]["compare"] == "manifest"
    with rolled_back(root, "latest", scratch / "mp") as mp:
        assert os.getxattr(mp / "d", "trusted.overlay.opaque") == b"y", "the parent lost the source's xattr"
        assert sorted(os.listdir(mp / "d")) == ["f", "g"]


def setcap(path: Path, caps: str) -> bytes:
    subprocess.run(["setcap", caps, path], check=True)
    return os.getxattr(path, CAP)


def capabilities_when_run(program: Path) -> str:
    """What capsh, run as user nobody from ``program``, says it holds ("=" for none)."""
    with reachable_by_others(program.parent):
        out = run_as_nobody([program, "--print"]).stdout
    return next(line for line in out.splitlines() if line.startswith("Current:"))


@pytest.mark.skipif(shutil.which("setcap") is None or shutil.which("capsh") is None,
                    reason="setcap/capsh are missing (apt-get install libcap2-bin)")
def test_file_capabilities_survive_backup_views_rollback_restore_and_resquash(scratch: Path) -> None:
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    shutil.copy2(shutil.which("capsh") or "", src / "ping")  # a program that prints what it was given
    want = {"ping": setcap(src / "ping", "cap_net_raw+ep")}
    assert capabilities_when_run(src / "ping") == "Current: cap_net_raw=ep"
    squashfu("init", root, "--source", src, "--max-bins", "5", "--min-bins", "0")
    squashfu("-r", root, "backup", now="2026-11-02T02:00")  # ping in the seed

    def check(day: str, tag: str) -> None:
        with every_view(root, scratch, day, tag) as views:
            for how, top in views.items():
                for name, value in want.items():
                    assert os.getxattr(top / name, CAP) == value, (tag, how, name)
                    shown = subprocess.run(["getcap", top / name], capture_output=True, text=True).stdout
                    assert "cap_net_raw" in shown or "cap_net_admin" in shown, (tag, how, name, shown)

    check("2026-11-02", "seed")
    # Kept as data, inert where the history is mounted (nosuid), live again once restored.
    with rolled_back(root, "latest", scratch / "rb-run") as rb:
        assert capabilities_when_run(rb / "ping") == "Current: ="
    squashfu("-r", root, "restore", "latest", "ping", "--to", scratch / "run")
    assert capabilities_when_run(scratch / "run" / "ping") == "Current: cap_net_raw=ep"
    shutil.copy2("/bin/true", src / "ping6")
    want["ping6"] = setcap(src / "ping6", "cap_net_raw,cap_net_admin+ep")
    squashfu("-r", root, "backup", now="2026-11-03T02:00")  # ping6 in bin 1, ping still in the seed
    check("2026-11-03", "bin")
    want["ping"] = setcap(src / "ping", "cap_net_admin+ep")  # changed: the new capability lands in bin 2
    squashfu("-r", root, "backup", now="2026-11-04T02:00")
    check("2026-11-04", "changed")
    squashfu("-r", root, "resquash")
    assert history(root)["bins"] == [] and history(root)["seed"]["generation"] == 2
    check("2026-11-04", "resquashed")
