"""Sealing: a committed bin compressed into ``bins/N.sfs``, checked, named in history, then its directory removed.

Each step is crash-safe (docs/crash-safety.md, "(e) Sealing a bin"): the
image is written as ``bins/N.sfs.tmp``, compared entry by entry with the bin
(checkpoint ``seal-image-made``), renamed to ``bins/N.sfs`` and made durable
(``seal-written``); only then does history.json call the bin ``sealed``
(``seal-committed``), and only after that is the directory removed
(``seal-done``). Before the commit the image is debris; after it the
directory is. A bin whose directory a live time-travel view still reads keeps
it until a later command's recovery finds nobody reading it. A bin holding
POSIX ACLs stays a directory, since SquashFS cannot store them; it has a
per-file digest list instead (docs/layout.md, "Sealed bins").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from squashfu_fs import overlay
from squashfu_fs.engines import mksquashfs as squash
from squashfu_fs.store import catalog, digests, layers, recovery, rollbacks
from squashfu_fs.store import history as history_mod
from squashfu_fs.store import registry as readers
from squashfu_fs.store.config import Config
from squashfu_fs.store.history import SEALED_FORMAT, Bin, History
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.util import digest, faults
from squashfu_fs.util.durable import fsync_dir
from squashfu_fs.util.say import say
from squashfu_fs.write.layerscan import scan_layer


def unsealed(history: History) -> list[Bin]:
    """The committed bins still kept as directories, oldest first."""
    return [b for b in history.bins if not layers.sealed(b)]


def seal_all(layout: RootLayout, history: History, config: Config, *, verbose: bool = False) -> History:
    """Seal every directory bin that can be sealed (bins of an older root included); returns the history.

    A bin holding POSIX ACLs stays a directory with a digest list; whether it
    does is recorded at commit, or found once here for a bin of an older root.
    """
    for entry in unsealed(history):
        acls = entry.acls
        if acls is None:
            acls = bool(scan_layer(layout.bin(entry.number), source=None).acl_paths)
        if not acls:
            history = seal_bin(layout, history, config, entry.number, verbose=verbose)
        elif entry.acls is None or entry.digest is None:
            value = list_digests(layout, layout.bin(entry.number), entry.number)
            history = history.with_bin_replaced(dataclasses.replace(entry, acls=True, digest=value))
            history_mod.save(layout.history, history)
            say(verbose, f"bin {entry.number} holds POSIX ACLs, which SquashFS cannot store: it stays a directory")
    return history


def seal_bin(layout: RootLayout, history: History, config: Config, number: int, *,
             verbose: bool = False) -> History:
    """Compress bin ``number`` into its image and commit it sealed; the caller holds the writer lock."""
    entry = history.bin(number)
    tree, tmp, image = layout.bin(number), layout.temp_sealed_bin(number), layout.sealed_bin(number)
    say(verbose, f"sealing bin {number} with {config.compression}")
    squash.make_image(tree, tmp, config)
    squash.check_image(tmp, tree, layout.merged, then=lambda mounted: _recatalogue(layout, entry, mounted))
    faults.checkpoint("seal-image-made")
    image_digest = digest.of_file(tmp)
    tmp.replace(image)
    fsync_dir(layout.bins)
    faults.checkpoint("seal-written")
    sealed = dataclasses.replace(entry, format=SEALED_FORMAT, image_bytes=image.stat().st_size, digest=image_digest)
    history = history.with_bin_replaced(sealed)
    history_mod.save(layout.history, history)
    faults.checkpoint("seal-committed")
    layout.digest_list(number).unlink(missing_ok=True)
    # A view built before the seal reads the directory: let daemons load the new history first,
    # and leave the directory to a later recovery if a live view still holds it.
    readers.wait_for(layout.root, history.generation, unused=(number,))
    if number in readers.in_use(layout.root, history.generation, (number,))[0] | rollbacks.bins_read(layout):
        say(verbose, f"bin {number}'s directory is still read through a mounted view; a later command removes it")
    else:
        recovery.remove(tree)
        fsync_dir(layout.bins)
    faults.checkpoint("seal-done")
    say(verbose, f"sealed bin {number}: {sealed.bytes} bytes in {sealed.image_bytes} bytes of image")
    return history


def _recatalogue(layout: RootLayout, entry: Bin, image: Path) -> None:
    """Catalogue bin N again from its new image, mounted for the check: what its readers will see from now on.

    An image keeps what the directory held except what SquashFS cannot store
    as it is (an mtime before 1970 or after 2106 is kept modulo 2**32), and
    the queries must answer as the sealed layer reads. The files' digests are
    carried from the directory's catalogue (the image was just made from
    those very files). A bin without a catalogue (an older root's) stays
    without one.
    """
    number, label = entry.number, catalog.label_of(entry)
    with catalog.opened([layout.bin_catalog(number)], [label]) as known:
        if known is None:
            return
        catalog.write(layout.bin_catalog(number), image, label=label,
                      opaque_dirs=overlay.read_opaque_record(layout.opaque_record(number)), digests=True,
                      carry=catalog.carry_from(known, same_mtime=False))


def list_digests(layout: RootLayout, top: Path, number: int) -> str:
    """Write bin ``number``'s per-file digest list from the layer at ``top``; returns the list's digest."""
    return digests.write_list(layout.digest_list(number), top)
