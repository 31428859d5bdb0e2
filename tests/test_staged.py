"""The staged merge (plan → one step per layer → assemble) against the one-process merge."""

from __future__ import annotations

from pathlib import Path

import pytest

from merging.config import load_config
from merging.engine.assemble import assemble, staged_merge
from merging.engine.merge import MergeOptions, run_merge
from merging.engine.staged import cached_layer, merge_layer, plan_merge
from merging.errors import MergeflowError
from merging.synthetic import build_family
from tests.helpers import METHODS, write_config


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", METHODS)
def test_staged_equals_one_process_merge(tmp_path: Path, method: str) -> None:
    base, fts = build_family(tmp_path / "fam", n_finetunes=3, classification=True)
    extra = {"parameters": {"trim_scope": "model"}} if method == "ties" else {}
    config = load_config(write_config(tmp_path / "c.yml", method, base, fts, **extra))
    run_merge(config, tmp_path / "one", MergeOptions(progress=False))
    report = staged_merge(config, tmp_path / "staged", cache=tmp_path / "cache")
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "staged")
    assert report.heads and (tmp_path / "staged" / "heads").is_dir()


def test_rerun_reuses_layers_and_detects_changed_results(tmp_path: Path) -> None:
    base, fts = build_family(tmp_path / "fam", n_finetunes=2)
    config = load_config(write_config(tmp_path / "c.yml", "neuromerging", base, fts))
    cache = tmp_path / "cache"
    staged = plan_merge(config, cache)
    assert len(staged.groups) >= 3
    first = [merge_layer(config, staged, g, cache) for g in staged.groups[:2]]
    assert not any(r.reused for r in first)
    # A second plan (a new run) has the same key; the two finished layers are reused, the rest merged.
    again = plan_merge(config, cache)
    assert again.key == staged.key
    results = [merge_layer(config, again, g, cache) for g in again.groups]
    assert [r.reused for r in results] == [True, True] + [False] * (len(again.groups) - 2)
    assemble(config, again, results, tmp_path / "out")
    run_merge(config, tmp_path / "one", MergeOptions(progress=False))
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "out")
    # A corrupted cache file is not reused, and assembling from it is refused.
    victim = results[0].path
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert cached_layer(again, results[0].group, cache) is None
    with pytest.raises(MergeflowError, match="changed since it was merged"):
        assemble(config, again, results, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_key_changes_with_parameters_and_inputs(tmp_path: Path) -> None:
    base, fts = build_family(tmp_path / "fam", n_finetunes=2)
    a = load_config(write_config(tmp_path / "a.yml", "task_arithmetic", base, fts, parameters={"lambda": 0.3}))
    b = load_config(write_config(tmp_path / "b.yml", "task_arithmetic", base, fts, parameters={"lambda": 0.4}))
    cache = tmp_path / "cache"
    ka = plan_merge(a, cache).key
    assert ka != plan_merge(b, cache).key
    # Renaming the merge does not change what is merged.
    assert plan_merge(a.model_copy(update={"name": "other"}), cache).key == ka
    (fts[0] / "model.safetensors").write_bytes((fts[1] / "model.safetensors").read_bytes())
    assert plan_merge(a, cache).key != ka


def test_assemble_refuses_missing_layers(tmp_path: Path) -> None:
    base, fts = build_family(tmp_path / "fam", n_finetunes=2)
    config = load_config(write_config(tmp_path / "c.yml", "ties", base, fts))
    staged = plan_merge(config, tmp_path / "cache")
    results = [merge_layer(config, staged, g, tmp_path / "cache") for g in staged.groups[1:]]
    with pytest.raises(MergeflowError, match=staged.groups[0].replace(".", r"\.")):
        assemble(config, staged, results, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_assemble_keeps_an_identical_output_and_redoes_a_touched_one(tmp_path: Path) -> None:
    base, fts = build_family(tmp_path / "fam", n_finetunes=2)
    config = load_config(write_config(tmp_path / "c.yml", "task_arithmetic", base, fts))
    cache = tmp_path / "cache"
    first = staged_merge(config, tmp_path / "out", cache)
    assert not first.reused
    before = folder_bytes(tmp_path / "out")
    again = staged_merge(config, tmp_path / "out", cache)
    assert again.reused and folder_bytes(tmp_path / "out") == before
    # Someone edits the output: the next assemble rewrites it.
    (tmp_path / "out" / "README.md").write_text("edited")
    third = staged_merge(config, tmp_path / "out", cache)
    assert not third.reused and folder_bytes(tmp_path / "out") == before
    # A different config text (it is in the model card) is a different output.
    renamed = staged_merge(config.model_copy(update={"name": "renamed"}), tmp_path / "out", cache)
    assert not renamed.reused and folder_bytes(tmp_path / "out") != before
