"""Per-domain perplexity as evaluation tasks: the causal-LM counterpart of the encoder `Evaluator`.

A task with `metric: perplexity` is a text domain. The base, each fine-tune (on its own domain)
and a merged model are scored by the mean negative log-likelihood per predicted token
(`merging.evaluation.causal.perplexity`: windows of at most `max_length` tokens). For a domain a
fine-tune was trained on, the merged model's normalized score is the share of that fine-tune's NLL
improvement over the base the merge keeps:

    normalized = (NLL_base − NLL_merged) / (NLL_base − NLL_finetune)

1 = the fine-tune's gain kept, 0 = no better than the base, negative = worse than the base; it is
undefined (NaN) when the fine-tune is no better than the base on its own domain. A domain no
fine-tune was trained on is out-of-domain: retention = perplexity_base / perplexity_merged (1 =
unchanged, below 1 = the merge lost some of the base's ability there).

The report has the encoder report's shape (`base_probe` holds the base's perplexities), so the
pipeline's table, metrics, plot, validation search and gate work unchanged; scores are
perplexities (lower is better), and `average_normalized` is the objective to maximize.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from merging.errors import ConfigError
from merging.evaluation.causal import load_causal_lm, perplexity
from merging.evaluation.data import TaskSpec, load_texts, tasks_by_name
from merging.evaluation.harness import EvaluationReport, ModelScores


def normalized_nll(base: float, finetune: float, merged: float) -> float:
    """Returns the share of the fine-tune's NLL improvement the merge keeps (NaN when there is none)."""
    gain = base - finetune
    if not gain > 1e-12:
        return float("nan")
    return (base - merged) / gain


class LmEvaluator:
    """Scores causal LMs on text domains, caching each (model, domain, split) result and one loaded model."""

    def __init__(
        self,
        tasks: list[TaskSpec],
        base: str | Path,
        batch_size: int = 8,
        progress: bool = False,
        base_dir: Path | None = None,
    ):
        self.tasks = tasks_by_name(tasks)
        wrong = [t.name for t in tasks if t.metric != "perplexity"]
        if wrong:
            raise ConfigError(f"evaluation: tasks {wrong} are not perplexity tasks; a causal LM is scored per domain")
        self.base = Path(base)
        self.batch_size = batch_size
        self.progress = progress
        self.base_dir = base_dir
        self._texts: dict[tuple[str, str], list[str]] = {}
        self._results: dict[tuple[str, str, str], dict[str, float]] = {}
        self._loaded: tuple[Path, Any, Any] | None = None

    def in_domain(self) -> list[str]:
        return [n for n, t in self.tasks.items() if t.model is not None]

    def out_of_domain(self) -> list[str]:
        return [n for n, t in self.tasks.items() if t.model is None]

    def texts(self, task: str, split: str) -> list[str]:
        key = (task, split)
        if key not in self._texts:
            self._texts[key] = load_texts(self.tasks[task], split, self.base_dir)
        return self._texts[key]

    def score(self, model_path: str | Path, task: str, split: str) -> dict[str, float]:
        """Returns {"perplexity", "nll", "tokens"} of the model at `model_path` on a domain's split."""
        path = Path(model_path).resolve()
        key = (str(path), task, split)
        if key not in self._results:
            if self._loaded is None or self._loaded[0] != path:
                model, tokenizer = load_causal_lm(path)
                self._loaded = (path, model, tokenizer)
            _, model, tokenizer = self._loaded
            spec = self.tasks[task]
            self._results[key] = perplexity(
                model, tokenizer, self.texts(task, split), spec.max_length, self.batch_size, self.progress
            )
        return self._results[key]

    def forget(self, model_path: str | Path) -> None:
        """Drops what was measured on one model (a merged folder about to be overwritten)."""
        path = str(Path(model_path).resolve())
        self._results = {k: v for k, v in self._results.items() if k[0] != path}
        if self._loaded is not None and str(self._loaded[0]) == path:
            self._loaded = None

    def model_scores(
        self, model_path: str | Path, split: str, out_of_domain: bool = True, heads: Any = None
    ) -> ModelScores:
        """Returns perplexity per domain, normalized NLL per fine-tuned domain, and OOD retention."""
        domains = self.in_domain() + (self.out_of_domain() if out_of_domain else [])
        # Model by model (one load each, as `score` keeps one model loaded): this one, the base, the fine-tunes.
        mine = {name: self.score(model_path, name, split) for name in domains}
        base = {name: self.score(self.base, name, split) for name in domains}
        tuned = {n: self.score(t.model, n, split) for n, t in self.tasks.items() if t.model is not None}
        scores, normalized, ood = {}, {}, {}
        for name in self.in_domain():
            scores[name] = mine[name]["perplexity"]
            normalized[name] = normalized_nll(base[name]["nll"], tuned[name]["nll"], mine[name]["nll"])
        for name in self.out_of_domain() if out_of_domain else []:
            ood[name] = {
                "base_probe": base[name]["perplexity"],
                "merged_probe": mine[name]["perplexity"],
                "retention": base[name]["perplexity"] / mine[name]["perplexity"],
                "base_nll": base[name]["nll"],
                "merged_nll": mine[name]["nll"],
            }
        return ModelScores(scores, normalized, ood)

    def evaluate(self, models: Mapping[str, str | Path], split: str = "test", cross: bool = False) -> EvaluationReport:
        """Returns the report: the base and each fine-tune on its domain, and every named model."""
        tasks = [
            {"name": n, "role": "merge" if t.model else "out_of_domain", "metric": t.metric, "model": t.model}
            for n, t in self.tasks.items()
        ]
        base_scores = {n: self.score(self.base, n, split)["perplexity"] for n in self.tasks}
        base = ModelScores(base_scores, {n: 0.0 for n in self.in_domain()})
        finetuned = {}
        for name in self.in_domain():
            model = self.tasks[name].model
            assert model is not None
            finetuned[name] = self.score(model, name, split)["perplexity"]
        scored = {name: self.model_scores(path, split) for name, path in models.items()}
        return EvaluationReport(split, tasks, base, finetuned, scored)

    def nll_table(self, models: Mapping[str, str | Path], split: str) -> dict[str, dict[str, float]]:
        """Returns model → domain → mean NLL per token (base, each fine-tune on its domain, the named models)."""
        out: dict[str, dict[str, float]] = {"base": {n: self.score(self.base, n, split)["nll"] for n in self.tasks}}
        out["finetuned"] = {
            n: self.score(t.model, n, split)["nll"] for n, t in self.tasks.items() if t.model is not None
        }
        for name, path in models.items():
            out[name] = {n: self.score(path, n, split)["nll"] for n in self.tasks}
        return out
