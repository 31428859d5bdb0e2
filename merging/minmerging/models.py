"""Returns the models MIN-Merging works on: encoders (`AutoModel`) or causal LMs (`AutoModelForCausalLM`).

A folder whose config names a `...ForCausalLM` architecture is a causal LM: its fine-tunes, θ_shared and θ₀
are loaded with their LM head (the routed model generates), and the router reads the decoder stack's
hidden states. Any other folder is loaded as its base encoder, as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from merging.errors import CheckpointError


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silences transformers' load reports (a classification checkpoint loaded as its base model lists its head)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def is_causal_lm(model: torch.nn.Module) -> bool:
    """Returns whether `model` generates text (a transformers `...ForCausalLM`), not an encoder."""
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False


def feature_model(model: torch.nn.Module) -> torch.nn.Module:
    """Returns the module whose hidden states the router reads: a causal LM's decoder stack, or the encoder."""
    return getattr(model, "base_model", model) if is_causal_lm(model) else model


def folder_is_causal(folder: str | Path) -> bool:
    """Returns whether the model folder's config.json names a causal-LM architecture."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable model config ({exc})") from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return isinstance(architectures, list) and any(str(a).endswith("ForCausalLM") for a in architectures)


def load_model(folder: str | Path, causal: bool) -> Any:
    """Returns the model at `folder` in eval mode: a causal LM (float32) or the base encoder."""
    from transformers import AutoModel, AutoModelForCausalLM

    with quiet_transformers():
        if causal:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
        else:
            model = AutoModel.from_pretrained(folder, trust_remote_code=False)
    return model.eval()


def load_tokenizer(folder: str | Path, causal: bool) -> Any:
    """Returns the folder's tokenizer; a causal LM's pads with its end-of-text token when it has no pad token."""
    from transformers import AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if causal and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
