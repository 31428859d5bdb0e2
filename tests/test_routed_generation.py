"""MIN-Merging on a causal LM: routed generation and perplexity, against materialized patched models.

The family is the tiny Llama of test_lm_evaluation.py, whose two fine-tunes are really trained on two
word domains (alpha, beta); gamma is held out. The routed model's hooks must give exactly what a real
copy of θ_shared with the task's rows written in gives (logits, greedy tokens, perplexity), RMSNorm
scales included; out-of-domain prompts must generate exactly what θ₀ generates; the pipeline must
evaluate the routed model by perplexity and register a pyfunc that takes prompts and returns text
and the route.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from flows.merge_pipeline import run_pipeline
from merging.config import parse_config
from merging.errors import CheckpointError, ConfigError
from merging.evaluation.causal import perplexity
from merging.evaluation.lm import LmEvaluator
from merging.minmerging.build import MinMergingOptions, build_min_merging
from merging.minmerging.generation import generate, routed_perplexity
from merging.minmerging.importance import norm_importance, task_vectors, top_rows
from merging.minmerging.lm_report import routed_lm_report
from merging.minmerging.models import load_model, load_tokenizer
from merging.minmerging.patches import neuron_patch
from merging.minmerging.routed import RoutedModel
from merging.minmerging.router import RouterOptions, train_router
from tests.test_lm_evaluation import (
    _merge_config,
    _tasks,
    domains,  # noqa: F401  (the tiny Llama family and its text domains)
)

TASKS = ("alpha", "beta")


@pytest.fixture(scope="module")
def routed_lm(domains, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    root, base, fts = domains
    evaluator = LmEvaluator(_tasks(root, fts), base)
    calibration = {t: evaluator.texts(t, "train") for t in TASKS}
    out = tmp_path_factory.mktemp("routed-lm") / "routed"
    options = MinMergingOptions(
        neuron_ratio=0.25, max_length=32, batch_size=8, router=RouterOptions(holdout=0.25, epochs=200)
    )
    report = build_min_merging(base, {t: fts[t] for t in TASKS}, calibration, out, options, None, None)
    return root, base, fts, evaluator, out, report


def materialized(shared: torch.nn.Module, patches: dict, task: str) -> torch.nn.Module:
    """Returns a real copy of θ_shared with the task's rows written in, row by row."""
    patched = copy.deepcopy(shared)
    state = patched.state_dict()
    with torch.no_grad():
        for name, (idx, rows) in patches[task].items():
            for r, k in enumerate(idx.tolist()):
                state[name][k] = rows[r]
    return patched


def test_the_routed_folder_is_a_causal_lm_that_routes_each_domain(routed_lm):
    _root, _base, _fts, evaluator, out, report = routed_lm
    manifest = json.loads((out / "routed.json").read_text())
    assert manifest["model"] == "causal_lm" and manifest["tasks"] == list(TASKS)
    routed = RoutedModel.load(out)
    assert routed.causal and type(routed.shared).__name__ == "LlamaForCausalLM"
    assert set(routed.patches) == set(TASKS)
    assert all("lm_head" not in name for patch in routed.patches.values() for name in patch)
    assert report.router["router_accuracy"] >= 0.9
    for task in TASKS:
        routes = routed.routes(evaluator.texts(task, "test"))
        assert sum(r.task == task for r in routes) / len(routes) >= 0.9, task
        assert all(0 <= r.confidence <= 1 for r in routes)


