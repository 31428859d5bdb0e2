"""Returns a MIN-Merging model folder: enhancement, shared model, router calibration, routed model.

1. Enhancement: per fine-tune, score every neuron of every linear layer (activation-aware on the
   task's calibration texts, or the data-free row norm) and keep the top `neuron_ratio` rows (per
   tensor, or over the whole model with `budget: model`); the rest of that layer's task vector is
   dropped (other tensors keep their whole task vector). The task's patch holds the kept rows (and,
   with `patch_small_tensors`, its biases and LayerNorm parameters whole).
2. Shared model: θ_shared = θ₀ itself (`shared_from: base`, the encoders' default under `auto`: on
   zoo v2 any other task's vector in θ_shared moved a routed task's logits enough to break its
   head, see benchmarks/head_collapse.py), or θ₀ + a registered static merge of the enhanced
   fine-tunes (`enhanced`, the causal LMs' default) or of the whole fine-tunes (`finetuned`).
3. Router: trained on θ₀'s mean-pooled features (after `router_layer` layers) of the calibration texts,
   labelled by task.
4. Routed model: θ_shared + per-task patches (the important rows of θₜ) + router, saved as a folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from merging.config import MergeConfig
from merging.engine.merge import MergeOptions, run_merge
from merging.errors import ConfigError
from merging.evaluation.heads import Head
from merging.minmerging.features import layer_pooled, pooled_depths
from merging.minmerging.grouped import RoutedCompute
from merging.minmerging.importance import (
    activation_importance,
    norm_importance,
    overlap_matrix,
    task_vectors,
    top_rows,
)
from merging.minmerging.models import feature_model, folder_is_causal, load_model, load_tokenizer
from merging.minmerging.params import (
    Importance,
    PatchDType,
    SharedFrom,
    patch_torch_dtype,
    resolve_importance,
    resolve_shared_from,
    shared_merge,
)
from merging.minmerging.routed import OodModel, Patch, RoutedModel, neuron_patch
from merging.minmerging.router import Router, RouterOptions, train_router


@dataclass(frozen=True)
class MinMergingOptions:
    importance: Importance = "auto"  # norm for encoders, activation for causal LMs (resolve_importance)
    neuron_ratio: float = 0.5  # with float16 patches 11.9% of a model per task on zoo v2, 97.3 / 99.5% in-domain
    shared_method: str = "neuromerging"
    shared_parameters: dict[str, Any] = field(default_factory=dict)
    top_k: int = 1
    ood_model: OodModel = "base"
    max_length: int = 64
    batch_size: int = 32
    budget: Literal["layer", "model"] = "layer"  # top rows per tensor, or over the whole model
    patch_small_tensors: bool = False  # patches also carry every 1-D tensor (biases, LayerNorm) whole
    patch_lm_head: bool = False  # a causal LM's output layer is scored and patched like the others (token rows)
    patch_dtype: PatchDType = "auto"  # the patches' rows stored rounded to this dtype (auto: float16 for float32)
    # θ_shared = θ₀ (base), shared_method's merge of the enhanced / whole fine-tunes, or auto (encoders: base; causal
    # LMs: enhanced). Naming a shared method under auto means enhanced, as in the pipeline's parameters.
    shared_from: SharedFrom = "auto"
    # the router reads θ₀ after this many layers (None: the last; "auto": the depth whose router is most
    # accurate on the held-out calibration texts, ties to the shallower)
    router_layer: int | Literal["auto"] | None = "auto"
    # a causal LM routes on prompts: half of the router's calibration texts (and OOD texts) are cut to a random
    # prefix of 4 tokens or more, so short prompts look like what the router was calibrated on
    prompt_prefixes: bool = True
    # how an encoder's top-1 routed batch runs: each task's linear layers materialized in memory, one product per
    # task and layer ("grouped", the FLOPs of a static forward), or θ_shared plus row deltas ("delta", no copies)
    routed_compute: RoutedCompute = "grouped"
    router: RouterOptions = field(default_factory=RouterOptions)

    def __post_init__(self) -> None:
        named = self.shared_method != "neuromerging" or bool(self.shared_parameters)
        if named and self.shared_from == "auto":
            object.__setattr__(self, "shared_from", "enhanced")  # frozen: set once, while constructing
        if named and self.shared_from == "base":
            raise ConfigError(
                f"shared_from base makes θ_shared θ₀ itself, so shared_method {self.shared_method!r} and its "
                "parameters would not be used; pass shared_from='enhanced' or 'finetuned' to merge θ_shared"
            )


@dataclass
class MinMergingReport:
    """What was built: folders, router metrics, the tasks' neuron overlap, and storage against T full models."""

    out_dir: Path
    shared_dir: Path
    router: dict[str, Any]
    overlap: list[list[float]]
    storage: dict[str, int]
    warnings: list[str]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_dir"], data["shared_dir"] = str(self.out_dir), str(self.shared_dir)
        return data


def _batches(tokenizer: Any, texts: list[str], options: MinMergingOptions) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(texts), options.batch_size):
        yield dict(
            tokenizer(
                texts[start : start + options.batch_size],
                padding=True,
                truncation=True,
                max_length=options.max_length,
                return_tensors="pt",
            )
        )


