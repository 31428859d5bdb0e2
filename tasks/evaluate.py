"""Evaluate step: choose λ on validation (when the config gives a grid), then score base, fine-tunes and the merge.

Results: a JSON report, a per-task bar chart PNG, and a Prefect table artifact.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from merging.config import MergeConfig
from merging.engine.labels import model_labels
from merging.errors import ConfigError
from merging.evaluation.data import TaskSpec
from merging.evaluation.harness import Evaluator
from merging.evaluation.lm import LmEvaluator, is_lm_task
from merging.evaluation.plot import plot_report
from merging.evaluation.search import search_validation, with_parameters
from tasks.logs import run_logger


def evaluation_tasks(config: MergeConfig) -> list[TaskSpec]:
    """Returns the configured tasks, each merge task pointing at its (local) fine-tune by label.

    A task whose name is a fine-tune's label is that fine-tune's task; a task named like no
    fine-tune and without a model of its own is out-of-domain (probe retention only).
    """
    ev = config.evaluation
    if ev is None:
        raise ConfigError("evaluation: the config has no evaluation section")
    tasks: list[TaskSpec] = []
    if ev.zoo:
        from merging.zoo import zoo_tasks
        from merging.zoo.causal_manifest import causal_zoo_tasks, is_causal_zoo

        tasks += causal_zoo_tasks(ev.zoo) if is_causal_zoo(ev.zoo) else zoo_tasks(ev.zoo)
    tasks += ev.tasks
    by_label = dict(zip(model_labels(config), (e.model for e in config.fine_tunes())))
    out = []
    for t in tasks:
        if t.name in by_label:
            t = t.model_copy(update={"model": by_label[t.name]})
        elif t.model is not None:
            # The task names a fine-tune that is not in this merge: it is out of domain here.
            t = t.model_copy(update={"model": None})
        out.append(t)
    if not any(t.model for t in out):
        labels = ", ".join(by_label)
        raise ConfigError(f"evaluation: no task is named like a fine-tune of this merge (fine-tunes: {labels})")
    return out


LM_BATCH = 8  # windows per forward for perplexity: logits are batch x tokens x vocabulary floats


def is_lm_evaluation(config: MergeConfig, tasks: list[TaskSpec] | None = None) -> bool:
    """Returns whether the evaluation scores a causal LM (perplexity and lm-eval tasks); `tasks`: the
    config's evaluation tasks when the caller already has them."""
    ev = config.evaluation
    if ev is None:
        return False
    tasks = evaluation_tasks(config) if tasks is None else tasks
    kinds = {is_lm_task(t) for t in tasks}
    if kinds == {True, False}:
        lm = sorted(t.name for t in tasks if is_lm_task(t))
        raise ConfigError(
            f"evaluation: tasks {lm} score a causal LM (perplexity, lm_eval) and the others do not; use one kind"
        )
    if kinds == {True}:
        if ev.objective != "average_normalized":
            raise ConfigError(
                "evaluation.objective: with perplexity tasks the search maximizes `average_normalized` "
                "(the share of the fine-tunes' NLL gains kept); `average` is a mean perplexity, lower is better"
            )
        if ev.heads != "own":
            raise ConfigError("evaluation.heads: `refit` applies to encoder heads, not to perplexity tasks")
        lm_eval = sorted(t.name for t in tasks if t.metric != "perplexity")
        if ev.search and not any(t.metric == "perplexity" and t.model for t in tasks):
            raise ConfigError(
                f"evaluation.search: lm_eval tasks ({', '.join(lm_eval)}) carry their own data split and are "
                "scored on the report's split only; the validation search needs a perplexity task of a fine-tune"
            )
        if lm_eval and config.registry is not None and config.registry.gate.metric == "average":
            raise ConfigError(
                f"registry.gate.metric: `average` would mix perplexities with the scores of lm_eval tasks "
                f"({', '.join(lm_eval)}); gate on `average_normalized` or on one task's `task.<name>.score`"
            )
        return True
    return False


def make_evaluator(config: MergeConfig) -> Evaluator:
    """Returns the encoder evaluator of the config's classification tasks."""
    scorer = make_scorer(config)
    if isinstance(scorer, LmEvaluator):
        raise ConfigError("evaluation: perplexity tasks score a causal LM; this step needs classification tasks")
    return scorer


def make_scorer(config: MergeConfig) -> Evaluator | LmEvaluator:
    """Returns the evaluator of the config's tasks: per-domain perplexity for causal LMs, else the encoder's."""
    ev = config.evaluation
    assert ev is not None
    tasks = evaluation_tasks(config)
    if is_lm_evaluation(config, tasks):
        return LmEvaluator(tasks, config.base_model, batch_size=min(ev.batch_size, LM_BATCH), report_split=ev.split)
    return Evaluator(tasks, config.base_model, batch_size=ev.batch_size, seed=ev.seed)


