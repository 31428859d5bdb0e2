"""MIN-Merging steps: load the calibration set, enhance the fine-tunes, calibrate the router, score the routed model.

`enhance_task` runs before the per-layer merge (θ_shared is the static merge of the enhanced
fine-tunes, merged by the same mapped layer tasks as any method); `calibrate_router` runs between
merge and evaluate. A router whose held-out accuracy is near chance is a loud warning in the run
log, in the results and as a tag on the MLflow run and version (or an error with
`calibration.fail_on_chance`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from merging.config import MergeConfig
from merging.engine.labels import model_labels
from merging.errors import ConfigError
from merging.evaluation.heads import Head, load_head
from merging.minmerging.build import Enhancement, MinMergingOptions, MinMergingReport, calibrate, enhance
from merging.minmerging.calibration import CalibrationSet, calibration_set
from merging.minmerging.models import folder_is_causal
from merging.minmerging.params import MinMergingParams
from merging.minmerging.router import RouterOptions
from tasks.logs import run_logger


def min_merging_options(config: MergeConfig) -> MinMergingOptions:
    """Returns the library's options from the config's parameters and calibration.router section."""
    params = config.method_params()
    assert isinstance(params, MinMergingParams) and config.calibration is not None
    r = config.calibration.router
    router = RouterOptions(r.hidden, r.epochs, r.learning_rate, r.weight_decay, r.holdout, r.target_recall, r.seed)
    return MinMergingOptions(
        importance=params.importance,
        neuron_ratio=0.1 if params.neuron_ratio == "auto" else params.neuron_ratio,  # auto: chosen before use
        shared_method=params.shared_method,
        shared_parameters=dict(params.shared_parameters),
        top_k=params.top_k,
        ood_model=params.ood_model,
        max_length=params.max_length,
        batch_size=params.batch_size,
        budget=params.budget,
        patch_small_tensors=params.patch_small_tensors,
        patch_lm_head=params.patch_lm_head,
        patch_dtype=params.patch_dtype,
        prompt_prefixes=params.prompt_prefixes,
        shared_from=params.shared_from,
        router_layer=params.router_layer,
        routed_compute=params.routed_compute,
        router=router,
    )


def finetune_dirs(config: MergeConfig) -> dict[str, Path]:
    """Returns fine-tune label → local folder."""
    return {label: Path(e.model) for label, e in zip(model_labels(config), config.fine_tunes())}


@task(name="choose-neuron-ratio", cache_policy=NO_CACHE)
def choose_neuron_ratio_task(config: MergeConfig, calib: CalibrationSet, work: Path) -> tuple[MergeConfig, dict]:
    """Returns (the config at the neuron ratio best on validation within the storage budget, the choice record)."""
    from merging.evaluation.search import with_parameters
    from merging.minmerging.auto import choose_neuron_ratio
    from tasks.evaluate import make_scorer

    params = config.method_params()
    assert isinstance(params, MinMergingParams) and params.neuron_ratio == "auto"
    try:
        choice = choose_neuron_ratio(
            Path(config.base_model),
            finetune_dirs(config),
            calib.texts,
            make_scorer(config),
            work,
            min_merging_options(config),
            params.storage_budget,
            params.neuron_ratio_grid,
            task_heads(config),
            calib.ood or None,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    run_logger().info(
        "neuron_ratio auto (storage budget %s of a model per task): chose %s on validation; tried %s",
        params.storage_budget,
        choice.neuron_ratio,
        ", ".join(f"{p.neuron_ratio:g}: {p.validation_normalized:.4f}" for p in choice.points),
    )
    return with_parameters(config, {"neuron_ratio": choice.neuron_ratio}), choice.to_json()


@task(name="load-calibration", cache_policy=NO_CACHE)
def load_calibration(config: MergeConfig) -> CalibrationSet:
    """Returns the calibration texts (bad calibration input fails here, before any merging)."""
    calib = calibration_set(config)
    counts = ", ".join(f"{t} {len(v)}" for t, v in calib.texts.items())
    run_logger().info("calibration texts: %s; out-of-domain %d", counts, len(calib.ood))
    return calib


@task(name="enhance", cache_policy=NO_CACHE)
def enhance_task(config: MergeConfig, calib: CalibrationSet, out_dir: Path) -> Enhancement:
    """Returns the enhanced fine-tunes (important rows kept) that θ_shared is merged from."""
    options = min_merging_options(config)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    enhancement = enhance(Path(config.base_model), finetune_dirs(config), calib.texts, out_dir, options)
    run_logger().info(
        "enhancement (%s importance, neuron_ratio %s): rows kept per task %s",
        options.importance,
        options.neuron_ratio,
        enhancement.kept_rows,
    )
    return enhancement


def shared_merge_config(config: MergeConfig, enhancement: Enhancement) -> MergeConfig:
    """Returns the static merge config of θ_shared: the shared method over θ₀ and the enhanced fine-tunes."""
    shared = config.shared_config(folder_is_causal(enhancement.base_dir))
    models = [
        e.model_copy(update={"model": str(enhancement.enhanced[label]), "name": label})
        for label, e in zip(model_labels(config), config.fine_tunes())
    ]
    return shared.model_copy(
        update={"base_model": str(enhancement.base_dir), "models": models, "evaluation": None, "calibration": None}
    )


def task_heads(config: MergeConfig) -> dict[str, Head]:
    """Returns each fine-tune's classification head (fine-tunes without one are left out; a causal LM has none)."""
    from merging.minmerging.models import folder_is_causal

    if folder_is_causal(config.base_model):
        return {}
    heads = {}
    for label, folder in finetune_dirs(config).items():
        try:
            heads[label] = load_head(folder)
        except ConfigError:
            continue
    return heads


