"""``list`` and ``verify`` of a copy at ``rclone:REMOTE:PATH`` (docs/operations.md, "Offsite copies").

Nothing is mounted and nothing written: the copy's ``history.json`` is read
with ``rclone cat`` and its names with ``rclone lsjson``. ``verify`` checks,
for every layer history names, that its image is there with the size history
records and that its SHA-256 matches the digest in history (``rclone
hashsum sha256``: the backend's own hash where it keeps SHA-256, else rclone
reads the object); names history does not name are reported as a local
verify reports them. ``--data`` downloads each image into a private
temporary directory and also runs the local verify's unsquashfs checks of
superblock, metadata and every data block.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from squashfu_fs.engines import rclone
from squashfu_fs.engines.unsquashfs import Check
from squashfu_fs.errors import UsageError
from squashfu_fs.read.report import render, rows_of
from squashfu_fs.read.verify import LayerReport, Report
from squashfu_fs.store import layers
from squashfu_fs.store.copies import RCLONE_PREFIX
from squashfu_fs.store.history import Bin, History, Seed
from squashfu_fs.store.layout import CONFIG_NAME, HISTORY_NAME, RootLayout
from squashfu_fs.store.views import ViewTable
from squashfu_fs.util import digest


def _opened(text: str) -> tuple[str, History, dict[str, rclone.Entry], dict[str, rclone.Entry]]:
    """The copy's rclone target, its history, and its names at the top and in ``bins/``."""
    target = text.removeprefix(RCLONE_PREFIX)
    top = rclone.listing(target)
    if top is None or HISTORY_NAME not in top:
        raise UsageError(f"{text} holds no squashfu copy (no {HISTORY_NAME}); sync one there first")
    bins = (rclone.listing(rclone.join(target, "bins")) if "bins" in top else None) or {}
    history = History.from_json(rclone.read(target, HISTORY_NAME).decode("utf-8", "replace"),
                                where=f"{text}/{HISTORY_NAME}")
    return target, history, top, bins


def list_copy(text: str, *, as_json: bool = False) -> str:
    """``squashfu -r rclone:REMOTE:PATH list``: the copy's layers, sizes as the remote stores them."""
    _, history, top, _ = _opened(text)
    data: dict[str, Any] = rows_of(text, history, lambda name: top[name].size if name in top else 0)
    return render(data, text, as_json=as_json)


def verify_copy(text: str, *, data: bool = False) -> Report:
    """``squashfu -r rclone:REMOTE:PATH verify``: every image there, its size and digest (see the module docstring)."""
    started = time.monotonic()
    target, history, top, bins = _opened(text)
    layers.check_known(history.bins)
    table = ViewTable.from_history(history)
    names = table.names()
    reports: list[LayerReport] = []
    entries: list[tuple[Seed | Bin, LayerReport]] = []
    if history.seed is not None:
        entries.append((history.seed, LayerReport("seed", history.seed.file, "seed", names)))
    for b in history.bins:
        holding = {n for n, spec in table.dated.items() if b.number in spec.bins}
        views = [n for n in names if table.links.get(n, n) in holding]
        kind = "sealed" if layers.sealed(b) else "directory"
        file = f"bins/{b.number}.sfs" if kind == "sealed" else f"bins/{b.number}"
        entries.append((b, LayerReport(f"bin {b.number}", file, kind, views)))
    work = Path(tempfile.mkdtemp(prefix="squashfu-verify-"))
    try:
        for entry, report in entries:
            reports.append(report)
            _check(target, entry, report, top, bins, work if data else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    problems, debris = _scan(history, top, bins)
    return Report(root=Path(text), data=data, layers=reports, root_problems=problems, debris=debris,
                  seconds=time.monotonic() - started)


def _check(target: str, entry: Seed | Bin, report: LayerReport, top: dict[str, rclone.Entry],
           bins: dict[str, rclone.Entry], work: Path | None) -> None:
    if report.kind == "directory":
        report.problems.append("a bin kept as a directory cannot be in an rclone copy (sync never puts one there)")
        return
    listed = top if isinstance(entry, Seed) else bins
    name = os.path.basename(report.file)
    found = listed.get(name)
    if found is None or found.is_dir:
        report.problems.append(f"{report.file} is missing")
        return
    recorded = entry.bytes if isinstance(entry, Seed) else entry.image_bytes
    if recorded and recorded != found.size:
        report.problems.append(f"the image is {found.size} bytes, history says {recorded}")
    report.bytes = found.size
    if work is None:
        actual = f"{digest.ALGORITHM}:{rclone.sha256(target, report.file)}"
    else:
        local = work / name
        rclone.copy_to(rclone.join(target, report.file), str(local))
        fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC)
        try:
            actual = digest.of_fd(fd)
            failed = [c.result() for c in (Check(fd, kind, report.file) for kind in ("superblock", "metadata", "data"))]
        finally:
            os.close(fd)
            local.unlink(missing_ok=True)
        report.problems += [f for f in failed if f is not None]
        report.readable = not any(failed)
    if entry.digest is None:
        report.warnings.append("no digest recorded (written before digests)")
        return
    report.digest_ok = actual == entry.digest
    if not report.digest_ok:
        report.problems.append(f"the image has digest {actual[:23]}…, history records {entry.digest[:23]}…")


def _scan(history: History, top: dict[str, rclone.Entry], bins: dict[str, rclone.Entry]) -> tuple[list[str], list[str]]:
    """Names at the copy that history does not name: (problems, debris a killed sync left)."""
    problems: list[str] = []
    debris: list[str] = []
    seed_file = history.seed.file if history.seed else None
    for name in sorted(top):
        if name in (HISTORY_NAME, CONFIG_NAME, "bins", seed_file):
            continue
        if name.endswith(".tmp") or RootLayout.is_seed_name(name):
            debris.append(name)
        else:
            problems.append(f"{name} is not part of the root's history")
    scratch = RootLayout(Path("/"))
    committed = {p.name for b in history.bins for p in layers.bin_files(scratch, b)}
    for name in sorted(bins):
        if name in committed:
            continue
        number = name.split(".", 1)[0]
        if name.endswith(".tmp") or (number.isdigit() and name in layers.bin_names(scratch, int(number))):
            debris.append(f"bins/{name}")
        else:
            problems.append(f"bins/{name} is not part of the root's history")
    return problems, debris
