"""MIN-Merging's neuron importance against slow, obvious computations, and its router."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

from merging.errors import CheckpointError, ConfigError
from merging.minmerging.importance import (
    activation_importance,
    neuron_linears,
    norm_importance,
    overlap_matrix,
    task_vectors,
    top_rows,
)
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
