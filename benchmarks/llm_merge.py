"""LLM merge benchmark on the causal zoo: what each merge keeps of its fine-tunes' gains, per text domain.

On the causal zoo (`full` by default: SmolLM2-135M, de-quantized from its packaged GGUF file, fully
fine-tuned on Python source, BBC news, Seinfeld dialogue and tweets; 2012 convention speeches held
out) it reports, on test splits:
- the base and each fine-tune on its own domain (perplexity, and the NLL drop the fine-tune made);
- Task Arithmetic, TIES, DARE-TIES, NeuroMerging Lite and Full, "without validation" (the methods'
  published defaults) and "with validation" (λ chosen on the validation splits by the normalized
  score, never on test): per-domain perplexity, the normalized score per domain
  ((NLL_base − NLL_merged) / (NLL_base − NLL_finetune): 1 = the fine-tune's gain kept, 0 = the
  base's), their mean, the held-out domain's perplexity and retention (base / merged), and seconds
  per merge;
- MIN-Merging's routed model (θ_shared = NeuroMerging of the enhanced fine-tunes, per-domain patches
  of the top 10% or 20% rows of every linear layer by activation importance on 64 train texts per
  domain, with or without the LM head's token rows, a router over θ₀'s features): each test text
  routed by its beginning and scored whole with that route, the same normalized score, the oracle
  (each text sent to its own domain), how often the router names the right domain, the held-out
  texts it flags, and patch storage.

    .venv/bin/python benchmarks/llm_merge.py                 # full causal zoo (~35 min on 2 cores, after its build)
    .venv/bin/python benchmarks/llm_merge.py --size ci --quick   # a smoke run
    .venv/bin/python benchmarks/llm_merge.py --markdown      # README's table from the results file
    .venv/bin/python benchmarks/llm_merge.py --only min_merging   # add the MIN-Merging rows to the results file

Writes benchmarks/results/llm_merge.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merging.engine.merge import MergeOptions, run_merge  # noqa: E402
from merging.evaluation.lm import LmEvaluator  # noqa: E402
from merging.evaluation.search import search_validation, with_parameters  # noqa: E402
from merging.zoo.causal import build_causal_zoo  # noqa: E402
from merging.zoo.causal_manifest import causal_zoo_merge_config, causal_zoo_tasks  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "llm_merge.json"

# key, name, method, published defaults ("without validation"), validation grid
METHODS: list[tuple[str, str, str, dict[str, Any], dict[str, list[Any]]]] = [
    ("task_arithmetic", "Task Arithmetic", "task_arithmetic", {"lambda": 0.3}, {"lambda": [0.3, 0.6, 1.0]}),
    ("ties", "TIES", "ties", {"density": 0.2, "lambda": 1.0}, {"lambda": [0.6, 1.0]}),
    ("dare_ties", "DARE-TIES", "dare_ties", {"density": 0.2, "lambda": 1.0}, {"lambda": [0.5, 1.0]}),
    ("neuromerging", "NeuroMerging Lite", "neuromerging", {}, {"lambda": ["auto", 1.0]}),
    (
        "neuromerging_full",
        "NeuroMerging Full",
        "neuromerging",
        {"lambda_parallel": 1.0},
        {"lambda_parallel": [0.5, 1.0]},
    ),
]


def merged_row(evaluator: LmEvaluator, config: Any, out: Path) -> dict[str, Any]:
    """Merges `config` into `out`, scores it on every domain's test split, deletes it; returns the row."""
    started = time.perf_counter()
    run_merge(config, out, MergeOptions(progress=False, overwrite=True))
    seconds = time.perf_counter() - started
    evaluator.forget(out)
    row = evaluator.model_scores(out, "test").to_json()
    row["nll"] = {d: evaluator.score(out, d, "test")["nll"] for d in evaluator.tasks}
    evaluator.forget(out)
    shutil.rmtree(out, ignore_errors=True)
    row["merge_seconds"] = seconds
    row["parameters"] = dict(config.parameters)
    return row