def test_routed_logits_and_greedy_text_equal_a_materialized_model(routed_lm):
    _root, _base, _fts, evaluator, out, _ = routed_lm
    routed = RoutedModel.load(out)
    tok = routed.tokenizer
    prompts = evaluator.texts("alpha", "test")[:3] + evaluator.texts("beta", "test")[:3]
    before = {k: v.clone() for k, v in routed.shared.state_dict().items()}
    results = generate(routed, prompts, max_new_tokens=6)
    for prompt, got in zip(prompts, results):
        assert got.task in TASKS and got.experts == [got.task] and got.weights == [1.0]
        patched = materialized(routed.shared, routed.patches, got.task)
        batch = _ids(tok([prompt], return_tensors="pt"))
        with torch.no_grad():
            want = patched.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
            assert got.text == tok.decode(want[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            with routed.routing(routed.expert_weights([got.task], [1.0])):
                routed_logits = routed.shared(**batch).logits
            torch.testing.assert_close(routed_logits, patched(**batch).logits, rtol=1e-4, atol=1e-5)
    for k, v in routed.shared.state_dict().items():  # θ_shared itself was never written
        assert torch.equal(v, before[k])


def test_rms_norm_scales_and_mixed_routes_in_one_batch_equal_materialized_models(routed_lm):
    _root, base, fts, evaluator, out, _ = routed_lm
    routed = RoutedModel.load(out)
    base_model = load_model(base, True)
    patches = {}
    for task in TASKS:
        tuned = load_model(fts[task], True)
        masks = top_rows(norm_importance(task_vectors(base_model, tuned)), 0.25)
        patches[task] = neuron_patch(tuned, masks, small_tensors=True)
    norms = [n for n in patches["alpha"] if n.endswith("norm.weight")]
    assert any("input_layernorm" in n for n in norms) and "model.norm.weight" in norms  # RMSNorm scales patched
    with_norms = RoutedModel(routed.shared, routed.base, routed.tokenizer, routed.router, patches)
    texts = evaluator.texts("alpha", "test")[:2] + evaluator.texts("beta", "test")[:2]
    batch = routed.tokenizer(texts, padding=True, return_tensors="pt")
    weights = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.0, 1.0], [0.5, 0.5]])  # per-row routes, top-2 mixes
    with torch.no_grad(), with_norms.routing(weights):
        logits = with_norms.shared(**batch).logits
    for row, w in enumerate(weights.tolist()):
        patched = copy.deepcopy(routed.shared)
        state, originals = patched.state_dict(), {k: v.clone() for k, v in routed.shared.state_dict().items()}
        with torch.no_grad():
            for task, wt in zip(TASKS, w):
                for name, (idx, rows) in patches[task].items():
                    for r, k in enumerate(idx.tolist()):
                        state[name][k] += wt * (rows[r] - originals[name][k])
            want = patched(**{k: v[row : row + 1] for k, v in batch.items()}).logits[0]
        keep = batch["attention_mask"][row].bool()
        torch.testing.assert_close(logits[row][keep], want[keep], rtol=1e-4, atol=1e-5)


