"""The backup root against other local users and careless placement, with real mounts.

Every local user but root is an attacker here: the root and everything in it
must be unreadable to them (new roots, and old world-readable roots after the
next writer), they browse only through a root-run ``mount --allow-other`` where
the kernel enforces each file's recorded permissions, and every kernel mount
squashfu makes is ``nosuid,nodev``. A root that sits inside its source (moved
there, or reached through a bind mount) or on tmpfs is refused.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from squashfu_fs.engines import mounts
from squashfu_fs.read.mountd import state_dir

from .conftest import force_unmount
from .harness import (
    NOBODY,
    as_nobody,
    bin_entries,
    fuse_mounted,
    history,
    one_line,
    reachable_by_others,
    run_as_nobody,
    squashfu,
)

pytestmark = pytest.mark.mounts



def make_source(src: Path) -> None:
    """A public file, a private file, a private directory, and a 0:0 device (so a log is written)."""
    (src / "private").mkdir(parents=True)
    (src / "pub.txt").write_text("anyone may read this\n")
    os.chmod(src / "pub.txt", 0o644)
    (src / "secret.txt").write_text("root:$6$hash:19000:0:99999:7:::\n")
    os.chmod(src / "secret.txt", 0o600)
    (src / "private" / "inner.txt").write_text("world-readable, in a 0700 directory\n")
    os.chmod(src / "private" / "inner.txt", 0o644)
    os.chmod(src / "private", 0o700)
    os.mknod(src / "zero-zero", stat.S_IFCHR | 0o644, os.makedev(0, 0))  # exit 3, named in the log


def two_backups(scratch: Path) -> tuple[Path, Path]:
    """init, the seed, and one bin holding a changed world-readable file."""
    src, root = scratch / "src", scratch / "root"
    make_source(src)
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now="2026-11-02T02:00", expect=3)  # names the device in a log
    (src / "zero-zero").unlink()  # a clean night: the manifest is written
    (src / "pub.txt").write_text("changed, still world-readable\n")
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    assert b"pub.txt" in bin_entries(root, 1) and (root / ".manifest").is_file()
    return src, root


def what_others_could_read(root: Path) -> dict[str, subprocess.CompletedProcess[bytes]]:
    """Every way into the raw backup, tried as user nobody."""
    logs = sorted((root / "logs").glob("backup-*.log"))
    assert logs, "the test needs a log to try"
    attempts: dict[str, list[str | os.PathLike[str]]] = {
        "unsquashfs seed.sfs": ["unsquashfs", "-l", "-d", "/nonexistent", root / "seed.sfs"],
        "history.json": ["cat", root / "history.json"],
        "squashfu.toml": ["cat", root / "squashfu.toml"],
        ".manifest": ["cat", root / ".manifest"],
        ".lock": ["cat", root / ".lock"],
        "log": ["cat", logs[-1]],
        "unsquashfs bins/1.sfs": ["unsquashfs", "-l", "-d", "/nonexistent", root / "bins" / "1.sfs"],
        "ls bins": ["ls", root / "bins"],
    }
    return {what: run_as_nobody(argv, text=False) for what, argv in attempts.items()}


def assert_private(root: Path) -> None:
    """Nobody reads anything, and every file squashfu keeps carries no group or other bit."""
    with reachable_by_others(root.parent):
        control = root.parent / "control.txt"
        control.write_text("a world-readable file beside the root\n")
        os.chmod(control, 0o644)
        assert run_as_nobody(["cat", control]).returncode == 0, "nobody must be able to read at all"
        readable = {what: p.stdout[:60] for what, p in what_others_could_read(root).items() if p.returncode == 0}
    assert not readable, f"user nobody read: {readable}"
    loose = []
    for path in [root, *root.iterdir(), *(root / "bins").iterdir(), *(root / "logs").iterdir()]:
        st = path.lstat()
        top_of_a_bin = path.parent.name == "bins" and stat.S_ISDIR(st.st_mode)  # the source root's own mode
        if stat.S_IMODE(st.st_mode) & 0o077 and not top_of_a_bin and not path.is_mount():
            loose.append(f"{path.relative_to(root.parent)} {stat.S_IMODE(st.st_mode):o}")
    assert not loose, f"not private: {loose}"


def test_a_new_root_is_private_to_root(scratch: Path) -> None:
    """unsquashfs of the seed, the history, manifest, logs and bins: nothing readable by another user."""
    _, root = two_backups(scratch)
    assert_private(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def test_an_old_world_readable_root_is_tightened_by_the_next_backup(scratch: Path) -> None:
    src, root = two_backups(scratch)
    # As the old code left it: 0755 directories, 0644 files.
    os.chmod(root, 0o755)
    for path in [*root.iterdir(), *(root / "logs").iterdir(), *(root / "bins").glob("*.opaque"),
                 *(root / "bins").glob("*.sfs")]:
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
    with reachable_by_others(root.parent):
        assert run_as_nobody(["cat", root / "history.json"]).returncode == 0, "the loosening did not take"
    (src / "pub.txt").write_text("third night\n")
    squashfu("-r", root, "backup", now="2026-11-04T02:00")
    assert_private(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def test_a_writer_refuses_a_root_another_user_owns_and_a_planted_lock(scratch: Path) -> None:
    """Root never works in a directory a user controls, nor follows a symlink planted as the lock."""
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    (src / "f").write_text("x\n")
    squashfu("init", root, "--source", src)
    victim = scratch / "victim"
    victim.write_text("must stay exactly like this\n")
    (root / ".lock").unlink(missing_ok=True)
    (root / ".lock").symlink_to(victim)
    proc = squashfu("-r", root, "backup", now="2026-11-02T02:00", expect=2)
    assert ".lock" in one_line(proc)
    assert victim.read_text() == "must stay exactly like this\n" and history(root)["seed"] is None
    (root / ".lock").unlink()
    os.chown(root, NOBODY, NOBODY)
    proc = squashfu("-r", root, "backup", now="2026-11-02T02:00", expect=2)
    assert "owned by" in one_line(proc) and history(root)["seed"] is None
    os.chown(root, 0, 0)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")


def mounted_for_everyone(root: Path, mountpoint: Path, *extra: str,
                         env: dict[str, str] | None = None) -> AbstractContextManager[Path]:
    """A root-run ``squashfu mount --allow-other``, always unmounted and its daemon gone afterwards."""
    return fuse_mounted(root, mountpoint, "--allow-other", *extra, env=env)


def test_other_users_browse_through_allow_other_with_recorded_permissions(scratch: Path) -> None:
    """The kernel's default_permissions: the recorded modes decide, for the seed and for a bin."""
    _, root = two_backups(scratch)
    mp = scratch / "mp"
    with mounted_for_everyone(root, mp), reachable_by_others(mp):
        for day, text in (("2026-11-02", "anyone may read this\n"), ("2026-11-03", "changed, still world-readable\n")):
            view = mp / day  # the seed's version, then bin 1's
            ok = run_as_nobody(["cat", view / "pub.txt"])
            assert ok.returncode == 0 and ok.stdout == text, ok
            for denied in (view / "secret.txt", view / "private" / "inner.txt"):
                proc = run_as_nobody(["cat", denied])
                assert proc.returncode != 0 and "Permission denied" in proc.stderr, (denied, proc)
            assert (view / "secret.txt").read_text().startswith("root:"), "root itself reads it"
    (scratch / "own").mkdir()
    os.chown(scratch / "own", NOBODY, NOBODY)
    with reachable_by_others(scratch):  # the root's parent is open: only the root's own mode stops nobody
        proc = as_nobody("-r", root, "mount", scratch / "own")
    assert proc.returncode == 2 and "private to its owner" in one_line(proc) and "--allow-other" in proc.stderr


