"""Returns the model-wide trim thresholds of large models from a sample and one exact pass instead of two exact passes.

The two-pass select (ModelThreshold: the high halves of every |tau| entry, then the low halves of the one bucket that
holds the k-th largest) reads every task vector twice. On a large model a 1/16 sample of the entries already says
which few buckets can hold the k-th largest, so one exact pass counts the low halves of that window of buckets, the
entries above it and the L1 sums, and the k-th largest and the trimmed L1 share follow exactly. Where the k-th
largest falls outside the window after all (a sample far off), that task's threshold is found by the two passes, so
the thresholds never depend on the sample, only the time does (tests/test_sampled_thresholds.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from merging.engine.blocks import name_non_finite, select_passes
from merging.engine.plan import TensorPlan
from merging.engine.source import TensorSource
from merging.methods.trim_stats import ModelThreshold

# The sample pays for itself from about this many task-vector entries per task (module-level so tests can lower it).
SAMPLED_MIN_ENTRIES = 1 << 24


def model_thresholds(
    source: TensorSource, tensors: Sequence[TensorPlan], densities: Sequence[float], progress: bool
) -> list[ModelThreshold]:
    """Returns one finished accumulator per task (result() gives its threshold and trimmed L1 share)."""
    accs = _sampled(source, tensors, densities, progress) or [ModelThreshold(d) for d in densities]
    todo = [None if acc.needs_pass2 or acc.density >= 1 else acc for acc in accs]  # those the sample did not settle
    select_passes(source, tensors, todo, progress)
    return accs


def _sampled(
    source: TensorSource, tensors: Sequence[TensorPlan], densities: Sequence[float], progress: bool
) -> list[ModelThreshold] | None:
    """Returns the accumulators after the sample and the window pass (those whose k-th largest fell outside the
    window come back fresh), or None where the sampled route does not apply: a small model, or a tensor the
    kernels cannot read as stored."""
    entries = sum(t.numel for t in tensors)
    if entries < SAMPLED_MIN_ENTRIES or all(d >= 1 for d in densities):
        return None
    accs = [ModelThreshold(d) for d in densities]
    for t in tqdm(tensors, desc="trim thresholds (sample)", disable=not progress, leave=False):
        stored = source.stored(t)
        if stored is None:
            return None
        for acc, ft in zip(accs, stored[1:]):
            if acc.density < 1 and acc.add_sample(stored[0], ft):
                name_non_finite(source, t)
    windowed = [acc.choose_window(entries) for acc in accs]
    if any(windowed):
        for t in tqdm(tensors, desc="trim thresholds (window)", disable=not progress, leave=False):
            stored = source.stored(t)
            assert stored is not None  # as in the sample pass
            for acc, ft, on in zip(accs, stored[1:], windowed):
                if on and acc.add_window(stored[0], ft):
                    name_non_finite(source, t)
    return [acc if on and acc.finish_window() else ModelThreshold(acc.density) for acc, on in zip(accs, windowed)]


def tensor_trimmed_l1(
    source: TensorSource, tensors: Sequence[TensorPlan], densities: Sequence[float], progress: bool
) -> tuple[float, ...]:
    """Returns each task's share of its task vector's L1 norm that per-tensor trimming removes (sigma with
    `trim_scope: tensor`), from each tensor's two histogram passes over the stored tensors (or its task vectors in row
    blocks), so no tensor's task vectors are formed whole."""
    kept, total = [0.0] * len(densities), [0.0] * len(densities)
    for t in tqdm(tensors, desc="trim statistics", disable=not progress, leave=False):
        accs = [ModelThreshold(d) if d < 1 else None for d in densities]
        if all(acc is None for acc in accs):
            break
        select_passes(source, [t], accs)
        for i, acc in enumerate(accs):
            if acc is not None and acc.needs_pass2:
                k, n = acc.trimmed_l1()
                kept[i] += k
                total[i] += n
    return tuple(1.0 - k / n if n > 0 else 0.0 for k, n in zip(kept, total))
