"""TIES-Merging: trim, elect sign, disjoint mean (Yadav et al., 2023)."""

from __future__ import annotations

import torch
from pydantic import Field

from merging.methods.base import (
    ModelStats,
    StatsRequest,
    TensorInputs,
    TrimParams,
    broadcast_weights,
    register_method,
)
from merging.ties_core import disjoint_mean, elect_sign
from merging.trim import trim_


class TiesParams(TrimParams):
    lambda_: float = Field(default=1.0, alias="lambda", description="scale of the merged task vector")
    normalize: bool = Field(default=True, description="divide by the weights of the agreeing entries")


def ties_merge(deltas: torch.Tensor, weights: torch.Tensor, normalize: bool, lambda_: float) -> torch.Tensor:
    """Returns lambda * the disjoint merge of w_t tau_t (mergekit's rule: sign of the weighted sum, ties +1)."""
    weighted = deltas.mul_(broadcast_weights(weights, deltas))
    elected = elect_sign(weighted, tie_sign=1.0)
    if normalize:
        mixed = disjoint_mean(weighted, elected, weights)
    else:
        agree = torch.sign(weighted) == elected.unsqueeze(0)
        mixed = torch.where(agree, weighted, torch.zeros((), dtype=weighted.dtype)).sum(dim=0)
    if lambda_ != 1:
        mixed *= lambda_
    return mixed


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
)
def ties(inputs: TensorInputs, params: TiesParams, stats: ModelStats) -> torch.Tensor:
    """Returns the TIES-merged task vector of one tensor."""
    trim_(inputs.deltas, inputs.densities, stats.thresholds)
    return ties_merge(inputs.deltas, inputs.weights, params.normalize, params.lambda_)
