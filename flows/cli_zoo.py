"""`mergeflow zoo build` and `mergeflow evaluate`: the offline zoo and scoring merged models on it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_zoo_build(args: argparse.Namespace) -> int:
    if args.kind == "causal":
        return _build_causal(args)
    from merging.zoo.build import build_zoo, zoo_summary

    args.head = args.head or "joint"
    args.suite = args.suite or "sentences"

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


def _build_causal(args: argparse.Namespace) -> int:
    from merging.errors import ConfigError
    from merging.zoo.causal import build_causal_zoo

    if args.head or args.suite:
        raise ConfigError("zoo build --kind causal: --head and --suite apply to the encoder zoo only")
    root, manifest, built = build_causal_zoo(args.out, args.size, args.seed, progress=print, force=args.force)
    print(f"\n{'domain':10s} {'role':14s} {'train':>6s} {'base ppl':>9s} {'tuned ppl':>9s} {'NLL drop':>9s}  (test)")
    for d in manifest.domains:
        tuned = f"{d.finetune.perplexity.test:9.2f} {d.finetune.nll_drop.test:9.3f}" if d.finetune else " " * 19
        print(f"{d.name:10s} {d.role:14s} {d.counts['train']:6d} {d.base.test:9.2f} {tuned}")
    state = "built" if built else "already up to date"
    print(
        f"\ncausal zoo ({manifest.size}, seed {manifest.seed}, base de-quantized from SmolLM2-135M-Instruct Q4_1) "
        f"{state}: {root} (build took {manifest.build_seconds:.0f} s)"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from merging.evaluation.harness import Evaluator
    from merging.evaluation.plot import plot_report
    from merging.zoo import zoo_tasks
    from merging.zoo.causal_manifest import is_causal_zoo
    from merging.zoo.manifest import load_manifest

    root = Path(args.zoo).resolve()
    merged = {Path(m).name: Path(m) for m in args.merged}
    if is_causal_zoo(root):
        report = _evaluate_causal(root, merged, args)
    else:
        manifest = load_manifest(args.zoo)
        evaluator = Evaluator(zoo_tasks(root, manifest), root / manifest.base.path, progress=not args.no_progress)
        report = evaluator.evaluate(merged, args.split, cross=args.cross).to_json()
    if any(t["metric"] == "perplexity" for t in report["tasks"]):
        print_causal_evaluation(report)
    else:
        print_evaluation(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"report: {args.json}")
    if args.plot:
        print(f"plot: {plot_report(report, args.plot)}")
    return 0


def _evaluate_causal(root: Path, merged: dict[str, Path], args: argparse.Namespace) -> dict:
    from merging.errors import ConfigError
    from merging.evaluation.lm import LmEvaluator
    from merging.zoo.causal_manifest import causal_zoo_tasks, load_causal_manifest

    if args.cross:
        raise ConfigError("evaluate --cross applies to the encoder zoo; a causal zoo's report scores every domain")
    manifest = load_causal_manifest(root)
    evaluator = LmEvaluator(causal_zoo_tasks(root, manifest), root / manifest.base.path, progress=not args.no_progress)
    return evaluator.evaluate(merged, args.split).to_json()


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


def print_causal_evaluation(report: dict) -> None:
    """Prints one row per model: perplexity per domain, the normalized NLL gain kept, out-of-domain retention."""
    names = [t["name"] for t in report["tasks"]]
    nan = float("nan")
    print(f"{'model':22s} " + " ".join(f"{n[:9]:>9s}" for n in names) + f" {'norm':>6s} {'ood':>6s}")

    def row(label: str, ppl: dict, norm: float, ood: float) -> None:
        print(f"{label[:22]:22s} " + " ".join(f"{ppl.get(n, nan):9.2f}" for n in names) + f" {norm:6.3f} {ood:6.3f}")

    row("base", report["base_probe"]["scores"], 0.0, 1.0)
    row("fine-tuned (own domain)", report["finetuned"], 1.0, nan)
    for name, s in report["models"].items():
        ppl = dict(s["scores"]) | {d: v["merged_probe"] for d, v in s["ood"].items()}
        row(name, ppl, s["average_normalized"], s["ood_retention"])
    print(
        "cells: perplexity (lower is better); norm: mean over fine-tuned domains of the share of the fine-tune's NLL "
        "gain the model keeps; ood: base perplexity / model perplexity on held-out domains"
    )


def add_zoo_parsers(sub: Any) -> None:
    z = sub.add_parser("zoo", help="the offline model zoo (real MiniLM encoder, real labelled tasks)")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zb = zsub.add_parser("build", help="build (or reuse) the zoo: data, linear probes, one fine-tune per task")
    zb.add_argument(
        "--kind",
        default="encoder",
        choices=["encoder", "causal"],
        help="encoder: MiniLM classification tasks; causal: SmolLM2-135M fine-tuned on text domains",
    )
    zb.add_argument(
        "--size", default="ci", choices=["ci", "full"], help="ci: minutes, for tests; full: the benchmark's"
    )
    zb.add_argument(
        "--head",
        default=None,
        choices=["joint", "frozen"],
        help="encoder zoo: train heads with the encoder (joint, the default) or keep the probe",
    )
    zb.add_argument(
        "--suite",
        default=None,
        choices=["sentences", "lexicon"],
        help="encoder zoo: sentences (zoo v2, the default: sentence and pair tasks) or lexicon (zoo v1, single words)",
    )
    zb.add_argument(
        "--out",
        default=None,
        help="zoo folder (default: $MERGEFLOW_CACHE_DIR/zoo/<size>-<head>[-<suite>][-seed<N>], "
        "causal: .../zoo/causal-<size>[-seed<N>])",
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
