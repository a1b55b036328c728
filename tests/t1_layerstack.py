"""Overlay resolution on plain directories: the pure core of the time-travel filesystem."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from squashfu_fs import overlay as layerstack
from squashfu_fs.overlay import DirLayer, Entry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts and trusted xattrs need root")


def whiteout(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def opaque(path: Path, name: bytes = b"trusted.overlay.opaque") -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.setxattr(path, name, b"y")


def write(path: Path, data: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)


class Stack:
    """Layers under tmp_path, newest first, and path-wise resolution through them."""

    def __init__(self, tmp_path: Path, count: int) -> None:
        self.dirs = [tmp_path / f"L{i}" for i in range(count)]  # L0 is the newest
        for d in self.dirs:
            d.mkdir()
        self.root = layerstack.root_branches([DirLayer(d) for d in self.dirs])
        self.marks: frozenset[bytes] = frozenset()  # recorded opaque directories

    def resolve(self, path: bytes) -> Entry | None:
        branches = self.root
        entry: Entry | None = None
        for part in path.split(b"/"):
            entry = layerstack.lookup(branches, part, self.marks)
            if entry is None:
                return None
            branches = entry.branches
        return entry

    def names(self, path: bytes = b"") -> dict[bytes, Entry]:
        branches = self.root
        if path:
            found = self.resolve(path)
            assert found is not None and found.is_dir
            branches = found.branches
        return dict(layerstack.listdir(branches, self.marks))


def test_whiteout_hides_and_is_never_listed(tmp_path: Path) -> None:
    s = Stack(tmp_path, 2)
    write(s.dirs[1] / "gone", "old")
    write(s.dirs[1] / "kept", "old")
    whiteout(s.dirs[0] / "gone")
    assert s.resolve(b"gone") is None
    assert set(s.names()) == {b"kept"}
    kept = s.resolve(b"kept")
    assert kept is not None and kept.layer == 2


def test_topmost_non_directory_wins(tmp_path: Path) -> None:
    s = Stack(tmp_path, 3)
    write(s.dirs[2] / "f", "seed")
    write(s.dirs[1] / "f", "bin1")
    e = s.resolve(b"f")
    assert e is not None and e.layer == 2 and Path(os.fsdecode(e.path)).read_text() == "bin1"
    assert s.names()[b"f"].layer == 2


def test_directories_merge_until_opaque(tmp_path: Path) -> None:
    s = Stack(tmp_path, 3)
    write(s.dirs[2] / "d" / "seed-only")
    write(s.dirs[1] / "d" / "bin-only")
    write(s.dirs[0] / "d" / "top-only")
    assert set(s.names(b"d")) == {b"seed-only", b"bin-only", b"top-only"}
    d = s.resolve(b"d")
    assert d is not None and d.merged and d.nlink == 1
    opaque(s.dirs[1] / "d")
    assert set(s.names(b"d")) == {b"bin-only", b"top-only"}
    assert s.resolve(b"d/seed-only") is None
    assert s.names()[b"d"].branches == s.resolve(b"d").branches  # type: ignore[union-attr]


def test_an_opaque_record_stops_the_merge_like_the_xattr(tmp_path: Path) -> None:
    """What a normal user's daemon relies on: it cannot read trusted.overlay.opaque."""
    s = Stack(tmp_path, 3)
    write(s.dirs[2] / "d" / "old")
    write(s.dirs[1] / b"\xff\nodd".decode(errors="surrogateescape") / "x")
    write(s.dirs[0] / "d" / "new")
    assert set(s.names(b"d")) == {b"old", b"new"}
    odd = b"\xff\nodd"
    layerstack.write_opaque_record(tmp_path / "L0.opaque", [b"d"])
    layerstack.write_opaque_record(tmp_path / "L1.opaque", [odd])
    assert layerstack.read_opaque_record(tmp_path / "L1.opaque") == (odd,)
    assert layerstack.read_opaque_record(tmp_path / "missing.opaque") == ()
    s.marks = layerstack.opaque_marks(
        (os.fsencode(d), layerstack.read_opaque_record(tmp_path / f"{d.name}.opaque")) for d in s.dirs[:2])
    assert s.marks == {os.fsencode(s.dirs[0]) + b"/d", os.fsencode(s.dirs[1]) + b"/" + odd}
    assert set(s.names(b"d")) == {b"new"}
    found = s.resolve(b"d")
    assert found is not None and [pos for pos, _ in found.branches] == [1]


