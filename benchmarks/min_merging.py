"""MIN-Merging on the offline zoo: routed accuracy, OOD retention, router accuracy, storage, latency, ablations.

For the `full` zoo (joint heads by default) it builds the routed model for each configuration
(default: norm importance, neuron_ratio 0.5, float16 patches, top-1, out-of-domain inputs to θ₀,
θ_shared = θ₀) and each ablation row (measured against the default before, ratio 0.1 with float32
patches and activation importance, which they pin), and reports on test splits: per-task accuracy
with the task's own head on the routed features, average normalized accuracy, the strict variant
(the routed task's head; a misrouted input is wrong), router accuracy, OOD retention and the share
of OOD inputs flagged, patch storage, and latency per sample at batch 64 (the routed model with its
grouped forward and with row deltas, against θ_shared alone, interleaved in one run). Each row is
also scored with oracle routing (every input to its true task's experts): the ceiling a perfect
router would give, which separates the router's share of the loss from the method's.

    .venv/bin/python benchmarks/min_merging.py [--suite sentences] [--size full] [--seed 0] [--rows N] [--resume]
    .venv/bin/python benchmarks/min_merging.py --plot     # the storage–accuracy curve from the JSON

Each fine-tune seed is its own entry of benchmarks/results/min_merging.json (`seeds`); a run
writes the file after every row, and `--resume` keeps the rows already measured on the same zoo
build: the same key and the same trained weights (`zoo.weights`, a digest each row records as
`zoo_weights`; rows without it were measured on an earlier build of the key, whose fine-tune
scores are kept as `finetuned_earlier_build`, and the router-depth sweep is measured again, the earlier one
kept as `router_layers_earlier_build`); `--remeasure` measures the picked rows again. The
`summary` is the default (first) row's mean over the seeds measured; its
`best_static_normalized` is the best static merge (own heads, λ chosen on validation) of the same
zoo builds in benchmarks/results/merge_accuracy.json (null when that file measured other builds).
The rows `neuron_ratio r` (float32 patches) and `patches in float16` with the default row trace
the storage–accuracy curves (benchmarks/results/min_merging_curve.png): in-domain normalized
accuracy, routed and oracle, against patch storage per task, with the best static merge and the
all-fine-tunes ceiling.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merging.evaluation.harness import Evaluator  # noqa: E402
from merging.minmerging.build import MinMergingOptions, build_min_merging  # noqa: E402
from merging.minmerging.evaluate import routed_report  # noqa: E402
from merging.minmerging.features import pooled_depths  # noqa: E402
from merging.minmerging.models import load_model  # noqa: E402
from merging.minmerging.routed import RoutedModel  # noqa: E402
from merging.minmerging.router import RouterOptions, train_router  # noqa: E402
from merging.zoo import zoo_tasks  # noqa: E402
from merging.zoo.build import build_zoo  # noqa: E402
from merging.zoo.manifest import weights_digest  # noqa: E402

DEFAULT_ROW = (
    "MIN-Merging (norm importance, ratio 0.5, float16 patches, top-1, OOD→θ₀, θ_shared = θ₀, router depth auto)"
)
# the default until norm importance measured better on both seeds (importance auto resolves to norm on encoders)
ACTIVATION_ROW = "  importance: activation, at the default ratio 0.5 and float16 patches"
# Rows measured against the default before (ratio 0.1, float32 patches, activation importance) pin it, so each name
# keeps its meaning.
BEFORE = {"neuron_ratio": 0.1, "patch_dtype": "float32", "importance": "activation"}
BEFORE_ROW = "  neuron_ratio 0.1 (float32 patches: the default before)"
ENHANCED = {**BEFORE, "shared_from": "enhanced"}  # θ_shared = NeuroMerging of the enhanced fine-tunes (before that)
ENHANCED_PREFIX = "  θ_shared: NeuroMerging of the enhanced fine-tunes"
RATIOS = (0.05, 0.2, 0.01, 0.3, 0.5, 0.4)
FLOAT16_PREFIX = "  patches in float16"
FLOAT16_RATIOS = (0.3, 0.8, 0.1)
ROWS: list[tuple[str, dict[str, Any]]] = [
    (DEFAULT_ROW, {}),
    ("  patches + 1-D tensors (biases, LayerNorm)", {**BEFORE, "patch_small_tensors": True}),
    ("  θ_shared: NeuroMerging of the whole fine-tunes", {**BEFORE, "shared_from": "finetuned"}),
    ("  one budget over the whole model", {**BEFORE, "budget": "model"}),
    *((f"  neuron_ratio {r:g}", {**BEFORE, "neuron_ratio": r}) for r in RATIOS),
    ("  importance: norm", {**BEFORE, "importance": "norm"}),
    ("  router on the last layer", {**BEFORE, "router_layer": None}),
    ("  top-2", {**BEFORE, "top_k": 2}),
    (f"{ENHANCED_PREFIX} (the first design)", ENHANCED),
    (
        "  θ_shared: TA (λ 0.3) of the enhanced fine-tunes",
        {**ENHANCED, "shared_method": "task_arithmetic", "shared_parameters": {"lambda": 0.3}},
    ),
    *((f"{ENHANCED_PREFIX}, neuron_ratio {r:g}", {**ENHANCED, "neuron_ratio": r}) for r in RATIOS),
    *(
        (
            f"{FLOAT16_PREFIX}, neuron_ratio {r:g}",
            {"patch_dtype": "float16", "neuron_ratio": r, "importance": "activation"},
        )
        for r in FLOAT16_RATIOS
    ),
    (BEFORE_ROW, BEFORE),
    (ACTIVATION_ROW, {"importance": "activation"}),
]
RESULTS = ROOT / "benchmarks" / "results" / "min_merging.json"


def latency(folder: Path, texts: list[str], repeats: int = 5) -> dict[str, float]:
    """Returns median milliseconds per sample over the same texts, the cases interleaved in each repeat: the routed
    model saved in `folder` with the grouped forward and with row deltas, and its θ_shared alone (loaded clean)."""
    grouped, delta = RoutedModel.load(folder, "grouped"), RoutedModel.load(folder, "delta")
    shared = load_model(folder / json.loads((folder / "routed.json").read_text())["shared"], causal=False)
    batch_size = grouped.batch_size

    def static() -> None:
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                shared(**dict(grouped._batch(texts[s : s + batch_size])))

    cases = {"routed": lambda: grouped.run(texts), "routed_delta": lambda: delta.run(texts), "static_shared": static}
    runs: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up: the grouped weights are built on first use, allocator and thread pools settle
    for _ in range(repeats):
        for name, fn in cases.items():
            started = time.perf_counter()
            fn()
            runs[name].append(1000 * (time.perf_counter() - started) / len(texts))
    return {name: statistics.median(v) for name, v in runs.items()}


@torch.inference_mode()
def layer_features(base_dir: Path, texts: list[str], max_length: int, batch_size: int = 64) -> list[torch.Tensor]:
    """Returns, for every depth k = 0..L, θ₀'s masked mean hidden state after k layers of each text."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    batches = (
        tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        for i in range(0, len(texts), batch_size)
    )
    return pooled_depths(model, batches)


