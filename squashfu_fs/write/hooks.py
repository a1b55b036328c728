"""The administrator's hooks around a backup: ``before_backup``, ``after_backup``, ``on_error``.

Each is a command line from ``squashfu.toml``, run with ``/bin/sh -c`` (the
one shell squashfu runs; engines/run.py ``run_shell``) with the root, the
exit status and the committed layer in its environment, its output appended
to the night's log, and killed with its process group at ``hook_timeout``
(docs/operations.md, "Hooks").
"""

from __future__ import annotations

import os
from pathlib import Path

from squashfu_fs.engines.run import run_shell
from squashfu_fs.errors import describe
from squashfu_fs.store.config import Config
from squashfu_fs.util.say import say


class Hooks:
    """The hooks of one backup run, writing what they print into that run's log."""

    def __init__(self, root: Path, config: Config, log_file: Path) -> None:
        self.root = root
        self.config = config
        self.log_file = log_file

    def run(self, name: str, *, status: int | None = None, layer: str = "") -> str | None:
        """Run hook ``name`` if configured; None when it succeeded (or is not set), else why it failed, one line."""
        command: str | None = getattr(self.config, name)
        if command is None:
            return None
        env = dict(os.environ)
        env.update(SQUASHFU_ROOT=str(self.root), SQUASHFU_LAYER=layer, SQUASHFU_HOOK=name)
        if status is None:
            env.pop("SQUASHFU_STATUS", None)
        else:
            env["SQUASHFU_STATUS"] = str(status)
        try:
            return self._run(name, command, env)
        except OSError as exc:  # the log cannot be written, /bin/sh is missing: the hook did not run
            return f"hook {name} could not run: {describe(exc)}"

    def _run(self, name: str, command: str, env: dict[str, str]) -> str | None:
        self.log_file.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        problem: str | None
        try:
            os.write(fd, f"squashfu: hook {name}: running {command!r}\n".encode())
            result = run_shell(command, env=env, timeout=self.config.hook_timeout, output=fd)
            if result.timed_out:
                problem = (f"hook {name} was killed after hook_timeout ({self.config.hook_timeout} s); "
                           f"see {self.log_file}")
            elif result.returncode != 0:
                problem = f"hook {name} failed (exit {_status(result.returncode)}); see {self.log_file}"
            else:
                problem = None
            os.write(fd, f"squashfu: {problem or f'hook {name}: exit 0'}\n".encode())
        finally:
            os.close(fd)
        return problem

    def warn(self, name: str, *, status: int | None = None, layer: str = "") -> None:
        """Run a hook whose failure changes nothing but a warning line (``on_error``)."""
        problem = self.run(name, status=status, layer=layer)
        if problem:
            say(True, problem)


def _status(returncode: int) -> str:
    """A shell's status as the shell would show it: 127, or 'signal 9' for one killed by a signal."""
    return f"signal {-returncode}" if returncode < 0 else str(returncode)
