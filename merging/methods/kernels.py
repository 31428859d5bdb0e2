"""Returns fused CPU kernels (numba) for the hottest loops; the torch formulations still run where they do not apply.

- TIES over the columns of T task vectors: one pass, block by block without branches (trim, weights, sign election,
  disjoint mean), every column's sums accumulated t = 0..T-1. That is mergekit's order, and torch's for most shapes;
  torch's `sum(dim=0)` over a few columns may add in another order, so the torch path agrees to rounding.
- Task Arithmetic straight from the stored inputs: base and fine-tunes read in their stored dtype (bfloat16 or
  float32), computed in float32 in the torch path's order, written in the output dtype (bfloat16 rounded to nearest
  even, as torch's cast does, or float32): bit-equal to the torch path, which converts each input to float32 first
  and casts the result again (about 4T + 6 passes over float32 copies on a bfloat16 model).
- bfloat16 task vectors formed in one pass, counting non-finite entries.
- The radix histograms of the trim thresholds, and both passes of a whole-model threshold straight from the stored
  base and fine-tune (each task-vector entry formed in a register, never stored).
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
    from numba.extending import overload
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

    @numba.njit(parallel=True, cache=True)
    def _difference_stats(base, ft, bucket, high, low_hist, low_l1, total_l1, above_l1):
        # The statistics of a model-wide trim threshold over d = float32(ft) - float32(base), entry by entry, the
        # task vector never stored. bucket < 0: counts |d|'s high halves into high[p]; else the second pass, as
        # _threshold_pass2. Parts are fixed, not threads. Returns the number of non-finite d (left out).
        parts = total_l1.shape[0]
        n = base.size
        per = (n + parts - 1) // parts
        bad = np.zeros(parts, dtype=np.int64)
        for p in numba.prange(parts):
            stop = min(n, (p + 1) * per)
            base_bits = np.empty(BLOCK, dtype=np.uint32)
            ft_bits = np.empty(BLOCK, dtype=np.uint32)
            diff = np.empty(BLOCK, dtype=np.float32)
            b = base_bits.view(np.float32)
            f = ft_bits.view(np.float32)
            diff_bits = diff.view(np.uint32)
            total = 0.0
            above = 0.0
            found = 0
            for start in range(p * per, stop, BLOCK):
                count = min(stop, start + BLOCK) - start
                _widen(base, start, count, base_bits)
                _widen(ft, start, count, ft_bits)
                for i in range(count):
                    diff[i] = f[i] - b[i]
                for i in range(count):
                    u = diff_bits[i] & np.uint32(0x7FFFFFFF)
                    if u >= np.uint32(0x7F800000):
                        found += 1
                        continue
                    top = np.int64(u >> np.uint32(16))
                    if bucket < 0:
                        high[p, top] += 1
                        continue
                    v = np.float64(abs(diff[i]))
                    total += v
                    # A select, not a branch: about `density` of the entries are above, in no order.
                    above += v if top > bucket else 0.0
                    if top == bucket:  # rare: one bucket of 2**15
                        low_hist[p, u & np.uint32(0xFFFF)] += 1
                        low_l1[p, u & np.uint32(0xFFFF)] += v
            total_l1[p] += total
            above_l1[p] += above
            bad[p] = found
        return bad.sum()

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

    def _widen(src, start, count, bits):  # pragma: no cover - replaced by the overload below inside kernels
        raise NotImplementedError

    def _narrow(values, start, count, out):  # pragma: no cover - replaced by the overload below inside kernels
        raise NotImplementedError

    @overload(_widen)
    def _widen_impl(src, start, count, bits):
        # bits (uint32 scratch) <- src[start:start+count] as float32 bit patterns; bfloat16 arrives as its uint16 bits.
        if src.dtype == numba.types.uint16:

            def from_bf16(src, start, count, bits):
                for i in range(count):
                    bits[i] = np.uint32(src[start + i]) << np.uint32(16)

            return from_bf16

        def from_f32(src, start, count, bits):
            vals = bits.view(np.float32)
            for i in range(count):
                vals[i] = src[start + i]

        return from_f32

    @overload(_narrow)
    def _narrow_impl(values, start, count, out):
        # out[start:start+count] <- values (float32, finite) in out's dtype; bfloat16 is written as uint16 bits,
        # rounded to nearest even like torch's cast.
        if out.dtype == numba.types.uint16:

            def to_bf16(values, start, count, out):
                bits = values.view(np.uint32)
                for i in range(count):
                    u = bits[i]
                    out[start + i] = np.uint16((u + (((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))) >> 16)

            return to_bf16

        def to_f32(values, start, count, out):
            for i in range(count):
                out[start + i] = values[i]

        return to_f32

    @numba.njit(parallel=True, cache=True, fastmath=False)
    def _weighted_sum_into(base, fts, weights, divisor, lam, out):
        # out = base + lam * (sum_t w_t (ft_t - base)) [/ divisor], in float32 in weighted_sum's order; returns the
        # number of blocks holding a non-finite input or result (the caller then takes the checked torch path).
        n = base.size
        blocks = (n + BLOCK - 1) // BLOCK
        bad = np.zeros(blocks, dtype=np.int64)
        for block in numba.prange(blocks):
            start = block * BLOCK
            count = min(n, start + BLOCK) - start
            base_bits = np.empty(count, dtype=np.uint32)
            ft_bits = np.empty(count, dtype=np.uint32)
            acc = np.empty(count, dtype=np.float32)
            b = base_bits.view(np.float32)
            f = ft_bits.view(np.float32)
            _widen(base, start, count, base_bits)
            finite = True
            for t in range(len(fts)):
                _widen(fts[t], start, count, ft_bits)
                w = weights[t]
                for i in range(count):
                    d = (f[i] - b[i]) * w
                    acc[i] = d if t == 0 else acc[i] + d
            for i in range(count):
                v = acc[i]
                if divisor != np.float32(0):
                    v = v / divisor
                if lam != np.float32(1):
                    v = v * lam
                v = v + b[i]
                acc[i] = v
                if not np.isfinite(v) or not np.isfinite(b[i]):
                    finite = False
            if not finite:
                bad[block] = 1
                continue
            _narrow(acc, start, count, out)
        return bad.sum()

    @numba.njit(parallel=True, cache=True)
    def _sub_widened(src, base, out):
        # out = float32(src) - base, elementwise; src bfloat16 (as uint16 bits) or float32. Returns the number of
        # results that are not finite.
        n = base.size
        blocks = (n + BLOCK - 1) // BLOCK
        bad = np.zeros(blocks, dtype=np.int64)
        out_bits = out.view(np.uint32)
        for block in numba.prange(blocks):
            start = block * BLOCK
            count = min(n, start + BLOCK) - start
            bits = np.empty(count, dtype=np.uint32)
            _widen(src, start, count, bits)
            f = bits.view(np.float32)
            for i in range(count):
                out[start + i] = f[i] - base[start + i]
            exponent = np.uint32(0x7F800000)  # all ones: Inf or NaN
            found = 0
            for i in range(count):
                found += (out_bits[start + i] & exponent) == exponent
            bad[block] = found
        return bad.sum()


def sub_widened_into(src: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> int | None:
    """Writes float32(src) - base into `out` (what torch.sub(src, base, out=out) gives) in one pass, for a bfloat16
    `src`, and returns how many results are not finite; returns None, writing nothing, when the kernel cannot take
    these tensors (the caller uses torch.sub)."""
    if numba is None or src.dtype != torch.bfloat16 or src.shape != base.shape or out.shape != base.shape:
        return None
    if base.dtype != torch.float32 or out.dtype != torch.float32:
        return None
    arrays = [_flat_array(x) for x in (src, base, out)]
    if any(a is None for a in arrays):
        return None
    return int(_sub_widened(arrays[0], arrays[1], arrays[2]))


def _flat_array(tensor: torch.Tensor) -> np.ndarray | None:
    """Returns a contiguous CPU tensor's flat numpy view (bfloat16 as its uint16 bits), or None if the kernels
    cannot read it."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    if tensor.dtype == torch.bfloat16:
        return tensor.reshape(-1).view(torch.int16).numpy().view(np.uint16)
    if tensor.dtype == torch.float32:
        return tensor.reshape(-1).numpy()
    return None


