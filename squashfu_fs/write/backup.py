"""One night's backup: the first seed, or a new bin on top of the committed layers; then retention.

A backup stacks the committed layers read-only under a fresh upper directory
with overlayfs and rsyncs the source into the union, so only changes land in
the new bin. Every step ends before the next starts; the bin is written under
a temporary name and committed by a rename plus an atomic history update
(docs/crash-safety.md). What the backup could not store is reported with
exit status 3 once it is committed (docs/commands.md "backup").
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import stat
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from squashfu_fs.engines import rsync
from squashfu_fs.engines.run import require
from squashfu_fs.errors import (
    HookError,
    InUseError,
    MetricsError,
    PartialBackupError,
    SourceChangedError,
    SquashfuError,
    UsageError,
    describe,
    exit_status,
)
from squashfu_fs.store import history as history_mod
from squashfu_fs.store import placement, recovery, usage
from squashfu_fs.store.config import Config
from squashfu_fs.store.history import Bin, History, SourceState
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.store.opening import opened_root
from squashfu_fs.util import beneath, clock, faults, metrics
from squashfu_fs.util.durable import fsync_dir, syncfs
from squashfu_fs.util.process import require_root
from squashfu_fs.util.say import say
from squashfu_fs.write import changes, into_bin, unionfix
from squashfu_fs.write.excludes import Excludes
from squashfu_fs.write.hooks import Hooks
from squashfu_fs.write.layerscan import LayerScan, record_catalog, record_opaque_dirs, scan_layer
from squashfu_fs.write.retention import resquash
from squashfu_fs.write.seal import list_digests, seal_all
from squashfu_fs.write.seed import SeedContents, commit_seed
from squashfu_fs.write.source import (
    OVERRIDE,
    check_source,
    own_mounts_below,
    probe_remote,
    refuse_bad_excludes,
    refuse_empty,
    refuse_missing_sources,
    source_excludes,
    source_opened,
    source_states,
    unavailable_sources,
    walk_source,
    withdraw_replaced_sources,
)
from squashfu_fs.write.union import committed_view, layers_mounted, overlay_union, second_pass, stage_tree


@dataclasses.dataclass
class BackupRun:
    """What one run did, filled in as it goes: the hooks' context and the run summary (``backup --json``).

    ``layer`` is the layer the run committed (``"seed"`` or the bin's number),
    empty while nothing is committed.
    """

    root: str = ""
    backup_time: str | None = None  # the backup's time as history records it
    started: float = dataclasses.field(default_factory=time.monotonic)
    duration: float | None = None
    layer: str = ""
    files_changed: int = 0
    bytes_changed: int = 0
    unreadable: int = 0
    vanished: int = 0
    retention: str = "not needed"  # "done", "postponed", "failed" or "not needed"
    hooks: Hooks | None = None
    log: str | None = None
    metrics_file: str | None = None
    repository: dict[str, float] = dataclasses.field(default_factory=dict)  # store/usage.samples

    def summary(self, status: int, message: str | None) -> dict[str, object]:
        """The run as ``backup --json`` prints it (docs/operations.md, "Machine-readable runs")."""
        return {
            "command": "backup", "status": STATUS_WORDS.get(status, "failed"), "exit_status": status,
            "root": self.root, "layer": self.layer or None, "time": self.backup_time, "duration": self.duration,
            "files_changed": self.files_changed, "bytes_changed": self.bytes_changed,
            "unreadable": self.unreadable, "vanished": self.vanished,
            "retention": self.retention if self.layer else None,
            "log": self.log if self.log and os.path.exists(self.log) else None,  # an empty log is not kept
            "message": message,
        }


STATUS_WORDS = {0: "ok", 3: "warning"}


def run_backup(root: Path, *, dry_run: bool = False, progress: bool = False,
               verbose: bool = False, full: bool = False, allow_source_change: bool = False,
               run: BackupRun | None = None) -> None:
    """One night's backup: the seed on the first run, a new bin afterwards, then retention; hooks around it.

    ``after_backup`` runs when the night is committed (exit status 0 or 3),
    ``on_error`` for every other status, both after the lock is released
    (docs/operations.md, "Hooks"). A failing ``after_backup`` turns a success into
    exit status 3; a failing ``on_error`` adds a warning line and keeps the status.
    """
    run = BackupRun() if run is None else run
    run.root = str(root)
    try:
        _with_hooks(root, run, dry_run=dry_run, progress=progress, verbose=verbose, full=full,
                    allow_source_change=allow_source_change)
    except BaseException as exc:
        _record_metrics(run, exit_status(exc))
        raise
    _record_metrics(run, 0)


def _record_metrics(run: BackupRun, status: int) -> None:
    """Rewrite ``metrics_file`` for this run; failing to is a warning line, never the run's status."""
    if run.metrics_file is None:
        return
    ended = clock.now().timestamp()
    samples: dict[str, float] = {
        "squashfu_backup_last_run_timestamp_seconds": ended, "squashfu_backup_last_status": status,
        "squashfu_backup_last_duration_seconds": run.duration or 0.0, **run.repository}
    if run.layer and status in (0, PartialBackupError.exit_code):
        samples.update({"squashfu_backup_last_success_timestamp_seconds": ended,
                        "squashfu_backup_last_files_changed": run.files_changed,
                        "squashfu_backup_last_bytes_changed": run.bytes_changed})
    try:
        metrics.update(run.metrics_file, run.root, samples)
    except MetricsError as exc:
        say(True, str(exc))


def _with_hooks(root: Path, run: BackupRun, *, dry_run: bool, progress: bool, verbose: bool, full: bool,
                allow_source_change: bool) -> None:
    """The backup with ``after_backup`` or ``on_error`` after it, by its exit status."""
    try:
        _backup(root, run, dry_run=dry_run, progress=progress, verbose=verbose, full=full,
                allow_source_change=allow_source_change)
    except BaseException as exc:
        status = exit_status(exc)
        run.duration = round(time.monotonic() - run.started, 3)
        if run.hooks is None:
            raise
        if status == PartialBackupError.exit_code and run.layer:
            problem = run.hooks.run("after_backup", status=status, layer=run.layer)
            if problem:
                raise PartialBackupError(f"{exc}; {problem}") from None
        else:
            run.hooks.warn("on_error", status=status, layer=run.layer)
        raise
    run.duration = round(time.monotonic() - run.started, 3)
    if run.hooks is not None:
        problem = run.hooks.run("after_backup", status=0, layer=run.layer)
        if problem:
            raise PartialBackupError(f"backup committed; {problem}")


def _backup(root: Path, run: BackupRun, *, dry_run: bool, progress: bool, verbose: bool, full: bool,
            allow_source_change: bool) -> None:
    """The backup itself, inside the writer lock; ``run`` learns the hooks, the layer and the counts."""
    require_root("backup")
    for tool in ("rsync", "mksquashfs", "mount", "umount"):
        require(tool)

    when = clock.now()
    log_file = RootLayout(Path(os.path.realpath(root))).logs / f"backup-{when:%Y-%m-%dT%H%M%S}.log"
    run.backup_time = when.isoformat(timespec="seconds")

    def refuse_source(config: Config) -> None:
        """Before the lock: a source that is not there, or holds the root, is refused untouched.

        The config is read by now, so its hooks and metrics file apply from
        here on: a source whose disk is missing is exactly what ``on_error`` is for.
        """
        if not dry_run:  # a dry run commits nothing, so no hook runs around it and no metric changes
            run.hooks = Hooks(root, config, log_file)
            run.metrics_file = config.metrics_file
        if config.origin.remote:
            return  # looked at over ssh once the lock is held and before_backup has run (probe_remote)
        unavailable: dict[str, str] = {}
        if config.several and not dry_run:  # a source that cannot be backed up tonight is left out, not refused
            refuse_bad_excludes(config, "nothing was backed up")
            unavailable = _unavailable(config)
        else:
            refuse_missing_sources(config, "nothing was backed up")
        for source in config.source_paths:  # the root may have been moved since init
            if source not in unavailable:
                placement.refuse_root_inside_source(root, Path(source))

    with opened_root(root, "backup", write=True, verbose=verbose, check=refuse_source) as opened:
        layout, config, history = opened.layout, opened.config, opened.history
        own = [] if config.origin.remote else own_mounts_below(Path(config.source), config.selection)
        if own:  # never back up the history into itself
            say(verbose, "leaving out squashfu's own mounts: " + ", ".join(own))
            config = dataclasses.replace(config, excludes=(*config.excludes, *own))
        if not dry_run:
            run.repository = usage.samples(layout, history)
        newest = history.bins[-1].when if history.bins else history.seed.when if history.seed else None
        if newest is not None and when < newest:
            raise UsageError(f"the clock ({when.isoformat()}) is before the newest backup "
                             f"({newest.isoformat()}); refusing to rewrite history")
        if dry_run:
            _dry_run(layout, history, config)
            return
        run.log = str(log_file)
        problem = run.hooks.run("before_backup") if run.hooks else None
        if problem:
            raise HookError(f"{problem}; nothing was backed up")
        log_start = log_file.stat().st_size if log_file.exists() else 0  # what rsync writes comes after
        first = history.seed is None
        if first:
            history, scan, result = _make_first_seed(layout, history, config, when, progress, verbose, log_file)
            run.layer = "seed"
        else:
            history, scan, result = _add_bin(layout, history, config, when, progress, verbose, full, log_file,
                                             allow_source_change)
            run.layer = str(history.bins[-1].number)
        # as `list` shows the layer: a seed's files are every entry in its image
        run.files_changed = history.seed.files if first and history.seed else scan.files
        run.bytes_changed = scan.size
        run.vanished = _vanished(log_file, log_start)
        afterwards_failed = ""
        if len(history.bins) > config.max_bins:
            try:
                history = resquash(layout, history, config, keep=config.min_bins, progress=progress,
                                   verbose=verbose)
                run.retention = "done"
            except InUseError as exc:  # the backup itself is committed: say why retention waits
                run.retention = "postponed"
                say(True, f"backup committed; retention postponed: {exc}")
            except (SquashfuError, OSError) as exc:  # committed all the same: exit 3, not 1 (docs/commands.md)
                run.retention = "failed"
                afterwards_failed = f"retention failed: {describe(exc)}; the next backup retries it"
        if config.seal and not first:  # after retention: a bin it absorbs need not be sealed first
            try:
                history = seal_all(layout, history, config, verbose=verbose)
            except (SquashfuError, OSError) as exc:  # the bin is committed unsealed; the next backup seals it
                afterwards_failed = "; ".join(filter(None, (
                    afterwards_failed, f"sealing failed: {describe(exc)}; the next backup retries it")))
        run.repository = usage.samples(layout, history)
    if afterwards_failed:
        try:
            _report_problems(log_file, scan, result, verbose, scan.acl_paths if first else (), run)
        except PartialBackupError as exc:
            raise PartialBackupError(f"{exc}; {afterwards_failed}") from None
        raise PartialBackupError(f"backup committed; {afterwards_failed}")
    _report_problems(log_file, scan, result, verbose, scan.acl_paths if first else (), run)
    _tidy_logs(layout, log_file)


KEEP_LOGS = 100


def _vanished(log_file: Path, start: int) -> int:
    """How many files rsync found gone when it came to copy them (its status 24), from the run's log."""
    try:
        with open(log_file, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as log:
            log.seek(start)
            return sum(1 for line in log if line.startswith(b"file has vanished: "))
    except FileNotFoundError:
        return 0


def _tidy_logs(layout: RootLayout, log_file: Path) -> None:
    """An empty log says nothing; beyond the newest ``KEEP_LOGS``, old logs go."""
    if log_file.exists() and log_file.stat().st_size == 0:
        log_file.unlink()
    logs = sorted(layout.logs.glob("backup-*.log"))
    for old in logs[:-KEEP_LOGS]:
        old.unlink()


def _report_problems(log_file: Path, scan: LayerScan, result: rsync.RsyncResult, verbose: bool,
                     seed_acls: tuple[bytes, ...] = (), run: BackupRun | None = None) -> None:
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
        log.writelines(b"squashfu: this backup leaves the source %s with fewer than half its entries\n"
                       % os.fsencode(shrunk) for shrunk in scan.shrunk)
        log.writelines(b"squashfu: " + os.fsencode(withdrawn) + b"\n" for withdrawn in scan.withdrawn)
    if result.status == rsync.VANISHED:  # files deleted while we copied: normal on a live system
        say(verbose, f"some source files vanished during the backup; see {log_file}")
    missing = list(scan.withdrawn)
    if result.partial or scan.whiteout_devices:
        unreadable = sum(1 for line in result.errors if not line.startswith("rsync error:"))
        if run is not None:
            run.unreadable = unreadable + len(scan.whiteout_devices)
        missing.append(f"{unreadable + len(scan.whiteout_devices)} source file(s) could not be backed up")
    if seed_acls:
        missing.append(f"the seed cannot store the POSIX ACLs of {len(seed_acls)} entries "
                       "(the next backup stores them)")
    if mass_deletion:
        missing.append(f"it deletes {scan.deleted} of {scan.entries_before} entries of the source "
                       "(more than half): check that the source is what it should be")
    elif scan.shrunk:
        missing.append(f"it leaves {', '.join(scan.shrunk)} with fewer than half the entries of the backup "
                       "before: check that the source is what it should be")
    if missing:
        raise PartialBackupError(f"backup committed, but {'; '.join(missing)}; see {log_file}")


def _make_first_seed(layout: RootLayout, history: History, config: Config, when: datetime,
                     progress: bool, verbose: bool, log_file: Path) -> tuple[History, LayerScan, rsync.RsyncResult]:
    """rsync the source into a staging upper layer, then squash exactly that."""
    start = time.monotonic()
    say(verbose, "first backup: copying the source into the staging layer")
    remote = config.origin.remote
    left = _unavailable(config)  # not in the seed: a later night adds each as a new source
    night = _tonight(config, left)
    excludes = source_excludes(night)
    with contextlib.nullcontext(None) if remote else source_opened(config.source) as source_fd:
        walked = None if source_fd is None else walk_source(source_fd, excludes, log_file, verbose)
        states = None if source_fd is None or walked is None else source_states(source_fd, night, walked)
        if remote:
            probe_remote(None, config.source, config.rsh, allow=True)
        try:
            source, rsh = _rsync_source(config)
            result = stage_tree(layout, source, config.excludes, progress=progress, log=log_file, rsh=rsh,
                                selection=night.selection)
            if config.several and source_fd is not None:  # rsync --relative leaves the top alone: give it
                result = _copy_top(source_fd, layout.staging, result, log_file)  # "/"'s attributes, as every bin
            left |= withdraw_replaced_sources(layout.staging, night, new=config.sources)
            night = _tonight(config, left)
            states = _with_carried(night, states, history)
            copied = None if source_fd is None or walked is None or left else _copied_entries(
                source_fd, layout.staging, walked, None, excludes, result, remove=_remove_from_union)
        except BaseException:
            recovery.remove(layout.staging)
            raise
    scan = scan_layer(layout.staging, source=None if remote else Path(config.source),
                      made_devices=result.made_devices)
    scan = dataclasses.replace(scan, withdrawn=_described(left, history, set(), fresh=True))
    faults.checkpoint("after-rsync")
    say(verbose, f"compressing the seed with {config.compression}")
    contents = SeedContents(time=when.isoformat(timespec="seconds"), rsync_status=result.status,
                            escaped_xattrs=scan.escaped_xattrs, source_device=walked.device if walked else None,
                            source_fsid=walked.fsid if walked else None,
                            source_entries=walked.count if walked else result.entries, sources=states)
    history = commit_seed(layout, history, config, contextlib.nullcontext(layout.staging), contents=contents,
                          started=start, progress=progress, checkpoint="after-commit")
    if copied is not None and scan.acl_paths:  # not in the image: tomorrow's backup must see them as changed
        lost = set(scan.acl_paths)
        copied = {k: v for k, v in copied.items() if k not in lost}
    _record_manifest(layout, history, config, copied)
    recovery.remove(layout.staging)
    return history, scan, result


def _copied_entries(source_fd: int, copy: Path, walked: changes.Scan, plan: changes.Changes | None,
                    excludes: Excludes, result: rsync.RsyncResult, *,
                    remove: Callable[[int, bytes], bool]) -> changes.Entries | None:
    """What the backup now holds, as manifest entries; None when no manifest may be written.

    A manifest night re-checks the paths it gave rsync; a full night walks the
    source again. Paths that moved meanwhile are recorded as unknown, and so
    is everything below one that ``copy`` (the union, the new bin, or the
    staging layer) does not hold as a directory. A moved path that the source
    no longer has below real directories (a parent became a symlink) is taken
    out of the copy with ``remove``: rsync opened it by name, maybe through that symlink, so what it read
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
                remove(copy_fd, rel)

        def is_directory(rel: bytes) -> bool:
            try:
                return stat.S_ISDIR(beneath.lstat_beneath(copy_fd, rel).st_mode)
            except OSError:
                return False

        return changes.vouch(entries, moved, is_directory)


def _add_bin(layout: RootLayout, history: History, config: Config, when: datetime,
             progress: bool, verbose: bool, full: bool,
             log_file: Path, allow_source_change: bool = False) -> tuple[History, LayerScan, rsync.RsyncResult]:
    """Write tonight's changes into a new bin and commit it."""
    assert history.seed is not None
    start = time.monotonic()
    number = history.next_bin
    partial = layout.partial_bin(number)
    remote = config.origin.remote
    left = _unavailable(config)  # their last state carries over: rsync --relative is not given them
    night = _tonight(config, left)
    excludes = source_excludes(night)
    states = None
    overridable: set[str] = set()
    with contextlib.nullcontext(None) if remote else source_opened(config.source) as source_fd:
        walked = None if source_fd is None else walk_source(source_fd, excludes, log_file, verbose)
        if walked is None:  # a remote source: no walk, no manifest; rsync compares the whole tree every night
            probe_remote(history, config.source, config.rsh, allow_source_change)
            plan = None
        else:
            assert source_fd is not None
            states = _with_carried(night, source_states(source_fd, night, walked), history)
            moved_fs, problems = check_source(history, config.source, walked, allow_source_change, states)
            if problems:  # a disk that did not come up: that source is left out too, unless it is every one
                if len(left) + len(problems) == len(config.sources):
                    path, why = next(iter(problems.items()))
                    raise SourceChangedError(f"the source {path} {why}; nothing was backed up; {OVERRIDE}")
                left |= problems
                overridable = set(problems)
                night = _tonight(config, left)
                states = _with_carried(night, states, history)
            # a night leaving a source out compares the whole tree: the walk's entries are not all the bin's
            plan = None if full or moved_fs or left or not excludes.understood else _change_plan(
                layout, history, config, walked)
        straight = plan is not None and not plan.recheck
        say(verbose, f"backing up into bin {number}" + (
            f": {len(plan.changed)} changed, {len(plan.deleted)} deleted since the last backup" if plan else
            ": comparing the whole tree") + (", written straight into the bin" if straight else
                                             ", through a union of the committed layers"))
        partial.mkdir()
        try:
            if straight:
                assert plan is not None and source_fd is not None and walked is not None
                result, copied, deleted = _write_into_bin(layout, night, plan, number, source_fd, walked,
                                                          progress=progress, verbose=verbose, log_file=log_file)
            else:
                result, copied, deleted = _write_through_union(layout, history, night, plan, number, source_fd,
                                                               walked, progress=progress, verbose=verbose,
                                                               log_file=log_file)
            if walked is None:  # the listing before may be older than the copy: rsync's own count decides
                refuse_empty(history, config.source, result.entries, allow_source_change)
            if (plan is not None or config.several) and source_fd is not None:
                # rsync saw the top only if it changed (with several sources, never), but the bin's top is every
                # view's top
                result = _copy_top(source_fd, partial, result, log_file)
            withdrawn = withdraw_replaced_sources(partial, night, new=_never_committed(config, history))
            if withdrawn:  # what tonight's walk saw of them is not what the bin keeps: compare all tomorrow
                left |= withdrawn
                night = _tonight(config, left)
                states = _with_carried(night, states, history)
            if left:
                copied = None
        except BaseException:
            recovery.remove(partial)  # nothing committed; leave no debris either
            raise
    faults.checkpoint("after-rsync")
    scan = scan_layer(partial, source=None if remote else Path(config.source), made_devices=result.made_devices)
    record_opaque_dirs(layout, number, scan)  # debris until the bin it describes is committed
    record_catalog(layout, number, when.isoformat(timespec="seconds"), partial, scan)  # so is its catalogue
    kept_open = not config.seal or bool(scan.acl_paths)  # stays a directory: list its files' digests
    listed = list_digests(layout, partial, number) if kept_open else None
    syncfs(partial)
    os.rename(partial, layout.bin(number))
    fsync_dir(layout.bins)
    faults.checkpoint("bin-renamed")
    last = history.bins[-1] if history.bins else history.seed
    new = Bin(number=number, time=when.isoformat(timespec="seconds"),
              duration=round(time.monotonic() - start, 3), bytes=scan.size, files=scan.files,
              rsync_status=result.status, escaped_xattrs=scan.escaped_xattrs,
              compare="full" if plan is None else "manifest", source_device=walked.device if walked else None,
              source_fsid=walked.fsid if walked else None,
              source_entries=walked.count if walked else result.entries, digest=listed, acls=bool(scan.acl_paths),
              sources=states)
    history = history.with_bin(new)
    history_mod.save(layout.history, history)
    faults.checkpoint("after-commit")
    _record_manifest(layout, history, config, copied)
    say(verbose, f"committed bin {number}: {scan.files} files, {scan.size} bytes")
    scan = dataclasses.replace(scan, deleted=deleted if plan is not None else result.deleted,
                               entries_before=last.source_entries or 0, shrunk=_shrunk(last.sources, states),
                               withdrawn=_described(left, history, overridable, fresh=False))
    return history, scan, result


def _tonight(config: Config, left: dict[str, str]) -> Config:
    """The config as tonight's rsync and walk see it: without the sources ``left`` out (path: why)."""
    return dataclasses.replace(config, left_out=tuple(left))


def _unavailable(config: Config) -> dict[str, str]:
    """Each of several local sources that cannot be backed up tonight, and why; refused if that is every one.

    The others are backed up and the run exits 3 (docs/operations.md,
    "Several sources"): a user who owns ``/srv`` must not stop the backup of
    ``/etc`` by replacing ``/srv/www`` with a symlink.
    """
    if not config.several or config.origin.remote:
        return {}
    left = unavailable_sources(config)
    if len(left) == len(config.sources):
        path, why = next(iter(left.items()))
        raise UsageError(f"source {path} {why}; nothing was backed up")
    return left


def _with_carried(night: Config, states: tuple[SourceState, ...] | None,
                  history: History) -> tuple[SourceState, ...] | None:
    """Tonight's source states: each left-out source keeps its last one (none if it was never backed up)."""
    if states is None:
        return None
    last = history.bins[-1] if history.bins else history.seed
    before = {state.path: state for state in (last.sources if last else None) or ()}
    now = {state.path: state for state in states}
    chosen = [before.get(path) if path in night.left_out else now.get(path) for path in night.sources]
    return tuple(state for state in chosen if state is not None)


def _never_committed(config: Config, history: History) -> set[str]:
    """The sources no committed layer holds yet: added to the config since the last backup."""
    last = history.bins[-1] if history.bins else history.seed
    return set(config.sources) - {state.path for state in (last.sources if last else None) or ()}


def _described(left: dict[str, str], history: History, overridable: set[str], *, fresh: bool) -> tuple[str, ...]:
    """Each source left out tonight as the exit-3 line names it: why, and what the day holds of it instead."""
    last = history.bins[-1] if history.bins else history.seed
    known = {state.path for state in (last.sources if last else None) or ()}
    return tuple(
        f"the source {path} {why}; "
        + ("it is not in the seed" if fresh else "its last backed-up state is kept" if path in known else
           "it is not backed up tonight")
        + (f"; {OVERRIDE}" if path in overridable else "")
        for path, why in left.items())


def _shrunk(before: tuple[SourceState, ...] | None, now: tuple[SourceState, ...] | None) -> tuple[str, ...]:
    """Each of several sources left with fewer than half the entries it had: a mass deletion of that one."""
    old = {state.path: state.entries for state in before or ()}
    return tuple(f"{state.path} ({state.entries} of {old[state.path]})" for state in now or ()
                 if old.get(state.path) and state.entries * 2 < old[state.path])


def _write_into_bin(layout: RootLayout, config: Config, plan: changes.Changes, number: int, source_fd: int,
                    walked: changes.Scan, *, progress: bool, verbose: bool,
                    log_file: Path) -> tuple[rsync.RsyncResult, changes.Entries | None, int]:
    """rsync the changed paths straight into the new bin, and add what overlayfs would have.

    No layer is mounted: the manifest already says what the committed state
    holds at every path the night touches (docs/design.md, "A night written
    straight into its bin"). Returns rsync's result, the manifest entries to
    record, and how many entries the night deleted.
    """
    partial = layout.partial_bin(number)
    with beneath.opened_root(partial) as bin_fd:
        made = into_bin.place_whiteouts(bin_fd, into_bin.needing_whiteouts(plan.deleted, walked.dirs))
        listed = sorted(set(plan.changed) | made)
        listing = layout.work / f"changed-{number}"
        listing.write_bytes(b"".join(rel + b"\0" for rel in listed))
        args = rsync.changed_args(Path(config.source), partial, config.excludes, listing, into_bin=True)
        result = rsync.run(args, log=log_file, progress=progress, label="backup")
        listing.unlink(missing_ok=True)
        # rsync -R also makes every parent of a listed path, with its attributes but (filtered) without
        # a source's own trusted.overlay.*: those parents are the bin's copies too.
        into_bin.escape_overlay_xattrs(source_fd, bin_fd,
                                       sorted(set(listed) | {p for rel in listed for p in into_bin.parents(rel)}))
        into_bin.mark_opaque(bin_fd, plan.replaced)
        result = _repair_acls(source_fd, bin_fd, result, verbose)
        fix_union(source_fd, bin_fd, os.fsencode(partial), verbose, config.selection)
        copied = _copied_entries(source_fd, partial, walked, plan, source_excludes(config), result,
                                 remove=into_bin.withdraw)
    return result, copied, plan.gone


def _write_through_union(layout: RootLayout, history: History, config: Config, plan: changes.Changes | None,
                         number: int, source_fd: int | None, walked: changes.Scan | None, *, progress: bool,
                         verbose: bool, log_file: Path) -> tuple[rsync.RsyncResult, changes.Entries | None, int]:
    """rsync into a union of every committed layer under the new bin: a full compare, or a manifest to re-check.

    Returns rsync's result, the manifest entries to record, and how many
    entries the night deleted (0 when rsync's own ``--delete`` counted them).
    A remote source (``source_fd`` None) is always a full compare, and its
    repairs are a second rsync pass (write/union.second_pass), since
    squashfu cannot read the source itself.
    """
    assert history.seed is not None
    partial = layout.partial_bin(number)
    with layers_mounted(layout, history.seed, history.bins) as lowers, overlay_union(
            layout, lowers, upper=os.path.relpath(partial, layout.root), work=layout.work / str(number)), \
            beneath.opened_root(layout.rw) as union_fd:
        deleted = 0
        if plan is None:
            source, rsh = _rsync_source(config)
            args = rsync.backup_args(source, layout.rw, config.excludes, rsh=rsh, itemize=rsh is not None,
                                     selection=config.selection)
        else:
            assert walked is not None
            args, deleted = _apply_deletions_and_list(layout, config, plan, number, union_fd, walked)
        result = rsync.run(args, log=log_file, progress=progress, label="backup")
        (layout.work / f"changed-{number}").unlink(missing_ok=True)
        if source_fd is None or walked is None:
            # ACLs overlayfs would not set on a lower layer's file: copy those files up, the second pass sets them
            unionfix.copy_up(union_fd, unionfix.acl_failures(result.errors))
            return second_pass(args, result, log=log_file, verbose=verbose), None, deleted
        result = _repair_acls(source_fd, union_fd, result, verbose)
        fix_union(source_fd, union_fd, os.fsencode(partial), verbose, config.selection)
        copied = None if config.left_out else _copied_entries(
            source_fd, layout.rw, walked, plan, source_excludes(config), result, remove=_remove_from_union)
    return result, copied, deleted


def _change_plan(layout: RootLayout, history: History, config: Config,
                 walked: changes.Scan) -> changes.Changes | None:
    """What changed since the committed state, or None when the manifest cannot be trusted."""
    if not walked.trusted:
        return None
    manifest = changes.load(layout.manifest)
    if manifest is None or not manifest.valid_for(history.next_bin - 1, _manifest_source(config), config.excludes):
        return None
    return changes.compare(manifest.entries, walked.entries, walked.dirs)


def _apply_deletions_and_list(layout: RootLayout, config: Config, plan: changes.Changes, number: int,
                              union: int, walked: changes.Scan) -> tuple[list[str | bytes], int]:
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
    return [*rsync.changed_args(Path(config.source), layout.rw, config.excludes, listing)], deleted


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
    changes.save(layout.manifest, changes.Manifest(history.next_bin - 1, _manifest_source(config), config.excludes,
                                                   entries))


def _manifest_source(config: Config) -> str:
    """What a manifest is valid for: the source, or with several sources all of them (as JSON)."""
    return json.dumps(list(config.sources)) if config.several else config.source


def _copy_top(source_fd: int, top: Path, result: rsync.RsyncResult, log_file: Path) -> rsync.RsyncResult:
    """Give the layer's top the source top's attributes; an xattr it cannot hold is reported as rsync would."""
    with beneath.opened_root(top) as top_fd:
        failed = into_bin.copy_top(source_fd, top_fd)
    if not failed:
        return result
    with open(log_file, "a") as log:  # reported like a file rsync could not copy: committed, exit 3, in the log
        log.writelines(f"squashfu: the source's top directory: xattr {f}\n" for f in failed)
    return dataclasses.replace(
        result, status=rsync.PARTIAL if result.status in (rsync.OK, rsync.VANISHED) else result.status,
        errors=result.errors + tuple(f"xattr of the source's top directory {f}" for f in failed))


def _repair_acls(source: int, union: int, result: rsync.RsyncResult, verbose: bool) -> rsync.RsyncResult:
    """Set the ACLs rsync could not (files whose version lives in the seed); clear the error if all took."""
    wanted = unionfix.acl_failures(result.errors)
    if not wanted:
        return result
    failed = unionfix.restore_acls(source, union, wanted)
    say(verbose, f"stored {len(wanted) - len(failed)} ACL(s) the seed could not hold")
    others = [ln for ln in result.errors if not ln.startswith("rsync error:") and not unionfix.is_acl_failure(ln)]
    if failed or others or result.status != rsync.PARTIAL:
        return result
    return dataclasses.replace(result, status=rsync.OK, errors=())


def fix_union(source: int, union: int, upper: bytes, verbose: bool, selection: tuple[bytes, ...] = ()) -> None:
    """Undo what writing through overlayfs got wrong: split hard links, directory times (all fd-relative).

    With several sources (``selection``), a hard link's other names are looked for only inside them.
    """
    relinked = unionfix.repair(source, union, upper, selection)
    if relinked:
        say(verbose, f"re-joined {relinked} hard link(s) split by copy-up")
    unionfix.restore_dir_times(source, union, upper)


def _dry_run(layout: RootLayout, history: History, config: Config) -> None:
    """Say what tonight's backup would change, against a read-only union; commit nothing."""
    source, rsh = _rsync_source(config)
    if rsh is not None:
        probe_remote(None, config.source, rsh, allow=True)  # unreachable or missing: one line, not rsync's noise
    if history.seed is None:
        say(True, "no backup yet: the first backup would copy everything below")
        rsync.run(rsync.backup_args(source, layout.empty, config.excludes, dry_run=True, rsh=rsh,
                                    selection=config.selection), echo_items=True)
        return
    with committed_view(layout, history) as view:
        rsync.run(rsync.backup_args(source, view, config.excludes, dry_run=True, rsh=rsh, selection=config.selection),
                  echo_items=True)


def _rsync_source(config: Config) -> tuple[Path | str, str | None]:
    """What rsync copies from, and the ``-e`` command line that reaches it (None for a local source)."""
    origin = config.origin
    if origin.remote:
        return origin.rsync_arg, config.rsh
    return Path(config.source), None
