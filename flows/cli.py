"""The `mergeflow` command line: merge, list methods, run the embedded demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from merging.errors import MergeflowError


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def print_report(report: object) -> None:
    from merging.merge import MergeReport

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
    from merging.merge import MergeOptions, run_merge
    from merging.writer import parse_size

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
    from merging.methods import REGISTRY

    for name, method in sorted(REGISTRY.items()):
        fields = ", ".join(
            f"{f.alias or k}={f.default!r}" for k, f in method.params_model.model_fields.items() if k != "int8_mask"
        )
        print(f"{name:16s} {method.pretty_name:18s} {method.reference_url}\n{'':16s} parameters: {fields}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    workdir = Path(args.workdir).resolve() if args.workdir else None
    print("building a small BERT family (base + 3 fine-tunes with their own heads) and merging it ...")
    results = run_demo(workdir)
    print(f"\n{'method':16s} {'time s':>7s} {'peak anon':>12s}  cos(merged task vector, each fine-tune's)")
    for method, report, cos in results:
        print(
            f"{method:16s} {report.seconds:7.2f} {_mib(report.peak_anon_bytes):>12s}  "
            + "  ".join(f"{c:.3f}" for c in cos)
        )
    out = results[0][1].out_dir.parent
    print(f"\nmerged models (each loads with transformers.AutoModel.from_pretrained): {out}")
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
    d = sub.add_parser("demo", help="build a small model family locally and merge it with every method")
    d.add_argument("--workdir", default=None, help="where to build and merge (default: a temporary folder)")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except MergeflowError as exc:
        print(f"mergeflow: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
