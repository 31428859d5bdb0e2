"""MIN-Merging's neuron importance against slow, obvious computations, and its router."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

from merging.errors import CheckpointError, ConfigError
from merging.evaluation.heads import Head
from merging.minmerging.features import layer_pooled, mean_pooled
from merging.minmerging.grouped import task_groups
from merging.minmerging.importance import (
    activation_importance,
    neuron_linears,
    norm_importance,
    overlap_matrix,
    task_vectors,
    top_rows,
)
from merging.minmerging.routed import RoutedModel, neuron_patch
from merging.minmerging.router import Router, RouterOptions, ood_threshold, train_router
from merging.synthetic import build_family

TEXTS = ["merge the model", "a neuron", "task vectors of the fine tune and the base", "the"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("min")
    base_dir, fts = build_family(root, "bert", 1, classification=True, scale=0.3)
    base = BertModel.from_pretrained(base_dir).eval()
    ft = BertForSequenceClassification.from_pretrained(fts[0]).eval()
    return base, ft, AutoTokenizer.from_pretrained(base_dir)


def test_linears_exclude_heads_and_task_vectors_are_differences(pair):
    base, ft, _ = pair
    names = set(neuron_linears(ft))
    assert names and not any("classifier" in n for n in names)
    taus = task_vectors(base, ft.bert)
    name = "encoder.layer.0.attention.self.query.weight"
    expected = ft.bert.encoder.layer[0].attention.self.query.weight - base.encoder.layer[0].attention.self.query.weight
    torch.testing.assert_close(taus[name], expected.detach())


def test_activation_importance_matches_a_per_token_loop(pair):
    base, ft, tok = pair
    taus = task_vectors(base, ft.bert)
    name = "encoder.layer.1.intermediate.dense.weight"
    got = activation_importance(ft.bert, tok, TEXTS, {name: taus[name]}, batch_size=3)[name]
    # Slow: one text at a time (no padding at all), every token's input captured, |τᵏ·x| averaged.
    captured: list[torch.Tensor] = []
    layer = ft.bert.encoder.layer[1].intermediate.dense
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0][0].detach().clone()))
    with torch.no_grad():
        for text in TEXTS:
            ft.bert(**tok(text, return_tensors="pt"))
    handle.remove()
    xs = torch.cat(captured)
    slow = torch.stack([(xs @ taus[name][k]).abs().mean() for k in range(taus[name].shape[0])])
    torch.testing.assert_close(got, slow, rtol=1e-4, atol=1e-6)


def test_norm_importance_top_rows_and_overlap():
    gen = torch.Generator().manual_seed(0)
    taus = {"w": torch.randn(10, 4, generator=gen)}
    scores = norm_importance(taus)
    torch.testing.assert_close(scores["w"], torch.stack([taus["w"][k].norm() for k in range(10)]))
    top = top_rows(scores, 0.3)["w"]
    assert top.tolist() == sorted(torch.topk(scores["w"], 3).indices.tolist())
    assert top_rows({"w": torch.ones(5)}, 0.01)["w"].tolist() == [0]  # at least one row, lowest index on ties
    a = {"w": torch.tensor([0, 1, 2, 3])}
    b = {"w": torch.tensor([2, 3, 4, 5, 6, 7, 8, 9])}
    o = overlap_matrix([a, b])
    assert o.tolist() == [[1.0, 0.5], [0.25, 1.0]]
    with pytest.raises(ConfigError, match="neuron_ratio"):
        top_rows(scores, 0.0)


def test_model_wide_budget_ranks_rows_relative_to_their_tensor():
    # Slow reference: every row's score over its tensor's mean, one global ranking, top share kept.
    gen = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(8, generator=gen) * 100, "b": torch.rand(12, generator=gen), "c": torch.rand(4)}
    ranked = sorted(
        ((float(v / scores[n].mean()), n, i) for n in sorted(scores) for i, v in enumerate(scores[n])),
        key=lambda t: -t[0],
    )
    kept = ranked[: math.ceil(0.25 * 24)]
    got = top_rows(scores, 0.25, budget="model")
    want: dict[str, list[int]] = {}
    for _, n, i in kept:
        want.setdefault(n, []).append(i)
    assert {n: idx.tolist() for n, idx in got.items()} == {n: sorted(v) for n, v in want.items()}
    assert sum(idx.numel() for idx in got.values()) == 6
    # Tensors with no kept row are left out, and the overlap still counts over the rows each task kept.
    sparse = top_rows({"a": torch.tensor([10.0, 1.0, 1.0]), "b": torch.ones(3)}, 0.1, budget="model")
    assert set(sparse) == {"a"} and sparse["a"].tolist() == [0]
    assert overlap_matrix([sparse, {"b": torch.tensor([0])}]).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(ConfigError, match="budget must be"):
        top_rows(scores, 0.25, budget="tensor")


def test_activation_importance_bad_inputs(pair):
    _, ft, tok = pair
    with pytest.raises(ConfigError, match="at least one calibration text"):
        activation_importance(ft.bert, tok, [], {})
    with pytest.raises(ConfigError, match="layers the model does not have"):
        activation_importance(ft.bert, tok, TEXTS, {"nope.weight": torch.zeros(2, 2)})


# --- router --------------------------------------------------------------------------------------


def blobs(n: int, tasks: int, dim: int = 8, spread: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(tasks, dim, generator=gen) * 3
    labels = torch.arange(n) % tasks
    return centres[labels] + spread * torch.randn(n, dim, generator=gen), labels


def test_router_separates_tasks_keeps_recall_and_flags_far_inputs(tmp_path: Path):
    x, y = blobs(300, 3)
    far = torch.randn(50, 8, generator=torch.Generator().manual_seed(9)) * 0.1  # between the clusters, near 0
    router = train_router(x, y, ["a", "b", "c"], RouterOptions(seed=1), ood_features=far)
    assert router.metrics["router_accuracy"] >= 0.99 and not router.warnings
    assert router.metrics["in_domain_recall"] >= 0.99
    experts, weights, ood = router.route(x[:10], top_k=2)
    assert experts.shape == (10, 2) and torch.allclose(weights.sum(dim=1), torch.ones(10))
    assert experts[:, 0].tolist() == y[:10].tolist() and not ood.any()
    # Same seed, same router; saved and loaded, the same routes and threshold.
    again = train_router(x, y, ["a", "b", "c"], RouterOptions(seed=1))
    torch.testing.assert_close(again.net.net[0].weight, router.net.net[0].weight)
    router.save(tmp_path / "r")
    loaded = Router.load(tmp_path / "r")
    assert loaded.tasks == ["a", "b", "c"] and loaded.threshold == router.threshold
    torch.testing.assert_close(loaded.probabilities(x), router.probabilities(x))


def test_ood_threshold_is_the_recall_quantile():
    probs = torch.linspace(0.5, 1.0, 101)
    assert ood_threshold(probs, 0.99) == pytest.approx(float(probs[1]))  # one of 101 may fall under it
    assert ood_threshold(probs, 1.0) == pytest.approx(0.5)


def test_router_bad_calibration_sets():
    x, y = blobs(40, 2)
    with pytest.raises(ConfigError, match="empty"):
        train_router(x[:0], y[:0], ["a", "b"])
    with pytest.raises(ConfigError, match="at least two tasks"):
        train_router(x[y == 0], y[y == 0], ["a", "b"])
    with pytest.raises(ConfigError, match="no calibration inputs for task"):
        train_router(x, y, ["a", "b", "c"])
    noise = torch.randn(200, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(4))
    router = train_router(noise, labels, ["a", "b", "c", "d"])
    assert router.warnings and "close to chance" in router.warnings[0]
    with pytest.raises(CheckpointError, match="not a readable router"):
        Router.load(Path("/nonexistent-router"))


# --- routed model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def routed_family(tmp_path_factory: pytest.TempPathFactory):
    """θ₀, two fine-tunes, θ_shared (task arithmetic), each task's top-25% neurons by norm, a trained router."""
    from transformers import AutoModel

    from merging.config import MergeConfig
    from merging.engine.merge import MergeOptions, run_merge

    root = tmp_path_factory.mktemp("routed")
    base_dir, fts = build_family(root, "bert", 2, scale=0.5)
    shared_dir = root / "shared"
    config = MergeConfig(
        merge_method="task_arithmetic", base_model=str(base_dir), models=[{"model": str(f)} for f in fts]
    )
    run_merge(config, shared_dir, MergeOptions(progress=False))
    base = AutoModel.from_pretrained(base_dir).eval()
    shared = AutoModel.from_pretrained(shared_dir).eval()
    tuned = [AutoModel.from_pretrained(f).eval() for f in fts]
    tok = AutoTokenizer.from_pretrained(base_dir)
    patches = {}
    for name, model in zip(["a", "b"], tuned):
        masks = top_rows(norm_importance(task_vectors(base, model)), 0.25)
        patches[name] = neuron_patch(model, masks)
    texts = [f"{w} {v}" for w in ["merge", "model", "neuron", "task"] for v in ["the", "a", "of", "base"]]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        feats = mean_pooled(base, dict(batch))
    labels = torch.tensor([i % 2 for i in range(len(texts))])
    router = train_router(feats, labels, ["a", "b"], RouterOptions(holdout=0.0, target_recall=1.0))
    return root, base_dir, shared_dir, base, shared, tok, router, patches, texts


