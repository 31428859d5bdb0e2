"""The merge pipeline: download → plan → merge per layer → assemble → evaluate → publish → register.

Run it with `mergeflow run CONFIG`. With no servers configured it runs on the embedded default:
Prefect in ephemeral mode, MLflow on sqlite in the work folder, a local folder as storage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

import merging
from merging.config import MergeConfig, StorageConfig, load_config
from merging.errors import ConfigError
from merging.merge import MergeReport, model_labels
from merging.staged import LayerResult, StagedPlan
from tasks.download import FetchedModel, download_model
from tasks.evaluate import choose_parameters, evaluate_merge, evaluation_tasks, metrics_of
from tasks.merge import assemble_task, merge_layer_task, plan_task
from tasks.register import Registration, git_commit, register_task, sqlite_tracking_uri
from tasks.storage import publish

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


def localize(config: MergeConfig, fetched: list[FetchedModel]) -> MergeConfig:
    """Returns the config with every model reference replaced by its local folder; labels keep the references'."""
    labels = model_labels(config)
    base, *fine = fetched
    models = [
        e.model_copy(update={"model": str(f.path), "name": label})
        for e, f, label in zip(config.fine_tunes(), fine, labels)
    ]
    return config.model_copy(update={"base_model": str(base.path), "models": models})


def lineage_inputs(config: MergeConfig, staged: StagedPlan, fetched: list[FetchedModel]) -> dict[str, Any]:
    """Returns label → reference, kind and one digest over the sha256s of its files."""
    out = {}
    for record, f in zip(staged.inputs, fetched):
        digest = hashlib.sha256(json.dumps(sorted(record.sha256.items())).encode()).hexdigest()
        out[record.label] = {"reference": f.reference, "kind": f.kind, "digest": digest, "files": record.sha256}
        out[record.label].update({f"registry_{k}": v for k, v in f.detail.items()})
    return out


@task(name="publish", retries=2, retry_delay_seconds=[5, 20], cache_policy=NO_CACHE)
def publish_task(folder: Path, uri: str, storage: StorageConfig | None) -> str:
    """Returns the URI the merged model was published at (its manifest written last)."""
    publish(folder, uri, storage)
    return uri


def storage_uri(config: MergeConfig, workdir: Path, merge_key: str) -> str:
    """Returns where a merged model is published: <storage uri>/<model name>/<merge key>."""
    base = config.storage.uri if config.storage else str(workdir / "store")
    name = (config.registry.model_name if config.registry else None) or config.name or "merged"
    return f"{base.rstrip('/')}/{name}/{merge_key[:16]}"


@flow(name="mergeflow-pipeline", log_prints=True, persist_result=False)
def merge_pipeline(config: MergeConfig, workdir: str | None = None, tracking_uri: str | None = None) -> PipelineResult:
    """Returns the pipeline's result; reads like the DAG it runs."""
    work = Path(workdir or config.pipeline.workdir or DEFAULT_WORKDIR).resolve()
    work.mkdir(parents=True, exist_ok=True)
    registry = config.registry
    tracking = tracking_uri or (registry.tracking_uri if registry else None) or sqlite_tracking_uri(work)

    # 1. download (a local folder is used in place)
    refs = [config.base_model] + [e.model for e in config.fine_tunes()]
    fetched: list[FetchedModel] = download_model.map(refs, unmapped(config.storage), unmapped(tracking)).result()
    local = localize(config, fetched)
    if local.evaluation is not None:
        evaluation_tasks(local)  # bad evaluation input fails here, before any merging

    # 2. λ chosen on validation, when the config gives a grid
    search = None
    if local.evaluation is not None and local.evaluation.search:
        local, search = choose_parameters(local, work)

    # 3. plan, merge per layer, assemble
    staged: StagedPlan = plan_task(local)
    layers: list[LayerResult] = merge_layer_task.map(unmapped(local), unmapped(staged), staged.groups).result()
    merged_dir = work / "merged" / staged.key[:16]
    assembled: MergeReport = assemble_task(local, staged, layers, merged_dir)

    # 4. evaluate
    report = None
    metrics: dict[str, float] = {}
    if local.evaluation is not None:
        report = evaluate_merge(local, assembled.out_dir, work / "results" / staged.key[:16], search)
        metrics = metrics_of(report)

    # 5. publish to storage (manifest last), when the config names one
    published = None
    if config.storage is not None:
        published = publish_task(assembled.out_dir, storage_uri(config, work, staged.key), config.storage)

    # 6. register and promote
    inputs = lineage_inputs(config, staged, fetched)
    registration = None
    if registry is not None:
        lineage = {
            "merge_key": staged.key,
            "mergeflow_version": merging.__version__,
            "git_commit": git_commit(),
            "flow_run_id": flow_run.get_id() or "",
            "flow_run_name": flow_run.get_name() or "",
            "storage_uri": published,
            "inputs": inputs,
            "parameters": local.method_params().model_dump(mode="json", by_alias=True, exclude_none=True),
        }
        results = work / "results" / staged.key[:16]
        artifacts = [p for p in (results / "results.json", results / "scores.png") if p.exists()]
        artifacts.append(assembled.out_dir / "README.md")
        registration = register_task(local, assembled.out_dir, tracking, report, metrics, artifacts, lineage, work)

    return PipelineResult(
        merged_dir=assembled.out_dir,
        workdir=work,
        merge_key=staged.key,
        layers_merged=[r.group for r in layers if not r.reused],
        layers_reused=[r.group for r in layers if r.reused],
        report=report,
        metrics=metrics,
        published=published,
        registration=registration,
        tracking_uri=tracking if registry else None,
        search=search,
        inputs=inputs,
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


def apply_overrides(
    config: MergeConfig, tracking_uri: str | None = None, storage: str | None = None, runner: str | None = None
) -> MergeConfig:
    """Returns the config with the command line's --tracking-uri, --storage and --runner applied (validated)."""
    data = config.model_dump(mode="json", exclude_none=True)
    if tracking_uri:
        if "registry" not in data:
            raise ConfigError("--tracking-uri: the config has no registry section (model_name) to register into")
        data["registry"]["tracking_uri"] = tracking_uri
    if storage:
        data["storage"] = {**data.get("storage", {}), "uri": storage}
    if runner:
        data["pipeline"] = {**data.get("pipeline", {}), "runner": runner}
    from merging.config import parse_config

    return parse_config(data, "<command line>")


def run_pipeline(
    config_path: str | Path | MergeConfig,
    workdir: str | Path | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    runner: str | None = None,
) -> PipelineResult:
    """Returns the result of running the pipeline on a config file (or config) with its task runner."""
    config = config_path if isinstance(config_path, MergeConfig) else load_config(config_path)
    config = apply_overrides(config, tracking_uri, storage, runner)
    pipeline = merge_pipeline.with_options(task_runner=task_runner(config))
    return pipeline(config, str(workdir) if workdir else None)
