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
from squashfu_fs.read import history_layers
from squashfu_fs.read.file_history import touches
from squashfu_fs.read.history_layers import (
    CatalogTree,
    DirTree,
    State,
    Tree,
    Undecided,
    facts,
    json_name,
    shown,
    source_path,
)
from squashfu_fs.read.layerdiff import changes, compare, deletions
from squashfu_fs.store import catalog
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
                os.utime(path, (T, T), follow_symlinks=False)  # two stacks built a second apart compare equal
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


def _stack(tmp_path: Path, seed: int, count: int, *, catalogued: bool = False) -> tuple[list[State], list[Tree]]:
    """States 0..count-1 over layers L0 (the seed) .. L{count-1}; the seed's opaque marks are ignored.

    ``catalogued``: each layer read from its catalogue (store/catalog.py) instead of its directory.
    """
    rng = random.Random(seed)
    trees: list[Tree] = []
    for i in range(count):
        d = tmp_path / f"L{i}"
        d.mkdir()
        opaque: list[bytes] = []
        _random_layer(d, rng, opaque)
        number = None if i == 0 else i
        if catalogued:
            db = tmp_path / f"L{i}.db"
            catalog.write(db, d, opaque_dirs=tuple(opaque), digests=True)
            trees.append(CatalogTree(number, catalog.Catalog(db)))
        else:
            trees.append(DirTree(number, os.fsencode(d), frozenset(opaque)))
    states = []
    for top in range(count):
        spec = ViewSpec(str(top), tuple(range(top, 0, -1)), datetime(2026, 11, 2 + top))
        states.append(State(spec, str(top), [trees[i] for i in range(top, -1, -1)]))
    return states, trees


def _whole(before: State, after: State) -> dict[bytes, str]:
    """The difference of two states, both walked whole."""
    paths = {p for p, _ in before.walk(b"")} | {p for p, _ in after.walk(b"")}
    out = {}
    for path in paths:
        change = compare(path, before.lookup(path), after.lookup(path))
        if change is not None:
            out[path] = change.change
    return out


@pytest.mark.parametrize("catalogued", [False, True], ids=["directories", "catalogues"])
@pytest.mark.parametrize("seed", range(20))
def test_changes_from_the_layers_equal_the_difference_of_whole_walks(tmp_path: Path, seed: int,
                                                                     catalogued: bool) -> None:
    states, bins = _stack(tmp_path, seed, 5, catalogued=catalogued)
    for i, j in itertools.permutations(range(5), 2):
        between = bins[min(i, j) + 1: max(i, j) + 1]
        got = {c.path: c.change for c in changes(states[i], states[j], between)}
        assert got == _whole(states[i], states[j]), (seed, i, j)
        within = b"a"
        got = {c.path: c.change for c in changes(states[i], states[j], between, within)}
        assert got == {p: c for p, c in _whole(states[i], states[j]).items()
                       if p == within or p.startswith(within + b"/")}, (seed, i, j, within)


@pytest.mark.parametrize("catalogued", [False, True], ids=["directories", "catalogues"])
@pytest.mark.parametrize("seed", range(40))
def test_deletions_of_a_bin_are_what_the_state_after_it_lacks(tmp_path: Path, seed: int, catalogued: bool,
                                                              catalogue_reading: str) -> None:
    states, bins = _stack(tmp_path, seed, 5, catalogued=catalogued)
    for k in range(1, 5):
        got = {c.path for c in deletions(states[k - 1], states[k], bins[k])}
        assert got == {p for p, c in _whole(states[k - 1], states[k]).items() if c == "deleted"}, (seed, k)


@pytest.mark.parametrize("catalogued", [False, True], ids=["directories", "catalogues"])
@pytest.mark.parametrize("seed", range(6))
def test_a_bin_that_does_not_touch_a_path_leaves_it_as_it_was(tmp_path: Path, seed: int, catalogued: bool) -> None:
    states, bins = _stack(tmp_path, seed, 5, catalogued=catalogued)
    paths = {p for s in states for p, _ in s.walk(b"")}
    for k, path in itertools.product(range(1, 5), sorted(paths)):
        if not touches(bins[k], path):
            assert compare(path, states[k - 1].lookup(path), states[k].lookup(path)) is None, (seed, k, path)


