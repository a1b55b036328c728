"""Several sources in one root: each under its own absolute path in every view, as with rsync --relative.

Real nights with the real CLI, rsync and mounts (docs/operations.md,
"Several sources"): every day equals the sources as they were, placed under
their paths with the directories above them; one source whose disk did not
come up is refused; bad source lists are refused in one line; a root with one
source keeps its config and history exactly as before.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from squashfu_fs.engines import mounts
from squashfu_fs.errors import ConfigError
from squashfu_fs.store.config import Config, load

from .harness import bin_entries, fuse_mounted, history, one_line, rollback_snapshot, rolled_back, squashfu
from .treegen import B, Entry, build_initial, describe, differences, mutate, snapshot

pytestmark = pytest.mark.mounts

Snapshot = tuple[dict[B, Entry], frozenset[frozenset[B]]]


def rel(path: Path) -> B:
    """A source's path as a view names it: absolute, without the leading slash."""
    return os.fsencode(path).lstrip(b"/")


def combined(sources: list[Path], parents: list[Path]) -> Snapshot:
    """The sources as one view should hold them: each under its path, with hard links grouped across them.

    ``parents`` are the directories above the sources whose attributes the
    test controls (the ones above the scratch directory change all the time).
    """
    entries: dict[B, Entry] = {rel(p): describe(os.fsencode(p)) for p in parents}
    inodes: dict[tuple[int, int], list[B]] = {}
    for src in sources:
        top = os.fsencode(src)
        entries[rel(src)] = describe(top)
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                key = rel(Path(os.fsdecode(path)))
                entries[key] = describe(path, st)
                if entries[key].kind == "file" and st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(key)
    groups = frozenset(frozenset(names) for names in inodes.values() if len(names) > 1)
    return entries, groups


def within(view: Snapshot, sources: list[Path], parents: list[Path]) -> Snapshot:
    """The part of a view's snapshot that ``combined`` describes."""
    tops = [rel(s) for s in sources]
    keep = {rel(p) for p in parents}
    entries = {k: v for k, v in view[0].items()
               if k in keep or any(k == t or k.startswith(t + b"/") for t in tops)}
    return entries, view[1]


def ancestors(path: Path) -> set[B]:
    parts = rel(path).split(b"/")
    return {b"/".join(parts[:i]) for i in range(1, len(parts))}


def strip_excluded(expected: Snapshot, excluded: B) -> Snapshot:
    entries, groups = expected
    return ({k: v for k, v in entries.items() if k != excluded},
            frozenset(g for g in groups if excluded not in g))


@pytest.fixture
def sources(scratch: Path) -> tuple[list[Path], list[Path]]:
    """Two sources, one of them nested (``srv/www``) below a parent with its own owner, mode and xattr."""
    etc, www, srv = scratch / "etc", scratch / "srv" / "www", scratch / "srv"
    etc.mkdir()
    www.mkdir(parents=True)
    build_initial(os.fsencode(etc), seed=1)
    build_initial(os.fsencode(www), seed=2)
    (srv / "other").mkdir()
    (srv / "other" / "not-backed-up").write_text("outside every source\n")
    (etc / "shared").write_text("one file, a name in each source\n")
    os.link(etc / "shared", www / "shared-too")
    os.chown(srv, 1234, 5678)
    os.chmod(srv, 0o751)
    os.setxattr(srv, "user.parent", b"kept")
    os.utime(srv, (1_500_000_000, 1_500_000_000))
    return [etc, www], [srv]