def test_trusted_records_are_the_whole_truth_and_spare_the_xattr_probe(tmp_path: Path) -> None:
    """When every bin has a record, a directory the records do not name is merged without a getxattr."""
    s = Stack(tmp_path, 2)
    write(s.dirs[1] / "d" / "old")
    write(s.dirs[0] / "d" / "new")
    opaque(s.dirs[0] / "d")  # a marker no record names: only a probe would see it
    assert set(s.names(b"d")) == {b"new"}, "probed: opaque"
    s.marks = layerstack.TrustedMarks()
    assert set(s.names(b"d")) == {b"old", b"new"}, "trusted: the (empty) records say it is not"
    found = s.resolve(b"d")
    assert found is not None and [pos for pos, _ in found.branches] == [1, 2]
    assert layerstack.opaque_record(tmp_path / "missing.opaque") is None, "no record is not an empty record"
    layerstack.write_opaque_record(tmp_path / "empty.opaque", [])
    assert layerstack.opaque_record(tmp_path / "empty.opaque") == ()


def test_a_sources_user_overlay_xattrs_are_data(tmp_path: Path) -> None:
    """Bins are written in trusted mode: a source's own user.overlay.opaque hides nothing, and shows."""
    s = Stack(tmp_path, 2)
    write(s.dirs[1] / "d" / "old")
    opaque(s.dirs[0] / "d", b"user.overlay.opaque")
    os.setxattr(s.dirs[0] / "d", b"user.overlay.origin", b"mine")
    write(s.dirs[0] / "d" / "new")
    assert set(s.names(b"d")) == {b"old", b"new"}
    found = s.resolve(b"d")
    assert found is not None and [pos for pos, _ in found.branches] == [1, 2]
    assert layerstack.read_xattrs(found.path) == {b"user.overlay.opaque": b"y", b"user.overlay.origin": b"mine"}
    assert layerstack.visible_xattr_name(b"user.overlay.opaque") == b"user.overlay.opaque"


def test_lower_whiteout_ends_a_recreated_directory(tmp_path: Path) -> None:
    """Deleted on night 2, recreated on night 3: night 1's contents must not show through."""
    s = Stack(tmp_path, 4)
    write(s.dirs[3] / "d" / "a", "seed")
    write(s.dirs[2] / "d" / "b", "night 1")
    whiteout(s.dirs[1] / "d")
    write(s.dirs[0] / "d" / "c", "night 3")
    assert set(s.names(b"d")) == {b"c"}
    assert s.resolve(b"d/a") is None and s.resolve(b"d/b") is None
    d = s.resolve(b"d")
    assert d is not None and not d.merged


def test_type_changes(tmp_path: Path) -> None:
    s = Stack(tmp_path, 4)
    write(s.dirs[3] / "x", "file in seed")  # x: file -> dir -> file
    write(s.dirs[3] / "y" / "inside")  # y: dir -> file (non-dir hides the dir below)
    write(s.dirs[3] / "z", "target")  # z: file -> symlink
    write(s.dirs[2] / "x" / "child")
    opaque(s.dirs[2] / "x")
    write(s.dirs[2] / "y", "now a file")
    os.symlink("elsewhere", s.dirs[2] / "z")
    assert s.resolve(b"x") is not None and s.resolve(b"x").is_dir  # type: ignore[union-attr]
    assert set(s.names(b"x")) == {b"child"}
    y = s.resolve(b"y")
    assert y is not None and not y.is_dir and s.resolve(b"y/inside") is None
    z = s.resolve(b"z")
    assert z is not None and stat.S_ISLNK(z.st.st_mode) and os.readlink(z.path) == b"elsewhere"
    whiteout(s.dirs[1] / "x")
    write(s.dirs[0] / "x", "file again")
    x = s.resolve(b"x")
    assert x is not None and stat.S_ISREG(x.st.st_mode) and x.layer == 1
    # a directory above a non-directory does not merge with anything below it
    write(s.dirs[1] / "y" / "fresh")
    assert set(s.names(b"y")) == {b"fresh"}


