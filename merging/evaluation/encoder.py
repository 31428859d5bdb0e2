"""Returns sentence features from an encoder checkpoint: the input of its classification head.

An encoder is loaded once (base, fine-tune or merged: any folder a `*ForSequenceClassification`
class loads, with or without a head) and turned into features by one batched pass per dataset.
Heads are task-specific and never merged, so a task's head is applied to these features
afterwards (`merging.evaluation.heads`); one pass serves every head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from merging.errors import CheckpointError


@dataclass
class Encoder:
    """A loaded encoder: the model (its head unused), its tokenizer, and where it came from."""

    path: Path
    model: torch.nn.Module
    tokenizer: object
    head_module: torch.nn.Linear
    tokenizer_path: Path | None = None  # where the tokenizer came from, when not `path`

    @property
    def feature_dim(self) -> int:
        return int(self.head_module.in_features)


def _head_linear(model: torch.nn.Module, path: Path) -> torch.nn.Linear:
    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    if isinstance(head, torch.nn.Linear):
        return head
    raise CheckpointError(
        f"{path}: the evaluation harness needs a model whose classification head is one Linear layer "
        f"(`classifier` or `score`, as in BertForSequenceClassification); got {type(head).__name__}"
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json")


def load_tokenizer(folder: str | Path) -> Any:
    """Returns the tokenizer stored in `folder`, or raises CheckpointError naming the file that is unreadable."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    for name in TOKENIZER_FILES:
        f = folder / name
        if not f.exists():
            continue
        try:
            text = f.read_text(encoding="utf-8")
            if name.endswith(".json"):
                import json

                json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"{f}: unreadable tokenizer file ({type(exc).__name__}: {exc})") from None
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a broken tokenizer
        raise CheckpointError(f"{folder}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from None


def load_encoder(path: str | Path, tokenizer_path: str | Path | None = None) -> Encoder:
    """Returns the encoder stored at `path` (a Hugging Face folder), in eval mode, with its tokenizer."""
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json; an encoder folder needs one to be evaluated")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    # The head is replaced per task; its size here only has to be valid.
    config.num_labels = max(int(getattr(config, "num_labels", 2) or 2), 2)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized classifier" is expected: heads come later
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder, config=config, trust_remote_code=False)
        tokenizer = load_tokenizer(tokenizer_path or folder)
    except OSError as exc:
        raise CheckpointError(f"{folder}: cannot load the encoder or its tokenizer: {exc}") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    model.eval()
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise CheckpointError(
            f"{tokenizer_path or folder}: the tokenizer has {len(tokenizer)} tokens but the encoder at {folder} "
            f"embeds only {vocab}; they do not belong together"
        )
    tok = Path(tokenizer_path) if tokenizer_path is not None else None
    return Encoder(folder, model, tokenizer, _head_linear(model, folder), tok)


@torch.inference_mode()
def encode(
    encoder: Encoder,
    texts: Sequence[str],
    max_length: int = 64,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "encode",
) -> torch.Tensor:
    """Returns the (len(texts), feature_dim) float32 features the head of `encoder` would see."""
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0].detach().float())

    handle = encoder.head_module.register_forward_pre_hook(hook)
    try:
        # Sorting by length keeps padding small; the order is restored at the end.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            batch = encoder.tokenizer(  # type: ignore[operator]
                [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            encoder.model(**batch)
    finally:
        handle.remove()
    if not captured:
        return torch.empty(0, encoder.feature_dim)
    feats = torch.cat(captured)
    out = torch.empty_like(feats)
    out[torch.tensor(order)] = feats
    return out
