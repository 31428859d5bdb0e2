"""Accuracy benchmark on the offline zoo: what each merge keeps of its fine-tunes, against doing nothing.

For each fine-tune seed of the zoo (v2 `full` by default: the same data and probes, fine-tunes
trained twice) it reports, on test splits:
- the base encoder with linear-probe heads (the reference every merge must beat);
- each fine-tune on its own task, and on every other merge task with that task's head (interference);
- Task Arithmetic, TIES, NeuroMerging Lite (every seed) and DARE-TIES, NeuroMerging Full (the
  first seed), "without validation" (the methods' published defaults) and "with validation" (λ
  chosen on validation splits, never on test), each scored with two head protocols: `own` (each
  task's fine-tuned head) and `refit` (a linear head fitted on the merged encoder's train
  features, as the base's probe);
- "refit with validation": TA, TIES and NeuroMerging with λ chosen on validation under refit heads;
  one sweep per method merges each grid point once and scores it both ways;
- out-of-domain retention and the NeuroMerging ablation (orthogonal part only, parallel part only)
  on the first seed.
Probes in this benchmark (the base's, refit heads, out-of-domain) are fitted on the first 1,000
train texts of each task (the sweeps: 500), C chosen on validation, to keep a run near an hour.
Then the mean over seeds, each method's spread over seeds, and a `summary` object. A difference
smaller than the seed spread is a tie.

    .venv/bin/python benchmarks/merge_accuracy.py                  # full zoo v2, seeds 0 and 1 (~1 h, 2 cores)
    .venv/bin/python benchmarks/merge_accuracy.py --size ci --seeds 0 --quick   # a smoke run
    .venv/bin/python benchmarks/merge_accuracy.py --suite lexicon --seeds 0     # zoo v1's numbers

Writes benchmarks/results/merge_accuracy.json and prints one table per seed and one for the mean.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merging.engine.merge import MergeOptions, run_merge  # noqa: E402
from merging.evaluation.harness import Evaluator  # noqa: E402
from merging.evaluation.search import search_validation, with_parameters  # noqa: E402
from merging.zoo import zoo_merge_config, zoo_tasks  # noqa: E402
from merging.zoo.build import build_zoo  # noqa: E402
from merging.zoo.manifest import weights_digest  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "merge_accuracy.json"

# key, name, method, published defaults ("without validation"), validation grid
METHODS: list[tuple[str, str, str, dict[str, Any], dict[str, list[Any]]]] = [
    (
        "task_arithmetic",
        "Task Arithmetic",
        "task_arithmetic",
        {"lambda": 0.3},
        {"lambda": [0.2, 0.4, 0.6, 1.0]},
    ),
    (
        "ties",
        "TIES",
        "ties",
        {"density": 0.2, "lambda": 1.0, "trim_scope": "model"},
        {"lambda": [0.6, 0.8, 1.0, 1.4]},
    ),
    ("dare_ties", "DARE-TIES", "dare_ties", {"density": 0.2, "lambda": 1.0}, {"lambda": [0.4, 0.7, 1.0]}),
    ("neuromerging", "NeuroMerging Lite", "neuromerging", {}, {"lambda": [0.5, 1.0, 2.0, 3.0]}),
    (
        "neuromerging_full",
        "NeuroMerging Full",
        "neuromerging",
        {"lambda_parallel": 1.0},
        {"lambda_parallel": [0.5, 1.0], "lambda": [1.0, 2.0]},
    ),
]
REFIT_SEARCHED = ["task_arithmetic", "ties", "neuromerging"]
SUMMARY_METHODS = ["task_arithmetic", "ties", "neuromerging"]
ABLATION = [
    ("orthogonal only (λ₁=0, λ₂=σ rule)", {"lambda_parallel": 0.0}),
    ("parallel only (λ₁=1, λ₂=0)", {"lambda_parallel": 1.0, "lambda": 0.0}),
]
DARE_SEEDS = [0]
FIRST_SEED_ONLY = {"dare_ties", "neuromerging_full"}
# probes (the base's, refit heads, out-of-domain) are fitted on the first N train texts of each task
PROBE_TRAIN_LIMIT = 1000
SEARCH_TRAIN_LIMIT = 500
KINDS = ("without_validation", "with_validation", "refit_with_validation")
KIND_LABELS = {  # (the printed table's, docs/benchmarks.md's)
    "without_validation": ("w/o validation", "w/o validation"),
    "with_validation": ("validation", "λ on validation, own heads"),
    "refit_with_validation": ("refit val.", "λ on validation, refit heads"),
}


def merged_row(
    evaluator: Evaluator, config: Any, out: Path, finetuned: dict[str, float], ood: bool = True
) -> dict[str, Any]:
    """Merges `config` into `out`, scores it on test with both head protocols, deletes it; returns the row."""
    started = time.perf_counter()
    run_merge(config, out, MergeOptions(progress=False, overwrite=True))
    seconds = time.perf_counter() - started
    evaluator.forget(out)
    scores = evaluator.model_scores(out, "test", finetuned, out_of_domain=ood).to_json()
    evaluator.forget(out)
    shutil.rmtree(out, ignore_errors=True)
    scores["merge_seconds"] = seconds
    scores["parameters"] = dict(config.parameters)
    return scores


def sweep(
    config: Any, grid: dict[str, list[Any]], searcher: Evaluator, work: Path, refit: bool
) -> list[dict[str, Any]]:
    """Merges every grid point once and scores it on validation (own heads, and refit heads when asked)."""
    heads = ("own", "refit") if refit else ("own",)
    search = search_validation(
        config, grid, searcher, work / "search", "average_normalized", keep_best=False, heads=heads
    )
    wanted = ["average_normalized", "refit_average_normalized"] if refit else ["average_normalized"]
    return [{"params": p.params, **{k: p.scores[k] for k in wanted}, "seconds": p.seconds} for p in search.points]


def best_point(points: list[dict[str, Any]], objective: str) -> dict[str, Any]:
    """Returns the point with the highest `objective` (ties go to the earlier point in grid order)."""
    return max(points, key=lambda p: p[objective])  # max keeps the first of equal values


HEADLINE = ["average", "average_normalized", "refit_average_normalized", "ood_retention", "merge_seconds"]


def spread(rows: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """Returns the mean row of several rows (seeds) plus min/max of the headline numbers."""
    out: dict[str, Any] = {k: statistics.mean(r[k] for r in rows) for k in HEADLINE if k in rows[0]}
    out.update({f"{k}_min": min(r[k] for r in rows) for k in HEADLINE if k in rows[0]})
    out.update({f"{k}_max": max(r[k] for r in rows) for k in HEADLINE if k in rows[0]})
    for part in ("scores", "normalized", "refit", "refit_normalized"):
        if part in rows[0]:
            out[part] = {t: statistics.mean(r[part][t] for r in rows) for t in rows[0][part]}
    out[label] = rows
    return out


def run_seed(
    suite: str,
    size: str,
    head: str,
    seed: int,
    work: Path,
    quick: bool,
    first: bool,
    chosen_by: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Returns every row of one fine-tune seed; the first seed also gets the extra methods, OOD and the ablation."""
    progress = lambda m: print("  " + m, flush=True)  # noqa: E731
    root, manifest, _ = build_zoo(None, size, head, seed, progress=progress, suite=suite)  # type: ignore[arg-type]
    tasks = zoo_tasks(root, manifest)
    evaluator = Evaluator(tasks, root / manifest.base.path, train_limit=PROBE_TRAIN_LIMIT)
    searcher = Evaluator(tasks, root / manifest.base.path, train_limit=SEARCH_TRAIN_LIMIT)
    finetuned = evaluator.finetuned_scores("test")
    result: dict[str, Any] = {
        "zoo": {
            "suite": suite,
            "size": size,
            "head": head,
            "seed": seed,
            "key": manifest.key,
            "weights": weights_digest(root, manifest),  # one key can train other weights elsewhere
            "environment": manifest.environment.model_dump() if manifest.environment else None,
            "build_seconds": manifest.build_seconds,
            "tasks": [t.model_dump(mode="json") for t in manifest.tasks],
        },
        "finetuned": finetuned,
        "base_probe": evaluator.base_scores("test").to_json(),
        "cross": evaluator.cross_scores("test") if first else {},
        **{kind: {} for kind in KINDS},
        "ablation": {},
    }
    base_probe = result["base_probe"]
    base_probe["normalized"] = {t: base_probe["scores"][t] / finetuned[t] for t in finetuned}
    base_probe["average_normalized"] = statistics.mean(base_probe["normalized"].values())
    base_probe["refit_average_normalized"] = base_probe["average_normalized"]
    base_probe["average"] = statistics.mean(base_probe["scores"][t] for t in finetuned)
    for key, name, method, defaults, grid in METHODS:
        if key in FIRST_SEED_ONLY and not first:
            continue
        config = zoo_merge_config(root, method, defaults, manifest)
        if method == "dare_ties":
            rows = [
                merged_row(evaluator, config.model_copy(update={"seed": s}), work / "m", finetuned, first)
                for s in DARE_SEEDS
            ]
            result["without_validation"][key] = spread(rows, "dare_seeds")
        else:
            result["without_validation"][key] = merged_row(evaluator, config, work / "m", finetuned, first)
        if key in result["without_validation"]:
            row = result["without_validation"][key]
            print(
                f"  {name} (no validation): own {row['average_normalized']:.3f} "
                f"refit {row['refit_average_normalized']:.3f}",
                flush=True,
            )
        if quick:
            grid = {k: v[:2] for k, v in grid.items()}
        refit = key in REFIT_SEARCHED
        started = time.perf_counter()
        if chosen_by is None:
            points = sweep(config, grid, searcher, work, refit)
        else:  # λ chosen on validation by an earlier sweep (never on test), reused as is
            points = [
                {"params": chosen_by[kind][key]["search"]["best"], objective: 1.0, "chosen_by": "earlier sweep"}
                for kind, objective in (
                    ("with_validation", "average_normalized"),
                    ("refit_with_validation", "refit_average_normalized"),
                )
                if key in chosen_by[kind]
            ]
        search_seconds = time.perf_counter() - started
        final: dict[str, dict[str, Any]] = {}
        for kind, objective in (
            ("with_validation", "average_normalized"),
            ("refit_with_validation", "refit_average_normalized"),
        ):
            candidates = [p for p in points if objective in p]
            if not candidates:
                continue
            chosen = best_point(candidates, objective)
            tag = json.dumps(chosen["params"], sort_keys=True)
            if tag not in final:  # the same λ chosen by both protocols is merged and scored once
                final[tag] = merged_row(
                    evaluator, with_parameters(config, chosen["params"]), work / "m", finetuned, first
                )
            row = dict(final[tag])
            row["search"] = {
                "best": chosen["params"],
                "objective": objective,
                "points": points if chosen_by is None else chosen_by[kind][key]["search"]["points"],
                "reused_from_first_seed": chosen_by is not None,
            }
            row["search_seconds"] = search_seconds
            result[kind][key] = row
            print(
                f"  {name} ({kind}, {chosen['params']}): own {row['average_normalized']:.3f} "
                f"refit {row['refit_average_normalized']:.3f}",
                flush=True,
            )
    for name, params in ABLATION if first else []:
        config = zoo_merge_config(root, "neuromerging", params, manifest)
        result["ablation"][name] = merged_row(evaluator, config, work / "m", finetuned)
    return result


