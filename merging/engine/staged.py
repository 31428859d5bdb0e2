"""Returns a merge split into steps that a pipeline can run apart: plan, one step per layer group, assemble.

`run_merge` streams a whole model in one process. A pipeline instead runs one task per layer group
(possibly on other workers, possibly killed half way), so each layer's result is a file in a
content-addressed cache: its key is the sha256 of the method, its parameters, the model-wide
statistics, every input file's sha256 and the layer's tensor names. A re-run finds the layers that
finished and merges only the rest; `assemble` (assemble.py) then packs the layer files into the same shards,
heads, side files and model card that `run_merge` writes, so both paths give identical folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import merging
from merging.config import MergeConfig
from merging.engine.labels import model_labels
from merging.engine.merge import TensorSource, compute_stats, merge_tensor, resolve_device
from merging.engine.model_card import InputRecord
from merging.engine.output import output_bytes, output_dtype
from merging.engine.plan import MergePlan, build_plan
from merging.errors import MergeflowError
from merging.io.checkpoint import Checkpoint, HashCache, cache_dir, file_sha256
from merging.methods import REGISTRY
from merging.methods.base import ModelStats

CACHE_FORMAT = 1


@dataclass(frozen=True)
class StagedPlan:
    """What every layer task needs: the merge key, layer groups in base order, inputs' hashes, statistics."""

    key: str
    groups: list[str]
    group_bytes: dict[str, int]
    inputs: list[InputRecord]
    stats: ModelStats
    heads: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "groups": self.groups,
            "group_bytes": self.group_bytes,
            "inputs": [asdict(r) for r in self.inputs],
            "stats": asdict(self.stats),
            "heads": self.heads,
        }


@dataclass(frozen=True)
class LayerResult:
    """One merged layer group: its cache file, that file's sha256, and whether it was reused."""

    group: str
    path: Path
    sha256: str
    reused: bool
    seconds: float
    nbytes: int


def layer_cache(root: Path | None = None) -> Path:
    """Returns the folder of cached layer results (and model-wide statistics)."""
    return (root or cache_dir()) / "layers"


def open_inputs(config: MergeConfig) -> tuple[Checkpoint, list[Checkpoint]]:
    labels = model_labels(config)
    base = Checkpoint(config.base_model, "base")
    return base, [Checkpoint(e.model, label) for e, label in zip(config.fine_tunes(), labels)]


def close_inputs(base: Checkpoint, models: list[Checkpoint]) -> None:
    for ck in [base, *models]:
        ck.close()


def plan_inputs(config: MergeConfig, base: Checkpoint, models: list[Checkpoint]) -> MergePlan:
    return build_plan(base, models, config.task_specific, config.transposed, config.allow_dtype_mismatch)


