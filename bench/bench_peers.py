#!/usr/bin/env python3
"""The same week in peers: squashfu against borg, restic and rsnapshot.

Two data sets (``--data``):

- ``random`` (default): bench_backup's generator, small files of random bytes
  in directories of 100 (optionally a few large files that never change). On
  each night after the first, 1% of the files are rewritten once. Random
  bytes do not compress, so the sizes compare deduplication and per-backup
  overhead, not compressors.
- ``compressible``: a copy (``cp -a``) of ``/usr/share/doc`` and
  ``/usr/share/man`` (``--doc-dir`` to change them). On each night after the
  first, seeded churn: text appended in place to 1% of the files, 0.2% added
  (copies of other files under new names, with new text), 0.2% deleted and
  0.2% renamed. ``--nights 9`` is the first backup and 8 nights of churn.

``--big-mib N`` adds a file of N MiB of random bytes to either set; each later
night 4 KiB of it (``--big-change-kib``) is overwritten in place at a seeded,
aligned offset, and the script counts how many 4/64/128 KiB blocks of it
differ from the night before (by hashing it, not from the offset it chose).

Every change is made once per night (one seeded random stream), then every
tool backs up that same state, in an order reversed from one night to the
next, with ``sync`` before each run. After each night it records each
repository's size on disk (allocated: ``du -s --block-size=1``; apparent:
``du -s -b``). At the end it prints per-night sizes, growth and times side
by side, medians, the ratios to squashfu and squashfu/borg; then times the
integrity checks on the same repositories (``squashfu verify [--data]`` when
this checkout has it, ``borg check [--verify-data]``, ``restic check
[--read-data]``, and ``sha256sum`` over squashfu's images for reference),
each after dropping the page cache; then what each tool kept of hard links,
ACLs and xattrs in a tiny probe backed up and restored with the same
settings.

squashfu runs as ``python -m squashfu_fs.cli``, which imports the package from
the current directory first, then from PYTHONPATH: run it from (or with
PYTHONPATH set to, and from outside any other checkout) the code to measure.

Run as root on a quiet machine (wrap it in ``flock /tmp/squashfu-bench.lock``):
`.venv/bin/python bench/bench_peers.py --files 100000`,
`.venv/bin/python bench/bench_peers.py --data compressible --nights 9`,
`.venv/bin/python bench/bench_peers.py --files 1000 --changed 0 --big-mib 512 --nights 9 --no-checks`.
Needs borgbackup, restic and rsnapshot (`apt-get install -y borgbackup restic rsnapshot`).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import re
import shutil
import stat
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_backup import change, make_source

SQUASHFU = [sys.executable, "-m", "squashfu_fs.cli"]
MARKER = ".squashfu-bench-peers"
FIRST_NIGHT = datetime(2026, 11, 2, 2, 0)

# command -> Debian package that provides it
NEEDED = {
    "borg": "borgbackup",
    "restic": "restic",
    "rsnapshot": "rsnapshot",
    "rsync": "rsync",
    "mksquashfs": "squashfs-tools",
    "du": "coreutils",
    "setfacl": "acl",
}


def run(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run a command; on failure show its stderr and stop."""
    r = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(argv)}\n{r.stderr.strip()}")
    return r.stdout


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    """sync, then the wall time of one run (stdout discarded, stderr kept for errors)."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(argv)}\n{r.stderr.strip()}")
    return elapsed


def du(path: Path) -> int:
    """Bytes on disk (allocated blocks), hard-linked files counted once."""
    if not path.exists():
        return 0
    return int(run(["du", "-s", "--block-size=1", str(path)]).split()[0])


def du_apparent(path: Path) -> int:
    """Apparent size in bytes (file lengths, `du -s -b`), hard-linked files counted once."""
    if not path.exists():
        return 0
    return int(run(["du", "-s", "-b", str(path)]).split()[0])


class Squashfu:
    name = "squashfu"

    def __init__(self, base: Path, src: Path) -> None:
        self.src, self.repo = src, base / "squashfu-root"
        self.env = dict(os.environ)

    def init(self) -> None:
        run([*SQUASHFU, "init", str(self.repo), "--source", str(self.src)])

    def backup_argv(self, night: int) -> tuple[list[str], dict[str, str]]:
        when = FIRST_NIGHT + timedelta(days=night)
        return [*SQUASHFU, "-r", str(self.repo), "backup"], {**self.env, "SQUASHFU_NOW": when.isoformat()}

    def restore(self, night: int, target: Path) -> None:
        run([*SQUASHFU, "-r", str(self.repo), "restore", "latest", "--to", str(target)], self.env)

    def cache(self) -> Path | None:
        return None

    def settings(self) -> str:
        config = (self.repo / "squashfu.toml").read_text()
        comp = next((line.split("=", 1)[1].strip() for line in config.splitlines()
                     if line.strip().startswith("compression")), "?")
        return f"compression {comp}; rsync -aHAX --numeric-ids --sparse into the overlay (squashfu_fs/rsync.py)"


class Borg:
    name = "borg"

    def __init__(self, base: Path, src: Path) -> None:
        self.src, self.repo, self.base = src, base / "borg-repo", base / "borg-base"
        self.env = {**os.environ, "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes", "BORG_BASE_DIR": str(self.base)}

    def init(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        run(["borg", "init", "--encryption=none", str(self.repo)], self.env)

    def backup_argv(self, night: int) -> tuple[list[str], dict[str, str]]:
        return ["borg", "create", "--compression", "zstd,3", f"{self.repo}::night-{night}", str(self.src)], self.env

    def restore(self, night: int, target: Path) -> None:
        target.mkdir(parents=True)
        run(["borg", "extract", f"{self.repo}::night-{night}"], self.env, cwd=target)

    def cache(self) -> Path | None:
        return self.base

    def settings(self) -> str:
        return "encryption none, compression zstd,3; ACLs, xattrs and flags on (no --noacls/--noxattrs/--noflags)"


class Restic:
    name = "restic"

    def __init__(self, base: Path, src: Path) -> None:
        self.src, self.repo, self.cachedir = src, base / "restic-repo", base / "restic-cache"
        self.env = {**os.environ, "RESTIC_CACHE_DIR": str(self.cachedir), "RESTIC_REPOSITORY": str(self.repo)}
        self.env.pop("RESTIC_PASSWORD_FILE", None)
        self.env.pop("RESTIC_PASSWORD_COMMAND", None)
        self.no_password = "--insecure-no-password" in run(["restic", "init", "--help"])
        if not self.no_password:
            self.env["RESTIC_PASSWORD"] = "bench"
        self.pw = ["--insecure-no-password"] if self.no_password else []
        self.version: object = "?"  # the repository format, an int once init has read it

    def init(self) -> None:
        run(["restic", "init", *self.pw], self.env)
        self.version = json.loads(run(["restic", "cat", "config", *self.pw], self.env))["version"]

    def backup_argv(self, night: int) -> tuple[list[str], dict[str, str]]:
        return ["restic", "backup", *self.pw, str(self.src)], self.env

    def restore(self, night: int, target: Path) -> None:
        run(["restic", "restore", *self.pw, "latest", "--target", str(target)], self.env)

    def cache(self) -> Path | None:
        return self.cachedir

    def settings(self) -> str:
        comp = "compression auto" if self.version == 2 else "no compression (repo v1)"
        pw = "--insecure-no-password" if self.no_password else "RESTIC_PASSWORD=bench (no --insecure-no-password)"
        return f"repository version {self.version}, {comp}; {pw}"


class Rsnapshot:
    name = "rsnapshot"

    def __init__(self, base: Path, src: Path) -> None:
        self.src, self.repo, self.conf = src, base / "rsnapshot-root", base / "rsnapshot.conf"
        self.env = dict(os.environ)
        self.retain = 7  # the week sets it to the number of nights, so every night's snapshot is kept

    def init(self) -> None:
        # rsnapshot insists on TABs between fields. cmd_cp and cmd_rm are those of Debian's stock
        # /etc/rsnapshot.conf (GNU cp -al for the rotation instead of rsnapshot's Perl copy).
        lines = [
            ("config_version", "1.2"),
            ("snapshot_root", f"{self.repo}/"),
            ("no_create_root", "0"),
            ("cmd_cp", shutil.which("cp") or "/bin/cp"),
            ("cmd_rm", shutil.which("rm") or "/bin/rm"),
            ("cmd_rsync", shutil.which("rsync") or "/usr/bin/rsync"),
            ("retain", f"daily\t{self.retain}"),
            ("lockfile", f"{self.conf.parent}/rsnapshot.pid"),
            ("backup", f"{self.src}/\tlocalhost/"),
        ]
        self.conf.write_text("".join(f"{k}\t{v}\n" for k, v in lines))
        run(["rsnapshot", "-c", str(self.conf), "configtest"])

    def backup_argv(self, night: int) -> tuple[list[str], dict[str, str]]:
        return ["rsnapshot", "-c", str(self.conf), "daily"], self.env

    def restored_root(self) -> Path:
        return self.repo / "daily.0"

    def cache(self) -> Path | None:
        return None

    def settings(self) -> str:
        # What rsnapshot itself says it would run: `-t` prints the commands without running them.
        plan = run(["rsnapshot", "-c", str(self.conf), "-t", "daily"]).replace("\\\n", " ")
        line = next((ln.split() for ln in plan.splitlines() if ln.split() and ln.split()[0].endswith("/rsync")), [])
        opts = [a for a in line if a.startswith("-")]
        short = "".join(a[1:] for a in opts if not a.startswith("--"))
        on = [f"-{f}" for f in "HAX" if f in short]
        return f"runs `rsync {' '.join(opts)}`; -H/-A/-X: {'on: ' + ' '.join(on) if on else 'all off'}"


TOOLS = (Squashfu, Borg, Restic, Rsnapshot)
Tool = Squashfu | Borg | Restic | Rsnapshot


def check_tools() -> None:
    missing = [f"{cmd} (apt-get install -y {pkg})" for cmd, pkg in NEEDED.items() if shutil.which(cmd) is None]
    if missing:
        sys.exit("missing: " + ", ".join(missing))


def versions() -> list[str]:
    def first(argv: list[str]) -> str:
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    return [first([*SQUASHFU, "--version"]), first(["mksquashfs", "-version"]), first(["borg", "--version"]),
            first(["restic", "version"]), first(["rsnapshot", "version"]), first(["rsync", "--version"])]


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].replace("\\040", " ")
            if target == prefix or target.startswith(prefix + "/"):
                found.append(target)
    return found


def prepare_dir(d: Path) -> None:
    if d.exists():
        if not (d / MARKER).exists() and any(d.iterdir()):
            sys.exit(f"{d} exists and is not this benchmark's directory; choose another --dir")
        if mounts_under(d):
            sys.exit(f"something is mounted under {d}: {mounts_under(d)}")
        shutil.rmtree(d)
    d.mkdir(parents=True)
    (d / MARKER).touch()


def cleanup(d: Path) -> None:
    left = mounts_under(d)
    if left:
        print(f"NOT removing {d}: still mounted there: {left}", file=sys.stderr)
        return
    shutil.rmtree(d, ignore_errors=True)


def add_large(src: Path, count: int, mib: int, rng: random.Random) -> int:
    d = src / "large"
    d.mkdir()
    for i in range(count):
        with open(d / f"large{i:02d}.bin", "wb") as f:
            for _ in range(mib):
                f.write(rng.randbytes(2**20))
    return count * mib * 2**20


# --- the compressible data set: a copy of Debian's documentation, churned each night ---------------

WORD = re.compile(rb"[A-Za-z]{2,14}")


def regular_files(top: Path) -> list[Path]:
    """Every regular file under ``top`` (symlinks neither followed nor listed), in a stable order."""
    found = []
    for dirpath, dirs, files in os.walk(top):
        dirs.sort()
        for name in sorted(files):
            p = Path(dirpath, name)
            if stat.S_ISREG(p.lstat().st_mode):
                found.append(p)
    return found


class DocChurn:
    """A copy of documentation trees and its nightly churn, the same for every tool.

    Appended and new text is made of words drawn, with their frequencies, from the
    ``copyright`` files of the copy, so it compresses about as well as English prose.
    """

    def __init__(self, src: Path, dirs: list[Path], append: float, add: float, delete: float,
                 rename: float) -> None:
        src.mkdir(parents=True)
        for d in dirs:
            if (src / d.name).exists():
                sys.exit(f"two --doc-dir with the same last component: {d.name}")
            run(["cp", "-a", "--reflink=never", str(d), str(src / d.name)])
        self.files = regular_files(src)
        self.fractions = (append, add, delete, rename)
        tokens: list[bytes] = []
        for p in self.files:
            if p.name == "copyright" and len(tokens) < 2_000_000:
                tokens.extend(WORD.findall(p.read_bytes()))
        if len(tokens) < 1000:  # no Debian copyright files: a small fixed vocabulary
            tokens = b"the of and to in is that for it as with be on by this are or from at which".split()
        self.tokens = tokens

    def text(self, rng: random.Random) -> bytes:
        """1–20 lines of 5–14 words."""
        lines = [b" ".join(rng.choices(self.tokens, k=rng.randint(5, 14))) for _ in range(rng.randint(1, 20))]
        return b"\n".join(lines) + b"\n"

    def night(self, n: int, rng: random.Random) -> str:
        """Append to, add, delete and rename files; say how many of each."""
        append, add, delete, rename = (int(len(self.files) * f) for f in self.fractions)
        picked = rng.sample(range(len(self.files)), append + delete + rename)
        appended = 0
        for i in picked[:append]:
            with open(self.files[i], "ab") as f:  # in place: same inode, new size and mtime
                appended += f.write(self.text(rng))
        added = []
        for j in range(add):
            orig = rng.choice(self.files)
            new = orig.with_name(f"{orig.stem}.n{n}-{j}{orig.suffix}")
            new.write_bytes(orig.read_bytes() + self.text(rng))
            added.append(new)
        gone = set(picked[append:append + delete])
        for i in gone:
            self.files[i].unlink()
        for i in picked[append + delete:]:
            new = self.files[i].with_name(self.files[i].name + f".r{n}")
            os.rename(self.files[i], new)
            self.files[i] = new
        self.files = [p for i, p in enumerate(self.files) if i not in gone] + added
        return (f"appended {appended / 1024:.0f} KiB to {append} files, added {add}, deleted {delete}, "
                f"renamed {rename}; {len(self.files)} files")


# --- the big file: a few KiB changed in place each night ------------------------------------------

BLOCK = 4096
BLOCK_SIZES = (4096, 65536, 131072)


class BigFile:
    """One big file of random bytes; each night ``change`` bytes of it are overwritten in place.

    The changed blocks are found by hashing every 4 KiB block and comparing with the
    night before, so the counts are measured, not assumed from the offset written.
    """

    def __init__(self, path: Path, mib: int, change_kib: int, rng: random.Random) -> None:
        self.path, self.size, self.change = path, mib * 2**20, change_kib * 1024
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for _ in range(mib):
                f.write(rng.randbytes(2**20))
        self.digests = self.block_digests()

    def block_digests(self) -> list[bytes]:
        out: list[bytes] = []
        with open(self.path, "rb") as f:
            while chunk := f.read(2**20):
                mv = memoryview(chunk)
                out.extend(hashlib.blake2b(mv[i:i + BLOCK], digest_size=16).digest()
                           for i in range(0, len(mv), BLOCK))
        return out

    def night(self, rng: random.Random) -> dict[int, int]:
        """Overwrite one aligned stretch; return how many blocks of each size now differ."""
        offset = rng.randrange(self.size // self.change) * self.change
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, rng.randbytes(self.change), offset)
        finally:
            os.close(fd)
        new = self.block_digests()
        changed = [i for i, (a, b) in enumerate(zip(self.digests, new, strict=True)) if a != b]
        self.digests = new
        return {bs: len({i * BLOCK // bs for i in changed}) for bs in BLOCK_SIZES}


# --- integrity checks on the same repositories ----------------------------------------------------

def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def has_verify() -> bool:
    """Whether the squashfu this runs (PYTHONPATH) has a ``verify`` command."""
    r = subprocess.run([*SQUASHFU, "verify", "--help"], capture_output=True, text=True, check=False)
    return r.returncode == 0


def squashfu_images(root: Path) -> list[Path]:
    return sorted(root.glob("seed*.sfs")) + sorted(root.glob("bins/*.sfs"), key=lambda p: int(p.stem))


def check_runs(tools: list[Tool]) -> tuple[list[tuple[str, list[str], dict[str, str] | None, Path]], list[str]]:
    """(label, argv, env, what it reads) for every check to time, and what was skipped and why."""
    runs: list[tuple[str, list[str], dict[str, str] | None, Path]] = []
    skipped = []
    for t in tools:
        if isinstance(t, Squashfu):
            if has_verify():
                runs.append(("squashfu verify", [*SQUASHFU, "-r", str(t.repo), "verify"], t.env, t.repo))
                runs.append(("squashfu verify --data", [*SQUASHFU, "-r", str(t.repo), "verify", "--data"],
                             t.env, t.repo))
            else:
                skipped.append("squashfu verify and verify --data: this checkout has no `verify` command "
                               "(`python -m squashfu_fs verify --help` fails)")
            images = squashfu_images(t.repo)
            if images:
                runs.append((f"sha256sum of squashfu's {len(images)} images (reference)",
                             ["sha256sum", *map(str, images)], None, t.repo))
        elif isinstance(t, Borg):
            runs.append(("borg check", ["borg", "check", str(t.repo)], t.env, t.repo))
            runs.append(("borg check --verify-data", ["borg", "check", "--verify-data", str(t.repo)], t.env, t.repo))
        elif isinstance(t, Restic):
            runs.append(("restic check", ["restic", "check", *t.pw], t.env, t.repo))
            runs.append(("restic check --read-data", ["restic", "check", "--read-data", *t.pw], t.env, t.repo))
        else:
            skipped.append(f"{t.name}: has no check of its own")
    return runs, skipped


def checks(tools: list[Tool], rounds: int) -> None:
    """Time each check ``rounds`` times, each after dropping the page cache; print medians."""
    runs, skipped = check_runs(tools)
    print(f"\nintegrity checks on the same repositories after the last night (median of {rounds}, "
          f"page cache dropped before each run):")
    print(f"  {'check':<46} {'median s':>9} {'min s':>7} {'max s':>7} {'reads MiB':>10} {'MiB/s':>7}  exit")
    for label, argv, env, repo in runs:
        times, codes, last = [], set(), ""
        for _ in range(rounds):
            drop_caches()
            start = time.perf_counter()
            r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               check=False)
            times.append(time.perf_counter() - start)
            codes.add(r.returncode)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["?"])[-1]
        size = du_apparent(repo) if not label.startswith("sha256sum") else sum(
            p.stat().st_size for p in squashfu_images(repo))
        med = statistics.median(times)
        print(f"  {label:<46} {med:9.2f} {min(times):7.2f} {max(times):7.2f} {size / 2**20:10.1f} "
              f"{size / 2**20 / med:7.1f}  {','.join(map(str, sorted(codes)))}" + (f"  ({last})" if last else ""))
    for s in skipped:
        print(f"  skipped: {s}")
    print("  reads MiB = apparent size of the repository (sha256sum: of the images it hashes); "
          "MiB/s = that / median")


# --- what each tool keeps: a tiny probe, backed up twice and restored ---------------------------

def has_acl(p: Path) -> bool:
    try:
        os.getxattr(p, "system.posix_acl_access", follow_symlinks=False)
        return True
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return False
        raise


def has_xattr(p: Path) -> bool:
    try:
        return os.getxattr(p, "user.bench", follow_symlinks=False) == b"42"
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return False
        raise


def probe_files(src: Path, tag: str) -> None:
    """A hard-linked pair, a file with an ACL entry and a file with a user xattr."""
    (src / f"hl-{tag}").write_bytes(b"linked " + tag.encode())
    os.link(src / f"hl-{tag}", src / f"hl-{tag}-2")
    (src / f"acl-{tag}").write_bytes(b"acl")
    subprocess.run(["setfacl", "-m", "u:nobody:r", str(src / f"acl-{tag}")], check=True)
    (src / f"xattr-{tag}").write_bytes(b"xattr")
    os.setxattr(src / f"xattr-{tag}", "user.bench", b"42")


def kept(got: Path, what: str, tag: str) -> bool:
    if what == "hard links":
        return os.stat(got / f"hl-{tag}").st_ino == os.stat(got / f"hl-{tag}-2").st_ino
    if what == "ACLs":
        return has_acl(got / f"acl-{tag}")
    return has_xattr(got / f"xattr-{tag}")


def find_restored(root: Path) -> Path:
    for dirpath, _dirs, files in os.walk(root):
        if "hl-first" in files:
            return Path(dirpath)
    raise FileNotFoundError(f"no probe file under {root}")


def probe(base: Path, classes: tuple[type[Tool], ...] = TOOLS) -> list[str]:
    """Back up the probe on two nights (files made before the first and before the second),
    restore the second and say, for each tool, what survived."""
    src = base / "probe-src"
    src.mkdir(parents=True)
    probe_files(src, "first")
    if not (has_acl(src / "acl-first") and has_xattr(src / "xattr-first")):
        return [f"probe skipped: {src} does not hold ACLs and user xattrs"]
    tools = [cls(base / f"probe-{cls.name}", src) for cls in classes]
    for t in tools:
        (base / f"probe-{t.name}").mkdir()
        t.init()
    complaints: dict[str, list[str]] = {t.name: [] for t in tools}
    for night in (0, 1):
        if night == 1:
            probe_files(src, "second")
        for t in tools:
            argv, env = t.backup_argv(night)
            r = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if r.returncode != 0:  # say so and carry on: what was kept is the point here
                last = (r.stderr.strip().splitlines() or ["?"])[-1]
                complaints[t.name].append(f"backup {night} exited {r.returncode}: {last}")
                log = Path(last.rsplit("see ", 1)[-1]) if "see /" in last else None
                if log and log.is_file():  # the log goes with --dir: quote rsync's own words
                    complaints[t.name].extend(f"  {ln}" for ln in log.read_text().splitlines() if "rsync:" in ln)
    lines = []
    for t in tools:
        target = base / f"probe-{t.name}" / "restored"
        if isinstance(t, Rsnapshot):
            got = find_restored(t.restored_root())  # the snapshot is the restore: read it in place
        else:
            t.restore(1, target)
            got = find_restored(target)
        verdicts = []
        for what in ("hard links", "ACLs", "xattrs"):
            first, second = kept(got, what, "first"), kept(got, what, "second")
            if first == second:
                verdicts.append(f"{what} {'kept' if first else 'LOST'}")
            else:
                verdicts.append(f"{what} {'kept' if first else 'LOST'} on files from the first backup, "
                                f"{'kept' if second else 'LOST'} on files new in the second")
        lines.append(f"{t.name}: " + ", ".join(verdicts))
        lines.extend(f"  {t.name} {c}" for c in complaints[t.name])
    return lines


# --- the week -------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("random", "compressible"), default="random")
    ap.add_argument("--files", type=int, default=100_000, help="random: how many small files")
    ap.add_argument("--nights", type=int, default=None,
                    help="backups in all; night 0 is the first full backup (default: random 7, compressible 9)")
    ap.add_argument("--changed", type=float, default=0.01, help="random: fraction of the small files rewritten "
                    "each night")
    ap.add_argument("--large", type=int, default=0, help="random: how many large files to add (never changed)")
    ap.add_argument("--large-mib", type=int, default=64)
    ap.add_argument("--doc-dir", type=Path, action="append", default=None,
                    help="compressible: a tree to copy (repeatable; default /usr/share/doc and /usr/share/man)")
    ap.add_argument("--append", type=float, default=0.01, help="compressible: fraction of files appended to")
    ap.add_argument("--add", type=float, default=0.002, help="compressible: fraction added (copies + new text)")
    ap.add_argument("--delete", type=float, default=0.002, help="compressible: fraction deleted")
    ap.add_argument("--rename", type=float, default=0.002, help="compressible: fraction renamed")
    ap.add_argument("--big-mib", type=int, default=0, help="add one file of this many MiB, changed in place "
                    "each night")
    ap.add_argument("--big-change-kib", type=int, default=4, help="how much of the big file is overwritten "
                    "each night")
    ap.add_argument("--tools", default=",".join(cls.name for cls in TOOLS),
                    help="comma-separated subset of " + ",".join(cls.name for cls in TOOLS) + " (squashfu always)")
    ap.add_argument("--check-rounds", type=int, default=3, help="runs of each integrity check (median)")
    ap.add_argument("--no-checks", action="store_true", help="skip timing the integrity checks")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/squashfu-bench-peers"))
    ap.add_argument("--no-probe", action="store_true", help="skip the hard link/ACL/xattr probe")
    ap.add_argument("--keep", action="store_true", help="leave --dir in place")
    args = ap.parse_args()
    if args.nights is None:
        args.nights = 9 if args.data == "compressible" else 7
    if args.nights < 2:
        sys.exit("--nights must be at least 2 (a first backup and one nightly)")
    if args.doc_dir is None:
        args.doc_dir = [Path("/usr/share/doc"), Path("/usr/share/man")]
    names = {n.strip() for n in args.tools.split(",") if n.strip()} | {"squashfu"}
    unknown = names - {cls.name for cls in TOOLS}
    if unknown:
        sys.exit(f"unknown --tools: {', '.join(sorted(unknown))}")
    args.classes = tuple(cls for cls in TOOLS if cls.name in names)
    if args.big_mib and (args.big_change_kib * 1024) % BLOCK:
        sys.exit("--big-change-kib must be a multiple of 4")
    check_tools()
    if os.geteuid() != 0:
        sys.exit("run as root: squashfu mounts its seed and overlay")
    base = args.dir
    prepare_dir(base)
    try:
        week(args, base)
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            cleanup(base)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def make_data(args: argparse.Namespace, src: Path, rng: random.Random) -> tuple[object, str]:
    """The source of night 0, and a line that says what it is."""
    t0 = time.perf_counter()
    if args.data == "compressible":
        docs = DocChurn(src, args.doc_dir, args.append, args.add, args.delete, args.rename)
        what = (f"a copy of {', '.join(map(str, args.doc_dir))}: {len(docs.files)} regular files, "
                f"apparent {mib(du_apparent(src))} MiB, allocated {mib(du(src))} MiB; each night "
                f"{args.append:.1%} appended to, {args.add:.1%} added, {args.delete:.1%} deleted, "
                f"{args.rename:.1%} renamed")
        data: object = docs
    else:
        paths = make_source(src, args.files, rng)
        size = sum(p.stat().st_size for p in paths)
        if args.large:
            size += add_large(src, args.large, args.large_mib, rng)
        what = (f"{args.files} small files of random bytes + {args.large} x {args.large_mib} MiB, "
                f"{size / 2**20:.0f} MiB; {int(len(paths) * args.changed)} files rewritten per night")
        data = paths
    return data, f"{what} (made in {time.perf_counter() - t0:.1f} s)"


def week(args: argparse.Namespace, base: Path) -> None:
    for line in versions():
        print(f"version: {line}")
    rng = random.Random(42)
    src = base / "src"
    data, what = make_data(args, src, rng)
    print(f"source: {what}")
    big = None
    if args.big_mib:
        big = BigFile(src / "big" / "big.bin", args.big_mib, args.big_change_kib, rng)
        print(f"big file: {big.path.relative_to(src)}, {args.big_mib} MiB of random bytes; each later night "
              f"{args.big_change_kib} KiB overwritten in place at a seeded offset aligned to that size")
    tools = [cls(base, src) for cls in args.classes]
    for t in tools:
        if isinstance(t, Rsnapshot):
            t.retain = max(7, args.nights)
        t.init()
    for t in tools:
        print(f"settings: {t.name}: {t.settings()}")
    times: dict[str, list[float]] = {t.name: [] for t in tools}
    alloc: dict[str, list[int]] = {t.name: [] for t in tools}
    apparent: dict[str, list[int]] = {t.name: [] for t in tools}
    blocks: list[dict[int, int]] = []
    for night in range(args.nights):
        note = ""
        if night > 0:  # one seeded change list, applied once, seen by every tool
            if isinstance(data, DocChurn):
                note = data.night(night, rng)
            else:
                assert isinstance(data, list)
                change(data, args.changed, rng, night)
            if big:
                blocks.append(big.night(rng))
                note += ("; " if note else "") + "big file: " + ", ".join(
                    f"{n} x {bs // 1024} KiB" for bs, n in blocks[-1].items()) + " blocks differ"
        order = tools if night % 2 == 0 else tools[::-1]
        for t in order:
            argv, env = t.backup_argv(night)
            times[t.name].append(timed(argv, env))
        for t in tools:
            alloc[t.name].append(du(t.repo))
            apparent[t.name].append(du_apparent(t.repo))
        label = "first backup" if night == 0 else f"night {night}"
        print(f"{label:>12}: " + ", ".join(f"{t.name} {times[t.name][-1]:.2f} s" for t in order)
              + (f"  [{note}]" if note else ""), flush=True)
    report(args, tools, times, alloc, apparent, blocks)
    if not args.no_checks:
        checks(tools, args.check_rounds)
    if not args.no_probe:
        print("\npreserves (tiny probe with these settings: backed up on two nights, latest restored and checked):")
        for line in probe(base, args.classes):
            print(f"  {line}")


def table(title: str, tools: list[Tool], rows: list[list[str]], extra: list[str]) -> None:
    print(f"\n{title}")
    head = ["night", *(t.name for t in tools), *extra]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("  " + "  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def report(args: argparse.Namespace, tools: list[Tool], times: dict[str, list[float]],
           alloc: dict[str, list[int]], apparent: dict[str, list[int]], blocks: list[dict[int, int]]) -> None:
    """Per-night sizes, growth and times side by side, then the summary against squashfu."""
    names = [t.name for t in tools]
    has_borg = "borg" in names
    ratio_col = ["squashfu/borg"] if has_borg else []

    def ratio(sizes: dict[str, list[int]], n: int) -> list[str]:
        return [f"{sizes['squashfu'][n] / sizes['borg'][n]:.3f}"] if has_borg else []

    nights = range(args.nights)
    table("repository size on disk after each night, MiB allocated (`du -s --block-size=1`):", tools,
          [[str(n), *(mib(alloc[x][n]) for x in names), *ratio(alloc, n)] for n in nights], ratio_col)
    table("repository size after each night, MiB apparent (`du -s -b`):", tools,
          [[str(n), *(mib(apparent[x][n]) for x in names), *ratio(apparent, n)] for n in nights], ratio_col)
    table("growth of the repository each night, MiB allocated:", tools,
          [[str(n), *(mib(alloc[x][n] - alloc[x][n - 1]) for x in names)] for n in nights if n > 0], [])
    table("backup time each night, s:", tools,
          [[str(n), *(f"{times[x][n]:.2f}" for x in names)] for n in nights], [])
    if blocks:
        print("\nbig file: blocks that differ from the night before (found by hashing every 4 KiB block)")
        for n, b in enumerate(blocks, 1):
            print(f"  night {n}: " + ", ".join(f"{k // 1024} KiB: {v} ({v * k / 1024:.0f} KiB)" for k, v in b.items()))
        growth = {x: statistics.median(alloc[x][n] - alloc[x][n - 1] for n in range(1, args.nights)) for x in names}
        print("  median growth per night, MiB allocated: " + ", ".join(f"{x} {mib(g)}" for x, g in growth.items()))
    ours = tools[0]
    first0 = times[ours.name][0]
    median0 = statistics.median(times[ours.name][1:])
    size0 = alloc[ours.name][-1]
    last = args.nights - 1
    print(f"\nafter {args.nights} nights (median over nights 1-{last}); sizes are `du -s --block-size=1` "
          f"of the repository (squashfu: the backup root); ratios are tool / squashfu")
    print(f"{'tool':<10} {'first s':>9} {'x':>6} {'nightly s':>10} {'x':>6} {'repo MiB':>10} {'x':>6} "
          f"{'cache MiB':>10}")
    for t in tools:
        first = times[t.name][0]
        median = statistics.median(times[t.name][1:])
        repo = alloc[t.name][-1]
        cache = t.cache()
        cache_s = f"{du(cache) / 2**20:10.1f}" if cache else f"{'-':>10}"
        print(f"{t.name:<10} {first:9.2f} {first / first0:6.2f} {median:10.3f} {median / median0:6.2f} "
              f"{repo / 2**20:10.1f} {repo / size0:6.2f} {cache_s}")
    if has_borg:
        r = alloc["squashfu"][-1] / alloc["borg"][-1]
        ra = apparent["squashfu"][-1] / apparent["borg"][-1]
        goal = f" (goal <= 1.0: {'met' if r <= 1.0 else 'NOT met'})" if args.data == "compressible" else ""
        print(f"squashfu/borg after night {last}: {r:.3f} allocated, {ra:.3f} apparent{goal}")
    root = ours.repo
    images = squashfu_images(root)
    seed = sum(du(p) for p in images if p.name.startswith("seed"))
    bins = sum(du(p) for p in images if not p.name.startswith("seed"))
    manifest = du(root / ".manifest")
    print(f"squashfu root, allocated: seed image {mib(seed)} MiB, {len(images) - (1 if seed else 0)} bin images "
          f"{mib(bins)} MiB, .manifest {mib(manifest)} MiB, everything else "
          f"{mib(alloc['squashfu'][-1] - seed - bins - manifest)} MiB")
    totals = json.loads(run([*SQUASHFU, "-r", str(root), "list", "--json"]))["totals"]
    print(f"squashfu list --json totals: seed {totals['seed'] / 2**20:.1f} MiB, incrementals "
          f"{totals['incrementals'] / 2**20:.1f} MiB in {totals['bins']} bins, all {totals['all'] / 2**20:.1f} MiB")
    print("cache = the client-side cache outside the repository (borg: BORG_BASE_DIR, restic: RESTIC_CACHE_DIR)")


if __name__ == "__main__":
    main()
