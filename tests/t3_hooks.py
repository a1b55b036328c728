"""Hooks around ``squashfu backup`` (docs/operations.md, "Hooks"), through the real CLI and real mounts.

Each hook writes what it sees (its name, root, status and layer) to a file
the test reads back, so order and environment are what the hooks observed,
not what squashfu says it gave them.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from .harness import CLI, history, one_line, squashfu

pytestmark = pytest.mark.mounts


def make_root(scratch: Path, **settings: str | int) -> tuple[Path, Path]:
    """A source and an initialised root whose squashfu.toml gets ``settings`` appended."""
    src, root = scratch / "src", scratch / "root"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.txt").write_text("alpha\n")
    squashfu("init", root, "--source", src)
    set_config(root, **settings)
    return src, root


def set_config(root: Path, **settings: str | int) -> None:
    """Append TOML settings (strings JSON-escaped, which TOML accepts) to the root's config."""
    config = root / "squashfu.toml"
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    config.write_text(config.read_text() + "".join(line + "\n" for line in lines))


def recorder(record: Path, name: str) -> str:
    """A hook that appends one line: its name, and the environment squashfu gave it."""
    return (f'printf "%s|%s|%s|%s\\n" {name} "$SQUASHFU_ROOT" "${{SQUASHFU_STATUS-unset}}" '
            f'"${{SQUASHFU_LAYER-unset}}" >> {record}; echo "{name} says hello"')


def seen(record: Path) -> list[list[str]]:
    return [line.split("|") for line in record.read_text().splitlines()] if record.exists() else []


def logs(root: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((root / "logs").glob("backup-*.log")))


def test_hooks_run_in_order_with_their_environment(scratch: Path) -> None:
    record = scratch / "record"
    dump = scratch / "src" / "dump.sql"
    src, root = make_root(scratch, before_backup=f"echo 'dumped at night' > {dump}; " + recorder(record, "before"),
                          after_backup=recorder(record, "after"), on_error=recorder(record, "error"))
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    assert seen(record) == [["before", str(root), "unset", ""], ["after", str(root), "0", "seed"]]
    (src / "docs" / "a.txt").write_text("changed\n")
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    assert seen(record)[2:] == [["before", str(root), "unset", ""], ["after", str(root), "0", "1"]]
    assert "before says hello" in logs(root) and "after says hello" in logs(root)
    # what before_backup wrote into the source is in the backup it ran before
    target = scratch / "restored"
    squashfu("-r", root, "restore", "2026-11-02", "dump.sql", "--to", target)
    assert (target / "dump.sql").read_text() == "dumped at night\n"
    # a dry run commits nothing and runs no hook
    squashfu("-r", root, "backup", "--dry-run", now="2026-11-04T02:00")
    assert len(seen(record)) == 4


def test_a_failing_before_backup_commits_nothing_and_runs_on_error(scratch: Path) -> None:
    record = scratch / "record"
    src, root = make_root(scratch, after_backup=recorder(record, "after"), on_error=recorder(record, "error"))
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    set_config(root, before_backup="echo 'pg_dump: connection refused' >&2; exit 7")
    before = (root / "history.json").read_bytes()
    bins_before = sorted(p.name for p in (root / "bins").iterdir())
    (src / "docs" / "a.txt").write_text("changed\n")
    proc = squashfu("-r", root, "backup", now="2026-11-03T02:00", expect=1)
    line = one_line(proc)
    assert "hook before_backup failed (exit 7)" in line and "nothing was backed up" in line, line
    assert (root / "history.json").read_bytes() == before
    assert sorted(p.name for p in (root / "bins").iterdir()) == bins_before
    assert seen(record) == [["after", str(root), "0", "seed"], ["error", str(root), "1", ""]]
    assert "pg_dump: connection refused" in logs(root)
    # with the hook fixed, the next night backs up as usual
    set_config(root, hook_timeout=30)
    config = root / "squashfu.toml"
    config.write_text(config.read_text().replace("exit 7", "exit 0"))
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    assert [b["number"] for b in history(root)["bins"]] == [1]


