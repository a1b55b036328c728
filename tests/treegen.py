"""Awkward source trees, nightly changes to them, and snapshots to compare views with.

The same generator feeds the backup-cycle tests and the filesystem tests: a
scripted scenario (every case docs/design.md and the issues name, on fixed nights)
plus seeded random churn, and a snapshot that records exactly what a restore
must reproduce: type, content, mode, owner, mtime, symlink target, device
numbers, xattrs and hard-link groups.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from dataclasses import dataclass

B = bytes

NON_UTF8 = b"caf\xe9-\xff\xfe"
NEWLINE = b"line\nbreak"
LONG = b"L" * 255
DEEP = b"/".join([b"d%02d" % i for i in range(60)])
# Names overlay must not interpret: a real aufs-style whiteout name and a real opaque marker.
AUFS_LOOKALIKE = b".wh.x"
AUFS_OPQ = b".wh..wh..opq"


def _write(path: B, data: B, mtime: int | None = None) -> None:
    with open(path, "wb") as f:
        f.write(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime), follow_symlinks=False)


def _mkdirs(path: B) -> None:
    os.makedirs(path, exist_ok=True)


def _rm(path: B) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        for entry in os.scandir(path):
            _rm(entry.path)
        os.rmdir(path)
    elif os.path.lexists(path):
        os.unlink(path)


def build_initial(src: B, seed: int = 1) -> None:
    """The first night's tree: every awkward kind of entry at least once."""
    rng = random.Random(seed)
    j = lambda *parts: os.path.join(src, *parts)  # noqa: E731
    _mkdirs(j(b"home", b"alice", b"docs"))
    _mkdirs(j(b"home", b"bob"))
    for i in range(40):
        _write(j(b"home", b"alice", b"docs", b"note%02d.txt" % i), b"note %d\n" % i * rng.randint(1, 50))
    _write(j(b"home", b"alice", NON_UTF8), b"latin-1 name\n")
    _write(j(b"home", b"alice", NEWLINE), b"a newline in the name\n")
    _write(j(b"home", b"alice", LONG), b"255 bytes of name\n")
    _write(j(b"home", b"alice", AUFS_LOOKALIKE), b"just a file that looks like an aufs whiteout\n")
    _write(j(b"home", b"alice", AUFS_OPQ), b"just a file that looks like an aufs opaque marker\n")
    _mkdirs(j(b"deep", DEEP))
    _write(j(b"deep", DEEP, b"bottom.txt"), b"sixty levels down\n")
    with open(j(b"home", b"bob", b"sparse.img"), "wb") as f:
        f.truncate(8 << 20)
        f.seek(3 << 20)
        f.write(b"island of data")
    os.mkfifo(j(b"home", b"bob", b"fifo"))
    os.mknod(j(b"home", b"bob", b"null-dev"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(j(b"home", b"bob", b"loop-dev"), stat.S_IFBLK | 0o660, os.makedev(7, 200))
    _write(j(b"home", b"bob", b"linked"), b"hard-linked content\n")
    os.link(j(b"home", b"bob", b"linked"), j(b"home", b"bob", b"linked-2"))
    os.link(j(b"home", b"bob", b"linked"), j(b"home", b"alice", b"linked-3"))
    os.symlink(b"../alice/docs/note01.txt", j(b"home", b"bob", b"relative-link"))
    os.symlink(b"/nonexistent/" + NON_UTF8, j(b"home", b"bob", b"dangling-link"))
    _write(j(b"home", b"bob", b"xattrs"), b"has xattrs\n")
    os.setxattr(j(b"home", b"bob", b"xattrs"), b"user.colour", b"blue")
    os.setxattr(j(b"home", b"bob", b"xattrs"), b"trusted.overlay.opaque", b"y")  # a source's own
    os.setxattr(j(b"home", b"bob"), b"user.dir-tag", b"\x00\xffbinary")
    # A source directory's own opaque marker must be stored escaped, not obeyed.
    os.setxattr(docs := j(b"home", b"alice", b"docs"), b"trusted.overlay.opaque", b"y")
    assert docs
    _write(j(b"home", b"bob", b"owned"), b"owned by 1234:5678\n")
    os.chown(j(b"home", b"bob", b"owned"), 1234, 5678)
    _write(j(b"home", b"bob", b"secret"), b"mode 600\n")
    os.chmod(j(b"home", b"bob", b"secret"), 0o600)
    for name in (b"flip", b"to-link", b"doomed-dir", b"reborn-dir"):
        _write(j(name), b"plain file " + name + b"\n") if name in (b"flip", b"to-link") else None
    _mkdirs(j(b"doomed-dir", b"sub"))
    _write(j(b"doomed-dir", b"sub", b"old.txt"), b"old content\n")
    _mkdirs(j(b"reborn-dir", b"inner"))
    _write(j(b"reborn-dir", b"inner", b"first.txt"), b"first life\n")
    _write(j(b"reborn-dir", b"keep.txt"), b"first life\n")
    _write(j(b"big.bin"), rng.randbytes(300_000))


def mutate(src: B, night: int, seed: int = 1) -> list[str]:
    """Change the tree for ``night`` (1, 2, ...); returns what was done, for messages.

    Scripted nights cover every case the issues list; every night also gets a
    little seeded random churn so no two nights look alike.
    """
    rng = random.Random(seed * 1000 + night)
    j = lambda *parts: os.path.join(src, *parts)  # noqa: E731
    done: list[str] = []
    docs = j(b"home", b"alice", b"docs")
    bob = j(b"home", b"bob")
    # The scripted cases run once each in the first dozen nights; later nights churn, and
    # every twelfth night leaves the source untouched.
    script = night if night < 12 else (1 if night % 12 == 1 else 0)
    if script == 1:  # unchanged source: the script does nothing this night
        return ["nothing"]
    if script == 2:
        _rm(j(b"flip"))
        _mkdirs(j(b"flip", b"now-a-dir"))
        _write(j(b"flip", b"now-a-dir", b"f"), b"flip is a directory\n")
        _rm(j(b"to-link"))
        os.symlink(b"home/alice", j(b"to-link"))
        done += ["file->dir", "file->symlink"]
    elif script == 3:
        os.chmod(j(b"home", b"bob", b"linked-2"), 0o640)  # mode-only, one name of a hard-linked file
        os.chown(j(b"home", b"bob", b"secret"), 4321, 8765)  # owner-only
        os.utime(j(docs, b"note03.txt"), (1_000_000_000, 1_000_000_000))  # mtime went backwards
        os.setxattr(j(bob, b"xattrs"), b"user.colour", b"green")  # xattr-only
        done += ["mode-only on a hard link", "owner-only", "mtime-only", "xattr-only"]
    elif script == 4:
        _rm(j(b"flip"))
        _write(j(b"flip"), b"flip is a file again\n")  # dir -> file
        _rm(j(b"doomed-dir"))  # deleted tonight, recreated nights later
        os.setxattr(j(b"home", b"alice", b"linked-3"), b"user.on-a-link", b"1")  # xattr on a hard link
        done += ["dir->file", "rmdir"]
    elif script == 5:
        # deleted and recreated with other content within one night
        _rm(j(b"reborn-dir"))
        _mkdirs(j(b"reborn-dir", b"other"))
        _write(j(b"reborn-dir", b"other", b"second.txt"), b"second life\n")
        os.chown(j(b"home", b"bob", b"linked"), 42, 42)  # owner-only on a hard-linked file
        done += ["dir recreated in one night", "owner-only on a hard link"]
    elif script == 6:
        _mkdirs(j(b"doomed-dir", b"fresh"))
        _write(j(b"doomed-dir", b"fresh", b"new.txt"), b"a new life, nights later\n")
        os.utime(j(bob, b"linked-2"), (1_500_000_000, 1_500_000_000))  # mtime-only on a hard link
        done += ["dir recreated nights later", "mtime-only on a hard link"]
    elif script == 7:
        with open(j(bob, b"sparse.img"), "r+b") as f:
            f.seek(6 << 20)
            f.write(b"more data far away")
        _rm(j(b"deep", DEEP, b"bottom.txt"))
        _write(j(b"deep", DEEP, b"bottom2.txt"), b"changed sixty levels down\n")
        os.unlink(j(b"home", b"alice", b"linked-3"))  # the group shrinks
        done += ["sparse change", "deep change", "unlink one hard link"]
    elif script == 8:
        _write(j(b"home", b"alice", NON_UTF8), b"changed latin-1 file\n")
        os.rename(j(b"home", b"alice", NEWLINE), j(b"home", b"alice", NEWLINE + b"2"))
        os.link(j(bob, b"linked"), j(b"home", b"alice", b"linked-4"))  # the group grows
        done += ["non-utf8 change", "rename", "new hard link"]
    elif script == 9:
        _rm(j(b"to-link"))
        _write(j(b"to-link"), b"symlink -> file\n")
        os.removexattr(j(bob, b"xattrs"), b"user.colour")
        done += ["symlink->file", "xattr removed"]
    # seeded churn: a few edits, creates and deletes among the notes
    notes = sorted(os.listdir(docs))
    for name in rng.sample(notes, min(3, len(notes))):
        _write(os.path.join(docs, name), b"edited on night %d\n" % night * rng.randint(1, 20))
    _write(os.path.join(docs, b"night%03d.txt" % night), b"created on night %d\n" % night)
    if len(notes) > 10:
        victim = rng.choice(notes)
        os.unlink(os.path.join(docs, victim))
    done.append("churn")
    return done


@dataclass(frozen=True)
class Entry:
    """Everything about one path that a faithful copy must reproduce."""

    kind: str
    mode: int
    uid: int
    gid: int
    mtime: int  # whole seconds: SquashFS stores no sub-second times
    size: int
    digest: str
    target: B
    rdev: int
    xattrs: tuple[tuple[str, B], ...]


def snapshot(top: B, *, dir_mtimes: bool = True) -> tuple[dict[B, Entry], frozenset[frozenset[B]]]:
    """Every entry below ``top`` and the hard-link groups among them."""
    entries: dict[B, Entry] = {}
    inodes: dict[tuple[int, int], list[B]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, top)
            st = os.lstat(path)
            entries[rel] = describe(path, st, dir_mtimes=dir_mtimes)
            if entries[rel].kind == "file" and st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    groups = frozenset(frozenset(names) for names in inodes.values() if len(names) > 1)
    return entries, groups


def describe(path: B, st: os.stat_result | None = None, *, dir_mtimes: bool = True) -> Entry:
    """One path's :class:`Entry` (``st`` is its lstat, taken here when not given)."""
    st = os.lstat(path) if st is None else st
    kind = _kind(st.st_mode)
    digest = ""
    target = b""
    if kind == "file":
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    elif kind == "symlink":
        target = os.readlink(path)
    xattrs: tuple[tuple[str, B], ...] = ()
    if kind != "symlink":
        xattrs = tuple(sorted((x, os.getxattr(path, x, follow_symlinks=False))
                              for x in os.listxattr(path, follow_symlinks=False)))
    mtime = int(st.st_mtime) if kind != "dir" or dir_mtimes else 0
    return Entry(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, mtime, st.st_size if kind == "file" else 0,
                 digest, target, st.st_rdev if kind in ("char", "block") else 0, xattrs)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "unknown"


def differences(expected: tuple[dict[B, Entry], frozenset[frozenset[B]]],
                actual: tuple[dict[B, Entry], frozenset[frozenset[B]]], limit: int = 10) -> list[str]:
    """Human-readable differences between two snapshots (empty when equal)."""
    want, want_groups = expected
    got, got_groups = actual
    out = []
    for rel in sorted(set(want) | set(got)):
        if rel not in got:
            out.append(f"missing {rel!r}")
        elif rel not in want:
            out.append(f"unexpected {rel!r}: {got[rel]}")
        elif want[rel] != got[rel]:
            fields = [f for f in Entry.__dataclass_fields__ if getattr(want[rel], f) != getattr(got[rel], f)]
            out.append(f"{rel!r}: " + ", ".join(
                f"{f} {getattr(want[rel], f)!r} != {getattr(got[rel], f)!r}" for f in fields))
    if want_groups != got_groups:
        out.append(f"hard-link groups differ: want {sorted(map(sorted, want_groups))}, "
                   f"got {sorted(map(sorted, got_groups))}")
    return out[:limit]
