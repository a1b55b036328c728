"""The command line (docs/commands.md): thin click commands over the real modules.

Shared options are defined once. Every command ends with one line on stderr
and a documented exit status, never a traceback: a :class:`SquashfuError`
carries its status, any other error is a failure (1). ``--debug`` (or
``SQUASHFU_DEBUG=1``) prints the traceback above that line.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from squashfu_fs import __version__
from squashfu_fs.errors import CopiedCommandsWarning, SquashfuError, UsageError, describe
from squashfu_fs.util.say import say

F = TypeVar("F", bound=Callable[..., Any])


RCLONE_PREFIX = "rclone:"  # a copy on an object store (squashfu_fs/store/copies.py)
RCLONE_COMMANDS = ("list", "verify", "sync")  # the commands that read one


def _root_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    """The root as the kernel resolves it now; code that must know it is the same root compares devices.

    An ``rclone:REMOTE:PATH`` copy is kept as written: rclone resolves it.
    """
    if value is not None and value.startswith(RCLONE_PREFIX):
        return Path(value)
    return None if value is None else Path(os.path.realpath(value))


def needs_root(func: F) -> F:
    """Commands that act on a backup root fail with a usage error when -r is missing."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        root = ctx.find_root().params.get("root")
        if root is None:
            raise click.UsageError("no backup root: give -r/--root ROOT or set SQUASHFU_ROOT")
        if str(root).startswith(RCLONE_PREFIX) and ctx.info_name not in RCLONE_COMMANDS:
            raise UsageError(f"{root} is an rclone copy: only {', '.join(RCLONE_COMMANDS)} read one; "
                             "bring it back with `squashfu -r REMOTE sync NEWROOT` first")
        return ctx.invoke(func, root, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (systemd's stop, a timer's timeout) unwinds like Ctrl-C: every mount is taken down."""
    raise SystemExit(128 + signum)


class SquashfuGroup(click.Group):
    """Turns every error into one line and its exit status (docs/commands.md#exit-status)."""

    def invoke(self, ctx: click.Context) -> Any:
        signal.signal(signal.SIGTERM, _terminated)
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise  # click's own: usage errors (2), --help and --version
        except KeyboardInterrupt:
            _fail(ctx, "interrupted", 130)
        except SquashfuError as exc:
            _fail(ctx, describe(exc), exc.exit_code)
        except OSError as exc:  # a system call failed where no SquashfuError was meant: nothing committed
            _fail(ctx, describe(exc), 1)
        except Exception as exc:
            _fail(ctx, f"internal error: {describe(exc)} (run with --debug for the traceback)", 1)


def _fail(ctx: click.Context, message: str, status: int) -> None:
    """One line on stderr (control characters in names escaped), the traceback too with --debug.

    Under ``--json`` the line is one JSON object (docs/operations.md, "Machine-readable runs").
    """
    if ctx.params.get("debug"):
        import traceback  # only for --debug: every command's start-up is kept short (docs/benchmarks.md)

        traceback.print_exc()
    if ctx.meta.get(JSON_ERRORS):
        print(json.dumps({"command": ctx.invoked_subcommand, "status": "warning" if status == 3 else "failed",
                          "exit_status": status, "error": message}), file=sys.stderr, flush=True)
    else:
        say(True, message)
    sys.exit(status)


JSON_ERRORS = "squashfu.json_errors"


def _json_errors() -> None:
    """From here on, this command's final error line is a JSON object on stderr."""
    click.get_current_context().meta[JSON_ERRORS] = True


def _emit(data: dict[str, Any]) -> None:
    """A command's one JSON result object on stdout, in the style ``list`` and ``verify`` share."""
    click.echo(json.dumps(data, indent=2))


progress_option = click.option(
    "--progress/--no-progress", default=None,
    help="Show a progress bar (default: only when stderr is a terminal).")
verbose_option = click.option("-v", "--verbose", is_flag=True, help="Say what is being done.")


@click.group(cls=SquashfuGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-r", "--root", envvar="SQUASHFU_ROOT", callback=_root_callback,
              metavar="ROOT", help="The backup root (or SQUASHFU_ROOT).")
@click.option("--debug", is_flag=True, envvar="SQUASHFU_DEBUG",
              help="On an error, print the traceback too (or SQUASHFU_DEBUG=1).")
@click.version_option(__version__, prog_name="squashfu")
def main(root: Path | None, debug: bool) -> None:
    """Incremental, compressed backups you can walk into day by day."""


@main.command()
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--source", "sources", required=True, multiple=True, type=click.Path(),
              metavar="PATH|[USER@]HOST:PATH",
              help="The directory to back up: a local path, or a remote one pulled with rsync over ssh. "
                   "Repeated (local paths only), each source appears under its own absolute path in every view "
                   "(as with rsync --relative).")
@click.option("--exclude", "excludes", multiple=True, metavar="PATTERN",
              help="An rsync exclude pattern; may be repeated.")
@click.option("--compression", type=click.Choice(["zstd", "xz", "gzip", "lz4", "lzo"]),
              default="zstd", show_default=True)
@click.option("--max-bins", type=click.IntRange(min=1), default=14, show_default=True,
              help="Resquash when more bins than this exist.")
@click.option("--min-bins", type=click.IntRange(min=0), default=7, show_default=True,
              help="Bins left after a resquash.")
@click.option("--seal/--no-seal", default=True, show_default=True,
              help="Compress each night's bin into an image with a digest (docs/layout.md).")
@click.option("--rsh", metavar="COMMAND", default="ssh", show_default=True,
              help="How rsync reaches a remote source (its -e), e.g. \"ssh -i /root/.ssh/backup_key\".")
def init(root: Path, sources: tuple[str, ...], excludes: tuple[str, ...], compression: str,
         max_bins: int, min_bins: int, seal: bool, rsh: str) -> None:
    """Create a backup root for SOURCE at ROOT."""
    from squashfu_fs.errors import ConfigError
    from squashfu_fs.store.config import Config, Source, source_settings
    from squashfu_fs.write.create import init_root

    try:
        config = Config(**source_settings([Source.absolute(s) for s in sources]), excludes=excludes,
                        compression=compression, max_bins=max_bins, min_bins=min_bins, seal=seal, rsh=rsh)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    init_root(Path(os.path.abspath(root)), config)
    click.echo(f"initialised {root} for {', '.join(config.source_paths)}")


@main.command()
@needs_root
@click.option("--dry-run", "-n", is_flag=True, help="Show what would change; commit nothing.")
@click.option("--full", is_flag=True,
              help="Let rsync compare the whole tree instead of trusting the change manifest.")
@click.option("--allow-source-change", is_flag=True,
              help="Back up a source that is empty or on another filesystem than at the last backup.")
@click.option("--json", "as_json", is_flag=True,
              help="End with one JSON object on stdout (the run's summary); errors as JSON on stderr.")
@progress_option
@verbose_option
def backup(root: Path, dry_run: bool, full: bool, allow_source_change: bool, as_json: bool,
           progress: bool | None, verbose: bool) -> None:
    """Back up the source: the first run makes the seed, later runs add a bin."""
    from squashfu_fs.errors import exit_status
    from squashfu_fs.write.backup import BackupRun, run_backup

    if as_json and dry_run:
        raise click.UsageError("--json and --dry-run cannot be combined (a dry run lists what would change)")
    if as_json:
        _json_errors()
    run = BackupRun()
    try:
        run_backup(root, dry_run=dry_run, progress=_want_progress(progress), verbose=verbose, full=full,
                   allow_source_change=allow_source_change, run=run)
    except BaseException as exc:
        if as_json:
            _emit(run.summary(exit_status(exc), _message(exc)))
        raise
    if as_json:
        _emit(run.summary(0, None))


def _message(exc: BaseException) -> str:
    """The one line an error ends a command with, as the summary's ``message``."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, SystemExit):
        return f"terminated (exit {exc.code})"
    if isinstance(exc, SquashfuError | OSError):
        return describe(exc)
    return f"internal error: {describe(exc)}"


@main.command("list")
@needs_root
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(root: Path, as_json: bool) -> None:
    """The seed and every bin, with sizes and totals."""
    from squashfu_fs.read.report import list_report

    if as_json:
        _json_errors()
    if str(root).startswith(RCLONE_PREFIX):
        from squashfu_fs.read.rclone_copy import list_copy

        click.echo(list_copy(str(root), as_json=as_json), nl=False)
        return
    click.echo(list_report(root, as_json=as_json), nl=False)


@main.command()
@needs_root
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--foreground", "-f", is_flag=True, help="Stay attached and log to stderr (for systemd).")
@click.option("--allow-other", is_flag=True, help="Let other users browse (needs user_allow_other for non-root).")
@click.option("-o", "options", multiple=True, metavar="OPT", help="Extra FUSE mount option; may be repeated.")
@click.option("--log", "log_file", type=click.Path(path_type=Path),
              help="Log to this file instead of syslog when daemonised.")
@verbose_option
def mount(root: Path, mountpoint: Path, foreground: bool, allow_other: bool,
          options: tuple[str, ...], log_file: Path | None, verbose: bool) -> None:
    """Serve every day of the history, read-only, at MOUNTPOINT."""
    from squashfu_fs.read.mountd import mount_history

    mount_history(root, Path(os.path.abspath(mountpoint)), foreground=foreground,
                  allow_other=allow_other, options=options, log_file=log_file, verbose=verbose)


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
def umount(mountpoint: Path) -> None:
    """Take down a `mount` or `rollback` at MOUNTPOINT (also one whose daemon died)."""
    from squashfu_fs.engines.mounts import find_mount

    target = Path(os.path.abspath(mountpoint))
    entry = find_mount(target)
    if entry is None:
        raise SquashfuError(f"{mountpoint} is not mounted")
    if entry.fstype.startswith("fuse"):
        from squashfu_fs.read.mountd import unmount_history

        unmount_history(target)
    else:
        from squashfu_fs.read.rollback import unmount_rollback

        unmount_rollback(target)


@main.command()
@needs_root
@click.argument("view")
@click.argument("mountpoint", type=click.Path(path_type=Path))
@verbose_option
def rollback(root: Path, view: str, mountpoint: Path, verbose: bool) -> None:
    """Mount the state of VIEW read-only at MOUNTPOINT with the kernel's overlayfs."""
    from squashfu_fs.read.rollback import mount_rollback

    spec = mount_rollback(root, view, Path(os.path.abspath(mountpoint)), verbose=verbose)
    click.echo(f"{spec.name} mounted read-only on {mountpoint}; `squashfu umount {mountpoint}` when done")


@main.command()
@needs_root
@click.argument("view")
@click.argument("path", required=False)
@click.option("--to", "target", required=True, type=click.Path(path_type=Path),
              help="Where to copy to.")
@click.option("--delete", is_flag=True, help="Delete files in TARGET that the backup does not have.")
@progress_option
@verbose_option
def restore(root: Path, view: str, path: str | None, target: Path, delete: bool,
            progress: bool | None, verbose: bool) -> None:
    """Copy VIEW (or PATH in it) to TARGET with all metadata."""
    from squashfu_fs.read.restore import restore as do_restore

    do_restore(root, view, path, Path(os.path.abspath(target)), delete=delete,
               progress=_want_progress(progress), verbose=verbose)


@main.command()
@needs_root
@click.argument("view_a")
@click.argument("view_b")
@click.option("--json", "as_json", is_flag=True, help="A JSON list of changes on stdout.")
@verbose_option
def diff(root: Path, view_a: str, view_b: str, as_json: bool, verbose: bool) -> None:
    """What changed from VIEW_A to VIEW_B, found from the bins between them."""
    from squashfu_fs.read.layerdiff import diff_layers

    if as_json:
        _json_errors()
    _out(diff_layers(root, view_a, view_b, as_json=as_json, verbose=verbose))


@main.command()
@needs_root
@click.argument("path", required=False)
@click.option("--json", "as_json", is_flag=True, help="A JSON list on stdout.")
@verbose_option
def deleted(root: Path, path: str | None, as_json: bool, verbose: bool) -> None:
    """Every path (under PATH) that a kept backup has and the newest does not."""
    from squashfu_fs.read.file_history import deleted_paths

    if as_json:
        _json_errors()
    _out(deleted_paths(root, path, as_json=as_json, verbose=verbose))


@main.command()
@needs_root
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="A JSON list on stdout.")
@verbose_option
def versions(root: Path, path: str, as_json: bool, verbose: bool) -> None:
    """Every distinct version of PATH in the kept history, oldest first."""
    from squashfu_fs.read.file_history import versions_of

    if as_json:
        _json_errors()
    _out(versions_of(root, path, as_json=as_json, verbose=verbose))