def materialized(shared, patches, tasks, weights):
    """Returns a real copy of θ_shared with each task's rows mixed in by its weight, one row at a time."""
    import copy

    patched = copy.deepcopy(shared)
    state = patched.state_dict()
    originals = {k: v.clone() for k, v in state.items()}
    for task, w in zip(tasks, weights):
        for name, (idx, rows) in patches[task].items():
            for r, k in enumerate(idx.tolist()):
                state[name][k] += w * (rows[r] - originals[name][k])
    return patched


def slow_features(base, shared, patches, router, tok, text, top_k, ood_model):
    """Routes one text by itself; returns (task, pooled output of the materialized patched model)."""
    batch = dict(tok([text], return_tensors="pt"))
    with torch.no_grad():
        probs = torch.softmax(router.net(mean_pooled(base, batch)), dim=-1)[0]
    weights, experts = torch.topk(probs, top_k)
    if weights[0] < router.threshold:
        model = base if ood_model == "base" else shared
        with torch.no_grad():
            return None, model(**batch).pooler_output[0]
    weights = weights / weights.sum()
    patched = materialized(shared, patches, [router.tasks[j] for j in experts.tolist()], weights.tolist())
    with torch.no_grad():
        return router.tasks[int(experts[0])], patched(**batch).pooler_output[0]


