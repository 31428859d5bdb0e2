"""NeuroMerging: merge each neuron's task vectors in the subspaces parallel and orthogonal to it.

Fang et al., 2025, "To See a World in a Spark of Neuron" (EMNLP 2025). For neuron row k with
pretrained weights w0, task vector tau_t splits into s_t w0 (s_t = <tau_t, w0>/||w0||^2) and the
orthogonal rest O_t. The parallel scalars are TIES-merged; the T orthogonal rows are expressed
in their singular basis (O = U S V^T), their coordinates C = O V = U S are TIES-merged per
direction, and psi_perp = sum_j cbar_j v_j.

The singular basis comes from the T x T Gram matrix G = O O^T = U S^2 U^T (batched eigh), so no
d-dimensional SVD is computed: v_j = O^T u_j / s_j, hence psi_perp = O^T (U (cbar / s)).

Zeros never vote. The authors' kernel (ZzzitaoFang/NeuroMerging, `neuro_kernel`) computes C = O V,
so a task whose orthogonal row is zero (trimmed away, or parallel to w0) has exact zero
coordinates. U diag(s) from eigh gives them rounding-size values instead, which would count in the
disjoint mean whenever their sign agreed; such rows are therefore masked out of G_O, and a
coordinate (or parallel scalar) that is float32 rounding noise relative to its scale is zero.

Deliberate differences from the authors' kernel:
- A direction whose coordinates sum to exactly 0 takes the sign of its largest coordinate (the
  kernel: the majority of the neuron's elected signs, which flips with singular-vector signs); a
  parallel-scalar tie takes the sign of the matrix's sum of scalars (the kernel: majority of signs).
- 1-D tensors: TIES scaled by lambda_2 (the kernel's TIES is unscaled).
- ||w0|| = 0 makes the row wholly orthogonal (the kernel divides by zero); directions below the
  noise floor are dropped (the kernel keeps arbitrary null-space vectors).
- Accuracy: the noise floor is float32's in either compute dtype, so float64 compute is a more
  accurate float32 merge; float32 compute keeps ~1e-5 relative error where the kernel's float32
  SVD reached 6e-2 on the same weights.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merging.engine.plan import Role
from merging.methods.base import (
    ModelStats,
    StatsRequest,
    TensorInputs,
    TrimParams,
    broadcast_weights,
    register_method,
)
from merging.methods.ties_core import disjoint_mean, elect_sign
from merging.methods.trim import trim_

ZERO_NORM2 = 1e-30
CHUNK_BYTES = 8 * 1024 * 1024
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


class NeuroMergingParams(TrimParams):
    trim_scope: Literal["tensor", "model"] = "model"
    density: float | None = Field(default=0.2, gt=0, le=1, description="share of each task vector kept")
    lambda_: float | Literal["auto"] = Field(
        default="auto", alias="lambda", description="lambda_2, scale of the orthogonal part; auto = 1/(1-sigma)"
    )
    lambda_parallel: float = Field(default=0.0, description="lambda_1, scale of the parallel part; 0 = Lite")
    energy_threshold: float = Field(
        default=1.0, gt=0, le=1, description="keep the leading singular directions holding this share of energy"
    )
    compute_dtype: Literal["float32", "float64"] = Field(
        default="float32", description="precision of the bulk products (the T x T eigenproblems are always float64)"
    )


def resolve_lambda(params: NeuroMergingParams, stats: ModelStats) -> float:
    """Returns lambda_2: the configured value, or 1/(1 - max_t sigma_t) for `auto`."""
    if params.lambda_ != "auto":
        return float(params.lambda_)
    sigmas = stats.trimmed_l1_fraction or (0.0,)
    sigma = max(sigmas)
    return 1.0 / (1.0 - sigma) if sigma < 1.0 else 1.0


def _column_tie_sign(coords: torch.Tensor) -> torch.Tensor:
    """Returns, per neuron and direction, the sign of the entry of largest magnitude.

    It breaks a tie (a direction whose coordinates sum to 0) and flips with the direction's
    arbitrary sign, so the merge stays independent of singular-vector signs.
    """
    idx = coords.abs().argmax(dim=1, keepdim=True)  # coords: (rows, T, r)
    sign = torch.sign(torch.gather(coords, 1, idx)).squeeze(1)
    return torch.where(sign == 0, torch.ones_like(sign), sign)


def noise_factor(t: int, d: int) -> float:
    """Returns c = max(T, d) * eps32: the relative size of float32 rounding noise in a d-long product.

    float32's eps in every compute dtype: a value this small relative to its scale is noise in
    float32 arithmetic (the precision checkpoints are trained in), so float64 compute gives the
    same merge more accurately instead of letting noise-sized values vote where float32 would not.
    """
    return max(t, d) * FLOAT32_EPS


def singular_basis(orth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (U, s) per row of `orth` (T, rows, d): O = U diag(s) V^T, from the T x T Gram matrix."""
    rows_first = orth.permute(1, 0, 2)  # (rows, T, d)
    gram = torch.bmm(rows_first, rows_first.transpose(1, 2)).to(torch.float64)
    evals, u = torch.linalg.eigh(gram)  # ascending
    return u, evals.clamp_min(0).sqrt()


