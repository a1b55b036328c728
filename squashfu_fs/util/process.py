"""Telling a live process from a dead one whose PID was reused: its start time.

Every record that names a process (a daemon's pid file and ``seen.json``, a
restore's roll-back record) stores its PID with its start time and asks
:func:`alive` before trusting it, so a PID the kernel handed to someone else
never keeps a layer or a mount alive.
"""

from __future__ import annotations

import os
import time

from squashfu_fs.errors import SquashfuError


def require_root(what: str) -> None:
    """Kernel loop and overlay mounts need root; say so instead of failing later."""
    if os.geteuid() != 0:
        raise SquashfuError(f"{what} needs root (kernel loop and overlay mounts); run it with sudo")


def process_start_time(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat), so a reused PID is not mistaken for it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] == b"Z":
        return None
    return fields[19].decode()


def identity(pid: int | None = None) -> str:
    """``"PID STARTTIME"`` of a process (this one by default): how a record names its owner."""
    pid = os.getpid() if pid is None else pid
    return f"{pid} {process_start_time(pid)}"


def alive(pid: int, start: object) -> bool:
    """Whether process ``pid`` that started at ``start`` still runs (not a later process with its PID)."""
    return start is not None and process_start_time(pid) == start


def alive_pid(ident: str) -> int | None:
    """The PID an :func:`identity` names if that very process still runs; None if it died or ``ident`` is bad."""
    try:
        pid_text, start = ident.split()
        pid = int(pid_text)
    except ValueError:
        return None
    return pid if alive(pid, start) else None


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (its children, theirs, ...), from /proc; parents first."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue  # gone meanwhile
        ppid = int(data[data.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop(0)
        out.append(child)
        todo += children.get(child, [])
    return out


def wait_gone(processes: list[tuple[int, str | None]], timeout: float) -> bool:
    """Wait until none of ``processes`` (PID, start time) runs; a zombie is gone. False if some still run."""
    deadline = time.monotonic() + timeout
    while any(alive(pid, start) for pid, start in processes):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def command_name(pid: int) -> str | None:
    """A process's command name (/proc/PID/comm), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None
