"""Builders shared by the tests: tiny model families and configs."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "neuromerging"]
DEVICE_ENV = "MERGEFLOW_TEST_DEVICE"  # set from pytest's --device (tests/conftest.py)


def test_device() -> torch.device:
    """Returns the device the method tests compute on: `pytest --device cuda` (benchmarks/gpu_check.sh), else CPU."""
    return torch.device(os.environ.get(DEVICE_ENV, "cpu"))


test_device.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def neuron_merge_on_device(base: torch.Tensor, deltas: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """NeuroMerging's fast neuron rule on the test device (`pytest --device cuda`), its result back on the CPU."""
    from merging.methods.neuromerging import neuron_merge

    device = test_device()
    return neuron_merge(base.to(device), deltas.to(device), *args, **kwargs).cpu()


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


def build_tiny_tasks(root: Path, scale: float = 0.3, finetunes: int = 2) -> tuple[Path, list[Path], list]:
    """Returns (base, two classification fine-tunes, three tiny tasks "two", "three", "ood") written under `root`.

    Task "two" belongs to fine-tune 0 (2 labels), "three" to fine-tune 1 (3 labels); "ood" has no fine-tune.
    With `finetunes=3` a fourth task "four" (4 labels) belongs to fine-tune 2.
    """
    from merging.evaluation import TaskSpec
    from merging.synthetic import WORDS, build_family
    from merging.zoo.splits import write_parquet

    base, fts = build_family(root, "bert", finetunes, classification=True, scale=scale)
    tasks = []
    specs = [("two", 2), ("three", 3), ("ood", 2)] + ([("four", 4)] if finetunes > 2 else [])
    for number, (name, labels) in enumerate(specs):
        for split, n in (("train", 40), ("validation", 16), ("test", 24)):
            texts = [f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]}" for i in range(n + number)]
            ys = [i % labels for i in range(n + number)]
            write_parquet(root / "data" / name / f"{split}.parquet", texts[number:], ys[number:])
        model = str(fts[number]) if number < 2 else (str(fts[2]) if name == "four" else None)
        tasks.append(
            TaskSpec(name=name, dataset=str(root / "data" / name), num_labels=labels, model=model, max_length=8)
        )
    return base, fts, tasks


def scale_in_place_keeping_mtime(weights: Path, suffix: str, factor: float = 1.5) -> None:
    """Rewrites the first tensor of `weights` whose name ends with `suffix`, scaled, and puts the file's mtime
    back: a cache keyed on anything but the contents would miss the change."""
    from safetensors.torch import load_file, save_file

    stamp = weights.stat()
    tensors = load_file(str(weights))
    name = next(n for n in tensors if n.endswith(suffix))
    tensors[name] = tensors[name] * factor
    save_file(tensors, str(weights), metadata={"format": "pt"})
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
