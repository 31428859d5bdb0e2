"""Returns the best merge parameters on validation splits: the papers' "with validation" protocol.

Each grid point is merged (into a scratch folder) and scored on the validation split of every merge
task with the tasks' own heads (or, for `refit_average_normalized`, with heads refitted on the merged
encoder's train features); test splits are never looked at. Ties go to the earlier grid point.
"""

from __future__ import annotations

import itertools
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import ValidationError

from merging.config import MergeConfig
from merging.engine.merge import MergeOptions, run_merge
from merging.errors import ConfigError
from merging.evaluation.harness import Evaluator
from merging.evaluation.lm import LmEvaluator
from merging.methods import REGISTRY

Objective = Literal["average", "average_normalized", "refit_average", "refit_average_normalized"]


@dataclass
class SearchPoint:
    params: dict[str, Any]
    score: float
    seconds: float
    scores: dict[str, float] = field(default_factory=dict)  # every objective the point's heads give


@dataclass
class SearchResult:
    """The chosen point, its validation score, and every point tried (in grid order)."""

    best: dict[str, Any]
    best_score: float
    objective: str
    points: list[SearchPoint] = field(default_factory=list)
    best_dir: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_score": self.best_score,
            "objective": self.objective,
            "points": [
                {"params": p.params, "score": p.score, "seconds": p.seconds, "scores": p.scores} for p in self.points
            ],
        }


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Returns the cartesian product of a parameter grid as a list of dicts, in a stable order."""
    if not grid:
        raise ConfigError("search grid is empty: give at least one parameter with at least one value")
    for key, values in grid.items():
        if isinstance(values, str) or not isinstance(values, Sequence) or len(values) == 0:
            raise ConfigError(f"search grid `{key}` must be a non-empty list of values, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def with_parameters(config: MergeConfig, point: Mapping[str, Any]) -> MergeConfig:
    """Returns a copy of `config` whose method parameters are updated by `point`, validated."""
    from merging.config import ROUTED_METHODS

    model = ROUTED_METHODS.get(config.merge_method) or REGISTRY[config.merge_method].params_model
    allowed = {f.alias or name for name, f in model.model_fields.items()}
    unknown = sorted(set(point) - allowed)
    if unknown:
        raise ConfigError(
            f"search grid: {config.merge_method} has no parameter {', '.join(unknown)} "
            f"(it has {', '.join(sorted(allowed))})"
        )
    updated = config.model_copy(update={"parameters": {**config.parameters, **point}})
    try:
        updated.method_params()
    except ValidationError as exc:
        raise ConfigError(f"search grid point {dict(point)} is not valid for {config.merge_method}: {exc}") from exc
    return updated


def search_validation(
    config: MergeConfig,
    grid: Mapping[str, Sequence[Any]],
    evaluator: Evaluator | LmEvaluator,
    workdir: str | Path,
    objective: Objective = "average",
    options: MergeOptions | None = None,
    keep_best: bool = True,
    heads: tuple[str, ...] | None = None,
) -> SearchResult:
    """Returns the grid point with the best validation objective; its merged model stays in `best_dir`.

    `heads` (default: what `objective` needs) scores each point with more head protocols too, so
    one sweep can also answer the other protocol's objective (`SearchPoint.scores`).
    """
    points = [with_parameters(config, p) for p in grid_points(grid)]  # every point validated before any merge
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    opts = options or MergeOptions(progress=False)
    opts = MergeOptions(opts.device, opts.out_shard_size, opts.seed, False, True)
    result: SearchResult | None = None
    best_dir = work / "best"
    for number, (point, cfg) in enumerate(zip(grid_points(grid), points)):
        out = work / f"point-{number}"
        started = time.perf_counter()
        run_merge(cfg, out, opts)
        evaluator.forget(out)
        used = heads or (("refit",) if objective.startswith("refit_") else ("own",))
        scores = evaluator.model_scores(out, "validation", out_of_domain=False, heads=used)
        value = scores.objective(objective)
        evaluator.forget(out)
        names = [o for o in get_args(Objective) if ("refit" if o.startswith("refit_") else "own") in used]
        tried = SearchPoint(point, value, time.perf_counter() - started, {o: scores.objective(o) for o in names})
        if result is None:
            result = SearchResult(point, value, objective, [tried])
        else:
            result.points.append(tried)
        if result.best is point or value > result.best_score:
            result.best, result.best_score = point, value
            if keep_best:
                shutil.rmtree(best_dir, ignore_errors=True)
                out.rename(best_dir)
                result.best_dir = best_dir
        shutil.rmtree(out, ignore_errors=True)
    assert result is not None
    return result
