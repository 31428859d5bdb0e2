"""Merges a large tensor a block of rows (neurons) at a time, so its working set is one block's task vectors instead
of T compute-dtype copies of the whole tensor (at 1B in bfloat16 the 262 MB embedding's four float32 task vectors
alone took 1 GB).

On the CPU only: a GPU merges whole tensors, as before. Rows are independent for the methods that register
`row_blocks`: Task Arithmetic and the disjoint mean work entry by entry, NeuroMerging neuron by neuron, and what they
share across rows is either model-wide (the statistics pass) or a per-tensor trim rule, which is found here first
from the whole tensor's histograms (two passes over the stored tensors, the task vectors never formed) and then
applied block by block with the threshold ties counted in flat order, so the kept entries are exactly those of the
whole-tensor rule. The result equals the whole-tensor merge bit for bit (tests/test_blocks.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from tqdm import tqdm

from merging.engine.job import MergeJob
from merging.engine.plan import Role, TensorPlan
from merging.engine.source import TensorSource
from merging.errors import MergeflowError
from merging.methods.base import TrimParams
from merging.methods.trim import TrimRule
from merging.methods.trim_stats import ModelThreshold

# Tensors whose task vectors (all T, in the compute dtype) take more than this are merged in blocks of rows whose
# task vectors take about BLOCK_BYTES. Module-level so tests can make small tensors take the blocked path.
MIN_BLOCKED_BYTES = 256 << 20
BLOCK_BYTES = 64 << 20


def row_blocks(t: TensorPlan, tasks: int, itemsize: int) -> list[tuple[int, int]] | None:
    """Returns the [start, end) row ranges to merge `t` in, or None when it is merged whole (small, or 1-D)."""
    if t.role == Role.POINT or tasks == 0 or t.numel == 0:
        return None
    if tasks * t.numel * itemsize <= MIN_BLOCKED_BYTES:
        return None
    rows, cols = t.neuron_shape
    per = max(1, BLOCK_BYTES // (tasks * cols * itemsize))
    if per >= rows:
        return None
    return [(r, min(rows, r + per)) for r in range(0, rows, per)]


def threshold_pass(source: TensorSource, t: TensorPlan, accs: Sequence[ModelThreshold | None], second: bool) -> None:
    """Adds one tensor's task vectors to a pass of trim-threshold accumulators: straight from the stored tensors when
    the kernels read them (the task vectors are never formed), else from TensorSource.load, in row blocks when the
    tensor is large."""
    stored = source.stored(t)
    if stored is not None:
        for acc, ft in zip(accs, stored[1:]):
            if acc is not None and acc.add_difference(stored[0], ft, second):
                name_non_finite(source, t)
        return
    for rows in _blocks_or_whole(source, t):
        _, deltas = source.load(t, rows)
        for acc, delta in zip(accs, deltas):
            if acc is not None:
                if second:
                    acc.add_pass2(delta)
                else:
                    acc.add_pass1(delta)


def name_non_finite(source: TensorSource, t: TensorPlan) -> None:
    """Raises the error that names the model whose task vector of `t` is not finite (a kernel counted one)."""
    for rows in _blocks_or_whole(source, t):
        source.load(t, rows)  # names the tensor and the model that are not finite
    raise MergeflowError(f"internal error: tensor {t.name!r} has non-finite task vectors")


def _blocks_or_whole(source: TensorSource, t: TensorPlan) -> Iterator[tuple[int, int] | None]:
    if source.device.type != "cpu":
        yield None
        return
    blocks = row_blocks(t, len(source.models), source.compute_dtype(t).itemsize)
    yield from blocks if blocks is not None else [None]


def select_passes(
    source: TensorSource,
    tensors: Sequence[TensorPlan],
    accs: Sequence[ModelThreshold | None],
    progress: bool = False,
) -> None:
    """Runs the two-pass select of the accumulators that are not None over `tensors`: the high halves, then the low
    halves of the bucket holding each one's k-th largest entry."""
    if all(acc is None for acc in accs):
        return
    for t in tqdm(tensors, desc="trim thresholds (1/2)", disable=not progress, leave=False):
        threshold_pass(source, t, accs, second=False)
    for acc in accs:
        if acc is not None:
            acc.finish_pass1()
    second = [acc if acc is not None and acc.needs_pass2 else None for acc in accs]
    if any(acc is not None for acc in second):
        for t in tqdm(tensors, desc="trim thresholds (2/2)", disable=not progress, leave=False):
            threshold_pass(source, t, second, second=True)


def tensor_trim_rules(source: TensorSource, t: TensorPlan, densities: Sequence[float]) -> list[TrimRule]:
    """Returns each task's per-tensor trim rule (tensor_trim_rule with ties kept by lowest index), from two histogram
    passes over the tensor instead of its formed task vectors."""
    accs = [ModelThreshold(d) for d in densities]
    select_passes(source, [t], accs)
    return [acc.tensor_rule() for acc in accs]


def blockable(job: MergeJob) -> bool:
    """Returns whether the method's merge of a block of rows is that block of its whole-tensor merge."""
    if not job.method.row_blocks:
        return False
    # mergekit's tie order comes from an argsort of the whole tensor; the index order is counted block by block.
    params = job.params
    return not (isinstance(params, TrimParams) and job.stats.thresholds is None and params.trim_ties == "mergekit")


def merge_in_blocks(
    t: TensorPlan, blocks: list[tuple[int, int]], source: TensorSource, job: MergeJob, out_dtype: torch.dtype
) -> torch.Tensor:
    """Returns the merged tensor (base included) in `out_dtype` and the stored layout, merged block by block into a
    buffer reused by the next call on `source`."""
    rules: list[TrimRule] | None = None
    if isinstance(job.params, TrimParams) and job.stats.thresholds is None:
        rules = tensor_trim_rules(source, t, job.densities)
    ties_seen = [0] * len(job.densities)
    out = source.buffer("blocked", t.numel, out_dtype).view(t.shape)
    rows_of_out = source.orient(out, t)
    for r0, r1 in blocks:
        base, deltas = source.load(t, (r0, r1), job.prepare)
        block_rules = None if rules is None else _block_rules(rules, deltas, ties_seen)
        rows_of_out[r0:r1].copy_(job.merged(t, base, deltas, block_rules, f" (rows {r0}..{r1 - 1})"))
    return out


def _block_rules(rules: list[TrimRule], deltas: torch.Tensor, ties_seen: list[int]) -> tuple[TrimRule, ...]:
    """Returns the rules for one block of rows: the whole-tensor rules, with the ties at a threshold that only the
    first `keep_ties` (in flat order) may pass counted across the blocks before this one. Updates `ties_seen`."""
    out = []
    for i, rule in enumerate(rules):
        if rule.keep_ties < 0 or rule.mask is not None:
            out.append(rule)
            continue
        left = max(0, rule.keep_ties - ties_seen[i])
        ties_seen[i] += int(torch.count_nonzero(deltas[i].abs().to(torch.float32) == rule.threshold))
        out.append(TrimRule(rule.threshold, keep_ties=left))
    return tuple(out)
