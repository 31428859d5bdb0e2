"""The benchmark results JSON that README and docs/benchmarks.md quote: a `summary` with exactly the agreed keys,
consistent with its rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import min_merging
from benchmarks.merge_accuracy import aggregate, summarize

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
METHOD_KEYS = {"task_arithmetic", "ties", "neuromerging"}
ACCURACY_KEYS = {
    "base_probe_normalized",
    "finetune_margin_points",
    "min_finetune_margin_points",
    "without_validation",
    "with_validation",
    "refit_with_validation",
    "seed_spread",
    "best_method",
    "best_normalized",
    "refit_best_method",
    "refit_best_normalized",
}
MIN_KEYS = {
    "in_domain_normalized",
    "oracle_normalized",
    "routing_accuracy",
    "ood_retention",
    "ood_flagged",
    "patch_fraction_per_task",
    "best_static_normalized",
}


def test_merge_accuracy_summary_keys_and_values():
    data = json.loads((RESULTS / "merge_accuracy.json").read_text())
    summary = data["summary"]
    assert set(summary) == ACCURACY_KEYS
    for kind in ("without_validation", "with_validation", "refit_with_validation"):
        assert set(summary[kind]) == METHOD_KEYS
        for value in summary[kind].values():
            assert 0 < value < 1.5  # fractions, not percent
    assert summary == summarize(data["seeds"], aggregate(data["seeds"]))  # recomputed from the rows
    assert data["seeds"] and all(run["zoo"]["suite"] == data["suite"] for run in data["seeds"].values())
    own = data["mean"]["with_validation"]
    assert summary["best_normalized"] == pytest.approx(max(r["average_normalized"] for r in own.values()), abs=1e-4)


def test_min_merging_summary_keys():
    data = json.loads((RESULTS / "min_merging.json").read_text())
    summary = data["summary"]
    assert set(summary) == MIN_KEYS
    assert 0 < summary["patch_fraction_per_task"] < 1
    assert 0 <= summary["routing_accuracy"] <= 1


def _row(norm: float, refit: float) -> dict:
    return {
        "average": norm,
        "average_normalized": norm,
        "refit_average_normalized": refit,
        "ood_retention": 1.0,
        "merge_seconds": 1.0,
        "scores": {"a": norm},
        "normalized": {"a": norm},
    }


def test_summary_reads_the_seed_spread_and_best_methods():
    def seed(shift: float) -> dict:
        rows = {k: _row(0.7 + shift + i / 100, 0.9 + shift - i / 100) for i, k in enumerate(sorted(METHOD_KEYS))}
        return {
            "finetuned": {"a": 0.8, "b": 0.9},
            "base_probe": {**_row(0.85, 0.85), "scores": {"a": 0.7, "b": 0.82}},
            "without_validation": rows,
            "with_validation": rows,
            "refit_with_validation": rows,
        }

    seeds = {"0": seed(0.0), "1": seed(0.02)}
    summary = summarize(seeds, aggregate(seeds))
    assert summary["seed_spread"] == pytest.approx(0.02)
    assert summary["finetune_margin_points"] == pytest.approx(9.0)
    assert summary["min_finetune_margin_points"] == pytest.approx(8.0)
    assert summary["best_method"] == "ties"  # sorted: neuromerging 0, task_arithmetic 1, ties 2 → largest own
    assert summary["refit_best_method"] == "neuromerging"


def _min_row(ratio: float, norm: float, oracle: float) -> dict:
    return {
        "options": {"neuron_ratio": ratio},
        "scores": {"a": norm, "b": norm},
        "average_normalized": norm,
        "oracle": {"average_normalized": oracle},
        "routing_accuracy_average": 0.9,
        "ood_retention": 1.0,
        "ood": {"x": {"flagged_out_of_domain": 0.25}},
        "storage": {"patch_bytes": 2 * ratio * 1000, "one_full_model_bytes": 1000},
    }


def test_min_merging_summary_is_the_default_rows_mean_over_seeds_and_the_curve_draws(tmp_path: Path):
    def seed(key: str, shift: float) -> dict:
        rows = {
            min_merging.DEFAULT_ROW: _min_row(0.1, 0.8 + shift, 0.9 + shift),
            "  neuron_ratio 0.2": _min_row(0.2, 0.85 + shift, 0.95 + shift),
        }
        return {"zoo": {"key": key}, "rows": rows}

    data = {"suite": "s", "size": "full", "seeds": {"0": seed("k0", 0.0), "1": seed("k1", 0.02)}}
    summary = min_merging.summary(data)
    assert set(summary) == MIN_KEYS
    assert summary["in_domain_normalized"] == pytest.approx(0.81)
    assert summary["oracle_normalized"] == pytest.approx(0.91)
    assert summary["patch_fraction_per_task"] == pytest.approx(0.1)  # 200 B of patches / 2 tasks / 1000 B
    assert summary["ood_flagged"] == pytest.approx(0.25)
    assert summary["best_static_normalized"] is None  # merge_accuracy.json measured other zoo builds
    seeds = min_merging.per_seed(data)
    assert set(seeds) == {"0", "1"} and seeds["1"]["in_domain_normalized"] == pytest.approx(0.82)
    assert seeds["0"]["zoo_key"] == "k0" and seeds["0"]["best_static_normalized"] is None
    measured = json.loads((RESULTS / "merge_accuracy.json").read_text())["seeds"]["0"]
    data["seeds"]["0"]["zoo"]["key"] = measured["zoo"]["key"]  # a build merge_accuracy.json measured
    best = max(m["average_normalized"] for m in measured["with_validation"].values())
    assert min_merging.per_seed(data)["0"]["best_static_normalized"] == pytest.approx(best)
    assert min_merging.per_seed(data)["1"]["best_static_normalized"] is None
    # one key, other weights (another machine's build): no comparison; the same digest, or none recorded: one
    accuracy = {"seeds": {"0": {**measured, "zoo": {**measured["zoo"], "weights": "w-here"}}}}
    key = measured["zoo"]["key"]
    assert min_merging.best_static([(key, "w-elsewhere")], accuracy) is None
    assert min_merging.best_static([(key, "w-here")], accuracy) == pytest.approx(best)
    assert min_merging.best_static([(key, None)], accuracy) == pytest.approx(best)
    assert min_merging.best_static([(key, "w-here"), ("k1", "w-here")], accuracy) is None
    data["summary"] = summary
    min_merging.plot(data, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
