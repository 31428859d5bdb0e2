"""Returns the label of each fine-tune in a merge: its `name`, else its folder name, unique and file-name safe."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from merging.engine.plan import BASE_HEAD

if TYPE_CHECKING:
    from merging.config import MergeConfig


def model_labels(config: MergeConfig) -> list[str]:
    """Returns a unique, file-name-safe label per fine-tune (its `name`, else its folder name)."""
    labels: list[str] = []
    for entry in config.fine_tunes():
        raw = entry.name or Path(entry.model.rstrip("/")).name or "model"
        label = "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)
        base, n = label, 2
        while label in labels or label == BASE_HEAD:
            label, n = f"{base}-{n}", n + 1
        labels.append(label)
    return labels
