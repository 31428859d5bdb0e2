"""The compute device of the pipeline's layer tasks (`pipeline.device`, `mergeflow run --device`).

With `pytest --device cuda` (benchmarks/gpu_check.sh) these run the staged merge and the pipeline on the GPU and
compare them with the CPU merge; on the CPU they check the same paths, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merging.config import load_config, parse_config
from merging.engine.finalize import staged_merge
from merging.engine.merge import MergeOptions, run_merge
from merging.engine.staged import plan_merge
from merging.errors import ConfigError
from merging.synthetic import build_family
from tests.helpers import test_device, write_config


def _assert_same_tensors(a: Path, b: Path, exact: bool) -> None:
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(ta) == set(tb)
    for name in ta:
        if exact:
            assert torch.equal(ta[name], tb[name]), name
        else:  # a GPU's reductions may round differently
            torch.testing.assert_close(ta[name], tb[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["ties", "neuromerging"])
def test_the_staged_merge_on_the_test_device_equals_the_cpu_merge(tmp_path: Path, method: str) -> None:
    device = test_device().type
    base, fts = build_family(tmp_path / "fam", n_finetunes=3)
    cfg = write_config(tmp_path / "c.yml", method, base, fts, pipeline={"device": device})
    config = load_config(cfg)
    staged_merge(config, tmp_path / "staged", tmp_path / "cache")
    run_merge(config, tmp_path / "cpu", MergeOptions(progress=False, device="cpu"))
    _assert_same_tensors(tmp_path / "staged", tmp_path / "cpu", exact=device == "cpu")
    # The key holds the device: a GPU's layers never land in a CPU run's folder.
    on_cpu = config.model_copy(update={"pipeline": config.pipeline.model_copy(update={"device": "cpu"})})
    assert (plan_merge(config, tmp_path / "cache").key == plan_merge(on_cpu, tmp_path / "cache").key) == (
        device == "cpu"
    )


def test_cuda_without_a_gpu_fails_at_the_plan_naming_the_device(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base, fts = build_family(tmp_path / "fam", n_finetunes=2)
    config = load_config(write_config(tmp_path / "c.yml", "ties", base, fts, pipeline={"device": "cuda"}))
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        staged_merge(config, tmp_path / "out", tmp_path / "cache")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"c\.yml: pipeline\.device: Input should be .cpu., .cuda. or .auto."):
        parse_config({**yaml.safe_load((tmp_path / "c.yml").read_text()), "pipeline": {"device": "tpu"}}, "c.yml")


def test_the_pipeline_runs_its_layer_tasks_on_the_device_it_is_given(prefect_harness, tmp_path: Path) -> None:
    from flows.merge_pipeline import run_pipeline

    device = test_device().type
    base, fts = build_family(tmp_path / "fam", n_finetunes=2)
    cfg = write_config(tmp_path / "c.yml", "neuromerging", base, fts, pipeline={"workdir": str(tmp_path / "work")})
    result = run_pipeline(cfg, device=device)  # what `mergeflow run --device` passes
    assert result.layers_merged and not result.layers_reused
    run_merge(load_config(cfg), tmp_path / "cpu", MergeOptions(progress=False, device="cpu"))
    _assert_same_tensors(result.merged_dir, tmp_path / "cpu", exact=device == "cpu")
