"""Returns a zoo task's data: how much each zoo size uses and how its fine-tunes train (`SIZES`), and the
disjoint train/validation/test splits drawn by a permutation seeded with the task's name."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from merging.zoo.finetune import Recipe
from merging.zoo.sources import TaskSource


@dataclass(frozen=True)
class SizeSpec:
    """How much data one zoo size uses, and how its fine-tunes are trained."""

    train: int
    validation: int
    test: int
    recipe: Recipe


SIZES: dict[str, SizeSpec] = {
    "ci": SizeSpec(
        train=384,
        validation=128,
        test=192,
        recipe=Recipe(learning_rates=(1e-4,), epochs=2, batch_size=16, max_steps=40, eval_every=10, patience=2),
    ),
    "full": SizeSpec(
        train=2000,
        validation=400,
        test=800,
        recipe=Recipe(learning_rates=(3e-5, 1e-4), epochs=2, batch_size=32, max_steps=120, eval_every=20, patience=3),
    ),
}


def split_source(source: TaskSource, spec: SizeSpec, seed: int) -> dict[str, tuple[list[str], list[int]]]:
    """Returns train/validation/test subsets of `source`, disjoint, drawn by a seeded permutation."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(source.texts), generator=gen).tolist()
    n_test = min(spec.test, len(order) // 4)
    n_val = min(spec.validation, len(order) // 10)
    n_train = min(spec.train, len(order) - n_test - n_val)
    bounds = {
        "test": (0, n_test),
        "validation": (n_test, n_test + n_val),
        "train": (n_test + n_val, n_test + n_val + n_train),
    }
    return {
        split: ([source.texts[i] for i in order[a:b]], [source.labels[i] for i in order[a:b]])
        for split, (a, b) in bounds.items()
    }


def split_seed(name: str) -> int:
    """Returns the seed of a task's split permutation: from its name, so every build and screen splits it alike."""
    return int.from_bytes(hashlib.sha256(f"mergeflow-zoo-split/{name}".encode()).digest()[:4], "little")


def write_parquet(path: Path, texts: list[str], labels: list[int] | None = None) -> None:
    """Writes a `text` column (and a `label` column when labels are given) to `path`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {"text": pa.array(texts, pa.string())}
    if labels is not None:
        columns["label"] = pa.array(labels, pa.int64())
    pq.write_table(pa.table(columns), path)