def test_a_tied_lm_head_patch_equals_a_materialized_model_on_both_sides():
    """With tied embeddings, writing an LM head row also changes that token's input embedding: the hooks must
    do both (the output logit and the looked-up row), as a materialized model does."""
    from transformers import LlamaForCausalLM

    from merging.synthetic import _llama_config

    config = _llama_config(tie=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    base.lm_head.weight = base.get_input_embeddings().weight  # tied, whatever the library's defaults
    tuned_models = []
    for _ in TASKS:
        tuned = copy.deepcopy(base)  # the copy keeps the tie
        with torch.no_grad():
            for param in tuned.parameters():
                param.add_(0.5 * param.std() * torch.randn_like(param))
        tuned_models.append(tuned)
    assert tuned_models[0].lm_head.weight is tuned_models[0].get_input_embeddings().weight
    patches = {}
    for task, tuned in zip(TASKS, tuned_models):
        masks = top_rows(norm_importance(task_vectors(base, tuned, lm_head=True)), 0.25)
        assert "lm_head.weight" in masks and "model.layers.0.mlp.up_proj.weight" in masks
        patches[task] = neuron_patch(tuned, masks)
    router = train_router(torch.randn(8, 4), torch.tensor([0, 1] * 4), list(TASKS), RouterOptions(epochs=5))
    shared = tuned_models[0]  # any model of the family stands in for θ_shared
    routed = RoutedModel(shared, base, None, router, patches)
    ids = torch.arange(64).view(2, 32)  # every token: patched and unpatched rows alike
    for task in TASKS:
        with torch.no_grad(), routed.routing(routed.expert_weights([task], [1.0])):
            got = shared(input_ids=ids).logits
        want = materialized(shared, patches, task)(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    head_only = {t: {"lm_head.weight": p["lm_head.weight"]} for t, p in patches.items()}
    tied_hooks = RoutedModel(shared, base, None, router, head_only)._deltas
    assert {kind for _j, kind, *_ in tied_hooks["model.embed_tokens"]} == {"embedding"}


def test_out_of_domain_prompts_generate_exactly_what_the_base_generates(routed_lm):
    _root, base, _fts, evaluator, out, _ = routed_lm
    routed = RoutedModel.load(out)
    routed.router.threshold = 1.01  # no prompt is confident enough: every one is out-of-domain
    prompts = [t[:30] for t in evaluator.texts("gamma", "test")[:3]]
    results = generate(routed, prompts, max_new_tokens=5)
    base_model, tok = load_model(base, True), load_tokenizer(base, True)
    for prompt, got in zip(prompts, results):
        assert got.task is None and got.experts == []
        batch = _ids(tok([prompt], return_tensors="pt"))
        want = base_model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert got.text == tok.decode(want[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def test_routed_perplexity_with_oracle_routes_equals_the_materialized_models(routed_lm):
    _root, _base, _fts, evaluator, out, _ = routed_lm
    routed = RoutedModel.load(out)
    for task in TASKS:
        texts = evaluator.texts(task, "test")
        got, routes = routed_perplexity(routed, texts, 32, oracle=[task] * len(texts))
        assert all(r.task == task for r in routes)
        want = perplexity(materialized(routed.shared, routed.patches, task), routed.tokenizer, texts, 32)
        assert got["nll"] == pytest.approx(want["nll"], rel=1e-5) and got["tokens"] == want["tokens"]


def test_the_routed_report_scores_domains_by_the_hand_formula(routed_lm):
    _root, _base, fts, evaluator, out, _ = routed_lm
    routed = RoutedModel.load(out)
    report = routed_lm_report(evaluator, routed, "test")
    oracle = routed_lm_report(evaluator, routed, "test", oracle=True, out_of_domain=False)
    for task in TASKS:
        base_nll = evaluator.score(evaluator.base, task, "test")["nll"]
        tuned_nll = evaluator.score(fts[task], task, "test")["nll"]
        got = report["nll"][task]
        assert report["normalized"][task] == pytest.approx((base_nll - got) / (base_nll - tuned_nll))
        assert report["normalized"][task] > 0  # the routed model keeps part of each fine-tune's gain
        assert sum(report["routing_confusion"][task].values()) == len(evaluator.texts(task, "test"))
        assert oracle["routing_accuracy"][task] == 1.0
    gamma = report["ood"]["gamma"]
    assert gamma["retention"] == pytest.approx(gamma["base_probe"] / gamma["merged_probe"])
    assert 0 <= gamma["flagged_out_of_domain"] <= 1 and "gamma" not in oracle["ood"]


def test_generation_refuses_an_encoder_routed_model(tmp_path: Path):
    from merging.synthetic import build_family

    base_dir, _ = build_family(tmp_path / "encoder", "bert", 0)
    encoder = load_model(base_dir, False)
    router = train_router(torch.randn(8, 4), torch.tensor([0, 1] * 4), list(TASKS), RouterOptions(epochs=5))
    routed = RoutedModel(encoder, encoder, None, router, {})
    assert not routed.causal
    with pytest.raises(ConfigError, match="is an encoder"):
        generate(routed, ["a prompt"])
    with pytest.raises(ConfigError, match="is an encoder"):
        routed_perplexity(routed, ["a text"])


def test_neuron_ratio_auto_chooses_on_validation_perplexity(routed_lm, tmp_path: Path):
    from merging.minmerging.auto import choose_neuron_ratio

    _root, base, fts, evaluator, _out, _ = routed_lm
    calibration = {t: evaluator.texts(t, "train") for t in TASKS}
    options = MinMergingOptions(max_length=32, batch_size=8, router=RouterOptions(holdout=0.25, epochs=200))
    choice = choose_neuron_ratio(
        base, {t: fts[t] for t in TASKS}, calibration, evaluator, tmp_path, options, 0.9, [0.1, 0.5]
    )
    assert [p.neuron_ratio for p in choice.points] == [0.1, 0.5]
    best = max(choice.points, key=lambda p: p.validation_normalized)
    assert choice.neuron_ratio == best.neuron_ratio and all(p.routing_accuracy >= 0.9 for p in choice.points)
    assert choice.points[1].patch_fraction > choice.points[0].patch_fraction  # measured on the built patches
    assert not list(tmp_path.iterdir())  # every trial folder removed


def test_prompt_like_cuts_a_seeded_half_to_prefixes(routed_lm):
    from merging.minmerging.build import prompt_like

    _root, _base, _fts, evaluator, out, _ = routed_lm
    tok = RoutedModel.load(out).tokenizer
    texts = evaluator.texts("alpha", "train")[:20]
    cut = prompt_like(tok, texts, 32, seed=3)
    assert cut == prompt_like(tok, texts, 32, seed=3) and cut != prompt_like(tok, texts, 32, seed=4)
    changed = [i for i, (a, b) in enumerate(zip(texts, cut)) if a != b]
    assert 5 <= len(changed) <= 10  # half were drawn; a drawn text cut at its full length stays whole
    for i in changed:
        ids, whole = tok(cut[i], add_special_tokens=False)["input_ids"], tok(texts[i], add_special_tokens=False)
        assert 4 <= len(ids) < len(whole["input_ids"]) and whole["input_ids"][: len(ids)] == ids


def test_bad_generation_requests_and_bad_routed_folders_are_named(routed_lm, tmp_path: Path):
    _root, _base, _fts, _evaluator, out, _ = routed_lm
    routed = RoutedModel.load(out)
    with pytest.raises(ConfigError, match=r"unknown option.*num_beams"):
        generate(routed, ["alpha"], num_beams=4)
    with pytest.raises(ConfigError, match=r"max_new_tokens must be in 1\.\.4096"):
        generate(routed, ["alpha"], max_new_tokens=0)
    with pytest.raises(ConfigError, match=r"causal LM: use merging\.minmerging\.generation"):
        routed.run(["alpha"])
    with pytest.raises(ConfigError, match="2 routes for a batch of 3"), routed.routing(torch.ones(2, 2)):
        routed.shared(**routed.tokenizer(["a", "b", "c"], padding=True, return_tensors="pt"))
    for field, value, message in [
        ("tasks", ["../../../etc/passwd"], "is not a plain name"),
        ("tasks", ["alpha", "patches/../beta"], "is not a plain name"),
        ("tasks", [], "non-empty list"),
        ("model", "seq2seq", "model must be 'encoder' or 'causal_lm'"),
    ]:
        copy_dir = tmp_path / f"bad-{field}-{len(str(value))}"
        shutil.copytree(out, copy_dir, ignore=shutil.ignore_patterns("*.safetensors"))
        shutil.copytree(out / "router", copy_dir / "router", dirs_exist_ok=True)
        manifest = json.loads((out / "routed.json").read_text()) | {field: value}
        (copy_dir / "routed.json").write_text(json.dumps(manifest))
        with pytest.raises(CheckpointError, match=message):
            RoutedModel.load(copy_dir)


def test_the_pipeline_evaluates_and_registers_a_routed_generator(prefect_harness, domains, tmp_path):  # noqa: F811
    import mlflow
    import pandas as pd

    root, base, fts = domains
    work = tmp_path / "work"
    data, tasks = _merge_config(root, base, fts)
    data |= {
        "merge_method": "min_merging",
        "parameters": {"neuron_ratio": 0.25, "max_length": 32},
        "calibration": {
            "tasks": [{"name": t, "dataset": str(root / "data" / t)} for t in TASKS],
            "ood": [{"name": "gamma", "dataset": str(root / "data" / "gamma")}],
            "router": {"holdout": 0.25, "epochs": 200},
        },
        "evaluation": {"tasks": tasks},
        "registry": {"model_name": "tiny-routed-lm", "tracking_uri": f"sqlite:///{work / 'mlflow.db'}"},
        "pipeline": {"workdir": str(work)},
    }
    result = run_pipeline(parse_config(data, "routed-lm.yml"))
    merged = result.report["models"]["merged"]
    assert set(merged["scores"]) == set(TASKS) and merged["routing_accuracy_average"] >= 0.9
    assert all(merged["normalized"][t] > 0 for t in TASKS), merged["normalized"]
    assert "gamma" in merged["ood"]
    assert result.metrics["routing_accuracy"] == pytest.approx(merged["routing_accuracy_average"])
    assert "shared" in result.report["models"]  # θ_shared alone, beside the routed model
    reg = result.registration
    assert reg is not None and "champion" in reg.aliases
    mlflow.set_tracking_uri(reg.tracking_uri)
    (tmp_path / "served").mkdir()  # MLflow downloads the model here, not into a temporary folder it leaves behind
    model = mlflow.pyfunc.load_model("models:/tiny-routed-lm@champion", dst_path=str(tmp_path / "served"))
    prompts = _texts_of(root, "alpha")[:2] + _texts_of(root, "beta")[:2]
    answer = model.predict(pd.DataFrame({"prompt": prompts}))
    assert list(answer.columns) == ["prompt", "generated_text", "task", "confidence", "experts"]
    assert list(answer["task"]) == ["alpha", "alpha", "beta", "beta"]
    assert all(isinstance(t, str) and t for t in answer["generated_text"])
    with pytest.raises(Exception, match="prompt"):
        model.predict(pd.DataFrame({"text": ["no prompt column"]}))


def _texts_of(root: Path, task: str) -> list[str]:
    import pyarrow.parquet as pq

    return [str(t) for t in pq.read_table(root / "data" / task / "test.parquet").column("text").to_pylist()]


def _ids(batch) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Returns the ids and mask of a tokenized batch (the test tokenizer also gives BERT's token types)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