def router_layers(evaluator: Evaluator, calibration: dict[str, list[str]], ood_texts: list[str]) -> list[dict]:
    """Returns, per router depth, the router's held-out accuracy, test routing accuracy, in-domain share kept
    under the OOD threshold and OOD share flagged (test splits), and the share of a forward it costs."""
    tasks = list(calibration)
    calib = [x for t in tasks for x in calibration[t]]
    labels = torch.tensor([i for i, t in enumerate(tasks) for _ in calibration[t]])
    test = [(i, x) for i, t in enumerate(tasks) for x in evaluator.split(t, "test").texts]
    ood_test = [x for t in evaluator.out_of_domain() for x in evaluator.split(t, "test").texts]
    texts = calib + ood_texts + [x for _, x in test] + ood_test
    max_length = max(evaluator.tasks[t].max_length for t in tasks)
    feats = layer_features(evaluator.base, texts, max_length)
    a, b, c = len(calib), len(calib) + len(ood_texts), len(calib) + len(ood_texts) + len(test)
    gold = torch.tensor([i for i, _ in test])
    rows = []
    for k, f in enumerate(feats):
        router = train_router(f[:a], labels, tasks, RouterOptions(), f[a:b])
        experts, _, ood = router.route(f[b:c])
        _, _, ood_flag = router.route(f[c:])
        rows.append(
            {
                "router_layer": k,
                "forward_share": k / (len(feats) - 1),
                "held_out_accuracy": router.metrics["router_accuracy"],
                "test_routing_accuracy": float(((experts[:, 0] == gold) & ~ood).float().mean()),
                "test_top1_accuracy": float((experts[:, 0] == gold).float().mean()),
                "test_in_domain_kept": float((~ood).float().mean()),
                "test_ood_flagged": float(ood_flag.float().mean()) if len(ood_test) else None,
            }
        )
        r = rows[-1]
        print(
            f"router after {k} layers ({100 * r['forward_share']:3.0f}% of a forward): held-out "
            f"{100 * r['held_out_accuracy']:5.1f}  test routed right {100 * r['test_routing_accuracy']:5.1f} "
            f"(top-1 {100 * r['test_top1_accuracy']:5.1f}, in-domain kept {100 * r['test_in_domain_kept']:5.1f}, "
            f"OOD flagged {100 * (r['test_ood_flagged'] or 0):5.1f})",
            flush=True,
        )
    return rows


