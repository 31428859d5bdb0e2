"""Returns the router's calibration texts named by a config's `calibration` section, checked against its fine-tunes.

Each fine-tune gets the texts of its task: from a zoo (each merge task's train split; a causal zoo's
fine-tuned domains) or from an
explicit source (dataset, text column, split), sampled without replacement to `samples` with a
fixed seed. Out-of-domain texts (the zoo's out-of-domain tasks, zoo tasks whose fine-tune is not in
this merge, and explicit `ood` sources) measure how often the router flags inputs it was not
calibrated for. A source that names no fine-tune, a fine-tune without texts, fewer than two
fine-tunes, or an empty dataset is a ConfigError naming the task and the file.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from merging.config import MergeConfig
from merging.engine.labels import model_labels
from merging.errors import ConfigError
from merging.evaluation.data import TaskSpec, _rows
from merging.pipeline_config import CalibrationConfig, CalibrationSource


@dataclass
class CalibrationSet:
    """Per fine-tune label its calibration texts, the out-of-domain texts, and where each came from."""

    texts: dict[str, list[str]]
    ood: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, int]:
        return {**{f"samples.{t}": len(v) for t, v in self.texts.items()}, "samples.ood": len(self.ood)}


def load_texts(source: CalibrationSource, samples: int, seed: int) -> tuple[list[str], str]:
    """Returns (up to `samples` texts of the source's split, drawn with `seed`; where they came from)."""
    spec = TaskSpec(
        name=source.name,
        dataset=source.dataset,
        text_column=source.text_column,
        split_column=source.split_column,
        splits={source.split: source.split},
    )
    rows, where = _rows(spec, source.split, None)
    if not rows:
        raise ConfigError(f"calibration: task {source.name}: split `{source.split}` of {where} is empty")
    if source.text_column not in rows[0]:
        raise ConfigError(
            f"calibration: task {source.name}: {where} has no column {source.text_column!r} "
            f"(columns: {', '.join(sorted(rows[0]))})"
        )
    texts = []
    for number, row in enumerate(rows):
        text = row.get(source.text_column)
        if not isinstance(text, str):
            raise ConfigError(
                f"calibration: task {source.name}: {where} row {number}: `{source.text_column}` is not text: {text!r}"
            )
        if text.strip():
            texts.append(text)
    if not texts:
        raise ConfigError(f"calibration: task {source.name}: {where} holds only empty texts")
    n = source.samples or samples
    if len(texts) > n:
        texts = random.Random(f"{seed}:{source.name}").sample(texts, n)
    return texts, where


def zoo_sources(cal: CalibrationConfig, labels: list[str]) -> tuple[list[CalibrationSource], list[CalibrationSource]]:
    """Returns (task sources, out-of-domain sources) of the zoo named by the section (train splits)."""
    if cal.zoo is None:
        return [], []
    from merging.zoo.causal_manifest import causal_zoo_tasks, is_causal_zoo
    from merging.zoo.manifest import load_manifest

    folder = Path(cal.zoo)
    if is_causal_zoo(folder):  # text domains: a domain with a fine-tune is a task, the held-out ones are OOD
        specs = [(spec, spec.model is not None) for spec in causal_zoo_tasks(folder)]
    else:
        specs = [(t.spec(folder), t.finetune is not None) for t in load_manifest(folder).tasks]
    tasks: list[CalibrationSource] = []
    ood: list[CalibrationSource] = []
    for spec, tuned in specs:
        source = CalibrationSource(
            name=spec.name,
            dataset=spec.dataset,
            text_column=spec.text_column,
            split=spec.splits.get("train", "train"),
            split_column=spec.split_column,
        )
        (tasks if tuned and spec.name in labels else ood).append(source)
    return tasks, ood


def calibration_set(config: MergeConfig) -> CalibrationSet:
    """Returns the calibration texts of every fine-tune of `config` (see the module's rules)."""
    cal = config.calibration
    if cal is None:
        raise ConfigError(f"calibration: merge_method {config.merge_method} needs a calibration section")
    labels = model_labels(config)
    if len(labels) < 2:
        raise ConfigError(
            f"calibration: {config.merge_method} routes between tasks and needs at least two fine-tunes "
            f"(this merge has {len(labels)}: {', '.join(labels)})"
        )
    unknown = sorted(t.name for t in cal.tasks if t.name not in labels)
    if unknown:
        raise ConfigError(
            f"calibration.tasks: {', '.join(unknown)} match no fine-tune of this merge "
            f"(fine-tunes: {', '.join(labels)}; a fine-tune's name is its `name`, else its folder name)"
        )
    from_zoo, ood_sources = zoo_sources(cal, labels)
    explicit = {t.name for t in cal.tasks}
    sources = [s for s in from_zoo if s.name not in explicit] + list(cal.tasks)
    out = CalibrationSet({})
    for source in sources:
        out.texts[source.name], out.sources[source.name] = load_texts(source, cal.samples, cal.seed)
    missing = [label for label in labels if label not in out.texts]
    if missing:
        raise ConfigError(
            f"calibration: no calibration texts for fine-tune(s) {', '.join(missing)}: add them to "
            "calibration.tasks (name, dataset, text_column) or name a zoo that has their tasks"
        )
    out.texts = {label: out.texts[label] for label in labels}
    for source in ood_sources + list(cal.ood):
        texts, where = load_texts(source, cal.samples, cal.seed)
        out.ood += texts
        out.sources[f"ood:{source.name}"] = where
    return out
