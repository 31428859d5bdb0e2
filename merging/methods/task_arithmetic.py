"""Task Arithmetic: theta = theta_0 + lambda * sum_t w_t tau_t (optionally / sum_t w_t)."""

from __future__ import annotations

import torch
from pydantic import Field

from merging.methods import stored_kernels
from merging.methods.base import MethodParams, ModelStats, TensorInputs, register_method


class TaskArithmeticParams(MethodParams):
    lambda_: float = Field(default=1.0, alias="lambda", description="scale of the summed task vectors")
    normalize: bool = Field(default=False, description="divide by the sum of the weights")


def weighted_sum(deltas: torch.Tensor, weights: torch.Tensor, normalize: bool, lambda_: float) -> torch.Tensor:
    """Returns lambda * sum_t w_t tau_t, divided by sum_t w_t when `normalize` (mergekit's order of operations).

    Accumulates in place into deltas[0], one pass per task, so nothing is allocated.
    """
    mixed = deltas[0].mul_(float(weights[0]))
    for t in range(1, deltas.shape[0]):
        mixed.add_(deltas[t].mul_(float(weights[t])))
    if normalize:
        divisor = weights.sum().to(mixed.dtype)
        if divisor.abs() >= 1e-8:
            mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return mixed


def task_arithmetic_fused(
    base: torch.Tensor, fts: list[torch.Tensor], weights: torch.Tensor, params: TaskArithmeticParams, out: torch.Tensor
) -> bool:
    """Writes base + the merged task vector into `out` in one pass over the stored inputs (see stored_kernels)."""
    return stored_kernels.weighted_sum_into(base, fts, weights, params.normalize, params.lambda_, out)


@register_method(
    "task_arithmetic",
    pretty_name="Task Arithmetic",
    reference_url="https://arxiv.org/abs/2212.04089",
    params=TaskArithmeticParams,
    describe=lambda p: f"lambda={p.lambda_}, normalize={p.normalize}",
    fused=task_arithmetic_fused,
    row_blocks=True,
)
def task_arithmetic(inputs: TensorInputs, params: TaskArithmeticParams, stats: ModelStats) -> torch.Tensor:
    """Returns the merged task vector lambda * sum_t w_t tau_t."""
    return weighted_sum(inputs.deltas, inputs.weights, params.normalize, params.lambda_)