def _pooled(model: torch.nn.Module, tokenizer: Any, texts: list[str], options: MinMergingOptions) -> torch.Tensor:
    layer = None if options.router_layer == "auto" else options.router_layer
    with torch.inference_mode():
        chunks = [layer_pooled(feature_model(model), batch, layer) for batch in _batches(tokenizer, texts, options)]
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)


def train_router_at_depth(
    base: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    labels: torch.Tensor,
    tasks: list[str],
    options: MinMergingOptions,
    ood_texts: list[str] | None,
) -> tuple[Router, int | None]:
    """Returns (the router, the depth it reads). With router_layer "auto", a router per depth is trained and the
    one most accurate on the held-out calibration texts wins (ties to the shallower); its metrics record all."""
    if options.router_layer != "auto":
        ood = _pooled(base, tokenizer, ood_texts, options) if ood_texts else None
        return train_router(_pooled(base, tokenizer, texts, options), labels, tasks, options.router, ood), (
            options.router_layer
        )
    features = feature_model(base)
    depths = pooled_depths(features, _batches(tokenizer, texts, options))
    ood_depths = pooled_depths(features, _batches(tokenizer, ood_texts, options)) if ood_texts else [None] * len(depths)
    best: tuple[Router, int] | None = None
    accuracy: dict[str, float] = {}
    for k, (feats, ood) in enumerate(zip(depths, ood_depths)):
        router = train_router(feats, labels, tasks, options.router, ood)
        accuracy[f"held_out_accuracy_after_{k}_layers"] = router.metrics["router_accuracy"]
        if best is None or router.metrics["router_accuracy"] > best[0].metrics["router_accuracy"]:
            best = (router, k)
    assert best is not None
    router, layer = best
    router.metrics.update(accuracy)
    router.metrics["router_layer"] = float(layer)
    return router, layer


