"""Causal-LM evaluation tasks: per-domain perplexity, and lm-evaluation-harness tasks.

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

A task with `metric: lm_eval:<task>[:<metric>]` runs an lm-evaluation-harness task (higher is
better; `dataset` is the folder of the task's YAML, or `lm_eval` for lm-eval's own tasks). Its
normalized score is (score_merged − score_base) / (score_finetune − score_base) when a fine-tune is
named after it, else it is out-of-domain with retention = score_merged / score_base. lm-eval tasks
carry their own data split, so they are scored on the report's split only, never in the
validation search (which uses the perplexity tasks).

The report has the encoder report's shape (`base_probe` holds the base's scores), so the
pipeline's table, metrics, plot, validation search and gate work unchanged; perplexity scores are
lower-is-better, and `average_normalized` is the objective to maximize.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from merging.errors import ConfigError
from merging.evaluation.causal import folder_perplexity, lm_eval_scores, load_causal_lm
from merging.evaluation.data import LM_EVAL_BUILTIN, TaskSpec, lm_eval_target, load_texts, tasks_by_name
from merging.evaluation.harness import EvaluationReport, ModelScores


def normalized_nll(base: float, finetune: float, merged: float) -> float:
    """Returns the share of the fine-tune's NLL improvement the merge keeps (NaN when there is none)."""
    gain = base - finetune
    if not gain > 1e-12:
        return float("nan")
    return (base - merged) / gain


def is_lm_task(task: TaskSpec) -> bool:
    """Returns whether `task` scores a causal LM (perplexity or an lm-evaluation-harness task)."""
    return task.metric == "perplexity" or lm_eval_target(task.metric) is not None


