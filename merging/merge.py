"""Returns a merged model folder: streams tensors one at a time from memory-mapped inputs.

Order of work: validate the config and every header (plan), run the model-wide statistics pass
when the method needs one, merge tensor by tensor into pre-laid-out shards in a temporary
folder, add heads, side files and the model card, then rename the folder into place. A failure
at any point removes the temporary folder, so no partial output is ever visible.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from merging.checkpoint import Checkpoint, HashCache
from merging.config import MergeConfig, dump_config
from merging.diskspace import check_free_space, planned_output_bytes
from merging.errors import ConfigError, MergeflowError, NonFiniteError
from merging.memory import PeakMemory
from merging.methods import REGISTRY
from merging.methods.base import MethodParams, ModelStats, StatsRequest, TensorInputs, tensor_seed
from merging.model_card import InputRecord, render_model_card
from merging.plan import BASE_HEAD, MergePlan, Role, TensorPlan, build_plan
from merging.trim import ModelThreshold, TensorTrimL1, chunks
from merging.writer import DEFAULT_SHARD_SIZE, ShardedWriter, publish_folder, temporary_sibling

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
SKIP_SIDE_FILES = {"README.md", ".gitattributes"}


@dataclass
class MergeOptions:
    device: str = "cpu"
    out_shard_size: int = DEFAULT_SHARD_SIZE
    seed: int | None = None
    progress: bool = True
    overwrite: bool = False


@dataclass
class MergeReport:
    """What a merge did: output, timing, bytes read, memory, and the statistics it used."""

    out_dir: Path
    method: str
    tensors: int
    seconds: float
    bytes_read: int
    bytes_written: int
    peak_rss_bytes: int
    peak_anon_bytes: int
    stats: ModelStats
    heads: dict[str, list[str]] = field(default_factory=dict)
    inputs: list[InputRecord] = field(default_factory=list)
    reused: bool = False  # a staged merge found this exact output already assembled


def resolve_device(device: str) -> torch.device:
    """Returns the torch device for `cpu`, `cuda` or `auto` (CUDA when present)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device: expected cpu, cuda or auto, got {device!r}")
    return torch.device(device)


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


class TensorSource:
    """Returns oriented compute-dtype base and task vectors for one planned tensor.

    Task vectors land in one grow-only buffer reused for every tensor: allocating a fresh
    (T, rows, cols) tensor each time costs a page fault per 4 KiB, which is most of a naive
    merge's time. A returned tensor is only valid until the next `load`.
    """

    def __init__(self, base: Checkpoint, models: list[Checkpoint], device: torch.device):
        self.base = base
        self.models = models
        self.device = device
        self.bytes_read = 0
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def compute_dtype(self, plan: TensorPlan) -> torch.dtype:
        return torch.float64 if plan.dtype == torch.float64 else torch.float32

    def buffer(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Returns a reusable flat buffer of at least `numel` elements."""
        buf = self._buffers.get((key, dtype))
        if buf is None or buf.numel() < numel:
            self._buffers.pop((key, dtype), None)
            buf = self._buffers[(key, dtype)] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel]

    def _orient(self, tensor: torch.Tensor, plan: TensorPlan) -> torch.Tensor:
        if plan.role == Role.POINT:
            return tensor.reshape(-1)
        if plan.transposed:
            return tensor.t()
        return tensor.reshape(plan.neuron_shape)

    def load(self, plan: TensorPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (base, deltas (T, ...)) oriented so rows are neurons, checked for NaN/Inf."""
        dtype = self.compute_dtype(plan)
        raw = self.base.tensor(plan.name)
        self.bytes_read += raw.numel() * raw.element_size()
        base = self._orient(raw, plan)
        if base.dtype != dtype or base.device != self.device:
            base = self.buffer("base", base.numel(), dtype).view(base.shape).copy_(base)
        if not torch.isfinite(base.sum()):
            _raise_non_finite(base, plan.name, f"base model ({self.base.path})")
        t = len(self.models)
        deltas = self.buffer("deltas", t * base.numel(), dtype).view(t, *base.shape)
        for i, (model, src) in enumerate(zip(self.models, plan.sources)):
            ft = model.tensor(src)
            self.bytes_read += ft.numel() * ft.element_size()
            torch.sub(self._orient(ft, plan).to(self.device), base, out=deltas[i])
        if deltas.numel() and not torch.isfinite(deltas.sum()):
            for i, model in enumerate(self.models):
                if not torch.isfinite(deltas[i]).all():
                    _raise_non_finite(deltas[i], plan.sources[i], f"model {model.label!r} ({model.path})")
        return base, deltas

    def unorient(self, tensor: torch.Tensor, plan: TensorPlan) -> torch.Tensor:
        if plan.role != Role.POINT and plan.transposed:
            tensor = tensor.t()
        return tensor.reshape(plan.shape)


def _raise_non_finite(tensor: torch.Tensor, name: str, where: str) -> None:
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise NonFiniteError(f"tensor {name!r} in {where} holds {bad} NaN/Inf values")


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
    ties: str = "index",
) -> ModelStats:
    """Returns model-wide trim thresholds and/or sigma_t, streaming the task vectors."""
    if request is None:
        return ModelStats()
    tensors = list(mergeable(plan))
    if request.model_thresholds:
        accs = [ModelThreshold(d) for d in densities]
        for t in tqdm(tensors, desc="trim thresholds (1/2)", disable=not progress, leave=False):
            _, deltas = source.load(t)
            for acc, delta in zip(accs, deltas):
                acc.add_pass1(delta)
        for acc in accs:
            acc.finish_pass1()
        if any(acc.needs_pass2 for acc in accs):
            for t in tqdm(tensors, desc="trim thresholds (2/2)", disable=not progress, leave=False):
                _, deltas = source.load(t)
                for acc, delta in zip(accs, deltas):
                    if acc.needs_pass2:
                        row = delta.reshape(-1)
                        for s, e in chunks(row.numel()):
                            acc.add_pass2(row[s:e].abs())
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


