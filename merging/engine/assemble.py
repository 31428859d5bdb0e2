"""Returns a model folder packed from merged layer files: the last step of a staged merge (see staged.py).

`assemble` writes the same shards, heads, side files and model card that `run_merge` writes, so both
paths give identical folders; when the same inputs were assembled into the same folder before and
nothing there changed, the folder is kept. `staged_merge` runs plan, every layer and assemble in one
process (what the pipeline does, without the pipeline).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from safetensors import safe_open

from merging.config import MergeConfig, dump_config
from merging.engine.memory import PeakMemory
from merging.engine.merge import MergeOptions
from merging.engine.output import MergeReport, finish_output, output_dtype
from merging.engine.staged import (
    LayerResult,
    StagedPlan,
    atomic_write,
    close_inputs,
    layer_cache,
    merge_layer,
    open_inputs,
    plan_inputs,
    plan_merge,
)
from merging.errors import MergeflowError
from merging.io.checkpoint import HashCache
from merging.io.writer import ShardedWriter, publish_folder, temporary_sibling


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
    base, models = open_inputs(config)
    tmp = temporary_sibling(out_dir)
    with PeakMemory() as memory:
        try:
            plan = plan_inputs(config, base, models)
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
            close_inputs(base, models)
    atomic_write(record_file, json.dumps({"fingerprint": fingerprint, **_folder_stamp(out_dir)}).encode())
    report.seconds = time.perf_counter() - started
    report.peak_rss_bytes = memory.peak_rss_bytes
    report.peak_anon_bytes = memory.peak_anon_bytes
    return report


def staged_merge(config: MergeConfig, out_dir: str | Path, cache: Path | None = None) -> MergeReport:
    """Returns the report of a staged merge run in one process (what a pipeline does, without the pipeline)."""
    staged = plan_merge(config, cache, out_parent=Path(out_dir).resolve().parent)
    layers = [merge_layer(config, staged, g, cache) for g in staged.groups]
    return assemble(config, staged, layers, out_dir, MergeOptions(progress=False, overwrite=True), cache)