def weighted_sum_into(
    base: torch.Tensor,
    fts: list[torch.Tensor],
    weights: torch.Tensor,
    normalize: bool,
    lambda_: float,
    out: torch.Tensor,
) -> bool:
    """Writes Task Arithmetic's merged tensor, base + lambda * sum_t w_t (ft_t - base) [/ sum_t w_t], into `out`.

    Reads the stored tensors as they are: every input bfloat16, or every input float32, all of `base`'s shape,
    contiguous, on the CPU; `out` bfloat16 or float32. Returns False, with `out` unspecified, when the kernel cannot
    take these tensors or an input or the result is not finite: the caller then takes the torch path, which gives the
    same numbers (bit for bit) and names the tensor that is not finite.
    """
    if numba is None or not fts or out.shape != base.shape:
        return False
    arrays = [_flat_array(x) for x in (base, *fts)]
    target = _flat_array(out)
    if target is None or any(a is None for a in arrays):
        return False
    if any(x.dtype != base.dtype or x.shape != base.shape for x in fts):
        return False
    divisor = np.float32(0)
    if normalize:
        total = weights.sum().to(torch.float32)
        if float(total.abs()) >= 1e-8:
            divisor = np.float32(float(total))
    bad = _weighted_sum_into(
        arrays[0],
        tuple(arrays[1:]),
        np.asarray([float(w) for w in weights], dtype=np.float32),
        divisor,
        np.float32(lambda_),
        target,
    )
    return int(bad) == 0


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


def stored_flat(tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Returns the stored tensors flattened when the difference kernels can read them all (CPU, contiguous, one dtype,
    bfloat16 or float32, the same number of entries), else None."""
    if numba is None or not tensors:
        return None
    first = tensors[0]
    if any(x.dtype != first.dtype or x.numel() != first.numel() for x in tensors):
        return None
    if any(_flat_array(x) is None for x in tensors):
        return None
    return [x.reshape(-1) for x in tensors]


def difference_stats(
    base: torch.Tensor,
    ft: torch.Tensor,
    bucket: int,
    high: np.ndarray,
    low_hist: np.ndarray,
    low_l1: np.ndarray,
    total_l1: np.ndarray,
    above_l1: np.ndarray,
) -> int:
    """Adds the task vector ft - base (stored tensors from stored_flat, computed in float32 as TensorSource.load does,
    never stored) to a model threshold's first pass (bucket < 0: the high-half counts, per part) or second pass (see
    threshold_pass2); returns how many of its entries are not finite."""
    assert numba is not None
    arrays = [_flat_array(base), _flat_array(ft)]
    assert arrays[0] is not None and arrays[1] is not None
    return int(_difference_stats(arrays[0], arrays[1], bucket, high, low_hist, low_l1, total_l1, above_l1))


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
