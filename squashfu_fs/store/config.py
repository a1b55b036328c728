"""``squashfu.toml``: the source (or sources), excludes, compression and retention of a root."""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from squashfu_fs.errors import ConfigError
from squashfu_fs.store.layout import CONFIG_NAME

COMPRESSORS = ("zstd", "xz", "gzip", "lz4", "lzo")
# zstd level 3 was 4.5x faster than mksquashfs's default 15 for a 2.4% larger image.
DEFAULT_LEVELS = {"zstd": 3, "gzip": 6, "xz": None, "lz4": None, "lzo": None}
# What mksquashfs 4.5 accepts for -Xcompression-level (`mksquashfs -help`); xz and lz4 take none.
# tests/t1_hostile_config.py checks this table against the mksquashfs on the machine.
LEVEL_RANGES: dict[str, tuple[int, int] | None] = {
    "zstd": (1, 22), "gzip": (1, 9), "lzo": (1, 9), "xz": None, "lz4": None}
# A backup stacks every bin under one overlay mount, whose options travel in one 4 KiB page
# (`bins/NNNNN:` is 11 bytes a layer); 300 layers leave room for the rest of the options.
MAX_BINS_LIMIT = 300
# The commands a backup runs around itself (docs/operations.md, "Hooks").
HOOKS = ("before_backup", "after_backup", "on_error")
DEFAULT_HOOK_TIMEOUT = 600  # seconds: room for a database dump, not for a hook that hangs all night
MAX_HOOK_TIMEOUT = 86400
DEFAULT_RSH = "ssh"
# rsync's single-colon remote syntax, [USER@]HOST:PATH; HOST is a name, an IPv4 address or [IPv6].
# Neither part may start with "-": ssh would read it as an option.
_REMOTE = re.compile(r"(?:(?P<user>[A-Za-z0-9_.][A-Za-z0-9_.-]*)@)?"
                     r"(?P<host>[A-Za-z0-9_.][A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?\])"
                     r":(?P<path>.*)", re.DOTALL)


@dataclass(frozen=True)
class Source:
    """Where a root's source is: a local absolute path, or ``[USER@]HOST:/PATH`` pulled with rsync over ssh.

    Parsed in this one place, so the rest of the code asks "is it remote?"
    once (docs/operations.md, "Remote sources").
    """

    path: str  # the absolute path, on this machine or on ``host``
    host: str | None = None  # ``HOST`` or ``USER@HOST`` for a remote source

    @property
    def remote(self) -> bool:
        return self.host is not None

    @property
    def rsync_arg(self) -> str:
        """What rsync takes to copy the source's contents: ``PATH/`` or ``HOST:PATH/``."""
        contents = self.path.rstrip("/") + "/"
        return f"{self.host}:{contents}" if self.host is not None else contents

    @staticmethod
    def absolute(text: str) -> str:
        """A command line's ``--source`` made absolute if it is local.

        rsync's rule: a colon before any slash makes it remote.
        """
        head = text.split(":", 1)[0]
        if (":" in text and "/" not in head) or text.startswith("rsync://"):
            return text  # remote (or refused by parse), never taken as a file name here
        return os.path.abspath(text)

    @classmethod
    def parse(cls, text: object) -> Source:
        """A local absolute path, or rsync's ``[USER@]HOST:/ABSOLUTE/PATH``; anything else is a ConfigError."""
        if not isinstance(text, str):
            raise ConfigError(f"source must be a string, not {text!r}")
        if "\0" in text:
            raise ConfigError("source must not contain a NUL character")
        if text.startswith("/"):
            return cls(path=text)
        if text.startswith("rsync://"):
            raise ConfigError(f"source {text!r}: rsync daemons (rsync://) are not supported; "
                              "use [USER@]HOST:/PATH, pulled over ssh")
        match = _REMOTE.fullmatch(text)
        if match is None:
            raise ConfigError(f"source must be an absolute path or [USER@]HOST:/PATH, not {text!r}")
        host = text[:match.start("path") - 1]
        path = match.group("path")
        if path.startswith(":"):
            raise ConfigError(f"source {text!r}: HOST::MODULE names an rsync daemon, which is not supported; "
                              "use [USER@]HOST:/PATH, pulled over ssh")
        if not path.startswith("/"):
            raise ConfigError(f"source {text!r}: the remote path must be absolute ([USER@]HOST:/PATH)")
        return cls(path=path, host=host)


