"""``deleted`` and ``versions``: a path's life across the kept history, read from the bins (docs/commands.md).

Each bin is what changed that night, so a path can only have changed in a
backup whose bin holds it (or a whiteout, a non-directory or an opaque
directory above it). ``versions`` looks a path up in the seed's state and
then only in the states whose bin touches it; ``deleted`` takes each bin's
deletions (:func:`squashfu_fs.read.layerdiff.deletions` against the state
before it) and keeps those the newest state lacks. Neither walks a day.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from squashfu_fs.read.history_layers import (
    Facts,
    Found,
    HistoryLayers,
    State,
    Tree,
    answer,
    differs,
    facts,
    json_list,
    json_name,
    shown,
)
from squashfu_fs.read.layerdiff import deletions
from squashfu_fs.store.views import ViewSpec, ViewTable
from squashfu_fs.util.say import say
from squashfu_fs.util.units import human


def _newest(table: ViewTable) -> ViewSpec:
    """The newest kept state (the whole history is read)."""
    return table.resolve("latest")


def _when(state: State) -> dict[str, str]:
    return {"snapshot": state.snapshot, "time": state.time}


def deleted_paths(root: Path, path: str | None, *, as_json: bool, verbose: bool = False) -> str:
    """Every path under PATH that a kept backup has and the newest lacks, with when it was last seen."""
    def query(hist: HistoryLayers) -> list[tuple[bytes, str, State, State]]:
        states = hist.snapshots()
        gone: dict[bytes, tuple[str, State, State]] = {}
        for before, after in itertools.pairwise(states):
            assert after.spec.top is not None
            for change in deletions(before, after, hist.bin(after.spec.top), hist.path):
                gone[change.path] = (change.type, before, after)  # a later deletion replaces an earlier one
        newest = states[-1]
        return sorted((p, *info) for p, info in gone.items() if newest.lookup(p) is None)

    found = answer(root, "deleted", _newest, query, path=path, verbose=verbose)
    if as_json:
        return json_list([{"path": json_name(p), "type": what, "last_backup": _when(last),
                           "first_without": _when(first)} for p, what, last, first in found])
    return "".join(f"- {shown(p)}{'/' if what == 'dir' else ''}  (last in {last.snapshot}, "
                   f"gone since {first.snapshot})\n" for p, what, last, first in found)


def touches(layer: Tree, path: bytes) -> bool:
    """Whether a bin can change ``path``: it holds it, or a whiteout, non-directory or opaque directory above it."""
    parts = path.split(b"/") if path else []
    for depth in range(1, len(parts) + 1):
        record = layer.get(b"/".join(parts[:depth]))
        if record is None:
            return False
        if depth == len(parts) or not record.is_dir or record.opaque:
            return True
    return not parts  # the top: every bin holds it


@dataclass(frozen=True)
class Version:
    """One row of ``versions``: a distinct version of the path, or the backup that deleted it."""

    state: State
    facts: Facts | None  # None: deleted in this backup

    def as_dict(self) -> dict[str, object]:
        if self.facts is None:
            return {**_when(self.state), "deleted": True}
        return {**_when(self.state), "type": self.facts.kind, "size": self.facts.size, "mtime": self.facts.mtime}

    def line(self) -> str:
        if self.facts is None:
            return f"{self.state.snapshot}  deleted\n"
        mtime = datetime.fromtimestamp(self.facts.mtime).strftime("%Y-%m-%d %H:%M:%S")
        return f"{self.state.snapshot}  {self.facts.kind:<7} {human(self.facts.size):>10}  modified {mtime}\n"


def versions_of(root: Path, path: str, *, as_json: bool, verbose: bool = False) -> str:
    """Every distinct version of PATH in the kept history, oldest first, and the backups that deleted it."""
    def query(hist: HistoryLayers) -> tuple[list[Version], bytes]:
        rows: list[Version] = []
        previous: Found | None = None
        for state in hist.snapshots():
            top = state.spec.top
            if top is not None and not touches(hist.bin(top), hist.path):
                continue  # this backup left the path as it was
            entry = state.lookup(hist.path)
            if entry is None:
                if previous is not None:
                    rows.append(Version(state, None))
            elif previous is None or differs(hist.path, previous, entry):
                rows.append(Version(state, facts(entry)))
            previous = entry
        return rows, hist.path

    rows, asked = answer(root, "versions", _newest, query, path=path, verbose=verbose)
    if not rows:
        say(True, f"{shown(asked) or '/'} is in no kept backup")
    if as_json:
        return json_list([row.as_dict() for row in rows])
    return "".join(row.line() for row in rows)
