"""Reading mountinfo's text back exactly: names with spaces, backslashes, newlines, colons, commas."""

from __future__ import annotations

import os

from squashfu_fs.engines import mounts

HOSTILE = ["/r/a b/seed", "/r/back\\slash", "/r/new\nline", "/r/tab\there", "/r/co:lon,comma", "bins/3"]


def kernel_shows(value: bytes) -> bytes:
    """What seq_show_option (fs/seq_file.c) prints for an option value: these bytes as \\ooo octal."""
    return b"".join(b"\\%03o" % c if c in b", \t\n\\" else bytes([c]) for c in value)


def test_overlay_layers_read_back_exactly_what_mount_was_given() -> None:
    given = ":".join(mounts._escape_layer(x) for x in HOSTILE)  # what mount_overlay passes
    options = b"ro,lowerdir=" + kernel_shows(given.encode()) + b",redirect_dir=on,uuid=null"
    entry = mounts.MountEntry(b"/mnt", "overlay", 1, b"overlay", options.decode())
    assert mounts.overlay_layers(entry) == [os.fsencode(x) for x in HOSTILE]


def test_layers_given_one_by_one_are_read_too() -> None:
    options = b"ro," + b",".join(b"lowerdir+=" + kernel_shows(os.fsencode(x)) for x in HOSTILE)
    entry = mounts.MountEntry(b"/mnt", "overlay", 1, b"overlay", options.decode())
    assert mounts.overlay_layers(entry) == [os.fsencode(x) for x in HOSTILE]


def test_a_non_utf8_name_survives_the_round_trip() -> None:
    name = b"/r/caf\xe9/seed"
    entry = mounts.MountEntry(b"/mnt", "overlay", 1, b"overlay",
                              (b"lowerdir=" + kernel_shows(name) + b":bins/1").decode(errors="surrogateescape"))
    assert mounts.overlay_layers(entry) == [name, b"bins/1"]
