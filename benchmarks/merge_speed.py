"""Merge speed and memory on a ~220M-parameter Llama with 4 fine-tunes, next to mergekit and the I/O floor.

    .venv/bin/python -m benchmarks.merge_speed [--repeats 3] [--mergekit-repeats 3] [--workdir DIR]

Every case runs as its own process; a poller samples its /proc status every 20 ms for peak RSS
(VmHWM) and peak anonymous memory (RssAnon: heap, not the page cache of memory-mapped inputs).
Inputs are read from a warm page cache, and dirty pages are flushed (sync) before each case. mergekit runs from
its own virtual environment (`make mergekit`). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from merging.io.checkpoint import Checkpoint
from merging.io.writer import ShardedWriter
from merging.synthetic import task_vector_like

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=1024, num_hidden_layers=12, intermediate_size=2816, vocab_size=32000)


def generate(workdir: Path, n_finetunes: int, shape: dict[str, int]) -> tuple[Path, list[Path]]:
    """Returns (base, fine-tunes): a random Llama and fine-tunes made by streaming base + task vector."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = workdir / "base"
    fts = [workdir / f"finetune_{i}" for i in range(n_finetunes)]
    marker = workdir / "generated.json"
    if marker.exists() and json.loads(marker.read_text()) == {"shape": shape, "n": n_finetunes}:
        return base, fts
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    torch.manual_seed(0)
    heads = max(1, shape["hidden_size"] // 64)
    cfg = LlamaConfig(**shape, num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(base)
    with Checkpoint(base) as ck:
        for i, ft in enumerate(fts):
            ft.mkdir()
            shutil.copy(base / "config.json", ft / "config.json")
            gen = torch.Generator().manual_seed(100 + i)
            entries = [(n, info.dtype, info.shape) for n, info in ck.infos.items()]
            writer = ShardedWriter(ft, entries)
            for name in ck.infos:
                w = ck.tensor(name)
                writer.write(name, w + task_vector_like(w, gen, 0.05))
            writer.close()
    marker.write_text(json.dumps({"shape": shape, "n": n_finetunes}))
    return base, fts


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Runs `cmd`; returns wall seconds, peak RSS and peak RssAnon (MiB) of the process.

    Dirty pages left by the previous case are flushed first, so no case pays for another's writes.
    """
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    peak_anon = peak_rss = 0
    while proc.poll() is None:
        peak_anon = max(peak_anon, _status_kb(proc.pid, "RssAnon"))
        peak_rss = max(peak_rss, _status_kb(proc.pid, "VmHWM"))
        time.sleep(0.02)
    wall = time.perf_counter() - start
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": wall, "peak_rss_mib": peak_rss / 1024, "peak_anon_mib": peak_anon / 1024}


def write_config(path: Path, method: str, base: Path, fts: list[Path], params: dict, model_params: dict) -> Path:
    cfg = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": dict(model_params)} for f in fts],
        "parameters": params,
        "dtype": "float32",
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def max_abs_diff(a: Path, b: Path) -> float:
    worst = 0.0
    with Checkpoint(a) as x, Checkpoint(b) as y:
        if set(x.infos) != set(y.infos):
            return float("inf")
        for name in x.infos:
            worst = max(worst, float((x.tensor(name).float() - y.tensor(name).float()).abs().max()))
    return worst


def neuron_loop(base: torch.Tensor, deltas: torch.Tensor, lam_par: float, lam_orth: float) -> torch.Tensor:
    """NeuroMerging's neuron rule one neuron at a time, with a torch SVD per neuron (the naive way)."""
    t, m, d = deltas.shape
    base = base.double()
    deltas = deltas.double()
    norm2 = (base * base).sum(-1)
    scalars = torch.where(norm2 > 1e-30, (deltas * base).sum(-1) / norm2.clamp_min(1e-30), 0.0)
    tie = 1.0 if float(scalars.sum()) >= 0 else -1.0
    out = torch.empty(m, d, dtype=torch.float64)
    for k in range(m):
        w0 = base[k]
        s = scalars[:, k]
        sign = torch.sign(s.sum()) if s.sum() != 0 else torch.tensor(tie, dtype=torch.float64)
        agree = torch.sign(s) == sign
        s_bar = s[agree].mean() if agree.any() else torch.tensor(0.0, dtype=torch.float64)
        orth = deltas[:, k] - s[:, None] * w0
        _, sing, vh = torch.linalg.svd(orth, full_matrices=False)
        coords = orth @ vh.T
        energy = sing * sing
        keep = energy > energy.max() * max(t, d) * torch.finfo(torch.float64).eps
        psi = torch.zeros(d, dtype=torch.float64)
        for j in range(sing.numel()):
            if not keep[j]:
                continue
            col = coords[:, j]
            total = col.sum()
            sign_j = torch.sign(total) if total != 0 else torch.sign(col[col.abs().argmax()])
            agree_j = torch.sign(col) == sign_j
            if agree_j.any():
                psi += col[agree_j].mean() * vh[j]
        if norm2[k] > 1e-30:
            psi -= (psi @ w0) / norm2[k] * w0
        out[k] = lam_orth * psi + lam_par * s_bar * w0
    return out.float()


def neuromerging_vs_loop(base: Path, fts: list[Path], layer: str) -> dict[str, float]:
    """Returns times of the vectorised NeuroMerging rule and the per-neuron loop on one layer's weights."""
    from merging.methods.neuromerging import neuron_merge

    vec_s = loop_s = 0.0
    rows = 0
    worst = 0.0
    cks = [Checkpoint(p) for p in [base, *fts]]
    names = [n for n, i in cks[0].infos.items() if n.startswith(layer + ".") and len(i.shape) == 2]
    for name in names:
        w0 = cks[0].tensor(name).float()
        deltas = torch.stack([ck.tensor(name).float() - w0 for ck in cks[1:]])
        t0 = time.perf_counter()
        fast = neuron_merge(w0, deltas.clone(), 0.5, 1.0)
        t1 = time.perf_counter()
        slow = neuron_loop(w0, deltas, 0.5, 1.0)
        t2 = time.perf_counter()
        vec_s += t1 - t0
        loop_s += t2 - t1
        rows += w0.shape[0]
        worst = max(worst, float((fast - slow).abs().max()))
    for ck in cks:
        ck.close()
    return {
        "tensors": len(names),
        "rows": rows,
        "vectorised_s": vec_s,
        "loop_s": loop_s,
        "speedup": loop_s / vec_s,
        "max_abs_diff": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".work" / "llama220m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mergekit-repeats", type=int, default=3)
    parser.add_argument("--finetunes", type=int, default=4)
    parser.add_argument("--small", action="store_true", help="a 4-layer, hidden-256 model for a quick check")
    parser.add_argument("--mergekit", type=Path, default=ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "merge_speed.json")
    args = parser.parse_args()

    shape = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=704, vocab_size=8000) if args.small else SHAPE
    workdir = args.workdir.with_name(args.workdir.name + "-small") if args.small else args.workdir
    t0 = time.perf_counter()
    base, fts = generate(workdir, args.finetunes, shape)
    print(f"model: {shape}, {args.finetunes} fine-tunes, generated/cached in {time.perf_counter() - t0:.0f} s")
    with Checkpoint(base) as ck:
        params = sum(i.numel for i in ck.infos.values())
        largest = max(i.nbytes for i in ck.infos.values())
    outs = workdir / "outputs"
    outs.mkdir(exist_ok=True)
    mergeflow = str(Path(sys.executable).with_name("mergeflow"))
    trim = {"weight": 1.0, "density": 0.2}
    configs = {
        "task_arithmetic": write_config(
            workdir / "ta.yml", "task_arithmetic", base, fts, {"lambda": 0.3}, {"weight": 1.0}
        ),
        "ties": write_config(workdir / "ties.yml", "ties", base, fts, {"lambda": 1.0}, trim),
        "neuromerging": write_config(workdir / "neuro.yml", "neuromerging", base, fts, {"lambda": "auto"}, trim),
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cases: dict[str, tuple[list[str], int]] = {
        "floor TA (minimal streaming)": (
            [
                sys.executable,
                str(ROOT / "benchmarks" / "io_floor.py"),
                str(outs / "floor.safetensors"),
                str(base / "model.safetensors"),
                *[str(f / "model.safetensors") for f in fts],
                "--lambda",
                "0.3",
            ],
            args.repeats,
        ),
    }
    for method, cfg in configs.items():
        cases[f"mergeflow {method}"] = (
            [mergeflow, "merge", str(cfg), str(outs / f"mergeflow_{method}"), "--no-progress", "--overwrite"],
            args.repeats,
        )
    have_mergekit = args.mergekit.exists()
    if have_mergekit:
        # Bit-for-bit parity: mergekit's own order among entries tying at the trim threshold.
        parity = write_config(
            workdir / "ties_parity.yml", "ties", base, fts, {"lambda": 1.0, "trim_ties": "mergekit"}, trim
        )
        cases["mergeflow ties, trim_ties: mergekit"] = (
            [mergeflow, "merge", str(parity), str(outs / "mergeflow_ties_parity"), "--no-progress", "--overwrite"],
            1,
        )
        for method in ["task_arithmetic", "ties"]:
            cases[f"mergekit {method}"] = (
                [str(args.mergekit), str(configs[method]), str(outs / f"mergekit_{method}"), "--no-copy-tokenizer"],
                args.mergekit_repeats,
            )
    else:
        print(f"mergekit not found at {args.mergekit}: run `make mergekit` to include it")

    # Warm the page cache so every case reads from memory, as repeated runs do.
    for f in [base, *fts]:
        (f / "model.safetensors").read_bytes()
    results: dict[str, dict[str, object]] = {}
    for label, (cmd, repeats) in cases.items():
        runs = []
        for _ in range(max(1, repeats)):
            if cmd[0].endswith("mergekit-yaml"):
                shutil.rmtree(cmd[2], ignore_errors=True)
            runs.append(measure(cmd, env))
            print(f"  {label}: {runs[-1]['wall_s']:.2f} s", flush=True)
        results[label] = {
            "runs": runs,
            "median_wall_s": statistics.median(r["wall_s"] for r in runs),
            "median_peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
            "median_peak_anon_mib": statistics.median(r["peak_anon_mib"] for r in runs),
        }
    diffs = {}
    if have_mergekit:
        for method in ["task_arithmetic", "ties"]:
            diffs[method] = max_abs_diff(outs / f"mergeflow_{method}", outs / f"mergekit_{method}")
        diffs["ties, trim_ties: mergekit"] = max_abs_diff(outs / "mergeflow_ties_parity", outs / "mergekit_ties")
    loop = neuromerging_vs_loop(base, fts, "model.layers.0")

    floor = results["floor TA (minimal streaming)"]["median_wall_s"]
    bound_mib = ((args.finetunes + 1) * largest) / 2**20 + 1024
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "model": {**shape, "parameters": params, "finetunes": args.finetunes, "largest_tensor_bytes": largest},
        "cases": results,
        "max_abs_diff_to_mergekit": diffs,
        "neuromerging_vs_per_neuron_loop": loop,
        "memory_bound_mib": bound_mib,
    }
    targets = {
        "TA <= 1.5x floor": results["mergeflow task_arithmetic"]["median_wall_s"] / floor,
        "NeuroMerging >= 10x per-neuron loop": loop["speedup"],
        "peak anon <= (N+1) x largest + 1 GiB (worst method, MiB)": max(
            results[f"mergeflow {m}"]["median_peak_anon_mib"] for m in configs
        ),
    }
    if have_mergekit:
        targets["TIES <= 0.1x mergekit"] = (
            results["mergeflow ties"]["median_wall_s"] / results["mergekit ties"]["median_wall_s"]
        )
    report["targets"] = targets
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"\n{params / 1e6:.0f}M parameters, {args.finetunes} fine-tunes, float32, {os.cpu_count()} CPUs; "
        f"medians of {args.repeats} (mergekit {args.mergekit_repeats})"
    )
    print("| case | wall s (median) | runs | peak RSS MiB | peak anon MiB |\n|---|---:|---|---:|---:|")
    for label, r in results.items():
        runs = ", ".join(f"{x['wall_s']:.1f}" for x in r["runs"])  # type: ignore[union-attr]
        print(
            f"| {label} | {r['median_wall_s']:.2f} | {runs} | {r['median_peak_rss_mib']:.0f} | "
            f"{r['median_peak_anon_mib']:.0f} |"
        )
    for method, d in diffs.items():
        print(f"max |mergeflow - mergekit| {method}: {d:.3g}")
    print(
        f"NeuroMerging on model.layers.0 ({loop['rows']} neurons): vectorised {loop['vectorised_s']:.2f} s, "
        f"per-neuron loop {loop['loop_s']:.2f} s, speedup {loop['speedup']:.0f}x, "
        f"max abs diff {loop['max_abs_diff']:.2g}"
    )
    print(f"memory bound (N+1) x largest tensor + 1 GiB = {bound_mib:.0f} MiB")
    for name, value in targets.items():
        print(f"target {name}: {value:.3g}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
