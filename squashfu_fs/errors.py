"""One exception hierarchy; each class carries its exit status (docs/design.md#exit-status).

The CLI prints ``str(exc)`` as a single line and exits with ``exc.exit_code``;
nothing below the CLI calls ``sys.exit``.
"""

from __future__ import annotations

import os


class SquashfuError(Exception):
    """A failure the user should read about: nothing was committed."""

    exit_code = 1


class UsageError(SquashfuError):
    """The command line, the config or a named view is wrong."""

    exit_code = 2


class ConfigError(UsageError):
    """``squashfu.toml`` is missing, unreadable or invalid."""


class UnknownViewError(UsageError):
    """A VIEW name that the history does not have."""


class LockedError(SquashfuError):
    """Another writer holds ``.lock``."""


class MissingToolError(SquashfuError):
    """A required program is not installed; the message names its package."""


class ExternalCommandError(SquashfuError):
    """A subprocess (mount, rsync, mksquashfs...) failed."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


class CorruptRootError(SquashfuError):
    """The backup root is inconsistent in a way recovery must not guess about."""


class InUseError(SquashfuError):
    """A roll-back mount uses layers an operation would delete."""


class PartialError(SquashfuError):
    """The command completed, but some files could not be read or written."""

    exit_code = 3


class CopiedCommandsWarning(SquashfuError):
    """``sync --writable`` committed a root whose config runs commands as root (hooks, ``rsh``): read them first."""

    exit_code = 3


class PartialBackupError(PartialError):
    """The backup was committed, but some source files could not be read."""


def describe(exc: BaseException) -> str:
    """An error as the one line the CLI prints: an OSError as "FILE: reason", not Python's repr."""
    if isinstance(exc, OSError) and exc.strerror:
        names = [_name(n) for n in (exc.filename, exc.filename2) if n is not None]
        return ": ".join([*names, exc.strerror])
    return str(exc) or type(exc).__name__


def _name(name: object) -> str:
    return os.fsdecode(name) if isinstance(name, str | bytes) else str(name)


class SourceChangedError(SquashfuError):
    """The source is empty or on another filesystem than at the last backup: its disk may be missing."""


class DamagedRootError(SquashfuError):
    """``verify`` found a committed layer damaged or missing, or entries in the root history does not name."""


class HookError(SquashfuError):
    """A ``before_backup`` hook failed or hung past its timeout: the backup did not start."""


class MetricsError(SquashfuError):
    """``metrics_file`` could not be written; the run it describes is unaffected (a warning line)."""


def exit_status(exc: BaseException) -> int:
    """The exit status the CLI ends with for ``exc`` (docs/commands.md, "Exit status"): hooks and metrics report it."""
    if isinstance(exc, SquashfuError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, SystemExit):  # SIGTERM unwinds as SystemExit(128 + 15)
        return exc.code if isinstance(exc.code, int) else 1
    return 1
