"""The time-travel tree (docs/filesystem.md) without pyfuse3: inodes, views, history reloads.

The root lists the names of :class:`~squashfu_fs.store.views.ViewTable`; each dated
view (and ``seed``) is a :class:`View` whose layer stack is assembled on the
first lookup inside it, never for a root listing. Inode numbers are computed,
not allocated: ``view id | layer position | real st_ino``, so a file keeps its
number for the life of the mount even after the kernel forgot it, and hard
links in one layer share a number. Node state lives only while the kernel
holds a lookup count on it, so a ``find`` over every view stays bounded.
:mod:`squashfu_fs.read.fuse_ops` translates this to FUSE.

Requests never block on the history: a housekeeping tick reloads it in two
steps, :meth:`Vfs.prepare_reload` (read history.json, mount the new seed and
sealed bins; in a worker thread) and :meth:`Vfs.install` (swap the in-memory
tree), and takes down images nobody reads any more. Each image is mounted once
and shared by every view that stacks it. A view that outlived its history (the
kernel still holds a directory in it) keeps its bins and seed: the daemon
publishes them (:meth:`Vfs.usage`) and writers leave them in place; if they
vanished anyway, the view answers ESTALE rather than read a lower layer.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

from squashfu_fs import overlay as layerstack
from squashfu_fs.errors import SquashfuError
from squashfu_fs.overlay import Entry, Layer, StatLike
from squashfu_fs.read import versions_tree
from squashfu_fs.store import history as history_mod
from squashfu_fs.store import layers as layer_kinds
from squashfu_fs.store.history import Bin, History
from squashfu_fs.store.layout import RootLayout
from squashfu_fs.store.views import LATEST, SEED, WEEKDAYS, ViewSpec, ViewTable

log = logging.getLogger(__name__)

ROOT_INO = 1
LINK_INOS = {name: i for i, name in enumerate((*WEEKDAYS, LATEST), start=2)}
SNAPSHOTS_INO = max(LINK_INOS.values()) + 1  # snapshots/: one view per committed backup
SNAPSHOTS = b"snapshots"
VERSIONS = b"versions"
NAME_DIRS = frozenset({ROOT_INO, SNAPSHOTS_INO})  # directories whose entries are views and links
VIEW_SHIFT = 44
LAYER_SHIFT = 34
_VIEW_LIMIT = 1 << (64 - VIEW_SHIFT)
_LAYER_LIMIT = 1 << (VIEW_SHIFT - LAYER_SHIFT)
_INO_LIMIT = 1 << LAYER_SHIFT
_FALLBACK_FIRST = 1 << 20  # inside view 0's space, above the root's own inodes
# How many resolved entries the memo keeps across the kernel's FORGETs (docs/filesystem.md,
# "Caching"): about 1.3 KiB each with their attributes, so at most ~260 MiB of the daemon's memory.
MEMO_ENTRIES = 200_000
_LISTING, _XATTRS, _TARGET = range(3)  # what a memo key holds


@dataclass(frozen=True)
class Stat:
    """Synthetic attributes for the root and its symlinks, or an adjusted real stat."""

    st_mode: int
    st_ino: int = 0
    st_dev: int = 0
    st_nlink: int = 1
    st_uid: int = 0
    st_gid: int = 0
    st_size: int = 0
    st_rdev: int = 0
    st_blksize: int = 4096
    st_blocks: int = 0
    st_atime_ns: int = 0
    st_mtime_ns: int = 0
    st_ctime_ns: int = 0

    @classmethod
    def copy(cls, st: StatLike, **changes: int) -> Stat:
        fields = {k: getattr(st, k) for k in cls.__dataclass_fields__}
        fields.update(changes)
        return cls(**fields)


class SeedProvider(Protocol):
    """Makes an image (a seed, or a sealed bin ``bins/N.sfs``; names relative to the root) readable as a directory.

    It may also answer ``metadata_cached(file_name) -> bool`` (the daemon's does): whether the
    image's metadata is in the page cache, so requests reading it are served without a thread.
    """

    def acquire(self, file_name: str) -> bytes: ...
    def release(self, file_name: str) -> None: ...


class View:
    """One state of the past: its spec, its layers, and (once built) its root branches."""

    __slots__ = ("bin_ids", "built", "dir_bins", "id", "image_at", "image_layers", "images", "key", "layers", "live",
                 "marks",
                 "name", "retired", "root_entry", "root_ino", "seed_file", "snapshot_names", "spec", "versions")

    def __init__(self, view_id: int, name: str, spec: ViewSpec, key: tuple[object, ...],
                 layers: list[Layer], seed_file: str, images: tuple[str, ...] = (),
                 dir_bins: tuple[int, ...] | None = None) -> None:
        self.id = view_id
        self.name = name
        self.spec = spec
        self.key = key
        self.layers = layers
        self.seed_file = seed_file
        self.images = images or (seed_file,)  # every image it stacks, the seed included
        self.dir_bins = spec.bins if dir_bins is None else dir_bins  # bins it reads as directories
        # Positions (from 1, newest first) of the layers read from a SquashFS image: the seed, sealed bins.
        image_positions = [pos for pos, n in enumerate(spec.bins, 1) if n not in self.dir_bins]
        self.image_layers = frozenset([*image_positions, len(layers)])
        self.image_at = dict(zip(image_positions, self.images[1:], strict=False))  # layer position -> image
        self.image_at[len(layers)] = seed_file
        self.root_ino = view_id << VIEW_SHIFT
        self.root_entry: Entry | None = None
        self.marks: frozenset[bytes] = frozenset()  # recorded opaque directories, read when built
        self.built = False
        self.bin_ids: tuple[tuple[int, int], ...] = ()  # (st_dev, st_ino) of each bin, taken when built
        self.live = 0  # nodes of this view that the kernel knows
        self.retired = False  # no longer named in the root
        self.versions = False  # the versions/ tree over these layers, not a day (read/versions_tree.py)
        self.snapshot_names: dict[int, str] = {}  # layer position -> the snapshot that wrote it (versions/)


class Node:
    """An inode the kernel holds: its entry, lookup count and lazily built state."""

    __slots__ = ("entry", "ino", "listing", "name", "nlookup", "parent", "target", "view", "xattrs")

    def __init__(self, ino: int, view: View | None, entry: Entry, target: bytes | None = None) -> None:
        self.ino = ino
        self.view = view
        self.entry = entry
        self.target = target
        self.nlookup = 0
        self.parent = 0  # where the kernel first met it: to drop its cached entry when its view retires
        self.name = b""
        self.listing: Listing | None = None
        self.xattrs: dict[bytes, bytes] | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.entry.st.st_mode)


class Listing:
    """A directory's merged listing, built once: offsets are indexes, so they are stable."""

    __slots__ = ("index", "items")

    def __init__(self, items: list[tuple[bytes, int, Entry]]) -> None:
        self.items = items
        self.index = {name: i for i, (name, _, _) in enumerate(items)}


@dataclass(frozen=True)
class Built:
    """What building a view's stack read from disk (:meth:`Vfs.prepare_build`), to install."""

    bin_ids: tuple[tuple[int, int], ...]
    branches: tuple[layerstack.Branch, ...]
    marks: frozenset[bytes]


class Memo:
    """What the daemon resolved in its current views, kept across the kernel's FORGETs: bounded, LRU.

    Layers never change and a view's id is never given to other layers, so a
    listing, the xattrs or a symlink's target read for (view, inode) stay true
    for the life of the view. After ``drop_caches`` the kernel forgets every
    inode and asks again: these answers then come from memory instead of
    re-reading the images' metadata through the loop device (borg's daemon
    does the same with its archive's metadata). Keys are ``(view id, inode,
    kind)``; a value costs the entries it holds, and the least recently used
    go once ``cap`` is exceeded. A view's keys go when it retires.
    """

    def __init__(self, cap: int = MEMO_ENTRIES) -> None:
        self.cap = cap
        self.size = 0
        self._items: OrderedDict[tuple[int, int, int], tuple[object, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[int, int, int]) -> object | None:
        hit = self._items.get(key)
        if hit is None:
            return None
        self._items.move_to_end(key)
        return hit[0]

    def put(self, key: tuple[int, int, int], value: object, cost: int) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.size -= old[1]
        self._items[key] = (value, cost)
        self.size += cost
        while self.size > self.cap and self._items:
            self.size -= self._items.popitem(last=False)[1][1]

    def drop_view(self, view_id: int) -> None:
        for key in [k for k in self._items if k[0] == view_id]:
            self.size -= self._items.pop(key)[1]


@dataclass
class RootChange:
    """What a history reload changed in the root, for the kernel's caches."""

    names: list[bytes] = field(default_factory=list)  # entries of the root to invalidate
    inodes: list[int] = field(default_factory=list)  # inodes whose attributes changed
    snapshots: list[bytes] = field(default_factory=list)  # entries of snapshots/ to invalidate


@dataclass(frozen=True)
class Reload:
    """A history read and its seed mounted (off the request path), ready to install."""

    key: tuple[int, int, int]
    history: History
    mtime_ns: int


@dataclass(frozen=True)
class Usage:
    """What a daemon publishes: the history it serves, and every layer its live views still read."""

    generation: int  # -1 until the first history is installed
    bins: frozenset[int]
    seeds: frozenset[str]


@dataclass
class Counters:
    """What the tree did; tests assert on these and the benchmark reports them."""

    stacks_built: int = 0
    listings_built: int = 0
    reloads: int = 0
    history_checks: int = 0
    memo_hits: int = 0


class Vfs:
    """The whole tree of one mount: root names, views and the live inode table."""

    def __init__(self, layout: RootLayout, seeds: SeedProvider) -> None:
        self.layout = layout
        self.seeds = seeds
        self.counters = Counters()
        self.on_change: Callable[[RootChange], None] | None = None  # the adapter's invalidation
        self.on_loaded: Callable[[Usage], None] | None = None  # publishes what this tree still reads
        self.loaded = -1  # the generation of the installed history
        self.history = History()
        self.table = ViewTable.from_history(self.history)
        self.nodes: dict[int, Node] = {}
        self.memo = Memo()
        self.views: dict[tuple[object, ...], View] = {}  # current views, by key
        self.by_id: dict[int, View] = {}  # every view still alive (current or retired)
        self.root_items: list[tuple[bytes, int, Entry]] = []
        self.snapshot_items: list[tuple[bytes, int, Entry]] = []
        self._next_view = 1
        # Numbers for entries the computed scheme cannot hold, per live view (dropped with the view);
        # handed out once each, never reused, so a number the kernel may still cache stays unique.
        self._fallback: dict[int, dict[tuple[object, ...], int]] = {}
        self._next_fallback = _FALLBACK_FIRST
        self._seed_refs: dict[str, int] = {}
        self._seed_dirs: dict[str, bytes] = {}  # mounted seeds, including idle ones not yet taken down
        self._idle_seeds: set[str] = set()  # no view reads them: housekeeping unmounts them
        self._to_drop: list[int] = []  # nodes of retired views whose kernel entries are still to invalidate
        self._current_seed: str | None = None
        self._current_images: tuple[str, ...] = ()  # the images the installed history names
        self._history_key: tuple[int, ...] | None = None
        self.root_st = Stat(stat.S_IFDIR | 0o555, st_nlink=2)
        self.nodes[ROOT_INO] = Node(ROOT_INO, None, Entry(self.root_st, ()))
        self.nodes[ROOT_INO].nlookup = 1 << 62  # never forgotten
        self.nodes[SNAPSHOTS_INO] = Node(SNAPSHOTS_INO, None, Entry(Stat(stat.S_IFDIR | 0o555, st_nlink=2), ()))
        self.nodes[SNAPSHOTS_INO].nlookup = 1 << 62

    # ----------------------------------------------------------------- history

    def refresh(self) -> RootChange | None:
        """Reload the history now if history.json changed (at startup, and in tests)."""
        reload = self.prepare_reload()
        return None if reload is None else self.install(reload)

    def prepare_reload(self) -> Reload | None:
        """Read history.json if it changed and mount its seed; None when nothing changed.

        Blocking (a stat, a read, maybe a mount): housekeeping runs it in a
        worker thread while requests go on. It changes no state a request
        reads; a failure raises and the next call tries again.
        """
        self.counters.history_checks += 1
        st = os.stat(self.layout.history)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._history_key:
            return None
        new = history_mod.load(self.layout.history)
        layer_kinds.check_known(new.bins)  # refused here, the tree keeps serving the history it had
        for name in _images_of(self.layout, new):
            if name not in self._seed_dirs:
                self._seed_dirs[name] = self.seeds.acquire(name)
                self._idle_seeds.add(name)  # until installed: let go of it if it never is
        return Reload(key, new, st.st_mtime_ns)

    def install(self, reload: Reload) -> RootChange | None:
        """Swap in a prepared history (in memory, no blocking); None when it equals the current one."""
        self._history_key = reload.key
        if reload.history == self.history and self.root_items:
            self.loaded = reload.history.generation
            return None
        change = self._install(reload.history, reload.mtime_ns)
        self.loaded = reload.history.generation
        if self.on_change is not None:
            self.on_change(change)
        return change

    def usage(self) -> Usage:
        """The history served and every bin and seed a live view (current or retired) reads."""
        bins = frozenset(n for view in self.by_id.values() for n in view.dir_bins)
        return Usage(self.loaded, bins, frozenset(self._seed_dirs))

    def take_idle_seeds(self) -> list[str]:
        """Seeds no view reads any more, forgotten here; the caller unmounts them (off the request path)."""
        idle = sorted(name for name in self._idle_seeds if self._seed_refs.get(name, 0) <= 0)
        self._idle_seeds.clear()
        for name in idle:
            self._seed_dirs.pop(name, None)
        return idle

    def release_seeds(self, names: list[str]) -> None:
        """Unmount seeds :meth:`take_idle_seeds` handed over (blocking: a worker thread)."""
        for name in names:
            self.seeds.release(name)

    def _install(self, new: History, mtime_ns: int) -> RootChange:
        self.counters.reloads += 1
        old_items = {name: (ino, entry) for name, ino, entry in self.root_items}
        old_snapshots = {name: ino for name, ino, _ in self.snapshot_items}
        old_targets = {n.ino: n.target for n in self.nodes.values() if n.target is not None and n.view is None}
        if new.seed is not None:
            self._current_seed = new.seed.file
        images = _images_of(self.layout, new)
        for name in images:
            self._seed_ref(name, +1)  # mounted by prepare_reload: do this before letting go
        for name in self._current_images:
            self._seed_ref(name, -1)
        self._current_images = images
        self.history = new
        self.table = ViewTable.from_history(new)
        fresh: dict[tuple[object, ...], View] = {}
        items: list[tuple[bytes, int, Entry]] = []
        for name in self.table.names():
            if name in LINK_INOS:
                target = self.table.links[name].encode()
                ino = LINK_INOS[name]
                spec = self.table.dated[self.table.links[name]]
                t = int(spec.time.timestamp() * 1e9)
                entry = Entry(Stat(stat.S_IFLNK | 0o777, st_size=len(target), st_atime_ns=t,
                                   st_mtime_ns=t, st_ctime_ns=t), ())
                node = self.nodes.get(ino)
                if node is None:
                    node = self.nodes[ino] = Node(ino, None, entry, target)
                    node.nlookup = 1 << 62
                node.entry, node.target = entry, target
                items.append((name.encode(), ino, entry))
                continue
            spec = self.table.resolve(name)
            view = self._view_for(name, spec, fresh)
            items.append((name.encode(), view.root_ino, self._root_entry(view)))
        snapshots = []
        for name, spec in self.table.snapshots.items():
            view = self._view_for(name, spec, fresh, snapshot=True)
            snapshots.append((name.encode(), view.root_ino, self._root_entry(view)))
        if self.table.dated:  # versions/: every layer of the newest state, read as a history of files
            newest = self.table.dated[self.table.links[LATEST]]
            view = self._view_for(VERSIONS.decode(), newest, fresh, versions=True)
            items.append((VERSIONS, view.root_ino, self._root_entry(view)))
        if snapshots:
            t = mtime_ns
            listing_st = Stat(stat.S_IFDIR | 0o555, st_nlink=2 + len(snapshots), st_atime_ns=t, st_mtime_ns=t,
                              st_ctime_ns=t)
            self.nodes[SNAPSHOTS_INO].entry = Entry(listing_st, ())
            items.append((SNAPSHOTS, SNAPSHOTS_INO, self.nodes[SNAPSHOTS_INO].entry))
        retired = False
        for key, view in self.views.items():
            if key not in fresh:
                view.retired = retired = True
                self.memo.drop_view(view.id)
                self._maybe_drop(view)
        if retired:
            self._to_drop += [ino for ino, node in self.nodes.items() if node.view is not None and node.view.retired]
        self.views = fresh
        self.root_items = items
        self.snapshot_items = snapshots
        dirs = sum(1 for _, _, e in items if e.is_dir)
        self.root_st = Stat(stat.S_IFDIR | 0o555, st_nlink=2 + dirs, st_atime_ns=mtime_ns,
                            st_mtime_ns=mtime_ns, st_ctime_ns=mtime_ns)
        self.nodes[ROOT_INO].entry = Entry(self.root_st, ())
        change = RootChange(inodes=[ROOT_INO, SNAPSHOTS_INO])
        new_snapshots = {name: ino for name, ino, _ in snapshots}
        change.snapshots = sorted(n for n in set(old_snapshots) | set(new_snapshots)
                                  if old_snapshots.get(n) != new_snapshots.get(n))
        new_items = {name: ino for name, ino, _ in items}
        for item in set(old_items) | set(new_items):
            before = old_items[item][0] if item in old_items else None
            after = new_items.get(item)
            if before != after:
                change.names.append(item)
            elif after in old_targets and old_targets[after] != self.nodes[after].target:
                change.names.append(item)
                change.inodes.append(after)
        change.names.sort()
        return change

    def _view_for(self, name: str, spec: ViewSpec, fresh: dict[tuple[object, ...], View], *,
                  snapshot: bool = False, versions: bool = False) -> View:
        """The view showing ``spec``: the current one if its layers did not change, else a new one.

        ``seed`` and each ``snapshots/`` entry are views of their own even when
        a dated view shows the same state: one directory inode must not have
        two names, or the kernel would move its dentry back and forth.
        """
        assert self._current_seed is not None
        bins = [self.history.bin(n) for n in spec.bins]
        images = _image_names(self.layout, bins)
        # A bin sealed since is another view: the old one keeps reading the directory until it retires.
        space = "versions" if versions else "snapshot" if snapshot else "seed" if name == SEED else "dated"
        key: tuple[object, ...] = (space, spec.bins, self._current_seed, tuple(sorted(images)))
        view = self.views.get(key) or fresh.get(key)
        if view is None:
            if self._next_view >= _VIEW_LIMIT:
                raise SquashfuError("this mount has created too many views; remount it")
            layers = layer_kinds.stack(self.layout, bins, self._seed_dirs[self._current_seed],
                                       {n: self._seed_dirs[image] for n, image in images.items()})
            view = View(self._next_view, name, spec, key, layers, self._current_seed,
                        (self._current_seed, *images.values()), tuple(n for n in spec.bins if n not in images))
            self._next_view += 1
            if versions:
                view.versions = True
                view.snapshot_names = self._snapshot_names(spec)
            self.by_id[view.id] = view
            for image in view.images:
                self._seed_ref(image, +1)
        view.name = name
        fresh[key] = view
        return view

    def _snapshot_names(self, spec: ViewSpec) -> dict[int, str]:
        """The snapshot name of each layer position of ``spec``'s stack (1 = newest bin, last = the seed)."""
        by_top = {state.top: name for name, state in self.table.snapshots.items()}
        names = {pos: by_top[number] for pos, number in enumerate(spec.bins, 1)}
        names[len(spec.bins) + 1] = by_top[None]
        return names

    def _root_entry(self, view: View) -> Entry:
        """A view's directory attributes: its top layer's root, read without building."""
        if view.root_entry is None and view.versions:
            view.root_entry = versions_tree.root([layer.directory() for layer in view.layers])
            view.root_entry.branches = ()  # filled in when the view is built
        if view.root_entry is None:
            top = view.layers[0].directory()
            try:
                st: StatLike = os.lstat(top)
                if len(view.layers) > 1:
                    st = Stat.copy(st, st_nlink=1)  # overlay reports merged dirs so
            except OSError as exc:
                log.warning("view %s: cannot stat %r: %s", view.name, top, exc)
                st = Stat(stat.S_IFDIR | 0o555, st_nlink=2)
            view.root_entry = Entry(st, ())
        return view.root_entry

    def _seed_ref(self, file_name: str, delta: int) -> None:
        """Count the views (and the current history) reading a seed; at zero it becomes idle."""
        count = self._seed_refs.get(file_name, 0) + delta
        if count > 0:
            if file_name not in self._seed_dirs:
                raise SquashfuError(f"seed {file_name} is not mounted")
            self._seed_refs[file_name] = count
            self._idle_seeds.discard(file_name)
            return
        self._seed_refs.pop(file_name, None)
        if file_name in self._seed_dirs:
            self._idle_seeds.add(file_name)

    def _maybe_drop(self, view: View) -> None:
        if view.retired and view.live <= 0 and view.id in self.by_id:
            del self.by_id[view.id]
            self._fallback.pop(view.id, None)  # no node and no listing of the view is left to use them
            for image in view.images:
                self._seed_ref(image, -1)

    def close(self) -> None:
        """Let go of every seed (at unmount)."""
        for name in list(self._seed_dirs):
            self._seed_refs.pop(name, None)
            self._seed_dirs.pop(name, None)
            self.seeds.release(name)
        self._idle_seeds.clear()

    # ----------------------------------------------------------------- inodes

    def is_root_space(self, ino: int) -> bool:
        """The root and the names in it: short cache timeouts, they change with history."""
        return ino < _FALLBACK_FIRST or (ino >> VIEW_SHIFT != 0 and ino & ((1 << VIEW_SHIFT) - 1) == 0)

    def node(self, ino: int) -> Node:
        """The live node of an inode number; KeyError if the kernel should not know it."""
        return self.nodes[ino]

    def ino_of(self, view: View, entry: Entry) -> int:
        """The inode number of a resolved entry: computed from where the real object lives."""
        pos = entry.layer
        st_ino = entry.st.st_ino
        key: tuple[object, ...]
        if getattr(entry, "synthetic", False):
            key = (b"versions of", entry.branches[0][1])  # by path: hard links have a history each
        elif pos < _LAYER_LIMIT and st_ino < _INO_LIMIT:
            return (view.id << VIEW_SHIFT) | (pos << LAYER_SHIFT) | st_ino
        else:
            key = (pos, entry.st.st_dev, st_ino)
        table = self._fallback.setdefault(view.id, {})
        ino = table.get(key)
        if ino is None:
            if self._next_fallback >= 1 << VIEW_SHIFT:
                raise SquashfuError("this mount has numbered too many unusual files; remount it")
            ino = table[key] = self._next_fallback
            self._next_fallback += 1
        return ino

    def remember(self, ino: int, view: View | None, entry: Entry, parent: int = 0, name: bytes = b"") -> Node:
        """Count one more kernel reference to ``ino`` (a lookup or a readdirplus entry of ``name`` in ``parent``)."""
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = Node(ino, view, entry)
            node.parent, node.name = parent, name
            if view is not None:
                view.live += 1
                if view.retired:
                    self._to_drop.append(ino)
        node.nlookup += 1
        return node

    def take_entries_to_drop(self) -> list[tuple[int, bytes]]:
        """(parent, name) of the kernel's cached entries in retired views, for invalidation.

        The kernel keeps unused entries cached until memory runs short, and a
        retired view's bins stay on disk while it knows any of them; dropping
        them lets it forget the view as soon as nothing holds it open.
        """
        out = [(node.parent, node.name) for ino in self._to_drop
               if (node := self.nodes.get(ino)) is not None and node.parent]
        self._to_drop.clear()
        return out

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped ``count`` references; free the node when none are left."""
        node = self.nodes.get(ino)
        if node is None or node.view is None:
            return
        node.nlookup -= count
        if node.nlookup <= 0:
            del self.nodes[ino]
            view = node.view
            view.live -= 1
            self._maybe_drop(view)

    def build(self, view: View) -> None:
        """Assemble a view's stack: done on the first lookup inside it, never for the root."""
        if not view.built:
            self.finish_build(view, self.prepare_build(view))

    def prepare_build(self, view: View) -> Built:
        """The disk part of :meth:`build` (stats, opaque records): safe in a worker thread, changes nothing."""
        bin_ids = self._bin_ids(view)
        branches = layerstack.root_branches(view.layers)
        records = [(layer.directory(), layerstack.opaque_record(self.layout.opaque_record(n)))
                   for n, layer in zip(view.spec.bins, view.layers, strict=False)]
        marks = layerstack.opaque_marks((directory, record or ()) for directory, record in records)
        # Bins of older code have no record: their directories are probed for the xattr instead.
        trusted = all(r is not None for _, r in records)
        return Built(bin_ids, branches, layerstack.TrustedMarks(marks) if trusted else marks)

    def finish_build(self, view: View, built: Built | None) -> None:
        """Install what :meth:`prepare_build` read (on the request thread; a second build is ignored)."""
        if view.built or built is None:
            return
        view.bin_ids = built.bin_ids
        self._root_entry(view).branches = built.branches
        view.marks = built.marks
        view.built = True
        self.counters.stacks_built += 1

    def _bin_ids(self, view: View) -> tuple[tuple[int, int], ...]:
        """Where a view's bins are now; ESTALE if one is gone (it must not read a lower layer instead)."""
        ids = []
        for number, layer in zip(view.spec.bins, view.layers, strict=False):
            try:
                st = os.stat(layer.directory())
            except FileNotFoundError:
                raise OSError(errno.ESTALE, f"bin {number} of {view.name} is gone") from None
            ids.append((st.st_dev, st.st_ino))
        return tuple(ids)

    def check_layers(self, view: View | None, bin_ids: tuple[tuple[int, int], ...] | None = None) -> None:
        """Answer ESTALE for a retired view whose bins vanished (call it after resolving a name).

        Writers leave a live view's bins in place (see :meth:`usage`); this is
        the guard for when they could not know: a bin deleted all the same is
        never silently replaced by the layers below it. Bins are renamed away
        before their contents go, so a check made after a lookup catches any
        deletion that could have touched it. ``bin_ids``: the view's, when
        its build is not installed yet.
        """
        if view is None or not view.retired:
            return
        if bin_ids is None and not view.built:
            return
        if self._bin_ids(view) != (view.bin_ids if bin_ids is None else bin_ids):
            raise OSError(errno.ESTALE, f"the layers of {view.name} changed")

    def in_memory(self, ino: int) -> bool:
        """Whether reading about ``ino`` (its listing, a name in it, its xattrs, its target) needs no disk.

        True when every layer it spans is an image whose metadata is in the
        page cache (:meth:`SeedProvider.metadata_cached`): squashfs then finds
        its inode and directory tables in memory. Bins kept as directories,
        a view not built yet and retired views (which stat their bins) cannot
        tell, so they go to a worker thread.
        """
        node = self.nodes.get(ino)
        view = None if node is None else node.view
        if node is None or view is None or not view.built or view.retired or not node.entry.branches:
            return False
        cached = getattr(self.seeds, "metadata_cached", None)
        if cached is None:
            return False
        for pos, _ in node.entry.branches:
            image = view.image_at.get(pos)
            if image is None or not cached(image):
                return False
        return True

    def _remembered(self, view: View, ino: int, kind: int) -> object | None:
        """What :class:`Memo` kept about ``ino`` of a current view (retired views check their bins instead)."""
        if view.retired:
            return None
        value = self.memo.get((view.id, ino, kind))
        if value is not None:
            self.counters.memo_hits += 1
        return value

    def _keep(self, view: View, ino: int, kind: int, value: object, cost: int) -> None:
        if not view.retired:
            self.memo.put((view.id, ino, kind), value, cost)

    def _known_listing(self, node: Node, view: View) -> Listing | None:
        if node.listing is None:
            node.listing = cast(Listing | None, self._remembered(view, node.ino, _LISTING))
        return node.listing

    def view_of_root(self, ino: int) -> View | None:
        if ino >> VIEW_SHIFT == 0 or ino & ((1 << VIEW_SHIFT) - 1):
            return None
        return self.by_id.get(ino >> VIEW_SHIFT)

    # ----------------------------------------------------------------- operations

    # Each request that may need the disk comes in three parts: ``*_known`` answers from memory
    # (the request thread, cheap); on a miss ``read_*`` does the disk I/O, reading only state that
    # never changes once made (a worker thread may run it); ``finish_*`` records the result (the
    # request thread). The plain methods chain the three, for callers without threads.

    def lookup(self, parent: int, name: bytes) -> tuple[int, Entry] | None:
        """Resolve ``name`` in directory ``parent`` and count the reference; None if absent."""
        known, found = self.lookup_known(parent, name)
        if known:
            return found
        built, entry = self.read_lookup(parent, name)
        return self.finish_lookup(parent, name, built, entry)

    def lookup_known(self, parent: int, name: bytes) -> tuple[bool, tuple[int, Entry] | None]:
        """A lookup answered from memory (root names, a known listing): (True, answer), else (False, None)."""
        if parent in NAME_DIRS:
            for item_name, ino, entry in self.root_items if parent == ROOT_INO else self.snapshot_items:
                if item_name == name:
                    view = self.view_of_root(ino)
                    self.remember(ino, view, entry, parent, name)
                    return True, (ino, entry)
            return True, None
        node = self.nodes[parent]
        view = node.view
        if view is None:
            raise NotADirectoryError(parent)
        if not view.built:
            return False, None
        listing = self._known_listing(node, view)
        if listing is None:
            return False, None
        i = listing.index.get(name)
        if i is None:
            return True, None
        _, ino, entry = listing.items[i]
        self.remember(ino, view, entry, parent, name)
        return True, (ino, entry)

    def _directory(self, ino: int) -> tuple[View, Entry, Built | None, frozenset[bytes]]:
        """A directory to read in a worker thread: its view, its entry and marks, building the view's stack if new.

        The kernel holds the directory while it asks, so its node stays. A
        new view's build is read here, not installed: its root's branches
        come from it.
        """
        node = self.nodes[ino]
        view = node.view
        if view is None:
            raise NotADirectoryError(ino)
        if view.built:
            return view, node.entry, None, view.marks
        built = self.prepare_build(view)
        entry = node.entry
        if node.ino == view.root_ino:
            entry = (versions_tree.VersionsEntry(entry.st, built.branches, entry.kind, synthetic=entry.synthetic)
                     if isinstance(entry, versions_tree.VersionsEntry) else Entry(entry.st, built.branches))
        return view, entry, built, built.marks

    def read_lookup(self, parent: int, name: bytes) -> tuple[Built | None, Entry | None]:
        """The disk part of a lookup (and of its view's build): safe in a worker thread."""
        view, entry, built, marks = self._directory(parent)
        found: Entry | None
        if view.versions:
            found = versions_tree.lookup(cast(versions_tree.VersionsEntry, entry), name, view.snapshot_names)
        else:
            found = layerstack.lookup(entry.branches, name, marks)
        self.check_layers(view, None if built is None else built.bin_ids)
        return built, found

    def finish_lookup(self, parent: int, name: bytes, built: Built | None,
                      entry: Entry | None) -> tuple[int, Entry] | None:
        """Record a lookup :meth:`read_lookup` resolved: number it and count the kernel's reference."""
        view = self.nodes[parent].view
        assert view is not None
        self.finish_build(view, built)
        if entry is None:
            return None
        ino = self.ino_of(view, entry)
        self.remember(ino, view, entry, parent, name)
        return ino, entry

    def listing(self, ino: int) -> list[tuple[bytes, int, Entry]]:
        """A directory's merged entries in a fixed order (offset = index + 1)."""
        items = self.listing_known(ino)
        if items is not None:
            return items
        built, merged = self.read_listing(ino)
        return self.finish_listing(ino, built, merged)

    def listing_known(self, ino: int) -> list[tuple[bytes, int, Entry]] | None:
        """A listing from memory (the root, one built before), or None when the disk is needed."""
        if ino == ROOT_INO:
            return self.root_items
        if ino == SNAPSHOTS_INO:
            return self.snapshot_items
        node = self.nodes[ino]
        view = node.view
        if view is None:
            raise NotADirectoryError(ino)
        listing = self._known_listing(node, view) if view.built else None
        return None if listing is None else listing.items

    def read_listing(self, ino: int) -> tuple[Built | None, list[tuple[bytes, Entry]]]:
        """The disk part of a listing (and of its view's build): safe in a worker thread."""
        view, entry, built, marks = self._directory(ino)
        merged: list[tuple[bytes, Entry]]
        if view.versions:
            merged = list(versions_tree.listdir(cast(versions_tree.VersionsEntry, entry), view.snapshot_names))
        else:
            merged = layerstack.listdir(entry.branches, marks)
        self.check_layers(view, None if built is None else built.bin_ids)
        return built, merged

    def finish_listing(self, ino: int, built: Built | None,
                       merged: list[tuple[bytes, Entry]]) -> list[tuple[bytes, int, Entry]]:
        """Number what :meth:`read_listing` read and keep it (on the node, and in the memo)."""
        node = self.nodes[ino]
        view = node.view
        assert view is not None
        self.finish_build(view, built)
        if node.listing is None:
            node.listing = Listing([(name, self.ino_of(view, e), e) for name, e in merged])
            self._keep(view, ino, _LISTING, node.listing, len(merged) + 1)
            self.counters.listings_built += 1
        return node.listing.items

    def attributes(self, ino: int) -> Entry:
        return self.nodes[ino].entry

    def readlink(self, ino: int) -> bytes:
        """A symlink's target, read once (a committed layer never changes it)."""
        target = self.target_known(ino)
        return target if target is not None else self.finish_target(ino, os.readlink(self.link_path(ino)))

    def target_known(self, ino: int) -> bytes | None:
        node = self.nodes[ino]
        if node.target is None and node.view is not None:
            node.target = cast(bytes | None, self._remembered(node.view, ino, _TARGET))
        return node.target

    def link_path(self, ino: int) -> bytes:
        """The real symlink to read (the root's links always know their target)."""
        return self.nodes[ino].entry.path

    def finish_target(self, ino: int, target: bytes) -> bytes:
        node = self.nodes[ino]
        node.target = target
        if node.view is not None:
            self._keep(node.view, ino, _TARGET, target, 1)
        return target

    def real_path(self, ino: int) -> bytes:
        """The real file to open for reading."""
        node = self.nodes[ino]
        if node.view is None or not node.entry.branches:
            raise IsADirectoryError(ino)
        return node.entry.path

    def in_image(self, ino: int) -> bool:
        """Whether a file's data comes from a SquashFS image: the seed (the bottom layer) or a sealed bin."""
        node = self.nodes[ino]
        return node.view is not None and node.entry.layer in node.view.image_layers

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        """A node's visible xattrs, read once and kept while the node lives (and in the memo)."""
        known = self.xattrs_known(ino)
        return known if known is not None else self.finish_xattrs(ino, self.read_xattrs(ino))

    def xattrs_known(self, ino: int) -> dict[bytes, bytes] | None:
        node = self.nodes[ino]
        if node.xattrs is None:
            view = node.view
            if view is None or getattr(node.entry, "synthetic", False):
                node.xattrs = {}
            else:
                node.xattrs = cast(dict[bytes, bytes] | None, self._remembered(view, ino, _XATTRS))
        return node.xattrs

    def read_xattrs(self, ino: int) -> dict[bytes, bytes]:
        """The disk part of :meth:`xattrs`: safe in a worker thread."""
        node = self.nodes[ino]
        view = node.view
        assert view is not None
        if view.versions and getattr(node.entry.st, "root_only", False):
            return {k: v for k, v in layerstack.read_xattrs(node.entry.path).items()
                    if k not in versions_tree.ACL_XATTRS}
        if node.ino == view.root_ino:
            return layerstack.read_xattrs(view.layers[0].directory())
        return layerstack.read_xattrs(node.entry.path)

    def finish_xattrs(self, ino: int, xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
        node = self.nodes[ino]
        if node.xattrs is None:
            node.xattrs = xattrs
            if node.view is not None:
                self._keep(node.view, ino, _XATTRS, xattrs, 1)
        return node.xattrs

    def statfs_path(self) -> bytes:
        return os.fsencode(self.layout.root)


def _image_names(layout: RootLayout, bins: list[Bin] | tuple[Bin, ...]) -> dict[int, str]:
    """The image of each sealed bin of ``bins``, by bin number, named relative to the root (``bins/N.sfs``)."""
    return {b.number: os.fspath(path.relative_to(layout.root))
            for b in bins if (path := layer_kinds.image(layout, b)) is not None}


def _images_of(layout: RootLayout, history: History) -> tuple[str, ...]:
    """Every image a history names, relative to the root: its seed, then its sealed bins."""
    seeds = (history.seed.file,) if history.seed is not None else ()
    return seeds + tuple(_image_names(layout, history.bins).values())
