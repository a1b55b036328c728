"""``squashfu -r ROOT sync DEST``: an offsite copy of the committed history (docs/operations.md, "Offsite copies").

The order is what keeps the copy valid at every moment (docs/crash-safety.md,
"(f) A sync"): first every layer file the copy lacks, each complete and
durable under a temporary name before it is renamed into place (sealed
images are immutable: one already there with the same size and mtime, rsync's
own quick check, is not copied again); then the config, then
``history.json`` (temp + rename), which is the copy's commit; only then are
the files that the copied history no longer names deleted. A sync killed
anywhere leaves the copy's old history naming only files that are whole
there, and the next sync removes what the killed one left.

A sync reads a local root as a reader: no writer lock (a backup may run
beside it), but a claim in the readers' registry
(:func:`squashfu_fs.store.registry.claimed`), so a resquash or a seal in
another process keeps every layer the sync is copying. A local copy is locked
with its own writer lock while it changes, and keeps the layers its own mount
daemons still read.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pwd
import re
import shutil
import stat
import tempfile
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from squashfu_fs.engines import rclone
from squashfu_fs.engines import rsync as rsync_engine
from squashfu_fs.engines.run import run
from squashfu_fs.errors import CorruptRootError, DamagedRootError, ExternalCommandError, LockedError, UsageError
from squashfu_fs.store import config as config_mod
from squashfu_fs.store import copies, layers, rollbacks
from squashfu_fs.store import registry as readers
from squashfu_fs.store.copies import Location
from squashfu_fs.store.history import History
from squashfu_fs.store.layout import CONFIG_NAME, HISTORY_NAME, RootLayout
from squashfu_fs.store.lock import take, writer_lock_at
from squashfu_fs.store.opening import opened_root
from squashfu_fs.util import beneath, clock, digest, faults
from squashfu_fs.util.say import say
from squashfu_fs.util.units import human

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$|^\.(partial|gone)-[0-9]+$|^\.[A-Za-z0-9][A-Za-z0-9._-]*\.tmp$")
CLAIM_TRIES = 5  # history moved on between reading it and claiming its layers: read it again


@dataclass(frozen=True)
class FileInfo:
    """A name at either end: its size, its mtime in seconds (None: unknown) and whether it is a directory."""

    size: int
    mtime: float | None
    is_dir: bool


@dataclass(frozen=True)
class SyncResult:
    """What one sync did, for its summary line."""

    dest: str
    copied: tuple[str, ...]  # layer files copied (relative names)
    copied_bytes: int
    unchanged: int  # layer files already at the copy
    removed: tuple[str, ...]  # names deleted at the copy after the commit
    kept: tuple[str, ...]  # names a mount of a local copy still reads, left for a later sync
    commands: tuple[str, ...] = ()  # --writable: the settings of the config brought along that run commands as root

    def summary(self) -> str:
        parts = [f"copied {len(self.copied)} layer file(s) ({human(self.copied_bytes)})",
                 f"{self.unchanged} already there"]
        if self.removed:
            parts.append(f"removed {len(self.removed)} the history no longer names")
        if self.kept:
            parts.append(f"left {len(self.kept)} a mount of the copy still reads")
        return f"synced to {self.dest}: " + ", ".join(parts)


# --------------------------------------------------------------------------- the two ends


def layer_files(history: History) -> list[tuple[str, list[str]]]:
    """Each layer history names, oldest first: its label and its relative names (the layer itself first)."""
    out: list[tuple[str, list[str]]] = []
    if history.seed is not None:
        out.append(("seed", [history.seed.file]))
    scratch = RootLayout(Path("/"))
    for b in history.bins:
        out.append((f"bin {b.number}", [f"bins/{p.name}" for p in layers.bin_files(scratch, b)]))
    return out


def committed_names(history: History) -> set[str]:
    """Every relative name a root with ``history`` consists of, besides config and history."""
    return {name for _, names in layer_files(history) for name in names}


class _Source:
    """Where a sync reads from: a history, the config's bytes, and each layer file."""

    text: str
    history: History
    config: bytes

    def info(self, rel: str) -> FileInfo | None:
        raise NotImplementedError

    def ref(self, rel: str) -> Path | str:
        """What a transport copies ``rel`` from: a local path, or an rclone path."""
        raise NotImplementedError


