"""Returns magnitude-trim masks: per tensor (exactly k kept) or by a whole-model threshold.

The whole-model threshold is the k-th largest |tau_t| over every entry of every merged tensor,
found without concatenating the model: non-negative float32 values order like their int32 bit
patterns, so pass 1 histograms the high 16 bits, pass 2 histograms the low 16 bits inside the
one bucket that holds the k-th value. Memory: two 65,536-bin histograms per task.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from merging.methods import kernels

HIGH_BINS = 1 << 15  # sign bit is 0 for |x|, so high halves are < 2**15
LOW_BINS = 1 << 16


def keep_count(density: float, numel: int) -> int:
    """Returns how many entries trimming keeps: max(1, int(density * numel)) (mergekit's rule)."""
    return max(1, int(density * numel))


def _bits(abs_values: torch.Tensor) -> torch.Tensor:
    return abs_values.reshape(-1).to(torch.float32).contiguous().view(torch.int32)


def _float_from_bits(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


def _locate(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Returns (bin holding the k-th largest entry, number of entries in higher bins)."""
    from_top = torch.flip(hist, [0]).cumsum(0)
    idx = int(torch.searchsorted(from_top, torch.tensor(k)))  # first cumulative count >= k
    return hist.numel() - 1 - idx, int(from_top[idx - 1]) if idx > 0 else 0


CHUNK = 1 << 20  # entries per chunk: temporaries stay small and in cache


def chunks(n: int, size: int = CHUNK) -> Iterator[tuple[int, int]]:
    """Yields [start, end) ranges covering n entries."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


@dataclass(frozen=True)
class TrimRule:
    """Which entries of one task vector trimming keeps.

    |x| > threshold are kept; of the entries equal to it, the first `keep_ties` in flat order
    (all of them when keep_ties < 0 or fewer are there). An explicit `mask` overrides both.
    """

    threshold: float
    keep_ties: int = -1
    mask: torch.Tensor | None = None

    @property
    def keeps_all(self) -> bool:
        return self.mask is None and self.threshold <= 0 and self.keep_ties < 0


KEEP_ALL = TrimRule(0.0)


def _abs_bits(flat: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """Returns the int32 bit patterns of |x| for a chunk (float32: the sign bit cleared, no abs pass)."""
    chunk = flat[s:e]
    if chunk.dtype == torch.float32:
        return chunk.view(torch.int32) & 0x7FFFFFFF
    return _bits(chunk.abs().to(torch.float32))


def _kernel_ready(flat: torch.Tensor) -> bool:
    return flat.dtype == torch.float32 and flat.is_contiguous() and kernels.available(flat)


def high_histogram(values: torch.Tensor) -> torch.Tensor:
    """Returns the counts of |x|'s high 16 bits (HIGH_BINS bins), streamed over chunks."""
    flat = values.reshape(-1)
    if _kernel_ready(flat):
        return kernels.abs_bit_histogram(flat, -1, HIGH_BINS)
    hist = torch.zeros(HIGH_BINS, dtype=torch.int64)
    for s, e in chunks(flat.numel()):
        hist += torch.bincount(_abs_bits(flat, s, e) >> 16, minlength=HIGH_BINS).cpu()
    return hist


def low_histogram(values: torch.Tensor, bucket: int) -> torch.Tensor:
    """Returns the counts of the low 16 bits of the |x| whose high 16 bits equal `bucket`."""
    flat = values.reshape(-1)
    if _kernel_ready(flat):
        return kernels.abs_bit_histogram(flat, bucket, LOW_BINS)
    hist = torch.zeros(LOW_BINS, dtype=torch.int64)
    for s, e in chunks(flat.numel()):
        bits = _abs_bits(flat, s, e)
        hist += torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=LOW_BINS).cpu()
    return hist


def kth_largest(values: torch.Tensor, k: int) -> tuple[float, int, int]:
    """Returns (k-th largest |value| as float32, entries above it, entries equal to it).

    Radix select on the bit patterns: exact, O(n), no full-size temporary, several times faster
    than torch.kthvalue on CPU (0.03 s for 32M entries on 2 cores with the fused kernel).
    """
    bucket, above = _locate(high_histogram(values), k)
    low_hist = low_histogram(values, bucket)
    low, above_low = _locate(low_hist, k - above)
    return _float_from_bits((bucket << 16) | low), above + above_low, int(low_hist[low])


def tensor_trim_rule(values: torch.Tensor, density: float, ties: str = "index") -> TrimRule:
    """Returns the rule keeping exactly k = max(1, int(density*n)) entries of largest |value|.

    When entries tie at the threshold and not all of them fit, `ties` decides which are kept:
    `index` keeps the lowest flat indices (fast, deterministic); `mergekit` keeps those
    `torch.argsort(|x|, descending=True)` puts first, mergekit's own rule, which reproduces its
    output bit for bit but costs a full sort, and large float tensors almost always have such ties.
    """
    n = values.numel()
    if density >= 1 or n == 0:
        return KEEP_ALL
    k = keep_count(density, n)
    flat = values.reshape(-1)
    # float32 needs no abs pass: the radix select reads |x| from the bit patterns with the sign bit cleared.
    threshold, greater, equal = kth_largest(flat if flat.dtype == torch.float32 else flat.abs().to(torch.float32), k)
    if greater + equal <= k:
        return TrimRule(threshold)
    if ties == "mergekit":
        mask = torch.zeros(n, dtype=torch.bool, device=values.device)
        mask[torch.argsort(flat.abs().to(torch.float32), descending=True)[:k]] = True
        return TrimRule(threshold, mask=mask)
    return TrimRule(threshold, keep_ties=k - greater)


def _keep(magnitude: torch.Tensor, rule: TrimRule, start: int, ties_seen: int) -> tuple[torch.Tensor, int]:
    """Returns (keep mask for float32 magnitudes at flat offset `start`, threshold ties seen so far)."""
    if rule.mask is not None:
        return rule.mask[start : start + magnitude.numel()], ties_seen
    if rule.keep_ties < 0:
        return magnitude >= rule.threshold, ties_seen
    tied = magnitude == rule.threshold
    keep = magnitude > rule.threshold
    n_tied = int(tied.sum())
    if n_tied:
        rank = torch.cumsum(tied, 0) + ties_seen
        keep |= tied & (rank <= rule.keep_ties)
    return keep, ties_seen + n_tied


def apply_trim_(row: torch.Tensor, rule: TrimRule, start: int = 0, ties_seen: int = 0) -> int:
    """Zeroes, in place, the entries of flat `row` (tensor entries start..) the rule drops.

    Returns the number of threshold ties seen so far, to pass to the next chunk.
    """
    if rule.keeps_all:
        return ties_seen
    keep, ties_seen = _keep(row.abs().to(torch.float32), rule, start, ties_seen)
    row.mul_(keep)
    return ties_seen


def threshold_form(row: torch.Tensor, rule: TrimRule) -> tuple[float, int]:
    """Returns (threshold, last kept tied index) expressing `rule` for a flat row without a mask.

    Entries with |x| > threshold are kept, and those equal to it up to that flat index. A rule
    with an explicit mask is applied to `row` in place first and then keeps everything.
    """
    n = row.numel()
    if rule.keeps_all:
        return 0.0, n
    if rule.mask is not None:
        row.mul_(rule.mask)
        return 0.0, n
    if rule.keep_ties < 0:
        return rule.threshold, n
    if rule.keep_ties == 0:
        return rule.threshold, -1
    # A block of a tensor's rows (engine/blocks.py) may hold fewer ties than it may keep: then it keeps them all.
    if kernels.available(row) and row.is_contiguous():
        last = kernels.nth_equal(row, rule.threshold, rule.keep_ties)
        return rule.threshold, n if last < 0 else last
    tied = torch.nonzero(row.abs().to(torch.float32) == rule.threshold).reshape(-1)
    return rule.threshold, int(tied[rule.keep_ties - 1]) if tied.numel() >= rule.keep_ties else n


def topk_mask(values: torch.Tensor, density: float, ties: str = "index") -> torch.Tensor:
    """Returns a bool mask keeping k = max(1, int(density*n)) entries of largest |value| (see tensor_trim_rule)."""
    rule = tensor_trim_rule(values, density, ties)
    if rule.keeps_all:
        return torch.ones(values.shape, dtype=torch.bool, device=values.device)
    keep, _ = _keep(values.reshape(-1).abs().to(torch.float32), rule, 0, 0)
    return keep.reshape(values.shape)


def trim_rules(
    deltas: torch.Tensor,
    densities: tuple[float, ...],
    thresholds: tuple[float, ...] | None,
    ties: str = "index",
    given: tuple[TrimRule, ...] | None = None,
) -> list[TrimRule]:
    """Returns each task's trim rule: the model-wide threshold, the `given` rules (a block of a tensor's rows, see
    engine/blocks.py), or a per-tensor top-k."""
    if given is not None:
        return list(given)
    if thresholds is not None:
        return [TrimRule(thr) if thr > 0 else KEEP_ALL for thr in thresholds]
    return [tensor_trim_rule(deltas[t], d, ties) for t, d in enumerate(densities)]


def trim_(
    deltas: torch.Tensor,
    densities: tuple[float, ...],
    thresholds: tuple[float, ...] | None,
    ties: str = "index",
    given: tuple[TrimRule, ...] | None = None,
) -> torch.Tensor:
    """Returns `deltas` (T, ...) trimmed in place, per tensor, by model-wide thresholds or by `given` rules."""
    for t, rule in enumerate(trim_rules(deltas, densities, thresholds, ties, given)):
        trim_row_(deltas[t], rule)
    return deltas


def trim_row_(values: torch.Tensor, rule: TrimRule) -> None:
    """Zeroes, in place, the entries of one task vector the rule drops, a chunk at a time."""
    row = values.reshape(-1)
    seen = 0
    for s, e in chunks(row.numel()):
        seen = apply_trim_(row[s:e], rule, s, seen)