def orthogonal_mix(
    u: torch.Tensor,
    sing: torch.Tensor,
    live: torch.Tensor,
    noise_energy: torch.Tensor | float,
    c: float,
    energy_threshold: float = 1.0,
) -> torch.Tensor:
    """Returns a (rows, T) such that psi_perp = sum_t a_t O_t: TIES over C = U diag(s) per direction.

    psi_perp = sum_j cbar_j v_j with v_j = O^T u_j / s_j, so a = U (cbar / s). Directions whose
    energy s_j^2 is at or below `noise_energy` (rounding noise of the Gram matrix) are dropped;
    with energy_threshold < 1 only the leading directions holding that share of sum s_j^2 are kept.
    A task that is not `live` (its orthogonal row is zero) has coordinates exactly 0, and a
    coordinate at or below c * s_j is rounding noise of direction j: neither counts in the mean.
    """
    energy = sing * sing
    keep = energy > noise_energy
    if energy_threshold < 1:
        order = torch.argsort(energy, dim=1, descending=True)
        sorted_energy = torch.gather(energy, 1, order)
        before = (sorted_energy.cumsum(1) - sorted_energy) / energy.sum(1, keepdim=True).clamp_min(1e-300)
        keep &= torch.zeros_like(keep).scatter(1, order, before < energy_threshold)
    coords = u * sing.unsqueeze(1)  # C[k, t, j] = u_j[t] * s_j
    counted = live.unsqueeze(2) & (coords.abs() > c * sing.unsqueeze(1))
    coords = torch.where(counted, coords, torch.zeros_like(coords))
    elected = elect_sign(coords.transpose(0, 1), _column_tie_sign(coords))  # (rows, r)
    cbar = disjoint_mean(coords.transpose(0, 1), elected)
    cbar = torch.where(keep, cbar / torch.where(keep, sing, torch.ones_like(sing)), torch.zeros_like(cbar))
    mix = torch.bmm(u, cbar.unsqueeze(2)).squeeze(2)
    return torch.where(live, mix, torch.zeros_like(mix))


def merge_in_basis(
    orth: torch.Tensor, u: torch.Tensor, sing: torch.Tensor, energy_threshold: float = 1.0
) -> torch.Tensor:
    """Returns psi_perp (rows, d) for orthogonal rows `orth` (T, rows, d) given their singular basis."""
    t, d = orth.shape[0], orth.shape[2]
    c = noise_factor(t, d)
    noise = (sing * sing).max(dim=1, keepdim=True).values * c
    live = (orth * orth).sum(dim=2).t() > 0
    mix = orthogonal_mix(u, sing, live, noise, c, energy_threshold)
    return torch.bmm(mix.to(orth.dtype).unsqueeze(1), orth.permute(1, 0, 2)).squeeze(1)


