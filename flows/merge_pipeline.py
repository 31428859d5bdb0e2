"""The merge pipeline: download → plan → merge per layer → finalize → [calibrate] → evaluate → publish → register.

MIN-Merging (`merge_method: min_merging`) adds two steps: the fine-tunes are enhanced (important
neurons kept) before the per-layer merge of θ_shared, and the router is calibrated after it; the
routed folder is then what is evaluated, published and registered.

Run it with `mergeflow run CONFIG`. With no servers configured it runs on the embedded default:
Prefect in ephemeral mode, MLflow on sqlite in the work folder, a local folder as storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

import merging
from flows.overrides import apply_overrides
from flows.quiet import quiet_defaults
from merging.config import MergeConfig, load_config
from merging.engine.inplace import output_lock
from merging.engine.labels import model_labels
from merging.engine.model_card import InputRecord
from merging.engine.output import MergeReport
from merging.engine.staged import LayerResult, StagedPlan
from merging.errors import ConfigError
from merging.evaluation.encoder import load_tokenizer
from merging.io.checkpoint import Checkpoint, HashCache
from merging.pipeline_config import StorageConfig
from tasks.cache import in_use
from tasks.calibrate import (
    calibrate_router,
    choose_neuron_ratio_task,
    enhance_task,
    evaluate_routed,
    load_calibration,
    routed_metrics,
    router_metrics,
    shared_merge_config,
)
from tasks.download import download_model
from tasks.evaluate import choose_parameters, evaluate_merge, evaluation_tasks, metrics_of
from tasks.logs import run_logger
from tasks.merge import finalize_task, merge_layer_task, plan_task, prepare_output_task
from tasks.register import Registration, check_registry, git_commit, register_task, sqlite_tracking_uri
from tasks.snapshots import FetchedModel
from tasks.storage import check_storage, publish, retry_transient

DEFAULT_WORKDIR = "mergeflow-work"


@dataclass
class PipelineResult:
    """What one pipeline run produced."""

    merged_dir: Path
    workdir: Path
    merge_key: str
    layers_merged: list[str]
    layers_reused: list[str]
    report: dict[str, Any] | None
    metrics: dict[str, float]
    published: str | None
    registration: Registration | None
    tracking_uri: str | None
    search: dict[str, Any] | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    router: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)


def localize(config: MergeConfig, fetched: list[FetchedModel]) -> MergeConfig:
    """Returns the config with every model reference replaced by its local folder; labels keep the references'."""
    labels = model_labels(config)
    base, *fine = fetched
    models = [
        e.model_copy(update={"model": str(f.path), "name": label})
        for e, f, label in zip(config.fine_tunes(), fine, labels)
    ]
    return config.model_copy(update={"base_model": str(base.path), "models": models})


def original_inputs(config: MergeConfig) -> list[InputRecord]:
    """Returns the base's and each fine-tune's file sha256s (remembered by stat, so unchanged files are not re-read)."""
    hashes = HashCache()
    records = []
    for label, ref in zip(
        ["base", *model_labels(config)], [config.base_model] + [e.model for e in config.fine_tunes()]
    ):
        with Checkpoint(ref, label) as ck:
            records.append(InputRecord(label, str(ck.path), {f.name: hashes.sha256(f) for f in ck.files}))
    hashes.save()
    return records


