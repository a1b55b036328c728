"""Paths resolved beneath a directory fd: a swapped-in symlink is never followed."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from squashfu_fs.util import beneath


@pytest.fixture(params=["openat2", "walk"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run each test with openat2 and with the O_NOFOLLOW walk older kernels get."""
    monkeypatch.setattr(beneath, "_have_openat2", request.param == "openat2")
    yield request.param


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """``top/`` with ``d/f`` inside, ``link -> outside`` and an ``outside/`` holding a victim."""
    top, outside = tmp_path / "top", tmp_path / "outside"
    (top / "d").mkdir(parents=True)
    (top / "d" / "f").write_text("inside")
    outside.mkdir()
    (outside / "victim").write_text("must survive")
    (top / "link").symlink_to(outside)
    return top, outside


def test_a_symlinked_component_is_refused(mode: str, tree: tuple[Path, Path]) -> None:
    top, outside = tree
    with beneath.opened_root(top) as fd:
        with pytest.raises(OSError) as info:
            beneath.remove_beneath(fd, b"link/victim")
        assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
        with pytest.raises(OSError):
            beneath.lstat_beneath(fd, b"link/victim")
    assert (outside / "victim").read_text() == "must survive"


def test_dotdot_and_absolute_paths_are_refused(mode: str, tree: tuple[Path, Path]) -> None:
    top, outside = tree
    with beneath.opened_root(top) as fd:
        for rel in (b"../outside/victim", b"d/../../outside/victim", os.fsencode(outside / "victim")):
            with pytest.raises(OSError) as info:
                beneath.remove_beneath(fd, rel)
            assert info.value.errno == errno.EXDEV
    assert (outside / "victim").exists()


def test_a_symlink_as_the_last_name_is_removed_itself(mode: str, tree: tuple[Path, Path]) -> None:
    top, outside = tree
    with beneath.opened_root(top) as fd:
        assert beneath.remove_beneath(fd, b"link") is True
    assert not os.path.lexists(top / "link")
    assert (outside / "victim").exists()


def test_remove_beneath_deletes_files_and_trees(mode: str, tree: tuple[Path, Path]) -> None:
    top, _ = tree
    with beneath.opened_root(top) as fd:
        assert beneath.remove_beneath(fd, b"d/f") is True
        assert beneath.remove_beneath(fd, b"d/f") is False
        (top / "d" / "sub").mkdir()
        (top / "d" / "sub" / "g").write_text("x")
        assert beneath.remove_beneath(fd, b"d") is True
        assert beneath.remove_beneath(fd, b"gone/deeper") is False
    assert sorted(os.listdir(top)) == ["link"]


def test_a_tree_holding_symlinks_is_removed_without_following_them(mode: str, tree: tuple[Path, Path]) -> None:
    top, outside = tree
    (top / "d" / "escape").symlink_to(outside)
    with beneath.opened_root(top) as fd:
        beneath.remove_beneath(fd, b"d")
    assert (outside / "victim").exists()


def test_the_root_itself_must_not_be_a_symlink(tree: tuple[Path, Path]) -> None:
    top, _ = tree
    with pytest.raises(OSError) as info, beneath.opened_root(top / "link"):
        pass
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_parent_of_gives_an_fd_for_at_calls(mode: str, tree: tuple[Path, Path]) -> None:
    top, _ = tree
    with beneath.opened_root(top) as fd, beneath.parent_of(fd, b"d/f") as (pfd, name):
        assert name == b"f"
        assert beneath.same_file(os.stat(pfd), os.stat(top / "d"))
        assert beneath.same_file(beneath.lstat_beneath(fd, b"d/f"), os.lstat(top / "d" / "f"))


def ids(chain: list[os.stat_result]) -> list[tuple[int, int]]:
    return [(s.st_dev, s.st_ino) for s in chain]


