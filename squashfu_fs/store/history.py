"""``history.json``: the single source of truth of what has been committed.

A bin that is not listed here does not exist for readers, and recovery may
delete it. The file is replaced atomically (temp, fsync, rename, fsync dir),
so a reader or a crash only ever sees the old or the new history.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from squashfu_fs.errors import CorruptRootError
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.util.durable import atomic_write

FORMAT_VERSION = 1
BIN_FORMAT = "overlay"  # the directory bins/N, as overlayfs wrote it
SEALED_FORMAT = "sealed"  # bins/N.sfs, the same layer compressed into a SquashFS image


@dataclass(frozen=True)
class SourceState:
    """One of several sources as a backup saw it: what tells a disk that did not come up (docs/layout.md)."""

    path: str  # the source as the config names it
    device: int  # st_dev of its top directory
    fsid: int  # statfs f_fsid of its filesystem
    entries: int  # entries below its top directory


def _states(data: Any) -> tuple[SourceState, ...] | None:
    return None if data is None else tuple(SourceState(**s) for s in data)


@dataclass(frozen=True)
class Seed:
    """The compressed base image and the backups it absorbed."""

    file: str
    generation: int
    time: str  # backup time of the newest state it holds (local ISO 8601)
    created: str  # when the image was written
    absorbed: tuple[int, ...] = ()  # bin numbers merged into it, oldest first
    duration: float = 0.0
    bytes: int = 0  # image size on disk
    files: int = 0
    rsync_status: int | None = 0
    escaped_xattrs: bool = False  # holds a source's own trusted.overlay.* xattrs
    # The source as the newest backup it holds saw it (None in histories written before these were kept):
    source_device: int | None = None  # st_dev of the source's top directory
    source_fsid: int | None = None  # statfs f_fsid of its filesystem
    source_entries: int | None = None  # entries below the top directory
    digest: str | None = None  # "sha256:HEX" of the image, taken as it was written (None before digests)
    # A root with several sources: each one as this backup saw it (the fields above then describe "/");
    # None, and not written at all, for one source.
    sources: tuple[SourceState, ...] | None = None

    @property
    def when(self) -> datetime:
        return datetime.fromisoformat(self.time)


@dataclass(frozen=True)
class Bin:
    """One committed incremental: an overlayfs upper layer, ``bins/N`` or sealed as ``bins/N.sfs``."""

    number: int
    time: str
    duration: float
    bytes: int
    files: int
    rsync_status: int
    format: str = BIN_FORMAT
    escaped_xattrs: bool = False  # holds a source's own trusted.overlay.* xattrs
    compare: str = "full"  # "manifest": only paths whose (inode, ctime, size) moved were given to rsync
    source_device: int | None = None  # the source as this backup saw it; see Seed
    source_fsid: int | None = None
    source_entries: int | None = None
    # A sealed bin: its image's size and "sha256:HEX"; an overlay bin: the digest of its per-file
    # digest list bins/N.sha256 (docs/layout.md, "Digests"). None in bins written before digests.
    image_bytes: int | None = None
    digest: str | None = None
    acls: bool | None = None  # holds POSIX ACLs, so it stays a directory (None: not known yet)
    sources: tuple[SourceState, ...] | None = None  # several sources: each as this backup saw it; see Seed

    @property
    def when(self) -> datetime:
        return datetime.fromisoformat(self.time)


@dataclass(frozen=True)
class History:
    """Seed plus committed bins, oldest bin first; immutable, replaced whole."""

    seed: Seed | None = None
    bins: tuple[Bin, ...] = ()
    generation: int = 0  # bumped on every commit; readers key caches on it
    next_bin: int = 1  # bin numbers only grow, never reused
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.seed is None

    def bin(self, number: int) -> Bin:
        for b in self.bins:
            if b.number == number:
                return b
        raise KeyError(number)

    def with_bin_replaced(self, new: Bin) -> History:
        """The history after bin ``new.number`` changed form (sealed); the days it serves are the same."""
        return replace(self, bins=tuple(new if b.number == new.number else b for b in self.bins),
                       generation=self.generation + 1)

    def with_bin(self, new: Bin) -> History:
        """The history after committing ``new`` on top."""
        return replace(
            self,
            bins=(*self.bins, new),
            generation=self.generation + 1,
            next_bin=max(self.next_bin, new.number + 1),
        )

    def with_seed(self, seed: Seed, remaining: tuple[Bin, ...] | None = None) -> History:
        """The history after committing a (new) seed, keeping ``remaining`` bins."""
        return replace(
            self,
            seed=seed,
            bins=self.bins if remaining is None else remaining,
            generation=self.generation + 1,
        )

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "format": self.format,
            "generation": self.generation,
            "next_bin": self.next_bin,
            "seed": None if self.seed is None else _seed_dict(self.seed),
            "bins": [_entry_dict(b) for b in self.bins],
        }
        data.update(self.extra)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "history.json") -> History:
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT_VERSION:
                raise CorruptRootError(f"{where}: unsupported format {data.get('format')!r}")
            seed_data = data["seed"]
            seed = None
            if seed_data is not None:
                seed = Seed(**{**seed_data, "absorbed": tuple(seed_data.get("absorbed", ())),
                                  "sources": _states(seed_data.get("sources"))})
            bins = tuple(Bin(**{**b, "sources": _states(b.get("sources"))}) for b in data["bins"])
            _check_names(seed, bins)
            known = {"format", "generation", "next_bin", "seed", "bins"}
            return cls(
                seed=seed,
                bins=bins,
                generation=int(data["generation"]),
                next_bin=int(data["next_bin"]),
                extra={k: v for k, v in data.items() if k not in known},
            )
        except CorruptRootError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptRootError(
                f"{where} is damaged ({exc.__class__.__name__}: {exc}); refusing to touch the root") from None


def _check_names(seed: Seed | None, bins: tuple[Bin, ...]) -> None:
    """Refuse a history whose names would reach outside the root, or that no squashfu wrote.

    Every file name a root's layers have is derived from history: the seed's
    ``file`` and each bin's ``number``. A copy's history read from an rclone
    remote is only as trustworthy as the remote, so a name like
    ``../other/seed.sfs`` or a number like ``"1/../x"`` is damage, not a path.
    """
    if seed is not None:
        if not isinstance(seed.file, str) or not RootLayout.is_seed_name(seed.file):
            raise ValueError(f"the seed file {seed.file!r} is not a seed name (seed.sfs, seed.N.sfs)")
        if not all(_count(n) for n in seed.absorbed):
            raise ValueError(f"the seed's absorbed bins {list(seed.absorbed)!r} are not bin numbers")
        if not isinstance(seed.digest, str | None):
            raise ValueError(f"the seed's digest {seed.digest!r} is not text")
    for b in bins:
        if not _count(b.number):
            raise ValueError(f"bin number {b.number!r} is not a whole number")
        if not isinstance(b.format, str) or not isinstance(b.digest, str | None):
            raise ValueError(f"bin {b.number} has a format {b.format!r} or digest {b.digest!r} that is not text")


def _count(value: object) -> bool:
    """A bin number: an int (not a bool) from 0 up."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _seed_dict(seed: Seed) -> dict[str, Any]:
    data = _entry_dict(seed)
    data["absorbed"] = list(seed.absorbed)
    return data


def _entry_dict(entry: Seed | Bin) -> dict[str, Any]:
    """A seed's or bin's fields; ``sources`` only when there are several, so a one-source history reads as before."""
    data = asdict(entry)
    if entry.sources is None:
        del data["sources"]
    else:
        data["sources"] = [asdict(s) for s in entry.sources]
    return data


def load(path: Path) -> History:
    """Read the history; a missing file is an error (``init`` always writes one)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorruptRootError(f"{path} is missing; refusing to touch the root") from None
    return History.from_json(text, where=str(path))


def save(path: Path, history: History) -> None:
    """Replace the history atomically and durably."""
    atomic_write(path, history.to_json().encode())
