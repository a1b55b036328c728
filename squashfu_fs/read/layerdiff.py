"""``diff`` from the layers: what changed between two kept backups, found from the bins between them.

The bins committed after the older state and up to the newer one name every
path that can differ: what they hold, their whiteouts (deletions) and their
opaque directories (a directory replaced whole). Each such path is looked up
in both states and compared as the tree generator's snapshots compare
(type, content, mode, owner, mtime, symlink target, device numbers, xattrs);
where a directory exists on one side only, or was replaced whole, its
subtree on each side is listed too. Neither day is walked
(docs/commands.md, "diff").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from squashfu_fs.read.history_layers import (
    Found,
    HistoryLayers,
    State,
    Tree,
    answer,
    below,
    changed_fields,
    json_list,
    json_name,
    kind,
    shown,
    walk_tree,
)
from squashfu_fs.store.views import ViewSpec, ViewTable


@dataclass(frozen=True)
class Change:
    """One path that differs between two states."""

    path: bytes
    change: str  # "added", "deleted", "modified"
    type: str  # the type after (before, for a deletion)
    type_before: str | None = None  # set on a type change
    fields: tuple[str, ...] = ()  # for "modified": what differs

    @property
    def letter(self) -> str:
        """``+`` added, ``-`` deleted, ``T`` type changed, ``M`` modified."""
        if self.type_before is not None:
            return "T"
        return {"added": "+", "deleted": "-", "modified": "M"}[self.change]

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"path": json_name(self.path), "change": self.change, "type": self.type}
        if self.type_before is not None:
            out["type_before"] = self.type_before
        if self.fields:
            out["fields"] = list(self.fields)
        return out


def touched(bins: list[Tree], within: bytes = b"") -> tuple[set[bytes], set[bytes]]:
    """The paths the bins hold, and those that some bin replaces whole.

    A bin replaces what lies below a path where it holds a whiteout, a
    non-directory or an opaque directory: a directory at that path in a
    state above or below it shares nothing with the one beneath.
    """
    paths: set[bytes] = set()
    replaced: set[bytes] = set()
    for layer in bins:
        for path, record in walk_tree(layer, within):
            paths.add(path)
            if not record.is_dir or record.opaque:
                replaced.add(path)
    return paths, replaced


def changes(before: State, after: State, bins: list[Tree], within: bytes = b"") -> list[Change]:
    """Every path on or below ``within`` that differs from ``before`` to ``after``; ``bins``: the layers between."""
    candidates, replaced = touched(bins, within)
    pending = sorted(candidates)
    seen = set(candidates)
    out: list[Change] = []
    while pending:
        path = pending.pop()
        a, b = before.lookup(path), after.lookup(path)
        a_dir, b_dir = a is not None and a.is_dir, b is not None and b.is_dir
        # A directory on one side only, or replaced whole between: its subtree on each side may differ too.
        for state, is_dir in ((before, a_dir), (after, b_dir)):
            if is_dir and (a_dir != b_dir or path in replaced):
                for child, _ in state.walk(path, within):
                    if child not in seen:
                        seen.add(child)
                        pending.append(child)
        if not below(path, within):
            continue
        change = compare(path, a, b)
        if change is not None:
            out.append(change)
    out.sort(key=lambda c: c.path)
    return out


def deletions(before: State, after: State, layer: Tree, within: bytes = b"") -> list[Change]:
    """What ``after`` (``before`` with the bin ``layer`` on top) lacks of ``before``, on or below ``within``.

    Whatever the top bin holds, other than a whiteout, is in ``after``; so
    only its whiteouts, and what lies below its non-directories and opaque
    directories, can have gone. A plain directory there merges with the one
    below and removes nothing: it is not even looked up.
    """
    gone: dict[bytes, Change] = {}
    for path, record in walk_tree(layer, within):
        if record.is_dir and not record.opaque:
            continue
        a = before.lookup(path)
        if a is None:
            continue
        if record.is_whiteout and below(path, within):
            gone[path] = Change(path, "deleted", kind(a.mode))
        if a.is_dir:
            for child, entry in before.walk(path, within):
                if child not in gone and below(child, within) and after.lookup(child) is None:
                    gone[child] = Change(child, "deleted", kind(entry.mode))
    return sorted(gone.values(), key=lambda c: c.path)


def compare(path: bytes, a: Found | None, b: Found | None) -> Change | None:
    """How ``path`` changed from ``a`` to ``b`` (None: absent on both sides, or identical)."""
    if a is None and b is None:
        return None
    if a is None:
        assert b is not None
        return Change(path, "added", kind(b.mode))
    if b is None:
        return Change(path, "deleted", kind(a.mode))
    fields = changed_fields(path, a, b)
    if not fields:
        return None
    ka, kb = kind(a.mode), kind(b.mode)
    return Change(path, "modified", kb, ka if ka != kb else None, tuple(fields))


def between(older: ViewSpec, newer: ViewSpec) -> list[int]:
    """The bins committed after ``older`` up to ``newer`` (both kept states of one history), newest first."""
    return [n for n in newer.bins if n not in older.bins]


def diff_layers(root: Path, view_a: str, view_b: str, *, as_json: bool, verbose: bool = False) -> str:
    """What changed from VIEW_A to VIEW_B, as ``+``/``-``/``M``/``T`` lines or a JSON list."""

    def newest(table: ViewTable) -> ViewSpec:
        a, b = table.resolve(view_a), table.resolve(view_b)
        return a if len(a.bins) >= len(b.bins) else b

    def query(hist: HistoryLayers) -> list[Change]:
        spec_a, spec_b = hist.table.resolve(view_a), hist.table.resolve(view_b)
        older, newer = sorted((spec_a, spec_b), key=lambda s: len(s.bins))
        bins = [hist.bin(n) for n in between(older, newer)]
        return changes(hist.state(spec_a), hist.state(spec_b), bins)

    found = answer(root, "diff", newest, query, verbose=verbose)
    if as_json:
        return json_list([c.as_dict() for c in found])
    lines = []
    for c in found:
        what = f" ({c.type_before} -> {c.type})" if c.type_before else ""
        lines.append(f"{c.letter} {shown(c.path)}{'/' if c.type == 'dir' and not c.type_before else ''}{what}\n")
    return "".join(lines)
