"""Returns magnitude-trim masks: per tensor (exactly k kept) or by a whole-model threshold.

The whole-model threshold is the k-th largest |tau_t| over every entry of every merged tensor,
found without concatenating the model: non-negative float32 values order like their int32 bit
patterns, so pass 1 histograms the high 16 bits, pass 2 histograms the low 16 bits inside the
one bucket that holds the k-th value. Memory: two 65,536-bin histograms per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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


def kth_largest(abs_values: torch.Tensor, k: int) -> tuple[float, int]:
    """Returns (k-th largest value of a non-negative float32 tensor, how many entries are >= it).

    Radix select on the bit patterns: O(n), about 30x faster than torch.kthvalue on CPU.
    """
    bits = _bits(abs_values)
    high = bits >> 16
    bucket, above = _locate(torch.bincount(high, minlength=HIGH_BINS), k)
    low_hist = torch.bincount(bits[high == bucket] & 0xFFFF, minlength=LOW_BINS)
    low, above_low = _locate(low_hist, k - above)
    return _float_from_bits((bucket << 16) | low), above + above_low + int(low_hist[low])


def topk_mask(values: torch.Tensor, density: float) -> torch.Tensor:
    """Returns a bool mask keeping exactly k = max(1, int(density*n)) entries of largest |value|.

    The threshold comes from a radix select. When entries tie at the threshold and not all of
    them fit, the kept ones are those `torch.argsort(|x|, descending=True)` puts first, which
    is mergekit's rule, so outputs match mergekit's; this full sort only runs in that case.
    """
    flat = values.reshape(-1).abs().to(torch.float32)
    n = flat.numel()
    if density >= 1 or n == 0:
        return torch.ones(values.shape, dtype=torch.bool, device=values.device)
    k = keep_count(density, n)
    threshold, at_least = kth_largest(flat.cpu(), k)
    mask = flat >= threshold
    if at_least > k:  # more entries tie at the threshold than fit
        mask = torch.zeros(n, dtype=torch.bool, device=values.device)
        mask[torch.argsort(flat, descending=True)[:k]] = True
    return mask.reshape(values.shape)


def threshold_mask(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """Returns a bool mask keeping entries with |value| >= threshold (compared in float32)."""
    return values.abs().to(torch.float32) >= threshold


def trim_(deltas: torch.Tensor, densities: tuple[float, ...], thresholds: tuple[float, ...] | None) -> torch.Tensor:
    """Returns `deltas` (T, ...) trimmed in place, per tensor or by model-wide thresholds."""
    for t in range(deltas.shape[0]):
        if thresholds is not None:
            if thresholds[t] > 0:
                deltas[t].mul_(threshold_mask(deltas[t], thresholds[t]))
        elif densities[t] < 1:
            deltas[t].mul_(topk_mask(deltas[t], densities[t]))
    return deltas


@dataclass
class ModelThreshold:
    """Streams |tau_t| entries of one task twice and returns the exact k-th largest value.

    Also returns the fraction of the L1 norm that trimming at that threshold removes.
    """

    density: float
    numel: int = 0
    high_hist: torch.Tensor = field(default_factory=lambda: torch.zeros(HIGH_BINS, dtype=torch.int64))
    low_hist: torch.Tensor = field(default_factory=lambda: torch.zeros(LOW_BINS, dtype=torch.int64))
    low_l1: torch.Tensor = field(default_factory=lambda: torch.zeros(LOW_BINS, dtype=torch.float64))
    bucket: int = -1
    above_count: int = 0
    above_l1: float = 0.0
    total_l1: float = 0.0

    def add_pass1(self, abs_values: torch.Tensor) -> None:
        bits = _bits(abs_values)
        self.numel += bits.numel()
        self.high_hist += torch.bincount(bits >> 16, minlength=HIGH_BINS)

    def finish_pass1(self) -> None:
        """Finds the high-half bucket that holds the k-th largest value."""
        if self.density >= 1 or self.numel == 0:
            return
        self.bucket, self.above_count = _locate(self.high_hist, keep_count(self.density, self.numel))

    @property
    def needs_pass2(self) -> bool:
        return self.bucket >= 0

    def add_pass2(self, abs_values: torch.Tensor) -> None:
        values = abs_values.reshape(-1).to(torch.float32)
        bits = values.contiguous().view(torch.int32)
        high = bits >> 16
        self.total_l1 += float(values.sum(dtype=torch.float64))
        self.above_l1 += float(torch.where(high > self.bucket, values, 0.0).sum(dtype=torch.float64))
        in_bucket = high == self.bucket
        low = bits[in_bucket] & 0xFFFF
        self.low_hist += torch.bincount(low, minlength=LOW_BINS)
        self.low_l1 += torch.bincount(low, weights=values[in_bucket].double(), minlength=LOW_BINS)

    def result(self) -> tuple[float, float]:
        """Returns (threshold, sigma): keep |tau| >= threshold; sigma = share of L1 removed."""
        if not self.needs_pass2:
            return 0.0, 0.0
        low, _ = _locate(self.low_hist, keep_count(self.density, self.numel) - self.above_count)
        threshold = _float_from_bits((self.bucket << 16) | low)
        kept_l1 = self.above_l1 + float(self.low_l1[low:].sum())
        sigma = 1.0 - kept_l1 / self.total_l1 if self.total_l1 > 0 else 0.0
        return threshold, min(max(sigma, 0.0), 1.0)


@dataclass
class TensorTrimL1:
    """Accumulates the L1 norm that per-tensor trimming removes from one task vector."""

    density: float
    total_l1: float = 0.0
    kept_l1: float = 0.0

    def add(self, delta: torch.Tensor) -> None:
        abs_values = delta.abs().to(torch.float64)
        total = float(abs_values.sum())
        self.total_l1 += total
        if self.density >= 1:
            self.kept_l1 += total
        else:
            self.kept_l1 += float(abs_values[topk_mask(delta, self.density)].sum())

    def sigma(self) -> float:
        return 1.0 - self.kept_l1 / self.total_l1 if self.total_l1 > 0 else 0.0
