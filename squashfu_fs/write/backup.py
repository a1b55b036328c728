"""The nightly backup cycle (DESIGN §1, §5): ``init``, the seed, and each new bin.

A backup stacks the committed layers read-only under a fresh upper directory
with overlayfs and rsyncs the source into the union, so only changes land in
the new bin. Every step ends before the next starts; the bin is written under
a temporary name and committed by a rename plus an atomic history update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
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

from squashfu_fs import overlay as layerstack
from squashfu_fs.engines import mksquashfs as squash
from squashfu_fs.engines import mounts, rsync
from squashfu_fs.engines.run import require, require_root
from squashfu_fs.errors import InUseError, PartialBackupError, SourceChangedError, SquashfuError, UsageError, describe
from squashfu_fs.store import history as history_mod
from squashfu_fs.store import placement, privacy, recovery
from squashfu_fs.store.config import Config
from squashfu_fs.store.history import Bin, History, Seed
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.store.opening import opened_root
from squashfu_fs.util import beneath, clock, durable, faults
from squashfu_fs.util.durable import fsync_dir, syncfs
from squashfu_fs.write import changes, unionfix
from squashfu_fs.write.excludes import Excludes

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
    deleted: int = 0  # source entries this backup deletes (contents of a deleted directory included)
    entries_before: int = 0  # source entries at the backup before; 0 when not known


def run_backup(root: Path, *, dry_run: bool = False, progress: bool = False,
               verbose: bool = False, full: bool = False, allow_source_change: bool = False) -> None:
    """One night's backup: the seed on the first run, a new bin afterwards, then retention."""
    require_root("backup")
    for tool in ("rsync", "mksquashfs", "mount", "umount"):
        require(tool)

    def refuse_source(config: Config) -> None:
        """Before the lock: a source that is not there, or holds the root, is refused untouched."""
        source = Path(config.source)
        if not source.is_dir():
            raise UsageError(f"source {source} is missing or not a directory; nothing was backed up")
        placement.refuse_root_inside_source(root, source)  # the root may have been moved since init

    with opened_root(root, "backup", write=True, check=refuse_source) as opened:
        layout, config, history = opened.layout, opened.config, opened.history
        own = own_mounts_below(Path(config.source))
        if own:  # never back up the history into itself
            _say(verbose, "leaving out squashfu's own mounts: " + ", ".join(own))
            config = dataclasses.replace(config, excludes=(*config.excludes, *own))
        for line in opened.recovered:
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
            history, scan, result = _add_bin(layout, history, config, when, progress, verbose, full, log_file,
                                             allow_source_change)
        retention_failed = ""
        if len(history.bins) > config.max_bins:
            from squashfu_fs.write.retention import resquash

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
    mass_deletion = bool(scan.entries_before) and scan.deleted * 2 > scan.entries_before
    with open(log_file, "ab") as log:
        for prefix, names in notes:
            log.writelines(b"squashfu: " + prefix + name + b"\n" for name in names)
        if mass_deletion:
            log.write(b"squashfu: this backup deletes %d of the %d entries the source had at the backup "
                      b"before\n" % (scan.deleted, scan.entries_before))
    if result.status == rsync.VANISHED:  # files deleted while we copied: normal on a live system
        _say(verbose, f"some source files vanished during the backup; see {log_file}")
    missing = []
    if result.partial or scan.whiteout_devices:
        unreadable = sum(1 for line in result.errors if not line.startswith("rsync error:"))
        missing.append(f"{unreadable + len(scan.whiteout_devices)} source file(s) could not be backed up")
    if seed_acls:
        missing.append(f"the seed cannot store the POSIX ACLs of {len(seed_acls)} entries "
                       "(the next backup stores them)")
    if mass_deletion:
        missing.append(f"it deletes {scan.deleted} of {scan.entries_before} entries of the source "
                       "(more than half): check that the source is what it should be")
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
    excludes = Excludes(config.excludes)
    with _source_opened(config.source) as source_fd:
        walked = _walk_source(source_fd, excludes, log_file, verbose)
        try:
            result = stage_tree(layout, Path(config.source), config.excludes, progress=progress, log=log_file)
            copied = _copied_entries(source_fd, layout.staging, walked, None, excludes, result)
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
                escaped_xattrs=scan.escaped_xattrs, source_device=walked.device, source_fsid=walked.fsid,
                source_entries=walked.count)
    history = history.with_seed(seed)
    history_mod.save(layout.history, history)
    faults.checkpoint("after-commit")
    if copied is not None and scan.acl_paths:  # not in the image: tomorrow's backup must see them as changed
        lost = set(scan.acl_paths)
        copied = {k: v for k, v in copied.items() if k not in lost}
    _record_manifest(layout, history, config, copied)
    recovery.remove(layout.staging)
    return history, scan, result


