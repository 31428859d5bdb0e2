"""NeuroMerging on the degenerate inputs real models produce, against the per-neuron SVD reference.

Zero task rows (trimmed away, or embedding rows a fine-tune never touched), rows parallel to the
pretrained neuron, duplicated rows, T larger than the row, mixed sparsity and half precision. The
reference computes coordinates as C = O V, as the authors' kernel does, so a zero row votes with
exact zeros; the fast path must agree to 1e-9 in float64 and 1e-4 (relative) in float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import reference as ref
from tests.helpers import neuron_merge_on_device as neuron_merge


def trim_rows(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Keeps the top `density` share of |entries| of each task vector (per task, whole tensor)."""
    out = torch.zeros_like(deltas)
    for t in range(deltas.shape[0]):
        flat = deltas[t].reshape(-1)
        k = max(1, int(density * flat.numel()))
        idx = flat.abs().topk(k).indices
        out[t].view(-1)[idx] = flat[idx]
    return out


def reference(base: torch.Tensor, deltas: torch.Tensor, lam_par: float, lam_orth: float) -> np.ndarray:
    return ref.neuromerging_rows(ref.as_np(base), [ref.as_np(d) for d in deltas], lam_par, lam_orth)


def relative_error(got: torch.Tensor, want: np.ndarray) -> float:
    scale = max(float(np.abs(want).max()), 1e-300)
    return float(np.abs(ref.as_np(got) - want).max()) / scale


def test_sparse_task_rows_match_reference_where_the_old_gram_path_did_not():
    # The case that exposed the bug: 512 x 48, 8 tasks at 5% density. Many neurons have a task
    # whose trimmed row is all zero; their coordinates must be exact zeros that never vote.
    g = torch.Generator().manual_seed(7)
    base = torch.randn(512, 48, generator=g, dtype=torch.float64)
    deltas = trim_rows(0.05 * torch.randn(8, 512, 48, generator=g, dtype=torch.float64), 0.05)
    zero_rows = deltas.abs().sum(-1) == 0  # (T, rows)
    mixed = zero_rows.any(0) & ~zero_rows.all(0)
    assert int(mixed.sum()) > 200  # the degenerate case is the common one here
    got = neuron_merge(base, deltas.clone(), 0.0, 1.0)
    want = reference(base, deltas, 0.0, 1.0)
    np.testing.assert_allclose(ref.as_np(got), want, atol=1e-9 * np.abs(want).max())
    got_full = neuron_merge(base, deltas.clone(), 0.7, 1.3)
    np.testing.assert_allclose(ref.as_np(got_full), reference(base, deltas, 0.7, 1.3), atol=1e-9)


def test_single_live_task_in_a_neuron_returns_its_orthogonal_row():
    # Three tasks, only task 1 moved this neuron: the merge is task 1's orthogonal part, undivided.
    base = torch.tensor([[1.0, 2.0, 0.5, -1.0]], dtype=torch.float64)
    deltas = torch.zeros(3, 1, 4, dtype=torch.float64)
    deltas[1, 0] = torch.tensor([0.3, -0.2, 0.4, 0.1], dtype=torch.float64)
    got = neuron_merge(base, deltas.clone(), 0.0, 1.0)
    w0 = base[0]
    tau = deltas[1, 0]
    want = tau - (tau @ w0) / (w0 @ w0) * w0
    torch.testing.assert_close(got[0], want, atol=1e-15, rtol=1e-12)


def test_task_parallel_to_the_base_row_does_not_vote_in_the_orthogonal_mean():
    # Task 0 is a multiple of w0 (orthogonal part is rounding noise), task 1 is a real change.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 10, generator=g, dtype=torch.float64)
    deltas = torch.stack([0.2 * base, 0.1 * torch.randn(6, 10, generator=g, dtype=torch.float64)])
    got = neuron_merge(base, deltas.clone(), 0.0, 1.0)
    w0 = base
    tau = deltas[1]
    want = tau - ((tau * w0).sum(-1, keepdim=True) / (w0 * w0).sum(-1, keepdim=True)) * w0
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-9)
    np.testing.assert_allclose(ref.as_np(got), reference(base, deltas, 0.0, 1.0), atol=1e-12)