@pytest.mark.parametrize(
    ("top_k", "ood_model", "compute"), [(1, "base", "grouped"), (1, "base", "delta"), (2, "shared", "grouped")]
)
def test_routed_model_matches_materialized_patched_models(routed_family, top_k, ood_model, compute):
    _root, _base_dir, _shared_dir, base, shared, tok, router, patches, texts = routed_family
    routed = RoutedModel(
        shared, base, tok, router, patches, ood_model=ood_model, top_k=top_k, batch_size=7, compute=compute
    )
    results = routed.run(texts)
    assert len(results) == len(texts)
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    for text, got in zip(texts, results):
        if top_k == 1:
            task, want = slow_features(base, shared, patches, router, tok, text, top_k, ood_model)
            assert got.task == task
        else:
            # Top-k mixes rows by this input's own renormalized weights: rebuild exactly that model.
            patched = materialized(shared, patches, got.experts, got.weights)
            with torch.no_grad():
                want = patched(**dict(tok([text], return_tensors="pt"))).pooler_output[0]
        torch.testing.assert_close(got.features, want, rtol=1e-4, atol=1e-5)
    # The shared module itself was never modified.
    for k, v in shared.state_dict().items():
        assert torch.equal(v, before[k])
    if top_k == 2:
        assert all(len(r.experts) == 2 and abs(sum(r.weights) - 1) < 1e-6 for r in results if r.task)


@pytest.mark.parametrize("top_k", [1, 2])
def test_patches_with_small_tensors_match_materialized_models(routed_family, top_k):
    _root, _base_dir, _shared_dir, base, shared, tok, router, _patches, texts = routed_family
    tuned = {}
    for name, model in zip(["a", "b"], _root_finetunes(routed_family)):
        masks = top_rows(norm_importance(task_vectors(base, model)), 0.25)
        tuned[name] = neuron_patch(model, masks, small_tensors=True)
    small = [n for n, (_idx, rows) in tuned["a"].items() if rows.dim() == 1]
    assert any("LayerNorm" in n for n in small) and any(n.endswith("dense.bias") for n in small)
    routed = RoutedModel(shared, base, tok, router, tuned, top_k=top_k, batch_size=5)
    for text, got in zip(texts, routed.run(texts)):
        assert got.task is not None
        patched = materialized(shared, tuned, got.experts, got.weights)
        with torch.no_grad():
            want = patched(**dict(tok([text], return_tensors="pt"))).pooler_output[0]
        torch.testing.assert_close(got.features, want, rtol=1e-4, atol=1e-5)


def _root_finetunes(routed_family):
    from transformers import AutoModel

    root = routed_family[0]
    return [AutoModel.from_pretrained(root / f"finetune_{t}").eval() for t in (0, 1)]


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_router_features_stop_after_the_named_layer(routed_family, layer):
    _root, _base_dir, _shared_dir, base, _shared, tok, _router, _patches, texts = routed_family
    batch = dict(tok(texts[:5], padding=True, return_tensors="pt"))
    with torch.no_grad():
        out = base(**batch, output_hidden_states=True)
        states = out.hidden_states[layer]  # the state after `layer` layers (0: the embeddings' output)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        want = (states * mask).sum(1) / mask.sum(1)
        got = layer_pooled(base, batch, layer)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(layer_pooled(base, batch, None), mean_pooled(base, batch))
        # The stop hook is gone and disarmed: a full forward afterwards is unchanged.
        torch.testing.assert_close(base(**batch).last_hidden_state, out.last_hidden_state)
    with pytest.raises(ConfigError, match=r"router_layer 9 is outside 0\.\.2"):
        layer_pooled(base, batch, 9)


def test_shallow_router_routes_as_a_slow_router_on_that_layer(routed_family, tmp_path: Path):
    _root, base_dir, shared_dir, base, shared, tok, _router, patches, texts = routed_family
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        feats = base(**batch, output_hidden_states=True).hidden_states[1]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        feats = (feats * mask).sum(1) / mask.sum(1)
    labels = torch.tensor([i % 2 for i in range(len(texts))])
    router = train_router(feats, labels, ["a", "b"], RouterOptions(holdout=0.0, target_recall=1.0))
    routed = RoutedModel(shared, base, tok, router, patches, router_layer=1, batch_size=6)
    got = routed.run(texts)
    want = [router.tasks[int(i)] for i in router.probabilities(feats).argmax(-1)]
    assert [r.task for r in got] == want
    for text, r in zip(texts, got):
        with torch.no_grad():
            expect = materialized(shared, patches, [r.task], [1.0])(**dict(tok([text], return_tensors="pt")))
        torch.testing.assert_close(r.features, expect.pooler_output[0], rtol=1e-4, atol=1e-5)
    routed.save(tmp_path / "r", shared_dir, base_dir)
    loaded = RoutedModel.load(tmp_path / "r")
    assert loaded.router_layer == 1 and [r.task for r in loaded.run(texts)] == want
    manifest = json.loads((tmp_path / "r" / "routed.json").read_text())
    for bad in (-1, "2", True, 1.5):
        (tmp_path / "r" / "routed.json").write_text(json.dumps({**manifest, "router_layer": bad}))
        with pytest.raises(CheckpointError, match="router_layer must be"):
            RoutedModel.load(tmp_path / "r")


