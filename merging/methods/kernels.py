"""Returns fused CPU kernels (numba) for the hottest loops; the torch formulations still run where they do not apply.

- TIES over the columns of T task vectors: one pass, block by block without branches (trim, weights, sign election,
  disjoint mean), every column's sums accumulated t = 0..T-1. That is mergekit's order, and torch's for most shapes;
  torch's `sum(dim=0)` over a few columns may add in another order, so the torch path agrees to rounding.
- The radix histograms of the trim thresholds, the second pass of a whole-model threshold over formed task vectors,
  and the search for the nth tied entry.

The kernels that read the stored bfloat16/float32 tensors themselves are in stored_kernels.py.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from merging.io.checkpoint import cache_dir

# Compiled kernels are cached in mergeflow's cache folder, not beside the installed package
# (which may be read-only); an explicit NUMBA_CACHE_DIR wins.
os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_dir() / "numba"))

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the library importable
    numba = None  # type: ignore[assignment]

BLOCK = 4096


def available(*tensors: torch.Tensor) -> bool:
    """Returns True when the fused kernel can run on these tensors (CPU, float32/float64, numba present)."""
    return numba is not None and all(
        t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors
    )


if numba is not None:

    @numba.njit(parallel=True, cache=True, fastmath=False)
    def _ties_columns(values, thresholds, last_tied, weights, normalize, uniform, lam, out):
        t_count, n = values.shape
        zero = values.dtype.type(0)
        one = values.dtype.type(1)
        for block in numba.prange((n + BLOCK - 1) // BLOCK):
            # One block of columns at a time, task by task, without branches, so the loops vectorize; per column
            # the sums still run t = 0..T-1, and adding a zero for a dropped or disagreeing entry changes no bit.
            start = block * BLOCK
            count = min(n, start + BLOCK) - start
            kept = np.empty((t_count, count), dtype=values.dtype)  # trimmed, weighted values
            total = np.zeros(count, dtype=values.dtype)
            for t in range(t_count):
                threshold = thresholds[t]  # float32 magnitudes, as in trim.py
                last = last_tied[t] - start
                w = one if uniform else weights[t]  # v * 1 is v: uniform weights change no bit
                row = values[t, start : start + count]
                kept_row = kept[t]
                for i in range(count):
                    v = row[i]
                    a = np.float32(abs(v))
                    keep = (a > threshold) | ((a == threshold) & (i <= last))
                    v = v * w
                    v = v if keep else zero
                    kept_row[i] = v
                    total[i] += v
            num = np.zeros(count, dtype=values.dtype)
            den = np.zeros(count, dtype=values.dtype)
            for t in range(t_count):
                w = one if uniform else weights[t]
                kept_row = kept[t]
                for i in range(count):
                    v = kept_row[i]
                    positive = total[i] >= zero
                    agree = (positive & (v > zero)) | ((~positive) & (v < zero))  # v * sign(total) > 0
                    num[i] += v if agree else zero
                    den[i] += w if agree else zero
            for i in range(count):
                mean = num[i] / den[i] if den[i] != zero else num[i]
                out[start + i] = lam * (mean if normalize else num[i])

    @numba.njit(parallel=True, cache=True)
    def _abs_bit_histograms(bits, bucket, high, low):
        # Per-thread rows of `high` (all |x| high halves) or, when bucket >= 0, of `low` (low
        # halves of the entries in that high bucket); summed by the caller. No atomics needed.
        parts = high.shape[0]
        n = bits.size
        per = (n + parts - 1) // parts
        for p in numba.prange(parts):
            for i in range(p * per, min(n, (p + 1) * per)):
                b = bits[i] & 0x7FFFFFFF
                if bucket < 0:
                    high[p, b >> 16] += 1
                elif (b >> 16) == bucket:
                    low[p, b & 0xFFFF] += 1

    @numba.njit(parallel=True, cache=True)
    def _threshold_pass2(values, bits, bucket, low_hist, low_l1, total_l1, above_l1):
        # Part p of a fixed number of parts (not of threads: the float64 sums do not depend on the thread count)
        # adds its |x| to total_l1[p], those whose high half is above `bucket` to above_l1[p], and counts and sums
        # those in `bucket` by their low half.
        parts = low_hist.shape[0]
        n = values.size
        per = (n + parts - 1) // parts
        for p in numba.prange(parts):
            total = 0.0
            above = 0.0
            for i in range(p * per, min(n, (p + 1) * per)):
                v = np.float64(abs(values[i]))
                total += v
                b = bits[i] & 0x7FFFFFFF
                high = b >> 16
                if high > bucket:
                    above += v
                elif high == bucket:
                    low_hist[p, b & 0xFFFF] += 1
                    low_l1[p, b & 0xFFFF] += v
            total_l1[p] += total
            above_l1[p] += above

    @numba.njit(cache=True)
    def _nth_equal(values, threshold, nth):
        # Flat index of the nth (1-based) entry with |x| == threshold (float32), -1 if fewer.
        seen = 0
        for i in range(values.size):
            if np.float32(abs(values[i])) == threshold:
                seen += 1
                if seen == nth:
                    return i
        return -1


def abs_bit_histogram(row: torch.Tensor, bucket: int, bins: int) -> torch.Tensor:
    """Returns the histogram of |x|'s high 16 bits (bucket < 0), or of the low 16 bits in `bucket`.

    `row` is a contiguous float32 CPU tensor (see available).
    """
    assert numba is not None
    parts = max(1, numba.get_num_threads())
    counts = np.zeros((parts, bins), dtype=np.int64)
    bits = row.numpy().view(np.int32)
    if bucket < 0:
        _abs_bit_histograms(bits, -1, counts, counts)
    else:
        _abs_bit_histograms(bits, bucket, counts, counts)
    return torch.from_numpy(counts.sum(axis=0))


PASS2_PARTS = 16


def threshold_pass2(
    row: torch.Tensor, bucket: int, low_hist: np.ndarray, low_l1: np.ndarray, total_l1: np.ndarray, above_l1: np.ndarray
) -> None:
    """Adds a contiguous float32 CPU row (signed; see available) to a model threshold's second pass: per part of
    PASS2_PARTS, the L1 of |x|, the L1 above the high-half `bucket`, and the low-half counts and L1 inside it."""
    assert numba is not None
    values = row.numpy()
    _threshold_pass2(values, values.view(np.int32), bucket, low_hist, low_l1, total_l1, above_l1)


def nth_equal(row: torch.Tensor, threshold: float, nth: int) -> int:
    """Returns the flat index of the nth entry of `row` whose float32 |x| equals `threshold`."""
    assert numba is not None
    return int(_nth_equal(row.numpy(), np.float32(threshold), nth))


def ties_columns(
    values: torch.Tensor,
    thresholds: list[float],
    last_tied: list[int],
    weights: torch.Tensor,
    normalize: bool,
    lam: float,
    out: torch.Tensor,
) -> None:
    """Writes lambda * TIES(values) into `out` (n,); `values` (T, n) is only read, and `out` may be its row 0 (each
    block of columns is read whole before its results are written).

    Task t keeps |v| > thresholds[t], and |v| == thresholds[t] at flat index <= last_tied[t].
    With uniform weights the caller folds the common weight in itself (see ties_merge).
    """
    assert numba is not None
    v = values.numpy()
    _ties_columns(
        v,
        np.asarray(thresholds, dtype=np.float32),
        np.asarray(last_tied, dtype=np.int64),
        weights.to(values.dtype).numpy(),
        normalize,
        bool((weights == weights[0]).all()),
        v.dtype.type(lam),
        out.numpy(),
    )
