"""Promotion: the gate that decides whether `champion` moves, the lock that serializes promotions, and the
version's description that shows the evaluation and the gate's reason in the MLflow UI.

Two runs that register versions of one model at once must not both compare against the same stale
champion or write the alias together: `promotion_lock` holds the right to read the champion and move
aliases (a file lock on this machine; a Prefect global concurrency limit of 1 across machines).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from merging.pipeline_config import GateConfig
from merging.untrusted import redact_text

METRIC_TAG = "mergeflow.metric."


@contextmanager
def promotion_lock(tracking_uri: str, model_name: str) -> Iterator[None]:
    """Holds the right to read the champion and move aliases of one registered model.

    A file lock serializes the runs on this machine; with a Prefect server configured, a global
    concurrency limit of 1 (created on first use) serializes runs on every machine that uses it.
    So no two runs compare against the same stale champion or write the alias at once.
    """
    from filelock import FileLock

    from merging.io.checkpoint import cache_dir

    slug = hashlib.sha256(f"{redact_text(tracking_uri)}\0{model_name}".encode()).hexdigest()[:24]
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"promote-{slug}.lock"), timeout=1800), _prefect_promotion_limit(slug):
        yield


@contextmanager
def _prefect_promotion_limit(slug: str) -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # the embedded default: one machine, the file lock is enough
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = f"mergeflow-promote-{slug}"
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass
    with concurrency(name, occupy=1, timeout_seconds=1800, strict=True):
        yield


def read_champion(client: Any, name: str, metric: str) -> tuple[str | None, float | None]:
    """Returns (the champion's version, its value of `metric`), or (None, None) without a champion."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None, None
    raw = (mv.tags or {}).get(METRIC_TAG + metric)
    if raw is None and mv.run_id:
        raw = client.get_run(mv.run_id).data.metrics.get(metric)
    return str(mv.version), float(raw) if raw is not None else None


def gate_decision(
    gate: GateConfig, value: float | None, champion: float | None, has_champion: bool
) -> tuple[bool, str]:
    """Returns (whether champion moves, why)."""
    if not has_champion:
        return True, "no champion yet"
    if value is None or math.isnan(value):
        return False, f"the run has no {gate.metric!r} metric (is evaluation configured?)"
    if champion is None:
        return True, f"the champion has no {gate.metric!r} metric to compare with"
    margin = value - champion if gate.higher_is_better else champion - value
    verdict = margin >= gate.min_margin
    word = "passes" if verdict else "fails"
    return verdict, (
        f"{gate.metric} {value:.4f} vs champion {champion:.4f}: "
        f"margin {margin:+.4f} {word} the gate (≥ {gate.min_margin})"
    )


DESCRIPTION_LIMIT = 5000  # MLflow's model version description column


def version_description(report: dict[str, Any] | None, gate_reason: str, card: str | None) -> str:
    """Returns the registered version's description: the evaluation table (per task: base probe,
    fine-tune, merged, normalized; out-of-domain rows: probe retention), the gate's reason, then the
    model card, cut to MLflow's 5000 characters (the full card is the run's README.md artifact)."""
    lines: list[str] = []
    if report is not None and "merged" in report.get("models", {}):
        from tasks.evaluate import results_table

        split = report.get("split", "test")
        lines += [f"**Evaluation** (split `{split}`; normalized = merged / fine-tuned; OOD: probe retention)", ""]
        lines += ["| task | role | base probe | fine-tuned | merged | normalized |", "|---|---|---|---|---|---|"]

        def cell(v: Any) -> str:
            return "" if v is None or v != v else f"{v:.4f}"

        for row in results_table(report):
            values = " | ".join(cell(row.get(k)) for k in ("base probe", "fine-tuned", "merged", "normalized"))
            lines.append(f"| {row['task']} | {row['role']} | {values} |")
        lines.append("")
    lines += [f"**Gate:** {gate_reason}", ""]
    text = redact_text("\n".join(lines))
    if card:
        room = DESCRIPTION_LIMIT - len(text) - 80
        card = redact_text(card)
        if room > 200:
            cut = (
                card
                if len(card) <= room
                else card[:room].rsplit("\n", 1)[0] + "\n\n… (cut here; the full card is the run's README.md)"
            )
            text += "\n---\n\n" + cut
    return text[:DESCRIPTION_LIMIT]