@contextmanager
def _source_opened(source: str) -> Iterator[int]:
    """The source's top directory as an fd: every later look at the source is relative to it."""
    try:
        fd = os.open(source, beneath.DIR_FLAGS)
    except OSError as exc:
        raise SquashfuError(f"cannot open the source {source}: {exc.strerror}; nothing was backed up") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _walk_source(source_fd: int, excludes: Excludes, log_file: Path, verbose: bool) -> changes.Scan:
    """Walk the source; what vanished or could not be read is named in the log, never raised."""
    walked = changes.walk_fd(source_fd, excludes)
    if walked.vanished or walked.unreadable:
        with open(log_file, "ab") as log:
            log.writelines(b"squashfu: vanished or replaced while the source was walked: " + rel + b"\n"
                           for rel in walked.vanished)
            log.writelines(b"squashfu: cannot read (rsync compares the whole tree tonight): " + rel + b"\n"
                           for rel in walked.unreadable)
    if walked.vanished:
        _say(verbose, f"{len(walked.vanished)} path(s) vanished while the source was walked; see {log_file}")
    return walked


def _copied_entries(source_fd: int, copy: Path, walked: changes.Scan, plan: changes.Changes | None,
                    excludes: Excludes, result: rsync.RsyncResult) -> changes.Entries | None:
    """What the backup now holds, as manifest entries; None when no manifest may be written.

    A manifest night re-checks the paths it gave rsync; a full night walks the
    source again. Paths that moved meanwhile are recorded as unknown, and so
    is everything below one that ``copy`` (the union, or the staging layer)
    does not hold as a directory. A moved path that the source no longer has
    below real directories (a parent became a symlink) is deleted from the
    copy: rsync opened it by name, maybe through that symlink, so what it read
    may come from outside the source. See docs/commands.md, "the change manifest".
    """
    if result.status not in (rsync.OK, rsync.VANISHED) or not walked.trusted:
        return None  # tomorrow compares the whole tree again
    if plan is None:
        after = changes.walk_fd(source_fd, excludes)
        if not after.trusted:
            return None
        entries, moved = changes.merge_walks(walked.entries, after.entries)
    else:
        entries, moved = walked.entries, changes.moved_since(walked.entries, source_fd, plan.changed)
    if not moved:
        return entries
    with beneath.opened_root(copy) as copy_fd:
        for rel in sorted(moved):
            if _below_a_non_directory(source_fd, rel):
                _remove_from_union(copy_fd, rel)

        def is_directory(rel: bytes) -> bool:
            try:
                return stat.S_ISDIR(beneath.lstat_beneath(copy_fd, rel).st_mode)
            except OSError:
                return False

        return changes.vouch(entries, moved, is_directory)


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
        with beneath.opened_root(source, follow=True) as source_fd, beneath.opened_root(layout.rw) as union_fd:
            unionfix.restore_dir_times(source_fd, union_fd, os.fsencode(layout.staging))
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
             log_file: Path, allow_source_change: bool = False) -> tuple[History, LayerScan, rsync.RsyncResult]:
    """Write tonight's changes into a new bin and commit it."""
    assert history.seed is not None
    start = time.monotonic()
    number = history.next_bin
    partial = layout.partial_bin(number)
    source = Path(config.source)
    excludes = Excludes(config.excludes)
    with _source_opened(config.source) as source_fd:
        walked = _walk_source(source_fd, excludes, log_file, verbose)
        moved_fs = _check_source(history, config.source, walked, allow_source_change)
        plan = None if full or moved_fs or not excludes.understood else _change_plan(layout, history, config,
                                                                                     walked)
        _say(verbose, f"backing up into bin {number}" + (
            f": {len(plan.changed)} changed, {len(plan.deleted)} deleted since the last backup" if plan else
            ": comparing the whole tree"))
        partial.mkdir()
        try:
            with seed_mounted(layout, history.seed), overlay_union(
                    layout, committed_lowers(layout, history),
                    upper=os.path.relpath(partial, layout.root), work=layout.work / str(number)), \
                    beneath.opened_root(layout.rw) as union_fd:
                deleted = 0
                if plan is None:
                    args = rsync.backup_args(source, layout.rw, config.excludes)
                else:
                    args, deleted = _apply_deletions_and_list(layout, config, plan, number, union_fd, walked)
                result = rsync.run(args, log=log_file, progress=progress, label="backup")
                (layout.work / f"changed-{number}").unlink(missing_ok=True)
                result = _repair_acls(source_fd, union_fd, result, verbose)
                fix_union(source_fd, union_fd, os.fsencode(partial), verbose)
                copied = _copied_entries(source_fd, layout.rw, walked, plan, excludes, result)
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
    last = history.bins[-1] if history.bins else history.seed
    new = Bin(number=number, time=when.isoformat(timespec="seconds"),
              duration=round(time.monotonic() - start, 3), bytes=scan.size, files=scan.files,
              rsync_status=result.status, escaped_xattrs=scan.escaped_xattrs,
              compare="full" if plan is None else "manifest", source_device=walked.device,
              source_fsid=walked.fsid, source_entries=walked.count)
    history = history.with_bin(new)
    history_mod.save(layout.history, history)
    faults.checkpoint("after-commit")
    _record_manifest(layout, history, config, copied)
    _say(verbose, f"committed bin {number}: {scan.files} files, {scan.size} bytes")
    scan = dataclasses.replace(scan, deleted=deleted if plan is not None else result.deleted,
                               entries_before=last.source_entries or 0)
    return history, scan, result


