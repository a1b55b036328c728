"""``diff``, ``deleted`` and ``versions`` against copies of the source taken after every night.

The tree generator's history (every scripted case: type changes, a directory
deleted and recreated, owner-, mode-, mtime- and xattr-only changes, hard
links, non-UTF-8 and newline names) is backed up night by night through the
real CLI, with real loop and overlay mounts; a snapshot of the source after
each night is the truth. ``diff --json`` must equal the set difference of two
snapshots for many pairs of days (adjacent, far apart, reversed, across a
resquash); ``deleted`` the set computed from the kept snapshots;
``versions`` the distinct values of a path across them, after every night.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from squashfu_fs.engines import mounts
from squashfu_fs.store.history import load
from squashfu_fs.store.views import ViewTable

from .harness import keep_bins_unsealed, one_line, squashfu
from .treegen import NEWLINE, NON_UTF8, Entry, build_initial, mutate, snapshot

pytestmark = pytest.mark.mounts

START = datetime(2026, 11, 2, 2, 0)
Snap = dict[bytes, Entry]
# Paths whose versions are asked after every night: type changes, a deleted and recreated
# directory's file, hard links, mode/owner/xattr-only changes, a non-UTF-8 name, churn.
WATCHED = [b"flip", b"to-link", b"doomed-dir/fresh/new.txt", b"reborn-dir/keep.txt", b"home/bob/linked-2",
           b"home/bob/secret", b"home/bob/xattrs", b"home/alice/" + NON_UTF8, b"home/alice/docs/note03.txt",
           b"home/alice/docs/night004.txt", b"home/alice/" + NEWLINE, b"doomed-dir"]


def expected_diff(a: Snap, b: Snap) -> dict[bytes, str]:
    """The set difference of two copies: what a diff from A to B must list."""
    out = {}
    for path in a.keys() | b.keys():
        if path not in b:
            out[path] = "deleted"
        elif path not in a:
            out[path] = "added"
        elif a[path] != b[path]:
            out[path] = "modified"
    return out


def got_diff(root: Path, a: str, b: str) -> dict[bytes, str]:
    listed = json.loads(squashfu("-r", root, "diff", a, b, "--json").stdout)
    out = {}
    for change in listed:
        path = os.fsencode(change["path"])
        assert path not in out, f"{path!r} listed twice"
        out[path] = change["change"]
        if change["change"] == "modified" and "type_before" in change:
            assert change["type_before"] != change["type"]
    return out


def kept(root: Path, snaps: list[Snap]) -> list[tuple[str, Snap]]:
    """The kept backups (snapshot name, the copy taken after it), oldest first: the last ones taken."""
    names = list(ViewTable.from_history(load(root / "history.json")).snapshots)
    return list(zip(names, snaps[-len(names):], strict=True))


def expected_versions(history: list[tuple[str, Snap]], path: bytes) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    previous: Entry | None = None
    for name, snap in history:
        entry = snap.get(path)
        if entry is None:
            if previous is not None:
                out.append({"snapshot": name, "deleted": True})
        elif entry != previous:
            out.append({"snapshot": name, "type": entry.kind, "size": entry.size, "mtime": entry.mtime})
        previous = entry
    return out


def expected_deleted(history: list[tuple[str, Snap]], within: bytes = b"") -> dict[bytes, tuple[str, str]]:
    """Each path a kept copy has and the newest lacks: the last copy that had it, and the next one."""
    newest = history[-1][1]
    out: dict[bytes, tuple[str, str]] = {}
    for (name, snap), (after, _) in itertools.pairwise(history):
        for path in snap:
            if path not in newest and (not within or path == within or path.startswith(within + b"/")):
                out[path] = (name, after)  # a later copy that still has it replaces this
    return out


def got_deleted(root: Path, *within: str) -> dict[bytes, tuple[str, str]]:
    listed = json.loads(squashfu("-r", root, "deleted", *within, "--json").stdout)
    return {os.fsencode(d["path"]): (d["last_backup"]["snapshot"], d["first_without"]["snapshot"]) for d in listed}


def check_diffs(root: Path, history: list[tuple[str, Snap]], pairs: list[tuple[int, int]]) -> None:
    for i, j in pairs:
        (a, sa), (b, sb) = history[i], history[j]
        want, got = expected_diff(sa, sb), got_diff(root, a, b)
        wrong = {p: (want.get(p), got.get(p)) for p in want.keys() | got.keys() if want.get(p) != got.get(p)}
        assert not wrong, f"diff {a} {b}: (want, got) {dict(sorted(wrong.items())[:10])}"


def pairs_of(count: int) -> list[tuple[int, int]]:
    """Adjacent, far apart, reversed, and a state with itself."""
    last = count - 1
    out = {(i, i + 1) for i in range(last)} | {(0, last), (last, 0), (last, 1), (1, last - 1), (2, 2)}
    return sorted(p for p in out if max(p) <= last)


@pytest.mark.parametrize("kind", ["sealed-manifest", "directory-full", "no-catalogues"])
def test_queries_equal_the_copies_taken_after_every_night(scratch: Path, kind: str) -> None:
    """``no-catalogues``: a root of older code, whose layers the queries read through a private view's mounts;
    the others are answered from the catalogues alone, without mounting anything."""
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    build_initial(os.fsencode(src))
    squashfu("init", root, "--source", src, "--max-bins", "8", "--min-bins", "3")
    extra = []
    if kind == "directory-full":
        keep_bins_unsealed(root)
        extra = ["--full"]
    snaps: list[Snap] = []
    when = START
    for night in range(13):
        if night:
            mutate(os.fsencode(src), night)
        squashfu("-r", root, "backup", *extra, now=when.isoformat())
        if kind == "no-catalogues":
            for made in (root / "catalogs").iterdir():
                made.unlink()
        else:
            assert sorted(p.name for p in (root / "catalogs").iterdir()) == catalogues_named(root)
        when += timedelta(days=1)
        snaps.append(snapshot(os.fsencode(src))[0])
        history = kept(root, snaps)
        for path in WATCHED[night % len(WATCHED)::6]:  # two paths a night, each one every sixth night
            got = json.loads(squashfu("-r", root, "versions", os.fsdecode(path), "--json").stdout)
            got = [{k: v for k, v in row.items() if k != "time"} for row in got]
            assert got == expected_versions(history, path), f"night {night}: versions of {path!r}"
        if night == 8:  # the whole history so far: nine states, the seed the first night's
            assert len(history) == 9
            check_diffs(root, history, pairs_of(len(history)))
            assert got_deleted(root) == expected_deleted(history)
    history = kept(root, snaps)
    assert len(history) < len(snaps), "the history was meant to be resquashed"
    check_diffs(root, history, pairs_of(len(history)))  # the seed's state is a resquashed night now
    assert got_deleted(root) == expected_deleted(history)
    assert got_deleted(root, "home/alice/docs") == expected_deleted(history, b"home/alice/docs")
    assert got_deleted(root, str(src / "home" / "alice")) == expected_deleted(history, b"home/alice")
    assert not mounts.mounts_below(root)
    if kind == "no-catalogues":
        assert not [p for p in (root / ".rollbacks").iterdir()], "a query left its roll-back record"
    else:
        assert not (root / ".rollbacks").exists(), "a query mounted the layers although each has its catalogue"


def catalogues_named(root: Path) -> list[str]:
    """The catalogue of every layer history names, and nothing else (store/catalog.py)."""
    history = load(root / "history.json")
    assert history.seed is not None
    return sorted([f"seed-{history.seed.generation}.db", *(f"bin-{b.number}.db" for b in history.bins)])


def test_human_output_marks_each_change_and_escapes_names(tree: tuple[Path, Path]) -> None:
    src, root = tree
    (src / "docs" / "a.txt").write_text("tuesday\n")
    (src / "docs" / "b.txt").unlink()
    (src / "new\nline").write_bytes(b"x")
    (src / b"caf\xe9".decode("utf-8", "surrogateescape")).write_bytes(b"latin-1")
    os.symlink("docs", src / "keep.txt")
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    (src / "keep.txt").unlink()
    (src / "keep.txt").mkdir()
    squashfu("-r", root, "backup", now="2026-11-04T02:00")
    lines = squashfu("-r", root, "diff", "mon", "tue").stdout.splitlines()
    assert "M docs/a.txt" in lines and "- docs/b.txt" in lines, lines
    assert "+ new\\x0aline" in lines and "+ caf\\xe9" in lines and "+ keep.txt" in lines, lines
    assert squashfu("-r", root, "diff", "tue", "latest").stdout.splitlines() == ["T keep.txt (symlink -> dir)"]
    back = squashfu("-r", root, "diff", "latest", "mon").stdout.splitlines()
    assert "+ docs/b.txt" in back and "- new\\x0aline" in back, back
    shown = json.loads(squashfu("-r", root, "diff", "mon", "latest", "--json").stdout)
    assert {"path": "caf\udce9", "change": "added", "type": "file"} in shown
    gone = squashfu("-r", root, "deleted").stdout.splitlines()
    assert gone == ["- docs/b.txt  (last in 2026-11-02T02:00:00, gone since 2026-11-03T02:00:00)"], gone
    rows = squashfu("-r", root, "versions", "keep.txt").stdout.splitlines()
    assert [r.split()[:2] for r in rows] == [["2026-11-03T02:00:00", "symlink"], ["2026-11-04T02:00:00", "dir"]]
    rows = json.loads(squashfu("-r", root, "versions", "docs/b.txt", "--json").stdout)
    assert [r.get("deleted", False) for r in rows] == [False, True]


def test_bad_input_is_one_line_and_its_exit_status(tree: tuple[Path, Path], scratch: Path) -> None:
    _, root = tree
    for argv, status, words in [
        (("diff", "nope", "latest"), 2, "unknown view 'nope'"),
        (("diff", "latest", "2025-01-01"), 2, "unknown view"),
        (("versions", "../etc/passwd"), 2, "without '..'"),
        (("deleted", "docs/../../x"), 2, "without '..'"),
        (("versions", "/etc/passwd"), 2, "outside the source"),
        (("versions", "docs/none"), 0, "docs/none is in no kept backup"),
    ]:
        proc = squashfu("-r", root, *argv, expect=status)
        assert words in one_line(proc), (argv, proc.stderr)
    for command in (("diff", "mon", "latest"), ("deleted",), ("versions", "docs")):
        proc = squashfu("-r", scratch / "missing", *command, expect=2)
        assert "not a squashfu backup root" in one_line(proc)
    assert not mounts.mounts_below(root)
    assert not (root / ".rollbacks").exists(), "answered from the catalogues: nothing is mounted"


def test_a_damaged_or_missing_catalogue_is_read_around_through_the_mounts(tree: tuple[Path, Path]) -> None:
    """Catalogues are derived data: one that is garbage, truncated or gone changes no answer, only the way."""
    src, root = tree
    was = (src / "docs" / "a.txt").stat().st_mtime
    (src / "docs" / "a.txt").write_text("ALPHA\n")  # the same size: only the bytes tell
    os.utime(src / "docs" / "a.txt", (was + 10, was + 10))  # a whole second apart even after a fast first backup
    (src / "many").mkdir()
    for i in range(3000):  # a catalogue of many pages, so that damage can lie past the ones opening reads
        (src / "many" / f"f{i:04d}").write_text("x")
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    (src / "docs" / "b.txt").unlink()
    squashfu("-r", root, "backup", now="2026-11-04T02:00")
    queries = [("diff", "mon", "latest", "--json"), ("deleted", "--json"), ("versions", "docs/a.txt", "--json")]
    want = [squashfu("-r", root, *q).stdout for q in queries]
    assert not (root / ".rollbacks").exists()
    changed = {c["path"]: (c["change"], c.get("fields")) for c in json.loads(want[0])
               if not c["path"].startswith("many")}
    assert changed == {"docs": ("modified", ["mtime"]), "docs/a.txt": ("modified", ["mtime", "content"]),
                       "docs/b.txt": ("deleted", None)}
    seed_catalogue = root / "catalogs" / "seed-1.db"
    original = seed_catalogue.read_bytes()
    for damage in (b"not a database at all", original[: len(original) // 2], original[:4096] + b"\xff" * 8192):
        seed_catalogue.write_bytes(damage)
        for query, expected in zip(queries, want, strict=True):
            assert squashfu("-r", root, *query).stdout == expected, (query, damage[:20])
    bin_catalogue = root / "catalogs" / "bin-1.db"
    pages = bin_catalogue.read_bytes()
    assert len(pages) > 8 * 4096
    bin_catalogue.write_bytes(pages[:3 * 4096] + b"\xff" * (len(pages) - 3 * 4096))  # its rows, not its schema
    for query, expected in zip(queries, want, strict=True):
        assert squashfu("-r", root, *query).stdout == expected, query
    bin_catalogue.write_bytes(pages)
    seed_catalogue.unlink()
    for query, expected in zip(queries, want, strict=True):
        assert squashfu("-r", root, *query).stdout == expected, query
    assert (root / ".rollbacks").exists() and not list((root / ".rollbacks").iterdir())
    assert not mounts.mounts_below(root)


# What a history query must not load: the writer's machinery (recovery, the lock, the layers' mounts, the
# engines' subprocesses), the daemon's, and the standard library's costly modules only writers need.
# Each costs start-up that a reader would pay on every call (docs/benchmarks.md, "Command start-up").
WRITERS_ONLY = ("subprocess", "ctypes", "hashlib", "logging", "traceback", "trio", "pyfuse3",
                "squashfu_fs.engines", "squashfu_fs.write", "squashfu_fs.store.recovery", "squashfu_fs.store.lock",
                "squashfu_fs.store.layers", "squashfu_fs.store.copies", "squashfu_fs.read.rollback")


@pytest.mark.parametrize("query", [["diff", "mon", "tue"], ["deleted"], ["versions", "docs/a.txt"]])
def test_a_query_from_catalogues_loads_nothing_a_writer_needs(tree: tuple[Path, Path], query: list[str]) -> None:
    src, root = tree
    (src / "docs" / "a.txt").write_text("tuesday\n")
    (src / "docs" / "b.txt").unlink()
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "squashfu_fs", "-r", str(root), *query],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and proc.stdout.strip(), proc
    loaded = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "squashfu_fs.store.catalog" in loaded, "the query was not answered from the catalogues"
    heavy = sorted(m for m in loaded if any(m == w or m.startswith(w + ".") for w in WRITERS_ONLY))
    assert not heavy, f"squashfu {' '.join(query)} loaded {heavy}"
