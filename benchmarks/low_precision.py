"""How close a bfloat16 merge is to the exact one: mergeflow (float32 arithmetic, one rounding at the end)
against mergekit (arithmetic in the input dtype), and NeuroMerging with float32 or float64 products.

    make mergekit && .venv/bin/python -m benchmarks.low_precision [--workdir DIR] [--hidden 512 --layers 4]

A generated Llama family in bfloat16 (base + 4 fine-tunes) is merged by each method three ways: mergeflow
with a bfloat16 output, mergekit 0.1.5 with `dtype: bfloat16`, and, as the reference, mergeflow on a float64
copy of the same family (bfloat16 values are exact in float64, so the inputs are identical and every
product is float64). Each bfloat16 output is compared with that reference: the largest and the mean
absolute error, the error relative to the merged task vector's mean magnitude, and the share of entries
that are not the reference correctly rounded to bfloat16 (0 for an exact merge rounded once). TIES uses
`trim_ties: mergekit` on both sides, so the trimmed entries are the same and only the arithmetic differs.
Prints a table and writes JSON (benchmarks/results/low_precision.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from merging.io.checkpoint import Checkpoint
from merging.io.writer import ShardedWriter
from merging.synthetic import task_vector_like

ROOT = Path(__file__).resolve().parents[1]
N_FINETUNES = 4
METHODS = {
    "task_arithmetic": {"lambda": 0.5, "normalize": False},
    "ties": {"lambda": 1.0, "density": 0.2, "normalize": True, "trim_ties": "mergekit"},
    "neuromerging": {"density": 0.2},
}
MERGEKIT_METHODS = ("task_arithmetic", "ties")  # mergekit has no NeuroMerging


def generate(folder: Path, hidden: int, layers: int) -> tuple[Path, list[Path]]:
    """Returns (base, fine-tunes) in bfloat16: a random Llama and fine-tunes made as base + task vector."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = folder / "base"
    fts = [folder / f"finetune_{i}" for i in range(N_FINETUNES)]
    marker = folder / "generated.json"
    shape = {"hidden": hidden, "layers": layers}
    if marker.exists() and json.loads(marker.read_text()) == shape:
        return base, fts
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=hidden * 11 // 4,
        vocab_size=8000,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(base)
    with Checkpoint(base) as ck:
        for i, ft in enumerate(fts):
            ft.mkdir()
            shutil.copy(base / "config.json", ft / "config.json")
            gen = torch.Generator().manual_seed(100 + i)
            writer = ShardedWriter(ft, [(n, info.dtype, info.shape) for n, info in ck.infos.items()])
            for name in ck.infos:
                w = ck.tensor(name)
                writer.write(name, (w.float() + task_vector_like(w.float(), gen, 0.05)).to(torch.bfloat16))
            writer.close()
    marker.write_text(json.dumps(shape))
    return base, fts


def as_float64(source: Path, target: Path) -> Path:
    """Returns a float64 copy of a model folder (exact: every bfloat16 value is a float64 value)."""
    if (target / "model.safetensors").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    config["torch_dtype"] = "float64"
    (target / "config.json").write_text(json.dumps(config))
    with Checkpoint(source) as ck:
        writer = ShardedWriter(target, [(n, torch.float64, info.shape) for n, info in ck.infos.items()])
        for name in ck.infos:
            writer.write(name, ck.tensor(name).double())
        writer.close()
    return target


def merge_config(path: Path, method: str, base: Path, fts: list[Path], params: dict, dtype: str) -> Path:
    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(base)}] + [{"model": str(f), "parameters": {"weight": 1.0}} for f in fts],
        "parameters": params,
        "dtype": dtype,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def compare(candidate: Path, reference: Path, base: Path) -> dict[str, float]:
    """Returns the errors of a bfloat16 merge against the float64 reference, over every merged tensor."""
    worst = total_err = total_tau = 0.0
    count = not_rounded = 0
    with Checkpoint(candidate) as c, Checkpoint(reference) as r, Checkpoint(base) as b:
        for name in r.infos:
            exact = r.tensor(name)
            got = c.tensor(name).double()
            err = (got - exact).abs()
            worst = max(worst, float(err.max()))
            total_err += float(err.sum())
            total_tau += float((exact - b.tensor(name).double()).abs().sum())
            not_rounded += int((got != exact.to(torch.bfloat16).double()).sum())
            count += exact.numel()
    return {
        "max_abs_error": worst,
        "mean_abs_error": total_err / count,
        "error_over_mean_abs_task_vector": total_err / total_tau if total_tau else float("nan"),
        "share_not_correctly_rounded": not_rounded / count,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".work" / "low_precision")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mergekit", type=Path, default=ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "low_precision.json")
    args = parser.parse_args()
    work = args.workdir
    base, fts = generate(work / "bf16", args.hidden, args.layers)
    base64 = as_float64(base, work / "f64" / "base")
    fts64 = [as_float64(f, work / "f64" / f.name) for f in fts]
    mergeflow = [sys.executable, "-m", "flows.cli", "merge"]
    outs = work / "out"
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir()
    for method, params in METHODS.items():
        reference_params = {**params, "compute_dtype": "float64"} if method == "neuromerging" else params
        ref = outs / f"{method}-reference"
        run(
            [
                *mergeflow,
                str(merge_config(outs / f"{ref.name}.yml", method, base64, fts64, reference_params, "float64")),
                str(ref),
                "--no-progress",
            ]
        )
        mf = outs / f"{method}-mergeflow"
        run(
            [
                *mergeflow,
                str(merge_config(outs / f"{mf.name}.yml", method, base, fts, params, "bfloat16")),
                str(mf),
                "--no-progress",
            ]
        )
        if method == "neuromerging":
            mf64 = outs / f"{method}-mergeflow-f64"
            config = merge_config(outs / f"{mf64.name}.yml", method, base, fts, reference_params, "bfloat16")
            run([*mergeflow, str(config), str(mf64), "--no-progress"])
        if method in MERGEKIT_METHODS and args.mergekit.exists():
            mk = outs / f"{method}-mergekit"
            mk_params = {k: v for k, v in params.items() if k != "trim_ties"}
            config = merge_config(outs / f"{mk.name}.yml", method, base, fts, mk_params, "bfloat16")
            run([str(args.mergekit), str(config), str(mk), "--no-copy-tokenizer"])
    rows = []
    for method in METHODS:
        ref = outs / f"{method}-reference"
        candidates = {"mergeflow (float32 arithmetic, bfloat16 out)": outs / f"{method}-mergeflow"}
        if method == "neuromerging":
            candidates["mergeflow (compute_dtype: float64, bfloat16 out)"] = outs / f"{method}-mergeflow-f64"
        if (outs / f"{method}-mergekit").exists():
            candidates["mergekit 0.1.5 (bfloat16 arithmetic)"] = outs / f"{method}-mergekit"
        for label, folder in candidates.items():
            rows.append({"method": method, "case": label, **compare(folder, ref, base64)})
    header = (
        f"{'method':16s} {'case':50s} {'max abs err':>12s} {'mean abs err':>13s} {'err/|τ|':>9s} {'not rounded':>12s}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['method']:16s} {r['case']:50s} {r['max_abs_error']:12.3e} {r['mean_abs_error']:13.3e} "
            f"{r['error_over_mean_abs_task_vector']:9.2e} {100 * r['share_not_correctly_rounded']:11.4f}%"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "model": {"hidden": args.hidden, "layers": args.layers, "finetunes": N_FINETUNES, "dtype": "bfloat16"},
                "methods": METHODS,
                "machine": {"python": platform.python_version(), "torch": torch.__version__},
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
