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

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from squashfu_fs.engines import rclone
from squashfu_fs.engines import rsync as rsync_engine
from squashfu_fs.engines.run import run
from squashfu_fs.errors import CorruptRootError, ExternalCommandError, UsageError
from squashfu_fs.store import config as config_mod
from squashfu_fs.store import copies, layers
from squashfu_fs.store import registry as readers
from squashfu_fs.store.copies import Location
from squashfu_fs.store.history import History
from squashfu_fs.store.layout import CONFIG_NAME, HISTORY_NAME, RootLayout
from squashfu_fs.store.lock import writer_lock
from squashfu_fs.store.opening import opened_root
from squashfu_fs.util import clock, faults
from squashfu_fs.util.durable import fsync_dir
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
    local = False

    def scan(self) -> dict[str, FileInfo] | None:
        """The names at the top and in ``bins/`` (``bins/N``); None when the copy does not exist."""
        raise NotImplementedError

    def read(self, rel: str) -> bytes:
        raise NotImplementedError

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
    """A copy at a local path or at ``[USER@]HOST:PATH``: rsync does every step (over the root's ``rsh``)."""

    def __init__(self, where: Location, work: Path, rsh: str | None) -> None:
        self.where = where
        self.base = where.path
        self.work = work
        self.rsh = rsh
        self.local = where.kind == "local"

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
        if isinstance(source, _RcloneSource):
            self._put_from_rclone(source, rels)
            return
        assert isinstance(source, _LocalSource)
        listed = self.work / "files"
        listed.write_bytes(b"".join(os.fsencode(r) + b"\0" for r in rels))
        self._run(rsync_engine.sync_args(source.layout.root, self.base, listed, rsh=self.rsh), "copying to")
        if self.local:
            for parent in {Path(self.base, r).parent for r in rels}:
                fsync_dir(parent)

    def _put_from_rclone(self, source: _RcloneSource, rels: list[str]) -> None:
        assert self.local, "sync() refuses an rclone source for an ssh copy"
        for rel in rels:
            final = Path(self.base, rel)
            temp = Path(self.base, ".work", final.name)
            rclone.copy_to(source.ref(rel), str(temp))
            os.chmod(temp, 0o600)
            with open(temp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(temp, final)
            fsync_dir(final.parent)

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
        if self.local:
            fsync_dir(Path(self.base))

    def delete(self, rels: list[str]) -> None:
        by_dir: dict[str, list[str]] = {}
        for rel in rels:
            parent, _, name = rel.rpartition("/")
            by_dir.setdefault(parent, []).append(name)
        for parent, names in sorted(by_dir.items()):
            self._run(rsync_engine.delete_args(self._empty(), self._at(parent), names, rsh=self.rsh), "deleting at")
            if self.local:
                fsync_dir(Path(self._at(parent)))


def _rsync_complaint(stderr: bytes) -> str:
    """The line that says why rsync failed: ssh's or the far side's, not rsync's closing summary."""
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("rsync error:", "rsync: connection unexpectedly closed"))]
    return (useful or lines or ["no message"])[-1]


class _RcloneDest(_Dest):
    """A copy at ``rclone:REMOTE:PATH``: each file uploaded as ``NAME.tmp``, then renamed (moved) to NAME."""

    def __init__(self, where: Location, work: Path) -> None:
        self.where = where
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
        dest: _Dest = _RcloneDest(where, work) if where.kind == "rclone" else _RsyncDest(where, work, rsh)
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


def _check_dest(dest: _Dest, state: dict[str, FileInfo] | None) -> History | None:
    """The copy's current history, or None for an empty or new copy; a place that is no copy is refused."""
    if state is None:
        return None
    text = dest.where.text
    if HISTORY_NAME in state:
        history = History.from_json(dest.read(HISTORY_NAME).decode("utf-8", "replace"),
                                    where=f"{text}/{HISTORY_NAME}")
        if copies.mark_of(history) is None:
            raise UsageError(f"{text} is a backup root of its own, not a copy made by `squashfu sync`; "
                             "refusing to overwrite it")
        return history
    allowed = {CONFIG_NAME, ".lock", ".rollbacks", "bins", ".work", *(p.name for p in RootLayout(Path("/")).skeleton())}
    for name in sorted(state):
        if "/" in name:
            continue
        if name in allowed or RootLayout.is_seed_name(name.removesuffix(".tmp")) or name.endswith(".tmp"):
            continue
        raise UsageError(f"{text} is not empty and holds no copy made by `squashfu sync` (it has {name}); "
                         "give an empty or new directory")
    return None


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


def _sync(source: _Source, dest: _Dest, stack: ExitStack, *, writable: bool, verbose: bool) -> SyncResult:
    history = source.history
    state = dest.scan()
    old = _check_dest(dest, state)
    _refuse_foreign(old, history, dest.where.text)
    locked = False
    if dest.local and state is not None:
        # One sync (or writer) at a time in a local copy; the lock also refuses a copy another
        # user owns (store/privacy.py) before anything there is touched.
        stack.enter_context(writer_lock(Path(dest.where.path, ".lock"), "sync"))
        locked = True
    dest.prepare()
    if dest.local:
        if not locked:
            stack.enter_context(writer_lock(Path(dest.where.path, ".lock"), "sync"))
        state = dest.scan()  # as it is now that nobody else writes it
        old = _check_dest(dest, state)
        _refuse_foreign(old, history, dest.where.text)
    dest.clear_scratch()
    state = state or {}
    old_dirs = {b.number for b in old.bins if not layers.sealed(b)} if old is not None else set()
    copied: list[str] = []
    copied_bytes = unchanged = 0
    for label, names in layer_files(history):
        wanted = [(n, source.info(n)) for n in names]
        present = [(n, info) for n, info in wanted if info is not None]
        if not present:
            continue
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
    dest.put_small(HISTORY_NAME, written.to_json().encode())
    faults.checkpoint("sync-history-written")
    removed, kept = _remove_unnamed(dest, history)
    return SyncResult(dest.where.text, tuple(copied), copied_bytes, unchanged, tuple(removed), tuple(kept))


def _remove_unnamed(dest: _Dest, history: History) -> tuple[list[str], list[str]]:
    """After the commit: delete at the copy what its history no longer names (old layers, a killed sync's debris).

    Only squashfu's own kinds of name: anything in ``bins/``, and at the top
    an old seed image or a ``.tmp`` file. A local copy keeps what its own
    mount daemons still read, as a resquash does; the next sync deletes it.
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
    if dest.local and doomed:
        root = Path(os.path.realpath(dest.where.path))
        numbers = {n for n in map(_bin_number, doomed) if n is not None}
        readers.wait_for(root, history.generation, unused=numbers)
        bins, seeds = readers.in_use(root, history.generation, numbers)
        kept = [rel for rel in doomed if rel in seeds or _bin_number(rel) in bins]
        doomed = [rel for rel in doomed if rel not in kept]
    if doomed:
        dest.delete(doomed)
    return doomed, kept


def _bin_number(rel: str) -> int | None:
    """N for a piece of bin N (``bins/N``, ``bins/N.sfs``, ...), else None."""
    head = rel.removeprefix("bins/").split(".", 1)[0] if rel.startswith("bins/") else ""
    return int(head) if head.isdigit() else None
