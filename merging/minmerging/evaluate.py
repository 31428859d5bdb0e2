"""Returns a routed model's scores with the evaluation harness's tasks, splits, heads and probes.

Two in-domain views: `scores` give each input its true task's head on the features the routed
path produced (as static merges are scored: the task is known), `strict` uses the head of the task
the router chose (a misrouted or out-of-domain input counts as wrong). Out-of-domain retention is
a probe on the routed model's features against the base probe, as for static merges. The routing
confusion matrix counts, per true task (in- and out-of-domain), the inputs routed to each task
or flagged out of domain.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from merging.evaluation.feature_cache import probe_cached
from merging.evaluation.harness import Evaluator
from merging.evaluation.lm import LmEvaluator
from merging.evaluation.metrics import score
from merging.minmerging.routed import Routed, RoutedModel

OUT_OF_DOMAIN = "out_of_domain"


def routed_run(routed: RoutedModel, evaluator: Evaluator, task: str, split: str, oracle: bool = False) -> list[Routed]:
    """Returns the routed results of a task's split (at that task's max_length); `oracle` routes to `task`."""
    spec = evaluator.tasks[task]
    previous = routed.max_length
    routed.max_length = spec.max_length
    texts = evaluator.split(task, split).texts
    try:
        return routed.run(texts, [task] * len(texts) if oracle else None)
    finally:
        routed.max_length = previous


def routed_report(
    evaluator: Evaluator | LmEvaluator,
    routed: RoutedModel,
    split: str = "test",
    finetuned: dict[str, float] | None = None,
    oracle: bool = False,
    out_of_domain: bool = True,
) -> dict[str, Any]:
    """Returns scores, normalized scores, strict scores, routing accuracy and OOD retention of a routed model.

    With `oracle`, in-domain inputs go to their true task's experts (the router is bypassed). Without
    `out_of_domain`, the out-of-domain tasks are not scored (a validation search needs in-domain only).
    A causal-LM routed model on perplexity tasks is scored by `merging.minmerging.lm_report`.
    """
    if isinstance(evaluator, LmEvaluator):
        from merging.minmerging.lm_report import routed_lm_report

        return routed_lm_report(evaluator, routed, split, oracle, out_of_domain)
    finetuned = finetuned if finetuned is not None else evaluator.finetuned_scores(split)
    scores, strict, routing = {}, {}, {}
    confusion: dict[str, dict[str, int]] = {}  # true task → routed task ("out_of_domain" when flagged) → inputs
    for task in evaluator.in_domain():
        results = routed_run(routed, evaluator, task, split, oracle)
        labels = evaluator.labels(task, split)
        head = evaluator.task_head(task)
        feats = torch.stack([r.features for r in results])
        scores[task] = score(evaluator.tasks[task].metric, head.predict(feats), labels)
        picked = torch.tensor([r.label if r.task == task and r.label is not None else -1 for r in results])
        strict[task] = score(evaluator.tasks[task].metric, picked, labels)
        routing[task] = sum(r.task == task for r in results) / len(results)
        confusion[task] = {name: 0 for name in [*routed.router.tasks, OUT_OF_DOMAIN]}
        for r in results:
            confusion[task][r.task or OUT_OF_DOMAIN] += 1
    ood = {}
    for task in evaluator.out_of_domain() if out_of_domain else []:
        runs = {s: routed_run(routed, evaluator, task, s) for s in dict.fromkeys(("train", "validation", split))}
        ood_feats = {s: torch.stack([r.features for r in results]) for s, results in runs.items()}
        spec = evaluator.tasks[task]
        num_labels = spec.num_labels or int(evaluator.labels(task, "train").max()) + 1
        probe = probe_cached(
            ood_feats["train"],
            evaluator.labels(task, "train"),
            num_labels,
            ood_feats["validation"],
            evaluator.labels(task, "validation"),
            seed=evaluator.seed,
        )
        merged_probe = score(spec.metric, probe.predict(ood_feats[split]), evaluator.labels(task, split))
        base_probe = evaluator.score_head(evaluator.base, task, evaluator.probe(evaluator.base, task), split)
        routes = runs[split]
        flagged = sum(r.task is None for r in routes)
        confusion[task] = {name: 0 for name in [*routed.router.tasks, OUT_OF_DOMAIN]}
        for r in routes:
            confusion[task][r.task or OUT_OF_DOMAIN] += 1
        ood[task] = {
            "merged_probe": merged_probe,
            "base_probe": base_probe,
            "retention": merged_probe / base_probe if base_probe > 0 else float("nan"),
            "flagged_out_of_domain": flagged / len(evaluator.split(task, split)),
        }
    normalized = {t: scores[t] / finetuned[t] for t in scores if finetuned[t] > 0}
    return {
        "scores": scores,
        "normalized": normalized,
        "average": statistics.mean(scores.values()),
        "average_normalized": statistics.mean(normalized.values()),
        "strict": strict,
        "strict_average_normalized": statistics.mean(strict[t] / finetuned[t] for t in strict if finetuned[t] > 0),
        "routing_accuracy": routing,
        "routing_accuracy_average": statistics.mean(routing.values()),
        "routing_confusion": confusion,
        "in_domain_flagged": sum(confusion[t][OUT_OF_DOMAIN] for t in routing)
        / sum(sum(confusion[t].values()) for t in routing),
        "ood": ood,
        "ood_retention": statistics.mean(v["retention"] for v in ood.values()) if ood else None,
    }