def test_every_day_holds_each_source_under_its_own_path(scratch: Path,
                                                        sources: tuple[list[Path], list[Path]]) -> None:
    srcs, parents = sources
    etc, www = srcs
    root, mp = scratch / "root", scratch / "mp"
    excluded = rel(etc) + b"/big.bin"
    squashfu("init", root, "--source", etc, "--source", www, "--exclude", "/" + os.fsdecode(excluded),
             "--max-bins", "3", "--min-bins", "1")
    config_text = (root / "squashfu.toml").read_text()
    assert f'source = ["{etc}", "{www}"]' in config_text, config_text
    assert load(root).sources == (str(etc), str(www))
    expected: dict[str, Snapshot] = {}
    plan = [("2026-11-02", []), ("2026-11-03", []), ("2026-11-04", []), ("2026-11-05", ["--full"]),
            ("2026-11-06", []), ("2026-11-07", [])]
    for night, (day, extra) in enumerate(plan):
        if night:
            mutate(os.fsencode(etc), night, seed=1)
            mutate(os.fsencode(www), night + 2, seed=2)
            (scratch / "srv" / "other" / f"night-{night}").write_text("still not backed up\n")
        if night == 2:  # the parent of a source changes: its copy in the views follows
            os.chmod(parents[0], 0o750)
            os.setxattr(parents[0], "user.parent", b"changed")
        if night == 4:  # a hard link across the two sources, made on a manifest night
            os.link(www / "big.bin", etc / "www-big")
        squashfu("-r", root, "backup", *extra, now=f"{day}T02:00")
        if night:  # the change manifest works across several sources; --full compares the whole of each
            assert history(root)["bins"][-1]["compare"] == ("full" if extra else "manifest")
        taken = strip_excluded(combined(srcs, parents), excluded)
        expected[day] = taken
        view = rollback_snapshot(root, "latest", mp)
        got = within(view, srcs, parents)
        assert not differences(taken, got), f"night {night}: {differences(taken, got)}"
        # nothing but the sources and the directories above them
        allowed = ancestors(etc) | ancestors(www)
        stray = [k for k in view[0] if k not in allowed and k not in got[0]]
        assert not stray, f"night {night}: entries outside the sources: {stray[:5]}"
        assert excluded not in view[0] and rel(www) + b"/big.bin" in view[0]
    h = history(root)
    assert h["seed"]["absorbed"], "six nights with max_bins 3 must have resquashed"
    for entry in [h["seed"], *h["bins"]]:
        assert [s["path"] for s in entry["sources"]] == [str(etc), str(www)]
    # the top of every view is "/"'s, as rsync --relative would make it
    with rolled_back(root, "latest", mp) as view_top:
        st, top = os.stat(view_top), os.stat("/")
        assert (st.st_mode, st.st_uid, st.st_gid) == (top.st_mode, top.st_uid, top.st_gid)
    # every day still in the history, through roll-back
    days = [d for d in expected if d in squashfu("-r", root, "list").stdout]
    assert len(days) >= 3
    for day in days:
        got = within(rollback_snapshot(root, day, mp), srcs, parents)
        assert not differences(expected[day], got), f"{day}: {differences(expected[day], got)}"
    # and through the time-travel filesystem
    with fuse_mounted(root, scratch / "fs") as fs:
        for day in days:
            got = within(snapshot(os.fsencode(fs / day)), srcs, parents)
            assert not differences(expected[day], got), f"{day} through FUSE: {differences(expected[day], got)}"
    # restore one source of one day, by its path in the view
    day = days[-2]
    out = scratch / "restored"
    squashfu("-r", root, "restore", day, os.fsdecode(rel(www)), "--to", out)
    want = {k[len(rel(www)) + 1:]: v for k, v in expected[day][0].items() if k.startswith(rel(www) + b"/")}
    got_www = snapshot(os.fsencode(out / "www"))
    assert not differences((want, frozenset()), (got_www[0], frozenset())), differences(
        (want, frozenset()), (got_www[0], frozenset()))
    shutil.rmtree(out)
    # the history queries name paths as the views do
    changed = json.loads(squashfu("-r", root, "diff", days[0], days[-1], "--json").stdout)
    assert changed and all(c["path"].startswith((os.fsdecode(rel(etc)), os.fsdecode(rel(www)),
                                                 os.fsdecode(rel(parents[0])))) or c["path"] in
                           {os.fsdecode(a) for a in ancestors(etc) | ancestors(www)} for c in changed), changed
    rows = json.loads(squashfu("-r", root, "versions", str(etc / "home" / "alice" / "docs" / "note03.txt"),
                               "--json").stdout)
    assert rows, "versions found nothing under the source's absolute path"
    gone = squashfu("-r", root, "deleted", str(etc)).stdout
    assert "doomed-dir" in gone, gone
    squashfu("-r", root, "verify")


