"""Accuracy benchmark on the offline zoo: what each merge keeps of its fine-tunes, against doing nothing.

For each head protocol (joint, frozen) it builds (or reuses) the zoo and reports, on test splits:
- the base encoder with linear-probe heads (the reference every merge must beat);
- each fine-tune on its own task, and on every other merge task with that task's head (interference);
- Task Arithmetic, TIES, DARE-TIES, NeuroMerging Lite and Full, each "without validation" (the
  methods' published defaults) and "with validation" (λ chosen on validation splits, never on test);
- the NeuroMerging ablation: orthogonal part only, parallel part only, both;
- DARE over three seeds (mean ± spread).
Columns: per-task accuracy, average, average normalized accuracy (merged / fine-tuned), out-of-domain
retention (probe on the merged encoder / probe on the base, tasks no fine-tune saw), merge seconds.

    .venv/bin/python benchmarks/merge_accuracy.py                 # full zoo, both protocols (~40 min, 2 cores)
    .venv/bin/python benchmarks/merge_accuracy.py --size ci       # a quick run on the ci zoo
    .venv/bin/python benchmarks/merge_accuracy.py --heads joint --only neuromerging
        # reruns one method's rows (and the ablation, for neuromerging) into the existing JSON,
        # after checking that the zoo is the one the other rows were measured on

Writes benchmarks/results/merge_accuracy.json and prints one table per protocol.
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

from merging.evaluation.harness import Evaluator  # noqa: E402
from merging.evaluation.search import search_validation, with_parameters  # noqa: E402
from merging.merge import MergeOptions, run_merge  # noqa: E402
from merging.zoo import zoo_merge_config, zoo_tasks  # noqa: E402
from merging.zoo.build import build_zoo  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "merge_accuracy.json"

# name, method, published defaults ("without validation"), validation grid
METHODS: list[tuple[str, str, dict[str, Any], dict[str, list[Any]]]] = [
    ("Task Arithmetic", "task_arithmetic", {"lambda": 0.3}, {"lambda": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]}),
    (
        "TIES",
        "ties",
        {"density": 0.2, "lambda": 1.0, "trim_scope": "model"},
        {"lambda": [0.4, 0.6, 0.8, 1.0, 1.2, 1.5]},
    ),
    (
        "DARE-TIES",
        "dare_ties",
        {"density": 0.2, "lambda": 1.0},
        {"lambda": [0.2, 0.4, 0.6, 0.8, 1.0]},
    ),
    ("NeuroMerging Lite", "neuromerging", {}, {"lambda": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]}),
    (
        "NeuroMerging Full",
        "neuromerging",
        {"lambda_parallel": 1.0},
        {"lambda_parallel": [0.0, 0.5, 1.0], "lambda": [0.5, 1.0, 1.5, 2.0, 3.0]},
    ),
]
ABLATION = [
    ("orthogonal only (λ₁=0, λ₂=σ rule)", {"lambda_parallel": 0.0}),
    ("parallel only (λ₁=1, λ₂=0)", {"lambda_parallel": 1.0, "lambda": 0.0}),
    ("both (λ₁=1, λ₂=σ rule)", {"lambda_parallel": 1.0}),
]
DARE_SEEDS = [0, 1, 2]


def merged_row(evaluator: Evaluator, config: Any, out: Path, finetuned: dict[str, float]) -> dict[str, Any]:
    """Merges `config` into `out`, scores it on test, deletes it; returns the row."""
    started = time.perf_counter()
    run_merge(config, out, MergeOptions(progress=False, overwrite=True))
    seconds = time.perf_counter() - started
    evaluator.forget(out)
    scores = evaluator.model_scores(out, "test", finetuned).to_json()
    evaluator.forget(out)
    shutil.rmtree(out, ignore_errors=True)
    scores["merge_seconds"] = seconds
    scores["parameters"] = dict(config.parameters)
    return scores


def spread(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Returns the mean row of several seeds plus min/max of the headline numbers."""
    keys = ["average", "average_normalized", "ood_retention", "merge_seconds"]
    out: dict[str, Any] = {k: statistics.mean(r[k] for r in rows) for k in keys}
    out.update({f"{k}_min": min(r[k] for r in rows) for k in keys})
    out.update({f"{k}_max": max(r[k] for r in rows) for k in keys})
    out["scores"] = {t: statistics.mean(r["scores"][t] for r in rows) for t in rows[0]["scores"]}
    out["seeds"] = rows
    return out


def run_protocol(size: str, head: str, work: Path, quick: bool, only: str | None = None) -> dict[str, Any]:
    root, manifest, _ = build_zoo(None, size, head, progress=lambda m: print("  " + m, flush=True))  # type: ignore[arg-type]
    evaluator = Evaluator(zoo_tasks(root, manifest), root / manifest.base.path)
    finetuned = evaluator.finetuned_scores("test")
    result: dict[str, Any] = {
        "zoo": {
            "size": size,
            "head": head,
            "key": manifest.key,
            "build_seconds": manifest.build_seconds,
            "tasks": [t.model_dump(mode="json") for t in manifest.tasks],
        },
        "finetuned": finetuned,
        "base_probe": evaluator.base_scores("test").to_json(),
        "cross": evaluator.cross_scores("test"),
        "without_validation": {},
        "with_validation": {},
        "ablation": {},
    }
    base_probe = result["base_probe"]
    base_probe["normalized"] = {t: base_probe["scores"][t] / finetuned[t] for t in finetuned}
    base_probe["average_normalized"] = statistics.mean(base_probe["normalized"].values())
    base_probe["average"] = statistics.mean(base_probe["scores"][t] for t in finetuned)
    for name, method, defaults, grid in METHODS:
        if only and method != only:
            continue
        config = zoo_merge_config(root, method, defaults, manifest)
        if method == "dare_ties":
            rows = [
                merged_row(evaluator, config.model_copy(update={"seed": s}), work / "m", finetuned) for s in DARE_SEEDS
            ]
            result["without_validation"][name] = spread(rows)
        else:
            result["without_validation"][name] = merged_row(evaluator, config, work / "m", finetuned)
        print(f"  {name} (no validation): {result['without_validation'][name]['average_normalized']:.3f}", flush=True)
        if quick:
            grid = {k: v[:2] for k, v in grid.items()}
        started = time.perf_counter()
        search = search_validation(config, grid, evaluator, work / "search", keep_best=False)
        search_seconds = time.perf_counter() - started
        row = merged_row(evaluator, with_parameters(config, search.best), work / "m", finetuned)
        row["search"] = search.to_json()
        row["search_seconds"] = search_seconds
        result["with_validation"][name] = row
        print(f"  {name} (validation {search.best}): {row['average_normalized']:.3f}", flush=True)
    for name, params in ABLATION if only in (None, "neuromerging") else []:
        config = zoo_merge_config(root, "neuromerging", params, manifest)
        result["ablation"][name] = merged_row(evaluator, config, work / "m", finetuned)
    return result


