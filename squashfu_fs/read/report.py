"""``squashfu list``: the seed and every bin, their days, sizes and totals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from squashfu_fs.store import layers as layers_mod
from squashfu_fs.store.history import History
from squashfu_fs.store.opening import opened_root
from squashfu_fs.store.views import WEEKDAYS, ViewTable
from squashfu_fs.util.units import human


def rows(root: Path) -> dict[str, Any]:
    """The report as data: one row per layer, oldest first, and the totals."""
    with opened_root(root, "list", write=False) as opened:
        layout, history = opened.layout, opened.history
    return rows_of(str(root), history, lambda name: _size(layout.seed(name)))


def rows_of(root: str, history: History, seed_size: Callable[[str], int]) -> dict[str, Any]:
    """The report of ``history`` (a local root's, or an rclone copy's); ``seed_size`` measures the seed image."""
    table = ViewTable.from_history(history)
    shown = {spec.top: name for name, spec in table.dated.items()}
    layers: list[dict[str, Any]] = []
    if history.seed is not None:
        seed = history.seed
        layers.append({
            "layer": "seed", "file": seed.file, "time": seed.time, "weekday": WEEKDAYS[seed.when.weekday()],
            "view": shown.get(None), "bytes": seed_size(seed.file), "files": seed.files,
            "absorbed": list(seed.absorbed), "created": seed.created,
        })
    for b in history.bins:
        sealed = layers_mod.sealed(b)
        layers.append({
            "layer": b.number, "time": b.time, "weekday": WEEKDAYS[b.when.weekday()],
            "view": shown.get(b.number), "format": b.format,
            # on disk: the image of a sealed bin; "data_bytes" is what the bin held before compression
            "bytes": b.image_bytes if sealed and b.image_bytes is not None else b.bytes, "data_bytes": b.bytes,
            "files": b.files, "duration": b.duration, "rsync_status": b.rsync_status,
        })
    seed_bytes = layers[0]["bytes"] if history.seed is not None else 0
    bins_bytes = sum(row["bytes"] for row in layers[1 if history.seed is not None else 0:])
    return {
        "root": root, "generation": history.generation, "layers": layers,
        "totals": {"seed": seed_bytes, "incrementals": bins_bytes, "all": seed_bytes + bins_bytes,
                   "bins": len(history.bins)},
    }


def _size(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def list_report(root: Path, *, as_json: bool = False) -> str:
    """Render the report for a terminal, or as JSON."""
    return render(rows(root), root, as_json=as_json)


def render(data: dict[str, Any], root: object, *, as_json: bool = False) -> str:
    """The report's rows for a terminal, or as JSON."""
    if as_json:  # the keys every --json result object starts with (docs/operations.md)
        return json.dumps({"command": "list", "status": "ok", "exit_status": 0, **data}, indent=2) + "\n"
    if not data["layers"]:
        return f"{root}: no backup yet\n"
    lines = [f"{'layer':>6}  {'date':10}  {'day':3}  {'time':8}  {'view':10}  {'files':>8}  {'size':>10}"]
    for row in data["layers"]:
        when = row["time"]
        lines.append(
            f"{row['layer']!s:>6}  {when[:10]:10}  {row['weekday']:3}  {when[11:19]:8}  "
            f"{row['view'] or '-':10}  {row['files']:>8}  {human(row['bytes']):>10}"
        )
    totals = data["totals"]
    lines.append(f"total: seed {human(totals['seed'])}, incrementals {human(totals['incrementals'])} "
                 f"in {totals['bins']} bin(s), all {human(totals['all'])}")
    return "\n".join(lines) + "\n"