@task(name="calibrate-router", cache_policy=NO_CACHE)
def calibrate_router(
    config: MergeConfig, enhancement: Enhancement, shared_dir: Path, calib: CalibrationSet, out_dir: Path
) -> MinMergingReport:
    """Returns the routed model's report: router trained on θ₀'s features, OOD threshold, storage, warnings."""
    options = min_merging_options(config)
    assert config.calibration is not None
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # θ_shared travels inside the routed folder, so the folder is the model (published and logged whole).
    shutil.copytree(shared_dir, tmp / "shared")
    report = calibrate(
        Path(config.base_model),
        tmp / "shared",
        enhancement,
        calib.texts,
        tmp,
        finetune_dirs(config),
        options,
        task_heads(config),
        calib.ood or None,
    )
    (tmp / "README.md").write_text(model_card(config, report))
    os.replace(tmp, out_dir)
    report.out_dir, report.shared_dir = out_dir, out_dir / "shared"
    (out_dir / "min_merging_report.json").write_text(json.dumps(report.to_json(), indent=1))
    logger = run_logger()
    r = report.router
    logger.info(
        "router: held-out accuracy %.3f over %d tasks, OOD threshold %.3f, OOD detection %s",
        r["router_accuracy"],
        len(r["tasks"]),
        r["threshold"],
        f"{r['ood_detection_rate']:.3f}" if "ood_detection_rate" in r else "n/a (no out-of-domain texts)",
    )
    for warning in report.warnings:
        logger.warning("ROUTER WARNING: %s", warning)
    if report.warnings and config.calibration.fail_on_chance:
        raise ConfigError(f"calibration.fail_on_chance: {report.warnings[0]}")
    create_table_artifact(
        table=[{"metric": k, "value": v} for k, v in router_metrics(report).items()],
        key="router-calibration",
        description="MIN-Merging router calibration: held-out accuracy, OOD threshold and detection, storage",
    )
    return report