def test_lineage_climbs_the_real_parents_not_the_path_text(tree: tuple[Path, Path]) -> None:
    """Opened through a symlink, a directory's lineage is that of where it really is."""
    top, outside = tree
    (outside / "sub").mkdir()
    fd = os.open(top / "link" / "sub", os.O_RDONLY | os.O_DIRECTORY)  # top/link -> outside
    try:
        chain = ids(beneath.lineage(fd))
    finally:
        os.close(fd)
    expected = [outside / "sub", *(outside / "sub").parents]
    assert chain == ids([os.stat(p) for p in expected])
    assert ids([os.stat(top)])[0] not in chain


def test_lineage_follows_a_rename_made_after_the_open(tree: tuple[Path, Path]) -> None:
    """The fd keeps naming the directory; its parents are where it is now, not where it was."""
    top, outside = tree
    fd = os.open(top / "d", os.O_PATH | os.O_DIRECTORY)
    try:
        os.rename(top / "d", outside / "moved")
        chain = ids(beneath.lineage(fd))
    finally:
        os.close(fd)
    assert chain[:2] == ids([os.stat(outside / "moved"), os.stat(outside)])
    assert ids([os.stat(top)])[0] not in chain
    assert chain[-1] == ids([os.stat("/")])[0]


def walked(top: Path, swap: dict[bytes, Callable[[], None]] | None = None,
           ) -> tuple[set[bytes], list[tuple[bytes, int]]]:
    """Walk ``top``; when the walk yields a name in ``swap``, run its action first (a user acting mid-walk)."""
    seen: set[bytes] = set()
    errors: list[tuple[bytes, OSError]] = []
    with beneath.opened_root(top) as fd:
        for rel, st in beneath.walk(fd, errors=errors):
            assert st == os.lstat(top / os.fsdecode(rel)) or rel in (swap or {})
            seen.add(rel)
            if swap and rel in swap:
                swap[rel]()
    return seen, [(rel, exc.errno or 0) for rel, exc in errors]


def test_walk_lists_the_tree_and_never_enters_a_symlink(mode: str, tree: tuple[Path, Path]) -> None:
    top, _ = tree
    seen, errors = walked(top)
    assert sorted(seen) == [b"d", b"d/f", b"link"] and errors == []


def test_walk_prunes_what_keep_refuses(mode: str, tree: tuple[Path, Path]) -> None:
    top, _ = tree
    with beneath.opened_root(top) as fd:
        names = [rel for rel, _ in beneath.walk(fd, keep=lambda rel, st: rel != b"d")]
    assert names == [b"link"]


def test_a_directory_swapped_for_a_symlink_mid_walk_is_not_entered(mode: str, tree: tuple[Path, Path]) -> None:
    top, outside = tree

    def swap() -> None:
        os.rename(top / "d", top / "d.old")
        (top / "d").symlink_to(outside)

    seen, errors = walked(top, {b"d": swap})
    assert not [rel for rel in seen if rel.startswith(b"d/")], seen
    assert errors == [(b"d", errno.ELOOP)] or errors == [(b"d", errno.ENOTDIR)], errors


def test_a_directory_replaced_by_another_mid_walk_is_reported(mode: str, tree: tuple[Path, Path]) -> None:
    top, _ = tree

    def swap() -> None:
        os.rename(top / "d", top / "d.old")
        (top / "d").mkdir()
        (top / "d" / "planted").write_text("x")

    seen, errors = walked(top, {b"d": swap})
    assert b"d/planted" not in seen and errors == [(b"d", beneath.REPLACED)]


def test_a_directory_removed_mid_walk_is_reported_and_the_walk_goes_on(mode: str, tree: tuple[Path, Path]) -> None:
    top, _ = tree
    (top / "e").mkdir()
    (top / "e" / "g").write_text("x")

    def remove() -> None:
        import shutil

        shutil.rmtree(top / "d")

    seen, errors = walked(top, {b"d": remove})
    assert errors == [(b"d", errno.ENOENT)] and b"e/g" in seen
