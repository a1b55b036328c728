#!/usr/bin/env python3
"""The history queries against their goals (issue 9): ``diff``, ``deleted``, ``versions``; borg and restic diff.

Phases, each on a fresh history under ``--dir``:

1. ``diff``/``deleted`` on a 10k- and a 100k-file tree (bench_backup's
   generator: small random files in directories of 100), ``--nights`` backups
   with the same change each night whatever the tree's size (``--changed``
   files rewritten, ``--added`` new, ``--deleted`` removed). borg and restic
   back up the last two nights' states too (bench_peers' settings). Timed,
   medians of ``--rounds``: ``squashfu diff`` of the last two days (the
   whole command, and in-process: opening the layers, then the query),
   ``borg diff`` and ``restic diff`` of the same two states, ``squashfu
   deleted``, and a warm ``os.walk`` + ``lstat`` of one day through a
   kernel roll-back of ``latest`` (walked once untimed first).
2. ``versions`` of one path across ``--layers`` bins (a 10k tree; the path
   is rewritten every third night), the whole command and in-process.

The queries answer from the layers' catalogues (checked: nothing mounted);
"mounted" rows run the same query on the root with its catalogues moved
aside, as a root of older code is read.

Run as root, under the benchmark lock, from the checkout to measure:
``flock /tmp/squashfu-bench.lock /work/main/.venv/bin/python bench/bench_queries.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_backup import make_source
from bench_peers import FIRST_NIGHT, SQUASHFU, Borg, Restic, cleanup, mounts_under, prepare_dir, run, timed

from squashfu_fs.read.file_history import deleted_paths, versions_of
from squashfu_fs.read.history_layers import opened_history
from squashfu_fs.read.layerdiff import diff_layers
from squashfu_fs.store.views import ViewTable


def day(night: int) -> str:
    return (FIRST_NIGHT + timedelta(days=night)).strftime("%Y-%m-%d")


def backup(root: Path, night: int) -> None:
    when = FIRST_NIGHT + timedelta(days=night)
    run([*SQUASHFU, "-r", str(root), "backup"], {**os.environ, "SQUASHFU_NOW": when.isoformat()})


def churn(paths: list[Path], args: argparse.Namespace, rng: random.Random, night: int) -> None:
    """The same change on any tree: rewrite, add and delete fixed numbers of files."""
    for p in rng.sample(paths, args.changed):
        p.write_bytes(rng.randbytes(rng.randint(512, 8192)) + b"night %d" % night)
    for p in rng.sample(paths, args.deleted):
        p.unlink()
        paths.remove(p)
    for i in range(args.added):
        p = paths[rng.randrange(len(paths))].parent / f"new-{night}-{i}.dat"
        p.write_bytes(rng.randbytes(rng.randint(512, 8192)))
        paths.append(p)


def median(fn: Callable[[], object], rounds: int) -> float:
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def walk(top: Path) -> int:
    n = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return n


def warm_walk(root: Path, mp: Path, rounds: int) -> tuple[float, int]:
    """A warm walk of ``latest`` through a kernel roll-back (walked once untimed)."""
    mp.mkdir(exist_ok=True)
    run([*SQUASHFU, "-r", str(root), "rollback", "latest", str(mp)])
    try:
        entries = walk(mp)
        return median(lambda: walk(mp), rounds), entries
    finally:
        run([*SQUASHFU, "umount", str(mp)])


def opening(root: Path, rounds: int) -> float:
    """Opening every layer of the newest state through the mounts (the private view), with no query."""
    def once() -> None:
        with opened_history(root, "bench", lambda t: t.resolve("latest")):
            pass
    return median(once, rounds)


def without_catalogues(root: Path, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run on the root as an older version left it: no catalogues, so the layers are mounted."""
    def once() -> object:
        (root / "catalogs").rename(root / "catalogs.off")
        try:
            return fn()
        finally:
            (root / "catalogs.off").rename(root / "catalogs")
    return once


