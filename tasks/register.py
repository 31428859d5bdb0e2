"""Register step: one MLflow run per pipeline run, a registered model version with lineage, and the aliases.

`candidate` always moves to the new version; `champion` moves only when the promotion gate
passes (the gate metric beats the current champion's by the configured margin; with no champion
yet, it passes). Anything that fails after the version was created deletes that version and
marks the run failed, so a failed run leaves no version and moves no alias.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

import merging
from merging.config import MergeConfig
from merging.errors import MergeflowError
from merging.untrusted import redact, redact_text
from tasks.logs import run_logger
from tasks.promotion import METRIC_TAG, gate_decision, promotion_lock, read_champion, version_description
from tasks.storage import MANIFEST, folder_manifest


@dataclass
class Registration:
    """What registration did: the run, the version, which aliases moved, and why the gate decided so."""

    tracking_uri: str
    run_id: str
    model_name: str
    version: str
    aliases: list[str]
    gate_passed: bool
    gate_reason: str
    champion_before: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sqlite_tracking_uri(workdir: Path) -> str:
    """Returns the embedded default's tracking URI: sqlite in the run folder."""
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Returns `a.b.0.c`-style keys for nested dicts and lists (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, list) and data and any(isinstance(v, dict | list) for v in data):
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
    elif data is not None:
        out[prefix.rstrip(".")] = str(data)[:6000]
    return out


