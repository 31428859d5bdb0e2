"""Returns a causal-LM routed model's scores on the perplexity tasks, in the shape of the encoder's routed report.

Each text of a domain is routed by its beginning (as a prompt would be) and scored whole with that
route (`merging.minmerging.generation.routed_perplexity`). In-domain: the routed perplexity, and
the normalized score (NLL_base − NLL_routed) / (NLL_base − NLL_finetune), as for static merges.
There is no task head to pick, so `strict` equals `scores`: a misrouted text is scored on the
experts it was routed to. Held-out domains: retention = perplexity_base / perplexity_routed and the
share flagged out-of-domain (run on θ₀ by default, so retention is 1 where every text is flagged).
The routing confusion matrix counts, per domain, the texts routed to each task or flagged.
lm-evaluation-harness tasks are not scored on a routed model (they load a plain folder).
"""

from __future__ import annotations

import statistics
from typing import Any

from merging.evaluation.lm import LmEvaluator, normalized_nll
from merging.minmerging.generation import routed_perplexity
from merging.minmerging.routed import RoutedModel

OUT_OF_DOMAIN = "out_of_domain"


def routed_lm_report(
    evaluator: LmEvaluator,
    routed: RoutedModel,
    split: str = "test",
    oracle: bool = False,
    out_of_domain: bool = True,
) -> dict[str, Any]:
    """Returns scores (perplexity), normalized scores, routing accuracy, the confusion and held-out retention.
    With `oracle`, each in-domain text goes to its own domain's experts (the router is bypassed)."""
    perplexity_tasks = [n for n, t in evaluator.tasks.items() if t.metric == "perplexity"]
    inside = [n for n in evaluator.in_domain() if n in perplexity_tasks]
    outside = [n for n in evaluator.out_of_domain() if n in perplexity_tasks] if out_of_domain else []
    scores, normalized, nll, routing, ood = {}, {}, {}, {}, {}
    confusion: dict[str, dict[str, int]] = {}
    for name in inside + outside:
        texts = evaluator.texts(name, split)
        spec = evaluator.tasks[name]
        mine, routes = routed_perplexity(
            routed,
            texts,
            spec.max_length,
            [name] * len(texts) if oracle and name in inside else None,
            evaluator.batch_size,
        )
        confusion[name] = {task: 0 for task in [*routed.router.tasks, OUT_OF_DOMAIN]}
        for route in routes:
            confusion[name][route.task or OUT_OF_DOMAIN] += 1
        base = evaluator.score(evaluator.base, name, split)
        nll[name] = mine["nll"]
        if name in inside:
            tuned = evaluator.score(spec.model, name, split)  # type: ignore[arg-type]
            scores[name] = mine["perplexity"]
            normalized[name] = normalized_nll(base["nll"], tuned["nll"], mine["nll"])
            routing[name] = sum(r.task == name for r in routes) / len(routes)
        else:
            ood[name] = {
                "base_probe": base["perplexity"],
                "merged_probe": mine["perplexity"],
                "retention": base["perplexity"] / mine["perplexity"],
                "base_nll": base["nll"],
                "merged_nll": mine["nll"],
                "flagged_out_of_domain": confusion[name][OUT_OF_DOMAIN] / len(routes),
            }
    # as for static merges: NaN when a fine-tune did not improve its own domain
    average_normalized = statistics.mean(normalized.values()) if normalized else float("nan")
    return {
        "scores": scores,
        "normalized": normalized,
        "nll": nll,
        "average": statistics.mean(scores.values()) if scores else float("nan"),
        "average_normalized": average_normalized,
        "strict": dict(scores),
        "strict_average_normalized": average_normalized,
        "routing_accuracy": routing,
        "routing_accuracy_average": statistics.mean(routing.values()) if routing else float("nan"),
        "routing_confusion": confusion,
        "in_domain_flagged": sum(confusion[t][OUT_OF_DOMAIN] for t in inside)
        / max(1, sum(sum(confusion[t].values()) for t in inside)),
        "ood": ood,
        "ood_retention": statistics.mean(v["retention"] for v in ood.values()) if ood else None,
    }