def routed_key(config: MergeConfig, staged: StagedPlan) -> str:
    """Returns the routed folder's key: θ_shared's merge key, the method's parameters and the calibration section."""
    assert config.calibration is not None
    data = {
        "shared": staged.key,
        "parameters": config.method_params().model_dump(mode="json"),
        "calibration": config.calibration.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def lineage_inputs(records: list[InputRecord], fetched: list[FetchedModel]) -> dict[str, Any]:
    """Returns label → reference, kind and one digest over the sha256s of its files."""
    out = {}
    for record, f in zip(records, fetched):
        digest = hashlib.sha256(json.dumps(sorted(record.sha256.items())).encode()).hexdigest()
        out[record.label] = {"reference": f.reference, "kind": f.kind, "digest": digest, "files": record.sha256}
        out[record.label].update({f"registry_{k}": v for k, v in f.detail.items()})
    return out


@task(name="publish", retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def publish_task(folder: Path, uri: str, storage: StorageConfig | None) -> str:
    """Returns the URI the merged model was published at (its manifest written last)."""
    publish(folder, uri, storage)
    return uri


def storage_uri(config: MergeConfig, workdir: Path, merge_key: str, routed: bool = False) -> str:
    """Returns where a merged model is published: <storage uri>/<model name>/<merge key>[-routed]."""
    base = config.storage.uri if config.storage else str(workdir / "store")
    name = (config.registry.model_name if config.registry else None) or config.name or "merged"
    return f"{base.rstrip('/')}/{name}/{merge_key[:16]}{'-routed' if routed else ''}"


def _run_slug() -> str:
    """Returns a folder name unique to this flow run (enhanced fine-tunes are per run; their merge is cached)."""
    return (flow_run.get_id() or "local").replace("-", "")[:16]


@flow(name="mergeflow-pipeline", log_prints=True, persist_result=False)
def merge_pipeline(config: MergeConfig, workdir: str | None = None, tracking_uri: str | None = None) -> PipelineResult:
    """Returns the pipeline's result; the cache entries it uses stay locked until it ends (`mergeflow cache gc`)."""
    with ExitStack() as held:
        return _pipeline(config, workdir, tracking_uri, held)


def _pipeline(config: MergeConfig, workdir: str | None, tracking_uri: str | None, held: ExitStack) -> PipelineResult:
    """Returns the pipeline's result; reads like the DAG it runs."""
    work = Path(workdir or config.pipeline.workdir or DEFAULT_WORKDIR).resolve()
    work.mkdir(parents=True, exist_ok=True)
    registry = config.registry
    tracking = (
        tracking_uri
        or (registry.tracking_uri if registry else None)
        or os.environ.get("MLFLOW_TRACKING_URI")  # the local full stack exports it (`mergeflow stack env`)
        or sqlite_tracking_uri(work)
    )

    # 0. the registry and the storage answer before anything is downloaded or merged
    if registry is not None:
        check_registry(tracking)
    if config.storage is not None:
        check_storage(config.storage)

    # 1. download (a local folder is used in place)
    refs = [config.base_model] + [e.model for e in config.fine_tunes()]
    fetched: list[FetchedModel] = download_model.map(refs, unmapped(config.storage), unmapped(tracking)).result()
    held.enter_context(in_use("models", [f.path.name for f in fetched if f.kind != "local"]))
    local = localize(config, fetched)
    if local.evaluation is not None:
        evaluation_tasks(local)  # bad evaluation input fails here, before any merging
        load_tokenizer(local.base_model)  # so does a tokenizer the evaluation could not read
    if local.calibration is not None and not local.routed:
        run_logger().warning("calibration: ignored, %s is a static merge (no router to calibrate)", local.merge_method)
    calib = load_calibration(local) if local.routed else None  # bad calibration input fails here too

    # 2. λ chosen on validation, when the config gives a grid (MIN-Merging: `neuron_ratio: auto`)
    search = None
    if local.evaluation is not None and local.evaluation.search:
        local, search = choose_parameters(local, work)
    if calib is not None and local.parameters.get("neuron_ratio") == "auto":
        local, search = choose_neuron_ratio_task(local, calib, work / "neuron-ratio" / _run_slug())

    # 3. plan, merge per layer straight into the output's shards, finalize (MIN-Merging: θ_shared from the
    #    enhanced fine-tunes)
    to_merge, enhancement = local, None
    enhanced_dir = work / "enhanced" / _run_slug()
    try:
        if calib is not None:
            enhancement = enhance_task(local, calib, enhanced_dir)
            to_merge = shared_merge_config(local, enhancement)
        staged: StagedPlan = plan_task(to_merge)
        held.enter_context(in_use("layers", [staged.key]))
        merged_dir = work / "merged" / staged.key[:16]
        with output_lock(merged_dir):  # one run writes a folder at a time; a second waits, then reuses it
            bound = prepare_output_task(to_merge, staged, merged_dir)
            layers: list[LayerResult] = merge_layer_task.map(unmapped(to_merge), unmapped(bound), bound.groups).result()
            finished: MergeReport = finalize_task(to_merge, bound, layers)
    finally:  # enhanced fine-tunes are merged into θ_shared (layers cached) or the run failed: either way, gone
        shutil.rmtree(enhanced_dir, ignore_errors=True)
    model_dir, routed, warnings, key = finished.out_dir, None, [], staged.key

    # 4. calibrate the router (MIN-Merging only)
    if calib is not None and enhancement is not None:
        key = routed_key(local, staged)
        routed = calibrate_router(local, enhancement, finished.out_dir, calib, work / "routed" / key[:16])
        model_dir, warnings = routed.out_dir, list(routed.warnings)

    # 5. evaluate
    report = None
    metrics: dict[str, float] = {}
    results = work / "results" / key[:16]
    if local.evaluation is not None:
        if routed is not None:
            report = evaluate_routed(local, model_dir, results)
            metrics = {**metrics_of(report), **routed_metrics(report)}
        else:
            report = evaluate_merge(local, model_dir, results, search)
            metrics = metrics_of(report)
    if routed is not None:
        metrics.update(router_metrics(routed))
        if report is not None:
            report["warnings"] = warnings
            (results / "results.json").write_text(json.dumps(report, indent=2))

    # 6. publish to storage (manifest last), when the config names one
    published = None
    if config.storage is not None:
        uri = storage_uri(config, work, key, routed is not None)
        if routed is None:
            published = publish_task(model_dir, uri, config.storage)
        else:  # published self-contained (θ₀ inside, hard-linked here): it loads anywhere, one copy per version
            from tasks.routed_model import self_contained

            with tempfile.TemporaryDirectory(dir=work, prefix=".publish-routed-") as tmp:
                published = publish_task(
                    self_contained(model_dir, Path(tmp) / "routed", link=True), uri, config.storage
                )

    # 7. register and promote
    inputs = lineage_inputs(original_inputs(local) if routed is not None else staged.inputs, fetched)
    registration = None
    if registry is not None:
        lineage = {
            "merge_key": key,
            "shared_merge_key": staged.key if routed is not None else None,
            "mergeflow_version": merging.__version__,
            "git_commit": git_commit(),
            "flow_run_id": flow_run.get_id() or "",
            "flow_run_name": flow_run.get_name() or "",
            "storage_uri": published,
            "inputs": inputs,
            "parameters": local.method_params().model_dump(mode="json", by_alias=True, exclude_none=True),
            "warnings": warnings,
        }
        if routed is not None:
            lineage["router"] = routed.router
        artifacts = [p for p in (results / "results.json", results / "scores.png") if p.exists()]
        artifacts.append(model_dir / "README.md")
        if routed is not None:
            artifacts.append(model_dir / "min_merging_report.json")
        registration = register_task(local, model_dir, tracking, report, metrics, artifacts, lineage, work)

    return PipelineResult(
        merged_dir=model_dir,  # the routed folder for MIN-Merging
        workdir=work,
        merge_key=key,
        layers_merged=[r.group for r in layers if not r.reused],
        layers_reused=[r.group for r in layers if r.reused],
        report=report,
        metrics=metrics,
        published=published,
        registration=registration,
        tracking_uri=tracking if registry else None,
        search=search,
        inputs=inputs,
        router=routed.router if routed is not None else None,
        warnings=warnings,
    )


def task_runner(config: MergeConfig) -> Any:
    """Returns the Prefect task runner the config asks for (threads by default)."""
    p = config.pipeline
    if p.runner == "threads":
        return ThreadPoolTaskRunner(max_workers=p.max_workers)
    if p.runner == "sequential":
        return ThreadPoolTaskRunner(max_workers=1)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError("pipeline.runner: dask needs the prefect-dask package") from None
    if p.dask_address:
        return DaskTaskRunner(address=p.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": p.max_workers, "threads_per_worker": 1, "processes": True})


def run_pipeline(
    config_path: str | Path | MergeConfig,
    workdir: str | Path | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    runner: str | None = None,
    device: str | None = None,
) -> PipelineResult:
    """Returns the result of running the pipeline on a config file (or config) with its task runner."""
    quiet_defaults()
    config = config_path if isinstance(config_path, MergeConfig) else load_config(config_path)
    if storage is None and config.storage is None:
        storage = os.environ.get("MERGEFLOW_STORAGE_URI") or None  # exported by `mergeflow stack env`
    config = apply_overrides(config, tracking_uri, storage, runner, device)
    pipeline = merge_pipeline.with_options(task_runner=task_runner(config))
    return pipeline(config, str(workdir) if workdir else None)
