"""What a merge writes besides the merged tensors, and what it reports: the output folder's checks, each
tensor's output dtype, the heads, the base's side files, the written config and the model card."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merging.config import MergeConfig, dump_config
from merging.engine.model_card import InputRecord, render_model_card
from merging.engine.plan import MergePlan, TensorPlan
from merging.errors import ConfigError
from merging.io.checkpoint import Checkpoint
from merging.io.writer import ShardedWriter
from merging.methods import REGISTRY
from merging.methods.base import ModelStats

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
SKIP_SIDE_FILES = {"README.md", ".gitattributes"}


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
    reused: bool = False  # a staged merge found this exact output already finished


def output_dtype(config: MergeConfig, plan: TensorPlan) -> torch.dtype:
    """Returns the dtype a tensor is written in: out_dtype, else dtype, else the base's."""
    if not plan.dtype.is_floating_point:
        return plan.dtype
    name = config.out_dtype or config.dtype
    return TORCH_DTYPES[name] if name else plan.dtype


def output_bytes(config: MergeConfig, tensors: Iterable[TensorPlan]) -> int:
    """Returns the bytes the tensors take once written in their output dtypes."""
    return sum(t.numel * output_dtype(config, t).itemsize for t in tensors)


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
