"""Returns the checked fields of a saved routed model's `routed.json` (untrusted: it may come from anyone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merging.errors import CheckpointError


def relative_to(path: Path, folder: Path) -> str:
    """Returns `path` relative to `folder` when it lies inside it (so the folder can move), else absolute."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)


def router_layer_field(value: Any, folder: Path) -> int | None:
    """Returns routed.json's `router_layer` (absent or null: the last layer), checked."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{folder}/routed.json: router_layer must be a layer count >= 0 or null, got {value!r}")
    return value


def task_names_field(value: Any, folder: Path) -> list[str]:
    """Returns routed.json's task names, each a plain file name (they name the patch files: no path may leave
    `patches/`)."""
    if not isinstance(value, list) or not value:
        raise CheckpointError(f"{folder}/routed.json: tasks must be a non-empty list of names, got {value!r}")
    for name in value:
        if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\x00" in name:
            raise CheckpointError(f"{folder}/routed.json: task name {name!r} is not a plain name (a patch file's stem)")
    return list(value)
