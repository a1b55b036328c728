"""``squashfu.toml`` is validated whole when it is read, so a bad value fails before any work starts.

Compression levels are checked against the real mksquashfs on this machine,
so the table in ``squashfu_fs/config.py`` cannot drift from the tool.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from squashfu_fs.errors import ConfigError
from squashfu_fs.store import config


@pytest.mark.parametrize("text, message", [
    ('compression_level = 99\n', r"compression_level 99 is out of range for zstd \(1\.\.22\)"),
    ('compression_level = 0\n', r"out of range for zstd"),
    ('compression = "gzip"\ncompression_level = 10\n', r"out of range for gzip \(1\.\.9\)"),
    ('compression = "lzo"\ncompression_level = 0\n', r"out of range for lzo \(1\.\.9\)"),
    ('compression = "xz"\ncompression_level = 6\n', "xz takes no compression_level"),
    ('compression = "lz4"\ncompression_level = 1\n', "lz4 takes no compression_level"),
    ('compression_level = "3"\n', "compression_level must be an integer"),
    ('compression_level = 3.0\n', "compression_level must be an integer"),
    ('compression = 3\n', "compression must be a string"),
    ('max_bins = -1\n', "max_bins must be between 1 and 300"),
    ('max_bins = 0\n', "max_bins must be between 1 and 300"),
    ('max_bins = 100000000000\n', "max_bins must be between 1 and 300"),
    ('max_bins = true\n', "max_bins must be an integer"),
    ('min_bins = -3\n', "min_bins must be at least 0"),
    ('excludes = "*.tmp"\n', "excludes must be a list of strings"),
    ('excludes = [1]\n', "excludes must be a list of strings"),
    ('excludes = ["*.tmp", ""]\n', "an empty exclude pattern"),
    ('excludes = ["a\\u0000b"]\n', "NUL"),
    ('seal = "yes"\n', r"seal must be a boolean \(true or false\), not 'yes'"),
    ('seal = 1\n', "seal must be a boolean"),
    ('rsh = ""\n', "rsh is empty"),
    ('rsh = "ssh -o \'unclosed"\n', "rsh .* cannot be split into words"),
    ('rsh = 22\n', "rsh must be a string"),
])
def test_every_value_is_checked_when_the_file_is_read(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "squashfu.toml").write_text('source = "/srv/data"\n' + text)
    with pytest.raises(ConfigError, match=message) as info:
        config.load(tmp_path)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert str(tmp_path / "squashfu.toml") in str(info.value)


def test_a_nul_in_the_source_is_refused(tmp_path: Path) -> None:
    (tmp_path / "squashfu.toml").write_text('source = "/srv/\\u0000data"\n')
    with pytest.raises(ConfigError, match="NUL"):
        config.load(tmp_path)


def test_every_unknown_key_is_named(tmp_path: Path) -> None:
    (tmp_path / "squashfu.toml").write_text('source = "/x"\nmax_bin = 3\ncompresion = "xz"\n')
    with pytest.raises(ConfigError, match=r"unknown setting.*compresion, max_bin"):
        config.load(tmp_path)


def test_the_same_checks_apply_to_a_config_built_in_code() -> None:
    """``init`` builds a Config from its options: the same rules, not a second copy of them."""
    with pytest.raises(ConfigError, match="out of range for zstd"):
        config.Config(source="/x", compression_level=23)
    with pytest.raises(ConfigError, match="xz takes no compression_level"):
        config.Config(source="/x", compression="xz", compression_level=6)
    with pytest.raises(ConfigError, match="excludes must be a list of strings"):
        config.Config(source="/x", excludes=(b"bytes",))  # type: ignore[arg-type]
    assert config.Config(source="/x", compression="gzip", compression_level=9).level == 9
    assert config.Config(source="/x", compression="lz4").level is None


@pytest.mark.skipif(shutil.which("mksquashfs") is None, reason="mksquashfs is not installed")
@pytest.mark.parametrize("compressor", config.COMPRESSORS)
def test_level_ranges_agree_with_the_real_mksquashfs(tmp_path: Path, compressor: str) -> None:
    """Every level the config accepts, mksquashfs accepts, and the other way round (0..23 tried)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x\n")
    disagree = []
    for level in (None, *range(0, 24)):
        try:
            config.Config(source="/x", compression=compressor, compression_level=level)
            accepted = True
        except ConfigError:
            accepted = False
        args = ["mksquashfs", tmp_path / "src", tmp_path / "img", "-noappend", "-quiet", "-no-progress",
                "-comp", compressor]
        if level is not None:
            args += ["-Xcompression-level", str(level)]
        works = subprocess.run(args, capture_output=True, check=False).returncode == 0
        if accepted != works:
            disagree.append((level, accepted, works))
    assert not disagree, f"{compressor}: (level, config accepts, mksquashfs accepts): {disagree}"


def test_rsh_is_written_only_when_it_is_not_ssh(tmp_path: Path) -> None:
    plain = config.Config(source="/src")
    assert "rsh" not in plain.to_toml()
    (tmp_path / config.CONFIG_NAME).write_text(config.Config(source="/src", rsh="ssh -p 2222").to_toml())
    assert config.load(tmp_path).rsh == "ssh -p 2222"


@pytest.mark.parametrize("text, message", [
    ("host::module/path", "HOST::MODULE names an rsync daemon"),
    ("backup@host::module", "HOST::MODULE names an rsync daemon"),
    ("rsync://host/module", r"rsync daemons \(rsync://\) are not supported"),
    ("host:relative/path", "the remote path must be absolute"),
    ("host:", "the remote path must be absolute"),
    ("-oProxyCommand=sh:/x", r"an absolute path or \[USER@\]HOST:/PATH"),  # ssh would take it as an option
    ("-l@host:/x", r"an absolute path or \[USER@\]HOST:/PATH"),
    ("user@-host:/x", r"an absolute path or \[USER@\]HOST:/PATH"),
    ("relative/dir", r"an absolute path or \[USER@\]HOST:/PATH"),
    ("ho st:/x", r"an absolute path or \[USER@\]HOST:/PATH"),
    ("", r"an absolute path or \[USER@\]HOST:/PATH"),
])
def test_a_source_is_a_local_absolute_path_or_a_remote_absolute_one(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        config.Config(source=text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, host, path, arg", [
    ("/srv/data", None, "/srv/data", "/srv/data/"),
    ("/srv/a:b", None, "/srv/a:b", "/srv/a:b/"),
    ("web1:/srv/www", "web1", "/srv/www", "web1:/srv/www/"),
    ("backup@db.example.org:/var/lib/", "backup@db.example.org", "/var/lib/", "backup@db.example.org:/var/lib/"),
    ("root@[fe80::1%eth0]:/etc", "root@[fe80::1%eth0]", "/etc", "root@[fe80::1%eth0]:/etc/"),
    ("10.0.0.7:/a b\nc", "10.0.0.7", "/a b\nc", "10.0.0.7:/a b\nc/"),
])
def test_a_source_is_parsed_once(text: str, host: str | None, path: str, arg: str) -> None:
    source = config.Config(source=text).origin
    assert (source.host, source.path, source.rsync_arg, source.remote) == (host, path, arg, host is not None)
    assert config.Source.absolute(text) == text


def test_a_relative_local_source_on_the_command_line_is_made_absolute() -> None:
    import os
    assert config.Source.absolute("data/x:y") == os.path.abspath("data/x:y")
    assert config.Source.absolute("host:rel") == "host:rel"  # remote: refused by Config, never a file name
