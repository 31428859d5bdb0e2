"""Returns the cache's status and collects its garbage: downloaded snapshots and per-merge records.

Three areas grow with every run. `models/` holds downloads: snapshot folders hard-linked into a
content-addressed blob store. `layers/` holds, per merge, `<merge key>.stats.json` (the model-wide
statistics) and `<merge key>.assembled.json` (the record of the finished output folder); the merged
layers themselves are written once, straight into the output's shards (merging/engine/staged.py).
Layer files an older version cached here (a `.safetensors` per layer group, a `.json` beside it)
are collected with their merge key.
`features/` holds evaluation features (`merging/evaluation/feature_cache.py`). An entry is one
snapshot, one merge key's files, or one feature matrix.

A running flow holds a shared lock on every entry it uses (`in_use`, an flock on
`<cache>/inuse/<area>-<key>.lock`, whose mtime is also the entry's last use). `gc` removes an entry
only after taking that lock exclusively without waiting, so nothing a running flow uses is
removed. Entries go when unused for `keep_days`; then, while the areas are over `max_size`, the
least recently used go first, except those used within `grace_seconds` (a flow that has just
downloaded a model and is about to lock it). Blobs that no snapshot links to any more are removed
only while no download holds a snapshot lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from merging.errors import ConfigError
from merging.io.checkpoint import cache_dir

AREAS = ("models", "layers", "features")
MERGE_FILES = (".stats.json", ".assembled.json")  # one per merge key in layers/ (older versions: layer files too)
_KEY = re.compile(r"^[0-9a-f]{16,64}$")


@dataclass
class Entry:
    area: str
    key: str
    paths: list[Path]
    bytes: int
    last_used: float
    blobs: set[str] = field(default_factory=set)  # snapshots: the blobs they link to


def _lock_path(root: Path, area: str, key: str) -> Path:
    if area not in AREAS or not _KEY.match(key):
        raise ConfigError(f"cache entry {area}/{key!r}: not a cache key")
    return root / "inuse" / f"{area}-{key}.lock"


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def _snapshot_entries(root: Path) -> list[Entry]:
    from tasks.snapshots import SNAPSHOT_RECORD

    snapshots = root / "models" / "snapshots"
    out = []
    for folder in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
        if not folder.is_dir() or not _KEY.match(folder.name):
            continue
        try:
            files = json.loads((folder / SNAPSHOT_RECORD).read_text()).get("files", {})
            blobs = {str(e["sha256"]) for e in files.values()}
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            blobs = set()  # an unreadable record: its folder can go, its blobs are swept when unlinked
        size = sum(_size(p) for p in folder.rglob("*"))
        used = max([_mtime(folder), _mtime(_lock_path(root, "models", folder.name))])
        out.append(Entry("models", folder.name, [folder], size, used, blobs))
    return out


def _layer_entries(root: Path) -> list[Entry]:
    layers = root / "layers"
    groups: dict[str, list[Path]] = {}
    for path in sorted(layers.iterdir()) if layers.is_dir() else []:
        if path.name.startswith("."):
            continue
        per_merge = next((suffix for suffix in MERGE_FILES if path.name.endswith(suffix)), None)
        if per_merge is not None:  # the merge's statistics, its assembly record
            groups.setdefault(path.name.removesuffix(per_merge), []).append(path)
        elif path.suffix == ".safetensors":
            meta = path.with_suffix(".json")
            try:
                key = str(json.loads(meta.read_text()).get("merge_key") or path.stem)
            except (OSError, ValueError, AttributeError):
                key = path.stem
            groups.setdefault(key, []).extend([path, meta])
    out = []
    for key, paths in groups.items():
        if not _KEY.match(key):
            continue
        used = max([_mtime(p) for p in paths] + [_mtime(_lock_path(root, "layers", key))])
        out.append(Entry("layers", key, paths, sum(_size(p) for p in paths), used))
    return out


def _feature_entries(root: Path) -> list[Entry]:
    """One entry per cached feature matrix (`<cache>/features/<2 hex>/<key>.safetensors`, its mtime the last
    use). No lock: a reader that finds its entry gone encodes the texts again."""
    folder = root / "features"
    out = []
    for path in sorted(folder.glob("*/*.safetensors")) if folder.is_dir() else []:
        if _KEY.match(path.stem) and path.parent.name == path.stem[:2]:
            out.append(Entry("features", path.stem, [path], _size(path), _mtime(path)))
    return out


def entries(root: Path | None = None) -> list[Entry]:
    """Returns every cache entry (snapshots, merges' layers, evaluation features), oldest use first."""
    root = root or cache_dir()
    found = _snapshot_entries(root) + _layer_entries(root) + _feature_entries(root)
    return sorted(found, key=lambda e: (e.last_used, e.area, e.key))


def _area_bytes(root: Path, area: str) -> int:
    """Returns the bytes the area's files take, each inode counted once (snapshots hard-link their blobs)."""
    folder = root / area
    seen: dict[tuple[int, int], int] = {}
    for path in folder.rglob("*") if folder.is_dir() else []:
        try:
            st = path.lstat()
        except OSError:
            continue
        if not path.is_dir():
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def status(root: Path | None = None) -> dict[str, Any]:
    """Returns per area: bytes on disk, entries, oldest and newest use; plus the in-use entries."""
    root = root or cache_dir()
    found = entries(root)
    out: dict[str, Any] = {"root": str(root), "areas": {}}
    for area in AREAS:
        mine = [e for e in found if e.area == area]
        out["areas"][area] = {
            "bytes": _area_bytes(root, area),
            "entries": len(mine),
            "oldest_use": min((e.last_used for e in mine), default=None),
            "newest_use": max((e.last_used for e in mine), default=None),
            "in_use": sum(1 for e in mine if _held(root, e)),
        }
    out["bytes"] = sum(a["bytes"] for a in out["areas"].values())
    out["not_collected"] = {"zoo": _area_bytes(root, "zoo")}  # zoo builds are made and removed by hand
    return out


@contextmanager
def in_use(area: str, keys: Iterable[str], root: Path | None = None) -> Iterator[None]:
    """Holds a shared lock on each entry (and stamps its last use) so `gc` leaves it alone until the block ends."""
    root = root or cache_dir()
    with ExitStack() as stack:
        for key in sorted(set(keys)):
            path = _lock_path(root, area, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            handle: IO[bytes] = stack.enter_context(path.open("ab"))
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
            os.utime(path)
        yield


def _try_exclusive(root: Path, entry: Entry) -> IO[bytes] | None:
    if entry.area == "features":  # never locked (see _feature_entries): nothing to wait for
        return open(os.devnull, "ab")  # closed by the caller, like a lock file
    path = _lock_path(root, entry.area, entry.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    handle = path.open("ab")
    if created:  # probing must not make the entry look used now
        os.utime(path, (entry.last_used, entry.last_used))
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _held(root: Path, entry: Entry) -> bool:
    handle = _try_exclusive(root, entry)
    if handle is None:
        return True
    handle.close()
    return False


@dataclass
class GcReport:
    removed: list[dict[str, Any]] = field(default_factory=list)
    skipped_in_use: list[str] = field(default_factory=list)
    blobs_removed: int = 0
    freed_bytes: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _remove(root: Path, entry: Entry) -> None:
    for path in entry.paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    _lock_path(root, entry.area, entry.key).unlink(missing_ok=True)


def _sweep_blobs(root: Path, grace_seconds: float, dry_run: bool) -> tuple[int, int]:
    """Removes blobs no snapshot links to, unless a download holds a snapshot lock; returns (count, bytes)."""
    from filelock import FileLock, Timeout

    models = root / "models"
    blob_dir, locks = models / "blobs", models / "locks"
    if not blob_dir.is_dir():
        return 0, 0
    with ExitStack() as stack:
        for lock in sorted(locks.glob("*.lock")) if locks.is_dir() else []:
            try:
                stack.enter_context(FileLock(str(lock), timeout=0))
            except Timeout:
                return 0, 0  # a download is running: its new blobs may not be linked yet
        linked = {b for e in _snapshot_entries(root) for b in e.blobs}
        count = freed = 0
        now = time.time()
        for blob in blob_dir.iterdir():
            if blob.name in linked or blob.name.endswith(".part") or now - _mtime(blob) < grace_seconds:
                continue
            count, freed = count + 1, freed + _size(blob)
            if not dry_run:
                blob.unlink(missing_ok=True)
        return count, freed


def gc(
    root: Path | None = None,
    keep_days: float | None = None,
    max_size: int | None = None,
    grace_seconds: float = 3600.0,
    dry_run: bool = False,
) -> GcReport:
    """Returns what was removed: entries unused for `keep_days`, then least recently used ones over `max_size`."""
    root = root or cache_dir()
    if keep_days is not None and keep_days < 0:
        raise ConfigError(f"keep_days must be >= 0, got {keep_days}")
    if max_size is not None and max_size < 0:
        raise ConfigError(f"max_size must be >= 0, got {max_size}")
    report = GcReport(dry_run=dry_run)
    total = report.bytes_before = sum(_area_bytes(root, a) for a in AREAS)
    now = time.time()
    for entry in entries(root):
        too_old = keep_days is not None and now - entry.last_used > keep_days * 86400
        too_big = max_size is not None and total > max_size and now - entry.last_used >= grace_seconds
        if not (too_old or too_big):
            continue
        handle = _try_exclusive(root, entry)
        if handle is None:
            report.skipped_in_use.append(f"{entry.area}/{entry.key}")
            continue
        try:
            if dry_run or entry.area != "models":
                freed = entry.bytes  # a dry run counts a snapshot's files as freed (shared blobs may stay)
            else:  # hard links free nothing until their blob goes: only copied files count here
                freed = sum(_size(p) for p in entry.paths[0].rglob("*") if p.is_file() and p.stat().st_nlink == 1)
            if not dry_run:
                _remove(root, entry)
            report.removed.append(
                {"area": entry.area, "key": entry.key, "bytes": entry.bytes, "why": "age" if too_old else "size"}
            )
            report.freed_bytes += freed
            total -= freed
        finally:
            handle.close()
        if entry.area == "models" and not dry_run:
            blobs, blob_bytes = _sweep_blobs(root, grace_seconds, dry_run)
            report.blobs_removed += blobs
            report.freed_bytes += blob_bytes
            total -= blob_bytes
    if not dry_run:  # blobs left unlinked earlier (a download held a lock then) go now
        blobs, blob_bytes = _sweep_blobs(root, grace_seconds, dry_run)
        report.blobs_removed += blobs
        report.freed_bytes += blob_bytes
    if dry_run:
        report.bytes_after = report.bytes_before - report.freed_bytes
    else:
        report.bytes_after = sum(_area_bytes(root, a) for a in AREAS)
    return report
