"""Layer catalogues: every entry a layer holds, written beside it at commit (docs/layout.md, "Catalogues").

A catalogue is a small SQLite file in ``catalogs/`` (``bin-N.db`` for bin N,
``seed-G.db`` for the seed of generation G) listing each entry of one layer
as a reader of that layer sees it: type and mode, owner, mtime in whole
seconds, size, device number, symlink target, visible xattrs, a regular
file's SHA-256 where it was measured, and whether a directory is opaque.
Whiteouts are listed as what they are (character devices 0:0).

The history queries (``diff``, ``deleted``, ``versions``) resolve the kept
states over catalogues instead of mounting every image (docs/commands.md,
"diff"). A catalogue is derived data: a layer without one (a root of older
code, a copy made by ``sync``) is read through its mount, as before. It is
written before the history that names its layer, so a crash leaves only
debris that recovery removes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from squashfu_fs import overlay
from squashfu_fs.store.history import Bin, Seed
from squashfu_fs.util.durable import fsync_dir

FORMAT = 1
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE entry (
    parent BLOB NOT NULL, name BLOB NOT NULL, mode INTEGER NOT NULL, uid INTEGER NOT NULL,
    gid INTEGER NOT NULL, mtime INTEGER NOT NULL, size INTEGER NOT NULL, rdev INTEGER NOT NULL,
    target BLOB NOT NULL, xattrs BLOB NOT NULL, digest BLOB, opaque INTEGER NOT NULL,
    PRIMARY KEY (parent, name)) WITHOUT ROWID;
"""
_COLUMNS = "mode, uid, gid, mtime, size, rdev, target, xattrs, digest, opaque"
_INSERT = "INSERT INTO entry VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"

Xattrs = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Record:
    """One entry of a layer as its readers see it (the top of the layer has the empty path)."""

    mode: int
    uid: int
    gid: int
    mtime: int  # whole seconds: SquashFS stores no finer times
    size: int  # regular files only; 0 for everything else
    rdev: int  # character and block devices only (0:0 is a whiteout)
    target: bytes  # a symlink's target
    xattrs: Xattrs  # visible xattrs, sorted, overlay's own hidden and escaped ones unescaped
    digest: bytes | None  # a regular file's SHA-256, when measured
    opaque: bool  # a directory that ends the merge below it

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_whiteout(self) -> bool:
        return stat.S_ISCHR(self.mode) and self.rdev == 0


def describe(path: bytes, st: os.stat_result, *, opaque: bool = False) -> Record:
    """The record of the entry at ``path`` (already ``lstat``-ed as ``st``), read without following it."""
    mode = st.st_mode
    is_reg, is_link = stat.S_ISREG(mode), stat.S_ISLNK(mode)
    return Record(mode, st.st_uid, st.st_gid, st.st_mtime_ns // 1_000_000_000, st.st_size if is_reg else 0,
                  st.st_rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0,
                  os.readlink(path) if is_link else b"",
                  () if is_link else tuple(sorted(overlay.read_xattrs(path).items())),
                  None,
                  opaque and stat.S_ISDIR(mode))


def content_digest(path: bytes) -> bytes:
    """The SHA-256 of a regular file's bytes, opened without following a symlink."""
    import hashlib  # only writers measure digests; a query need not load OpenSSL

    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return hashlib.file_digest(f, "sha256").digest()
    finally:
        os.close(fd)


def _pack(xattrs: Xattrs) -> bytes:
    out = bytearray()
    for name, value in xattrs:
        out += len(name).to_bytes(4, "big") + name + len(value).to_bytes(4, "big") + value
    return bytes(out)


def _unpack(raw: bytes) -> Xattrs:
    out = []
    at = 0
    while at < len(raw):
        n = int.from_bytes(raw[at:at + 4], "big")
        name = raw[at + 4:at + 4 + n]
        at += 4 + n
        v = int.from_bytes(raw[at:at + 4], "big")
        out.append((name, raw[at + 4:at + 4 + v]))
        at += 4 + v
    if at != len(raw):
        raise ValueError("xattrs cut short")
    return tuple(out)


def _row(row: tuple[Any, ...]) -> Record:
    """A record from its columns, refused (ValueError) when they are not of the types written.

    SQLite keeps no checksums: a damaged page can hold values of another
    type, which must end in the layers' mounts, not in a traceback.
    """
    mode, uid, gid, mtime, size, rdev, target, xattrs, digest, opaque = row
    if not (type(mode) is type(uid) is type(gid) is type(mtime) is type(size) is type(rdev) is type(opaque) is int
            and type(target) is bytes and type(xattrs) is bytes
            and (digest is None or (type(digest) is bytes and len(digest) == 32))):
        raise ValueError("a row of the wrong types")
    return Record(mode, uid, gid, mtime, size, rdev, target, _unpack(xattrs) if xattrs else (), digest, bool(opaque))