def best_static(builds: list[tuple[str, str | None]], accuracy: dict[str, Any] | None = None) -> float | None:
    """Returns the best static merge's average normalized score (own heads, with validation), mean over the
    merge_accuracy seeds whose zoo builds are `builds` ((key, weights digest) pairs); None unless every build was
    measured there. A digest on both sides must agree (one key trains other weights on another machine); an entry
    without one (measured before digests were recorded) matches on the key alone. `accuracy` defaults to
    benchmarks/results/merge_accuracy.json."""
    path = ROOT / "benchmarks" / "results" / "merge_accuracy.json"
    data = accuracy if accuracy is not None else json.loads(path.read_text()) if path.is_file() else {}
    found = []
    for key, weights in builds:
        same = [
            run
            for run in data.get("seeds", {}).values()
            if run["zoo"]["key"] == key and (weights is None or run["zoo"].get("weights") in (None, weights))
        ]
        if not same:
            return None
        found.append(same[0])
    if not found:
        return None
    methods = set.intersection(*(set(run["with_validation"]) for run in found))
    return max(statistics.mean(run["with_validation"][m]["average_normalized"] for run in found) for m in methods)


def build_of(run: dict[str, Any]) -> tuple[str, str | None]:
    """Returns the (key, weights digest) of the build a seed's default row was measured on."""
    return run["zoo"]["key"], run["rows"][DEFAULT_ROW].get("zoo_weights")


