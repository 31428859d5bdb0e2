"""The sampled route of the model-wide trim threshold (merging/engine/thresholds.py): a 1/16 sample picks a window of
buckets, one exact pass counts it. Its thresholds must equal the two-pass select's exactly (the sample decides only
the time), its trimmed L1 share to rounding, and a window the k-th largest misses must fall back to the two passes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from merging.config import load_config
from merging.engine import thresholds
from merging.engine.merge import MergeOptions, run_merge
from merging.errors import NonFiniteError
from merging.methods.trim import HIGH_BINS, LOW_BINS
from merging.methods.trim_stats import WINDOW_BUCKETS, ModelThreshold
from merging.synthetic import build_family
from tests.helpers import write_config


def family(seed: int, n: int, dtype: torch.dtype, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    ft = base + scale * torch.randn(n, generator=g)
    return base.to(dtype), ft.to(dtype)


def two_passes(pairs: list[tuple[torch.Tensor, torch.Tensor]], density: float) -> ModelThreshold:
    acc = ModelThreshold(density)
    for base, ft in pairs:
        assert acc.add_difference(base, ft, second=False) == 0
    acc.finish_pass1()
    if acc.needs_pass2:
        for base, ft in pairs:
            assert acc.add_difference(base, ft, second=True) == 0
    return acc


def windowed(pairs: list[tuple[torch.Tensor, torch.Tensor]], density: float, lo: int | None = None) -> ModelThreshold:
    """Returns the accumulator after the sampled route; `lo` forces the window's first bucket."""
    acc = ModelThreshold(density)
    for base, ft in pairs:
        assert acc.add_sample(base, ft) == 0
    entries = sum(base.numel() for base, _ in pairs)
    if lo is None:
        assert acc.choose_window(entries)
    else:
        acc.open_window(lo, WINDOW_BUCKETS, entries)
    for base, ft in pairs:
        assert acc.add_window(base, ft) == 0
    return acc


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30000), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    density=st.sampled_from([0.01, 0.1, 0.2, 0.5, 0.9]),
    bf16=st.booleans(),
    scales=st.sampled_from([(0.05,), (0.05, 1e-4), (1.0, 0.01, 3.0)]),
    shift=st.integers(-3, WINDOW_BUCKETS + 2),
)
def test_window_pass_gives_the_two_pass_threshold_exactly(sizes, seed, density, bf16, scales, shift):
    """Whenever the window holds the k-th largest entry, threshold and per-tensor rule are the two-pass ones and
    sigma agrees to rounding; when it does not, finish_window says so (the caller then runs the two passes). Where
    the sample is too spread out to choose a window (small inputs), one is forced `shift` buckets below the bucket
    of the k-th largest, inside it or not."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    pairs = [family(seed + i, n, dtype, scales[i % len(scales)]) for i, n in enumerate(sizes)]
    want = two_passes(pairs, density)
    entries = sum(base.numel() for base, _ in pairs)
    acc = ModelThreshold(density)
    for base, ft in pairs:
        assert acc.add_sample(base, ft) == 0
    if not acc.choose_window(entries):
        acc.open_window(want.bucket - shift, WINDOW_BUCKETS, entries)
    assert acc.part_window is not None
    width = acc.part_window.shape[1] // LOW_BINS
    for base, ft in pairs:
        assert acc.add_window(base, ft) == 0
    held = acc.window_lo <= want.bucket < acc.window_lo + width
    assert acc.finish_window() == held
    if held:
        (threshold, sigma), (want_threshold, want_sigma) = acc.result(), want.result()
        assert threshold == want_threshold
        assert abs(sigma - want_sigma) <= 1e-12
        if len(pairs) == 1:
            assert acc.tensor_rule() == want.tensor_rule()


@pytest.mark.parametrize("where", ["below", "above"])
def test_a_window_that_misses_the_kth_largest_says_so(where):
    pairs = [family(3, 50_000, torch.bfloat16, 0.05)]
    want = two_passes(pairs, 0.2)
    lo = 0 if where == "below" else HIGH_BINS - WINDOW_BUCKETS  # tiny values only / none at all
    acc = windowed(pairs, 0.2, lo)
    assert not acc.finish_window()
    assert want.bucket > WINDOW_BUCKETS  # the forced window really missed it
    right = windowed(pairs, 0.2, want.bucket - 3)  # one that holds it, off centre
    assert right.finish_window() and right.result() == pytest.approx(want.result(), rel=0, abs=1e-12)


def test_degenerate_task_vectors_all_zero_and_all_tied():
    """A fine-tune equal to its base (every |tau| is zero) and one whose entries all tie at one value."""
    base = torch.randn(40_000, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    zero = [(base, base.clone())]
    acc = windowed(zero, 0.2)
    assert acc.finish_window() and acc.result() == two_passes(zero, 0.2).result() == (0.0, 0.0)
    tied = [(torch.zeros(40_000), torch.full((40_000,), 0.5))]
    acc = windowed(tied, 0.3)
    assert acc.finish_window()
    assert acc.result() == two_passes(tied, 0.3).result()
    assert acc.tensor_rule() == two_passes(tied, 0.3).tensor_rule()


def model_family(tmp_path, dtype=torch.bfloat16):
    return build_family(tmp_path / "fam", "llama", 3, dtype=dtype, hidden=256, intermediate=512)


def config(tmp_path, method: str, base, fts, parameters: dict):
    """Returns a config keeping 20%, 10% and 30% of the three task vectors (one model-wide threshold each)."""
    models = [{"model": str(f), "parameters": {"weight": 1.0, "density": d}} for f, d in zip(fts, (0.2, 0.1, 0.3))]
    return load_config(write_config(tmp_path / "c.yml", method, base, fts, models=models, parameters=parameters))


@pytest.mark.parametrize("method", ["neuromerging", "ties"])
def test_sampled_merges_equal_the_two_pass_merges_bit_for_bit(tmp_path, monkeypatch, method):
    base, fts = model_family(tmp_path)
    parameters = {"trim_scope": "model", "lambda": "auto"} if method == "neuromerging" else {"trim_scope": "model"}
    cfg = config(tmp_path, method, base, fts, parameters)
    two = run_merge(cfg, tmp_path / "two", MergeOptions(progress=False))
    calls = {"sample": 0, "window": 0}
    for name in calls:
        original = getattr(ModelThreshold, f"add_{name}")

        def counted(self, *args, _name=name, _original=original):
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(ModelThreshold, f"add_{name}", counted)
    monkeypatch.setattr(thresholds, "SAMPLED_MIN_ENTRIES", 0)
    sampled = run_merge(cfg, tmp_path / "sampled", MergeOptions(progress=False))
    assert calls["window"] == calls["sample"] > 0  # the sampled route ran, every task within its window
    assert sampled.stats.thresholds == two.stats.thresholds
    if method == "neuromerging":
        for a, b in zip(sampled.stats.trimmed_l1_fraction, two.stats.trimmed_l1_fraction):
            assert abs(a - b) <= 1e-12
    else:  # TIES' merge reads only the thresholds: the files are the same bytes
        assert (tmp_path / "two" / "model.safetensors").read_bytes() == (
            tmp_path / "sampled" / "model.safetensors"
        ).read_bytes()


def test_a_task_whose_window_misses_falls_back_to_the_two_passes(tmp_path, monkeypatch):
    base, fts = model_family(tmp_path)
    cfg = config(tmp_path, "ties", base, fts, {"trim_scope": "model"})
    two = run_merge(cfg, tmp_path / "two", MergeOptions(progress=False))
    original = ModelThreshold.choose_window
    chosen: list[ModelThreshold] = []

    def first_task_misses(self, entries):
        on = original(self, entries)
        chosen.append(self)
        if len(chosen) == 1:
            self.open_window(0, WINDOW_BUCKETS, entries)  # only tiny values: the k-th largest is above it
        return on

    monkeypatch.setattr(ModelThreshold, "choose_window", first_task_misses)
    monkeypatch.setattr(thresholds, "SAMPLED_MIN_ENTRIES", 0)
    sampled = run_merge(cfg, tmp_path / "sampled", MergeOptions(progress=False))
    assert len(chosen) == 3 and chosen[0].bucket == -1  # the first task's window missed, the others held
    assert all(acc.needs_pass2 for acc in chosen[1:])
    assert sampled.stats.thresholds == two.stats.thresholds
    assert (tmp_path / "two" / "model.safetensors").read_bytes() == (
        tmp_path / "sampled" / "model.safetensors"
    ).read_bytes()


def test_a_non_finite_entry_is_named_by_the_sampled_route(tmp_path, monkeypatch):
    base, fts = model_family(tmp_path)
    weights = load_file(fts[1] / "model.safetensors")
    name = sorted(weights)[-1]
    weights[name].view(-1)[-1] = float("nan")  # the last entry: outside the 1/16 sample, found by the window pass
    save_file(weights, fts[1] / "model.safetensors", metadata={"format": "pt"})
    cfg = config(tmp_path, "neuromerging", base, fts, {"trim_scope": "model"})
    monkeypatch.setattr(thresholds, "SAMPLED_MIN_ENTRIES", 0)
    with pytest.raises(NonFiniteError, match=name.replace(".", r"\.")):
        run_merge(cfg, tmp_path / "out", MergeOptions(progress=False))
    assert not (tmp_path / "out").exists()


def test_float16_models_take_the_two_passes(tmp_path, monkeypatch):
    """The kernels read bfloat16 and float32 as stored; a float16 model is not sampled, and merges as before."""
    base, fts = model_family(tmp_path, torch.float16)
    cfg = config(tmp_path, "ties", base, fts, {"trim_scope": "model"})
    two = run_merge(cfg, tmp_path / "two", MergeOptions(progress=False))
    monkeypatch.setattr(thresholds, "SAMPLED_MIN_ENTRIES", 0)
    monkeypatch.setattr(ModelThreshold, "add_sample", lambda *a: pytest.fail("sampled a float16 model"))
    sampled = run_merge(cfg, tmp_path / "sampled", MergeOptions(progress=False))
    assert sampled.stats.thresholds == two.stats.thresholds