@pytest.fixture
def tmpfs_source(scratch: Path) -> Iterator[Path]:
    """A third source that is a tmpfs mount point, as a data disk's is; unmounted in teardown."""
    data = scratch / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", data], check=True)
    try:
        yield data
    finally:
        if mounts.is_mounted(data):
            subprocess.run(["umount", data], check=True)


def test_one_source_whose_disk_did_not_come_up_keeps_its_last_state(
        scratch: Path, sources: tuple[list[Path], list[Path]], tmpfs_source: Path) -> None:
    srcs, _ = sources
    data = tmpfs_source
    for i in range(10):
        (data / f"f{i}").write_text(f"file {i}\n")
    root = scratch / "root"
    squashfu("init", root, *[a for s in [*srcs, data] for a in ("--source", s)])
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    for i in range(8):  # most of one small source deleted: committed, and said, though the root barely shrank
        (data / f"f{i}").unlink()
    # (a bin image holding no xattr at all answers listxattr on its directories with EOPNOTSUPP: see the report)
    (srcs[0] / "with-xattr").write_text("x\n")
    os.setxattr(srcs[0] / "with-xattr", "user.note", b"kept")
    line = one_line(squashfu("-r", root, "backup", now="2026-11-03T02:00", expect=3))
    assert f"leaves {data} (2 of 10) with fewer than half" in line, line
    mp = scratch / "mp"
    kept = {k: v for k, v in rollback_snapshot(root, "latest", mp)[0].items() if k.startswith(rel(data) + b"/")}
    assert sorted(kept) == [rel(data) + b"/f8", rel(data) + b"/f9"], sorted(kept)
    subprocess.run(["umount", data], check=True)  # tonight the data disk did not come up
    for day, extra, words in [("04", [], "is empty, but had 2 entries"),
                              ("05", ["--full"], "is on another filesystem"),
                              ("06", [], "is missing")]:
        if day == "05":
            (data / "stray").write_text("written into the bare mount point\n")
        if day == "06":
            shutil.rmtree(data)
        (srcs[0] / "tonight").write_text(f"the other sources are backed up all the same ({day})\n")
        os.setxattr(srcs[0] / "tonight", "user.day", day.encode())
        line = one_line(squashfu("-r", root, "backup", *extra, now=f"2026-11-{day}T02:00", expect=3))
        assert f"the source {data} {words}" in line and "its last backed-up state is kept" in line, line
        assert ("--allow-source-change" in line) == (day != "06"), line
        assert history(root)["bins"][-1]["time"].startswith(f"2026-11-{day}")
        view = rollback_snapshot(root, "latest", mp)[0]
        assert {k: v for k, v in view.items() if k.startswith(rel(data) + b"/")} == kept
        assert rel(srcs[0]) + b"/tonight" in view
    # The administrator says it is intended: committed, the other sources untouched.
    data.mkdir()
    line = one_line(squashfu("-r", root, "backup", "--allow-source-change", now="2026-11-07T02:00", expect=3))
    assert f"leaves {data} (0 of 2)" in line, line
    view = rollback_snapshot(root, "latest", mp)
    assert rel(data) in view[0] and not [k for k in view[0] if k.startswith(rel(data) + b"/")]
    assert rel(srcs[1]) + b"/big.bin" in view[0]


def test_a_root_inside_any_source_is_refused(scratch: Path, sources: tuple[list[Path], list[Path]]) -> None:
    etc, www = sources[0]
    line = one_line(squashfu("init", www / "root", "--source", etc, "--source", www, expect=2))
    assert "inside the source" in line and str(www) in line, line
    assert not (www / "root").exists()


@pytest.mark.parametrize(("given", "words"), [
    (["/srv/www", "/srv/www"], "given twice"),
    (["/srv", "/srv/www"], "inside source /srv"),
    (["/srv/www", "/srv"], "inside source /srv"),
    (["/", "/etc"], "holds every other source"),
])
def test_bad_source_lists_are_refused_in_one_line(scratch: Path, given: list[str], words: str) -> None:
    """A usage error, as click prints one: the usage lines, then the reason on one line."""
    proc = squashfu("init", scratch / "root", *[a for s in given for a in ("--source", s)], expect=2)
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("Usage:"), proc.stderr
    reason = proc.stderr.strip().splitlines()[-1]
    assert reason.startswith("Error: ") and words in reason, proc.stderr
    assert not (scratch / "root").exists()


