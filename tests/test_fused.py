"""Task Arithmetic's fused kernel (one pass over the stored inputs) against the torch path it replaces: bit for bit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from merging.config import load_config
from merging.engine.merge import MergeOptions, TensorSource, run_merge
from merging.errors import NonFiniteError
from merging.methods import REGISTRY, kernels, stored_kernels
from merging.methods.task_arithmetic import weighted_sum
from merging.methods.ties import ties_merge
from merging.methods.trim import trim_, trim_rules
from merging.methods.trim_stats import ModelThreshold
from merging.synthetic import build_family
from tests.helpers import write_config


def torch_path(base, fts, weights, normalize, lam, out_dtype):
    """What the engine computes without the kernel: float32 task vectors, weighted_sum, + base, cast."""
    b = base.float()
    deltas = torch.stack([ft.float() - b for ft in fts])
    mixed = weighted_sum(deltas, torch.tensor(weights, dtype=torch.float64), normalize, lam)
    return mixed.add_(b).to(out_dtype)


def family(seed, n, t, dtype, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    fts = [(base + scale * torch.randn(n, generator=g)).to(dtype) for _ in range(t)]
    return base.to(dtype), fts


@pytest.mark.parametrize(
    "dtype,out_dtype",
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("t", [1, 4])
def test_fused_equals_the_torch_path_bit_for_bit(dtype, out_dtype, normalize, t):
    # 3 blocks and a ragged tail; weights that are not powers of two, lambda != 1.
    base, fts = family(t, 2 * kernels.BLOCK + 77, t, dtype)
    weights = [0.3 + 0.37 * i for i in range(t)]
    out = torch.empty(base.shape, dtype=out_dtype)
    assert stored_kernels.weighted_sum_into(base, fts, torch.tensor(weights, dtype=torch.float64), normalize, 0.7, out)
    assert torch.equal(out, torch_path(base, fts, weights, normalize, 0.7, out_dtype))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3000),
    t=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    lam=st.floats(-3, 3, allow_nan=False, width=32),
    normalize=st.booleans(),
    scale=st.sampled_from([1e-3, 0.05, 10.0]),
    bf16=st.booleans(),
)
def test_fused_equals_the_torch_path_property(n, t, seed, lam, normalize, scale, bf16):
    dtype = torch.bfloat16 if bf16 else torch.float32
    base, fts = family(seed, n, t, dtype, scale)
    g = torch.Generator().manual_seed(seed + 1)
    weights = (torch.rand(t, generator=g, dtype=torch.float64) * 2 - 0.5).tolist()
    out = torch.empty(n, dtype=dtype)
    assert stored_kernels.weighted_sum_into(base, fts, torch.tensor(weights, dtype=torch.float64), normalize, lam, out)
    assert torch.equal(out, torch_path(base, fts, weights, normalize, lam, dtype))


def test_weights_summing_to_zero_are_not_divided_by():
    base, fts = family(3, 500, 2, torch.bfloat16)
    out = torch.empty(500, dtype=torch.bfloat16)
    assert stored_kernels.weighted_sum_into(base, fts, torch.tensor([1.0, -1.0], dtype=torch.float64), True, 1.0, out)
    assert torch.equal(out, torch_path(base, fts, [1.0, -1.0], True, 1.0, torch.bfloat16))


def test_rounding_ties_go_to_even_like_torch():
    # Results that fall exactly halfway between two bfloat16 values, both parities, and the largest finite values.
    base = torch.tensor([1.0, 1.0, -1.0, 3.0e38, 0.0, -0.0] * 10, dtype=torch.float32)
    step = 2.0**-8  # half a bfloat16 ulp at 1.0
    ft = base.clone()
    ft[0::6] += step
    ft[1::6] += 3 * step
    ft[2::6] -= 3 * step
    for out_dtype in (torch.bfloat16, torch.float32):
        out = torch.empty(base.shape, dtype=out_dtype)
        assert stored_kernels.weighted_sum_into(base, [ft], torch.ones(1, dtype=torch.float64), False, 1.0, out)
        assert torch.equal(out, torch_path(base, [ft], [1.0], False, 1.0, out_dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["base", "finetune"])
def test_non_finite_inputs_are_left_to_the_checked_path(bad, where):
    base, fts = family(5, 9000, 3, torch.bfloat16)
    (base if where == "base" else fts[2])[8500] = bad
    out = torch.empty(base.shape, dtype=torch.bfloat16)
    assert not stored_kernels.weighted_sum_into(base, fts, torch.ones(3, dtype=torch.float64), False, 1.0, out)


def test_an_overflowing_result_is_left_to_the_checked_path():
    base, fts = family(6, 100, 2, torch.float32)
    fts[0][7] = 3.0e38
    out = torch.empty(100, dtype=torch.float32)
    assert not stored_kernels.weighted_sum_into(base, fts, torch.ones(2, dtype=torch.float64), False, 3.0, out)


@pytest.mark.parametrize("case", ["float16", "mixed dtypes", "shape", "not contiguous", "float16 out", "no fine-tunes"])
def test_tensors_the_kernel_does_not_take_are_refused(case):
    base, fts = family(7, 64, 2, torch.bfloat16)
    out = torch.empty(64, dtype=torch.bfloat16)
    if case == "float16":
        base, fts = base.half(), [f.half() for f in fts]
        out = out.half()
    elif case == "mixed dtypes":
        fts[1] = fts[1].float()
    elif case == "shape":
        fts[1] = fts[1][:63]
    elif case == "not contiguous":
        base, fts, out = base.reshape(8, 8).t(), [f.reshape(8, 8).t() for f in fts], out.reshape(8, 8)
    elif case == "float16 out":
        out = out.half()
    else:
        fts = []
    assert not stored_kernels.weighted_sum_into(base, fts, torch.ones(len(fts), dtype=torch.float64), False, 1.0, out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_whole_merge_with_and_without_the_kernel_is_identical(tmp_path, dtype, monkeypatch):
    base, fts = build_family(tmp_path / "fam", "llama", 3, dtype=dtype, hidden=48, intermediate=96)
    models = [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(fts, [0.6, 0.5, 1.0])]
    cfg = load_config(
        write_config(
            tmp_path / "c.yml",
            "task_arithmetic",
            base,
            fts,
            models=models,
            parameters={"lambda": 0.7, "normalize": True},
        )
    )
    taken = []
    real = stored_kernels.weighted_sum_into
    monkeypatch.setattr(stored_kernels, "weighted_sum_into", lambda *a: taken.append(real(*a)) or taken[-1])
    run_merge(cfg, tmp_path / "fused", MergeOptions(progress=False))
    # Every floating tensor went through the kernel, except in float16, which it does not read.
    assert taken and all(taken) == (dtype != torch.float16)
    monkeypatch.setitem(REGISTRY, "task_arithmetic", dataclasses.replace(REGISTRY["task_arithmetic"], fused=None))
    run_merge(cfg, tmp_path / "torch", MergeOptions(progress=False))
    ours, theirs = (
        load_file(tmp_path / "fused" / "model.safetensors"),
        load_file(tmp_path / "torch" / "model.safetensors"),
    )
    assert set(ours) == set(theirs)
    for name in ours:
        assert ours[name].dtype == dtype and torch.equal(ours[name], theirs[name]), name
    base_t = load_file(base / "model.safetensors")
    assert any(not torch.equal(ours[k], base_t[k]) for k in ours)


def test_a_nan_in_a_bfloat16_fine_tune_is_still_named(tmp_path):
    base, fts = build_family(tmp_path / "fam", "llama", 2, dtype=torch.bfloat16, hidden=48, intermediate=96)
    weights = load_file(fts[1] / "model.safetensors")
    name = sorted(weights)[3]
    weights[name].view(-1)[5] = float("nan")
    save_file(weights, fts[1] / "model.safetensors", metadata={"format": "pt"})
    cfg = load_config(write_config(tmp_path / "c.yml", "task_arithmetic", base, fts))
    with pytest.raises(NonFiniteError, match=name.replace(".", r"\.")):
        run_merge(cfg, tmp_path / "out", MergeOptions(progress=False))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("n", [1, kernels.BLOCK, 3 * kernels.BLOCK + 5])
def test_bfloat16_task_vectors_equal_torch_sub(n):
    g = torch.Generator().manual_seed(n)
    src = (torch.randn(n, generator=g) * 3).to(torch.bfloat16)
    src[0] = float("inf") if n > 1 else src[0]  # carried through like torch.sub: the caller checks finiteness
    base = torch.randn(n, generator=g)
    out = torch.empty(n)
    assert stored_kernels.sub_widened_into(src, base, out) == (1 if n > 1 else 0)  # the Inf is counted
    assert torch.equal(out, torch.sub(src, base))


@pytest.mark.parametrize("case", ["float32 src", "float16 src", "transposed", "float64 base", "shape"])
def test_task_vectors_the_kernel_does_not_take_are_left_to_torch(case):
    src, base, out = torch.zeros(4, 6, dtype=torch.bfloat16), torch.zeros(4, 6), torch.full((4, 6), 7.0)
    if case == "float32 src":
        src = src.float()
    elif case == "float16 src":
        src = src.half()
    elif case == "transposed":
        src, base, out = src.t(), base.t().contiguous(), out.t().contiguous()
    elif case == "float64 base":
        base = base.double()
    else:
        src = src[:3]
    assert stored_kernels.sub_widened_into(src, base, out) is None
    assert bool((out == 7.0).all())


def ties_columns_loop(values, thresholds, last_tied, weights, normalize, lam):
    """The column rule one entry at a time in numpy scalars: trim, weigh, elect the sign of the sum, disjoint mean;
    every sum runs t = 0..T-1. Equal weights are left to the caller (ties_merge folds the common weight in)."""
    t_count, n = values.shape
    f = values.dtype.type
    if (weights == weights[0]).all():
        weights = np.ones_like(weights)
    out = np.empty(n, dtype=values.dtype)
    for j in range(n):
        kept = []
        for t in range(t_count):
            a = np.float32(abs(values[t, j]))
            drop = a < thresholds[t] or (a == thresholds[t] and j > last_tied[t])
            kept.append(f(0) if drop else values[t, j] * f(weights[t]))
        total = f(0)
        for v in kept:
            total = total + v
        sign = f(1) if total >= 0 else f(-1)
        num, den = f(0), f(0)
        for t, v in enumerate(kept):
            if v * sign > 0:
                num, den = num + v, den + f(weights[t])
        out[j] = f(lam) * (num / den if normalize and den != 0 else num)
    return out


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5000),
    t=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    uniform=st.booleans(),
    normalize=st.booleans(),
    f64=st.booleans(),
    ties=st.booleans(),
)
def test_ties_column_kernel_equals_the_entry_loop_bit_for_bit(n, t, seed, uniform, normalize, f64, ties):
    """The branch-free block kernel gives the entry-by-entry rule's bits: trim ties by index, sign votes, weights."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if f64 else torch.float32
    values = torch.randn(t, n, generator=g, dtype=dtype).to(torch.bfloat16).to(dtype)  # coarse: many ties
    weights = torch.ones(t, dtype=torch.float64) if uniform else torch.rand(t, generator=g, dtype=torch.float64) + 0.1
    thresholds = [float(np.float32(abs(values[i, n // 2]))) for i in range(t)]  # a value that occurs: ties
    last_tied = [int(x) for x in torch.randint(-1, n + 1, (t,), generator=g)] if ties else [n] * t
    out = torch.empty(n, dtype=dtype)
    kernels.ties_columns(values.clone(), thresholds, last_tied, weights, normalize, 0.8, out)
    want = ties_columns_loop(values.numpy(), thresholds, last_tied, weights.numpy(), normalize, 0.8)
    assert np.array_equal(out.numpy(), want)
    in_place = values.clone()  # written into its own row 0, as ties_merge does
    kernels.ties_columns(in_place, thresholds, last_tied, weights, normalize, 0.8, in_place[0])
    assert np.array_equal(in_place[0].numpy(), want)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 9000),
    t=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    uniform=st.sampled_from([None, 1.0, 0.5, -0.7]),
    normalize=st.booleans(),
    density=st.sampled_from([0.05, 0.3, 1.0]),
)
def test_ties_kernel_and_torch_formulation_agree(n, t, seed, uniform, normalize, density):
    """Kernel and chunked torch path agree to rounding: torch's sum over the T values of a column does not always run
    t = 0..T-1 (the kernel's order, checked bit for bit above)."""
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(t, n, generator=g)
    weights = (
        torch.full((t,), uniform, dtype=torch.float64)
        if uniform is not None
        else torch.rand(t, generator=g, dtype=torch.float64) * 2 - 0.6
    )
    results = []
    with pytest.MonkeyPatch.context() as patch:
        for use_kernel in (True, False):
            if not use_kernel:
                patch.setattr(kernels, "available", lambda *x: False)
            d = deltas.clone()
            rules = trim_rules(d, [density] * t, None, "index")
            results.append(ties_merge(d, weights, normalize, 0.8, rules).clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 20000), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    density=st.sampled_from([0.01, 0.2, 0.9]),
    bf16=st.booleans(),
)
def test_model_threshold_from_stored_tensors_equals_the_formed_task_vectors(sizes, seed, density, bf16):
    """The difference kernels (task vectors never formed) give the same threshold, and sigma to rounding."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    pairs = [family(seed + i, n, 1, dtype) for i, n in enumerate(sizes)]
    fused, formed = ModelThreshold(density), ModelThreshold(density)
    for base, (ft,) in pairs:
        assert fused.add_difference(base, ft, second=False) == 0
        formed.add_pass1(ft.float() - base.float())
    fused.finish_pass1()
    formed.finish_pass1()
    assert fused.needs_pass2 == formed.needs_pass2
    if formed.needs_pass2:
        for base, (ft,) in pairs:
            assert fused.add_difference(base, ft, second=True) == 0
            formed.add_pass2(ft.float() - base.float())
    (threshold, sigma), (want_threshold, want_sigma) = fused.result(), formed.result()
    assert threshold == want_threshold
    assert abs(sigma - want_sigma) <= 1e-12


def test_model_threshold_from_stored_tensors_counts_non_finite_entries():
    base, (ft,) = family(9, 5000, 1, torch.bfloat16)
    ft[[10, 4000]] = float("inf")
    ft[20] = float("nan")
    assert ModelThreshold(0.2).add_difference(base, ft, second=False) == 3


@pytest.mark.parametrize("method", ["neuromerging", "ties"])
def test_whole_model_trim_statistics_from_stored_tensors_match_the_formed_ones(tmp_path, monkeypatch, method):
    base, fts = build_family(tmp_path / "fam", "llama", 3, dtype=torch.bfloat16, hidden=48, intermediate=96)
    cfg = load_config(
        write_config(
            tmp_path / "c.yml",
            method,
            base,
            fts,
            parameters={"trim_scope": "model", "lambda": "auto"}
            if method == "neuromerging"
            else {"trim_scope": "model"},
        )
    )
    stored = run_merge(cfg, tmp_path / "stored", MergeOptions(progress=False))
    monkeypatch.setattr(TensorSource, "stored", lambda self, plan: None)
    formed = run_merge(cfg, tmp_path / "formed", MergeOptions(progress=False))
    assert stored.stats.thresholds == formed.stats.thresholds
    if method == "neuromerging":
        for a, b in zip(stored.stats.trimmed_l1_fraction, formed.stats.trimmed_l1_fraction):
            assert abs(a - b) <= 1e-12
    ours, theirs = (
        load_file(tmp_path / "stored" / "model.safetensors"),
        load_file(tmp_path / "formed" / "model.safetensors"),
    )
    for name in ours:
        torch.testing.assert_close(ours[name].float(), theirs[name].float(), rtol=1e-2, atol=1e-6)


def test_a_nan_in_a_fine_tune_is_named_by_the_whole_model_trim_pass(tmp_path):
    base, fts = build_family(tmp_path / "fam", "llama", 2, dtype=torch.bfloat16, hidden=48, intermediate=96)
    weights = load_file(fts[0] / "model.safetensors")
    name = sorted(weights)[-1]
    weights[name].view(-1)[0] = float("inf")
    save_file(weights, fts[0] / "model.safetensors", metadata={"format": "pt"})
    cfg = load_config(write_config(tmp_path / "c.yml", "neuromerging", base, fts, parameters={"trim_scope": "model"}))
    with pytest.raises(NonFiniteError, match=name.replace(".", r"\.")):
        run_merge(cfg, tmp_path / "out", MergeOptions(progress=False))
    assert not (tmp_path / "out").exists()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3 * kernels.BLOCK),
    seed=st.integers(0, 2**16),
    level=st.sampled_from([0.0, 0.01, 0.05, 0.2]),
    scale=st.sampled_from([1.0, 0.3, -1.7, 0.0]),
)
def test_task_vectors_trimmed_and_scaled_while_formed_equal_trim_then_multiply(n, seed, level, scale):
    base, (ft,) = family(seed, n, 1, torch.bfloat16)
    b = base.float()
    expected = ft.float() - b
    # A threshold that some differences equal exactly (kept: |d| >= threshold), or none at all.
    threshold = float(expected.abs().quantile(level)) if level else 0.0
    trim_(expected.unsqueeze(0), (1.0,), (threshold,))
    expected.mul_(torch.tensor([scale], dtype=torch.float64).to(torch.float32))
    out = torch.empty(n)
    assert stored_kernels.sub_widened_into(ft, b, out, threshold, scale) == 0
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))  # the signs of zeros too


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("blocked", [False, True])
def test_neuromerging_with_task_vectors_prepared_while_formed_is_identical(tmp_path, monkeypatch, dtype, blocked):
    from merging.engine import blocks

    if blocked:
        monkeypatch.setattr(blocks, "MIN_BLOCKED_BYTES", 0)
        monkeypatch.setattr(blocks, "BLOCK_BYTES", 3000)
    base, fts = build_family(tmp_path / "fam", "llama", 3, dtype=dtype, hidden=48, intermediate=96)
    models = [{"model": str(f), "parameters": {"weight": w, "density": 0.3}} for f, w in zip(fts, [0.6, 1.3, 1.0])]
    cfg = load_config(
        write_config(tmp_path / "c.yml", "neuromerging", base, fts, models=models, parameters={"trim_scope": "model"})
    )
    assert REGISTRY["neuromerging"].trims_first
    prepared = []
    real = TensorSource.load

    def spy(self, *a, **k):
        prepared.append(k.get("prepare", a[2] if len(a) > 2 else None))
        return real(self, *a, **k)

    monkeypatch.setattr(TensorSource, "load", spy)
    run_merge(cfg, tmp_path / "prepared", MergeOptions(progress=False))
    assert any(p for p in prepared)  # the merge pass's loads (the statistics passes' are plain)
    monkeypatch.setitem(REGISTRY, "neuromerging", dataclasses.replace(REGISTRY["neuromerging"], trims_first=False))
    prepared.clear()
    run_merge(cfg, tmp_path / "plain", MergeOptions(progress=False))
    assert prepared and not any(p for p in prepared)
    ours, theirs = (
        load_file(tmp_path / "prepared" / "model.safetensors"),
        load_file(tmp_path / "plain" / "model.safetensors"),
    )
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