def test_patch_hooks_act_only_inside_a_routed_forward(routed_family):
    _root, _base_dir, _shared_dir, base, shared, tok, router, patches, texts = routed_family
    batch = dict(tok(texts[:4], padding=True, return_tensors="pt"))
    with torch.no_grad():
        before = shared(**batch).pooler_output
    routed = RoutedModel(shared, base, tok, router, patches)
    routed.run(texts)
    with torch.no_grad():
        torch.testing.assert_close(shared(**batch).pooler_output, before, rtol=0, atol=0)
    bad = {"a": {"embeddings.word_embeddings.weight": (torch.tensor([0]), torch.zeros(1, 32))}}
    with pytest.raises(ConfigError, match="not a parameter of a linear layer, LayerNorm or RMSNorm"):
        RoutedModel(shared, base, tok, router, bad)
    wide = {"a": {"pooler.dense.weight": (torch.tensor([0]), torch.zeros(1, 3))}}
    with pytest.raises(ConfigError, match="rows do not fit"):
        RoutedModel(shared, base, tok, router, wide)
    with pytest.raises(ConfigError, match="unknown task"):
        routed.run(texts[:2], oracle=["a", "zzz"])


def test_grouped_compute_runs_each_task_slice_through_its_materialized_layers(routed_family, tmp_path: Path):
    import copy

    _root, _base_dir, shared_dir, base, shared, tok, router, patches, texts = routed_family
    grouped = RoutedModel(shared, base, tok, router, patches, batch_size=16)
    delta = RoutedModel(shared, base, tok, router, patches, batch_size=16, compute="delta")
    assert grouped._grouped._by_id is None and delta._grouped is None  # built on first use, for grouped only
    names = ["b" if i % 3 else "a" for i in range(len(texts))]  # tasks interleaved in each batch
    got, want = grouped.run(texts, oracle=names), delta.run(texts, oracle=names)
    for g, d in zip(got, want):
        torch.testing.assert_close(g.features, d.features, rtol=1e-5, atol=1e-5)
    assert grouped._grouped._by_id is not None  # the grouped path ran
    # Each input's result is its own, in input order: the same text alone gives the same features.
    alone = grouped.run(texts[4:5], oracle=names[4:5])[0]
    torch.testing.assert_close(got[4].features, alone.features, rtol=1e-5, atol=1e-5)
    # The materialized weights are θ_shared's with the task's rows written in; a task without rows there has none.
    modules = dict(shared.named_modules())
    by_id = grouped._grouped.weights()
    for j, task in enumerate(router.tasks):
        state = materialized(shared, patches, [task], [1.0]).state_dict()
        for name in patches[task]:
            layer = name.rpartition(".")[0]
            weight, bias = by_id[id(modules[layer])][j]
            torch.testing.assert_close(weight, state[f"{layer}.weight"], rtol=0, atol=1e-6)
            assert bias is None or torch.equal(bias, state[f"{layer}.bias"])
            assert weight.data_ptr() != modules[layer].weight.data_ptr()
    assert grouped._grouped.names == {n.rpartition(".")[0] for p in patches.values() for n in p}
    # A deep copy of θ_shared computes with its own weights, not the grouped ones nor the original's.
    clone = copy.deepcopy(shared)
    layer = sorted(grouped._grouped.names)[0]
    dict(clone.named_modules())[layer].weight.data.zero_()
    batch = dict(tok(texts[:3], padding=True, return_tensors="pt"))
    with torch.no_grad():
        assert not torch.allclose(clone(**batch).pooler_output, shared(**batch).pooler_output)
    # Mixtures cannot be grouped: they go to the delta hooks.
    assert task_groups(torch.tensor([[0.6, 0.4], [1.0, 0.0]])) is None
    order, groups = task_groups(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    assert order.tolist() == [1, 0, 2] and groups == [(0, 0, 1), (1, 1, 3)]
    # The choice is saved with the model; a bad one is refused, naming where it came from.
    delta.save(tmp_path / "r", shared_dir, _base_dir)
    assert RoutedModel.load(tmp_path / "r").compute == "delta"
    assert RoutedModel.load(tmp_path / "r", compute="grouped").compute == "grouped"  # a caller's choice wins
    manifest = json.loads((tmp_path / "r" / "routed.json").read_text())
    (tmp_path / "r" / "routed.json").write_text(json.dumps({**manifest, "compute": "fast"}))
    with pytest.raises(CheckpointError, match=r"routed\.json: compute must be 'grouped' or 'delta', got 'fast'"):
        RoutedModel.load(tmp_path / "r")
    with pytest.raises(ConfigError, match="routed compute must be"):
        RoutedModel(shared, base, tok, router, patches, compute="sparse")


def test_grouped_forward_takes_only_plain_linear_layers():
    """A linear subclass with its own forward (quantized, LoRA) keeps its forward and the delta path."""
    from merging.minmerging.grouped import GroupedLinears

    class Doubling(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), Doubling(3, 2))
    patches = {
        "a": {"0.weight": (torch.tensor([1]), torch.ones(1, 4)), "1.weight": (torch.tensor([0]), torch.ones(1, 3))}
    }
    grouped = GroupedLinears(model, patches, ["a"])
    assert grouped.install() == {"0"}
    x = torch.randn(5, 4)
    with torch.no_grad():
        want = 2 * torch.nn.functional.linear(model[0](x), model[1].weight, model[1].bias)
        torch.testing.assert_close(model(x), want)  # outside a routed forward: each layer as it was
        with grouped.active([(0, 0, 5)]):
            hidden = torch.nn.functional.linear(x, grouped.weights()[id(model[0])][0][0], model[0].bias)
            torch.testing.assert_close(model(x), 2 * torch.nn.functional.linear(hidden, model[1].weight, model[1].bias))
    assert torch.equal(grouped.weights()[id(model[0])][0][0][1], torch.ones(4))