class _LocalSource(_Source):
    """A local root, read as a reader (its layers claimed, see :func:`_claimed_source`)."""

    def __init__(self, layout: RootLayout, history: History) -> None:
        self.layout = layout
        self.text = str(layout.root)
        self.history = history
        self.config = layout.config.read_bytes()

    def info(self, rel: str) -> FileInfo | None:
        try:
            st = os.lstat(self.layout.root / rel)
        except FileNotFoundError:
            return None
        return FileInfo(st.st_size, st.st_mtime, stat.S_ISDIR(st.st_mode))

    def ref(self, rel: str) -> Path:
        return self.layout.root / rel


class _RcloneSource(_Source):
    """A copy at ``rclone:REMOTE:PATH``, brought back (``squashfu -r rclone:… sync NEWROOT``)."""

    def __init__(self, where: Location) -> None:
        self.text = where.text
        self.target = where.path
        top = rclone.listing(self.target)
        if top is None or HISTORY_NAME not in top:
            raise UsageError(f"{where.text} holds no squashfu copy (no {HISTORY_NAME})")
        bins = rclone.listing(rclone.join(self.target, "bins")) if "bins" in top else {}
        self.entries = {**{n: _from_rclone(e) for n, e in top.items()},
                        **{f"bins/{n}": _from_rclone(e) for n, e in (bins or {}).items()}}
        self.history = History.from_json(rclone.read(self.target, HISTORY_NAME).decode("utf-8", "replace"),
                                         where=f"{where.text}/{HISTORY_NAME}")
        self.config = rclone.read(self.target, CONFIG_NAME) if CONFIG_NAME in top else b""

    def info(self, rel: str) -> FileInfo | None:
        return self.entries.get(rel)

    def ref(self, rel: str) -> str:
        return rclone.join(self.target, rel)


def _from_rclone(entry: rclone.Entry) -> FileInfo:
    """rclone's RFC 3339 time (nanoseconds, ``Z``) as seconds; None when rclone gave none."""
    match = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", entry.mtime)
    mtime = None
    if match:
        head, fraction, zone = match.groups()
        text = head + (fraction[:7] if fraction else "") + ("+00:00" if zone == "Z" else zone)
        try:
            mtime = datetime.fromisoformat(text).timestamp()
        except ValueError:
            mtime = None
    return FileInfo(entry.size, mtime, entry.is_dir)


class _Dest:
    """Where a sync writes: list, read, put (complete, then renamed), delete."""

    where: Location
    stack: ExitStack

    def scan(self) -> dict[str, FileInfo] | None:
        """The names at the top and in ``bins/`` (``bins/N``); None when the copy does not exist."""
        raise NotImplementedError

    def read(self, rel: str) -> bytes:
        raise NotImplementedError

    def lock(self) -> None:
        """One sync at a time to this copy, for the whole sync (see :func:`_dest_lock`)."""
        self.stack.enter_context(_dest_lock(self.where))

    def history_now(self) -> bytes | None:
        """The copy's ``history.json`` as it is now (None: it has none)."""
        state = self.scan()
        return self.read(HISTORY_NAME) if state is not None and HISTORY_NAME in state else None

    def prepare(self) -> None:
        """Make the copy's directory and skeleton (0700)."""

    def clear_scratch(self) -> None:
        """Remove what a killed sync left in the copy's scratch directory."""

    def put(self, source: _Source, rels: list[str]) -> None:
        """Copy ``rels`` of ``source``, each whole before it has its name here."""
        raise NotImplementedError

    def put_small(self, name: str, data: bytes) -> None:
        """Replace file ``name`` atomically with ``data``."""
        raise NotImplementedError

    def delete(self, rels: list[str]) -> None:
        raise NotImplementedError