def from_catalogues(root: Path, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn``, checked to have mounted nothing (answered from the catalogues alone)."""
    def once() -> object:
        shutil.rmtree(root / ".rollbacks", ignore_errors=True)
        out = fn()
        if (root / ".rollbacks").exists():
            raise SystemExit("a query mounted the layers although every layer has a catalogue")
        return out
    return once


# The command as a user types it: the venv's console script (``python -m`` would add runpy's imports).
_SCRIPT = Path(sys.executable).with_name("squashfu")
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else SQUASHFU


def startup(rounds: int) -> float:
    """The command line's own start: ``squashfu --version``."""
    return median(lambda: run([*COMMAND, "--version"]), rounds)


def floors(rounds: int) -> dict[str, float]:
    """What any click command costs before its own code: the interpreter, and the interpreter with click."""
    return {"python -c pass": median(lambda: run([sys.executable, "-c", "pass"]), rounds),
            "python -c 'import click'": median(lambda: run([sys.executable, "-c", "import click"]), rounds)}


def tree_phase(base: Path, files: int, args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(files)
    work = base / f"tree-{files}"
    work.mkdir()
    src, root = work / "src", work / "root"
    paths = make_source(src, files, rng)
    run([*SQUASHFU, "init", str(root), "--source", str(src), "--max-bins", "64", "--min-bins", "32"])
    borg, restic = Borg(work, src), Restic(work, src)
    borg.init()
    restic.init()
    for night in range(args.nights):
        if night:
            churn(paths, args, rng, night)
        backup(root, night)
        if night >= args.nights - 2:
            for tool in (borg, restic):
                argv, env = tool.backup_argv(night)
                run(argv, env)
    a, b = day(args.nights - 2), day(args.nights - 1)
    out: dict[str, float] = {}
    found = diff_layers(root, a, b, as_json=False)
    out["changes listed"] = len(found.splitlines())
    out["diff (command)"] = median(from_catalogues(root, lambda: run([*COMMAND, "-r", str(root), "diff", a, b])),
                                   args.rounds)
    out["diff (in-process)"] = median(from_catalogues(root, lambda: diff_layers(root, a, b, as_json=False)),
                                      args.rounds)
    out["diff, mounted (in-process)"] = median(without_catalogues(root, lambda: diff_layers(root, a, b,
                                                                                            as_json=False)),
                                               args.rounds)
    out["opening the layers (mounts)"] = opening(root, args.rounds)
    out["deleted (command)"] = median(from_catalogues(root, lambda: run([*COMMAND, "-r", str(root), "deleted"])),
                                      args.rounds)
    out["deleted (in-process)"] = median(from_catalogues(root, lambda: deleted_paths(root, None, as_json=False)),
                                         args.rounds)
    out["deleted, mounted (in-process)"] = median(without_catalogues(root, lambda: deleted_paths(
        root, None, as_json=False)), args.rounds)
    out["command start (--version)"] = startup(args.rounds)
    out["deleted listed"] = len(deleted_paths(root, None, as_json=False).splitlines())
    snaps = [s["short_id"] for s in json.loads(run(["restic", "snapshots", "--json", *restic.pw], restic.env))]
    out["borg diff"] = timed_median(["borg", "diff", f"{borg.repo}::night-{args.nights - 2}",
                                     f"night-{args.nights - 1}"], borg.env, args.rounds)
    out["restic diff"] = timed_median(["restic", "diff", *restic.pw, snaps[-2], snaps[-1]], restic.env, args.rounds)
    out["warm walk of one day (roll-back)"], entries = warm_walk(root, work / "mp", args.rounds)
    out["entries in a day"] = entries
    return out


def timed_median(argv: list[str], env: dict[str, str], rounds: int) -> float:
    return statistics.median(timed(argv, env) for _ in range(rounds))


def versions_phase(base: Path, args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(60)
    work = base / "versions"
    work.mkdir()
    src, root = work / "src", work / "root"
    paths = make_source(src, 10_000, rng)
    watched = paths[0]
    run([*SQUASHFU, "init", str(root), "--source", str(src), "--max-bins", str(args.layers + 4),
         "--min-bins", str(args.layers)])
    backup(root, 0)
    for night in range(1, args.layers + 1):
        for p in rng.sample(paths[1:], 20):
            p.write_bytes(rng.randbytes(rng.randint(512, 8192)))
        if night % 3 == 0:
            watched.write_bytes(b"version %d\n" % night)
        backup(root, night)
    from squashfu_fs.store.history import load

    layers = len(ViewTable.from_history(load(root / "history.json")).snapshots)
    rel = str(watched.relative_to(src))
    out: dict[str, float] = {"states": layers,
                             "versions listed": len(versions_of(root, rel, as_json=False).splitlines())}
    out["versions (command)"] = median(from_catalogues(root, lambda: run([*COMMAND, "-r", str(root), "versions",
                                                                          rel])), args.rounds)
    out["versions (in-process)"] = median(from_catalogues(root, lambda: versions_of(root, rel, as_json=False)),
                                          args.rounds)
    out["versions, mounted (in-process)"] = median(without_catalogues(root, lambda: versions_of(
        root, rel, as_json=False)), args.rounds)
    out["opening the layers (mounts)"] = opening(root, args.rounds)
    out["command start (--version)"] = startup(args.rounds)
    out.update(floors(args.rounds))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/squashfu-bench-queries"))
    parser.add_argument("--sizes", default="10000,100000", help="tree sizes for the diff phase")
    parser.add_argument("--nights", type=int, default=7)
    parser.add_argument("--changed", type=int, default=50)
    parser.add_argument("--added", type=int, default=10)
    parser.add_argument("--deleted", type=int, default=10)
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-versions", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (loop and overlay mounts)")
    # An installed squashfu runs from compiled bytecode; without it every command would compile its modules.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    prepare_dir(args.dir)
    try:
        kernel = subprocess.run(["uname", "-r"], capture_output=True, text=True, check=False).stdout.strip()
        print(f"# {' '.join(sys.argv)}; nproc {os.cpu_count()}; kernel {kernel}")
        for files in map(int, args.sizes.split(",")):
            for name, value in tree_phase(args.dir, files, args).items():
                print(f"{files:>7} files  {name:<36} {value:10.3f}", flush=True)
        if not args.skip_versions:
            for name, value in versions_phase(args.dir, args).items():
                print(f"{'':>7} versions  {name:<33} {value:10.3f}", flush=True)
    finally:
        if mounts_under(args.dir):
            print(f"left mounted: {mounts_under(args.dir)}", file=sys.stderr)
        cleanup(args.dir)
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