# A function that offers a record's digest from elsewhere (an older catalogue), given its path and record.
Carry = Callable[[bytes, Record], bytes | None]


def bin_label(number: int, time: str) -> str:
    """What a bin's catalogue says it describes: the bin's number and backup time, as history names them."""
    return f"bin {number} {time}"


def seed_label(file: str, time: str) -> str:
    """What a seed's catalogue says it describes: the image's name and the time of the newest state it holds."""
    return f"seed {file} {time}"


def label_of(entry: Bin | Seed) -> str:
    """The label a committed layer's catalogue must carry: one left by another history is not trusted."""
    if isinstance(entry, Seed):
        return seed_label(entry.file, entry.time)
    return bin_label(entry.number, entry.time)


def write(dest: Path, top: Path, *, label: str = "", opaque_dirs: tuple[bytes, ...] = (), digests: bool = False,
          carry: Carry | None = None) -> int:
    """Catalogue the layer mounted or kept at ``top`` into ``dest``, made durable; returns the entries listed.

    ``top`` is squashfu's own (a bin in the private root, a new image on a
    private mount point), so plain paths are safe here. ``digests``: measure
    each regular file (a bin, whose files were just written); ``carry``: take
    a file's digest from where it is already known (a resquash's merged
    catalogues) instead. ``label`` names the layer (:func:`label_of`), so a
    catalogue of another history under the same name is refused when read.
    """
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    opaque = frozenset(opaque_dirs)
    count = 0
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.executescript(_SCHEMA)
        db.execute("BEGIN")
        db.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
        db.execute("INSERT INTO meta VALUES ('layer', ?)", (label,))
        rows = []
        for rel, path, record in _walk(os.fsencode(top), opaque):
            if stat.S_ISREG(record.mode):
                known = _carried(carry, rel, record)
                record = _with_digest(record, known if known is not None or not digests else content_digest(path))
            parent, _, name = rel.rpartition(b"/")
            rows.append((parent, name, record.mode, record.uid, record.gid, record.mtime, record.size, record.rdev,
                         record.target, _pack(record.xattrs), record.digest, int(record.opaque)))
            count += 1
            if len(rows) >= 10_000:
                db.executemany(_INSERT, rows)
                rows.clear()
        db.executemany(_INSERT, rows)
        db.execute("INSERT INTO meta VALUES ('entries', ?)", (count,))  # lets a reader read a small layer whole
        db.execute("COMMIT")
    finally:
        db.close()
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    return count


def _carried(carry: Carry | None, rel: bytes, record: Record) -> bytes | None:
    """The digest ``carry`` offers; none when the catalogue it reads is damaged (derived data never fails a write)."""
    if carry is None:
        return None
    try:
        return carry(rel, record)
    except CatalogError:
        return None


def _with_digest(record: Record, digest: bytes | None) -> Record:
    return record if digest is None else dataclasses.replace(record, digest=digest)


def carry_from(newest_first: list[Catalog], *, same_mtime: bool = True) -> Carry:
    """File digests taken from the catalogues of the layers an image is made from (no file read twice).

    A file the image shows comes from the newest of those layers that holds
    its path (what hides it in an older one is newer still), so that layer's
    record is the one to trust, and only when it describes the same file.
    ``same_mtime=False`` for a sealed bin: its image may keep an mtime
    SquashFS cannot store otherwise than modulo 2**32.
    """
    def carry(rel: bytes, record: Record) -> bytes | None:
        for known in newest_first:
            old = known.get(rel)
            if old is not None:
                same = (old.mode, old.size, old.uid, old.gid) == (record.mode, record.size, record.uid, record.gid)
                return old.digest if same and (old.mtime == record.mtime or not same_mtime) else None
        return None
    return carry


def _walk(top: bytes, opaque: frozenset[bytes]) -> Iterator[tuple[bytes, bytes, Record]]:
    """Every entry below ``top`` (relative path, real path, record), the top itself first (b""),
    directories before what they hold."""
    yield b"", top, describe(top, os.lstat(top))
    pending = [b""]
    while pending:
        here = pending.pop()
        with os.scandir(top + b"/" + here if here else top) as it:
            for item in it:
                rel = here + b"/" + item.name if here else item.name
                st = item.stat(follow_symlinks=False)
                yield rel, item.path, describe(item.path, st, opaque=rel in opaque)
                if stat.S_ISDIR(st.st_mode):
                    pending.append(rel)


