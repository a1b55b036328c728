"""Machine-readable runs (docs/operations.md): ``backup``/``verify``/``list --json`` and ``metrics_file``.

Every object is parsed from the real CLI's output; the metrics file is read
with a strict parser of Prometheus's text format written here, not with
squashfu's own, and checked against ``history.json`` and ``list --json``.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from .harness import history, squashfu

pytestmark = pytest.mark.mounts

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{root="((?:[^"\\\n]|\\["\\n])*)"\} (\S+)$')


def prometheus(text: str) -> dict[str, float]:
    """The samples of a textfile-collector file; any line the text format does not allow fails the test."""
    assert text.endswith("\n"), "the last line must end with a newline"
    helped, typed, samples = set(), set(), {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split(" ")[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind == "gauge", line
            typed.add(name)
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name = match.group(1)
            assert name in helped and name in typed, f"{name} has no HELP/TYPE before it"
            assert name not in samples, f"{name} twice"
            samples[name] = float(match.group(3))
    return samples


def make_root(scratch: Path, **settings: str | int) -> tuple[Path, Path, Path]:
    """A source, a root with ``metrics_file`` (and ``settings``) in its config, and the metrics path."""
    src, root, metrics = scratch / "src", scratch / "root", scratch / "textfile" / "squashfu.prom"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.txt").write_text("alpha\n" * 100)
    metrics.parent.mkdir()
    squashfu("init", root, "--source", src)
    config = root / "squashfu.toml"
    extra = {"metrics_file": str(metrics), **settings}
    config.write_text(config.read_text() + "".join(f"{k} = {json.dumps(v)}\n" for k, v in extra.items()))
    return src, root, metrics


def run_json(*args: str | os.PathLike[str], expect: int, now: str | None = None) -> tuple[Any, list[str]]:
    """The one JSON object on stdout (None when stdout is empty) and the lines on stderr."""
    proc: subprocess.CompletedProcess[str] = squashfu(*args, now=now, expect=expect)
    assert "Traceback" not in proc.stderr, proc.stderr
    return (json.loads(proc.stdout) if proc.stdout.strip() else None), proc.stderr.strip().splitlines()


def stderr_object(lines: list[str]) -> dict[str, Any]:
    """Under --json an error is one JSON object, the last line on stderr."""
    assert lines, "no error object on stderr"
    data: dict[str, Any] = json.loads(lines[-1])
    return data


def epoch(when: str) -> float:
    return datetime.fromisoformat(when).astimezone().timestamp()


def test_backup_json_and_metrics_for_success_warning_and_failure(scratch: Path) -> None:
    src, root, metrics = make_root(scratch)
    summary, err = run_json("-r", root, "backup", "--json", expect=0, now="2026-11-02T02:00")
    assert err == []
    seed = history(root)["seed"]
    assert summary["command"] == "backup" and summary["status"] == "ok" and summary["exit_status"] == 0
    assert summary["layer"] == "seed" and summary["time"] == seed["time"] and summary["root"] == str(root)
    assert summary["unreadable"] == 0 and summary["vanished"] == 0 and summary["retention"] == "not needed"
    assert summary["duration"] >= 0 and summary["log"] is None  # an empty log is not kept
    assert summary["files_changed"] == seed["files"] == 2 and summary["message"] is None

    (src / "docs" / "a.txt").write_text("changed\n" * 1000)
    summary, _ = run_json("-r", root, "backup", "--json", expect=0, now="2026-11-03T02:00")
    newest = history(root)["bins"][-1]
    assert summary["layer"] == "1" and summary["files_changed"] == newest["files"] == 1
    assert summary["bytes_changed"] == newest["bytes"] > 0
    m = prometheus(metrics.read_text())
    listed, _ = run_json("-r", root, "list", "--json", expect=0)
    assert listed["command"] == "list" and listed["status"] == "ok" and listed["exit_status"] == 0
    assert m["squashfu_backup_last_status"] == 0 and m["squashfu_layers"] == 2
    assert m["squashfu_repository_bytes"] == listed["totals"]["all"]
    assert m["squashfu_backup_last_success_timestamp_seconds"] == epoch("2026-11-03T02:00")
    assert m["squashfu_backup_last_bytes_changed"] == newest["bytes"]
    assert stat.S_IMODE(metrics.stat().st_mode) == 0o644  # node_exporter is not root

    # a warning: a 0:0 character device cannot be stored (exit 3), the night is committed all the same
    os.mknod(src / "whiteout-lookalike", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    summary, err = run_json("-r", root, "backup", "--json", expect=3, now="2026-11-04T02:00")
    assert summary["status"] == "warning" and summary["exit_status"] == 3 and summary["layer"] == "2"
    assert summary["unreadable"] == 1 and "could not be backed up" in summary["message"]
    error = stderr_object(err)
    assert error == {"command": "backup", "status": "warning", "exit_status": 3, "error": summary["message"]}
    m = prometheus(metrics.read_text())
    assert m["squashfu_backup_last_status"] == 3 and m["squashfu_layers"] == 3
    assert m["squashfu_backup_last_success_timestamp_seconds"] == epoch("2026-11-04T02:00")
    os.unlink(src / "whiteout-lookalike")

    # a failure: the source's disk is missing; nothing committed, the last success stays where it was
    before = (root / "history.json").read_bytes()
    src.rename(scratch / "unmounted")
    summary, err = run_json("-r", root, "backup", "--json", expect=2, now="2026-11-05T02:00")
    assert summary["status"] == "failed" and summary["exit_status"] == 2 and summary["layer"] is None
    assert summary["retention"] is None and "missing" in summary["message"]
    assert stderr_object(err) == {"command": "backup", "status": "failed", "exit_status": 2,
                                  "error": summary["message"]}
    assert len(err) == 1
    assert (root / "history.json").read_bytes() == before
    m = prometheus(metrics.read_text())
    assert m["squashfu_backup_last_status"] == 2 and m["squashfu_layers"] == 3
    assert m["squashfu_backup_last_run_timestamp_seconds"] == epoch("2026-11-05T02:00")
    assert m["squashfu_backup_last_success_timestamp_seconds"] == epoch("2026-11-04T02:00")


def test_verify_json_and_metrics_keep_the_backup_metrics(scratch: Path) -> None:
    src, root, metrics = make_root(scratch)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    (src / "docs" / "a.txt").write_text("changed\n" * 1000)
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    report, err = run_json("-r", root, "verify", "--json", "--no-progress", expect=0, now="2026-11-03T03:00")
    assert err == [] and report["command"] == "verify" and report["status"] == "ok" and report["exit_status"] == 0
    m = prometheus(metrics.read_text())
    assert m["squashfu_verify_last_status"] == 0 and m["squashfu_layers"] == 2
    assert m["squashfu_verify_last_success_timestamp_seconds"] == epoch("2026-11-03T03:00")
    assert m["squashfu_backup_last_success_timestamp_seconds"] == epoch("2026-11-03T02:00")

    image = root / "bins" / "1.sfs"
    data = bytearray(image.read_bytes())
    data[100] ^= 0xFF
    image.write_bytes(bytes(data))
    report, err = run_json("-r", root, "verify", "--json", "--no-progress", expect=1, now="2026-11-03T04:00")
    assert report["status"] == "damaged" and report["exit_status"] == 1
    error = stderr_object(err)
    assert error["command"] == "verify" and error["status"] == "failed" and error["exit_status"] == 1
    assert "bin 1" in error["error"]
    m = prometheus(metrics.read_text())
    assert m["squashfu_verify_last_status"] == 1
    assert m["squashfu_verify_last_run_timestamp_seconds"] == epoch("2026-11-03T04:00")
    assert m["squashfu_verify_last_success_timestamp_seconds"] == epoch("2026-11-03T03:00")
    assert m["squashfu_backup_last_status"] == 0


@pytest.mark.parametrize("command", ["list", "verify", "backup", "deleted"])
def test_json_errors_are_one_object_on_stderr(scratch: Path, command: str) -> None:
    (scratch / "not-a-root").mkdir()
    out, err = run_json("-r", scratch / "not-a-root", command, "--json", expect=2)
    assert len(err) == 1
    error = stderr_object(err)
    assert error["command"] == command and error["status"] == "failed" and error["exit_status"] == 2
    if command == "backup":  # a backup's summary is printed whether or not it committed
        assert out["status"] == "failed" and out["layer"] is None and out["message"] == error["error"]
    else:
        assert out is None
    assert "not a squashfu backup root" in error["error"]


def test_the_metrics_file_is_replaced_atomically_never_through_a_symlink(scratch: Path) -> None:
    src, root, metrics = make_root(scratch)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    with open(metrics) as old:  # a collector reading the old file while it is replaced
        old_inode = os.fstat(old.fileno()).st_ino
        (src / "new.txt").write_text("new\n")
        squashfu("-r", root, "backup", now="2026-11-03T02:00")
        assert os.stat(metrics).st_ino != old_inode  # a new file renamed into place, not rewritten in place
        assert prometheus(old.read())["squashfu_layers"] == 1  # the reader still sees a whole file
    assert prometheus(metrics.read_text())["squashfu_layers"] == 2
    assert sorted(p.name for p in metrics.parent.iterdir()) == ["squashfu.prom"]  # no temporary file left

    # someone who can write the collector's directory plants a symlink at the metrics path
    victim = scratch / "victim"
    victim.write_text("precious\n")
    metrics.unlink()
    metrics.symlink_to(victim)
    (src / "newer.txt").write_text("newer\n")
    squashfu("-r", root, "backup", now="2026-11-04T02:00")
    assert victim.read_text() == "precious\n"
    assert not metrics.is_symlink() and prometheus(metrics.read_text())["squashfu_layers"] == 3


def test_backup_json_refuses_dry_run(scratch: Path) -> None:
    _, root, _ = make_root(scratch)
    proc = squashfu("-r", root, "backup", "--json", "--dry-run", expect=2)
    assert "cannot be combined" in proc.stderr