def aggregate(seeds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Returns the mean over fine-tune seeds of every row, with each row's min/max over seeds."""
    runs = list(seeds.values())
    out: dict[str, Any] = {
        "base_probe": spread([r["base_probe"] for r in runs], "seeds"),
        "finetuned": {t: statistics.mean(r["finetuned"][t] for r in runs) for t in runs[0]["finetuned"]},
    }
    for kind in KINDS:
        keys = [k for k in runs[0][kind]]
        out[kind] = {key: spread([r[kind][key] for r in runs if key in r[kind]], "seeds") for key in keys}
    return out


def summarize(seeds: dict[str, dict[str, Any]], mean: dict[str, Any]) -> dict[str, Any]:
    """Returns the results' `summary` object (fractions, not percent; margins in points)."""
    runs = list(seeds.values())
    margins = [100 * (r["finetuned"][t] - r["base_probe"]["scores"][t]) for r in runs for t in r["finetuned"]]
    per_task = [
        statistics.mean(100 * (r["finetuned"][t] - r["base_probe"]["scores"][t]) for r in runs)
        for t in runs[0]["finetuned"]
    ]
    spreads = [
        row[f"{metric}_max"] - row[f"{metric}_min"]
        for kind in KINDS
        for row in mean[kind].values()
        for metric in ("average_normalized", "refit_average_normalized")
    ]

    def table(kind: str, metric: str) -> dict[str, float]:
        return {k: round(mean[kind][k][metric], 4) for k in SUMMARY_METHODS if k in mean[kind]}

    own = {k: row["average_normalized"] for k, row in mean["with_validation"].items()}
    refit = {k: row["refit_average_normalized"] for k, row in mean["refit_with_validation"].items()}
    return {
        "base_probe_normalized": round(mean["base_probe"]["average_normalized"], 4),
        "finetune_margin_points": round(statistics.mean(margins), 2),
        "min_finetune_margin_points": round(min(per_task), 2),
        "without_validation": table("without_validation", "average_normalized"),
        "with_validation": table("with_validation", "average_normalized"),
        "refit_with_validation": table("refit_with_validation", "refit_average_normalized"),
        "seed_spread": round(max(spreads), 4) if spreads else 0.0,
        "best_method": max(own, key=own.__getitem__),
        "best_normalized": round(max(own.values()), 4),
        "refit_best_method": max(refit, key=refit.__getitem__),
        "refit_best_normalized": round(max(refit.values()), 4),
    }


def fmt(x: float) -> str:
    return f"{100 * x:5.1f}"


NAMES = {key: name for key, name, _, _, _ in METHODS}


def print_table(result: dict[str, Any], title: str) -> None:
    tasks = list(result["finetuned"])
    print(f"\n== {title}; test score (%), norm = merged / fine-tuned with own heads, refit = with refitted heads ==")
    print(f"{'row':46s} " + " ".join(f"{t[:8]:>8s}" for t in tasks) + "   norm  refit    ood  merge s")

    def line(name: str, row: dict[str, Any], extra: str = "") -> None:
        cells = " ".join(f"{fmt(row['scores'][t]):>8s}" for t in tasks)
        ood = row.get("ood_retention")
        ood_s = f"{fmt(ood):>6s}" if isinstance(ood, float) else "      "
        refit = row.get("refit_average_normalized")
        refit_s = f"{fmt(refit):>6s}" if isinstance(refit, float) else "      "
        secs = f"{row['merge_seconds']:8.1f}" if "merge_seconds" in row else ""
        if "average_normalized_min" in row and "seeds" in row:
            extra = f"  [{fmt(row['average_normalized_min'])}..{fmt(row['average_normalized_max'])}]" + extra
        print(f"{name[:46]:46s} {cells} {fmt(row['average_normalized']):>6s} {refit_s} {ood_s}{secs}{extra}")

    line("base encoder + linear probe", result["base_probe"])
    ft = {"scores": result["finetuned"], "average_normalized": 1.0}
    line("fine-tuned (each on its own task)", ft)
    for name, row in result.get("cross", {}).items():
        cross = {"scores": row, "average_normalized": statistics.mean(row[t] / result["finetuned"][t] for t in tasks)}
        line(f"  fine-tune {name} on every task", cross)
    for kind in KINDS:
        for key, row in result[kind].items():
            extra = f"  {row['search']['best']}" if "search" in row else ""
            line(f"{NAMES[key]} ({KIND_LABELS[kind][0]})", row, extra)
    for name, row in result.get("ablation", {}).items():
        line(f"NeuroMerging {name}", row)


def markdown(results: dict[str, Any]) -> str:
    """Returns docs/benchmarks.md's table from a results file: task scores and normalized scores as means over the seeds
    [min–max], OOD retention of the first seed (the only one that measures it), the λ chosen on validation."""
    mean, seeds = results["mean"], results["seeds"]
    first = seeds[min(seeds, key=int)]
    tasks = list(mean["finetuned"])

    def pct(x: Any) -> str:
        return f"{100 * x:.1f}" if isinstance(x, int | float) and x == x else ""

    def span(row: dict[str, Any], key: str) -> str:
        if f"{key}_min" in row and row[f"{key}_min"] != row[f"{key}_max"]:
            return f"{pct(row[key])} [{pct(row[key + '_min'])}–{pct(row[key + '_max'])}]"
        return pct(row.get(key))

    head = "| row | " + " | ".join(tasks) + " | norm (own heads) | norm (refit heads) | OOD | λ |"
    lines = [head, "|---|" + "---:|" * (len(tasks) + 4)]

    def add(name: str, row: dict[str, Any], ood: Any = None, lam: str = "") -> None:
        cells = " | ".join(pct(row["scores"][t]) for t in tasks)
        refit = span(row, "refit_average_normalized") if "refit_average_normalized" in row else ""
        lines.append(f"| {name} | {cells} | {span(row, 'average_normalized')} | {refit} | {pct(ood)} | {lam} |")

    add("base encoder + linear probe", mean["base_probe"])
    add("fine-tuned (each on its own task)", {"scores": mean["finetuned"], "average_normalized": 1.0})
    for kind in KINDS:
        for key, row in mean[kind].items():
            one = first[kind].get(key, {})
            lam = json.dumps(one["search"]["best"], sort_keys=True) if "search" in one else ""
            n = len(row.get("seeds", row.get("dare_seeds", [])) or [0])
            name = f"{NAMES[key]} ({KIND_LABELS[kind][1]})" + ("" if n > 1 else " ¹")
            add(name, row, one.get("ood_retention"), lam)
    for name, row in first.get("ablation", {}).items():
        add(f"ablation: {name} ¹", row, row.get("ood_retention"))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="sentences", choices=["sentences", "lexicon"])
    parser.add_argument("--size", default="full", choices=["ci", "full"])
    parser.add_argument("--head", default="joint", choices=["joint", "frozen"], help="the zoo's head protocol")
    parser.add_argument("--seeds", default="0,1", help="comma-separated fine-tune seeds of the zoo")
    parser.add_argument("--quick", action="store_true", help="two grid points per parameter (a smoke run)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--resume", action="store_true", help="keep the seeds already in <out>.partial.json")
    parser.add_argument(
        "--remeasure",
        type=int,
        default=None,
        metavar="SEED",
        help="measure SEED again (on the zoo build now cached) at the λ its entry in <out> chose on validation, "
        "replacing that entry; the other seeds are kept",
    )
    parser.add_argument(
        "--reuse-lambda",
        action="store_true",
        help="seeds after the first use the λ the first seed chose on validation (no sweep of their own)",
    )
    parser.add_argument("--markdown", action="store_true", help="print docs/benchmarks.md's table from <out> and stop")
    args = parser.parse_args()
    out = Path(args.out)
    if args.markdown:
        print(markdown(json.loads(out.read_text())))
        return 0
    seeds = [int(x) for x in args.seeds.split(",")]
    results: dict[str, Any] = {"suite": args.suite, "size": args.size, "head": args.head, "seeds": {}}
    partial = out.with_suffix(".partial.json")
    if args.resume and partial.is_file():
        results = json.loads(partial.read_text())
        print(f"resuming: seeds {sorted(results['seeds'])} already measured ({partial})", flush=True)
    started = time.perf_counter()
    if args.remeasure is not None:
        results = json.loads(out.read_text())
        earlier = results["seeds"][str(args.remeasure)]
        seeds = sorted(int(s) for s in results["seeds"])
        print(f"measuring seed {args.remeasure} again at the λ its earlier sweep chose", flush=True)
        with tempfile.TemporaryDirectory(prefix="mergeflow-accuracy-") as tmp:
            seed_started = time.perf_counter()
            first_seed = args.remeasure == seeds[0]
            entry = run_seed(
                args.suite, args.size, args.head, args.remeasure, Path(tmp), args.quick, first_seed, earlier
            )
        entry["benchmark_seconds"] = round(time.perf_counter() - seed_started, 1)
        entry["lambda_from_earlier_build"] = earlier["zoo"]["key"]
        results["seeds"][str(args.remeasure)] = entry
        print_table(entry, f"zoo {args.suite}/{args.size}, seed {args.remeasure} (remeasured)")
    with tempfile.TemporaryDirectory(prefix="mergeflow-accuracy-") as tmp:
        for seed in seeds if args.remeasure is None else []:
            if str(seed) in results["seeds"]:
                continue
            print(f"fine-tune seed {seed}", flush=True)
            seed_started = time.perf_counter()
            first = results["seeds"].get(str(seeds[0]))
            results["seeds"][str(seed)] = run_seed(
                args.suite,
                args.size,
                args.head,
                seed,
                Path(tmp) / str(seed),
                args.quick,
                seed == seeds[0],
                first if args.reuse_lambda and seed != seeds[0] else None,
            )
            results["seeds"][str(seed)]["benchmark_seconds"] = round(time.perf_counter() - seed_started, 1)
            print_table(results["seeds"][str(seed)], f"zoo {args.suite}/{args.size}, seed {seed}")
            out.parent.mkdir(parents=True, exist_ok=True)
            results["seconds_before_resume"] = time.perf_counter() - started + results.get("seconds_before_resume", 0.0)
            started = time.perf_counter()
            partial.write_text(json.dumps(results, indent=2))  # a crash keeps the seeds done
    results["mean"] = aggregate(results["seeds"])
    results["summary"] = summarize(results["seeds"], results["mean"])
    print_table(results["mean"], f"zoo {args.suite}/{args.size}, mean of seeds {seeds} [min..max of norm]")
    print("\nsummary: " + json.dumps(results["summary"], indent=2))
    results["seconds"] = sum(run.get("benchmark_seconds", 0.0) for run in results["seeds"].values())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(f"\nwrote {out} ({results['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
