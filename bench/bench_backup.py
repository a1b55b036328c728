#!/usr/bin/env python3
"""Nightly incremental backup time: squashfu against plain rsync into a directory.

Same source, same nightly change (1% of the files rewritten), both run each
round in alternating order; prints per-round times, medians and the ratio.
squashfu runs with ``-v`` and its lines are stamped, so each night is split
into walk, copy and sealing (see ``timed_backup``) and the share of the night
spent sealing is reported; ``--no-seal`` sets ``seal = false`` for a
comparison, ``--mounted`` keeps ``squashfu mount`` of the root running.
Run as root: `make bench` or `.venv/bin/python bench/bench_backup.py --files 100000`.
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
    """``files`` small files (0.5–8 KiB) in directories of 100, like a home directory."""
    paths = []
    for i in range(files):
        d = src / f"dir{i // 100:04d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        p = d / f"file{i:06d}.dat"
        p.write_bytes(rng.randbytes(rng.randint(512, 8192)))
        paths.append(p)
    return paths


def change(paths: list[Path], fraction: float, rng: random.Random, night: int) -> None:
    """Rewrite ``fraction`` of the files with new content and a new size."""
    for p in rng.sample(paths, int(len(paths) * fraction)):
        p.write_bytes(rng.randbytes(rng.randint(512, 8192)) + b"night %d" % night)


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def timed_backup(argv: list[str], env: dict[str, str], marks: tuple[str, ...] = ()) -> tuple[float, dict[str, float]]:
    """Run a verbose ``squashfu backup``: its whole time, and its phases from the lines it says.

    stderr is read as it is written (``say`` flushes each line), so each line
    is stamped when squashfu said it. Phases: ``walk`` (start to "backing up
    into bin": start-up, lock, recovery, the source walk and the manifest),
    ``copy`` (to "committed bin": rsync straight into the bin, or through a
    union of the layers on a full night, repairs, the commit), ``sealing``
    ("sealing bin" to "sealed bin"); each of ``marks`` when squashfu said it.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    stamps: dict[str, float] = {}
    lines = []
    for line in proc.stderr:
        now = time.perf_counter() - start
        lines.append(line)
        for key in ("backing up into bin", "committed bin", "sealing bin", "sealed bin", *marks):
            if f"squashfu: {key} " in line and (key == "sealed bin" or key not in stamps):
                stamps[key] = now  # the first bin sealed to the last one, when an older root seals several
    if proc.wait() != 0:
        sys.stderr.write("".join(lines))
        raise subprocess.CalledProcessError(proc.returncode, argv)
    total = time.perf_counter() - start
    walked = stamps.get("backing up into bin", 0.0)
    phases = {"walk": walked, "copy": stamps.get("committed bin", walked) - walked,
              "sealing": stamps.get("sealed bin", 0.0) - stamps.get("sealing bin", 0.0),
              **{mark: stamps.get(mark, 0.0) for mark in marks}}
    return total, phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--changed", type=float, default=0.01)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/squashfu-bench-backup"))
    ap.add_argument("--full", action="store_true",
                    help="run `backup --full` (rsync compares the whole union) instead of using the manifest")
    ap.add_argument("--keep", action="store_true", help="leave the source and the root in --dir afterwards")
    ap.add_argument("--no-seal", action="store_true", help="set `seal = false`: bins stay directories")
    ap.add_argument("--mounted", action="store_true",
                    help="keep `squashfu mount` of the root running through the nights (its daemon holds every image)")
    args = ap.parse_args()
    rng = random.Random(42)
    shutil.rmtree(args.dir, ignore_errors=True)
    src, root, plain = args.dir / "src", args.dir / "root", args.dir / "plain"
    t0 = time.perf_counter()
    paths = make_source(src, args.files, rng)
    print(f"source: {args.files} files, {sum(p.stat().st_size for p in paths) / 2**20:.0f} MiB, "
          f"made in {time.perf_counter() - t0:.1f} s")
    subprocess.run([*SQUASHFU, "init", str(root), "--source", str(src)], check=True, stdout=subprocess.DEVNULL)
    if args.no_seal:
        with open(root / "squashfu.toml", "a") as f:
            f.write("seal = false\n")
    night = datetime(2026, 11, 2, 2, 0)
    env = {**os.environ, "SQUASHFU_NOW": night.isoformat()}
    seed_time = timed([*SQUASHFU, "-r", str(root), "backup"], env)
    full_rsync = timed(["rsync", "-aHAX", "--delete", f"{src}/", f"{plain}/"])
    print(f"first backup (seed): squashfu {seed_time:.2f} s, rsync into a directory {full_rsync:.2f} s")
    view = args.dir / "view"
    if args.mounted:
        view.mkdir()
        subprocess.run([*SQUASHFU, "-r", str(root), "mount", str(view)], check=True)
    try:
        nights(args, paths, rng, root, src, plain, night)
    finally:
        if args.mounted:
            subprocess.run([*SQUASHFU, "umount", str(view)], check=True)
    listing = subprocess.run([*SQUASHFU, "-r", str(root), "list"], check=True, capture_output=True, text=True)
    print(listing.stdout.splitlines()[-1])
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


def nights(args: argparse.Namespace, paths: list[Path], rng: random.Random, root: Path, src: Path, plain: Path,
           night: datetime) -> None:
    """The timed nights after the seed: squashfu and plain rsync, alternating who goes first."""
    ours, theirs, sealing, unions = [], [], [], []
    for n in range(1, args.rounds + 1):
        change(paths, args.changed, rng, n)
        night += timedelta(days=1)
        env = {**os.environ, "SQUASHFU_NOW": night.isoformat()}
        subprocess.run(["sync"], check=True)
        full = ["--full"] if args.full else []
        order = ["squashfu", "rsync"]
        if n % 2 == 0:
            order.reverse()  # alternate who reads the freshly changed source first
        times = {}
        for name in order:
            if name == "squashfu":
                times[name], phases = timed_backup([*SQUASHFU, "-r", str(root), "backup", "-v", *full], env)
            else:
                times[name] = timed(["rsync", "-aHAX", "--delete", f"{src}/", f"{plain}/"])
        ours.append(times["squashfu"])
        theirs.append(times["rsync"])
        sealing.append(phases["sealing"])
        unions.append(phases["copy"])
        print(f"night {n}: squashfu {times['squashfu']:.3f} s (walk {phases['walk']:.3f}, copy {phases['copy']:.3f}, "
              f"sealing {phases['sealing']:.3f} s), "
              f"rsync {times['rsync']:.3f} s, ratio {times['squashfu'] / times['rsync']:.2f}", flush=True)
    mo, mt, ms = statistics.median(ours), statistics.median(theirs), statistics.median(sealing)
    mode = "backup --full" if args.full else "backup (manifest)"
    if args.no_seal:
        mode += ", seal = false"
    if args.mounted:
        mode += ", history mounted throughout"
    print(f"{mode}, median of {args.rounds}: squashfu {mo:.3f} s, plain rsync {mt:.3f} s, "
          f"ratio {mo / mt:.2f} (goal <= 1.3)")
    rest = statistics.median(o - s for o, s in zip(ours, sealing, strict=True))
    print(f"sealing, median of {args.rounds}: {ms:.3f} s, {ms / mo:.0%} of squashfu's median night; "
          f"the night without it: median {rest:.3f} s, ratio {rest / mt:.2f}")
    print(f"copying (rsync into the bin, or the union on a full night) and committing, median: "
          f"{statistics.median(unions):.3f} s")


if __name__ == "__main__":
    main()
