"""rsync's exclude patterns, re-read in Python so the change scan prunes what rsync skips.

Only the common subset is understood: ``*``, ``?``, ``[...]``, ``**``, a
leading ``/`` (anchored at the source root), a trailing ``/`` (directories
only), a trailing ``/***`` (a directory and everything in it) and patterns
with inner slashes (matched at any directory boundary). Anything else sets
:attr:`Excludes.understood` to False, and the backup falls back to letting
rsync compare the whole tree, which is always correct.

With several sources the patterns apply below the top "/" that rsync
``--relative`` transfers from: ``/etc/shadow`` is anchored there, as rsync
matches it (docs/operations.md, "Several sources").
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[bytes]
    dirs_only: bool
    whole_path: bool  # match the path from the root rather than the last component


class Excludes:
    """A list of rsync ``--exclude`` patterns, as a predicate on relative paths."""

    def __init__(self, patterns: tuple[str, ...] | list[str], selection: tuple[bytes, ...] = ()) -> None:
        self.patterns = tuple(patterns)
        # Several sources: the subtrees rsync -R is given, relative to the top; the walk enters only
        # them and the directories above them (util/beneath.walk_within). Empty: the whole top.
        self.selection = tuple(selection)
        self.understood = True
        self._rules: list[_Rule] = []
        for pattern in self.patterns:
            rules = _compile(pattern)
            if rules is None:
                self.understood = False
            else:
                self._rules += rules

    def excluded(self, rel: bytes, is_dir: bool) -> bool:
        """Whether rsync would skip ``rel`` (relative to the source, no leading slash)."""
        name = rel.rsplit(b"/", 1)[-1]
        for rule in self._rules:
            if rule.dirs_only and not is_dir:
                continue
            if rule.regex.fullmatch(rel if rule.whole_path else name):
                return True
        return False


_SPECIAL = re.compile(r"^[+\-!:.] |^[+\-]$|^!$")


def _compile(pattern: str) -> list[_Rule] | None:
    """The rules for one pattern, or None when it uses syntax we do not model."""
    if not pattern or _SPECIAL.match(pattern) or "\\" in pattern:
        return None
    dirs_only = pattern.endswith("/") and not pattern.endswith("/***")
    body = pattern.rstrip("/") if dirs_only else pattern
    anchored = body.startswith("/")
    body = body.lstrip("/")
    if not body:
        return None
    if body.endswith("/***"):  # "dir/***": the directory itself and everything below it
        prefix = "/" if anchored else ""
        itself = _compile(prefix + body[:-4])
        below = _compile(prefix + body[:-4] + "/**")
        return None if itself is None or below is None else itself + below
    if "***" in body:
        return None
    translated = _translate(body)
    if translated is None:
        return None
    whole_path = anchored or "/" in body or "**" in body
    if whole_path and not anchored:
        translated = b"(?:.*/)?" + translated  # unanchored: any directory boundary
    return [_Rule(re.compile(translated, re.DOTALL), dirs_only, whole_path)]


def _translate(glob: str) -> bytes | None:
    """A glob as a regex over bytes: ``**`` crosses slashes, ``*`` and ``?`` do not."""
    out = []
    i = 0
    raw = glob.encode("utf-8", "surrogateescape")
    while i < len(raw):
        c = raw[i:i + 1]
        if raw.startswith(b"**", i):
            out.append(b".*")
            i += 2
        elif c == b"*":
            out.append(b"[^/]*")
            i += 1
        elif c == b"?":
            out.append(b"[^/]")
            i += 1
        elif c == b"[":
            end = raw.find(b"]", i + 2)
            if end < 0:
                return None
            body = raw[i + 1:end]
            if body.startswith(b"!"):
                body = b"^" + body[1:]
            if b"[" in body:
                return None
            out.append(b"[" + body + b"]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return b"".join(out)
