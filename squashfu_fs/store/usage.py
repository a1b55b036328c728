"""What a root's committed history takes on disk, for ``metrics_file`` (docs/operations.md, "Metrics").

The same sizes as ``squashfu list`` shows: the seed image's allocated size, a
sealed bin's image size, a directory bin's ``bytes``.
"""

from __future__ import annotations

import contextlib

from squashfu_fs.store import layers
from squashfu_fs.store.history import History
from squashfu_fs.store.layout import RootLayout


def repository_bytes(layout: RootLayout, history: History) -> int:
    """Bytes the layers history names take on disk (a layer missing from disk counts 0)."""
    total = 0
    if history.seed is not None:
        with contextlib.suppress(FileNotFoundError):
            total += layout.seed(history.seed.file).stat().st_blocks * 512
    for b in history.bins:
        total += b.image_bytes if layers.sealed(b) and b.image_bytes is not None else b.bytes
    return total


def layer_count(history: History) -> int:
    """The committed layers: the seed (if any) and every bin."""
    return (history.seed is not None) + len(history.bins)


def samples(layout: RootLayout, history: History) -> dict[str, float]:
    """The metrics every run writes about the repository as a whole."""
    return {"squashfu_repository_bytes": repository_bytes(layout, history),
            "squashfu_layers": layer_count(history)}