def test_routed_model_is_safe_to_share_between_threads(routed_family):
    from concurrent.futures import ThreadPoolExecutor

    _root, _base_dir, _shared_dir, base, shared, tok, router, patches, texts = routed_family
    routed = RoutedModel(shared, base, tok, router, patches, router_layer=1, batch_size=4)
    jobs = [(texts, ["a"] * len(texts)), (texts, ["b"] * len(texts)), (texts, None)] * 4
    alone = [routed.run(t, oracle=o) for t, o in jobs[:3]]
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(lambda job: routed.run(job[0], oracle=job[1]), jobs))
    for i, got in enumerate(together):
        want = alone[i % 3]
        assert [r.task for r in got] == [r.task for r in want]
        for g, w in zip(got, want):
            torch.testing.assert_close(g.features, w.features, rtol=1e-5, atol=1e-6)


def test_routed_model_ood_inputs_run_on_the_configured_model(routed_family):
    _root, _base_dir, _shared_dir, base, shared, tok, router, patches, texts = routed_family
    strict = Router(router.net, router.tasks, threshold=1.01)  # nothing is in domain
    for ood_model, model in (("base", base), ("shared", shared)):
        routed = RoutedModel(shared, base, tok, strict, patches, ood_model=ood_model)
        got = routed.run(texts[:3])
        assert all(r.task is None for r in got)
        with torch.no_grad():
            want = model(**dict(tok(texts[:1], return_tensors="pt"))).pooler_output[0]
        torch.testing.assert_close(got[0].features, want, rtol=1e-4, atol=1e-5)


def test_oracle_routing_uses_the_named_task_whatever_the_router_says(routed_family):
    _root, _base_dir, _shared_dir, base, shared, tok, router, patches, texts = routed_family
    strict = Router(router.net, router.tasks, threshold=1.01)  # the router would call everything out of domain
    routed = RoutedModel(shared, base, tok, strict, patches, top_k=2, batch_size=5)
    names = ["b" if i % 3 else "a" for i in range(len(texts))]
    got = routed.run(texts, oracle=names)
    for text, name, r in zip(texts, names, got):
        assert r.task == name and r.experts == [name]
        with torch.no_grad():
            want = materialized(shared, patches, [name], [1.0])(**dict(tok([text], return_tensors="pt"))).pooler_output[
                0
            ]
        torch.testing.assert_close(r.features, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="2 task names for 3 inputs"):
        routed.run(texts[:3], oracle=["a", "b"])


def test_routed_model_saves_and_loads(routed_family, tmp_path: Path):
    _root, base_dir, shared_dir, base, shared, tok, router, patches, texts = routed_family
    heads = {"a": Head(torch.randn(2, 32), torch.zeros(2)), "b": Head(torch.randn(3, 32), torch.zeros(3))}
    routed = RoutedModel(shared, base, tok, router, patches, heads=heads)
    sizes = routed.save(tmp_path / "routed", shared_dir, base_dir)
    assert sizes["patch:a"] > 0 and sizes["router"] > 0
    loaded = RoutedModel.load(tmp_path / "routed")
    a, b = routed.run(texts), loaded.run(texts)
    assert [r.task for r in a] == [r.task for r in b] and [r.label for r in a] == [r.label for r in b]
    assert all(r.label is not None for r in b if r.task)
    with pytest.raises(ConfigError, match="router does not know"):
        RoutedModel(shared, base, tok, router, {"zzz": patches["a"]})
    with pytest.raises(CheckpointError, match=r"routed\.json"):
        RoutedModel.load(tmp_path / "nothing")


# --- building a MIN-Merging model ----------------------------------------------------------------


def test_build_min_merging_shared_model_is_base_plus_masked_task_vectors(tmp_path: Path):
    from transformers import AutoModel

    from merging.minmerging.build import MinMergingOptions, build_min_merging

    base_dir, fts = build_family(tmp_path / "fam", "bert", 2, classification=True, scale=0.5)
    calibration = {
        "a": ["merge the model", "a neuron of the model", "the base"],
        "b": ["task vectors", "of the fine tune", "a task"],
    }
    options = MinMergingOptions(  # importance auto (the default): the row norm on an encoder, checked below
        neuron_ratio=0.25,
        shared_from="enhanced",
        shared_method="task_arithmetic",
        shared_parameters={"lambda": 1.0},
        router=RouterOptions(holdout=0.34),
    )
    assert options.importance == "auto"
    report = build_min_merging(base_dir, {"a": fts[0], "b": fts[1]}, calibration, tmp_path / "min", options)
    base = AutoModel.from_pretrained(base_dir)
    shared = AutoModel.from_pretrained(report.shared_dir)
    tuned = [AutoModel.from_pretrained(f) for f in fts]
    name = "encoder.layer.0.intermediate.dense.weight"
    expected = base.state_dict()[name].clone()
    for model in tuned:
        tau = task_vectors(base, model)[name]
        idx = top_rows(norm_importance({name: tau}), 0.25)[name]
        expected[idx] += tau[idx]
    torch.testing.assert_close(shared.state_dict()[name], expected)
    # Patches hold a quarter of each linear layer's rows; far smaller than the fine-tunes.
    storage = report.storage
    assert 0 < storage["patch_bytes"] < 0.5 * storage["finetunes_bytes"]
    assert len(report.overlap) == 2 and report.overlap[0][0] == 1.0
    routed = RoutedModel.load(tmp_path / "min")
    assert len(routed.run(["merge the model", "a task"])) == 2
    saved = json.loads((tmp_path / "min" / "min_merging_report.json").read_text())
    assert saved["storage"] == storage


