"""The nightly backup cycle (DESIGN §1, §5): ``init``, the seed, and each new bin.

A backup stacks the committed layers read-only under a fresh upper directory
with overlayfs and rsyncs the source into the union, so only changes land in
the new bin. Every step ends before the next starts; the bin is written under
a temporary name and committed by a rename plus an atomic history update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from . import changes, clock, faults, layerstack, mounts, placement, privacy, recovery, rsync, squash, unionfix
from . import config as config_mod
from . import history as history_mod
from .config import Config
from .errors import InUseError, PartialBackupError, SquashfuError, UsageError, describe
from .excludes import Excludes
from .history import Bin, History, Seed, fsync_dir
from .layout import RootLayout
from .lock import writer_lock
from .system import require, require_root

log = logging.getLogger(__name__)
ESCAPED_PREFIX = "trusted.overlay.overlay."
OPAQUE_XATTR = "trusted.overlay.opaque"


# ---------------------------------------------------------------- init


def init_root(root: Path, config: Config) -> None:
    """Create a backup root for ``config.source``; refuse anything doubtful."""
    require_root("init")
    source = Path(config.source)
    if not source.is_dir():
        raise UsageError(f"source {source} is not a directory")
    placement.refuse_root_inside_source(root, source)
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
        history_mod.atomic_write(layout.config, config.to_toml().encode())
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
            os.setxattr(probe, b"trusted.overlay.opaque", b"y")
        except OSError as exc:
            raise UsageError(
                f"{directory} is on a filesystem that cannot hold overlay layers "
                f"(whiteout devices and trusted xattrs: {exc.strerror}); use ext4, xfs or btrfs"
            ) from None
    finally:
        if probe.exists():
            recovery.remove(probe)


# ---------------------------------------------------------------- backup


@dataclass(frozen=True)
class LayerScan:
    """What a freshly written layer holds, measured by walking it."""

    files: int  # non-directory entries: files, links, devices, whiteouts
    size: int  # allocated size on disk
    escaped_xattrs: bool  # holds a source's own trusted.overlay.* xattr
    whiteout_devices: tuple[bytes, ...]  # 0:0 devices that came from the source
    acl_paths: tuple[bytes, ...]  # entries carrying POSIX ACLs, which SquashFS cannot store
    opaque_dirs: tuple[bytes, ...] = ()  # directories overlay marked opaque (trusted.overlay.opaque=y)


def run_backup(root: Path, *, dry_run: bool = False, progress: bool = False,
               verbose: bool = False, full: bool = False) -> None:
    """One night's backup: the seed on the first run, a new bin afterwards, then retention."""
    require_root("backup")
    for tool in ("rsync", "mksquashfs", "mount", "umount"):
        require(tool)
    layout = RootLayout(root)
    config = config_mod.load(root)
    source = Path(config.source)
    if not source.is_dir():
        raise UsageError(f"source {source} is missing or not a directory; nothing was backed up")
    placement.refuse_root_inside_source(root, source)  # the root may have been moved since init
    own = own_mounts_below(source)
    if own:  # never back up the history into itself
        _say(verbose, "leaving out squashfu's own mounts: " + ", ".join(own))
        config = dataclasses.replace(config, excludes=(*config.excludes, *own))
    with writer_lock(layout.lock, "backup"):
        history = history_mod.load(layout.history)
        for line in recovery.recover(layout, history):
            _say(verbose, f"recovered: {line}")
        when = clock.now()
        newest = history.bins[-1].when if history.bins else history.seed.when if history.seed else None
        if newest is not None and when < newest:
            raise UsageError(f"the clock ({when.isoformat()}) is before the newest backup "
                             f"({newest.isoformat()}); refusing to rewrite history")
        if dry_run:
            _dry_run(layout, history, config)
            return
        log_file = layout.logs / f"backup-{when:%Y-%m-%dT%H%M%S}.log"
        first = history.seed is None
        if first:
            history, scan, result = _make_first_seed(layout, history, config, when, progress, verbose, log_file)
        else:
            history, scan, result = _add_bin(layout, history, config, when, progress, verbose, full, log_file)
        retention_failed = ""
        if len(history.bins) > config.max_bins:
            from .resquash import resquash

            try:
                resquash(layout, history, config, keep=config.min_bins, progress=progress, verbose=verbose)
            except InUseError as exc:  # the backup itself is committed: say why retention waits
                print(f"squashfu: backup committed; retention postponed: {exc}", file=sys.stderr)
            except (SquashfuError, OSError) as exc:  # committed all the same: exit 3, not 1 (docs/commands.md)
                retention_failed = f"retention failed: {describe(exc)}; the next backup retries it"
    if retention_failed:
        try:
            _report_problems(log_file, scan, result, verbose, scan.acl_paths if first else ())
        except PartialBackupError as exc:
            raise PartialBackupError(f"{exc}; {retention_failed}") from None
        raise PartialBackupError(f"backup committed; {retention_failed}")
    _report_problems(log_file, scan, result, verbose, scan.acl_paths if first else ())
    _tidy_logs(layout, log_file)


