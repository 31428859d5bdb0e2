"""lm-evaluation-harness tasks as evaluation tasks for causal LMs (`metric: lm_eval:<task>[:<metric>]`).

The harness is the real one (the `lm-eval` extra, installed by `make install`), run offline on a task
of our own: a YAML in a local folder (lm-eval's include path) over a JSON-lines file, on the tiny
Llama family of test_lm_evaluation.py. Each document is the start of an `alpha` text with two
continuations, its own end and a run of `beta` tokens: the alpha fine-tune learned to prefer the
first, the beta fine-tune the second.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.merge_pipeline import run_pipeline
from merging.config import parse_config
from merging.errors import ConfigError
from merging.evaluation.causal import lm_eval_scores
from merging.evaluation.data import TaskSpec, lm_eval_target
from merging.evaluation.lm import LmEvaluator, normalized_nll
from tests.test_lm_evaluation import (
    DOMAINS,
    _merge_config,
    _tasks,
    _texts,
    domains,  # noqa: F401  (the tiny Llama family and its text domains)
)

TASK = "mf_alpha_choice"


@pytest.fixture(scope="module")
def family(domains, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """The tiny family with `[CLS]`/`[SEP]` as its tokenizer's BOS/EOS: lm-eval prefixes each request with one
    (every real LLM tokenizer has them; the test family's word-level tokenizer does not)."""
    from transformers import AutoTokenizer

    root, base, fts = domains
    folder = tmp_path_factory.mktemp("lm-eval-family")
    copies = {}
    for name, source in {"base": base, **fts}.items():
        shutil.copytree(source, folder / name)
        tokenizer = AutoTokenizer.from_pretrained(folder / name)
        tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
        tokenizer.save_pretrained(folder / name)
        copies[name] = folder / name
    return root, copies.pop("base"), copies


@pytest.fixture(scope="module")
def choice_task(family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding one lm-eval task YAML and its data: 24 two-way continuation choices."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    rows = []
    for number, text in enumerate(_texts(DOMAINS["alpha"], 24, seed=7)):
        words = text.split()
        other = " ".join(_texts(DOMAINS["beta"], 1, seed=1000 + number)[0].split()[:7])
        rows.append({"context": " ".join(words[:7]), "choices": [" ".join(words[7:]), other], "label": 0})
    (folder / "choices.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'choices.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    return folder


def _acc(path: Path, folder: Path) -> float:
    return float(lm_eval_scores(path, [TASK], include_path=folder)[TASK]["acc,none"])


def test_metric_names_are_checked_where_they_enter():
    assert lm_eval_target("lm_eval:hellaswag") == ("hellaswag", "acc")
    assert lm_eval_target("lm_eval:arc_easy:acc_norm") == ("arc_easy", "acc_norm")
    assert lm_eval_target("perplexity") is None
    for bad in ("lm_eval:", "lm_eval:../etc", "lm_eval:a:b:c", "lm_eval:a b", "lm_eval:/abs", "bleu", "lm_eval:a\n"):
        with pytest.raises(ValidationError, match="metric"):
            TaskSpec(name="t", dataset="lm_eval", metric=bad)


def test_without_the_extra_the_error_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: `import lm_eval` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install -e '.\[lm-eval\]'"):
        lm_eval_scores(tmp_path, ["hellaswag"])


def test_the_task_index_is_built_once_per_folder_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """lm-eval's TaskManager indexes every YAML it ships (10-20 s): one per process and include folder state."""
    from merging.evaluation import causal

    monkeypatch.setattr(causal, "_MANAGERS", {})
    built: list[dict] = []

    def factory(**kwargs):
        built.append(kwargs)
        return object()

    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "a.yaml").write_text("task: a\n")
    first = causal.task_manager(factory, folder)
    assert causal.task_manager(factory, folder) is first and built == [{"include_path": str(folder)}]
    (folder / "a.yaml").write_text("task: a_renamed\n")  # an edited YAML: indexed again
    second = causal.task_manager(factory, folder)
    assert second is not first and len(built) == 2
    (folder / "sub").mkdir()
    (folder / "sub" / "b.yaml").write_text("task: b\n")  # a new YAML in a subfolder too
    assert causal.task_manager(factory, folder) is not second and len(built) == 3
    assert causal.task_manager(factory, None) is causal.task_manager(factory, None) and built[-1] == {}


def test_an_lm_eval_task_through_the_real_harness(family, choice_task: Path):
    root, base, fts = family
    tasks = [*_tasks(root, fts), TaskSpec(name="choice", dataset=str(choice_task), metric=f"lm_eval:{TASK}")]
    tasks[-1] = tasks[-1].model_copy(update={"model": str(fts["alpha"])})  # the alpha fine-tune "trained" for it
    evaluator = LmEvaluator(tasks, base)
    merged = fts["beta"]  # any causal LM stands in for a merge
    report = evaluator.evaluate({"merged": merged}, "test").to_json()
    b, f, m = _acc(base, choice_task), _acc(fts["alpha"], choice_task), _acc(merged, choice_task)
    assert f > b and f > m, (b, f, m)  # the alpha fine-tune learned to prefer alpha continuations
    assert report["base_probe"]["scores"]["choice"] == b and report["finetuned"]["choice"] == f
    scores = report["models"]["merged"]
    assert scores["scores"]["choice"] == m
    assert scores["normalized"]["choice"] == pytest.approx((m - b) / (f - b))
    assert scores["normalized"]["choice"] == pytest.approx(normalized_nll(-b, -f, -m))
    # lm-eval tasks carry their own split: the validation search never sees them
    assert "choice" not in evaluator.model_scores(merged, "validation").scores
    assert set(evaluator.model_scores(merged, "validation").scores) == {"alpha", "beta"}


def test_unknown_task_and_missing_metric_are_clear_errors(family, choice_task: Path):
    root, base, fts = family
    with pytest.raises(ConfigError, match=r"no task 'nope' in the task YAMLs in"):
        lm_eval_scores(base, ["nope"], include_path=choice_task)
    spec = TaskSpec(name="choice", dataset=str(choice_task), metric=f"lm_eval:{TASK}:f1")
    with pytest.raises(ConfigError, match=r"reported no 'f1' \(it reported \['acc,none'\]\)"):
        LmEvaluator([*_tasks(root, fts), spec], base).score(base, "choice", "test")
    missing = TaskSpec(name="choice", dataset=str(choice_task / "absent"), metric=f"lm_eval:{TASK}")
    with pytest.raises(ConfigError, match="is not a folder of lm-eval task YAMLs"):
        LmEvaluator([*_tasks(root, fts), missing], base).score(base, "choice", "test")


def test_the_pipeline_reports_an_out_of_domain_lm_eval_task(
    prefect_harness,
    family,
    choice_task: Path,
    tmp_path: Path,
):
    root, base, fts = family
    data, tasks = _merge_config(root, base, fts)
    tasks.append({"name": "choice", "dataset": str(choice_task), "metric": f"lm_eval:{TASK}"})
    data |= {
        "evaluation": {"tasks": tasks, "search": {"lambda": [0.1, 1.0]}},
        "registry": {"model_name": "lm-eval-gated", "gate": {"metric": "average_normalized"}},
        "storage": {"uri": str(tmp_path / "store")},
    }
    result = run_pipeline(parse_config(data), workdir=tmp_path / "work")
    report = result.report
    assert report is not None and report["metric"] == "perplexity"
    ood = report["models"]["merged"]["ood"]
    assert set(ood) == {"gamma", "choice"}
    assert ood["choice"]["base_probe"] == _acc(base, choice_task)
    assert ood["choice"]["retention"] == pytest.approx(ood["choice"]["merged_probe"] / ood["choice"]["base_probe"])
    assert result.metrics["ood.choice.score"] == ood["choice"]["merged_probe"]
    assert not math.isnan(result.metrics["average_normalized"])
    # the search ran on the perplexity tasks' validation splits only
    assert {p["params"]["lambda"] for p in report["search"]["points"]} == {0.1, 1.0}


def test_configs_that_cannot_work_with_lm_eval_tasks_are_refused(family, choice_task: Path):
    from tasks.evaluate import is_lm_evaluation

    root, base, fts = family
    data, tasks = _merge_config(root, base, fts)
    only_lm_eval = [{"name": "alpha", "dataset": str(choice_task), "metric": f"lm_eval:{TASK}"}]
    config = parse_config(data | {"evaluation": {"tasks": only_lm_eval, "search": {"lambda": [0.5, 1.0]}}})
    with pytest.raises(ConfigError, match="the validation search needs a perplexity task"):
        is_lm_evaluation(config)
    mixed = [*tasks, {"name": "choice", "dataset": str(choice_task), "metric": f"lm_eval:{TASK}"}]
    config = parse_config(
        data | {"evaluation": {"tasks": mixed}, "registry": {"model_name": "m", "gate": {"metric": "average"}}}
    )
    with pytest.raises(ConfigError, match="`average` would mix perplexities"):
        is_lm_evaluation(config)
    encoder_task = {"name": "gamma", "dataset": str(root / "data" / "gamma"), "metric": "accuracy"}
    config = parse_config(data | {"evaluation": {"tasks": [*tasks[:2], encoder_task]}})
    with pytest.raises(ConfigError, match=r"score a causal LM .* and the others do not"):
        is_lm_evaluation(config)