def run(size: str, seed: int, quick: bool, work: Path) -> dict[str, Any]:
    progress = lambda m: print("  " + m, flush=True)  # noqa: E731
    root, manifest, _ = build_causal_zoo(None, size, seed, progress=progress)  # type: ignore[arg-type]
    evaluator = LmEvaluator(causal_zoo_tasks(root, manifest), root / manifest.base.path)
    domains = [d.name for d in manifest.merge_domains()]
    held_out = [d.name for d in manifest.domains if d.role == "out_of_domain"]
    base = {d: evaluator.score(evaluator.base, d, "test") for d in evaluator.tasks}
    finetuned = {d: evaluator.score(evaluator.tasks[d].model, d, "test") for d in domains}  # type: ignore[arg-type]
    result: dict[str, Any] = {
        "zoo": {
            "size": size,
            "seed": seed,
            "key": manifest.key,
            "build_seconds": manifest.build_seconds,
            "base": manifest.base.model_dump(mode="json"),
            "domains": [d.model_dump(mode="json") for d in manifest.domains],
        },
        "in_domain": domains,
        "out_of_domain": held_out,
        "base": {
            "perplexity": {d: v["perplexity"] for d, v in base.items()},
            "nll": {d: v["nll"] for d, v in base.items()},
        },
        "finetuned": {
            "perplexity": {d: v["perplexity"] for d, v in finetuned.items()},
            "nll": {d: v["nll"] for d, v in finetuned.items()},
            "nll_drop": {d: base[d]["nll"] - finetuned[d]["nll"] for d in domains},
        },
        "without_validation": {},
        "with_validation": {},
    }
    for key, name, method, defaults, grid in METHODS:
        config = causal_zoo_merge_config(root, method, defaults, manifest)
        row = merged_row(evaluator, config, work / "m")
        result["without_validation"][key] = row
        print(f"  {name} (no validation, {defaults}): norm {row['average_normalized']:.3f}", flush=True)
        if quick:
            grid = {k: v[:2] for k, v in grid.items()}
        started = time.perf_counter()
        search = search_validation(config, grid, evaluator, work / "search", "average_normalized", keep_best=False)
        search_seconds = time.perf_counter() - started
        chosen = with_parameters(config, search.best)
        if chosen.method_params().model_dump() == config.method_params().model_dump():
            picked = dict(row)  # the defaults won on validation: the same merge, scored once
        else:
            picked = merged_row(evaluator, chosen, work / "m")
        picked["search"] = search.to_json()
        picked["search_seconds"] = search_seconds
        result["with_validation"][key] = picked
        print(f"  {name} (validation chose {search.best}): norm {picked['average_normalized']:.3f}", flush=True)
    result["min_merging"] = min_merging_rows(root, manifest, evaluator, work, quick)
    return result


def add_min_merging(
    size: str, seed: int, quick: bool, work: Path, previous: dict[str, Any], variants: list[str] | None = None
) -> dict[str, Any]:
    """Returns `previous` (the static rows of the same zoo build) with the MIN-Merging rows measured now.

    The zoo must be the same build: its key, and the base's and fine-tunes' test perplexities, equal those
    the static rows were measured against (else run the whole benchmark)."""
    root, manifest, _ = build_causal_zoo(None, size, seed)  # type: ignore[arg-type]
    evaluator = LmEvaluator(causal_zoo_tasks(root, manifest), root / manifest.base.path)
    if previous["zoo"]["key"] != manifest.key:
        raise SystemExit(f"--only min_merging: the results file's zoo ({previous['zoo']['key'][:12]}) is not this one")
    for d, value in previous["base"]["perplexity"].items():
        now = evaluator.score(evaluator.base, d, "test")["perplexity"]
        if abs(now - value) > 1e-6 * value:
            raise SystemExit(f"--only min_merging: the base scores {now} on {d}, the results file {value}: rebuild all")
    for d, value in previous["finetuned"]["perplexity"].items():
        now = evaluator.score(evaluator.tasks[d].model, d, "test")["perplexity"]  # type: ignore[arg-type]
        if abs(now - value) > 1e-6 * value:
            raise SystemExit(f"--only min_merging: {d}'s fine-tune scores {now}, the results file {value}: rebuild all")
    rows = min_merging_rows(root, manifest, evaluator, work, quick, variants)
    return previous | {"min_merging": previous.get("min_merging", {}) | rows}


