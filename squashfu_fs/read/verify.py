"""``squashfu verify``: vouch for the history a root has committed (docs/commands.md, "verify").

Three questions, for every layer history names (the seed, each bin):

1. History and files agree: the layer exists in the form history says, and
   nothing in the root or in ``bins/`` is unnamed except the debris and
   scratch an interrupted or running command leaves (docs/layout.md).
2. Digests match: every image (seed, sealed bins) is hashed and compared with
   its ``digest`` in history; a directory bin's digest list is compared with
   its ``digest``, and the list with the bin's files (names; with ``--data``,
   each file's SHA-256).
3. Images are readable SquashFS: superblock and every directory and inode
   (engines/unsquashfs.py); with ``--data``, every data block too.

It only reads: no lock, no mount, nothing written, so a nightly backup or a
resquash may run beside it. Every layer's files are opened before any is
hashed (an image unlinked meanwhile stays readable through its descriptor),
and a layer that vanishes because a command beside it changed history (a
resquash absorbed it, a backup sealed it) is reported as skipped after
history is read again, never as damage.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from squashfu_fs.engines.unsquashfs import Check
from squashfu_fs.errors import ConfigError, MetricsError, SquashfuError, exit_status
from squashfu_fs.store import copies, layers, usage
from squashfu_fs.store import digests as digest_lists
from squashfu_fs.store.history import Bin, History, Seed
from squashfu_fs.store.layout import CONFIG_NAME, HISTORY_NAME, RootLayout
from squashfu_fs.store.opening import OpenedRoot, opened_root
from squashfu_fs.store.views import ViewTable
from squashfu_fs.util import beneath, clock, digest, metrics
from squashfu_fs.util.say import CONTROL, say
from squashfu_fs.util.units import human

FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
SHOWN_NAMES = 20  # a layer's missing or unlisted files named one by one, then counted


@dataclass
class LayerReport:
    """What verify found for one layer: ``seed`` or ``bin N``, named as ``squashfu list`` names them."""

    layer: str
    file: str  # relative to the root: "seed.sfs", "bins/12.sfs", "bins/12"
    kind: str  # "seed", "sealed" or "directory"
    views: list[str]  # every view name whose stack holds this layer
    bytes: int = 0  # what was hashed
    digest_ok: bool | None = None  # None: no digest recorded, or not checked
    readable: bool | None = None  # None: not checked (missing, skipped)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: str | None = None  # why this layer was not checked: history changed beside verify

    @property
    def damaged(self) -> bool:
        return bool(self.problems) and self.skipped is None

    def as_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "file": self.file, "kind": self.kind, "bytes": self.bytes,
                "digest_ok": self.digest_ok, "readable": self.readable, "problems": self.problems,
                "warnings": self.warnings, "skipped": self.skipped, "views": self.views}


@dataclass
class Report:
    """Everything verify found in one root."""

    root: Path
    data: bool
    layers: list[LayerReport]
    root_problems: list[str]
    debris: list[str]  # entries an interrupted or running command left, which the next writer removes
    seconds: float

    @property
    def damaged(self) -> list[LayerReport]:
        return [r for r in self.layers if r.damaged]

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.root_problems

    @property
    def bytes_hashed(self) -> int:
        return sum(r.bytes for r in self.layers)

    def as_json(self) -> str:
        return json.dumps({
            "command": "verify", "status": "ok" if self.ok else "damaged", "exit_status": 0 if self.ok else 1,
            "root": str(self.root), "data": self.data,
            "layers": [r.as_json() for r in self.layers], "root_problems": self.root_problems,
            "debris": self.debris, "bytes_hashed": self.bytes_hashed, "seconds": round(self.seconds, 3),
        }, indent=2) + "\n"

    def as_text(self) -> str:
        """The per-layer lines (damage, warnings, skips, root problems), then the summary line."""
        lines: list[str] = []
        for r in self.layers:
            where = f"{r.layer} ({r.file})"
            if r.skipped is not None:
                lines.append(f"skipped: {where}: {r.skipped}")
            elif r.problems:
                lines.append(f"damaged: {where}, in views: {', '.join(r.views) or 'none'}")
                lines += [f"  {p}" for p in r.problems]
            lines += [f"warning: {where}: {w}" for w in r.warnings]
        lines += [f"root: {p}" for p in self.root_problems]
        lines.append(self.summary())
        return "".join(_shown(line) + "\n" for line in lines)

    def summary(self) -> str:
        checked = [r for r in self.layers if r.skipped is None]
        bins = sum(1 for r in checked if r.kind != "seed")
        has_seed = any(r.kind == "seed" for r in checked)
        what = " and ".join(filter(None, ["seed" if has_seed else "", f"{bins} bin(s)" if bins else ""]))
        text = (f"verified {len(checked)} layer(s){f' ({what})' if what else ''}"
                f"{' reading every file' if self.data else ''}: {human(self.bytes_hashed)} hashed "
                f"in {self.seconds:.1f} s")
        counts = [f"{len(self.damaged)} damaged" if self.damaged else "",
                  f"{len(self.root_problems)} problem(s) in the root" if self.root_problems else "",
                  f"{len(self.layers) - len(checked)} skipped" if len(checked) < len(self.layers) else "",
                  f"{sum(len(r.warnings) for r in self.layers)} warning(s)" if any(r.warnings for r in self.layers)
                  else ""]
        return text + "; " + (", ".join(c for c in counts if c) or "no damage")

    def failure(self) -> str:
        """The one line a damaged root ends with on stderr."""
        parts = []
        if self.damaged:
            parts.append(f"{', '.join(r.layer for r in self.damaged)} ({len(self.damaged)} of {len(self.layers)} "
                         "layers)")
        if self.root_problems:
            count = len(self.root_problems)
            parts.append(f"{count} stray entr{'y' if count == 1 else 'ies'} in the root")
        return "verify found damage in " + "; ".join(parts)


def _shown(text: str) -> str:
    """A line as printed: names are bytes, so control characters are escaped and it stays one line."""
    return text.translate(CONTROL)


def _name(path: bytes) -> str:
    return os.fsdecode(path)


class _Bar:
    """A progress bar on stderr over the bytes to hash, redrawn at most five times a second."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = max(total, 1)
        self.done = 0
        self.label = ""
        self._drawn = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._drawn >= 0.2:
            self._drawn = now
            percent = min(100, self.done * 100 // self.total)
            sys.stderr.write(f"\rverify: {percent:3d}%  {human(self.done)} of {human(self.total)}  "
                             f"{_shown(self.label)}   ")
            sys.stderr.flush()

    def start(self, label: str) -> None:
        self.label = label
        self._drawn = 0.0
        self.advance(0)

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 72 + "\r")
            sys.stderr.flush()


