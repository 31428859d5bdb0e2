"""Why a merged encoder loses a task with the fine-tune's own head: scaling, or the other tasks' vectors?

On zoo v2 `full`, every static merge (and MIN-Merging, even with oracle routing) scores the pair
tasks `headline_match` and `review_same_movie` at their majority class with the fine-tunes' own
heads, while a head refitted on the same merged features keeps ~98%. This benchmark takes one
task's fine-tune and scores its own head on test with encoders that differ from it in one
controlled way:

- the Task Arithmetic merge (λ, mergeflow's own merge of the zoo's fine-tunes);
- the fine-tune plus λ × the *other* tasks' vectors (interference only, no scaling of its own):
  mergeflow's Task Arithmetic (λ 1) with weight 1 for its own fine-tune and λ for the others;
- the base plus λ × its own task vector (scaling only, no interference): the same with its own
  fine-tune alone at weight λ;
- the TA merge with one group of tensors put back to the fine-tune's (pooler, embeddings, 1-D
  tensors, attention, feed-forward, the last layers, the first layers): which part must a
  per-task patch hold for the head to work.

Each row reports accuracy, the share of test inputs given each class, and the mean logit: a merge
that collapses predicts one class for every input because its mean logit moved, not its spread.

    .venv/bin/python benchmarks/head_collapse.py [--size full] [--seed 0] [--tasks headline_match,review_same_movie]

Prints a table per task and writes benchmarks/results/head_collapse.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merging.engine.merge import MergeOptions, run_merge  # noqa: E402
from merging.evaluation.data import load_split  # noqa: E402
from merging.evaluation.encoder import encode, load_encoder  # noqa: E402
from merging.evaluation.heads import load_head  # noqa: E402
from merging.evaluation.metrics import score  # noqa: E402
from merging.zoo import zoo_merge_config, zoo_tasks  # noqa: E402
from merging.zoo.build import build_zoo  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "head_collapse.json"
WEIGHTS = "model.safetensors"
State = dict[str, torch.Tensor]
# Tensor groups put back to the fine-tune's inside the TA merge (names as a BertForSequenceClassification saves them).
GROUPS: dict[str, Callable[[str, torch.Tensor], bool]] = {
    "pooler": lambda name, t: ".pooler." in name,
    "embeddings": lambda name, t: ".embeddings." in name,
    "1-D tensors (biases, LayerNorm)": lambda name, t: t.dim() == 1,
    "attention (all layers)": lambda name, t: ".attention." in name,
    "feed-forward (all layers)": lambda name, t: (
        ".intermediate." in name or (".output." in name and ".attention." not in name)
    ),
    "last two layers": lambda name, t: any(f".layer.{i}." in name for i in (4, 5)),
    "last layer": lambda name, t: ".layer.5." in name,
    "first three layers": lambda name, t: any(f".layer.{i}." in name for i in (0, 1, 2)),
}


def encoder_tensors(state: State) -> list[str]:
    """Returns the names of the encoder's floating tensors (the head is the task's own and never merged)."""
    return [n for n, t in state.items() if t.is_floating_point() and not n.startswith("classifier.")]


def as_finetune(merged: State, own: State) -> State:
    """Returns `own` with each tensor the merge holds replaced by the merged one (the merge saves the base's names)."""
    out = {}
    for name, tensor in own.items():
        key = name if name in merged else name.removeprefix("bert.")
        out[name] = merged[key] if key in merged else tensor
    return out


def merge_state(zoo: Path, manifest: Any, folder: Path, weights: dict[str, float] | None, lam: float) -> State:
    """Returns mergeflow's Task Arithmetic of the zoo (λ `lam`; `weights`: task → weight, only those tasks)."""
    config = zoo_merge_config(zoo, "task_arithmetic", {"lambda": lam}, manifest, weights=weights)
    run_merge(config, folder, MergeOptions(progress=False))
    return load_file(str(folder / WEIGHTS))


def measure(state: State, folder: Path, spec: Any, texts: list[str], labels: torch.Tensor) -> dict[str, Any]:
    """Returns the own head's test score, class shares and logit statistics of `state` saved into `folder`."""
    save_file({n: t.contiguous() for n, t in state.items()}, str(folder / WEIGHTS))
    logits = load_head(Path(spec.model)).logits(encode(load_encoder(folder), texts, spec.max_length, 128))
    pred = logits.argmax(-1)
    return {
        "accuracy": score(spec.metric, pred, labels),
        "class_share": [float((pred == c).float().mean()) for c in range(logits.shape[1])],
        "mean_logit": [float(x) for x in logits.mean(0)],
        "logit_std": [float(x) for x in logits.std(0)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="full", choices=["ci", "full"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default="headline_match,review_same_movie")
    parser.add_argument("--lambda", dest="lam", type=float, default=0.3, help="TA's λ (its published default)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    zoo, manifest, _ = build_zoo(None, args.size, "joint", args.seed, progress=print)
    specs = {t.name: t for t in zoo_tasks(zoo, manifest)}
    names = [n for n, t in specs.items() if t.model is not None]
    finetunes = {n: load_file(str(Path(specs[n].model or "") / WEIGHTS)) for n in names}
    results: dict[str, Any] = {"zoo": {"size": args.size, "seed": args.seed, "key": manifest.key}, "lambda": args.lam}
    with tempfile.TemporaryDirectory(prefix="mergeflow-collapse-") as tmp:
        ta = merge_state(zoo, manifest, Path(tmp) / "ta", None, args.lam)
        for task in args.tasks.split(","):
            if task not in names:
                raise SystemExit(f"--tasks: {task!r} is not a merge task of this zoo ({', '.join(names)})")
            spec, own = specs[task], finetunes[task]
            ta_own = as_finetune(ta, own)
            split = load_split(spec, "test")
            labels = torch.tensor(split.labels)
            folder = Path(tmp) / task
            shutil.copytree(spec.model or "", folder)

            # the fine-tune with the others' vectors added (weights 1 and λ), and its own vector scaled by λ
            with_others = {n: (1.0 if n == task else args.lam) for n in names}
            rows: dict[str, State] = {
                "fine-tune": own,
                f"TA merge (λ {args.lam})": ta_own,
                f"fine-tune + {args.lam} × the other tasks' vectors": as_finetune(
                    merge_state(zoo, manifest, Path(tmp) / f"{task}-others", with_others, 1.0), own
                ),
                f"base + {args.lam} × its own vector": as_finetune(
                    merge_state(zoo, manifest, Path(tmp) / f"{task}-own", {task: args.lam}, 1.0), own
                ),
            }
            for group, picked in GROUPS.items():
                rows[f"TA merge, the fine-tune's {group}"] = {
                    n: own[n] if n in encoder_tensors(own) and picked(n, own[n]) else t for n, t in ta_own.items()
                }
            results[task] = {}
            print(f"\n{task} (test {len(labels)}, fine-tune's own head)")
            print(f"{'encoder':58s} {'score':>6s}  class share      mean logit")
            for name, state in rows.items():
                r = measure(state, folder, spec, split.texts, labels)
                results[task][name] = r
                share = " ".join(f"{x:.2f}" for x in r["class_share"])
                mean = " ".join(f"{x:+.2f}" for x in r["mean_logit"])
                print(f"{name:58s} {r['accuracy']:6.3f}  {share:15s}  {mean}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