class LmEvaluator:
    """Scores causal LMs on text domains, caching each (model, domain, split) result and one loaded model."""

    def __init__(
        self,
        tasks: list[TaskSpec],
        base: str | Path,
        batch_size: int = 8,
        progress: bool = False,
        base_dir: Path | None = None,
        report_split: str = "test",
        device: str = "cpu",
    ):
        self.tasks = tasks_by_name(tasks)
        wrong = [t.name for t in tasks if not is_lm_task(t)]
        if wrong:
            raise ConfigError(
                f"evaluation: tasks {wrong} are neither perplexity nor lm_eval tasks; a causal LM is scored per domain"
            )
        self.report_split = report_split
        self.device = device
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

    def scored_on(self, split: str) -> list[str]:
        """Returns the tasks scored on `split`: every task on the report's split, perplexity tasks only on others."""
        return [n for n, t in self.tasks.items() if split == self.report_split or t.metric == "perplexity"]

    def value(self, model_path: str | Path, task: str, split: str) -> float:
        """Returns the task's score: a perplexity (lower is better) or an lm-eval metric (higher is better)."""
        result = self.score(model_path, task, split)
        return result["perplexity"] if self.tasks[task].metric == "perplexity" else result["score"]

    def _lm_eval(self, path: Path, task: str) -> dict[str, float]:
        spec = self.tasks[task]
        target = lm_eval_target(spec.metric)
        assert target is not None
        name, metric = target
        include = None
        if spec.dataset != LM_EVAL_BUILTIN:
            include = Path(spec.dataset)
            if self.base_dir is not None and not include.is_absolute():
                include = self.base_dir / include
            if not include.is_dir():
                raise ConfigError(f"task {task}: dataset {include} is not a folder of lm-eval task YAMLs")
        results = lm_eval_scores(path, [name], spec.max_texts, self.batch_size, include, self.device).get(name, {})
        keys = [k for k in results if k.split(",")[0] == metric]
        if not keys or not isinstance(results[keys[0]], int | float):
            found = sorted(k for k in results if "," in k and "stderr" not in k)
            raise ConfigError(f"task {task}: lm-eval task {name!r} reported no {metric!r} (it reported {found})")
        return {"score": float(results[keys[0]])}

    def score(self, model_path: str | Path, task: str, split: str) -> dict[str, float]:
        """Returns {"perplexity", "nll", "tokens"} (perplexity tasks) or {"score"} (lm-eval tasks, which have their
        own data split: measured once per model) of the model at `model_path` on a task's split."""
        path = Path(model_path).resolve()
        key = (str(path), task, split if self.tasks[task].metric == "perplexity" else "")
        if key in self._results:
            return self._results[key]
        if self.tasks[task].metric != "perplexity":
            self._loaded = None  # lm-eval loads the model itself: drop ours first
            self._results[key] = self._lm_eval(path, task)
        else:
            spec = self.tasks[task]
            self._results[key] = folder_perplexity(
                path,
                self.texts(task, split),
                spec.max_length,
                self.batch_size,
                lambda: self._load(path),
                "cpu",
                self.progress,
            )
        return self._results[key]

    def _load(self, path: Path) -> tuple[Any, Any]:
        """Returns (model, tokenizer) of `path`, loading it unless it is the one model kept loaded."""
        if self._loaded is None or self._loaded[0] != path:
            model, tokenizer = load_causal_lm(path)
            self._loaded = (path, model, tokenizer)
        return self._loaded[1], self._loaded[2]

    def forget(self, model_path: str | Path) -> None:
        """Drops what was measured on one model (a merged folder about to be overwritten)."""
        path = str(Path(model_path).resolve())
        self._results = {k: v for k, v in self._results.items() if k[0] != path}
        if self._loaded is not None and str(self._loaded[0]) == path:
            self._loaded = None

    def model_scores(
        self, model_path: str | Path, split: str, out_of_domain: bool = True, heads: Any = None
    ) -> ModelScores:
        """Returns the score per task, the normalized score per fine-tuned task, and OOD retention."""
        on = set(self.scored_on(split))
        inside = [n for n in self.in_domain() if n in on]
        outside = [n for n in self.out_of_domain() if n in on] if out_of_domain else []
        # Model by model (one load each, as `score` keeps one model loaded): this one, the base, the fine-tunes.
        mine = {name: self.score(model_path, name, split) for name in inside + outside}
        base = {name: self.score(self.base, name, split) for name in inside + outside}
        tuned = {n: self.score(self.tasks[n].model, n, split) for n in inside}  # type: ignore[arg-type]
        scores, normalized, ood = {}, {}, {}
        for name in inside:
            if self.tasks[name].metric == "perplexity":
                scores[name] = mine[name]["perplexity"]
                normalized[name] = normalized_nll(base[name]["nll"], tuned[name]["nll"], mine[name]["nll"])
            else:  # higher is better: the same share of the fine-tune's gain, on the task's own metric
                scores[name] = mine[name]["score"]
                normalized[name] = normalized_nll(-base[name]["score"], -tuned[name]["score"], -mine[name]["score"])
        for name in outside:
            if self.tasks[name].metric == "perplexity":
                ood[name] = {
                    "base_probe": base[name]["perplexity"],
                    "merged_probe": mine[name]["perplexity"],
                    "retention": base[name]["perplexity"] / mine[name]["perplexity"],
                    "base_nll": base[name]["nll"],
                    "merged_nll": mine[name]["nll"],
                }
            else:
                b, m = base[name]["score"], mine[name]["score"]
                ood[name] = {"base_probe": b, "merged_probe": m, "retention": m / b if b > 0 else float("nan")}
        return ModelScores(scores, normalized, ood)

    def evaluate(self, models: Mapping[str, str | Path], split: str = "test", cross: bool = False) -> EvaluationReport:
        """Returns the report: the base and each fine-tune on its task, and every named model."""
        on = self.scored_on(split)
        tasks = [
            {"name": n, "role": "merge" if t.model else "out_of_domain", "metric": t.metric, "model": t.model}
            for n, t in self.tasks.items()
            if n in on
        ]
        base_scores = {n: self.value(self.base, n, split) for n in on}
        base = ModelScores(base_scores, {n: 0.0 for n in self.in_domain() if n in on})
        finetuned = {}
        for name in self.in_domain():
            model = self.tasks[name].model
            assert model is not None
            if name in on:
                finetuned[name] = self.value(model, name, split)
        scored = {name: self.model_scores(path, split) for name, path in models.items()}
        return EvaluationReport(split, tasks, base, finetuned, scored)

    def nll_table(self, models: Mapping[str, str | Path], split: str) -> dict[str, dict[str, float]]:
        """Returns model → domain → mean NLL per token of the perplexity tasks (base, each fine-tune on its
        domain, the named models)."""
        domains = [n for n, t in self.tasks.items() if t.metric == "perplexity"]
        out: dict[str, dict[str, float]] = {"base": {n: self.score(self.base, n, split)["nll"] for n in domains}}
        out["finetuned"] = {
            n: self.score(self.tasks[n].model, n, split)["nll"]  # type: ignore[arg-type]
            for n in domains
            if self.tasks[n].model is not None
        }
        for name, path in models.items():
            out[name] = {n: self.score(path, n, split)["nll"] for n in domains}
        return out
