"""``squashfu init``: create a backup root, after checking its place and its filesystem.

The root is private (0700), outside the source, not on a volatile
filesystem, and on one that can hold overlay upper layers; a failed init
leaves nothing behind (docs/commands.md "init", docs/layout.md).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from squashfu_fs import overlay as layerstack
from squashfu_fs.engines import rsync
from squashfu_fs.errors import UsageError
from squashfu_fs.store import history as history_mod
from squashfu_fs.store import placement, privacy, recovery
from squashfu_fs.store.config import Config
from squashfu_fs.store.history import History
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.util import durable
from squashfu_fs.util.process import require_root
from squashfu_fs.write.source import refuse_missing_sources


def init_root(root: Path, config: Config) -> None:
    """Create a backup root for ``config.source`` (or each of several sources); refuse anything doubtful."""
    require_root("init")
    if config.origin.remote:  # reachable, and a directory: a typo fails now, not at the first night
        if rsync.list_top(config.source, config.rsh) is None:
            raise UsageError(f"source {config.source} is not a directory")
    else:
        if not config.several and not Path(config.source).is_dir():
            raise UsageError(f"source {config.source} is not a directory")
        refuse_missing_sources(config, "nothing was created")
        for source in config.source_paths:
            placement.refuse_root_inside_source(root, Path(source))
    placement.refuse_volatile_root(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UsageError(f"{root} already exists and is not an empty directory")
    created = not root.exists()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        privacy.make_private(root)  # an existing empty directory too: the root is 0700 (docs/layout.md)
        check_layer_support(root)
        layout = RootLayout(root)
        for path in layout.skeleton():
            path.mkdir(mode=0o700)
        durable.atomic_write(layout.config, config.to_toml().encode())
        history_mod.save(layout.history, History())
    except BaseException:
        for entry in list(root.iterdir()):
            recovery.remove(entry)
        if created:
            root.rmdir()
        raise


def check_layer_support(directory: Path) -> None:
    """Overlay upper layers need 0:0 whiteout devices and trusted.* xattrs: try both."""
    probe = directory / ".probe"
    try:
        probe.mkdir()
        try:
            os.mknod(probe / "whiteout", stat.S_IFCHR | 0o000, os.makedev(0, 0))
            os.setxattr(probe, layerstack.OPAQUE_XATTR, b"y")
        except OSError as exc:
            raise UsageError(
                f"{directory} is on a filesystem that cannot hold overlay layers "
                f"(whiteout devices and trusted xattrs: {exc.strerror}); use ext4, xfs or btrfs"
            ) from None
    finally:
        if probe.exists():
            recovery.remove(probe)