def git_commit() -> str:
    """Returns the git commit of the mergeflow source tree, or 'unknown' for an installed copy."""
    root = Path(merging.__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pipeline_task_for(folder: Path, configured: str | None) -> str:
    """Returns the transformers pipeline the model is logged as (configured, else from its architecture)."""
    if configured:
        return configured
    try:
        arch = " ".join(json.loads((folder / "config.json").read_text()).get("architectures") or [])
    except (OSError, ValueError):
        arch = ""
    if "CausalLM" in arch:
        return "text-generation"
    return "feature-extraction"  # an encoder whose task heads are kept apart (heads/)


def check_registry(tracking_uri: str) -> None:
    """Raises a clear MergeflowError now if the MLflow tracking server cannot be reached (before merging).

    MLflow's own client retries for minutes; a server that is down should be known in seconds.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return  # sqlite / file stores are created on first use
    import requests

    url = tracking_uri.rstrip("/") + "/health"
    auth = None
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    try:
        response = requests.get(url, timeout=10, auth=auth)
    except requests.RequestException as exc:
        msg = f"registry: MLflow at {tracking_uri} cannot be reached ({type(exc).__name__}); nothing was merged"
        raise MergeflowError(redact_text(msg)) from None
    if response.status_code in (401, 403):
        raise MergeflowError(redact_text(f"registry: MLflow at {tracking_uri} refused the credentials"))
    if response.status_code >= 400:
        msg = f"registry: MLflow at {tracking_uri} answered {response.status_code} to /health; nothing was merged"
        raise MergeflowError(redact_text(msg))


def published_reference(config: MergeConfig, uri: str | None) -> dict[str, Any] | None:
    """Returns what a model that references the published folder records (uri, manifest, storage),
    or None when the weights are to be logged in the MLflow model (no storage, or `weights: copy`)."""
    if not uri or config.storage is None or config.registry is None or config.registry.weights != "reference":
        return None
    from tasks.storage import S3Location, read_manifest

    if uri.startswith("s3://"):
        manifest = read_manifest(S3Location.parse(uri), config.storage)
    else:
        manifest = json.loads((Path(uri) / MANIFEST).read_text())
    assert manifest is not None
    return {"uri": uri, "manifest": manifest, "storage": config.storage}


def _save_mlflow_model(
    merged_dir: Path,
    out: Path,
    pipeline_task: str,
    tasks: dict[str, dict[str, Any]] | None = None,
    reference: dict[str, Any] | None = None,
) -> None:
    """Saves the merged model for the registry, with its model card and a manifest of its files.

    An encoder merge with task heads is a multi-task classifier pyfunc (`tasks/classifier_model.py`);
    a routed (MIN-Merging) folder is a pyfunc that routes raw text; both are "models from code".
    Anything else (causal LMs, encoders without heads) keeps MLflow's transformers flavor. With
    `reference` (the folder was published to storage) the classifier and causal LMs reference the
    published files instead of holding a second copy; a causal LM is then the generator pyfunc
    (`tasks/generator_model.py`), since the transformers flavor must hold its weights. A routed
    model references its published self-contained folder (θ₀ inside, as the router needs it).
    """
    import mlflow
    import transformers

    sides = ("README.md", "mergeflow_config.yml")
    if (merged_dir / "routed.json").exists():
        from tasks.routed_model import save_routed_model

        save_routed_model(merged_dir, out, reference)
        sides = ("README.md", "min_merging_report.json")
    elif list((merged_dir / "heads").glob("*.safetensors")) and pipeline_task != "text-generation":
        from tasks.classifier_model import save_classifier_model

        save_classifier_model(merged_dir, out, tasks or {}, reference)
        sides = ("README.md",)
    elif reference is not None and pipeline_task == "text-generation":
        from tasks.generator_model import save_generator_model

        save_generator_model(out, reference)
    else:
        pipe = transformers.pipeline(
            pipeline_task, model=str(merged_dir), tokenizer=str(merged_dir), trust_remote_code=False
        )
        requirements = [f"torch=={_version('torch')}", f"transformers=={transformers.__version__}"]
        extra: dict[str, Any] = {"input_example": "an example input"}
        if pipeline_task == "text-generation":  # greedy and bounded by default: a served champion answers alike
            extra = {"input_example": "Merged models keep", "model_config": {"max_new_tokens": 32, "do_sample": False}}
        mlflow.transformers.save_model(pipe, str(out), pip_requirements=requirements, **extra)
        if (merged_dir / "heads").is_dir():
            shutil.copytree(merged_dir / "heads", out / "heads")
    for side in sides:
        if (merged_dir / side).exists():
            shutil.copy2(merged_dir / side, out / side)
    (out / MANIFEST).write_text(json.dumps(folder_manifest(out), indent=1))


def task_metadata(config: MergeConfig) -> dict[str, dict[str, Any]]:
    """Returns task name → label names and max_length from the evaluation config ({} without one)."""
    if config.evaluation is None:
        return {}
    from tasks.evaluate import evaluation_tasks

    try:
        specs = evaluation_tasks(config)
    except MergeflowError:
        return {}
    return {t.name: {"label_names": t.label_names, "max_length": t.max_length} for t in specs}


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def register_merge(
    config: MergeConfig,
    merged_dir: Path,
    tracking_uri: str,
    report: dict[str, Any] | None,
    metrics: dict[str, float],
    artifacts: list[Path],
    lineage: dict[str, Any],
    workdir: Path,
) -> Registration:
    """Returns the registration of the merged model (run, version, aliases moved by the gate)."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    registry = config.registry
    assert registry is not None
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        experiment = client.get_experiment_by_name(registry.experiment)
        if experiment is None:
            location = (workdir / "mlartifacts").resolve().as_uri() if tracking_uri.startswith("sqlite") else None
            try:
                experiment_id = client.create_experiment(registry.experiment, artifact_location=location)
            except MlflowException as exc:  # a concurrent run created it first: use it
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment_id = client.get_experiment_by_name(registry.experiment).experiment_id
        else:
            experiment_id = experiment.experiment_id
    except MlflowException as exc:
        where = redact_text(tracking_uri)
        raise MergeflowError(
            redact_text(f"registry: cannot reach MLflow at {where} ({exc.error_code}: {exc})")
        ) from None
    except Exception as exc:  # connection errors surface as requests' or sqlalchemy's
        where = redact_text(tracking_uri)
        raise MergeflowError(
            redact_text(f"registry: cannot reach MLflow at {where} ({type(exc).__name__}: {exc})")
        ) from None
    logger = run_logger()
    version: str | None = None
    run = client.create_run(experiment_id, run_name=lineage.get("flow_run_name") or config.name)
    run_id = run.info.run_id
    reference_uri = lineage.get("storage_uri")
    try:
        params = flatten(redact(config.model_dump(mode="json", exclude_none=True)))
        lineage = redact(lineage)
        # The client's calls, not mlflow's fluent ones: those read the process-wide tracking URI (and
        # $MLFLOW_TRACKING_URI), which a registration must neither set nor inherit from a run before it.
        param_list = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(param_list), 100):
            client.log_batch(run_id, params=param_list[start : start + 100])
        now = int(time.time() * 1000)
        logged = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and not math.isnan(v)]
        run_tags = [
            RunTag(f"mergeflow.{k}", str(v)[:5000])
            for k, v in lineage.items()
            if not isinstance(v, dict | list) and v is not None
        ]
        if lineage.get("warnings"):
            run_tags.append(RunTag("mergeflow.warnings", " | ".join(lineage["warnings"])[:5000]))
        client.log_batch(run_id, metrics=logged, tags=run_tags)
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        client.log_dict(run_id, lineage, "lineage.json")
        with tempfile.TemporaryDirectory(dir=workdir, prefix=".mlflow-model-") as tmp:
            saved = Path(tmp) / "model"
            _save_mlflow_model(
                merged_dir,
                saved,
                pipeline_task_for(merged_dir, registry.pipeline_task),
                task_metadata(config),
                published_reference(config, reference_uri),
            )
            client.log_artifacts(run_id, str(saved), "model")
        with promotion_lock(tracking_uri, registry.model_name):
            champion_before, champion_value = read_champion(client, registry.model_name, registry.gate.metric)
            try:
                client.get_registered_model(registry.model_name)
            except MlflowException:
                try:
                    client.create_registered_model(registry.model_name, description="Merged by mergeflow")
                except MlflowException as exc:  # a concurrent run created it first: use it
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
            tags = {
                "mergeflow.version": merging.__version__,
                "mergeflow.git_commit": lineage.get("git_commit", "unknown"),
                "mergeflow.flow_run_id": str(lineage.get("flow_run_id", "")),
                "mergeflow.method": config.merge_method,
                "mergeflow.merge_key": str(lineage.get("merge_key", "")),
            }
            if lineage.get("warnings"):
                tags["mergeflow.warnings"] = " | ".join(lineage["warnings"])[:5000]
            for label, entry in lineage.get("inputs", {}).items():
                tags[f"mergeflow.input.{label}"] = f"{entry['reference']} sha256:{entry['digest']}"[:5000]
            for k, v in metrics.items():
                if k in ("average", "average_normalized", "ood_retention") or k == registry.gate.metric:
                    tags[METRIC_TAG + k] = repr(float(v))
            mv = client.create_model_version(
                registry.model_name, source=f"runs:/{run_id}/model", run_id=run_id, tags=tags
            )
            version = str(mv.version)
            value = metrics.get(registry.gate.metric)
            passed, reason = gate_decision(registry.gate, value, champion_value, champion_before is not None)
            client.set_registered_model_alias(registry.model_name, "candidate", version)
            aliases = ["candidate"]
            if passed:
                client.set_registered_model_alias(registry.model_name, "champion", version)
                aliases.append("champion")
        client.set_model_version_tag(registry.model_name, version, "mergeflow.gate", reason[:5000])
        card = (merged_dir / "README.md").read_text() if (merged_dir / "README.md").is_file() else None
        client.update_model_version(registry.model_name, version, description=version_description(report, reason, card))
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        if version is not None:
            try:
                client.delete_model_version(registry.model_name, version)
            except Exception:  # the original error matters more
                pass
        try:
            client.set_terminated(run_id, "FAILED")
        except Exception:
            pass
        raise
    logger.info("registered %s version %s (aliases: %s); gate: %s", registry.model_name, version, aliases, reason)
    return Registration(
        redact_text(tracking_uri), run_id, registry.model_name, version, aliases, passed, reason, champion_before
    )


register_task = task(register_merge, name="register", cache_policy=NO_CACHE)
