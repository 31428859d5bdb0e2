"""Fine-tunes the zoo's encoder on one task the way practitioners do: full model, AdamW, warm-up, early stopping.

The recipe: the whole encoder and the head train together (the head starts at the base's linear
probe, or stays frozen at it under the `frozen` protocol); AdamW with weight decay on matrices only;
linear warm-up over the first 10% of steps, then linear decay; gradient clipping at 1.0; batches of
similar lengths (dynamic padding: a shuffled pool of batches is sorted by length inside windows);
the validation score is measured every `eval_every` steps and the best state is kept (early
stopping after `patience` evaluations without improvement). The learning rate is chosen on
validation from a small grid; the test split is never looked at.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from merging.evaluation.heads import Head
from merging.evaluation.metrics import score

Protocol = Literal["joint", "frozen"]


@dataclass(frozen=True)
class Recipe:
    """The fine-tuning hyper-parameters of one zoo size."""

    learning_rates: tuple[float, ...]
    epochs: float
    batch_size: int
    max_steps: int
    eval_every: int
    patience: int
    weight_decay: float = 0.01
    warmup: float = 0.1


@dataclass
class TrainResult:
    """The fine-tuned model (best validation state) and how it was found."""

    model: torch.nn.Module
    learning_rate: float
    steps: int
    best_step: int
    validation: float
    seconds: float
    grid: dict[str, float] = field(default_factory=dict)


def length_batches(
    lengths: list[int], batch_size: int, generator: torch.Generator, window: int = 50
) -> list[list[int]]:
    """Returns one epoch of batches: shuffled, sorted by length inside windows of `window` batches, re-shuffled."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches: list[list[int]] = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def _load(base: Path, label_names: list[str]) -> tuple[torch.nn.Module, object]:
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the classifier is new here: the probe is copied into it
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            base,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            trust_remote_code=False,
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model, AutoTokenizer.from_pretrained(base, trust_remote_code=False)


@torch.inference_mode()
def predict(
    model: torch.nn.Module, tokenizer: object, texts: list[str], max_length: int, batch_size: int = 128
) -> torch.Tensor:
    """Returns the model's predicted class per text (length-sorted batches, original order)."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), dtype=torch.long)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer(  # type: ignore[operator]
            [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        out[torch.tensor(idx)] = model(**batch).logits.argmax(-1)
    return out


@dataclass(frozen=True)
class Job:
    """What one task's fine-tuning needs: the base, the data, the probe to start the head at, the recipe."""

    base: Path
    train: tuple[list[str], list[int]]
    validation: tuple[list[str], list[int]]
    probe: Head
    protocol: Protocol
    recipe: Recipe
    max_length: int
    seed: int
    label_names: list[str]
    metric: str


def train_once(job: Job, learning_rate: float) -> TrainResult:
    """Returns the best-on-validation model of one run at one learning rate."""
    from transformers import get_linear_schedule_with_warmup

    base, train, validation, probe, recipe = job.base, job.train, job.validation, job.probe, job.recipe
    max_length, metric = job.max_length, job.metric
    started = time.perf_counter()
    torch.manual_seed(job.seed)
    model, tokenizer = _load(base, job.label_names)
    with torch.no_grad():
        classifier: torch.nn.Linear = model.classifier  # type: ignore[assignment]
        classifier.weight.copy_(probe.weight)
        classifier.bias.copy_(probe.bias)
    classifier.requires_grad_(job.protocol == "joint")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": recipe.weight_decay},
            {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=learning_rate,
    )
    texts, labels = train
    steps = min(recipe.max_steps, max(1, math.ceil(recipe.epochs * len(texts) / recipe.batch_size)))
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, int(recipe.warmup * steps)), steps)
    lengths = [len(t) for t in texts]
    gen = torch.Generator().manual_seed(job.seed)
    val_labels = torch.tensor(validation[1])
    best = (-math.inf, 0, copy.deepcopy(model.state_dict()))
    since_best, step = 0, 0
    batches: list[list[int]] = []
    while step < steps and since_best < recipe.patience:
        if not batches:
            batches = length_batches(lengths, recipe.batch_size, gen)
        idx = batches.pop()
        model.train()
        batch = tokenizer(  # type: ignore[operator]
            [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        loss = model(**batch, labels=torch.tensor([labels[i] for i in idx])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % recipe.eval_every == 0 or step == steps:
            value = score(metric, predict(model, tokenizer, validation[0], max_length), val_labels)
            if value > best[0]:
                best, since_best = (value, step, copy.deepcopy(model.state_dict())), 0
            else:
                since_best += 1
    model.load_state_dict(best[2])
    model.eval()
    return TrainResult(model, learning_rate, step, best[1], best[0], time.perf_counter() - started)


def finetune_task(job: Job, learning_rates: tuple[float, ...] | None = None) -> TrainResult:
    """Returns the best run over the learning-rate grid (ties go to the smaller rate), chosen on validation."""
    best: TrainResult | None = None
    grid: dict[str, float] = {}
    seconds = 0.0
    for lr in learning_rates or job.recipe.learning_rates:
        run = train_once(job, lr)
        grid[f"{lr:g}"] = round(run.validation, 4)
        seconds += run.seconds
        if best is None or run.validation > best.validation:
            best = run
        else:
            del run
    assert best is not None
    best.grid, best.seconds = grid, seconds
    return best
