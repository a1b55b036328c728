"""Where a copy lives, and the mark that makes a copy refuse backups (squashfu_fs/store/copies.py)."""

from __future__ import annotations

import json
import os

import pytest

from squashfu_fs.errors import CorruptRootError, UsageError
from squashfu_fs.store import copies
from squashfu_fs.store.history import History


@pytest.mark.parametrize(("text", "kind", "path"), [
    ("/mnt/offsite/backup", "local", "/mnt/offsite/backup"),
    ("relative/copy", "local", os.path.abspath("relative/copy")),
    ("./a:b", "local", os.path.abspath("./a:b")),  # a colon after a slash: a local name, as for rsync
    ("/srv/a:b", "local", "/srv/a:b"),
    ("vault:/srv/copies/host1", "ssh", "vault:/srv/copies/host1"),
    ("root@vault.example.org:copies", "ssh", "root@vault.example.org:copies"),
    ("rclone:offsite:", "rclone", "offsite:"),
    ("rclone:s3:bucket/host1", "rclone", "s3:bucket/host1"),
])
def test_a_destination_is_named_as_rsync_and_rclone_name_places(text: str, kind: str, path: str) -> None:
    where = copies.parse(text)
    assert (where.kind, where.path, str(where)) == (kind, path, text)


@pytest.mark.parametrize("text", ["", "rclone:", "rclone:-x", ":path", "host:", "-e:x", "a\nb", "a\0b"])
def test_a_name_no_tool_could_use_is_refused_with_one_line(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        copies.parse(text)
    assert "\n" not in str(caught.value)


def test_the_copy_mark_survives_history_json_and_refuses_only_history_writers() -> None:
    original = History(generation=3, next_bin=2)
    copy = History.from_json(copies.marked(original, "/srv/backup", "2026-11-05T05:00:00+00:00").to_json())
    assert copies.mark_of(copy) == {"of": "/srv/backup", "synced": "2026-11-05T05:00:00+00:00"}
    assert copies.mark_of(original) is None
    for command in ("backup", "resquash"):
        with pytest.raises(UsageError, match="is a copy of /srv/backup"):
            copies.refuse_writes("/mnt/copy", copy, command)
    for command in ("rollback", "restore", "diff", "sync"):
        copies.refuse_writes("/mnt/copy", copy, command)  # reading a copy is fine
    copies.refuse_writes("/srv/backup", original, "backup")
    assert copies.mark_of(copies.unmarked(copy)) is None
    assert copies.unmarked(copy).to_json() == original.to_json()


def _history_json(seed_file: object = "seed.sfs", number: object = 1, **bin_extra: object) -> str:
    data = {"format": 1, "generation": 2, "next_bin": 2,
            "seed": {"file": seed_file, "generation": 1, "time": "2026-11-02T02:00:00", "created": "x"},
            "bins": [{"number": number, "time": "2026-11-03T02:00:00", "duration": 1.0, "bytes": 1, "files": 1,
                      "rsync_status": 0, **bin_extra}]}
    return json.dumps(data)


@pytest.mark.parametrize(("seed_file", "number", "extra"), [
    ("bins", 1, {}),  # was an internal error: invalid literal for int()
    ("../other/seed.sfs", 1, {}),  # would be mounted and unlinked outside the root
    ("/etc/shadow", 1, {}),
    ("seed.sfs/..", 1, {}),
    (None, 1, {}),
    ("seed.sfs", "1/../../x", {}),  # bins/1/../../x
    ("seed.sfs", -1, {}),
    ("seed.sfs", True, {}),
    ("seed.sfs", 1, {"format": ["sealed"]}),
    ("seed.sfs", 1, {"digest": 5}),
])
def test_a_history_naming_files_no_root_has_is_damaged(seed_file: object, number: object,
                                                       extra: dict[str, object]) -> None:
    with pytest.raises(CorruptRootError, match=r"^copy/history.json is damaged"):
        History.from_json(_history_json(seed_file, number, **extra), where="copy/history.json")


def test_a_history_with_ordinary_names_is_read() -> None:
    history = History.from_json(_history_json("seed.3.sfs", 7, format="sealed", digest="sha256:00"))
    assert history.seed is not None and history.seed.file == "seed.3.sfs" and history.bins[0].number == 7
