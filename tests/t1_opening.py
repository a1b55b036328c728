"""Opening a root, layer kinds and process identity, on plain directories (no mounts)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from squashfu_fs.errors import ConfigError, CorruptRootError, LockedError, SquashfuError, UsageError
from squashfu_fs.overlay import DirLayer
from squashfu_fs.store import history as history_mod
from squashfu_fs.store import layers, recovery
from squashfu_fs.store.config import Config
from squashfu_fs.store.history import Bin, History, Seed
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.store.lock import writer_lock
from squashfu_fs.store.opening import opened_root
from squashfu_fs.util.durable import atomic_write
from squashfu_fs.util.process import alive_pid, identity

T = "2026-11-02T02:00:00+00:00"


def hand_made_root(base: Path, bins: tuple[Bin, ...] = ()) -> RootLayout:
    """A committed root built by hand: config, a seed file, plain bin directories, history."""
    layout = RootLayout(base / "root")
    layout.root.mkdir(mode=0o700)
    for path in layout.skeleton():
        path.mkdir(mode=0o700)
    atomic_write(layout.config, Config(source=os.fspath(base / "src")).to_toml().encode())
    layout.seed("seed.sfs").write_bytes(b"not really squashfs")
    for b in bins:
        layout.bin(b.number).mkdir()
    history = History(seed=Seed("seed.sfs", 1, T, T), generation=1)
    for b in bins:
        history = history.with_bin(b)
    history_mod.save(layout.history, history)
    return layout


def debris(layout: RootLayout) -> list[Path]:
    partial = layout.partial_bin(9)
    partial.mkdir()
    (partial / "half-copied").write_text("x\n")
    tmp_seed = layout.temp_seed(2)
    tmp_seed.write_bytes(b"half an image")
    return [partial, tmp_seed]


def test_a_writer_holds_the_lock_and_has_recovered(tmp_path: Path) -> None:
    layout = hand_made_root(tmp_path, (Bin(1, T, 0.0, 0, 0, 0),))
    left = debris(layout)
    with opened_root(layout.root, "backup", write=True) as opened:
        assert opened.history.bins[0].number == 1 and opened.config.source == os.fspath(tmp_path / "src")
        assert "uncommitted bin .partial-9" in opened.recovered
        assert "stale file seed.2.sfs.tmp" in opened.recovered
        assert not any(p.exists() for p in left)
        with pytest.raises(LockedError, match="squashfu backup"), writer_lock(layout.lock, "resquash"):
            pass
    with writer_lock(layout.lock, "resquash"):  # released when the block ends
        pass


def test_a_reader_takes_no_lock_and_changes_nothing(tmp_path: Path) -> None:
    layout = hand_made_root(tmp_path)
    left = debris(layout)
    with writer_lock(layout.lock, "backup"), opened_root(layout.root, "list", write=False) as opened:
        assert opened.recovered == () and opened.history.seed is not None
    assert all(p.exists() for p in left)


def test_a_writers_own_check_refuses_before_the_lock_and_recovery(tmp_path: Path) -> None:
    layout = hand_made_root(tmp_path)
    left = debris(layout)

    def refuse(config: Config) -> None:
        raise UsageError(f"source {config.source} is missing")

    with writer_lock(layout.lock, "backup"), pytest.raises(UsageError, match="is missing"), \
            opened_root(layout.root, "backup", write=True, check=refuse):
        pass
    assert all(p.exists() for p in left)


def test_what_is_not_a_root_or_lost_its_history(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="not a squashfu backup root"), opened_root(empty, "list", write=False):
        pass
    with pytest.raises(ConfigError, match="squashfu init"), opened_root(empty, "backup", write=True):
        pass
    layout = hand_made_root(tmp_path)
    layout.history.unlink()  # a root that lost its history is damaged, not "no root"
    for write in (False, True):
        with pytest.raises(CorruptRootError, match="missing"), opened_root(layout.root, "x", write=write):
            pass


def test_a_root_is_opened_by_its_real_path(tmp_path: Path) -> None:
    layout = hand_made_root(tmp_path)
    (tmp_path / "link").symlink_to(layout.root)
    with opened_root(tmp_path / "link", "list", write=False) as opened:
        assert opened.layout.root == layout.root


def test_layer_kinds_say_what_the_kernel_and_the_daemon_stack(tmp_path: Path) -> None:
    layout = RootLayout(tmp_path)
    b1, b2 = Bin(1, T, 0.0, 0, 0, 0), Bin(2, T, 0.0, 0, 0, 0)
    assert layers.lowerdirs(layout, [b2, b1], "ro") == ["bins/2", "bins/1", "ro"]
    assert layers.lowerdirs(layout, [], "ro") == ["ro"]  # under an upper layer one lower is enough
    assert layers.lowerdirs(layout, [], "/x/seed", read_only=True) == ["/x/seed", ".empty"]
    stack = layers.stack(layout, [b2, b1], b"/x/seed")
    assert [layer.directory() for layer in stack] == [os.fsencode(layout.bin(2)), os.fsencode(layout.bin(1)),
                                                      b"/x/seed"]
    assert isinstance(layers.layer(layout, b1, {}), DirLayer)
    assert set(layers.bin_names(layout, 7)) == {"7", "7.opaque", "7.sha256", "7.sfs"}
    assert layers.bin_files(layout, b1) == (layout.bin(1), layout.opaque_record(1), layout.digest_list(1))


def test_a_sealed_bin_is_stacked_where_its_image_is_mounted(tmp_path: Path) -> None:
    layout = RootLayout(tmp_path)
    b1, b2 = Bin(1, T, 0.0, 0, 0, 0), Bin(2, T, 0.0, 0, 0, 0, format="sealed")
    assert layers.image(layout, b2) == layout.sealed_bin(2) and layers.image(layout, b1) is None
    assert layers.lowerdirs(layout, [b2, b1], "ro", images={2: ".layers/2"}) == [".layers/2", "bins/1", "ro"]
    with pytest.raises(SquashfuError, match="bin 2 is sealed and its image is not mounted"):
        layers.lowerdirs(layout, [b2, b1], "ro")
    stack = layers.stack(layout, [b2, b1], b"/x/seed", {2: b"/run/x/bins-2.sfs"})
    assert [layer.directory() for layer in stack] == [b"/run/x/bins-2.sfs", os.fsencode(layout.bin(1)), b"/x/seed"]
    assert layers.bin_files(layout, b2) == (layout.sealed_bin(2), layout.opaque_record(2))


def test_an_unknown_kind_of_bin_is_refused_not_guessed(tmp_path: Path) -> None:
    """A bin of a format this squashfu does not know (a newer one's) is neither read nor recovered."""
    strange = Bin(2, T, 0.0, 0, 0, 0, format="chunked")
    layout = hand_made_root(tmp_path, (Bin(1, T, 0.0, 0, 0, 0), strange))
    history = history_mod.load(layout.history)
    with pytest.raises(CorruptRootError, match="'chunked'"):
        recovery.recover(layout, history)
    with pytest.raises(CorruptRootError, match="'chunked'"):
        layers.lowerdirs(layout, [strange], "ro")
    with pytest.raises(CorruptRootError, match="'chunked'"):
        layers.layer(layout, strange, {})
    with pytest.raises(CorruptRootError, match="'chunked'"):
        layers.check_known(history.bins)


def test_a_committed_layer_that_is_missing_stops_recovery(tmp_path: Path) -> None:
    layout = hand_made_root(tmp_path, (Bin(1, T, 0.0, 0, 0, 0),))
    os.rmdir(layout.bin(1))
    with pytest.raises(CorruptRootError, match="bins/1 is missing"), opened_root(layout.root, "backup", write=True):
        pass
    layout.bin(1).mkdir()
    layout.seed("seed.sfs").unlink()
    with pytest.raises(CorruptRootError, match=r"seed\.sfs but it is missing"), \
            opened_root(layout.root, "backup", write=True):
        pass


def test_a_dead_process_or_a_reused_pid_is_not_alive() -> None:
    assert alive_pid(identity()) == os.getpid()
    child = subprocess.Popen(["sleep", "30"])
    try:
        ident = identity(child.pid)
        assert alive_pid(ident) == child.pid
    finally:
        child.kill()
        child.wait()
    assert alive_pid(ident) is None
    assert alive_pid(f"{os.getpid()} 1") is None  # this PID, but a process that started at another time
    for bad in ("", "12", "x y", "1 2 3"):
        assert alive_pid(bad) is None
