"""Requests on the root only read what housekeeping prepared: no history reload, no mount, no unmount.

A root lookup, getattr or listing answers from memory. Reloading the history
(which mounts a new seed) and letting go of an old seed (an unmount, with its
retries) happen in a housekeeping tick, in a worker thread.
"""

from __future__ import annotations

import time
from pathlib import Path

from squashfu_fs.read.vfs import ROOT_INO
from squashfu_fs.store.history import Seed

from .t2_fuse_ops import World, at, listdir, lookup_path, run


def test_root_requests_never_reload_or_mount(tmp_path: Path) -> None:
    w = World(tmp_path)
    ops, vfs, _ = w.ops()
    seeds = vfs.seeds
    old_view = lookup_path(ops, b"2026-11-03/home/alice").st_ino  # the kernel holds a directory of an old view
    w.history = w.history.with_seed(  # a resquash commits: a new seed, bin 1 absorbed
        Seed(file="seed.2.sfs", generation=2, time=at(1), created=at(3), absorbed=(1,)),
        remaining=w.history.bins[1:])
    w.save()
    time.sleep(0.6)  # past any rate limit on looking at history.json
    checks = vfs.counters.history_checks
    run(ops.getattr, ROOT_INO, None)
    assert run(ops.lookup, ROOT_INO, b"2026-11-03", None).st_ino != 0
    assert b"2026-11-03" in [n for n, _, _ in listdir(ops, ROOT_INO)]
    assert vfs.counters.history_checks == checks, "a root request looked at history.json"
    assert seeds.acquired == ["seed.sfs"], "a root request mounted a seed"  # type: ignore[attr-defined]
    run(ops.tick)  # housekeeping: the reload runs here
    assert seeds.acquired == ["seed.sfs", "seed.2.sfs"]  # type: ignore[attr-defined]
    assert b"2026-11-02" not in [n for n, _, _ in listdir(ops, ROOT_INO)]
    for ino, node in list(vfs.nodes.items()):  # the kernel forgets the old views
        if node.view is not None and node.view.seed_file == "seed.sfs":
            run(ops.forget, [(ino, node.nlookup)])
    assert old_view not in vfs.nodes
    assert seeds.released == [], "forget unmounted a seed on the request path"  # type: ignore[attr-defined]
    run(ops.tick)
    assert seeds.released == ["seed.sfs"]  # type: ignore[attr-defined]


def test_a_failed_reload_is_not_acknowledged_and_is_tried_again(tmp_path: Path) -> None:
    w = World(tmp_path)
    ops, vfs, _ = w.ops()
    published: list[int] = []
    vfs.on_loaded = lambda usage: published.append(usage.generation)  # type: ignore[assignment,attr-defined]
    broken = {"seed.2.sfs"}
    inner = vfs.seeds.directory_of  # type: ignore[attr-defined]

    def directory_of(name: str) -> bytes:
        if name in broken:
            raise OSError(5, "the seed image cannot be mounted")
        return inner(name)

    vfs.seeds.directory_of = directory_of  # type: ignore[attr-defined]
    w.history = w.history.with_seed(
        Seed(file="seed.2.sfs", generation=2, time=at(1), created=at(3), absorbed=(1,)),
        remaining=w.history.bins[1:])
    w.save()
    run(ops.tick)
    assert w.history.generation not in published
    assert b"2026-11-02" in [n for n, _, _ in listdir(ops, ROOT_INO)], "the old history keeps being served"
    broken.clear()
    run(ops.tick)
    assert published[-1] == w.history.generation
    assert b"2026-11-02" not in [n for n, _, _ in listdir(ops, ROOT_INO)]

