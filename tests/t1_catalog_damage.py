"""A catalogue damaged in ways SQLite cannot notice (it keeps no checksums) is a CatalogError, never a traceback.

``answer`` reads the layers through their mounts on a CatalogError
(read/history_layers.py); any other exception out of a query is an internal
error, and a wrong value read as if it were right is a wrong answer.
"""

from __future__ import annotations

import os
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest

from squashfu_fs.read import history_layers
from squashfu_fs.read.history_layers import CatalogTree, State
from squashfu_fs.read.layerdiff import changes
from squashfu_fs.store import catalog
from squashfu_fs.store.views import ViewSpec

DAMAGE = {
    "the top's row lost": "DELETE FROM entry WHERE parent = x'' AND name = x''",
    "a mode read as text": "UPDATE entry SET mode = 'x' WHERE name = x'66'",
    "a name read as text": "UPDATE entry SET name = 'f' WHERE name = x'66'",
    "xattrs cut short": "UPDATE entry SET xattrs = x'000000' WHERE name = x'66'",
    "a digest cut short": "UPDATE entry SET digest = x'0102' WHERE name = x'66'",
    "a size read as a float": "UPDATE entry SET size = 1.5 WHERE name = x'66'",
}


def _layer(tmp_path: Path, name: str, data: bytes) -> Path:
    top = tmp_path / name
    (top / "d").mkdir(parents=True)
    (top / "f").write_bytes(data)
    (top / "d" / "g").write_bytes(data)
    os.setxattr(top / "f", "user.k", b"v")
    db = tmp_path / f"{name}.db"
    catalog.write(db, top, digests=True)
    return db


@pytest.fixture(params=["by-name", "whole"])
def catalogue_reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A catalogue asked one name at a time, or read whole at once (history_layers.CatalogTree)."""
    monkeypatch.setattr(history_layers, "ASKED_BEFORE_WHOLE", 10**9 if request.param == "by-name" else 0)
    return str(request.param)


@pytest.mark.parametrize("sql", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_row_is_a_catalogue_error(tmp_path: Path, sql: str, catalogue_reading: str) -> None:
    seed, top = _layer(tmp_path, "L0", b"seed"), _layer(tmp_path, "L1", b"newer!")
    db = sqlite3.connect(top)
    db.execute(sql)
    db.commit()
    db.close()
    trees = [CatalogTree(None, catalog.Catalog(seed)), CatalogTree(1, catalog.Catalog(top))]
    with pytest.raises(catalog.CatalogError):
        before = State(ViewSpec("0", (), datetime(2026, 11, 2)), "0", [trees[0]])
        after = State(ViewSpec("1", (1,), datetime(2026, 11, 3)), "1", [trees[1], trees[0]])
        changes(before, after, [trees[1]])
        list(after.walk(b""))


def test_a_catalogue_under_a_name_that_is_not_utf8_opens(tmp_path: Path) -> None:
    """A root may lie below a directory whose name is not UTF-8 (names are bytes end to end)."""
    where = tmp_path / os.fsdecode(b"caf\xe9 #?%20")
    where.mkdir()
    db = _layer(where, "L0", b"seed")
    opened = catalog.open_all([db], [""])
    assert opened is not None
    record = opened[0].get(b"f")
    assert record is not None and record.size == 4
    opened[0].close()


def test_a_damaged_catalogue_of_a_merged_layer_costs_a_resquash_only_a_measure(tmp_path: Path) -> None:
    """A resquash (and a seal) carry digests from catalogues; a damaged one must not fail the write it helps."""
    old = _layer(tmp_path, "L0", b"seed")
    db = sqlite3.connect(old)
    db.execute("UPDATE entry SET xattrs = x'000000' WHERE name = x'66'")
    db.commit()
    db.close()
    known = catalog.Catalog(old)
    new = tmp_path / "new.db"
    catalog.write(new, tmp_path / "L0", digests=True, carry=catalog.carry_from([known]))
    record = catalog.Catalog(new).get(b"f")
    assert record is not None and record.digest == catalog.content_digest(os.fsencode(tmp_path / "L0" / "f"))


def test_a_catalogue_is_opened_only_as_the_layer_it_names(tmp_path: Path) -> None:
    """The label a catalogue was written with must be the one history gives its layer."""
    (tmp_path / "L").mkdir()
    (tmp_path / "L" / "f").write_bytes(b"x")
    db = tmp_path / "bin-3.db"
    catalog.write(db, tmp_path / "L", label=catalog.bin_label(3, "2026-11-04T02:00:00"))
    catalog.Catalog(db, catalog.bin_label(3, "2026-11-04T02:00:00")).close()
    for other in (catalog.bin_label(3, "2026-11-05T02:00:00"), catalog.bin_label(4, "2026-11-04T02:00:00"),
                  catalog.seed_label("seed.sfs", "2026-11-04T02:00:00")):
        with pytest.raises(catalog.CatalogError):
            catalog.Catalog(db, other)
    assert catalog.open_all([db], [catalog.bin_label(3, "2026-11-05T02:00:00")]) is None


def _states(seed: Path, top: Path) -> tuple[State, State, list[CatalogTree]]:
    trees = [CatalogTree(None, catalog.Catalog(seed)), CatalogTree(1, catalog.Catalog(top))]
    before = State(ViewSpec("0", (), datetime(2026, 11, 2)), "0", [trees[0]])
    after = State(ViewSpec("1", (1,), datetime(2026, 11, 3)), "1", [trees[1], trees[0]])
    return before, after, trees


def test_a_layer_read_whole_must_hold_the_entries_it_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lost row looks like an absent name to a query by name; read whole, the count gives it away."""
    monkeypatch.setattr(history_layers, "ASKED_BEFORE_WHOLE", 0)
    seed, top = _layer(tmp_path, "L0", b"seed"), _layer(tmp_path, "L1", b"newer!")
    db = sqlite3.connect(top)
    db.execute("DELETE FROM entry WHERE name = x'67'")
    db.commit()
    db.close()
    with pytest.raises(catalog.CatalogError, match="entries where it records"):
        _, after, _ = _states(seed, top)
        after.lookup(b"d/g")


def test_a_catalogue_that_records_no_count_is_asked_name_by_name(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Catalogues written before ``entries`` was recorded answer as they did: never read whole."""
    monkeypatch.setattr(history_layers, "ASKED_BEFORE_WHOLE", 0)
    seed, top = _layer(tmp_path, "L0", b"seed"), _layer(tmp_path, "L1", b"newer!")
    for path in (seed, top):
        db = sqlite3.connect(path)
        db.execute("DELETE FROM meta WHERE key = 'entries'")
        db.commit()
        db.close()
    before, after, trees = _states(seed, top)
    assert all(t._catalog.entries is None and t._catalog.everything(4096) is None for t in trees)
    found = after.lookup(b"d/g")
    assert found is not None and found.record.size == len(b"newer!")
    assert {c.path: c.change for c in changes(before, after, [trees[1]])} == {b"f": "modified", b"d/g": "modified"}
