"""Returns the labelled texts of an evaluation task's split, from a file, a saved dataset, or a hub name.

A task names its dataset in one of four ways, tried in this order:
- a folder written by `datasets.Dataset(Dict).save_to_disk` (it holds `dataset_dict.json` or
  `dataset_info.json`);
- a folder holding one file per split: `<split>.parquet`, `<split>.jsonl` or `<split>.csv`;
- one parquet/jsonl/csv file with a `split` column (the column name is configurable);
- otherwise a dataset name for `datasets.load_dataset` (needs network; offline it fails clearly).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merging.errors import ConfigError

FILE_SUFFIXES = (".parquet", ".jsonl", ".csv")
METRICS = ("accuracy", "macro_f1", "perplexity")
# `lm_eval:<task>[:<metric>]`: an lm-evaluation-harness task and the result key to read (default `acc`)
LM_EVAL = re.compile(r"lm_eval:(?P<task>[A-Za-z0-9_][A-Za-z0-9_.-]*)(?::(?P<metric>[A-Za-z0-9_][A-Za-z0-9_.-]*))?")
LM_EVAL_BUILTIN = "lm_eval"  # `dataset` of an lm_eval task: lm-eval's own task registry (else a folder of YAMLs)


def lm_eval_target(metric: str) -> tuple[str, str] | None:
    """Returns (lm-eval task, result metric) of an `lm_eval:<task>[:<metric>]` metric, else None."""
    match = LM_EVAL.fullmatch(metric)
    return (match["task"], match["metric"] or "acc") if match else None


class TaskSpec(BaseModel):
    """One classification task: where its data is, which columns, which splits, which metric."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1)
    dataset: str = Field(min_length=1, description="file, folder, saved dataset, or hub dataset name")
    text_column: str = "text"
    label_column: str = "label"
    split_column: str = "split"
    splits: dict[str, str] = Field(
        default_factory=lambda: {"train": "train", "validation": "validation", "test": "test"}
    )
    # `perplexity`: a text domain for a causal LM (no labels); scored by per-token NLL, lower is better.
    # `lm_eval:<task>[:<metric>]`: an lm-evaluation-harness task scoring a causal LM (higher is better);
    # `dataset` is then the folder of the task's YAML (lm-eval's include path) or `lm_eval` for its own tasks
    metric: str = "accuracy"
    num_labels: int | None = Field(default=None, ge=2)
    label_names: list[str] | None = None
    max_length: int = Field(default=64, ge=2)  # tokens per input (perplexity: per scored window)
    max_texts: int | None = Field(default=None, ge=1)  # perplexity: score at most the split's first N texts
    model: str | None = Field(default=None, description="the fine-tune trained on this task; none = out-of-domain")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in METRICS and lm_eval_target(value) is None:
            raise ValueError(
                f"metric {value!r} is not one of {', '.join(METRICS)} or `lm_eval:<task>[:<metric>]` "
                "(task and metric names: letters, digits, `_`, `.`, `-`)"
            )
        return value

    @model_validator(mode="after")
    def _labels_agree(self) -> TaskSpec:
        if self.label_names is not None:
            if self.num_labels is None:
                self.num_labels = len(self.label_names)
            elif self.num_labels != len(self.label_names):
                raise ValueError(f"num_labels is {self.num_labels} but label_names has {len(self.label_names)} names")
        return self


@dataclass(frozen=True)
class Split:
    """The texts and integer labels of one split of one task."""

    task: str
    split: str
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def _read_rows(path: Path) -> list[dict[str, object]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}:{number}: not a JSON line: {exc}") from exc
        return rows
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _hf_rows(dataset: object) -> list[dict[str, object]]:
    return [dict(row) for row in dataset]  # type: ignore[attr-defined]


