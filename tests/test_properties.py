"""Property tests: NeuroMerging invariants and the exact streaming whole-model threshold."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merging.methods.neuromerging import merge_in_basis, neuron_merge, singular_basis
from merging.methods.trim_stats import ModelThreshold
from tests import reference as ref

dims = st.tuples(st.integers(1, 6), st.integers(1, 8), st.integers(1, 12))  # (T, rows, d)


def family(seed: int, t: int, rows: int, d: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, d, generator=g, dtype=torch.float64)
    deltas = 0.1 * torch.randn(t, rows, d, generator=g, dtype=torch.float64)
    return base, deltas


@settings(max_examples=60, deadline=None)
@given(dims, st.integers(0, 10_000))
def test_orthogonal_part_is_orthogonal_to_pretrained_rows(shape, seed):
    t, rows, d = shape
    base, deltas = family(seed, t, rows, d)
    orth_only = neuron_merge(base, deltas.clone(), 0.0, 1.0)
    # The component along w0, relative to the task vectors' size (a cosine is meaningless when
    # psi_perp is only rounding noise, as it is for d = 1).
    along = (orth_only * base).sum(-1).abs() / base.norm(dim=-1)
    assert (along / deltas.norm(dim=-1).max()).max() < 1e-12


@settings(max_examples=60, deadline=None)
@given(dims, st.integers(0, 10_000), st.data())
def test_flipping_singular_vector_signs_changes_nothing(shape, seed, data):
    t, rows, d = shape
    base, deltas = family(seed, t, rows, d)
    w0 = base
    s = (deltas * w0).sum(-1) / (w0 * w0).sum(-1)
    orth = deltas - s.unsqueeze(-1) * w0
    u, sing = singular_basis(orth)
    flips = torch.tensor(data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=t, max_size=t)), dtype=torch.float64)
    a = merge_in_basis(orth, u, sing)
    b = merge_in_basis(orth, u * flips, sing)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 12), st.integers(0, 10_000))
def test_single_task_without_trim_returns_orthogonal_part(rows, d, seed):
    base, deltas = family(seed, 1, rows, d)
    got = neuron_merge(base, deltas.clone(), 0.0, 1.0)
    w0 = base
    s = (deltas[0] * w0).sum(-1) / (w0 * w0).sum(-1)
    tau_perp = deltas[0] - s.unsqueeze(-1) * w0
    torch.testing.assert_close(got, tau_perp, atol=1e-12, rtol=1e-9)
    # ... and lambda_1 = lambda_2 = 1 gives back the whole task vector.
    torch.testing.assert_close(neuron_merge(base, deltas.clone(), 1.0, 1.0), deltas[0], atol=1e-12, rtol=1e-9)


value_arrays = st.lists(
    st.lists(
        st.one_of(
            st.floats(-1e3, 1e3, allow_nan=False, width=32),
            st.sampled_from([0.0, 1.0, -1.0, 0.5, 1e-30, -2.5]),
        ),
        min_size=1,
        max_size=40,
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(value_arrays, st.floats(0.001, 1.0))
def test_model_threshold_is_kth_largest_of_concatenation(arrays, density):
    tensors = [torch.tensor(a, dtype=torch.float32) for a in arrays]
    acc = ModelThreshold(density)
    for t in tensors:
        acc.add_pass1(t.abs())
    acc.finish_pass1()
    if acc.needs_pass2:
        for t in tensors:
            acc.add_pass2(t.abs())
    threshold, sigma = acc.result()
    np_arrays = [t.numpy() for t in tensors]
    if density < 1:
        assert threshold == ref.kth_largest_abs(np_arrays, density)
        allv = np.abs(np.concatenate(np_arrays)).astype(np.float64)
        total = allv.sum()
        kept = allv[allv >= threshold].sum()
        want_sigma = 1 - kept / total if total > 0 else 0.0
        assert abs(sigma - want_sigma) < 1e-9
    else:
        assert (threshold, sigma) == (0.0, 0.0)


def test_model_threshold_on_large_gaussian_tensors():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=g) * s for n, s in [(100_000, 1.0), (37_000, 0.01), (250_000, 3.0)]]
    acc = ModelThreshold(0.2)
    for t in tensors:
        acc.add_pass1(t.abs())
    acc.finish_pass1()
    for t in tensors:
        acc.add_pass2(t.abs())
    threshold, _ = acc.result()
    assert threshold == ref.kth_largest_abs([t.numpy() for t in tensors], 0.2)


@settings(max_examples=200, deadline=None)
@given(value_arrays, st.floats(0.001, 1.0))
def test_topk_mask_keeps_exactly_k_largest(arrays, density):
    from merging.methods.trim import topk_mask

    values = torch.tensor([v for a in arrays for v in a], dtype=torch.float32)
    k = max(1, int(density * values.numel())) if density < 1 else values.numel()
    mask = topk_mask(values, density)
    order = sorted(range(values.numel()), key=lambda i: (-abs(float(values[i])), i))
    assert set(torch.nonzero(mask).reshape(-1).tolist()) == set(order[:k])  # ties: lowest index
    mk = topk_mask(values, density, ties="mergekit")
    assert int(mk.sum()) == k
    if k < values.numel():
        assert values.abs()[mk].min() >= values.abs()[~mk].max()
        want = torch.zeros_like(mk)
        want[torch.argsort(values.abs(), descending=True)[:k]] = True
        if values.abs()[mk].min() == values.abs()[~mk].max():  # ties straddle the threshold
            assert torch.equal(mk, want)


@settings(max_examples=100, deadline=None)
@given(value_arrays, st.floats(0.001, 0.999))
def test_kernel_and_torch_selection_agree(arrays, density):
    import merging.methods.kernels
    from merging.methods.trim import keep_count, kth_largest, threshold_form, topk_mask, trim_rules

    values = torch.tensor([v for a in arrays for v in a], dtype=torch.float32)
    k = keep_count(density, values.numel())
    fast = kth_largest(values, k)
    rule = trim_rules(values.unsqueeze(0), (density,), None)[0]
    fast_form = threshold_form(values.clone(), rule)
    original = merging.methods.kernels.available
    try:
        merging.methods.kernels.available = lambda *tensors: False
        assert kth_largest(values, k) == fast
        assert threshold_form(values.clone(), rule) == fast_form
        slow_mask = topk_mask(values, density)
    finally:
        merging.methods.kernels.available = original
    assert torch.equal(topk_mask(values, density), slow_mask)
