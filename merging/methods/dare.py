"""Returns DARE's seeded random drop-and-rescale of task vectors (Yu et al., 2024)."""

from __future__ import annotations

import torch
from pydantic import Field

from merging.methods.base import MethodParams, TensorInputs, tensor_seed


class DareParams(MethodParams):
    lambda_: float = Field(default=1.0, alias="lambda", description="scale of the merged task vector")
    normalize: bool = Field(default=False, description="divide by the weights (of agreeing entries for dare_ties)")
    rescale: bool = Field(default=True, description="rescale kept entries by 1/(1-p) = 1/density")


def dare_(inputs: TensorInputs, rescale: bool) -> torch.Tensor:
    """Returns the deltas with each entry dropped with probability 1 - density, in place.

    The mask comes from a generator seeded by (seed, tensor name, task index), so the same seed
    gives the same bits whatever order or process the tensors are merged in.
    """
    deltas = inputs.deltas
    for t, density in enumerate(inputs.densities):
        if density >= 1:
            continue
        gen = torch.Generator(device="cpu").manual_seed(tensor_seed(inputs.seed, inputs.name, t))
        keep = torch.rand(deltas[t].shape, generator=gen) < density
        deltas[t].mul_(keep.to(deltas.device))
        if rescale:
            deltas[t].div_(density)
    return deltas
