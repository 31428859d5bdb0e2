"""Returns fused CPU kernels (numba) for the hottest loop: TIES over the columns of T task vectors.

The torch formulation of TIES is a chain of about ten elementwise passes over (T, n) values;
this kernel makes one pass, one column at a time, in parallel, with the same float arithmetic
in the same order (weights applied in the values' dtype, sums accumulated t = 0..T-1), so it
gives the torch path's (and mergekit's) numbers. Without numba the torch path is used.
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
            start = block * BLOCK
            stop = min(n, start + BLOCK)
            for j in range(start, stop):
                total = zero
                for t in range(t_count):
                    v = values[t, j]
                    a = np.float32(abs(v))  # thresholds are float32 magnitudes, as in trim.py
                    if a < thresholds[t] or (a == thresholds[t] and j > last_tied[t]):
                        v = zero
                    elif not uniform:
                        v = v * weights[t]
                    values[t, j] = v
                    total += v
                sign = one if total >= zero else -one
                num = zero
                den = zero
                for t in range(t_count):
                    v = values[t, j]
                    if v * sign > zero:
                        num += v
                        den += one if uniform else weights[t]
                if normalize:
                    out[j] = lam * (num / den if den != zero else num)
                else:
                    out[j] = lam * num

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
    """Writes lambda * TIES(values) into `out` (n,); `values` (T, n) is trimmed and weighted in place.

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
