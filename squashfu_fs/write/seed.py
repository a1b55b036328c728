"""Writing and committing a seed image: the first backup's and every resquash's, in one place.

The image is written under a temporary name, mounted and compared with the
tree it was made from, renamed into place and made durable (checkpoint
``seed-written``); only then does ``history.json`` name it. A crash before
the history is replaced leaves debris that recovery removes; after, the new
seed is committed (docs/crash-safety.md, "(a) The first backup" and
"(c) Resquash (retention)").
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from squashfu_fs.engines import mksquashfs as squash
from squashfu_fs.store import catalog
from squashfu_fs.store import history as history_mod
from squashfu_fs.store.config import Config
from squashfu_fs.store.history import Bin, History, Seed, SourceState
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.util import clock, digest, faults
from squashfu_fs.util.durable import fsync_dir


@dataclass(frozen=True)
class SeedContents:
    """What a new seed holds, as history records it; its size, file count and times are measured here."""

    time: str  # backup time of the newest state it holds
    rsync_status: int | None
    escaped_xattrs: bool  # holds a source's own trusted.overlay.* xattrs
    source_device: int | None  # the source as the newest backup it holds saw it (see Seed)
    source_fsid: int | None
    source_entries: int | None
    absorbed: tuple[int, ...] = ()  # bin numbers merged into it, oldest first
    sources: tuple[SourceState, ...] | None = None  # several sources: each as that backup saw it


def commit_seed(layout: RootLayout, history: History, config: Config, tree: AbstractContextManager[Path], *,
                contents: SeedContents, started: float, progress: bool, checkpoint: str,
                remaining: tuple[Bin, ...] | None = None, carry: catalog.Carry | None = None) -> History:
    """Squash the tree ``tree`` yields into the next seed, check it, and commit it with ``remaining`` bins.

    ``tree`` is entered only while the image is made and checked (a resquash
    mounts its merge for that long). ``started`` is the command's
    ``time.monotonic()`` at its start; ``checkpoint`` names the fault point
    right after the commit. The image's catalogue is written while it is
    mounted for the check; ``carry`` gives the file digests already known
    (a resquash's), the others are measured. Returns the committed history.
    """
    generation = history.seed.generation + 1 if history.seed else 1
    tmp = layout.temp_seed(generation)

    def catalogue(mounted: Path) -> None:
        catalog.write(layout.seed_catalog(generation), mounted, digests=True, carry=carry,
                      label=catalog.seed_label(RootLayout.seed_name(generation), contents.time))

    with tree as top:
        squash.make_image(top, tmp, config, progress=progress)
        squash.check_image(tmp, top, layout.rw, then=catalogue)
    image_digest = digest.of_file(tmp)
    name = RootLayout.seed_name(generation)
    image = layout.seed(name)
    os.replace(tmp, image)
    fsync_dir(layout.root)
    faults.checkpoint("seed-written")
    # Each field as it is (asdict would turn the SourceState objects into dicts)
    seed = Seed(file=name, generation=generation, created=clock.now().isoformat(timespec="seconds"),
                duration=round(time.monotonic() - started, 3), bytes=image.stat().st_size,
                files=squash.inode_count(image) - 1, digest=image_digest,
                **{f.name: getattr(contents, f.name) for f in dataclasses.fields(contents)})
    history = history.with_seed(seed, remaining)
    history_mod.save(layout.history, history)
    faults.checkpoint(checkpoint)
    return history