@dataclass(frozen=True)
class Config:
    """The settings of one backup root, validated on construction."""

    source: str  # the one source; with several, "/": the top they are walked and rsynced from
    excludes: tuple[str, ...] = ()
    compression: str = "zstd"
    compression_level: int | None = field(default=None)
    max_bins: int = 14
    min_bins: int = 7
    seal: bool = True  # compress each committed bin into bins/N.sfs (docs/layout.md, "Sealed bins")
    before_backup: str | None = None  # shell command lines, run with /bin/sh -c (docs/operations.md)
    after_backup: str | None = None
    on_error: str | None = None
    hook_timeout: int = DEFAULT_HOOK_TIMEOUT
    metrics_file: str | None = None  # a Prometheus textfile-collector file, rewritten after backup and verify
    rsh: str = DEFAULT_RSH  # how rsync reaches another host: a remote source, a sync over ssh (docs/operations.md)
    # Several sources in one root (docs/operations.md, "Several sources"): each appears in every view under
    # its own absolute path, as with rsync --relative; empty for a root with one source.
    sources: tuple[str, ...] = ()
    # Set by a backup for one night, never read from or written to the file: sources that cannot be backed
    # up tonight (missing, a symlink, a disk that did not come up), whose last state carries over.
    left_out: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Check every field, types included, so a bad value fails before any work starts."""
        Source.parse(self.source)
        _check_sources(self.source, self.sources)
        if not set(self.left_out) <= set(self.sources):
            raise ConfigError("only some of several sources can be left out of a night")
        if not isinstance(self.excludes, tuple) or not all(isinstance(e, str) for e in self.excludes):
            raise ConfigError("excludes must be a list of strings")
        for pattern in self.excludes:
            if not pattern:
                raise ConfigError("excludes holds an empty exclude pattern")
            if "\0" in pattern:
                raise ConfigError(f"the exclude pattern {pattern!r} contains a NUL character")
        if not isinstance(self.compression, str):
            raise ConfigError(f"compression must be a string, not {self.compression!r}")
        if self.compression not in COMPRESSORS:
            raise ConfigError(
                f"compression {self.compression!r} is not one of {', '.join(COMPRESSORS)}"
            )
        if self.compression_level is not None:
            _integer("compression_level", self.compression_level)
            allowed = LEVEL_RANGES[self.compression]
            if allowed is None:
                raise ConfigError(f"{self.compression} takes no compression_level; remove the setting")
            low, high = allowed
            if not low <= self.compression_level <= high:
                raise ConfigError(f"compression_level {self.compression_level} is out of range for "
                                  f"{self.compression} ({low}..{high})")
        _integer("max_bins", self.max_bins)
        _integer("min_bins", self.min_bins)
        if not 1 <= self.max_bins <= MAX_BINS_LIMIT:
            raise ConfigError(f"max_bins must be between 1 and {MAX_BINS_LIMIT}, not {self.max_bins} "
                              "(overlay stacks every bin in one mount)")
        if not isinstance(self.seal, bool):
            raise ConfigError(f"seal must be true or false, not {self.seal!r}")
        for hook in HOOKS:
            command = getattr(self, hook)
            if command is None:
                continue
            if not isinstance(command, str):
                raise ConfigError(f"{hook} must be a string (a shell command line), not {command!r}")
            if not command.strip():
                raise ConfigError(f"{hook} is empty; remove the setting to run no hook")
            if "\0" in command:
                raise ConfigError(f"{hook} must not contain a NUL character")
        _integer("hook_timeout", self.hook_timeout)
        if not 1 <= self.hook_timeout <= MAX_HOOK_TIMEOUT:
            raise ConfigError(f"hook_timeout must be between 1 and {MAX_HOOK_TIMEOUT} seconds, "
                              f"not {self.hook_timeout}")
        if self.metrics_file is not None:
            _check_metrics_file(self.metrics_file)
        _check_rsh(self.rsh)
        if self.min_bins < 0:
            raise ConfigError(f"min_bins must be at least 0, not {self.min_bins}")
        if self.min_bins >= self.max_bins:
            raise ConfigError(
                f"min_bins ({self.min_bins}) must be smaller than max_bins ({self.max_bins})"
            )

    @property
    def origin(self) -> Source:
        """The source parsed: local or remote, its path and host."""
        return Source.parse(self.source)

    @property
    def several(self) -> bool:
        """Whether the root backs up several sources, each under its own path."""
        return bool(self.sources)

    @property
    def source_paths(self) -> tuple[str, ...]:
        """Every directory backed up, as the administrator named them."""
        return self.sources or (self.source,)

    @property
    def selected(self) -> tuple[tuple[str, bytes], ...]:
        """Each of several sources backed up tonight (all but ``left_out``): its path, and relative to the top."""
        return tuple((path, os.fsencode(path).lstrip(b"/")) for path in self.sources if path not in self.left_out)

    @property
    def selection(self) -> tuple[bytes, ...]:
        """The sources relative to ``source`` (the top, "/"), as rsync ``-R`` and the walk take them; empty for one.

        Sources ``left_out`` tonight are not in it: rsync ``--relative`` then
        leaves their paths in the union untouched.
        """
        return tuple(rel for _, rel in self.selected)

    @property
    def level(self) -> int | None:
        """The compression level to pass to mksquashfs, if the compressor takes one."""
        if self.compression_level is not None:
            return self.compression_level
        return DEFAULT_LEVELS[self.compression]

    def to_toml(self) -> str:
        """Render the config; strings use JSON escapes, which TOML accepts."""
        lines = [
            "# squashfu backup root: see `squashfu --help` and docs/commands.md",
            f"source = {json.dumps(self.source)}" if not self.sources else
            f"source = [{', '.join(json.dumps(s) for s in self.sources)}]",
            f"excludes = [{', '.join(json.dumps(e) for e in self.excludes)}]",
            f"compression = {json.dumps(self.compression)}",
        ]
        if self.compression_level is not None:
            lines.append(f"compression_level = {self.compression_level}")
        lines += [f"max_bins = {self.max_bins}", f"min_bins = {self.min_bins}"]
        if not self.seal:
            lines.append("seal = false")
        lines += [f"{hook} = {json.dumps(getattr(self, hook))}" for hook in HOOKS if getattr(self, hook)]
        if self.hook_timeout != DEFAULT_HOOK_TIMEOUT:
            lines.append(f"hook_timeout = {self.hook_timeout}")
        if self.metrics_file is not None:
            lines.append(f"metrics_file = {json.dumps(self.metrics_file)}")
        if self.rsh != DEFAULT_RSH:
            lines.append(f"rsh = {json.dumps(self.rsh)}")
        lines.append("")
        return "\n".join(lines)


_KNOWN = {"source", "excludes", "compression", "compression_level", "max_bins", "min_bins", "seal", *HOOKS,
          "hook_timeout", "metrics_file", "rsh"}


def source_settings(paths: Sequence[str]) -> dict[str, Any]:
    """The ``source`` and ``sources`` fields of a :class:`Config` for the directories ``paths`` (``init``)."""
    if len(paths) == 1:
        return {"source": paths[0]}
    return {"source": "/", "sources": tuple(paths)}


def _check_sources(source: str, sources: object) -> None:
    """Several sources: absolute, written plainly, none "/", none inside another; each refusal one line."""
    if not isinstance(sources, tuple) or not all(isinstance(s, str) for s in sources):
        raise ConfigError(f"source must be a string or a list of strings, not {sources!r}")
    if not sources:
        return
    if len(sources) < 2:
        raise ConfigError("a list of sources needs at least two; give one source as a string")
    if source != "/":
        raise ConfigError(f"several sources are walked from \"/\", not from {source!r}")
    for path in sources:
        if "\0" in path:
            raise ConfigError("source must not contain a NUL character")
        if not os.path.isabs(path):
            raise ConfigError(f"each of several sources must be a local absolute path, not {path!r}")
        if path == "/" or os.path.normpath(path) == "/":
            raise ConfigError("\"/\" holds every other source: back it up alone, or name the directories")
        if os.path.normpath(path) != path or path.startswith("//"):
            raise ConfigError(f"source {path!r} must be written plainly, as {os.path.normpath(path)!r}")
    seen: set[str] = set()
    for path in sources:
        if path in seen:
            raise ConfigError(f"source {path} is given twice")
        seen.add(path)
    for path in sources:
        for other in sources:
            if other != path and other.startswith(path + "/"):
                raise ConfigError(f"source {other} is inside source {path}; give only {path}")


def _check_rsh(value: object) -> None:
    """A command line rsync's ``-e`` takes: words split as a shell would, and a program to run first."""
    if not isinstance(value, str):
        raise ConfigError(f"rsh must be a string (a command line such as \"ssh -p 2222\"), not {value!r}")
    if "\0" in value:
        raise ConfigError("rsh must not contain a NUL character")
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise ConfigError(f"rsh {value!r} cannot be split into words: {exc}") from None
    if not words:
        raise ConfigError("rsh is empty; remove the setting to use ssh")


