"""Returns the CPU kernels (numba) that read the stored tensors themselves, bfloat16 or float32, without float32 copies:
Task Arithmetic's whole merge, a task vector formed in one pass, and a whole-model threshold's passes over task-vector
entries formed in a register (see kernels.py for the others)."""

from __future__ import annotations

import numpy as np
import torch

from merging.methods.kernels import BLOCK, numba

if numba is not None:
    from numba.extending import overload

if numba is not None:

    @numba.njit(parallel=True, cache=True)
    def _difference_stats(base, ft, bucket, high, low_hist, low_l1, total_l1, above_l1, step):
        # The statistics of a model-wide trim threshold over d = float32(ft) - float32(base), entry by entry, the
        # task vector never stored. bucket < 0: counts |d|'s high halves into high[p], of one block in every `step`
        # (step 1: all); else the second pass, as _threshold_pass2. Parts are fixed, not threads. Returns the number
        # of non-finite d (left out).
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
            for start in range(p * per, stop, BLOCK * step):
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

    @numba.njit(parallel=True, cache=True)
    def _window_stats(base, ft, lo, window, above_count, total_l1, above_l1):
        # The one exact pass of the sampled threshold over d = float32(ft) - float32(base): window[p] counts the low
        # halves of the |d| whose high halves lie in [lo, lo + window width) (index: bits - lo * 2**16),
        # above_count[p] and above_l1[p] the entries above the window, total_l1[p] all. Returns the non-finite count.
        parts = total_l1.shape[0]
        n = base.size
        per = (n + parts - 1) // parts
        hi = lo + window.shape[1] // 65536 - 1
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
            higher = 0
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
                    v = np.float64(abs(diff[i]))
                    total += v
                    # Selects, not branches: about `density` of the entries are above, in no order.
                    above += v if top > hi else 0.0
                    higher += 1 if top > hi else 0
                    if top >= lo and top <= hi:  # rare: a few buckets of 2**15
                        window[p, ((top - lo) << 16) | np.int64(u & np.uint32(0xFFFF))] += 1
            total_l1[p] += total
            above_l1[p] += above
            above_count[p] += higher
            bad[p] = found
        return bad.sum()

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
    def _sub_widened(src, base, out, threshold, scale):
        # out = float32(src) - base, elementwise; src bfloat16 (as uint16 bits) or float32. Each difference d is
        # then trimmed and scaled in trim_'s and NeuroMerging's order, (d * (|d| >= threshold)) * scale, which with
        # threshold 0 and scale 1 leaves it as it is. Returns the number of differences that are not finite.
        n = base.size
        blocks = (n + BLOCK - 1) // BLOCK
        bad = np.zeros(blocks, dtype=np.int64)
        for block in numba.prange(blocks):
            start = block * BLOCK
            count = min(n, start + BLOCK) - start
            bits = np.empty(count, dtype=np.uint32)
            _widen(src, start, count, bits)
            f = bits.view(np.float32)
            diff = np.empty(count, dtype=np.float32)  # in cache: one write of `out`, whatever the options
            for i in range(count):
                diff[i] = f[i] - base[start + i]
            diff_bits = diff.view(np.uint32)
            exponent = np.uint32(0x7F800000)  # all ones: Inf or NaN
            found = 0
            for i in range(count):
                found += (diff_bits[i] & exponent) == exponent
            bad[block] = found
            for i in range(count):
                d = diff[i]
                out[start + i] = (d * np.float32(abs(d) >= threshold)) * scale
        return bad.sum()


def sub_widened_into(
    src: torch.Tensor, base: torch.Tensor, out: torch.Tensor, threshold: float = 0.0, scale: float = 1.0
) -> int | None:
    """Writes float32(src) - base into `out` (what torch.sub(src, base, out=out) gives) in one pass, for a bfloat16
    `src`, and returns how many differences are not finite; returns None, writing nothing, when the kernel cannot take
    these tensors (the caller uses torch.sub). A `threshold` > 0 then zeroes the differences below it in magnitude
    and a `scale` multiplies them, bit for bit as trim_ with TrimRule(threshold) and a float32 multiply do."""
    if numba is None or src.dtype != torch.bfloat16 or src.shape != base.shape or out.shape != base.shape:
        return None
    if base.dtype != torch.float32 or out.dtype != torch.float32:
        return None
    arrays = [_flat_array(x) for x in (src, base, out)]
    if any(a is None for a in arrays):
        return None
    return int(_sub_widened(arrays[0], arrays[1], arrays[2], np.float32(threshold), np.float32(scale)))


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
    step: int = 1,
) -> int:
    """Adds the task vector ft - base (stored tensors from stored_flat, computed in float32 as TensorSource.load does,
    never stored) to a model threshold's first pass (bucket < 0: the high-half counts, per part) or second pass (see
    threshold_pass2); returns how many of its entries are not finite."""
    assert numba is not None
    arrays = [_flat_array(base), _flat_array(ft)]
    assert arrays[0] is not None and arrays[1] is not None
    return int(_difference_stats(arrays[0], arrays[1], bucket, high, low_hist, low_l1, total_l1, above_l1, step))


def window_stats(
    base: torch.Tensor,
    ft: torch.Tensor,
    lo: int,
    window: np.ndarray,
    above_count: np.ndarray,
    total_l1: np.ndarray,
    above_l1: np.ndarray,
) -> int:
    """Adds the task vector ft - base (stored tensors from stored_flat, never formed) to a sampled threshold's exact
    pass: per part, the low-half counts of the entries whose high half is in the window of buckets that starts at
    `lo` (window: [parts, buckets * 2**16]), the count and L1 of the entries above it, and the L1 of all; returns how
    many entries are not finite."""
    assert numba is not None
    arrays = [_flat_array(base), _flat_array(ft)]
    assert arrays[0] is not None and arrays[1] is not None
    return int(_window_stats(arrays[0], arrays[1], lo, window, above_count, total_l1, above_l1))
