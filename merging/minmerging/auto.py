"""Returns MIN-Merging's neuron ratio chosen on validation under a storage budget (`neuron_ratio: auto`).

Every ratio of the grid whose patches fit the budget (patch bytes per task as a share of one model,
estimated from θ₀'s tensor shapes before anything is built, and checked on the built model) gets
a routed model, scored on the validation splits of the evaluation tasks with the router (each
input's own head on the routed features, normalized by its fine-tune). The best ratio wins; a tie
goes to the smaller ratio (less storage). Test splits are never looked at.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from merging.errors import ConfigError
from merging.evaluation.harness import Evaluator
from merging.evaluation.heads import Head
from merging.evaluation.lm import LmEvaluator
from merging.minmerging.build import MinMergingOptions, build_min_merging
from merging.minmerging.evaluate import routed_report
from merging.minmerging.importance import neuron_linears
from merging.minmerging.models import folder_is_causal, load_model
from merging.minmerging.params import patch_torch_dtype
from merging.minmerging.routed import RoutedModel

DEFAULT_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


@dataclass
class RatioPoint:
    neuron_ratio: float
    patch_fraction: float  # patch bytes per task / one model's bytes (measured)
    validation_normalized: float
    routing_accuracy: float
    seconds: float


@dataclass
class RatioChoice:
    neuron_ratio: float
    storage_budget: float
    estimated: dict[float, float]  # every grid ratio → estimated patch fraction
    points: list[RatioPoint] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "neuron_ratio": self.neuron_ratio,
            "storage_budget": self.storage_budget,
            "estimated_patch_fraction": {str(k): v for k, v in self.estimated.items()},
            "points": [asdict(p) for p in self.points],
        }


def estimated_patch_fraction(
    base: torch.nn.Module,
    neuron_ratio: float,
    small_tensors: bool = False,
    lm_head: bool = False,
    dtype: torch.dtype | None = None,
) -> float:
    """Returns the patch bytes of one task over the model's bytes: the kept rows (values, in `dtype` or the
    model's own, and an int64 index each) of every linear layer at `neuron_ratio` (per-layer budget; `lm_head`:
    a causal LM's output layer too), plus the 1-D tensors when patched whole."""
    params = dict(base.named_parameters(remove_duplicate=False))  # a tied LM head is found by its name
    model_bytes = sum(p.numel() * p.element_size() for p in dict(base.named_parameters()).values())

    def size(p: torch.Tensor) -> int:
        return dtype.itemsize if dtype is not None else p.element_size()

    patch = 0
    for name in neuron_linears(base, lm_head):
        w = params[name]
        rows = max(1, math.ceil(neuron_ratio * w.shape[0]))
        patch += rows * (w[0].numel() * size(w) + 8)
    if small_tensors:
        patch += sum(p.numel() * (size(p) + 8) for p in params.values() if p.dim() == 1)
    return patch / model_bytes


def choose_neuron_ratio(
    base_dir: Path,
    finetunes: dict[str, Path],
    calibration: dict[str, list[str]],
    evaluator: Evaluator | LmEvaluator,
    workdir: Path,
    options: MinMergingOptions,
    storage_budget: float,
    grid: Sequence[float] = DEFAULT_GRID,
    heads: dict[str, Head] | None = None,
    ood_texts: list[str] | None = None,
) -> RatioChoice:
    """Returns the ratio of `grid` whose routed model scores best on validation with patches ≤ `storage_budget`."""
    if not 0 < storage_budget <= 1:
        raise ConfigError(f"storage_budget must be in (0, 1] (patch bytes per task / one model), got {storage_budget}")
    if not grid or any(not 0 < r <= 1 for r in grid):
        raise ConfigError(f"neuron_ratio_grid must be ratios in (0, 1], got {list(grid)}")
    base = load_model(base_dir, folder_is_causal(base_dir))
    lm_head = options.patch_lm_head and folder_is_causal(base_dir)
    dtype = patch_torch_dtype(options.patch_dtype, next(base.parameters()).dtype)
    estimated = {
        r: estimated_patch_fraction(base, r, options.patch_small_tensors, lm_head, dtype) for r in sorted(set(grid))
    }
    del base
    fitting = [r for r, f in estimated.items() if f <= storage_budget]
    if not fitting:
        smallest = min(estimated.values())
        raise ConfigError(
            f"storage_budget {storage_budget}: no neuron ratio of the grid fits (the smallest patch is "
            f"{smallest:.4f} of the model); raise the budget or add smaller ratios"
        )
    missing = sorted(set(finetunes) - set(evaluator.in_domain()))
    if missing:
        raise ConfigError(f"neuron_ratio auto: fine-tunes {missing} have no evaluation task to score them on")
    finetuned = None if isinstance(evaluator, LmEvaluator) else evaluator.finetuned_scores("validation")
    choice = RatioChoice(fitting[0], storage_budget, estimated)
    best = -math.inf
    for ratio in fitting:
        started = time.perf_counter()
        out = Path(workdir) / f"ratio-{ratio:g}"
        report = build_min_merging(
            base_dir, finetunes, calibration, out, replace(options, neuron_ratio=ratio), heads, ood_texts
        )
        fraction = report.storage["patch_bytes"] / len(finetunes) / report.storage["one_full_model_bytes"]
        if fraction > storage_budget:  # the estimate was too low (for example a model-wide budget)
            shutil.rmtree(out, ignore_errors=True)
            continue
        scored = routed_report(evaluator, RoutedModel.load(out), "validation", finetuned, out_of_domain=False)
        shutil.rmtree(out, ignore_errors=True)
        point = RatioPoint(
            ratio,
            fraction,
            scored["average_normalized"],
            scored["routing_accuracy_average"],
            time.perf_counter() - started,
        )
        choice.points.append(point)
        if point.validation_normalized > best:
            best, choice.neuron_ratio = point.validation_normalized, ratio
    if not choice.points:
        raise ConfigError(f"storage_budget {storage_budget}: every built patch was larger than the budget")
    return choice