class _RsyncDest(_Dest):
    """A copy at ``[USER@]HOST:PATH``: rsync does every step (over the root's ``rsh``)."""

    def __init__(self, where: Location, work: Path, rsh: str | None, stack: ExitStack) -> None:
        self.where = where
        self.stack = stack
        self.base = where.path
        self.work = work
        self.rsh = rsh

    def _at(self, rel: str = "") -> str:
        return self.base.rstrip("/") + "/" + rel if rel else self.base

    def _run(self, args: list[str], what: str) -> None:
        proc = run(args, check=False)
        if proc.returncode != 0:
            raise ExternalCommandError(f"rsync ({what} {self.where.text}) failed (exit {proc.returncode}): "
                                       f"{_rsync_complaint(proc.stderr)}", proc.returncode)

    def _list(self, rel: str) -> dict[str, FileInfo] | None:
        proc = run(rsync_engine.list_args(self._at(rel), rsh=self.rsh), what="rsync --list-only", check=False)
        if proc.returncode != 0:
            if b"No such file or directory" in proc.stderr:
                return None
            raise ExternalCommandError(f"rsync cannot list {self.where.text}/{rel} (exit {proc.returncode}): "
                                       f"{_rsync_complaint(proc.stderr)}", proc.returncode)
        out = {}
        for line in proc.stdout.decode("utf-8", "surrogateescape").splitlines():
            fields = line.split(None, 4)
            if len(fields) < 5 or fields[4] == ".":
                continue
            try:
                mtime: float | None = datetime.strptime(f"{fields[2]} {fields[3]}", "%Y/%m/%d %H:%M:%S").timestamp()
            except ValueError:
                mtime = None
            out[fields[4]] = FileInfo(int(fields[1].replace(",", "").replace(".", "")), mtime,
                                      fields[0].startswith("d"))
        return out

    def scan(self) -> dict[str, FileInfo] | None:
        top = self._list("")
        if top is None:
            return None
        bins = self._list("bins") if top.get("bins", FileInfo(0, None, False)).is_dir else {}
        return {**top, **{f"bins/{n}": i for n, i in (bins or {}).items()}}

    def read(self, rel: str) -> bytes:
        target = self.work / "fetched"
        target.unlink(missing_ok=True)
        self._run(rsync_engine.fetch_args(self._at(rel), target, rsh=self.rsh), "fetching from")
        return target.read_bytes()

    def prepare(self) -> None:
        skeleton = self.work / "skeleton"
        skeleton.mkdir(mode=0o700)
        for path in RootLayout(skeleton).skeleton():
            path.mkdir(mode=0o700)
        self._run(rsync_engine.put_args([f"{skeleton}/"], self.base, rsh=self.rsh, mkpath=True), "preparing")

    def clear_scratch(self) -> None:
        self._run(rsync_engine.delete_args(self._empty(), self._at(".work"), ["*"], rsh=self.rsh), "clearing")

    def _empty(self) -> Path:
        empty = self.work / "empty"
        empty.mkdir(mode=0o700, exist_ok=True)
        return empty

    def put(self, source: _Source, rels: list[str]) -> None:
        assert isinstance(source, _LocalSource), "sync() refuses an rclone source for an ssh copy"
        listed = self.work / "files"
        listed.write_bytes(b"".join(os.fsencode(r) + b"\0" for r in rels))
        self._run(rsync_engine.sync_args(source.layout.root, self.base, listed, rsh=self.rsh), "copying to")

    def put_small(self, name: str, data: bytes) -> None:
        out = self.work / "out"
        out.mkdir(mode=0o700, exist_ok=True)
        path = out / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        self._run(rsync_engine.put_args([str(path)], self.base, rsh=self.rsh), "writing")

    def delete(self, rels: list[str]) -> None:
        by_dir: dict[str, list[str]] = {}
        for rel in rels:
            parent, _, name = rel.rpartition("/")
            by_dir.setdefault(parent, []).append(name)
        for parent, names in sorted(by_dir.items()):
            self._run(rsync_engine.delete_args(self._empty(), self._at(parent), names, rsh=self.rsh), "deleting at")


