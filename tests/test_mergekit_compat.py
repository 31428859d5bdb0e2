"""mergekit YAMLs run unchanged, and give mergekit's tensors (TA, TIES with per-tensor trim).

Where entries tie exactly at a per-tensor trim threshold, mergekit keeps whichever its unstable
argsort lists first; `trim_ties: mergekit` reproduces that (bit-identical), the default keeps
the lowest indices (fast). The bfloat16 family is full of such ties.

mergekit itself runs from its own virtual environment (`make mergekit`, or MERGEKIT_YAML pointing
at the `mergekit-yaml` script pip installs in a venv), side by side: nothing of it is imported here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merging.config import load_config
from merging.engine.merge import MergeOptions, run_merge
from merging.synthetic import build_family

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT = Path(os.environ.get("MERGEKIT_YAML", ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml"))
needs_mergekit = pytest.mark.skipif(
    not MERGEKIT.exists(), reason=f"mergekit not installed at {MERGEKIT} (run `make mergekit`)"
)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("mk"), "llama", 3, hidden=48, intermediate=96)


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    # bfloat16 task vectors are coarse: many entries tie at the trim threshold.
    return build_family(tmp_path_factory.mktemp("mk16"), "llama", 3, dtype=torch.bfloat16, hidden=48, intermediate=96)


def mergekit_yaml(path: Path, method: str, base: Path, fts: list[Path], params: str) -> Path:
    weights, densities = [0.6, 0.5, 1.0], [0.4, 0.7, 0.3]
    models = "\n".join(
        f"  - model: {f}\n    parameters:\n      weight: {w}\n      density: {d}"
        for f, w, d in zip(fts, weights, densities)
    )
    path.write_text(
        f"models:\n  - model: {base}\n{models}\nmerge_method: {method}\nbase_model: {base}\n"
        f"parameters:\n{params}\ndtype: float32\n"
    )
    return path


# mergekit's own `mergekit-yaml` command, called once per (YAML, output) pair in one interpreter of its venv:
# a process per merge would import torch and mergekit again each time (7-10 s on two cores).
DRIVER = """
import sys
from mergekit.scripts.run_yaml import main
pairs = sys.argv[1:]
for config, out in zip(pairs[::2], pairs[1::2]):
    main([config, out, "--no-copy-tokenizer"], standalone_mode=False)
"""


def run_mergekit(jobs: list[tuple[Path, Path]]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    interpreter = MERGEKIT.read_text(errors="replace").splitlines()[0].removeprefix("#!").strip()
    assert Path(interpreter).is_file(), f"{MERGEKIT} is not a pip-installed mergekit-yaml (#! names {interpreter!r})"
    command = [interpreter, "-c", DRIVER, *(str(p) for job in jobs for p in job)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


CASES = [
    ("task_arithmetic", "  lambda: 0.7\n"),
    ("task_arithmetic", "  normalize: true\n"),
    ("ties", "  normalize: true\n  lambda: 0.9\n"),
    ("ties", "  normalize: false\n  int8_mask: true\n"),
]
FAMILIES = ["family", "bf16_family"]


def case_params(family_name: str, method: str, params: str) -> str:
    if family_name == "bf16_family" and method == "ties":
        # Ties at the trim threshold: mergekit keeps whichever its argsort puts first; mergeflow
        # does the same only when asked, since that full sort is what makes mergekit slow.
        params += "  trim_ties: mergekit\n"
    return params


@pytest.fixture(scope="module")
def mergekit_outputs(request, tmp_path_factory) -> dict[tuple[str, str, str], tuple[Path, Path]]:
    """(family, method, params) → (mergeflow's YAML, mergekit's output folder), every case merged by mergekit
    in one run (the tests that use it carry `needs_mergekit`)."""
    root = tmp_path_factory.mktemp("mergekit-cases")
    cases, jobs = {}, []
    for number, (family_name, (method, params)) in enumerate((f, c) for f in FAMILIES for c in CASES):
        base, fts = request.getfixturevalue(family_name)
        folder = root / f"case-{number}"
        folder.mkdir()
        cfg = mergekit_yaml(folder / "mk.yml", method, base, fts, case_params(family_name, method, params))
        mk_cfg = folder / "mk_only.yml"  # mergekit itself does not know trim_ties
        mk_cfg.write_text(cfg.read_text().replace("  trim_ties: mergekit\n", ""))
        cases[(family_name, method, params)] = (cfg, folder / "mergekit")
        jobs.append((mk_cfg, folder / "mergekit"))
    run_mergekit(jobs)
    return cases


@needs_mergekit
@pytest.mark.parametrize("method,params", CASES)
@pytest.mark.parametrize("family_name", FAMILIES)
def test_same_tensors_as_mergekit(request, mergekit_outputs, tmp_path, method, params, family_name):
    base, _fts = request.getfixturevalue(family_name)
    cfg, theirs_dir = mergekit_outputs[(family_name, method, params)]
    run_merge(load_config(cfg), tmp_path / "mergeflow", MergeOptions(progress=False))
    theirs = load_file(theirs_dir / "model.safetensors")
    ours = load_file(tmp_path / "mergeflow" / "model.safetensors")
    assert set(theirs) == set(ours)
    worst = max(float((theirs[k].float() - ours[k].float()).abs().max()) for k in theirs)
    assert worst <= 1e-6, f"max abs difference to mergekit {worst}"
    base_t = load_file(base / "model.safetensors")
    assert any(not torch.equal(ours[k], base_t[k]) for k in ours)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_mergekit_yaml_runs_unchanged(family, tmp_path, method):
    base, fts = family
    cfg = mergekit_yaml(tmp_path / "mk.yml", method, base, fts, "  lambda: 1.0\n  rescale: true\n")
    run_merge(load_config(cfg), tmp_path / "out", MergeOptions(progress=False))
    ours = load_file(tmp_path / "out" / "model.safetensors")
    base_t = load_file(base / "model.safetensors")
    changed = torch.cat([(ours[k] != base_t[k]).reshape(-1).float() for k in ours]).mean()
    # Each entry survives in at least one of three task vectors with probability 1 - 0.6*0.3*0.7.
    assert 0.80 < float(changed) < 0.95