@dataclass
class _Layer:
    """One layer being verified: its history entry, its report and the descriptors it was opened on."""

    entry: Seed | Bin
    report: LayerReport
    fd: int | None = None  # the image, or a directory bin's directory
    list_fd: int | None = None  # a directory bin's digest list


class _Verifier:
    """One run of verify over an opened root; see the module docstring."""

    def __init__(self, layout: RootLayout, history: History, *, data: bool) -> None:
        self.layout = layout
        self.history = history
        self.data = data
        self.rootfd = -1
        self.binsfd: int | None = None

    # -- history read again when something it named has gone

    def latest(self) -> History:
        """The history as it is now: read again each time a layer is found gone or changed."""
        with opened_root(self.layout.root, "verify", write=False) as opened:
            return opened.history

    def moved_on(self, entry: Seed | Bin) -> str | None:
        """Why ``entry`` no longer has to exist: history changed beside verify; None when it still must."""
        now = self.latest()
        if isinstance(entry, Seed):
            if now.seed is None or now.seed.file != entry.file:
                return "a resquash replaced the seed while verify ran"
            return None
        try:
            current = now.bin(entry.number)
        except KeyError:
            return "a resquash absorbed this bin while verify ran"
        if current.format != entry.format:
            return f"this bin became {current.format} while verify ran"
        return None

    def gone(self, layer: _Layer, problem: str) -> None:
        """A file of ``layer`` is missing: damage, unless history moved on without it."""
        reason = self.moved_on(layer.entry)
        if reason is not None:
            layer.report.skipped = reason
        else:
            layer.report.problems.append(problem)

    # -- the layers history names

    def plan(self) -> list[_Layer]:
        table = ViewTable.from_history(self.history)
        names = table.names()

        def views_with(number: int | None) -> list[str]:
            if number is None:
                return names
            holding = {n for n, spec in table.dated.items() if number in spec.bins}
            return [n for n in names if table.links.get(n, n) in holding]

        out: list[_Layer] = []
        seed = self.history.seed
        if seed is not None:
            out.append(_Layer(seed, LayerReport("seed", seed.file, "seed", views_with(None))))
        for b in self.history.bins:
            if layers.sealed(b):
                report = LayerReport(f"bin {b.number}", f"bins/{b.number}.sfs", "sealed", views_with(b.number))
            else:
                report = LayerReport(f"bin {b.number}", f"bins/{b.number}", "directory", views_with(b.number))
            out.append(_Layer(b, report))
        return out

    def open_all(self, todo: list[_Layer], stack: ExitStack) -> None:
        """Open every layer's files before anything is hashed; a missing one is damage or a skip."""
        for layer in todo:
            entry, report = layer.entry, layer.report
            if isinstance(entry, Seed) or layers.sealed(entry):
                parent = self.rootfd if isinstance(entry, Seed) else self.binsfd
                layer.fd = self._open(layer, parent, os.path.basename(report.file), FILE_FLAGS, stat.S_ISREG,
                                      "a regular file", stack)
                continue
            layer.fd = self._open(layer, self.binsfd, str(entry.number), DIR_FLAGS, stat.S_ISDIR,
                                  "a directory", stack)
            if layer.fd is not None and entry.digest is not None:
                layer.list_fd = self._open(layer, self.binsfd, f"{entry.number}.sha256", FILE_FLAGS,
                                           stat.S_ISREG, "a regular file", stack)

    def _open(self, layer: _Layer, parent: int | None, name: str, flags: int, kind: Callable[[int], bool],
              kind_name: str, stack: ExitStack) -> int | None:
        """``name`` opened below ``parent`` without following a symlink, closed with ``stack``; None if not."""
        shown = name if parent == self.rootfd else f"bins/{name}"
        if parent is None:
            self.gone(layer, f"{shown} is missing (so is bins/)")
            return None
        try:
            fd = os.open(name, flags, dir_fd=parent)
        except FileNotFoundError:
            self.gone(layer, f"{shown} is missing")
            return None
        except PermissionError:
            raise SquashfuError(f"{shown}: Permission denied; verify reads every layer: run it as root") from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                layer.report.problems.append(f"{shown} is not {kind_name} (a symlink or another kind of file)")
            else:
                layer.report.problems.append(f"{shown} cannot be opened: {exc.strerror}")
            return None
        stack.callback(os.close, fd)
        if not kind(os.fstat(fd).st_mode):
            layer.report.problems.append(f"{shown} is not {kind_name}")
            return None
        return fd

    # -- the root: nothing unnamed but debris

    def scan_root(self) -> tuple[list[str], list[str]]:
        """Entries of the root and of ``bins/`` that history does not name: (problems, debris)."""
        problems: list[str] = []
        debris: list[str] = []
        layout, history = self.layout, self.history
        seed_file = history.seed.file if history.seed else None
        skeleton = {p.name for p in layout.skeleton()} | {layout.rollbacks.name, layout.staging.name}
        with os.scandir(self.rootfd) as it:
            for entry in it:
                name = entry.name
                if entry.is_symlink():
                    problems.append(f"{name} is a symlink, which squashfu never makes")
                elif name == seed_file or name in (CONFIG_NAME, HISTORY_NAME):
                    if not entry.is_file(follow_symlinks=False):
                        problems.append(f"{name} is not a regular file")
                elif name in skeleton:
                    if not entry.is_dir(follow_symlinks=False):
                        problems.append(f"{name} is not a directory")
                elif name in (layout.lock.name, layout.manifest.name):
                    pass
                elif name.endswith(".tmp") or RootLayout.is_seed_name(name):
                    debris.append(name)  # a file being written, or a seed a resquash replaced
                else:
                    problems.append(f"{name} is not part of the root's history")
        if self.binsfd is None:
            return problems, debris
        committed = {p.name for b in history.bins for p in layers.bin_files(layout, b)}
        with os.scandir(self.binsfd) as it:
            for entry in it:
                name = entry.name
                if name in committed:
                    continue
                shown = f"bins/{name}"
                if entry.is_symlink():
                    problems.append(f"{shown} is a symlink, which squashfu never makes")
                elif _bin_debris(layout, name):
                    debris.append(shown)
                else:
                    problems.append(f"{shown} is not part of the root's history")
        return sorted(problems), sorted(debris)

    # -- checking each kind of layer

    def check(self, layer: _Layer, bar: _Bar) -> None:
        if layer.report.skipped is not None or layer.fd is None:
            return
        bar.start(layer.report.layer)
        if layer.report.kind == "directory":
            self.check_directory(layer, bar)
        else:
            self.check_image(layer, bar)

    def check_image(self, layer: _Layer, bar: _Bar) -> None:
        """Digest, size, superblock and metadata (and with ``--data`` every data block) of an image.

        The unsquashfs runs read the image while it is hashed: they are other
        processes, and the page cache serves both.
        """
        assert layer.fd is not None
        report, entry = layer.report, layer.entry
        size = os.fstat(layer.fd).st_size
        recorded_size = entry.bytes if isinstance(entry, Seed) else entry.image_bytes
        if recorded_size and recorded_size != size:
            report.problems.append(f"the image is {size} bytes, history says {recorded_size}")
        failed = [Check(layer.fd, "superblock", report.file).result()]
        running = []
        try:
            if failed[0] is None:
                running.append(Check(layer.fd, "metadata", report.file))
                if self.data:
                    running.append(Check(layer.fd, "data", report.file))
            os.posix_fadvise(layer.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # more read-ahead, as sha256sum asks
            try:
                actual: str | None = digest.of_fd(layer.fd, bar.advance)
            except OSError as exc:  # a bad sector under the image
                actual = None
                report.problems.append(f"the image cannot be read ({exc.strerror})")
            report.bytes = size
            failed += [c.result() for c in running]
        finally:
            for c in running:
                c.stop()
        problems = [f for f in failed if f is not None]
        report.problems += problems
        report.readable = not problems and actual is not None
        if actual is not None:
            self.compare(report, actual, entry.digest, "the image")

    def check_directory(self, layer: _Layer, bar: _Bar) -> None:
        """A bin kept as a directory: its digest list against history, its files against the list."""
        assert layer.fd is not None
        report, entry = layer.report, layer.entry
        assert isinstance(entry, Bin)
        listed: dict[bytes, str] | None = None
        if layer.list_fd is not None:
            data = _read_all(layer.list_fd)
            report.bytes += len(data)
            self.compare(report, digest.of_bytes(data), entry.digest, f"the digest list bins/{entry.number}.sha256")
            try:
                listed = digest_lists.decode(data)
            except ValueError as exc:
                report.problems.append(f"the digest list bins/{entry.number}.sha256 is malformed: {exc}")
        elif entry.digest is None:
            report.warnings.append("no digest recorded (written before digests): only read, nothing compared")
        errors: list[tuple[bytes, OSError]] = []
        files = {rel: st for rel, st in beneath.walk(layer.fd, errors=errors) if stat.S_ISREG(st.st_mode)}
        unreadable = [f"{_name(rel) or '.'}: cannot be read ({exc.strerror})" for rel, exc in errors]
        if listed is not None:
            report.problems += _named("is in the digest list but missing from the bin",
                                      sorted(listed.keys() - files.keys()))
            report.problems += _named("is in the bin but not in its digest list",
                                      sorted(files.keys() - listed.keys()))
        if self.data:
            for rel in sorted(files):
                try:
                    fd = beneath.open_beneath(layer.fd, rel, FILE_FLAGS)
                except OSError as exc:
                    unreadable.append(f"{_name(rel)}: cannot be opened ({exc.strerror})")
                    continue
                try:
                    actual = digest.of_fd(fd, bar.advance)
                except OSError as exc:
                    unreadable.append(f"{_name(rel)}: cannot be read ({exc.strerror})")
                    continue
                finally:
                    os.close(fd)
                report.bytes += files[rel].st_size
                want = listed.get(rel) if listed is not None else None
                if want is not None and actual != f"{digest.ALGORITHM}:{want}":
                    report.problems.append(f"{_name(rel)}: its SHA-256 differs from the digest list")
        report.problems += unreadable
        report.readable = not unreadable
        if report.problems:
            reason = self.moved_on(entry)  # a seal or a resquash beside us removes the directory as we walk it
            if reason is not None:
                report.skipped = reason

    @staticmethod
    def compare(report: LayerReport, actual: str, recorded: str | None, what: str) -> None:
        """``actual`` against the digest history records; a layer written before digests has none."""
        if recorded is None:
            report.warnings.append("no digest recorded (written before digests)")
            return
        report.digest_ok = actual == recorded
        if not report.digest_ok:
            report.problems.append(f"{what} has digest {_short(actual)}, history records {_short(recorded)}")


def _short(value: str) -> str:
    algorithm, _, hexdigest = value.partition(":")
    return f"{algorithm}:{hexdigest[:16]}…" if hexdigest else value


def _named(what: str, paths: list[bytes]) -> list[str]:
    out = [f"{_name(p)}: {what}" for p in paths[:SHOWN_NAMES]]
    if len(paths) > SHOWN_NAMES:
        out.append(f"… and {len(paths) - SHOWN_NAMES} more that {what.replace('is ', 'are ', 1)}")
    return out


def _bin_debris(layout: RootLayout, name: str) -> bool:
    """Whether a name in ``bins/`` is a piece of some bin (committed elsewhere, not yet, or no longer).

    The pieces of bin N in any form (``N``, ``N.sfs``, ``N.opaque``,
    ``N.sha256``), bin N being written (``.partial-N``), being removed
    (``.gone-N``), or any file being written (``*.tmp``). Which of them is
    committed depends on history; the rest is what an interrupted or
    running command left, and the next writer's recovery removes it.
    """
    if name.endswith(".tmp"):
        return True
    for prefix in (".partial-", ".gone-"):
        if name.startswith(prefix) and name.removeprefix(prefix).isdigit():
            return True
    number = name.split(".", 1)[0]
    return number.isdigit() and name in layers.bin_names(layout, int(number))


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, digest.CHUNK, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def verify(root: Path, *, data: bool = False, progress: bool = False) -> Report:
    """Verify the committed history of ``root``; damage is in the report, never raised.

    With ``metrics_file`` in the config, the file is rewritten afterwards, for a
    failure too (docs/operations.md, "Metrics").
    """
    with opened_root(root, "verify", write=False) as opened:
        started = time.monotonic()
        try:
            report = verify_history(opened.layout, opened.history, data=data, progress=progress)
        except BaseException as exc:
            _record_metrics(opened, exit_status(exc), time.monotonic() - started)
            raise
        _record_metrics(opened, 0 if report.ok else 1, report.seconds)
        return report


def _record_metrics(opened: OpenedRoot, status: int, seconds: float) -> None:
    """Rewrite ``metrics_file`` for this verify; failing to is a warning line, never the status.

    verify checks the history without the config, so a config it cannot read
    costs the metrics (one line says so), not the verification.
    """
    if copies.mark_of(opened.history) is not None:
        return  # a copy's config is its original's: its metrics_file is the original's (docs/commands.md, "sync")
    try:
        config = opened.config
    except ConfigError as exc:
        say(True, f"metrics_file not written: {exc}")
        return
    if config.metrics_file is None:
        return
    layout, history = opened.layout, opened.history
    ended = clock.now().timestamp()
    samples: dict[str, float] = {"squashfu_verify_last_run_timestamp_seconds": ended,
                                 "squashfu_verify_last_status": status,
                                 "squashfu_verify_last_duration_seconds": round(seconds, 3),
                                 **usage.samples(layout, history)}
    if status == 0:
        samples["squashfu_verify_last_success_timestamp_seconds"] = ended
    try:
        metrics.update(config.metrics_file, str(layout.root), samples)
    except MetricsError as exc:
        say(True, str(exc))


def verify_history(layout: RootLayout, history: History, *, data: bool = False, progress: bool = False) -> Report:
    """Verify the layers ``history`` names, as read when verify started.

    If history has moved on since (a command beside verify committed), a
    layer it no longer names in that form is skipped, not damaged.
    """
    started = time.monotonic()
    layers.check_known(history.bins)
    v = _Verifier(layout, history, data=data)
    todo = v.plan()
    with ExitStack() as stack:
        v.rootfd = os.open(layout.root, DIR_FLAGS)
        stack.callback(os.close, v.rootfd)
        try:
            v.binsfd = os.open("bins", DIR_FLAGS, dir_fd=v.rootfd)
        except OSError:  # missing, or not a directory: the layers in it are missing, scan_root says why
            v.binsfd = None
        else:
            stack.callback(os.close, v.binsfd)
        v.open_all(todo, stack)
        root_problems, debris = v.scan_root()
        total = sum(os.fstat(t.fd).st_size for t in todo if t.fd is not None and t.report.kind != "directory")
        if data:
            total += sum(t.entry.bytes for t in todo if t.fd is not None and t.report.kind == "directory")
        bar = _Bar(progress, total)
        try:
            for layer in todo:
                v.check(layer, bar)
        finally:
            bar.close()
    return Report(root=layout.root, data=data, layers=[t.report for t in todo], root_problems=root_problems,
                  debris=debris, seconds=time.monotonic() - started)