KEEP_LOGS = 100


def _tidy_logs(layout: RootLayout, log_file: Path) -> None:
    """An empty log says nothing; beyond the newest ``KEEP_LOGS``, old logs go."""
    if log_file.exists() and log_file.stat().st_size == 0:
        log_file.unlink()
    logs = sorted(layout.logs.glob("backup-*.log"))
    for old in logs[:-KEEP_LOGS]:
        old.unlink()


def _report_problems(log_file: Path, scan: LayerScan, result: rsync.RsyncResult, verbose: bool,
                     seed_acls: tuple[bytes, ...] = ()) -> None:
    """Exit status 3 when the committed backup misses something; the log names every entry."""
    notes = [(b"a 0:0 character device cannot be stored (it reads as a deletion): ", scan.whiteout_devices),
             (b"SquashFS cannot store POSIX ACLs: the seed has this entry without its ACL, the next backup "
              b"stores it: ", seed_acls)]
    with open(log_file, "ab") as log:
        for prefix, names in notes:
            log.writelines(b"squashfu: " + prefix + name + b"\n" for name in names)
    if result.status == rsync.VANISHED:  # files deleted while we copied: normal on a live system
        _say(verbose, f"some source files vanished during the backup; see {log_file}")
    missing = []
    if result.partial or scan.whiteout_devices:
        unreadable = sum(1 for line in result.errors if not line.startswith("rsync error:"))
        missing.append(f"{unreadable + len(scan.whiteout_devices)} source file(s) could not be backed up")
    if seed_acls:
        missing.append(f"the seed cannot store the POSIX ACLs of {len(seed_acls)} entries "
                       "(the next backup stores them)")
    if missing:
        raise PartialBackupError(f"backup committed, but {'; '.join(missing)}; see {log_file}")


def own_mounts_below(source: Path) -> list[str]:
    """Exclude patterns for the time-travel views and roll-backs mounted inside ``source``.

    With ``/`` as the source and the history mounted on ``/backups``, rsync
    would otherwise copy every day of the history into tonight's bin.
    """
    top = os.fsencode(os.path.realpath(source)).rstrip(b"/") + b"/"
    patterns = []
    for entry in mounts.mount_table():
        ours = entry.fstype == "fuse.squashfu" or (
            entry.fstype == "overlay" and "/.rollbacks/" in entry.super_options)
        if ours and entry.mount_point.startswith(top):
            rel = os.fsdecode(entry.mount_point[len(top):])
            patterns.append("/" + re.sub(r"([*?\[\\])", r"\\\1", rel) + "/")
    return patterns


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(f"squashfu: {message}", file=sys.stderr)


