"""The output a staged merge writes once, in place: the partial folder beside the output, its shards' layout, the
per-layer journal, the lock that keeps two runs out of one folder, and the stamps that tell a finished folder is
untouched (see staged.py for the path of one merge)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from merging.config import MergeConfig, dump_config
from merging.engine.output import output_dtype
from merging.engine.plan import MergePlan
from merging.io.writer import ShardedWriter, temporary_sibling

PARTIAL_FORMAT = 1


def partial_dir(out_dir: Path) -> Path:
    """Returns the folder a staged merge writes `out_dir` in before renaming it into place."""
    return out_dir.parent / f".{out_dir.name}.partial"


@contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Holds an exclusive lock on `out_dir` (`.<name>.lock` beside it) from preparing the output to publishing
    it, so two runs never write one partial folder; the second waits, then finds the output done."""
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "ab") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.getLogger(__name__).info("waiting for another run writing %s", out_dir)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def output_entries(config: MergeConfig, plan: MergePlan) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Returns every output tensor's name, output dtype and shape, in the order the shards hold them."""
    return [(t.name, output_dtype(config, t), t.shape) for t in plan.tensors]


def layout_record(key: str, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], shard_size: int) -> dict[str, Any]:
    """Returns what fixes every slot's offset in the shards: the merge key, the shard size, each tensor's name, dtype
    and shape (a partial folder with another layout is started afresh)."""
    shapes = json.dumps([[name, str(dtype), list(shape)] for name, dtype, shape in entries])
    return {
        "format": PARTIAL_FORMAT,
        "key": key,
        "shard_size": shard_size,
        "entries": hashlib.sha256(shapes.encode()).hexdigest(),
    }


def journal_file(part: Path, group: str) -> Path:
    """Returns the journal entry's file of a layer group (named by a hash: group names hold dots)."""
    return part / "journal" / f"{hashlib.sha256(group.encode()).hexdigest()[:32]}.json"


def journal_entry(part: Path, group: str) -> dict[str, Any] | None:
    """Returns a layer group's journal entry (group, sha256 of the bytes it wrote, their size), or None when the
    group has none or an unreadable one."""
    try:
        entry = json.loads(journal_file(part, group).read_text())
        if entry["group"] == group and isinstance(entry["sha256"], str) and isinstance(entry["nbytes"], int):
            return dict(entry)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def partial_matches(part: Path, layout: dict[str, Any]) -> bool:
    """Returns whether the partial folder exists with this layout (its shards are then checked when reopened)."""
    try:
        return bool(json.loads((part / "layout.json").read_text()) == layout)
    except (OSError, ValueError):
        return False


def create_partial(out_dir: Path, layout: dict[str, Any], entries: list[Any], shard_size: int) -> None:
    """Creates `out_dir`'s partial folder whole (built in a temporary sibling, then renamed): shards with their
    headers and data space (sparse), an empty journal. An older partial folder there is removed first."""
    part = partial_dir(out_dir)
    shutil.rmtree(part, ignore_errors=True)
    tmp = temporary_sibling(out_dir)  # a killed run's temporaries (dead process) are removed here
    try:
        (tmp / "model").mkdir(parents=True)
        (tmp / "journal").mkdir()
        ShardedWriter(tmp / "model", entries, shard_size).close()  # data space allocated (sparse) and flushed
        (tmp / "layout.json").write_text(json.dumps(layout))
        os.rename(tmp, part)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def folder_stamp(folder: Path) -> dict[str, list[int]]:
    """Returns each file's size, mtime and inode (a changed file changes its stamp, as git's index sees it)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            files[p.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return files


def output_fingerprint(config: MergeConfig, key: str, digests: dict[str, str], shard_size: int) -> str:
    """Returns a digest of everything a finished folder depends on (the config's text included: it is in the card)."""
    payload = [dump_config(config), key, sorted(digests.items()), shard_size]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()
