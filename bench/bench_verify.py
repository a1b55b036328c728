#!/usr/bin/env python3
"""`squashfu verify` against `sha256sum` over the same images (docs/benchmarks.md, "verify against sha256sum").

Builds a root with the real CLI (a seed and a few sealed bins, a few hundred
MiB of images in all) unless given one with --root, then times, in
alternating order, `squashfu verify` (which hashes every image and checks its
superblock and metadata with unsquashfs) and `sha256sum` over exactly the
image files history names. Each is timed cold (`sync` and
`echo 3 > /proc/sys/vm/drop_caches` first) and warm (run once more right
after); medians of --rounds. The goal: verify's throughput at least 0.8 of
sha256sum's. `openssl dgst -sha256` over the same files is timed too, for
reference: it hashes with the same OpenSSL code as Python's hashlib, which
coreutils' sha256sum may not use. Run as root, alone: `flock /tmp/squashfu-bench.lock
.venv/bin/python bench/bench_verify.py`.
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
from pathlib import Path

SQUASHFU = [sys.executable, "-m", "squashfu_fs.cli"]
GOAL = 0.8


def build_root(base: Path, seed_mib: int, nights: int, night_mib: int) -> Path:
    """A root whose images hold ``seed_mib`` MiB, then ``night_mib`` MiB more each night, half compressible."""
    shutil.rmtree(base, ignore_errors=True)
    src, root = base / "src", base / "root"
    src.mkdir(parents=True)
    rng = random.Random(7)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]

    def add(prefix: str, mib: int) -> None:
        for i in range(mib // 4):
            path = src / prefix / f"f{i:04d}"
            path.parent.mkdir(exist_ok=True)
            if i % 2:
                path.write_bytes(rng.randbytes(4 << 20))  # stored as it is: SquashFS cannot shrink it
            else:
                text = b" ".join(rng.choices(words, k=900_000))  # text: compresses about 3:1
                path.write_bytes(text[: 4 << 20])

    add("seed", seed_mib)
    subprocess.run([*SQUASHFU, "init", str(root), "--source", str(src)], check=True, stdout=subprocess.DEVNULL)
    for night in range(nights + 1):
        if night:
            add(f"night{night}", night_mib)
        env = {**os.environ, "SQUASHFU_NOW": f"2026-11-{night + 2:02d}T02:00"}
        subprocess.run([*SQUASHFU, "-r", str(root), "backup", "--no-progress"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    return root


def images(root: Path) -> list[Path]:
    """The images history names: the seed and every sealed bin."""
    h = json.loads((root / "history.json").read_text())
    out = [root / h["seed"]["file"]]
    out += [root / "bins" / f"{b['number']}.sfs" for b in h["bins"] if b["format"] == "sealed"]
    return out


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", type=Path, help="an existing root to verify (default: build one)")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/squashfu-bench-verify"))
    ap.add_argument("--seed-mib", type=int, default=384)
    ap.add_argument("--nights", type=int, default=4)
    ap.add_argument("--night-mib", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--data", action="store_true", help="also time `verify --data` (warm), for the record")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_verify.py needs root (backups, drop_caches)", file=sys.stderr)
        return 1
    root = args.root or build_root(args.dir, args.seed_mib, args.nights, args.night_mib)
    files = images(root)
    total = sum(p.stat().st_size for p in files)
    print(f"root {root}: {len(files)} images, {total / 2**20:.1f} MiB")
    verify = [*SQUASHFU, "-r", str(root), "verify", "--no-progress"]
    sha = ["sha256sum", *map(str, files)]
    runs = {"verify": verify, "sha256sum": sha}
    if shutil.which("openssl"):
        runs["openssl"] = ["openssl", "dgst", "-sha256", *map(str, files)]
    times: dict[tuple[str, str], list[float]] = {(n, m): [] for n in runs for m in ("cold", "warm")}
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            drop_caches()
            cold = timed(runs[name])
            warm = timed(runs[name])
            times[name, "cold"].append(cold)
            times[name, "warm"].append(warm)
            print(f"round {r + 1}: {name:9} cold {cold:6.3f} s  warm {warm:6.3f} s", flush=True)
    ok = True
    for mode in ("cold", "warm"):
        ours = statistics.median(times["verify", mode])
        for other in [n for n in runs if n != "verify"]:
            theirs = statistics.median(times[other, mode])
            ratio = theirs / ours  # verify's throughput as a fraction of the other's
            if other == "sha256sum":
                ok &= ratio >= GOAL
            print(f"{mode}: verify median {ours:.3f} s ({total / 2**20 / ours:.0f} MiB/s), {other} median "
                  f"{theirs:.3f} s ({total / 2**20 / theirs:.0f} MiB/s): throughput ratio {ratio:.2f}"
                  + (f" (goal >= {GOAL})" if other == "sha256sum" else " (reference)"))
    if args.data:
        timed([*verify, "--data"])
        data = statistics.median(timed([*verify, "--data"]) for _ in range(args.rounds))
        print(f"warm: verify --data median {data:.3f} s ({total / 2**20 / data:.0f} MiB/s of images)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
