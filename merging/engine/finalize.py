"""Returns the model folder of a staged merge (see staged.py): its last step, and the whole staged merge in one
process.

`finalize` adds what follows the weights (the heads, the base's side files, the written config and
the model card, exactly what `run_merge` writes) to the partial folder the layer tasks wrote the
shards in, renames it into place and records it, so a re-run of the same merge into the same,
untouched folder merges nothing. `staged_merge` runs plan, prepare, every layer and finalize in one
process (what the pipeline does, without the pipeline).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from merging.config import MergeConfig
from merging.engine.inplace import (
    folder_stamp,
    journal_entry,
    output_entries,
    output_fingerprint,
    output_lock,
    partial_dir,
)
from merging.engine.memory import PeakMemory
from merging.engine.output import MergeReport, finish_output
from merging.engine.staged import (
    LayerResult,
    StagedPlan,
    atomic_write,
    close_inputs,
    merge_layer,
    open_inputs,
    output_record,
    plan_inputs,
    plan_merge,
    prepare_output,
    read_output_record,
    release_buffers,
)
from merging.errors import MergeflowError
from merging.io.writer import DEFAULT_SHARD_SIZE, ShardedWriter, publish_folder

INDEX = "model.safetensors.index.json"


def _reused_report(config: MergeConfig, staged: StagedPlan, out_dir: Path) -> MergeReport:
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


def _link_shards(out_dir: Path, folder: Path, shards: list[str]) -> None:
    """Puts the finished folder's shards into `folder` as hard links (no byte copied; the folder stays whole until
    the new one replaces it), or as copies where the file system has no hard links."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in shards:
        try:
            os.link(out_dir / name, folder / name)
        except OSError:
            shutil.copy2(out_dir / name, folder / name)


def finalize(
    config: MergeConfig, staged: StagedPlan, layers: list[LayerResult], cache: Path | None = None
) -> MergeReport:
    """Returns the report of the finished model folder: heads, side files and card added to the written shards,
    then renamed into place (replacing an older folder there). Every layer group must have a result whose
    journal entry records the same sha256.

    When every layer was `done` (the output already holds this merge's shards): the folder is kept
    when nothing in it changed and it was made from the same config text, else the shards are
    linked into a new folder and only what follows the weights is written again."""
    if staged.out_dir is None:
        raise MergeflowError("internal error: finalize needs a plan bound to its output (prepare_output)")
    release_buffers()  # the layer tasks are done: their kept buffers go
    out_dir = staged.out_dir
    by_group = {r.group: r for r in layers}
    missing = [g for g in staged.groups if g not in by_group]
    if missing:
        raise MergeflowError(f"cannot finish {out_dir}: layer groups without a result: {', '.join(missing[:5])}")
    digests = {g: by_group[g].sha256 for g in staged.groups}
    fingerprint = output_fingerprint(config, staged.key, digests, staged.shard_size)
    part = partial_dir(out_dir)
    folder = part / "model"
    if staged.done and digests == staged.done:
        record = read_output_record(cache, staged.key, out_dir, staged.shard_size)
        if record is None:
            raise MergeflowError(f"{out_dir} changed while this run was finishing it; run the merge again")
        if record["fingerprint"] == fingerprint and record["files"] == folder_stamp(out_dir):
            return _reused_report(config, staged, out_dir)
        _link_shards(out_dir, folder, list(record["shards"]))
    else:
        for group in staged.groups:
            entry = journal_entry(part, group)
            if entry is None or entry["sha256"] != digests[group]:
                raise MergeflowError(f"layer group {group} in {part} changed since it was merged (its journal differs)")
    started = time.perf_counter()
    base, models = open_inputs(config)
    with PeakMemory() as memory:
        try:
            plan = plan_inputs(config, base, models)
            # Checks the shards' sizes and headers; the index was written with them (or linked), the data flushed
            # by each layer: nothing to write here.
            writer = ShardedWriter.reopen(folder, output_entries(config, plan), staged.shard_size)
            writer.abort()
            shards = list(writer.filenames) + ([INDEX] if len(writer.filenames) > 1 else [])
            for leftover in folder.iterdir():  # what an interrupted finalize wrote: written again below
                if leftover.name not in shards:
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            report = finish_output(
                config,
                plan,
                base,
                models,
                folder,
                out_dir,
                staged.stats,
                list(staged.inputs),
                sum(r.nbytes for r in layers),
                writer.total_size,
            )
            publish_folder(folder, out_dir)
        finally:
            close_inputs(base, models)
    shutil.rmtree(part, ignore_errors=True)
    files = folder_stamp(out_dir)
    record = {
        "fingerprint": fingerprint,
        "out_dir": str(out_dir),
        "shard_size": staged.shard_size,
        "layers": digests,
        "shards": {name: files[name] for name in shards},
        "files": files,
    }
    atomic_write(output_record(cache, staged.key), json.dumps(record).encode())
    report.seconds = time.perf_counter() - started
    report.peak_rss_bytes = memory.peak_rss_bytes
    report.peak_anon_bytes = memory.peak_anon_bytes
    return report


def staged_merge(
    config: MergeConfig, out_dir: str | Path, cache: Path | None = None, shard_size: int = DEFAULT_SHARD_SIZE
) -> MergeReport:
    """Returns the report of a staged merge run in one process (what a pipeline does, without the pipeline)."""
    out = Path(out_dir).resolve()
    staged = plan_merge(config, cache)
    with output_lock(out):
        bound = prepare_output(config, staged, out, shard_size, cache)
        layers = [merge_layer(config, bound, g) for g in bound.groups]
        return finalize(config, bound, layers, cache)
