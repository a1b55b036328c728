"""One way to open a backup root for a command, as BorgBackup's ``with_repository`` does for a repository.

Every command starts with :func:`opened_root`. A writer (backup, resquash,
rollback, and restore and diff while they set up their private view: they
write roll-back records) loads and checks ``squashfu.toml``, takes the writer
lock, loads ``history.json`` and recovers from whatever an interrupted command
left (docs/crash-safety.md, "Recovery" and "The lock"). A reader (list, mount,
the view names of diff and restore) loads history without the lock and
changes nothing; it reads the config only if it asks for it. A copy made by
``sync`` refuses backup and resquash (:mod:`squashfu_fs.store.copies`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from squashfu_fs.errors import UsageError
from squashfu_fs.store import history as history_mod
from squashfu_fs.store.history import History
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.util.say import say

if TYPE_CHECKING:
    from squashfu_fs.store.config import Config


class OpenedRoot:
    """A backup root opened for one command: its layout, config and history, and what recovery removed."""

    def __init__(self, layout: RootLayout, history: History, config: Config | None = None,
                 recovered: tuple[str, ...] = ()) -> None:
        self.layout = layout
        self.history = history
        self.recovered = recovered  # one line per piece of debris removed, for -v
        self._config = config

    @property
    def config(self) -> Config:
        """The root's validated config (a reader loads it on first use)."""
        if self._config is None:
            from squashfu_fs.store import config as config_mod

            self._config = config_mod.load(self.layout.root)
        return self._config


@contextmanager
def opened_root(root: Path, command: str, *, write: bool,
                check: Callable[[Config], None] | None = None, verbose: bool = False) -> Iterator[OpenedRoot]:
    """Open ``root`` for ``command``; a writer holds the lock until the block ends.

    ``check`` is the command's own refusal of its config (a missing source),
    made before the lock is taken and anything is touched. With ``verbose``, a
    writer says each piece of debris recovery removed, whichever command it is.
    """
    layout = RootLayout(Path(os.path.realpath(root)))
    if not write and check is None:
        yield OpenedRoot(layout, _load_history(layout))
        return
    # A reader's queries start in tens of milliseconds (docs/benchmarks.md); only the rest pay for these.
    from squashfu_fs.store import config as config_mod
    from squashfu_fs.store import copies, recovery
    from squashfu_fs.store.lock import writer_lock

    config = config_mod.load(layout.root)
    if check is not None:
        check(config)
    if not write:
        yield OpenedRoot(layout, _load_history(layout), config)
        return
    with writer_lock(layout.lock, command):
        history = _load_history(layout)
        copies.refuse_writes(root, history, command)  # a copy changes only by `sync` (docs/operations.md)
        recovered = recovery.recover(layout, history)
        for line in recovered:
            say(verbose, f"recovered: {line}")
        yield OpenedRoot(layout, history, config, tuple(recovered))


def _load_history(layout: RootLayout) -> History:
    """The committed history; one line for a directory that is no root, or one that is not ours to read."""
    try:
        os.close(os.open(layout.history, os.O_RDONLY | os.O_CLOEXEC))
    except PermissionError:  # roots are private (docs/layout.md): others browse root's mount
        raise UsageError(f"{layout.root} is private to its owner; ask root to mount it with --allow-other "
                         "(contrib/squashfu-mount@.service)") from None
    except FileNotFoundError:
        if not os.path.lexists(layout.config):
            raise UsageError(f"{layout.root} is not a squashfu backup root (no {layout.history.name}); "
                             "run `squashfu init` first") from None
    return history_mod.load(layout.history)  # a root that lost its history.json: refused as damaged
