"""The time-travel daemons reading a backup root, and which history each has seen.

A resquash deletes the absorbed bins right after it commits. A daemon that
has not yet noticed the new history could still resolve names through them
and answer wrongly, then let the kernel cache that answer. So each daemon
records the root it serves and the history generation it has loaded, and a
resquash waits (briefly, never for a dead or hung daemon) until every live
reader of its root has caught up before it deletes anything. The root is
recorded by device and inode: a daemon started through ``/backup`` (a
symlink or a bind mount) serves the same root as a resquash run on
``/srv/backup``.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

from .errors import SquashfuError
from .history import atomic_write
from .system import process_start_time

SEEN = "seen.json"


def state_root() -> Path:
    """Where daemons keep their pid files, private seed mounts and what they have seen."""
    if os.geteuid() == 0:
        return Path("/run/squashfu")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "squashfu" if runtime else Path(f"/tmp/squashfu-{os.getuid()}")


def make_state_dir(state: Path) -> None:
    """Create a daemon's directory below a state root that only this user can write.

    A normal user's root may sit in /tmp, where anyone could have made it
    first, or made it a symlink; its seed mounts and pid file must not be
    steered elsewhere.
    """
    home = state.parent
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(home)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise SquashfuError(f"{home} is not a private directory of this user; remove it and try again")
    state.mkdir(mode=0o700, exist_ok=True)


def acknowledge(state: Path, root: Path, generation: int) -> None:
    """A daemon says it now serves ``root`` at history ``generation``."""
    pid = os.getpid()
    st = os.stat(root)
    record = {"root": os.fspath(root), "dev": st.st_dev, "ino": st.st_ino, "generation": generation, "pid": pid,
              "start": process_start_time(pid)}
    atomic_write(state / SEEN, json.dumps(record).encode())


def lagging(root: Path, generation: int) -> list[int]:
    """PIDs of live daemons serving ``root`` that have not loaded ``generation`` yet."""
    st = os.stat(root)
    out = []
    for seen in _state_dirs():
        try:
            record = json.loads((seen / SEEN).read_text())
            if "dev" in record:
                same = (record["dev"], record["ino"]) == (st.st_dev, st.st_ino)
            else:  # written by an older daemon: its text is all there is
                same = os.path.realpath(record["root"]) == os.path.realpath(root)
            if not same or record["generation"] >= generation:
                continue
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if process_start_time(pid) == record.get("start"):
            out.append(pid)
    return out


def wait_for(root: Path, generation: int, timeout: float = 3.0) -> list[int]:
    """Wait until every live reader of ``root`` has seen ``generation``; returns those that did not."""
    deadline = time.monotonic() + timeout
    while True:
        late = lagging(root, generation)
        if not late or time.monotonic() >= deadline:
            return late
        time.sleep(0.05)


def _state_dirs() -> list[Path]:
    homes = [Path("/run/squashfu"), *Path("/run/user").glob("*/squashfu"), *Path("/tmp").glob("squashfu-*")]
    return [d for home in homes if home.is_dir() for d in home.iterdir() if d.is_dir()]
