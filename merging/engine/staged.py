"""Returns a merge split into steps that a pipeline can run apart: plan, prepare the output, one step per layer
group, finalize.

`run_merge` streams a whole model in one process. A pipeline instead runs one task per layer group
(possibly on other workers, possibly killed half way), and writes the model once: `prepare_output`
creates the output's shards beside the output folder, in `.<name>.partial/model/`, with every header
written and the data space allocated (the plan fixes each tensor's name, dtype, shape and offset);
each layer task writes its merged tensors straight into their slots, flushes them and then records
the layer in the journal (`.<name>.partial/journal/`: the layer group, the sha256 of the bytes it
wrote, their size). A killed run leaves the partial folder; the next run with the same merge key
(the sha256 of the method, its parameters, every input file's sha256, ...) checks each journaled
layer's bytes against its sha256 and merges only the layers that are missing or do not match.
`finalize` (finalize.py) adds the heads, side files and model card, and renames the folder into
place, so the staged and the one-process merge give byte-identical folders.

The model-wide statistics and a record of each finished output (`<merge key>.stats.json`,
`<merge key>.assembled.json`) live in the cache's `layers/` folder; a re-run whose output folder is
still exactly what that record describes merges nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import merging
from merging.config import MergeConfig
from merging.engine.inplace import (
    create_partial,
    folder_stamp,
    journal_entry,
    journal_file,
    layout_record,
    output_entries,
    partial_dir,
    partial_matches,
)
from merging.engine.job import MergeJob
from merging.engine.labels import model_labels
from merging.engine.merge import TensorSource, compute_stats, merge_tensor, resolve_device
from merging.engine.model_card import InputRecord
from merging.engine.output import output_dtype
from merging.engine.plan import MergePlan, TensorPlan, build_plan
from merging.errors import ConfigError, MergeflowError
from merging.io.checkpoint import Checkpoint, HashCache, cache_dir
from merging.io.writer import DEFAULT_SHARD_SIZE, ShardedWriter
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
    out_dir: Path | None = None  # set by prepare_output: where the model is published
    shard_size: int = DEFAULT_SHARD_SIZE
    done: dict[str, str] = field(default_factory=dict)  # group -> sha256, when out_dir already holds this merge

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "groups": self.groups,
            "group_bytes": self.group_bytes,
            "inputs": [asdict(r) for r in self.inputs],
            "stats": asdict(self.stats),
            "heads": self.heads,
            "out_dir": str(self.out_dir) if self.out_dir else None,
            "shard_size": self.shard_size,
        }


@dataclass(frozen=True)
class LayerResult:
    """One merged layer group: its journal entry, the sha256 of the bytes it wrote, and whether it was reused."""

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
    """Returns the sha256 naming a merge's results: everything that changes a merged tensor, and nothing else
    (the device included: a GPU's reductions may round differently, so its layers never mix with a CPU's)."""
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
        "device": resolve_device(config.pipeline.device).type,
        "inputs": [[r.label, sorted(r.sha256.items())] for r in inputs],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_merge(config: MergeConfig, cache: Path | None = None, progress: bool = False) -> StagedPlan:
    """Returns the staged plan: headers checked, inputs hashed, model-wide statistics computed or reused."""
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
            source = TensorSource(base, models, resolve_device(config.pipeline.device))
            request = REGISTRY[config.merge_method].stats_request(params)
            stats = compute_stats(request, plan, source, densities, progress)
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


def output_record(cache: Path | None, key: str) -> Path:
    """Returns the file recording the finished output of a merge key: its folder, each layer's sha256, the stat of
    its shards and of every file, the fingerprint of what follows the weights."""
    return layer_cache(cache) / f"{key}.assembled.json"


def read_output_record(cache: Path | None, key: str, out_dir: Path, shard_size: int) -> dict[str, Any] | None:
    """Returns the record of this merge's output in `out_dir` when its shards are still the ones it wrote (by stat,
    as git does: size, mtime, inode), else None."""
    try:
        record = json.loads(output_record(cache, key).read_text())
        shards = record["shards"]
        if record["out_dir"] != str(out_dir) or record["shard_size"] != shard_size or not shards:
            return None
        current = folder_stamp(out_dir) if out_dir.is_dir() else {}
        if any(current.get(name) != stamp for name, stamp in shards.items()):
            return None
        record["layers"] = {str(g): str(d) for g, d in record["layers"].items()}
        return dict(record)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def prepare_output(
    config: MergeConfig,
    staged: StagedPlan,
    out_dir: str | Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    cache: Path | None = None,
) -> StagedPlan:
    """Returns the plan bound to `out_dir`, its partial folder ready for the layer tasks (hold `output_lock`).

    When `out_dir` already holds this merge's shards, untouched, nothing is prepared and every layer
    is `done` (finalize then keeps the folder, or rewrites only what follows the weights). Otherwise
    free space is checked (the model less what a killed run's journal already holds) and the partial
    folder is kept when its layout matches this plan, else created afresh."""
    from merging.io.diskspace import check_free_space, planned_output_bytes

    out = Path(out_dir).resolve()
    record = read_output_record(cache, staged.key, out, shard_size)
    if record is not None and set(record["layers"]) == set(staged.groups):
        return replace(staged, out_dir=out, shard_size=shard_size, done=record["layers"])
    base, models = open_inputs(config)
    try:
        plan = plan_inputs(config, base, models)
        entries = output_entries(config, plan)
        layout = layout_record(staged.key, entries, shard_size)
        part = partial_dir(out)
        kept = partial_matches(part, layout)
        written = sum(e["nbytes"] for g in staged.groups if kept and (e := journal_entry(part, g)) is not None)
        needed = planned_output_bytes(config, plan, base, models) - written
        check_free_space([(out.parent, needed, "the merged model")])
        if not kept:
            create_partial(out, layout, entries, shard_size)
    finally:
        close_inputs(base, models)
    return replace(staged, out_dir=out, shard_size=shard_size, done={})


def _group_slots(tensors: list[TensorPlan], aliases: dict[str, list[str]]) -> list[str]:
    """Returns the slots a layer group writes, in the order its digest covers them: each tensor, then its aliases."""
    return [name for t in tensors for name in (t.name, *aliases.get(t.name, []))]


_BUFFERS: dict[int, dict[tuple[str, torch.dtype, str], torch.Tensor]] = {}
_BUFFERS_LOCK = threading.Lock()


def _thread_buffers() -> dict[tuple[str, torch.dtype, str], torch.Tensor]:
    """Returns this thread's task-vector buffers, kept from one layer task to the next: a fresh allocation per task
    costs a page fault per 4 KiB of the largest tensor's (T, rows, cols)."""
    with _BUFFERS_LOCK:
        return _BUFFERS.setdefault(threading.get_ident(), {})


def release_buffers() -> None:
    """Drops every thread's kept buffers (once the layers are merged: the memory goes back before evaluation)."""
    with _BUFFERS_LOCK:
        _BUFFERS.clear()


def merge_layer(config: MergeConfig, staged: StagedPlan, group: str) -> LayerResult:
    """Returns one layer group's result: merged and written into the output's shards, then journaled; or reused
    when the journal already has it and the bytes in its slots still match."""
    if group not in staged.groups:
        raise MergeflowError(f"layer group {group!r} is not in the plan (known: {', '.join(staged.groups[:5])}, ...)")
    if group in staged.done:
        return LayerResult(group, Path(staged.out_dir or "."), staged.done[group], True, 0.0, 0)
    if staged.out_dir is None:
        raise MergeflowError("internal error: merge_layer needs a plan bound to its output (prepare_output)")
    started = time.perf_counter()
    part = partial_dir(staged.out_dir)
    journal = journal_file(part, group)
    base, models = open_inputs(config)
    try:
        plan = plan_inputs(config, base, models)
        try:
            writer = ShardedWriter.reopen(part / "model", output_entries(config, plan), staged.shard_size)
        except ConfigError as e:
            raise MergeflowError(f"the partial output {part} is not this merge's ({e}); run the merge again") from None
        try:
            tensors, aliases = plan.groups()[group], plan.aliases()
            entry = journal_entry(part, group)
            if entry is not None:
                check = hashlib.sha256()
                for name in _group_slots(tensors, aliases):
                    check.update(writer.read(name))
                if check.hexdigest() == entry["sha256"]:
                    return LayerResult(group, journal, entry["sha256"], True, 0.0, entry["nbytes"])
                journal.unlink(missing_ok=True)  # the bytes changed since: merged again below
            method = REGISTRY[config.merge_method]
            params = config.method_params()
            entries = config.fine_tunes()
            weights = torch.tensor([config.model_weight(e, params) for e in entries], dtype=torch.float64)
            densities = [config.model_density(e, params) for e in entries]
            source = TensorSource(base, models, resolve_device(config.pipeline.device), _thread_buffers())
            job = MergeJob(method, params, staged.stats, weights, densities, config.seed)
            digest = hashlib.sha256()
            nbytes = 0
            for t in tensors:
                merged = merge_tensor(t, source, job, output_dtype(config, t))
                for name in (t.name, *aliases.get(t.name, [])):
                    nbytes += writer.write(name, merged, digest)
                del merged
            writer.sync()  # the bytes are on disk before the journal says so
        finally:
            writer.abort()
    finally:
        close_inputs(base, models)
    entry = {"group": group, "sha256": digest.hexdigest(), "nbytes": nbytes, "merge_key": staged.key}
    atomic_write(journal, json.dumps(entry).encode())
    return LayerResult(group, journal, entry["sha256"], False, time.perf_counter() - started, nbytes)
