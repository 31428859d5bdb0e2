"""Orchestration overhead: the same merge through `mergeflow merge` and through the Prefect flow (`mergeflow run`).

On the Llama with 4 fine-tunes of the merge benchmark (`--size 220m`, float32, or `--size 1b`, bfloat16). Each
case is its own process (wall time, peak RSS and peak anonymous memory measured as in merge_speed.py), inputs in a
warm page cache. Cases per method:
- `mergeflow merge` (one process, streaming);
- `mergeflow run`, cold (the cache's record of the output removed, so every layer is merged): Prefect
  (ephemeral API started in the process), plan, prepare the output, one task per layer group on 2
  threads writing into the output's shards, finalize; no evaluation, registry or storage, so only
  orchestration is added;
- `mergeflow run`, re-run with the output finished and untouched (a repeated schedule);
- a flow that does nothing: the fixed price of starting Prefect's ephemeral API in a process;
- with `--server`, the flow and the empty flow again against a running Prefect server (`prefect server
  start` on a free loopback port, sqlite; what `mergeflow stack up` runs), where no API starts per run.

    .venv/bin/python -m benchmarks.pipeline_overhead [--size 220m|1b|small] [--repeats 3] [--server] [--methods ...]

Prints a table and writes benchmarks/results/pipeline_overhead[_1b].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.merge_speed import ROOT, SIZES, generate, measure

EMPTY_FLOW = (
    "from prefect import flow, task\n@task\ndef one():\n    return 1\n@flow\ndef empty():\n    return one()\nempty()\n"
)


def write_pipeline_config(
    path: Path, method: str, base: Path, fts: list[Path], params: dict, workdir: Path, dtype: str = "float32"
) -> Path:
    cfg = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 1.0, "density": 0.2}} for f in fts],
        "parameters": params,
        "dtype": dtype,
        "pipeline": {"workdir": str(workdir), "runner": "threads", "max_workers": 2},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="220m")
    parser.add_argument("--workdir", type=Path, default=None, help="default: benchmarks/.work/llama<size>")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="the same as --size small")
    parser.add_argument("--server", action="store_true", help="also run the flow against a running Prefect server")
    parser.add_argument("--methods", default="task_arithmetic,neuromerging", help="comma-separated methods")
    parser.add_argument("--json", type=Path, default=None, help="default: results/pipeline_overhead[_<size>].json")
    args = parser.parse_args()
    size = "small" if args.small else args.size
    shape, dtype = SIZES[size]
    workdir = args.workdir or ROOT / "benchmarks" / ".work" / f"llama{size}"
    results_dir = ROOT / "benchmarks" / "results"
    json_path = args.json or results_dir / (
        "pipeline_overhead.json" if size == "220m" else f"pipeline_overhead_{size}.json"
    )
    base, fts = generate(workdir, 4, shape, dtype)
    for f in [base, *fts]:
        (f / "model.safetensors").read_bytes()
    mergeflow = str(Path(sys.executable).with_name("mergeflow"))
    outs = workdir / "pipeline-outputs"
    outs.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MERGEFLOW_CACHE_DIR": str(outs / "cache"),
    }
    known = {"task_arithmetic": {"lambda": 0.3}, "neuromerging": {"lambda": "auto"}}
    methods = {m: known[m] for m in args.methods.split(",")}
    server_env, server_pid = start_prefect_server(outs / "prefect-server", env) if args.server else (None, None)
    results: dict[str, dict[str, object]] = {}

    def run_case(label: str, cmd: list[str], before=None, case_env=None) -> None:  # type: ignore[no-untyped-def]
        runs = []
        for _ in range(args.repeats):
            if before is not None:
                before()
            runs.append(measure(cmd, case_env or env))
        results[label] = {
            "runs": runs,
            "median_wall_s": median(runs, "wall_s"),
            "median_peak_rss_mib": median(runs, "peak_rss_mib"),
            "median_peak_anon_mib": median(runs, "peak_anon_mib"),
        }
        print(f"{label:44s} {results[label]['median_wall_s']:8.2f} s", flush=True)

    # Warm the hash cache (both paths hash their inputs; the cache makes that free for both).
    try:
        run_all(methods, base, fts, outs, mergeflow, run_case, server_env, dtype)
    finally:
        if server_pid is not None:
            from infra.processes import stop_pid

            stop_pid(server_pid, timeout=30)
    rows = summarize(methods, results, server_env is not None)
    print(
        f"\n{'method':18s} {'merge s':>8s} {'flow s':>8s} {'overhead':>9s} {'w/o start':>10s} {'re-run s':>9s}", end=""
    )
    print(f" {'server flow s':>14s} {'overhead':>9s}" if server_env else "")
    for r in rows:
        print(
            f"{r['method']:18s} {r['merge_s']:8.2f} {r['flow_s']:8.2f} {r['overhead_pct']:8.1f}% "
            f"{r['overhead_without_prefect_start_pct']:9.1f}% {r['rerun_cached_s']:9.2f}",
            end="",
        )
        print(f" {r['server_flow_s']:14.2f} {r['server_overhead_pct']:8.1f}%" if server_env else "")
    out = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "model": {**shape, "dtype": dtype, "finetunes": 4},
        "repeats": args.repeats,
        "cases": results,
        "summary": rows,
        "date": time.strftime("%Y-%m-%d"),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {json_path}")


def start_prefect_server(folder: Path, env: dict[str, str]) -> tuple[dict[str, str], int]:
    """Starts `prefect server start` on a free loopback port (sqlite in `folder`); returns (the env that uses
    it, its PID)."""
    from infra.processes import HOST, executable, free_port, http_ok, spawn, wait_until

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    port = free_port()
    server_env = {
        **env,
        "PREFECT_HOME": str(folder),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{folder / 'prefect.db'}",
    }
    pid = spawn(
        [executable("prefect"), "server", "start", "--host", HOST, "--port", str(port)], server_env, folder / "log"
    )
    wait_until(lambda: http_ok(f"http://{HOST}:{port}/api/health"), 120, f"Prefect server on {port}", pid)
    return {**env, "PREFECT_API_URL": f"http://{HOST}:{port}/api"}, pid


def run_all(methods, base, fts, outs, mergeflow, run_case, server_env, dtype) -> None:  # type: ignore[no-untyped-def]
    run_case("empty Prefect flow (ephemeral API start)", [sys.executable, "-c", EMPTY_FLOW])
    if server_env is not None:
        run_case("empty Prefect flow (Prefect server)", [sys.executable, "-c", EMPTY_FLOW], case_env=server_env)
    for method, params in methods.items():
        work = outs / f"work-{method}"
        cfg = write_pipeline_config(outs / f"{method}.yml", method, base, fts, params, work, dtype)
        one = [mergeflow, "merge", str(cfg), str(outs / f"merge-{method}"), "--no-progress", "--overwrite"]
        run_case(f"mergeflow merge {method}", one)

        def cold() -> None:
            # No record of the finished output: every layer is merged and the folder replaced, as
            # `mergeflow merge --overwrite` replaces its own.
            shutil.rmtree(outs / "cache" / "layers", ignore_errors=True)

        flow_cmd = [mergeflow, "run", str(cfg)]
        run_case(f"mergeflow run {method} (cold)", flow_cmd, cold)
        run_case(f"mergeflow run {method} (re-run, output untouched)", flow_cmd)
        if server_env is not None:
            run_case(f"mergeflow run {method} (Prefect server, cold)", flow_cmd, cold, case_env=server_env)


def summarize(methods, results, server: bool) -> list[dict[str, float | str]]:  # type: ignore[no-untyped-def]
    def wall(label: str) -> float:
        return float(results[label]["median_wall_s"])

    rows: list[dict[str, float | str]] = []
    for method in methods:
        direct = wall(f"mergeflow merge {method}")
        cold = wall(f"mergeflow run {method} (cold)")
        fixed = wall("empty Prefect flow (ephemeral API start)")
        row: dict[str, float | str] = {
            "method": method,
            "merge_s": direct,
            "flow_s": cold,
            "overhead_pct": 100 * (cold - direct) / direct,
            "overhead_without_prefect_start_pct": 100 * (cold - fixed - direct) / direct,
            "rerun_cached_s": wall(f"mergeflow run {method} (re-run, output untouched)"),
        }
        if server:
            on_server = wall(f"mergeflow run {method} (Prefect server, cold)")
            row |= {"server_flow_s": on_server, "server_overhead_pct": 100 * (on_server - direct) / direct}
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