def test_an_exclude_that_leaves_out_a_source_is_refused(scratch: Path,
                                                        sources: tuple[list[Path], list[Path]]) -> None:
    (etc, www), _ = sources
    for pattern in ("/" + os.fsdecode(rel(www.parent)), "www/", "e*"):
        line = one_line(squashfu("init", scratch / "root", "--source", etc, "--source", www, "--exclude", pattern,
                                 expect=2))
        assert f"the exclude pattern {pattern!r} leaves out the source" in line, line
        assert not (scratch / "root").exists()


@pytest.mark.parametrize("pattern", ["{srv}/[[:alpha:]]ww/", "{srv}/w\\ww/", "- {srv}/www/", "+ /tmp/"])
def test_an_exclude_squashfu_cannot_read_is_refused_with_several_sources(
        scratch: Path, sources: tuple[list[Path], list[Path]], pattern: str) -> None:
    """A pattern squashfu does not understand might leave out a source unseen: refused at init and at backup."""
    (etc, www), _ = sources
    pattern = pattern.format(srv=www.parent)
    root = scratch / "root"
    line = one_line(squashfu("init", root, "--source", etc, "--source", www, "--exclude", pattern, expect=2))
    assert f"the exclude pattern {pattern!r}" in line and "nothing was created" in line, line
    assert not root.exists()
    squashfu("init", root, "--source", etc, "--source", www)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    before = (root / "history.json").read_bytes()
    config = root / "squashfu.toml"
    config.write_text(config.read_text().replace("excludes = []", f"excludes = [{json.dumps(pattern)}]"))
    line = one_line(squashfu("-r", root, "backup", now="2026-11-03T02:00", expect=2))
    assert f"the exclude pattern {pattern!r}" in line and "nothing was backed up" in line, line
    assert (root / "history.json").read_bytes() == before


