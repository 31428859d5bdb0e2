"""Returns one planned tensor's inputs for merging: base and task vectors oriented and in the compute dtype, or the
stored tensors themselves for the fused CPU kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merging.engine.plan import Role, TensorPlan
from merging.errors import NonFiniteError
from merging.io.checkpoint import Checkpoint
from merging.methods import stored_kernels
from merging.methods.base import FusedFn, MethodParams
from merging.methods.trim import TrimRule, trim_row_


@dataclass(frozen=True)
class Prepare:
    """What a method that trims at model-wide thresholds and then weighs (MergeMethod.trims_first) asks of the
    task vectors as they are formed: keep |tau_t| >= thresholds[t] (all when <= 0), then multiply by scales[t]."""

    thresholds: tuple[float, ...]
    scales: torch.Tensor  # (T,) float32


class TensorSource:
    """Returns oriented compute-dtype base and task vectors for one planned tensor.

    Task vectors land in one grow-only buffer reused for every tensor: allocating a fresh
    (T, rows, cols) tensor each time costs a page fault per 4 KiB, which is most of a naive
    merge's time. A returned tensor is only valid until the next `load`.
    """

    def __init__(
        self,
        base: Checkpoint,
        models: list[Checkpoint],
        device: torch.device,
        buffers: dict[tuple[str, torch.dtype, str], torch.Tensor] | None = None,
    ):
        self.base = base
        self.models = models
        self.device = device
        self.bytes_read = 0
        # `buffers` lets a worker thread keep its buffers from one layer task to the next (staged.py).
        self._buffers: dict[tuple[str, torch.dtype, str], torch.Tensor] = {} if buffers is None else buffers

    def compute_dtype(self, plan: TensorPlan) -> torch.dtype:
        return torch.float64 if plan.dtype == torch.float64 else torch.float32

    def buffer(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Returns a reusable flat buffer of at least `numel` elements."""
        slot = (key, dtype, str(self.device))
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < numel:
            self._buffers.pop(slot, None)
            buf = self._buffers[slot] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel]

    def orient(self, tensor: torch.Tensor, plan: TensorPlan) -> torch.Tensor:
        """Returns a view of a tensor in the stored layout with rows as neurons (1-D for POINT tensors)."""
        if plan.role == Role.POINT:
            return tensor.reshape(-1)
        if plan.transposed:
            return tensor.t()
        return tensor.reshape(plan.neuron_shape)

    def load(
        self, plan: TensorPlan, rows: tuple[int, int] | None = None, prepare: Prepare | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (base, deltas (T, ...)) oriented so rows are neurons, checked for NaN/Inf; only rows
        [start, end) of them when `rows` is given (see blocks.py); trimmed and scaled as `prepare` says."""
        dtype = self.compute_dtype(plan)
        raw = self.base.tensor(plan.name)
        base = self._rows(self.orient(raw, plan), rows)
        self.bytes_read += base.numel() * raw.element_size()
        if base.dtype != dtype or base.device != self.device:
            base = self.buffer("base", base.numel(), dtype).view(base.shape).copy_(base)
        if not torch.isfinite(base.sum()):
            _raise_non_finite(base, plan.name, f"base model ({self.base.path})")
        t = len(self.models)
        deltas = self.buffer("deltas", t * base.numel(), dtype).view(t, *base.shape)
        unchecked = False  # a task vector not known to be finite
        left = []  # the task vectors torch formed, to prepare below
        for i, (model, src) in enumerate(zip(self.models, plan.sources)):
            ft = model.tensor(src)
            oriented = self._rows(self.orient(ft, plan), rows).to(self.device)
            self.bytes_read += oriented.numel() * ft.element_size()
            thr, scale = (0.0, 1.0) if prepare is None else (prepare.thresholds[i], float(prepare.scales[i]))
            non_finite = stored_kernels.sub_widened_into(oriented, base, deltas[i], thr, scale)
            if non_finite is None:
                torch.sub(oriented, base, out=deltas[i])
                left.append(i)
            unchecked |= non_finite != 0
        if unchecked and deltas.numel() and not torch.isfinite(deltas.sum()):
            for i, model in enumerate(self.models):
                if not torch.isfinite(deltas[i]).all():
                    _raise_non_finite(deltas[i], plan.sources[i], f"model {model.label!r} ({model.path})")
        if prepare is not None:
            for i in left:
                if prepare.thresholds[i] > 0:
                    trim_row_(deltas[i], TrimRule(prepare.thresholds[i]))
                deltas[i].mul_(prepare.scales[i].to(deltas.dtype))
        return base, deltas

    @staticmethod
    def _rows(tensor: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
        return tensor if rows is None else tensor[rows[0] : rows[1]]

    def _stored_inputs(self, plan: TensorPlan) -> list[torch.Tensor]:
        """Returns [base, fine-tunes...] as stored (memory-mapped, not oriented, not converted)."""
        return [self.base.tensor(plan.name), *(m.tensor(s) for m, s in zip(self.models, plan.sources))]

    def stored(self, plan: TensorPlan) -> list[torch.Tensor] | None:
        """Returns [base, fine-tunes...] as stored, flattened, when the CPU kernels read them directly (see
        stored_kernels.stored_flat), else None. Entry order is the stored one, not the oriented one."""
        if self.device.type != "cpu":
            return None
        raw = self._stored_inputs(plan)
        flat = stored_kernels.stored_flat(raw)
        if flat is not None:
            self.bytes_read += sum(x.numel() * x.element_size() for x in raw)
        return flat

    def fused(
        self, plan: TensorPlan, fn: FusedFn, params: MethodParams, weights: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor | None:
        """Returns the merged tensor a method's fused form wrote from the stored inputs (in `out_dtype`, in a reused
        buffer valid until the next call), or None when the fused form does not take these tensors."""
        raw = self._stored_inputs(plan)
        out = self.buffer("fused", raw[0].numel(), out_dtype).view(raw[0].shape)
        if not fn(raw[0], raw[1:], weights, params, out):
            return None
        self.bytes_read += sum(x.numel() * x.element_size() for x in raw)
        return out

    def unorient(self, tensor: torch.Tensor, plan: TensorPlan) -> torch.Tensor:
        if plan.role != Role.POINT and plan.transposed:
            tensor = tensor.t()
        return tensor.reshape(plan.shape)


def _raise_non_finite(tensor: torch.Tensor, name: str, where: str) -> None:
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise NonFiniteError(f"tensor {name!r} in {where} holds {bad} NaN/Inf values")