def _check_metrics_file(value: object) -> None:
    """An absolute path to a ``*.prom`` file: node_exporter's textfile collector reads only those."""
    if not isinstance(value, str):
        raise ConfigError(f"metrics_file must be a string, not {value!r}")
    if not os.path.isabs(value) or "\0" in value:
        raise ConfigError(f"metrics_file must be an absolute path, not {value!r}")
    if value.endswith("/") or not os.path.basename(value).endswith(".prom") or os.path.basename(value) == ".prom":
        raise ConfigError(f"metrics_file must name a file ending in .prom (the textfile collector reads "
                          f"only those), not {value!r}")


def load(root: Path) -> Config:
    """Read and validate ``ROOT/squashfu.toml``."""
    path = root / CONFIG_NAME
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{root} is not a squashfu backup root (no {CONFIG_NAME}); run `squashfu init` first") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    unknown = set(data) - _KNOWN
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s): {', '.join(sorted(unknown))}")
    try:
        return Config(
            **_source_setting(data),
            excludes=tuple(_typed(data, "excludes", list, path, [])),
            compression=_typed(data, "compression", str, path, "zstd"),
            compression_level=_typed(data, "compression_level", int, path, None),
            max_bins=_typed(data, "max_bins", int, path, 14),
            min_bins=_typed(data, "min_bins", int, path, 7),
            seal=_typed(data, "seal", bool, path, True),
            before_backup=_typed(data, "before_backup", str, path, None),
            after_backup=_typed(data, "after_backup", str, path, None),
            on_error=_typed(data, "on_error", str, path, None),
            hook_timeout=_typed(data, "hook_timeout", int, path, DEFAULT_HOOK_TIMEOUT),
            metrics_file=_typed(data, "metrics_file", str, path, None),
            rsh=_typed(data, "rsh", str, path, DEFAULT_RSH),
        )
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


