"""The `mergeflow` command line: merge, list methods, build the offline zoo, evaluate, run the embedded demo."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from flows.cli_cache import add_cache_parser
from flows.cli_predict import add_predict_parser
from flows.cli_stack import add_stack_parser
from flows.cli_zoo import add_zoo_parsers
from flows.quiet import quiet_defaults
from merging.errors import MergeflowError
from merging.untrusted import redact_text


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def print_report(report: object) -> None:
    from merging.engine.output import MergeReport

    assert isinstance(report, MergeReport)
    print(f"merged {report.tensors} tensors with {report.method} into {report.out_dir}")
    print(
        f"  time {report.seconds:.2f} s | read {_mib(report.bytes_read)} | wrote {_mib(report.bytes_written)} | "
        f"peak RSS {_mib(report.peak_rss_bytes)} | peak anonymous {_mib(report.peak_anon_bytes)}"
    )
    if report.heads:
        print("  task-specific heads kept: " + ", ".join(f"heads/{k}.safetensors" for k in sorted(report.heads)))


def cmd_merge(args: argparse.Namespace) -> int:
    from merging.config import load_config
    from merging.engine.merge import MergeOptions, run_merge
    from merging.io.writer import parse_size

    config = load_config(args.config)
    options = MergeOptions(
        device=args.device,
        out_shard_size=parse_size(args.out_shard_size),
        seed=args.seed,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print_report(run_merge(config, args.out_dir, options))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from merging.config import ROUTED_METHODS
    from merging.methods import REGISTRY

    def fields(model: type) -> str:
        items = model.model_fields.items()  # type: ignore[attr-defined]
        return ", ".join(
            f"{f.alias or k}={f.get_default(call_default_factory=True)!r}" for k, f in items if k != "int8_mask"
        )

    for name, method in sorted(REGISTRY.items()):
        params = fields(method.params_model)
        print(f"{name:16s} {method.pretty_name:18s} {method.reference_url}\n{'':16s} parameters: {params}")
    for name, params in ROUTED_METHODS.items():
        print(
            f"{name:16s} {'MIN-Merging':18s} https://arxiv.org/abs/2510.17890 (routed; needs a calibration section; "
            f"`mergeflow run` only)\n{'':16s} parameters: {fields(params)}"
        )
    return 0


def print_pipeline(result: object) -> None:
    """Prints a pipeline run: its results table, the published location and the registered version."""
    from flows.merge_pipeline import PipelineResult
    from tasks.evaluate import results_table

    assert isinstance(result, PipelineResult)
    print(f"merged model: {result.merged_dir}")
    print(
        f"  layers merged {len(result.layers_merged)}, reused (already written by an earlier run) "
        f"{len(result.layers_reused)}"
    )
    if result.search:
        search = result.search
        print(f"  chosen on validation: {search['best']} ({search['objective']} {search['best_score']:.4f})")
    if result.report is not None:
        print(
            f"\n{'task':24s} {'role':14s} {'base probe':>10s} {'fine-tuned':>10s} {'merged':>8s} {'normalized':>10s} "
            f"{'refit head':>10s}"
        )
        for r in results_table(result.report):
            cells = [r["base probe"], r["fine-tuned"], r["merged"], r["normalized"], r.get("merged (refit head)")]
            text = [f"{c:.3f}" if isinstance(c, float) else "" for c in cells]
            print(
                f"{r['task'][:24]:24s} {r['role']:14s} {text[0]:>10s} {text[1]:>10s} {text[2]:>8s} {text[3]:>10s} "
                f"{text[4]:>10s}"
            )
    if result.router is not None:
        r = result.router
        ood = f", OOD detection {r['ood_detection_rate']:.3f}" if "ood_detection_rate" in r else ""
        print(
            f"\nrouter: held-out accuracy {r['router_accuracy']:.3f} over {len(r['tasks'])} tasks "
            f"(chance {1 / len(r['tasks']):.3f}), OOD threshold {r['threshold']:.3f}{ood}"
        )
        if "strict_average_normalized" in result.metrics:
            m = result.metrics
            # An encoder's strict score reads the routed task's head; a routed LM has no head to pick (strict = routed).
            lm = (result.report or {}).get("metric") == "perplexity"
            strict = "routed (no head to pick)" if lm else "strict (routed task's head)"
            print(
                f"  routed to the right task {m['routing_accuracy']:.3f}; {strict} normalized "
                f"{m['strict_average_normalized']:.3f}; θ_shared alone {m['shared.average_normalized']:.3f}"
            )
    for warning in result.warnings:
        print(f"\n!!! WARNING: {warning}")
    if result.published:
        print(f"\npublished: {result.published}")
    reg = result.registration
    if reg is not None:
        print(f"registered: {reg.model_name} version {reg.version}, aliases {', '.join(reg.aliases)}")
        print(f"  gate: {reg.gate_reason}")


def print_ui_commands(tracking_uri: str | None) -> None:
    print("\nOpen the UIs on this data:")
    if tracking_uri:
        print(f"  mlflow ui --backend-store-uri {tracking_uri} --port 5000      # then http://127.0.0.1:5000")
    print("  prefect server start                                    # then http://127.0.0.1:4200 (flow runs)")


def cmd_run(args: argparse.Namespace) -> int:
    from flows.merge_pipeline import run_pipeline

    result = run_pipeline(args.config, args.workdir, args.tracking_uri, args.storage, args.runner, args.device)
    print()
    print_pipeline(result)
    print_ui_commands(result.tracking_uri)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    workdir = Path(args.workdir).resolve() if args.workdir else None
    print("building (or reusing) the offline ci zoo, then running the pipeline once per method ...")
    print(
        "What you are looking at: all-MiniLM-L6-v2 fine-tuned separately on three tasks (tweet sentiment, headline\n"
        "match, language of a word), merged into one model four ways. normalized = merged / fine-tuned per task\n"
        "(the base with a linear probe is the do-nothing reference); out-of-domain rows: merged / base probe."
    )
    results, root = run_demo(workdir)
    for method, result in results.items():
        print(f"\n=== {method} ===")
        print_pipeline(result)
    last = list(results.values())[-1]
    print(f"\nwork folder (configs, merged models, results, MLflow store): {root}")
    print_ui_commands(last.tracking_uri)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeflow", description="Merge fine-tuned models into one.")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge the models a YAML config names into OUT_DIR")
    m.add_argument("config", help="merge config (YAML, mergekit's shape)")
    m.add_argument("out_dir", help="output folder (written atomically)")
    m.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    m.add_argument("--out-shard-size", default="5GB", help="max bytes per output shard (e.g. 5GB, 500MB)")
    m.add_argument("--seed", type=int, default=None, help="overrides the config's seed (DARE)")
    m.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    m.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    m.set_defaults(func=cmd_merge)
    sub.add_parser("methods", help="list the merge methods and their parameters").set_defaults(func=cmd_methods)
    r = sub.add_parser("run", help="run the pipeline (download, merge per layer, evaluate, register) on CONFIG")
    r.add_argument("config", help="pipeline config (YAML: the merge plus evaluation, registry, storage sections)")
    r.add_argument("--workdir", default=None, help="work folder (default: the config's pipeline.workdir)")
    r.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides registry.tracking_uri)")
    r.add_argument("--storage", default=None, help="local folder or s3://bucket/prefix (overrides storage.uri)")
    r.add_argument("--runner", default=None, choices=["threads", "sequential", "dask"], help="task runner")
    r.add_argument(
        "--device",
        default=None,
        choices=["cpu", "cuda", "auto"],
        help="where the layer tasks compute (pipeline.device)",
    )
    r.set_defaults(func=cmd_run)
    d = sub.add_parser("demo", help="the pipeline on the offline ci zoo, embedded default (no servers)")
    d.add_argument("--workdir", default=None, help="work folder (default: ./mergeflow-demo)")
    d.set_defaults(func=cmd_demo)
    add_zoo_parsers(sub)
    add_stack_parser(sub)
    add_cache_parser(sub)
    add_predict_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_defaults()
    try:
        return int(args.func(args))
    except MergeflowError as exc:
        print(f"mergeflow: error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Outputs are written under temporary names and published by one last rename or manifest:
        # an interrupted run has published nothing, and its leftovers are removed by the next run.
        print("mergeflow: interrupted; nothing was published", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            print(
                f"mergeflow: error: no space left on the device writing {exc.filename or 'the output'}", file=sys.stderr
            )
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