def _check_source(history: History, source: str, walked: changes.Scan, allow: bool) -> bool:
    """Refuse a source that is empty or on another filesystem than at the last backup.

    That is what a data disk that did not come up looks like: committed, it
    would read as "everything deleted", and retention would later merge that
    into the seed. Returns whether the filesystem changed (then rsync compares
    the whole tree: the manifest's inode numbers belong to the old one).
    """
    last = history.bins[-1] if history.bins else history.seed
    if last is None or last.source_device is None:
        return False  # a history written before squashfu recorded this
    moved = walked.device != last.source_device and not (walked.fsid and walked.fsid == last.source_fsid)
    if allow:
        return moved
    override = "if that is intended, run `squashfu backup --allow-source-change` once"
    if walked.count == 0 and (last.source_entries or 0) > 0:
        raise SourceChangedError(f"the source {source} is empty, but had {last.source_entries} entries at the last "
                                 f"backup (is its disk mounted?); nothing was backed up; {override}")
    if moved:
        raise SourceChangedError(
            f"the source {source} is on another filesystem (device {os.major(walked.device)}:"
            f"{os.minor(walked.device)}) than at the last backup ({os.major(last.source_device)}:"
            f"{os.minor(last.source_device)}; is its disk mounted?); nothing was backed up; {override}")
    return False


