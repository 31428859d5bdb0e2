"""Returns MIN-Merging's neuron patches and the forward hooks that apply them without touching θ_shared.

A patch holds, per tensor, a task's important row indices and θₜ's rows. On θ_shared, a patched
linear layer's output gains, for each input routed to experts j with weights wⱼ, Σⱼ wⱼ · x Δⱼᵀ on
the patched rows (Δⱼ = θⱼ[rows] − θ_shared[rows]); a patched bias adds wⱼ Δⱼ; a patched LayerNorm or
RMSNorm scale adds wⱼ x̂ Δⱼ (x̂ the normalized input). That is exactly the output of a model
materialized with those rows, at the cost of the patched rows only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from merging.errors import ConfigError

Patch = dict[str, tuple[torch.Tensor, torch.Tensor]]  # tensor name -> (row indices, θₜ's rows)
Delta = tuple[int, str, torch.Tensor, torch.Tensor]  # (task index, kind, row indices, θₜ's rows − θ_shared's rows)


def neuron_patch(
    finetuned: torch.nn.Module,
    masks: dict[str, torch.Tensor],
    small_tensors: bool = False,
    dtype: torch.dtype | None = None,
) -> Patch:
    """Returns a task's patch: for each masked tensor, its important row indices and the fine-tune's rows;
    with `small_tensors`, also every one-dimensional parameter (biases, LayerNorm scales) whole. `dtype`: the
    rows are stored rounded to it (None: the fine-tune's own dtype); the routed forward uses them as stored."""
    state = finetuned.state_dict()
    missing = sorted(set(masks) - set(state))
    if missing:
        raise ConfigError(f"neuron masks name tensors the fine-tune does not have: {missing[:3]}")

    def stored(rows: torch.Tensor) -> torch.Tensor:  # one copy, in the stored dtype
        return rows.detach().to(dtype=dtype or rows.dtype, copy=True)

    patch = {name: (idx.long(), stored(state[name][idx.long()])) for name, idx in masks.items()}
    if small_tensors:
        for name, param in finetuned.named_parameters():
            if param.dim() == 1 and name not in patch:
                patch[name] = (torch.arange(param.shape[0]), stored(param))
    return patch


def _grid(output: torch.Tensor, members: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Returns broadcast indices that address rows `members` (first dim) × every middle position × `idx` (last)."""
    nd = output.dim()
    shape = [1] * nd
    out = []
    for d in range(nd):
        values = members if d == 0 else idx if d == nd - 1 else torch.arange(output.shape[d])
        view = list(shape)
        view[d] = -1
        out.append(values.view(view))
    return tuple(out)


def _is_rms_norm(module: Any) -> bool:
    """Returns whether `module` is an RMSNorm (Llama's and its kin: a scale, an epsilon, no bias)."""
    return type(module).__name__.endswith("RMSNorm") and _rms_eps(module) is not None


def _rms_eps(module: Any) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, int | float) else None


def _normalized(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Returns x̂, the normalized input a LayerNorm's or RMSNorm's scale multiplies (as the module computes it)."""
    if isinstance(module, torch.nn.LayerNorm):
        return torch.nn.functional.layer_norm(x, module.normalized_shape, eps=module.eps)
    eps = _rms_eps(module)
    assert eps is not None
    xf = x.float()  # Llama's RMSNorm: in float32, then back to the input's dtype before the scale
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def row_deltas(shared_model: torch.nn.Module, patches: dict[str, Patch], tasks: list[str]) -> dict[str, list[Delta]]:
    """Returns, per patched module, (task index, parameter kind, row indices, θₜ's rows − θ_shared's rows).

    Kinds: "weight" of a linear layer (rows = output neurons), "scale" of a LayerNorm or RMSNorm, "bias" of a
    linear layer or LayerNorm, and "embedding" of an input embedding tied to a patched linear layer (an LM head
    sharing its matrix: the patched tokens' looked-up rows change too, as in a materialized model).
    """
    params = dict(shared_model.named_parameters(remove_duplicate=False))  # a tied LM head by its own name
    modules = dict(shared_model.named_modules())
    embeddings = {
        id(m.weight): n for n, m in modules.items() if isinstance(m, torch.nn.Embedding)
    }  # a linear layer tied to an input embedding (an LM head) changes that embedding's rows too
    out: dict[str, list[Delta]] = {}
    for task, patch in patches.items():
        j = tasks.index(task)
        for name, (idx, rows) in patch.items():
            if name not in params:
                raise ConfigError(f"patch of task {task!r} names {name}, which the shared model does not have")
            module_name, _, attr = name.rpartition(".")
            module = modules.get(module_name)
            if isinstance(module, torch.nn.Linear) and attr in ("weight", "bias"):
                kind = attr
            elif isinstance(module, torch.nn.LayerNorm) and attr in ("weight", "bias"):
                kind = "scale" if attr == "weight" else "bias"
            elif _is_rms_norm(module) and attr == "weight":
                kind = "scale"
            else:
                raise ConfigError(
                    f"patch tensor {name} is not a parameter of a linear layer, LayerNorm or RMSNorm of the "
                    "shared model"
                )
            shared = params[name].detach()
            if rows.shape[1:] != shared.shape[1:] or (idx.numel() and int(idx.max()) >= shared.shape[0]):
                raise ConfigError(f"patch of task {task!r}: {name} rows do not fit the shared tensor")
            delta = (rows.to(shared.dtype) - shared[idx.long()]).contiguous()
            out.setdefault(module_name, []).append((j, kind, idx.long(), delta))
            tied = embeddings.get(id(params[name])) if kind == "weight" else None
            if tied is not None and tied != module_name:
                out.setdefault(tied, []).append((j, "embedding", idx.long(), delta))
    return out


def patch_hook(module: torch.nn.Module, deltas: list[Delta], current: Callable[[], torch.Tensor | None]):  # type: ignore[no-untyped-def]
    """Returns a forward hook that adds each input's experts' row deltas, mixed by `current()` (inputs × tasks;
    None: θ_shared as it is)."""

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        weights = current()  # (batch, tasks), zero where a task is not an expert
        if weights is None:
            return None
        if weights.shape[0] != output.shape[0]:
            if weights.shape[0] != 1:  # one row is one route for the whole batch (a group of equal routes)
                raise ConfigError(
                    f"routed forward: {weights.shape[0]} routes for a batch of {output.shape[0]} inputs "
                    "(generation that expands the batch, such as beam search, is not supported)"
                )
            weights = weights.expand(output.shape[0], -1)
        x = args[0]
        normalized = None
        for j, kind, idx, delta in deltas:
            members = weights[:, j].nonzero().flatten()
            if members.numel() == 0:
                continue
            w = weights[members, j].to(output.dtype).view(-1, *([1] * (output.dim() - 1)))
            if kind == "embedding":  # the looked-up rows of patched tokens gain their Δ
                output.index_put_((members,), w * _embedding_update(x[members], idx, delta), accumulate=True)
                continue
            if kind == "weight":  # y = x Wᵀ: the patched rows gain x Δᵀ
                update = w * (x[members] @ delta.t())
            elif kind == "bias":
                update = (w * delta).expand(*output[members].shape[:-1], idx.numel())
            else:  # LayerNorm y = x̂ γ + β and RMSNorm y = x̂ γ: the patched scale adds x̂ Δγ
                if normalized is None:
                    normalized = _normalized(module, x)
                update = w * (normalized[members][..., idx] * delta)
            output.index_put_(_grid(output, members, idx), update, accumulate=True)
        return output

    return hook


def _embedding_update(ids: torch.Tensor, idx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Returns, for token ids (inputs × positions), Δ of the patched tokens' rows (zero for the others)."""
    if idx.numel() == 0 or ids.numel() == 0:
        return torch.zeros(*ids.shape, delta.shape[-1], dtype=delta.dtype)
    lookup = torch.full((int(max(int(ids.max()), int(idx.max()))) + 1,), -1, dtype=torch.long)
    lookup[idx] = torch.arange(idx.numel())
    position = lookup[ids]
    return delta[position.clamp_min(0)] * (position >= 0).unsqueeze(-1).to(delta.dtype)