def _rows(task: TaskSpec, split: str, base_dir: Path | None) -> tuple[list[dict[str, object]], str]:
    """Returns (rows of the split, a description of where they came from)."""
    name = task.splits.get(split)  # type: ignore[call-overload]
    if name is None:
        raise ConfigError(f"task {task.name}: no `{split}` split is configured (splits: {dict(task.splits)})")
    path = Path(task.dataset)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if name not in loaded:
                    raise ConfigError(f"task {task.name}: {path} has splits {sorted(loaded)}, not `{name}`")
                return _hf_rows(loaded[name]), f"{path}[{name}]"
            return [r for r in _hf_rows(loaded) if r.get(task.split_column) == name], f"{path}[{name}]"
        for suffix in FILE_SUFFIXES:
            if (path / f"{name}{suffix}").is_file():
                file = path / f"{name}{suffix}"
                return _read_rows(file), str(file)
        raise ConfigError(f"task {task.name}: {path} holds no {name}.parquet, {name}.jsonl or {name}.csv")
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise ConfigError(f"task {task.name}: {path} is not a .parquet, .jsonl or .csv file")
        rows = _read_rows(path)
        if rows and task.split_column not in rows[0]:
            raise ConfigError(f"task {task.name}: {path} has no `{task.split_column}` column to tell splits apart")
        return [r for r in rows if r.get(task.split_column) == name], f"{path}[{task.split_column}={name}]"
    if path.suffix in FILE_SUFFIXES or task.dataset.startswith(("/", ".", "~")):
        raise ConfigError(f"task {task.name}: dataset {path} does not exist")
    import datasets

    try:
        loaded = datasets.load_dataset(task.dataset, split=name)
    except Exception as exc:  # datasets raises many types; the message is what the user needs
        raise ConfigError(
            f"task {task.name}: `{task.dataset}` is not a local file or folder and loading it with "
            f"datasets.load_dataset failed (offline?): {exc}"
        ) from exc
    return _hf_rows(loaded), f"{task.dataset}[{name}]"


def tasks_by_name(tasks: list[TaskSpec]) -> dict[str, TaskSpec]:
    """Returns the tasks by name; an error when there are none or a name repeats."""
    if not tasks:
        raise ConfigError("evaluation: no tasks are configured")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"evaluation: task names repeat: {names}")
    return {t.name: t for t in tasks}


def load_texts(task: TaskSpec, split: str, base_dir: Path | None = None) -> list[str]:
    """Returns a text domain's split (at most `max_texts`), checked: the column present, text, not empty."""
    rows, where = _rows(task, split, base_dir)
    if not rows:
        raise ConfigError(f"task {task.name}: split `{split}` of {where} is empty")
    if task.text_column not in rows[0]:
        raise ConfigError(
            f"task {task.name}: {where} has no column {task.text_column!r} (columns: {', '.join(sorted(rows[0]))})"
        )
    texts = []
    for number, row in enumerate(rows[: task.max_texts]):
        text = row[task.text_column]
        if not isinstance(text, str):
            raise ConfigError(f"task {task.name}: {where} row {number}: `{task.text_column}` is not text: {text!r}")
        texts.append(text)
    return texts


def load_split(task: TaskSpec, split: str, base_dir: Path | None = None, limit: int | None = None) -> Split:
    """Returns the split's texts and labels, checked: columns present, labels integers in range, not empty."""
    rows, where = _rows(task, split, base_dir)
    if not rows:
        raise ConfigError(f"task {task.name}: split `{split}` of {where} is empty")
    missing = [c for c in (task.text_column, task.label_column) if c not in rows[0]]
    if missing:
        raise ConfigError(
            f"task {task.name}: {where} has no column {', '.join(repr(m) for m in missing)} "
            f"(columns: {', '.join(sorted(rows[0]))})"
        )
    if limit is not None:
        rows = rows[:limit]
    texts, labels = [], []
    names = task.label_names or []
    for number, row in enumerate(rows):
        text, label = row[task.text_column], row[task.label_column]
        if not isinstance(text, str):
            raise ConfigError(f"task {task.name}: {where} row {number}: `{task.text_column}` is not text: {text!r}")
        if isinstance(label, str) and label in names:
            label = names.index(label)
        try:
            value = int(label)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise ConfigError(
                f"task {task.name}: {where} row {number}: label {label!r} is not a class index or a label name"
            ) from None
        if value != label and not isinstance(label, str):
            raise ConfigError(f"task {task.name}: {where} row {number}: label {label!r} is not an integer")
        if value < 0 or (task.num_labels is not None and value >= task.num_labels):
            raise ConfigError(
                f"task {task.name}: {where} row {number}: label {value} is outside 0..{(task.num_labels or 0) - 1}"
            )
        texts.append(text)
        labels.append(value)
    return Split(task.name, split, texts, labels)
