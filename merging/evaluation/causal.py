"""Returns language-model scores of a causal LM: perplexity on texts, and lm-evaluation-harness tasks.

Perplexity is built in: exp of the mean negative log-likelihood per predicted token, over texts
cut into windows of at most `max_length` tokens (each window scored on its own; the first token of
a window has no context and is not predicted). lm-evaluation-harness is optional: install the
`lm-eval` extra; without it `lm_eval_scores` raises a clear error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from merging.errors import CheckpointError, ConfigError
from merging.evaluation.feature_cache import scores_cached


def load_causal_lm(path: str | Path) -> tuple[torch.nn.Module, Any]:
    """Returns (model in eval mode, tokenizer) from a Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot load a causal language model and its tokenizer: {exc}") from exc
    model.eval()
    return model, tokenizer


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, float]:
    """Returns {"perplexity", "nll" (mean per token), "tokens"} of `model` on `texts`."""
    windows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        windows += [ids[i : i + max_length] for i in range(0, len(ids), max_length) if len(ids[i : i + max_length]) > 1]
    if not windows:
        raise ConfigError("perplexity: the texts hold no window of two or more tokens")
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = windows[start : start + batch_size]
        width = max(len(w) for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, w in enumerate(batch):
            ids[row, : len(w)] = torch.tensor(w)
            mask[row, : len(w)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:]
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        keep = mask[:, 1:].bool()
        total_nll += float(nll[keep].double().sum())
        total_tokens += int(keep.sum())
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": float(total_tokens)}


def folder_perplexity(
    folder: str | Path,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
    load: Callable[[], tuple[torch.nn.Module, Any]],
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """Returns `perplexity(...)` of the model saved in `folder` (`load()` returns it and its tokenizer, on
    `device`), read from the score cache when the same files were scored on the same texts: `load` is
    called only on a miss."""
    import transformers

    settings: dict[str, str | int] = {
        "max_length": int(max_length),
        "batch_size": int(batch_size),
        "device": device,
        "transformers": transformers.__version__,
    }
    return scores_cached(
        "perplexity", folder, texts, settings, lambda: perplexity(*load(), texts, max_length, batch_size, progress)
    )


_MANAGERS: dict[tuple[str, ...], Any] = {}


def task_manager(factory: Callable[..., Any], include_path: str | Path | None) -> Any:
    """Returns an lm-eval TaskManager (`factory`) of its own tasks plus `include_path`'s, built once per process
    for the same folder contents: building one indexes every task YAML lm-eval ships, 10-20 s on two cores,
    which an evaluation of several models would otherwise pay per model and task."""
    if include_path is None:
        key: tuple[str, ...] = ("",)
    else:
        folder = Path(include_path).resolve()
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        key = (str(folder), *(f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files))
    if key not in _MANAGERS:
        if len(_MANAGERS) >= 4:
            _MANAGERS.clear()
        _MANAGERS[key] = factory(include_path=str(include_path)) if include_path is not None else factory()
    return _MANAGERS[key]


def lm_eval_scores(
    path: str | Path,
    tasks: Sequence[str],
    limit: int | None = None,
    batch_size: int = 8,
    include_path: str | Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Returns lm-evaluation-harness results (task → {"<metric>,<filter>": value}) of the model at `path` (needs
    the `lm-eval` extra). `include_path`: a folder of the user's own task YAMLs (lm-eval's TaskManager), so a
    task on local data runs offline; lm-eval's own tasks fetch their data sets (the hub or a warm cache)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ConfigError(
            "lm-evaluation-harness is not installed; `pip install -e '.[lm-eval]'` adds it "
            "(its own tasks download their data: run it where the hub is reachable or pre-cached)"
        ) from exc
    manager = task_manager(TaskManager, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f"the task YAMLs in {include_path}" if include_path is not None else "lm-eval's task registry"
        raise ConfigError(f"lm-eval: no task {', '.join(map(repr, unknown))} in {where}")
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={Path(path)},dtype=float32",
        tasks=list(tasks),
        limit=limit,
        batch_size=batch_size,
        device=device,
        task_manager=manager,
    )
    return dict(results["results"]) if results else {}
