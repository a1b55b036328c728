"""The change scan's pure parts: rsync's exclude patterns (checked against rsync itself) and the diff."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from pathlib import Path

import pytest

from squashfu_fs.write import changes
from squashfu_fs.write.excludes import Excludes

PATHS = [b"a.tmp", b"b.txt", b"cache/x", b"cache/sub/y.tmp", b"d/cache/z", b"d/e/f.o", b"d/e/cache", b"proc/1/stat",
         b"home/u/.cache/k", b"home/u/docs/r.txt", b"x/y/z/w.log", b"ab", b"a/b/c", b"tmp", b"node_modules/p/q.js",
         b"[weird]", b"q?", b"lost+found/x", b"caf\xe9/\xff.tmp"]
PATTERNS = ["*.tmp", "/cache/", "cache/", "cache", "/proc/***", ".cache", "home/*/.cache/", "d/e", "**/z", "x/**.log",
            "*.o", "/tmp", "tmp/", "a*", "[ab]*", "[!a]*", "node_modules/", "/lost+found", "e/f.o", "/d/e/", "?b",
            "z/w.log", "q?", "home/**/docs/"]


def rsync_sees(top: bytes, patterns: list[str]) -> set[bytes]:
    out = subprocess.run(["rsync", "-a", "--list-only", *[f"--exclude={p}" for p in patterns], top + b"/"],
                         capture_output=True, check=True).stdout
    # rsync prints bytes it cannot show as \\#ooo (octal)
    unescape = lambda name: re.sub(rb"\\#([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), name)  # noqa: E731
    return {unescape(line.split(None, 4)[4]) for line in out.splitlines()} - {b"."}


def we_see(top: bytes, patterns: list[str]) -> set[bytes]:
    excludes = Excludes(patterns)
    assert excludes.understood, patterns
    return set(changes.walk(top, excludes).entries) - {b"."}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    top = os.fsencode(tmp_path_factory.mktemp("excludes"))
    for rel in PATHS:
        full = os.path.join(top, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        Path(os.fsdecode(full)).write_bytes(b"x")
    return top


PAIRS = [list(c) for c in itertools.combinations(PATTERNS, 2)][::7]


@pytest.mark.parametrize("patterns", [[p] for p in PATTERNS] + PAIRS)
def test_exclude_patterns_prune_exactly_what_rsync_skips(tree: bytes, patterns: list[str]) -> None:
    assert we_see(tree, patterns) == rsync_sees(tree, patterns)


SELECTIONS = [(b"d/e", b"home/u"), (b"cache", b"x/y"), (b"home/u/docs", b"d")]


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("patterns", [[], ["*.tmp"], ["/home/u/docs/"], ["/d/e/cache"], ["cache/"], ["z/w.log"]])
def test_several_sources_walk_exactly_what_rsync_relative_sends(tree: bytes, selection: tuple[bytes, ...],
                                                                  patterns: list[str]) -> None:
    """Several sources: the walk from the top sees what ``rsync -R TOP/./SRC...`` sends, implied parents included."""
    out = subprocess.run(["rsync", "-a", "--list-only", "--relative", *[f"--exclude={p}" for p in patterns],
                          *[tree + b"/./" + rel for rel in selection], tree + b"/never-written/"],  # with a
                         capture_output=True, check=True).stdout  # destination, every other argument is a source
    unescape = lambda name: re.sub(rb"\\#([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), name)  # noqa: E731
    rsync_sends = {unescape(line.split(None, 4)[4]) for line in out.splitlines()} - {b"."}
    walked = set(changes.walk(tree, Excludes(patterns, selection)).entries) - {b"."}
    assert walked == rsync_sends
    assert not any(path.startswith((b"proc", b"lost+found")) for path in walked)  # nothing else was entered


@pytest.mark.parametrize("pattern", ["+ keep", "- drop", "!", "a\\*b", "[unclosed", "/", "a/***/b"])
def test_unfamiliar_syntax_turns_the_fast_path_off(pattern: str) -> None:
    assert not Excludes([pattern]).understood


def test_compare_lists_changes_and_only_topmost_deletions() -> None:
    old = {b".": 1, b"a": 2, b"d": 3, b"d/x": 4, b"d/y": 5, b"d/y/z": 6, b"keep": 7, b"dz": 8}
    new = {b".": 9, b"a": 2, b"keep": 7, b"new": 10, b"dz": 11}
    diff = changes.compare(old, new)
    assert diff.changed == [b".", b"dz", b"new"]
    assert diff.deleted == [b"d"]


def test_signature_moves_with_ctime_inode_and_size(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("abc")
    first = changes.signature(os.lstat(f))
    os.chmod(f, 0o600)
    assert changes.signature(os.lstat(f)) != first
    again = changes.signature(os.lstat(f))
    assert changes.signature(os.lstat(f)) == again


def test_a_signature_knows_whether_the_path_was_a_directory(tmp_path: Path) -> None:
    """A night written straight into its bin marks a directory opaque where a file was: compare says where."""
    (tmp_path / "flip").write_text("a file\n")
    (tmp_path / "stays").mkdir()
    old = changes.walk(os.fsencode(tmp_path), Excludes([])).entries
    assert changes.was_directory(old[b"flip"]) is False and changes.was_directory(old[b"stays"]) is True
    assert changes.was_directory(changes.UNKNOWN) is None and changes.was_directory(None) is None
    (tmp_path / "flip").unlink()
    (tmp_path / "flip").mkdir()
    (tmp_path / "new").mkdir()
    scan = changes.walk(os.fsencode(tmp_path), Excludes([]))
    diff = changes.compare(old, scan.entries, scan.dirs)
    assert b"flip" in diff.changed and b"new" in diff.changed
    assert diff.replaced == [b"flip"], "a new directory hides nothing; one over a former file does"


def test_manifest_round_trips_and_rejects_damage(tmp_path: Path) -> None:
    m = changes.Manifest(4, "/src", ("*.tmp",), {b".": 1, b"caf\xe9\n": 2**190})
    changes.save(tmp_path / "m", m)
    assert changes.load(tmp_path / "m") == m
    assert m.valid_for(4, "/src", ("*.tmp",)) and not m.valid_for(5, "/src", ("*.tmp",))
    assert not m.valid_for(4, "/src", ())
    (tmp_path / "m").write_bytes(b'{"version": 1}\ngarbage')
    assert changes.load(tmp_path / "m") is None
    assert changes.load(tmp_path / "missing") is None


def test_scan_of_a_local_filesystem_is_trusted(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert changes.walk(os.fsencode(tmp_path), Excludes([])).trusted
