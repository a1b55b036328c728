"""The pure core: config, history, view naming, retention, rsync output, the lock."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest

from squashfu_fs.engines.rsync import _stat
from squashfu_fs.errors import ConfigError, CorruptRootError, LockedError, SquashfuError, UnknownViewError, UsageError
from squashfu_fs.store import config, history, views
from squashfu_fs.store import registry as readers
from squashfu_fs.store.history import Bin, History, Seed
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.store.lock import writer_lock
from squashfu_fs.util import clock
from squashfu_fs.write.retention import plan


def make_history(times: list[str]) -> History:
    """A history whose seed was made at times[0] and bin N at times[N]."""
    h = History().with_seed(Seed("seed.sfs", 1, times[0], times[0]))
    for n, t in enumerate(times[1:], start=1):
        h = h.with_bin(Bin(n, t, 1.0, 0, 0, 0))
    return h


# ------------------------------------------------------------- config


def test_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = config.Config(source="/srv/data", excludes=("*.tmp", '/with "quotes"', "ünï"), compression="xz",
                        max_bins=10, min_bins=3)
    (tmp_path / "squashfu.toml").write_text(cfg.to_toml())
    assert config.load(tmp_path) == cfg


def test_config_defaults_are_zstd_14_7() -> None:
    cfg = config.Config(source="/x")
    assert (cfg.compression, cfg.level, cfg.max_bins, cfg.min_bins) == ("zstd", 3, 14, 7)


@pytest.mark.parametrize("text, message", [
    ('source = "/x"\nmax_bins = 3\nmin_bins = 3\n', r"min_bins \(3\) must be smaller"),
    ('source = "relative"\n', "absolute"),
    ('source = "/x"\ncompression = "bzip9"\n', "compression"),
    ('source = "/x"\nmax_bins = "many"\n', "max_bins must be an integer"),
    ('source = "/x"\nsurprise = 1\n', "unknown setting"),
    ('excludes = []\n', "missing setting 'source'"),
    ('source = \n', "Invalid"),
])
def test_bad_config_is_one_clear_usage_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "squashfu.toml").write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        config.load(tmp_path)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_missing_config_says_run_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="squashfu init"):
        config.load(tmp_path)


# ------------------------------------------------------------- history


def test_history_round_trips_and_bumps_generation(tmp_path: Path) -> None:
    h = make_history(["2026-11-01T02:00:00+00:00", "2026-11-02T02:00:00+00:00"])
    path = tmp_path / "history.json"
    history.save(path, h)
    loaded = history.load(path)
    assert loaded == h
    assert loaded.generation == 2 and loaded.next_bin == 2
    assert not (tmp_path / "history.json.tmp").exists()


def test_bin_numbers_only_grow_across_resquash() -> None:
    h = make_history(["2026-11-01T02:00:00+00:00"] + [f"2026-11-{d:02d}T02:00:00+00:00" for d in range(2, 7)])
    seed = Seed("seed.2.sfs", 2, h.bins[2].time, h.bins[2].time, absorbed=(1, 2, 3))
    h = h.with_seed(seed, h.bins[3:])
    assert [b.number for b in h.bins] == [4, 5] and h.next_bin == 6


@pytest.mark.parametrize("text", ["", "{", '{"format": 99}', '{"format": 1, "seed": null}', "[]"])
def test_damaged_history_refuses_instead_of_guessing(tmp_path: Path, text: str) -> None:
    (tmp_path / "history.json").write_text(text)
    with pytest.raises(CorruptRootError):
        history.load(tmp_path / "history.json")


def test_missing_history_is_an_error_not_an_empty_root(tmp_path: Path) -> None:
    with pytest.raises(CorruptRootError, match="missing"):
        history.load(tmp_path / "history.json")


def test_unknown_history_fields_survive_a_rewrite(tmp_path: Path) -> None:
    data = json.loads(History().to_json())
    data["written_by_a_newer_version"] = {"x": 1}
    (tmp_path / "h.json").write_text(json.dumps(data))
    h = history.load(tmp_path / "h.json")
    assert json.loads(h.to_json())["written_by_a_newer_version"] == {"x": 1}


# ------------------------------------------------------------- views


def test_view_names_dates_weekdays_latest_and_seed() -> None:
    # Sun 1 Nov seed; Mon 2; Tue 3 twice; (Wed 4 missed); Thu 5; Mon 9
    h = make_history(["2026-11-01T02:00:00+00:00", "2026-11-02T02:00:00+00:00", "2026-11-03T02:00:00+00:00",
                      "2026-11-03T14:00:00+00:00", "2026-11-05T02:00:00+00:00", "2026-11-09T02:00:00+00:00"])
    t = views.ViewTable.from_history(h)
    assert list(t.dated) == ["2026-11-01", "2026-11-02", "2026-11-03", "2026-11-05", "2026-11-09"]
    assert t.dated["2026-11-03"].bins == (3, 2, 1), "the newest backup of a date wins"
    assert t.dated["2026-11-01"].bins == ()
    assert t.links == {"sun": "2026-11-01", "mon": "2026-11-09", "tue": "2026-11-03", "thu": "2026-11-05",
                       "latest": "2026-11-09"}
    assert "wed" not in t.names() and t.names()[-2:] == ["latest", "seed"]
    assert t.resolve("mon").bins == (5, 4, 3, 2, 1)
    assert t.resolve("seed").bins == ()
    assert t.resolve("2026-11-02").bins == (1,)


def test_every_backup_is_a_snapshot_even_two_on_one_day() -> None:
    h = make_history(["2026-11-01T02:00:00+00:00", "2026-11-03T02:00:00+00:00", "2026-11-03T14:00:00+00:00",
                      "2026-11-03T14:00:00+00:00"])
    t = views.ViewTable.from_history(h)
    assert list(t.snapshots) == ["2026-11-01T02:00:00", "2026-11-03T02:00:00", "2026-11-03T14:00:00",
                                 "2026-11-03T14:00:00-2"]
    assert t.resolve("2026-11-03T02:00:00").bins == (1,), "the morning backup the dated view hides"
    assert t.snapshots["2026-11-01T02:00:00"].bins == () and t.resolve("2026-11-03T14:00:00-2").bins == (3, 2, 1)


def test_unknown_view_lists_the_valid_ones() -> None:
    t = views.ViewTable.from_history(make_history(["2026-11-01T02:00:00+00:00"]))
    with pytest.raises(UnknownViewError, match=r"'wed'; valid views: 2026-11-01, sun, latest, seed"):
        t.resolve("wed")
    with pytest.raises(UnknownViewError, match="no backup yet"):
        views.ViewTable.from_history(History()).resolve("latest")


def test_a_resquashed_seed_keeps_its_date_view() -> None:
    h = make_history(["2026-11-01T02:00:00+00:00", "2026-11-02T02:00:00+00:00", "2026-11-03T02:00:00+00:00"])
    h = h.with_seed(Seed("seed.2.sfs", 2, h.bins[0].time, "2026-11-03T03:00:00+00:00", absorbed=(1,)), h.bins[1:])
    t = views.ViewTable.from_history(h)
    assert list(t.dated) == ["2026-11-02", "2026-11-03"]
    assert t.dated["2026-11-02"].bins == ()


# ------------------------------------------------------------- retention


@pytest.mark.parametrize("bins, keep, absorbed", [(15, 7, 8), (14, 7, 7), (3, 7, 0), (7, 7, 0), (5, 0, 5)])
def test_retention_plan_leaves_min_bins(bins: int, keep: int, absorbed: int) -> None:
    h = make_history(["2026-11-01T02:00:00+00:00"] + [f"2026-11-01T03:{m:02d}:00+00:00" for m in range(bins)])
    assert plan(h, keep) == tuple(range(1, absorbed + 1))


# ------------------------------------------------------------- small pieces


def test_clock_honours_squashfu_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQUASHFU_NOW", "2026-02-03T04:05:06")
    now = clock.now()
    assert (now.year, now.month, now.day, now.hour) == (2026, 2, 3, 4) and now.tzinfo is not None
    monkeypatch.setenv("SQUASHFU_NOW", "yesterday")
    with pytest.raises(UsageError, match="ISO 8601"):
        clock.now()
    monkeypatch.delenv("SQUASHFU_NOW")
    assert abs((clock.now() - datetime.now().astimezone()).total_seconds()) < 5


def test_seed_names_carry_a_generation() -> None:
    assert [RootLayout.seed_name(g) for g in (1, 2, 13)] == ["seed.sfs", "seed.2.sfs", "seed.13.sfs"]
    assert RootLayout.is_seed_name("seed.2.sfs") and not RootLayout.is_seed_name("seed.2.sfs.tmp")


def test_rsync_stats_are_parsed() -> None:
    out = b"Number of regular files transferred: 1,234\nTotal transferred file size: 5,678,901 bytes\n"
    assert _stat(out, rb"Number of regular files transferred: ([\d,]+)") == 1234
    assert _stat(out, rb"Total transferred file size: ([\d,]+)") == 5678901
    assert _stat(out, rb"Number of deleted files: ([\d,]+)") == 0


def test_second_writer_is_refused_naming_the_first(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    with (writer_lock(lock, "backup"),
          pytest.raises(LockedError, match=rf"squashfu backup \(pid {os.getpid()}"),
          writer_lock(lock, "resquash")):
        pass
    with writer_lock(lock, "resquash"):  # released on exit
        pass


def test_a_daemon_state_root_must_be_private(tmp_path: Path) -> None:
    fresh = tmp_path / "squashfu-1" / "abc"
    readers.make_state_dir(fresh)
    assert fresh.is_dir() and (fresh.parent.stat().st_mode & 0o777) == 0o700
    readers.make_state_dir(fresh)  # a second daemon, or a restart, is fine
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    steered = tmp_path / "steered"
    steered.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    homes = [open_to_all, steered]
    if os.geteuid() == 0:  # only root can give a directory away
        someone_else = tmp_path / "theirs"
        someone_else.mkdir(mode=0o700)
        os.chown(someone_else, 65534, 65534)
        homes.append(someone_else)
    for home in homes:
        with pytest.raises(SquashfuError, match="not a private directory"):
            readers.make_state_dir(home / "abc")
        assert not (home / "abc").exists()
