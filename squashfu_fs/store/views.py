"""View naming (docs/commands.md, "VIEW names"): which committed state each name of the past shows.

Pure logic over a :class:`~squashfu_fs.store.history.History`; both the read-only
kernel roll-back and the time-travel filesystem use it, so ``wed`` means the
same day everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from squashfu_fs.errors import UnknownViewError
from squashfu_fs.store.history import History

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
LATEST = "latest"
SEED = "seed"


@dataclass(frozen=True)
class ViewSpec:
    """One state of the past: the bins to stack (newest first) over the seed."""

    name: str
    bins: tuple[int, ...]  # newest first; empty for a seed-only state
    time: datetime

    @property
    def top(self) -> int | None:
        """The newest bin in the stack, or None for the seed alone."""
        return self.bins[0] if self.bins else None


@dataclass(frozen=True)
class ViewTable:
    """Every name the history offers: dated views, and links to them."""

    dated: dict[str, ViewSpec]  # "YYYY-MM-DD" -> state, oldest first
    links: dict[str, str]  # "mon".."sun", "latest" -> a dated name
    seed: ViewSpec | None
    snapshots: dict[str, ViewSpec] = field(default_factory=dict)  # every backup, "YYYY-MM-DDTHH:MM:SS", oldest first

    @classmethod
    def from_history(cls, history: History) -> ViewTable:
        if history.seed is None:
            return cls(dated={}, links={}, seed=None, snapshots={})
        seed = ViewSpec(SEED, (), history.seed.when)
        states = [seed]
        stack: list[int] = []
        for b in history.bins:
            stack.insert(0, b.number)
            states.append(ViewSpec("", tuple(stack), b.when))
        dated: dict[str, ViewSpec] = {}
        for state in states:  # later states of a date replace earlier ones
            name = date_name(state.time)
            dated[name] = ViewSpec(name, state.bins, state.time)
        links: dict[str, str] = {}
        for name, state in dated.items():
            links[WEEKDAYS[state.time.weekday()]] = name
        links[LATEST] = next(reversed(dated))
        snapshots: dict[str, ViewSpec] = {}
        for state in states:
            name = unique(snapshot_name(state.time), snapshots)
            snapshots[name] = ViewSpec(name, state.bins, state.time)
        return cls(dated=dated, links=links, seed=seed, snapshots=snapshots)

    def names(self) -> list[str]:
        """Every name, in the order the root of the filesystem lists them."""
        out = list(self.dated)
        out += [d for d in WEEKDAYS if d in self.links]
        if LATEST in self.links:
            out.append(LATEST)
        if self.seed is not None:
            out.append(SEED)
        return out

    def resolve(self, name: str) -> ViewSpec:
        """The state a VIEW name shows, or a usage error listing the valid names."""
        if name == SEED and self.seed is not None:
            return self.seed
        target = self.links.get(name.lower(), name)
        if target in self.dated:
            return self.dated[target]
        if name in self.snapshots:
            return self.snapshots[name]
        valid = ", ".join(self.names()) or "none: the root has no backup yet"
        raise UnknownViewError(f"unknown view {name!r}; valid views: {valid}")


def date_name(when: datetime) -> str:
    """The dated view name of a backup time (its local calendar date)."""
    return when.strftime("%Y-%m-%d")


def snapshot_name(when: datetime) -> str:
    """The name of one backup among ``snapshots/``: its local time to the second."""
    return when.strftime("%Y-%m-%dT%H:%M:%S")


def unique(name: str, taken: dict[str, ViewSpec]) -> str:
    """``name``, or ``name-2``, ``name-3``... for backups committed within the same second."""
    if name not in taken:
        return name
    n = 2
    while f"{name}-{n}" in taken:
        n += 1
    return f"{name}-{n}"
