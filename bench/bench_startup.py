#!/usr/bin/env python3
"""What a history query costs as a whole command, against what any click command pays before its own code.

One history of a 10k-file tree with ``--layers`` nightly bins over the seed
(bench_queries' versions phase: 20 files rewritten a night, one path every
third night). Then ``--rounds`` rounds, each running every row once in turn,
so that the machine's noise falls on all rows alike; medians are printed,
and each command's excess over ``python -c 'import click'`` (the floor of a
click command line on this machine).

Rows: ``python -c pass``; ``python -c 'import click'``; for each checkout
(``--checkout DIR``, repeatable; default the one this file is in) the
command line run from that checkout's code with this venv's interpreter:
``--version``, ``versions PATH``, ``diff`` of the last two days,
``deleted``. A checkout of older code reads the same root (catalogues of
format 1 are read by every version that has them).

Run as root, under the benchmark lock:
``flock /tmp/squashfu-bench.lock .venv/bin/python bench/bench_startup.py --checkout /tmp/old --checkout .``
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_backup import make_source
from bench_peers import FIRST_NIGHT, SQUASHFU, cleanup, mounts_under, prepare_dir, run

HERE = Path(__file__).resolve().parent.parent


def build(work: Path, layers: int) -> tuple[Path, str]:
    """A root with ``layers`` bins over its seed; returns it and the path whose versions are asked."""
    rng = random.Random(60)
    src, root = work / "src", work / "root"
    paths = make_source(src, 10_000, rng)
    watched = paths[0]
    run([*SQUASHFU, "init", str(root), "--source", str(src), "--max-bins", str(layers + 4),
         "--min-bins", str(layers)])
    for night in range(layers + 1):
        if night:
            for p in rng.sample(paths[1:], 20):
                p.write_bytes(rng.randbytes(rng.randint(512, 8192)))
            if night % 3 == 0:
                watched.write_bytes(b"version %d\n" % night)
        when = FIRST_NIGHT + timedelta(days=night)
        run([*SQUASHFU, "-r", str(root), "backup"], {**os.environ, "SQUASHFU_NOW": when.isoformat()})
    return root, str(watched.relative_to(src))


def cli_from(checkout: Path) -> list[str]:
    """This interpreter running the command line of ``checkout``'s code, as its console script would."""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(checkout)!r}); "
                                  "from squashfu_fs.cli import run; sys.exit(run())"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/squashfu-bench-startup"))
    parser.add_argument("--checkout", type=Path, action="append", help="a checkout whose code is timed")
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (loop and overlay mounts)")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed squashfu runs from compiled bytecode
    checkouts = [c.resolve() for c in (args.checkout or [HERE])]
    prepare_dir(args.dir)
    try:
        root, watched = build(args.dir, args.layers)
        a = (FIRST_NIGHT + timedelta(days=args.layers - 1)).strftime("%Y-%m-%d")
        b = (FIRST_NIGHT + timedelta(days=args.layers)).strftime("%Y-%m-%d")
        rows: dict[str, list[str]] = {"python -c pass": [sys.executable, "-c", "pass"],
                                      "python -c 'import click'": [sys.executable, "-c", "import click"]}
        for checkout in checkouts:
            cli = cli_from(checkout)
            rows[f"{checkout.name}: --version"] = [*cli, "--version"]
            rows[f"{checkout.name}: versions PATH"] = [*cli, "-r", str(root), "versions", watched]
            rows[f"{checkout.name}: diff (last two days)"] = [*cli, "-r", str(root), "diff", a, b]
            rows[f"{checkout.name}: deleted"] = [*cli, "-r", str(root), "deleted"]
        for argv in rows.values():  # once untimed: bytecode compiled, caches warm
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.rounds):
            for name, argv in rows.items():
                start = time.perf_counter()
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - start)
        kernel = subprocess.run(["uname", "-r"], capture_output=True, text=True, check=False).stdout.strip()
        print(f"# {' '.join(sys.argv)}; nproc {os.cpu_count()}; kernel {kernel}; {args.layers} bins over the seed")
        floor = statistics.median(times["python -c 'import click'"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:<40} {median * 1000:8.1f} ms   {(median - floor) * 1000:+8.1f} ms over click's floor")
    finally:
        if mounts_under(args.dir):
            print(f"left mounted: {mounts_under(args.dir)}", file=sys.stderr)
        cleanup(args.dir)


if __name__ == "__main__":
    main()