def test_deep_paths(tmp_path: Path) -> None:
    s = Stack(tmp_path, 3)
    parts = [f"d{i}" for i in range(60)]
    write(s.dirs[2].joinpath(*parts, "deep-seed"))
    write(s.dirs[0].joinpath(*parts, "deep-top"))
    path = b"/".join(p.encode() for p in parts)
    assert set(s.names(path)) == {b"deep-seed", b"deep-top"}
    e = s.resolve(path + b"/deep-seed")
    assert e is not None and e.layer == 3


@pytest.mark.parametrize("name", [
    b"caf\xe9-latin1", b"new\nline", b"n" * 255, b".wh.foo", b".wh..wh..opq", b" lead", b"-dash",
])
def test_awkward_names(tmp_path: Path, name: bytes) -> None:
    s = Stack(tmp_path, 2)
    (s.dirs[1] / "d").mkdir()
    with open(os.path.join(os.fsencode(s.dirs[1] / "d"), name), "wb") as f:
        f.write(b"lower")
    (s.dirs[0] / "d").mkdir()
    with open(os.path.join(os.fsencode(s.dirs[0] / "d"), name), "wb") as f:
        f.write(b"upper")
    listing = s.names(b"d")
    assert list(listing) == [name]
    e = s.resolve(b"d/" + name)
    assert e is not None and e.layer == 1
    with open(e.path, "rb") as f:
        assert f.read() == b"upper"


def test_dot_wh_file_is_just_a_file(tmp_path: Path) -> None:
    s = Stack(tmp_path, 2)
    write(s.dirs[1] / "foo", "lower")
    write(s.dirs[0] / ".wh.foo", "a real file")
    assert set(s.names()) == {b"foo", b".wh.foo"}


def test_other_devices_are_not_whiteouts(tmp_path: Path) -> None:
    s = Stack(tmp_path, 2)
    write(s.dirs[1] / "null", "lower")
    os.mknod(s.dirs[0] / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(s.dirs[0] / "fifo")
    names = s.names()
    assert set(names) == {b"null", b"fifo"}
    assert names[b"null"].st.st_rdev == os.makedev(1, 3)


def test_xattrs_unescaped_and_overlay_private_hidden(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    os.setxattr(d, b"trusted.overlay.opaque", b"y")
    os.setxattr(d, b"trusted.overlay.origin", b"\x00\x01")
    os.setxattr(d, b"trusted.overlay.overlay.mine", b"escaped")
    os.setxattr(d, b"user.comment", b"hello")
    os.setxattr(d, b"trusted.other", b"kept")
    assert layerstack.read_xattrs(os.fsencode(d)) == {
        b"trusted.overlay.mine": b"escaped", b"user.comment": b"hello", b"trusted.other": b"kept",
    }
    link = tmp_path / "link"
    os.symlink("nowhere", link)
    assert layerstack.read_xattrs(os.fsencode(link)) == {}


def test_missing_layers_and_listing_order_is_stable(tmp_path: Path) -> None:
    s = Stack(tmp_path, 3)
    for i in range(50):
        write(s.dirs[i % 3] / "d" / f"f{i:02}")
    first = [n for n, _ in layerstack.listdir(s.resolve(b"d").branches)]  # type: ignore[union-attr]
    second = [n for n, _ in layerstack.listdir(s.resolve(b"d").branches)]  # type: ignore[union-attr]
    assert first == second and len(first) == 50
    os.rename(s.dirs[1], tmp_path / "gone")  # a vanished layer reads as empty, not as an error
    assert len(layerstack.listdir(s.root)) == 1
