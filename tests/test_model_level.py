"""Model-level numbers against references built from the real files: thresholds, sigma, low-precision inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.config import load_config
from merging.engine.merge import MergeOptions, run_merge
from merging.synthetic import build_family
from tests import reference as ref
from tests.helpers import write_config


def _load(folder):
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("ml"), "llama", 3)


def test_whole_model_threshold_is_kth_of_concatenated_task_vectors(family, tmp_path):
    base, fts = family
    densities = [0.3, 0.15, 0.6]
    cfg = write_config(tmp_path / "c.yml", "neuromerging", base, fts, parameters={"trim_scope": "model"})
    config = load_config(cfg)
    for entry, d in zip(config.models, densities):
        entry.parameters.density = d
    report = run_merge(config, tmp_path / "out", MergeOptions(progress=False))
    b = _load(base)
    for t, (ft, d) in enumerate(zip(fts, densities)):
        f = _load(ft)
        taus = [(f[n] - b[n]).numpy() for n in b]
        assert report.stats.thresholds[t] == ref.kth_largest_abs(taus, d)
        allv = np.abs(np.concatenate([x.reshape(-1) for x in taus])).astype(np.float64)
        kept = allv[allv.astype(np.float32) >= np.float32(report.stats.thresholds[t])].sum()
        assert abs(report.stats.trimmed_l1_fraction[t] - (1 - kept / allv.sum())) < 1e-9


def test_tensor_scope_sigma_is_share_of_l1_removed(family, tmp_path):
    base, fts = family
    cfg = write_config(tmp_path / "c.yml", "neuromerging", base, fts, parameters={"trim_scope": "tensor"})
    report = run_merge(load_config(cfg), tmp_path / "out", MergeOptions(progress=False))
    for t, ft in enumerate(fts):
        assert abs(report.stats.trimmed_l1_fraction[t] - tensor_scope_sigma(base, ft)) < 1e-9


def tensor_scope_sigma(base, ft) -> float:
    """Returns the share of the task vector's L1 norm that keeping each tensor's top half removes (float64)."""
    b, f = _load(base), _load(ft)
    total = kept = 0.0
    for n in b:
        tau = (f[n] - b[n]).numpy().astype(np.float64)
        total += np.abs(tau).sum()
        kept += np.abs(ref.keep_topk(tau, 0.5)).sum()  # helpers' density is 0.5
    return 1 - kept / total


@pytest.mark.parametrize("route", ["stored", "row blocks", "mergekit ties"])
def test_tensor_scope_sigma_never_forms_a_whole_tensors_task_vectors(family, tmp_path, monkeypatch, route):
    """sigma with per-tensor trim comes from each tensor's histogram passes: over the stored tensors, or (where the
    kernels cannot read them) over task vectors formed a block of rows at a time; mergekit's tie order keeps other
    tied entries but the same L1."""
    from merging.engine import blocks
    from merging.engine.source import TensorSource

    base, fts = family
    parameters = {"trim_scope": "tensor", **({"trim_ties": "mergekit"} if route == "mergekit ties" else {})}
    cfg = write_config(tmp_path / "c.yml", "neuromerging", base, fts, parameters=parameters)
    b = _load(base)
    loads: list[tuple[str, object]] = []
    if route == "row blocks":
        original = TensorSource.load

        def recorded(self, plan, rows=None, prepare=None):
            loads.append((plan.name, rows))
            return original(self, plan, rows, prepare)

        monkeypatch.setattr(TensorSource, "stored", lambda self, plan: None)
        monkeypatch.setattr(TensorSource, "load", recorded)
        monkeypatch.setattr(blocks, "MIN_BLOCKED_BYTES", 0)
        monkeypatch.setattr(blocks, "BLOCK_BYTES", 1)  # a row at a time
    stats = run_merge(load_config(cfg), tmp_path / "out", MergeOptions(progress=False)).stats
    if route == "row blocks":
        matrices = {name for name in b if b[name].dim() == 2 and b[name].shape[0] > 1}
        assert matrices and all(rows is not None for name, rows in loads if name in matrices)
    for t, ft in enumerate(fts):
        assert abs(stats.trimmed_l1_fraction[t] - tensor_scope_sigma(base, ft)) < 1e-9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "neuromerging"])
def test_low_precision_inputs_match_reference(tmp_path, dtype, method):
    base, fts = build_family(tmp_path / "fam", "llama", 2, dtype=dtype, hidden=16, intermediate=24, vocab=24)
    params = {"lambda": 0.8}
    if method == "neuromerging":
        params = {"lambda": 1.2, "lambda_parallel": 0.3, "trim_scope": "tensor", "compute_dtype": "float64"}
    cfg = write_config(tmp_path / "c.yml", method, base, fts, parameters=params, dtype="float32")
    run_merge(load_config(cfg), tmp_path / "out", MergeOptions(progress=False))
    out = _load(tmp_path / "out")
    b = {k: v.double().numpy() for k, v in _load(base).items()}
    f = [{k: v.double().numpy() for k, v in _load(p).items()} for p in fts]
    for name, b0 in b.items():
        ft_vals = [x[name] for x in f]
        if method == "task_arithmetic":
            want = ref.task_arithmetic(b0, ft_vals, [1.0, 1.0], 0.8, False)
        elif method == "ties":
            want = ref.ties(b0, ft_vals, [1.0, 1.0], [0.5, 0.5], 0.8, True)
        else:
            taus = [ref.keep_topk(x - b0, 0.5) for x in ft_vals]
            if b0.ndim == 2:
                want = b0 + ref.neuromerging_rows(b0, taus, 0.3, 1.2)
            else:
                want = b0 + ref.neuromerging_points(taus, 1.2)
        assert out[name].dtype == torch.float32
        np.testing.assert_allclose(out[name].double().numpy(), want, atol=2e-6, err_msg=name)


def test_conv_kernels_are_flattened_neurons(tmp_path):
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(6, 3, 3, 3, generator=g)
    folders = []
    for i in range(3):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        w = conv if i == 0 else conv + 0.1 * torch.randn(6, 3, 3, 3, generator=g)
        save_file({"features.0.weight": w.contiguous()}, folder / "model.safetensors")
        folders.append(folder)
    params = {"lambda": 1.0, "lambda_parallel": 0.5, "trim_scope": "tensor", "compute_dtype": "float64"}
    cfg = write_config(tmp_path / "c.yml", "neuromerging", folders[0], folders[1:], parameters=params)
    run_merge(load_config(cfg), tmp_path / "out", MergeOptions(progress=False))
    got = _load(tmp_path / "out")["features.0.weight"]
    assert got.shape == (6, 3, 3, 3)
    b0 = conv.double().reshape(6, 27).numpy()
    taus = [ref.keep_topk(_load(f)["features.0.weight"].double().reshape(6, 27).numpy() - b0, 0.5) for f in folders[1:]]
    want = b0 + ref.neuromerging_rows(b0, taus, 0.5, 1.0)
    np.testing.assert_allclose(got.double().reshape(6, 27).numpy(), want, atol=1e-5)
