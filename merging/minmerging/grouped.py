"""Returns MIN-Merging's grouped routed forward: each task's patched linear layers as materialized weights.

For every patched linear layer and every task with rows in it, the weight (and bias) is θ_shared's with the task's
stored rows written in, exactly the layer of a model materialized with that patch. A top-1 routed batch is sorted
by task, so each task's inputs are one contiguous slice, and each slice runs through its own task's weight: one
matrix product per task and layer, the FLOPs of a static forward, where adding row deltas (`patches.py`) costs an
extra product over the patched rows and a scatter per task. The price is memory, not storage: one copy of each
patched linear layer per task with rows in it, built on first use. Inputs that mix experts (top-k) and generation
keep the delta hooks, which stay exact for any mixture.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch

from merging.errors import ConfigError, MergeflowError
from merging.minmerging.patches import Patch

RoutedCompute = Literal["grouped", "delta"]
Group = tuple[int, int, int]  # (task index, first input, one past the last input) of a batch sorted by task
TaskLinear = tuple[torch.Tensor, torch.Tensor | None]  # a task's materialized (weight, bias)


def checked_compute(value: Any, where: str, error: type[MergeflowError] = ConfigError) -> RoutedCompute:
    """Returns `value` if it names a routed compute, else raises `error` naming `where` (an option, a file's field)."""
    if value not in ("grouped", "delta"):
        raise error(f"{where} must be 'grouped' or 'delta', got {value!r}")
    return value  # type: ignore[no-any-return]


def grouped_linears(
    shared_model: torch.nn.Module, patches: dict[str, Patch], tasks: list[str]
) -> dict[str, list[TaskLinear | None]]:
    """Returns, per patched linear layer of θ_shared, each task's materialized (weight, bias), or None for a task
    with no rows there (it runs on θ_shared's own). Tensors of other modules (norms) stay with the delta hooks."""
    modules = dict(shared_model.named_modules())
    out: dict[str, list[TaskLinear | None]] = {}
    for task, patch in patches.items():
        j = tasks.index(task)
        for name, (idx, rows) in patch.items():
            module_name, _, attr = name.rpartition(".")
            module = modules.get(module_name)
            if not isinstance(module, torch.nn.Linear) or attr not in ("weight", "bias"):
                continue
            per_task = out.setdefault(module_name, [None] * len(tasks))
            current = per_task[j]
            if current is None:
                bias = None if module.bias is None else module.bias.detach().clone()
                current = per_task[j] = (module.weight.detach().clone(), bias)
            target = current[0] if attr == "weight" else current[1]
            assert target is not None  # row_deltas already refused a bias patch on a bias-free layer
            target[idx.long()] = rows.to(target.dtype)
    return out


def grouped_names(shared_model: torch.nn.Module, patches: dict[str, Patch]) -> set[str]:
    """Returns the linear layers the grouped forward computes (any task patches their weight or bias)."""
    modules = dict(shared_model.named_modules())
    names = set()
    for patch in patches.values():
        for name in patch:
            module_name, _, attr = name.rpartition(".")
            if isinstance(modules.get(module_name), torch.nn.Linear) and attr in ("weight", "bias"):
                names.add(module_name)
    return names


def task_groups(dense: torch.Tensor) -> tuple[torch.Tensor, list[Group]] | None:
    """Returns (the order that sorts a batch by task, each task's slice of the sorted batch) for routing weights
    (inputs × tasks) where every input has one expert at weight 1; None when any input mixes experts."""
    picked = dense > 0
    if not bool((picked.sum(dim=1) == 1).all()) or not bool((dense[picked] == 1).all()):
        return None
    task = picked.float().argmax(dim=1)
    order = torch.argsort(task, stable=True)
    counts = torch.bincount(task, minlength=dense.shape[1]).tolist()
    groups, start = [], 0
    for j, n in enumerate(counts):
        if n:
            groups.append((j, start, start + n))
            start += n
    return order, groups


_ACTIVE = threading.local()  # this thread's (task weights by layer id, groups) while a grouped forward runs


class GroupedLinears:
    """Owns the grouped forward of θ_shared's patched linear layers (its materialized weights, built on first use)."""

    def __init__(self, shared_model: torch.nn.Module, patches: dict[str, Patch], tasks: list[str]):
        self.model, self.patches, self.tasks = shared_model, patches, tasks
        modules = dict(shared_model.named_modules())
        # a layer whose forward is not nn.Linear's own (a subclass's, or one accelerate's offload hooks replaced)
        # keeps the delta hooks: the grouped forward computes a plain linear map
        self.names = {n for n in grouped_names(shared_model, patches) if _free(modules[n])}
        self._by_id: dict[int, list[TaskLinear | None]] | None = None
        self._lock = threading.Lock()

    def weights(self) -> dict[int, list[TaskLinear | None]]:
        """Returns each grouped layer's per-task weights by the layer's id, built once (under a lock)."""
        if self._by_id is None:
            with self._lock:
                if self._by_id is None:
                    modules = dict(self.model.named_modules())
                    built = grouped_linears(self.model, self.patches, self.tasks)
                    self._by_id = {id(modules[n]): built[n] for n in self.names}
        return self._by_id

    def install(self) -> set[str]:
        """Gives each grouped layer the grouped forward (inside `active` only; elsewhere the layer's own forward,
        also in a deep copy of the model); returns those layers' names."""
        modules = dict(self.model.named_modules())
        for name in sorted(self.names):
            if "forward" not in modules[name].__dict__:
                modules[name].forward = types.MethodType(_grouped_forward, modules[name])
        return self.names

    @contextmanager
    def active(self, groups: list[Group] | None) -> Iterator[None]:
        """Within the block, this thread's forwards of the grouped layers run each task's slice of a batch sorted
        by task (`groups`) through the task's own weights; None: no change."""
        _ACTIVE.plan = (self.weights(), groups) if groups else None
        try:
            yield
        finally:
            _ACTIVE.plan = None


def _free(module: torch.nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    own = forward is None or getattr(forward, "__func__", None) is _grouped_forward
    return own and type(module).forward is torch.nn.Linear.forward


def _grouped_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    plan: tuple[dict[int, list[TaskLinear | None]], list[Group]] | None = getattr(_ACTIVE, "plan", None)
    per_task = plan[0].get(id(self)) if plan is not None else None
    if plan is None or per_task is None:  # outside a grouped forward, or another model's layer (a copy): as it is
        return torch.nn.Linear.forward(self, x)
    parts = []
    for j, start, end in plan[1]:
        weight, bias = per_task[j] or (self.weight, self.bias)
        parts.append(torch.nn.functional.linear(x[start:end], weight, bias))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
