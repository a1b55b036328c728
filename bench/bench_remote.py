#!/usr/bin/env python3
"""The nightly cost of a remote source: squashfu over ssh against a local source and plain rsync over ssh.

A remote source cannot be walked, so every night is a full compare through
the union of the committed layers, then a second rsync pass for the repairs
(write/union.second_pass). The same tree (``--files`` small files in
directories of 100, ``--changed`` of them rewritten each night) is backed up
three ways each night, in rotating order:

- ``remote``: a squashfu root whose source is ``root@127.0.0.1:SRC``, through a
  throw-away sshd on 127.0.0.1 (tests/sshd.py, the tests' own);
- ``local``: a squashfu root of ``SRC`` itself, a manifest night;
- ``rsync``: plain ``rsync -aHAX --numeric-ids --delete -e SSH`` of the same
  tree into a plain directory, through the same sshd.

and, after them, ``noop``: the same plain rsync again with nothing changed.
The remote night is split (from ``backup -v``'s lines) into the first pass
(the listing before it included) and the second pass with the commit. Prints each
night and the medians. Run as root, wrapped in the bench lock:
`flock /tmp/squashfu-bench.lock .venv/bin/python bench/bench_remote.py --files 100000`.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_backup import SQUASHFU, change, make_source, timed, timed_backup
from tests.sshd import sshd_running

SECOND = "second rsync pass"  # what squashfu -v says before the second pass (write/union.second_pass)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--changed", type=float, default=0.01)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/squashfu-bench-remote"))
    args = ap.parse_args()
    rng = random.Random(42)
    shutil.rmtree(args.dir, ignore_errors=True)
    src, remote, local, plain = (args.dir / n for n in ("src", "remote-root", "local-root", "plain"))
    t0 = time.perf_counter()
    paths = make_source(src, args.files, rng)
    print(f"source: {args.files} files, {sum(p.stat().st_size for p in paths) / 2**20:.0f} MiB, "
          f"made in {time.perf_counter() - t0:.1f} s", flush=True)
    with sshd_running(args.dir / "sshd") as sshd:
        rsh = sshd.rsh
        plain_rsync = ["rsync", "-aHAX", "--numeric-ids", "--delete", "-e", rsh, f"{sshd.remote(src)}/", f"{plain}/"]
        subprocess.run([*SQUASHFU, "init", str(remote), "--source", sshd.remote(src), "--rsh", rsh], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([*SQUASHFU, "init", str(local), "--source", str(src)], check=True, stdout=subprocess.DEVNULL)
        night = datetime(2026, 11, 2, 2, 0)
        env = {**os.environ, "SQUASHFU_NOW": night.isoformat()}
        seeds = {"remote": timed([*SQUASHFU, "-r", str(remote), "backup"], env),
                 "local": timed([*SQUASHFU, "-r", str(local), "backup"], env),
                 "rsync": timed(plain_rsync)}
        print("first backup: " + ", ".join(f"{k} {v:.2f} s" for k, v in seeds.items()), flush=True)
        runs: dict[str, list[float]] = {"remote": [], "remote pass 1": [], "remote pass 2": [], "local": [],
                                        "rsync": [], "noop": []}
        for n in range(1, args.rounds + 1):
            change(paths, args.changed, rng, n)
            night += timedelta(days=1)
            env = {**os.environ, "SQUASHFU_NOW": night.isoformat()}
            subprocess.run(["sync"], check=True)
            order = ["remote", "local", "rsync"]
            order = order[n % 3:] + order[:n % 3]  # rotate who reads the freshly changed source first
            times: dict[str, float] = {}
            for name in order:
                if name == "rsync":
                    times[name] = timed(plain_rsync)
                else:
                    root = remote if name == "remote" else local
                    times[name], phases = timed_backup([*SQUASHFU, "-r", str(root), "backup", "-v"], env,
                                                       marks=(SECOND,))
                    if name == "remote":  # the first rsync pass, and the second with the commit after it
                        times["remote pass 1"] = phases[SECOND] - phases["walk"]
                        times["remote pass 2"] = phases["copy"] - times["remote pass 1"]
            times["noop"] = timed(plain_rsync)
            for key, value in times.items():
                runs[key].append(value)
            print(f"night {n}: " + ", ".join(f"{k} {times[k]:.2f} s" for k in runs), flush=True)
        medians = {k: statistics.median(v) for k, v in runs.items()}
        print(f"median of {args.rounds} nights, {args.files} files, {args.changed:.0%} changed: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in medians.items()))
        print(f"remote/local {medians['remote'] / medians['local']:.2f}, "
              f"remote/plain rsync over ssh {medians['remote'] / medians['rsync']:.2f}")
        print(f"rsh: {shlex.split(rsh)[0]} (sshd on 127.0.0.1:{sshd.port})")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
