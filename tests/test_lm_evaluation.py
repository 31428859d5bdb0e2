"""Per-domain perplexity as evaluation tasks for causal LMs: the arithmetic by hand, the evaluator against
direct perplexity calls, and the pipeline choosing λ on validation and gating on a lower-is-better metric.

The family is a tiny generated Llama whose two fine-tunes are really trained (a few dozen AdamW steps)
on two distinct text domains, so each lowers its own domain's perplexity; a third domain is held out.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from flows.merge_pipeline import run_pipeline
from merging.config import parse_config
from merging.errors import ConfigError
from merging.evaluation.causal import load_causal_lm, perplexity
from merging.evaluation.data import TaskSpec
from merging.evaluation.lm import LmEvaluator, normalized_nll
from merging.synthetic import WORDS, build_family, write_bert_vocab
from merging.zoo.splits import write_parquet
from tests.test_pipeline import aliases

DOMAINS = {
    "alpha": WORDS[:12],  # function words
    "beta": [f"tok{i}" for i in range(12)],  # tokens no other domain uses
    "gamma": WORDS[12:],  # held out: no fine-tune
}


def _texts(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(14)) for _ in range(n)]


def _train(base: Path, texts: list[str], out: Path, steps: int = 40) -> Path:
    model, tokenizer = load_causal_lm(base)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lm-domains")
    base, _ = build_family(root / "family", "llama", 0, scale=0.0)
    write_bert_vocab(base, 64)
    for number, (name, words) in enumerate(DOMAINS.items()):
        for split, n in (("train", 32), ("validation", 12), ("test", 12)):
            texts = _texts(words, n, seed=100 * number + len(split))
            write_parquet(root / "data" / name / f"{split}.parquet", texts, [0] * n)  # the label is not read
    fts = {}
    for name in ("alpha", "beta"):
        train = _texts(DOMAINS[name], 32, seed=100 * list(DOMAINS).index(name) + len("train"))
        fts[name] = _train(base, train, root / f"ft-{name}")
    return root, base, fts


def _tasks(root: Path, fts: dict[str, Path]) -> list[TaskSpec]:
    return [
        TaskSpec(
            name=n,
            dataset=str(root / "data" / n),
            metric="perplexity",
            max_length=32,
            model=str(fts[n]) if n in fts else None,
        )
        for n in DOMAINS
    ]


def _merge_config(root: Path, base: Path, fts: dict[str, Path]) -> tuple[dict, list[dict]]:
    """Returns (a Task Arithmetic config of the two fine-tunes, the perplexity tasks as config entries)."""
    tasks = [t.model_dump(mode="json", exclude_none=True, exclude={"model"}) for t in _tasks(root, fts)]
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(fts[n]), "name": n} for n in ("alpha", "beta")],
        "parameters": {"lambda": 0.5},
    }
    return data, tasks


def test_normalized_nll_by_hand():
    assert normalized_nll(3.0, 2.0, 2.5) == pytest.approx(0.5)  # half the fine-tune's gain kept
    assert normalized_nll(3.0, 2.0, 2.0) == pytest.approx(1.0)
    assert normalized_nll(3.0, 2.0, 3.5) == pytest.approx(-0.5)  # worse than the base
    assert normalized_nll(3.0, 1.0, 1.5) == pytest.approx(0.75)
    assert math.isnan(normalized_nll(2.0, 2.0, 1.0)) and math.isnan(normalized_nll(2.0, 2.5, 1.0))  # no gain


def test_the_evaluator_equals_direct_perplexity_and_the_hand_formula(domains):
    root, base, fts = domains
    tasks = _tasks(root, fts)
    evaluator = LmEvaluator(tasks, base)
    merged = fts["alpha"]  # any causal LM: here the alpha fine-tune stands in for a merge
    report = evaluator.evaluate({"merged": merged}, "test").to_json()
    specs = {t.name: t for t in tasks}

    def direct(path: Path, name: str) -> dict[str, float]:
        model, tokenizer = load_causal_lm(path)
        texts = evaluator.texts(name, "test")
        return perplexity(model, tokenizer, texts, specs[name].max_length, 8)

    for name in ("alpha", "beta"):
        b, f, m = direct(base, name), direct(fts[name], name), direct(merged, name)
        assert f["nll"] < b["nll"] - 0.3, (name, f, b)  # each fine-tune learned its own domain
        assert report["base_probe"]["scores"][name] == pytest.approx(b["perplexity"])
        assert report["finetuned"][name] == pytest.approx(f["perplexity"])
        assert report["models"]["merged"]["scores"][name] == pytest.approx(m["perplexity"])
        want = (b["nll"] - m["nll"]) / (b["nll"] - f["nll"])
        assert report["models"]["merged"]["normalized"][name] == pytest.approx(want)
    assert report["models"]["merged"]["normalized"]["alpha"] == pytest.approx(1.0)
    gamma_b, gamma_m = direct(base, "gamma"), direct(merged, "gamma")
    ood = report["models"]["merged"]["ood"]["gamma"]
    assert ood["retention"] == pytest.approx(gamma_b["perplexity"] / gamma_m["perplexity"])
    assert [t["role"] for t in report["tasks"]] == ["merge", "merge", "out_of_domain"]


def test_perplexity_is_cached_by_folder_contents_texts_and_settings(domains, tmp_path: Path, monkeypatch):
    """`folder_perplexity` returns the computed scores bit for bit from the cache; any change of the model's
    files, the texts, the window or the batch is a miss; a damaged entry is computed again."""
    import shutil

    from merging.evaluation.causal import folder_perplexity
    from tests.helpers import scale_in_place_keeping_mtime

    monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    _root, base, _fts = domains
    folder = tmp_path / "lm"
    shutil.copytree(base, folder)
    texts = _texts(DOMAINS["alpha"], 6, seed=7)
    loads: list[Path] = []

    def load():
        loads.append(folder)
        return load_causal_lm(folder)

    def scored(t=texts, window=32, batch=4):
        return folder_perplexity(folder, t, window, batch, load)

    first = scored()
    assert first == perplexity(*load_causal_lm(folder), texts, 32, 4) and len(loads) == 1
    assert scored() == first and len(loads) == 1  # read back, exactly; the model was not loaded
    scored(list(reversed(texts)))
    scored(window=16)
    scored(batch=3)
    assert len(loads) == 4
    # the same folder with other weights (rewritten in place, its mtime put back) is a miss
    scale_in_place_keeping_mtime(folder / "model.safetensors", "q_proj.weight")
    changed = scored()
    assert len(loads) == 5 and changed != first
    entries = sorted((tmp_path / "cache" / "features").glob("*/*.safetensors"))
    assert len(entries) == 5
    for entry in entries:
        entry.write_bytes(b"damaged")
    assert scored() == changed and len(loads) == 6
    monkeypatch.setenv("MERGEFLOW_FEATURE_CACHE", "0")
    shutil.rmtree(tmp_path / "cache" / "features")
    assert scored() == changed and len(loads) == 7 and not (tmp_path / "cache" / "features").exists()


def test_a_second_evaluator_scores_base_and_finetunes_from_the_cache(domains, tmp_path: Path, monkeypatch):
    import merging.evaluation.lm as lm

    monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    root, base, fts = domains
    first = LmEvaluator(_tasks(root, fts), base).evaluate({"merged": fts["beta"]}, "test").to_json()
    monkeypatch.setattr(lm, "load_causal_lm", lambda path: pytest.fail(f"{path} was loaded: a cache miss"))
    assert LmEvaluator(_tasks(root, fts), base).evaluate({"merged": fts["beta"]}, "test").to_json() == first


def test_pipeline_chooses_lambda_on_validation_and_gates_on_mean_perplexity(prefect_harness, domains, tmp_path):
    import mlflow

    root, base, fts = domains
    work = tmp_path / "work"
    data, tasks = _merge_config(root, base, fts)
    data |= {
        "evaluation": {"tasks": tasks, "search": {"lambda": [0.1, 1.0]}},
        "registry": {
            "model_name": "tiny-lm",
            "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
            "gate": {"metric": "average", "higher_is_better": False},  # mean perplexity: lower is better
        },
        "pipeline": {"workdir": str(work)},
    }
    first = run_pipeline(parse_config(data, "lm.yml"))
    search = first.report["search"]
    # Every point scored on validation by the share of NLL gains kept; the best one is the merge.
    by_score = max(search["points"], key=lambda p: p["score"])
    assert search["objective"] == "average_normalized" and search["best"] == by_score["params"]
    assert len({p["score"] for p in search["points"]}) == 2  # the two λ really differ
    assert first.registration is not None
    logged = mlflow.MlflowClient(tracking_uri=first.registration.tracking_uri).get_run(first.registration.run_id)
    assert logged.data.params["parameters.lambda"] == str(by_score["params"]["lambda"])
    merged = first.report["models"]["merged"]
    assert first.report["metric"] == "perplexity" and set(first.report["nll"]) == {"base", "finetuned", "merged"}
    assert 0 < merged["normalized"]["alpha"] and 0 < merged["normalized"]["beta"]
    assert first.metrics["task.alpha.nll"] == pytest.approx(first.report["nll"]["merged"]["alpha"])
    assert "ood.gamma.perplexity" in first.metrics
    reg = first.registration
    assert reg is not None and reg.aliases == ["candidate", "champion"]
    run = mlflow.MlflowClient(tracking_uri=reg.tracking_uri).get_run(reg.run_id)
    assert run.data.metrics["average"] == pytest.approx(merged["average"])
    artifacts = {a.path for a in mlflow.MlflowClient(tracking_uri=reg.tracking_uri).list_artifacts(reg.run_id)}
    assert "scores.png" in artifacts  # the per-domain plot

    # A far worse merge (λ 4: both task vectors overshoot): a higher mean perplexity fails the gate.
    worse = dict(data, parameters={"lambda": 4.0}, evaluation={"tasks": tasks})
    second = run_pipeline(parse_config(worse, "lm.yml"))
    assert second.metrics["average"] > first.metrics["average"]
    assert second.registration is not None and second.registration.aliases == ["candidate"]
    assert "fails the gate" in second.registration.gate_reason
    assert aliases(reg.tracking_uri, "tiny-lm") == {"candidate": "2", "champion": "1"}


def test_perplexity_tasks_config_errors_name_the_problem(domains, tmp_path):
    from tasks.evaluate import make_scorer

    root, base, fts = domains
    data, lm_tasks = _merge_config(root, base, fts)
    mixed = dict(data, evaluation={"tasks": [*lm_tasks, {"name": "cls", "dataset": str(root / "x")}]})
    message = r"tasks \['alpha', 'beta', 'gamma'\] score a causal LM \(perplexity, lm_eval\) and the others do not"
    with pytest.raises(ConfigError, match=message):
        make_scorer(parse_config(mixed, "m.yml"))
    average = dict(data, evaluation={"tasks": lm_tasks, "objective": "average"})
    with pytest.raises(ConfigError, match="maximizes `average_normalized`"):
        make_scorer(parse_config(average, "m.yml"))
    refit = dict(data, evaluation={"tasks": lm_tasks, "heads": "refit"})
    with pytest.raises(ConfigError, match="`refit` applies to encoder heads"):
        make_scorer(parse_config(refit, "m.yml"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data" / "bad").mkdir(exist_ok=True)
    pq.write_table(pa.table({"body": ["x"]}), root / "data" / "bad" / "test.parquet")
    bad = TaskSpec(name="bad", dataset=str(root / "data" / "bad"), metric="perplexity")
    with pytest.raises(ConfigError, match=r"task bad: .*bad/test\.parquet has no column 'text' \(columns: body\)"):
        LmEvaluator([bad], base).texts("bad", "test")
