"""DARE + linear: random drop and rescale, then a weighted sum of task vectors."""

from __future__ import annotations

import torch

from merging.methods.base import ModelStats, TensorInputs, register_method
from merging.methods.dare import DareParams, dare_
from merging.methods.task_arithmetic import weighted_sum


@register_method(
    "dare_linear",
    pretty_name="Linear DARE",
    reference_url="https://arxiv.org/abs/2311.03099",
    params=DareParams,
    describe=lambda p: f"lambda={p.lambda_}, normalize={p.normalize}, rescale={p.rescale}",
)
def dare_linear(inputs: TensorInputs, params: DareParams, stats: ModelStats) -> torch.Tensor:
    """Returns lambda * sum_t w_t DARE(tau_t)."""
    dare_(inputs, params.rescale)
    return weighted_sum(inputs.deltas, inputs.weights, params.normalize, params.lambda_)