@pytest.mark.parametrize(("value", "words"), [
    ('["/etc", "/etc"]', "given twice"),
    ('["/srv", "/srv/www"]', "inside source /srv"),
    ('["/", "/etc"]', "holds every other source"),
    ('["etc", "/srv"]', "local absolute path"),
    ('["host:/etc", "/srv"]', "local absolute path"),
    ('["/srv/www/", "/etc"]', "written plainly"),
    ('["/srv/../etc", "/srv"]', "written plainly"),
    ('[]', "string or a list of strings"),
    ('["/etc"]', "needs at least two"),
    ('["/etc", 3]', "string or a list of strings"),
])
def test_bad_source_lists_in_the_config_are_refused(tmp_path: Path, value: str, words: str) -> None:
    (tmp_path / "squashfu.toml").write_text(f"source = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path)
    assert words in str(caught.value) and "\n" not in str(caught.value), caught.value


def test_one_source_keeps_its_config_and_history_exactly(scratch: Path) -> None:
    src, root = scratch / "src", scratch / "root"
    src.mkdir()
    (src / "a").write_text("a\n")
    squashfu("init", root, "--source", src)
    assert (root / "squashfu.toml").read_text() == (
        "# squashfu backup root: see `squashfu --help` and docs/commands.md\n"
        f'source = "{src}"\n'
        "excludes = []\n"
        'compression = "zstd"\n'
        "max_bins = 14\n"
        "min_bins = 7\n")
    config = load(root)
    assert (config.source, config.sources, config.several) == (str(src), (), False)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    (src / "b").write_text("b\n")
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    h = history(root)
    assert "sources" not in h["seed"] and all("sources" not in b for b in h["bins"])
    assert sorted(h["bins"][0]) == sorted(
        ["number", "time", "duration", "bytes", "files", "rsync_status", "format", "escaped_xattrs", "compare",
         "source_device", "source_fsid", "source_entries", "image_bytes", "digest", "acls"])


def test_a_config_names_several_sources_as_a_list() -> None:
    config = Config(source="/", sources=("/etc", "/srv/www"))
    assert config.selection == (b"etc", b"srv/www") and config.source_paths == ("/etc", "/srv/www")
    assert 'source = ["/etc", "/srv/www"]\n' in config.to_toml()
    with pytest.raises(ConfigError, match="walked from"):
        Config(source="/etc", sources=("/etc", "/srv"))


def test_a_source_added_later_appears_and_one_taken_out_is_refused(
        scratch: Path, sources: tuple[list[Path], list[Path]]) -> None:
    (etc, www), _ = sources
    home = scratch / "home"
    home.mkdir()
    (home / "notes").write_text("added later\n")
    root, config = scratch / "root", scratch / "root" / "squashfu.toml"
    squashfu("init", root, "--source", etc, "--source", www)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    text = config.read_text()
    config.write_text(text.replace(f'"{www}"]', f'"{www}", "{home}"]'))
    squashfu("-r", root, "backup", now="2026-11-03T02:00")
    view = rollback_snapshot(root, "latest", scratch / "mp")[0]
    assert rel(home) + b"/notes" in view and rel(etc) + b"/big.bin" in view
    assert [s["path"] for s in history(root)["bins"][-1]["sources"]] == [str(etc), str(www), str(home)]
    before = (root / "history.json").read_bytes()
    for edited, words in [(text, f"source {home} was taken out"),
                          (f'source = "{etc}"\n', "made for several sources")]:
        config.write_text(edited)
        line = one_line(squashfu("-r", root, "backup", now="2026-11-04T02:00", expect=2))
        assert words in line and "start a new root" in line, line
        line = one_line(squashfu("-r", root, "backup", "--allow-source-change", now="2026-11-04T02:00", expect=2))
        assert words in line, line
        assert (root / "history.json").read_bytes() == before


def test_a_root_of_one_source_edited_to_several_is_refused(scratch: Path) -> None:
    src, other, root = scratch / "src", scratch / "other", scratch / "root"
    src.mkdir()
    other.mkdir()
    (src / "a").write_text("a\n")
    squashfu("init", root, "--source", src)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    before = (root / "history.json").read_bytes()
    config = root / "squashfu.toml"
    config.write_text(config.read_text().replace(f'source = "{src}"', f'source = ["{src}", "{other}"]'))
    line = one_line(squashfu("-r", root, "backup", now="2026-11-03T02:00", expect=2))
    assert "made for one source" in line, line
    assert (root / "history.json").read_bytes() == before


def test_the_history_mounted_inside_a_source_is_not_backed_up(scratch: Path,
                                                              sources: tuple[list[Path], list[Path]]) -> None:
    (etc, www), _ = sources
    root = scratch / "root"
    squashfu("init", root, "--source", etc, "--source", www)
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    with fuse_mounted(root, www / "backups"), rolled_back(root, "latest", etc / "rb"):
        for number, extra in ((1, []), (2, ["--full"])):  # a manifest night, then a full one
            (www / "shared-too").write_text("changed\n" * number)  # a new size: a full night quick-checks
            proc = squashfu("-r", root, "backup", "-v", *extra, now=f"2026-11-0{2 + number}T02:00")
            line = next(ln for ln in proc.stderr.splitlines() if "leaving out squashfu's own mounts" in ln)
            for pattern in (f"/{os.fsdecode(rel(etc))}/rb/", f"/{os.fsdecode(rel(www))}/backups/"):
                assert pattern in line, line
            entries = bin_entries(root, number)
            assert rel(www) + b"/shared-too" in entries
            assert not [e for e in entries if e.startswith((rel(www) + b"/backups", rel(etc) + b"/rb"))], entries


def test_a_source_reached_through_a_symlink_is_refused(scratch: Path,
                                                       sources: tuple[list[Path], list[Path]]) -> None:
    (etc, www), _ = sources
    (scratch / "link").symlink_to(www.parent)
    line = one_line(squashfu("init", scratch / "root", "--source", etc, "--source", scratch / "link" / "www",
                             expect=2))
    assert "reached through a symlink" in line and "nothing was created" in line, line
    assert not (scratch / "root").exists()


def test_a_dry_run_names_paths_under_each_source_and_commits_nothing(
        scratch: Path, sources: tuple[list[Path], list[Path]]) -> None:
    (etc, www), _ = sources
    root = scratch / "root"
    squashfu("init", root, "--source", etc, "--source", www)
    first = squashfu("-r", root, "backup", "--dry-run", now="2026-11-02T02:00").stdout
    assert os.fsdecode(rel(etc)) + "/big.bin" in first and os.fsdecode(rel(www)) + "/big.bin" in first, first
    assert "srv/other" not in first, first
    squashfu("-r", root, "backup", now="2026-11-02T02:00")
    before = (root / "history.json").read_bytes()
    (www / "new.txt").write_text("tonight\n")
    tonight = squashfu("-r", root, "backup", "--dry-run", now="2026-11-03T02:00").stdout
    assert os.fsdecode(rel(www)) + "/new.txt" in tonight and "big.bin" not in tonight, tonight
    assert (root / "history.json").read_bytes() == before


@pytest.mark.parametrize("swapped_on", ["seed", "full", "manifest"])
def test_a_source_swapped_for_a_symlink_before_rsync_keeps_its_last_state(
        scratch: Path, sources: tuple[list[Path], list[Path]], swapped_on: str) -> None:
    """Swapped after the walk, rsync would store the source as that symlink: withdrawn instead, and exit 3."""
    from .t3_hostile_source import swapping_rsync

    (etc, www), _ = sources
    root, outside, mp = scratch / "root", scratch / "outside", scratch / "mp"
    outside.mkdir()
    (outside / "roots-own-secret").write_text("root must never back this up here\n")
    env, armed = swapping_rsync(scratch, www, outside)
    squashfu("init", root, "--source", etc, "--source", www)
    if swapped_on != "seed":
        squashfu("-r", root, "backup", now="2026-11-02T02:00", env=env)
    before = rollback_snapshot(root, "latest", mp)[0] if swapped_on != "seed" else {}
    (etc / "tonight").write_text("the other source still backed up\n")
    (www / "tonight").write_text("walked, so on a manifest night listed for rsync\n")
    armed.touch()
    extra = ["--full"] if swapped_on == "full" else []
    line = one_line(squashfu("-r", root, "backup", *extra, now="2026-11-03T02:00", env=env, expect=3))
    assert not armed.exists() and www.is_symlink()
    assert f"source {www} " in line and "symlink" in line, line
    if swapped_on != "seed":
        assert history(root)["bins"][-1]["compare"] == swapped_on
    view = rollback_snapshot(root, "latest", mp)[0]
    assert rel(etc) + b"/tonight" in view
    assert not [k for k in view if k.endswith(b"roots-own-secret")]
    if swapped_on == "seed":  # nothing to keep: the source is not in the seed
        assert not [k for k in view if k == rel(www) or k.startswith(rel(www) + b"/")]
    else:  # the union still shows the source as the last night stored it
        assert view[rel(www)].kind == "dir"
        kept = {k: v for k, v in view.items() if k.startswith(rel(www) + b"/")}
        assert kept == {k: v for k, v in before.items() if k.startswith(rel(www) + b"/")}
    # the source back as a directory with new contents: the next night stores exactly that
    www.unlink()
    www.mkdir()
    (www / "back").write_text("a directory again\n")
    proc = squashfu("-r", root, "backup", now="2026-11-04T02:00", env=env, expect=0 if swapped_on == "seed" else 3)
    assert swapped_on == "seed" or f"leaves {www} (1 of " in one_line(proc), proc.stderr
    view = rollback_snapshot(root, "latest", mp)[0]
    assert [k for k in view if k.startswith(rel(www) + b"/")] == [rel(www) + b"/back"], sorted(view)


@pytest.mark.parametrize("night", ["seed", "bin"])
def test_a_source_a_user_symlinked_is_left_out_and_the_others_backed_up(
        scratch: Path, sources: tuple[list[Path], list[Path]], night: str) -> None:
    """A user who owns /srv must not stop the backup of /etc: /srv/www keeps its last state, exit 3."""
    (etc, www), _ = sources
    api = www.parent / "api"  # a third source beside www, below the same parent
    api.mkdir()
    (api / "conf").write_text("api\n")
    root, outside, mp = scratch / "root", scratch / "outside", scratch / "mp"
    outside.mkdir()
    (outside / "roots-own-secret").write_text("never in the backup\n")
    squashfu("init", root, "--source", etc, "--source", www, "--source", api)
    before: dict[B, Entry] = {}
    if night == "bin":
        squashfu("-r", root, "backup", now="2026-11-02T02:00")
        (etc / "a-manifest-night").write_text("x\n")
        os.setxattr(etc / "a-manifest-night", "user.note", b"an image with no xattr lists none on its dirs")
        squashfu("-r", root, "backup", now="2026-11-03T02:00")
        assert history(root)["bins"][-1]["compare"] == "manifest"
        before = rollback_snapshot(root, "latest", mp)[0]
    hidden = scratch / "www-hidden"
    www.rename(hidden)
    www.symlink_to(outside)
    (etc / "tonight").write_text("still backed up\n")
    (api / "tonight").write_text("still backed up\n")
    proc = squashfu("-r", root, "backup", now="2026-11-04T02:00", expect=3)
    line = one_line(proc)
    assert f"source {www} " in line and "symlink" in line, line
    log = (root / "logs" / "backup-2026-11-04T020000.log").read_text()
    assert str(www) in log and "symlink" in log, log
    view = rollback_snapshot(root, "latest", mp)[0]
    assert rel(etc) + b"/tonight" in view and rel(api) + b"/tonight" in view
    assert not [k for k in view if k.endswith(b"roots-own-secret")]
    kept = {k: v for k, v in view.items() if k == rel(www) or k.startswith(rel(www) + b"/")}
    assert kept == {k: v for k, v in before.items() if k == rel(www) or k.startswith(rel(www) + b"/")}
    # gone altogether: the same
    www.unlink()
    proc = squashfu("-r", root, "backup", now="2026-11-05T02:00", expect=3)
    assert f"source {www} " in one_line(proc) and "missing" in one_line(proc), proc.stderr
    # back as it was: nothing of it was recorded as deleted, the next night stores it exactly
    hidden.rename(www)
    squashfu("-r", root, "backup", now="2026-11-06T02:00")
    view = rollback_snapshot(root, "latest", mp)[0]
    got = {k: v for k, v in view.items() if k.startswith(rel(www) + b"/")}
    want = {k: v for k, v in combined([www], [])[0].items() if k.startswith(rel(www) + b"/")}
    assert not differences((want, frozenset()), (got, frozenset())), differences(
        (want, frozenset()), (got, frozenset()))
    # every source unusable: refused, nothing committed
    before_all = (root / "history.json").read_bytes()
    for path in (etc, www, api):
        path.rename(scratch / (path.name + "-away"))
    line = one_line(squashfu("-r", root, "backup", now="2026-11-07T02:00", expect=2))
    assert "missing" in line and "nothing was backed up" in line, line
    assert (root / "history.json").read_bytes() == before_all


def test_a_new_source_rsync_did_not_copy_is_named(tmp_path: Path) -> None:
    """After rsync each source must be a directory in the layer, or (already committed) in the layers below it.

    A source added tonight has nothing below tonight's bin: missing from it,
    the day would silently lack it. (A plain directory stands for the bin.)
    """
    from squashfu_fs.write.source import withdraw_replaced_sources

    layer = tmp_path / "bin"
    (layer / "etc").mkdir(parents=True)
    (layer / "srv").mkdir()
    (layer / "srv" / "www").symlink_to("/")
    config = Config(source="/", sources=("/etc", "/srv/www", "/home"))
    why = withdraw_replaced_sources(layer, config, new={"/home"})
    assert why == {"/srv/www": "was a symlink when rsync reached it", "/home": "was not copied by rsync"}, why
    assert not os.path.lexists(layer / "srv" / "www") and (layer / "etc").is_dir()
    assert withdraw_replaced_sources(layer, config, new=()) == {}
