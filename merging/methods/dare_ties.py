"""DARE + TIES: random drop and rescale, then TIES' sign election and disjoint merge."""

from __future__ import annotations

import torch

from merging.methods.base import ModelStats, TensorInputs, register_method
from merging.methods.dare import DareParams, dare_
from merging.methods.ties import ties_merge


@register_method(
    "dare_ties",
    pretty_name="DARE TIES",
    reference_url="https://arxiv.org/abs/2311.03099",
    params=DareParams,
    describe=lambda p: f"lambda={p.lambda_}, normalize={p.normalize}, rescale={p.rescale}",
)
def dare_ties(inputs: TensorInputs, params: DareParams, stats: ModelStats) -> torch.Tensor:
    """Returns lambda * the TIES merge of DARE(tau_t)."""
    dare_(inputs, params.rescale)
    return ties_merge(inputs.deltas, inputs.weights, params.normalize, params.lambda_)
