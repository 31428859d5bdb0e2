"""Returns neuron importance for MIN-Merging: which rows of each task vector matter for its own task.

Activation-aware score (DESIGN.md, MIN-Merging 1): for fine-tune t and a linear layer with task
vector τₜ (out × in), Iₜᵏ = mean over task t's calibration tokens of |τₜᵏ · xᵏ|, x the layer's input
in θₜ. Inputs are captured with forward pre-hooks and reduced batch by batch, so no activation is
kept. The data-free score is ‖τₜᵏ‖₂. Each tensor keeps its top `neuron_ratio` rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from merging.errors import ConfigError

HEAD_NAMES = ("classifier", "score", "qa_outputs", "pre_classifier", "lm_head")


def neuron_linears(model: torch.nn.Module, lm_head: bool = False) -> dict[str, torch.nn.Linear]:
    """Returns `<module>.weight` → Linear for every linear layer of the encoder (task heads excluded); with
    `lm_head`, a causal LM's output layer too (its rows are the vocabulary's tokens)."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        parts = name.split(".")
        if not any(part in HEAD_NAMES for part in parts) or (lm_head and parts[-1] == "lm_head"):
            out[f"{name}.weight"] = module
    return out


def task_vectors(base: torch.nn.Module, finetuned: torch.nn.Module, lm_head: bool = False) -> dict[str, torch.Tensor]:
    """Returns τ = θₜ − θ₀ (float32) of every linear weight the two models share (`lm_head`: see neuron_linears)."""
    base_linears = neuron_linears(base, lm_head)
    out = {}
    for name, layer in neuron_linears(finetuned, lm_head).items():
        if name in base_linears and base_linears[name].weight.shape == layer.weight.shape:
            out[name] = (layer.weight.detach().float() - base_linears[name].weight.detach().float()).contiguous()
    return out


def norm_importance(vectors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Returns ‖τᵏ‖₂ per row of every task vector (the data-free score)."""
    return {name: tau.float().norm(dim=1) for name, tau in vectors.items()}


@torch.inference_mode()
def activation_importance(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Iterable[str],
    vectors: Mapping[str, torch.Tensor],
    batch_size: int = 32,
    max_length: int = 64,
) -> dict[str, torch.Tensor]:
    """Returns mean over calibration tokens of |τᵏ · x| per row, x each layer's input in `model` (θₜ)."""
    texts = list(texts)
    if not texts:
        raise ConfigError("calibration: activation importance needs at least one calibration text")
    linears = neuron_linears(model, lm_head=True)  # the layers `vectors` names (an LM head only if asked for)
    missing = sorted(set(vectors) - set(linears))
    if missing:
        raise ConfigError(f"calibration: task vectors name layers the model does not have: {missing[:3]}")
    sums = {name: torch.zeros(vectors[name].shape[0], dtype=torch.float64) for name in vectors}
    state: dict[str, torch.Tensor] = {}
    tokens = 0
    hooks = []

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        tau_t = vectors[name].float().t()

        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].float()
            mask = state["mask"]
            if x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask]  # (valid tokens, in): padding never counts
            else:
                x = x.reshape(-1, x.shape[-1])
            sums[name] += (x @ tau_t).abs().sum(dim=0, dtype=torch.float64)

        return hook

    for name in vectors:
        hooks.append(linears[name].register_forward_pre_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            state["mask"] = batch["attention_mask"].bool()
            tokens += int(state["mask"].sum())
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: (total / tokens).float() for name, total in sums.items()}


def top_rows(scores: Mapping[str, torch.Tensor], neuron_ratio: float, budget: str = "layer") -> dict[str, torch.Tensor]:
    """Returns the sorted indices of the kept rows of each tensor.

    budget "layer": the top `neuron_ratio` rows of each tensor (at least one row). budget "model": the top
    `neuron_ratio` of all rows of all tensors together, ranked by score divided by its tensor's mean score (so
    layers with larger activations do not take the whole budget); a tensor may keep no row (then it is left out).
    """
    if not 0 < neuron_ratio <= 1:
        raise ConfigError(f"neuron_ratio must be in (0, 1], got {neuron_ratio}")
    if budget == "model":
        return _top_rows_over_model(scores, neuron_ratio)
    if budget != "layer":
        raise ConfigError(f"importance budget must be 'layer' or 'model', got {budget!r}")
    out = {}
    for name, s in scores.items():
        k = max(1, math.ceil(neuron_ratio * s.numel()))
        # Ties broken by the lower index, so the choice is deterministic.
        order = torch.argsort(-s.double(), stable=True)[:k]
        out[name] = torch.sort(order).values
    return out


def _top_rows_over_model(scores: Mapping[str, torch.Tensor], neuron_ratio: float) -> dict[str, torch.Tensor]:
    names = sorted(scores)
    if not names:
        return {}
    relative = [scores[n].double() / scores[n].double().mean().clamp_min(1e-30) for n in names]
    flat = torch.cat(relative)
    k = max(1, math.ceil(neuron_ratio * flat.numel()))
    order = torch.argsort(-flat, stable=True)[:k]  # ties broken by the lower (name, row) position
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order] = True
    out, offset = {}, 0
    for name, r in zip(names, relative):
        rows = keep[offset : offset + r.numel()].nonzero().flatten()
        offset += r.numel()
        if rows.numel():
            out[name] = rows
    return out


def overlap_matrix(masks: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Returns O (T × T): O[a, b] = share of task a's important neurons that are important for task b too."""
    t = len(masks)
    out = torch.zeros(t, t, dtype=torch.float64)
    empty = torch.zeros(0, dtype=torch.long)
    for a in range(t):
        total = sum(idx.numel() for idx in masks[a].values())
        for b in range(t):
            shared = 0
            for n, idx in masks[a].items():
                shared += int(torch.isin(idx, masks[b].get(n, empty)).sum())
            out[a, b] = shared / total if total else 0.0
    return out
