"""Layer kinds: what each layer history names is on disk, what the kernel stacks, what the daemon reads.

History names a seed and bins (docs/layout.md). The seed is a SquashFS image
that each user mounts where it wants (``ro/`` for a backup, a private
directory for a roll-back or the daemon), so its layer is that mount point. A
bin's ``format`` in history.json says what kind of layer it is:

- ``overlay``: the directory ``bins/N``, an overlayfs upper layer as the
  kernel wrote it, with its per-file digest list ``bins/N.sha256``;
- ``sealed``: the same layer compressed into ``bins/N.sfs`` (docs/layout.md,
  "Sealed bins"); whoever stacks it loop-mounts the image first, as it does
  the seed, and its layer is that mount point.

Both keep the list of their opaque directories in ``bins/N.opaque``. Every
module that stacks, reads or keeps a layer asks here, so a new kind of layer
is added in this module alone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from squashfu_fs.engines import mounts
from squashfu_fs.errors import CorruptRootError, SquashfuError
from squashfu_fs.overlay import DirLayer, Layer
from squashfu_fs.store.history import BIN_FORMAT, SEALED_FORMAT, Bin, Seed
from squashfu_fs.store.layout import RootLayout


class _DirectoryBin:
    """``overlay``: the bin is the directory ``bins/N`` itself."""

    is_image = False

    def image(self, layout: RootLayout, number: int) -> Path | None:
        return None

    def files(self, layout: RootLayout, number: int) -> tuple[Path, ...]:
        return layout.bin(number), layout.opaque_record(number), layout.digest_list(number)

    def present(self, layout: RootLayout, number: int) -> bool:
        return layout.bin(number).is_dir()


class _SealedBin:
    """``sealed``: the bin is the image ``bins/N.sfs``, read wherever it is mounted."""

    is_image = True

    def image(self, layout: RootLayout, number: int) -> Path | None:
        return layout.sealed_bin(number)

    def files(self, layout: RootLayout, number: int) -> tuple[Path, ...]:
        return layout.sealed_bin(number), layout.opaque_record(number)

    def present(self, layout: RootLayout, number: int) -> bool:
        return layout.sealed_bin(number).is_file()


KINDS: dict[str, _DirectoryBin | _SealedBin] = {BIN_FORMAT: _DirectoryBin(), SEALED_FORMAT: _SealedBin()}


def _kind(entry: Bin) -> _DirectoryBin | _SealedBin:
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


def image(layout: RootLayout, entry: Bin) -> Path | None:
    """The image a bin must be mounted from before it can be stacked or read; None for a directory bin."""
    return _kind(entry).image(layout, entry.number)


def sealed(entry: Bin) -> bool:
    """Whether a bin is an image (sealed) rather than a directory."""
    return _kind(entry).is_image


def lowerdir(layout: RootLayout, entry: Bin, images: Mapping[int, str]) -> str:
    """What the kernel stacks for a bin: a name relative to the root (overlay's options fit in one page).

    A sealed bin is stacked where its image is mounted (``images``, from :func:`images_mounted`).
    """
    if image(layout, entry) is None:
        return layout.bin_rel(entry.number)
    try:
        return images[entry.number]
    except KeyError:
        raise SquashfuError(f"bin {entry.number} is sealed and its image is not mounted") from None


def lowerdirs(layout: RootLayout, bins: Iterable[Bin], seed_dir: str, *, read_only: bool = False,
              images: Mapping[int, str] | None = None) -> list[str]:
    """An overlay ``lowerdir`` list: ``bins`` newest first, then the seed mounted on ``seed_dir``.

    A read-only overlay needs two lower layers at least: a seed alone goes over ``.empty``.
    """
    lowers = [lowerdir(layout, b, images or {}) for b in bins] + [seed_dir]
    if read_only and len(lowers) < 2:
        lowers.append(os.path.relpath(layout.empty, layout.root))
    return lowers


def mount_images(layout: RootLayout, bins: Iterable[Bin], directory: Path) -> dict[int, str]:
    """Loop-mount each sealed bin of ``bins`` on ``directory/N`` (read-only, nosuid,nodev).

    Returns the mount points relative to the root, as :func:`lowerdirs`
    takes them. On failure every mount made here is taken down again; on
    success the caller takes them down (:func:`unmount_images`).
    """
    done: dict[int, str] = {}
    try:
        for b in bins:
            source = image(layout, b)
            if source is None:
                continue
            target = directory / str(b.number)
            target.mkdir(mode=0o700, parents=True, exist_ok=True)
            mounts.mount_squashfs(source, target)
            done[b.number] = os.path.relpath(target, layout.root)
    except BaseException:
        unmount_images(directory)
        raise
    return done


def unmount_images(directory: Path) -> None:
    """Take down every image mounted below ``directory`` and remove the empty mount points."""
    for point in reversed(mounts.mounts_below(directory)):
        mounts.unmount(os.fsdecode(point))
    if directory.is_dir():
        for entry in directory.iterdir():
            with contextlib.suppress(OSError):
                entry.rmdir()


@contextlib.contextmanager
def images_mounted(layout: RootLayout, bins: Iterable[Bin], directory: Path | None = None) -> Iterator[dict[int, str]]:
    """The sealed bins of ``bins`` mounted for a block (on ``.layers/N`` unless told), always taken down."""
    where = directory or layout.layer_mounts
    try:
        yield mount_images(layout, bins, where)
    finally:
        unmount_images(where)


def layer(layout: RootLayout, entry: Bin, images: Mapping[int, bytes]) -> Layer:
    """What the daemon reads for a bin: its directory, or where the daemon mounted its image."""
    if image(layout, entry) is None:
        return DirLayer(layout.bin(entry.number))
    return DirLayer(images[entry.number])


def stack(layout: RootLayout, bins: Iterable[Bin], seed_dir: bytes,
          images: Mapping[int, bytes] | None = None) -> list[Layer]:
    """The daemon's layers of one view: ``bins`` newest first, then the seed mounted on ``seed_dir``."""
    return [*(layer(layout, b, images or {}) for b in bins), DirLayer(seed_dir)]


def bin_names(layout: RootLayout, number: int) -> tuple[str, ...]:
    """Every entry of ``bins/`` that belongs to bin ``number``, whatever its kind (recovery keeps these)."""
    return tuple(dict.fromkeys(p.name for kind in KINDS.values() for p in kind.files(layout, number)))


def bin_files(layout: RootLayout, entry: Bin) -> tuple[Path, ...]:
    """The entries of ``bins/`` that a committed bin of its kind consists of."""
    return _kind(entry).files(layout, entry.number)


def check_present(layout: RootLayout, entry: Bin | Seed) -> None:
    """Refuse a root where a layer history names is missing: recovery must not guess (docs/crash-safety.md)."""
    if isinstance(entry, Seed):
        if not layout.seed(entry.file).is_file():
            raise CorruptRootError(f"history names {entry.file} but it is missing; refusing to touch the root")
    elif not _kind(entry).present(layout, entry.number):
        shown = layout.sealed_bin(entry.number).name if image(layout, entry) else str(entry.number)
        raise CorruptRootError(f"history names bin {entry.number} but bins/{shown} is missing; "
                               "refusing to touch the root")
