"""The `mergeflow` command line: merge, list methods, build the offline zoo, evaluate, run the embedded demo."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from flows.cli_cache import add_cache_parser
from flows.cli_predict import add_predict_parser
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
    print(f"  layers merged {len(result.layers_merged)}, reused from the layer cache {len(result.layers_reused)}")
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
            print(
                f"  routed to the right task {m['routing_accuracy']:.3f}; strict (routed task's head) normalized "
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

    result = run_pipeline(args.config, args.workdir, args.tracking_uri, args.storage, args.runner)
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


def cmd_stack(args: argparse.Namespace) -> int:
    from infra.stack import Stack, StackConfig, StackError

    config = StackConfig.for_folder(
        args.data,
        s3_port=args.s3_port,
        mlflow_port=args.mlflow_port,
        prefect_port=args.prefect_port,
        postgres_url=args.postgres_url,
    )
    stack = Stack(config)
    try:
        if args.stack_command == "up":
            services = stack.up()
            for name, s in services.items():
                print(f"{name:8s} {s.url:28s} pid {s.pid:<8d} log {s.log}")
            backend = "PostgreSQL" if config.postgres_url else "sqlite"
            print(f"\nMLflow and Prefect store their state in {backend}; data folder {config.data}")
            print("\nexport these to use the stack (or: eval $(mergeflow stack env)):")
            print_env(stack.env())
        elif args.stack_command == "env":
            print_env(stack.env())
        elif args.stack_command == "status":
            status = stack.status()
            for name, st in status.items():
                word = "healthy" if st["healthy"] else ("running, not answering" if st["running"] else "stopped")
                print(f"{name:8s} {word:24s} {st['url'] or '':28s} pid {st['pid'] or '-'}")
            return 0 if all(st["healthy"] for st in status.values()) else 1
        else:
            stopped = stack.down()
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing this stack started is running")
    except StackError as exc:
        print(f"mergeflow: stack: {exc}", file=sys.stderr)
        return 2
    return 0


def print_env(env: dict[str, str]) -> None:
    import shlex

    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")


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
    r.set_defaults(func=cmd_run)
    d = sub.add_parser("demo", help="the pipeline on the offline ci zoo, embedded default (no servers)")
    d.add_argument("--workdir", default=None, help="work folder (default: ./mergeflow-demo)")
    d.set_defaults(func=cmd_demo)
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
    st = sub.add_parser("stack", help="the local full stack: SeaweedFS S3, mlflow server, Prefect server")
    st.add_argument("stack_command", choices=["up", "down", "status", "env"])
    st.add_argument("--data", default="mergeflow-stack", help="data folder (state, logs, sqlite, S3 volumes)")
    st.add_argument("--s3-port", type=int, default=None, help="S3 API port (default 8333)")
    st.add_argument("--mlflow-port", type=int, default=None, help="MLflow port (default 5000)")
    st.add_argument("--prefect-port", type=int, default=None, help="Prefect API and UI port (default 4200)")
    st.add_argument(
        "--postgres-url",
        default=None,
        help="PostgreSQL server for MLflow's and Prefect's databases (default $MERGEFLOW_POSTGRES_URL; none: sqlite)",
    )
    st.set_defaults(func=cmd_stack)
    add_cache_parser(sub)
    add_predict_parser(sub)
    return parser


def quiet_defaults() -> None:
    """Turns off what phones home or only warns about the hub (these machines have no network)."""
    import logging
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)


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