# key, name, MinMergingOptions overrides: the design measured here, the LM head (tied embeddings) patched too, a
# larger patch. θ_shared is NeuroMerging of the enhanced fine-tunes (what `shared_from: auto` picks for a causal LM),
# pinned because these rows were measured so; θ_shared = θ₀ (the encoders' choice) is not measured here. The rows
# were measured with float32 patches, before patch_dtype auto (float16 for this float32 model): pinned too.
SHARED = {"shared_from": "enhanced", "patch_dtype": "float32"}
MIN_VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("min_merging", "MIN-Merging (ratio 0.1)", {**SHARED, "neuron_ratio": 0.1}),
    (
        "min_merging_lm_head",
        "MIN-Merging (ratio 0.1, LM head patched)",
        {**SHARED, "neuron_ratio": 0.1, "patch_lm_head": True},
    ),
    ("min_merging_r02", "MIN-Merging (ratio 0.2)", {**SHARED, "neuron_ratio": 0.2}),
]
CALIBRATION_TEXTS = 64  # per domain, from its train split (the router holds out 20% for its threshold)


PROMPT_TOKENS = 16


def prompt_routing(evaluator: LmEvaluator, routed: Any, domains: list[str], held: list[str]) -> dict[str, Any]:
    """Returns how the router treats short prompts: each test text's first PROMPT_TOKENS tokens, per domain the
    share routed to its own domain (in-domain) and the share flagged out-of-domain."""
    tok = routed.tokenizer
    out: dict[str, Any] = {"tokens": PROMPT_TOKENS, "domains": {}}
    for domain in domains + held:
        texts = evaluator.texts(domain, "test")
        prompts = [tok.decode(tok(t, add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]) for t in texts]
        routes = routed.routes(prompts)
        out["domains"][domain] = {
            "own": sum(r.task == domain for r in routes) / len(routes),
            "flagged": sum(r.task is None for r in routes) / len(routes),
        }
    out["in_domain_right"] = sum(out["domains"][d]["own"] for d in domains) / len(domains)
    return out


def oracle_normalized(evaluator: LmEvaluator, routed: Any, row: dict[str, Any]) -> dict[str, float]:
    """Returns each domain's normalized score with every test text sent to its own domain's patch. A domain the
    router sent entirely to its own patch scores the same texts with the same route: its routed score is reused."""
    from merging.evaluation.lm import normalized_nll
    from merging.minmerging.generation import routed_perplexity

    out = dict(row["normalized"])
    for domain, share in row["routing_accuracy"].items():
        if share < 1.0:
            texts = evaluator.texts(domain, "test")
            spec = evaluator.tasks[domain]
            mine, _ = routed_perplexity(routed, texts, spec.max_length, [domain] * len(texts), evaluator.batch_size)
            base = evaluator.score(evaluator.base, domain, "test")["nll"]
            tuned = evaluator.score(spec.model, domain, "test")["nll"]  # type: ignore[arg-type]
            out[domain] = normalized_nll(base, tuned, mine["nll"])
    return out


