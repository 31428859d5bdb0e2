"""NeuroMerging before and after the zero-row fix, on the same zoo: what the fix changes in accuracy.

The kernel before the fix is read from git (commit 1a1d0e0, `neuron_merge` only) and swapped in
for the current one; everything else (trim, zoo, evaluation) is shared, so the difference is the
fix alone.

    .venv/bin/python benchmarks/neuromerging_fix.py            # full joint zoo (built if missing)

Prints a table and writes benchmarks/results/neuromerging_fix.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import merging.methods.neuromerging as current  # noqa: E402
from benchmarks.merge_accuracy import merged_row  # noqa: E402
from merging.evaluation.harness import Evaluator  # noqa: E402
from merging.zoo import zoo_merge_config, zoo_tasks  # noqa: E402
from merging.zoo.build import build_zoo  # noqa: E402

BEFORE = "1a1d0e0"
RESULTS = ROOT / "benchmarks" / "results" / "neuromerging_fix.json"
ROWS = [("Lite, σ rule", {}), ("Lite, λ₂ 0.5", {"lambda": 0.5})]


def kernel_before_fix() -> object:
    """Returns `neuron_merge` as it was before the fix (its module executed without registering)."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{BEFORE}:merging/methods/neuromerging.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    source = source.replace("@register_method(", "@(lambda *a, **k: (lambda f: f))(")
    module = types.ModuleType("neuromerging_before_fix")
    exec(compile(source, "neuromerging_before_fix.py", "exec"), module.__dict__)
    return module.neuron_merge


def main() -> int:
    root, manifest, _ = build_zoo(None, "full", "joint", progress=lambda m: print("  " + m, flush=True))  # type: ignore[arg-type]
    evaluator = Evaluator(zoo_tasks(root, manifest), root / manifest.base.path)
    finetuned = evaluator.finetuned_scores("test")
    kernels = {"after the fix": current.neuron_merge, "before the fix": kernel_before_fix()}
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, kernel in kernels.items():
            current.neuron_merge = kernel  # type: ignore[assignment]
            for name, params in ROWS:
                config = zoo_merge_config(root, "neuromerging", params, manifest)
                row = merged_row(evaluator, config, Path(tmp) / "m", finetuned)
                out.setdefault(name, {})[label] = row["average_normalized"]
    current.neuron_merge = kernels["after the fix"]  # type: ignore[assignment]
    print(f"\n== zoo full joint ({manifest.key[:12]}): average normalized accuracy (%) ==")
    print(f"{'row':16s} {'before':>8s} {'after':>8s}")
    for name, cells in out.items():
        print(f"{name:16s} {100 * cells['before the fix']:8.1f} {100 * cells['after the fix']:8.1f}")
    RESULTS.write_text(json.dumps({"zoo_key": manifest.key, "before_commit": BEFORE, "rows": out}, indent=2))
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