class _LocalDest(_Dest):
    """A copy at a local path, opened once and then changed only relative to that directory.

    DEST is opened without following a symlink (its parents as the
    administrator spelled them) and refused if another user could rename or
    replace it or a directory above it (docs/security.md, "Offsite copies").
    Every write, rename and delete is then relative to the open directory,
    and rsync gets it as ``/proc/self/fd/N``, so a DEST swapped for a link
    meanwhile steers nothing: the sync finishes in the directory it opened.
    """

    def __init__(self, where: Location, stack: ExitStack) -> None:
        self.where = where
        self.stack = stack
        self.fd: int | None = None  # DEST, once it exists
        path = os.fsencode(where.path)
        parent, name = os.path.split(path.rstrip(b"/") or b"/")
        if not name:
            raise UsageError(f"{where.text} cannot be a copy: give a directory below /")
        self.top, self.missing = self._open_parents(parent)
        stack.callback(os.close, self.top)
        if not self.missing:
            try:
                self._adopt(beneath.open_beneath(self.top, name))
                return
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(where.path):
                    raise UsageError(f"{where.text} is a symlink; give the directory it points to "
                                     f"({os.path.realpath(where.path)}) as DEST") from None
                raise UsageError(f"{where.text}: {exc.strerror}") from None
        self.missing.append(name)

    def _open_parents(self, parent: bytes) -> tuple[int, list[bytes]]:
        """The nearest existing directory at or above ``parent`` (its lineage checked), and the names below it.

        Every directory the spelled path passes through is checked, so that a
        symlink in it cannot be re-pointed by another user either.
        """
        parts = [p for p in parent.split(b"/") if p]
        fd = -1
        for depth in range(len(parts) + 1):
            prefix = b"/" + b"/".join(parts[:depth])
            try:
                nxt = os.open(prefix, beneath.PATH_FLAGS)
            except FileNotFoundError:
                return fd, list(parts[depth - 1:])  # "/" is always there: depth is at least 1
            except OSError as exc:
                if fd >= 0:
                    os.close(fd)
                raise UsageError(f"{self.where.text}: {os.fsdecode(prefix)}: {exc.strerror}") from None
            if fd >= 0:
                os.close(fd)
            fd = nxt
            self._refuse_changeable(fd, os.fsdecode(prefix))
        return fd, []

    def _refuse_changeable(self, fd: int, shown: str) -> None:
        """Refuse DEST when another user could swap ``shown`` (open on ``fd``) or a directory above it."""
        chain = beneath.lineage(fd)
        first = chain[0]
        st = beneath.changeable_by_others([first, *chain]) if first.st_uid in (0, os.geteuid()) else first
        if st is None:
            return
        who = f"owned by {_user(st.st_uid)}" if st.st_uid not in (0, os.geteuid()) else \
            f"writable by {'everyone' if st.st_mode & stat.S_IWOTH else 'group ' + str(st.st_gid)}"
        where = shown if st is first else f"a directory above {shown}"
        raise UsageError(f"{self.where.text}: {where} is {who}, who could swap DEST for a link to another "
                         "root; give a DEST whose directories only root can change")

    def _adopt(self, fd: int) -> None:
        self.stack.callback(os.close, fd)
        self.fd = fd
        self._refuse_changeable(fd, self.where.text)

    def _dest(self) -> int:
        assert self.fd is not None, "DEST is made by prepare()"
        return self.fd

    def lock(self) -> None:
        self.stack.enter_context(writer_lock_at(self._dest(), Path(self.where.path, ".lock"), "sync"))

    def readers_root(self) -> Path | None:
        """DEST's path now, as the readers' registry and roll-back records name a root (only read through it).

        None when no path names the open directory any more (removed, or
        renamed while it was read): then nobody's mounts can be looked up.
        """
        path = os.readlink(beneath.fd_path(self._dest()))
        try:
            same = beneath.same_file(os.stat(path), os.fstat(self._dest()))
        except OSError:
            same = False
        return Path(path) if same else None

    def scan(self) -> dict[str, FileInfo] | None:
        if self.fd is None:
            return None
        out = self._list(b"")
        if out.get("bins", FileInfo(0, None, False)).is_dir:
            out.update({f"bins/{n}": i for n, i in self._list(b"bins").items()})
        return out

    def _list(self, rel: bytes) -> dict[str, FileInfo]:
        """The entries of one directory of DEST; anything but a file or directory never looks fresh (size -1)."""
        out = {}
        with beneath.opened(self._dest(), rel) as fd:
            for entry in os.scandir(fd):
                st = entry.stat(follow_symlinks=False)
                size = st.st_size if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) else -1
                out[entry.name] = FileInfo(size, st.st_mtime, stat.S_ISDIR(st.st_mode))
        return out

    def read(self, rel: str) -> bytes:
        with beneath.opened(self._dest(), os.fsencode(rel), os.O_RDONLY) as fd, os.fdopen(os.dup(fd), "rb") as f:
            return f.read()

    def prepare(self) -> None:
        if self.fd is None:
            try:
                current = beneath.make_below(self.top, self.missing)
            except OSError as exc:
                raise UsageError(f"{self.where.text}: {exc.strerror}") from None
            self._adopt(current)
        for path in RootLayout(Path("")).skeleton():
            with suppress(FileExistsError):
                os.mkdir(path.name, 0o700, dir_fd=self._dest())

    def clear_scratch(self) -> None:
        with beneath.opened(self._dest(), b".work") as work:
            for name in os.listdir(work):
                beneath.remove_beneath(work, os.fsencode(name))

    def put(self, source: _Source, rels: list[str]) -> None:
        if isinstance(source, _RcloneSource):
            for rel in rels:
                self._put_from_rclone(source, rel)
            return
        assert isinstance(source, _LocalSource)
        with tempfile.NamedTemporaryFile(prefix="squashfu-sync-files-") as listed:
            listed.write(b"".join(os.fsencode(r) + b"\0" for r in rels))
            listed.flush()
            at = beneath.fd_path(self._dest())
            proc = run(rsync_engine.sync_args(source.layout.root, at, Path(listed.name)), check=False,
                       pass_fds=(self._dest(),))
        if proc.returncode != 0:
            raise ExternalCommandError(f"rsync (copying to {self.where.text}) failed (exit {proc.returncode}): "
                                       f"{_rsync_complaint(proc.stderr).replace(at, self.where.text)}",
                                       proc.returncode)
        for parent in sorted({rel.rpartition("/")[0] for rel in rels}):
            self._fsync(parent)

    def _fsync(self, rel: str) -> None:
        with beneath.opened(self._dest(), os.fsencode(rel)) as fd:
            os.fsync(fd)

    def _put_from_rclone(self, source: _RcloneSource, rel: str) -> None:
        """One file downloaded into DEST's ``.work/``, an image checked against its digest in history, then renamed."""
        parent, _, name = rel.rpartition("/")
        info = source.info(rel)
        with beneath.opened(self._dest(), b".work") as work, \
                beneath.opened(self._dest(), os.fsencode(parent)) as target:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=work)
            try:
                rclone.cat_into(source.ref(rel), fd)
                expected = _image_digests(source.history).get(rel)
                actual = digest.of_fd(fd) if expected is not None else None
                if actual != expected:
                    os.unlink(name, dir_fd=work)
                    raise DamagedRootError(f"{source.text}/{rel} has digest {str(actual)[:23]}…, its history "
                                           f"records {str(expected)[:23]}…; not put in place (run "
                                           f"`squashfu -r {source.text} verify`)")
                if info is not None and info.mtime is not None:
                    os.utime(fd, (info.mtime, info.mtime))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(name, name, src_dir_fd=work, dst_dir_fd=target)
            os.fsync(target)

    def put_small(self, name: str, data: bytes) -> None:
        with beneath.opened(self._dest(), b".work") as work:
            temp = f".{name}.tmp"
            with suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=work)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=work)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, name, src_dir_fd=work, dst_dir_fd=self._dest())
        os.fsync(self._dest())

    def delete(self, rels: list[str]) -> None:
        for rel in rels:
            beneath.remove_beneath(self._dest(), os.fsencode(rel))
        for parent in sorted({rel.rpartition("/")[0] for rel in rels}):
            self._fsync(parent)