def min_merging_rows(
    root: Path, manifest: Any, evaluator: LmEvaluator, work: Path, quick: bool, variants: list[str] | None = None
) -> dict[str, Any]:
    """Returns, per MIN-Merging variant, the routed model's test scores (routed, and oracle), the router's
    confusion and held-out detection, the patch storage per task, and the build and scoring seconds."""
    from merging.minmerging.build import MinMergingOptions, build_min_merging
    from merging.minmerging.evaluate import routed_report
    from merging.minmerging.routed import RoutedModel

    domains = [d for d in manifest.merge_domains() if d.finetune]
    held = [d.name for d in manifest.domains if d.role == "out_of_domain"]
    finetunes = {d.name: root / d.finetune.path for d in domains}
    calibration = {d.name: evaluator.texts(d.name, "train")[:CALIBRATION_TEXTS] for d in domains}
    ood = [t for name in held for t in evaluator.texts(name, "train")[:CALIBRATION_TEXTS]]
    rows: dict[str, Any] = {}
    chosen = [v for v in MIN_VARIANTS if variants is None or v[0] in variants]
    for key, name, overrides in chosen[:1] if quick else chosen:
        options = MinMergingOptions(max_length=128, batch_size=8, **overrides)
        out = work / key
        started = time.perf_counter()
        report = build_min_merging(root / manifest.base.path, finetunes, calibration, out, options, None, ood)
        build_seconds = time.perf_counter() - started
        routed = RoutedModel.load(out)
        started = time.perf_counter()
        row = routed_report(evaluator, routed, "test")
        score_seconds = time.perf_counter() - started
        oracle = oracle_normalized(evaluator, routed, row)
        prompts = prompt_routing(evaluator, routed, [d.name for d in domains], held)
        storage = report.storage
        row.update(
            oracle_normalized=oracle,
            oracle_average_normalized=sum(oracle.values()) / len(oracle),
            prompt_routing=prompts,
            router={k: v for k, v in report.router.items() if k != "kept_rows"},
            patch_fraction_per_task=storage["patch_bytes"] / len(domains) / storage["one_full_model_bytes"],
            storage=storage,
            options={k: v for k, v in vars(options).items() if k != "router"},
            build_seconds=build_seconds,
            score_seconds=score_seconds,
        )
        rows[key] = row
        print(
            f"  {name}: norm {row['average_normalized']:.3f} (oracle {row['oracle_average_normalized']:.3f}), "
            f"routed right {row['routing_accuracy_average']:.3f} (16-token prompts "
            f"{prompts['in_domain_right']:.3f}), patch {row['patch_fraction_per_task']:.3f} "
            f"of a model per task, built in {build_seconds:.0f} s",
            flush=True,
        )
        del routed
        shutil.rmtree(out, ignore_errors=True)
    return rows


def names() -> dict[str, str]:
    return {key: name for key, name, *_ in METHODS} | {key: name for key, name, _ in MIN_VARIANTS}


def print_table(result: dict[str, Any]) -> None:
    domains, held = result["in_domain"], result["out_of_domain"]
    cols = domains + held
    print(f"\n{'model':34s} " + " ".join(f"{d[:9]:>9s}" for d in cols) + f" {'norm':>6s} {'ood':>6s} {'s/merge':>8s}")

    def line(label: str, ppl: dict[str, float], norm: float, ood: float, seconds: float | None) -> None:
        cells = " ".join(f"{ppl[d]:9.2f}" if d in ppl else f"{'':9s}" for d in cols)
        sec = f"{seconds:8.1f}" if seconds is not None else f"{'':8s}"
        print(f"{label[:34]:34s} {cells} {norm:6.3f} {ood:6.3f} {sec}")

    line("base", result["base"]["perplexity"], 0.0, 1.0, None)
    line("fine-tuned (own domain)", result["finetuned"]["perplexity"], 1.0, float("nan"), None)
    for kind, tag in (("without_validation", "defaults"), ("with_validation", "λ on validation")):
        for key, row in result[kind].items():
            ppl = dict(row["scores"]) | {d: v["merged_probe"] for d, v in row["ood"].items()}
            line(f"{names()[key]} ({tag})", ppl, row["average_normalized"], row["ood_retention"], row["merge_seconds"])
    for key, row in result.get("min_merging", {}).items():
        ppl = dict(row["scores"]) | {d: v["merged_probe"] for d, v in row["ood"].items()}
        line(f"{names()[key]} (routed)", ppl, row["average_normalized"], row["ood_retention"], None)
        print(
            f"{'':34s} oracle norm {row['oracle_average_normalized']:.3f}, routed to its domain "
            f"{row['routing_accuracy_average']:.3f}, held-out flagged "
            + ", ".join(f"{v['flagged_out_of_domain']:.2f}" for v in row["ood"].values())
            + f", patch {row['patch_fraction_per_task']:.3f} of a model per task; "
            f"{row['prompt_routing']['tokens']}-token prompts routed to their domain "
            f"{row['prompt_routing']['in_domain_right']:.3f}"
        )
    print("cells: test perplexity; norm: mean share of each fine-tune's NLL gain kept; ood: held-out retention")


