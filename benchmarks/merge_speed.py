"""Merge speed and memory on a generated Llama with 4 fine-tunes, next to mergekit and the I/O floor.

    .venv/bin/python -m benchmarks.merge_speed [--size 220m|1b|small] [--repeats 3] [--mergekit-repeats 3]

Sizes: `220m` (hidden 1024, 12 layers, float32; results/merge_speed.json), `1b` (hidden 2048, 22 layers,
intermediate 5632, vocab 32000, untied, bfloat16: 1.26B parameters, 2.5 GB per model; results/merge_speed_1b.json,
which also compares peak memory with the 220M results), `1b-4layers` (the 1B's widths with 4 layers: the same largest
tensor, to show peak memory does not grow with the number of layers), `small` (a quick check).

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
SIZES: dict[str, tuple[dict[str, int], str]] = {
    "220m": (dict(hidden_size=1024, num_hidden_layers=12, intermediate_size=2816, vocab_size=32000), "float32"),
    "1b": (dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, vocab_size=32000), "bfloat16"),
    # The 1B's widths with 4 layers: the same largest tensor, so equal peak memory shows it does not grow with layers.
    "1b-4layers": (dict(hidden_size=2048, num_hidden_layers=4, intermediate_size=5632, vocab_size=32000), "bfloat16"),
    "small": (dict(hidden_size=256, num_hidden_layers=4, intermediate_size=704, vocab_size=8000), "float32"),
}


def generate(workdir: Path, n_finetunes: int, shape: dict[str, int], dtype: str = "float32") -> tuple[Path, list[Path]]:
    """Returns (base, fine-tunes): a random Llama (saved in `dtype`) and fine-tunes made by streaming base + task
    vector."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = workdir / "base"
    fts = [workdir / f"finetune_{i}" for i in range(n_finetunes)]
    marker = workdir / "generated.json"
    record = (
        {"shape": shape, "n": n_finetunes} if dtype == "float32" else {"shape": shape, "n": n_finetunes, "dtype": dtype}
    )
    if marker.exists() and json.loads(marker.read_text()) == record:
        return base, fts
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    torch.manual_seed(0)
    heads = max(1, shape["hidden_size"] // 64)
    cfg = LlamaConfig(**shape, num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(base)
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
    marker.write_text(json.dumps(record))
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


def write_config(
    path: Path, method: str, base: Path, fts: list[Path], params: dict, model_params: dict, dtype: str = "float32"
) -> Path:
    """Writes a config both tools read: mergeflow computes in float32 and writes `dtype`; mergekit computes in it."""
    cfg = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": dict(model_params)} for f in fts],
        "parameters": params,
        "dtype": dtype,
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


def _ties_mean(values: torch.Tensor, tie_sign: float) -> torch.Tensor:
    """Returns the mean of the entries whose sign is that of their sum (tie_sign when the sum is 0); 0 if none."""
    total = values.sum()
    sign = torch.sign(total) if total != 0 else torch.tensor(tie_sign, dtype=values.dtype)
    agree = torch.sign(values) == sign
    return values[agree].mean() if agree.any() else torch.zeros((), dtype=values.dtype)


def neuron_loop(base: torch.Tensor, deltas: torch.Tensor, lam_par: float, lam_orth: float) -> torch.Tensor:
    """NeuroMerging's neuron rule one neuron at a time, with a torch SVD per neuron (the naive way).

    The rule of tests/reference.py: coordinates C = O V, and float32 rounding noise never votes (c = max(T, d) *
    eps32: scalars, orthogonal rows, directions and coordinates at or below it count as zero).
    """
    t, m, d = deltas.shape
    base = base.double()
    deltas = deltas.double()
    c = max(t, d) * torch.finfo(torch.float32).eps
    norm2 = (base * base).sum(-1)
    dots = (deltas * base).sum(-1)  # (T, m)
    tau_energy = (deltas * deltas).sum(-1)  # (T, m)
    live = norm2 > 1e-30
    s_all = torch.where(live, dots / norm2.clamp_min(1e-30), 0.0)
    votes = live & (dots.abs() > c * (tau_energy * norm2).sqrt())
    scalars = torch.where(votes, s_all, 0.0)
    tie = 1.0 if float(scalars.sum()) >= 0 else -1.0
    out = torch.empty(m, d, dtype=torch.float64)
    for k in range(m):
        w0 = base[k]
        s_bar = _ties_mean(scalars[:, k], tie)
        orth = deltas[:, k] - s_all[:, k, None] * w0
        keep = (orth * orth).sum(-1) > c * tau_energy[:, k]
        orth = torch.where(keep[:, None], orth, 0.0)
        _, sing, vh = torch.linalg.svd(orth, full_matrices=False)
        coords = orth @ vh.T
        noise = c * max(float(sing.max()) ** 2, float(tau_energy[:, k].max()))
        psi = torch.zeros(d, dtype=torch.float64)
        for j in range(sing.numel()):
            if float(sing[j]) ** 2 <= noise:
                continue
            col = torch.where(coords[:, j].abs() > c * sing[j], coords[:, j], 0.0)
            tie_j = float(torch.sign(col[col.abs().argmax()])) or 1.0
            psi += _ties_mean(col, tie_j) * vh[j]
        if live[k]:
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


def compare_with_220m(report: dict, ref: dict) -> None:
    """Adds to a 1B report the target that memory must not grow with the model beyond its largest tensor: peak anon at
    most 1.2x the 220M run's plus the growth of the largest tensor, counted in float32 (every method computes in it)."""
    growth = (report["model"]["largest_tensor_f32_bytes"] - ref["model"]["largest_tensor_bytes"]) / 2**20
    methods = [label.removeprefix("mergeflow ") for label in report["cases"] if label.startswith("mergeflow ")]
    methods = [m for m in methods if f"mergeflow {m}" in ref["cases"]]
    for m in methods:
        allowed = 1.2 * ref["cases"][f"mergeflow {m}"]["median_peak_anon_mib"] + max(0.0, growth)
        anon = report["cases"][f"mergeflow {m}"]["median_peak_anon_mib"]
        report["targets"][f"{m} peak anon / (1.2x 220M + largest-tensor growth)"] = anon / allowed
    report["memory_vs_220m"] = {
        "largest_tensor_growth_f32_mib": growth,
        "peak_anon_220m_mib": {m: ref["cases"][f"mergeflow {m}"]["median_peak_anon_mib"] for m in methods},
    }


def recompare(results_dir: Path) -> None:
    """Recomputes the 1B report's comparison with the 220M results as they are now (after a 220M rerun)."""
    path = results_dir / "merge_speed_1b.json"
    report = json.loads(path.read_text())
    report["model"].setdefault("largest_tensor_f32_bytes", report["model"]["largest_tensor_bytes"] * 2)
    compare_with_220m(report, json.loads((results_dir / "merge_speed.json").read_text()))
    path.write_text(json.dumps(report, indent=2) + "\n")
    for name, value in report["targets"].items():
        print(f"target {name}: {value:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="220m")
    parser.add_argument("--workdir", type=Path, default=None, help="default: benchmarks/.work/llama<size>")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mergekit-repeats", type=int, default=3)
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed first runs of every repeated case (mergekit's too)"
    )
    parser.add_argument("--finetunes", type=int, default=4)
    parser.add_argument("--small", action="store_true", help="the same as --size small")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where mergeflow and mergekit compute (--cuda)"
    )
    parser.add_argument("--mergekit", type=Path, default=ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml")
    parser.add_argument("--json", type=Path, default=None, help="default: results/merge_speed[_<size>].json")
    parser.add_argument(
        "--recompare",
        action="store_true",
        help="only recompute results/merge_speed_1b.json's comparison with results/merge_speed.json (after a 220M run)",
    )
    args = parser.parse_args()
    if args.recompare:
        recompare(ROOT / "benchmarks" / "results")
        return

    size = "small" if args.small else args.size
    shape, dtype = SIZES[size]
    workdir = args.workdir or ROOT / "benchmarks" / ".work" / f"llama{size}"
    results_dir = ROOT / "benchmarks" / "results"
    json_path = args.json or results_dir / ("merge_speed.json" if size == "220m" else f"merge_speed_{size}.json")
    t0 = time.perf_counter()
    base, fts = generate(workdir, args.finetunes, shape, dtype)
    print(
        f"model: {shape} in {dtype}, {args.finetunes} fine-tunes, generated/cached in {time.perf_counter() - t0:.0f} s"
    )
    with Checkpoint(base) as ck:
        params = sum(i.numel for i in ck.infos.values())
        largest = max(i.nbytes for i in ck.infos.values())
        largest_f32 = max(i.numel for i in ck.infos.values()) * 4  # every method computes in float32
    outs = workdir / "outputs"
    outs.mkdir(exist_ok=True)
    mergeflow = str(Path(sys.executable).with_name("mergeflow"))
    trim = {"weight": 1.0, "density": 0.2}
    configs = {
        "task_arithmetic": write_config(
            workdir / "ta.yml", "task_arithmetic", base, fts, {"lambda": 0.3}, {"weight": 1.0}, dtype
        ),
        "ties": write_config(workdir / "ties.yml", "ties", base, fts, {"lambda": 1.0}, trim, dtype),
        "neuromerging": write_config(workdir / "neuro.yml", "neuromerging", base, fts, {"lambda": "auto"}, trim, dtype),
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
    flags = ["--no-progress", "--overwrite", "--device", args.device]
    for method, cfg in configs.items():
        cases[f"mergeflow {method}"] = (
            [mergeflow, "merge", str(cfg), str(outs / f"mergeflow_{method}"), *flags],
            args.repeats,
        )
    have_mergekit = args.mergekit.exists()
    if have_mergekit and dtype == "float32":
        # Bit-for-bit parity: mergekit's own order among entries tying at the trim threshold. (In a low dtype
        # mergekit computes in that dtype and mergeflow in float32: no parity to check; see low_precision.py.)
        parity = write_config(
            workdir / "ties_parity.yml", "ties", base, fts, {"lambda": 1.0, "trim_ties": "mergekit"}, trim, dtype
        )
        cases["mergeflow ties, trim_ties: mergekit"] = (
            [mergeflow, "merge", str(parity), str(outs / "mergeflow_ties_parity"), *flags],
            1,
        )
    if have_mergekit:
        for method in ["task_arithmetic", "ties"]:
            cases[f"mergekit {method}"] = (
                [str(args.mergekit), str(configs[method]), str(outs / f"mergekit_{method}"), "--no-copy-tokenizer"]
                + (["--cuda"] if args.device == "cuda" else []),
                args.mergekit_repeats,
            )
    if not have_mergekit:
        print(f"mergekit not found at {args.mergekit}: run `make mergekit` to include it")

    # Warm the page cache so every case reads from memory, as repeated runs do.
    for f in [base, *fts]:
        (f / "model.safetensors").read_bytes()
    results: dict[str, dict[str, object]] = {}
    for label, (cmd, repeats) in cases.items():
        runs, warmups = [], []
        # Untimed first runs of repeated cases: they pay once for what a scheduled re-merge finds done (numba's
        # compiled-kernel cache after a kernel edit, mergeflow's hash cache of new inputs, the first write of the
        # output file). Their times are kept in the JSON as `warmup_runs`.
        for i in range(max(1, repeats) + (args.warmup if repeats > 1 else 0)):
            if cmd[0].endswith("mergekit-yaml"):
                shutil.rmtree(cmd[2], ignore_errors=True)
            run = measure(cmd, env)
            warm = repeats > 1 and i < args.warmup
            (warmups if warm else runs).append(run)
            print(f"  {label}: {run['wall_s']:.2f} s{' (warm-up, not counted)' if warm else ''}", flush=True)
        results[label] = {
            "warmup_runs": warmups,
            "runs": runs,
            "median_wall_s": statistics.median(r["wall_s"] for r in runs),
            "median_peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
            "median_peak_anon_mib": statistics.median(r["peak_anon_mib"] for r in runs),
        }
    diffs = {}
    if have_mergekit:
        for method in ["task_arithmetic", "ties"]:
            diffs[method] = max_abs_diff(outs / f"mergeflow_{method}", outs / f"mergekit_{method}")
        if "mergeflow ties, trim_ties: mergekit" in results:
            diffs["ties, trim_ties: mergekit"] = max_abs_diff(outs / "mergeflow_ties_parity", outs / "mergekit_ties")
    # The per-neuron loop is timed at 220M (minutes per layer at 1B, and the ratio does not change with size).
    loop = neuromerging_vs_loop(base, fts, "model.layers.0") if not size.startswith("1b") else None

    floor = results["floor TA (minimal streaming)"]["median_wall_s"]
    bound_mib = ((args.finetunes + 1) * largest) / 2**20 + 1024
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        },
        "model": {
            **shape,
            "dtype": dtype,
            "parameters": params,
            "finetunes": args.finetunes,
            "largest_tensor_bytes": largest,
        },
        "cases": results,
        "max_abs_diff_to_mergekit": diffs,
        "neuromerging_vs_per_neuron_loop": loop,
        "memory_bound_mib": bound_mib,
    }
    wall = {m: float(results[f"mergeflow {m}"]["median_wall_s"]) for m in configs}  # type: ignore[arg-type]
    anon = {m: float(results[f"mergeflow {m}"]["median_peak_anon_mib"]) for m in configs}  # type: ignore[arg-type]
    targets: dict[str, float] = {
        "TA <= 1.5x floor": wall["task_arithmetic"] / float(floor),  # type: ignore[arg-type]
        "NeuroMerging <= 3x TA": wall["neuromerging"] / wall["task_arithmetic"],
        "peak anon <= (N+1) x largest + 1 GiB (worst method, MiB)": max(anon.values()),
    }
    if loop is not None:
        targets["NeuroMerging >= 10x per-neuron loop"] = loop["speedup"]
    if have_mergekit:
        targets["TA <= 0.5x mergekit"] = wall["task_arithmetic"] / float(
            results["mergekit task_arithmetic"]["median_wall_s"]  # type: ignore[arg-type]
        )
        targets["TIES <= 0.1x mergekit"] = wall["ties"] / float(
            results["mergekit ties"]["median_wall_s"]  # type: ignore[arg-type]
        )
    report["model"]["largest_tensor_f32_bytes"] = largest_f32  # type: ignore[index]
    report["targets"] = targets
    small = results_dir / "merge_speed.json"
    if size == "1b" and small.exists() and args.device == "cpu":
        compare_with_220m(report, json.loads(small.read_text()))
    deep = results_dir / "merge_speed_1b.json"
    if size == "1b-4layers" and deep.exists() and args.device == "cpu":
        # Same largest tensor, 22 layers against 4: a ratio near 1 means memory does not grow with the layers.
        ref = json.loads(deep.read_text())
        for m in configs:
            targets[f"{m} peak anon, 22 layers / 4 layers"] = (
                ref["cases"][f"mergeflow {m}"]["median_peak_anon_mib"] / anon[m]
            )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"\n{params / 1e6:.0f}M parameters, {args.finetunes} fine-tunes, {dtype}, {os.cpu_count()} CPUs, "
        f"computed on {args.device}; "
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
    if loop is not None:
        print(
            f"NeuroMerging on model.layers.0 ({loop['rows']} neurons): vectorised {loop['vectorised_s']:.2f} s, "
            f"per-neuron loop {loop['loop_s']:.2f} s, speedup {loop['speedup']:.0f}x, "
            f"max abs diff {loop['max_abs_diff']:.2g}"
        )
    print(f"memory bound (N+1) x largest tensor + 1 GiB = {bound_mib:.0f} MiB")
    for name, value in targets.items():
        print(f"target {name}: {value:.3g}")
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
