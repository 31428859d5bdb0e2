"""Returns the streaming statistics of trimming over a whole model: the exact whole-model threshold (two passes of
radix histograms, one task at a time, or a sample and one exact pass over a window of buckets) and the share of the L1
norm per-tensor trimming removes."""

from __future__ import annotations

import math
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
    _kernel_ready,
    _locate,
    chunks,
    high_histogram,
    keep_count,
)

SAMPLE_STEP = 16  # the sampled route reads one block of entries in every SAMPLE_STEP
# At most this many high-half buckets in the exact pass's window: 16 parts x 16 x 2**16 counts, int32 (64 MB per task)
# below 2**31 task-vector entries per task, int64 above.
WINDOW_BUCKETS = 16


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
    # The sampled route (sample, choose_window, add_window, finish_window): the first of the window's buckets, and
    # per part the window's low-half counts and the count above it.
    window_lo: int = -1
    part_window: np.ndarray | None = None
    part_above: np.ndarray | None = None

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
        self.numel += base.numel()
        return self._add_high(base, ft, 1)

    def _add_high(self, base: torch.Tensor, ft: torch.Tensor, step: int) -> int:
        if self.part_high is None:
            self.part_high = np.zeros((kernels.PASS2_PARTS, HIGH_BINS), dtype=np.int64)
        sums = np.zeros(kernels.PASS2_PARTS, dtype=np.float64)  # the second pass's: added to, never read
        empty_hist = np.zeros((1, 1), dtype=np.int64)
        empty_l1 = np.zeros((1, 1), dtype=np.float64)
        return stored_kernels.difference_stats(base, ft, -1, self.part_high, empty_hist, empty_l1, sums, sums, step)

    def add_sample(self, base: torch.Tensor, ft: torch.Tensor) -> int:
        """Adds one block in every SAMPLE_STEP of the task vector ft - base (stored tensors, as add_difference) to the
        sample's high-half counts; returns how many sampled entries are not finite."""
        return self._add_high(base, ft, SAMPLE_STEP)

    def choose_window(self, entries: int) -> bool:
        """Returns whether the sample narrows the bucket of the k-th largest entry to WINDOW_BUCKETS - 2 buckets
        (then sets the window: those buckets and one more on each side); False when no threshold is needed or the
        sample is too wide. `entries`: how many task-vector entries the window pass will count.
        The margin is eight binomial deviations of the sampled rank plus 0.2% of it (the sample is drawn in blocks of
        neighbouring entries, so it varies more than independent draws would)."""
        hist = torch.from_numpy(self.part_high.sum(axis=0)) if self.part_high is not None else None
        self.part_high = None
        sampled = int(hist.sum()) if hist is not None else 0
        if hist is None or self.density >= 1 or sampled == 0:
            return False
        rank = self.density * sampled
        margin = 8.0 * math.sqrt(rank) + 0.002 * rank
        top, _ = _locate(hist, max(1, math.floor(rank - margin)))
        bottom, _ = _locate(hist, min(sampled, math.ceil(rank + margin)))
        if top - bottom + 3 > WINDOW_BUCKETS:
            return False
        self.open_window(bottom - 1, top - bottom + 3, entries)
        return True

    def open_window(self, lo: int, buckets: int, entries: int) -> None:
        """Sets the window to the `buckets` buckets from `lo` (moved inside the range of buckets), its counts wide
        enough for `entries`."""
        self.window_lo = min(max(lo, 0), HIGH_BINS - buckets)
        self.part_high = None
        counts = np.int32 if entries < 2**31 - 1 else np.int64
        self.part_window = np.zeros((kernels.PASS2_PARTS, buckets * LOW_BINS), dtype=counts)
        self.part_above = np.zeros(kernels.PASS2_PARTS, dtype=np.int64)
        self.part_total_l1 = np.zeros(kernels.PASS2_PARTS, dtype=np.float64)
        self.part_above_l1 = np.zeros(kernels.PASS2_PARTS, dtype=np.float64)

    def add_window(self, base: torch.Tensor, ft: torch.Tensor) -> int:
        """Adds the task vector ft - base to the exact pass over the chosen window; returns how many entries are not
        finite (the caller stops)."""
        assert self.part_window is not None and self.part_above is not None
        assert self.part_total_l1 is not None and self.part_above_l1 is not None
        self.numel += base.numel()
        return stored_kernels.window_stats(
            base, ft, self.window_lo, self.part_window, self.part_above, self.part_total_l1, self.part_above_l1
        )

    def finish_window(self) -> bool:
        """Returns whether the k-th largest entry fell in the window; then the accumulator holds what the two passes
        would (its bucket, the count and L1 above it, that bucket's low halves), result() and tensor_rule() apply,
        and the L1 of the window's entries is each low bin's count times its value (exact: one value per bin).
        False: the caller runs the two passes on a fresh accumulator."""
        if self.density >= 1:
            return True
        if self.part_window is None or self.numel == 0:
            return False
        assert self.part_above is not None and self.part_total_l1 is not None and self.part_above_l1 is not None
        counts = self.part_window.sum(axis=0, dtype=np.int64).reshape(-1, LOW_BINS)
        self.part_window = None
        k = keep_count(self.density, self.numel)
        higher, above_l1 = int(self.part_above.sum()), float(self.part_above_l1.sum())
        total_l1 = float(self.part_total_l1.sum())
        self.part_above = self.part_total_l1 = self.part_above_l1 = None
        if higher >= k:  # the k-th largest is above the window
            return False
        low_bits = np.arange(LOW_BINS, dtype=np.uint32)
        for j in range(counts.shape[0] - 1, -1, -1):
            in_bucket = int(counts[j].sum())
            bucket = self.window_lo + j
            values = (low_bits | np.uint32(bucket << 16)).view(np.float32).astype(np.float64)
            if higher + in_bucket >= k:
                self.bucket, self.above_count = bucket, higher
                self.low_hist = torch.from_numpy(counts[j].copy())
                self.low_l1 = torch.from_numpy(counts[j] * values)
                self.above_l1, self.total_l1 = above_l1, total_l1
                return True
            higher += in_bucket
            above_l1 += float((counts[j] * values).sum())
        return False

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

    def trimmed_l1(self) -> tuple[float, float]:
        """Returns (kept L1, total L1) under tensor_rule()'s rule, when the passes saw one tensor: exactly k entries
        kept. The entries tying at the threshold all have its magnitude, so the kept L1 is the same whichever of them
        a tie order keeps (`index` or `mergekit`)."""
        assert self.needs_pass2
        self._fold_parts()
        k = keep_count(self.density, self.numel)
        low, above_low = _locate(self.low_hist, k - self.above_count)
        threshold = _float_from_bits((self.bucket << 16) | low)
        tied = min(int(self.low_hist[low]), k - self.above_count - above_low)
        return self.above_l1 + float(self.low_l1[low + 1 :].sum()) + tied * threshold, self.total_l1

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
