#!/usr/bin/env python3
"""Walking a backed-up day through each tool's FUSE mount: squashfu (through ``latest``), borg and restic.

One copy of ``--tree`` (default ``/usr/share``) is backed up once by each
tool with bench_peers' settings, each repository is mounted, and the same
walk (``os.walk`` plus an ``lstat`` of every entry by its full path) is
timed through each mount, side by side: *first* is the first walk after a
fresh mount with the page cache dropped before mounting (every daemon
starts cold), *cold* a later walk after ``drop_caches`` (the kernel's caches
dropped, each daemon's own kept), *warm* the median of ``--rounds`` walks.
squashfu is entered through ``latest/``, as people do. Run as root:
``.venv/bin/python bench/bench_mounts.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_peers import SQUASHFU, Borg, Restic, Squashfu, drop_caches, run


def walk(top: str) -> tuple[float, int]:
    start = time.perf_counter()
    count = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            count += 1
    return time.perf_counter() - start, count


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} never appeared")
        time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tree", type=Path, default=Path("/usr/share"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/squashfu-bench-mounts"))
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    src = args.dir / "src"
    subprocess.run(["cp", "-a", str(args.tree), str(src)], check=True)
    tools = [Squashfu(args.dir, src), Borg(args.dir, src), Restic(args.dir, src)]
    for tool in tools:
        tool.init()
        argv, env = tool.backup_argv(0)
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"{tool.name}: backup {time.perf_counter() - start:.1f} s", flush=True)
    results: dict[str, dict[str, float]] = {}
    for tool in tools:
        mp = args.dir / f"mnt-{tool.name}"
        mp.mkdir()
        drop_caches()
        proc = mount(tool, mp)
        try:
            top = entry_point(tool, mp, src)
            first, count = walk(str(top))
            drop_caches()
            cold, _ = walk(str(top))
            warm = statistics.median(walk(str(top))[0] for _ in range(args.rounds))
            results[tool.name] = {"first": first, "cold": cold, "warm": warm, "entries": count}
            print(f"{tool.name}: {count} entries; first {first:.2f} s, cold {cold:.2f} s, warm {warm:.2f} s"
                  f"{daemon_memory(tool, mp)}", flush=True)
        finally:
            unmount(tool, mp, proc)
    ours = results["squashfu"]
    for name in ("borg", "restic"):
        theirs = results[name]
        print(f"squashfu (latest/) against {name} mount: first {ours['first'] / theirs['first']:.2f}x, "
              f"cold {ours['cold'] / theirs['cold']:.2f}x, warm {ours['warm'] / theirs['warm']:.2f}x "
              "(time ratio; below 1 is faster)")
    shutil.rmtree(args.dir, ignore_errors=True)


def mount(tool: object, mp: Path) -> subprocess.Popen[bytes] | None:
    if isinstance(tool, Squashfu):
        run([*SQUASHFU, "-r", str(tool.repo), "mount", str(mp)], tool.env)
        return None
    if isinstance(tool, Borg):
        run(["borg", "mount", str(tool.repo), str(mp)], tool.env)
        return None
    assert isinstance(tool, Restic)
    proc = subprocess.Popen(["restic", "mount", *tool.pw, str(mp)], env=tool.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(mp / "snapshots" / "latest")
    return proc


def daemon_memory(tool: object, mp: Path) -> str:
    """squashfu's daemon's resident memory after the walks (what it keeps across FORGETs shows here)."""
    if not isinstance(tool, Squashfu):
        return ""
    from squashfu_fs.read.mountd import daemon_pid

    pid = daemon_pid(mp)
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""
    rss = next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), "?")
    return f"; daemon RSS {int(rss) // 1024} MiB" if rss.isdigit() else ""


def entry_point(tool: object, mp: Path, src: Path) -> Path:
    """Where the backed-up tree starts inside each mount."""
    if isinstance(tool, Squashfu):
        return mp / "latest"
    if isinstance(tool, Borg):
        return mp / "night-0" / str(src).lstrip("/")
    return mp / "snapshots" / "latest" / str(src).lstrip("/")


def unmount(tool: object, mp: Path, proc: subprocess.Popen[bytes] | None) -> None:
    if isinstance(tool, Squashfu):
        run([*SQUASHFU, "umount", str(mp)])
    elif isinstance(tool, Borg):
        run(["borg", "umount", str(mp)], tool.env)
    else:
        subprocess.run(["fusermount3", "-u", str(mp)], check=False)
        if proc is not None:
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