def _make_first_seed(layout: RootLayout, history: History, config: Config, when: datetime,
                     progress: bool, verbose: bool, log_file: Path) -> tuple[History, LayerScan, rsync.RsyncResult]:
    """rsync the source into a staging upper layer, then squash exactly that."""
    start = time.monotonic()
    _say(verbose, "first backup: copying the source into the staging layer")
    walked = changes.walk(os.fsencode(config.source), Excludes(config.excludes))
    try:
        result = stage_tree(layout, Path(config.source), config.excludes, progress=progress, log=log_file)
    except BaseException:
        recovery.remove(layout.staging)
        raise
    scan = scan_layer(layout.staging, source=Path(config.source))
    faults.checkpoint("after-rsync")
    generation = history.seed.generation + 1 if history.seed else 1
    name = RootLayout.seed_name(generation)
    _say(verbose, f"compressing the seed with {config.compression}")
    tmp = layout.temp_seed(generation)
    squash.make_image(layout.staging, tmp, config, progress=progress)
    squash.check_image(tmp, layout.staging, layout.rw)
    os.replace(tmp, layout.seed(name))
    fsync_dir(layout.root)
    faults.checkpoint("seed-written")
    seed = Seed(file=name, generation=generation, time=when.isoformat(timespec="seconds"),
                created=clock.now().isoformat(timespec="seconds"), absorbed=(),
                duration=round(time.monotonic() - start, 3), bytes=layout.seed(name).stat().st_size,
                files=squash.inode_count(layout.seed(name)) - 1, rsync_status=result.status,
                escaped_xattrs=scan.escaped_xattrs)
    history = history.with_seed(seed)
    history_mod.save(layout.history, history)
    faults.checkpoint("after-commit")
    if scan.acl_paths:  # not in the image: tomorrow's backup must see them as changed
        lost = set(scan.acl_paths)
        walked = dataclasses.replace(walked, entries={k: v for k, v in walked.entries.items() if k not in lost})
    _record_manifest(layout, history, config, walked, result)
    recovery.remove(layout.staging)
    return history, scan, result


def stage_tree(layout: RootLayout, source: Path, excludes: tuple[str, ...] | list[str], *,
               progress: bool, log: Path | None) -> rsync.RsyncResult:
    """rsync ``source`` into ``.staging`` through an overlay with an empty lower layer.

    Going through overlayfs makes the staging tree a proper upper layer: a
    source's own ``trusted.overlay.*`` xattrs are stored escaped, as in bins.
    """
    recovery.remove(layout.staging)
    layout.staging.mkdir()
    work = layout.work / "staging"
    work.mkdir(parents=True, exist_ok=True)
    with overlay_union(layout, [os.path.relpath(layout.empty, layout.root)],
                       upper=os.path.relpath(layout.staging, layout.root), work=work):
        result = rsync.run(rsync.backup_args(source, layout.rw, excludes), log=log,
                           progress=progress, label="backup")
        unionfix.restore_dir_times(os.fsencode(source), os.fsencode(layout.rw), os.fsencode(layout.staging))
        return result


@contextmanager
def overlay_union(layout: RootLayout, lowers: list[str], *, upper: str, work: Path) -> Iterator[Path]:
    """The writable union on ``rw/``, always unmounted and its workdir removed afterwards."""
    work.mkdir(parents=True, exist_ok=True)
    try:
        with mounts.overlay_mounted(layout.rw, lowers, upper=upper,
                                    work=os.path.relpath(work, layout.root), cwd=layout.root):
            yield layout.rw
    finally:
        recovery.remove(work)


@contextmanager
def seed_mounted(layout: RootLayout, seed: Seed) -> Iterator[Path]:
    """The seed image loop-mounted read-only on ``ro/`` for the length of a block."""
    with mounts.squashfs_mounted(layout.seed(seed.file), layout.ro):
        yield layout.ro


def committed_lowers(layout: RootLayout, history: History) -> list[str]:
    """Every committed bin, newest first, then the seed mount: the union's lowerdir."""
    return [layout.bin_rel(b.number) for b in reversed(history.bins)] + ["ro"]