def model_card(config: MergeConfig, report: MinMergingReport) -> str:
    """Returns the routed model's card: method, parameters, tasks, router, storage, how to load it."""
    params = config.method_params().model_dump(mode="json", exclude_none=True)
    r, st = report.router, report.storage
    lines = [
        "# MIN-Merging routed model (mergeflow)",
        "",
        "θ_shared (`shared/`, its own card there) + per-task neuron patches (`patches/`) + a router over θ₀'s",
        "mean-pooled features (`router/`); θ₀ is `base/` once logged. Load with",
        "`merging.minmerging.routed.RoutedModel.load(folder)` or as the registered MLflow pyfunc model.",
        "",
        f"- parameters: `{json.dumps(params, sort_keys=True)}`",
        f"- tasks: {', '.join(r['tasks'])}",
        f"- router held-out accuracy: {r['router_accuracy']:.4f} (chance {1 / len(r['tasks']):.4f}); "
        f"OOD threshold {r['threshold']:.4f}"
        + (f"; OOD detection {r['ood_detection_rate']:.4f}" if "ood_detection_rate" in r else "")
        + (
            f"; reads θ₀ after {int(r['router_layer'])} layer(s) (chosen on held-out accuracy)"
            if "router_layer" in r
            else ""
        ),
        f"- storage: θ_shared {st['shared_bytes']:,} B, patches {st['patch_bytes']:,} B, "
        f"router {st['router_bytes']:,} B; the fine-tunes {st['finetunes_bytes']:,} B",
    ]
    lines += [f"- WARNING: {w}" for w in report.warnings]
    return "\n".join(lines) + "\n"


def router_metrics(report: MinMergingReport) -> dict[str, float]:
    """Returns the router's and the storage's metrics, flat, for MLflow."""
    r, st = report.router, report.storage
    out = {f"router.{k}": float(v) for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    tasks = len(r["tasks"])
    out["storage.patch_fraction_per_task"] = st["patch_bytes"] / tasks / st["one_full_model_bytes"]
    out["storage.routed_vs_finetunes"] = (st["shared_bytes"] + st["patch_bytes"] + st["router_bytes"]) / st[
        "finetunes_bytes"
    ]
    out["router.chance"] = 1.0 / tasks
    return out


@task(name="evaluate-routed", cache_policy=NO_CACHE)
def evaluate_routed(config: MergeConfig, routed_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Returns the evaluation report: base probe, fine-tunes, θ_shared alone, and the routed model (as `merged`)."""
    from merging.evaluation.lm import LmEvaluator
    from merging.evaluation.plot import plot_report
    from merging.minmerging.evaluate import routed_report
    from merging.minmerging.routed import RoutedModel
    from tasks.evaluate import make_scorer, results_table

    ev = config.evaluation
    assert ev is not None
    evaluator = make_scorer(config)
    report = evaluator.evaluate({"shared": routed_dir / "shared"}, ev.split).to_json()
    routed = RoutedModel.load(routed_dir)
    report["models"]["merged"] = routed_report(evaluator, routed, ev.split, report["finetuned"])
    if isinstance(evaluator, LmEvaluator):  # perplexities; the NLLs behind the normalized scores too
        report["metric"] = "perplexity"
        report["nll"] = evaluator.nll_table({"shared": routed_dir / "shared"}, ev.split)
        report["nll"]["merged"] = report["models"]["merged"]["nll"]
    report["router"] = json.loads((routed_dir / "min_merging_report.json").read_text())["router"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    plot_report(report, out_dir / "scores.png", title=f"{config.name or config.merge_method}: {ev.split} scores")
    rows = results_table(report)
    for row in rows:
        m = report["models"]["merged"]
        if row["task"] in m["strict"]:
            row["strict"] = round(m["strict"][row["task"]], 4)
            row["routed to own task"] = round(m["routing_accuracy"][row["task"]], 4)
    create_table_artifact(
        table=rows,
        key="merge-results",
        description=f"min_merging on split {ev.split!r}: merged = routed model scored with each task's own head; "
        "strict = the routed task's head; OOD rows: probe retention",
    )
    return report


def routed_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Returns the routed model's extra metrics: strict accuracy, routing accuracy, θ_shared alone."""
    m = report["models"]["merged"]
    out = {
        "strict_average_normalized": m["strict_average_normalized"],
        "routing_accuracy": m["routing_accuracy_average"],
        "shared.average_normalized": report["models"]["shared"]["average_normalized"],
    }
    for t, v in m["routing_accuracy"].items():
        out[f"task.{t}.routed_to_own"] = v
    flagged = [v["flagged_out_of_domain"] for v in m["ood"].values()]
    if flagged:
        out["ood_flagged"] = sum(flagged) / len(flagged)
    return out
