#!/usr/bin/env python3
"""What storing a big file by its changed blocks would cost: figures for docs/design.md.

Nothing here is squashfu's code: it is a throw-away model of the proposal in
docs/design.md ("Big files changed in place (proposal)"), measured on the same
case as ``bench_peers.py --big-mib``: a file of random bytes with ``--change-kib``
overwritten in place at a seeded aligned offset each night.

1. What mksquashfs (the root's settings: zstd level 3, ``-noappend``) stores for
   the base version alone, for the next night's version alone (what a sealed bin
   holds today), for both versions in one image (SquashFS deduplicates only whole
   identical files) and for the same version twice.
2. The size of one night's delta sidecar (a block map and the changed blocks) at
   4, 64 and 128 KiB blocks, raw and as a SquashFS image.
3. Python reading the file assembled from the base (in a loop-mounted SquashFS
   image) and a chain of N deltas (newest block wins), sequentially in 128 KiB
   and 1 MiB requests, page cache warm and cold, against plain ``pread`` of the
   base; and random 4 KiB reads.
4. Finding tonight's changed blocks at backup time: hashing the source per
   block against a stored hash list, and comparing it with the previous version.
5. Writing the assembled file to disk (what a kernel roll-back or a resquash
   would have to do), fsync included.

Run as root (loop mounts), wrapped in ``flock /tmp/squashfu-bench.lock``:
`.venv/bin/python bench/bench_delta.py --mib 512 --chains 1,7,14,30`.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

MARKER = ".squashfu-bench-delta"
MKSQUASHFS = ["mksquashfs", "-noappend", "-exit-on-error", "-comp", "zstd", "-Xcompression-level", "3",
              "-no-progress", "-quiet"]


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def image_of(base: Path, name: str, files: dict[str, Path]) -> int:
    """Size of a SquashFS image holding ``files`` (name in the image -> file), made as squashfu makes one."""
    d = base / f"img-{name}"
    d.mkdir()
    seen: set[Path] = set()
    for n, p in files.items():
        if p in seen:  # the same content under a second name: a copy, not a hard link
            shutil.copyfile(p, d / n)
        else:
            os.link(p, d / n)
            seen.add(p)
    img = base / f"{name}.sfs"
    subprocess.run([*MKSQUASHFS[:1], str(d), str(img), *MKSQUASHFS[1:]], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(d)
    size = img.stat().st_size
    img.unlink()
    return size


class Delta:
    """One night's sidecar: a header, the sorted block numbers (u64) and the blocks themselves."""

    HEAD = struct.Struct("<8sQQI")  # magic, file size, block count, block size

    @staticmethod
    def write(path: Path, size: int, block: int, changed: dict[int, bytes]) -> int:
        idx = sorted(changed)
        with open(path, "wb") as f:
            f.write(Delta.HEAD.pack(b"SQFDELTA", size, len(idx), block))
            f.write(struct.pack(f"<{len(idx)}Q", *idx))
            for i in idx:
                f.write(changed[i])
        return path.stat().st_size

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        head = os.pread(self.fd, self.HEAD.size, 0)
        _magic, self.size, count, self.block = self.HEAD.unpack(head)
        self.index = list(struct.unpack(f"<{count}Q", os.pread(self.fd, 8 * count, self.HEAD.size)))
        self.data_at = self.HEAD.size + 8 * count


class Assembled:
    """A read-only file: the base with a chain of deltas on top (the newest delta's block wins)."""

    def __init__(self, base: Path, deltas: list[Path]) -> None:
        self.fd = os.open(base, os.O_RDONLY)
        self.deltas = [Delta(p) for p in deltas]
        self.block = self.deltas[0].block if self.deltas else 65536
        self.where: dict[int, tuple[int, int]] = {}  # block -> (fd, offset), newest wins
        for d in self.deltas:
            for k, i in enumerate(d.index):
                self.where[i] = (d.fd, d.data_at + k * d.block)
        self.changed = sorted(self.where)

    def pread(self, size: int, off: int) -> bytes:
        data = os.pread(self.fd, size, off)
        lo, hi = off // self.block, (off + len(data) - 1) // self.block
        k = bisect.bisect_left(self.changed, lo)
        if k == len(self.changed) or self.changed[k] > hi:
            return data
        buf = bytearray(data)
        while k < len(self.changed) and self.changed[k] <= hi:
            i = self.changed[k]
            fd, at = self.where[i]
            start = max(off, i * self.block)
            end = min(off + len(buf), (i + 1) * self.block)
            buf[start - off:end - off] = os.pread(fd, end - start, at + start - i * self.block)
            k += 1
        return bytes(buf)

    def close(self) -> None:
        os.close(self.fd)
        for d in self.deltas:
            os.close(d.fd)


