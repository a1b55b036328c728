"""What a command tells the person running it on stderr: one prefix, one line a note.

Every note, warning and final error line goes through :func:`say`, so they
all read ``squashfu: ...`` and a newline in a file name cannot split one
(docs/commands.md, "Common behaviour").
"""

from __future__ import annotations

import sys

# A newline in a file name must not split the one line: show it as \n, like other control characters.
CONTROL = {c: f"\\x{c:02x}" for c in range(32)} | {10: "\\n", 9: "\\t"}


def say(shown: bool, message: str) -> None:
    """One line ``squashfu: message`` on stderr when ``shown``: pass ``verbose`` for a note, True for a warning."""
    if shown:
        print("squashfu: " + message.translate(CONTROL), file=sys.stderr, flush=True)