# ------------------------------------------------------------------ nosuid,nodev


def mount_options(target: Path) -> list[str]:
    """The per-mount options (mountinfo field 6) of every mount on ``target``."""
    want = os.fsencode(os.path.realpath(target))
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if mounts._unescape(fields[4]) == want:
                found.append(fields[5].decode())
    return found


def test_every_kernel_mount_is_nosuid_nodev(scratch: Path) -> None:
    """Seed, unions, resquash merges, roll-backs and their seeds, the daemon's seed: nosuid,nodev.

    A ``mount`` wrapper first on PATH runs the real mount and then records
    the options the kernel reports for the new mount, so the mounts of a
    backup, a resquash and a restore are seen while they exist.
    """
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    shutil.copy2("/bin/true", src / "tool")
    os.chmod(src / "tool", 0o4755)
    wrap, log = scratch / "wrap", scratch / "mounts.log"
    wrap.mkdir()
    (wrap / "mount").write_text(f"""#!/bin/sh
{shutil.which("mount")} "$@" || exit $?
for target; do :; done
printf '%s %s\\n' "$target" "$(findmnt -n -o VFS-OPTIONS --mountpoint "$target" | tail -n 1)" >> {log}
""")
    os.chmod(wrap / "mount", 0o755)
    env = {"PATH": f"{wrap}:{os.environ['PATH']}"}
    squashfu("init", root, "--source", src, "--max-bins", "2", "--min-bins", "1")
    for night in range(4):  # the seed, three bins; the fourth night resquashes
        (src / f"night{night}").write_text(f"{night}\n")
        squashfu("-r", root, "backup", now=f"2026-11-0{night + 2}T02:00", env=env)
    assert history(root)["seed"]["generation"] == 2
    squashfu("-r", root, "restore", "latest", "tool", "--to", scratch / "restored", env=env)
    rb = scratch / "rb"
    rb.mkdir()
    squashfu("-r", root, "rollback", "latest", rb, env=env)
    try:
        rolled = mount_options(rb)
        assert rolled and all({"ro", "nosuid", "nodev"} <= set(o.split(",")) for o in rolled), rolled
        ran = subprocess.run([rb / "tool"], check=False)
        assert ran.returncode == 0, "programs still run from a roll-back (nosuid, not noexec)"
    finally:
        squashfu("umount", rb, expect=None)
        force_unmount(rb)
    with mounted_for_everyone(root, scratch / "fs", env=env) as fs:
        fuse = mount_options(fs)
        assert fuse and all({"nosuid", "nodev"} <= set(o.split(",")) for o in fuse), fuse
        daemon_seeds = os.fsencode(state_dir(fs) / "seeds")
        seen_daemon_seed = any(e.mount_point.startswith(daemon_seeds) for e in mounts.mount_table())
    assert seen_daemon_seed
    logged = [line.rsplit(" ", 1) for line in log.read_text().splitlines()]
    by_kind: dict[str, list[str]] = {}
    for target, options in logged:
        rel = os.path.relpath(target, scratch)
        kind = ("ro" if rel == "root/ro" else "rw" if rel == "root/rw" else "merged" if rel == "root/.merged"
                else "layer" if rel.startswith("root/.layers/")
                else "rollback seed" if rel.startswith("root/.rollbacks/") and rel.endswith("/seed")
                else "rollback layer" if rel.startswith("root/.rollbacks/") and "/layers/" in rel
                else "restore view" if rel.startswith("root/.rollbacks/view-") else "rollback" if rel == "rb"
                else "daemon seed" if target.startswith(os.fsdecode(daemon_seeds)) else rel)
        by_kind.setdefault(kind, []).append(options)
    assert set(by_kind) == {"ro", "rw", "merged", "layer", "rollback seed", "rollback layer", "restore view",
                            "rollback", "daemon seed"}, \
        by_kind
    bad = {kind: opts for kind, opts in by_kind.items()
           if not all({"nosuid", "nodev"} <= set(o.split(",")) for o in opts)}
    assert not bad, f"mounted without nosuid,nodev: {bad}"
    runs_nothing = {kind: opts for kind, opts in by_kind.items()
                    if kind != "rollback" and not all("noexec" in o.split(",") for o in opts)}
    assert not runs_nothing, f"nothing runs from these, yet they are not noexec: {runs_nothing}"