def _user(uid: int) -> str:
    """A user as ``name (uid N)``, or ``uid N`` for one without a name."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _rsync_complaint(stderr: bytes) -> str:
    """The line that says why rsync failed: ssh's or the far side's, not rsync's closing summary."""
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("rsync error:", "rsync: connection unexpectedly closed"))]
    return (useful or lines or ["no message"])[-1]


class _RcloneDest(_Dest):
    """A copy at ``rclone:REMOTE:PATH``: each file uploaded as ``NAME.tmp``, then renamed (moved) to NAME."""

    def __init__(self, where: Location, work: Path, stack: ExitStack) -> None:
        self.where = where
        self.stack = stack
        self.target = where.path
        self.work = work

    def scan(self) -> dict[str, FileInfo] | None:
        top = rclone.listing(self.target)
        if top is None:
            return None
        bins = rclone.listing(rclone.join(self.target, "bins")) if "bins" in top else {}
        return {**{n: _from_rclone(e) for n, e in top.items()},
                **{f"bins/{n}": _from_rclone(e) for n, e in (bins or {}).items()}}

    def read(self, rel: str) -> bytes:
        return rclone.read(self.target, rel)

    def put(self, source: _Source, rels: list[str]) -> None:
        for rel in rels:
            self._upload(source.ref(rel), rel)

    def _upload(self, ref: Path | str, rel: str) -> None:
        temp = rclone.join(self.target, rel + ".tmp")
        rclone.copy_to(ref, temp)
        rclone.move_to(temp, rclone.join(self.target, rel))

    def put_small(self, name: str, data: bytes) -> None:
        out = self.work / "out"
        out.mkdir(mode=0o700, exist_ok=True)
        path = out / name
        path.write_bytes(data)
        self._upload(path, name)

    def delete(self, rels: list[str]) -> None:
        for rel in rels:
            self._delete(rel)

    def _delete(self, rel: str) -> None:
        path = rclone.join(self.target, rel)
        if "/" not in rel or not rel.removeprefix("bins/").isdigit():
            rclone.delete_file(path)
        else:
            rclone.purge(path)


