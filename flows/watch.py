"""The watcher: notices new fine-tunes and emits `mergeflow.finetune.available` for each, once.

A fine-tune is a new version of the watched MLflow registered model (`models:/<name>/<version>`,
named by its `task` tag) or a new folder under the watched `s3://` prefix whose manifest is
published (a folder without one is still being uploaded and is not seen yet). One that is already
an input of the current champion or of the config is recorded as seen without an event. What was
seen is kept in a Prefect variable (sha256 prefixes of the references), updated after each event,
so the same fine-tune never triggers twice, across runs and restarts. The event's payload carries
the reference, its name and the config, which the `remerge` deployment's trigger passes on.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any

from prefect import flow
from prefect.events import emit_event
from prefect.variables import Variable

from flows.deployed import champion_inputs, label_for, read_config, tracking_uri_of
from merging.config import MergeConfig
from merging.errors import ConfigError
from merging.pipeline_config import WatchConfig
from tasks.logs import run_logger

EVENT = "mergeflow.finetune.available"
MAX_SEEN = 240  # digests kept in the variable (its value holds at most 5,000 characters)


@dataclass(frozen=True)
class Candidate:
    reference: str
    name: str


def digest(reference: str) -> str:
    return hashlib.sha256(reference.encode()).hexdigest()[:16]


def variable_name(config: MergeConfig) -> str:
    """Returns the Prefect variable holding what this config's watcher has seen."""
    assert config.watch is not None
    if config.watch.variable:
        return config.watch.variable
    owner = (config.registry.model_name if config.registry else None) or config.name or "merged"
    return "mergeflow-watch-" + re.sub(r"[^a-z0-9_-]", "-", owner.lower())


def mlflow_candidates(watch: WatchConfig, tracking_uri: str | None) -> list[Candidate]:
    import mlflow

    if not tracking_uri:
        raise ConfigError("watch.mlflow_model: no tracking URI (registry.tracking_uri or $MLFLOW_TRACKING_URI)")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    versions = client.search_model_versions(f"name='{watch.mlflow_model}'")
    out = []
    for mv in sorted(versions, key=lambda v: int(v.version)):
        ref = f"models:/{mv.name}/{mv.version}"
        out.append(Candidate(ref, (mv.tags or {}).get(watch.task_tag) or label_for(ref)))
    return out


def s3_candidates(watch: WatchConfig) -> list[Candidate]:
    from tasks.storage import MANIFEST, S3Location, list_objects

    assert watch.s3_prefix is not None
    loc = S3Location.parse(watch.s3_prefix)
    folders = sorted({name.rsplit("/", 1)[0] for name in list_objects(loc) if name.endswith("/" + MANIFEST)})
    return [Candidate(str(loc.child(f)), label_for(f)) for f in folders]


def candidates(config: MergeConfig) -> list[Candidate]:
    """Returns every fine-tune the watched places hold now (published ones only)."""
    watch = config.watch
    if watch is None:
        raise ConfigError("watch: the config has no watch section (mlflow_model or s3_prefix)")
    found = []
    if watch.mlflow_model:
        found += mlflow_candidates(watch, tracking_uri_of(config))
    if watch.s3_prefix:
        found += s3_candidates(watch)
    return found


@flow(name="mergeflow-watch", log_prints=True, persist_result=True, result_serializer="json")
def watch_finetunes(config: str) -> list[dict[str, Any]]:
    """Returns the fine-tunes this run announced (one `mergeflow.finetune.available` event each)."""
    cfg = read_config(config)
    logger = run_logger()
    name = variable_name(cfg)
    seen: list[str] = list(Variable.get(name, default=[]) or [])
    merged = set((champion_inputs(cfg, tracking_uri_of(cfg)) or {}).values())
    merged |= {cfg.base_model, *(e.model for e in cfg.fine_tunes())}
    announced = []
    for c in candidates(cfg):
        key = digest(c.reference)
        if key in seen:
            continue
        if c.reference not in merged:
            emit_event(
                event=EVENT,
                resource={"prefect.resource.id": f"mergeflow.finetune.{key}", "prefect.resource.name": c.name},
                payload={"reference": c.reference, "name": c.name, "config": config},
            )
            logger.info("new fine-tune %s (%s): emitted %s", c.reference, c.name, EVENT)
            announced.append(asdict(c))
        seen = [*seen, key][-MAX_SEEN:]
        Variable.set(name, seen, overwrite=True)  # after each event: a crash re-announces at most one
    if not announced:
        logger.info("no new fine-tunes")
    return announced