def _out(text: str) -> None:
    """A query's answer on stdout, as UTF-8 whatever the locale (names are escaped already)."""
    sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))
    sys.stdout.flush()


@main.command()
@needs_root
@progress_option
@verbose_option
def resquash(root: Path, progress: bool | None, verbose: bool) -> None:
    """Merge the oldest bins into a new seed now, leaving min_bins bins."""
    from squashfu_fs.write.retention import resquash_now

    resquash_now(root, progress=_want_progress(progress), verbose=verbose)


@main.command()
@needs_root
@click.option("--data", is_flag=True, help="Also read every file of every layer (slow: decompresses everything).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@progress_option
def verify(root: Path, data: bool, as_json: bool, progress: bool | None) -> None:
    """Check that history, layers and digests agree and that every image reads back."""
    from squashfu_fs.errors import DamagedRootError
    from squashfu_fs.read.verify import verify as do_verify

    if as_json:
        _json_errors()
    if str(root).startswith(RCLONE_PREFIX):
        from squashfu_fs.read.rclone_copy import verify_copy

        report = verify_copy(str(root), data=data)
    else:
        report = do_verify(root, data=data, progress=_want_progress(progress))
    click.echo(report.as_json() if as_json else report.as_text(), nl=False)
    if not report.ok:
        raise DamagedRootError(report.failure())


@main.command()
@needs_root
@click.argument("dest", metavar="DEST")
@click.option("--writable", is_flag=True,
              help="Write DEST as a root of its own that backup and resquash accept (bringing a copy back "
                   "after the original is lost); without it DEST is marked as a copy and refuses them.")
@verbose_option
def sync(root: Path, dest: str, writable: bool, verbose: bool) -> None:
    """Copy the committed history to DEST: a local path, [USER@]HOST:PATH (rsync over the root's rsh) or
    rclone:REMOTE:PATH; only new layer files are copied, history.json last, then old layers deleted."""
    from squashfu_fs.write.sync import sync as do_sync

    result = do_sync(str(root), dest, writable=writable, verbose=verbose)
    click.echo(result.summary())
    if result.commands:
        config = f"{os.path.abspath(dest).rstrip('/')}/squashfu.toml"
        raise CopiedCommandsWarning(f"{config} came with the copy and sets {', '.join(result.commands)}, which run "
                                    "as root at the next backup: read them before it runs (docs/security.md)")


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script (e.g. eval "$(squashfu completion bash)" in ~/.bashrc)."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(main, {}, "squashfu", "_SQUASHFU_COMPLETE").source())


@main.command("man")
def man_page() -> None:
    """Print the man page, generated from these commands (squashfu man > /usr/local/share/man/man1/squashfu.1)."""
    from squashfu_fs import __version__
    from squashfu_fs.util.manpage import render

    click.echo(render(main, "squashfu", __version__), nl=False)


def _want_progress(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


def run() -> None:
    """The command line, named ``squashfu`` however it was started (``python -m`` included), for completion too."""
    main(prog_name="squashfu", complete_var="_SQUASHFU_COMPLETE")


if __name__ == "__main__":
    run()
