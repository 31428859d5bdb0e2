"""Returns what a causal-LM routed model (MIN-Merging on a causal LM) produces: text, and perplexity.

Routing is on the prompt: the router reads θ₀'s mean-pooled hidden state of the prompt's first
`max_length` tokens and names a task (or flags the prompt out-of-domain). Prompts with the same
route form one group; a group runs as batched calls with that route's experts mixed into θ_shared
by the forward hooks (`RoutedModel.routing`), so every generated token, prompt and continuation,
runs on θ_shared with the task's important rows; out-of-domain prompts run on θ₀ (or θ_shared, by
`ood_model`). Perplexity routes each text by its beginning, exactly as a prompt would be, and
scores the whole text with that route (windows as `merging.evaluation.causal.perplexity`).

Generation is greedy unless `do_sample` is set; beam search expands the batch and is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from merging.errors import ConfigError
from merging.evaluation.causal import perplexity
from merging.minmerging.routed import Route, RoutedModel

GENERATION_OPTIONS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


@dataclass
class Generated:
    """One prompt's continuation and its route."""

    prompt: str
    text: str
    task: str | None
    experts: list[str]
    weights: list[float]
    confidence: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _groups(routes: Sequence[Route]) -> dict[tuple[tuple[str, ...], tuple[float, ...]] | None, list[int]]:
    """Returns route → the indices of the inputs that took it (None: out-of-domain), in first-seen order."""
    groups: dict[tuple[tuple[str, ...], tuple[float, ...]] | None, list[int]] = {}
    for i, route in enumerate(routes):
        key = None if route.task is None else (tuple(route.experts), tuple(route.weights))
        groups.setdefault(key, []).append(i)
    return groups


def _check_causal(routed: RoutedModel) -> None:
    if not routed.causal:
        raise ConfigError("this routed model is an encoder (it classifies): use RoutedModel.run, not generation")


def _model_for(routed: RoutedModel, key: tuple[tuple[str, ...], tuple[float, ...]] | None) -> tuple[Any, Any]:
    """Returns (the model a group runs on, its routing weights or None)."""
    if key is None:
        return (routed.base if routed.ood_model == "base" else routed.shared), None
    experts, weights = key
    return routed.shared, routed.expert_weights(list(experts), list(weights))


def generation_options(options: dict[str, Any]) -> dict[str, Any]:
    """Returns the generation options, checked: known names only, greedy by default, no beam search."""
    unknown = sorted(set(options) - set(GENERATION_OPTIONS))
    if unknown:
        raise ConfigError(f"routed generation: unknown option(s) {unknown}; known: {list(GENERATION_OPTIONS)}")
    out = {"max_new_tokens": 32, "do_sample": False, **options}
    if not isinstance(out["max_new_tokens"], int) or isinstance(out["max_new_tokens"], bool):
        raise ConfigError(f"routed generation: max_new_tokens must be an integer, got {out['max_new_tokens']!r}")
    if not 1 <= out["max_new_tokens"] <= 4096:
        raise ConfigError(f"routed generation: max_new_tokens must be in 1..4096, got {out['max_new_tokens']}")
    return out


@torch.inference_mode()
def generate(
    routed: RoutedModel, prompts: Sequence[str], oracle: Sequence[str] | None = None, **options: Any
) -> list[Generated]:
    """Returns each prompt's continuation (the new text only) and route. `oracle` names each prompt's task (the
    router is bypassed). Options: max_new_tokens (32), do_sample (False), temperature, top_p, top_k,
    repetition_penalty."""
    _check_causal(routed)
    settings = generation_options(options)
    prompts = [str(p) for p in prompts]
    routes = routed.routes(prompts, list(oracle) if oracle is not None else None)
    tokenizer = routed.tokenizer
    texts: list[str] = [""] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # a batch of prompts generates from aligned ends
    try:
        for key, members in _groups(routes).items():
            model, weights = _model_for(routed, key)
            for start in range(0, len(members), routed.batch_size):
                chunk = members[start : start + routed.batch_size]
                batch = tokenizer([prompts[i] for i in chunk], padding=True, return_tensors="pt")
                inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                kwargs = inputs | settings | {"pad_token_id": tokenizer.pad_token_id}
                if weights is None:
                    out = model.generate(**kwargs)
                else:
                    with routed.routing(weights):
                        out = model.generate(**kwargs)
                width = batch["input_ids"].shape[1]
                for row, i in enumerate(chunk):
                    texts[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [Generated(p, t, r.task, r.experts, r.weights, r.confidence) for p, t, r in zip(prompts, texts, routes)]


@torch.inference_mode()
def routed_perplexity(
    routed: RoutedModel,
    texts: Sequence[str],
    max_length: int = 256,
    oracle: Sequence[str] | None = None,
    batch_size: int = 8,
) -> tuple[dict[str, float], list[Route]]:
    """Returns ({"perplexity", "nll", "tokens"} of the routed model on `texts`, each text's route): each text is
    routed by its beginning and scored whole with that route."""
    _check_causal(routed)
    texts = list(texts)
    routes = routed.routes(texts, list(oracle) if oracle is not None else None)
    total_nll, total_tokens = 0.0, 0.0
    for key, members in _groups(routes).items():
        model, weights = _model_for(routed, key)
        group = [texts[i] for i in members]
        try:
            if weights is None:
                scored = perplexity(model, routed.tokenizer, group, max_length, batch_size)
            else:
                with routed.routing(weights):
                    scored = perplexity(model, routed.tokenizer, group, max_length, batch_size)
        except ConfigError:  # this group's texts are single tokens: nothing to predict
            continue
        total_nll += scored["nll"] * scored["tokens"]
        total_tokens += scored["tokens"]
    if not total_tokens:
        raise ConfigError("routed perplexity: the texts hold no window of two or more tokens")
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens}, routes
