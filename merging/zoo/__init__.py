"""The offline model zoo: all-MiniLM-L6-v2 fine-tuned on labelled tasks built from data in PyPI packages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merging.config import MergeConfig
from merging.evaluation.data import TaskSpec
from merging.zoo.manifest import ZooManifest, load_manifest


def zoo_tasks(root: str | Path, manifest: ZooManifest | None = None) -> list[TaskSpec]:
    """Returns the evaluation tasks of the zoo at `root`: merge tasks (with their fine-tune) and out-of-domain ones."""
    folder = Path(root).resolve()
    manifest = manifest or load_manifest(folder)
    return [t.spec(folder) for t in manifest.tasks]


def zoo_merge_config(
    root: str | Path,
    method: str,
    parameters: dict[str, Any] | None = None,
    manifest: ZooManifest | None = None,
    weights: dict[str, float] | None = None,
) -> MergeConfig:
    """Returns a merge config of the zoo's base and its merge-task fine-tunes with `method` and `parameters`.

    `weights` (task name → weight) merges only the tasks it names, each with its own weight; without it,
    every merge task's fine-tune with the method's default weight.
    """
    folder = Path(root).resolve()
    manifest = manifest or load_manifest(folder)
    tasks = {t.name: t for t in manifest.merge_tasks() if t.finetune}
    unknown = sorted(set(weights or {}) - set(tasks))
    if unknown:
        raise ValueError(f"weights: {unknown} are not merge tasks of the zoo at {folder} ({', '.join(tasks)})")
    models: list[dict[str, Any]] = [
        {"model": str(folder / t.finetune.path), **({"parameters": {"weight": weights[name]}} if weights else {})}
        for name, t in tasks.items()
        if t.finetune and (weights is None or name in weights)
    ]
    return MergeConfig(
        merge_method=method,
        base_model=str(folder / manifest.base.path),
        models=models,  # type: ignore[arg-type]
        parameters=dict(parameters or {}),
        name=f"zoo-{manifest.size}-{manifest.head}-{method}",
    )
