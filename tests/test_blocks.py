"""Large tensors merged in blocks of rows (merging/engine/blocks.py) equal the whole-tensor merge bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from merging.config import load_config
from merging.engine import blocks
from merging.engine.merge import MergeOptions, run_merge
from merging.engine.plan import Role, TensorPlan
from merging.errors import NonFiniteError
from merging.methods import REGISTRY
from merging.methods.trim import tensor_trim_rule, trim_
from merging.methods.trim_stats import ModelThreshold
from merging.synthetic import build_family
from tests.helpers import write_config


def merged(tmp_path, name, cfg, monkeypatch, blocked):
    """Returns the merged tensors, with every 2-D tensor merged in blocks of a few rows, or none."""
    monkeypatch.setattr(blocks, "MIN_BLOCKED_BYTES", 0 if blocked else 1 << 62)
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 3000)
    run_merge(cfg, tmp_path / name, MergeOptions(progress=False))
    return load_file(tmp_path / name / "model.safetensors")


CASES = {
    "ties, per-tensor trim": ("ties", {"density": 0.3, "trim_scope": "tensor"}),
    "ties, whole-model trim": ("ties", {"density": 0.3, "trim_scope": "model"}),
    "ties, weights, lambda": ("ties", {"density": 0.5, "lambda": 0.8, "normalize": False, "trim_scope": "tensor"}),
    "neuromerging, whole-model trim": ("neuromerging", {"density": 0.3, "trim_scope": "model", "lambda": "auto"}),
    "neuromerging, per-tensor trim": ("neuromerging", {"density": 0.3, "trim_scope": "tensor"}),
    "neuromerging Full": ("neuromerging", {"density": 0.5, "lambda_parallel": 0.7, "trim_scope": "model"}),
    "task arithmetic": ("task_arithmetic", {"lambda": 0.7}),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("case", sorted(CASES))
def test_blocked_merge_equals_the_whole_tensor_merge_bit_for_bit(tmp_path, monkeypatch, case, dtype):
    method, parameters = CASES[case]
    # A small scale in a low-precision dtype gives many task-vector entries equal to a trim threshold, so the ties
    # kept by index are counted across blocks.
    base, fts = build_family(tmp_path / "fam", "llama", 3, dtype=dtype, hidden=48, intermediate=96, scale=0.02)
    cfg = load_config(write_config(tmp_path / "c.yml", method, base, fts, parameters=parameters))
    seen: list[tuple[str, int]] = []
    real = blocks.merge_in_blocks
    monkeypatch.setattr(
        "merging.engine.merge.merge_in_blocks",
        lambda t, bl, *a: seen.append((t.name, len(bl))) or real(t, bl, *a),
    )
    rules: list = []
    real_rules = blocks.tensor_trim_rules
    monkeypatch.setattr(blocks, "tensor_trim_rules", lambda *a: rules.extend(real_rules(*a)) or rules[-3:])
    ours = merged(tmp_path, "blocked", cfg, monkeypatch, blocked=True)
    fused_ta = method == "task_arithmetic" and dtype in (torch.bfloat16, torch.float32)  # the fused kernel takes these
    assert fused_ta or (seen and all(n > 1 for _, n in seen)), seen
    if parameters.get("trim_scope") == "tensor":
        assert len(rules) == 3 * len(seen)
        if dtype in (torch.bfloat16, torch.float16):
            assert any(r.keep_ties >= 0 for r in rules)  # threshold ties were split by index
    theirs = merged(tmp_path, "whole", cfg, monkeypatch, blocked=False)
    assert set(ours) == set(theirs)
    for name in ours:
        assert ours[name].dtype == dtype and torch.equal(ours[name], theirs[name]), name


def test_transposed_tensors_are_blocked_by_their_neurons(tmp_path, monkeypatch):
    base, fts = build_family(tmp_path / "fam", "llama", 2, hidden=48, intermediate=96)
    cfg = load_config(
        write_config(
            tmp_path / "c.yml",
            "ties",
            base,
            fts,
            parameters={"density": 0.4},
            transposed=["*.mlp.down_proj.weight"],
        )
    )
    ours = merged(tmp_path, "blocked", cfg, monkeypatch, blocked=True)
    theirs = merged(tmp_path, "whole", cfg, monkeypatch, blocked=False)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_mergekit_tie_order_and_dare_are_merged_whole(tmp_path, monkeypatch):
    assert not REGISTRY["dare_ties"].row_blocks and not REGISTRY["dare_linear"].row_blocks
    assert REGISTRY["ties"].row_blocks and REGISTRY["neuromerging"].row_blocks
    base, fts = build_family(tmp_path / "fam", "llama", 2, dtype=torch.bfloat16, hidden=48, intermediate=96)
    cfg = load_config(
        write_config(tmp_path / "c.yml", "ties", base, fts, parameters={"density": 0.3, "trim_ties": "mergekit"})
    )
    monkeypatch.setattr("merging.engine.merge.merge_in_blocks", lambda *a: pytest.fail("blocked"))
    merged(tmp_path, "out", cfg, monkeypatch, blocked=True)


def test_a_nan_in_a_blocked_tensor_is_named(tmp_path, monkeypatch):
    base, fts = build_family(tmp_path / "fam", "llama", 2, dtype=torch.float16, hidden=48, intermediate=96)
    weights = load_file(fts[1] / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    weights[name][40, 7] = float("nan")
    save_file(weights, fts[1] / "model.safetensors", metadata={"format": "pt"})
    cfg = load_config(write_config(tmp_path / "c.yml", "ties", base, fts, parameters={"density": 0.3}))
    with pytest.raises(NonFiniteError, match=name.replace(".", r"\.")):
        merged(tmp_path, "out", cfg, monkeypatch, blocked=True)
    assert not (tmp_path / "out").exists()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 400),
    levels=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    density=st.sampled_from([0.01, 0.1, 0.3, 0.5, 0.99, 1.0]),
    f64=st.booleans(),
)
def test_the_histogram_rule_equals_the_top_k_rule(n, levels, seed, density, f64):
    # Few distinct magnitudes: almost every threshold has ties that do not all fit.
    g = torch.Generator().manual_seed(seed)
    values = (torch.randint(-levels, levels + 1, (n,), generator=g) * 0.125).to(torch.float64 if f64 else torch.float32)
    acc = ModelThreshold(density)
    for part in values.split(37):  # the passes see the tensor in pieces, as blocks do
        acc.add_pass1(part)
    acc.finish_pass1()
    if acc.needs_pass2:
        for part in values.split(37):
            acc.add_pass2(part)
    assert acc.tensor_rule() == tensor_trim_rule(values, density, "index")


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 12),
    per=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    density=st.sampled_from([0.05, 0.2, 0.5]),
)
def test_block_rules_keep_exactly_the_whole_tensor_entries(rows, cols, per, seed, density):
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randint(-3, 4, (2, rows, cols), generator=g).float()
    whole = trim_(deltas.clone(), (density, density), None)
    rules = [tensor_trim_rule(deltas[i], density) for i in range(2)]
    seen = [0, 0]
    pieces = []
    for r0 in range(0, rows, per):
        block = deltas[:, r0 : r0 + per].clone()
        given_rules = blocks._block_rules(rules, block, seen)
        pieces.append(trim_(block, (density, density), None, given=given_rules))
    assert torch.equal(torch.cat(pieces, dim=1), whole)


def test_row_blocks_cover_every_row_once(monkeypatch):
    monkeypatch.setattr(blocks, "MIN_BLOCKED_BYTES", 1000)
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 4 * 3 * 10 * 7)
    t = TensorPlan("w", Role.NEURON, (95, 10), torch.float32, "layer")
    got = blocks.row_blocks(t, 3, 4)
    assert got is not None and got[0] == (0, 7) and got[-1] == (91, 95)
    assert [r for a, b in got for r in range(a, b)] == list(range(95))
    assert blocks.row_blocks(TensorPlan("b", Role.POINT, (5000,), torch.float32, "layer"), 3, 4) is None
    assert blocks.row_blocks(TensorPlan("s", Role.NEURON, (2, 10), torch.float32, "layer"), 3, 4) is None
