"""The MLflow model of a static encoder merge: a multi-task classifier (logged as "models from code").

MLflow runs this file to load the model, so loading a registered version unpickles nothing. The
model's one artifact is the merged folder (encoder, tokenizer, `heads/<task>.safetensors`, and
`tasks.json` with each task's label names and max_length when the pipeline knew them), or, when the
folder was published to storage, `tasks.json` and a reference to the published copy
(`tasks/published_weights.py`): one copy of the weights per version.

predict(DataFrame with `task` and `text` columns) → one row per input: `task`, `label` (the
label's name when known, else its index), `label_index`, `score` (its probability) and
`probabilities` (every class, in head order). A task without a head is an error naming the known
tasks. Features are the classifier input of the merged encoder (BERT: the pooled output), as the
evaluation harness scores it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

TASKS_FILE = "tasks.json"
DEFAULT_MAX_LENGTH = 128


class MultiTaskClassifier(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
    def load_context(self, context: Any) -> None:
        from merging.evaluation.encoder import load_encoder
        from merging.evaluation.heads import load_head
        from tasks.published_weights import resolve

        logged = Path(context.artifacts["model"])
        root = resolve(logged)  # the published folder when the weights were registered by reference
        self.encoder = load_encoder(root)
        self.heads = {p.stem: load_head(p) for p in sorted((root / "heads").glob("*.safetensors"))}
        meta = json.loads((logged / TASKS_FILE).read_text()) if (logged / TASKS_FILE).is_file() else {}
        self.tasks: dict[str, dict[str, Any]] = {t: dict(meta.get(t) or {}) for t in self.heads}

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # MLflow reads hints
        from merging.errors import ConfigError
        from merging.evaluation.encoder import encode

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = [c for c in ("task", "text") if c not in frame.columns]
        if missing:
            raise ConfigError(f"classifier input: missing column(s) {missing}; expected `task` and `text`")
        unknown = sorted({str(t) for t in frame["task"]} - set(self.heads))
        if unknown:
            raise ConfigError(f"classifier input: no head for task(s) {unknown}; known tasks: {sorted(self.heads)}")
        rows: list[dict[str, Any] | None] = [None] * len(frame)
        tasks = [str(t) for t in frame["task"]]
        texts = ["" if t is None else str(t) for t in frame["text"]]
        for task in dict.fromkeys(tasks):
            idx = [i for i, t in enumerate(tasks) if t == task]
            meta = self.tasks[task]
            feats = encode(self.encoder, [texts[i] for i in idx], int(meta.get("max_length") or DEFAULT_MAX_LENGTH))
            import torch

            probs = torch.softmax(self.heads[task].logits(feats), dim=-1)
            names = meta.get("label_names") or []
            for row, i in enumerate(idx):
                k = int(probs[row].argmax())
                rows[i] = {
                    "task": task,
                    "label": str(names[k]) if k < len(names) else str(k),
                    "label_index": k,
                    "score": float(probs[row, k]),
                    "probabilities": [float(p) for p in probs[row]],
                }
        return pd.DataFrame(rows, columns=["task", "label", "label_index", "score", "probabilities"])


def signature(tasks: list[str]) -> Any:
    """Returns the signature: `task` and `text` in; task, label, label_index, score, probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    outputs = Schema(
        [
            ColSpec("string", "task"),
            ColSpec("string", "label"),
            ColSpec("long", "label_index"),
            ColSpec("double", "score"),
            ColSpec(Array(DataType.double), "probabilities"),
        ]
    )
    return ModelSignature(inputs=Schema([ColSpec("string", "task"), ColSpec("string", "text")]), outputs=outputs)


def requirements() -> list[str]:
    """Returns the pinned packages the model needs to load and predict (mergeflow included), nothing else."""
    from importlib.metadata import version

    pinned = [f"{p}=={version(p)}" for p in ("torch", "transformers", "safetensors", "pandas")]
    return [*pinned, f"mergeflow=={version('mergeflow')}"]


def save_classifier_model(
    merged_dir: Path, out: Path, tasks: dict[str, dict[str, Any]], reference: dict[str, Any] | None = None
) -> Path:
    """Saves the merged encoder and its heads as the multi-task classifier at `out` (models from code).

    `tasks` gives label names and max_length per head task (from the evaluation config); the rest use
    the head's class indices and DEFAULT_MAX_LENGTH. With `reference` (uri, manifest, storage of the
    published folder) the model holds `published.json` instead of the weights.
    """
    import shutil
    import tempfile

    from tasks.published_weights import write_reference

    heads = sorted(p.stem for p in (merged_dir / "heads").glob("*.safetensors"))
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-classifier-") as tmp:
        staged = Path(tmp) / "model"
        if reference is None:
            shutil.copytree(merged_dir, staged)
        else:
            write_reference(staged, **reference)
        meta = {t: {k: v for k, v in (tasks.get(t) or {}).items() if v is not None} for t in heads}
        (staged / TASKS_FILE).write_text(json.dumps(meta, indent=1))
        example = pd.DataFrame({"task": [heads[0]], "text": ["an example input"]})
        mlflow.pyfunc.save_model(
            str(out),
            python_model=str(Path(__file__).resolve()),
            artifacts={"model": str(staged)},
            signature=signature(heads),
            input_example=example,
            pip_requirements=requirements(),
        )
    return out


mlflow.models.set_model(MultiTaskClassifier())