def sequential(read: object, size: int, request: int) -> float:
    assert callable(read)
    start = time.perf_counter()
    off = 0
    while off < size:
        off += len(read(request, off)) or size
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--change-kib", type=int, default=4)
    ap.add_argument("--chains", default="1,7,14,30", help="delta chain lengths to read through")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/squashfu-bench-delta"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it loop-mounts a SquashFS image and drops the page cache")
    chains = [int(c) for c in args.chains.split(",")]
    base = args.dir
    if base.exists():
        if not (base / MARKER).exists():
            sys.exit(f"{base} exists and is not this benchmark's directory")
        shutil.rmtree(base)
    base.mkdir(parents=True)
    (base / MARKER).touch()
    mnt = base / "mnt"
    mounted = False
    try:
        mounted = run(args, base, mnt, chains)
    finally:
        if mounted or os.path.ismount(mnt):
            subprocess.run(["umount", str(mnt)], check=False)
        if os.path.ismount(mnt):
            print(f"NOT removing {base}: {mnt} is still mounted", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


def run(args: argparse.Namespace, base: Path, mnt: Path, chains: list[int]) -> bool:
    size, change = args.mib * 2**20, args.change_kib * 1024
    rng = random.Random(42)
    v0, v1 = base / "v0.bin", base / "v1.bin"
    with open(v0, "wb") as f:
        for _ in range(args.mib):
            f.write(rng.randbytes(2**20))
    # the nights: seeded aligned offsets, as bench_peers.py --big-mib
    nights = [(rng.randrange(size // change) * change, rng.randbytes(change)) for _ in range(max(chains))]
    shutil.copyfile(v0, v1)
    with open(v1, "r+b") as f:
        f.seek(nights[0][0])
        f.write(nights[0][1])
    mib = 2**20
    print(f"file: {args.mib} MiB of random bytes; each night {args.change_kib} KiB overwritten in place")

    print("\n1. mksquashfs (zstd 3, -noappend), image size:")
    for label, files in (("base version alone", {"big.bin": v0}),
                         ("next night's version alone (= a sealed bin today)", {"big.bin": v1}),
                         ("both versions in one image", {"a.bin": v0, "b.bin": v1}),
                         ("the same version twice in one image", {"a.bin": v0, "b.bin": v0})):
        t0 = time.perf_counter()
        s = image_of(base, label.split()[0] + str(len(files)) + label.split()[-1], files)
        print(f"   {label:<52} {s / mib:9.1f} MiB  ({time.perf_counter() - t0:.1f} s)")

    print("\n2. one night's delta sidecar (block map + changed blocks):")
    for block in (4096, 65536, 131072):
        changed = {}
        off, data = nights[0]
        with open(v1, "rb") as f:
            for i in range(off // block, (off + len(data) - 1) // block + 1):
                changed[i] = os.pread(f.fileno(), block, i * block)
        p = base / f"delta-{block}"
        raw = Delta.write(p, size, block, changed)
        img = image_of(base, f"delta{block}", {"big.bin.delta": p})
        print(f"   {block // 1024:>4} KiB blocks: {len(changed)} block(s), sidecar {raw:,} bytes, "
              f"as a SquashFS image {img:,} bytes")
        p.unlink()

    # the chain: base in a SquashFS image (as a seed or an old bin), deltas of 64 KiB blocks
    block = 65536
    base_image = base / "base.sfs"
    d = base / "img-base"
    d.mkdir()
    os.link(v0, d / "big.bin")
    subprocess.run([*MKSQUASHFS[:1], str(d), str(base_image), *MKSQUASHFS[1:]], check=True,
                   stdout=subprocess.DEVNULL)
    shutil.rmtree(d)
    v1.unlink()
    mnt.mkdir()
    subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro,nosuid,nodev", str(base_image), str(mnt)], check=True)
    deltas = []
    state: dict[int, bytes] = {}  # block -> its newest content, to cut each night's sidecar
    fd0 = os.open(v0, os.O_RDONLY)
    for n, (off, data) in enumerate(nights, 1):
        changed = {}
        for i in range(off // block, (off + len(data) - 1) // block + 1):
            old = state.get(i) or os.pread(fd0, block, i * block)
            start, end = max(off, i * block), min(off + len(data), (i + 1) * block)
            new = old[:start - i * block] + data[start - off:end - off] + old[end - i * block:]
            changed[i] = state[i] = new
        p = base / f"night-{n}.delta"
        Delta.write(p, size, block, changed)
        deltas.append(p)
    os.close(fd0)
    v0.unlink()
    big = mnt / "big.bin"

    print(f"\n3. reading the file ({args.mib} MiB, base in a loop-mounted SquashFS image, 64 KiB delta blocks), "
          f"MiB/s, median of {args.rounds}:")
    print(f"   {'reader':<34} {'request':>8} {'warm':>8} {'cold':>8}")
    for request in (131072, 2**20):
        for n in [0, *chains]:
            a = Assembled(big, deltas[:n])  # oldest first: a later night's block wins
            label = "plain pread of the base" if n == 0 else f"base + {n} delta{'s' if n > 1 else ''}"
            read = (lambda s, o, fd=a.fd: os.pread(fd, s, o)) if n == 0 else a.pread
            warm, cold = [], []
            for _ in range(args.rounds):
                drop_caches()
                cold.append(sequential(read, size, request))
                warm.append(sequential(read, size, request))
            a.close()
            print(f"   {label:<34} {request // 1024:>5} KiB {args.mib / statistics.median(warm):8.0f} "
                  f"{args.mib / statistics.median(cold):8.0f}")
    a = Assembled(big, deltas[:max(chains)])
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(20000)]
    for label, read in (("plain pread", lambda s, o: os.pread(a.fd, s, o)),
                        (f"assembled over {max(chains)} deltas", a.pread)):
        sequential(lambda s, o: os.pread(a.fd, s, o), size, 2**20)  # warm
        t0 = time.perf_counter()
        for o in offsets:
            read(4096, o)
        print(f"   random 4 KiB reads, warm, {label}: {(time.perf_counter() - t0) / len(offsets) * 1e6:.1f} µs each")
    # correctness of the model: the assembled file equals base + every night's write
    # writes are aligned and of one size, so they never partly overlap: the last write at an offset wins
    want = dict(nights[:max(chains)])
    for off, data in want.items():
        if a.pread(len(data), off) != data:
            sys.exit(f"the model is wrong: assembled bytes at {off} differ from the night's write")
    a.close()

    print("\n4. finding tonight's changed blocks at backup time (warm page cache), MiB/s of the source:")
    src = mnt / "big.bin"
    hashes: list[bytes] = []
    t0 = time.perf_counter()
    with open(src, "rb") as f:
        while chunk := f.read(2**20):
            mv = memoryview(chunk)
            hashes.extend(hashlib.blake2b(mv[i:i + block], digest_size=16).digest()
                          for i in range(0, len(mv), block))
    t = time.perf_counter() - t0
    print(f"   hash every 64 KiB block (blake2b-128) to compare with a stored list: {args.mib / t:.0f} MiB/s, "
          f"list {len(hashes) * 16 // 1024} KiB")
    a = Assembled(big, deltas[:1])
    t0 = time.perf_counter()
    off = diff = 0
    while off < size:
        x, y = os.pread(a.fd, 2**20, off), a.pread(2**20, off)
        diff += sum(x[i:i + block] != y[i:i + block] for i in range(0, len(x), block))
        off += 2**20
    t = time.perf_counter() - t0
    a.close()
    print(f"   compare with the previous version read through the stack: {args.mib / t:.0f} MiB/s "
          f"({diff} block(s) differ)")

    n = max(chains)
    print(f"\n5. materializing the assembled file (base + {n} deltas) to disk, as a kernel roll-back or a "
          f"resquash would need, written and fsynced, median of {args.rounds}:")
    a = Assembled(big, deltas[:n])
    out = base / "assembled.bin"
    for from_disk in (False, True):
        runs = []
        for _ in range(args.rounds):
            out.unlink(missing_ok=True)
            if from_disk:
                drop_caches()
            else:
                sequential(a.pread, size, 2**20)
            t0 = time.perf_counter()
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            off = 0
            while off < size:
                off += os.write(fd, a.pread(2**20, off))
            os.fsync(fd)
            os.close(fd)
            runs.append(time.perf_counter() - t0)
        print(f"   source {'cold' if from_disk else 'warm'}: {statistics.median(runs):.2f} s, "
              f"{args.mib / statistics.median(runs):.0f} MiB/s")
    a.close()
    out.unlink()
    return True


if __name__ == "__main__":
    main()
