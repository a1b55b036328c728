"""Per-file digest lists of unsealed bins: ``bins/N.sha256`` (docs/layout.md, "Digests").

A sealed bin or seed is one image with one digest in history.json. A bin
kept as a directory (``seal = false``, or a bin holding POSIX ACLs, which
SquashFS cannot store) gets a list instead: one record per regular file,
``HEX<space>PATH<NUL>``, paths relative to the bin as bytes, sorted. The list
is written before the bin is committed and history records the list's own
digest, so ``verify`` can tell a damaged file from a damaged list.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from squashfu_fs.util import digest
from squashfu_fs.util.durable import atomic_write


def file_digests(top: Path) -> dict[bytes, str]:
    """The digest (bare hex) of every regular file below ``top``, following no symlink."""
    out: dict[bytes, str] = {}
    base = os.fsencode(top)
    pending = [b""]
    while pending:
        rel = pending.pop()
        with os.scandir(os.path.join(base, rel) if rel else base) as it:
            for entry in it:
                path = os.path.join(rel, entry.name) if rel else entry.name
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    pending.append(path)
                elif stat.S_ISREG(mode):
                    out[path] = digest.of_file(entry.path).split(":", 1)[1]
    return out


def encode(digests: dict[bytes, str]) -> bytes:
    return b"".join(hexdigest.encode() + b" " + path + b"\0" for path, hexdigest in sorted(digests.items()))


def decode(data: bytes) -> dict[bytes, str]:
    """The records of a list; a malformed one raises ValueError."""
    out: dict[bytes, str] = {}
    for record in data.split(b"\0")[:-1] if data else []:
        hexdigest, sep, path = record.partition(b" ")
        if not sep or len(hexdigest) != 64 or not path:
            raise ValueError(f"malformed record {record[:80]!r}")
        out[path] = hexdigest.decode("ascii")
    return out


def write_list(path: Path, top: Path) -> str:
    """Write the digest list of the layer at ``top`` to ``path`` durably; returns the list's own digest."""
    data = encode(file_digests(top))
    atomic_write(path, data)
    return digest.of_bytes(data)


def read_list(path: Path) -> tuple[dict[bytes, str], str]:
    """The records of a list and the list's own digest."""
    data = path.read_bytes()
    return decode(data), digest.of_bytes(data)