def test_default_shared_model_is_the_base_bit_for_bit_and_routed_inputs_see_only_their_rows(tmp_path: Path):
    """shared_from auto (the default) on an encoder is base: θ_shared is θ₀ exactly; an input routed to a task runs
    θ₀ with that task's kept rows written in, and no other task's vector anywhere."""
    from safetensors.torch import load_file

    from merging.minmerging.build import MinMergingOptions, build_min_merging

    base_dir, fts = build_family(tmp_path / "fam", "bert", 2, classification=True, scale=0.5)
    calibration = {"a": ["merge the model", "the base", "a"], "b": ["task vectors", "of the fine tune", "b"]}
    options = MinMergingOptions(importance="norm", neuron_ratio=0.25, router=RouterOptions(holdout=0.34))
    assert options.shared_from == "auto"
    report = build_min_merging(base_dir, {"a": fts[0], "b": fts[1]}, calibration, tmp_path / "min", options)
    base = load_file(str(base_dir / "model.safetensors"))
    shared = load_file(str(report.shared_dir / "model.safetensors"))
    for name, value in shared.items():
        original = base.get(name, base.get(name.removeprefix("bert."), base.get(f"bert.{name}")))
        assert original is not None and torch.equal(value, original), name
    routed = RoutedModel.load(tmp_path / "min")
    text = "merge the model"
    for task in ("a", "b"):
        got = routed.run([text], oracle=[task])[0].features
        want = materialized(routed.shared, routed.patches, [task], [1.0])(**dict(routed._batch([text]))).pooler_output
        torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)
    # A shared method named together with shared_from base is a contradiction, not silently ignored.
    with pytest.raises(ConfigError, match="shared_from base"):
        MinMergingOptions(shared_from="base", shared_method="ties")
    from merging.minmerging.params import MinMergingParams, resolve_importance, resolve_shared_from

    # Naming a shared method means a merged θ_shared; auto resolves by the base model's kind.
    assert MinMergingOptions(shared_method="ties").shared_from == "enhanced"
    assert MinMergingParams(shared_method="ties").shared_from == "enhanced"
    assert (resolve_shared_from("auto", False), resolve_shared_from("auto", True)) == ("base", "enhanced")
    # importance auto: the row norm for encoders (measured best on zoo v2), activation for causal LMs
    assert MinMergingParams().importance == "auto" and MinMergingOptions().importance == "auto"
    assert (resolve_importance("auto", False), resolve_importance("auto", True)) == ("norm", "activation")
    assert resolve_importance("activation", False) == "activation" and resolve_importance("norm", True) == "norm"
    with pytest.raises(ValueError, match="shared_from base"):
        MinMergingParams(shared_from="base", shared_parameters={"lambda": 0.5})
    with pytest.raises(ValueError, match="shared_from auto makes θ_shared θ₀ for an encoder"):
        MinMergingParams(shared_from="auto", shared_method="ties")


def test_build_min_merging_variants_whole_finetunes_model_budget_small_tensors(tmp_path: Path):
    from transformers import AutoModel

    from merging.minmerging.build import MinMergingOptions, build_min_merging

    base_dir, fts = build_family(tmp_path / "fam", "bert", 2, classification=True, scale=0.5)
    calibration = {"a": ["merge the model", "the base", "a"], "b": ["task vectors", "of the fine tune", "b"]}
    common = {"importance": "norm", "neuron_ratio": 0.25, "shared_method": "task_arithmetic"}
    common["shared_parameters"] = {"lambda": 1.0}
    reports = {}
    for label, extra in (
        ("rows", {"shared_from": "enhanced"}),
        ("whole", {"shared_from": "finetuned", "budget": "model", "patch_small_tensors": True}),
    ):
        options = MinMergingOptions(**common, **extra, router=RouterOptions(holdout=0.34))
        reports[label] = build_min_merging(base_dir, {"a": fts[0], "b": fts[1]}, calibration, tmp_path / label, options)
    base = AutoModel.from_pretrained(base_dir)
    tuned = [AutoModel.from_pretrained(f) for f in fts]
    shared = AutoModel.from_pretrained(reports["whole"].shared_dir)
    # θ_shared from the whole fine-tunes: θ₀ + Στₜ on every tensor, masked or not.
    for name in ("encoder.layer.0.intermediate.dense.weight", "encoder.layer.1.output.LayerNorm.weight"):
        expected = base.state_dict()[name] + sum(m.state_dict()[name] - base.state_dict()[name] for m in tuned)
        torch.testing.assert_close(shared.state_dict()[name], expected)
    # The model-wide budget keeps a quarter of all rows in all, and the small tensors' bytes count in storage.
    routed = RoutedModel.load(tmp_path / "whole")
    linear_rows = sum(t.shape[0] for t in task_vectors(base, tuned[0]).values())
    kept = sum(idx.numel() for idx, rows in routed.patches["a"].values() if rows.dim() == 2)
    assert kept == math.ceil(0.25 * linear_rows)
    assert any(rows.dim() == 1 for _idx, rows in routed.patches["a"].values())
    assert reports["whole"].storage["patch_bytes"] > reports["rows"].storage["patch_bytes"]
    assert [r.task for r in routed.run(["merge the model", "task vectors"])] != [None, None]


