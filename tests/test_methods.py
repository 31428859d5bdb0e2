"""Every merge method against the slow reference in tests/reference.py, on random tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.engine.plan import Role
from merging.methods import get_method
from merging.methods.base import ModelStats, TensorInputs, tensor_seed
from merging.methods.trim import topk_mask
from tests import reference as ref
from tests.helpers import neuron_merge_on_device as neuron_merge
from tests.helpers import test_device


def make_inputs(base, fts, weights=None, densities=None, role=Role.NEURON, seed=0, name="w"):
    """Returns one tensor's inputs, on the test device."""
    device = test_device()
    deltas = torch.stack([ft - base for ft in fts]).to(device)
    t = len(fts)
    return TensorInputs(
        name=name,
        role=role,
        base=base.to(device),
        deltas=deltas,
        weights=torch.tensor(weights or [1.0] * t, dtype=torch.float64),
        densities=tuple(densities or [1.0] * t),
        seed=seed,
    )


def random_family(rng, shape, t, dtype=torch.float64, scale=0.1):
    base = torch.randn(shape, generator=rng, dtype=dtype)
    fts = [base + scale * torch.randn(shape, generator=rng, dtype=dtype) for _ in range(t)]
    return base, fts


@pytest.fixture(params=["kernel", "torch"])
def ties_path(request, monkeypatch):
    """Runs a test through the fused CPU kernel and through the torch formulation."""
    import merging.methods.kernels

    if request.param == "torch":
        monkeypatch.setattr(merging.methods.kernels, "available", lambda *tensors: False)
    else:
        assert merging.methods.kernels.available(torch.zeros(1))
    return request.param


def run(method, inputs, params=None, stats=None):
    m = get_method(method)
    p = m.params_model.model_validate(params or {})
    return m.merge(inputs, p, stats or ModelStats()).cpu()


@pytest.mark.parametrize("t", [1, 2, 5])
@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_matches_reference(rng, t, normalize):
    base, fts = random_family(rng, (6, 7), t)
    weights = [0.3 + 0.4 * i for i in range(t)]
    got = base + run("task_arithmetic", make_inputs(base, fts, weights), {"lambda": 0.7, "normalize": normalize})
    want = ref.task_arithmetic(ref.as_np(base), [ref.as_np(f) for f in fts], weights, 0.7, normalize)
    np.testing.assert_allclose(ref.as_np(got), want, atol=1e-12)


@pytest.mark.parametrize("t", [1, 3, 6])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("uniform", [None, 1.0, 0.4, -0.7, 0.0])
def test_ties_matches_reference(rng, t, normalize, density, uniform, ties_path):
    base, fts = random_family(rng, (5, 8), t)
    weights = [1.0, 0.5, 2.0, 1.0, 0.7, 1.3][:t] if uniform is None else [uniform] * t
    got = base + run("ties", make_inputs(base, fts, weights, [density] * t), {"lambda": 0.9, "normalize": normalize})
    want = ref.ties(ref.as_np(base), [ref.as_np(f) for f in fts], weights, [density] * t, 0.9, normalize)
    np.testing.assert_allclose(ref.as_np(got), want, atol=1e-12)


def test_ties_all_zero_task_vectors_give_base(rng, ties_path):
    base = torch.randn(4, 5, generator=rng, dtype=torch.float64)
    got = run("ties", make_inputs(base, [base.clone(), base.clone()], densities=[0.3, 0.3]))
    assert torch.count_nonzero(got) == 0