@task(name="choose-parameters", cache_policy=NO_CACHE)
def choose_parameters(config: MergeConfig, workdir: Path) -> tuple[MergeConfig, dict[str, Any]]:
    """Returns (the config at the grid point best on validation, the search record)."""
    ev = config.evaluation
    assert ev is not None and ev.search
    evaluator = make_scorer(config)
    objective = ("refit_" if ev.heads == "refit" else "") + ev.objective
    result = search_validation(
        config,
        ev.search,
        evaluator,
        workdir / "search",
        objective=objective,  # type: ignore[arg-type]
        keep_best=False,
    )
    run_logger().info(
        "validation search over %d points: best %s (%s %.4f)",
        len(result.points),
        result.best,
        objective,
        result.best_score,
    )
    return with_parameters(config, result.best), result.to_json()


def metrics_of(report: dict[str, Any], name: str = "merged") -> dict[str, float]:
    """Returns flat metrics of one evaluated model: averages, OOD retention, per-task scores and normalized."""
    model = report["models"][name]
    out: dict[str, float] = {
        "average": model["average"],
        "average_normalized": model["average_normalized"],
    }
    if model.get("ood_retention") is not None:
        out["ood_retention"] = model["ood_retention"]
    for task_name, value in model["scores"].items():
        out[f"task.{task_name}.score"] = value
        out[f"task.{task_name}.normalized"] = model["normalized"][task_name]
        out[f"finetuned.{task_name}.score"] = report["finetuned"][task_name]
    if "refit_average_normalized" in model:  # the same encoder with heads refitted on it, as the base's probe
        out["refit_average"] = model["refit_average"]
        out["refit_average_normalized"] = model["refit_average_normalized"]
        for task_name, value in model["refit"].items():
            out[f"task.{task_name}.refit_score"] = value
        out["base_probe.average_normalized"] = report["base_probe"]["average_normalized"]
    for task_name, value in report["base_probe"]["scores"].items():
        out[f"base_probe.{task_name}.score"] = value
    for task_name, value in report.get("nll", {}).get(name, {}).items():  # perplexity tasks
        out[f"task.{task_name}.nll"] = value
    for task_name, entry in model.get("ood", {}).items():
        if "merged_nll" in entry:
            out[f"ood.{task_name}.perplexity"] = entry["merged_probe"]
            out[f"ood.{task_name}.retention"] = entry["retention"]
        elif report.get("metric") == "perplexity":  # an lm_eval task no fine-tune was trained for
            out[f"ood.{task_name}.score"] = entry["merged_probe"]
            out[f"ood.{task_name}.retention"] = entry["retention"]
    out["finetuned.average"] = statistics.mean(report["finetuned"].values())
    return out


def results_table(report: dict[str, Any], name: str = "merged") -> list[dict[str, Any]]:
    """Returns one row per task: base probe, fine-tuned, merged, normalized (out-of-domain rows: probe retention)."""
    model = report["models"][name]
    rows = []
    for t in report["tasks"]:
        task_name = t["name"]
        if t["role"] == "merge":
            rows.append(
                {
                    "task": task_name,
                    "role": "merge",
                    "base probe": round(report["base_probe"]["scores"][task_name], 4),
                    "fine-tuned": round(report["finetuned"][task_name], 4),
                    "merged": round(model["scores"][task_name], 4),
                    "normalized": round(model["normalized"][task_name], 4),
                    "merged (refit head)": round(model["refit"][task_name], 4) if "refit" in model else None,
                }
            )
        else:
            ood = model["ood"].get(task_name, {})
            rows.append(
                {
                    "task": task_name,
                    "role": "out-of-domain",
                    "base probe": round(ood.get("base_probe", float("nan")), 4),
                    "fine-tuned": None,
                    "merged": round(ood.get("merged_probe", float("nan")), 4),
                    "normalized": round(ood.get("retention", float("nan")), 4),
                }
            )
    rows.append(
        {
            "task": "average",
            "role": "",
            "base probe": None,
            "fine-tuned": round(statistics.mean(report["finetuned"].values()), 4),
            "merged": round(model["average"], 4),
            "normalized": round(model["average_normalized"], 4),
            "merged (refit head)": round(model["refit_average"], 4) if "refit" in model else None,
        }
    )
    return rows


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_merge(config: MergeConfig, merged_dir: Path, out_dir: Path, search: dict[str, Any] | None = None) -> dict:
    """Returns the evaluation report of the merged model; writes results.json, scores.png and a table artifact."""
    ev = config.evaluation
    assert ev is not None
    evaluator = make_scorer(config)
    report = evaluator.evaluate({"merged": merged_dir}, ev.split).to_json()
    if isinstance(evaluator, LmEvaluator):  # scores are perplexities; the NLLs behind the normalized scores too
        report["metric"] = "perplexity"
        report["nll"] = evaluator.nll_table({"merged": merged_dir}, ev.split)
    if search is not None:
        report["search"] = search
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    plot_report(report, out_dir / "scores.png", title=f"{config.name or config.merge_method}: {ev.split} scores")
    rows = results_table(report)
    create_table_artifact(
        table=rows,
        key="merge-results",
        description=f"{config.merge_method} {config.method_params().model_dump(by_alias=True, exclude_none=True)}"
        f" on split {ev.split!r}: per-task scores (normalized = merged / fine-tuned; OOD: probe retention)",
    )
    return report
