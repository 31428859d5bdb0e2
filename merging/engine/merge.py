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
from merging.errors import ConfigError, MergeflowError, NonFiniteError
from merging.io.checkpoint import Checkpoint, HashCache
from merging.io.diskspace import check_free_space, planned_output_bytes
from merging.io.writer import DEFAULT_SHARD_SIZE, ShardedWriter, publish_folder, temporary_sibling
from merging.methods import REGISTRY, MergeMethod
from merging.methods.base import FusedFn, MethodParams, ModelStats, StatsRequest, TensorInputs, tensor_seed
from merging.methods.trim_stats import ModelThreshold, TensorTrimL1


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


def _threshold_pass(
    source: TensorSource, t: TensorPlan, accs: list[ModelThreshold] | list[ModelThreshold | None], second: bool
) -> None:
    """Adds one tensor's task vectors to a pass of the model-wide thresholds: straight from the stored tensors when
    the kernels read them (the task vectors are never formed), else from TensorSource.load."""
    stored = source.stored(t)
    if stored is not None:
        for acc, ft in zip(accs, stored[1:]):
            if acc is not None and acc.add_difference(stored[0], ft, second):
                source.load(t)  # names the tensor and the model that are not finite
                raise MergeflowError(f"internal error: tensor {t.name!r} has non-finite task vectors")
        return
    _, deltas = source.load(t)
    for acc, delta in zip(accs, deltas):
        if acc is not None:
            if second:
                acc.add_pass2(delta)
            else:
                acc.add_pass1(delta)


def compute_stats(
    request: StatsRequest | None,
    plan: MergePlan,
    source: TensorSource,
    densities: list[float],
    progress: bool,
    ties: str = "index",
) -> ModelStats:
    """Returns model-wide trim thresholds and/or sigma_t, streaming the task vectors."""
    if request is None:
        return ModelStats()
    tensors = list(mergeable(plan))
    if request.model_thresholds:
        accs = [ModelThreshold(d) for d in densities]
        for t in tqdm(tensors, desc="trim thresholds (1/2)", disable=not progress, leave=False):
            _threshold_pass(source, t, accs, second=False)
        for acc in accs:
            acc.finish_pass1()
        if any(acc.needs_pass2 for acc in accs):
            for t in tqdm(tensors, desc="trim thresholds (2/2)", disable=not progress, leave=False):
                _threshold_pass(source, t, [a if a.needs_pass2 else None for a in accs], second=True)
        results = [acc.result() for acc in accs]
        return ModelStats(
            thresholds=tuple(r[0] for r in results),
            trimmed_l1_fraction=tuple(r[1] for r in results) if request.trimmed_l1 else None,
        )
    l1 = [TensorTrimL1(d, ties) for d in densities]
    for t in tqdm(tensors, desc="trim statistics", disable=not progress, leave=False):
        _, deltas = source.load(t)
        for l1_acc, delta in zip(l1, deltas):
            l1_acc.add(delta)
    return ModelStats(trimmed_l1_fraction=tuple(a.sigma() for a in l1))


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
                getattr(params, "trim_ties", "index"),
            )
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            bytes_written = _write_model(
                config, plan, source, method, params, stats, weights, densities, seed, tmp, options
            )
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


def merge_tensor(
    t: TensorPlan,
    source: TensorSource,
    merge_fn: object,
    params: MethodParams,
    stats: ModelStats,
    weights: torch.Tensor,
    densities: list[float],
    seed: int,
    fused: FusedFn | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Returns one merged tensor in the base's layout (non-float tensors are the base's).

    With the method's `fused` form and the tensor's output dtype, the CPU path first tries the fused form (same
    numbers, one pass over the stored inputs); its result is a buffer reused by the next call on `source`.
    """
    if not t.dtype.is_floating_point:
        return source.base.tensor(t.name)
    if fused is not None and out_dtype is not None and source.device.type == "cpu":
        done = source.fused(t, fused, params, weights, out_dtype)
        if done is not None:
            return done
    base, deltas = source.load(t)
    inputs = TensorInputs(
        name=t.name,
        role=t.role,
        base=base,
        deltas=deltas,
        weights=weights.to(device=deltas.device),
        densities=tuple(densities),
        seed=tensor_seed(seed, t.name),
    )
    merged = merge_fn(inputs, params, stats).to(base.dtype)  # type: ignore[operator]
    del deltas, inputs
    if merged.numel() and not torch.isfinite(merged.sum()):
        bad = int((~torch.isfinite(merged)).sum())
        raise NonFiniteError(
            f"tensor {t.name!r}: the merge produced {bad} NaN/Inf values (inputs are finite: "
            "check the method's parameters, e.g. lambda, weights, or a sum of weights of 0 with normalize)"
        )
    return source.unorient(merged.add_(base), t)  # the method's tensor is its own


def _write_model(
    config: MergeConfig,
    plan: MergePlan,
    source: TensorSource,
    method: MergeMethod,
    params: MethodParams,
    stats: ModelStats,
    weights: torch.Tensor,
    densities: list[float],
    seed: int,
    folder: Path,
    options: MergeOptions,
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
                result = merge_tensor(
                    t,
                    source,
                    method.merge,
                    params,
                    stats,
                    weights,
                    densities,
                    seed,
                    method.fused,
                    output_dtype(config, t),
                )
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
