"""Whole backup cycles over many simulated nights (real mksquashfs, loop, overlay, rsync).

After every night, the state seen through a roll-back mount must equal a
snapshot of the source taken right after that night's backup; at the end,
every day still in the history must, through roll-back and through restore.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from squashfu_fs.store import registry as readers
from squashfu_fs.store.history import load
from squashfu_fs.store.views import ViewTable, snapshot_name

from .harness import bin_entries, committed_bins, fuse_mounted, history, rollback_snapshot, sealed, squashfu
from .treegen import build_initial, describe, differences, mutate, snapshot

pytestmark = pytest.mark.mounts

START = datetime(2026, 11, 2, 2, 0)  # a Monday


def nights(count: int) -> list[datetime]:
    """Nightly times with a missed night (5) and two backups on one day (night 9 at 14:00)."""
    out = []
    day = START
    for n in range(count):
        if n == 5:
            day += timedelta(days=1)  # the machine was off one night
        out.append(day)
        day = day + timedelta(hours=12) if n == 8 else day + timedelta(days=1)
        if n == 8:
            day = day.replace(hour=14)
        if n == 9:
            day = (day + timedelta(days=1)).replace(hour=2)
    return out


@pytest.mark.parametrize("compare", ["manifest", "full"])
def test_a_month_of_nights_with_resquashes(scratch: Path, compare: str) -> None:
    """Both ways of finding changes (the manifest, and rsync over the whole tree) must agree with the source."""
    src, root, mp = scratch / "src", scratch / "root", scratch / "mp"
    extra = ["--full"] if compare == "full" else []
    src.mkdir()
    build_initial(os.fsencode(src))
    squashfu("init", root, "--source", src, "--max-bins", "5", "--min-bins", "2")
    expected: dict[str, object] = {}
    for night, when in enumerate(nights(30)):
        changes = mutate(os.fsencode(src), night) if night else ["seed"]
        squashfu("-r", root, "backup", *extra, now=when.isoformat())
        taken = snapshot(os.fsencode(src))
        expected[when.strftime("%Y-%m-%d")] = taken
        got = rollback_snapshot(root, "latest", mp)
        assert not differences(taken, got), f"night {night} ({changes}): {differences(taken, got)}"
        restored = scratch / f"restored-{night}"
        squashfu("-r", root, "restore", "latest", "--to", restored)
        got = snapshot(os.fsencode(restored))
        assert not differences(taken, got), f"restore, night {night}: {differences(taken, got)}"
        shutil.rmtree(restored)
        h = history(root)
        assert len(h["bins"]) <= 5
        if night:
            assert h["bins"][-1]["compare"] == compare
        if changes == ["nothing"]:
            assert bin_entries(root, h["bins"][-1]["number"]) == [], "an unchanged source made a non-empty bin"
    h = history(root)
    assert h["seed"]["generation"] > 2, "30 nights with max_bins 5 must have resquashed several times"
    assert h["seed"]["absorbed"], "the seed absorbed no bins"
    numbers = [b["number"] for b in h["bins"]]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert not set(numbers) & set(h["seed"]["absorbed"]), "a bin number was reused"
    assert committed_bins(root) == numbers, "bins on disk and in history disagree"
    assert sealed(root), "a bin was left unsealed"
    assert [p.name for p in root.glob("seed*.sfs")] == [h["seed"]["file"]]

    listed = squashfu("-r", root, "list", "--json").stdout
    import json
    views = [layer["view"] for layer in json.loads(listed)["layers"] if layer["view"]]
    assert len(views) >= 3
    for view in views:  # every browsable day, including the resquashed seed's
        got = rollback_snapshot(root, view, mp)
        assert not differences(expected[view], got), f"{view}: {differences(expected[view], got)}"
    for view in (views[0], views[-1]):
        target = scratch / f"restored-{view}"
        squashfu("-r", root, "restore", view, "--to", target)
        got = snapshot(os.fsencode(target))
        assert not differences(expected[view], got), f"restore {view}: {differences(expected[view], got)}"


def test_same_day_twice_keeps_the_newest_and_weekdays_point_at_the_newest(scratch: Path) -> None:
    src, root, mp = scratch / "src", scratch / "root", scratch / "mp"
    src.mkdir()
    (src / "f").write_text("monday morning\n")
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    (src / "f").write_text("monday afternoon\n")
    squashfu("-r", root, "backup", now="2026-11-02T14:00")
    (src / "f").write_text("next monday\n")
    squashfu("-r", root, "backup", now="2026-11-09T02:00")
    (src / "f").write_text("tuesday\n")
    squashfu("-r", root, "backup", now="2026-11-10T02:00")
    from .harness import rolled_back
    with rolled_back(root, "2026-11-02", mp):
        assert (mp / "f").read_text() == "monday afternoon\n"
    with rolled_back(root, "mon", mp):
        assert (mp / "f").read_text() == "next monday\n"
    with rolled_back(root, "latest", mp):
        assert (mp / "f").read_text() == "tuesday\n"
    with rolled_back(root, "seed", mp):
        assert (mp / "f").read_text() == "monday morning\n"


def test_the_mounted_history_follows_every_night_without_a_remount(scratch: Path) -> None:
    """One mount for three weeks of backups and resquashes: each night shows up, every day reads right."""
    src, root, mp = scratch / "src", scratch / "root", scratch / "view"
    src.mkdir()
    build_initial(os.fsencode(src))
    squashfu("init", root, "--source", src, "--max-bins", "4", "--min-bins", "2")
    times = nights(20)
    squashfu("-r", root, "backup", now=times[0].isoformat())
    expected = {times[0].strftime("%Y-%m-%d"): snapshot(os.fsencode(src))}
    every = {snapshot_name(times[0]): expected[times[0].strftime("%Y-%m-%d")]}  # snapshots/, one per backup
    same_day_checked = False
    with fuse_mounted(root, mp):
        held = open(mp / "latest" / "big.bin", "rb")  # noqa: SIM115 - kept open across resquashes
        try:
            first_bytes = held.read(4096)
            for night, when in enumerate(times[1:], start=1):
                mutate(os.fsencode(src), night)
                squashfu("-r", root, "backup", now=when.isoformat())
                day = when.strftime("%Y-%m-%d")
                expected[day] = snapshot(os.fsencode(src))
                # within 2 s the daemon has loaded tonight's history (two backups can share a date)
                deadline = time.monotonic() + 2.0
                generation = history(root)["generation"]
                while readers.lagging(root, generation) or os.readlink(mp / "latest") != day:
                    assert time.monotonic() < deadline, f"night {night}: {day} did not appear within 2 s"
                    time.sleep(0.05)
                got = snapshot(os.fsencode(mp / day))
                assert not differences(expected[day], got), f"night {night}: {differences(expected[day], got)}"
                every[snapshot_name(when)] = expected[day]
                got = snapshot(os.fsencode(mp / "snapshots" / snapshot_name(when)))
                assert not differences(expected[day], got), f"snapshots/ {night}: {differences(expected[day], got)}"
                earlier = snapshot_name(times[night - 1])
                if earlier[:10] == day:  # a second backup today: the first is still reachable, as it was
                    got = snapshot(os.fsencode(mp / "snapshots" / earlier))
                    assert not differences(every[earlier], got), f"{earlier}: {differences(every[earlier], got)}"
                    same_day_checked = True
            held.seek(0)
            assert held.read(4096) == first_bytes, "a file opened before the resquashes stopped reading"
        finally:
            held.close()
        assert history(root)["seed"]["generation"] >= 3
        shown = sorted(name for name in os.listdir(mp) if name[:2] == "20")
        assert shown == sorted(ViewTable.from_history(load(root / "history.json")).dated)
        for day in shown:  # every day still in the history, read through the one long-lived mount
            got = snapshot(os.fsencode(mp / day))
            assert not differences(expected[day], got), f"{day}: {differences(expected[day], got)}"
        kept = list(ViewTable.from_history(load(root / "history.json")).snapshots)
        assert sorted(os.listdir(mp / "snapshots")) == kept and same_day_checked
        for name in kept:  # every backup still in the history, the one the same day's later backup hides too
            got = snapshot(os.fsencode(mp / "snapshots" / name))
            assert not differences(every[name], got), f"snapshots/{name}: {differences(every[name], got)}"
        versions_agree_with_the_copies(mp, {name: every[name][0] for name in kept})


def versions_agree_with_the_copies(mp: Path, copies: dict[str, dict[bytes, Any]]) -> None:
    """versions/PATH/ against the copy of the source taken after each kept backup (oldest first).

    Each version is PATH as the backup it is named after left it; and every
    state PATH had in a kept backup is the newest version written at or before it.
    """
    names = list(copies)
    paths = {p for copy in copies.values() for p, e in copy.items() if e.kind != "dir"}
    paths -= {p for copy in copies.values() for p, e in copy.items() if e.kind == "dir"}  # shown as directories
    checked = 0
    for path in sorted(paths):
        shown = sorted(os.listdir(os.fsencode(mp / "versions") + b"/" + path))
        ext = os.path.splitext(os.path.basename(path))[1]
        written = {}
        for item in shown:
            snap = item[:-len(ext)].decode() if ext else item.decode()
            assert snap in copies and item == snap.encode() + ext, (path, item)
            written[snap] = describe(os.fsencode(mp / "versions") + b"/" + path + b"/" + item)
            assert written[snap] == copies[snap].get(path), (path, snap, written[snap], copies[snap].get(path))
        for i, snap in enumerate(names):
            if path in copies[snap]:
                newest = next((n for n in reversed(names[:i + 1]) if n in written), None)
                assert newest is not None, f"{path!r} as of {snap}: no version written by then"
                assert written[newest] == copies[snap][path], (path, snap, newest)
        checked += len(shown)
    assert checked > len(paths), "some files must have more than one version"


def test_a_resquash_waits_for_mounted_views_before_deleting_bins(scratch: Path) -> None:
    """Bins are deleted only after every live daemon of the root has loaded the new history."""
    src, root, mp = scratch / "src", scratch / "root", scratch / "view"
    src.mkdir()
    (src / "f").write_text("night 0\n")
    squashfu("init", root, "--source", src, "--min-bins", "1")
    for night in range(4):
        (src / "f").write_text(f"night {night}\n" * (night + 1))
        squashfu("-r", root, "backup", now=f"2026-11-0{night + 2}T02:00")
    with fuse_mounted(root, mp):
        from squashfu_fs.read.mountd import daemon_pid

        pid = daemon_pid(mp)
        assert pid is not None
        proc = squashfu("-r", root, "resquash", "-v")  # a live daemon catches up well within the 3 s wait
        assert "did not catch up" not in proc.stderr, proc.stderr
        assert not readers.lagging(root, history(root)["generation"])
        (src / "f").write_text("night 4, longer than the others\n")
        squashfu("-r", root, "backup", now="2026-11-06T02:00")
        os.kill(pid, signal.SIGSTOP)  # a hung daemon must not hold a resquash up for long
        try:
            text = (root / "squashfu.toml").read_text().replace("min_bins = 1", "min_bins = 0")
            (root / "squashfu.toml").write_text(text)
            started = time.monotonic()
            proc = squashfu("-r", root, "resquash", "-v")
            waited = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        assert 2.5 < waited < 10, waited
        assert f"[{pid}] did not catch up" in proc.stderr
        deadline = time.monotonic() + 3
        while readers.lagging(root, history(root)["generation"]):
            assert time.monotonic() < deadline, "the daemon never caught up after SIGCONT"
            time.sleep(0.05)
        assert (mp / "latest" / "f").read_text() == "night 4, longer than the others\n"
