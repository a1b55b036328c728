"""The roll-back records: which kernel roll-back mounts read which layers of a backup root.

Each live ``rollback`` (and each private view of a ``restore`` or ``diff``) is
recorded in ``ROOT/.rollbacks/ID/record.json`` beside its private seed mount
(docs/layout.md, docs/crash-safety.md "(d) Roll-back and restore records"):
``umount`` finds the seed mount through it, resquash refuses to merge bins a
live roll-back reads, and recovery drops the records whose mount is gone.
:mod:`squashfu_fs.store.registry` answers the same question for the
time-travel daemons; the read side (read/rollback.py) makes the mounts.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from squashfu_fs.engines import mounts
from squashfu_fs.store import layers
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.util import durable
from squashfu_fs.util.process import alive_pid

RECORD = "record.json"


@dataclass(frozen=True)
class RollbackRecord:
    """One live roll-back mount of a backup root.

    It is identified by the devices of its overlay and seed mounts and by the
    exact seed layer name it was mounted with, never by the root's path as a
    later command spells it: a root reached through a symlink, a bind mount
    or a name mountinfo escapes is still the same root.
    """

    ident: str
    mountpoint: str
    view: str
    bins: tuple[int, ...]
    seed_file: str
    directory: Path  # ROOT/.rollbacks/ID
    owner: str = ""  # "PID STARTTIME" of the restore or diff that made a private view; "" for a user's
    seed_layer: str = ""  # the seed mount's path exactly as given in the overlay's lowerdir
    mount_dev: int = 0  # st_dev of the overlay (mountinfo's major:minor); 0 until it is mounted
    seed_dev: int = 0  # st_dev of the private seed mount

    @property
    def seed_mount(self) -> Path:
        return self.directory / "seed"

    @property
    def layer_mounts(self) -> Path:
        """Where this roll-back's sealed bins are mounted, one directory each."""
        return self.directory / "layers"

    def overlay(self) -> mounts.MountEntry | None:
        """The overlay this record made, if still mounted: its device, confirmed by its seed layer."""
        seed = os.fsencode(self.seed_layer or os.fspath(self.seed_mount))
        where = os.fsencode(os.path.realpath(self.mountpoint)) if self.mountpoint else None
        for entry in mounts.mount_table():
            if entry.fstype != "overlay":
                continue
            if self.mount_dev and entry.device != self.mount_dev:
                continue
            if not self.mount_dev and entry.mount_point != where:  # a record written before its mount
                continue
            if seed in mounts.overlay_layers(entry):
                return entry
        return None

    def is_live(self) -> bool:
        """Still mounted, and (for a private view) its owner still running."""
        if self.overlay() is None:
            return False
        return not self.owner or alive_pid(self.owner) is not None

    def seed_mounts(self) -> list[bytes]:
        """Where this record's seed is mounted, under whatever name the root was reached by."""
        if not self.seed_dev:  # recorded before the seed was mounted: only its own directory
            own = os.fsencode(os.path.realpath(self.seed_mount))
            return [own] if mounts.is_mounted(self.seed_mount) else []
        tail = b"/.rollbacks/" + self.ident.encode() + b"/seed"
        return [e.mount_point for e in mounts.mount_table()
                if e.fstype == "squashfs" and e.device == self.seed_dev and e.mount_point.endswith(tail)]

    def save(self) -> None:
        durable.atomic_write(self.directory / RECORD, json.dumps({
            "mountpoint": self.mountpoint, "view": self.view, "bins": list(self.bins),
            "seed_file": self.seed_file, "owner": self.owner, "seed_layer": self.seed_layer,
            "mount_dev": self.mount_dev, "seed_dev": self.seed_dev}).encode())


def records(layout: RootLayout) -> list[RollbackRecord]:
    """Every roll-back recorded in the root, live or stale."""
    out: list[RollbackRecord] = []
    if not layout.rollbacks.is_dir():
        return out
    for entry in sorted(p for p in layout.rollbacks.iterdir() if p.name.isdigit()):
        out.append(read_record(entry))
    return out


def bins_read(layout: RootLayout) -> set[int]:
    """The bins live roll-backs stack: a directory among them must stay while they live, even once sealed."""
    return {n for record in records(layout) if record.is_live() for n in record.bins}


def read_record(directory: Path) -> RollbackRecord:
    """The record in ``ROOT/.rollbacks/ID``; an unreadable one is an empty (stale) record."""
    try:
        data = json.loads((directory / RECORD).read_text())
        return RollbackRecord(directory.name, data["mountpoint"], data["view"], tuple(data["bins"]),
                              data["seed_file"], directory, data.get("owner", ""),
                              data.get("seed_layer", ""), int(data.get("mount_dev", 0)),
                              int(data.get("seed_dev", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return RollbackRecord(directory.name, "", "", (), "", directory)


def next_ident(layout: RootLayout) -> str:
    """A record number no roll-back of this root uses (the caller holds the writer lock)."""
    used = {int(p.name) for p in layout.rollbacks.iterdir() if p.name.isdigit()}
    return str(max(used, default=0) + 1)


def record_of(entry: mounts.MountEntry) -> RollbackRecord | None:
    """The record of the roll-back mounted as ``entry``: named by its seed layer, confirmed by device."""
    if entry.fstype != "overlay":
        return None
    for layer in mounts.overlay_layers(entry):
        path = Path(os.fsdecode(layer))
        if path.is_absolute() and path.name == "seed" and path.parent.parent.name == ".rollbacks":
            record = read_record(path.parent)
            if record.mount_dev in (0, entry.device):  # 0: recorded by an older squashfu
                return record
    return None


def drop_record(record: RollbackRecord) -> None:
    """Take down a roll-back's private seed and image mounts (and a restore's or diff's view too) and forget it."""
    if record.owner:
        entry = record.overlay()
        if entry is not None:
            mounts.unmount(os.fsdecode(entry.mount_point))
    layers.unmount_images(record.layer_mounts)
    for point in record.seed_mounts():
        mounts.unmount(os.fsdecode(point))
    shutil.rmtree(record.directory, ignore_errors=True)