# ------------------------------------------------------------------ placement


def test_init_refuses_a_root_on_tmpfs(scratch: Path) -> None:
    """A tmpfs root would hold overlay layers, and vanish at the next reboot with every backup."""
    (scratch / "src").mkdir()
    ram = scratch / "ram"
    ram.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", ram], check=True)
    try:
        proc = squashfu("init", ram / "root", "--source", scratch / "src", expect=2)
        assert "tmpfs" in one_line(proc)
        assert not (ram / "root").exists()
        os.mkdir(ram / "empty")
        proc = squashfu("init", ram / "empty", "--source", scratch / "src", expect=2)
        assert "tmpfs" in one_line(proc) and os.listdir(ram / "empty") == []
    finally:
        mounts.unmount(ram)


def test_init_refuses_a_root_inside_the_source_through_a_bind_mount(scratch: Path) -> None:
    src, alias = scratch / "src", scratch / "alias"
    src.mkdir()
    alias.mkdir()
    subprocess.run(["mount", "--bind", src, alias], check=True)
    try:
        proc = squashfu("init", alias / "root", "--source", src, expect=2)
        assert "inside the source" in one_line(proc)
        assert os.listdir(src) == []
    finally:
        mounts.unmount(alias)


def test_backup_refuses_a_root_moved_inside_the_source(scratch: Path) -> None:
    """Checked at every backup, by device and inode: moved in plainly, or reached through a bind mount."""
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    (src / "f").write_text("x\n")
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    moved = src / "root"
    os.rename(root, moved)
    before = (moved / "history.json").read_bytes()
    proc = squashfu("-r", moved, "backup", now="2026-11-03T02:00", expect=2)
    assert "inside the source" in one_line(proc)
    alias = scratch / "alias"
    alias.mkdir()
    subprocess.run(["mount", "--bind", src, alias], check=True)
    try:
        proc = squashfu("-r", alias / "root", "backup", now="2026-11-03T02:00", expect=2)
        assert "inside the source" in one_line(proc)
    finally:
        mounts.unmount(alias)
    assert (moved / "history.json").read_bytes() == before
    assert sorted(p.name for p in (moved / "bins").iterdir()) == []
    assert not mounts.mounts_below(scratch)
