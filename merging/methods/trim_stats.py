"""Returns the streaming statistics of trimming over a whole model: the exact whole-model threshold (two passes of
radix histograms, one task at a time) and the share of the L1 norm per-tensor trimming removes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from merging.methods import kernels, stored_kernels
from merging.methods.trim import (
    HIGH_BINS,
    KEEP_ALL,
    LOW_BINS,
    TrimRule,
    _float_from_bits,
    _keep,
    _kernel_ready,
    _locate,
    chunks,
    high_histogram,
    keep_count,
    tensor_trim_rule,
)


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
    # The fused kernel's second pass sums per fixed part, folded in part order by result().
    part_low_hist: np.ndarray | None = None
    part_low_l1: np.ndarray | None = None
    part_total_l1: np.ndarray | None = None
    part_above_l1: np.ndarray | None = None

    part_high: np.ndarray | None = None

    def add_pass1(self, values: torch.Tensor) -> None:
        self.numel += values.numel()
        self.high_hist += high_histogram(values)

    def add_difference(self, base: torch.Tensor, ft: torch.Tensor, second: bool) -> int:
        """Adds the task vector ft - base to the first pass (or the `second`) without forming it; `base` and `ft`
        are stored tensors from stored_kernels.stored_flat. Returns how many of its entries are not finite (the caller
        stops: the sums are then not promised)."""
        if second:
            self._pass2_parts()
            assert self.part_low_hist is not None and self.part_low_l1 is not None
            assert self.part_total_l1 is not None and self.part_above_l1 is not None
            return stored_kernels.difference_stats(
                base,
                ft,
                self.bucket,
                np.zeros((1, 1), dtype=np.int64),  # the high halves: not read by the second pass
                self.part_low_hist,
                self.part_low_l1,
                self.part_total_l1,
                self.part_above_l1,
            )
        if self.part_high is None:
            self.part_high = np.zeros((kernels.PASS2_PARTS, HIGH_BINS), dtype=np.int64)
        self.numel += base.numel()
        sums = np.zeros(kernels.PASS2_PARTS, dtype=np.float64)  # the second pass's: added to, never read
        empty_hist = np.zeros((1, 1), dtype=np.int64)
        return stored_kernels.difference_stats(
            base, ft, -1, self.part_high, empty_hist, np.zeros((1, 1), dtype=np.float64), sums, sums
        )

    def _pass2_parts(self) -> None:
        """Allocates the second pass's per-part sums (folded in part order by result())."""
        if self.part_total_l1 is None:
            parts = kernels.PASS2_PARTS
            self.part_low_hist = np.zeros((parts, LOW_BINS), dtype=np.int64)
            self.part_low_l1 = np.zeros((parts, LOW_BINS), dtype=np.float64)
            self.part_total_l1 = np.zeros(parts, dtype=np.float64)
            self.part_above_l1 = np.zeros(parts, dtype=np.float64)

    def finish_pass1(self) -> None:
        """Finds the high-half bucket that holds the k-th largest value."""
        if self.part_high is not None:
            self.high_hist += torch.from_numpy(self.part_high.sum(axis=0))
            self.part_high = None
        if self.density >= 1 or self.numel == 0:
            return
        self.bucket, self.above_count = _locate(self.high_hist, keep_count(self.density, self.numel))

    @property
    def needs_pass2(self) -> bool:
        return self.bucket >= 0

    def add_pass2(self, values: torch.Tensor) -> None:
        """Adds one task vector's entries (any sign) to the second pass."""
        flat = values.reshape(-1)
        if _kernel_ready(flat):
            self._pass2_parts()
            assert self.part_low_hist is not None
            assert self.part_low_l1 is not None and self.part_total_l1 is not None and self.part_above_l1 is not None
            kernels.threshold_pass2(
                flat, self.bucket, self.part_low_hist, self.part_low_l1, self.part_total_l1, self.part_above_l1
            )
            return
        for s, e in chunks(flat.numel()):
            self._add_pass2_chunk(flat[s:e].abs())

    def _add_pass2_chunk(self, abs_values: torch.Tensor) -> None:
        values = abs_values.reshape(-1).to(torch.float32)
        bits = values.contiguous().view(torch.int32)
        high = bits >> 16
        self.total_l1 += float(values.sum(dtype=torch.float64))
        self.above_l1 += float(torch.where(high > self.bucket, values, 0.0).sum(dtype=torch.float64))
        in_bucket = high == self.bucket
        low = bits[in_bucket] & 0xFFFF
        self.low_hist += torch.bincount(low, minlength=LOW_BINS).cpu()  # the sums live on the CPU
        self.low_l1 += torch.bincount(low, weights=values[in_bucket].double(), minlength=LOW_BINS).cpu()

    def _fold_parts(self) -> None:
        """Adds the kernel's per-part sums (in part order) into the totals."""
        if self.part_low_hist is None:
            return
        assert self.part_low_l1 is not None and self.part_total_l1 is not None and self.part_above_l1 is not None
        self.low_hist += torch.from_numpy(self.part_low_hist.sum(axis=0))
        self.low_l1 += torch.from_numpy(self.part_low_l1.sum(axis=0))
        self.total_l1 += float(self.part_total_l1.sum())
        self.above_l1 += float(self.part_above_l1.sum())
        self.part_low_hist = self.part_low_l1 = self.part_total_l1 = self.part_above_l1 = None

    def tensor_rule(self) -> TrimRule:
        """Returns, when the passes saw one tensor, the rule tensor_trim_rule(values, density, "index") gives: keep
        exactly max(1, int(density * n)) entries, ties at the threshold by lowest flat index."""
        if not self.needs_pass2:
            return KEEP_ALL
        self._fold_parts()
        k = keep_count(self.density, self.numel)
        low, above_low = _locate(self.low_hist, k - self.above_count)
        threshold = _float_from_bits((self.bucket << 16) | low)
        greater = self.above_count + above_low
        if greater + int(self.low_hist[low]) <= k:
            return TrimRule(threshold)
        return TrimRule(threshold, keep_ties=k - greater)

    def result(self) -> tuple[float, float]:
        """Returns (threshold, sigma): keep |tau| >= threshold; sigma = share of L1 removed."""
        if not self.needs_pass2:
            return 0.0, 0.0
        self._fold_parts()
        low, _ = _locate(self.low_hist, keep_count(self.density, self.numel) - self.above_count)
        threshold = _float_from_bits((self.bucket << 16) | low)
        kept_l1 = self.above_l1 + float(self.low_l1[low:].sum())
        sigma = 1.0 - kept_l1 / self.total_l1 if self.total_l1 > 0 else 0.0
        return threshold, min(max(sigma, 0.0), 1.0)


@dataclass
class TensorTrimL1:
    """Accumulates the L1 norm that per-tensor trimming removes from one task vector."""

    density: float
    ties: str = "index"
    total_l1: float = 0.0
    kept_l1: float = 0.0

    def add(self, delta: torch.Tensor) -> None:
        rule = tensor_trim_rule(delta, self.density, self.ties)
        flat = delta.reshape(-1)
        seen = 0
        for s, e in chunks(flat.numel()):
            magnitude = flat[s:e].abs().to(torch.float32)
            self.total_l1 += float(magnitude.sum(dtype=torch.float64))
            if rule.keeps_all:
                self.kept_l1 += float(magnitude.sum(dtype=torch.float64))
            else:
                keep, seen = _keep(magnitude, rule, s, seen)
                self.kept_l1 += float((magnitude * keep).sum(dtype=torch.float64))

    def sigma(self) -> float:
        return 1.0 - self.kept_l1 / self.total_l1 if self.total_l1 > 0 else 0.0
