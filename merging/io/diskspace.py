"""Free space is checked before merging: a merge that cannot fit fails at once, naming the folder and the bytes.

The merged model's size is known from the plan (every output tensor in its output dtype, plus the
heads copied unmerged, plus side files). `check_free_space` compares what each destination needs
with what its file system has free, summing destinations that share a file system. The staged merge
(the pipeline) writes the model once, in place, so it needs the model's size once, less what a
killed run already wrote. A merge that passes can still meet a full disk if something else fills it
meanwhile; that path stays a one-line error that publishes nothing (a staged merge keeps its hidden
partial folder, to resume from).

`MERGEFLOW_SKIP_SPACE_CHECK=1` turns the check off, for file systems that report no free space
honestly (some FUSE mounts of object stores report 0).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from merging.config import MergeConfig
from merging.engine.output import output_bytes
from merging.engine.plan import MergePlan
from merging.errors import MergeflowError
from merging.io.checkpoint import Checkpoint

SKIP_ENV = "MERGEFLOW_SKIP_SPACE_CHECK"
CARD_MARGIN = 64 * 2**10  # the model card, the written config, the shard index (a few KiB each)


class DiskSpaceError(MergeflowError):
    """A destination's file system has less free space than the merge needs."""


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def planned_output_bytes(config: MergeConfig, plan: MergePlan, base: Checkpoint, models: Sequence[Checkpoint]) -> int:
    """Returns the bytes the merged folder will take: merged tensors in their output dtype, the heads
    copied unmerged, the base's side files (tokenizer, config) and a margin for the card and index."""
    weights = output_bytes(config, plan.tensors)
    by_label = {m.label: m for m in [base, *models]}
    heads = 0
    for label, names in plan.heads.items():
        model = by_label.get(label)
        if model is not None:
            heads += sum(model.infos[n].nbytes for n in names if n in model.infos)
    sides = sum(p.stat().st_size for p in base.side_files() if p.is_file())
    return weights + heads + sides + CARD_MARGIN


def _existing(folder: Path) -> Path:
    """Returns the folder, or its nearest existing ancestor (where it will be created)."""
    path = folder.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(needs: Iterable[tuple[Path, int, str]]) -> None:
    """Raises DiskSpaceError when a file system has less free space than the (folder, bytes, what) needs on it."""
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    per_device: dict[int, list[tuple[Path, int, str]]] = {}
    for folder, nbytes, what in needs:
        probe = _existing(folder)
        per_device.setdefault(probe.stat().st_dev, []).append((folder, nbytes, what))
    for entries in per_device.values():
        needed = sum(n for _, n, _ in entries)
        free = shutil.disk_usage(_existing(entries[0][0])).free
        if needed > free:
            parts = "; ".join(f"{what} in {folder}: {human(n)} ({n} bytes)" for folder, n, what in entries)
            raise DiskSpaceError(
                f"not enough free space: {parts}; needed {human(needed)}, {human(free)} free on that file system. "
                f"Nothing was written; free some space or choose another folder (or set {SKIP_ENV}=1 where "
                "the file system misreports its free space)"
            )