def _change_plan(layout: RootLayout, history: History, config: Config,
                 walked: changes.Scan) -> changes.Changes | None:
    """What changed since the committed state, or None when the manifest cannot be trusted."""
    if not walked.trusted:
        return None
    manifest = changes.load(layout.manifest)
    if manifest is None or not manifest.valid_for(history.next_bin - 1, config.source, config.excludes):
        return None
    return changes.compare(manifest.entries, walked.entries, walked.dirs)


def _apply_deletions_and_list(layout: RootLayout, config: Config, plan: changes.Changes, number: int,
                              union: int, walked: changes.Scan) -> tuple[list[str], int]:
    """Delete what is gone through the union (whiteouts), and list the rest for rsync.

    Every deletion is resolved beneath the union's fd without following a
    symlink: a path below something that is a symlink (or a file) in the
    backup is not there, so there is nothing to delete. Directories the last
    night could not vouch for (``plan.recheck``) are listed in the union and
    whatever tonight's walk did not see is deleted too. Returns rsync's
    arguments and how many entries were deleted.
    """
    deleted = plan.gone
    for rel in plan.deleted:
        _remove_from_union(union, rel)
    for directory in plan.recheck:
        try:
            with beneath.opened(union, b"" if directory == b"." else directory) as fd:
                names = [os.fsencode(n) for n in os.listdir(fd)]
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                continue
            raise
        prefix = b"" if directory == b"." else directory + b"/"
        for name in names:
            if prefix + name not in walked.entries and _remove_from_union(union, prefix + name):
                deleted += 1
    listing = layout.work / f"changed-{number}"
    listing.write_bytes(b"".join(rel + b"\0" for rel in plan.changed))
    return rsync.changed_args(Path(config.source), layout.rw, config.excludes, listing), deleted


def _below_a_non_directory(top: int, rel: bytes) -> bool:
    """Whether a component of ``rel`` is now a symlink or a file in the tree open on ``top``."""
    try:
        beneath.lstat_beneath(top, rel)
    except OSError as exc:
        return exc.errno in (errno.ELOOP, errno.ENOTDIR)
    return False


def _remove_from_union(union: int, rel: bytes) -> bool:
    """Delete ``rel`` below the union's fd; a path below a symlink or a file there is not in the backup."""
    try:
        return beneath.remove_beneath(union, rel)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            return False
        raise


def _record_manifest(layout: RootLayout, history: History, config: Config, entries: changes.Entries | None) -> None:
    """Remember what the committed backup holds, or forget the manifest when that is not known.

    Vanished files (status 24) leave the manifest right: what vanished is
    recorded as deleted by the next walk.
    """
    if entries is None:
        layout.manifest.unlink(missing_ok=True)  # tomorrow compares the whole tree again
        return
    changes.save(layout.manifest, changes.Manifest(history.next_bin - 1, config.source, config.excludes, entries))


def _repair_acls(source: int, union: int, result: rsync.RsyncResult, verbose: bool) -> rsync.RsyncResult:
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


def fix_union(source: int, union: int, upper: bytes, verbose: bool) -> None:
    """Undo what writing through overlayfs got wrong: split hard links, directory times (all fd-relative)."""
    relinked = unionfix.repair(source, union, upper)
    if relinked:
        _say(verbose, f"re-joined {relinked} hard link(s) split by copy-up")
    unionfix.restore_dir_times(source, union, upper)


def scan_layer(top: Path, *, source: Path) -> LayerScan:
    """Count a layer's entries and find what needs special handling later.

    The layer is squashfu's own (inside the private root); the source is only
    looked at beneath its fd, following no symlink, to tell a source's own
    0:0 devices from overlay's whiteouts.
    """
    files = 0
    used = 0
    escaped = False
    devices: list[bytes] = []
    acls: list[bytes] = []
    opaque: list[bytes] = []
    top_b = os.fsencode(top)
    stack = [top_b]
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
    """List bin N's opaque directories beside it, for readers that cannot see trusted xattrs."""
    if scan.opaque_dirs:
        layerstack.write_opaque_record(layout.opaque_record(number), scan.opaque_dirs)


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

