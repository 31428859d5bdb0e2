"""The routed (MIN-Merging) model as an MLflow pyfunc model: it classifies raw text (an encoder) or routes a
prompt and generates with that task's patched weights (a causal LM).

The logged artifact is self-contained: the routed folder (θ_shared, patches, router, heads) with
θ₀ copied inside it, since the router reads θ₀'s features. The model is logged as "models from
code" (this file), so loading it unpickles nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from merging.errors import ConfigError
from merging.minmerging.routed import RoutedModel

GENERATION_DEFAULTS = {"max_new_tokens": 32, "do_sample": False}


class RoutedPyfunc(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    """An encoder: predict(DataFrame with a `text` column) → one row per input: task, label, confidence, experts.
    A causal LM: predict(DataFrame with a `prompt` column, or a list of strings) → one row per prompt: prompt,
    generated_text (the continuation, greedy, `max_new_tokens` from the model config), task (empty when the
    prompt was out-of-domain and ran on θ₀), confidence (the router's top probability), experts."""

    def load_context(self, context: Any) -> None:
        from tasks.published_weights import resolve

        # The published, self-contained routed folder when the version was registered by reference.
        self.model = RoutedModel.load(resolve(Path(context.artifacts["routed"])))
        config = dict(getattr(context, "model_config", None) or {})
        self.options = {k: config.get(k, v) for k, v in GENERATION_DEFAULTS.items()}

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # MLflow reads hints as a schema
        if self.model.causal:
            return self._generate(model_input)
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

    def _generate(self, model_input: Any) -> pd.DataFrame:
        from merging.minmerging.generation import generate
        from tasks import pyfunc_inputs

        prompts = pyfunc_inputs.prompts(model_input, "routed generator input")
        rows = [
            {
                "prompt": g.prompt,
                "generated_text": g.text,
                "task": g.task,
                "confidence": g.confidence,
                "experts": ",".join(g.experts),
            }
            for g in generate(self.model, prompts, **self.options)
        ]
        return pd.DataFrame(rows, columns=["prompt", "generated_text", "task", "confidence", "experts"])


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # read-only use: a hard link saves copying the weights
    except OSError:
        shutil.copy2(src, dst)


def self_contained(routed_dir: Path, dest: Path, link: bool = False) -> Path:
    """Returns a copy of the routed folder that holds θ₀ (and θ_shared) inside it, paths made relative.

    With `link`, files are hard-linked where the file system allows (for a folder that is only read,
    such as the one published to storage)."""
    copy = _link_or_copy if link else shutil.copy2
    manifest = json.loads((routed_dir / "routed.json").read_text())
    shutil.copytree(routed_dir, dest, copy_function=copy)
    for role in ("shared", "base"):
        src = routed_dir / manifest[role]
        if not (dest / manifest[role]).exists() or Path(manifest[role]).is_absolute():
            shutil.copytree(src, dest / role, dirs_exist_ok=True, copy_function=copy)
            manifest[role] = role
    (dest / "routed.json").unlink()  # may be a hard link to the source's: never write through it
    (dest / "routed.json").write_text(json.dumps(manifest, indent=1))
    return dest


def is_causal_routed(routed_dir: Path) -> bool:
    """Returns whether the routed folder holds a causal LM (routed generation) rather than an encoder."""
    return json.loads((routed_dir / "routed.json").read_text()).get("model") == "causal_lm"


def signature(causal: bool = False) -> Any:
    """Returns the pyfunc signature: an encoder's `text` column in, task, label, confidence and experts out; a
    causal LM's `prompt` column in, prompt, generated_text, task, confidence and experts out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    if causal:
        generated = Schema(
            [
                ColSpec("string", "prompt"),
                ColSpec("string", "generated_text"),
                ColSpec("string", "task", required=False),
                ColSpec("double", "confidence"),
                ColSpec("string", "experts"),
            ]
        )
        return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=generated)
    outputs = Schema(
        [
            ColSpec("string", "task", required=False),
            ColSpec("long", "label", required=False),
            ColSpec("double", "confidence", required=False),
            ColSpec("string", "experts"),
        ]
    )
    return ModelSignature(inputs=Schema([ColSpec("string", "text")]), outputs=outputs)


def requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "transformers", "safetensors", "pandas", "mergeflow")]


def _pyfunc_kwargs(staged: Path, causal: bool) -> dict[str, Any]:
    # Models from code: MLflow runs this file to load the model, so loading it unpickles nothing.
    kwargs = {
        "python_model": str(Path(__file__).resolve()),
        "artifacts": {"routed": str(staged)},
        "pip_requirements": requirements(),
        "signature": signature(causal),
        "input_example": pd.DataFrame({"text": ["an example input"]}),
    }
    if causal:
        kwargs["input_example"] = pd.DataFrame({"prompt": ["Merged models keep"]})
        kwargs["model_config"] = dict(GENERATION_DEFAULTS)
    return kwargs


def save_routed_model(routed_dir: Path, out: Path, reference: dict[str, Any] | None = None) -> Path:
    """Saves the routed folder as a self-contained pyfunc model at `out` (for registration by log_artifacts).

    With `reference` (the self-contained folder was published to storage: uri, manifest, storage) the
    model holds `published.json` instead of the folder."""
    from tasks.published_weights import write_reference

    staged = out.parent / f".{out.name}-routed"
    if reference is None:
        self_contained(routed_dir, staged)
    else:
        write_reference(staged, **reference)
    try:
        mlflow.pyfunc.save_model(str(out), **_pyfunc_kwargs(staged, is_causal_routed(routed_dir)))
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out


def log_routed_model(routed_dir: Path, workdir: Path, name: str = "model") -> Any:
    """Returns MLflow's model info after logging the routed folder as a pyfunc model in the active run."""
    staged = self_contained(routed_dir, workdir / ".routed-artifact")
    try:
        return mlflow.pyfunc.log_model(name=name, **_pyfunc_kwargs(staged, is_causal_routed(routed_dir)))
    finally:
        shutil.rmtree(staged, ignore_errors=True)


mlflow.models.set_model(RoutedPyfunc())