# --------------------------------------------------------------------------- the command


def sync(root: str, dest_text: str, *, writable: bool = False, verbose: bool = False) -> SyncResult:
    """Copy the committed history of ``root`` (a local root or an rclone copy) to ``dest_text``."""
    where = copies.parse(dest_text)
    if writable and where.kind != "local":
        raise UsageError("--writable brings a copy back to a local path; "
                         f"{where.text} is reached over {where.kind}")
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="squashfu-sync-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        if copies.is_rclone(root):
            if where.kind == "ssh":
                raise UsageError(f"a copy at {root} syncs only to a local path or to rclone:REMOTE:PATH "
                                 f"(rsync cannot read from rclone); not to {where.text}")
            if where.kind == "rclone" and where.path.rstrip("/") == root.removeprefix(copies.RCLONE_PREFIX).rstrip("/"):
                raise UsageError(f"{where.text} is the root itself; a copy belongs elsewhere")
            source: _Source = _RcloneSource(copies.parse(root))
            rsh = None
        else:
            local = stack.enter_context(_claimed_source(Path(root)))
            _refuse_same(local.layout.root, where)
            source = local
            rsh = config_mod.load(local.layout.root).rsh if where.kind == "ssh" else None
        layers.check_known(source.history.bins)
        if where.kind == "rclone":
            _refuse_directory_bins(source.history, where)
        dest: _Dest = (_RcloneDest(where, work, stack) if where.kind == "rclone"
                       else _RsyncDest(where, work, rsh, stack) if where.kind == "ssh" else _LocalDest(where, stack))
        return _sync(source, dest, stack, writable=writable, verbose=verbose)
    raise AssertionError("unreachable")  # pragma: no cover - ExitStack does not swallow


@contextmanager
def _claimed_source(root: Path) -> Iterator[_LocalSource]:
    """The local root opened as a reader whose layers are claimed in the registry (see the module docstring).

    The claim starts as "not loaded yet", so every writer keeps everything;
    then history is read and its layers published. A writer that committed
    in between may already have deleted some: history is read again then.
    """
    with opened_root(root, "sync", write=False) as opened:
        layout = opened.layout
    with readers.claimed(layout.root, "sync") as publish:
        for _ in range(CLAIM_TRIES):
            with opened_root(layout.root, "sync", write=False) as opened:
                history = opened.history
            seeds = [history.seed.file] if history.seed is not None else []
            publish(history.generation, [b.number for b in history.bins], seeds)
            source = _LocalSource(layout, history)
            if all(source.info(names[0]) is not None for _, names in layer_files(history)):
                break
        else:
            raise CorruptRootError(f"{layout.root}: a layer history names is missing (run `squashfu verify`)")
        faults.checkpoint("sync-claimed")
        yield source


def _refuse_same(root: Path, where: Location) -> None:
    """A copy is never the root itself, inside it, or around it."""
    if where.kind != "local":
        return
    dest = Path(os.path.realpath(where.path))
    if dest == root or root in dest.parents or dest in root.parents:
        how = "the root itself" if dest == root else "inside" if root in dest.parents else "around"
        raise UsageError(f"{where.text} is {how} the root {root}; a copy belongs elsewhere, ideally on another disk")


def _refuse_directory_bins(history: History, where: Location) -> None:
    """An rclone copy holds images only: a directory bin's whiteouts, xattrs and owners have no object-store form."""
    for b in history.bins:
        if not layers.sealed(b):
            why = "holds POSIX ACLs, which SquashFS cannot store" if b.acls else "is not sealed yet (or seal = false)"
            raise UsageError(f"bin {b.number} is kept as a directory ({why}); an rclone copy holds only images, "
                             f"which keep whiteouts, xattrs and owners: sync {where.text} after it is sealed, or "
                             "sync to a local path or [USER@]HOST:PATH")


def _check_dest(dest: _Dest, state: dict[str, FileInfo] | None) -> tuple[History | None, bytes | None]:
    """The copy's history and its bytes ((None, None): an empty or new copy); a place that is no copy is refused."""
    if state is None:
        return None, None
    text = dest.where.text
    if HISTORY_NAME in state:
        raw = dest.read(HISTORY_NAME)
        history = History.from_json(raw.decode("utf-8", "replace"), where=f"{text}/{HISTORY_NAME}")
        if copies.mark_of(history) is None:
            raise UsageError(f"{text} is a backup root of its own, not a copy made by `squashfu sync`; "
                             "refusing to overwrite it")
        return history, raw
    allowed = {CONFIG_NAME, ".lock", ".rollbacks", "bins", ".work", *(p.name for p in RootLayout(Path("/")).skeleton())}
    for name in sorted(state):
        if "/" in name:
            continue
        if name in allowed or RootLayout.is_seed_name(name.removesuffix(".tmp")) or name.endswith(".tmp"):
            continue
        raise UsageError(f"{text} is not empty and holds no copy made by `squashfu sync` (it has {name}); "
                         "give an empty or new directory")
    return None, None


