"""Merge steps: plan (headers, input hashes, model-wide statistics), merge one layer group, assemble."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from merging.config import MergeConfig
from merging.engine.assemble import assemble
from merging.engine.merge import MergeOptions
from merging.engine.output import MergeReport
from merging.engine.staged import LayerResult, StagedPlan, merge_layer, plan_merge
from merging.errors import MergeflowError
from tasks.logs import run_logger

# Fault injection for the tests of interrupted runs: the named layer group fails as a killed worker would.
FAULT_ENV = "MERGEFLOW_FAULT_LAYER"


class InjectedFault(MergeflowError):
    """Raised in the layer group named by $MERGEFLOW_FAULT_LAYER."""


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(config: MergeConfig, cache: Path | None = None, out_parent: Path | None = None) -> StagedPlan:
    """Returns the staged plan (validates every header, and free space for `out_parent`, before any layer is merged)."""
    staged = plan_merge(config, cache, out_parent=out_parent)
    run_logger().info("plan: %d layer groups, merge key %s", len(staged.groups), staged.key[:16])
    return staged


@task(name="merge-layer", task_run_name="merge {group}", cache_policy=NO_CACHE)
def merge_layer_task(config: MergeConfig, staged: StagedPlan, group: str, cache: Path | None = None) -> LayerResult:
    """Returns one layer group's merged tensors (reused from the layer cache when they are already there)."""
    if os.environ.get(FAULT_ENV) == group:
        raise InjectedFault(f"injected fault in layer group {group!r} (${FAULT_ENV})")
    result = merge_layer(config, staged, group, cache)
    word = "reused" if result.reused else f"merged in {result.seconds:.2f} s"
    run_logger().info("%s: %s (%d bytes)", group, word, result.nbytes)
    return result


@task(name="assemble", cache_policy=NO_CACHE)
def assemble_task(
    config: MergeConfig, staged: StagedPlan, layers: list[LayerResult], out_dir: Path, out_shard_size: int | None = None
) -> MergeReport:
    """Returns the report of the assembled model folder (published atomically)."""
    options = MergeOptions(progress=False, overwrite=True)
    if out_shard_size:
        options.out_shard_size = out_shard_size
    report = assemble(config, staged, layers, out_dir, options)
    if report.reused:
        run_logger().info("assemble: %s already holds exactly this merge; kept as it is", out_dir)
    return report
