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
from safetensors.torch import load_file

from flows.cli import main
from merging.errors import ConfigError
from merging.evaluation import Evaluator, load_head
from merging.merge import MergeOptions, run_merge
from merging.zoo import zoo_merge_config, zoo_tasks
from merging.zoo.build import MERGE_TASKS, OOD_TASKS, SIZES, build_zoo, finetune
from merging.zoo.manifest import ZooManifest, load_manifest
from merging.zoo.sources import BUILDERS


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_sources_are_real_labelled_data(name: str):
    source = BUILDERS[name]()
    assert source.name == name
    assert len(source.texts) >= 1000 and len(source.texts) == len(source.labels)
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


def test_head_protocols(ci_zoo: tuple[Path, ZooManifest]):
    """frozen keeps the probe head bit for bit and moves the encoder; joint moves both."""
    root, manifest = ci_zoo
    task = manifest.merge_tasks()[0]
    probe = load_head(root / task.probe_head)
    table = pq.read_table(root / task.data / "train.parquet")
    train = (table.column("text").to_pylist()[:32], table.column("label").to_pylist()[:32])
    spec = replace(SIZES["ci"], steps=2, batch_size=8)
    base_query = load_file(str(root / "base" / "model.safetensors"))["encoder.layer.0.attention.self.query.weight"]
    for protocol in ("frozen", "joint"):
        model = finetune(root / "base", train, probe, protocol, spec, task.max_length, 0, task.label_names)
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
