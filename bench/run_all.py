#!/usr/bin/env python3
"""`make bench`: every benchmark in this directory, one after the other, at full size.

They need root (real mounts) and a quiet machine; each prints its own figures
and ratios. Pass-through arguments are not supported: run a benchmark directly
to change its sizes (see its --help).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = [
    ["bench_backup.py"],
    ["bench_backup.py", "--full"],
    ["bench_remote.py"],
    ["bench_fuse.py"],
    ["bench_verify.py"],
    ["bench_entry.py"],
    ["bench_queries.py"],
    ["bench_mounts.py"],
]


def main() -> int:
    here = Path(__file__).resolve().parent
    failed = 0
    for argv in BENCHMARKS:
        print(f"\n=== {' '.join(argv)}", flush=True)
        failed += subprocess.run([sys.executable, str(here / argv[0]), *argv[1:]], check=False).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
