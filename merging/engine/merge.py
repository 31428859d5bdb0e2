"""Returns a merged model folder: streams tensors one at a time from memory-mapped inputs.

Order of work: validate the config and every header (plan), run the model-wide statistics pass
when the method needs one, merge tensor by tensor into pre-laid-out shards in a temporary
folder, add heads, side files and the model card, then rename the folder into place. A failure
at any point removes the temporary folder, so no partial output is ever visible.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from merging.config import MergeConfig
from merging.engine.blocks import blockable, merge_in_blocks, row_blocks
from merging.engine.job import MergeJob
from merging.engine.labels import model_labels
from merging.engine.memory import PeakMemory
from merging.engine.output import (
    MergeReport,
    check_output_folder,
    finish_output,
    input_records,
    output_dtype,
)
from merging.engine.plan import MergePlan, TensorPlan, build_plan
from merging.engine.source import TensorSource
from merging.engine.thresholds import model_thresholds, tensor_trimmed_l1
from merging.errors import ConfigError, MergeflowError
from merging.io.checkpoint import Checkpoint, HashCache
from merging.io.diskspace import check_free_space, planned_output_bytes
from merging.io.writer import DEFAULT_SHARD_SIZE, ShardedWriter, publish_folder, temporary_sibling
from merging.methods import REGISTRY
from merging.methods.base import MethodParams, ModelStats, StatsRequest


@dataclass
class MergeOptions:
    device: str = "cpu"
    out_shard_size: int = DEFAULT_SHARD_SIZE
    seed: int | None = None
    progress: bool = True
    overwrite: bool = False


def resolve_device(device: str) -> torch.device:
    """Returns the torch device for `cpu`, `cuda` or `auto` (CUDA when present)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device: expected cpu, cuda or auto, got {device!r}")
    return torch.device(device)


def mergeable(plan: MergePlan) -> Iterator[TensorPlan]:
    """Yields the tensors that are merged (floating point, not aliases)."""
    for t in plan.merged:
        if t.dtype.is_floating_point:
            yield t


def compute_stats(
    request: StatsRequest | None,
    plan: MergePlan,
    source: TensorSource,
    densities: list[float],
    progress: bool,
) -> ModelStats:
    """Returns model-wide trim thresholds and/or sigma_t, streaming the task vectors."""
    if request is None:
        return ModelStats()
    tensors = list(mergeable(plan))
    if request.model_thresholds:
        results = [acc.result() for acc in model_thresholds(source, tensors, densities, progress)]
        return ModelStats(
            thresholds=tuple(r[0] for r in results),
            trimmed_l1_fraction=tuple(r[1] for r in results) if request.trimmed_l1 else None,
        )
    return ModelStats(trimmed_l1_fraction=tensor_trimmed_l1(source, tensors, densities, progress))


def run_merge(config: MergeConfig, out_dir: str | Path, options: MergeOptions | None = None) -> MergeReport:
    """Returns the report of merging `config` into `out_dir` (written atomically)."""
    options = options or MergeOptions()
    config.require_static()
    out_dir = Path(out_dir).resolve()
    check_output_folder(out_dir, [config.base_model] + [e.model for e in config.fine_tunes()], options.overwrite)
    device = resolve_device(options.device)
    method = REGISTRY[config.merge_method]
    params: MethodParams = config.method_params()
    entries = config.fine_tunes()
    seed = config.seed if options.seed is None else options.seed
    labels = model_labels(config)
    started = time.perf_counter()

    base = Checkpoint(config.base_model, "base")
    models = [Checkpoint(e.model, label) for e, label in zip(entries, labels)]
    tmp = temporary_sibling(out_dir)
    with PeakMemory() as memory, ThreadPoolExecutor(max_workers=1) as hasher:
        try:
            plan = build_plan(base, models, config.task_specific, config.transposed, config.allow_dtype_mismatch)
            check_free_space([(out_dir.parent, planned_output_bytes(config, plan, base, models), "the merged model")])
            hash_cache = HashCache()
            hashes = {f: hasher.submit(hash_cache.sha256, f) for ck in [base, *models] for f in ck.files}
            weights = torch.tensor([config.model_weight(e, params) for e in entries], dtype=torch.float64)
            densities = [config.model_density(e, params) for e in entries]
            source = TensorSource(base, models, device)
            stats = compute_stats(
                method.stats_request(params),
                plan,
                source,
                densities,
                options.progress,
            )
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            job = MergeJob(method, params, stats, weights, densities, seed)
            bytes_written = _write_model(config, plan, source, job, tmp, options)
            inputs = input_records(base, models, entries, hashes)
            hash_cache.save()
            report = finish_output(
                config, plan, base, models, tmp, out_dir, stats, inputs, source.bytes_read, bytes_written
            )
            publish_folder(tmp, out_dir)
        except BaseException:
            hasher.shutdown(wait=False, cancel_futures=True)  # a failed merge need not finish hashing
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            base.close()
            for m in models:
                m.close()
    report.seconds = time.perf_counter() - started
    report.peak_rss_bytes = memory.peak_rss_bytes
    report.peak_anon_bytes = memory.peak_anon_bytes
    return report


def merge_tensor(t: TensorPlan, source: TensorSource, job: MergeJob, out_dtype: torch.dtype) -> torch.Tensor:
    """Returns one merged tensor in the base's layout (non-float tensors are the base's).

    The CPU path first tries the method's fused form (same numbers, one pass over the stored inputs). A large tensor
    is merged in blocks of rows when the method allows it (blocks.py), in `out_dtype`. Either result is a buffer
    reused by the next call on `source`.
    """
    if not t.dtype.is_floating_point:
        return source.base.tensor(t.name)
    if job.method.fused is not None and source.device.type == "cpu":
        done = source.fused(t, job.method.fused, job.params, job.weights, out_dtype)
        if done is not None:
            return done
    if source.device.type == "cpu" and blockable(job):  # the GPU path, never run yet, stays the referenced one
        blocks = row_blocks(t, len(source.models), source.compute_dtype(t).itemsize)
        if blocks is not None:
            return merge_in_blocks(t, blocks, source, job, out_dtype)
    base, deltas = source.load(t, prepare=job.prepare)
    return source.unorient(job.merged(t, base, deltas), t)


def _write_model(
    config: MergeConfig, plan: MergePlan, source: TensorSource, job: MergeJob, folder: Path, options: MergeOptions
) -> int:
    entries = [(t.name, output_dtype(config, t), t.shape) for t in plan.tensors]
    writer = ShardedWriter(folder, entries, options.out_shard_size)
    aliases = plan.aliases()
    try:
        total = sum(t.numel * t.dtype.itemsize for t in plan.merged)
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=f"merge ({config.merge_method})", disable=not options.progress
        ) as bar:
            for t in plan.merged:
                result = merge_tensor(t, source, job, output_dtype(config, t))
                writer.write(t.name, result)
                for alias in aliases.get(t.name, []):
                    writer.write(alias, result)
                bar.update(t.numel * t.dtype.itemsize)
        missing = writer.missing()
        if missing:
            raise MergeflowError(f"internal error: tensors planned but not written: {missing[:5]}")
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer.total_size
