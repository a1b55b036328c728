"""Layer kinds: what each layer history names is on disk, what the kernel stacks, what the daemon reads.

History names a seed and bins (docs/layout.md). The seed is a SquashFS image
that each user mounts where it wants (``ro/`` for a backup, a private
directory for a roll-back or the daemon), so its layer is that mount point. A
bin's ``format`` in history.json says what kind of layer it is; today there is
one kind, ``overlay``: the directory ``bins/N``, an overlayfs upper layer as
the kernel wrote it, with the list of its opaque directories in
``bins/N.opaque`` (docs/layout.md, "A bin: an overlayfs upper layer"). Every
module that stacks, reads or keeps a layer asks here, so a new kind of layer
is added in this module alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from squashfu_fs.errors import CorruptRootError
from squashfu_fs.overlay import DirLayer, Layer
from squashfu_fs.store.history import BIN_FORMAT, Bin, Seed
from squashfu_fs.store.layout import RootLayout


class _DirectoryBin:
    """``overlay``: the bin is the directory ``bins/N`` itself."""

    def lowerdir(self, layout: RootLayout, number: int) -> str:
        return layout.bin_rel(number)

    def layer(self, layout: RootLayout, number: int) -> Layer:
        return DirLayer(layout.bin(number))

    def present(self, layout: RootLayout, number: int) -> bool:
        return layout.bin(number).is_dir()


KINDS = {BIN_FORMAT: _DirectoryBin()}


def _kind(entry: Bin) -> _DirectoryBin:
    """The kind of a committed bin; one this squashfu does not know is refused, never guessed."""
    try:
        return KINDS[entry.format]
    except KeyError:
        raise CorruptRootError(f"history names bin {entry.number} of format {entry.format!r}, which this "
                               "squashfu cannot read; refusing to touch the root") from None


def check_known(bins: Iterable[Bin]) -> None:
    """Refuse bins of a kind this squashfu cannot read before anything is built from them."""
    for b in bins:
        _kind(b)


def lowerdir(layout: RootLayout, entry: Bin) -> str:
    """What the kernel stacks for a bin: a name relative to the root (overlay's options fit in one page)."""
    return _kind(entry).lowerdir(layout, entry.number)


def lowerdirs(layout: RootLayout, bins: Iterable[Bin], seed_dir: str, *, read_only: bool = False) -> list[str]:
    """An overlay ``lowerdir`` list: ``bins`` newest first, then the seed mounted on ``seed_dir``.

    A read-only overlay needs two lower layers at least: a seed alone goes over ``.empty``.
    """
    lowers = [lowerdir(layout, b) for b in bins] + [seed_dir]
    if read_only and len(lowers) < 2:
        lowers.append(os.path.relpath(layout.empty, layout.root))
    return lowers


def layer(layout: RootLayout, entry: Bin) -> Layer:
    """What the daemon reads for a bin."""
    return _kind(entry).layer(layout, entry.number)


def stack(layout: RootLayout, bins: Iterable[Bin], seed_dir: bytes) -> list[Layer]:
    """The daemon's layers of one view: ``bins`` newest first, then the seed mounted on ``seed_dir``."""
    return [*(layer(layout, b) for b in bins), DirLayer(seed_dir)]


def bin_names(layout: RootLayout, number: int) -> tuple[str, ...]:
    """The entries of ``bins/`` that belong to bin ``number``, whatever its kind."""
    return (layout.bin(number).name, layout.opaque_record(number).name)


def check_present(layout: RootLayout, entry: Bin | Seed) -> None:
    """Refuse a root where a layer history names is missing: recovery must not guess (docs/crash-safety.md)."""
    if isinstance(entry, Seed):
        if not layout.seed(entry.file).is_file():
            raise CorruptRootError(f"history names {entry.file} but it is missing; refusing to touch the root")
    elif not _kind(entry).present(layout, entry.number):
        raise CorruptRootError(f"history names bin {entry.number} but bins/{entry.number} is missing; "
                               "refusing to touch the root")