def _refuse_foreign(old: History | None, new: History, text: str) -> None:
    """A copy of another history (another root synced to the same place by mistake) is not overwritten.

    The copy's history must be an earlier state of this one: no bin number
    this root has not reached yet, and every layer both name has the same
    digest.
    """
    if old is None:
        return
    why = None
    if old.next_bin > new.next_bin:
        why = f"it holds bins up to {old.next_bin - 1}, this root only up to {new.next_bin - 1}"
    mine = {b.number: b.digest for b in new.bins}
    for b in old.bins:
        if why is None and b.digest is not None and mine.get(b.number) not in (None, b.digest):
            why = f"its bin {b.number} differs from this root's"
    if why is None and old.seed is not None and new.seed is not None and old.seed.file == new.seed.file \
            and None not in (old.seed.digest, new.seed.digest) and old.seed.digest != new.seed.digest:
        why = f"its {old.seed.file} differs from this root's"
    if why is not None:
        raise UsageError(f"{text} is a copy of another history ({why}); refusing to overwrite it: "
                         "give each root a DEST of its own")


def _fresh(info: FileInfo | None, want: FileInfo) -> bool:
    """A file at the copy that needs no copy: same size and mtime (to the second), as rsync's quick check."""
    if info is None or info.is_dir or info.size != want.size or info.mtime is None or want.mtime is None:
        return False
    return abs(info.mtime - want.mtime) < 1.5


def _refuse_missing(source: _Source) -> None:
    """Every layer the source's history names must be there: a copy naming absent files is no copy."""
    for label, names in layer_files(source.history):
        if source.info(names[0]) is None:
            raise DamagedRootError(f"{source.text}: history names {names[0]} ({label}) but it is missing; "
                                   f"nothing written (run `squashfu -r {source.text} verify`)")


def _image_digests(history: History) -> dict[str, str]:
    """The digest history records for each image, by relative name."""
    out = {}
    if history.seed is not None and history.seed.digest is not None:
        out[history.seed.file] = history.seed.digest
    for b in history.bins:
        if layers.sealed(b) and b.digest is not None:
            out[f"bins/{b.number}.sfs"] = b.digest
    return out


def _sync(source: _Source, dest: _Dest, stack: ExitStack, *, writable: bool, verbose: bool) -> SyncResult:
    history = source.history
    _refuse_missing(source)
    if not isinstance(dest, _LocalDest):
        dest.lock()  # a local DEST is locked in itself, below
    state = dest.scan()
    old, old_raw = _check_dest(dest, state)
    _refuse_foreign(old, history, dest.where.text)
    locked = False
    if isinstance(dest, _LocalDest) and state is not None:
        # One sync (or writer) at a time in a local copy; the lock also refuses a copy another
        # user owns (store/privacy.py) before anything there is touched.
        dest.lock()
        locked = True
    dest.prepare()
    if isinstance(dest, _LocalDest):
        if not locked:
            dest.lock()
        state = dest.scan()  # as it is now that nobody else writes it
        old, old_raw = _check_dest(dest, state)
        _refuse_foreign(old, history, dest.where.text)
    dest.clear_scratch()
    faults.checkpoint("sync-prepared")
    state = state or {}
    old_dirs = {b.number for b in old.bins if not layers.sealed(b)} if old is not None else set()
    copied: list[str] = []
    copied_bytes = unchanged = 0
    for label, names in layer_files(history):
        wanted = [(n, source.info(n)) for n in names]
        present = [(n, info) for n, info in wanted if info is not None]  # the layer, and the records it has
        todo = []
        for name, info in present:
            assert info is not None
            if info.is_dir:
                number = int(name.removeprefix("bins/"))
                done = number in old_dirs and state.get(name, FileInfo(0, None, False)).is_dir
            else:
                done = _fresh(state.get(name), info)
            if done:
                unchanged += 1
            else:
                todo.append(name)
                copied_bytes += 0 if info.is_dir else info.size
        if not todo:
            continue
        say(verbose, f"copying {label}: {', '.join(todo)}")
        dest.put(source, todo)
        copied += todo
        faults.checkpoint("sync-layer-copied")
    if source.config:
        dest.put_small(CONFIG_NAME, source.config)
    when = clock.now().isoformat(timespec="seconds")
    written = copies.unmarked(history) if writable else copies.marked(history, source.text, when)
    if dest.history_now() != old_raw:
        # Another sync (from another host, or DEST spelled another way) committed meanwhile and may
        # have deleted layers this history names: writing it would damage the copy.
        raise LockedError(f"{dest.where.text} changed while this sync ran (another sync wrote its "
                          f"{HISTORY_NAME}); nothing more written: run sync again")
    dest.put_small(HISTORY_NAME, written.to_json().encode())
    faults.checkpoint("sync-history-written")
    removed, kept = _remove_unnamed(dest, history)
    commands = _commands(source.config) if writable else ()
    return SyncResult(dest.where.text, tuple(copied), copied_bytes, unchanged, tuple(removed), tuple(kept), commands)


