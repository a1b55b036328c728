"""The time-travel daemons reading a backup root, which history each has seen, which layers it reads.

A resquash deletes the absorbed bins right after it commits. A daemon that
has not yet noticed the new history could still resolve names through them,
and a view the kernel still holds (a shell's cwd in an absorbed day) reads
them for as long as it lives; without them it would fall through to an older
layer and show another day's data. So each daemon publishes, in one file
replaced atomically, the root it serves, the history generation it has
loaded and every bin and seed file its live views read. A writer waits
briefly (never for a dead or hung daemon) for readers to catch up, then
deletes only what no live reader may still read (:func:`in_use`); what it
leaves, a later writer's recovery deletes once nobody reads it. The root is
recorded by device and inode: a daemon started through ``/backup`` (a
symlink or a bind mount) serves the same root as a resquash run on
``/srv/backup``. Kernel roll-backs answer the same question in
:mod:`squashfu_fs.store.rollbacks`.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from squashfu_fs.errors import SquashfuError
from squashfu_fs.util import beneath
from squashfu_fs.util.durable import atomic_write
from squashfu_fs.util.process import alive, process_start_time

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


def acknowledge(state: Path, root: Path, generation: int, bins: Iterable[int] = (),
                seeds: Iterable[str] = ()) -> None:
    """A daemon says it serves ``root`` at history ``generation`` (-1: not loaded yet) and reads these layers."""
    pid = os.getpid()
    st = os.stat(root)
    record = {"root": os.fspath(root), "dev": st.st_dev, "ino": st.st_ino, "generation": generation, "pid": pid,
              "start": process_start_time(pid), "bins": sorted(bins), "seeds": sorted(seeds)}
    atomic_write(state / SEEN, json.dumps(record).encode())


@dataclass(frozen=True)
class Reader:
    """One live daemon's published state."""

    pid: int
    generation: int
    bins: frozenset[int] | None  # None: a daemon that does not say (it may read any bin)
    seeds: frozenset[str]


def live_readers(root: Path) -> list[Reader]:
    """The live daemons serving ``root`` and what each last published."""
    st = os.stat(root)
    out = []
    for state in _state_dirs():
        try:
            record = json.loads((state / SEEN).read_text())
            if "dev" in record:
                same = (record["dev"], record["ino"]) == (st.st_dev, st.st_ino)
            else:  # written by an older daemon: its text is all there is
                same = os.path.realpath(record["root"]) == os.path.realpath(root)
            if not same:
                continue
            pid = int(record["pid"])
            bins = record.get("bins")
            reader = Reader(pid, int(record["generation"]), None if bins is None else frozenset(map(int, bins)),
                            frozenset(map(str, record.get("seeds", ()))))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if alive(pid, record.get("start")):
            out.append(reader)
    return out


def lagging(root: Path, generation: int) -> list[int]:
    """PIDs of live daemons serving ``root`` that have not loaded ``generation`` yet."""
    return [r.pid for r in live_readers(root) if r.generation < generation]


def in_use(root: Path, generation: int, candidates: Iterable[int]) -> tuple[set[int], set[str]]:
    """Which of ``candidates`` (bins history ``generation`` no longer names) a live reader may still read.

    A reader that has not loaded ``generation`` may be about to read any bin
    of an older history, so it keeps every candidate; one that has keeps
    what it publishes. Also returns the seed files live readers hold.
    """
    wanted = set(candidates)
    bins: set[int] = set()
    seeds: set[str] = set()
    for reader in live_readers(root):
        seeds |= reader.seeds
        if reader.generation < generation or reader.bins is None:
            bins |= wanted
        else:
            bins |= wanted & reader.bins
    return bins, seeds


def wait_for(root: Path, generation: int, timeout: float = 3.0, unused: Iterable[int] = ()) -> list[int]:
    """Wait until every live reader of ``root`` has seen ``generation`` and reads none of ``unused``.

    Returns the PIDs of those that did not catch up in time (a view the
    kernel still holds may keep a bin longer: see :func:`in_use`).
    """
    wanted = set(unused)
    deadline = time.monotonic() + timeout
    while True:
        late = lagging(root, generation)
        if (not late and not in_use(root, generation, wanted)[0]) or time.monotonic() >= deadline:
            return late
        time.sleep(0.05)


Publish = Callable[[int, Iterable[int], Iterable[str]], None]


@contextmanager
def claimed(root: Path, kind: str) -> Iterator[Publish]:
    """A reader that is not a daemon (``sync``) claims the layers it reads, exactly as a daemon publishes them.

    It starts as "history not loaded yet" (generation -1), which makes every
    writer keep every bin it would delete; the block then publishes
    (generation, bins, seed files) once it has read history. Writers see it
    through :func:`in_use` like any daemon. The claim lives in
    ``STATE_ROOT/KIND-PID`` and is removed when the block ends; one a killed
    process left names a dead process, counts for nothing, and the next claim
    of that kind removes it.
    """
    home = state_root()
    if home.is_dir():
        for old in home.glob(f"{kind}-*"):
            try:
                record = json.loads((old / SEEN).read_text())
                dead = not alive(int(record["pid"]), record.get("start"))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being made right now, or not ours to judge
            if dead:
                remove_state_dir(old)
    state = home / f"{kind}-{os.getpid()}"
    make_state_dir(state)
    try:
        acknowledge(state, root, -1)

        def publish(generation: int, bins: Iterable[int], seeds: Iterable[str]) -> None:
            acknowledge(state, root, generation, bins, seeds)

        yield publish
    finally:
        remove_state_dir(state)


def remove_state_dir(state: Path) -> None:
    """Remove a reader's directory below its state root, which is opened without following a symlink.

    A normal user's state root may sit in /tmp (:func:`make_state_dir`); a
    path removal would follow it wherever someone had pointed it meanwhile.
    """
    try:
        home = os.open(state.parent, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with suppress(OSError):
            beneath.remove_beneath(home, os.fsencode(state.name))
    finally:
        os.close(home)


def _state_dirs() -> list[Path]:
    homes = [Path("/run/squashfu"), *Path("/run/user").glob("*/squashfu"), *Path("/tmp").glob("squashfu-*")]
    return [d for home in homes if home.is_dir() for d in home.iterdir() if d.is_dir()]
