"""End to end: tiny BERT and Llama families, every method, outputs load with from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from flows.cli import main
from merging.config import load_config
from merging.engine.merge import MergeOptions, run_merge
from merging.io.checkpoint import file_sha256
from merging.synthetic import build_family
from tests.helpers import METHODS, write_config


@pytest.fixture(scope="module")
def bert_family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("bert"), "bert", 3, classification=True)


@pytest.fixture(scope="module")
def llama_family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("llama"), "llama", 2)


@pytest.mark.parametrize("method", METHODS)
def test_bert_with_heads_every_method(bert_family, tmp_path, method):
    base, fts = bert_family
    out = tmp_path / "out"
    report = run_merge(
        load_config(write_config(tmp_path / "c.yml", method, base, fts)), out, MergeOptions(progress=False)
    )
    model = AutoModel.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    with torch.inference_mode():
        hidden = model(**tok(["merge the model"], return_tensors="pt")).last_hidden_state
    assert torch.isfinite(hidden).all()
    # Heads: never merged, each fine-tune's own, under heads/<name>.safetensors.
    assert sorted(report.heads) == ["finetune_0", "finetune_1", "finetune_2"]
    for i, ft in enumerate(fts):
        heads = load_file(out / "heads" / f"finetune_{i}.safetensors")
        original = load_file(ft / "model.safetensors")
        assert heads["classifier.weight"].shape == (2 + i, 32)
        assert torch.equal(heads["classifier.weight"], original["classifier.weight"])
    merged = load_file(out / "model.safetensors")
    assert not any(k.startswith("classifier") for k in merged)
    card = (out / "README.md").read_text()
    assert "heads/finetune_1.safetensors" in card
    assert file_sha256(fts[2] / "model.safetensors") in card
    assert file_sha256(base / "model.safetensors") in card
    assert load_config(out / "mergeflow_config.yml").merge_method == method


@pytest.mark.parametrize("method", METHODS)
def test_llama_sharded_output_every_method(llama_family, tmp_path, method):
    base, fts = llama_family
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yml", method, base, fts, dtype="bfloat16")
    run_merge(load_config(cfg), out, MergeOptions(progress=False, out_shard_size=40_000))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits.float()).all()


def test_task_arithmetic_output_equals_formula(llama_family, tmp_path):
    base, fts = llama_family
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yml", "task_arithmetic", base, fts, parameters={"lambda": 0.4})
    run_merge(load_config(cfg), out, MergeOptions(progress=False))
    b = load_file(base / "model.safetensors")
    f = [load_file(p / "model.safetensors") for p in fts]
    m = load_file(out / "model.safetensors")
    for name in b:
        want = b[name] + 0.4 * ((f[0][name] - b[name]) + (f[1][name] - b[name]))
        torch.testing.assert_close(m[name], want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["dare_ties", "neuromerging"])
def test_same_seed_gives_bit_identical_output(llama_family, tmp_path, method):
    base, fts = llama_family
    cfg = load_config(write_config(tmp_path / "c.yml", method, base, fts, seed=5))
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run_merge(cfg, a, MergeOptions(progress=False))
    run_merge(cfg, b, MergeOptions(progress=False))
    run_merge(cfg, c, MergeOptions(progress=False, seed=6))
    assert file_sha256(a / "model.safetensors") == file_sha256(b / "model.safetensors")
    if method == "dare_ties":
        assert file_sha256(a / "model.safetensors") != file_sha256(c / "model.safetensors")


def test_tied_weights_are_merged_once_and_stay_equal(tmp_path):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(40, 8, generator=g)
    dense = torch.randn(8, 8, generator=g)

    def save(folder: Path, e: torch.Tensor, w: torch.Tensor) -> Path:
        folder.mkdir()
        save_file(
            {"embed_tokens.weight": e, "lm_head.weight": e.clone(), "dense.weight": w}, folder / "model.safetensors"
        )
        return folder

    base = save(tmp_path / "base", emb, dense)
    fts = [save(tmp_path / f"ft{i}", emb + 0.1 * torch.randn(40, 8, generator=g), dense) for i in range(2)]
    out = tmp_path / "out"
    run_merge(load_config(write_config(tmp_path / "c.yml", "ties", base, fts)), out, MergeOptions(progress=False))
    merged = load_file(out / "model.safetensors")
    assert torch.equal(merged["embed_tokens.weight"], merged["lm_head.weight"])
    assert not torch.equal(merged["embed_tokens.weight"], emb)


def test_gpt2_conv1d_weights_are_transposed_for_neuromerging(tmp_path):
    from merging.engine.plan import build_plan
    from merging.io.checkpoint import Checkpoint

    g = torch.Generator().manual_seed(0)
    tensors = {"h.0.attn.c_attn.weight": torch.randn(8, 24, generator=g), "h.0.ln_1.weight": torch.ones(8)}
    (tmp_path / "base").mkdir()
    save_file(tensors, tmp_path / "base" / "model.safetensors")
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    plan = build_plan(Checkpoint(tmp_path / "base"), [Checkpoint(tmp_path / "base")])
    by_name = {t.name: t for t in plan.tensors}
    assert by_name["h.0.attn.c_attn.weight"].transposed
    assert by_name["h.0.attn.c_attn.weight"].neuron_shape == (24, 8)
    assert by_name["h.0.attn.c_attn.weight"].layer == "h.0"


def test_cli_merge_prints_summary(bert_family, tmp_path, capsys):
    base, fts = bert_family
    cfg = write_config(tmp_path / "c.yml", "ties", base, fts)
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--out-shard-size", "500MB", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "peak anonymous" in out and "read" in out
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def test_mergekit_style_config_with_base_listed_in_models(bert_family, tmp_path):
    base, fts = bert_family
    cfg_path = tmp_path / "mk.yml"
    cfg_path.write_text(
        f"""
models:
  - model: {base}
  - model: {fts[0]}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {fts[1]}
    parameters:
      density: 0.5
      weight: 0.3
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float32
"""
    )
    report = run_merge(load_config(cfg_path), tmp_path / "out", MergeOptions(progress=False))
    assert [r.label for r in report.inputs] == ["base", "finetune_0", "finetune_1"]