@pytest.fixture(params=["by-name", "whole"])
def catalogue_reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A catalogue asked one name at a time, or read whole at once (history_layers.CatalogTree)."""
    monkeypatch.setattr(history_layers, "ASKED_BEFORE_WHOLE", 10**9 if request.param == "by-name" else 0)
    return str(request.param)


@pytest.mark.parametrize("seed", range(20))
def test_catalogues_resolve_every_state_as_the_directories_do(tmp_path: Path, seed: int,
                                                              catalogue_reading: str) -> None:
    """The same stack read from catalogues and from directories: the same entries, facts and merges."""
    (tmp_path / "d").mkdir()
    (tmp_path / "c").mkdir()
    on_disk, _ = _stack(tmp_path / "d", seed, 5)
    catalogued, _ = _stack(tmp_path / "c", seed, 5, catalogued=True)
    seen = 0
    for a, b in zip(on_disk, catalogued, strict=True):
        walked_a = {p: (facts(e), len(e.trees)) for p, e in a.walk(b"")}
        walked_b = {p: (facts(e), len(e.trees)) for p, e in b.walk(b"")}
        assert walked_a == walked_b, seed
        seen += len(walked_a)
        for path in walked_a:
            found_a, found_b = a.lookup(path), b.lookup(path)
            assert found_a is not None and found_b is not None
            assert facts(found_a) == facts(found_b)
    assert seen, seed  # the random stack had something to compare


@pytest.mark.parametrize("seed", range(20))
def test_states_resolve_as_the_filesystem_resolves_its_stacks(tmp_path: Path, seed: int) -> None:
    """The queries' resolution (over catalogues or directories) and overlay.py's, which the mount serves."""
    states, trees = _stack(tmp_path, seed, 5)
    for top, state in enumerate(states):
        dirs = [t.directory for t in reversed(trees[: top + 1]) if isinstance(t, DirTree)]
        marks = overlay.opaque_marks((t.directory, tuple(t._opaque)) for t in trees[1: top + 1]
                                     if isinstance(t, DirTree))
        served: dict[bytes, int] = {}
        pending = [(b"", tuple(enumerate(dirs, 1)))]
        while pending:
            here, branches = pending.pop()
            for name, entry in overlay.listdir(branches, marks):
                path = here + b"/" + name if here else name
                served[path] = entry.st.st_mode
                if entry.is_dir:
                    pending.append((path, entry.branches))
        assert {p: e.mode for p, e in state.walk(b"")} == served, (seed, top)


def test_catalogued_files_carry_their_digest_and_compare_by_it(tmp_path: Path) -> None:
    """Two catalogued versions of equal size and facts tell equal from different bytes without the layers."""
    for name, data in (("L0", b"same"), ("L1", b"same"), ("L2", b"diff")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(data)
        os.utime(tmp_path / name / "f", (T, T))
        os.utime(tmp_path / name, (T, T))
        catalog.write(tmp_path / f"{name}.db", tmp_path / name, digests=True)
    trees: list[Tree] = [CatalogTree(None if i == 0 else i, catalog.Catalog(tmp_path / f"L{i}.db")) for i in range(3)]
    states = [State(ViewSpec(str(i), tuple(range(i, 0, -1)), datetime(2026, 11, 2 + i)), str(i),
                    [trees[k] for k in range(i, -1, -1)]) for i in range(3)]
    assert compare(b"f", states[0].lookup(b"f"), states[1].lookup(b"f")) is None
    change = compare(b"f", states[1].lookup(b"f"), states[2].lookup(b"f"))
    assert change is not None and change.fields == ("content",)
    without = tmp_path / "L3"
    without.mkdir()
    (without / "f").write_bytes(b"same")
    os.utime(without / "f", (T, T))
    catalog.write(tmp_path / "L3.db", without)  # no digests measured
    bare = CatalogTree(3, catalog.Catalog(tmp_path / "L3.db"))
    top = State(ViewSpec("3", (3, 2, 1), datetime(2026, 11, 5)), "3", [bare, *reversed(trees)])
    with pytest.raises(Undecided):
        compare(b"f", states[1].lookup(b"f"), top.lookup(b"f"))


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
