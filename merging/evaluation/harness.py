"""Returns evaluation reports: per-task scores of the base (linear probe), each fine-tune and merged models.

The protocol (DESIGN.md, "Evaluate"):
- the base encoder is scored with a linear probe per task: a head fitted on its frozen features of
  the task's train split (the analogue of zero-shot heads in the CLIP merging literature);
- a fine-tune is scored on its own task with its own head (and optionally on the other tasks with
  their heads, which shows how much one task's update disturbs another);
- a merged encoder is scored on each merged task with two head protocols: `own`, that task's own
  fine-tuned head (heads are never merged), and `refit`, a linear head fitted on the merged
  encoder's train features exactly as the base's probe is fitted (C on validation), so base and
  merge are compared with the same kind of head and only the encoder differs; normalized score =
  merged / fine-tuned (the fine-tune with its own head), for both protocols;
- out-of-domain tasks (no fine-tune was trained on them): a probe is fitted on the merged encoder's
  features and compared with the base encoder's probe; retention = merged probe / base probe.

Features are computed once per (encoder, task, split) and cached in the `Evaluator`, so scoring
several merged models against the same base and fine-tunes encodes each dataset once per model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from merging.errors import ConfigError
from merging.evaluation.data import Split, TaskSpec, load_split, tasks_by_name
from merging.evaluation.encoder import Encoder, load_encoder
from merging.evaluation.feature_cache import encode_cached, probe_cached
from merging.evaluation.heads import Head, load_head
from merging.evaluation.metrics import score


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


HeadProtocol = Literal["own", "refit"]
HEAD_PROTOCOLS = ("own", "refit")


@dataclass
class ModelScores:
    """Scores of one model: per task, normalized per task, and their averages, with own and refitted heads."""

    scores: dict[str, float]
    normalized: dict[str, float] = field(default_factory=dict)
    ood: dict[str, dict[str, float]] = field(default_factory=dict)
    refit: dict[str, float] = field(default_factory=dict)
    refit_normalized: dict[str, float] = field(default_factory=dict)

    @property
    def refit_average(self) -> float:
        return _mean(list(self.refit.values()))

    @property
    def refit_average_normalized(self) -> float:
        return _mean(list(self.refit_normalized.values()))

    def objective(self, name: str) -> float:
        """Returns `average`, `average_normalized`, `refit_average` or `refit_average_normalized`."""
        return float(getattr(self, name))

    @property
    def average(self) -> float:
        return _mean(list(self.scores.values()))

    @property
    def average_normalized(self) -> float:
        return _mean(list(self.normalized.values()))

    @property
    def ood_retention(self) -> float:
        return _mean([v["retention"] for v in self.ood.values()])

    def to_json(self) -> dict[str, Any]:
        return {
            "scores": self.scores,
            "normalized": self.normalized,
            "average": self.average,
            "average_normalized": self.average_normalized,
            "ood": self.ood,
            "ood_retention": self.ood_retention,
            **(
                {
                    "refit": self.refit,
                    "refit_normalized": self.refit_normalized,
                    "refit_average": self.refit_average,
                    "refit_average_normalized": self.refit_average_normalized,
                }
                if self.refit
                else {}
            ),
        }


@dataclass
class EvaluationReport:
    """Everything one evaluation measured, JSON-serialisable through `to_json`."""

    split: str
    tasks: list[dict[str, Any]]
    base: ModelScores
    finetuned: dict[str, float]
    models: dict[str, ModelScores]
    cross: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "tasks": self.tasks,
            "base_probe": self.base.to_json(),
            "finetuned": self.finetuned,
            "finetuned_average": _mean(list(self.finetuned.values())),
            "cross": self.cross,
            "models": {name: s.to_json() for name, s in self.models.items()},
        }


class Evaluator:
    """Scores encoders on a fixed list of tasks, caching loaded encoders' features and fitted probes."""

    def __init__(
        self,
        tasks: list[TaskSpec],
        base: str | Path,
        batch_size: int = 128,
        progress: bool = False,
        seed: int = 0,
        base_dir: Path | None = None,
        train_limit: int | None = None,
    ):
        """`train_limit` fits probes (base, refit, out-of-domain) on the first N train texts only: a cheaper
        search; final scores use the whole train split."""
        self.tasks = tasks_by_name(tasks)
        self.base = Path(base)
        self.batch_size = batch_size
        self.progress = progress
        self.seed = seed
        self.base_dir = base_dir
        self.train_limit = train_limit
        self._splits: dict[tuple[str, str], Split] = {}
        self._features: dict[tuple[str, str, str], torch.Tensor] = {}
        self._probes: dict[tuple[str, str], Head] = {}
        self._encoder: Encoder | None = None

    # data -----------------------------------------------------------------------------------
    def split(self, task: str, split: str) -> Split:
        key = (task, split)
        if key not in self._splits:
            limit = self.train_limit if split == "train" else None
            self._splits[key] = load_split(self.tasks[task], split, self.base_dir, limit=limit)
        return self._splits[key]

    def labels(self, task: str, split: str) -> torch.Tensor:
        return torch.tensor(self.split(task, split).labels)

    def in_domain(self) -> list[str]:
        return [n for n, t in self.tasks.items() if t.model is not None]

    def out_of_domain(self) -> list[str]:
        return [n for n, t in self.tasks.items() if t.model is None]

    # features -------------------------------------------------------------------------------
    def features(self, encoder_path: str | Path, task: str, split: str) -> torch.Tensor:
        """Returns (and caches) the features of `encoder_path` on a task's split."""
        path = Path(encoder_path).resolve()
        key = (str(path), task, split)
        if key not in self._features:
            if self._encoder is None or self._encoder.path != path:
                self._encoder = load_encoder(
                    path,
                    tokenizer_path=None
                    if (path / "vocab.txt").exists() or (path / "tokenizer.json").exists()
                    else self.base,
                )
            spec = self.tasks[task]
            self._features[key] = encode_cached(
                self._encoder,
                self.split(task, split).texts,
                spec.max_length,
                self.batch_size,
                self.progress,
                desc=f"{path.name}:{task}/{split}",
            )
        return self._features[key]

    def forget(self, encoder_path: str | Path) -> None:
        """Drops cached features and probes of one encoder (a merged model about to be overwritten)."""
        path = str(Path(encoder_path).resolve())
        self._features = {k: v for k, v in self._features.items() if k[0] != path}
        self._probes = {k: v for k, v in self._probes.items() if k[0] != path}
        if self._encoder is not None and str(self._encoder.path) == path:
            self._encoder = None

    def probe(self, encoder_path: str | Path, task: str) -> Head:
        """Returns (and caches) the probe of `encoder_path` on a task: fitted on train, C chosen on validation."""
        key = (str(Path(encoder_path).resolve()), task)
        if key not in self._probes:
            spec = self.tasks[task]
            num_labels = spec.num_labels or int(self.labels(task, "train").max()) + 1
            self._probes[key] = probe_cached(
                self.features(encoder_path, task, "train"),
                self.labels(task, "train"),
                num_labels,
                self.features(encoder_path, task, "validation"),
                self.labels(task, "validation"),
                seed=self.seed,
            )
        return self._probes[key]

    def score_head(self, encoder_path: str | Path, task: str, head: Head, split: str) -> float:
        labels = self.labels(task, split)
        if int(labels.max()) >= head.num_labels:
            raise ConfigError(
                f"task {task}: split {split} has label {int(labels.max())} but the head has only "
                f"{head.num_labels} outputs"
            )
        feats = self.features(encoder_path, task, split)
        return score(self.tasks[task].metric, head.predict(feats), labels)

    def task_head(self, task: str, merged: str | Path | None = None) -> Head:
        """Returns a merge task's own head: the merged model's heads/<task> file, else its fine-tune's."""
        if merged is not None:
            candidate = Path(merged) / "heads" / f"{task}.safetensors"
            if candidate.is_file():
                return load_head(candidate)
        model = self.tasks[task].model
        if model is None:
            raise ConfigError(f"task {task} has no fine-tune, so it has no head of its own")
        return load_head(model)

    # reports --------------------------------------------------------------------------------
    def base_scores(self, split: str = "test") -> ModelScores:
        scores = {t: self.score_head(self.base, t, self.probe(self.base, t), split) for t in self.tasks}
        return ModelScores(scores)

    def finetuned_scores(self, split: str = "test") -> dict[str, float]:
        return {t: self.score_head(self.tasks[t].model, t, self.task_head(t), split) for t in self.in_domain()}  # type: ignore[arg-type]

    def cross_scores(self, split: str = "test") -> dict[str, dict[str, float]]:
        """Returns fine-tune → task → score of that fine-tune's encoder with each merge task's own head."""
        return {
            ft: {t: self.score_head(self.tasks[ft].model, t, self.task_head(t), split) for t in self.in_domain()}  # type: ignore[arg-type]
            for ft in self.in_domain()
        }

    def model_scores(
        self,
        merged: str | Path,
        split: str = "test",
        finetuned: Mapping[str, float] | None = None,
        out_of_domain: bool = True,
        heads: tuple[str, ...] = HEAD_PROTOCOLS,
    ) -> ModelScores:
        """Returns a merged encoder's scores on merge tasks (own and/or refit heads) and its OOD probe retention.

        The normalized scores divide by the fine-tunes' scores with their own heads; with `heads`
        naming only `refit`, `scores` holds the refit scores too (a search on refit heads).
        """
        unknown = sorted(set(heads) - set(HEAD_PROTOCOLS))
        if unknown or not heads:
            raise ConfigError(f"evaluation heads must be among {list(HEAD_PROTOCOLS)}, not {list(heads)}")
        finetuned = finetuned if finetuned is not None else self.finetuned_scores(split)

        def normalize(values: dict[str, float]) -> dict[str, float]:
            return {t: values[t] / finetuned[t] if finetuned[t] > 0 else math.nan for t in values}

        refit = {}
        if "refit" in heads:
            refit = {t: self.score_head(merged, t, self.probe(merged, t), split) for t in self.in_domain()}
        if "own" in heads:
            scores = {t: self.score_head(merged, t, self.task_head(t, merged), split) for t in self.in_domain()}
        else:
            scores = dict(refit)
        ood = {}
        for t in self.out_of_domain() if out_of_domain else []:
            base_probe = self.score_head(self.base, t, self.probe(self.base, t), split)
            merged_probe = self.score_head(merged, t, self.probe(merged, t), split)
            ood[t] = {
                "merged_probe": merged_probe,
                "base_probe": base_probe,
                "retention": merged_probe / base_probe if base_probe > 0 else math.nan,
            }
        return ModelScores(scores, normalize(scores), ood, refit, normalize(refit))

    def evaluate(self, merged: Mapping[str, str | Path], split: str = "test", cross: bool = False) -> EvaluationReport:
        """Returns the full report: base probe, fine-tunes (and their cross scores), each merged model."""
        finetuned = self.finetuned_scores(split)
        base = self.base_scores(split)
        base.normalized = {t: base.scores[t] / finetuned[t] for t in finetuned if finetuned[t] > 0}
        # the base's probe is its refit head: the same protocol a merge gets under `refit`
        base.refit = {t: base.scores[t] for t in finetuned}
        base.refit_normalized = dict(base.normalized)
        models = {name: self.model_scores(path, split, finetuned) for name, path in merged.items()}
        tasks = [
            {
                "name": t.name,
                "metric": t.metric,
                "role": "merge" if t.model is not None else "out_of_domain",
                "examples": len(self.split(t.name, split)),
            }
            for t in self.tasks.values()
        ]
        return EvaluationReport(split, tasks, base, finetuned, models, self.cross_scores(split) if cross else {})
