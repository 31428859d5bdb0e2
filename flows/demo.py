"""The main command (`make demo`) on the embedded default: the pipeline on the offline `ci` zoo, no servers.

It builds (or reuses) the zoo, writes one pipeline config per method into the work folder, and runs
the Prefect flow for each: Prefect in ephemeral mode, MLflow on sqlite in the work folder, a local
folder as storage. Every run registers a version of one model; `champion` moves only when the gate
(average normalized accuracy, no worse than the champion's) passes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from flows.merge_pipeline import PipelineResult, run_pipeline
from merging.config import ROUTED_METHODS, load_config
from merging.zoo import zoo_merge_config
from merging.zoo.build import build_zoo

DEFAULT_DEMO_DIR = "mergeflow-demo"
MODEL_NAME = "zoo-ci-merged"
# Each method at its published default ("without validation"), in the order they are run.
DEMO_METHODS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"lambda": 0.3},
    "ties": {"density": 0.2, "lambda": 1.0, "trim_scope": "model"},
    "neuromerging": {},
    # MIN-Merging at its defaults: θ_shared = θ₀ and norm importance (encoders), half of each layer's rows per task
    # patched in float16, routed per input.
    "min_merging": {},
}


def demo_config(zoo: Path, method: str, parameters: dict[str, Any], workdir: Path) -> Path:
    """Returns the path of a pipeline config (YAML) merging the zoo with `method`."""
    routed = method in ROUTED_METHODS  # validated with its calibration section below
    config = zoo_merge_config(zoo, "task_arithmetic" if routed else method, {} if routed else parameters)
    data = config.model_dump(mode="json", exclude_none=True, exclude={"pipeline"})
    if routed:
        data.update(merge_method=method, parameters=dict(parameters), name=f"{config.name}-{method}")
    data["evaluation"] = {"zoo": str(zoo)}
    data["registry"] = {"model_name": MODEL_NAME, "gate": {"metric": "average_normalized", "min_margin": 0.0}}
    data["storage"] = {"uri": str(workdir / "store")}
    data["pipeline"] = {"workdir": str(workdir)}
    if method == "min_merging":
        data["calibration"] = {"zoo": str(zoo), "samples": 100}
    path = workdir / "configs" / f"{method}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_demo(
    workdir: Path | None = None, progress: Callable[[str], None] | None = print, methods: list[str] | None = None
) -> tuple[dict[str, PipelineResult], Path]:
    """Returns (pipeline result per method, work folder)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    root = (workdir or Path(DEFAULT_DEMO_DIR)).resolve()
    root.mkdir(parents=True, exist_ok=True)
    zoo, _, _ = build_zoo(None, "ci", "joint", progress=progress)
    results: dict[str, PipelineResult] = {}
    for method in methods or list(DEMO_METHODS):
        path = demo_config(zoo, method, DEMO_METHODS[method], root)
        if progress:
            progress(f"running the pipeline: {path}")
        results[method] = run_pipeline(load_config(path), workdir=root)
    return results, root
