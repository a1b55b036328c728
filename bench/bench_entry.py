#!/usr/bin/env python3
"""A walk of one day entered through ``latest`` against the same walk through its dated name.

Builds a root (``--files`` small files in directories of 100, a few nights of
1% changes, bins sealed), mounts it with ``squashfu mount`` and, side by side
in one run, walks the newest day the way ``find`` or a backup-of-the-backup
would: ``os.walk`` plus an ``lstat`` of every entry by its full path, so each
path resolves from the mount's top. Entered through ``latest/`` every path
crosses the symlink; through ``YYYY-MM-DD/`` none does. The kernel overlay of
the same day (``squashfu rollback``) is the reference. Warm: medians of
``--rounds`` walks after one unmeasured walk; cold: after ``drop_caches``.

Which pyfuse3 runs the daemon is whichever the interpreter running this
benchmark imports: run it once with the project's ``.venv`` and once with an
interpreter whose pyfuse3 enables ``FUSE_CAP_CACHE_SYMLINKS`` to measure what
symlink caching would give (docs/benchmarks.md says how that build was made).
Run as root: ``.venv/bin/python bench/bench_entry.py --files 40000``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

SQUASHFU = [sys.executable, "-m", "squashfu_fs.cli"]


def make_source(src: Path, files: int, rng: random.Random) -> list[Path]:
    paths = []
    for i in range(files):
        d = src / f"dir{i // 100:04d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        p = d / f"file{i:06d}.dat"
        p.write_bytes(rng.randbytes(rng.randint(64, 2048)))
        paths.append(p)
    return paths


def walk(top: str) -> int:
    """os.walk, and an lstat of every entry by its full path from the mount's top; returns the count."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            count += 1
    return count


def timed_walk(top: str, *, cold: bool) -> tuple[float, int]:
    if cold:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    start = time.perf_counter()
    count = walk(top)
    return time.perf_counter() - start, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=40_000)
    ap.add_argument("--nights", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/squashfu-bench-entry"))
    args = ap.parse_args()
    import pyfuse3

    print(f"pyfuse3 {pyfuse3.__version__} from {pyfuse3.__file__}")
    rng = random.Random(7)
    shutil.rmtree(args.dir, ignore_errors=True)
    src, root, fuse_mp, kernel_mp = (args.dir / n for n in ("src", "root", "fuse", "kernel"))
    paths = make_source(src, args.files, rng)
    subprocess.run([*SQUASHFU, "init", str(root), "--source", str(src)], check=True, stdout=subprocess.DEVNULL)
    night = datetime(2026, 11, 2, 2, 0)
    for n in range(args.nights):
        if n:
            for p in rng.sample(paths, len(paths) // 100):
                p.write_bytes(rng.randbytes(rng.randint(64, 2048)))
        env = {**os.environ, "SQUASHFU_NOW": (night + timedelta(days=n)).isoformat()}
        subprocess.run([*SQUASHFU, "-r", str(root), "backup"], check=True, env=env, stdout=subprocess.DEVNULL)
    fuse_mp.mkdir()
    kernel_mp.mkdir()
    subprocess.run([*SQUASHFU, "-r", str(root), "mount", str(fuse_mp)], check=True)
    try:
        day = os.readlink(fuse_mp / "latest")
        subprocess.run([*SQUASHFU, "-r", str(root), "rollback", "latest", str(kernel_mp)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            measure(args, {"dated": str(fuse_mp / day), "latest": str(fuse_mp / "latest"),
                           "kernel": str(kernel_mp)})
        finally:
            subprocess.run([*SQUASHFU, "umount", str(kernel_mp)], check=True)
    finally:
        subprocess.run([*SQUASHFU, "umount", str(fuse_mp)], check=True)
    shutil.rmtree(args.dir, ignore_errors=True)


def measure(args: argparse.Namespace, tops: dict[str, str]) -> None:
    """Warm and cold walks of each entry point, alternating who goes first; medians and ratios."""
    for top in tops.values():
        walk(top)  # warm every cache once
    results: dict[tuple[str, bool], list[float]] = {}
    counts = set()
    for r in range(args.rounds):
        order = list(tops) if r % 2 == 0 else list(reversed(tops))
        for cold in (False, True):
            for name in order:
                seconds, count = timed_walk(tops[name], cold=cold)
                counts.add(count)
                results.setdefault((name, cold), []).append(seconds)
    assert len(counts) == 1, f"the entry points saw different trees: {counts}"
    print(f"{counts.pop()} entries, {args.rounds} rounds, medians:")
    for cold in (False, True):
        med = {name: statistics.median(results[(name, cold)]) for name in tops}
        label = "cold" if cold else "warm"
        print(f"  {label}: dated {med['dated']:.3f} s, latest {med['latest']:.3f} s, kernel {med['kernel']:.3f} s;"
              f" latest/dated {med['latest'] / med['dated']:.2f} (goal <= 1.3),"
              f" kernel/dated {med['kernel'] / med['dated']:.2f}, kernel/latest {med['kernel'] / med['latest']:.2f}")


if __name__ == "__main__":
    main()