def test_float16_patches_halve_storage_and_route_as_models_with_those_rows(tmp_path: Path):
    """patch_dtype auto (the default) on a float32 model: the stored rows are the fine-tune's rounded to float16,
    about half the bytes, the storage estimate agrees with the tensors, and a routed input runs exactly θ_shared
    with those stored rows."""
    from transformers import AutoModel

    from merging.minmerging.auto import estimated_patch_fraction
    from merging.minmerging.build import MinMergingOptions, build_min_merging
    from merging.minmerging.params import MinMergingParams, patch_torch_dtype

    base_dir, fts = build_family(tmp_path / "fam", "bert", 2, classification=True, scale=0.5)
    calibration = {"a": ["merge the model", "the base", "a"], "b": ["task vectors", "of the fine tune", "b"]}
    reports, routed = {}, {}
    for label, dtype in (("fp32", "float32"), ("fp16", "auto")):  # auto: float16 for this float32 model
        options = MinMergingOptions(
            importance="norm", neuron_ratio=0.25, patch_dtype=dtype, router=RouterOptions(holdout=0.34)
        )
        reports[label] = build_min_merging(base_dir, {"a": fts[0], "b": fts[1]}, calibration, tmp_path / label, options)
        routed[label] = RoutedModel.load(tmp_path / label)
    for name, (idx, rows) in routed["fp16"].patches["a"].items():
        idx32, rows32 = routed["fp32"].patches["a"][name]
        assert rows.dtype == torch.float16 and rows32.dtype == torch.float32, name
        assert torch.equal(idx, idx32) and torch.equal(rows, rows32.half()), name
    fp16, fp32 = (reports[k].storage["patch_bytes:a"] for k in ("fp16", "fp32"))
    assert 0.45 < fp16 / fp32 < 0.6
    base = AutoModel.from_pretrained(base_dir)
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    for label, dtype in (("fp16", torch.float16), ("fp32", None)):  # the tensors' bytes (the files add a header)
        held = sum(i.numel() * 8 + r.numel() * r.element_size() for i, r in routed[label].patches["a"].values())
        assert estimated_patch_fraction(base, 0.25, dtype=dtype) == pytest.approx(held / model_bytes, rel=0.02)
    model, text = routed["fp16"], "merge the model"
    for task in ("a", "b"):
        got = model.run([text], oracle=[task])[0].features
        want = materialized(model.shared, model.patches, [task], [1.0])(**dict(model._batch([text]))).pooler_output
        torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)
    assert MinMergingParams().patch_dtype == "auto" and MinMergingParams(patch_dtype="float16").patch_dtype == "float16"
    assert patch_torch_dtype("auto", torch.float32) == torch.float16
    assert patch_torch_dtype("auto", torch.bfloat16) == torch.bfloat16  # a low-precision model's rows as they are
    assert patch_torch_dtype("float32", torch.bfloat16) == torch.float32
    with pytest.raises(ValueError, match="patch_dtype"):
        MinMergingParams(patch_dtype="bfloat16")


def test_router_depth_auto_keeps_the_most_accurate_held_out_depth(tmp_path: Path):
    from merging.minmerging.build import MinMergingOptions, build_min_merging

    base_dir, fts = build_family(tmp_path / "fam", "bert", 2, classification=True, scale=0.5)
    words = ["merge", "model", "neuron", "task", "vector", "base", "fine", "tune", "the", "a", "of"]
    calibration = {
        "a": [f"{words[i % 5]} {words[(i + 2) % 5]}" for i in range(20)],
        "b": [f"{words[5 + i % 6]} {words[5 + (i + 1) % 6]}" for i in range(20)],
    }
    options = MinMergingOptions(importance="norm", neuron_ratio=0.2, router=RouterOptions(holdout=0.3))
    report = build_min_merging(base_dir, {"a": fts[0], "b": fts[1]}, calibration, tmp_path / "m", options)
    r = report.router
    by_depth = [r[f"held_out_accuracy_after_{k}_layers"] for k in range(3)]  # the tiny encoder has 2 layers
    chosen = int(r["router_layer"])
    assert by_depth[chosen] == max(by_depth) and all(a < max(by_depth) for a in by_depth[:chosen])
    assert r["router_accuracy"] == by_depth[chosen]
    routed = RoutedModel.load(tmp_path / "m")
    assert routed.router_layer == chosen
    # A fixed depth is used as given, and recorded in the folder.
    fixed = MinMergingOptions(importance="norm", neuron_ratio=0.2, router_layer=0, router=RouterOptions(holdout=0.3))
    report = build_min_merging(base_dir, {"a": fts[0], "b": fts[1]}, calibration, tmp_path / "f", fixed)
    assert "router_layer" not in report.router and RoutedModel.load(tmp_path / "f").router_layer == 0


