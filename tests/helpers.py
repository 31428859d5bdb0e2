"""Builders shared by the tests: tiny model families and configs."""

from __future__ import annotations

from pathlib import Path

import yaml

METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "neuromerging"]


def write_config(path: Path, method: str, base: Path, fts: list[Path], **extra: object) -> Path:
    data: dict[str, object] = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 1.0, "density": 0.5}} for f in fts],
    }
    data.update(extra)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def leftovers(parent: Path, name: str) -> list[str]:
    """Returns entries under `parent` that belong to output `name` (the folder or its temporaries)."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))