def _commands(config: bytes) -> tuple[str, ...]:
    """The settings of a config that run commands as root: its hooks, and an ``rsh`` other than plain ssh.

    A root brought back with ``--writable`` runs them at its next backup
    (docs/security.md, "What is left to the administrator"): the copy's
    config is code from wherever the copy was kept.
    """
    try:
        data = tomllib.loads(config.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ("an unreadable squashfu.toml",)
    found = [key for key in config_mod.HOOKS if data.get(key)]
    if data.get("rsh", config_mod.DEFAULT_RSH) != config_mod.DEFAULT_RSH:
        found.append("rsh")
    return tuple(found)


def _remove_unnamed(dest: _Dest, history: History) -> tuple[list[str], list[str]]:
    """After the commit: delete at the copy what its history no longer names (old layers, a killed sync's debris).

    Only squashfu's own kinds of name: anything in ``bins/``, and at the top
    an old seed image or a ``.tmp`` file. A local copy keeps what its own
    mount daemons and live roll-backs still read, as recovery does
    (store/recovery.py); the next sync deletes it.
    """
    state = dest.scan() or {}
    keep = committed_names(history)
    current_seed = history.seed.file if history.seed is not None else None
    doomed = []
    for rel in sorted(state):
        parent, _, name = rel.rpartition("/")
        if rel in keep or not SAFE_NAME.match(name):
            continue
        old_seed = RootLayout.is_seed_name(name) and name != current_seed
        if parent == "bins" or (parent == "" and (name.endswith(".tmp") or old_seed)):
            doomed.append(rel)
    kept: list[str] = []
    if isinstance(dest, _LocalDest) and doomed:
        root = dest.readers_root()
        if root is None:  # its mounts cannot be looked up: delete nothing, the next sync will
            return [], doomed
        numbers = {n for n in map(_bin_number, doomed) if n is not None}
        readers.wait_for(root, history.generation, unused=numbers)
        bins, seeds = readers.in_use(root, history.generation, numbers)
        bins |= numbers & rollbacks.bins_read(RootLayout(root))  # a kernel roll-back of the copy stacks them
        kept = [rel for rel in doomed if rel in seeds or _bin_number(rel) in bins]
        doomed = [rel for rel in doomed if rel not in kept]
    if doomed:
        dest.delete(doomed)
    return doomed, kept


@contextmanager
def _dest_lock(where: Location) -> Iterator[None]:
    """An ``flock`` on this machine keyed by the copy's name, for an ssh or rclone copy, which has no lock of its own.

    Two syncs to one remote copy would otherwise interleave: the older one
    would commit a history naming layers the newer one already deleted. A
    copy reached under two spellings (or from two hosts) is caught later,
    when its history is read again just before the commit.
    """
    home = readers.state_root() / "sync-dests"
    readers.make_state_dir(home)
    key = hashlib.sha256(f"{where.kind}\0{where.path.rstrip('/') or where.path}".encode()).hexdigest()[:32]
    fd = os.open(home / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        holder = take(fd, "sync")
        if holder is not None:
            raise LockedError(f"{where.text} is busy: {holder or 'another sync'} syncs to it")
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _bin_number(rel: str) -> int | None:
    """N for a piece of bin N (``bins/N``, ``bins/N.sfs``, ...), else None."""
    head = rel.removeprefix("bins/").split(".", 1)[0] if rel.startswith("bins/") else ""
    return int(head) if head.isdigit() else None
