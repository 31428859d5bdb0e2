"""The routed (MIN-Merging) model as an MLflow pyfunc model that predicts from raw text.

The logged artifact is self-contained: the routed folder (θ_shared, patches, router, heads) with
θ₀ copied inside it, since the router reads θ₀'s features.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from merging.errors import ConfigError
from merging.minmerging.routed import RoutedModel


class RoutedPyfunc(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """predict(DataFrame with a `text` column) → one row per input: task, label, confidence, experts."""

    def load_context(self, context: Any) -> None:
        self.model = RoutedModel.load(Path(context.artifacts["routed"]))

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            if "text" not in model_input.columns:
                raise ConfigError(f"routed model input: expected a `text` column, got {list(model_input.columns)}")
            texts = [str(t) for t in model_input["text"].tolist()]
        else:
            texts = [str(t) for t in model_input]
        rows = []
        for r in self.model.run(texts):
            rows.append(
                {
                    "task": r.task,
                    "label": r.label,
                    "confidence": max(r.probabilities) if r.probabilities else None,
                    "experts": ",".join(r.experts),
                }
            )
        return pd.DataFrame(rows)


def self_contained(routed_dir: Path, dest: Path) -> Path:
    """Returns a copy of the routed folder that holds θ₀ (and θ_shared) inside it, paths made relative."""
    manifest = json.loads((routed_dir / "routed.json").read_text())
    shutil.copytree(routed_dir, dest)
    for role in ("shared", "base"):
        src = routed_dir / manifest[role]
        if not (dest / manifest[role]).exists() or Path(manifest[role]).is_absolute():
            shutil.copytree(src, dest / role, dirs_exist_ok=True)
            manifest[role] = role
    (dest / "routed.json").write_text(json.dumps(manifest, indent=1))
    return dest


def log_routed_model(routed_dir: Path, workdir: Path, name: str = "model") -> Any:
    """Returns MLflow's model info after logging the routed folder as a pyfunc model in the active run."""
    staged = self_contained(routed_dir, workdir / ".routed-artifact")
    try:
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=RoutedPyfunc(),
            artifacts={"routed": str(staged)},
            pip_requirements=["torch", "transformers", "safetensors", "pandas", "mergeflow"],
        )
    finally:
        shutil.rmtree(staged, ignore_errors=True)