def prompt_like(tokenizer: Any, texts: list[str], max_length: int, seed: int, shortest: int = 4) -> list[str]:
    """Returns `texts` with every other one (a seeded half) cut to its first k tokens, k drawn from shortest to
    the text's length (at most `max_length`): a causal LM's router then sees prompt-length inputs too."""
    gen = torch.Generator().manual_seed(seed)
    cut = torch.randperm(len(texts), generator=gen)[: len(texts) // 2].tolist()
    out = list(texts)
    for i in cut:
        ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"][:max_length]
        if len(ids) > shortest:
            k = int(torch.randint(shortest, len(ids) + 1, (1,), generator=gen))
            out[i] = tokenizer.decode(ids[:k])
    return out


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@dataclass
class Enhancement:
    """Enhanced fine-tunes (θ₀ + Mₜ ⊙ τₜ on linear layers), θ₀ saved the same way, the patches and the overlap."""

    tasks: list[str]
    base_dir: Path  # θ₀ saved as its encoder (the tensor names the enhanced folders use)
    enhanced: dict[str, Path]
    patches: dict[str, Patch]
    overlap: list[list[float]]
    kept_rows: dict[str, int]


def check_calibration(finetunes: dict[str, Path], calibration: dict[str, list[str]]) -> None:
    """Raises ConfigError for calibration tasks that match no fine-tune, fine-tunes without texts, or one task."""
    unknown = sorted(set(calibration) - set(finetunes))
    if unknown:
        raise ConfigError(f"calibration: tasks {unknown} match no fine-tune (fine-tunes: {sorted(finetunes)})")
    empty = sorted(t for t in finetunes if not calibration.get(t))
    if empty:
        raise ConfigError(f"calibration: no calibration texts for task(s) {empty}")
    if len(finetunes) < 2:
        raise ConfigError("calibration: MIN-Merging routes between tasks and needs at least two fine-tunes")


def enhance(
    base_dir: Path,
    finetunes: dict[str, Path],
    calibration: dict[str, list[str]],
    out_dir: Path,
    options: MinMergingOptions | None = None,
) -> Enhancement:
    """Returns the enhancement: per fine-tune, its important rows (scored, top `neuron_ratio`) kept, the rest of
    each linear layer's task vector dropped; writes `out_dir/base` and `out_dir/<task>` folders (encoders, or
    causal LMs with their LM head when the base is one)."""
    options = options or MinMergingOptions()
    check_calibration(finetunes, calibration)
    tasks = list(finetunes)
    causal = folder_is_causal(base_dir)
    base, tokenizer = load_model(base_dir, causal), load_tokenizer(base_dir, causal)
    out_dir.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(out_dir / "base")
    tokenizer.save_pretrained(out_dir / "base")  # θ_shared takes the base's tokenizer
    patches, masks, enhanced = {}, [], {}
    base_state = base.state_dict()
    for task in tasks:
        tuned = load_model(finetunes[task], causal)
        vectors = task_vectors(base, tuned, causal and options.patch_lm_head)
        if resolve_importance(options.importance, causal) == "activation":
            scores = activation_importance(
                tuned, tokenizer, calibration[task], vectors, options.batch_size, options.max_length
            )
        else:
            scores = norm_importance(vectors)
        mask = top_rows(scores, options.neuron_ratio, options.budget)
        masks.append(mask)
        dtype = patch_torch_dtype(options.patch_dtype, next(tuned.parameters()).dtype)
        patches[task] = neuron_patch(tuned, mask, options.patch_small_tensors, dtype)
        # θ₀ + Mₜ ⊙ τₜ on linear weights (a scored tensor with no kept row falls back to θ₀); other tensors
        # keep their whole fine-tuned value. With shared_from "finetuned", θ_shared merges the whole fine-tunes.
        state = tuned.state_dict()
        empty = torch.zeros(0, dtype=torch.long)
        with torch.no_grad():
            for name in scores if resolve_shared_from(options.shared_from, causal) == "enhanced" else ():
                idx = mask.get(name, empty)
                kept = state[name][idx].clone()
                state[name].copy_(base_state[name])
                state[name][idx] = kept
        enhanced[task] = out_dir / task
        tuned.save_pretrained(enhanced[task])
        del tuned
    kept = {t: int(sum(idx.numel() for idx in m.values())) for t, m in zip(tasks, masks)}
    return Enhancement(tasks, out_dir / "base", enhanced, patches, overlap_matrix(masks).tolist(), kept)


def calibrate(
    base_dir: Path,
    shared_dir: Path,
    enhancement: Enhancement,
    calibration: dict[str, list[str]],
    out_dir: Path,
    finetunes: dict[str, Path],
    options: MinMergingOptions | None = None,
    heads: dict[str, Head] | None = None,
    ood_texts: list[str] | None = None,
) -> MinMergingReport:
    """Returns the report of training the router on θ₀'s features and saving the routed model into `out_dir`."""
    options = options or MinMergingOptions()
    tasks = enhancement.tasks
    causal = folder_is_causal(base_dir)
    base, tokenizer = load_model(base_dir, causal), load_tokenizer(base_dir, causal)
    shared = load_model(shared_dir, causal)
    texts = [text for task in tasks for text in calibration[task]]
    if causal and options.prompt_prefixes:
        texts = prompt_like(tokenizer, texts, options.max_length, options.router.seed)
        ood_texts = prompt_like(tokenizer, ood_texts, options.max_length, options.router.seed) if ood_texts else None
    labels = torch.tensor([i for i, task in enumerate(tasks) for _ in calibration[task]])
    router, router_layer = train_router_at_depth(base, tokenizer, texts, labels, tasks, options, ood_texts)
    routed = RoutedModel(
        shared,
        base,
        tokenizer,
        router,
        enhancement.patches,
        heads,
        options.ood_model,
        options.top_k,
        options.max_length,
        router_layer=router_layer,
        compute=options.routed_compute,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = routed.save(out_dir, shared_dir, Path(base_dir).resolve())
    full = _folder_bytes(Path(finetunes[tasks[0]]))
    storage = {
        "shared_bytes": _folder_bytes(shared_dir),
        "patch_bytes": sum(v for k, v in sizes.items() if k.startswith("patch:")),
        "router_bytes": sizes["router"],
        "finetunes_bytes": sum(_folder_bytes(Path(finetunes[t])) for t in tasks),
        "one_full_model_bytes": full,
        **{k.replace("patch:", "patch_bytes:"): v for k, v in sizes.items() if k.startswith("patch:")},
    }
    router_info = {**router.metrics, "tasks": tasks, "kept_rows": enhancement.kept_rows}
    report = MinMergingReport(out_dir, shared_dir, router_info, enhancement.overlap, storage, list(router.warnings))
    (out_dir / "min_merging_report.json").write_text(json.dumps(report.to_json(), indent=1))
    if (shared_dir / "heads").is_dir() and not heads:
        shutil.copytree(shared_dir / "heads", out_dir / "heads", dirs_exist_ok=True)
    return report


def build_min_merging(
    base_dir: Path,
    finetunes: dict[str, Path],
    calibration: dict[str, list[str]],
    out_dir: Path,
    options: MinMergingOptions | None = None,
    heads: dict[str, Head] | None = None,
    ood_texts: list[str] | None = None,
) -> MinMergingReport:
    """Returns the report of building the routed model for `finetunes` (task name → folder) into `out_dir`."""
    options = options or MinMergingOptions()
    check_calibration(finetunes, calibration)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".enhanced-") as tmp:
        enhancement = enhance(base_dir, finetunes, calibration, Path(tmp), options)
        method, parameters = shared_merge(
            options.shared_from, options.shared_method, options.shared_parameters, folder_is_causal(base_dir)
        )
        config = MergeConfig(
            merge_method=method,
            base_model=str(enhancement.base_dir),
            models=[{"model": str(enhancement.enhanced[t]), "name": t} for t in enhancement.tasks],  # type: ignore[misc]
            parameters=parameters,
        )
        shared_dir = out_dir / "shared"
        run_merge(config, shared_dir, MergeOptions(progress=False, overwrite=True))
    return calibrate(base_dir, shared_dir, enhancement, calibration, out_dir, finetunes, options, heads, ood_texts)
