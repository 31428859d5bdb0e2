"""Merge steps: plan (headers, input hashes, model-wide statistics), prepare the output, merge one layer group
into it, finalize."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from merging.config import MergeConfig
from merging.engine.finalize import finalize
from merging.engine.output import MergeReport
from merging.engine.staged import LayerResult, StagedPlan, merge_layer, plan_merge, prepare_output
from merging.errors import MergeflowError
from merging.io.writer import DEFAULT_SHARD_SIZE
from tasks.logs import run_logger

# Fault injection for the tests of interrupted runs: the named layer group fails as a killed worker would.
FAULT_ENV = "MERGEFLOW_FAULT_LAYER"


class InjectedFault(MergeflowError):
    """Raised in the layer group named by $MERGEFLOW_FAULT_LAYER."""


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(config: MergeConfig, cache: Path | None = None) -> StagedPlan:
    """Returns the staged plan (validates every header before any layer is merged)."""
    staged = plan_merge(config, cache)
    run_logger().info("plan: %d layer groups, merge key %s", len(staged.groups), staged.key[:16])
    return staged


@task(name="prepare-output", cache_policy=NO_CACHE)
def prepare_output_task(
    config: MergeConfig, staged: StagedPlan, out_dir: Path, shard_size: int = DEFAULT_SHARD_SIZE
) -> StagedPlan:
    """Returns the plan bound to `out_dir` (free space checked; the shards allocated, or a killed run's kept)."""
    bound = prepare_output(config, staged, out_dir, shard_size)
    if bound.done:
        run_logger().info("output: %s already holds exactly this merge; kept as it is", out_dir)
    return bound


@task(name="merge-layer", task_run_name="merge {group}", cache_policy=NO_CACHE)
def merge_layer_task(config: MergeConfig, staged: StagedPlan, group: str) -> LayerResult:
    """Returns one layer group's result: its tensors written into the output's shards (or found there already)."""
    if os.environ.get(FAULT_ENV) == group:
        raise InjectedFault(f"injected fault in layer group {group!r} (${FAULT_ENV})")
    result = merge_layer(config, staged, group)
    word = "reused" if result.reused else f"merged in {result.seconds:.2f} s"
    run_logger().info("%s: %s (%d bytes)", group, word, result.nbytes)
    return result


@task(name="finalize", cache_policy=NO_CACHE)
def finalize_task(config: MergeConfig, staged: StagedPlan, layers: list[LayerResult]) -> MergeReport:
    """Returns the report of the finished model folder (heads, side files and card added; renamed into place)."""
    return finalize(config, staged, layers)