def merge_rerun(old: dict[str, Any] | None, fresh: dict[str, Any], method: str) -> dict[str, Any]:
    """Returns `old` with `method`'s rows (and the ablation) replaced by those of `fresh`.

    Refuses when the zoo differs (another build key): rows from two zoos must not share a table.
    The base-probe and fine-tune scores of the rerun are kept beside the old ones for comparison.
    """
    if old is None:
        raise SystemExit(f"no earlier {fresh['zoo']['head']} results to update: run without --only first")
    if old["zoo"]["key"] != fresh["zoo"]["key"]:
        raise SystemExit(f"zoo {fresh['zoo']['key']} is not the zoo {old['zoo']['key']} the other rows used")
    names = {name for name, m, _, _ in METHODS if m == method}
    for kind in ("without_validation", "with_validation"):
        for name in names:
            old[kind][name] = fresh[kind][name]
    if fresh["ablation"]:
        old["ablation"] = fresh["ablation"]
    old.setdefault("reruns", []).append(
        {"method": method, "finetuned": fresh["finetuned"], "base_probe": fresh["base_probe"]["scores"]}
    )
    return old


def fmt(x: float) -> str:
    return f"{100 * x:5.1f}"


def print_table(result: dict[str, Any]) -> None:
    tasks = list(result["finetuned"])
    zoo = result["zoo"]
    print(f"\n== zoo {zoo['size']}, {zoo['head']} heads; test accuracy (%), normalized = merged / fine-tuned ==")
    print(f"{'row':44s} " + " ".join(f"{t[:8]:>8s}" for t in tasks) + "    avg   norm    ood  merge s")

    def line(name: str, row: dict[str, Any], extra: str = "") -> None:
        cells = " ".join(f"{fmt(row['scores'][t]):>8s}" for t in tasks)
        ood = row.get("ood_retention")
        ood_s = f"{fmt(ood):>6s}" if isinstance(ood, float) else "      "
        secs = f"{row['merge_seconds']:8.1f}" if "merge_seconds" in row else ""
        avg, norm = fmt(row["average"]), fmt(row["average_normalized"])
        print(f"{name[:44]:44s} {cells} {avg:>6s} {norm:>6s} {ood_s}{secs}{extra}")

    line("base encoder + linear probe", result["base_probe"])
    ft = {
        "scores": result["finetuned"],
        "average": statistics.mean(result["finetuned"].values()),
        "average_normalized": 1.0,
    }
    line("fine-tuned (each on its own task)", ft)
    for name, row in result["cross"].items():
        cross = {"scores": row, "average": statistics.mean(row.values())}
        cross["average_normalized"] = statistics.mean(row[t] / result["finetuned"][t] for t in tasks)
        line(f"  fine-tune {name} on every task", cross)
    for kind in ("without_validation", "with_validation"):
        for name, row in result[kind].items():
            extra = ""
            if "average_normalized_min" in row:
                extra = f"  (3 seeds: norm {fmt(row['average_normalized_min'])}..{fmt(row['average_normalized_max'])})"
            if "search" in row:
                extra = f"  {row['search']['best']}"
            line(f"{name} ({'w/o' if kind.startswith('without') else 'with'} validation)", row, extra)
    for name, row in result["ablation"].items():
        line(f"NeuroMerging {name}", row)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="full", choices=["ci", "full"])
    parser.add_argument("--heads", default="joint,frozen", help="comma-separated head protocols")
    parser.add_argument("--quick", action="store_true", help="two grid points per parameter (a smoke run)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--only", choices=sorted({m for _, m, _, _ in METHODS}), help="rerun one method's rows")
    args = parser.parse_args()
    out = Path(args.out)
    results: dict[str, Any] = {"size": args.size, "protocols": {}}
    if args.only:
        results = json.loads(out.read_text())
        if results.get("size") != args.size:
            parser.error(f"{out} holds the {results.get('size')} zoo, not {args.size}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mergeflow-accuracy-") as tmp:
        for head in args.heads.split(","):
            print(f"protocol: {head} heads", flush=True)
            fresh = run_protocol(args.size, head, Path(tmp) / head, args.quick, args.only)
            if args.only:
                fresh = merge_rerun(results["protocols"].get(head), fresh, args.only)
            results["protocols"][head] = fresh
            print_table(results["protocols"][head])
    elapsed = time.perf_counter() - started
    results["seconds" if not args.only else f"seconds_rerun_{args.only}"] = elapsed
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out} ({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