def test_parallel_scalar_of_a_zero_row_does_not_vote():
    # Row 0: task 0 scales the neuron by +0.4, task 1 did not touch it: s_bar is 0.4, not 0.2.
    base = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    deltas = torch.zeros(2, 1, 3, dtype=torch.float64)
    deltas[0, 0, 0] = 0.4
    got = neuron_merge(base, deltas.clone(), 1.0, 1.0)
    torch.testing.assert_close(got[0], torch.tensor([0.4, 0.0, 0.0], dtype=torch.float64))


def _structured_family(draw_seed: int, t: int, rows: int, d: int, kinds: list[str], dtype=torch.float64):
    """Builds (base, deltas) whose task rows are zero, parallel to w0, duplicated or sparse, per `kinds`."""
    g = torch.Generator().manual_seed(draw_seed)
    base = torch.randn(rows, d, generator=g, dtype=torch.float64)
    deltas = 0.1 * torch.randn(t, rows, d, generator=g, dtype=torch.float64)
    for k in range(rows):
        kind = kinds[k % len(kinds)]
        if kind == "zero_rows":
            deltas[: max(1, t // 2), k] = 0.0
        elif kind == "parallel":
            deltas[0, k] = 0.3 * base[k]
        elif kind == "duplicate" and t > 1:
            deltas[1, k] = deltas[0, k]
        elif kind == "sparse":
            mask = torch.rand(t, d, generator=g) < 0.25
            deltas[:, k] = deltas[:, k] * mask
        elif kind == "zero_base":
            base[k] = 0.0
        elif kind == "all_zero":
            deltas[:, k] = 0.0
    return base.to(dtype), deltas.to(dtype)


KINDS = st.lists(
    st.sampled_from(["dense", "zero_rows", "parallel", "duplicate", "sparse", "zero_base", "all_zero"]),
    min_size=1,
    max_size=4,
)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 7), st.integers(1, 6), st.integers(1, 12), st.integers(0, 100_000), KINDS, st.booleans())
def test_fast_path_matches_reference_on_degenerate_rows_float64(t, rows, d, seed, kinds, full):
    base, deltas = _structured_family(seed, t, rows, d, kinds)
    lam_par = 0.6 if full else 0.0
    got = neuron_merge(base, deltas.clone(), lam_par, 1.2)
    want = reference(base, deltas, lam_par, 1.2)
    scale = max(float(deltas.abs().max()), 1e-12)
    np.testing.assert_allclose(ref.as_np(got), want, atol=1e-9 * scale, rtol=0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(2, 16), st.integers(0, 100_000), KINDS)
def test_fast_path_matches_reference_on_degenerate_rows_float32(t, rows, d, seed, kinds):
    base, deltas = _structured_family(seed, t, rows, d, kinds, dtype=torch.float32)
    got = neuron_merge(base, deltas.clone(), 0.0, 1.0, compute_dtype=torch.float32)
    want = reference(base, deltas, 0.0, 1.0)
    scale = max(float(np.abs(want).max()), float(deltas.abs().max()) * 1e-3, 1e-12)
    np.testing.assert_allclose(ref.as_np(got), want, atol=1e-4 * scale, rtol=0)


@pytest.mark.parametrize("t,d", [(6, 3), (8, 2), (5, 1)])
def test_more_tasks_than_row_length(t, d):
    g = torch.Generator().manual_seed(t * 10 + d)
    base = torch.randn(7, d, generator=g, dtype=torch.float64)
    deltas = 0.1 * torch.randn(t, 7, d, generator=g, dtype=torch.float64)
    deltas[0, :3] = 0.0
    got = neuron_merge(base, deltas.clone(), 0.4, 1.0)
    np.testing.assert_allclose(ref.as_np(got), reference(base, deltas, 0.4, 1.0), atol=1e-9)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_with_zero_rows(dtype):
    # Half-precision checkpoints: computed in float32, cast back; compare with the float64 reference
    # on the same (rounded) inputs, within the output dtype's resolution.
    g = torch.Generator().manual_seed(11)
    base = torch.randn(64, 24, generator=g).to(dtype)
    deltas = trim_rows(0.05 * torch.randn(4, 64, 24, generator=g), 0.1).to(dtype)
    got = neuron_merge(base, deltas.clone(), 0.0, 1.0, compute_dtype=torch.float32)
    assert got.dtype == dtype
    want = reference(base.double(), deltas.double(), 0.0, 1.0)
    assert relative_error(got.double(), want) < 4 * float(torch.finfo(dtype).eps)