def patch_fraction(row: dict[str, Any]) -> float:
    storage = row["storage"]
    return storage["patch_bytes"] / len(row["scores"]) / storage["one_full_model_bytes"]


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """Returns the `summary` object: the default row, mean over the seeds measured (fractions, not percent)."""
    rows = [run["rows"][DEFAULT_ROW] for run in results["seeds"].values() if DEFAULT_ROW in run["rows"]]
    if not rows:
        raise SystemExit(f"no seed has the default row {DEFAULT_ROW!r}")

    def mean(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return round(statistics.mean(kept), 4) if kept else None

    flagged = [
        statistics.mean(v["flagged_out_of_domain"] for v in r["ood"].values()) if r["ood"] else None for r in rows
    ]
    builds = [build_of(run) for run in results["seeds"].values() if DEFAULT_ROW in run["rows"]]
    return {
        "in_domain_normalized": mean([r["average_normalized"] for r in rows]),
        "oracle_normalized": mean([r["oracle"]["average_normalized"] for r in rows]),
        "routing_accuracy": mean([r["routing_accuracy_average"] for r in rows]),
        "ood_retention": mean([r["ood_retention"] for r in rows]),
        "ood_flagged": mean(flagged),
        "patch_fraction_per_task": mean([patch_fraction(r) for r in rows]),
        "best_static_normalized": best_static(builds),
    }


def per_seed(results: dict[str, Any]) -> dict[str, Any]:
    """Returns each seed's default row beside the best static merge of the same build (None where
    merge_accuracy.json measured another build of that seed): the comparison the summary's mean cannot make when
    only some seeds' builds were measured there."""
    out = {}
    for seed, run in sorted(results["seeds"].items()):
        row = run["rows"].get(DEFAULT_ROW)
        if row is None:
            continue
        out[seed] = {
            "zoo_key": run["zoo"]["key"],
            "in_domain_normalized": round(row["average_normalized"], 4),
            "oracle_normalized": round(row["oracle"]["average_normalized"], 4),
            "ood_retention": round(row["ood_retention"], 4) if row["ood_retention"] is not None else None,
            "zoo_weights": build_of(run)[1],
            "best_static_normalized": best_static([build_of(run)]),
        }
    return out


def plot(results: dict[str, Any], out: Path) -> None:
    """Writes the storage–accuracy curve: routed and oracle in-domain normalized against patch storage per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[float, dict[str, list[float]]]] = {
        "θ_shared = θ₀, norm importance, float16 (default)": {},
        "θ_shared = θ₀, activation, float16 patches": {},
        "θ_shared = θ₀, activation, float32 patches": {},
        "θ_shared = NeuroMerging, float32": {},
    }
    for run in results["seeds"].values():
        for name, row in run["rows"].items():
            if name == DEFAULT_ROW:
                curve = curves["θ_shared = θ₀, norm importance, float16 (default)"]
            elif name == ACTIVATION_ROW or name.startswith(FLOAT16_PREFIX):
                curve = curves["θ_shared = θ₀, activation, float16 patches"]
            elif name.startswith("  neuron_ratio"):
                curve = curves["θ_shared = θ₀, activation, float32 patches"]
            elif name.startswith(ENHANCED_PREFIX):
                curve = curves["θ_shared = NeuroMerging, float32"]
            else:
                continue
            p = curve.setdefault(row["options"]["neuron_ratio"], {"x": [], "routed": [], "oracle": []})
            p["x"].append(100 * patch_fraction(row))
            p["routed"].append(100 * row["average_normalized"])
            p["oracle"].append(100 * row["oracle"]["average_normalized"])
    if not any(curves.values()):
        raise SystemExit("no neuron-ratio rows to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in curves.items():
        ratios = sorted(points)
        x = [statistics.mean(points[r]["x"]) for r in ratios]
        for key, style in (("routed", "o-"), ("oracle", "s--")):
            y = [statistics.mean(points[r][key]) for r in ratios]
            if not y:
                continue
            ax.plot(x, y, style, label=f"{label}, {key} routing")
            for xi, yi, r in zip(x, y, ratios):
                if key == "routed":
                    ax.annotate(f"{r:g}", (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7)
    static, label = results["summary"].get("best_static_normalized"), "best static merge (λ on validation)"
    if static is None:  # not every seed's build was measured by merge_accuracy.json: the seeds that were
        measured = {k: v["best_static_normalized"] for k, v in per_seed(results).items() if v["best_static_normalized"]}
        if measured:
            static = statistics.mean(measured.values())
            label += f", seed{'s' if len(measured) > 1 else ''} {', '.join(sorted(measured))}"
    if static is not None:
        ax.axhline(100 * static, color="grey", linestyle=":", label=label)
    ax.axhline(100.0, color="black", linewidth=0.8, label="every fine-tune kept (100% storage per task)")
    ax.set_xscale("log")
    ax.set_xlabel("patch storage per task (% of one model; labels: neuron ratio)")
    ax.set_ylabel("in-domain normalized accuracy (%)")
    seeds = ", ".join(sorted(results["seeds"]))
    ax.set_title(f"MIN-Merging storage–accuracy, zoo {results['suite']}/{results['size']}, seeds {seeds}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def measure_row(
    name: str,
    overrides: dict[str, Any],
    ctx: dict[str, Any],
    tmp: Path,
) -> dict[str, Any]:
    """Builds one configuration's routed model and returns its row (routed, oracle, router, storage, latency)."""
    options = MinMergingOptions(**overrides)
    evaluator, finetuned = ctx["evaluator"], ctx["finetuned"]
    started = time.perf_counter()
    report = build_min_merging(
        ctx["base_dir"], ctx["finetunes"], ctx["calibration"], tmp / "m", options, ctx["heads"], ctx["ood_texts"]
    )
    build_seconds = time.perf_counter() - started
    routed = RoutedModel.load(tmp / "m")
    row = routed_report(evaluator, routed, "test", finetuned)
    # The ceiling a perfect router gives: each input goes to its true task's experts.
    oracle = routed_report(evaluator, routed, "test", finetuned, oracle=True, out_of_domain=False)
    row["oracle"] = {k: oracle[k] for k in ("scores", "normalized", "average_normalized", "strict")}
    row["oracle"]["strict_average_normalized"] = oracle["strict_average_normalized"]
    ms = latency(tmp / "m", ctx["sample"])
    row.update(
        {
            "options": {k: v for k, v in options.__dict__.items() if k != "router"},
            "build_seconds": build_seconds,
            "router": report.router,
            "overlap": report.overlap,
            "storage": report.storage,
            "latency_ms_per_sample": {**ms, "batch_size": routed.batch_size},
        }
    )
    print(
        f"{name[:60]:60s} norm {100 * row['average_normalized']:5.1f} "
        f"oracle {100 * row['oracle']['average_normalized']:5.1f} strict "
        f"{100 * row['strict_average_normalized']:5.1f} route {100 * row['routing_accuracy_average']:5.1f} "
        f"ood {100 * (row['ood_retention'] or 0):5.1f} patch/task/model {100 * patch_fraction(row):5.1f}% "
        f"lat {ms['routed']:.2f} (delta {ms['routed_delta']:.2f})/{ms['static_shared']:.2f} ms",
        flush=True,
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="sentences", choices=["sentences", "lexicon"])
    parser.add_argument("--size", default="full", choices=["ci", "full"])
    parser.add_argument("--seed", type=int, default=0, help="the zoo's fine-tune seed")
    parser.add_argument("--head", default="joint", choices=["joint", "frozen"])
    parser.add_argument("--calibration", type=int, default=200, help="calibration texts per task (from train)")
    parser.add_argument("--rows", type=int, default=len(ROWS), help="run only the first N rows")
    parser.add_argument("--pick", default="", help="run only these rows (comma-separated indices into ROWS)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already measured on this zoo build")
    parser.add_argument("--remeasure", action="store_true", help="with --resume: measure the picked rows again")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--router-layers-only", action="store_true", help="only the router-depth sweep (no routed model is built)"
    )
    parser.add_argument(
        "--resummarize", action="store_true", help="only recompute the summary of --out (after merge_accuracy ran)"
    )
    parser.add_argument("--plot", action="store_true", help="only draw the storage–accuracy curve from --out")
    args = parser.parse_args()
    out = Path(args.out)
    if args.resummarize or args.plot:
        data = json.loads(out.read_text())
        data["summary"], data["per_seed"] = summary(data), per_seed(data)
        out.write_text(json.dumps(data, indent=1))
        print("summary: " + json.dumps(data["summary"]))
        if args.plot:
            plot(data, out.with_name("min_merging_curve.png"))
        return 0
    zoo, manifest, _ = build_zoo(None, args.size, args.head, args.seed, progress=print, suite=args.suite)
    evaluator = Evaluator(zoo_tasks(zoo, manifest), zoo / manifest.base.path)
    rng = random.Random(0)
    in_domain = evaluator.in_domain()
    calibration = {t: rng.sample(evaluator.split(t, "train").texts, args.calibration) for t in in_domain}
    ood_texts = [x for t in evaluator.out_of_domain() for x in rng.sample(evaluator.split(t, "train").texts, 100)]
    results: dict[str, Any] = {"suite": args.suite, "size": args.size, "head": args.head, "seeds": {}}
    if out.is_file():
        previous = json.loads(out.read_text())
        if (previous.get("suite"), previous.get("size"), previous.get("head")) == (args.suite, args.size, args.head):
            results["seeds"] = previous.get("seeds", {})  # other seeds' entries are kept
    digest = weights_digest(zoo, manifest)
    zoo_info = {
        "suite": args.suite,
        "size": args.size,
        "head": args.head,
        "seed": args.seed,
        "key": manifest.key,
        "weights": digest,  # one key can train other weights elsewhere (see BuildEnvironment); rows carry theirs
        "environment": manifest.environment.model_dump() if manifest.environment else None,
    }
    entry = results["seeds"].get(str(args.seed), {})
    if not (args.resume and entry.get("zoo", {}).get("key") == manifest.key):
        entry = {}
    entry.setdefault("rows", {})
    finetuned = evaluator.finetuned_scores("test")
    if entry.get("finetuned", finetuned) != finetuned and entry.get("zoo", {}).get("weights") != digest:
        # rows kept from another build of this key: their own fine-tune scores stay beside them
        entry.setdefault("finetuned_earlier_build", entry["finetuned"])
    if "router_layers" in entry and entry.get("zoo", {}).get("weights") != digest:
        entry["router_layers_earlier_build"] = entry.pop("router_layers")  # measured again on this build below
    entry["zoo"] = zoo_info
    entry["finetuned"] = finetuned
    results["seeds"][str(args.seed)] = entry
    if "router_layers" not in entry:
        entry["router_layers"] = router_layers(evaluator, calibration, ood_texts)
    if args.router_layers_only:
        out.write_text(json.dumps(results, indent=1))
        return 0
    ctx = {
        "evaluator": evaluator,
        "finetuned": entry["finetuned"],
        "base_dir": zoo / manifest.base.path,
        "finetunes": {t: Path(evaluator.tasks[t].model or "") for t in in_domain},
        "heads": {t: evaluator.task_head(t) for t in in_domain},
        "calibration": calibration,
        "ood_texts": ood_texts,
        "sample": [x for t in in_domain for x in evaluator.split(t, "test").texts[:40]],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mergeflow-min-") as tmp:
        chosen = [ROWS[int(i)] for i in args.pick.split(",")] if args.pick else ROWS[: args.rows]
        for name, overrides in chosen:
            kept = entry["rows"].get(name, {}).get("zoo_weights") == digest
            if kept and not args.remeasure:
                print(f"{name[:60]:60s} (kept from the previous run)")
                continue
            entry["rows"][name] = {**measure_row(name, overrides, ctx, Path(tmp)), "zoo_weights": digest}
            out.write_text(json.dumps(results, indent=1))  # a stopped run keeps the rows done
    results["summary"], results["per_seed"] = summary(results), per_seed(results)
    print("summary: " + json.dumps(results["summary"]))
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