def test_build_min_merging_bad_calibration(tmp_path: Path):
    from merging.minmerging.build import build_min_merging

    base_dir, fts = build_family(tmp_path / "fam", "bert", 2, scale=0.5)
    with pytest.raises(ConfigError, match="match no fine-tune"):
        build_min_merging(base_dir, {"a": fts[0], "b": fts[1]}, {"a": ["x"], "b": ["y"], "c": ["z"]}, tmp_path / "o")
    with pytest.raises(ConfigError, match="no calibration texts for task"):
        build_min_merging(base_dir, {"a": fts[0], "b": fts[1]}, {"a": ["x"]}, tmp_path / "o")
    with pytest.raises(ConfigError, match="at least two fine-tunes"):
        build_min_merging(base_dir, {"a": fts[0]}, {"a": ["x"]}, tmp_path / "o")


def test_routed_model_as_mlflow_pyfunc_predicts_from_text(tmp_path: Path):
    import mlflow
    import pandas as pd

    from merging.minmerging.build import MinMergingOptions, build_min_merging
    from tasks.routed_model import log_routed_model

    base_dir, fts = build_family(tmp_path / "fam", "bert", 2, classification=True, scale=0.5)
    calibration = {"a": ["merge the model", "a neuron", "the base"], "b": ["task vectors", "of the fine tune", "a"]}
    heads = {"a": Head(torch.randn(2, 32), torch.zeros(2)), "b": Head(torch.randn(3, 32), torch.zeros(3))}
    options = MinMergingOptions(importance="norm", neuron_ratio=0.2, router=RouterOptions(holdout=0.34))
    build_min_merging(base_dir, {"a": fts[0], "b": fts[1]}, calibration, tmp_path / "min", options, heads)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("routed", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log_routed_model(tmp_path / "min", tmp_path)
    shutil.rmtree(tmp_path / "fam")  # the logged model must not need the original folders
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "dl")))
    assert not list(local.rglob("*.pkl")) and "model_code_path" in (local / "MLmodel").read_text()  # code, no pickle
    assert any(r.startswith("mergeflow==") for r in (local / "requirements.txt").read_text().split())
    model = mlflow.pyfunc.load_model(info.model_uri)
    out = model.predict(pd.DataFrame({"text": ["merge the model", "task vectors", "a neuron"]}))
    assert list(out.columns) == ["task", "label", "confidence", "experts"] and len(out) == 3
    assert set(out["task"].dropna()) <= {"a", "b"}
    for task, label in zip(out["task"], out["label"]):
        if task is not None:
            assert 0 <= label < heads[task].num_labels


def test_routed_report_on_tiny_tasks(tmp_path: Path):
    from merging.evaluation import Evaluator
    from merging.minmerging.build import MinMergingOptions, build_min_merging
    from merging.minmerging.evaluate import routed_report
    from tests.helpers import build_tiny_tasks

    base_dir, fts, tasks = build_tiny_tasks(tmp_path / "tiny")
    evaluator = Evaluator(tasks, base_dir)
    calibration = {t: evaluator.split(t, "train").texts for t in ("two", "three")}
    heads = {t: evaluator.task_head(t) for t in ("two", "three")}
    options = MinMergingOptions(importance="activation", neuron_ratio=0.2, router=RouterOptions(holdout=0.25))
    build_min_merging(base_dir, {"two": fts[0], "three": fts[1]}, calibration, tmp_path / "m", options, heads)
    routed = RoutedModel.load(tmp_path / "m")
    report = routed_report(evaluator, routed, "test")
    assert set(report["scores"]) == {"two", "three"} and set(report["ood"]) == {"ood"}
    # By hand for task "two": the routed features through its own head, against the gold labels.
    results = routed.run(evaluator.split("two", "test").texts)
    feats = torch.stack([r.features for r in results])
    by_hand = float((heads["two"].predict(feats) == evaluator.labels("two", "test")).float().mean())
    assert report["scores"]["two"] == pytest.approx(by_hand)
    routed_share = sum(r.task == "two" for r in results) / len(results)
    assert report["routing_accuracy"]["two"] == pytest.approx(routed_share)
    assert 0 <= report["strict"]["two"] <= report["routing_accuracy"]["two"] + 1e-9
    assert 0 <= report["ood"]["ood"]["flagged_out_of_domain"] <= 1
    # The confusion matrix counts every input once, and agrees with routing accuracy and the OOD share.
    confusion = report["routing_confusion"]
    assert set(confusion) == {"two", "three", "ood"}
    assert confusion["two"]["two"] == sum(r.task == "two" for r in results)
    assert sum(confusion["two"].values()) == len(results)
    assert set(confusion["two"]) == {"two", "three", "out_of_domain"}
    ood_total = len(evaluator.split("ood", "test"))
    assert confusion["ood"]["out_of_domain"] / ood_total == pytest.approx(report["ood"]["ood"]["flagged_out_of_domain"])
    flagged = sum(confusion[t]["out_of_domain"] for t in ("two", "three"))
    assert report["in_domain_flagged"] == pytest.approx(
        flagged / sum(sum(confusion[t].values()) for t in ("two", "three"))
    )
