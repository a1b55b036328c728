#!/usr/bin/env python3
"""The same week in peers: squashfu against borg, restic and rsnapshot.

One synthetic source (bench_backup's generator: small files in directories of
100, optionally a few large files). Night 0 is every tool's first full backup;
on each later night 1% of the files are rewritten once (one seeded change list
per night) and then every tool backs up that same state, in an order reversed
from one night to the next. Prints each tool's first-backup time, its median
nightly time, its repository size on disk after the week and the ratios to
squashfu, then what each tool kept of hard links, ACLs and xattrs in a tiny
probe backed up and restored with the same settings.

The generated data is random bytes: compression cannot shrink it, so the sizes
compare deduplication and per-backup overhead, not compressors.

Run as root on a quiet machine:
`.venv/bin/python bench/bench_peers.py --files 100000`.
Needs borgbackup, restic and rsnapshot (`apt-get install -y borgbackup restic rsnapshot`).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
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
    """Bytes on disk, hard-linked files counted once."""
    if not path.exists():
        return 0
    return int(run(["du", "-s", "--block-size=1", str(path)]).split()[0])


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
        self.version = "?"

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
            ("retain", "daily\t7"),
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


def probe(base: Path) -> list[str]:
    """Back up the probe on two nights (files made before the first and before the second),
    restore the second and say, for each tool, what survived."""
    src = base / "probe-src"
    src.mkdir(parents=True)
    probe_files(src, "first")
    if not (has_acl(src / "acl-first") and has_xattr(src / "xattr-first")):
        return [f"probe skipped: {src} does not hold ACLs and user xattrs"]
    tools = [cls(base / f"probe-{cls.name}", src) for cls in TOOLS]
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
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--nights", type=int, default=7, help="night 0 is the first full backup")
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of the small files rewritten each night")
    ap.add_argument("--large", type=int, default=0, help="how many large files to add (never changed)")
    ap.add_argument("--large-mib", type=int, default=64)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/squashfu-bench-peers"))
    ap.add_argument("--no-probe", action="store_true", help="skip the hard link/ACL/xattr probe")
    ap.add_argument("--keep", action="store_true", help="leave --dir in place")
    args = ap.parse_args()
    if args.nights < 2:
        sys.exit("--nights must be at least 2 (a first backup and one nightly)")
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


def week(args: argparse.Namespace, base: Path) -> None:
    for line in versions():
        print(f"version: {line}")
    rng = random.Random(42)
    src = base / "src"
    t0 = time.perf_counter()
    paths = make_source(src, args.files, rng)
    size = sum(p.stat().st_size for p in paths)
    if args.large:
        size += add_large(src, args.large, args.large_mib, rng)
    print(f"source: {args.files} small files + {args.large} x {args.large_mib} MiB, {size / 2**20:.0f} MiB, "
          f"made in {time.perf_counter() - t0:.1f} s; {int(len(paths) * args.changed)} files rewritten per night")
    tools = [cls(base, src) for cls in TOOLS]
    for t in tools:
        t.init()
    for t in tools:
        print(f"settings: {t.name}: {t.settings()}")
    times: dict[str, list[float]] = {t.name: [] for t in tools}
    for night in range(args.nights):
        if night > 0:
            change(paths, args.changed, rng, night)  # one seeded change list, applied once, seen by every tool
        order = tools if night % 2 == 0 else tools[::-1]
        for t in order:
            argv, env = t.backup_argv(night)
            times[t.name].append(timed(argv, env))
        label = "first backup" if night == 0 else f"night {night}"
        print(f"{label:>12}: " + ", ".join(f"{t.name} {times[t.name][-1]:.2f} s" for t in order), flush=True)
    ours = tools[0]
    first0 = times[ours.name][0]
    median0 = statistics.median(times[ours.name][1:])
    size0 = du(ours.repo)
    nightly = args.nights - 1
    print(f"\nafter {args.nights} nights (median over nights 1-{nightly}); sizes are `du -s --block-size=1` "
          f"of the repository (squashfu: the backup root); ratios are tool / squashfu")
    print(f"{'tool':<10} {'first s':>9} {'x':>6} {'nightly s':>10} {'x':>6} {'repo MiB':>10} {'x':>6} "
          f"{'cache MiB':>10}")
    for t in tools:
        first = times[t.name][0]
        median = statistics.median(times[t.name][1:])
        repo = du(t.repo)
        cache = t.cache()
        cache_s = f"{du(cache) / 2**20:10.1f}" if cache else f"{'-':>10}"
        print(f"{t.name:<10} {first:9.2f} {first / first0:6.2f} {median:10.3f} {median / median0:6.2f} "
              f"{repo / 2**20:10.1f} {repo / size0:6.2f} {cache_s}")
    totals = json.loads(run([*SQUASHFU, "-r", str(ours.repo), "list", "--json"]))["totals"]
    print(f"squashfu list --json totals: seed {totals['seed'] / 2**20:.1f} MiB, incrementals "
          f"{totals['incrementals'] / 2**20:.1f} MiB in {totals['bins']} bins, all {totals['all'] / 2**20:.1f} MiB")
    print("cache = the client-side cache outside the repository (borg: BORG_BASE_DIR, restic: RESTIC_CACHE_DIR)")
    if not args.no_probe:
        print("\npreserves (tiny probe with these settings: backed up on two nights, latest restored and checked):")
        for line in probe(base):
            print(f"  {line}")


if __name__ == "__main__":
    main()