def output_dtype(config: MergeConfig, plan: TensorPlan) -> torch.dtype:
    """Returns the dtype a tensor is written in: out_dtype, else dtype, else the base's."""
    if not plan.dtype.is_floating_point:
        return plan.dtype
    name = config.out_dtype or config.dtype
    return TORCH_DTYPES[name] if name else plan.dtype


def check_output_folder(out_dir: Path, inputs: list[str], overwrite: bool) -> None:
    """Raises unless `out_dir` may be written: new, or (with overwrite) not an input, the cwd or home.

    Replacing `out_dir` deletes it: it must not be, contain or lie inside any input model, and
    must not be the current folder, the home folder, or a folder above either.
    """
    out = out_dir.resolve()
    if not out.exists():
        return
    if not overwrite:
        raise ConfigError(f"output folder {out} already exists (pass --overwrite to replace it)")
    if not out.is_dir():
        raise ConfigError(f"--overwrite: {out} is a file, not a merged model folder; refusing to replace it")
    protected = {"the current folder": Path.cwd().resolve(), "your home folder": Path.home().resolve()}
    for what, path in protected.items():
        if out == path or out in path.parents:
            raise ConfigError(f"--overwrite: refusing to delete {out}: it is {what} or holds it")
    for ref in inputs:
        if "://" in ref or ref.startswith(("models:/", "runs:/")):
            continue
        src = Path(ref).expanduser().resolve()
        if out == src or out in src.parents or src in out.parents:
            raise ConfigError(f"--overwrite: refusing to delete {out}: it is, holds or lies inside input {src}")


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
                config, plan, source, method.merge, params, stats, weights, densities, seed, tmp, options
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


def finish_output(
    config: MergeConfig,
    plan: MergePlan,
    base: Checkpoint,
    models: list[Checkpoint],
    folder: Path,
    out_dir: Path,
    stats: ModelStats,
    inputs: list[InputRecord],
    bytes_read: int,
    bytes_written: int,
) -> MergeReport:
    """Returns the report after writing what follows the weights: heads, side files, config and model card."""
    bytes_written += write_heads(plan, base, models, folder)
    copy_side_files(base, config, folder)
    (folder / "mergeflow_config.yml").write_text(dump_config(config))
    report = MergeReport(
        out_dir=out_dir,
        method=config.merge_method,
        tensors=len(plan.tensors),
        seconds=0.0,
        bytes_read=bytes_read,
        bytes_written=bytes_written,
        peak_rss_bytes=0,
        peak_anon_bytes=0,
        stats=stats,
        heads=plan.heads,
        inputs=inputs,
    )
    method = REGISTRY[config.merge_method]
    (folder / "README.md").write_text(render_model_card(config, method, config.method_params(), report))
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
) -> torch.Tensor:
    """Returns one merged tensor in the base's layout (non-float tensors are the base's)."""
    if not t.dtype.is_floating_point:
        return source.base.tensor(t.name)
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
    merge_fn: object,
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
                result = merge_tensor(t, source, merge_fn, params, stats, weights, densities, seed)
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


def write_heads(plan: MergePlan, base: Checkpoint, models: list[Checkpoint], folder: Path) -> int:
    """Writes each model's task-specific tensors, unmerged, to heads/<label>.safetensors (the base's: base)."""
    written = 0
    for model in [base, *models]:
        names = plan.heads.get(model.label)
        if not names:
            continue
        heads_dir = folder / "heads"
        heads_dir.mkdir(exist_ok=True)
        infos = [model.infos[n] for n in names]
        writer = ShardedWriter(heads_dir, [(i.name, i.dtype, i.shape) for i in infos], 1 << 62, prefix=model.label)
        for name in names:
            writer.write(name, model.tensor(name))
        writer.close()
        written += writer.total_size
    return written


def copy_side_files(base: Checkpoint, config: MergeConfig, folder: Path) -> None:
    """Copies the base's config.json and tokenizer files; records the output dtype in config.json."""
    for f in base.side_files():
        if f.name in SKIP_SIDE_FILES or f.name.startswith("."):
            continue
        shutil.copy2(f, folder / f.name)
    cfg = folder / "config.json"
    out_name = config.out_dtype or config.dtype
    if cfg.exists() and out_name:
        data = json.loads(cfg.read_text())
        for key in ("torch_dtype", "dtype"):
            if key in data:
                data[key] = out_name
        cfg.write_text(json.dumps(data, indent=2) + "\n")


def input_records(
    base: Checkpoint, models: list[Checkpoint], entries: list, hashes: dict[Path, Future[str]]
) -> list[InputRecord]:
    records = [InputRecord("base", str(base.path), {f.name: hashes[f].result() for f in base.files})]
    for model in models:
        records.append(InputRecord(model.label, str(model.path), {f.name: hashes[f].result() for f in model.files}))
    return records