_MISSING = object()


def _source_setting(data: dict[str, Any]) -> dict[str, Any]:
    """``source``: a string for one source (as every root before several sources), a list for several."""
    if "source" not in data:
        raise ConfigError("missing setting 'source'")
    value = data["source"]
    if isinstance(value, str):
        return {"source": value}
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"source must be a string or a list of strings, not {value!r}")
    if len(value) < 2:  # else it would load as that one source, a layout the docs give as a string only
        raise ConfigError("a list of sources needs at least two; give one source as a string")
    return source_settings(value)


def _typed(data: dict[str, Any], key: str, kind: type, path: Path, default: Any = _MISSING) -> Any:
    if key not in data:
        if default is _MISSING:
            raise ConfigError(f"missing setting {key!r}")
        return default
    value = data[key]
    if kind is int:
        _integer(key, value)
    elif kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings, not {value!r}")
    elif not isinstance(value, kind):
        raise ConfigError(f"{key} must be a {_KIND_NAMES.get(kind, kind.__name__)}, not {value!r}")
    return value


_KIND_NAMES = {str: "string", int: "integer", list: "list of strings", bool: "boolean (true or false)"}


def _integer(key: str, value: object) -> None:
    """TOML integers only: ``true`` is a bool, ``3.0`` a float, ``"3"`` a string."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, not {value!r}")
