"""The pipeline flow in `prefect_test_harness` on tiny generated models: embedded MLflow (sqlite), local storage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from flows.cli import main as cli_main
from flows.merge_pipeline import run_pipeline
from merging.config import load_config, parse_config
from merging.engine.merge import MergeOptions, run_merge
from merging.engine.staged import layer_cache
from merging.errors import CheckpointError, ConfigError, MergeflowError
from tasks.download import fetch_model, reference_kind
from tasks.storage import MANIFEST, is_transient
from tests.helpers import build_tiny_tasks
from tests.test_staged import folder_bytes


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pipeline-family")
    base, fts, tasks = build_tiny_tasks(root)
    return root, base, fts, tasks


def pipeline_config(root: Path, base: Path, fts: list[Path], work: Path, **overrides: object) -> dict:
    data: dict = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(fts[0]), "name": "two"}, {"model": str(fts[1]), "name": "three"}],
        "parameters": {"lambda": 0.5},
        "evaluation": {
            "tasks": [
                {"name": n, "dataset": str(root / "data" / n), "num_labels": k, "max_length": 8}
                for n, k in [("two", 2), ("three", 3), ("ood", 2)]
            ]
        },
        "registry": {"model_name": "tiny", "tracking_uri": f"sqlite:///{work / 'mlflow.db'}"},
        "storage": {"uri": str(work / "store")},
        "pipeline": {"workdir": str(work)},
    }
    data.update(overrides)
    return data


def aliases(tracking_uri: str, name: str) -> dict[str, str]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def versions(tracking_uri: str, name: str) -> list[str]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'"))


def test_flow_merges_evaluates_publishes_registers_and_gates(prefect_harness, family, tmp_path: Path):
    import mlflow

    root, base, fts, _ = family
    work = tmp_path / "work"
    data = pipeline_config(root, base, fts, work)
    uri_before = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    result = run_pipeline(parse_config(data, "test"))
    # The run's tracking URI stays the run's: a later run in this process must not inherit it.
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == uri_before
    # The merged folder is the one `mergeflow merge` writes for the same config.
    run_merge(load_config_from(data, tmp_path), tmp_path / "one", MergeOptions(progress=False))
    assert folder_bytes(result.merged_dir) == folder_bytes(tmp_path / "one")
    # Evaluation: JSON and plot written, metrics match the report.
    results = work / "results" / result.merge_key[:16]
    report = json.loads((results / "results.json").read_text())
    assert (results / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert result.metrics["average_normalized"] == pytest.approx(report["models"]["merged"]["average_normalized"])
    assert set(report["models"]["merged"]["ood"]) == {"ood"}
    from prefect.artifacts import Artifact

    artifact = Artifact.get("merge-results")
    assert artifact is not None and artifact.type == "table"
    table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert [row["task"] for row in table] == ["two", "three", "ood", "average"]
    # Published with its manifest last, every file's hash recorded.
    store = Path(result.published)
    manifest = json.loads((store / MANIFEST).read_text())
    assert set(manifest["files"]) == set(folder_bytes(result.merged_dir))
    # Registered: version 1 is candidate and champion; lineage tags are on the version.
    reg = result.registration
    assert reg is not None and reg.version == "1" and reg.aliases == ["candidate", "champion"]
    client = mlflow.MlflowClient(tracking_uri=reg.tracking_uri)
    mv = client.get_model_version("tiny", "1")
    assert mv.tags["mergeflow.merge_key"] == result.merge_key
    assert mv.tags["mergeflow.flow_run_id"]
    assert mv.tags["mergeflow.input.base"].startswith(str(base))
    # Its description (what the MLflow UI shows) carries the evaluation table and the model card.
    table = mv.description.split("\n---\n", 1)[0]  # the card (its own tables) follows the rule
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert {"two", "three", "ood", "average"} <= set(rows)
    merged = report["models"]["merged"]
    assert f"{merged['normalized']['two']:.4f}" in rows["two"] and "out-of-domain" in rows["ood"]
    assert f"{merged['average_normalized']:.4f}" in rows["average"]
    assert f"**Gate:** {reg.gate_reason}" in mv.description and "## Method and parameters" in mv.description
    assert len(mv.description) <= 5000
    run = client.get_run(reg.run_id)
    assert run.data.params["merge_method"] == "task_arithmetic"
    assert run.data.metrics["average_normalized"] == pytest.approx(result.metrics["average_normalized"])
    # The registered model is a multi-task classifier: a task and a text in, that task's label out.
    import pandas as pd

    mlflow.set_tracking_uri(reg.tracking_uri)  # the conftest puts it back after the test
    model = mlflow.pyfunc.load_model("models:/tiny@champion")
    out = model.predict(pd.DataFrame({"task": ["two", "three"], "text": ["merge model", "the neuron"]}))
    assert list(out["task"]) == ["two", "three"] and out["label_index"].iloc[0] in (0, 1)
    assert len(out["probabilities"].iloc[1]) == 3

    # A second run whose gate demands a margin it cannot have: candidate moves, champion stays.
    gated = dict(data, registry={**data["registry"], "gate": {"metric": "average_normalized", "min_margin": 0.05}})
    second = run_pipeline(parse_config(gated, "test"))
    assert second.layers_reused and not second.layers_merged  # same inputs, same parameters: all cached
    assert second.registration is not None and second.registration.aliases == ["candidate"]
    assert "fails the gate" in second.registration.gate_reason
    assert aliases(reg.tracking_uri, "tiny") == {"candidate": "2", "champion": "1"}


def load_config_from(data: dict, tmp: Path):
    path = tmp / "config.yml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_killed_layer_moves_no_alias_and_rerun_merges_only_the_rest(
    prefect_harness, family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    root, base, fts, _ = family
    work = tmp_path / "work"
    data = pipeline_config(root, base, fts, work, merge_method="ties", parameters={"density": 0.5, "lambda": 1.0})
    data["pipeline"]["runner"] = "sequential"
    monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(tmp_path / "cache"))  # its own layer cache
    monkeypatch.setenv("MERGEFLOW_FAULT_LAYER", "encoder.layer.1")
    with pytest.raises(MergeflowError, match="injected fault"):
        run_pipeline(parse_config(data, "test"))
    tracking = data["registry"]["tracking_uri"]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking)
    assert not client.search_registered_models()  # no version, no alias
    assert not list((work / "store").glob("*/*")) if (work / "store").exists() else True
    # Nothing is published; what the finished layers wrote waits in the hidden partial folder, journaled.
    assert not [p for p in (work / "merged").iterdir() if not p.name.startswith(".")]
    finished_meta = [json.loads(p.read_text()) for p in (work / "merged").glob(".*.partial/journal/*.json")]
    assert finished_meta
    monkeypatch.delenv("MERGEFLOW_FAULT_LAYER")
    result = run_pipeline(parse_config(data, "test"))
    finished = {m["group"] for m in finished_meta if m.get("merge_key") == result.merge_key}
    assert "encoder.layer.1" in result.layers_merged
    assert set(result.layers_merged) == (set(result.layers_merged) | set(result.layers_reused)) - finished
    assert set(result.layers_reused) <= finished and result.layers_reused
    run_merge(load_config_from(data, tmp_path), tmp_path / "one", MergeOptions(progress=False))
    assert folder_bytes(result.merged_dir) == folder_bytes(tmp_path / "one")
    assert result.registration is not None and result.registration.version == "1"
    # The run held its layers while it ran (lock stamped); once it is over, gc may take them as one entry.
    from tasks.cache import entries, gc

    assert (tmp_path / "cache" / "inuse" / f"layers-{result.merge_key}.lock").exists()
    mine = [e for e in entries() if e.area == "layers" and e.key == result.merge_key]
    assert len(mine) == 1 and len(mine[0].paths) == 2  # the statistics and the output's record; no layer copies
    assert not list((work / "merged").glob(".*.partial"))  # the partial folder became the output
    assert result.merge_key in {r["key"] for r in gc(keep_days=0, grace_seconds=0).removed}
    assert not [p for p in layer_cache().iterdir() if not p.name.startswith(".")]  # nothing of it is left


def test_validation_search_picks_lambda_and_reports_test_only(prefect_harness, family, tmp_path: Path):
    root, base, fts, _ = family
    work = tmp_path / "work"
    data = pipeline_config(root, base, fts, work)
    data["evaluation"]["search"] = {"lambda": [0.2, 1.0]}
    del data["registry"]
    result = run_pipeline(parse_config(data, "test"))
    assert result.search is not None and result.search["best"]["lambda"] in (0.2, 1.0)
    assert len(result.search["points"]) == 2
    assert result.report is not None and result.report["split"] == "test"
    saved = yaml.safe_load((result.merged_dir / "mergeflow_config.yml").read_text())
    assert saved["parameters"]["lambda"] == result.search["best"]["lambda"]
    assert result.registration is None
    assert result.search["objective"] == "average_normalized"
    # both head protocols are reported, whichever the search used
    assert 0 < result.metrics["refit_average_normalized"] < 2 and 0 < result.metrics["average_normalized"] < 2


def test_validation_search_with_refit_heads(prefect_harness, family, tmp_path: Path):
    """`evaluation.heads: refit` scores each grid point with heads refitted on the merged encoder."""
    root, base, fts, _ = family
    data = pipeline_config(root, base, fts, tmp_path / "work")
    data["evaluation"].update(search={"lambda": [0.2, 1.0]}, heads="refit")
    del data["registry"]
    result = run_pipeline(parse_config(data, "test"))
    assert result.search is not None and result.search["objective"] == "refit_average_normalized"
    best = max(result.search["points"], key=lambda p: p["score"])
    assert result.search["best"] == best["params"]
    report = result.report["models"]["merged"]  # type: ignore[index]
    assert set(report["refit"]) == set(report["scores"])
    assert result.metrics["refit_average_normalized"] == pytest.approx(report["refit_average_normalized"])


def test_cli_run_overrides_and_prints(prefect_harness, family, tmp_path: Path, capsys: pytest.CaptureFixture):
    root, base, fts, _ = family
    work = tmp_path / "work"
    data = pipeline_config(root, base, fts, work)
    path = tmp_path / "pipeline.yml"
    path.write_text(yaml.safe_dump(data))
    other = tmp_path / "elsewhere"
    code = cli_main(["run", str(path), "--storage", str(other), "--runner", "sequential"])
    out = capsys.readouterr().out
    assert code == 0
    assert "registered: tiny version 1, aliases candidate, champion" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out and "prefect server start" in out
    assert list(other.glob(f"tiny/*/{MANIFEST}"))


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("storage", {"uri": "ftp://x/y"}, "storage.uri"),
        ("registry", {"model_name": ""}, "registry.model_name"),
        ("evaluation", {"split": "test"}, "evaluation"),
        ("evaluation", {"zoo": "z", "search": {"lambda": [1]}, "validation_split": "test"}, "λ must not be chosen"),
        ("evaluation", {"zoo": "z", "heads": "shared"}, "evaluation.heads"),
        ("pipeline", {"runner": "ray"}, "pipeline.runner"),
    ],
)
def test_bad_pipeline_sections_are_named(section: str, value: dict, message: str):
    data = {"merge_method": "ties", "base_model": "a", "models": [{"model": "b"}], section: value}
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "bad.yml")


def test_references_and_offline_hub_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert reference_kind("s3://b/p") == "s3"
    assert reference_kind("models:/m@champion") == "mlflow"
    assert reference_kind("runs:/abc/model") == "mlflow"
    assert reference_kind("org/some-model") == "hub"
    assert reference_kind(str(tmp_path)) == "local"
    with pytest.raises(ConfigError, match="unsupported scheme"):
        reference_kind("http://example.com/model")
    local = fetch_model(str(tmp_path))
    assert local.kind == "local" and local.path == tmp_path.resolve()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MergeflowError, match="hub cannot be reached") as offline:
        fetch_model("someone/not-cached-model", cache=tmp_path / "cache")
    assert not is_transient(offline.value)  # failed on the first attempt: a retry cannot reach the hub either


@pytest.mark.parametrize(
    "ref,message",
    [
        ("models:/no-such-model@champion", "not found in the MLflow registry"),
        ("runs:/0123456789abcdef/model", "cannot download"),
    ],
)
def test_missing_registry_model_or_run_fails_once_with_a_clear_error(tmp_path: Path, ref: str, message: str):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(MergeflowError, match=message) as raised:
        fetch_model(ref, tracking_uri=tracking, cache=tmp_path / "cache")
    assert not is_transient(raised.value)


def test_evaluation_needs_a_task_named_like_a_fine_tune(prefect_harness, family, tmp_path: Path):
    root, base, fts, _ = family
    data = pipeline_config(root, base, fts, tmp_path / "work")
    data["models"] = [{"model": str(fts[0]), "name": "alpha"}, {"model": str(fts[1]), "name": "beta"}]
    with pytest.raises(ConfigError, match="no task is named like a fine-tune"):
        run_pipeline(parse_config(data, "test"))


def test_unreadable_tokenizer_fails_before_merging_naming_the_file(prefect_harness, family, tmp_path: Path):
    import shutil

    root, base, fts, _ = family
    broken = tmp_path / "base"
    shutil.copytree(base, broken)
    (broken / "tokenizer_config.json").write_bytes(b"\xff\xfe not json")
    data = pipeline_config(root, broken, fts, tmp_path / "work")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: unreadable tokenizer file"):
        run_pipeline(parse_config(data, "test"))
    assert not (tmp_path / "work" / "merged").exists()  # refused before any layer was merged


def test_version_description_keeps_the_table_and_cuts_a_long_card_to_mlflows_limit():
    from tasks.promotion import version_description

    report = {
        "split": "test",
        "tasks": [{"name": "a", "role": "merge"}, {"name": "o", "role": "ood"}],
        "base_probe": {"scores": {"a": 0.5}},
        "finetuned": {"a": 0.9},
        "models": {
            "merged": {
                "scores": {"a": 0.8},
                "normalized": {"a": 0.8 / 0.9},
                "average": 0.8,
                "average_normalized": 0.8 / 0.9,
                "ood": {"o": {"base_probe": 0.7, "merged_probe": 0.69, "retention": 0.69 / 0.7}},
            }
        },
    }
    card = "# card\n" + "\n".join(f"line {i} http://user:hunter2@host/x" for i in range(2000))
    text = version_description(report, "no champion yet", card)
    assert len(text) <= 5000 and "| a | merge | 0.5000 | 0.9000 | 0.8000 | 0.8889 |" in text
    assert "| o | out-of-domain | 0.7000 |  | 0.6900 | 0.9857 |" in text
    assert "the full card is the run's README.md" in text and "hunter2" not in text
    assert version_description(None, "no champion yet", None) == "**Gate:** no champion yet\n"
