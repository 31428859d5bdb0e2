"""TIES-Merging: trim, elect sign, disjoint mean (Yadav et al., 2023)."""

from __future__ import annotations

import torch
from pydantic import Field

from merging.methods import kernels
from merging.methods.base import (
    ModelStats,
    StatsRequest,
    TensorInputs,
    TrimParams,
    register_method,
)
from merging.methods.ties_core import disjoint_mean, elect_sign
from merging.methods.trim import CHUNK, TrimRule, apply_trim_, chunks, threshold_form, trim_rules


class TiesParams(TrimParams):
    lambda_: float = Field(default=1.0, alias="lambda", description="scale of the merged task vector")
    normalize: bool = Field(default=True, description="divide by the weights of the agreeing entries")


def ties_merge(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    normalize: bool,
    lambda_: float,
    rules: list[TrimRule] | None = None,
) -> torch.Tensor:
    """Returns lambda * the disjoint merge of w_t tau_t (mergekit's rule: sign of the weighted sum, ties +1).

    Trims (when `rules` are given), weighs, elects and averages one chunk of columns at a time,
    writing each chunk's result into deltas[0]: one pass over the task vectors, small temporaries.
    """
    t = deltas.shape[0]
    flat = deltas.reshape(t, -1)
    out = flat[0]
    w = weights.to(flat.dtype).reshape(t, 1)
    # Equal weights (the usual case) need no weighting pass: the disjoint mean's divisor is
    # then w * count, and the weighted sum is w * sum.
    uniform = bool((weights == weights[0]).all())
    w0 = float(weights[0])
    if uniform and w0 < 0:
        flat.neg_()  # the agreeing set is chosen on the signs of w * tau
    if kernels.available(flat) and flat.is_contiguous():
        forms = [threshold_form(flat[i], rules[i]) if rules is not None else (0.0, flat.shape[1]) for i in range(t)]
        # The kernel writes each block of columns after reading it, so it can write into row 0 itself.
        kernels.ties_columns(flat, [f[0] for f in forms], [f[1] for f in forms], weights, normalize, 1.0, out)
        _finish_uniform(out, uniform, w0, normalize)
        if lambda_ != 1:
            out.mul_(lambda_)
        return out.reshape(deltas.shape[1:])
    seen = [0] * t
    for s, e in chunks(flat.shape[1], max(1, CHUNK // t)):
        c = flat[:, s:e]
        if rules is not None:
            for i in range(t):
                seen[i] = apply_trim_(c[i], rules[i], s, seen[i])
        if not uniform:
            c.mul_(w)
        elected = elect_sign(c, tie_sign=1.0)
        if normalize:
            mixed = disjoint_mean(c, elected, None if uniform else weights)
        else:
            mixed = (c * ((c * elected) > 0)).sum(dim=0)
        _finish_uniform(mixed, uniform, w0, normalize)
        if lambda_ != 1:
            mixed *= lambda_
        out[s:e] = mixed
    return out.reshape(deltas.shape[1:])


def _finish_uniform(mixed: torch.Tensor, uniform: bool, w0: float, normalize: bool) -> None:
    """Applies, in place, the common weight w0 that a uniform-weight merge left out."""
    if not uniform:
        return
    if normalize:
        if w0 <= 0:
            mixed.mul_(-1.0 if w0 < 0 else 0.0)
    elif abs(w0) != 1:
        mixed.mul_(abs(w0))


def trim_stats(params: TrimParams) -> StatsRequest | None:
    """Returns the planning pass a magnitude-trimming method needs (thresholds for model scope)."""
    return StatsRequest(model_thresholds=True, trimmed_l1=False) if params.trim_scope == "model" else None


@register_method(
    "ties",
    pretty_name="TIES",
    reference_url="https://arxiv.org/abs/2306.01708",
    params=TiesParams,
    stats_request=trim_stats,
    describe=lambda p: f"lambda={p.lambda_}, normalize={p.normalize}, trim_scope={p.trim_scope}",
    row_blocks=True,
)
def ties(inputs: TensorInputs, params: TiesParams, stats: ModelStats) -> torch.Tensor:
    """Returns the TIES-merged task vector of one tensor."""
    rules = trim_rules(inputs.deltas, inputs.densities, stats.thresholds, params.trim_ties, inputs.rules)
    return ties_merge(inputs.deltas, inputs.weights, params.normalize, params.lambda_, rules)
