"""Returns the embedded-default demo: merge the offline `ci` zoo with every method and evaluate each merge."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from merging.evaluation.harness import Evaluator
from merging.evaluation.plot import plot_report
from merging.merge import MergeOptions, MergeReport, run_merge
from merging.zoo import zoo_merge_config, zoo_tasks
from merging.zoo.build import build_zoo

# Each method at its published default ("without validation").
DEMO_METHODS: dict[str, dict[str, object]] = {
    "task_arithmetic": {"lambda": 0.3},
    "ties": {"density": 0.2, "lambda": 1.0, "trim_scope": "model"},
    "dare_ties": {"density": 0.2, "lambda": 1.0},
    "neuromerging": {},
}


def run_demo(
    workdir: Path | None = None, progress: Callable[[str], None] | None = print
) -> tuple[dict[str, Any], dict[str, MergeReport], Path]:
    """Returns (evaluation report, merge report per method, output folder) of the demo."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    root = workdir or Path(tempfile.mkdtemp(prefix="mergeflow-demo-"))
    zoo, manifest, _ = build_zoo(None, "ci", "joint", progress=progress)
    merges: dict[str, MergeReport] = {}
    for method, params in DEMO_METHODS.items():
        config = zoo_merge_config(zoo, method, params, manifest)
        merges[method] = run_merge(config, root / "merged" / method, MergeOptions(progress=False, overwrite=True))
        if progress:
            progress(f"merged {method} in {merges[method].seconds:.2f} s")
    evaluator = Evaluator(zoo_tasks(zoo, manifest), zoo / manifest.base.path)
    report = evaluator.evaluate({m: r.out_dir for m, r in merges.items()}, "test").to_json()
    (root / "report.json").write_text(json.dumps(report, indent=2))
    plot_report(report, root / "scores.png", title=f"zoo {manifest.size}: test scores per task")
    return report, merges, root
