#!/usr/bin/env python3
"""A/B two checkouts' time-travel daemons on one root: raw request rate and first access into each view.

Builds a small root once (20 directories x 500 files, a seed and 5 bins) with
the first checkout, then mounts it with each checkout in turn, alternating for
ROUNDS rounds: the first ``stat`` two levels into every dated view (median),
then three 2-second runs of getxattr of a missing name on one file (median),
the same measures as bench_fuse.py's ``first_access`` and ``request_rate``.
Each checkout runs from its own directory with PYTHONPATH pointing at it
(``python -m`` puts the current directory first on sys.path).

    flock /tmp/squashfu-bench.lock .venv/bin/python bench/ab_daemon.py /work/wt-before /work/main --rounds 4
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path


def squashfu(checkout: str, *args: object, env: dict[str, str] | None = None) -> None:
    full = dict(os.environ, PYTHONPATH=checkout, **(env or {}))
    subprocess.run([sys.executable, "-m", "squashfu_fs", *map(str, args)], check=True, env=full, cwd=checkout,
                   stdout=subprocess.DEVNULL)


def build(checkout: str, base: Path) -> Path:
    src, root = base / "src", base / "root"
    for d in range(20):
        (src / f"d{d:04d}").mkdir(parents=True, exist_ok=True)
        for f in range(500):
            (src / f"d{d:04d}" / f"f{f:06d}").write_text(f"{d} {f}\n")
    squashfu(checkout, "init", root, "--source", src)
    start = datetime(2026, 11, 1, 3)
    for n in range(6):
        (src / f"d{n:04d}" / "f000001").write_text(f"night {n}\n")
        squashfu(checkout, "-r", root, "backup", env={"SQUASHFU_NOW": (start + timedelta(days=n)).isoformat()})
    return root


def rate(path: Path, seconds: float = 2.0) -> float:
    p, n = os.fsencode(path), 0
    t = time.perf_counter()
    stop = t + seconds
    while time.perf_counter() < stop:
        for _ in range(100):
            with contextlib.suppress(OSError):
                os.getxattr(p, "user.squashfu-bench-missing")
        n += 100
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkouts", nargs=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/squashfu-ab"))
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    root, mp = build(args.checkouts[0], args.dir), args.dir / "mp"
    mp.mkdir()
    results: dict[str, list[tuple[float, float]]] = {c: [] for c in args.checkouts}
    try:
        for _ in range(args.rounds):
            for checkout in args.checkouts:
                squashfu(checkout, "-r", root, "mount", mp)
                try:
                    firsts = []
                    for name in sorted(os.listdir(mp)):
                        if name[:1].isdigit():
                            t = time.perf_counter()
                            os.stat(mp / name / "d0001" / "f000002")
                            firsts.append(time.perf_counter() - t)
                    day = os.readlink(mp / "latest")
                    r = statistics.median(rate(mp / day / "d0000" / "f000001") for _ in range(3))
                    f = statistics.median(firsts) * 1000
                    results[checkout].append((r, f))
                    print(f"{checkout}: {r:,.0f} requests/s, first access {f:.2f} ms", flush=True)
                finally:
                    squashfu(checkout, "umount", mp)
    finally:
        for checkout, rows in results.items():
            if rows:
                print(f"{checkout}: median {statistics.median(r for r, _ in rows):,.0f} requests/s, "
                      f"first access {statistics.median(f for _, f in rows):.2f} ms")
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
