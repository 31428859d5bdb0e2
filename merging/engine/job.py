"""Returns one tensor's merge (or a block of its rows) from its loaded inputs: what every merge path shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merging.engine.plan import TensorPlan
from merging.engine.source import Prepare
from merging.errors import NonFiniteError
from merging.methods.base import MergeMethod, MethodParams, ModelStats, TensorInputs, tensor_seed
from merging.methods.trim import TrimRule


@dataclass(frozen=True)
class MergeJob:
    """The method, its parameters and the model-wide inputs of one merge."""

    method: MergeMethod
    params: MethodParams
    stats: ModelStats
    weights: torch.Tensor  # (T,) float64
    densities: list[float]
    seed: int

    @property
    def prepare(self) -> Prepare | None:
        """Returns what TensorSource.load may do for the method while forming the task vectors (or None)."""
        if not self.method.trims_first or self.stats.thresholds is None:
            return None
        return Prepare(self.stats.thresholds, self.weights.to(torch.float32))

    def merged(
        self,
        t: TensorPlan,
        base: torch.Tensor,
        deltas: torch.Tensor,
        rules: tuple[TrimRule, ...] | None = None,
        where: str = "",
    ) -> torch.Tensor:
        """Returns base + the method's merged task vector, oriented as `base`, checked for NaN/Inf (`where` names a
        block of rows in the error). `deltas` come from TensorSource.load with this job's `prepare`."""
        inputs = TensorInputs(
            name=t.name,
            role=t.role,
            base=base,
            deltas=deltas,
            weights=self.weights.to(device=deltas.device),
            densities=tuple(self.densities),
            seed=tensor_seed(self.seed, t.name),
            rules=rules,
            prepared=self.prepare is not None,
        )
        merged = self.method.merge(inputs, self.params, self.stats).to(base.dtype)
        del inputs
        if merged.numel() and not torch.isfinite(merged.sum()):
            bad = int((~torch.isfinite(merged)).sum())
            raise NonFiniteError(
                f"tensor {t.name!r}{where}: the merge produced {bad} NaN/Inf values (inputs are finite: check the "
                "method's parameters, e.g. lambda, weights, or a sum of weights of 0 with normalize)"
            )
        return merged.add_(base)  # the method's tensor is its own