def merge_key(config: MergeConfig, inputs: list[InputRecord]) -> str:
    """Returns the sha256 naming a merge's results: everything that changes a merged tensor, and nothing else."""
    params = config.method_params().model_dump(mode="json", by_alias=True)
    entries = [e.parameters.model_dump(mode="json") for e in config.fine_tunes()]
    payload = {
        "format": CACHE_FORMAT,
        "mergeflow": merging.__version__,
        "method": config.merge_method,
        "parameters": params,
        "models": entries,
        "seed": config.seed,
        "dtype": config.dtype,
        "out_dtype": config.out_dtype,
        "task_specific": config.task_specific,
        "transposed": config.transposed,
        "allow_dtype_mismatch": config.allow_dtype_mismatch,
        "inputs": [[r.label, sorted(r.sha256.items())] for r in inputs],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_merge(
    config: MergeConfig, cache: Path | None = None, progress: bool = False, out_parent: Path | None = None
) -> StagedPlan:
    """Returns the staged plan: headers checked, inputs hashed, model-wide statistics computed or reused.

    With `out_parent` (where the merged folder will be written) free space is checked before any
    statistics are computed: the layers not in the cache yet, and the merged folder.
    """
    config.require_static()
    cache = layer_cache(cache)
    base, models = open_inputs(config)
    try:
        plan = plan_inputs(config, base, models)
        hashes = HashCache()
        inputs = [
            InputRecord(ck.label, str(ck.path), {f.name: hashes.sha256(f) for f in ck.files}) for ck in [base, *models]
        ]
        key = merge_key(config, inputs)
        if (cache / f"{key}.stats.json").exists():
            # Work computed from these sha256s would be reused: read the inputs afresh, so a file
            # rewritten in place (stat unchanged) cannot pass for the one the cached layers came from.
            inputs = [
                InputRecord(ck.label, str(ck.path), {f.name: hashes.verify(f) for f in ck.files})
                for ck in [base, *models]
            ]
            key = merge_key(config, inputs)
        hashes.save()
        if out_parent is not None:
            _check_space(config, plan, [base, *models], cache, out_parent, key)
        stats_file = cache / f"{key}.stats.json"
        stats: ModelStats | None = None
        if stats_file.exists():
            try:
                raw = json.loads(stats_file.read_text())
                stats = ModelStats(**{k: tuple(v) if v is not None else None for k, v in raw.items()})
            except (OSError, ValueError, TypeError):
                stats = None
        if stats is None:
            params = config.method_params()
            densities = [config.model_density(e, params) for e in config.fine_tunes()]
            source = TensorSource(base, models, resolve_device("cpu"))
            request = REGISTRY[config.merge_method].stats_request(params)
            stats = compute_stats(request, plan, source, densities, progress, getattr(params, "trim_ties", "index"))
            atomic_write(stats_file, json.dumps(asdict(stats)).encode())
        groups = plan.groups()
        return StagedPlan(
            key=key,
            groups=list(groups),
            group_bytes={g: sum(t.numel * t.dtype.itemsize for t in ts) for g, ts in groups.items()},
            inputs=inputs,
            stats=stats,
            heads=plan.heads,
        )
    finally:
        close_inputs(base, models)


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _check_space(
    config: MergeConfig, plan: MergePlan, checkpoints: list[Checkpoint], cache: Path, out_parent: Path, key: str
) -> None:
    """Raises DiskSpaceError unless the layers not cached yet and the merged folder fit on their file systems."""
    from merging.io.diskspace import check_free_space, planned_output_bytes

    missing = sum(
        output_bytes(config, tensors)
        for group, tensors in plan.groups().items()
        if not (cache / f"{_layer_key(key, group)}.safetensors").exists()
    )
    needs = [(out_parent, planned_output_bytes(config, plan, checkpoints[0], checkpoints[1:]), "the merged model")]
    check_free_space([*needs, (cache, missing, "merged layers (layer cache)")])


def layer_key(staged: StagedPlan, group: str) -> str:
    """Returns the cache key of one layer group's result."""
    return _layer_key(staged.key, group)


def _layer_key(merge_key: str, group: str) -> str:
    return hashlib.sha256(f"{merge_key}\0{group}".encode()).hexdigest()


def cached_layer(staged: StagedPlan, group: str, cache: Path | None = None) -> LayerResult | None:
    """Returns the cached result of a layer group when its file is complete and matches its recorded sha256."""
    path = layer_cache(cache) / f"{layer_key(staged, group)}.safetensors"
    meta_file = path.with_suffix(".json")
    if not (path.exists() and meta_file.exists()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
        if meta["group"] != group or path.stat().st_size != meta["nbytes"]:
            return None
        # Hashed once per (path, size, mtime, inode), as inputs are: a changed file is re-read.
        hashes = HashCache()
        digest = hashes.sha256(path)
        hashes.save()
        if digest != meta["sha256"]:
            return None
    except (OSError, ValueError, KeyError):
        return None
    return LayerResult(group, path, meta["sha256"], True, 0.0, meta["nbytes"])


def merge_layer(config: MergeConfig, staged: StagedPlan, group: str, cache: Path | None = None) -> LayerResult:
    """Returns the merged tensors of one layer group, from the cache or merged now and cached."""
    hit = cached_layer(staged, group, cache)
    if hit is not None:
        return hit
    if group not in staged.groups:
        raise MergeflowError(f"layer group {group!r} is not in the plan (known: {', '.join(staged.groups[:5])}, ...)")
    started = time.perf_counter()
    base, models = open_inputs(config)
    try:
        plan = plan_inputs(config, base, models)
        method = REGISTRY[config.merge_method]
        params = config.method_params()
        entries = config.fine_tunes()
        weights = torch.tensor([config.model_weight(e, params) for e in entries], dtype=torch.float64)
        densities = [config.model_density(e, params) for e in entries]
        source = TensorSource(base, models, resolve_device("cpu"))
        out: dict[str, torch.Tensor] = {}
        for t in plan.groups()[group]:
            merged = merge_tensor(t, source, method.merge, params, staged.stats, weights, densities, config.seed)
            out[t.name] = merged.to(output_dtype(config, t)).contiguous().clone()
    finally:
        close_inputs(base, models)
    path = layer_cache(cache) / f"{layer_key(staged, group)}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(out, str(tmp), metadata={"format": "pt", "group": group})
        digest = file_sha256(tmp)
        nbytes = tmp.stat().st_size
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    hashes = HashCache()
    hashes.remember(path, digest)
    hashes.save()
    meta = {"group": group, "sha256": digest, "nbytes": nbytes, "merge_key": staged.key}
    atomic_write(path.with_suffix(".json"), json.dumps(meta).encode())
    return LayerResult(group, path, digest, False, time.perf_counter() - started, nbytes)
