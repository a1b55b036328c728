"""Telling a live process from a dead one whose PID was reused: its start time."""

from __future__ import annotations


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