class Catalog:
    """One layer's catalogue, open read-only: its file stays readable even if a resquash deletes it meanwhile."""

    def __init__(self, path: Path, label: str | None = None) -> None:
        self.path = path
        self._db = sqlite3.connect(f"file:{quote(os.fsencode(path))}?mode=ro&immutable=1", uri=True,
                                   check_same_thread=False)
        try:  # one statement for both facts: a query opens one catalogue per layer
            meta = dict(self._db.execute("SELECT key, value FROM meta WHERE key IN ('format', 'layer', 'entries')"))
            version = meta["format"]
        except (sqlite3.Error, TypeError, ValueError, KeyError) as exc:
            self._db.close()
            raise CatalogError(f"{path.name} is not a catalogue this squashfu can read") from exc
        if version != FORMAT:
            self._db.close()
            raise CatalogError(f"{path.name} has catalogue format {version}, this squashfu reads {FORMAT}")
        if label is not None and meta.get("layer") != label:
            self._db.close()
            raise CatalogError(f"{path.name} describes {meta.get('layer', 'no layer')!r}, not {label!r}")
        entries = meta.get("entries")  # None in a catalogue written before it was recorded: read by name
        self.entries: int | None = entries if type(entries) is int else None

    def get(self, rel: bytes) -> Record | None:
        """The entry at ``rel`` (b"" the layer's top), or None when the layer does not hold it."""
        parent, _, name = rel.rpartition(b"/")
        try:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM entry WHERE parent = ? AND name = ?",
                                   (parent, name)).fetchone()
            if row is None and not rel:
                raise ValueError("the layer's top is not listed")
            return None if row is None else _row(row)
        except (sqlite3.Error, ValueError) as exc:
            raise CatalogError(f"{self.path.name} is damaged: {exc}") from exc

    def everything(self, limit: int) -> list[tuple[bytes, bytes, Record]] | None:
        """Every entry as (parent, name, record) in one statement, or None when the layer holds more than ``limit``
        (or its catalogue does not record how many it holds).

        A night's bin holds a few dozen entries: reading it whole costs less
        than one indexed query per name a state asks it.
        """
        if self.entries is None or self.entries > limit:
            return None
        try:
            out = [(row[0], row[1], _row(row[2:])) for row in self._db.execute(f"SELECT parent, name, {_COLUMNS} "
                                                                               f"FROM entry LIMIT {limit + 1}")]
            if len(out) != self.entries:
                raise ValueError(f"{len(out)} entries where it records {self.entries}")
            if not all(type(p) is bytes and (p == n == b"" or _name(n)) for p, n, _ in out):
                raise ValueError("a row of the wrong types")
            return out
        except (sqlite3.Error, ValueError) as exc:
            raise CatalogError(f"{self.path.name} is damaged: {exc}") from exc

    def children(self, rel: bytes) -> list[tuple[bytes, Record]]:
        """Each entry directly below the directory ``rel``, by name."""
        try:
            rows = self._db.execute(f"SELECT name, {_COLUMNS} FROM entry WHERE parent = ? AND name != x''", (rel,))
            return [(_name(row[0]), _row(row[1:])) for row in rows]
        except (sqlite3.Error, ValueError) as exc:
            raise CatalogError(f"{self.path.name} is damaged: {exc}") from exc

    def close(self) -> None:
        self._db.close()


def _name(name: object) -> bytes:
    if type(name) is not bytes or not name or b"/" in name:
        raise ValueError("a name that is no file name")
    return name


class CatalogError(Exception):
    """A catalogue that cannot be read: the layer is read through its mount instead."""


def open_all(paths: list[Path], labels: list[str]) -> list[Catalog] | None:
    """Every catalogue in ``paths`` open, each checked to carry its label, or None (nothing left open) when one
    is missing, unreadable or another layer's."""
    opened: list[Catalog] = []
    try:
        for path, label in zip(paths, labels, strict=True):
            if not path.is_file():
                raise CatalogError(f"{path.name} is missing")
            opened.append(Catalog(path, label))
    except (CatalogError, sqlite3.Error, OSError):
        for catalog in opened:
            catalog.close()
        return None
    return opened


@contextlib.contextmanager
def opened(paths: list[Path], labels: list[str]) -> Iterator[list[Catalog] | None]:
    """:func:`open_all` for a ``with`` block, closing what it opened."""
    catalogs = open_all(paths, labels)
    try:
        yield catalogs
    finally:
        for catalog in catalogs or ():
            catalog.close()
