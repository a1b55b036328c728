"""Offsite copies (docs/operations.md, "Offsite copies"): where a copy lives, and how a root knows it is one.

A copy is named like rsync and rclone name places: ``rclone:REMOTE:PATH``
(anything rclone speaks), ``[USER@]HOST:PATH`` (rsync over ssh: a colon
before the first slash), or a local path (write ``./a:b`` for a local name
with a colon). ``sync`` writes the copy's ``history.json`` with a ``copy``
key (what it is a copy of, when it was synced): backup and resquash refuse a
root that has one, so a copy never diverges from its original only to be
overwritten by the next sync.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from squashfu_fs.errors import UsageError
from squashfu_fs.store.history import History

RCLONE_PREFIX = "rclone:"
COPY_KEY = "copy"  # the top-level key of history.json that marks a copy
HISTORY_WRITERS = ("backup", "resquash")  # the commands a copy refuses


@dataclass(frozen=True)
class Location:
    """Where a root or a copy is: ``kind`` is "local", "ssh" or "rclone"; ``path`` as its tool takes it."""

    kind: str
    text: str  # as the user gave it
    path: str  # local: absolute path; ssh: "[USER@]HOST:PATH"; rclone: "REMOTE:PATH"

    def __str__(self) -> str:
        return self.text


def parse(text: str) -> Location:
    """Where ``text`` points; one line for a name no tool could use."""
    if not text or "\0" in text or "\n" in text:
        raise UsageError(f"{text!r} names no place for a copy")
    if text.startswith(RCLONE_PREFIX):
        target = text[len(RCLONE_PREFIX):]
        if not target or target.startswith("-"):
            raise UsageError(f"{text}: give rclone:REMOTE:PATH (a remote from `rclone config`)")
        return Location("rclone", text, target)
    host, colon, path = text.partition(":")
    if colon and "/" not in host:
        if not host or not path or host.startswith("-"):
            raise UsageError(f"{text}: give [USER@]HOST:PATH with both a host and a path")
        return Location("ssh", text, text)
    return Location("local", text, os.path.abspath(text))


def is_rclone(text: str) -> bool:
    """Whether a ``-r`` value names an rclone copy (which only sync, list and verify read)."""
    return text.startswith(RCLONE_PREFIX)


def mark_of(history: History) -> dict[str, Any] | None:
    """The copy mark of a root's history (``of``, ``synced``), or None for an original root."""
    mark = history.extra.get(COPY_KEY)
    return mark if isinstance(mark, dict) else None


def marked(history: History, of: str, when: str) -> History:
    """``history`` as a copy's history: the original's, marked as a copy of ``of`` synced at ``when``."""
    return replace(history, extra={**history.extra, COPY_KEY: {"of": of, "synced": when}})


def unmarked(history: History) -> History:
    """``history`` as an ordinary root's (a copy brought back with ``sync --writable``)."""
    return replace(history, extra={k: v for k, v in history.extra.items() if k != COPY_KEY})


def refuse_writes(root: object, history: History, command: str) -> None:
    """Backup and resquash write only to an original root: a copy is refused with one line (exit 2)."""
    mark = mark_of(history)
    if mark is None or command not in HISTORY_WRITERS:
        return
    raise UsageError(f"{root} is a copy of {mark.get('of', 'another root')} made by `squashfu sync`; "
                     f"{command} writes only to the original (bring a copy back as a root of its own "
                     "with `sync --writable`)")