def markdown(result: dict[str, Any]) -> str:
    domains, held = result["in_domain"], result["out_of_domain"]
    head = (
        "| merge | " + " | ".join(domains) + " | mean | " + " | ".join(f"{d} (held out)" for d in held) + " | s/merge |"
    )
    lines = [head, "|" + "---|" * (len(domains) + len(held) + 3)]

    def cells(norm: dict[str, float], ppl: dict[str, float]) -> str:
        return " | ".join(f"{norm[d]:.2f} ({ppl[d]:.1f})" for d in domains)

    base, tuned = result["base"]["perplexity"], result["finetuned"]["perplexity"]
    lines.append(
        "| base | "
        + cells({d: 0.0 for d in domains}, base)
        + " | 0.00 | "
        + " | ".join(f"{base[d]:.1f}" for d in held)
        + " | |"
    )
    lines.append(
        "| each fine-tune, own domain | "
        + cells({d: 1.0 for d in domains}, tuned)
        + " | 1.00 | "
        + " | ".join("" for _ in held)
        + " | |"
    )
    for kind, tag in (("without_validation", "defaults"), ("with_validation", "λ on validation")):
        for key, row in result[kind].items():
            params = row["parameters"]
            shown = ", ".join(f"{k} {v}" for k, v in params.items() if k in ("lambda", "lambda_parallel"))
            ood = " | ".join(f"{row['ood'][d]['merged_probe']:.1f} ({row['ood'][d]['retention']:.3f})" for d in held)
            lines.append(
                f"| {names()[key]}, {tag}{' (' + shown + ')' if shown else ''} | "
                f"{cells(row['normalized'], row['scores'])} | **{row['average_normalized']:.2f}** | {ood} | "
                f"{row['merge_seconds']:.1f} |"
            )
    for key, row in result.get("min_merging", {}).items():
        ood = " | ".join(f"{row['ood'][d]['merged_probe']:.1f} ({row['ood'][d]['retention']:.3f})" for d in held)
        lines.append(
            f"| {names()[key]}, routed (oracle {row['oracle_average_normalized']:.2f}; routed right "
            f"{row['routing_accuracy_average']:.2f}; patches {row['patch_fraction_per_task']:.1%} of a model "
            f"per task) | {cells(row['normalized'], row['scores'])} | **{row['average_normalized']:.2f}** | {ood} | "
            f"{row['build_seconds']:.0f} (build) |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="full", choices=["ci", "full"])
    parser.add_argument("--seed", type=int, default=0, help="the causal zoo's fine-tune seed")
    parser.add_argument("--quick", action="store_true", help="two grid points per parameter (a smoke run)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--markdown", action="store_true", help="print the README table from <out> and stop")
    parser.add_argument(
        "--only",
        choices=["min_merging"],
        help="measure only the MIN-Merging rows and add them to <out> (the same zoo build as its static rows)",
    )
    parser.add_argument(
        "--variants",
        help="comma-separated MIN-Merging variants to measure (default: all): "
        + ", ".join(key for key, *_ in MIN_VARIANTS),
    )
    args = parser.parse_args()
    out = Path(args.out)
    if args.markdown:
        print(markdown(json.loads(out.read_text())))
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mergeflow-llm-merge-") as tmp:
        if args.only:
            variants = args.variants.split(",") if args.variants else None
            unknown = sorted(set(variants or []) - {key for key, *_ in MIN_VARIANTS})
            if unknown:
                parser.error(f"--variants: unknown {unknown}")
            result = add_min_merging(args.size, args.seed, args.quick, Path(tmp), json.loads(out.read_text()), variants)
            result["min_merging_seconds"] = round(time.perf_counter() - started, 1)
        else:
            result = run(args.size, args.seed, args.quick, Path(tmp))
            result["seconds"] = round(time.perf_counter() - started, 1)
    print_table(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out} ({(time.perf_counter() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
