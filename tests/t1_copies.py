"""Where a copy lives, and the mark that makes a copy refuse backups (squashfu_fs/store/copies.py)."""

from __future__ import annotations

import os

import pytest

from squashfu_fs.errors import UsageError
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
