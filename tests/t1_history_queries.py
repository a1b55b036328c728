"""The pure parts of ``diff``, ``deleted`` and ``versions`` on plain directories (no mount).

Random layer stacks (files, directories, symlinks, whiteouts, opaque
directories, type changes, up to three levels deep): what the layers between
two states say changed must equal the difference of the two states walked
whole, for every pair of states; the deletions of each bin must equal the
paths the state before has and the state after lacks. Plus PATH handling and
how names are shown.
"""

from __future__ import annotations

import itertools
import os
import random
import stat
from datetime import datetime
from pathlib import Path

import pytest

from squashfu_fs import overlay
from squashfu_fs.errors import UsageError
from squashfu_fs.read.file_history import touches
from squashfu_fs.read.history_layers import BinLayer, State, json_name, shown, source_path
from squashfu_fs.read.layerdiff import changes, compare, deletions
from squashfu_fs.store.views import ViewSpec

NAMES = [b"a", b"b", b"c"]
T = 1_000_000_000


def _random_layer(top: Path, rng: random.Random, opaque: list[bytes]) -> None:
    """A layer with random entries; directories are sometimes opaque (listed in ``opaque``)."""
    def fill(here: Path, rel: bytes, depth: int) -> None:
        for name in NAMES:
            roll = rng.random()
            path = here / os.fsdecode(name)
            sub = rel + b"/" + name if rel else name
            if roll < 0.35:
                continue
            if roll < 0.55:
                path.write_text(rng.choice(["x", "y"]))
                os.chmod(path, rng.choice([0o644, 0o600]))
                os.utime(path, (T, T))
            elif roll < 0.6:
                os.symlink(rng.choice(["p", "q"]), path)
            elif roll < 0.72:
                os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))
            elif depth < 3:
                path.mkdir()
                if rng.random() < 0.2:
                    opaque.append(sub)
                fill(path, sub, depth + 1)
                os.utime(path, (T, T))
    fill(top, b"", 1)
    os.utime(top, (T, T))


def _stack(tmp_path: Path, seed: int, count: int) -> tuple[list[State], list[BinLayer]]:
    """States 0..count-1 over layers L0 (the seed) .. L{count-1}; the seed's opaque marks are ignored."""
    rng = random.Random(seed)
    dirs, records = [], []
    for i in range(count):
        d = tmp_path / f"L{i}"
        d.mkdir()
        opaque: list[bytes] = []
        _random_layer(d, rng, opaque)
        dirs.append(os.fsencode(d))
        records.append(opaque)
    bins = [BinLayer(i, dirs[i], overlay.opaque_marks([(dirs[i], records[i])])) for i in range(count)]
    marks = frozenset().union(*(b.marks for b in bins[1:]))
    states = []
    for top in range(count):
        spec = ViewSpec(str(top), tuple(range(top, 0, -1)), datetime(2026, 11, 2 + top))
        states.append(State(spec, str(top), [dirs[i] for i in range(top, -1, -1)], marks))
    return states, bins


def _whole(before: State, after: State) -> dict[bytes, str]:
    """The difference of two states, both walked whole."""
    paths = {p for p, _ in before.walk(b"")} | {p for p, _ in after.walk(b"")}
    out = {}
    for path in paths:
        change = compare(path, before.lookup(path), after.lookup(path))
        if change is not None:
            out[path] = change.change
    return out


@pytest.mark.parametrize("seed", range(20))
def test_changes_from_the_layers_equal_the_difference_of_whole_walks(tmp_path: Path, seed: int) -> None:
    states, bins = _stack(tmp_path, seed, 5)
    for i, j in itertools.permutations(range(5), 2):
        between = bins[min(i, j) + 1: max(i, j) + 1]
        got = {c.path: c.change for c in changes(states[i], states[j], between)}
        assert got == _whole(states[i], states[j]), (seed, i, j)
        within = b"a"
        got = {c.path: c.change for c in changes(states[i], states[j], between, within)}
        assert got == {p: c for p, c in _whole(states[i], states[j]).items()
                       if p == within or p.startswith(within + b"/")}, (seed, i, j, within)


@pytest.mark.parametrize("seed", range(40))
def test_deletions_of_a_bin_are_what_the_state_after_it_lacks(tmp_path: Path, seed: int) -> None:
    states, bins = _stack(tmp_path, seed, 5)
    for k in range(1, 5):
        got = {c.path for c in deletions(states[k - 1], states[k], bins[k])}
        assert got == {p for p, c in _whole(states[k - 1], states[k]).items() if c == "deleted"}, (seed, k)


@pytest.mark.parametrize("seed", range(6))
def test_a_bin_that_does_not_touch_a_path_leaves_it_as_it_was(tmp_path: Path, seed: int) -> None:
    states, bins = _stack(tmp_path, seed, 5)
    paths = {p for s in states for p, _ in s.walk(b"")}
    for k, path in itertools.product(range(1, 5), sorted(paths)):
        if not touches(bins[k], path):
            assert compare(path, states[k - 1].lookup(path), states[k].lookup(path)) is None, (seed, k, path)


def test_path_is_relative_to_the_source_and_never_climbs() -> None:
    assert source_path("home/alice/x", "/srv/data") == b"home/alice/x"
    assert source_path("/srv/data/home//alice/./x/", "/srv/data") == b"home/alice/x"
    assert source_path("/srv/data", "/srv/data") == b""
    assert source_path("./", "/srv/data") == b""
    for bad in ("../x", "home/../../x", "/srv/data/../etc", "/srv/database/x", "/etc/passwd"):
        with pytest.raises(UsageError):
            source_path(bad, "/srv/data")


def test_names_are_shown_on_one_line_and_given_back_whole_in_json() -> None:
    assert shown(b"new\nline") == "new\\x0aline"
    assert shown(b"caf\xe9") == "caf\\xe9"
    assert shown("café/ünï".encode()) == "café/ünï"
    assert shown(b"back\\slash\x7f") == "back\\\\slash\\x7f"
    for name in (b"caf\xe9-\xff\xfe", "café".encode(), b"line\nbreak"):
        assert os.fsencode(json_name(name)) == name
