"""The flows `deployments/prefect.yaml` deploys: the scheduled merge and the re-merge a new fine-tune triggers.

Both take the config by reference (a local path or an `s3://` URI), so a deployment's parameters
stay small and the config can change without redeploying. The re-merge takes the current
`champion`'s inputs (from the registered version's lineage tags), adds the new fine-tune, and runs
the same pipeline, whose gate decides whether `champion` moves. Without a champion yet it merges
the config's own models plus the new one. A fine-tune already among the inputs is not merged again.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow

from flows.merge_pipeline import PipelineResult, run_pipeline
from merging.config import MergeConfig, ModelEntry, load_config
from merging.errors import ConfigError, MergeflowError
from tasks.logs import run_logger

INPUT_TAG = "mergeflow.input."


def read_config(ref: str) -> MergeConfig:
    """Returns the validated config at a local path or an `s3://bucket/key.yml` URI."""
    if not ref.startswith("s3://"):
        return load_config(ref)
    from tasks.storage import S3Location, _explain, s3_client

    loc = S3Location.parse(ref)
    with tempfile.TemporaryDirectory(prefix="mergeflow-config-") as tmp:
        path = Path(tmp) / Path(loc.prefix).name
        try:
            s3_client().download_file(loc.bucket, loc.prefix, str(path))
        except Exception as exc:
            raise _explain(exc, f"config {ref}") from None
        return load_config(path)


def tracking_uri_of(config: MergeConfig) -> str | None:
    """Returns the MLflow tracking URI a deployed run registers to (the config's, else $MLFLOW_TRACKING_URI)."""
    return (config.registry.tracking_uri if config.registry else None) or os.environ.get("MLFLOW_TRACKING_URI")


def champion_inputs(config: MergeConfig, tracking_uri: str | None) -> dict[str, str] | None:
    """Returns label → reference of the current champion's inputs ("base" first), or None without a champion."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if config.registry is None or not tracking_uri:
        return None
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        mv = client.get_model_version_by_alias(config.registry.model_name, "champion")
    except MlflowException:
        return None
    inputs = {}
    for key, value in sorted((mv.tags or {}).items()):
        if key.startswith(INPUT_TAG):
            inputs[key[len(INPUT_TAG) :]] = value.rsplit(" sha256:", 1)[0]
    if "base" not in inputs:
        raise MergeflowError(
            f"registry: champion {config.registry.model_name} version {mv.version} has no lineage tags "
            f"({INPUT_TAG}<label>); it was not registered by mergeflow"
        )
    return {"base": inputs.pop("base"), **inputs}


def label_for(reference: str) -> str:
    """Returns a file-name-safe label for a fine-tune reference (its last path part, version kept)."""
    body = reference.rstrip("/")
    match = re.match(r"models:/([^/@]+)(?:/(\d+)|@(.+))?$", body)
    if match:
        name, version, alias = match.groups()
        body = f"{name}-v{version}" if version else (f"{name}-{alias}" if alias else name)
    else:
        body = body.rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", body) or "finetune"


def summary(result: PipelineResult) -> dict[str, Any]:
    """Returns what a deployed run reports as its result: key, location, version, aliases and gate."""
    reg = result.registration
    return {
        "merge_key": result.merge_key,
        "published": result.published,
        "average_normalized": result.metrics.get("average_normalized"),
        "version": reg.version if reg else None,
        "aliases": reg.aliases if reg else [],
        "gate": reg.gate_reason if reg else None,
        "inputs": {label: entry["reference"] for label, entry in result.inputs.items()},
        "warnings": result.warnings,
    }


@flow(name="mergeflow-scheduled-merge", log_prints=True, persist_result=True, result_serializer="json")
def scheduled_merge(config: str, workdir: str | None = None) -> dict[str, Any]:
    """Returns the summary of one pipeline run on the config at `config` (path or s3:// URI)."""
    cfg = read_config(config)
    try:
        return summary(run_pipeline(cfg, workdir))
    finally:
        collect_cache(cfg)


def collect_cache(cfg: MergeConfig) -> dict[str, Any] | None:
    """Returns the cache gc report after a deployed merge (`pipeline.cache_gc`); a failed gc is a warning."""
    from merging.io.writer import parse_size
    from tasks.cache import gc

    policy = cfg.pipeline.cache_gc
    if not policy.enabled or (policy.keep_days is None and policy.max_size is None):
        return None
    logger = run_logger()
    try:
        max_size = parse_size(policy.max_size, "pipeline.cache_gc.max_size") if policy.max_size else None
        report = gc(None, policy.keep_days, max_size, policy.grace_hours * 3600)
    except (OSError, MergeflowError) as exc:
        logger.warning("cache gc failed (the merge itself is unaffected): %s", exc)
        return None
    logger.info(
        "cache gc: removed %d entries and %d unlinked blobs (%d bytes); %d kept in use; cache %d → %d bytes",
        len(report.removed),
        report.blobs_removed,
        report.freed_bytes,
        len(report.skipped_in_use),
        report.bytes_before,
        report.bytes_after,
    )
    return report.to_json()


@flow(name="mergeflow-remerge", log_prints=True, persist_result=True, result_serializer="json")
def remerge(config: str, finetune: str, name: str | None = None, workdir: str | None = None) -> dict[str, Any]:
    """Returns the summary of merging the champion's inputs plus `finetune` (skipped when it is already in)."""
    cfg = read_config(config)
    logger = run_logger()
    champion = champion_inputs(cfg, tracking_uri_of(cfg))
    if champion is not None:
        base = champion.pop("base")
        models = [ModelEntry(model=ref, name=label) for label, ref in champion.items()]
        logger.info("re-merge: the champion's %d fine-tunes plus %s", len(models), finetune)
    else:
        base, models = cfg.base_model, list(cfg.fine_tunes())
        logger.info("re-merge: no champion yet; the config's %d fine-tunes plus %s", len(models), finetune)
    if finetune in {m.model for m in models}:
        logger.info("re-merge: %s is already an input of the champion; nothing to do", finetune)
        return {"skipped": True, "reason": f"{finetune} is already merged", "inputs": {m.name: m.model for m in models}}
    label = name or label_for(finetune)
    if label in {m.name for m in models}:
        raise ConfigError(f"re-merge: the new fine-tune's name {label!r} is already taken by another input")
    models.append(ModelEntry(model=finetune, name=label))
    merged = cfg.model_copy(update={"base_model": base, "models": models})
    try:
        return {"skipped": False, **summary(run_pipeline(merged, workdir))}
    finally:
        collect_cache(cfg)
