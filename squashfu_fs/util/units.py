"""Sizes for people, written the same way by every command (``list``, progress bars)."""

from __future__ import annotations


def human(n: float) -> str:
    """A size for people: 1023 B, 1.5 KiB, 12.3 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
