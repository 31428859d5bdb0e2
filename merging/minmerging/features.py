"""Returns the features MIN-Merging's router reads: the masked mean of an encoder's hidden state, after all
its layers or after the first `layer` ones (the forward stopped there, so a shallow router costs that share
of a forward)."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import torch

from merging.errors import ConfigError


def _masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def pooled_depths(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Returns, for every depth k = 0..L, the masked mean hidden state after k layers of each input (one forward
    per batch with every hidden state; `router_layer: auto` and the router-depth benchmark read all depths)."""
    chunks: list[list[torch.Tensor]] = []
    with torch.inference_mode():
        for batch in batches:
            states = model(**batch, output_hidden_states=True).hidden_states
            chunks.append([_masked_mean(h, batch["attention_mask"]) for h in states])
    return [torch.cat([c[k] for c in chunks]) for k in range(len(chunks[0]))] if chunks else []


def mean_pooled(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Returns the attention-masked mean of the last hidden state (the full-depth router's input)."""
    return _masked_mean(model(**batch).last_hidden_state, batch["attention_mask"])


def encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """Returns the model's list of transformer layers (the ModuleList as long as `config.num_hidden_layers`)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ConfigError(f"{type(model).__name__}: no list of {count} transformer layers to read router features from")


class _StopForward(Exception):
    pass


_HALT = threading.local()


def layer_pooled(model: torch.nn.Module, batch: dict[str, torch.Tensor], layer: int | None) -> torch.Tensor:
    """Returns the masked mean of the hidden state after `layer` transformer layers (0: the embeddings' output;
    None: the last hidden state). The forward stops there, so layer k of L costs about k/L of a forward."""
    if layer is None:
        return mean_pooled(model, batch)
    layers = encoder_layers(model)
    if not 0 <= layer <= len(layers):
        raise ConfigError(f"router_layer {layer} is outside 0..{len(layers)} for this {len(layers)}-layer encoder")
    if layer == len(layers):
        return mean_pooled(model, batch)
    captured: list[torch.Tensor] = []

    def stop(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Hooks are shared by every thread's forward: each thread reads and fills only its own slot.
        target = getattr(_HALT, "captured", None)
        if target is not None:  # the state after `layer` layers is the input of layer `layer`
            target.append(args[0] if args else kwargs["hidden_states"])
            raise _StopForward

    handle = layers[layer].register_forward_pre_hook(stop, with_kwargs=True)
    _HALT.captured = captured
    try:
        model(**batch)
    except _StopForward:
        pass
    finally:
        _HALT.captured = None
        handle.remove()
    if not captured:
        raise ConfigError(f"router_layer {layer}: the forward never reached that layer")
    return _masked_mean(captured[0], batch["attention_mask"])
