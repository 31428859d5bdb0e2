"""Returns a merge split into steps that a pipeline can run apart: plan, one step per layer group, assemble.

`run_merge` streams a whole model in one process. A pipeline instead runs one task per layer group
(possibly on other workers, possibly killed half way), so each layer's result is a file in a
content-addressed cache: its key is the sha256 of the method, its parameters, the model-wide
statistics, every input file's sha256 and the layer's tensor names. A re-run finds the layers that
finished and merges only the rest; `assemble` then packs the layer files into the same shards,
heads, side files and model card that `run_merge` writes, so both paths give identical folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import merging
from merging.config import MergeConfig, dump_config
from merging.engine.labels import model_labels
from merging.engine.memory import PeakMemory
from merging.engine.merge import MergeOptions, TensorSource, compute_stats, merge_tensor, resolve_device
from merging.engine.model_card import InputRecord
from merging.engine.output import MergeReport, finish_output, output_bytes, output_dtype
from merging.engine.plan import MergePlan, build_plan
from merging.errors import MergeflowError
from merging.io.checkpoint import Checkpoint, HashCache, cache_dir, file_sha256
from merging.io.writer import ShardedWriter, publish_folder, temporary_sibling
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


def _open(config: MergeConfig) -> tuple[Checkpoint, list[Checkpoint]]:
    labels = model_labels(config)
    base = Checkpoint(config.base_model, "base")
    return base, [Checkpoint(e.model, label) for e, label in zip(config.fine_tunes(), labels)]


def _close(base: Checkpoint, models: list[Checkpoint]) -> None:
    for ck in [base, *models]:
        ck.close()


def _plan(config: MergeConfig, base: Checkpoint, models: list[Checkpoint]) -> MergePlan:
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
    base, models = _open(config)
    try:
        plan = _plan(config, base, models)
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
            _atomic_write(stats_file, json.dumps(asdict(stats)).encode())
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
        _close(base, models)


def _atomic_write(path: Path, data: bytes) -> None:
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
    base, models = _open(config)
    try:
        plan = _plan(config, base, models)
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
        _close(base, models)
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
    _atomic_write(path.with_suffix(".json"), json.dumps(meta).encode())
    return LayerResult(group, path, digest, False, time.perf_counter() - started, nbytes)


def _folder_stamp(folder: Path) -> dict[str, Any]:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            files[p.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return {"out_dir": str(folder), "files": files}


def _output_fingerprint(
    config: MergeConfig, staged: StagedPlan, layers: list[LayerResult], options: MergeOptions
) -> str:
    """Returns a digest of everything an assembled folder depends on (the config's text included: it is in the card)."""
    payload = [dump_config(config), staged.key, sorted((r.group, r.sha256) for r in layers), options.out_shard_size]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def _still_assembled(record_file: Path, out_dir: Path, fingerprint: str) -> bool:
    """Returns whether `out_dir` is exactly what an earlier assemble of the same inputs wrote (by stat, as git does)."""
    try:
        record = json.loads(record_file.read_text())
        return bool(
            out_dir.is_dir()
            and record["fingerprint"] == fingerprint
            and record["out_dir"] == str(out_dir)
            and record["files"] == _folder_stamp(out_dir)["files"]
        )
    except (OSError, ValueError, KeyError):
        return False


def assemble(
    config: MergeConfig,
    staged: StagedPlan,
    layers: list[LayerResult],
    out_dir: str | Path,
    options: MergeOptions | None = None,
    cache: Path | None = None,
) -> MergeReport:
    """Returns the report of packing merged layer files into a model folder (published atomically).

    When the same inputs were assembled into `out_dir` before and nothing there changed since
    (sizes, mtimes, inodes), the folder is kept as it is and the report says `reused`.
    """
    options = options or MergeOptions(progress=False)
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not options.overwrite:
        raise MergeflowError(f"output folder {out_dir} already exists (pass overwrite to replace it)")
    by_group = {r.group: r for r in layers}
    missing = [g for g in staged.groups if g not in by_group]
    if missing:
        raise MergeflowError(f"cannot assemble: layer groups without a result: {', '.join(missing[:5])}")
    record_file = layer_cache(cache) / f"{staged.key}.assembled.json"
    fingerprint = _output_fingerprint(config, staged, layers, options)
    if _still_assembled(record_file, out_dir, fingerprint):
        return MergeReport(
            out_dir=out_dir,
            method=config.merge_method,
            tensors=0,
            seconds=0.0,
            bytes_read=0,
            bytes_written=0,
            peak_rss_bytes=0,
            peak_anon_bytes=0,
            stats=staged.stats,
            heads=staged.heads,
            inputs=list(staged.inputs),
            reused=True,
        )
    started = time.perf_counter()
    base, models = _open(config)
    tmp = temporary_sibling(out_dir)
    with PeakMemory() as memory:
        try:
            plan = _plan(config, base, models)
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            entries = [(t.name, output_dtype(config, t), t.shape) for t in plan.tensors]
            writer = ShardedWriter(tmp, entries, options.out_shard_size)
            aliases = plan.aliases()
            try:
                hashes = HashCache()
                for group, tensors in plan.groups().items():
                    result = by_group[group]
                    if hashes.sha256(result.path) != result.sha256:
                        raise MergeflowError(f"layer result {result.path} ({group}) changed since it was merged")
                    with safe_open(str(result.path), framework="pt") as fh:
                        for t in tensors:
                            tensor = fh.get_tensor(t.name)
                            writer.write(t.name, tensor)
                            for alias in aliases.get(t.name, []):
                                writer.write(alias, tensor)
                if writer.missing():
                    raise MergeflowError(f"internal error: tensors planned but not written: {writer.missing()[:5]}")
                writer.close()
            except BaseException:
                writer.abort()
                raise
            report = finish_output(
                config,
                plan,
                base,
                models,
                tmp,
                out_dir,
                staged.stats,
                list(staged.inputs),
                sum(r.nbytes for r in layers),
                writer.total_size,
            )
            publish_folder(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            _close(base, models)
    _atomic_write(record_file, json.dumps({"fingerprint": fingerprint, **_folder_stamp(out_dir)}).encode())
    report.seconds = time.perf_counter() - started
    report.peak_rss_bytes = memory.peak_rss_bytes
    report.peak_anon_bytes = memory.peak_anon_bytes
    return report


def staged_merge(config: MergeConfig, out_dir: str | Path, cache: Path | None = None) -> MergeReport:
    """Returns the report of a staged merge run in one process (what a pipeline does, without the pipeline)."""
    staged = plan_merge(config, cache, out_parent=Path(out_dir).resolve().parent)
    layers = [merge_layer(config, staged, g, cache) for g in staged.groups]
    return assemble(config, staged, layers, out_dir, MergeOptions(progress=False, overwrite=True), cache)
