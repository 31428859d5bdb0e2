"""Returns the method registry: each merge method is a pure function on one tensor's inputs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from merging.engine.plan import Role

if TYPE_CHECKING:
    from merging.methods.trim import TrimRule


class MethodParams(BaseModel):
    """Parameters every method accepts at the top level of the config (mergekit's shared keys)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)
    weight: float | None = Field(default=None, description="default weight of every model")
    density: float | None = Field(default=None, gt=0, le=1, description="default density of every model")
    int8_mask: bool = Field(default=False, description="accepted for mergekit compatibility; no effect")


class TrimParams(MethodParams):
    """Parameters of methods that trim task vectors by magnitude."""

    trim_scope: Literal["tensor", "model"] = "tensor"
    trim_ties: Literal["index", "mergekit"] = Field(
        default="index",
        description="which entries tying at a per-tensor trim threshold are kept: lowest index (fast) or "
        "mergekit's argsort order (bit-identical to mergekit, slow on large tensors)",
    )


@dataclass(frozen=True)
class TensorInputs:
    """What a method sees for one tensor: base and task vectors, rows are neurons for 2-D roles."""

    name: str
    role: Role
    base: torch.Tensor  # compute dtype; (rows, cols) for neuron/embedding roles, 1-D otherwise
    deltas: torch.Tensor  # (T, *base.shape), compute dtype; methods may modify it in place
    # A method returns a tensor the caller may modify in place: a fresh one or a view of
    # `deltas`, never `base`.
    weights: torch.Tensor  # (T,)
    densities: tuple[float, ...]
    seed: int
    # Per-task trim rules found by the engine for the whole tensor when these inputs are a block of its rows
    # (engine/blocks.py); a trimming method uses them instead of a per-tensor top-k of `deltas`.
    rules: tuple[TrimRule, ...] | None = None
    # True when the engine already trimmed `deltas` at the model-wide thresholds and multiplied them by the weights
    # while forming them (MergeMethod.trims_first).
    prepared: bool = False


@dataclass(frozen=True)
class ModelStats:
    """Model-wide statistics from the streaming planning pass."""

    thresholds: tuple[float, ...] | None = None  # |tau_t| kept when >= threshold (model scope)
    trimmed_l1_fraction: tuple[float, ...] | None = None  # sigma_t: share of ||tau_t||_1 removed


@dataclass(frozen=True)
class StatsRequest:
    """What a method needs from the planning pass before merging."""

    model_thresholds: bool  # whole-model trim thresholds
    trimmed_l1: bool  # sigma_t, the fraction of L1 norm removed by trimming


MergeFn = Callable[[TensorInputs, Any, ModelStats], torch.Tensor]
# A fused form reads the stored tensors (base, fine-tunes) and writes the finished merged tensor (base included) into
# `out`, in its dtype; it returns False, leaving `out` unspecified, when it cannot take these tensors (the engine then
# takes the method's merge function, which must give the same numbers).
FusedFn = Callable[[torch.Tensor, list[torch.Tensor], torch.Tensor, Any, torch.Tensor], bool]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its merge function, parameters model and reference."""

    name: str
    pretty_name: str
    reference_url: str
    params_model: type[MethodParams]
    merge: MergeFn
    stats_request: Callable[[Any], StatsRequest | None]
    describe: Callable[[Any], str] = lambda params: ""
    fused: FusedFn | None = None
    # True when merging a block of a tensor's rows (with `TensorInputs.rules` for per-tensor trimming) gives that
    # block of the whole-tensor merge, so the engine may merge large tensors in row blocks.
    row_blocks: bool = False
    # True when, given model-wide thresholds, the method begins with trim_ at them and then multiplies each task
    # vector by its weight: the engine may then do both while forming the task vectors (TensorInputs.prepared).
    trims_first: bool = False


REGISTRY: dict[str, MergeMethod] = {}


def register_method(
    name: str,
    *,
    pretty_name: str,
    reference_url: str,
    params: type[MethodParams],
    stats_request: Callable[[Any], StatsRequest | None] = lambda params: None,
    describe: Callable[[Any], str] = lambda params: "",
    fused: FusedFn | None = None,
    row_blocks: bool = False,
    trims_first: bool = False,
) -> Callable[[MergeFn], MergeFn]:
    """Registers the decorated function as merge method `name`."""

    def wrap(fn: MergeFn) -> MergeFn:
        if name in REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        REGISTRY[name] = MergeMethod(
            name, pretty_name, reference_url, params, fn, stats_request, describe, fused, row_blocks, trims_first
        )
        return fn

    return wrap


def tensor_seed(seed: int, name: str, task: int = 0) -> int:
    """Returns a per-tensor, per-task seed independent of the order tensors are processed in."""
    digest = hashlib.sha256(f"{seed}:{name}:{task}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def broadcast_weights(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Returns `weights` (T,) shaped to broadcast against a (T, ...) tensor."""
    return weights.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))
