"""Where things live inside a backup root (docs/layout.md), in one place.

Every other module asks a :class:`RootLayout` for paths instead of joining
names itself, so the on-disk format is written down exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

HISTORY_NAME = "history.json"
CONFIG_NAME = "squashfu.toml"
_SEED_RE = re.compile(r"^seed(?:\.(\d+))?\.sfs$")


@dataclass(frozen=True)
class RootLayout:
    """The paths of one backup root."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def history(self) -> Path:
        return self.root / HISTORY_NAME

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def bins(self) -> Path:
        return self.root / "bins"

    @property
    def ro(self) -> Path:
        """Where the seed is loop-mounted while a backup or resquash runs."""
        return self.root / "ro"

    @property
    def rw(self) -> Path:
        """Where the union is mounted while a backup or resquash runs."""
        return self.root / "rw"

    @property
    def merged(self) -> Path:
        """Where a resquash mounts the read-only merge it copies into a staging seed."""
        return self.root / ".merged"

    @property
    def work(self) -> Path:
        """overlayfs workdirs; on the same filesystem as ``bins/``."""
        return self.root / ".work"

    @property
    def staging(self) -> Path:
        """The upper layer a new seed is rsynced into before it is squashed."""
        return self.root / ".staging"

    @property
    def empty(self) -> Path:
        """An always-empty directory, the lower layer under a staging upper."""
        return self.root / ".empty"

    @property
    def rollbacks(self) -> Path:
        """One sub-directory per live ``rollback`` mount: its record and seed mount."""
        return self.root / ".rollbacks"

    @property
    def manifest(self) -> Path:
        """The change-scan cache: the source's (inode, ctime, size) at the last backup."""
        return self.root / ".manifest"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def catalogs(self) -> Path:
        """Each layer's catalogue of entries, for the history queries (docs/layout.md, "Catalogues")."""
        return self.root / "catalogs"

    def bin_catalog(self, number: int) -> Path:
        return self.catalogs / f"bin-{number}.db"

    def seed_catalog(self, generation: int) -> Path:
        return self.catalogs / f"seed-{generation}.db"

    def bin(self, number: int) -> Path:
        return self.bins / str(number)

    def bin_rel(self, number: int) -> str:
        """A bin's short name relative to the root, for overlay's one-page option string."""
        return f"bins/{number}"

    def opaque_record(self, number: int) -> Path:
        """Bin N's opaque directories, for readers that cannot see trusted xattrs (none: no file)."""
        return self.bins / f"{number}.opaque"

    def sealed_bin(self, number: int) -> Path:
        """Bin N compressed into a SquashFS image (docs/layout.md, "Sealed bins")."""
        return self.bins / f"{number}.sfs"

    def temp_sealed_bin(self, number: int) -> Path:
        """The name a sealed image is written under until history names it."""
        return self.bins / f"{number}.sfs.tmp"

    def digest_list(self, number: int) -> Path:
        """An unsealed bin's per-file SHA-256 list, written at commit (docs/layout.md, "Digests")."""
        return self.bins / f"{number}.sha256"

    @property
    def layer_mounts(self) -> Path:
        """Where a backup or resquash loop-mounts the sealed bins it stacks, one directory each."""
        return self.root / ".layers"

    def partial_bin(self, number: int) -> Path:
        """The temporary name a bin is written under until it is committed."""
        return self.bins / f".partial-{number}"

    def seed(self, file_name: str) -> Path:
        return self.root / file_name

    @staticmethod
    def seed_name(generation: int) -> str:
        return "seed.sfs" if generation <= 1 else f"seed.{generation}.sfs"

    @staticmethod
    def is_seed_name(name: str) -> bool:
        return _SEED_RE.match(name) is not None

    def temp_seed(self, generation: int) -> Path:
        return self.root / (self.seed_name(generation) + ".tmp")

    def skeleton(self) -> list[Path]:
        """The directories ``init`` creates."""
        return [self.bins, self.ro, self.rw, self.merged, self.work, self.empty, self.logs, self.layer_mounts,
                self.catalogs]