def _add_bin(layout: RootLayout, history: History, config: Config, when: datetime,
             progress: bool, verbose: bool, full: bool,
             log_file: Path) -> tuple[History, LayerScan, rsync.RsyncResult]:
    """Write tonight's changes into a new bin and commit it."""
    assert history.seed is not None
    start = time.monotonic()
    number = history.next_bin
    partial = layout.partial_bin(number)
    partial.mkdir()
    source = Path(config.source)
    excludes = Excludes(config.excludes)
    walked = changes.walk(os.fsencode(source), excludes)
    plan = None if full or not excludes.understood else _change_plan(layout, history, config, walked)
    _say(verbose, f"backing up into bin {number}" + (
        f": {len(plan.changed)} changed, {len(plan.deleted)} deleted since the last backup" if plan else
        ": comparing the whole tree"))
    try:
        with seed_mounted(layout, history.seed), overlay_union(
                layout, committed_lowers(layout, history),
                upper=os.path.relpath(partial, layout.root), work=layout.work / str(number)):
            if plan is None:
                args = rsync.backup_args(source, layout.rw, config.excludes)
            else:
                args = _apply_deletions_and_list(layout, config, plan, number)
            result = rsync.run(args, log=log_file, progress=progress, label="backup")
            (layout.work / f"changed-{number}").unlink(missing_ok=True)
            result = _repair_acls(os.fsencode(source), os.fsencode(layout.rw), result, verbose)
            fix_union(os.fsencode(source), os.fsencode(layout.rw), os.fsencode(partial), verbose)
    except BaseException:
        recovery.remove(partial)  # nothing committed; leave no debris either
        raise
    faults.checkpoint("after-rsync")
    scan = scan_layer(partial, source=Path(config.source))
    record_opaque_dirs(layout, number, scan)  # debris until the bin it describes is committed
    syncfs(partial)
    os.rename(partial, layout.bin(number))
    fsync_dir(layout.bins)
    faults.checkpoint("bin-renamed")
    new = Bin(number=number, time=when.isoformat(timespec="seconds"),
              duration=round(time.monotonic() - start, 3), bytes=scan.size, files=scan.files,
              rsync_status=result.status, escaped_xattrs=scan.escaped_xattrs,
              compare="full" if plan is None else "manifest")
    history = history.with_bin(new)
    history_mod.save(layout.history, history)
    faults.checkpoint("after-commit")
    _record_manifest(layout, history, config, walked, result)
    _say(verbose, f"committed bin {number}: {scan.files} files, {scan.size} bytes")
    return history, scan, result


def _change_plan(layout: RootLayout, history: History, config: Config,
                 walked: changes.Scan) -> changes.Changes | None:
    """What changed since the committed state, or None when the manifest cannot be trusted."""
    if not walked.trusted:
        return None
    manifest = changes.load(layout.manifest)
    if manifest is None or not manifest.valid_for(history.next_bin - 1, config.source, config.excludes):
        return None
    return changes.compare(manifest.entries, walked.entries)


def _apply_deletions_and_list(layout: RootLayout, config: Config, plan: changes.Changes,
                              number: int) -> list[str]:
    """Delete what is gone through the union (whiteouts), and list the rest for rsync."""
    union = os.fsencode(layout.rw)
    for rel in plan.deleted:
        recovery.remove(Path(os.fsdecode(os.path.join(union, rel))))
    listing = layout.work / f"changed-{number}"
    listing.write_bytes(b"".join(rel + b"\0" for rel in plan.changed))
    return rsync.changed_args(Path(config.source), layout.rw, config.excludes, listing)


def _record_manifest(layout: RootLayout, history: History, config: Config, walked: changes.Scan,
                     result: rsync.RsyncResult) -> None:
    """Remember the source as committed, unless some of it could not be read.

    Vanished files (status 24) leave the manifest right: what vanished is
    recorded as deleted by the next walk.
    """
    if result.status not in (rsync.OK, rsync.VANISHED) or not walked.trusted:
        layout.manifest.unlink(missing_ok=True)  # tomorrow compares the whole tree again
        return
    changes.save(layout.manifest, changes.Manifest(history.next_bin - 1, config.source, config.excludes,
                                                   walked.entries))