def neuron_merge(
    base: torch.Tensor,
    deltas: torch.Tensor,
    lambda_parallel: float,
    lambda_orth: float,
    energy_threshold: float = 1.0,
    compute_dtype: torch.dtype = torch.float64,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns lambda_1 psi_par + lambda_2 psi_perp for a (rows, d) weight and (T, rows, d) task vectors.

    The result is written into `out` when given, which may be deltas[0]: each block of rows is copied out of the task
    vectors before its result is written.

    Per neuron, X = [tau_1 .. tau_T; w0] (T+1 rows). One batched Gram matrix X X^T holds every
    <tau_a, tau_b>, <tau_t, w0> and ||w0||^2; the orthogonal parts' Gram matrix follows as
    G_O = G_tau - ||w0||^2 s s^T, so the orthogonal rows are never formed. The result
    sum_t a_t O_t + lambda_1 sbar w0 = sum_t a_t tau_t + (lambda_1 sbar - sum_t a_t s_t) w0 is one
    batched product coef @ X. Three passes over the task vectors, small temporaries.

    Rounding noise never counts as a task's vote (c = max(T, d) * eps32, see noise_factor): a
    scalar with |<tau_t, w0>| <= c ||tau_t|| ||w0||, and an orthogonal row with ||O_t||^2 <= c ||tau_t||^2
    (a zero row, or one parallel to w0), are zero, as they are in the authors' kernel (C = O V).
    """
    t, m, d = deltas.shape
    if out is None:
        out = torch.empty((m, d), dtype=deltas.dtype, device=base.device)
    c = noise_factor(t, d)
    scalars = torch.empty((m, t), dtype=torch.float64, device=base.device)
    s_bars = torch.empty(m, dtype=torch.float64, device=base.device)
    chunk = max(1, CHUNK_BYTES // max(1, (t + 1) * d * torch.finfo(compute_dtype).bits // 8))
    stack = torch.empty((min(chunk, m), t + 1, d), dtype=compute_dtype, device=base.device)
    for lo in range(0, m, chunk):
        hi = min(m, lo + chunk)
        x = stack[: hi - lo]
        x[:, :t].copy_(deltas[:, lo:hi].transpose(0, 1))
        x[:, t].copy_(base[lo:hi])
        gram = torch.bmm(x, x.transpose(1, 2)).to(torch.float64)  # (r, T+1, T+1)
        norm2 = gram[:, t, t]
        inv_norm2 = torch.where(norm2 > ZERO_NORM2, 1.0 / norm2.clamp_min(ZERO_NORM2), torch.zeros_like(norm2))
        s = gram[:, :t, t] * inv_norm2.unsqueeze(1)  # (r, T)
        tau_energy = torch.diagonal(gram[:, :t, :t], dim1=1, dim2=2)  # (r, T)
        g_orth = gram[:, :t, :t] - norm2[:, None, None] * s.unsqueeze(2) * s.unsqueeze(1)
        live = torch.diagonal(g_orth, dim1=1, dim2=2) > c * tau_energy
        g_orth = g_orth * (live.unsqueeze(2) & live.unsqueeze(1))
        evals, u = torch.linalg.eigh(g_orth)
        sing = evals.clamp_min(0).sqrt()
        # G_O carries rounding noise of about eps * ||tau||^2: directions below it are not real.
        noise = torch.maximum(evals.amax(dim=1, keepdim=True), tau_energy.amax(dim=1, keepdim=True)) * c
        mix = orthogonal_mix(u, sing, live, noise, c, energy_threshold)  # (r, T)
        # Parallel part: TIES over the scalars, ties provisionally +1 (fixed below if needed).
        votes = gram[:, :t, t].abs() > c * (tau_energy * norm2.unsqueeze(1)).sqrt()
        s_votes = torch.where(votes, s, torch.zeros_like(s))
        s_bar = disjoint_mean(s_votes.t(), elect_sign(s_votes.t(), 1.0))
        scalars[lo:hi], s_bars[lo:hi] = s_votes, s_bar
        coef = torch.empty((hi - lo, 1, t + 1), dtype=torch.float64, device=base.device)
        coef[:, 0, :t] = lambda_orth * mix
        coef[:, 0, t] = lambda_parallel * s_bar - lambda_orth * (mix * s).sum(dim=1)
        out[lo:hi] = torch.bmm(coef.to(compute_dtype), x).squeeze(1).to(out.dtype)
    if lambda_parallel and float(scalars.sum()) < 0:
        # A neuron whose scalars sum to exactly 0 takes the sign of the sum over the matrix.
        tied = (scalars.sum(dim=1) == 0) & (scalars != 0).any(dim=1)
        if bool(tied.any()):
            fixed = disjoint_mean(scalars[tied].t(), elect_sign(scalars[tied].t(), -1.0))
            delta = (lambda_parallel * (fixed - s_bars[tied])).to(out.dtype)
            out[tied] += delta.unsqueeze(1) * base[tied].to(out.dtype)
    return out


def _stats(params: NeuroMergingParams) -> StatsRequest | None:
    scope = params.trim_scope == "model"
    auto = params.lambda_ == "auto"
    if not scope and not auto:
        return None
    return StatsRequest(model_thresholds=scope, trimmed_l1=auto)


def _describe(p: NeuroMergingParams) -> str:
    variant = "Lite" if p.lambda_parallel == 0 else "Full"
    return (
        f"NeuroMerging {variant}: lambda_1={p.lambda_parallel}, lambda_2={p.lambda_}, "
        f"trim_scope={p.trim_scope}, energy_threshold={p.energy_threshold}, compute_dtype={p.compute_dtype}"
    )


@register_method(
    "neuromerging",
    pretty_name="NeuroMerging",
    reference_url="https://arxiv.org/abs/2503.05320",
    params=NeuroMergingParams,
    stats_request=_stats,
    describe=_describe,
    row_blocks=True,
    trims_first=True,
)
def neuromerging(inputs: TensorInputs, params: NeuroMergingParams, stats: ModelStats) -> torch.Tensor:
    """Returns the NeuroMerging task vector of one tensor (TIES for 1-D tensors)."""
    lambda_orth = resolve_lambda(params, stats)
    deltas = inputs.deltas
    if not inputs.prepared:
        trim_(deltas, inputs.densities, stats.thresholds, params.trim_ties, inputs.rules)
        deltas.mul_(broadcast_weights(inputs.weights, deltas))
    if inputs.role == Role.POINT or inputs.base.dim() != 2:
        flat = deltas.reshape(deltas.shape[0], -1)
        return lambda_orth * disjoint_mean(flat, elect_sign(flat, 1.0)).reshape(inputs.base.shape)
    dtype = torch.float64 if params.compute_dtype == "float64" else torch.float32
    # Written into the first task vector's rows (a view of `deltas`, as the method contract allows): at 1B that
    # saves a float32 copy of the embedding.
    return neuron_merge(
        inputs.base, deltas, params.lambda_parallel, lambda_orth, params.energy_threshold, dtype, out=deltas[0]
    )