def test_topk_mask_keeps_exactly_k_with_ties():
    values = torch.tensor([3.0, -1.0, 1.0, 1.0, -3.0, 0.0, 1.0])
    mask = topk_mask(values, 0.5)  # k = 3: both 3s, then the first of the four tied 1s
    assert mask.tolist() == [True, True, False, False, True, False, False]
    mk = topk_mask(values, 0.5, ties="mergekit")
    want = torch.zeros_like(mask)
    want[torch.argsort(values.abs(), descending=True)[:3]] = True  # mergekit's choice among ties
    assert torch.equal(mk, want)
    no_ties = torch.tensor([0.5, -4.0, 2.0, 0.1, -3.0])
    np.testing.assert_array_equal(ref.keep_topk(no_ties.numpy().astype(np.float64), 0.4) != 0, topk_mask(no_ties, 0.4))


def test_dare_same_seed_same_bits_and_drop_rate(rng):
    base, fts = random_family(rng, (64, 64), 3, dtype=torch.float32)
    a = run("dare_ties", make_inputs(base, fts, densities=[0.3] * 3, seed=7))
    b = run("dare_ties", make_inputs(base, fts, densities=[0.3] * 3, seed=7))
    c = run("dare_ties", make_inputs(base, fts, densities=[0.3] * 3, seed=8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    inputs = make_inputs(base, fts[:1], densities=[0.25], seed=3)
    tau = inputs.deltas[0].clone().cpu()
    got = run("dare_linear", inputs)
    kept = got != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.03
    torch.testing.assert_close(got[kept], tau[kept] / 0.25)


def _dare_reference_taus(base, fts, densities, seed, name):
    """Applies the documented mask: rand(shape, generator seeded by tensor_seed(seed, name, t)) < density."""
    taus = []
    for t, (ft, d) in enumerate(zip(fts, densities)):
        gen = torch.Generator().manual_seed(tensor_seed(seed, name, t))
        keep = (torch.rand(ft.shape, generator=gen) < d).numpy()
        taus.append(np.where(keep, ref.as_np(ft - base) / d, 0.0))
    return taus


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_reference(rng, method, ties_path):
    base, fts = random_family(rng, (10, 10), 3)
    weights, densities = [0.5, 1.5, 1.0], [0.4, 0.6, 0.9]
    got = run(method, make_inputs(base, fts, weights, densities, seed=11, name="layer.w"), {"lambda": 0.8})
    taus = _dare_reference_taus(base, fts, densities, 11, "layer.w")
    if method == "dare_linear":
        want = 0.8 * sum(w * t for w, t in zip(weights, taus))
    else:
        want = 0.8 * ref.ties_entrywise(taus, weights, normalize=False)
    np.testing.assert_allclose(ref.as_np(got), want, atol=1e-12)


@pytest.mark.parametrize("shape,t", [((6, 9), 1), ((5, 4), 3), ((4, 3), 6), ((3, 16), 4)])
@pytest.mark.parametrize("lam_par", [0.0, 0.6])
def test_neuromerging_rows_match_per_neuron_svd(rng, shape, t, lam_par):
    base, fts = random_family(rng, shape, t)
    deltas = torch.stack([f - base for f in fts])
    got = neuron_merge(base, deltas.clone(), lam_par, 1.3)
    want = ref.neuromerging_rows(ref.as_np(base), [ref.as_np(d) for d in deltas], lam_par, 1.3)
    np.testing.assert_allclose(ref.as_np(got), want, atol=1e-9)


def test_neuromerging_energy_threshold_matches_reference(rng):
    base, fts = random_family(rng, (6, 12), 4)
    deltas = torch.stack([f - base for f in fts])
    got = neuron_merge(base, deltas.clone(), 0.0, 1.0, energy_threshold=0.6)
    want = ref.neuromerging_rows(ref.as_np(base), [ref.as_np(d) for d in deltas], 0.0, 1.0, energy_threshold=0.6)
    np.testing.assert_allclose(ref.as_np(got), want, atol=1e-9)
    full = neuron_merge(base, deltas.clone(), 0.0, 1.0)
    assert not torch.allclose(got, full)


def test_neuromerging_zero_norm_rows_are_all_orthogonal(rng):
    base, fts = random_family(rng, (5, 6), 3)
    base[1] = 0.0
    base[3] = 0.0
    deltas = torch.stack([f - base for f in fts])
    got = neuron_merge(base, deltas.clone(), 0.5, 1.0)
    want = ref.neuromerging_rows(ref.as_np(base), [ref.as_np(d) for d in deltas], 0.5, 1.0)
    np.testing.assert_allclose(ref.as_np(got), want, atol=1e-9)
    assert torch.isfinite(got).all()


def test_neuromerging_all_zero_task_vectors(rng):
    base = torch.randn(4, 5, generator=rng, dtype=torch.float64)
    got = run("neuromerging", make_inputs(base, [base.clone()] * 3), {"trim_scope": "tensor", "lambda": 1.0})
    assert torch.count_nonzero(got) == 0


def test_neuromerging_method_trims_and_handles_points(rng):
    base, fts = random_family(rng, (6, 10), 3)
    inputs = make_inputs(base, fts, densities=[0.4] * 3)
    taus = [ref.keep_topk(ref.as_np(f - base), 0.4) for f in fts]
    got = run(
        "neuromerging",
        inputs,
        {"trim_scope": "tensor", "lambda": 1.5, "lambda_parallel": 0.25, "compute_dtype": "float64"},
    )
    want = ref.neuromerging_rows(ref.as_np(base), taus, 0.25, 1.5)
    np.testing.assert_allclose(ref.as_np(got), want, atol=1e-9)
    pbase, pfts = random_family(rng, (9,), 4)
    pin = make_inputs(pbase, pfts, densities=[0.5] * 4, role=Role.POINT)
    ptaus = [ref.keep_topk(ref.as_np(f - pbase), 0.5) for f in pfts]
    got_p = run("neuromerging", pin, {"trim_scope": "tensor", "lambda": 2.0})
    np.testing.assert_allclose(ref.as_np(got_p), ref.neuromerging_points(ptaus, 2.0), atol=1e-12)


def test_neuromerging_auto_lambda_uses_max_sigma(rng):
    base, fts = random_family(rng, (4, 4), 2)
    stats = ModelStats(trimmed_l1_fraction=(0.2, 0.6))
    got = run("neuromerging", make_inputs(base, fts), {"trim_scope": "tensor"}, stats)
    ref_lam1 = run("neuromerging", make_inputs(base, fts), {"trim_scope": "tensor", "lambda": 2.5})
    torch.testing.assert_close(got, ref_lam1)  # 1 / (1 - 0.6) = 2.5


def test_neuromerging_float32_compute_close_to_float64(rng):
    base, fts = random_family(rng, (32, 48), 4, dtype=torch.float32)
    deltas = torch.stack([f - base for f in fts])
    a = neuron_merge(base, deltas.clone(), 0.3, 1.0, compute_dtype=torch.float32)
    b = neuron_merge(base, deltas.clone(), 0.3, 1.0, compute_dtype=torch.float64)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_neuromerging_parallel_tie_takes_sign_of_matrix_sum():
    base = torch.zeros(3, 4, dtype=torch.float64)
    base[:, 0] = 1.0
    deltas = torch.zeros(2, 3, 4, dtype=torch.float64)
    deltas[0, 0, 0], deltas[1, 0, 0] = 1.0, -1.0  # row 0: scalars +1, -1 sum to 0 (a tie)
    deltas[0, 1, 0], deltas[1, 1, 0] = -3.0, -1.0  # row 1 makes the matrix sum negative
    deltas[0, 2, 1] = 0.5  # an orthogonal part too
    got = neuron_merge(base, deltas.clone(), 1.0, 1.0)
    want = ref.neuromerging_rows(ref.as_np(base), [ref.as_np(d) for d in deltas], 1.0, 1.0)
    np.testing.assert_allclose(ref.as_np(got), want, atol=1e-12)
    assert got[0, 0] == -1.0  # the tie took the matrix's negative sign
