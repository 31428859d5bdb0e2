"""The MLflow model of a merged causal LM whose weights were published to storage (models from code).

Without storage, a causal LM is logged in MLflow's transformers flavor (`text-generation`), which
must hold the weights itself. With storage, that would store the model twice, so the registered
model is this pyfunc: its one artifact is `published.json` (`tasks/published_weights.py`), and
loading it fetches the published folder, checks every file against the manifest recorded at
registration, and builds the same transformers `text-generation` pipeline.

predict(DataFrame with a `prompt` column, or a list of strings) → DataFrame with `prompt` and
`generated_text` (the continuation only). Greedy, `max_new_tokens` from the model config (32 by
default), so a served champion answers alike every time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

DEFAULTS = {"max_new_tokens": 32, "do_sample": False}


class Generator(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
    def load_context(self, context: Any) -> None:
        import transformers

        from tasks.published_weights import resolve

        root = resolve(Path(context.artifacts["model"]))
        self.pipe = transformers.pipeline("text-generation", model=str(root), tokenizer=str(root))
        config = dict(getattr(context, "model_config", None) or {})
        self.options = {k: config.get(k, v) for k, v in DEFAULTS.items()}

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # MLflow reads hints
        from tasks import pyfunc_inputs

        prompts = pyfunc_inputs.prompts(model_input, "generator input")
        options = {**self.options, **{k: v for k, v in (params or {}).items() if k in DEFAULTS}}
        rows = []
        for prompt in prompts:
            out = self.pipe(prompt, return_full_text=False, **options)
            rows.append({"prompt": prompt, "generated_text": out[0]["generated_text"]})
        return pd.DataFrame(rows, columns=["prompt", "generated_text"])


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "generated_text")]),
    )


def requirements() -> list[str]:
    """Returns the pinned packages the model needs (mergeflow included; boto3 fetches the weights)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "transformers", "safetensors", "pandas", "boto3", "mergeflow")]


def save_generator_model(out: Path, reference: dict[str, Any]) -> Path:
    """Saves the generator pyfunc at `out`, its weights referenced (`reference`: uri, manifest, storage)."""
    import tempfile

    from tasks.published_weights import write_reference

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-generator-") as tmp:
        staged = Path(tmp) / "model"
        write_reference(staged, **reference)
        mlflow.pyfunc.save_model(
            str(out),
            python_model=str(Path(__file__).resolve()),
            artifacts={"model": str(staged)},
            signature=signature(),
            input_example=pd.DataFrame({"prompt": ["Merged models keep"]}),
            model_config=dict(DEFAULTS),
            pip_requirements=requirements(),
        )
    return out


mlflow.models.set_model(Generator())
