"""`mergeflow zoo build` and `mergeflow evaluate`: the offline zoo and scoring merged models on it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from merging.zoo.build import build_zoo, zoo_summary

    root, manifest, built = build_zoo(
        args.out, args.size, args.head, args.seed, progress=print, force=args.force, suite=args.suite
    )
    print(f"\n{'task':22s} {'role':14s} {'classes':>7s} {'train':>6s} {'probe':>6s} {'tuned':>6s} {'margin':>7s}")
    for row in zoo_summary(manifest):
        tuned = "     —      —" if row["role"] != "merge" else f"{row['finetune']:6.3f} {row['margin']:+6.1f}"
        print(f"{row['task']:22s} {row['role']:14s} {row['classes']:7d} {row['train']:6d} {row['probe']:6.3f} {tuned}")
    state = "built" if built else "already up to date"
    print(
        f"\nzoo ({manifest.suite}, {manifest.size}, {manifest.head} heads, seed {manifest.seed}) {state}: {root} "
        f"(build took {manifest.build_seconds:.0f} s)"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from merging.evaluation.harness import Evaluator
    from merging.evaluation.plot import plot_report
    from merging.zoo import zoo_tasks
    from merging.zoo.manifest import load_manifest

    manifest = load_manifest(args.zoo)
    root = Path(args.zoo).resolve()
    evaluator = Evaluator(zoo_tasks(root, manifest), root / manifest.base.path, progress=not args.no_progress)
    merged = {Path(m).name: Path(m) for m in args.merged}
    report = evaluator.evaluate(merged, args.split, cross=args.cross).to_json()
    print_evaluation(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"report: {args.json}")
    if args.plot:
        print(f"plot: {plot_report(report, args.plot)}")
    return 0


def print_evaluation(report: dict) -> None:
    """Prints one row per model: per-task scores, average, normalized average, out-of-domain retention."""
    merge_tasks = [t["name"] for t in report["tasks"] if t["role"] == "merge"]
    header = (
        f"{'model':22s} "
        + " ".join(f"{t[:10]:>10s}" for t in merge_tasks)
        + f" {'avg':>6s} {'norm':>6s} {'refit':>6s} {'ood':>6s}"
    )
    print(header)
    nan = float("nan")

    def row(name: str, scores: dict, avg: float, norm: float, refit: float, ood: float) -> None:
        cells = " ".join(f"{scores.get(t, nan):10.3f}" for t in merge_tasks)
        print(f"{name[:22]:22s} {cells} {avg:6.3f} {norm:6.3f} {refit:6.3f} {ood:6.3f}")

    base = report["base_probe"]
    base_avg = sum(base["scores"][t] for t in merge_tasks) / len(merge_tasks)
    row("base (probe)", base["scores"], base_avg, base["average_normalized"], base["average_normalized"], 1.0)
    row("fine-tuned (own task)", report["finetuned"], report["finetuned_average"], 1.0, nan, nan)
    for name, s in report["models"].items():
        row(
            name,
            s["scores"],
            s["average"],
            s["average_normalized"],
            s.get("refit_average_normalized", nan),
            s["ood_retention"],
        )
    print(
        "norm: merged / fine-tuned with each task's own fine-tuned head; refit: with a linear head refitted on "
        "the model's features (the base's probe is one); ood: probe on the model / probe on the base"
    )


def add_zoo_parsers(sub: Any) -> None:
    z = sub.add_parser("zoo", help="the offline model zoo (real MiniLM encoder, real labelled tasks)")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zb = zsub.add_parser("build", help="build (or reuse) the zoo: data, linear probes, one fine-tune per task")
    zb.add_argument("--size", default="ci", choices=["ci", "full"], help="ci: about a minute; full: the benchmark's")
    zb.add_argument(
        "--head", default="joint", choices=["joint", "frozen"], help="train heads with the encoder or keep the probe"
    )
    zb.add_argument(
        "--suite",
        default="sentences",
        choices=["sentences", "lexicon"],
        help="sentences: zoo v2 (sentence and pair tasks); lexicon: zoo v1 (single words)",
    )
    zb.add_argument(
        "--out", default=None, help="zoo folder (default: $MERGEFLOW_CACHE_DIR/zoo/<size>-<head>[-<suite>][-seed<N>])"
    )
    zb.add_argument("--seed", type=int, default=0, help="fine-tune seed (the data splits are the same for every seed)")
    zb.add_argument("--force", action="store_true", help="rebuild even when an identical build exists")
    zb.set_defaults(func=cmd_zoo_build)
    e = sub.add_parser(
        "evaluate", help="score merged models on a zoo's tasks against the base probe and the fine-tunes"
    )
    e.add_argument("merged", nargs="*", help="merged model folders (each keeps the zoo's heads)")
    e.add_argument("--zoo", required=True, help="zoo folder (with zoo.yaml)")
    e.add_argument("--split", default="test", choices=["validation", "test"])
    e.add_argument("--cross", action="store_true", help="also score every fine-tune on every other task")
    e.add_argument("--json", default=None, help="write the report here")
    e.add_argument("--plot", default=None, help="write the per-task bar chart (PNG) here")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_evaluate)