def test_a_hanging_hook_is_killed_with_its_children_at_its_timeout(scratch: Path) -> None:
    record, pids = scratch / "record", scratch / "pids"
    _, root = make_root(scratch, before_backup=f"sleep 300 & echo $! > {pids}; sleep 300", hook_timeout=1,
                        on_error=recorder(record, "error"))
    proc = squashfu("-r", root, "backup", now="2026-11-02T02:00", expect=1)
    line = one_line(proc)
    assert "hook before_backup was killed after hook_timeout (1 s)" in line, line
    assert history(root)["seed"] is None
    assert seen(record) == [["error", str(root), "1", ""]]
    child = int(pids.read_text())
    deadline = time.monotonic() + 10  # SIGKILL is sent; init reaps the orphan when it gets to it
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), f"the hook's background child {child} outlived it"


def test_squashfu_terminated_during_a_hook_takes_the_hook_down(scratch: Path) -> None:
    record, pids = scratch / "record", scratch / "pids"
    _, root = make_root(scratch, before_backup=f"sleep 300 & echo $! > {pids}; sleep 300",
                        on_error=recorder(record, "error"))
    env = {**os.environ, "SQUASHFU_NOW": "2026-11-02T02:00"}
    proc = subprocess.Popen([*CLI, "-r", str(root), "backup"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (pids.exists() and pids.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, "the hook never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # systemd stopping the unit
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert seen(record) == [["error", str(root), str(128 + signal.SIGTERM), ""]]
    child = int(pids.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), f"the hook's background child {child} outlived squashfu"
    assert history(root)["seed"] is None


def test_a_failing_after_backup_is_a_warning_on_a_committed_night(scratch: Path) -> None:
    record = scratch / "record"
    _, root = make_root(scratch, after_backup="exit 4", on_error=recorder(record, "error"))
    proc = squashfu("-r", root, "backup", now="2026-11-02T02:00", expect=3)
    line = one_line(proc)
    assert line.startswith("squashfu: backup committed; hook after_backup failed (exit 4)"), line
    assert history(root)["seed"] is not None
    assert seen(record) == []  # the night is committed: on_error is for nights that are not


def test_after_backup_gets_status_3_on_a_night_with_a_warning(scratch: Path) -> None:
    record = scratch / "record"
    src, root = make_root(scratch, after_backup=recorder(record, "after"), on_error=recorder(record, "error"))
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    os.mknod(src / "zero-device", stat.S_IFCHR | 0o600, os.makedev(0, 0))  # cannot be stored: exit 3
    squashfu("-r", root, "backup", now="2026-11-03T02:00", expect=3)
    assert seen(record) == [["after", str(root), "0", "seed"], ["after", str(root), "3", "1"]]


def test_a_failing_on_error_keeps_the_status_and_adds_a_line(scratch: Path) -> None:
    _, root = make_root(scratch, before_backup="false", on_error="exit 9")
    proc = squashfu("-r", root, "backup", now="2026-11-02T02:00", expect=1)
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert len(lines) == 2 and "hook on_error failed (exit 9)" in lines[0], lines
    assert "hook before_backup failed (exit 1)" in lines[1], lines


def test_on_error_runs_when_the_source_is_missing(scratch: Path) -> None:
    record = scratch / "record"
    src, root = make_root(scratch, before_backup=recorder(record, "before"), on_error=recorder(record, "error"))
    src.rename(scratch / "unplugged")  # the data disk did not come up: exactly what on_error is for
    line = one_line(squashfu("-r", root, "backup", now="2026-11-02T02:00", expect=2))
    assert "missing or not a directory" in line, line
    assert seen(record) == [["error", str(root), "2", ""]]
    assert history(root)["seed"] is None


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("before_backup", 5, "before_backup must be a string"),
    ("after_backup", " ", "after_backup is empty"),
    ("hook_timeout", 0, "hook_timeout must be between 1 and 86400"),
    ("hook_timeout", "60", "hook_timeout must be an integer"),
    ("metrics_file", "metrics.prom", "metrics_file must be an absolute path"),
    ("metrics_file", "/var/lib/node_exporter/squashfu.txt", "metrics_file must name a file ending in .prom"),
])
def test_bad_hook_settings_are_one_line_and_exit_2(scratch: Path, setting: str, value: str | int,
                                                   message: str) -> None:
    record = scratch / "record"
    _, root = make_root(scratch, on_error=recorder(record, "error"))
    set_config(root, **{setting: value})
    line = one_line(squashfu("-r", root, "backup", now="2026-11-02T02:00", expect=2))
    assert message in line, line
    assert history(root)["seed"] is None and not record.exists()  # the config is refused before any hook


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for init counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
