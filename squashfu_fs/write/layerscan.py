"""What a freshly written layer holds, found by walking it once after rsync.

A bin or a staging tree is scanned before it is committed: its size and
file count go into history; a source's own escaped ``trusted.overlay.*``
xattrs, 0:0 devices that came from the source, POSIX ACLs (which SquashFS
cannot store) and opaque directories each need handling later
(docs/layout.md, docs/commands.md "backup").
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from squashfu_fs import overlay as layerstack
from squashfu_fs.store import catalog
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.util import beneath
from squashfu_fs.write import unionfix

# os.listxattr names xattrs as str.
_ESCAPED_PREFIX = os.fsdecode(layerstack.ESCAPED_PREFIX)
_OPAQUE_XATTR = os.fsdecode(layerstack.OPAQUE_XATTR)


@dataclass(frozen=True)
class LayerScan:
    """What a freshly written layer holds, measured by walking it."""

    files: int  # non-directory entries: files, links, devices, whiteouts
    size: int  # allocated size on disk
    escaped_xattrs: bool  # holds a source's own trusted.overlay.* xattr
    whiteout_devices: tuple[bytes, ...]  # 0:0 devices that came from the source
    acl_paths: tuple[bytes, ...]  # entries carrying POSIX ACLs, which SquashFS cannot store
    opaque_dirs: tuple[bytes, ...] = ()  # directories overlay marked opaque (trusted.overlay.opaque=y)
    deleted: int = 0  # source entries this backup deletes (contents of a deleted directory included)
    entries_before: int = 0  # source entries at the backup before; 0 when not known
    shrunk: tuple[str, ...] = ()  # several sources: each one left with under half its entries, described
    withdrawn: tuple[str, ...] = ()  # several sources: each one rsync did not leave a directory, described


def scan_layer(top: Path, *, source: Path | None, made_devices: Collection[bytes] = ()) -> LayerScan:
    """Count a layer's entries and find what needs special handling later.

    The layer is squashfu's own (inside the private root); the source is only
    looked at beneath its fd, following no symlink, to tell a source's own
    0:0 devices from overlay's whiteouts. A remote source (``source`` None)
    is not looked at: its 0:0 devices are those rsync said it created
    (``made_devices``), since a deletion's whiteout is not one of them.
    """
    made = frozenset(made_devices)
    files = 0
    used = 0
    escaped = False
    devices: list[bytes] = []
    acls: list[bytes] = []
    opaque: list[bytes] = []
    top_b = os.fsencode(top)
    stack = [top_b]
    with contextlib.suppress(OSError):  # the top is every view's top: its ACLs count too
        if any(x in unionfix.ACL_XATTRS for x in os.listxattr(top_b)):
            acls.append(b".")
    with contextlib.ExitStack() as opened:
        source_fd: int | None = None
        while stack:
            directory = stack.pop()
            with os.scandir(directory) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    used += st.st_blocks * 512
                    names: list[str] = []
                    with contextlib.suppress(OSError):
                        names = os.listxattr(entry.path, follow_symlinks=False)
                    escaped = escaped or any(x.startswith(_ESCAPED_PREFIX) for x in names)
                    if any(x in unionfix.ACL_XATTRS for x in names):
                        acls.append(os.path.relpath(entry.path, top_b))
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
                        if _OPAQUE_XATTR in names and layerstack.is_opaque(entry.path):
                            opaque.append(os.path.relpath(entry.path, top_b))
                        continue
                    files += 1
                    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                        relative = os.path.relpath(entry.path, top_b)
                        if source is None:
                            if relative in made:
                                devices.append(relative)
                            continue
                        try:
                            if source_fd is None:
                                source_fd = opened.enter_context(beneath.opened_root(source, follow=True))
                            sst = beneath.lstat_beneath(source_fd, relative)
                        except OSError:
                            continue  # gone from the source, or not reachable without a symlink
                        if stat.S_ISCHR(sst.st_mode) and sst.st_rdev == 0:
                            devices.append(relative)
    return LayerScan(files, used, escaped, tuple(devices), tuple(sorted(acls)), tuple(sorted(opaque)))


def record_opaque_dirs(layout: RootLayout, number: int, scan: LayerScan) -> None:
    """List bin N's opaque directories beside it, even none: readers trust a record instead of probing xattrs."""
    layerstack.write_opaque_record(layout.opaque_record(number), scan.opaque_dirs)


def record_catalog(layout: RootLayout, number: int, time: str, top: Path, scan: LayerScan) -> None:
    """Catalogue bin N (to be committed with backup time ``time``), each file's digest measured while its bytes
    are fresh (store/catalog.py)."""
    catalog.write(layout.bin_catalog(number), top, label=catalog.bin_label(number, time),
                  opaque_dirs=scan.opaque_dirs, digests=True)