def _repair_acls(source: bytes, union: bytes, result: rsync.RsyncResult, verbose: bool) -> rsync.RsyncResult:
    """Set the ACLs rsync could not (files whose version lives in the seed); clear the error if all took."""
    wanted = unionfix.acl_failures(result.errors)
    if not wanted:
        return result
    failed = unionfix.restore_acls(source, union, wanted)
    _say(verbose, f"stored {len(wanted) - len(failed)} ACL(s) the seed could not hold")
    others = [ln for ln in result.errors if not ln.startswith("rsync error:") and not unionfix.is_acl_failure(ln)]
    if failed or others or result.status != rsync.PARTIAL:
        return result
    return dataclasses.replace(result, status=rsync.OK, errors=())


def fix_union(source: bytes, union: bytes, upper: bytes, verbose: bool) -> None:
    """Undo what writing through overlayfs got wrong: split hard links, directory times."""
    relinked = unionfix.repair(source, union, upper)
    if relinked:
        _say(verbose, f"re-joined {relinked} hard link(s) split by copy-up")
    unionfix.restore_dir_times(source, union, upper)


def scan_layer(top: Path, *, source: Path) -> LayerScan:
    """Count a layer's entries and find what needs special handling later."""
    files = 0
    used = 0
    escaped = False
    devices: list[bytes] = []
    acls: list[bytes] = []
    opaque: list[bytes] = []
    top_b = os.fsencode(top)
    stack = [top_b]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                used += st.st_blocks * 512
                names: list[str] = []
                with contextlib.suppress(OSError):
                    names = os.listxattr(entry.path, follow_symlinks=False)
                escaped = escaped or any(x.startswith(ESCAPED_PREFIX) for x in names)
                if any(x in unionfix.ACL_XATTRS for x in names):
                    acls.append(os.path.relpath(entry.path, top_b))
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                    if OPAQUE_XATTR in names and layerstack.is_opaque(entry.path):
                        opaque.append(os.path.relpath(entry.path, top_b))
                    continue
                files += 1
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    relative = os.path.relpath(entry.path, top_b)
                    there = os.path.join(os.fsencode(source), relative)
                    try:
                        sst = os.lstat(there)
                        if stat.S_ISCHR(sst.st_mode) and sst.st_rdev == 0:
                            devices.append(relative)
                    except FileNotFoundError:
                        pass
    return LayerScan(files, used, escaped, tuple(devices), tuple(sorted(acls)), tuple(sorted(opaque)))


def record_opaque_dirs(layout: RootLayout, number: int, scan: LayerScan) -> None:
    """List bin N's opaque directories beside it, for readers that cannot see trusted xattrs."""
    if scan.opaque_dirs:
        layerstack.write_opaque_record(layout.opaque_record(number), scan.opaque_dirs)


def syncfs(path: Path) -> None:
    """Flush the filesystem holding ``path``: a bin is durable before history names it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _dry_run(layout: RootLayout, history: History, config: Config) -> None:
    """Say what tonight's backup would change, against a read-only union; commit nothing."""
    source = Path(config.source)
    if history.seed is None:
        print("squashfu: no backup yet: the first backup would copy everything below", file=sys.stderr)
        rsync.run(rsync.backup_args(source, layout.empty, config.excludes, dry_run=True), echo_items=True)
        return
    with seed_mounted(layout, history.seed):
        lowers = committed_lowers(layout, history)
        if len(lowers) < 2:  # a read-only overlay needs two lower layers
            lowers.append(os.path.relpath(layout.empty, layout.root))
        with mounts.overlay_mounted(layout.rw, lowers, cwd=layout.root):
            rsync.run(rsync.backup_args(source, layout.rw, config.excludes, dry_run=True), echo_items=True)

