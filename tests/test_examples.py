"""Every config in examples/ loads and validates; the merges and the embedded pipeline run end to end on the ci
zoo, and the LLM pipeline on tiny generated Llamas, exactly as the files are written (only the zoo's folder,
which is per test session here, is substituted)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from flows.cli import main
from flows.merge_pipeline import run_pipeline
from merging.config import load_config
from tests.test_lm_evaluation import domains  # noqa: F401  (the tiny Llama family and its text domains)
from tests.test_pipeline import aliases

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yml"))
ZOO_IN_EXAMPLES = "~/.cache/mergeflow/zoo/ci-joint"
CAUSAL_ZOO_IN_EXAMPLES = "~/.cache/mergeflow/zoo/causal-ci"
MERGES = [p for p in EXAMPLES if p.name.startswith(("merge-", "mergekit-"))]


def _localized(example: Path, zoo: Path, folder: Path, causal_zoo: Path | None = None) -> Path:
    """Returns a copy of `example` in `folder` whose zoo paths point at this session's ci zoos."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / example.name
    text = example.read_text().replace(ZOO_IN_EXAMPLES, str(zoo))
    if causal_zoo is not None:
        text = text.replace(CAUSAL_ZOO_IN_EXAMPLES, str(causal_zoo))
    copy.write_text(text)
    return copy


def test_the_examples_are_the_ones_the_docs_list():
    names = {p.name for p in EXAMPLES}
    assert len(names) >= 10 and {p.name for p in MERGES} >= {
        "merge-task-arithmetic.yml",
        "merge-ties.yml",
        "merge-dare-ties.yml",
        "merge-dare-linear.yml",
        "merge-neuromerging.yml",
        "mergekit-ties.yml",
    }
    listed = (ROOT / "docs" / "examples.md").read_text()
    assert all(f"`examples/{n}`" in listed for n in names)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_each_example_loads_and_validates(example: Path, ci_zoo, causal_ci_zoo, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(_localized(example, ci_zoo[0], tmp_path, causal_ci_zoo[0]))
    assert config.models and config.merge_method
    if "zoo" in example.read_text():
        for ref in [config.base_model, *(m.model for m in config.models)]:
            assert Path(ref).is_dir(), f"{example.name}: {ref} is not in the ci zoo"


@pytest.mark.parametrize("example", MERGES, ids=lambda p: p.name)
def test_each_merge_example_runs(example: Path, ci_zoo, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config_path = _localized(example, ci_zoo[0], tmp_path)
    out = tmp_path / "out"
    assert main(["merge", str(config_path), str(out), "--no-progress"]) == 0
    config = load_config(config_path)
    with (
        safe_open(str(out / "model.safetensors"), "pt") as merged,
        safe_open(str(Path(config.base_model) / "model.safetensors"), "pt") as base,
    ):
        names = [n for n in merged.keys() if n.endswith("query.weight")]
        assert names and any(not merged.get_tensor(n).equal(base.get_tensor(n)) for n in names)
    heads = {p.stem for p in (out / "heads").glob("*.safetensors")}
    labels = {m.name or Path(m.model).name for m in config.models if m.model != config.base_model}
    assert labels <= heads
    assert load_config(out / "mergeflow_config.yml").merge_method == config.merge_method


def test_the_embedded_pipeline_example_runs(prefect_harness, ci_zoo, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(_localized(ROOT / "examples" / "pipeline-embedded.yml", ci_zoo[0], tmp_path))
    result = run_pipeline(config)
    assert result.report is not None and result.report["search"]["best"]["lambda"] in (0.5, 1.0)
    assert set(result.report["models"]["merged"]["normalized"]) == {"tweet_sentiment", "headline_match", "language_id"}
    assert result.published and Path(result.published).is_relative_to(tmp_path / "mergeflow-work" / "store")
    reg = result.registration
    assert reg is not None and reg.aliases == ["candidate", "champion"]
    assert aliases(reg.tracking_uri, "ci-zoo-neuromerging") == {"candidate": "1", "champion": "1"}


def test_the_causal_zoo_pipeline_example_runs(prefect_harness, causal_ci_zoo, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    example = ROOT / "examples" / "pipeline-causal-zoo.yml"
    config = load_config(_localized(example, Path("unused"), tmp_path, causal_ci_zoo[0]))
    result = run_pipeline(config)
    report = result.report
    assert report is not None and report["metric"] == "perplexity"
    assert report["search"]["best"]["lambda"] in (0.5, 1.0)
    assert set(report["models"]["merged"]["normalized"]) == {"python", "news", "dialogue"}
    assert "ood.speeches.perplexity" in result.metrics and "task.python.nll" in result.metrics
    reg = result.registration
    assert reg is not None and reg.aliases == ["candidate", "champion"]
    assert aliases(reg.tracking_uri, "causal-zoo-task-arithmetic") == {"candidate": "1", "champion": "1"}


def test_the_llm_example_runs_on_tiny_llamas(prefect_harness, domains, tmp_path: Path, monkeypatch):  # noqa: F811
    root, base, fts = domains
    for name, source in {"base": base, "ft-python": fts["alpha"], "ft-news": fts["beta"]}.items():
        shutil.copytree(source, tmp_path / "llm" / name)
    for name, source in {"python": "alpha", "news": "beta", "tweets": "gamma"}.items():
        shutil.copytree(root / "data" / source, tmp_path / "data" / name)
    shutil.copy(ROOT / "examples" / "pipeline-llm-perplexity.yml", tmp_path / "pipeline.yml")
    monkeypatch.chdir(tmp_path)
    result = run_pipeline(load_config(tmp_path / "pipeline.yml"), workdir=tmp_path / "work")
    assert result.report is not None and result.report["metric"] == "perplexity"
    assert result.report["search"]["best"]["lambda"] in (0.3, 0.5, 1.0)
    assert set(result.report["models"]["merged"]["normalized"]) == {"python", "news"}
    assert "ood.tweets.perplexity" in result.metrics
    assert result.registration is not None and result.registration.aliases == ["candidate", "champion"]
